//! Every file in `tests/data/errors` (at the workspace root) is a broken network: parsing, or
//! else `wrnc_compiler::build`, must fail, and the rendered diagnostic is snapshotted (one
//! snapshot per file, `snapshots/errors__<file stem>.snap`).

use std::path::Path;
use wrnc_grammar::{parse, source_from_bytes, Diagnostic};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/errors");

/// The diagnostic for one file, from the first stage that fails; `None` if nothing fails.
fn diagnose(name: &str, bytes: &[u8]) -> Option<Diagnostic> {
    let src = match source_from_bytes(name, bytes) {
        Ok(src) => src,
        Err(d) => return Some(d),
    };
    let file = match parse(&src) {
        Ok(file) => file,
        Err(d) => return Some(d),
    };
    match wrnc_compiler::build(&file) {
        Ok(_) => None,
        Err(e) => Some(Diagnostic::from_error(&src, &e)),
    }
}

#[test]
fn every_error_file_is_rejected_with_a_diagnostic() {
    let mut paths: Vec<_> = std::fs::read_dir(DIR)
        .expect("tests/data/errors exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "net"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 17,
        "expected the error corpus, found {paths:?}"
    );
    let mut accepted = Vec::new();
    for path in &paths {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        // The name shown in diagnostics: relative to the workspace root, the same on every
        // machine.
        let name = format!(
            "tests/data/errors/{}",
            Path::new(path).file_name().unwrap().to_string_lossy()
        );
        let bytes = std::fs::read(path).expect("readable error file");
        match diagnose(&name, &bytes) {
            Some(d) => insta::assert_snapshot!(stem, d.render()),
            None => accepted.push(name),
        }
    }
    assert!(
        accepted.is_empty(),
        "these broken files were accepted: {accepted:?}"
    );
}
