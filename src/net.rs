//! Reading a NET argument: a `.net` file or an inline expression.

use std::path::Path;
use wrnc_compiler::ast::{NetFile, Precision};
use wrnc_compiler::graph::Graph;
use wrnc_grammar::{Diagnostic, Source};

/// Largest `.net` file read (the grammar refuses larger sources too).
const MAX_FILE: u64 = 16 << 20;

/// A parsed, verified network and where it came from.
pub struct Loaded {
    pub source: Source,
    pub file: NetFile,
    pub graph: Graph,
}

impl Loaded {
    /// The precision a command runs at: its `--precision` flag, else the file's `precision`
    /// setting, else f32.
    pub fn precision_or(&self, flag: Option<crate::gpu_cmd::PrecisionArg>) -> Precision {
        match flag {
            Some(p) => p.get(),
            None => self
                .file
                .settings
                .precision
                .map(|p| p.value)
                .unwrap_or_default(),
        }
    }
}

/// An error already rendered for the user (exit code 2).
#[derive(Debug)]
pub struct UserError(pub String);

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UserError {}

/// `NET` is a path when a file of that name exists or it ends in `.net`; otherwise it is the
/// source text itself (e.g. `WRN-28-10` or `network WRN-16-4 dropout 0.3`).
pub fn source(arg: &str) -> Result<Source, UserError> {
    let path = Path::new(arg);
    let looks_like_path = arg.ends_with(".net") || arg.contains('/') && !arg.contains('{');
    if path.exists() || looks_like_path {
        let meta = std::fs::metadata(path)
            .map_err(|e| UserError(format!("error: cannot read `{arg}`: {e}")))?;
        if meta.is_dir() {
            return Err(UserError(format!(
                "error: `{arg}` is a directory, not a .net file"
            )));
        }
        if meta.len() > MAX_FILE {
            return Err(UserError(format!(
                "error: `{arg}` is {} bytes; a .net file is at most {MAX_FILE}",
                meta.len()
            )));
        }
        // at most MAX_FILE + 1 bytes, whatever the metadata says: a device or a pipe has no
        // length (`/dev/zero` would be read for ever)
        let mut bytes = vec![];
        std::io::Read::read_to_end(
            &mut std::io::Read::take(
                std::fs::File::open(path)
                    .map_err(|e| UserError(format!("error: cannot read `{arg}`: {e}")))?,
                MAX_FILE + 1,
            ),
            &mut bytes,
        )
        .map_err(|e| UserError(format!("error: cannot read `{arg}`: {e}")))?;
        if bytes.len() as u64 > MAX_FILE {
            return Err(UserError(format!(
                "error: `{arg}` holds more than {MAX_FILE} bytes; a .net file is at most that"
            )));
        }
        wrnc_grammar::source_from_bytes(arg, &bytes).map_err(|d| UserError(d.render()))
    } else {
        Ok(Source::inline(arg))
    }
}

pub fn load(arg: &str) -> Result<Loaded, UserError> {
    let source = source(arg)?;
    let file = wrnc_grammar::parse(&source).map_err(|d| UserError(d.render()))?;
    let graph = wrnc_compiler::build(&file)
        .map_err(|e| UserError(Diagnostic::from_error(&source, &e).render()))?;
    Ok(Loaded {
        source,
        file,
        graph,
    })
}
