//! Hugging Face `tokenizer.json`, checked against Hugging Face's own `tokenizers` crate: the
//! runtime tokenizer gives the crate's ids for every form the loader accepts, and
//! `needlec tokenizer export`'s file makes the crate tokenize like the SentencePiece model.
//! (The generated library's tokenizer is checked on the same files and strings in
//! `codegen_tokenizer.rs`.)

mod hf_common;

use hf_common::{corpus, export_cannot_agree, oracle, oracle_ids, variants};
use needle_runtime::tokenizer::Tokenizer;
use needle_test_support::{golden, tiny_needle};

fn models() -> Vec<(&'static str, Tokenizer)> {
    vec![
        (
            "dev4k",
            Tokenizer::from_file(&golden("dev4k.model")).unwrap(),
        ),
        (
            "tiny-needle",
            Tokenizer::from_file(&tiny_needle("tokenizer.model")).unwrap(),
        ),
    ]
}

#[test]
fn runtime_gives_the_crates_ids_on_every_accepted_form() {
    for (k, (model, sp)) in models().into_iter().enumerate() {
        let texts = corpus(&sp, 0x4846_0000 + k as u64);
        assert!(texts.len() > 6000, "{}", texts.len());
        for (name, json) in variants(&sp) {
            let ours =
                Tokenizer::from_hf_json(&json).unwrap_or_else(|e| panic!("{model} {name}: {e}"));
            let theirs = oracle(&json);
            let mut nonempty = 0;
            for text in &texts {
                let want = oracle_ids(&theirs, text);
                assert_eq!(ours.encode(text), want, "{model} {name}: {text:?}");
                nonempty += usize::from(!want.is_empty());
            }
            assert!(nonempty > texts.len() * 9 / 10, "{model} {name}");
        }
    }
}

/// The forms differ where they should: the same text gives different ids under different
/// normalizers and added-token rules (so the test above compares real differences).
#[test]
fn the_variants_really_differ() {
    let sp = Tokenizer::from_file(&golden("dev4k.model")).unwrap();
    let v = variants(&sp);
    let text = "hi  <tool_call>x <s>\u{1F9EA}  a";
    let ids: Vec<Vec<u32>> = v
        .iter()
        .map(|(_, json)| oracle_ids(&oracle(json), text))
        .collect();
    for i in 0..ids.len() {
        for j in i + 1..ids.len() {
            assert_ne!(ids[i], ids[j], "{} and {}", v[i].0, v[j].0);
        }
    }
}

/// Export, load with the crate: the SentencePiece model's ids on every string, except where the
/// tokenizer.json form cannot carry sentencepiece's behaviour (see `export_cannot_agree`), which
/// must be rare and is pinned by one example.
#[test]
fn exported_tokenizer_json_tokenizes_like_the_model_in_the_crate() {
    for (k, (model, sp)) in models().into_iter().enumerate() {
        let crate_tok = oracle(&sp.to_hf_json().unwrap());
        let texts = corpus(&sp, 0x5250_0000 + k as u64);
        let mut exceptions = 0;
        for text in &texts {
            let want = sp.encode(text);
            let got = oracle_ids(&crate_tok, text);
            if export_cannot_agree(&sp, text) {
                exceptions += 1;
            } else {
                assert_eq!(got, want, "{model}: {text:?}");
            }
        }
        assert!(exceptions * 100 < texts.len(), "{model}: {exceptions}");
        let text = "<tool_call><s>";
        assert!(export_cannot_agree(&sp, text));
        assert_ne!(oracle_ids(&crate_tok, text), sp.encode(text), "{model}");
    }
}
