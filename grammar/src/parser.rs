//! pest parse tree -> [`wrnc_compiler::ast`].
//!
//! The grammar (`wrnc.pest`) accepts a superset of the language: values are lexed generously
//! and checked here, where the error can name the problem precisely ("number too large",
//! "unknown dataset `foo`", "`lr` is set twice"). Every function returns a [`Diagnostic`]
//! instead of panicking, even where the grammar guarantees the shape of the tree.

use pest::iterators::Pair;
use pest::Parser as _;
use wrnc_compiler::ast::*;

use crate::diagnostic::{empty_file, MAX_SOURCE_BYTES};
use crate::{Diagnostic, Source};

#[derive(pest_derive::Parser)]
#[grammar = "wrnc.pest"]
pub(crate) struct WrncParser;

/// Parses a network file or an inline family expression.
///
/// Errors (first one found): empty text, nesting deeper than [`crate::MAX_NESTING`], syntax
/// errors, malformed numbers and names, duplicate settings, no `network` item.
/// Numbers are not checked for meaning (depth fitting a family, k >= 1, ...): that is the
/// compiler's job (`wrnc_compiler::build`).
pub fn parse(src: &Source) -> Result<NetFile, Diagnostic> {
    if src.text.trim().is_empty() {
        return Err(empty_file(src));
    }
    if src.text.len() > MAX_SOURCE_BYTES {
        return Err(Diagnostic::new(
            src,
            Span::default(),
            format!("file is too large (the limit is {MAX_SOURCE_BYTES} bytes)"),
        ));
    }
    crate::nesting::check_nesting(src)?;
    pest::set_error_detail(true);
    let mut pairs =
        WrncParser::parse(Rule::file, &src.text).map_err(|e| crate::error::from_pest(src, &e))?;
    let cx = Cx { src };
    let file = cx.next(&mut pairs, "file")?;
    cx.file(file)
}

struct Cx<'s> {
    src: &'s Source,
}

type R<T> = Result<T, Diagnostic>;

fn span(p: &Pair<Rule>) -> Span {
    Span::new(p.as_span().start(), p.as_span().end())
}

/// Which settings have been seen, and where, for "set twice" errors.
#[derive(Default)]
struct Seen {
    items: Vec<(&'static str, Span)>,
}

impl<'s> Cx<'s> {
    fn err(&self, span: Span, msg: impl Into<String>) -> Diagnostic {
        Diagnostic::new(self.src, span, msg)
    }

    /// A tree shape the grammar rules out; reported rather than panicking.
    fn internal(&self, span: Span, what: &str) -> Diagnostic {
        self.err(
            span,
            format!("internal error: unexpected parse tree at {what} (please report this)"),
        )
    }

    fn next<'i>(
        &self,
        it: &mut impl Iterator<Item = Pair<'i, Rule>>,
        what: &str,
    ) -> R<Pair<'i, Rule>> {
        it.next()
            .ok_or_else(|| self.internal(Span::new(self.src.text.len(), self.src.text.len()), what))
    }

    /// Inner pairs, skipping keyword tokens (`kw_*`).
    fn args<'i>(&self, p: Pair<'i, Rule>) -> impl Iterator<Item = Pair<'i, Rule>> {
        p.into_inner().filter(|q| !is_keyword(q.as_rule()))
    }

    fn file(&self, file: Pair<Rule>) -> R<NetFile> {
        let mut network: Option<(NetworkSpec, Span)> = None;
        let mut settings = Settings::default();
        let mut seen = Seen::default();
        for item in file.into_inner() {
            match item.as_rule() {
                Rule::EOI => {}
                Rule::bare_family => {
                    let fam = self.next(&mut item.into_inner(), "bare family")?;
                    let sp = span(&fam);
                    network = Some((
                        NetworkSpec::Family(crate::family::family(self.src, fam)?),
                        sp,
                    ));
                }
                Rule::network_item => {
                    let sp = span(&item);
                    if let Some((_, first)) = &network {
                        return Err(self.twice("network", sp, *first));
                    }
                    let value = self.next(&mut self.args(item), "network")?;
                    let spec = match value.as_rule() {
                        Rule::family => {
                            NetworkSpec::Family(crate::family::family(self.src, value)?)
                        }
                        Rule::structural => NetworkSpec::Structural(self.structural(value)?),
                        _ => return Err(self.internal(span(&value), "network")),
                    };
                    network = Some((spec, sp));
                }
                Rule::train_block => {
                    for setting in self.args(item) {
                        self.setting(setting, &mut settings, &mut seen)?;
                    }
                }
                _ => self.setting(item, &mut settings, &mut seen)?,
            }
        }
        match network {
            Some((network, _)) => Ok(NetFile { network, settings }),
            None => Err(self
                .err(Span::new(0, 0), "no network in this file")
                .with_help("add a `network` line, e.g. `network WRN-28-10`")),
        }
    }

    fn twice(&self, what: &str, again: Span, first: Span) -> Diagnostic {
        let first = Diagnostic::new(self.src, first, "");
        self.err(again, format!("`{what}` is set twice"))
            .with_note(format!("first set at {}", first.location()))
            .with_help(format!(
                "each setting may appear at most once; remove one `{what}`"
            ))
    }

    fn setting(&self, item: Pair<Rule>, s: &mut Settings, seen: &mut Seen) -> R<()> {
        let item_span = span(&item);
        let rule = item.as_rule();
        let key: &'static str = match rule {
            Rule::dataset_item => "dataset",
            Rule::dropout_item => "dropout",
            Rule::shortcut_item => "shortcut",
            Rule::sd_item => "stochastic_depth",
            Rule::classes_item => "classes",
            Rule::batch_item => "batch",
            Rule::precision_item => "precision",
            Rule::seed_item => "seed",
            Rule::epochs_item => "epochs",
            Rule::lr_item => "lr",
            Rule::schedule_item => "schedule",
            Rule::momentum_item => "momentum",
            Rule::nesterov_item => "nesterov",
            Rule::wd_item => "weight_decay",
            Rule::ls_item => "label_smoothing",
            _ => return Err(self.internal(item_span, "setting")),
        };
        if let Some((_, first)) = seen.items.iter().find(|(k, _)| *k == key) {
            return Err(self.twice(key, item_span, *first));
        }
        seen.items.push((key, item_span));
        let v = self.next(&mut self.args(item), key)?;
        match rule {
            Rule::dataset_item => s.dataset = Some(self.dataset(&v)?),
            Rule::dropout_item => s.dropout = Some(self.real(&v)?),
            Rule::shortcut_item => s.shortcut = Some(self.shortcut(&v)?),
            Rule::sd_item => s.stochastic_depth = Some(self.real(&v)?),
            Rule::classes_item => s.classes = Some(self.uint(&v)?),
            Rule::batch_item => s.batch = Some(self.uint(&v)?),
            Rule::precision_item => {
                let p = match v.as_str() {
                    "f32" => Precision::F32,
                    "bf16" => Precision::Bf16,
                    other => {
                        return Err(self
                            .err(span(&v), format!("unknown precision `{other}`"))
                            .with_help("precisions are: f32, bf16"))
                    }
                };
                s.precision = Some(Spanned::new(p, span(&v)));
            }
            Rule::seed_item => s.seed = Some(self.uint(&v)?),
            Rule::epochs_item => s.epochs = Some(self.uint(&v)?),
            Rule::lr_item => s.lr = Some(self.real(&v)?),
            Rule::schedule_item => s.schedule = Some(self.schedule(v)?),
            Rule::momentum_item => s.momentum = Some(self.real(&v)?),
            Rule::nesterov_item => {
                s.nesterov = Some(Spanned::new(v.as_str() == "true", span(&v)));
            }
            Rule::wd_item => s.weight_decay = Some(self.real(&v)?),
            Rule::ls_item => s.label_smoothing = Some(self.real(&v)?),
            _ => return Err(self.internal(item_span, "setting")),
        }
        Ok(())
    }

    fn schedule(&self, v: Pair<Rule>) -> R<Spanned<Schedule>> {
        let sp = span(&v);
        let sched = match v.as_rule() {
            Rule::cosine => Schedule::Cosine,
            Rule::onecycle => Schedule::OneCycle,
            Rule::step_schedule => {
                let mut at = Vec::new();
                let mut gamma = DEFAULT_GAMMA;
                let mut after_gamma = false;
                for p in v.into_inner() {
                    match p.as_rule() {
                        Rule::kw_step => {}
                        Rule::kw_gamma => after_gamma = true,
                        Rule::number if after_gamma => gamma = self.real(&p)?.value,
                        Rule::number => at.push(self.real(&p)?.value),
                        _ => return Err(self.internal(span(&p), "schedule")),
                    }
                }
                Schedule::Step { at, gamma }
            }
            _ => return Err(self.internal(sp, "schedule")),
        };
        Ok(Spanned::new(sched, sp))
    }

    pub(crate) fn dataset(&self, v: &Pair<Rule>) -> R<Spanned<Dataset>> {
        dataset(self.src, v)
    }

    fn shortcut(&self, v: &Pair<Rule>) -> R<Spanned<ShortcutKind>> {
        match ShortcutKind::from_name(v.as_str()) {
            Some(k) => Ok(Spanned::new(k, span(v))),
            None => Err(self
                .err(span(v), format!("unknown shortcut `{}`", v.as_str()))
                .with_help(format!(
                    "shortcuts are: {}",
                    ShortcutKind::ALL.map(|k| k.name()).join(", ")
                ))),
        }
    }

    fn uint(&self, v: &Pair<Rule>) -> R<Spanned<u64>> {
        Ok(Spanned::new(uint(self.src, v.as_str(), span(v))?, span(v)))
    }

    fn real(&self, v: &Pair<Rule>) -> R<Spanned<f64>> {
        let text = v.as_str();
        match text.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(Spanned::new(x, span(v))),
            Ok(_) => Err(self
                .err(span(v), "number too large")
                .with_help(format!("the largest number is {:e}", f64::MAX))),
            Err(_) => Err(self.err(span(v), format!("`{text}` is not a number"))),
        }
    }

    // ------------------------------------------------------------ structural networks

    fn structural(&self, p: Pair<Rule>) -> R<Structural> {
        let sp = span(&p);
        let mut net = Structural {
            name: None,
            input: None,
            classes: None,
            body: Vec::new(),
            span: sp,
        };
        for q in p.into_inner() {
            match q.as_rule() {
                Rule::string => {
                    // a name is printed by every command and written into generated code:
                    // no control characters (a terminal escape, a carriage return)
                    if let Some(c) = q.as_str().chars().find(|c| c.is_control()) {
                        return Err(self
                            .err(
                                span(&q),
                                format!("a network name may not hold the control character {c:?}"),
                            )
                            .with_help("use printable characters, e.g. \"wrn-28-10-mine\""));
                    }
                    net.name = Some(unescape(q.as_str()))
                }
                Rule::input_decl => {
                    if let Some(first) = &net.input {
                        return Err(self.twice("input", span(&q), first.span));
                    }
                    let shape = self.next(&mut self.args(q), "input")?;
                    let mut dims = [0u64; 3];
                    let parts = shape.clone().into_inner().collect::<Vec<_>>();
                    if parts.len() != 3 {
                        return Err(self.internal(span(&shape), "input shape"));
                    }
                    for (d, part) in dims.iter_mut().zip(&parts) {
                        *d = self.uint(part)?.value;
                    }
                    net.input = Some(Spanned::new(dims, span(&shape)));
                }
                Rule::classes_decl => {
                    if let Some(first) = &net.classes {
                        return Err(self.twice("classes", span(&q), first.span));
                    }
                    let v = self.next(&mut self.args(q), "classes")?;
                    net.classes = Some(self.uint(&v)?);
                }
                _ => net.body.push(self.layer(q)?),
            }
        }
        Ok(net)
    }

    fn layers(&self, it: impl Iterator<Item = Pair<'s, Rule>>) -> R<Vec<Layer>> {
        it.map(|p| self.layer(p)).collect()
    }

    fn layer(&self, p: Pair<'s, Rule>) -> R<Layer> {
        let sp = span(&p);
        let kind = match p.as_rule() {
            Rule::bn => LayerKind::Bn,
            Rule::relu => LayerKind::Relu,
            Rule::gap => LayerKind::GlobalAvgPool,
            Rule::dropout => {
                let v = self.next(&mut self.args(p), "dropout")?;
                LayerKind::Dropout {
                    p: self.real(&v)?.value,
                }
            }
            Rule::fc => LayerKind::Fc {
                out: match self.args(p).next() {
                    Some(v) => Some(self.uint(&v)?.value),
                    None => None,
                },
            },
            Rule::conv => {
                let mut args = self.args(p);
                let k = self.kernel(&self.next(&mut args, "conv")?)?;
                let out = self.uint(&self.next(&mut args, "conv")?)?.value;
                let mut opts = Opts::default();
                for a in args {
                    self.opt(a, &mut opts)?;
                }
                LayerKind::Conv {
                    k,
                    out,
                    stride: opts.stride.map_or(1, |s| s.value),
                    pad: opts.pad.map(|s| s.value),
                    groups: opts.groups.map_or(1, |s| s.value),
                    bias: opts.bias.is_some(),
                }
            }
            Rule::maxpool | Rule::avgpool => {
                let max = p.as_rule() == Rule::maxpool;
                let mut args = self.args(p);
                let k = self.kernel(&self.next(&mut args, "pool")?)?;
                let mut opts = Opts::default();
                for a in args {
                    self.opt(a, &mut opts)?;
                }
                let stride = opts.stride.map_or(k, |s| s.value);
                let pad = opts.pad.map_or(0, |s| s.value);
                if max {
                    LayerKind::MaxPool { k, stride, pad }
                } else {
                    LayerKind::AvgPool { k, stride, pad }
                }
            }
            Rule::dense => LayerKind::Dense(self.layers(self.args(p))?),
            Rule::repeat => {
                let mut args = self.args(p);
                let count = self.uint(&self.next(&mut args, "repeat")?)?;
                let body = self.layers(args)?;
                // An empty body repeats nothing; nested empty repeats would make the compiler
                // loop `N * M * ...` times for no layer at all.
                if body.is_empty() {
                    return Err(self
                        .err(sp, "empty `repeat` body")
                        .with_help("write the layers to repeat inside the braces, e.g. `repeat 4 { residual { .. } }`"));
                }
                LayerKind::Repeat { count, body }
            }
            Rule::residual => {
                let mut r = Residual {
                    pre: Vec::new(),
                    body: Vec::new(),
                    shortcut: ShortcutKind::Identity,
                    post: Vec::new(),
                    survival: None,
                };
                for sec in p.into_inner() {
                    match sec.as_rule() {
                        Rule::kw_residual => {}
                        Rule::pre_sec => r.pre = self.layers(self.args(sec))?,
                        Rule::body_sec => r.body = self.layers(self.args(sec))?,
                        Rule::post_sec => r.post = self.layers(self.args(sec))?,
                        Rule::shortcut_sec => {
                            let v = self.next(&mut self.args(sec), "shortcut")?;
                            r.shortcut = self.shortcut(&v)?.value;
                        }
                        Rule::survival_sec => {
                            let v = self.next(&mut self.args(sec), "survival")?;
                            r.survival = Some(self.real(&v)?.value);
                        }
                        _ => return Err(self.internal(span(&sec), "residual")),
                    }
                }
                LayerKind::Residual(r)
            }
            _ => return Err(self.internal(sp, "layer")),
        };
        Ok(Layer { kind, span: sp })
    }

    /// `KxK` -> K; a non-square kernel is an error.
    fn kernel(&self, p: &Pair<Rule>) -> R<u64> {
        let parts = p.clone().into_inner().collect::<Vec<_>>();
        if parts.len() != 2 {
            return Err(self.internal(span(p), "kernel"));
        }
        let a = self.uint(&parts[0])?.value;
        let b = self.uint(&parts[1])?.value;
        if a != b {
            return Err(self
                .err(
                    span(p),
                    format!("kernels are square: `{}` is not", p.as_str()),
                )
                .with_help(format!("write `{a}x{a}`")));
        }
        Ok(a)
    }

    fn opt(&self, a: Pair<Rule>, o: &mut Opts) -> R<()> {
        let sp = span(&a);
        let (name, slot) = match a.as_rule() {
            Rule::stride_opt => ("stride", &mut o.stride),
            Rule::pad_opt => ("pad", &mut o.pad),
            Rule::groups_opt => ("groups", &mut o.groups),
            Rule::bias_flag => ("bias", &mut o.bias),
            _ => return Err(self.internal(sp, "layer option")),
        };
        if let Some(first) = slot {
            return Err(self.twice(name, sp, first.span));
        }
        let value = match self.args(a).next() {
            Some(v) => self.uint(&v)?.value,
            None => 1,
        };
        *slot = Some(Spanned::new(value, sp));
        Ok(())
    }
}

/// Options written in a layer's parentheses, with where (for "set twice").
#[derive(Default)]
struct Opts {
    stride: Option<Spanned<u64>>,
    pad: Option<Spanned<u64>>,
    groups: Option<Spanned<u64>>,
    bias: Option<Spanned<u64>>,
}

/// The step schedule's factor when `; gamma G` is not written (PyTorch's `MultiStepLR`).
pub const DEFAULT_GAMMA: f64 = 0.1;

fn is_keyword(r: Rule) -> bool {
    matches!(
        r,
        Rule::kw_network
            | Rule::kw_train
            | Rule::kw_dataset
            | Rule::kw_dropout
            | Rule::kw_shortcut
            | Rule::kw_stochastic_depth
            | Rule::kw_classes
            | Rule::kw_batch
            | Rule::kw_precision
            | Rule::kw_seed
            | Rule::kw_epochs
            | Rule::kw_lr
            | Rule::kw_schedule
            | Rule::kw_momentum
            | Rule::kw_nesterov
            | Rule::kw_weight_decay
            | Rule::kw_label_smoothing
            | Rule::kw_step
            | Rule::kw_gamma
            | Rule::kw_input
            | Rule::kw_conv
            | Rule::kw_maxpool
            | Rule::kw_avgpool
            | Rule::kw_fc
            | Rule::kw_residual
            | Rule::kw_dense
            | Rule::kw_repeat
            | Rule::kw_stride
            | Rule::kw_pad
            | Rule::kw_groups
            | Rule::kw_pre
            | Rule::kw_body
            | Rule::kw_post
            | Rule::kw_survival
    )
}

/// A whole number written as decimal digits (a `number` or `digits` token).
pub(crate) fn uint(src: &Source, text: &str, sp: Span) -> R<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        let d = Diagnostic::new(src, sp, format!("expected a whole number, found `{text}`"));
        return Err(if text.starts_with('-') {
            d.with_help("this number cannot be negative")
        } else {
            d
        });
    }
    text.parse::<u64>().map_err(|_| {
        Diagnostic::new(src, sp, "number too large")
            .with_help(format!("the largest whole number is {}", u64::MAX))
    })
}

pub(crate) fn dataset(src: &Source, v: &Pair<Rule>) -> R<Spanned<Dataset>> {
    match Dataset::from_name(v.as_str()) {
        Some(d) => Ok(Spanned::new(d, span(v))),
        None => Err(
            Diagnostic::new(src, span(v), format!("unknown dataset `{}`", v.as_str())).with_help(
                format!(
                    "datasets are: {}",
                    Dataset::ALL.map(|d| d.name()).join(", ")
                ),
            ),
        ),
    }
}

/// The text between a string's quotes, with `\"` and `\\` unescaped.
fn unescape(quoted: &str) -> String {
    let inner = quoted
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(quoted);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}
