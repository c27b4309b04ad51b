//! Tokenizer parity with the reference (`sentencepiece`) on its golden vectors.

use needle_runtime::tokenizer::{Tokenizer, TokenizerError};
use needle_test_support::{golden, read_json, tiny_needle};
use serde_json::Value;

fn golden_json(name: &str) -> Value {
    read_json(&golden(name))
}

fn dev4k() -> Tokenizer {
    Tokenizer::from_file(&golden("dev4k.model")).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn vocab_layout_matches_spec() {
    let tok = dev4k();
    assert_eq!(tok.vocab_size(), 4096);
    let expect = [
        (0, "<pad>"),
        (1, "</s>"),
        (2, "<s>"),
        (3, "<unk>"),
        (4, "<tool_call>"),
        (5, "<tools>"),
        (6, "<0x00>"),
        (261, "<0xFF>"),
    ];
    for (id, piece) in expect {
        assert_eq!(tok.piece(id), Some(piece), "id {id}");
    }
    assert_eq!(tok.piece(4096), None);
}

#[test]
fn golden_ids_pieces_and_decoded() {
    let tok = dev4k();
    let cases: Value = golden_json("tok_dev4k.json");
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 289);
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let text = c["text"].as_str().unwrap();
        let want_ids = ids_of(&c["ids"]);
        let want_pieces: Vec<&str> = c["pieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        let ids = tok.encode(text);
        let pieces = tok.encode_pieces(text);
        if ids != want_ids || pieces != want_pieces {
            failures.push(format!(
                "#{i} {text:?}\n  got  {ids:?} {pieces:?}\n  want {want_ids:?} {want_pieces:?}"
            ));
        }
        let decoded = tok.decode(&want_ids);
        if decoded != c["decoded"].as_str().unwrap() {
            failures.push(format!(
                "#{i} decode {want_ids:?}: got {decoded:?}, want {:?}",
                c["decoded"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Greedy generations of random models decode ids nobody chose (stray bytes, controls).
#[test]
fn golden_greedy_texts_decode() {
    let tok = dev4k();
    let mut n = 0;
    for file in ["greedy_tiny.json", "greedy_small.json"] {
        for case in golden_json(file).as_array().unwrap() {
            let ids = ids_of(&case["gen_ids"]);
            assert_eq!(
                tok.decode(&ids),
                case["text"].as_str().unwrap(),
                "{file}: {ids:?}"
            );
            n += 1;
        }
    }
    assert!(n >= 16);
}

/// Decoder inputs are `[1, 4] + tokens(answer)` and encoder inputs start with `tokens(query)`.
#[test]
fn golden_forced_inputs_encode() {
    let tok = dev4k();
    for file in ["forced_tiny.json", "forced_small.json"] {
        for case in golden_json(file).as_array().unwrap() {
            let dec = ids_of(&case["dec_ids"]);
            let mut want = vec![1, 4];
            want.extend(tok.encode(case["answer"].as_str().unwrap()));
            assert_eq!(dec, want, "{file}: {}", case["answer"]);
            let enc = ids_of(&case["enc_ids"]);
            let q = tok.encode(case["query"].as_str().unwrap());
            assert_eq!(&enc[..q.len()], &q[..], "{file}: {}", case["query"]);
            assert_eq!(enc[q.len()], 5);
        }
    }
}

#[test]
fn token_texts_follow_grammar_rules() {
    let tok = dev4k();
    let texts = tok.token_texts();
    assert_eq!(texts.len(), 4096);
    assert!(texts[..4].iter().all(String::is_empty));
    assert_eq!(texts[4], "<tool_call>");
    assert_eq!(texts[5], "<tools>");
    // Byte pieces are Latin-1 characters, not UTF-8 decodings.
    assert_eq!(texts[6], "\u{0}");
    assert_eq!(texts[6 + 0x22], "\"");
    assert_eq!(texts[6 + 0xE9], "\u{E9}");
    assert_eq!(tok.piece(3981), Some("\u{2581}"));
    assert_eq!(texts[3981], " ");
    assert_eq!(tok.piece(298), Some("\u{2581}a"));
    assert_eq!(texts[298], " a");
}

#[test]
fn tiny_needle_model_loads_and_round_trips() {
    let tok = Tokenizer::from_file(&tiny_needle("tokenizer.model")).unwrap();
    assert_eq!(tok.vocab_size(), 2048);
    assert_eq!(tok.piece(4), Some("<tool_call>"));
    assert_eq!(tok.piece(5), Some("<tools>"));
    let samples: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/tiny-needle/samples.json"
        ))
        .unwrap(),
    )
    .unwrap();
    for s in samples.as_array().unwrap() {
        for key in ["query", "expected"] {
            let text = s[key].as_str().unwrap();
            let ids = tok.encode(text);
            assert!(ids.iter().all(|&i| (i as usize) < 2048));
            assert_eq!(
                tok.decode(&ids),
                text.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
    }
}

#[test]
fn corrupt_models_error_without_panicking() {
    let bytes = std::fs::read(golden("dev4k.model")).unwrap();
    // Every truncation point must give an error, not a panic (or, at a field boundary, a
    // smaller model, which must then fail validation or still work).
    for cut in (0..bytes.len())
        .step_by(97)
        .chain([1, 2, 3, bytes.len() - 1])
    {
        let _ = Tokenizer::from_model_bytes(&bytes[..cut]);
    }
    match Tokenizer::from_model_bytes(&bytes[..bytes.len() - 1]) {
        Err(TokenizerError::Truncated { offset, .. }) => assert!(offset <= bytes.len()),
        other => panic!("expected a truncation error, got {other:?}"),
    }
    let err = Tokenizer::from_model_bytes(&[0x0a, 0xff]).unwrap_err();
    assert!(matches!(err, TokenizerError::Truncated { .. }), "{err}");
    let err = Tokenizer::from_model_bytes(&[0x0b]).unwrap_err();
    assert!(
        matches!(err, TokenizerError::Malformed { offset: 0, .. }),
        "{err}"
    );
    assert!(Tokenizer::from_model_bytes(&[]).is_err());
    // Flipping bytes must never panic.
    let mut rng = 0x1234_5678_u32;
    for _ in 0..300 {
        let mut b = bytes.clone();
        for _ in 0..4 {
            rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let i = (rng as usize >> 8) % b.len();
            b[i] ^= (rng >> 3) as u8 | 1;
        }
        if let Ok(tok) = Tokenizer::from_model_bytes(&b) {
            let ids = tok.encode("What's the weather in 東京? <tool_call>  x");
            let _ = tok.decode(&ids);
        }
    }
}

#[test]
fn encoding_a_long_tool_list_is_fast() {
    let tok = dev4k();
    let tools = golden_json("grammar_dev4k.json")
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["tools_normalized"].as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let text: String = tools.chars().take(2048).collect();
    let start = std::time::Instant::now();
    let runs = 20;
    for _ in 0..runs {
        assert!(!tok.encode(&text).is_empty());
    }
    let per = start.elapsed() / runs;
    eprintln!("2 KB tool list: {per:?} per encode");
    // Debug build on a shared machine: generous bound, still catches quadratic blowups.
    assert!(per.as_millis() < 50, "{per:?} per 2 KB encode");
}

/// `to_hf_json` then `from_hf_json` (the Hugging Face form read back with the crate's semantics)
/// gives the golden ids on every golden string, for both bundled SentencePiece models.
#[test]
fn exported_tokenizer_json_reads_back_with_the_golden_ids() {
    let sp = dev4k();
    let json = sp.to_hf_json().unwrap();
    let hf = Tokenizer::from_hf_json(&json).unwrap();
    assert_eq!(hf.vocab_size(), 4096);
    let cases: Value = golden_json("tok_dev4k.json");
    for c in cases.as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        assert_eq!(hf.encode(text), ids_of(&c["ids"]), "{text:?}");
    }
    // Same pieces and kinds (control pieces through the post-processor's special tokens), so
    // the same grammar texts and decoding.
    for id in 0..4096 {
        assert_eq!(hf.piece(id), sp.piece(id), "piece {id}");
        assert_eq!(hf.kind(id), sp.kind(id), "kind of piece {id}");
    }
    assert_eq!(hf.token_texts(), sp.token_texts());
    assert_eq!(
        hf.decode(&[3981, 4, 300, 301]),
        sp.decode(&[3981, 4, 300, 301])
    );
    let tiny = Tokenizer::from_file(&tiny_needle("tokenizer.model")).unwrap();
    let hf_tiny = Tokenizer::from_hf_json(&tiny.to_hf_json().unwrap()).unwrap();
    for c in cases.as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        assert_eq!(hf_tiny.encode(text), tiny.encode(text), "{text:?}");
    }
    // What the form cannot carry is refused rather than written.
    assert!(matches!(
        hf.to_hf_json(),
        Err(TokenizerError::HfUnsupported(_))
    ));
    assert!(matches!(
        Tokenizer::from_hf_json("{\"model\": {\"type\": \"Unigram\"}}"),
        Err(TokenizerError::HfUnsupported(_))
    ));
    assert!(Tokenizer::from_hf_json("not json").is_err());
}

/// Runs of byte pieces decode like sentencepiece's `ProcessBytePieces`: one character at a
/// time, and every byte of an invalid sequence becomes its own U+FFFD (unlike Python's
/// `errors="replace"`, which folds a truncated sequence into one).
#[test]
fn byte_runs_decode_like_sentencepiece() {
    let tok = dev4k();
    let b = |x: u8| 6 + u32::from(x);
    assert_eq!(tok.decode(&[b(0xE3), b(0x81), b(0xAF)]), "\u{306F}");
    assert_eq!(
        tok.decode(&[b(0xE3), b(0x81), b(0x41)]),
        "\u{FFFD}\u{FFFD}A"
    );
    assert_eq!(tok.decode(&[b(0xC0), b(0x80)]), "\u{FFFD}\u{FFFD}");
    assert_eq!(
        tok.decode(&[b(0xED), b(0xA0), b(0x80)]),
        "\u{FFFD}\u{FFFD}\u{FFFD}"
    );
    // A non-byte piece ends the run: the bytes on either side are not joined.
    assert_eq!(
        tok.decode(&[b(0xE3), 1, b(0x81), b(0xAF)]),
        "\u{FFFD}\u{FFFD}\u{FFFD}"
    );
    // Leading spaces go while the text is still empty, even across control tokens.
    assert_eq!(tok.decode(&[1, 3981, 298]), "a");
    assert_eq!(tok.decode(&[3, 298]), " \u{2047}  a");
    assert_eq!(tok.decode(&[4, 298]), "<tool_call> a");
    assert_eq!(tok.decode(&[u32::MAX, 298]), "a");
}

/// `encode_at_most` gives `encode`'s ids when they fit, and otherwise a count of at least as
/// many tokens as `max`, which never exceeds the real count (a lower bound from the text's
/// length, so an overlong text is not tokenized).
#[test]
fn encode_at_most_bounds_the_work_by_the_budget() {
    let tok = dev4k();
    let text = "Set an alarm for 7:30 tomorrow and call it \"run\". ".repeat(40);
    let all = tok.encode(&text);
    assert_eq!(tok.encode_at_most(&text, all.len()), Ok(all.clone()));
    let over = tok.encode_at_most(&text, all.len() - 1).unwrap_err();
    assert!(over > all.len() - 1 && over <= all.len(), "{over}");
    // Far over the budget: refused from the length alone, with a bound at most the real count.
    let at_least = tok.encode_at_most(&text, 10).unwrap_err();
    assert!(at_least > 10 && at_least <= all.len(), "{at_least}");
    assert!(tok.max_piece_bytes() >= 4);
    let huge = "lights ".repeat(2_000_000);
    let start = std::time::Instant::now();
    assert!(tok.encode_at_most(&huge, 1022).unwrap_err() > 1022);
    assert!(start.elapsed() < std::time::Duration::from_secs(2));
}
