//! No input makes the front end panic or overflow the stack: random bytes, random mutations
//! of valid files, nesting at and past the limit, large files. Whatever parses also prints and
//! parses back to the same AST.

use wrnc_compiler::print::print_file;
use wrnc_grammar::{parse, source_from_bytes, Source, MAX_NESTING};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Runs the whole front end on `bytes`; on success checks the print round trip. Returns
/// whether it parsed.
fn exercise(bytes: &[u8]) -> bool {
    let src = match source_from_bytes("<fuzz>", bytes) {
        Ok(src) => src,
        Err(d) => {
            let _ = d.render();
            return false;
        }
    };
    match parse(&src) {
        Err(d) => {
            let r = d.render();
            assert!(r.starts_with("error: "), "{r}");
            assert!(d.span.start <= d.span.end && d.span.end <= src.text.len());
            false
        }
        Ok(file) => {
            let printed = print_file(&file);
            let again = parse(&Source::new("<printed>", printed.clone())).unwrap_or_else(|d| {
                panic!(
                    "input {:?} printed as\n{printed}\ndoes not parse:\n{}",
                    src.text,
                    d.render()
                )
            });
            assert_eq!(print_file(&again), printed, "input {:?}", src.text);
            true
        }
    }
}

const SEEDS: &[&str] = &[
    "WRN-28-10-B(3,3)@cifar10",
    "network WRN-28-10\ndataset cifar10 # c\ndropout 0.3\ntrain { epochs 200 lr 0.1 schedule step(0.3, 0.6; gamma 0.2) nesterov true }\nbatch 128",
    "network \"n\" { input 3x32x32 classes 10 conv(3x3, 16, stride=2, pad=1, groups=2, bias) repeat 2 { residual { pre bn relu body conv(3x3, 16) dropout(0.3) shortcut proj post relu survival 0.9 } } dense { bn conv(1x1, 8) } maxpool(3x3, stride=2) avgpool(2x2, pad=1) gap fc(10) }",
    "network DenseNet-BC-100-12 schedule cosine precision bf16 seed 3",
    "network ResNeXt-29-8x64d@cifar100 momentum .9 weight_decay 5e-4",
];

/// Fragments that mutations insert: tokens of the language and near misses.
const PIECES: &[&str] = &[
    "{",
    "}",
    "(",
    ")",
    ",",
    "=",
    ";",
    "-",
    "@",
    "x",
    "\"",
    "#",
    "\n",
    " ",
    "0",
    "9",
    "1.5",
    "-1",
    "1e999",
    "99999999999999999999999",
    "bn",
    "relu",
    "conv(",
    "residual {",
    "body",
    "pre",
    "post",
    "survival",
    "shortcut",
    "repeat",
    "dense",
    "network",
    "train {",
    "B(",
    "WRN-",
    "é",
    "\u{0}",
    "\t",
    "\r",
];

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..1500 {
        let len = rng.below(200);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        assert!(!exercise(&bytes) || bytes.is_ascii());
        // Printable ASCII only: gets past the UTF-8 check into the parser.
        let ascii: Vec<u8> = (0..len).map(|_| 32 + rng.below(95) as u8).collect();
        let _ = exercise(&ascii);
    }
}

#[test]
fn mutated_files_never_panic_and_round_trip() {
    let mut rng = Rng(42);
    let mut parsed = 0;
    for _ in 0..3000 {
        let mut text = SEEDS[rng.below(SEEDS.len())].as_bytes().to_vec();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(text.len() + 1);
            match rng.below(6) {
                0 => {
                    let end = (at + 1 + rng.below(8)).min(text.len());
                    text.drain(at.min(end)..end);
                }
                1 => {
                    let piece = PIECES[rng.below(PIECES.len())].as_bytes();
                    text.splice(at..at, piece.iter().copied());
                }
                2 => {
                    if at < text.len() {
                        text[at] = rng.next() as u8;
                    }
                }
                // Mutations that often keep the file valid, so that the round trip is
                // exercised on many different files: change a digit, add digits, repeat a
                // space-separated word.
                3 | 4 => {
                    let digits: Vec<usize> = (0..text.len())
                        .filter(|&i| text[i].is_ascii_digit())
                        .collect();
                    if !digits.is_empty() {
                        let i = digits[rng.below(digits.len())];
                        if rng.below(2) == 0 {
                            text[i] = b'0' + rng.below(10) as u8;
                        } else {
                            text.insert(i, b'0' + rng.below(10) as u8);
                        }
                    }
                }
                _ => {
                    let start = text[..at]
                        .iter()
                        .rposition(|&b| b == b' ')
                        .map_or(0, |i| i + 1);
                    let end = text[at..]
                        .iter()
                        .position(|&b| b == b' ')
                        .map_or(text.len(), |i| at + i);
                    let word: Vec<u8> = text[start..end].to_vec();
                    text.splice(end..end, std::iter::once(b' ').chain(word));
                }
            }
        }
        parsed += usize::from(exercise(&text));
    }
    // The mutations are small: a good share of them must still parse (and round-trip), or
    // this test would only be exercising error paths.
    assert!(parsed > 300, "only {parsed} of 3000 mutated files parsed");
}

fn nested(levels: usize) -> String {
    // `network {` is the first level.
    let mut s = String::from("network {\n");
    for _ in 1..levels {
        s += "dense {\n";
    }
    s += "bn\n";
    for _ in 1..levels {
        s += "}\n";
    }
    s + "}\n"
}

#[test]
fn nesting_at_the_limit_parses_and_past_it_is_rejected() {
    // Run on a thread with a small stack (the default test thread has 2 MiB; the CLI's main
    // thread has 8): the limit must hold with room to spare in an unoptimised build.
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            let ok = nested(MAX_NESTING);
            let file =
                parse(&Source::inline(ok.clone())).unwrap_or_else(|d| panic!("{}", d.render()));
            let printed = print_file(&file);
            parse(&Source::inline(printed)).unwrap_or_else(|d| panic!("{}", d.render()));

            let deep = nested(MAX_NESTING + 1);
            let d = parse(&Source::inline(deep.clone())).unwrap_err();
            assert!(d.message.starts_with("nesting too deep"), "{}", d.render());
            // Points at the first brace past the limit.
            assert_eq!(d.line, MAX_NESTING + 1);
            assert_eq!(&deep[d.span.start..d.span.end], "{");

            // Far past it: no stack overflow, same error.
            let d = parse(&Source::inline("(".repeat(1_000_000))).unwrap_err();
            assert!(d.message.starts_with("nesting too deep"));
            // Brackets in comments and strings do not count.
            let commented = format!("# {}\nWRN-28-10", "{".repeat(100));
            parse(&Source::inline(commented)).unwrap();
        })
        .unwrap();
    handle.join().unwrap();
}

#[test]
fn large_inputs_are_handled() {
    // A long (valid) file.
    let big = format!("network {{ {} gap fc }}", "bn relu ".repeat(50_000));
    let file = parse(&Source::inline(big)).unwrap();
    let wrnc_compiler::ast::NetworkSpec::Structural(s) = file.network else {
        panic!("structural expected")
    };
    assert_eq!(s.body.len(), 100_002);
    // A long invalid line: the diagnostic shows a window of it, not the whole line.
    let junk = format!("network {{ {} ??? }}", "bn ".repeat(100_000));
    let d = parse(&Source::inline(junk)).unwrap_err();
    assert!(d.render().len() < 2_000, "{}", d.render());
    // Over the size limit.
    let huge = vec![b' '; wrnc_grammar::MAX_SOURCE_BYTES + 1];
    let d = source_from_bytes("huge.net", &huge).unwrap_err();
    assert!(d.message.contains("too large"));
}
