//! Family names are sugar: each expands into the structural form, exactly as the authors'
//! code builds the network.
//!
//! Invariants of the result (checked by the round-trip tests): `input` and `classes` are set;
//! printing the result with [`crate::print`] and parsing it back lowers to the same graph.
//!
//! Conventions shared by every family (where a paper's code differs, the comment says so):
//! - Convolutions have no bias (a BN follows or precedes every one); the classifier has one.
//! - Every node built here carries the span of the family expression, so errors found while
//!   lowering still point at the user's text.

use crate::ast::*;
use crate::{Error, Result};

/// Largest depth any family accepts: deeper nets are refused before anything is built.
pub const MAX_DEPTH: u64 = 10_000;
/// Largest widening factor / growth rate / cardinality / alpha accepted.
pub const MAX_FACTOR: u64 = 4096;

/// Resolves a file into a structural network with `input` and `classes` set.
pub fn expand(file: &NetFile) -> Result<Structural> {
    let s = &file.settings;
    check_settings(s)?;
    match &file.network {
        NetworkSpec::Structural(net) => {
            for (name, span) in [
                ("dropout", s.dropout.map(|v| v.span)),
                ("shortcut", s.shortcut.map(|v| v.span)),
                ("stochastic_depth", s.stochastic_depth.map(|v| v.span)),
            ] {
                if let Some(span) = span {
                    return Err(Error::new(
                        span,
                        format!("`{name}` applies to family networks only"),
                    )
                    .help("in the structural form, write the layer in the block itself, e.g. dropout(0.3) or survival 0.9"));
                }
            }
            let dataset = s.dataset.map(|d| d.value).unwrap_or(Dataset::Cifar10);
            let mut net = net.clone();
            if net.input.is_none() {
                let [c, h, w] = dataset.input();
                net.input = Some(Spanned::new([c as u64, h as u64, w as u64], net.span));
            }
            if let Some(c) = s.classes {
                if net.classes.is_some() {
                    return Err(Error::new(
                        c.span,
                        "`classes` is set both in the file and in the network",
                    ));
                }
                net.classes = Some(c);
            }
            if net.classes.is_none() {
                net.classes = Some(Spanned::new(dataset.classes() as u64, net.span));
            }
            Ok(net)
        }
        NetworkSpec::Family(f) => expand_family(f, s),
    }
}

/// Range checks of the training settings (the parser only reads them).
fn check_settings(s: &Settings) -> Result<()> {
    fn real(
        v: Option<Spanned<f64>>,
        what: &str,
        ok: impl Fn(f64) -> bool,
        range: &str,
    ) -> Result<()> {
        match v {
            Some(v) if !(v.value.is_finite() && ok(v.value)) => Err(Error::new(
                v.span,
                format!("{what} {} is out of range", v.value),
            )
            .help(format!("{what} must be {range}"))),
            _ => Ok(()),
        }
    }
    fn int(v: Option<Spanned<u64>>, what: &str, lo: u64, hi: u64) -> Result<()> {
        match v {
            Some(v) if v.value < lo || v.value > hi => Err(Error::new(
                v.span,
                format!("{what} {} is out of range", v.value),
            )
            .help(format!("{what} must be from {lo} to {hi}"))),
            _ => Ok(()),
        }
    }
    real(
        s.lr,
        "lr",
        |x| x > 0.0 && x <= 100.0,
        "positive (at most 100)",
    )?;
    real(
        s.momentum,
        "momentum",
        |x| (0.0..1.0).contains(&x),
        "in [0, 1)",
    )?;
    real(
        s.weight_decay,
        "weight_decay",
        |x| (0.0..=1.0).contains(&x),
        "in [0, 1]",
    )?;
    real(
        s.label_smoothing,
        "label_smoothing",
        |x| (0.0..1.0).contains(&x),
        "in [0, 1)",
    )?;
    int(s.epochs, "epochs", 1, 100_000)?;
    int(s.batch, "batch", 1, 1 << 20)?;
    int(s.seed, "seed", 0, u32::MAX as u64)?;
    if let Some(sch) = &s.schedule {
        if let Schedule::Step { at, gamma } = &sch.value {
            let sorted = at.windows(2).all(|w| w[0] < w[1]);
            if !sorted || at.iter().any(|&f| !(f > 0.0 && f <= 1.0)) {
                return Err(Error::new(sch.span, "step fractions must increase and lie in (0, 1]")
                    .help("e.g. step(0.3, 0.6, 0.8; gamma 0.2): multiply by 0.2 at 30%, 60% and 80% of the epochs"));
            }
            if !(gamma.is_finite() && *gamma > 0.0 && *gamma <= 1.0) {
                return Err(Error::new(
                    sch.span,
                    format!("gamma {gamma} is out of range"),
                )
                .help("gamma must lie in (0, 1]: a step schedule multiplies the rate by it at each step, e.g. 0.2"));
            }
        }
    }
    Ok(())
}

/// The options a family expansion reads.
struct Opts {
    span: Span,
    dropout: Option<f64>,
    shortcut: Option<Spanned<ShortcutKind>>,
    /// Survival probability of the last residual block (linear decay rule, Huang et al. 2016).
    stochastic_depth: Option<f64>,
}

fn expand_family(f: &FamilySpec, s: &Settings) -> Result<Structural> {
    let dataset = match (f.dataset, s.dataset) {
        (Some(a), Some(b)) if a.value != b.value => {
            return Err(Error::new(
                b.span,
                format!(
                    "dataset `{}` disagrees with the network's `@{}`",
                    b.value.name(),
                    a.value.name()
                ),
            ))
        }
        (Some(a), _) => a.value,
        (None, Some(b)) => b.value,
        (None, None) => Dataset::Cifar10,
    };
    if let Some(p) = s.dropout {
        if !(0.0..1.0).contains(&p.value) {
            return Err(Error::new(
                p.span,
                format!("dropout {} is not a probability in [0, 1)", p.value),
            ));
        }
    }
    if let Some(p) = s.stochastic_depth {
        if !(p.value > 0.0 && p.value <= 1.0) {
            return Err(Error::new(
                p.span,
                format!("stochastic_depth {} is not a survival probability in (0, 1]", p.value),
            )
            .help("it is the probability that the last block is kept, e.g. 0.5 as in Huang et al. 2016"));
        }
    }
    let classes = match s.classes {
        Some(c) => c.value,
        None => dataset.classes() as u64,
    };
    let o = Opts {
        span: f.span,
        dropout: s.dropout.map(|d| d.value).filter(|&p| p > 0.0),
        shortcut: s.shortcut,
        stochastic_depth: s.stochastic_depth.map(|d| d.value).filter(|&p| p < 1.0),
    };
    let imagenet = dataset == Dataset::Imagenet;
    let mut b = Builder {
        o: &o,
        body: vec![],
    };
    match &f.family {
        Family::Wrn { depth, k, kernels } => {
            check_factor(*k, "widening factor k")?;
            if imagenet {
                let blocks = imagenet_blocks(*depth, &[50, 101])?;
                b.reject_shortcut_zeropad()?;
                b.torchvision_resnet(blocks, true, 1, 64 * k.value)?;
            } else {
                let n = fit_depth(*depth, 4, 6, 10, "WRN")?;
                let ks = match kernels {
                    None => vec![3, 3],
                    Some(list) => {
                        if list.value.is_empty() {
                            return Err(Error::new(list.span, "empty kernel list")
                                .help("write e.g. B(3,3)"));
                        }
                        if list.value.len() > 8 {
                            return Err(Error::new(list.span, "at most 8 convolutions in a block"));
                        }
                        for ks in &list.value {
                            if ks.value % 2 == 0 || ks.value > 11 {
                                return Err(Error::new(
                                    ks.span,
                                    format!("kernel size {} is not allowed here", ks.value),
                                )
                                .help("kernel sizes are odd, from 1 to 11, so that padding keeps the shape"));
                            }
                        }
                        list.value.iter().map(|k| k.value).collect()
                    }
                };
                b.wrn_cifar(n, k.value, &ks)?;
            }
        }
        Family::ResNet { depth } => {
            if imagenet {
                let blocks = imagenet_blocks(*depth, &[18, 34, 50, 101, 152])?;
                b.reject_shortcut_zeropad()?;
                let bottleneck = depth.value >= 50;
                b.torchvision_resnet(blocks, bottleneck, 1, 64)?;
            } else {
                let n = fit_depth(*depth, 2, 6, 8, "ResNet")?;
                b.resnet_cifar(n)?;
            }
        }
        Family::PreResNet { depth } => {
            if imagenet {
                return Err(Error::new(
                    f.span,
                    "PreResNet is defined here for CIFAR-sized inputs only",
                )
                .help("use ResNet-50@imagenet or WRN-50-2@imagenet"));
            }
            if depth.value >= 164 {
                let n = fit_depth(
                    *depth,
                    2,
                    9,
                    164,
                    "PreResNet (bottleneck blocks from depth 164)",
                )?;
                b.preresnet(n, true)?;
            } else {
                let n = fit_depth(*depth, 2, 6, 8, "PreResNet (basic blocks below depth 164)")?;
                b.preresnet(n, false)?;
            }
        }
        Family::ResNeXt {
            depth,
            cardinality,
            width,
        } => {
            check_factor(*cardinality, "cardinality")?;
            check_factor(*width, "bottleneck width")?;
            if imagenet {
                let blocks = imagenet_blocks(*depth, &[50, 101, 152])?;
                b.reject_shortcut_zeropad()?;
                b.torchvision_resnet(blocks, true, cardinality.value, width.value)?;
            } else {
                let n = fit_depth(*depth, 2, 9, 11, "ResNeXt")?;
                b.resnext_cifar(n, cardinality.value, width.value)?;
            }
        }
        Family::DenseNet { bc, depth, growth } => {
            if let Some(sc) = o.shortcut {
                return Err(Error::new(sc.span, "DenseNet has no residual shortcuts"));
            }
            if let Some(sd) = s.stochastic_depth {
                return Err(Error::new(
                    sd.span,
                    "DenseNet has no residual blocks for stochastic depth",
                ));
            }
            if imagenet {
                let (k, init, blocks): (u64, u64, [u64; 4]) = match depth.value {
                    121 => (32, 64, [6, 12, 24, 16]),
                    169 => (32, 64, [6, 12, 32, 32]),
                    201 => (32, 64, [6, 12, 48, 32]),
                    161 => (48, 96, [6, 12, 36, 24]),
                    _ => {
                        return Err(Error::new(
                            depth.span,
                            format!("no ImageNet DenseNet of depth {}", depth.value),
                        )
                        .help("valid depths are 121, 161, 169, 201"))
                    }
                };
                if let Some(g) = growth {
                    if g.value != k {
                        return Err(Error::new(
                            g.span,
                            format!("DenseNet-{}@imagenet has growth rate {k}", depth.value),
                        )
                        .help(format!("write DenseNet-{}@imagenet", depth.value)));
                    }
                }
                b.densenet_imagenet(k, init, &blocks)?;
            } else {
                let Some(k) = growth else {
                    return Err(
                        Error::new(f.span, "a CIFAR DenseNet needs a growth rate").help(
                            "write DenseNet-<depth>-<k>, e.g. DenseNet-40-12 or DenseNet-BC-100-12",
                        ),
                    );
                };
                check_factor(*k, "growth rate")?;
                let n = if *bc {
                    fit_depth(*depth, 4, 6, 10, "DenseNet-BC")?
                } else {
                    fit_depth(*depth, 4, 3, 7, "DenseNet")?
                };
                b.densenet_cifar(n, k.value, *bc)?;
            }
        }
        Family::PyramidNet {
            depth,
            alpha,
            bottleneck,
        } => {
            if imagenet {
                return Err(Error::new(
                    f.span,
                    "PyramidNet is defined here for CIFAR-sized inputs only",
                ));
            }
            check_factor_zero_ok(*alpha, "alpha")?;
            let n = if *bottleneck {
                fit_depth(*depth, 2, 9, 11, "PyramidNet (bottleneck)")?
            } else {
                fit_depth(*depth, 2, 6, 8, "PyramidNet")?
            };
            b.pyramidnet(n, alpha.value, *bottleneck)?;
        }
    }
    let mut body = b.body;
    if let Some(p_last) = o.stochastic_depth {
        apply_stochastic_depth(&mut body, p_last);
    }
    let body = compress_repeats(body);
    let [c, h, w] = dataset.input();
    Ok(Structural {
        name: Some(family_name(f)),
        input: Some(Spanned::new([c as u64, h as u64, w as u64], f.span)),
        classes: Some(Spanned::new(
            classes,
            s.classes.map(|c| c.span).unwrap_or(f.span),
        )),
        body,
        span: f.span,
    })
}

/// The canonical text of a family expression, e.g. `WRN-28-10-B(3,3)@cifar10` for `WRN-28-10`.
pub fn family_name(f: &FamilySpec) -> String {
    let mut s = match &f.family {
        Family::Wrn { depth, k, kernels } => {
            let mut s = format!("WRN-{}-{}", depth.value, k.value);
            if let Some(ks) = kernels {
                let list: Vec<String> = ks.value.iter().map(|k| k.value.to_string()).collect();
                s += &format!("-B({})", list.join(","));
            }
            s
        }
        Family::ResNet { depth } => format!("ResNet-{}", depth.value),
        Family::PreResNet { depth } => format!("PreResNet-{}", depth.value),
        Family::ResNeXt {
            depth,
            cardinality,
            width,
        } => {
            format!(
                "ResNeXt-{}-{}x{}d",
                depth.value, cardinality.value, width.value
            )
        }
        Family::DenseNet { bc, depth, growth } => {
            let mut s = format!("DenseNet-{}{}", if *bc { "BC-" } else { "" }, depth.value);
            if let Some(g) = growth {
                s += &format!("-{}", g.value);
            }
            s
        }
        Family::PyramidNet {
            depth,
            alpha,
            bottleneck,
        } => format!(
            "PyramidNet-{}-{}{}",
            depth.value,
            alpha.value,
            if *bottleneck { "-bottleneck" } else { "" }
        ),
    };
    if let Some(d) = f.dataset {
        s += "@";
        s += d.value.name();
    }
    s
}

/// `depth = offset + per * n` with `n >= 1` and `depth >= min`: returns n.
fn fit_depth(depth: Spanned<u64>, offset: u64, per: u64, min: u64, family: &str) -> Result<u64> {
    let rule = format!("depth - {offset} must be a multiple of {per}");
    let d = depth.value;
    let valid = |count: usize| -> String {
        let v: Vec<String> = (1..)
            .map(|n| offset + per * n)
            .filter(|&d| d >= min)
            .take(count)
            .map(|d| d.to_string())
            .collect();
        format!("valid depths are {}, ...", v.join(", "))
    };
    if d > MAX_DEPTH {
        return Err(Error::new(
            depth.span,
            format!("depth {d} is too large (at most {MAX_DEPTH})"),
        ));
    }
    if d < min || d < offset || !(d - offset).is_multiple_of(per) {
        return Err(Error::new(
            depth.span,
            format!("depth {d} does not fit {family}: {rule}"),
        )
        .help(valid(6)));
    }
    Ok((d - offset) / per)
}

fn check_factor(v: Spanned<u64>, what: &str) -> Result<()> {
    if v.value == 0 {
        return Err(Error::new(v.span, format!("{what} must be at least 1")));
    }
    check_factor_zero_ok(v, what)
}

fn check_factor_zero_ok(v: Spanned<u64>, what: &str) -> Result<()> {
    if v.value > MAX_FACTOR {
        return Err(Error::new(
            v.span,
            format!("{what} {} is too large (at most {MAX_FACTOR})", v.value),
        ));
    }
    Ok(())
}

/// Blocks per stage of torchvision's ImageNet ResNets.
fn imagenet_blocks(depth: Spanned<u64>, allowed: &[u64]) -> Result<[u64; 4]> {
    let b = match depth.value {
        18 => [2, 2, 2, 2],
        34 | 50 => [3, 4, 6, 3],
        101 => [3, 4, 23, 3],
        152 => [3, 8, 36, 3],
        _ => [0; 4],
    };
    if !allowed.contains(&depth.value) {
        let v: Vec<String> = allowed.iter().map(|d| d.to_string()).collect();
        return Err(Error::new(
            depth.span,
            format!(
                "no ImageNet network of depth {} in this family",
                depth.value
            ),
        )
        .help(format!("valid depths are {}", v.join(", "))));
    }
    Ok(b)
}

/// Runs of two or more identical residual blocks become `repeat N { block }`: the same graph
/// (repeat unrolls with the same numbering), and an expanded form a person can read.
fn compress_repeats(body: Vec<Layer>) -> Vec<Layer> {
    let mut out: Vec<Layer> = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let mut j = i + 1;
        while j < body.len() && body[j] == body[i] && matches!(body[i].kind, LayerKind::Residual(_))
        {
            j += 1;
        }
        if j - i >= 2 {
            let span = body[i].span;
            out.push(Layer {
                kind: LayerKind::Repeat {
                    count: Spanned::new((j - i) as u64, span),
                    body: vec![body[i].clone()],
                },
                span,
            });
        } else {
            out.push(body[i].clone());
        }
        i = j;
    }
    out
}

/// Linear decay rule: block l of L (1-based) survives with `1 - l/L * (1 - p_L)`.
fn apply_stochastic_depth(body: &mut [Layer], p_last: f64) {
    let total = body
        .iter()
        .filter(|l| matches!(l.kind, LayerKind::Residual(_)))
        .count();
    let mut l = 0;
    for layer in body.iter_mut() {
        if let LayerKind::Residual(r) = &mut layer.kind {
            l += 1;
            let p = 1.0 - (l as f64 / total as f64) * (1.0 - p_last);
            // Rounded so that the printed form parses back to the same value: to 6 decimals,
            // or below 0.001 to 6 significant digits (6 decimals would round a small
            // `stochastic_depth` to a survival of 0)
            r.survival = Some(if p >= 1e-3 {
                (p * 1e6).round() / 1e6
            } else {
                format!("{p:.5e}").parse().unwrap_or(p)
            });
        }
    }
}

struct Builder<'a> {
    o: &'a Opts,
    body: Vec<Layer>,
}

impl Builder<'_> {
    fn l(&self, kind: LayerKind) -> Layer {
        Layer {
            kind,
            span: self.o.span,
        }
    }
    fn conv(&self, k: u64, out: u64, stride: u64) -> Layer {
        self.conv_g(k, out, stride, 1)
    }
    fn conv_g(&self, k: u64, out: u64, stride: u64, groups: u64) -> Layer {
        self.l(LayerKind::Conv {
            k,
            out,
            stride,
            pad: None,
            groups,
            bias: false,
        })
    }
    fn bn(&self) -> Layer {
        self.l(LayerKind::Bn)
    }
    fn relu(&self) -> Layer {
        self.l(LayerKind::Relu)
    }
    /// `bn relu [dropout]` before a block's non-first convolution.
    fn bn_relu_drop(&self, v: &mut Vec<Layer>) {
        v.push(self.bn());
        v.push(self.relu());
        if let Some(p) = self.o.dropout {
            v.push(self.l(LayerKind::Dropout { p }));
        }
    }
    fn head(&mut self, preact: bool) {
        if preact {
            self.body.push(self.bn());
            self.body.push(self.relu());
        }
        self.body.push(self.l(LayerKind::GlobalAvgPool));
        self.body.push(self.l(LayerKind::Fc { out: None }));
    }
    /// The shortcut where the shape changes: the user's choice or the family's default.
    fn shortcut(&self, default: ShortcutKind) -> ShortcutKind {
        self.o.shortcut.map(|s| s.value).unwrap_or(default)
    }
    fn reject_shortcut_zeropad(&self) -> Result<()> {
        match self.o.shortcut {
            Some(s) if s.value != ShortcutKind::ProjBn => Err(Error::new(
                s.span,
                "torchvision's ImageNet ResNets use `projbn` shortcuts",
            )),
            _ => Ok(()),
        }
    }
    fn residual(
        &self,
        pre: Vec<Layer>,
        body: Vec<Layer>,
        shortcut: ShortcutKind,
        post: Vec<Layer>,
    ) -> Layer {
        self.l(LayerKind::Residual(Residual {
            pre,
            body,
            shortcut,
            post,
            survival: None,
        }))
    }

    /// WRN (Zagoruyko & Komodakis 2016), as in the authors' code: conv 3x3 16; three groups of
    /// N pre-activation blocks of widths 16k, 32k, 64k (strides 1, 2, 2); BN-ReLU, pool, fc.
    /// Where a block changes width, its first BN-ReLU is shared by the body and the 1x1
    /// projection shortcut; dropout sits between the convolutions, after the ReLU.
    fn wrn_cifar(&mut self, n: u64, k: u64, ks: &[u64]) -> Result<()> {
        self.body.push(self.conv(3, 16, 1));
        let mut in_c = 16;
        for (g, width) in [16 * k, 32 * k, 64 * k].into_iter().enumerate() {
            for i in 0..n {
                let stride = if i == 0 && g > 0 { 2 } else { 1 };
                let mut body = vec![];
                for (j, &kk) in ks.iter().enumerate() {
                    if j > 0 {
                        self.bn_relu_drop(&mut body);
                    }
                    body.push(self.conv(kk, width, if j == 0 { stride } else { 1 }));
                }
                let pre = vec![self.bn(), self.relu()];
                let block = if in_c != width || stride != 1 {
                    self.residual(pre, body, self.shortcut(ShortcutKind::Proj), vec![])
                } else {
                    let mut full = pre;
                    full.extend(body);
                    self.residual(vec![], full, ShortcutKind::Identity, vec![])
                };
                self.body.push(block);
                in_c = width;
            }
        }
        self.head(true);
        Ok(())
    }

    /// ResNet for CIFAR (He et al. 2016, section 4.2): 6n+2 layers, basic post-activation
    /// blocks of widths 16, 32, 64, zero-padding identity shortcuts (option A) by default.
    fn resnet_cifar(&mut self, n: u64) -> Result<()> {
        self.body
            .extend([self.conv(3, 16, 1), self.bn(), self.relu()]);
        let mut in_c = 16;
        for (g, width) in [16u64, 32, 64].into_iter().enumerate() {
            for i in 0..n {
                let stride = if i == 0 && g > 0 { 2 } else { 1 };
                let mut body = vec![self.conv(3, width, stride)];
                self.bn_relu_drop(&mut body);
                body.extend([self.conv(3, width, 1), self.bn()]);
                let sc = if in_c != width || stride != 1 {
                    self.shortcut(ShortcutKind::ZeroPad)
                } else {
                    ShortcutKind::Identity
                };
                self.body
                    .push(self.residual(vec![], body, sc, vec![self.relu()]));
                in_c = width;
            }
        }
        self.head(false);
        Ok(())
    }

    /// torchvision's ImageNet stem: conv 7x7/2 (pad 3), BN, ReLU, max pool 3x3/2 (pad 1).
    fn imagenet_stem(&mut self, out: u64) {
        let conv = LayerKind::Conv {
            k: 7,
            out,
            stride: 2,
            pad: Some(3),
            groups: 1,
            bias: false,
        };
        let pool = LayerKind::MaxPool {
            k: 3,
            stride: 2,
            pad: 1,
        };
        self.body
            .extend([self.l(conv), self.bn(), self.relu(), self.l(pool)]);
    }

    /// torchvision's ImageNet ResNet / ResNeXt / wide ResNet: 7x7/2 stem and 3x3/2 max pool;
    /// four stages of widths 64..512; basic or bottleneck (v1.5: stride on the 3x3) blocks with
    /// `projbn` shortcuts; the bottleneck's inner width is `planes * base_width / 64 * groups`.
    fn torchvision_resnet(
        &mut self,
        blocks: [u64; 4],
        bottleneck: bool,
        groups: u64,
        base_width: u64,
    ) -> Result<()> {
        self.imagenet_stem(64);
        let expansion = if bottleneck { 4 } else { 1 };
        let mut in_c = 64;
        for (s, (&count, planes)) in blocks.iter().zip([64u64, 128, 256, 512]).enumerate() {
            for i in 0..count {
                let stride = if i == 0 && s > 0 { 2 } else { 1 };
                let out = planes * expansion;
                let mut body = vec![];
                if bottleneck {
                    let width = planes * base_width / 64 * groups;
                    body.extend([self.conv(1, width, 1), self.bn(), self.relu()]);
                    body.push(self.conv_g(3, width, stride, groups));
                    self.bn_relu_drop(&mut body);
                    body.extend([self.conv(1, out, 1), self.bn()]);
                } else {
                    body.push(self.conv(3, out, stride));
                    self.bn_relu_drop(&mut body);
                    body.extend([self.conv(3, out, 1), self.bn()]);
                }
                let sc = if in_c != out || stride != 1 {
                    ShortcutKind::ProjBn
                } else {
                    ShortcutKind::Identity
                };
                self.body
                    .push(self.residual(vec![], body, sc, vec![self.relu()]));
                in_c = out;
            }
        }
        self.head(false);
        Ok(())
    }

    /// Pre-activation ResNet (He et al., "Identity mappings", 2016) for CIFAR: basic blocks
    /// (6n+2) of widths 16, 32, 64, or bottleneck blocks (9n+2, depth >= 164) of inner widths
    /// 16, 32, 64 and outputs 64, 128, 256. Shape changes use a 1x1 projection from the shared
    /// BN-ReLU, as in WRN.
    fn preresnet(&mut self, n: u64, bottleneck: bool) -> Result<()> {
        self.body.push(self.conv(3, 16, 1));
        let mut in_c = 16;
        for (g, planes) in [16u64, 32, 64].into_iter().enumerate() {
            for i in 0..n {
                let stride = if i == 0 && g > 0 { 2 } else { 1 };
                let mut body = vec![];
                let out = if bottleneck {
                    body.push(self.conv(1, planes, 1));
                    self.bn_relu_drop(&mut body);
                    body.push(self.conv(3, planes, stride));
                    self.bn_relu_drop(&mut body);
                    body.push(self.conv(1, planes * 4, 1));
                    planes * 4
                } else {
                    body.push(self.conv(3, planes, stride));
                    self.bn_relu_drop(&mut body);
                    body.push(self.conv(3, planes, 1));
                    planes
                };
                let pre = vec![self.bn(), self.relu()];
                let block = if in_c != out || stride != 1 {
                    self.residual(pre, body, self.shortcut(ShortcutKind::Proj), vec![])
                } else {
                    let mut full = pre;
                    full.extend(body);
                    self.residual(vec![], full, ShortcutKind::Identity, vec![])
                };
                self.body.push(block);
                in_c = out;
            }
        }
        self.head(true);
        Ok(())
    }

    /// ResNeXt for CIFAR (Xie et al. 2017, the authors' code): conv 3x3 64; three stages of n
    /// bottleneck blocks with outputs 256, 512, 1024 and grouped 3x3 convolutions of width
    /// `C * d * 2^stage`; `projbn` shortcuts; post-activation.
    fn resnext_cifar(&mut self, n: u64, c: u64, d: u64) -> Result<()> {
        self.body
            .extend([self.conv(3, 64, 1), self.bn(), self.relu()]);
        let mut in_c = 64;
        for (s, planes) in [64u64, 128, 256].into_iter().enumerate() {
            for i in 0..n {
                let stride = if i == 0 && s > 0 { 2 } else { 1 };
                let width = c * d * (1 << s);
                let out = planes * 4;
                let mut body = vec![self.conv(1, width, 1), self.bn(), self.relu()];
                body.push(self.conv_g(3, width, stride, c));
                self.bn_relu_drop(&mut body);
                body.extend([self.conv(1, out, 1), self.bn()]);
                let sc = if in_c != out || stride != 1 {
                    self.shortcut(ShortcutKind::ProjBn)
                } else {
                    ShortcutKind::Identity
                };
                self.body
                    .push(self.residual(vec![], body, sc, vec![self.relu()]));
                in_c = out;
            }
        }
        self.head(false);
        Ok(())
    }

    /// One dense unit: `concat(x, H(x))`, H = BN-ReLU-conv3x3(k), or for BC
    /// BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); dropout after each conv when set.
    fn dense_unit(&self, k: u64, bottleneck: bool) -> Layer {
        let mut v = vec![self.bn(), self.relu()];
        if bottleneck {
            v.push(self.conv(1, 4 * k, 1));
            if let Some(p) = self.o.dropout {
                v.push(self.l(LayerKind::Dropout { p }));
            }
            v.extend([self.bn(), self.relu()]);
        }
        v.push(self.conv(3, k, 1));
        if let Some(p) = self.o.dropout {
            v.push(self.l(LayerKind::Dropout { p }));
        }
        self.l(LayerKind::Dense(v))
    }

    /// Transition: BN-ReLU-conv1x1(out)-avgpool 2x2.
    fn transition(&mut self, out: u64) {
        self.body
            .extend([self.bn(), self.relu(), self.conv(1, out, 1)]);
        if let Some(p) = self.o.dropout {
            self.body.push(self.l(LayerKind::Dropout { p }));
        }
        self.body.push(self.l(LayerKind::AvgPool {
            k: 2,
            stride: 2,
            pad: 0,
        }));
    }

    /// DenseNet for CIFAR (Huang et al. 2017): three dense blocks of n units with growth k,
    /// first conv 3x3 of 16 channels (2k for BC); BC uses bottleneck units and halves the
    /// channels in each transition.
    fn densenet_cifar(&mut self, n: u64, k: u64, bc: bool) -> Result<()> {
        let mut ch = if bc { 2 * k } else { 16 };
        self.body.push(self.conv(3, ch, 1));
        for b in 0..3 {
            for _ in 0..n {
                self.body.push(self.dense_unit(k, bc));
                ch += k;
            }
            if b < 2 {
                if bc {
                    ch /= 2;
                }
                self.transition(ch);
            }
        }
        self.head(true);
        Ok(())
    }

    /// torchvision's ImageNet DenseNet: 7x7/2 stem, 3x3/2 max pool, four dense blocks of
    /// bottleneck units, transitions halving the channels, final BN.
    fn densenet_imagenet(&mut self, k: u64, init: u64, blocks: &[u64; 4]) -> Result<()> {
        self.imagenet_stem(init);
        let mut ch = init;
        for (b, &count) in blocks.iter().enumerate() {
            for _ in 0..count {
                self.body.push(self.dense_unit(k, true));
                ch += k;
            }
            if b < 3 {
                ch /= 2;
                self.transition(ch);
            }
        }
        self.head(true);
        Ok(())
    }

    /// PyramidNet (Han et al. 2017, the authors' code): conv 3x3 16 + BN; 3n blocks whose width
    /// grows by alpha / 3n each (rounded down, as in the authors' Torch code; their
    /// PyTorch port rounds to nearest, which gives about 0.7% more parameters); block BN-conv-BN-ReLU-conv-BN (bottleneck:
    /// BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(4x)-BN); shortcut: average pool where the
    /// block strides, then zero channels; final BN-ReLU, pool, fc.
    fn pyramidnet(&mut self, n: u64, alpha: u64, bottleneck: bool) -> Result<()> {
        self.body.extend([self.conv(3, 16, 1), self.bn()]);
        let add = alpha as f64 / (3 * n) as f64;
        let mut dim = 16.0f64;
        let mut in_c = 16u64;
        for g in 0..3 {
            for i in 0..n {
                let stride = if i == 0 && g > 0 { 2 } else { 1 };
                dim += add;
                let planes = dim.floor() as u64;
                let mut body = vec![self.bn()];
                let out = if bottleneck {
                    body.push(self.conv(1, planes, 1));
                    self.bn_relu_drop(&mut body);
                    body.push(self.conv(3, planes, stride));
                    self.bn_relu_drop(&mut body);
                    body.extend([self.conv(1, planes * 4, 1), self.bn()]);
                    planes * 4
                } else {
                    body.push(self.conv(3, planes, stride));
                    self.bn_relu_drop(&mut body);
                    body.extend([self.conv(3, planes, 1), self.bn()]);
                    planes
                };
                let sc = if in_c != out || stride != 1 {
                    self.shortcut(ShortcutKind::ZeroPad)
                } else {
                    ShortcutKind::Identity
                };
                self.body.push(self.residual(vec![], body, sc, vec![]));
                in_c = out;
            }
        }
        self.head(true);
        Ok(())
    }
}

/// The whole file in structural form: the network expanded, and the settings that expansion
/// consumed (`dropout`, `shortcut`, `stochastic_depth`, `classes`) removed. Printing it gives
/// text that parses back to the same graph.
pub fn expand_file(file: &NetFile) -> Result<NetFile> {
    let net = expand(file)?;
    let settings = Settings {
        dropout: None,
        shortcut: None,
        stochastic_depth: None,
        classes: None,
        ..file.settings.clone()
    };
    Ok(NetFile {
        network: NetworkSpec::Structural(net),
        settings,
    })
}
