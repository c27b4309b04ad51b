//! Shared by the tokenizer.json tests (`hf_tokenizer.rs`, `codegen_tokenizer.rs`): the
//! tokenizer.json variants built from a SentencePiece model, the strings they are checked on, and
//! the `tokenizers` crate as the oracle.

#![allow(dead_code)]

use needle_runtime::tokenizer::{PieceKind, Tokenizer};
use needle_test_support::{
    finetune, golden, random_tokenizer_bytes, random_tokenizer_text, read_json, read_text, Rng,
};
use needlec::tools::parse_tools;
use serde::Deserialize;
use serde_json::{json, Value};

/// The `tokenizers` crate's tokenizer for a tokenizer.json text.
pub fn oracle(json: &str) -> tokenizers::Tokenizer {
    json.parse::<tokenizers::Tokenizer>()
        .unwrap_or_else(|e| panic!("the tokenizers crate refuses the file: {e}"))
}

/// The crate's ids for `text`, without post-processing (Needle's prompt adds its own control
/// tokens).
pub fn oracle_ids(tk: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
    tk.encode(text, false)
        .unwrap_or_else(|e| panic!("the tokenizers crate fails on {text:?}: {e}"))
        .get_ids()
        .to_vec()
}

/// The added tokens of a Llama-style conversion: control and unknown pieces as special tokens,
/// user-defined pieces as plain ones.
fn added_tokens(sp: &Tokenizer, normalized: bool) -> Value {
    let list: Vec<Value> = (0..sp.vocab_size() as u32)
        .filter_map(|id| {
            let kind = sp.kind(id)?;
            let special = match kind {
                PieceKind::Control | PieceKind::Unknown => true,
                PieceKind::UserDefined => false,
                _ => return None,
            };
            Some(json!({
                "id": id, "content": sp.piece(id)?, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": normalized, "special": special
            }))
        })
        .collect();
    Value::Array(list)
}

/// Adds pieces that reach across a `▁` (`s▁`, `e▁`, `x▁`, `▁▁`) with the best ranks: Metaspace's
/// word splitting must keep them from ever forming.
fn cross_space_merges(v: &mut Value) {
    let vocab = v["model"]["vocab"].as_object_mut().unwrap();
    let mut merges = vec![];
    for (left, right) in [
        ("s", "\u{2581}"),
        ("e", "\u{2581}"),
        ("x", "\u{2581}"),
        ("\u{2581}", "\u{2581}"),
    ] {
        let id = vocab.len();
        vocab.entry(format!("{left}{right}")).or_insert(json!(id));
        merges.push(json!([left, right]));
    }
    merges.extend(v["model"]["merges"].as_array().unwrap().iter().cloned());
    v["model"]["merges"] = Value::Array(merges);
}

fn metaspace(scheme: &str) -> Value {
    json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": scheme, "split": false})
}

/// Every tokenizer.json form the loader reproduces, built from the SentencePiece model `sp`:
/// `(name, json)`. The first is `needlec tokenizer export`'s own.
pub fn variants(sp: &Tokenizer) -> Vec<(&'static str, String)> {
    let export = sp.to_hf_json().expect("the model exports");
    let base: Value = serde_json::from_str(&export).unwrap();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = base.clone();
        f(&mut v);
        v.to_string()
    };
    let llama_added = added_tokens(sp, false);
    vec![
        ("export", export.clone()),
        // Hugging Face's own conversion of a Llama-style SentencePiece model.
        (
            "llama",
            with(&|v| {
                v["added_tokens"] = llama_added.clone();
                v["normalizer"] = json!({"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "\u{2581}"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}
                ]});
                v["pre_tokenizer"] = Value::Null;
                v["model"]["ignore_merges"] = json!(false);
                v["model"]["fuse_unk"] = json!(true);
                cross_space_merges(v);
            }),
        ),
        (
            "metaspace_first",
            with(&|v| {
                v["added_tokens"] = llama_added.clone();
                v["normalizer"] = Value::Null;
                v["pre_tokenizer"] = metaspace("first");
                v["model"]["ignore_merges"] = json!(false);
            }),
        ),
        // No byte fallback: unknown characters become one fused `<unk>` per run; whole
        // segments that are vocabulary entries are taken as they are.
        (
            "metaspace_always_fused_unk",
            with(&|v| {
                v["added_tokens"] = llama_added.clone();
                v["normalizer"] = Value::Null;
                v["pre_tokenizer"] =
                    json!({"type": "Sequence", "pretokenizers": [metaspace("always")]});
                v["model"]["byte_fallback"] = json!(false);
                v["model"]["fuse_unk"] = json!(true);
                v["model"]["ignore_merges"] = json!(true);
                cross_space_merges(v);
            }),
        ),
        // Added tokens matched "after normalization" (there is none), one `<unk>` per unknown
        // character, spaces kept as they are.
        (
            "plain_unk",
            with(&|v| {
                v["added_tokens"] = added_tokens(sp, true);
                v["normalizer"] = Value::Null;
                v["pre_tokenizer"] = Value::Null;
                v["model"]["byte_fallback"] = json!(false);
                v["model"]["fuse_unk"] = json!(false);
                v["model"]["ignore_merges"] = json!(false);
            }),
        ),
        // Metaspace's word splitting: no merge across a `▁`, whole words through ignore_merges.
        (
            "metaspace_split_words",
            with(&|v| {
                v["added_tokens"] = llama_added.clone();
                v["normalizer"] = Value::Null;
                v["pre_tokenizer"] = json!({"type": "Metaspace", "replacement": "\u{2581}",
                                            "prepend_scheme": "always", "split": true});
                v["model"]["ignore_merges"] = json!(true);
                cross_space_merges(v);
            }),
        ),
        // An older file: `add_prefix_space` and no `split` field (which the crate reads as
        // true), unknown characters fused per word.
        (
            "metaspace_legacy_unk",
            with(&|v| {
                v["added_tokens"] = llama_added.clone();
                v["normalizer"] = Value::Null;
                v["pre_tokenizer"] = json!({"type": "Metaspace", "replacement": "\u{2581}",
                                            "add_prefix_space": true});
                v["model"]["byte_fallback"] = json!(false);
                v["model"]["fuse_unk"] = json!(true);
                v["model"]["ignore_merges"] = json!(false);
                cross_space_merges(v);
            }),
        ),
        // No unknown token, but byte fallback: no character is unknown.
        (
            "no_unk_bytes",
            with(&|v| {
                v["added_tokens"] = Value::Array(
                    llama_added
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|t| t["content"] != "<unk>")
                        .cloned()
                        .collect(),
                );
                v["normalizer"] =
                    json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
                v["pre_tokenizer"] = metaspace("never");
                v["model"]["unk_token"] = Value::Null;
                v["model"]["ignore_merges"] = json!(false);
            }),
        ),
    ]
}

#[derive(Deserialize)]
struct GoldenTok {
    text: String,
}

#[derive(Deserialize)]
struct Example {
    query: String,
    tools: Value,
}

/// The strings every tokenizer.json is checked on: the golden tokenizer strings, the fine-tune
/// data's queries and tool lists (held-out examples: queries, tool lists as written and as
/// normalized for the model; training examples: their distinct queries), random texts of
/// the vocabulary's pieces and corner-case fragments, and random bytes with invalid UTF-8 as a
/// Rust caller must hand them to the crate (`from_utf8_lossy`).
pub fn corpus(sp: &Tokenizer, seed: u64) -> Vec<String> {
    let mut texts: Vec<String> = read_json::<Vec<GoldenTok>>(&golden("tok_dev4k.json"))
        .into_iter()
        .map(|g| g.text)
        .collect();
    for line in read_text(&finetune("dev.jsonl")).lines() {
        let ex: Example = serde_json::from_str(line).expect("a fine-tune example");
        let tools = ex.tools.to_string();
        texts.push(parse_tools(&tools).unwrap().normalized_json);
        texts.push(ex.query);
        texts.push(tools);
    }
    for line in read_text(&finetune("train_queries.jsonl")).lines() {
        texts.push(serde_json::from_str(line).expect("a JSON string"));
    }
    let pieces: Vec<&str> = (0..sp.vocab_size() as u32)
        .map(|id| sp.piece(id).unwrap_or(""))
        .collect();
    let mut r = Rng(seed);
    texts.extend((0..600).map(|_| random_tokenizer_text(&mut r, &pieces, 120)));
    texts.extend((0..40).map(|_| random_tokenizer_text(&mut r, &pieces, 3000)));
    texts.extend((0..200).map(|_| {
        let n = r.below(200);
        String::from_utf8_lossy(&random_tokenizer_bytes(&mut r, &pieces, n)).into_owned()
    }));
    texts
}

/// Whether `text` is one where `needlec tokenizer export`'s file cannot agree with the
/// SentencePiece model: a stretch of the normalized text between user-defined symbols that is
/// itself a vocabulary entry, which the file's `ignore_merges` takes whole, while sentencepiece
/// merges it into something else (`<tool_call><s>`: the file gives `<s>`'s id).
pub fn export_cannot_agree(sp: &Tokenizer, text: &str) -> bool {
    let norm = sp.normalize(text);
    let symbols: Vec<&str> = sp
        .tables()
        .user_defined
        .iter()
        .map(|&id| sp.piece(id).unwrap_or(""))
        .collect();
    let mut chunks = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < norm.len() {
        match symbols.iter().find(|s| norm[i..].starts_with(**s)) {
            Some(s) => {
                chunks.push(&norm[start..i]);
                i += s.len();
                start = i;
            }
            None => i += norm[i..].chars().next().map_or(1, char::len_utf8),
        }
    }
    chunks.push(&norm[start..]);
    chunks.iter().any(|c| {
        !c.is_empty()
            && sp
                .lookup(c.as_bytes())
                .is_some_and(|id| sp.encode_normalized_text(c) != [id])
    })
}
