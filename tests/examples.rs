//! Every file in `examples/`: snapshots of the expanded form and of the op graph, and the round
//! trip "expanded text parses back to the same graph". Adding an example adds its tests.

use std::path::Path;
use wrnc_grammar::{Diagnostic, Source};

fn load(path: &Path) -> Source {
    let bytes = std::fs::read(path).unwrap();
    let name = format!("examples/{}", path.file_name().unwrap().to_string_lossy());
    wrnc_grammar::source_from_bytes(&name, &bytes).unwrap()
}

/// The expanded form and the graph text of a source, checking the round trip.
fn expand_and_roundtrip(src: &Source) -> (String, String) {
    let file = wrnc_grammar::parse(src).unwrap_or_else(|d| panic!("{}", d.render()));
    let graph = wrnc_compiler::build(&file)
        .unwrap_or_else(|e| panic!("{}", Diagnostic::from_error(src, &e).render()));
    let expanded =
        wrnc_compiler::print::print_file(&wrnc_compiler::expand::expand_file(&file).unwrap());
    let back =
        wrnc_grammar::build(&Source::new("expanded.net", expanded.clone())).unwrap_or_else(|d| {
            panic!(
                "expanded form of {} does not parse back:\n{}",
                src.name,
                d.render()
            )
        });
    let text = wrnc_compiler::dump::graph_text(&graph);
    assert_eq!(
        wrnc_compiler::dump::graph_text(&back),
        text,
        "{}: expanded form lowers to another graph",
        src.name
    );
    // Printing is a fixed point.
    let again = wrnc_grammar::parse(&Source::new("expanded.net", expanded.clone())).unwrap();
    assert_eq!(wrnc_compiler::print::print_file(&again), expanded);
    (expanded, text)
}

#[test]
fn examples_snapshots() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "net"));
    files.sort();
    assert!(files.len() >= 10, "examples/ lost its files");
    for path in files {
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let (expanded, graph) = expand_and_roundtrip(&load(&path));
        insta::assert_snapshot!(format!("expanded__{stem}"), expanded);
        insta::assert_snapshot!(format!("graph__{stem}"), graph);
    }
}

/// The round trip for every family and option, including forms no example uses.
#[test]
fn every_family_round_trips() {
    for net in [
        "WRN-16-4",
        "WRN-40-2-B(1,3,1)",
        "WRN-22-2-B(3,1,3)@cifar100",
        "WRN-50-2@imagenet",
        "network WRN-28-10 dropout 0.3 stochastic_depth 0.5",
        "network WRN-16-1 shortcut zeropad",
        "ResNet-20",
        "ResNet-18@imagenet",
        "network ResNet-32 shortcut projbn",
        "PreResNet-110",
        "PreResNet-164",
        "ResNeXt-29-8x64d",
        "ResNeXt-50-32x4d@imagenet",
        "DenseNet-40-12",
        "DenseNet-BC-100-12@svhn",
        "DenseNet-121@imagenet",
        "PyramidNet-110-48",
        "PyramidNet-164-270-bottleneck",
        "network PyramidNet-110-84 dropout 0.1 classes 7",
    ] {
        expand_and_roundtrip(&Source::inline(net));
    }
}
