//! Family expressions: `WRN-28-10-B(3,3)@cifar10` -> [`FamilySpec`].
//!
//! The grammar splits the token into a name, `-`-separated segments (words or a `B(..)` kernel
//! list) and an optional `@dataset`; this module checks that the segments fit the family's
//! form and reads the numbers (only their syntax: whether a depth fits is the compiler's
//! business).

use pest::iterators::Pair;
use wrnc_compiler::ast::{Family, FamilySpec, Span, Spanned};

use crate::parser::{dataset, uint, Rule};
use crate::{Diagnostic, Source};

/// The family names, as they must be written (case-sensitive).
pub const FAMILIES: [&str; 6] = [
    "WRN",
    "ResNet",
    "PreResNet",
    "ResNeXt",
    "DenseNet",
    "PyramidNet",
];

/// The forms of each family, for help messages.
fn forms(family: &str) -> &'static str {
    match family {
        "WRN" => "`WRN-<depth>-<k>` or `WRN-<depth>-<k>-B(<k1>,<k2>,..)`, e.g. `WRN-28-10-B(3,3)`",
        "ResNet" => "`ResNet-<depth>`, e.g. `ResNet-110`",
        "PreResNet" => "`PreResNet-<depth>`, e.g. `PreResNet-164`",
        "ResNeXt" => "`ResNeXt-<depth>-<C>x<w>d`, e.g. `ResNeXt-29-8x64d`",
        "DenseNet" => {
            "`DenseNet-<depth>-<k>`, `DenseNet-BC-<depth>-<k>` or `DenseNet-<depth>`, e.g. `DenseNet-BC-100-12`"
        }
        _ => "`PyramidNet-<depth>-<alpha>` or `PyramidNet-<depth>-<alpha>-bottleneck`, e.g. `PyramidNet-110-48`",
    }
}

enum Seg<'i> {
    Word(&'i str, Span),
    Kernels(Vec<(&'i str, Span)>, Span),
}

impl Seg<'_> {
    fn span(&self) -> Span {
        match self {
            Seg::Word(_, s) | Seg::Kernels(_, s) => *s,
        }
    }
}

fn span_of(p: &Pair<Rule>) -> Span {
    Span::new(p.as_span().start(), p.as_span().end())
}

/// A `family` pair -> the AST.
pub(crate) fn family(src: &Source, p: Pair<Rule>) -> Result<FamilySpec, Diagnostic> {
    let whole = span_of(&p);
    let mut name: Option<(&str, Span)> = None;
    let mut segs = Vec::new();
    let mut data = None;
    for q in p.into_inner() {
        match q.as_rule() {
            Rule::family_name => name = Some((q.as_str(), span_of(&q))),
            Rule::fam_word => segs.push(Seg::Word(q.as_str(), span_of(&q))),
            Rule::kernel_list => {
                let ks = q
                    .clone()
                    .into_inner()
                    .map(|d| (d.as_str(), span_of(&d)))
                    .collect();
                segs.push(Seg::Kernels(ks, span_of(&q)));
            }
            Rule::fam_dataset if q.as_str().contains('@') => {
                return Err(Diagnostic::new(
                    src,
                    span_of(&q),
                    format!(
                        "`@{}` names more than one dataset; a network has one",
                        q.as_str()
                    ),
                )
                .with_help("e.g. `WRN-28-10@cifar100`"))
            }
            Rule::fam_dataset => data = Some(dataset(src, &q)?),
            _ => {
                return Err(Diagnostic::new(
                    src,
                    span_of(&q),
                    "internal error: unexpected parse tree in a family expression",
                ))
            }
        }
    }
    let Some((name, name_span)) = name else {
        return Err(Diagnostic::new(
            src,
            whole,
            "internal error: family without a name",
        ));
    };
    if !FAMILIES.contains(&name) {
        let d = Diagnostic::new(src, name_span, format!("unknown network family `{name}`"));
        let same = FAMILIES.iter().find(|f| f.eq_ignore_ascii_case(name));
        return Err(match same {
            Some(f) => d.with_help(format!("family names are case-sensitive: write `{f}`")),
            None => d.with_help(format!("families are: {}", FAMILIES.join(", "))),
        });
    }
    let f = Form {
        src,
        name,
        segs: &segs,
        end: Span::new(whole.end, whole.end),
    };
    let family = match name {
        "WRN" => {
            f.count(2, 3)?;
            let kernels = match segs.get(2) {
                None => None,
                Some(Seg::Kernels(ks, sp)) => {
                    if ks.is_empty() {
                        return Err(Diagnostic::new(src, *sp, "empty kernel list `B()`")
                            .with_help("list the kernel sizes of a block's convolutions, e.g. `B(3,3)`; omit `-B(..)` for B(3,3)"));
                    }
                    let mut v = Vec::with_capacity(ks.len());
                    for (t, s) in ks {
                        v.push(Spanned::new(uint(src, t, *s)?, *s));
                    }
                    Some(Spanned::new(v, *sp))
                }
                Some(other) => return Err(f.bad(other, "a kernel list `B(..)`")),
            };
            Family::Wrn {
                depth: f.num(0, "the depth")?,
                k: f.num(1, "the widening factor k")?,
                kernels,
            }
        }
        "ResNet" => {
            f.count(1, 1)?;
            Family::ResNet {
                depth: f.num(0, "the depth")?,
            }
        }
        "PreResNet" => {
            f.count(1, 1)?;
            Family::PreResNet {
                depth: f.num(0, "the depth")?,
            }
        }
        "ResNeXt" => {
            f.count(2, 2)?;
            let (cardinality, width) = match &segs[1] {
                Seg::Word(w, sp) => cxwd(src, w, *sp).ok_or_else(|| {
                    f.bad(
                        &segs[1],
                        "`<C>x<w>d` (cardinality x bottleneck width), e.g. `8x64d`",
                    )
                })??,
                other => return Err(f.bad(other, "`<C>x<w>d`")),
            };
            Family::ResNeXt {
                depth: f.num(0, "the depth")?,
                cardinality,
                width,
            }
        }
        "DenseNet" => {
            let bc = matches!(segs.first(), Some(Seg::Word("BC", _)));
            let o = usize::from(bc);
            f.count(1 + o, 2 + o)?;
            Family::DenseNet {
                bc,
                depth: f.num(o, "the depth")?,
                growth: match segs.len() > 1 + o {
                    true => Some(f.num(1 + o, "the growth rate k")?),
                    false => None,
                },
            }
        }
        _ => {
            f.count(2, 3)?;
            let bottleneck = match segs.get(2) {
                None => false,
                Some(Seg::Word("bottleneck", _)) => true,
                Some(other) => return Err(f.bad(other, "`bottleneck`")),
            };
            Family::PyramidNet {
                depth: f.num(0, "the depth")?,
                alpha: f.num(1, "the widening step alpha")?,
                bottleneck,
            }
        }
    };
    Ok(FamilySpec {
        family,
        dataset: data,
        span: whole,
    })
}

struct Form<'a, 'i> {
    src: &'a Source,
    name: &'a str,
    segs: &'a [Seg<'i>],
    /// Empty span at the end of the expression, for "incomplete".
    end: Span,
}

impl Form<'_, '_> {
    fn count(&self, min: usize, max: usize) -> Result<(), Diagnostic> {
        if self.segs.len() < min {
            return Err(Diagnostic::new(
                self.src,
                self.end,
                format!("incomplete {} expression", self.name),
            )
            .with_help(format!("write {}", forms(self.name))));
        }
        if let Some(extra) = self.segs.get(max) {
            return Err(Diagnostic::new(
                self.src,
                extra.span(),
                format!("unexpected part in a {} expression", self.name),
            )
            .with_help(format!("write {}", forms(self.name))));
        }
        Ok(())
    }

    fn bad(&self, seg: &Seg, expected: &str) -> Diagnostic {
        let found = match seg {
            Seg::Word(w, _) => format!("`{w}`"),
            Seg::Kernels(..) => "a kernel list".to_string(),
        };
        Diagnostic::new(
            self.src,
            seg.span(),
            format!(
                "expected {expected} in a {} expression, found {found}",
                self.name
            ),
        )
        .with_help(format!("write {}", forms(self.name)))
    }

    fn num(&self, i: usize, what: &str) -> Result<Spanned<u64>, Diagnostic> {
        match self.segs.get(i) {
            Some(Seg::Word(w, sp)) if w.bytes().all(|b| b.is_ascii_digit()) => {
                Ok(Spanned::new(uint(self.src, w, *sp)?, *sp))
            }
            Some(seg) => Err(self.bad(seg, &format!("a number ({what})"))),
            None => Err(Diagnostic::new(
                self.src,
                self.end,
                format!("incomplete {} expression", self.name),
            )
            .with_help(format!("write {}", forms(self.name)))),
        }
    }
}

/// Cardinality and width of a ResNeXt, with their spans.
type CxW = (Spanned<u64>, Spanned<u64>);

/// `8x64d` -> (8, 64) with the spans of each number; `None` if the word is not of that form.
fn cxwd(src: &Source, w: &str, sp: Span) -> Option<Result<CxW, Diagnostic>> {
    let body = w.strip_suffix('d')?;
    let (c, d) = body.split_once('x')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(c) || !digits(d) {
        return None;
    }
    let cs = Span::new(sp.start, sp.start + c.len());
    let ds = Span::new(cs.end + 1, cs.end + 1 + d.len());
    Some((|| {
        Ok((
            Spanned::new(uint(src, c, cs)?, cs),
            Spanned::new(uint(src, d, ds)?, ds),
        ))
    })())
}
