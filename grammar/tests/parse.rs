//! One `check!(input, @snapshot)` per language feature: the snapshot is the canonical print of
//! the parsed file (which round-trips, see `roundtrip.rs`), or the rendered diagnostic.

use wrnc_compiler::ast::{Family, NetworkSpec, Spanned};
use wrnc_compiler::print::print_file;
use wrnc_grammar::{parse, Source};

fn show(input: &str) -> String {
    match parse(&Source::inline(input)) {
        Ok(f) => print_file(&f),
        Err(d) => d.render(),
    }
}

macro_rules! check {
    ($input:expr, @$snap:literal) => {
        insta::assert_snapshot!(show($input), @$snap)
    };
}

// ------------------------------------------------------------------ family expressions

#[test]
fn wrn() {
    check!("WRN-28-10", @"network WRN-28-10");
    check!("  WRN-40-4  # a comment\n", @"network WRN-40-4");
    check!("WRN-28-10-B(3,3)", @"network WRN-28-10-B(3,3)");
    check!("WRN-16-8-B(1,3,1)@svhn", @"network WRN-16-8-B(1,3,1)@svhn");
    check!("WRN-28-10@cifar100", @"network WRN-28-10@cifar100");
}

#[test]
fn other_families() {
    check!("ResNet-110", @"network ResNet-110");
    check!("PreResNet-164@cifar10", @"network PreResNet-164@cifar10");
    check!("ResNeXt-29-8x64d", @"network ResNeXt-29-8x64d");
    check!("DenseNet-40-12", @"network DenseNet-40-12");
    check!("DenseNet-BC-100-12", @"network DenseNet-BC-100-12");
    check!("DenseNet-121@imagenet", @"network DenseNet-121@imagenet");
    check!("PyramidNet-110-48", @"network PyramidNet-110-48");
    check!("PyramidNet-272-200-bottleneck", @"network PyramidNet-272-200-bottleneck");
}

#[test]
fn family_errors() {
    check!("WRN-28", @"
    error: incomplete WRN expression
     --> <inline>:1:7
      |
    1 | WRN-28
      |       ^
      = help: write `WRN-<depth>-<k>` or `WRN-<depth>-<k>-B(<k1>,<k2>,..)`, e.g. `WRN-28-10-B(3,3)`
    ");
    check!("WRN-28-10-12", @"
    error: expected a kernel list `B(..)` in a WRN expression, found `12`
     --> <inline>:1:11
      |
    1 | WRN-28-10-12
      |           ^^
      = help: write `WRN-<depth>-<k>` or `WRN-<depth>-<k>-B(<k1>,<k2>,..)`, e.g. `WRN-28-10-B(3,3)`
    ");
    check!("WRN-28-ten", @"
    error: expected a number (the widening factor k) in a WRN expression, found `ten`
     --> <inline>:1:8
      |
    1 | WRN-28-ten
      |        ^^^
      = help: write `WRN-<depth>-<k>` or `WRN-<depth>-<k>-B(<k1>,<k2>,..)`, e.g. `WRN-28-10-B(3,3)`
    ");
    check!("WRN-28-10-B()", @"
    error: empty kernel list `B()`
     --> <inline>:1:11
      |
    1 | WRN-28-10-B()
      |           ^^^
      = help: list the kernel sizes of a block's convolutions, e.g. `B(3,3)`; omit `-B(..)` for B(3,3)
    ");
    check!("WRN-28-10-B(3, 3)", @"
    error: expected a number, found whitespace
     --> <inline>:1:15
      |
    1 | WRN-28-10-B(3, 3)
      |               ^
      = help: family expressions (`WRN-28-10-B(3,3)`), kernel sizes (`3x3`) and shapes (`3x32x32`) are written without spaces
    ");
    check!("WRN-28-10-B(3,3", @"
    error: expected one of: `)`, `,`, found end of file
     --> <inline>:1:16
      |
    1 | WRN-28-10-B(3,3
      |                ^
    ");
    check!("ResNet-110-4", @"
    error: unexpected part in a ResNet expression
     --> <inline>:1:12
      |
    1 | ResNet-110-4
      |            ^
      = help: write `ResNet-<depth>`, e.g. `ResNet-110`
    ");
    check!("ResNeXt-29-8x64", @"
    error: expected `<C>x<w>d` (cardinality x bottleneck width), e.g. `8x64d` in a ResNeXt expression, found `8x64`
     --> <inline>:1:12
      |
    1 | ResNeXt-29-8x64
      |            ^^^^
      = help: write `ResNeXt-<depth>-<C>x<w>d`, e.g. `ResNeXt-29-8x64d`
    ");
    check!("PyramidNet-110-48-wide", @"
    error: expected `bottleneck` in a PyramidNet expression, found `wide`
     --> <inline>:1:19
      |
    1 | PyramidNet-110-48-wide
      |                   ^^^^
      = help: write `PyramidNet-<depth>-<alpha>` or `PyramidNet-<depth>-<alpha>-bottleneck`, e.g. `PyramidNet-110-48`
    ");
    check!("Wrn-28-10", @"
    error: unknown network family `Wrn`
     --> <inline>:1:1
      |
    1 | Wrn-28-10
      | ^^^
      = help: family names are case-sensitive: write `WRN`
    ");
    check!("VGG-16", @"
    error: unknown network family `VGG`
     --> <inline>:1:1
      |
    1 | VGG-16
      | ^^^
      = help: families are: WRN, ResNet, PreResNet, ResNeXt, DenseNet, PyramidNet
    ");
    check!("WRN-28-10@imagenet1k", @"
    error: unknown dataset `imagenet1k`
     --> <inline>:1:11
      |
    1 | WRN-28-10@imagenet1k
      |           ^^^^^^^^^^
      = help: datasets are: cifar10, cifar100, svhn, imagenet
    ");
    check!("WRN-18446744073709551616-10", @"
    error: number too large
     --> <inline>:1:5
      |
    1 | WRN-18446744073709551616-10
      |     ^^^^^^^^^^^^^^^^^^^^
      = help: the largest whole number is 18446744073709551615
    ");
    check!("WRN-18446744073709551615-10", @"network WRN-18446744073709551615-10");
}

/// Spans of the numbers of a family expression point at their digits.
#[test]
fn family_spans() {
    let text = "network ResNeXt-29-8x64d@cifar100";
    let f = parse(&Source::inline(text)).unwrap();
    let NetworkSpec::Family(spec) = f.network else {
        panic!("family expected")
    };
    fn at<'t>(text: &'t str, s: &Spanned<u64>) -> &'t str {
        &text[s.span.start..s.span.end]
    }
    let Family::ResNeXt {
        depth,
        cardinality,
        width,
    } = &spec.family
    else {
        panic!("ResNeXt expected")
    };
    assert_eq!(
        (at(text, depth), at(text, cardinality), at(text, width)),
        ("29", "8", "64")
    );
    assert_eq!(
        &text[spec.span.start..spec.span.end],
        "ResNeXt-29-8x64d@cifar100"
    );
    let ds = spec.dataset.unwrap();
    assert_eq!(&text[ds.span.start..ds.span.end], "cifar100");

    let text = "WRN-28-10-B(3,1)";
    let f = parse(&Source::inline(text)).unwrap();
    let NetworkSpec::Family(spec) = f.network else {
        panic!("family expected")
    };
    let Family::Wrn { depth, k, kernels } = &spec.family else {
        panic!("WRN expected")
    };
    let kernels = kernels.as_ref().unwrap();
    assert_eq!((at(text, depth), at(text, k)), ("28", "10"));
    assert_eq!(&text[kernels.span.start..kernels.span.end], "B(3,1)");
    let ks: Vec<&str> = kernels
        .value
        .iter()
        .map(|s| &text[s.span.start..s.span.end])
        .collect();
    assert_eq!(ks, ["3", "1"]);
}

// ------------------------------------------------------------------ settings

#[test]
fn settings() {
    check!("network WRN-28-10\ndataset cifar100\ndropout 0.3\nshortcut proj\nstochastic_depth 0.5\nclasses 100\nbatch 128\nprecision bf16\nseed 7", @"
    network WRN-28-10
    dataset cifar100
    dropout 0.3
    shortcut proj
    stochastic_depth 0.5
    classes 100
    batch 128
    precision bf16
    seed 7
    ");
    check!("# training recipe at top level\nnetwork WRN-28-10 epochs 200 lr 0.1 momentum 0.9 nesterov true weight_decay 5e-4 label_smoothing 0", @"
    network WRN-28-10
    train {
      epochs 200
      lr 0.1
      momentum 0.9
      nesterov true
      weight_decay 0.0005
      label_smoothing 0
    }
    ");
    check!("network WRN-28-10\ntrain {\n  epochs 200\n  lr 0.1\n  schedule step(0.3, 0.6, 0.8; gamma 0.2)\n}", @"
    network WRN-28-10
    train {
      epochs 200
      lr 0.1
      schedule step(0.3, 0.6, 0.8; gamma 0.2)
    }
    ");
    check!("network WRN-28-10 schedule step(0.5, 0.75)", @"
    network WRN-28-10
    train {
      schedule step(0.5, 0.75; gamma 0.1)
    }
    ");
    check!("network WRN-28-10 schedule cosine nesterov false", @"
    network WRN-28-10
    train {
      schedule cosine
      nesterov false
    }
    ");
    check!("network WRN-28-10 train { schedule onecycle } seed 0", @"
    network WRN-28-10
    seed 0
    train {
      schedule onecycle
    }
    ");
    check!("seed 3 network WRN-28-10", @"
    network WRN-28-10
    seed 3
    ");
}

#[test]
fn numbers() {
    check!("network WRN-28-10 lr 1 momentum .9 weight_decay 5E-4 label_smoothing 1.", @"
    network WRN-28-10
    train {
      lr 1
      momentum 0.9
      weight_decay 0.0005
      label_smoothing 1
    }
    ");
    check!("network WRN-28-10 lr -0.5", @"
    network WRN-28-10
    train {
      lr -0.5
    }
    ");
    check!("network WRN-28-10 lr 1e999", @"
    error: number too large
     --> <inline>:1:22
      |
    1 | network WRN-28-10 lr 1e999
      |                      ^^^^^
      = help: the largest number is 1.7976931348623157e308
    ");
    check!("network WRN-28-10 batch -1", @"
    error: expected a whole number, found `-1`
     --> <inline>:1:25
      |
    1 | network WRN-28-10 batch -1
      |                         ^^
      = help: this number cannot be negative
    ");
    check!("network WRN-28-10 batch 1e3", @"
    error: expected a whole number, found `1e3`
     --> <inline>:1:25
      |
    1 | network WRN-28-10 batch 1e3
      |                         ^^^
    ");
    check!("network WRN-28-10 seed 18446744073709551616", @"
    error: number too large
     --> <inline>:1:24
      |
    1 | network WRN-28-10 seed 18446744073709551616
      |                        ^^^^^^^^^^^^^^^^^^^^
      = help: the largest whole number is 18446744073709551615
    ");
    check!("network WRN-28-10 batch 12abc", @"
    error: expected a number, found `12abc`
     --> <inline>:1:25
      |
    1 | network WRN-28-10 batch 12abc
      |                         ^^^^^
    ");
}

#[test]
fn setting_errors() {
    check!("network WRN-28-10\nlr 0.1\nlr 0.2", @"
    error: `lr` is set twice
     --> <inline>:3:1
      |
    3 | lr 0.2
      | ^^^^^^
      = note: first set at <inline>:2:1
      = help: each setting may appear at most once; remove one `lr`
    ");
    check!("network WRN-28-10\nnetwork ResNet-110", @"
    error: `network` is set twice
     --> <inline>:2:1
      |
    2 | network ResNet-110
      | ^^^^^^^^^^^^^^^^^^
      = note: first set at <inline>:1:1
      = help: each setting may appear at most once; remove one `network`
    ");
    check!("network WRN-28-10 precision f16", @"
    error: unknown precision `f16`
     --> <inline>:1:29
      |
    1 | network WRN-28-10 precision f16
      |                             ^^^
      = help: precisions are: f32, bf16
    ");
    check!("network WRN-28-10 shortcut conv", @"
    error: unknown shortcut `conv`
     --> <inline>:1:28
      |
    1 | network WRN-28-10 shortcut conv
      |                            ^^^^
      = help: shortcuts are: identity, proj, projbn, zeropad
    ");
    check!("network WRN-28-10 nesterov yes", @"
    error: expected `true` or `false`, found `yes`
     --> <inline>:1:28
      |
    1 | network WRN-28-10 nesterov yes
      |                            ^^^
    ");
    check!("network WRN-28-10 schedule linear", @"
    error: expected one of: `step(..)`, `cosine`, `onecycle`, found `linear`
     --> <inline>:1:28
      |
    1 | network WRN-28-10 schedule linear
      |                            ^^^^^^
    ");
    check!("network WRN-28-10 schedule step(0.5 gamma 0.1)", @"
    error: expected one of: `)`, `,`, `;`, found `gamma`
     --> <inline>:1:37
      |
    1 | network WRN-28-10 schedule step(0.5 gamma 0.1)
      |                                     ^^^^^
    ");
    check!("network WRN-28-10 train { batch 64 }", @"
    error: `batch` cannot be set inside `train { .. }`
     --> <inline>:1:27
      |
    1 | network WRN-28-10 train { batch 64 }
      |                           ^^^^^
      = help: write it outside the braces; here, expected one of: `epochs`, `lr`, `schedule`, `momentum`, `nesterov`, `weight_decay`, `label_smoothing`, `}`
    ");
    check!("network WRN-28-10 lrate 0.1", @"
    error: unknown setting `lrate`
     --> <inline>:1:19
      |
    1 | network WRN-28-10 lrate 0.1
      |                   ^^^^^
      = help: expected one of: end of file, `network`, `train`, `dataset`, `dropout`, `shortcut`, `stochastic_depth`, `classes`, `batch`, `precision`, `seed`, `epochs`, `lr`, `schedule`, `momentum`, `nesterov`, `weight_decay`, `label_smoothing`
    ");
    check!("dataset cifar10", @"
    error: no network in this file
     --> <inline>:1:1
      |
    1 | dataset cifar10
      | ^
      = help: add a `network` line, e.g. `network WRN-28-10`
    ");
    check!("# only a comment", @"
    error: no network in this file
     --> <inline>:1:1
      |
    1 | # only a comment
      | ^
      = help: add a `network` line, e.g. `network WRN-28-10`
    ");
    check!("wrn 28 10", @"
    error: expected a family expression such as `WRN-28-10`, or `network`, found `wrn`
     --> <inline>:1:1
      |
    1 | wrn 28 10
      | ^^^
      = help: a file is a family expression alone, or items such as `network WRN-28-10`, `dataset cifar10`, `epochs 200`
    ");
    check!("WRN-28-10 epochs 3", @"
    error: expected end of file, found `epochs`
     --> <inline>:1:11
      |
    1 | WRN-28-10 epochs 3
      |           ^^^^^^
      = help: a family expression alone is a whole file; to add settings, write `network` before it: `network WRN-28-10`
    ");
}

// ------------------------------------------------------------------ structural networks

#[test]
fn structural() {
    check!("network { conv(3x3, 16) bn relu gap fc }", @"
    network {
      conv(3x3, 16) bn relu gap fc
    }
    ");
    check!(r#"network "tiny" { input 3x32x32 classes 10 conv(3x3, 16) gap fc(10) }"#, @r#"
    network "tiny" {
      input 3x32x32
      classes 10
      conv(3x3, 16) gap fc(10)
    }
    "#);
    check!(r#"network "a \"quoted\" \\ name" { gap fc }"#, @r#"
    network "a \"quoted\" \\ name" {
      gap fc
    }
    "#);
    check!("network { classes 10 input 1x28x28 gap fc }", @"
    network {
      input 1x28x28
      classes 10
      gap fc
    }
    ");
}

#[test]
fn layers() {
    check!("network { conv(5x5, 32, stride=2, pad=1, groups=4, bias) }", @"
    network {
      conv(5x5, 32, stride=2, pad=1, groups=4, bias)
    }
    ");
    check!("network { conv(3x3, 16, bias, groups=1, pad=1, stride=1) }", @"
    network {
      conv(3x3, 16, pad=1, bias)
    }
    ");
    check!("network { maxpool(3x3, stride=2, pad=1) avgpool(2x2) avgpool(2x2, stride=2, pad=0) }", @"
    network {
      maxpool(3x3, stride=2, pad=1) avgpool(2x2) avgpool(2x2)
    }
    ");
    check!("network { dropout(0.3) dropout(0) }", @"
    network {
      dropout(0.3) dropout(0)
    }
    ");
    check!("network{conv(3x3,16)bn relu}", @"
    network {
      conv(3x3, 16) bn relu
    }
    ");
}

#[test]
fn blocks() {
    check!("network {
      conv(3x3, 16)
      repeat 4 {
        residual {
          pre bn relu
          body bn relu conv(3x3, 160, stride=2) bn relu dropout(0.3) conv(3x3, 160)
          shortcut proj
          post relu
          survival 0.9
        }
      }
      dense { bn relu conv(1x1, 48) bn relu conv(3x3, 12) }
      bn relu avgpool(2x2) maxpool(3x3, stride=2, pad=1) gap fc
    }", @"
    network {
      conv(3x3, 16)
      repeat 4 {
        residual {
          pre bn relu
          body bn relu conv(3x3, 160, stride=2) bn relu dropout(0.3) conv(3x3, 160)
          shortcut proj
          post relu
          survival 0.9
        }
      }
      dense {
        bn relu conv(1x1, 48) bn relu conv(3x3, 12)
      }
      bn relu avgpool(2x2) maxpool(3x3, stride=2, pad=1) gap fc
    }
    ");
    check!("network { residual { body conv(3x3, 16) } residual { body shortcut zeropad } }", @"
    network {
      residual {
        body conv(3x3, 16)
      }
      residual {
        body
        shortcut zeropad
      }
    }
    ");
    check!("network { residual { body residual { body bn } relu repeat 2 { bn } } }", @"
    network {
      residual {
        body
          residual {
            body bn
          }
          relu
          repeat 2 {
            bn
          }
      }
    }
    ");
    check!("network { repeat 2 { bn } dense { } }", @"
    network {
      repeat 2 {
        bn
      }
      dense {
      }
    }
    ");
    check!("network { repeat 0 { } dense { } }", @"
    error: empty `repeat` body
     --> <inline>:1:11
      |
    1 | network { repeat 0 { } dense { } }
      |           ^^^^^^^^^^^^
      = help: write the layers to repeat inside the braces, e.g. `repeat 4 { residual { .. } }`
    ");
}

#[test]
fn layer_errors() {
    check!("network { conv(3x5, 16) }", @"
    error: kernels are square: `3x5` is not
     --> <inline>:1:16
      |
    1 | network { conv(3x5, 16) }
      |                ^^^
      = help: write `3x3`
    ");
    check!("network { conv(3x3) }", @"
    error: expected `,`, found `)`
     --> <inline>:1:19
      |
    1 | network { conv(3x3) }
      |                   ^
    ");
    check!("network { conv(3x3, 16, strides=2) }", @"
    error: expected one of: `stride=`, `pad=`, `groups=`, `bias`, found `strides`
     --> <inline>:1:25
      |
    1 | network { conv(3x3, 16, strides=2) }
      |                         ^^^^^^^
    ");
    check!("network { conv(3x3, 16, stride=2, stride=1) }", @"
    error: `stride` is set twice
     --> <inline>:1:35
      |
    1 | network { conv(3x3, 16, stride=2, stride=1) }
      |                                   ^^^^^^^^
      = note: first set at <inline>:1:25
      = help: each setting may appear at most once; remove one `stride`
    ");
    check!("network { conv(3x3, 16, stride=1.5) }", @"
    error: expected a whole number, found `1.5`
     --> <inline>:1:32
      |
    1 | network { conv(3x3, 16, stride=1.5) }
      |                                ^^^
    ");
    check!("network { maxpool(3x3, groups=2) }", @"
    error: expected one of: `stride=`, `pad=`, found `groups`
     --> <inline>:1:24
      |
    1 | network { maxpool(3x3, groups=2) }
      |                        ^^^^^^
    ");
    check!("network { linear(10) }", @"
    error: unknown layer `linear`
     --> <inline>:1:11
      |
    1 | network { linear(10) }
      |           ^^^^^^
      = help: expected one of: `input`, `classes`, `conv(..)`, `bn`, `relu`, `dropout(..)`, `maxpool(..)`, `avgpool(..)`, `gap`, `fc`, `residual { .. }`, `dense { .. }`, `repeat N { .. }`, `}`
    ");
    check!("network { bn input 3x32x32 }", @"
    error: `input` must come before the first layer
     --> <inline>:1:14
      |
    1 | network { bn input 3x32x32 }
      |              ^^^^^
      = help: write `input` and `classes` at the top of the network's braces
    ");
    check!("network { input 3x32x32 input 3x32x32 }", @"
    error: `input` is set twice
     --> <inline>:1:25
      |
    1 | network { input 3x32x32 input 3x32x32 }
      |                         ^^^^^^^^^^^^^
      = note: first set at <inline>:1:17
      = help: each setting may appear at most once; remove one `input`
    ");
    check!("network { input 3x32 }", @"
    error: expected a shape such as `3x32x32`, found `3x32`
     --> <inline>:1:17
      |
    1 | network { input 3x32 }
      |                 ^^^^
    ");
    check!("network { residual { bn } }", @"
    error: expected one of: `pre`, `body`, found `bn`
     --> <inline>:1:22
      |
    1 | network { residual { bn } }
      |                      ^^
      = help: the sections of `residual { .. }` come in the order pre, body, shortcut, post, survival, each at most once
    ");
    check!("network { residual { body bn pre relu } }", @"
    error: expected one of: `shortcut`, `conv(..)`, `bn`, `relu`, `dropout(..)`, `maxpool(..)`, `avgpool(..)`, `gap`, `fc`, `residual { .. }`, `dense { .. }`, `repeat N { .. }`, `post`, `survival`, `}`, found `pre`
     --> <inline>:1:30
      |
    1 | network { residual { body bn pre relu } }
      |                              ^^^
      = help: the sections of `residual { .. }` come in the order pre, body, shortcut, post, survival, each at most once
    ");
    check!("network { residual { body bn shortcut none } }", @"
    error: unknown shortcut `none`
     --> <inline>:1:39
      |
    1 | network { residual { body bn shortcut none } }
      |                                       ^^^^
      = help: shortcuts are: identity, proj, projbn, zeropad
    ");
    check!("network { bn body relu }", @"
    error: unknown layer `body`
     --> <inline>:1:14
      |
    1 | network { bn body relu }
      |              ^^^^
      = help: `body` is a section of `residual { .. }`; here, expected one of: `conv(..)`, `bn`, `relu`, `dropout(..)`, `maxpool(..)`, `avgpool(..)`, `gap`, `fc`, `residual { .. }`, `dense { .. }`, `repeat N { .. }`, `}`
    ");
    check!("network { repeat { bn } }", @"
    error: expected a number, found `{`
     --> <inline>:1:18
      |
    1 | network { repeat { bn } }
      |                  ^
    ");
    check!("network { bn", @"
    error: expected one of: `conv(..)`, `bn`, `relu`, `dropout(..)`, `maxpool(..)`, `avgpool(..)`, `gap`, `fc`, `residual { .. }`, `dense { .. }`, `repeat N { .. }`, `}`, found end of file
     --> <inline>:1:13
      |
    1 | network { bn
      |             ^
      = note: unclosed `{` at <inline>:1:9
      = help: add the missing `}`
    ");
    check!("network { bn } }", @"
    error: unmatched `}`
     --> <inline>:1:16
      |
    1 | network { bn } }
      |                ^
      = help: expected one of: end of file, `network`, `train`, `dataset`, `dropout`, `shortcut`, `stochastic_depth`, `classes`, `batch`, `precision`, `seed`, `epochs`, `lr`, `schedule`, `momentum`, `nesterov`, `weight_decay`, `label_smoothing`
    ");
    check!("network \"unterminated { bn }", @r#"
    error: expected `"`, found end of file
     --> <inline>:1:29
      |
    1 | network "unterminated { bn }
      |                             ^
    "#);
}
