//! The wrnc language as plain data.
//!
//! The grammar crate (`wrnc-grammar`) parses text into these types; [`crate::expand`] turns a
//! family name into the structural form; [`crate::print`] writes the structural form back as
//! text that parses to the same graph. Nothing here knows about pest.
//!
//! Invariants:
//! - Every [`Span`] is a byte range into the source text the node was parsed from
//!   (`start <= end <= source.len()`). Nodes built by expansion carry the span of the family
//!   expression they came from, so an error found later still points at the user's text.
//! - Numbers are as the user wrote them: nothing here has been validated. Validation happens in
//!   [`crate::expand`] and [`crate::lower`], which return [`crate::Error`] with a span.

use serde::Serialize;

/// A byte range in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }
}

/// A value with the span of the text it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

impl<T> Spanned<T> {
    pub fn new(value: T, span: Span) -> Self {
        Spanned { value, span }
    }
}

/// One `.net` file (or one inline expression): a network and its settings.
#[derive(Debug, Clone, PartialEq)]
pub struct NetFile {
    pub network: NetworkSpec,
    pub settings: Settings,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NetworkSpec {
    /// A name from the literature, e.g. `WRN-28-10-B(3,3)@cifar10`.
    Family(FamilySpec),
    /// A network written block by block.
    Structural(Structural),
}

#[derive(Debug, Clone, PartialEq)]
pub struct FamilySpec {
    pub family: Family,
    /// `@dataset` suffix, if written.
    pub dataset: Option<Spanned<Dataset>>,
    /// The whole family expression.
    pub span: Span,
}

/// The families of the literature. Numbers are unvalidated (see module docs).
#[derive(Debug, Clone, PartialEq)]
pub enum Family {
    /// `WRN-<depth>-<k>[-B(<kernels>)]`; `kernels` is `None` when no `-B(..)` was written
    /// (meaning B(3,3)).
    Wrn {
        depth: Spanned<u64>,
        k: Spanned<u64>,
        kernels: Option<Spanned<Vec<Spanned<u64>>>>,
    },
    /// `ResNet-<depth>`.
    ResNet { depth: Spanned<u64> },
    /// `PreResNet-<depth>`.
    PreResNet { depth: Spanned<u64> },
    /// `ResNeXt-<depth>-<C>x<d>d`.
    ResNeXt {
        depth: Spanned<u64>,
        cardinality: Spanned<u64>,
        width: Spanned<u64>,
    },
    /// `DenseNet-<depth>-<k>`, `DenseNet-BC-<depth>-<k>`, `DenseNet-121@imagenet` (growth None).
    DenseNet {
        bc: bool,
        depth: Spanned<u64>,
        growth: Option<Spanned<u64>>,
    },
    /// `PyramidNet-<depth>-<alpha>[-bottleneck]`.
    PyramidNet {
        depth: Spanned<u64>,
        alpha: Spanned<u64>,
        bottleneck: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataset {
    Cifar10,
    Cifar100,
    Svhn,
    Imagenet,
}

impl Dataset {
    pub const ALL: [Dataset; 4] = [
        Dataset::Cifar10,
        Dataset::Cifar100,
        Dataset::Svhn,
        Dataset::Imagenet,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Cifar10 => "cifar10",
            Dataset::Cifar100 => "cifar100",
            Dataset::Svhn => "svhn",
            Dataset::Imagenet => "imagenet",
        }
    }
    pub fn from_name(s: &str) -> Option<Dataset> {
        Dataset::ALL.into_iter().find(|d| d.name() == s)
    }
    /// Input shape per image, (C, H, W).
    pub fn input(self) -> [u32; 3] {
        match self {
            Dataset::Imagenet => [3, 224, 224],
            _ => [3, 32, 32],
        }
    }
    pub fn classes(self) -> u32 {
        match self {
            Dataset::Cifar10 | Dataset::Svhn => 10,
            Dataset::Cifar100 => 100,
            Dataset::Imagenet => 1000,
        }
    }
}

/// Shortcut of a residual block. The shortcut always starts from the output of the block's
/// `pre` layers (which is the block's input when `pre` is empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShortcutKind {
    /// `identity`: shapes must already match.
    Identity,
    /// `proj`: 1x1 convolution (no bias) with the stride and width that match the body.
    Proj,
    /// `projbn`: 1x1 convolution followed by batch norm (post-activation ResNets, ResNeXt).
    ProjBn,
    /// `zeropad`: average-pool by the body's stride, then pad channels with zeros
    /// (ResNet option A, PyramidNet).
    ZeroPad,
}

impl ShortcutKind {
    pub const ALL: [ShortcutKind; 4] = [
        ShortcutKind::Identity,
        ShortcutKind::Proj,
        ShortcutKind::ProjBn,
        ShortcutKind::ZeroPad,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ShortcutKind::Identity => "identity",
            ShortcutKind::Proj => "proj",
            ShortcutKind::ProjBn => "projbn",
            ShortcutKind::ZeroPad => "zeropad",
        }
    }
    pub fn from_name(s: &str) -> Option<ShortcutKind> {
        ShortcutKind::ALL.into_iter().find(|d| d.name() == s)
    }
}

/// A network written block by block: `network "name" { input 3x32x32 classes 10 <layers> }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Structural {
    pub name: Option<String>,
    /// `input CxHxW`; when absent, the dataset's.
    pub input: Option<Spanned<[u64; 3]>>,
    /// `classes N`; when absent, the dataset's.
    pub classes: Option<Spanned<u64>>,
    pub body: Vec<Layer>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub kind: LayerKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LayerKind {
    /// `conv(KxK, OUT[, stride=S][, pad=P][, groups=G][, bias])`. `pad` defaults to `(k-1)/2`.
    Conv {
        k: u64,
        out: u64,
        stride: u64,
        pad: Option<u64>,
        groups: u64,
        bias: bool,
    },
    /// `bn`
    Bn,
    /// `relu`
    Relu,
    /// `dropout(P)`
    Dropout { p: f64 },
    /// `maxpool(KxK[, stride=S][, pad=P])`; stride defaults to k, pad to 0.
    MaxPool { k: u64, stride: u64, pad: u64 },
    /// `avgpool(KxK[, stride=S][, pad=P])`; stride defaults to k, pad to 0.
    AvgPool { k: u64, stride: u64, pad: u64 },
    /// `gap`: global average pooling to C x 1 x 1.
    GlobalAvgPool,
    /// `fc` (to the number of classes) or `fc(N)`; flattens its input, has a bias.
    Fc { out: Option<u64> },
    /// `residual { pre .. body .. shortcut KIND post .. survival P }`
    Residual(Residual),
    /// `dense { .. }`: the output is the input concatenated (along channels) with the body's output.
    Dense(Vec<Layer>),
    /// `repeat N { .. }`: the layers N times in sequence.
    Repeat {
        count: Spanned<u64>,
        body: Vec<Layer>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Residual {
    /// Layers shared by both branches (the pre-activation of WRN's width-changing blocks).
    pub pre: Vec<Layer>,
    /// The residual branch.
    pub body: Vec<Layer>,
    pub shortcut: ShortcutKind,
    /// Layers after the sum (the ReLU of post-activation ResNets).
    pub post: Vec<Layer>,
    /// Stochastic depth: probability that the body is kept in training. `None` = always.
    pub survival: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    /// `schedule step(0.3, 0.6, 0.8; gamma 0.2)`: multiply by gamma at these fractions of the epochs.
    Step { at: Vec<f64>, gamma: f64 },
    /// `schedule cosine`
    Cosine,
    /// `schedule onecycle`
    OneCycle,
}

/// Settings written in a `.net` file. Every field is optional; `None` means the default
/// (see `docs/language.md`). Command-line flags override them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Settings {
    pub dataset: Option<Spanned<Dataset>>,
    /// Family networks only: dropout between the convolutions of a block.
    pub dropout: Option<Spanned<f64>>,
    /// Family networks only: shortcut where the shape changes.
    pub shortcut: Option<Spanned<ShortcutKind>>,
    /// Family networks only: survival probability of the last block (linear decay from 1).
    pub stochastic_depth: Option<Spanned<f64>>,
    /// Number of classes (overrides the dataset's).
    pub classes: Option<Spanned<u64>>,
    pub batch: Option<Spanned<u64>>,
    pub precision: Option<Spanned<Precision>>,
    pub epochs: Option<Spanned<u64>>,
    pub lr: Option<Spanned<f64>>,
    pub schedule: Option<Spanned<Schedule>>,
    pub momentum: Option<Spanned<f64>>,
    pub nesterov: Option<Spanned<bool>>,
    pub weight_decay: Option<Spanned<f64>>,
    pub label_smoothing: Option<Spanned<f64>>,
    pub seed: Option<Spanned<u64>>,
}
