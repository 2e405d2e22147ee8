//! The wrnc language front end: text -> [`wrnc_compiler::ast::NetFile`], and diagnostics.
//!
//! ```
//! use wrnc_grammar::{parse, Source};
//! let file = parse(&Source::inline("WRN-28-10-B(3,3)@cifar10")).unwrap();
//! assert!(matches!(file.network, wrnc_compiler::ast::NetworkSpec::Family(_)));
//! ```
//!
//! Guarantees: [`parse`] and [`source_from_bytes`] never panic, whatever the input (random
//! bytes, huge files, deep nesting); every error is a [`Diagnostic`] pointing at the text.
//! The language is described in `docs/language.md`; the grammar is `src/wrnc.pest`.

// `Diagnostic` is the error type of the public API by design (it is rendered, not matched on)
// and errors are rare: its size on the error path does not matter.
#![allow(clippy::result_large_err)]

mod diagnostic;
mod error;
mod family;
mod nesting;
mod parser;

pub use diagnostic::{clean_line, source_from_bytes, Diagnostic, Source, MAX_SOURCE_BYTES};
pub use family::FAMILIES;
pub use nesting::MAX_NESTING;
pub use parser::{parse, DEFAULT_GAMMA};
pub use wrnc_compiler::Span;

/// Parses `src`, then expands and lowers it with [`wrnc_compiler::build`]: every error, syntax
/// or semantic, as a [`Diagnostic`] on `src`.
pub fn build(src: &Source) -> Result<wrnc_compiler::graph::Graph, Diagnostic> {
    let file = parse(src)?;
    wrnc_compiler::build(&file).map_err(|e| Diagnostic::from_error(src, &e))
}
