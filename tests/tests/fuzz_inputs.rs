//! The fuzz targets' committed inputs, replayed without a fuzzing engine: every file under
//! `fuzz/seeds/TARGET/` and `fuzz/regressions/TARGET/` (inputs that once crashed a target) goes
//! through the same function the libFuzzer target calls (`fuzz/src/lib.rs`, included here), so
//! a regression fails the ordinary test suite, not only `scripts/fuzz`.

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz_bodies;

use std::path::{Path, PathBuf};

use needle_test_support::repo_root;

/// The files of `fuzz/{seeds,regressions}/target`, sorted.
fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for kind in ["seeds", "regressions"] {
        let dir = repo_root().join("fuzz").join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        files.extend(entries.map(|e| e.expect("read dir entry").path()));
    }
    files.sort();
    files
}

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let files = inputs(target);
    assert!(
        !files.is_empty(),
        "fuzz/seeds/{target} has no seed inputs: scripts/fuzz needs at least one"
    );
    for file in &files {
        let data = std::fs::read(file).expect("read input");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} panics target {target}", shown(file));
    }
    files.len()
}

fn shown(file: &Path) -> String {
    file.strip_prefix(repo_root())
        .unwrap_or(file)
        .display()
        .to_string()
}

#[test]
fn pickle_inputs() {
    replay("pickle", fuzz_bodies::pickle);
}

#[test]
fn safetensors_inputs() {
    replay("safetensors", fuzz_bodies::safetensors);
}

#[test]
fn sentencepiece_inputs() {
    replay("sentencepiece", fuzz_bodies::sentencepiece);
}

#[test]
fn hf_tokenizer_inputs() {
    replay("hf_tokenizer", fuzz_bodies::hf_tokenizer);
}

#[test]
fn tools_inputs() {
    replay("tools", fuzz_bodies::tools);
}

#[test]
fn eval_data_inputs() {
    replay("eval_data", fuzz_bodies::eval_data);
}

/// The seeds reach past the readers' first checks: a seed set of files every reader refuses
/// would leave the fuzzer starting from nothing useful.
#[test]
fn seeds_are_accepted_inputs() {
    use needlec::load::safetensors::load_safetensors_bytes;
    let read = |p: &PathBuf| std::fs::read(p).expect("read seed");
    for f in inputs("pickle") {
        needlec::load::load_pickle_bytes(&read(&f))
            .unwrap_or_else(|e| panic!("{}: {e}", shown(&f)));
    }
    for f in inputs("safetensors") {
        load_safetensors_bytes(&read(&f), &f).unwrap_or_else(|e| panic!("{}: {e}", shown(&f)));
    }
    for f in inputs("sentencepiece") {
        needle_runtime::tokenizer::Tokenizer::from_model_bytes(&read(&f))
            .unwrap_or_else(|e| panic!("{}: {e}", shown(&f)));
    }
    for f in inputs("hf_tokenizer") {
        let text = String::from_utf8(read(&f)).expect("UTF-8 seed");
        needle_runtime::tokenizer::Tokenizer::from_hf_json(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", shown(&f)));
    }
    for f in inputs("tools") {
        let text = String::from_utf8(read(&f)).expect("UTF-8 seed");
        needlec::tools::parse_tools(&text).unwrap_or_else(|e| panic!("{}: {e}", shown(&f)));
    }
    for f in inputs("eval_data") {
        let data = read(&f);
        let text = std::str::from_utf8(&data[1..]).expect("UTF-8 seed");
        let (examples, _) = needlec::eval::data::parse(text, data[0] & 1 == 1);
        assert!(!examples.is_empty(), "{}: no example parses", shown(&f));
    }
}
