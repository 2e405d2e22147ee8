//! The nesting limit, checked before pest runs.
//!
//! pest parses by recursive descent: each level of `{` or `(` costs several native stack
//! frames, in pest and again in the AST builder, the printer and the compiler's passes. A cheap
//! byte scan bounds the depth first so that no input can exhaust the stack.

use crate::{Diagnostic, Source};
use wrnc_compiler::Span;

/// Deepest nesting of braces and parentheses accepted (together: `{ ( ) }` is 2 levels).
pub const MAX_NESTING: usize = 64;

/// Errors at the first `{` or `(` that opens level `MAX_NESTING + 1`. Brackets inside `#`
/// comments and `"strings"` are not counted; unbalanced closers are left for the parser.
pub fn check_nesting(src: &Source) -> Result<(), Diagnostic> {
    let bytes = src.text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'{' | b'(' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(Diagnostic::new(
                        src,
                        Span::new(i, i + 1),
                        format!("nesting too deep: more than {MAX_NESTING} levels of brackets"),
                    )
                    .with_help(format!(
                        "`{{ }}` and `( )` may be nested at most {MAX_NESTING} deep; use `repeat N {{ .. }}` to repeat blocks"
                    )));
                }
            }
            b'}' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Byte offset of the innermost `{` left open at the end of `text` (comments and strings
/// skipped), if any.
pub(crate) fn unclosed_brace(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut open = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'{' => open.push(i),
            b'}' => {
                open.pop();
            }
            _ => {}
        }
        i += 1;
    }
    open.pop()
}
