//! parse -> print -> parse gives the same AST (spans aside), and printing is a fixed point;
//! for hand-written files, for every family, and for the structural networks the compiler's
//! expansion produces.

use wrnc_compiler::ast::{NetFile, NetworkSpec};
use wrnc_compiler::print::{print_file, print_structural};
use wrnc_grammar::{parse, Source};

/// The AST's debug form with every span removed: equal strings mean equal ASTs up to spans.
fn without_spans(file: &NetFile) -> String {
    let s = format!("{file:?}");
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(i) = rest.find("Span { start: ") {
        out += &rest[..i];
        let after = &rest[i..];
        let end = after.find('}').expect("a span's debug form ends with `}`");
        out += "Span";
        rest = &after[end + 1..];
    }
    out + rest
}

/// Asserts the round trip for `text` and returns the canonical print.
fn roundtrip(text: &str) -> String {
    let first = parse(&Source::inline(text)).unwrap_or_else(|d| panic!("{}", d.render()));
    let printed = print_file(&first);
    let second = parse(&Source::new("<printed>", printed.clone()))
        .unwrap_or_else(|d| panic!("printed form does not parse:\n{printed}\n{}", d.render()));
    assert_eq!(
        without_spans(&first),
        without_spans(&second),
        "AST changed through:\n{printed}"
    );
    assert_eq!(
        print_file(&second),
        printed,
        "printing is not a fixed point"
    );
    printed
}

const FILES: &[&str] = &[
    "WRN-28-10",
    "WRN-40-4-B(3,1,3)@svhn",
    "ResNet-110@cifar10",
    "PreResNet-1001",
    "ResNeXt-29-16x64d@cifar100",
    "DenseNet-BC-190-40",
    "DenseNet-40-12",
    "DenseNet-169@imagenet",
    "DenseNet-BC-121",
    "PyramidNet-272-200-bottleneck",
    "PyramidNet-110-48",
    "# examples/wrn-28-10.net
network WRN-28-10
dataset cifar10
dropout 0.3
shortcut proj
stochastic_depth 0.5
classes 100
batch 128
precision f32
seed 1
train {
  epochs 200
  lr 0.1
  schedule step(0.3, 0.6, 0.8; gamma 0.2)
  momentum 0.9
  nesterov true
  weight_decay 5e-4
  label_smoothing 0.0
}",
    "network WRN-16-4 lr 0.30000000000000004 momentum 1e-300 weight_decay 123456789012345680000 label_smoothing -0",
    "network WRN-16-4 schedule step(0.1; gamma 0.5) precision bf16",
    r#"network "my-net" {
  input 3x32x32
  classes 10
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
}"#,
    r#"network "q\"\\" { residual { pre bn body residual { body dense { conv(1x1, 8, groups=2, bias) } } shortcut zeropad post relu } fc(3) }"#,
    "network { repeat 2 { repeat 3 { bn } } dense { } conv(7x7, 64, stride=2, pad=3) maxpool(3x3, stride=2, pad=1) }",
];

#[test]
fn files_round_trip() {
    for f in FILES {
        roundtrip(f);
    }
}

/// The expansion of every family prints to a structural file that parses back to the same
/// network, and expanding that again is the identity.
#[test]
fn expanded_families_round_trip() {
    let families = [
        "WRN-16-4",
        "WRN-28-10-B(3,3)@cifar100",
        "WRN-40-2-B(1,3,1)",
        "ResNet-20",
        "PreResNet-164",
        "ResNeXt-29-8x64d",
        "DenseNet-40-12",
        "DenseNet-BC-100-12",
        "PyramidNet-110-48",
        "PyramidNet-164-48-bottleneck",
    ];
    for text in families {
        let file = parse(&Source::inline(text)).unwrap();
        let net = match wrnc_compiler::expand::expand(&file) {
            Ok(net) => net,
            Err(e) => panic!("{text}: {}", e.message),
        };
        let printed = print_structural(&net);
        let back = parse(&Source::new("<expanded>", printed.clone()))
            .unwrap_or_else(|d| panic!("{text} expanded does not parse:\n{}", d.render()));
        let NetworkSpec::Structural(ref s) = back.network else {
            panic!("structural expected")
        };
        assert_eq!(
            print_structural(s),
            printed,
            "{text}: printing is not a fixed point"
        );
        roundtrip(&printed);
    }
}
