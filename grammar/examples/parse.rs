//! Parses each argument (a file path, or with `-e` an inline text) and prints the AST's debug
//! form or the rendered diagnostic. A development aid for the grammar.
//!
//! With `-b` first, each network is also built (`wrnc_compiler::build`) and the node count
//! printed instead of the AST.
//!
//! cargo run -p wrnc-grammar --example parse -- -e 'WRN-28-10' examples/wrn.net
#![allow(clippy::result_large_err)]
use wrnc_grammar::{parse, source_from_bytes, Diagnostic, Source};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let build = args.first().is_some_and(|a| a == "-b");
    if build {
        args.remove(0);
    }
    let mut i = 0;
    while i < args.len() {
        let src = if args[i] == "-e" && i + 1 < args.len() {
            i += 1;
            Ok(Source::inline(args[i].clone()))
        } else {
            match std::fs::read(&args[i]) {
                Ok(bytes) => source_from_bytes(&args[i], &bytes),
                Err(e) => {
                    eprintln!("{}: {e}", args[i]);
                    i += 1;
                    continue;
                }
            }
        };
        let parsed = src.and_then(|s| parse(&s).map(|f| (s, f)));
        match parsed {
            Ok((s, file)) if build => match wrnc_compiler::build(&file) {
                Ok(g) => println!("{}: {} nodes", s.name, g.order.len()),
                Err(e) => print!("{}", Diagnostic::from_error(&s, &e).render()),
            },
            Ok((_, file)) => println!("{file:#?}"),
            Err(d) => print!("{}", d.render()),
        }
        i += 1;
    }
}
