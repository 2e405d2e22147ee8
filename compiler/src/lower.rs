//! (in progress)
use crate::ast::*;
pub fn lower(_net: &Structural) -> crate::Result<crate::graph::Graph> { unimplemented!() }
