//! The body of every Rust fuzz target, one function a target: each feeds the bytes to one input
//! boundary of needlec through its byte or text API, as the program would, and checks the
//! boundary's contract: an `Err` is a fine answer, a panic (an out-of-range index, an overflow:
//! the fuzz build keeps overflow checks on, a failed assertion here) is a bug, and so is a hang or
//! an allocation past libFuzzer's limit.
//!
//! `fuzz_targets/*.rs` wrap these for libFuzzer; `tests/tests/fuzz_inputs.rs` includes this file
//! and replays the committed seeds and regression inputs through the same functions in the
//! ordinary test suite, engine-free.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::OnceLock;

use needle_runtime::tokenizer::Tokenizer;

/// The bundled model's tokenizer, parsed from the bytes compiled into the target.
pub fn bundled_tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        Tokenizer::from_model_bytes(include_bytes!("../../examples/tiny-needle/tokenizer.model"))
            .expect("the bundled tokenizer loads")
    })
}

/// Text that reaches the byte fallback, normalization and merges of any tokenizer.
const PROBE: &str =
    "Set a timer for 5 minutes, then text Mom: \"on my way\" \u{1F600} caf\u{e9} \t\n  x";

/// What a program does with a tokenizer it accepted: encode, decode, render each token, write
/// it back as `tokenizer.json`. None of it may panic, whatever the file held.
pub fn exercise_tokenizer(tok: &Tokenizer) {
    let ids = tok.encode(PROBE);
    let _ = tok.decode(&ids);
    let _ = tok.encode_at_most(PROBE, 8);
    let _ = tok.encode_pieces(PROBE);
    let n = tok.vocab_size().min(64) as u32;
    let all: Vec<u32> = (0..n).chain([u32::MAX, n]).collect();
    let _ = tok.decode(&all);
    for id in all {
        let _ = tok.token_text(id);
        let _ = tok.piece(id);
    }
    // Writing `tokenizer.json` costs about a millisecond for a full vocabulary: done for small
    // ones, which reach the same code.
    if tok.vocab_size() <= 512 {
        let _ = tok.to_hf_json();
    }
}

/// The PyTorch pickle checkpoint reader, then the check against the config that `needlec` runs
/// on every checkpoint it accepts.
pub fn pickle(data: &[u8]) {
    if let Ok(ckpt) = needlec::load::load_pickle_bytes(data) {
        let _ = needlec::load::check_checkpoint(&ckpt);
    }
}

/// The safetensors checkpoint reader, the check against the config, and `needlec convert`'s
/// writer, whose output must read back. The path only names the file in errors and locates a
/// sidecar `config.json`; none exists there.
pub fn safetensors(data: &[u8]) {
    use needlec::load::safetensors::{load_safetensors_bytes, safetensors_bytes};
    let path = Path::new("/nonexistent/needlec-fuzz/model.safetensors");
    if let Ok(ckpt) = load_safetensors_bytes(data, path) {
        let _ = needlec::load::check_checkpoint(&ckpt);
        if let Ok(bytes) = safetensors_bytes(&ckpt) {
            load_safetensors_bytes(&bytes, path).expect("needlec reads the safetensors it writes");
        }
    }
}

/// The SentencePiece `.model` reader (protobuf), and the accepted tokenizer used.
pub fn sentencepiece(data: &[u8]) {
    if let Ok(tok) = Tokenizer::from_model_bytes(data) {
        exercise_tokenizer(&tok);
    }
}

/// The Hugging Face `tokenizer.json` reader, and the accepted tokenizer used. Bytes that are not
/// UTF-8 never reach it (the file reader refuses them first).
pub fn hf_tokenizer(data: &[u8]) {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(tok) = Tokenizer::from_hf_json(json) {
        exercise_tokenizer(&tok);
    }
}

/// The tool-list parser (Needle format and OpenAI-style definitions, mixed element by element);
/// an accepted list is tokenized against the encoder budget and given to the strict grammar's
/// schema reader, as `needlec build` does.
pub fn tools(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(set) = needlec::tools::parse_tools(text) {
        let _ = needle_runtime::decode::tool_ids(bundled_tokenizer(), &set.normalized_json);
        let originals: Vec<String> = set.name_map.iter().map(|(_, o)| o.clone()).collect();
        let _ = needle_runtime::strict::schemas(&set.normalized_json, &originals);
    }
}

/// `needlec eval` data (JSON Lines): byte 0 says whether `--tools` is given, the rest is the
/// file. The line parser, each example's tool list as `eval` prepares it (parsed, its schemas
/// read; tokenizing it is the `tools` target's), and the call scoring of each answer list against
/// itself (which must be exact) and against the first example's.
pub fn eval_data(data: &[u8]) {
    use needlec::eval::{data, metrics};
    let Some((&flag, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let (examples, _bad) = data::parse(text, flag & 1 == 1);
    let first = examples
        .first()
        .map(|e| serde_json::Value::Array(e.answers.clone()));
    for example in &examples {
        let own = serde_json::Value::Array(example.answers.clone());
        let score = metrics::score_calls(Some(&own), &example.answers);
        assert!(
            score.exact,
            "an answer list must score exact against itself: {own}"
        );
        let _ = metrics::score_calls(first.as_ref(), &example.answers);
        let Some(tools) = &example.tools else {
            continue;
        };
        if let Ok(set) = needlec::tools::parse_tools(tools) {
            if let Ok(normalized) = serde_json::from_str(&set.normalized_json) {
                let names: Vec<String> = set.name_map.iter().map(|(s, _)| s.clone()).collect();
                let schemas = metrics::schemas(&normalized, &names);
                let _ = metrics::validate_calls(Some(&own), &schemas);
            }
        }
    }
}
