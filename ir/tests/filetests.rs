//! IR filetests, in Cranelift's style: each file under `ir/tests/filetests/` names what to run,
//! gives the input IR and the exact output expected. The format and how to bless are in
//! `ir/tests/filetests/README.md`.
//!
//! Every file is checked, then every mismatch is reported with a diff (so one broken file does not
//! hide the others). With `NEEDLE_BLESS=1` (or `INSTA_UPDATE=always`, as for the snapshots) the
//! expectations are rewritten instead: review the diff of `ir/tests/filetests/` before
//! committing it.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use needle_ir::{parse, print, run_pipeline, verify, Pass, PIPELINE};

/// The line that ends the input and starts the expected output.
const EXPECT: &str = "# expect:";
/// The header line that says what to run: `# test: verify`, `# test: PASS [PASS...]`.
const TEST: &str = "# test:";

fn filetests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests")
}

/// `path` from the repository root, as people type it.
fn shown(path: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ir/ has a parent");
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

fn bless_requested() -> bool {
    std::env::var("NEEDLE_BLESS").is_ok_and(|v| !v.is_empty() && v != "0")
        || std::env::var("INSTA_UPDATE").is_ok_and(|v| v == "always")
}

/// What a file asks for.
enum Command {
    /// Parse and print: the canonical text, or the parse error.
    Parse,
    /// Parse and verify: `ok`, or the verifier's error message.
    Verify,
    /// Run these pipeline passes in order (verifying after each, as `run_pipeline` does): the
    /// module after the last one, or the pass error.
    Passes(Vec<&'static Pass>),
}

/// One file split into its parts.
struct FileTest {
    command: Command,
    /// Everything before the `# expect:` line, header comments included, so parse errors give
    /// the file's own line numbers.
    input: String,
    /// Everything after the `# expect:` line.
    expected: String,
}

fn read_test(path: &Path, text: &str) -> Result<FileTest, String> {
    let where_ = shown(path);
    let Some(split) = std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .find(|&start| text[start..].lines().next() == Some(EXPECT))
    else {
        return Err(format!(
            "{where_}: no `{EXPECT}` line; put one after the input (run with NEEDLE_BLESS=1 to \
             fill in what follows it)"
        ));
    };
    let input = &text[..split];
    let after = &text[split + EXPECT.len()..];
    let expected = after.strip_prefix('\n').unwrap_or(after);
    let Some(words) = input.lines().find_map(|l| l.strip_prefix(TEST)) else {
        return Err(format!(
            "{where_}: no `{TEST} ...` header line; start the file with `{TEST} verify`, \
             `{TEST} parse` or `{TEST} PASS...` (passes: {})",
            pass_names()
        ));
    };
    let words: Vec<&str> = words.split_whitespace().collect();
    let command = match words.as_slice() {
        ["parse"] => Command::Parse,
        ["verify"] => Command::Verify,
        [] => return Err(format!("{where_}: `{TEST}` names nothing to run")),
        names => Command::Passes(
            names
                .iter()
                .map(|name| {
                    PIPELINE.iter().find(|p| p.name == *name).ok_or_else(|| {
                        format!(
                            "{where_}: `{name}` is not a pass; the passes are {}",
                            pass_names()
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(FileTest {
        command,
        input: input.to_string(),
        expected: expected.to_string(),
    })
}

fn pass_names() -> String {
    PIPELINE
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the file's command produces. A pass test's input must parse and verify: when it does
/// not, that is a broken test, not an expectation to bless.
fn run(path: &Path, test: &FileTest) -> Result<String, String> {
    let parsed = parse(&test.input);
    let module = match (&test.command, parsed) {
        (Command::Parse, Ok(m)) => return printed(path, &m),
        (Command::Parse, Err(e)) => return Ok(format!("{e}\n")),
        (_, Err(e)) => return Err(format!("{}: the input does not parse: {e}", shown(path))),
        (_, Ok(m)) => m,
    };
    match &test.command {
        Command::Verify => Ok(match verify(&module) {
            Ok(()) => "ok\n".to_string(),
            Err(e) => format!("{e}\n"),
        }),
        Command::Passes(passes) => {
            verify(&module).map_err(|e| {
                format!(
                    "{}: the input does not verify (a pass test needs a valid module): {e}",
                    shown(path)
                )
            })?;
            // `run_pipeline` takes a slice of passes; these are the file's, in its order.
            let passes: Vec<Pass> = passes
                .iter()
                .map(|p| Pass {
                    name: p.name,
                    run: p.run,
                })
                .collect();
            match run_pipeline(module, None, &passes, |_, _| {}) {
                Ok(m) => printed(path, &m),
                Err(e) => Ok(format!("{e}\n")),
            }
        }
        Command::Parse => unreachable!("handled above"),
    }
}

/// The module's text, which must read back to the same module (the format round-trips).
fn printed(path: &Path, module: &needle_ir::Module) -> Result<String, String> {
    let text = print(module);
    match parse(&text) {
        Ok(back) if &back == module => Ok(text),
        Ok(_) => Err(format!(
            "{}: the output reads back as a different module:\n{text}",
            shown(path)
        )),
        Err(e) => Err(format!(
            "{}: the output does not read back ({e}):\n{text}",
            shown(path)
        )),
    }
}

fn diff(expected: &str, actual: &str) -> String {
    let mut out = String::new();
    for change in similar::TextDiff::from_lines(expected, actual).iter_all_changes() {
        let sign = match change.tag() {
            similar::ChangeTag::Delete => '-',
            similar::ChangeTag::Insert => '+',
            similar::ChangeTag::Equal => ' ',
        };
        let _ = write!(out, "{sign}{change}");
        if change.missing_newline() {
            out.push('\n');
        }
    }
    out
}

fn filetest_paths() -> Vec<PathBuf> {
    let dir = filetests_dir();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "nir"))
        .collect();
    paths.sort();
    paths
}

#[test]
fn filetests() {
    let bless = bless_requested();
    let paths = filetest_paths();
    assert!(
        !paths.is_empty(),
        "no .nir files in {}",
        filetests_dir().display()
    );
    let mut failures = Vec::new();
    let mut blessed = Vec::new();
    for path in &paths {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let outcome = read_test(path, &text).and_then(|test| Ok((run(path, &test)?, test)));
        let (actual, test) = match outcome {
            Ok(v) => v,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        if actual == test.expected {
            continue;
        }
        if bless {
            std::fs::write(path, format!("{}{EXPECT}\n{actual}", test.input))
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            blessed.push(shown(path));
        } else {
            failures.push(format!(
                "{}: the output differs from the expectation (- expected, + actual):\n{}",
                shown(path),
                diff(&test.expected, &actual)
            ));
        }
    }
    for path in &blessed {
        eprintln!("blessed {path}");
    }
    assert!(
        failures.is_empty(),
        "{} of {} filetests failed:\n\n{}\n\nIf the new output is right, bless it with \
         `NEEDLE_BLESS=1 cargo test -p needle-ir --test filetests` and review the diff.",
        failures.len(),
        paths.len(),
        failures.join("\n\n")
    );
}

/// Every pass of the pipeline has at least one filetest of its own, and the verifier too.
#[test]
fn every_pass_and_the_verifier_have_filetests() {
    let mut covered = BTreeSet::new();
    for path in filetest_paths() {
        let text = std::fs::read_to_string(&path).unwrap();
        let test = read_test(&path, &text).unwrap_or_else(|e| panic!("{e}"));
        match test.command {
            Command::Parse => {}
            Command::Verify => {
                covered.insert("verify");
            }
            Command::Passes(passes) => covered.extend(passes.iter().map(|p| p.name)),
        }
    }
    let missing: Vec<&str> = PIPELINE
        .iter()
        .map(|p| p.name)
        .chain(["verify"])
        .filter(|name| !covered.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "no filetest runs {missing:?}: add one to ir/tests/filetests/"
    );
}
