//! (in progress)
use crate::ast::*;
/// Expands a family name into the structural form; a structural network passes through with
/// its defaults (input, classes) resolved from the dataset.
pub fn expand(_file: &NetFile) -> crate::Result<Structural> { unimplemented!() }
