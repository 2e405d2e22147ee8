//! Diagnostics: a message pointing at a span of a source file, rendered like rustc's.
//!
//! Invariants:
//! - `line` and `col` are 1-based; `col` counts characters (not bytes) from the start of the
//!   line.
//! - A diagnostic owns the text of the line it points at (`snippet`), so rendering needs no
//!   access to the source and is a pure function of the diagnostic: the same diagnostic always
//!   renders to the same text (no colours, no terminal queries).
//! - Building a diagnostic from any span never panics: out-of-range or mid-character spans are
//!   clamped to the text.

use wrnc_compiler::Span;

/// A named text to parse: a file's contents, or an expression typed on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The file path, or `"<inline>"` for text that did not come from a file.
    pub name: String,
    pub text: String,
}

impl Source {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Source {
        Source {
            name: name.into(),
            text: text.into(),
        }
    }

    /// Text typed on the command line, named `<inline>`.
    pub fn inline(text: impl Into<String>) -> Source {
        Source::new("<inline>", text)
    }
}

/// An error in a source file, with where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// [`Source::name`] of the file the error is in.
    pub file: String,
    /// 1-based line of `span.start`.
    pub line: usize,
    /// 1-based column of `span.start`, in characters.
    pub col: usize,
    /// Byte range in the source text (clamped to it).
    pub span: Span,
    pub message: String,
    /// What would be valid here, when that can be said.
    pub help: Option<String>,
    /// Further facts (e.g. where a duplicated setting was first set), one line each.
    pub notes: Vec<String>,
    /// The text of line `line`, with control characters made visible (see [`clean_line`]);
    /// a line longer than `MAX_SNIPPET_CHARS` is cut to a window around `col`, marked with
    /// `...`.
    pub snippet: String,
    /// 0-based character offset of the first caret in `snippet` (`col - 1` unless the line
    /// was cut).
    pub caret: usize,
    /// Number of carets under the snippet: the characters of the span on line `line` (within
    /// the snippet), at least 1.
    pub underline: usize,
}

impl Diagnostic {
    /// A diagnostic at `span` of `src`. The span is clamped to the text and to character
    /// boundaries.
    pub fn new(src: &Source, span: Span, message: impl Into<String>) -> Diagnostic {
        let text = src.text.as_str();
        let start = floor_boundary(text, span.start.min(text.len()));
        let end = floor_boundary(text, span.end.clamp(start, text.len()));
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line = text[..start].bytes().filter(|&b| b == b'\n').count() + 1;
        let col = text[line_start..start].chars().count() + 1;
        let underline = text[start..end.min(line_end)].chars().count().max(1);
        let (snippet, caret, underline) =
            window(&clean_line(&text[line_start..line_end]), col - 1, underline);
        Diagnostic {
            file: src.name.clone(),
            line,
            col,
            span: Span::new(start, end),
            message: message.into(),
            help: None,
            notes: Vec::new(),
            snippet,
            caret,
            underline,
        }
    }

    /// A semantic error from the compiler (expansion, lowering), rendered like a parse error.
    pub fn from_error(src: &Source, e: &wrnc_compiler::Error) -> Diagnostic {
        let mut d = Diagnostic::new(src, e.span, e.message.clone());
        d.help = e.help.clone();
        d
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    /// `file:line:col`, the way the rendering's `-->` line shows the location.
    pub fn location(&self) -> String {
        format!("{}:{}:{}", self.file, self.line, self.col)
    }

    /// Plain text, rustc-like, ending with a newline:
    ///
    /// ```text
    /// error: depth 27 does not fit WRN: depth - 4 must be a multiple of 6
    ///  --> examples/bad.net:3:13
    ///   |
    /// 3 | network WRN-27-10
    ///   |             ^^
    ///   = help: valid depths are 10, 16, 22, 28, 34, 40, ...
    /// ```
    pub fn render(&self) -> String {
        let gutter = " ".repeat(self.line.to_string().len());
        let mut out = format!("error: {}\n", self.message);
        out += &format!("{gutter}--> {}\n", self.location());
        out += &format!("{gutter} |\n");
        if self.snippet.is_empty() {
            out += &format!("{} |\n", self.line);
        } else {
            out += &format!("{} | {}\n", self.line, self.snippet);
        }
        out += &format!(
            "{gutter} | {}{}\n",
            " ".repeat(self.caret),
            "^".repeat(self.underline)
        );
        for note in &self.notes {
            out += &format!("{gutter} = note: {note}\n");
        }
        if let Some(help) = &self.help {
            out += &format!("{gutter} = help: {help}\n");
        }
        out
    }
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

impl std::error::Error for Diagnostic {}

/// Longest snippet shown, in characters; longer lines are cut around the error.
pub const MAX_SNIPPET_CHARS: usize = 100;

/// Cuts `line` to at most [`MAX_SNIPPET_CHARS`] (plus `...` markers) around character `caret`;
/// returns the shown text and the caret offset and length within it.
fn window(line: &str, caret: usize, underline: usize) -> (String, usize, usize) {
    let chars: Vec<char> = line.chars().collect();
    if chars.len() <= MAX_SNIPPET_CHARS {
        return (line.to_string(), caret, underline);
    }
    let before = MAX_SNIPPET_CHARS / 3;
    let start = caret.saturating_sub(before).min(chars.len());
    let end = (start + MAX_SNIPPET_CHARS).min(chars.len());
    let mut shown = String::new();
    let mut caret = caret - start;
    if start > 0 {
        shown += "...";
        caret += 3;
    }
    shown.extend(&chars[start..end]);
    if end < chars.len() {
        shown += "...";
    }
    let room = (end - start).saturating_sub(caret.saturating_sub(if start > 0 { 3 } else { 0 }));
    (shown, caret, underline.min(room).max(1))
}

/// The largest character boundary `<= i` (`i <= text.len()`).
fn floor_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// One line for display: a trailing `\r` dropped, tabs shown as one space and other control
/// characters as U+FFFD, so that one character of the source is one character of the snippet
/// and the carets line up.
pub fn clean_line(line: &str) -> String {
    line.strip_suffix('\r')
        .unwrap_or(line)
        .chars()
        .map(|c| match c {
            '\t' => ' ',
            c if c.is_control() => '\u{FFFD}',
            c => c,
        })
        .collect()
}

/// Largest source accepted, in bytes. A network description is a few kilobytes; this bound
/// keeps a stray multi-gigabyte file from being parsed.
pub const MAX_SOURCE_BYTES: usize = 16 << 20;

/// Decodes a file's bytes. Errors: a file over [`MAX_SOURCE_BYTES`], bytes that are not UTF-8
/// (pointing at the first bad byte), and an empty or whitespace-only file.
pub fn source_from_bytes(name: &str, bytes: &[u8]) -> Result<Source, Diagnostic> {
    if bytes.len() > MAX_SOURCE_BYTES {
        let d = Diagnostic::new(
            &Source::new(name, ""),
            Span::default(),
            format!(
                "file is too large: {} bytes (the limit is {} bytes)",
                bytes.len(),
                MAX_SOURCE_BYTES
            ),
        );
        return Err(d);
    }
    // a UTF-8 byte-order mark (some editors write one) is not part of the text
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            let src = Source::new(name, text);
            if text.trim().is_empty() {
                return Err(empty_file(&src));
            }
            Ok(src)
        }
        Err(e) => {
            let bad = e.valid_up_to();
            // Show the text up to the end of the bad byte's line.
            let line_end = bytes[bad..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(bytes.len(), |i| bad + i);
            // Everything before `bad` is valid UTF-8; the rest of the line is decoded lossily,
            // each bad byte becoming one U+FFFD.
            let mut shown = String::from_utf8_lossy(&bytes[..bad]).into_owned();
            shown += &String::from_utf8_lossy(&bytes[bad..line_end]);
            let src = Source::new(name, shown);
            let d = Diagnostic::new(
                &src,
                Span::new(bad, bad + 1),
                format!(
                    "file is not valid UTF-8: byte 0x{:02x} at offset {bad}",
                    bytes[bad]
                ),
            )
            .with_help("save the file as UTF-8");
            Err(d)
        }
    }
}

pub(crate) fn empty_file(src: &Source) -> Diagnostic {
    Diagnostic::new(src, Span::new(0, src.text.len()), "empty network file")
        .with_help("write a network, e.g. `WRN-28-10` or `network WRN-28-10`")
}
