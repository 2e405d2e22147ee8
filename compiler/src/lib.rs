//! wrnc's compiler: AST (plain data) -> family expansion -> op graph (petgraph) with shapes ->
//! analyses (parameters, multiply-accumulates, memory) -> passes -> code generation.
//!
//! This crate emits text and data only. It never depends on cudarc (the GPU lives in
//! `wrnc-runtime`) nor on pest (the text front end lives in `wrnc-grammar`).

pub mod analysis;
pub mod ast;
pub mod codegen;
pub mod dump;
pub mod expand;
pub mod graph;
pub mod lower;
pub mod memplan;
pub mod passes;
pub mod print;
pub mod rng;
pub mod schedule;

pub use ast::Span;

/// A semantic error, pointing at the user's text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub span: Span,
    pub message: String,
    /// What would be valid here, when that can be said.
    pub help: Option<String>,
}

impl Error {
    pub fn new(span: Span, message: impl Into<String>) -> Error {
        Error {
            span,
            message: message.into(),
            help: None,
        }
    }
    pub fn help(mut self, help: impl Into<String>) -> Error {
        self.help = Some(help.into());
        self
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// From a parsed file to a verified graph: expand the family (if any), then lower and infer
/// shapes.
pub fn build(file: &ast::NetFile) -> Result<graph::Graph> {
    let net = expand::expand(file)?;
    lower::lower(&net)
}
