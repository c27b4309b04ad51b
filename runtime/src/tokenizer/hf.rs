//! Loading a Hugging Face `tokenizer.json` (BPE model) into the same tables.
//!
//! Mapping, chosen so that a tokenizer.json converted from a SentencePiece BPE model encodes
//! like the original:
//! - `model.vocab` gives the ids (they must be exactly `0..n`, plus any `added_tokens` beyond).
//! - A piece's score is `-rank` of the first merge in `model.merges` that produces it. Multi-
//!   character pieces that no merge produces are left out of the lookup index, because HF's BPE
//!   could never create them; a merge is then allowed exactly when the concatenation is a
//!   piece produced by some merge. (HF ranks pairs, not results: where two different pairs make
//!   the same piece, this uses the better rank for both.)
//! - `added_tokens`: `special` ones are control pieces (the `unk_token` is the unknown piece),
//!   the others user-defined symbols (matched literally before BPE). Unlike HF, special tokens
//!   are not matched inside the text: sentencepiece never does, and the reference's `<s>` in a
//!   query is ordinary text.
//! - `<0xNN>` vocabulary entries are byte pieces when `model.byte_fallback` is set.
//! - Whitespace: a `Prepend("▁")` normalizer or a Metaspace pre-tokenizer that prepends gives the
//!   dummy prefix; `Replace(" ", "▁")` or Metaspace's replacement escapes spaces. HF does not
//!   collapse or strip spaces, so `remove_extra_whitespaces` is off.

use serde_json::Value;

use super::{parse_byte_piece, PieceKind, RawPiece, Settings, Tokenizer, TokenizerError};

fn err(msg: impl Into<String>) -> TokenizerError {
    TokenizerError::HfJson(msg.into())
}

/// Walks a normalizer or pre-tokenizer (possibly a `Sequence`) and records whitespace handling.
fn scan_whitespace(node: &Value, s: &mut Settings) {
    let Some(kind) = node.get("type").and_then(Value::as_str) else {
        return;
    };
    match kind {
        "Sequence" => {
            let children = node
                .get("normalizers")
                .or_else(|| node.get("pretokenizers"))
                .and_then(Value::as_array);
            for c in children.into_iter().flatten() {
                scan_whitespace(c, s);
            }
        }
        "Prepend" if node.get("prepend").and_then(Value::as_str) == Some(super::SPACE_SYMBOL) => {
            s.add_dummy_prefix = true;
        }
        "Replace" => {
            let pattern = node
                .get("pattern")
                .and_then(|p| p.get("String"))
                .and_then(Value::as_str);
            let content = node.get("content").and_then(Value::as_str);
            if pattern == Some(" ") && content == Some(super::SPACE_SYMBOL) {
                s.escape_whitespaces = true;
            }
        }
        "Metaspace" => {
            if node.get("replacement").and_then(Value::as_str) == Some(super::SPACE_SYMBOL) {
                s.escape_whitespaces = true;
            }
            let prepend = match node.get("prepend_scheme").and_then(Value::as_str) {
                Some(scheme) => scheme != "never",
                None => node
                    .get("add_prefix_space")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            };
            if prepend {
                s.add_dummy_prefix = true;
            }
        }
        _ => {}
    }
}

fn merge_pair(m: &Value) -> Option<(String, String)> {
    match m {
        Value::String(s) => {
            let (a, b) = s.split_once(' ')?;
            Some((a.to_string(), b.to_string()))
        }
        Value::Array(v) => match v.as_slice() {
            [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
            _ => None,
        },
        _ => None,
    }
}

pub(super) fn load(json: &str) -> Result<Tokenizer, TokenizerError> {
    let root: Value = serde_json::from_str(json).map_err(|e| err(e.to_string()))?;
    let model = root.get("model").ok_or_else(|| err("no \"model\""))?;
    match model.get("type").and_then(Value::as_str) {
        Some("BPE") | None => {}
        Some(other) => {
            return Err(TokenizerError::Unsupported(format!(
                "tokenizer.json model type {other} (only BPE is implemented)"
            )))
        }
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| err("model.vocab is not an object"))?;
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let unk_token = model.get("unk_token").and_then(Value::as_str);

    // id -> text, first from the vocabulary, then added tokens (which may extend it).
    let mut texts: Vec<Option<String>> = vec![None; vocab.len()];
    let place = |texts: &mut Vec<Option<String>>, text: &str, id: &Value| {
        let id = id
            .as_u64()
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < (1 << 24))
            .ok_or_else(|| err(format!("bad id for {text:?}")))?;
        if id >= texts.len() {
            texts.resize(id + 1, None);
        }
        match &texts[id] {
            Some(old) if old != text => Err(err(format!("id {id} is both {old:?} and {text:?}"))),
            _ => {
                texts[id] = Some(text.to_string());
                Ok(())
            }
        }
    };
    for (text, id) in vocab {
        place(&mut texts, text, id)?;
    }
    let mut added_kind: Vec<(usize, PieceKind)> = Vec::new();
    for tok in root
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let content = tok
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| err("added token without content"))?;
        let id = tok.get("id").ok_or_else(|| err("added token without id"))?;
        place(&mut texts, content, id)?;
        let special = tok.get("special").and_then(Value::as_bool).unwrap_or(false);
        let kind = if Some(content) == unk_token {
            PieceKind::Unknown
        } else if special {
            PieceKind::Control
        } else {
            PieceKind::UserDefined
        };
        added_kind.push((id.as_u64().unwrap_or(0) as usize, kind));
    }

    let mut pieces = Vec::with_capacity(texts.len());
    let mut index_of = std::collections::HashMap::new();
    for (id, t) in texts.into_iter().enumerate() {
        let text = t.ok_or_else(|| err(format!("id {id} is missing (ids must be 0..n)")))?;
        index_of.insert(text.clone(), id);
        let kind = if Some(text.as_str()) == unk_token {
            PieceKind::Unknown
        } else if byte_fallback && parse_byte_piece(&text).is_some() {
            PieceKind::Byte
        } else {
            PieceKind::Normal
        };
        pieces.push(RawPiece {
            text,
            score: 0.0,
            kind,
        });
    }
    for (id, kind) in added_kind {
        if let Some(p) = pieces.get_mut(id) {
            p.kind = kind;
        }
    }

    let mut searchable: Vec<bool> = pieces
        .iter()
        .map(|p| p.text.chars().nth(1).is_none() || p.kind != PieceKind::Normal)
        .collect();
    let mut scored = vec![false; pieces.len()];
    let merges = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| err("model.merges is not an array"))?;
    for (rank, m) in merges.iter().enumerate() {
        let (a, b) = merge_pair(m).ok_or_else(|| err(format!("merge {rank} is malformed")))?;
        let Some(&id) = index_of.get(&format!("{a}{b}")) else {
            return Err(err(format!(
                "merge {rank} makes {:?}, not in the vocabulary",
                format!("{a}{b}")
            )));
        };
        if let (Some(p), Some(done)) = (pieces.get_mut(id), scored.get_mut(id)) {
            if !*done {
                *done = true;
                // Rank 0 is the first merge: it must get the highest score.
                p.score = -(rank as f32);
            }
        }
        if let Some(s) = searchable.get_mut(id) {
            *s = true;
        }
    }

    let mut settings = Settings {
        byte_fallback,
        add_dummy_prefix: false,
        remove_extra_whitespaces: false,
        escape_whitespaces: false,
        ..Settings::default()
    };
    for key in ["normalizer", "pre_tokenizer"] {
        if let Some(node) = root.get(key) {
            scan_whitespace(node, &mut settings);
        }
    }
    Tokenizer::from_raw(pieces, settings, Some(searchable))
}
