//! Parses each argument (a file path, or with `-e` an inline text) and prints the AST's debug
//! form or the rendered diagnostic. A development aid for the grammar.
//!
//! cargo run -p wrnc-grammar --example parse -- -e 'WRN-28-10' examples/wrn.net
use wrnc_grammar::{parse, source_from_bytes, Source};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
        match src.and_then(|s| parse(&s)) {
            Ok(file) => println!("{file:#?}"),
            Err(d) => print!("{}", d.render()),
        }
        i += 1;
    }
}
