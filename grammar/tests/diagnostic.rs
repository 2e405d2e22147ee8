//! Rendering of diagnostics: gutter width, columns in characters, tabs, clamping.

use wrnc_compiler::{Error, Span};
use wrnc_grammar::{source_from_bytes, Diagnostic, Source};

#[test]
fn renders_like_rustc_with_a_wide_gutter() {
    let text = format!("{}network WRN-27-10\n", "\n".repeat(11));
    let src = Source::new("bad.net", text);
    let e =
        Error::new(Span::new(23, 25), "depth 27 does not fit WRN").help("valid depths are 28, ...");
    insta::assert_snapshot!(Diagnostic::from_error(&src, &e).render(), @"
    error: depth 27 does not fit WRN
      --> bad.net:12:13
       |
    12 | network WRN-27-10
       |             ^^
       = help: valid depths are 28, ...
    ");
}

#[test]
fn columns_count_characters_and_tabs_keep_alignment() {
    let src = Source::new("u.net", "network\t{ «é» foo }");
    let start = src.text.find("foo").unwrap();
    let d = Diagnostic::new(&src, Span::new(start, start + 3), "unknown layer `foo`");
    assert_eq!((d.line, d.col), (1, 15));
    insta::assert_snapshot!(d.render(), @"
    error: unknown layer `foo`
     --> u.net:1:15
      |
    1 | network { «é» foo }
      |               ^^^
    ");
}

#[test]
fn out_of_range_and_mid_character_spans_are_clamped() {
    let src = Source::new("x.net", "é");
    for (s, e) in [(1, 2), (5, 9), (2, 1), (0, 100)] {
        let d = Diagnostic::from_error(&src, &Error::new(Span::new(s, e), "m"));
        assert!(d.span.start <= d.span.end && d.span.end <= src.text.len());
        assert!(src.text.is_char_boundary(d.span.start) && src.text.is_char_boundary(d.span.end));
        let _ = d.render();
    }
}

#[test]
fn bytes_are_checked() {
    assert_eq!(
        source_from_bytes("a", b"WRN-28-10").unwrap().text,
        "WRN-28-10"
    );
    let d = source_from_bytes("a", b"ok\n\xff").unwrap_err();
    assert_eq!((d.line, d.col), (2, 1));
    assert_eq!(
        source_from_bytes("a", b" \n\t").unwrap_err().message,
        "empty network file"
    );
}
