//! Hugging Face `tokenizer.json` (BPE model): loading it exactly as the `tokenizers` crate
//! encodes it, and writing a SentencePiece model in that form.
//!
//! # Loading
//!
//! What the crate does with a text, and how it maps onto the tables:
//! - Added tokens (special or not) are matched in the raw text first, leftmost-longest: they
//!   become the user-defined symbols (frozen). The stretches between them are segments.
//! - Each segment is normalized and pre-tokenized on its own: a `Prepend("▁")` normalizer puts a
//!   `▁` before every segment, `Replace(" ", "▁")` or a Metaspace pre-tokenizer escapes spaces, and
//!   Metaspace's `prepend_scheme` (`always`, `first`, `never`) puts a `▁` before a segment that
//!   does not start with one (`first`: only the segment at the start of the text) ([`SegmentPrefix`]);
//!   with `split: true` every `▁` then starts a word of its own (no merge across it).
//! - Or the normalizer is the one [`to_hf_json`] writes: sentencepiece's whitespace cleanup as
//!   regular expressions (leading spaces dropped, runs of spaces collapsed, trailing spaces and
//!   `▁`s dropped, spaces escaped, `▁` prepended), with the user-defined symbols split off by a
//!   `Split` pre-tokenizer; that is exactly sentencepiece's normalization.
//! - The BPE model merges by rank ([`HfBpe`]); with `ignore_merges`, a whole segment that is in
//!   the vocabulary is taken as is; characters outside the vocabulary become byte pieces
//!   (`byte_fallback`) or the unknown token (runs of them fused with `fuse_unk`).
//!
//! Everything else is refused with an error that names the feature, never approximated: other
//! model types, dropout, subword prefixes and suffixes, a model with neither `unk_token` nor
//! `byte_fallback` (the crate drops unknown characters and merges across the gap), other normalizers and pre-tokenizers,
//! added tokens with `single_word`/`lstrip`/`rstrip` or matched after
//! normalization, truncation and padding. Post-processors and decoders are not applied: Needle's
//! prompt assembly adds its own control tokens (the ids are those of
//! `encode(text, add_special_tokens=false)`); a `TemplateProcessing` post-processor's special
//! tokens only mark those vocabulary entries as control pieces (empty when decoding and to the
//! grammar), which is how [`to_hf_json`] keeps sentencepiece's control pieces without making
//! them added tokens.

use serde_json::{json, Map, Value};

use super::{
    parse_byte_piece, HfBpe, PieceKind, RawPiece, SegmentPrefix, Settings, Tokenizer,
    TokenizerError, SPACE_SYMBOL,
};

fn err(msg: impl Into<String>) -> TokenizerError {
    TokenizerError::HfJson(msg.into())
}

fn unsupported(msg: impl Into<String>) -> TokenizerError {
    TokenizerError::HfUnsupported(msg.into())
}

/// The regular expressions of sentencepiece's whitespace cleanup, in the order they apply.
const LEADING_SPACES: &str = "^ +";
const SPACE_RUNS: &str = " {2,}";
const TRAILING_SPACES: &str = "[ \u{2581}]+$";

/// What the normalizer does.
#[derive(Default)]
struct Normalizer {
    prepend: bool,
    replace: bool,
    /// Sentencepiece's whitespace cleanup (the three regular expressions, then replace, prepend).
    sp_cleanup: bool,
}

fn type_of(node: &Value) -> Result<&str, TokenizerError> {
    node.get("type").and_then(Value::as_str).ok_or_else(|| {
        err(format!(
            "a normalizer or pre-tokenizer without \"type\": {node}"
        ))
    })
}

/// A `Sequence`'s members (recursively), or the node itself.
fn flatten<'a>(node: &'a Value, key: &str, out: &mut Vec<&'a Value>) -> Result<(), TokenizerError> {
    if type_of(node)? == "Sequence" {
        let members = node
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| err(format!("Sequence without \"{key}\"")))?;
        for m in members {
            flatten(m, key, out)?;
        }
    } else {
        out.push(node);
    }
    Ok(())
}

/// `{"String": s}` or `{"Regex": r}`.
fn pattern(node: &Value) -> Result<(bool, &str), TokenizerError> {
    let p = node.get("pattern");
    if let Some(s) = p.and_then(|p| p.get("String")).and_then(Value::as_str) {
        return Ok((false, s));
    }
    if let Some(r) = p.and_then(|p| p.get("Regex")).and_then(Value::as_str) {
        return Ok((true, r));
    }
    Err(err(format!("pattern is neither String nor Regex: {node}")))
}

fn parse_normalizer(node: &Value) -> Result<Normalizer, TokenizerError> {
    let mut n = Normalizer::default();
    if node.is_null() {
        return Ok(n);
    }
    let mut items = Vec::new();
    flatten(node, "normalizers", &mut items)?;
    let mut regexes = Vec::new();
    let mut order = Vec::new();
    for item in items {
        let kind = type_of(item)?;
        match kind {
            "Prepend" => {
                let p = item.get("prepend").and_then(Value::as_str).unwrap_or("");
                if p != SPACE_SYMBOL {
                    return Err(unsupported(format!(
                        "normalizer Prepend({p:?}) (only Prepend(\"\u{2581}\") is reproduced)"
                    )));
                }
                if n.prepend {
                    return Err(unsupported("two Prepend normalizers"));
                }
                n.prepend = true;
                order.push('p');
            }
            "Replace" => {
                let (regex, pat) = pattern(item)?;
                let content = item.get("content").and_then(Value::as_str).unwrap_or("");
                match (regex, pat, content) {
                    (false, " ", SPACE_SYMBOL) if !n.replace => {
                        n.replace = true;
                        order.push('r');
                    }
                    (true, LEADING_SPACES, "")
                    | (true, SPACE_RUNS, " ")
                    | (true, TRAILING_SPACES, "") => {
                        regexes.push(pat);
                        order.push('x');
                    }
                    _ => {
                        return Err(unsupported(format!(
                            "normalizer Replace({}{pat:?} -> {content:?}) (only Replace(\" \" -> \
                             \"\u{2581}\") and sentencepiece's whitespace cleanup are reproduced)",
                            if regex { "Regex " } else { "" }
                        )))
                    }
                }
            }
            other => {
                return Err(unsupported(format!(
                "normalizer {other} (only Prepend(\"\u{2581}\"), Replace(\" \" -> \"\u{2581}\") \
                     and sentencepiece's whitespace cleanup are reproduced)"
            )))
            }
        }
    }
    if !regexes.is_empty() {
        if regexes != [LEADING_SPACES, SPACE_RUNS, TRAILING_SPACES]
            || order != ['x', 'x', 'x', 'r', 'p']
        {
            return Err(unsupported(
                "a normalizer mixing whitespace-cleanup regular expressions other than exactly \
                 `^ +` -> \"\", ` {2,}` -> \" \", `[ \u{2581}]+$` -> \"\", then Replace(\" \" -> \
                 \"\u{2581}\"), then Prepend(\"\u{2581}\") (what `needlec tokenizer export` writes)",
            ));
        }
        n.sp_cleanup = true;
    }
    Ok(n)
}

/// What the pre-tokenizer does.
enum PreTokenizer {
    None,
    /// Metaspace with its prepend scheme and whether it splits words at `▁`.
    Metaspace(&'static str, bool),
    /// `Split` isolating these literal strings, in the pattern's order.
    Split(Vec<String>),
}

/// The alternatives of a regular expression that is an alternation of literal strings
/// (`a|b\|c`), or None when it uses any other syntax.
fn literal_alternatives(re: &str) -> Option<Vec<String>> {
    let mut out = vec![String::new()];
    let mut chars = re.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let e = chars.next()?;
                if e.is_ascii_alphanumeric() {
                    // \d, \w, \b, \x.. ...: classes and escapes, not literals.
                    return None;
                }
                out.last_mut()?.push(e);
            }
            '|' => out.push(String::new()),
            '.' | '^' | '$' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' => return None,
            c => out.last_mut()?.push(c),
        }
    }
    Some(out)
}

fn parse_pre_tokenizer(node: &Value) -> Result<PreTokenizer, TokenizerError> {
    if node.is_null() {
        return Ok(PreTokenizer::None);
    }
    let mut items = Vec::new();
    flatten(node, "pretokenizers", &mut items)?;
    match items.as_slice() {
        [] => Ok(PreTokenizer::None),
        [one] => match type_of(one)? {
            "Metaspace" => {
                let rep = one.get("replacement").and_then(Value::as_str).unwrap_or("");
                if rep != SPACE_SYMBOL {
                    return Err(unsupported(format!(
                        "pre_tokenizer Metaspace with replacement {rep:?} (only \"\u{2581}\")"
                    )));
                }
                // The crate's default for a file without the field is true.
                let split = one.get("split").and_then(Value::as_bool).unwrap_or(true);
                let scheme = match one.get("prepend_scheme").and_then(Value::as_str) {
                    None | Some("always") => "always",
                    Some("first") => "first",
                    Some("never") => "never",
                    Some(other) => {
                        return Err(err(format!("Metaspace prepend_scheme {other:?}")));
                    }
                };
                let scheme = match one.get("add_prefix_space").and_then(Value::as_bool) {
                    Some(false) if scheme != "never" => {
                        return Err(err(
                            "Metaspace add_prefix_space: false contradicts its prepend_scheme",
                        ))
                    }
                    Some(false) => "never",
                    _ => scheme,
                };
                Ok(PreTokenizer::Metaspace(scheme, split))
            }
            "Split" => {
                let (regex, pat) = pattern(one)?;
                let behavior = one.get("behavior").and_then(Value::as_str).unwrap_or("");
                let invert = one.get("invert").and_then(Value::as_bool).unwrap_or(false);
                if behavior != "Isolated" || invert {
                    return Err(unsupported(format!(
                        "pre_tokenizer Split with behavior {behavior:?}, invert {invert} (only \
                         Isolated, not inverted, on user-defined symbols)"
                    )));
                }
                let alts = if regex {
                    literal_alternatives(pat).ok_or_else(|| {
                        unsupported(format!(
                            "pre_tokenizer Split on the regular expression {pat:?} (only an \
                             alternation of literal user-defined symbols)"
                        ))
                    })?
                } else {
                    vec![pat.to_string()]
                };
                Ok(PreTokenizer::Split(alts))
            }
            other => Err(unsupported(format!(
                "pre_tokenizer {other} (only Metaspace, and Split on user-defined symbols, are \
                 reproduced)"
            ))),
        },
        _ => Err(unsupported(
            "a Sequence of several pre-tokenizers (only one Metaspace or Split)",
        )),
    }
}

fn merge_pair(m: &Value) -> Option<(String, String)> {
    match m {
        Value::String(s) => {
            // The crate's legacy form: exactly two parts separated by one space.
            let mut parts = s.split(' ');
            let (a, b) = (parts.next()?, parts.next()?);
            parts
                .next()
                .is_none()
                .then(|| (a.to_string(), b.to_string()))
        }
        Value::Array(v) => match v.as_slice() {
            [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
            _ => None,
        },
        _ => None,
    }
}

fn flag(node: &Value, key: &str) -> Result<bool, TokenizerError> {
    match node.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(err(format!("{key} is {other}, not a boolean"))),
    }
}

/// An added token as the crate reads it.
struct Added {
    content: String,
    id: u32,
    special: bool,
    normalized: bool,
}

fn parse_added(root: &Value) -> Result<Vec<Added>, TokenizerError> {
    let mut out = Vec::new();
    let list = match root.get("added_tokens") {
        None | Some(Value::Null) => return Ok(out),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(err("added_tokens is not an array")),
    };
    for tok in list {
        let content = tok
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| err("added token without content"))?;
        let id = tok
            .get("id")
            .and_then(Value::as_u64)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| err(format!("added token {content:?} without a valid id")))?;
        for key in ["single_word", "lstrip", "rstrip"] {
            if flag(tok, key)? {
                return Err(unsupported(format!(
                    "added token {content:?} with {key}: true (only plain matches are reproduced)"
                )));
            }
        }
        // The crate's AddedToken default is normalized: true.
        let normalized = match tok.get("normalized") {
            None => true,
            Some(_) => flag(tok, "normalized")?,
        };
        out.push(Added {
            content: content.to_string(),
            id,
            special: flag(tok, "special")?,
            normalized,
        });
    }
    Ok(out)
}

pub(super) fn load(json: &str) -> Result<Tokenizer, TokenizerError> {
    let root: Value = serde_json::from_str(json).map_err(|e| err(e.to_string()))?;
    for key in ["truncation", "padding"] {
        if root.get(key).is_some_and(|v| !v.is_null()) {
            return Err(unsupported(format!(
                "{key} (it changes what encoding returns; set it to null)"
            )));
        }
    }
    let model = root.get("model").ok_or_else(|| err("no \"model\""))?;
    match model.get("type").and_then(Value::as_str) {
        Some("BPE") | None => {}
        Some(other) => {
            return Err(unsupported(format!(
                "model type {other} (only BPE is reproduced)"
            )))
        }
    }
    match model.get("dropout") {
        None | Some(Value::Null) => {}
        Some(d) if d.as_f64() == Some(0.0) => {}
        Some(d) => {
            return Err(unsupported(format!(
                "BPE dropout {d} (random merges; set it to null)"
            )))
        }
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        match model.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(v) => {
                return Err(unsupported(format!(
                    "BPE {key} {v} (only SentencePiece-style BPE without one is reproduced)"
                )))
            }
        }
    }
    let byte_fallback = flag(model, "byte_fallback")?;
    let fuse_unk = flag(model, "fuse_unk")?;
    let ignore_merges = flag(model, "ignore_merges")?;
    let unk_token = match model.get("unk_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(v) => return Err(err(format!("model.unk_token is {v}"))),
    };
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| err("model.vocab is not an object"))?;

    // Model vocabulary: ids must be exactly 0..n.
    let n = vocab.len();
    let mut texts: Vec<Option<String>> = vec![None; n];
    for (text, id) in vocab {
        let i = id
            .as_u64()
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < n)
            .ok_or_else(|| {
                err(format!(
                    "model.vocab gives {text:?} the id {id}; ids must be exactly 0..{n}"
                ))
            })?;
        if let Some(old) = &texts[i] {
            return Err(err(format!(
                "model.vocab gives id {i} to both {old:?} and {text:?}"
            )));
        }
        texts[i] = Some(text.clone());
    }
    let index_of = |t: &str| vocab.get(t).and_then(Value::as_u64).map(|i| i as u32);
    if let Some(u) = unk_token {
        if index_of(u).is_none() {
            return Err(err(format!("model.unk_token {u:?} is not in model.vocab")));
        }
    }
    let mut pieces: Vec<RawPiece> = texts
        .into_iter()
        .map(|t| {
            let text = t.unwrap_or_default();
            let kind = if Some(text.as_str()) == unk_token {
                PieceKind::Unknown
            } else if byte_fallback && parse_byte_piece(&text).is_some() {
                PieceKind::Byte
            } else {
                PieceKind::Normal
            };
            RawPiece {
                text,
                score: 0.0,
                kind,
            }
        })
        .collect();
    if unk_token.is_none() && !byte_fallback {
        return Err(unsupported(
            "a BPE model with neither unk_token nor byte_fallback (the crate drops unknown \
             characters and merges across the gap)",
        ));
    }
    if byte_fallback {
        let bytes = pieces.iter().filter(|p| p.kind == PieceKind::Byte).count();
        if bytes != 256 {
            return Err(unsupported(format!(
                "byte_fallback with {bytes} of the 256 <0xNN> pieces (the crate then mixes byte \
                 pieces and unknown tokens out of order)"
            )));
        }
    }

    // A TemplateProcessing post-processor's special tokens are control pieces (kinds only).
    if let Some(pp) = root
        .get("post_processor")
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("TemplateProcessing"))
    {
        for special in pp
            .get("special_tokens")
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|m| m.values())
        {
            let ids = special.get("ids").and_then(Value::as_array);
            let tokens = special.get("tokens").and_then(Value::as_array);
            for (id, token) in ids.into_iter().flatten().zip(tokens.into_iter().flatten()) {
                let (Some(id), Some(token)) = (id.as_u64(), token.as_str()) else {
                    continue;
                };
                if index_of(token) == Some(id as u32)
                    && pieces[id as usize].kind == PieceKind::Normal
                {
                    pieces[id as usize].kind = PieceKind::Control;
                }
            }
        }
    }

    // Added tokens: ids as the crate gives them (the vocabulary's, else new ones from n on).
    let added = parse_added(&root)?;
    let normalizer = parse_normalizer(root.get("normalizer").unwrap_or(&Value::Null))?;
    let pre = parse_pre_tokenizer(root.get("pre_tokenizer").unwrap_or(&Value::Null))?;
    let mut next_id = n as u32;
    let mut seen = std::collections::HashSet::new();
    let mut symbols: Vec<String> = Vec::new();
    for a in &added {
        if a.content.is_empty() {
            continue;
        }
        if !seen.insert(a.content.clone()) {
            return Err(unsupported(format!(
                "added token {:?} listed twice",
                a.content
            )));
        }
        let id = match index_of(&a.content) {
            Some(id) => id,
            None => {
                next_id += 1;
                next_id - 1
            }
        };
        if id != a.id {
            return Err(err(format!(
                "added token {:?} has id {} but the tokenizers crate gives it {id}",
                a.content, a.id
            )));
        }
        let kind = if Some(a.content.as_str()) == unk_token {
            PieceKind::Unknown
        } else if a.special {
            PieceKind::Control
        } else {
            PieceKind::UserDefined
        };
        match pieces.get_mut(id as usize) {
            Some(p) => p.kind = kind,
            None => pieces.push(RawPiece {
                text: a.content.clone(),
                score: 0.0,
                kind,
            }),
        }
        symbols.push(a.content.clone());
    }
    let kinds_of_added: Vec<bool> = added.iter().map(|a| a.normalized).collect();
    let has_normalizer = normalizer.prepend || normalizer.replace || normalizer.sp_cleanup;
    if has_normalizer && kinds_of_added.iter().any(|&n| n) {
        return Err(unsupported(
            "added tokens with normalized: true together with a normalizer (they are matched \
             in the normalized text against their normalized form); set normalized: false",
        ));
    }
    if kinds_of_added.contains(&true) && kinds_of_added.contains(&false) {
        return Err(unsupported(
            "added tokens with both normalized: true and normalized: false (two matching passes)",
        ));
    }

    let mut settings = Settings {
        byte_fallback,
        add_dummy_prefix: false,
        remove_extra_whitespaces: false,
        escape_whitespaces: false,
        ..Settings::default()
    };
    match (&pre, normalizer.sp_cleanup) {
        (PreTokenizer::Metaspace(..), true) => {
            return Err(unsupported(
                "the whitespace-cleanup normalizer together with a Metaspace pre-tokenizer",
            ))
        }
        (PreTokenizer::Split(_), false) => {
            return Err(unsupported(
                "pre_tokenizer Split without sentencepiece's whitespace-cleanup normalizer",
            ))
        }
        _ => {}
    }
    if normalizer.sp_cleanup {
        if !symbols.is_empty() {
            return Err(unsupported(
                "added tokens together with the whitespace-cleanup normalizer (it would clean \
                 each stretch between them on its own)",
            ));
        }
        settings.add_dummy_prefix = true;
        settings.remove_extra_whitespaces = true;
        settings.escape_whitespaces = true;
        if let PreTokenizer::Split(alts) = &pre {
            if !ignore_merges {
                return Err(unsupported(
                    "pre_tokenizer Split without ignore_merges (each split-off symbol would be \
                     merged from its characters)",
                ));
            }
            for (i, a) in alts.iter().enumerate() {
                let Some(id) = index_of(a) else {
                    return Err(unsupported(format!(
                        "pre_tokenizer Split on {a:?}, which is not in model.vocab"
                    )));
                };
                if let Some(later) = alts[i + 1..].iter().find(|b| b.starts_with(a.as_str())) {
                    return Err(unsupported(format!(
                        "pre_tokenizer Split lists {a:?} before the longer {later:?} (the \
                         regular expression would take the shorter one)"
                    )));
                }
                pieces[id as usize].kind = PieceKind::UserDefined;
                symbols.push(a.clone());
            }
        }
    } else {
        settings.escape_whitespaces =
            normalizer.replace || matches!(pre, PreTokenizer::Metaspace(..));
        settings.segment_prefix = match (normalizer.prepend, &pre) {
            (true, _) => SegmentPrefix::Always,
            (false, PreTokenizer::Metaspace("always", _)) => SegmentPrefix::UnlessSpace,
            (false, PreTokenizer::Metaspace("first", _)) => SegmentPrefix::FirstUnlessSpace,
            _ => SegmentPrefix::None,
        };
    }
    let rewrites = settings.escape_whitespaces || settings.segment_prefix != SegmentPrefix::None;
    for s in &symbols {
        if s.is_empty() || (rewrites && (s.contains(' ') || s.contains(SPACE_SYMBOL))) {
            return Err(unsupported(format!(
                "user-defined symbol {s:?}: a symbol with a space or \u{2581} is matched before \
                 spaces are escaped"
            )));
        }
    }

    // Merges: by (result id, left length) with their ranks. A merge whose part contains a
    // character outside the vocabulary can never apply (that character is a byte or unknown
    // token), so it is left out.
    let merges = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| err("model.merges is not an array"))?;
    if merges.len() >= 1 << 24 {
        return Err(unsupported(format!(
            "{} merges (ranks from 2^24 on are not exact as f32 scores)",
            merges.len()
        )));
    }
    let in_vocab_chars = |s: &str| {
        s.chars()
            .all(|c| index_of(c.encode_utf8(&mut [0; 4])).is_some())
    };
    let mut splits: Vec<[u32; 3]> = Vec::with_capacity(merges.len());
    // The crate's legacy string form skips `#version` lines before counting ranks.
    let legacy_header = |m: &&Value| m.as_str().is_some_and(|s| s.starts_with("#version"));
    for (rank, m) in merges.iter().filter(|m| !legacy_header(m)).enumerate() {
        let (a, b) = merge_pair(m).ok_or_else(|| err(format!("merge {rank} is malformed: {m}")))?;
        for part in [&a, &b] {
            let Some(id) = index_of(part) else {
                return Err(err(format!(
                    "merge {rank} uses {part:?}, not in model.vocab"
                )));
            };
            let kind = pieces[id as usize].kind;
            if kind == PieceKind::Byte || kind == PieceKind::Unknown {
                return Err(unsupported(format!(
                    "merge {rank} ({a:?} {b:?}) of a byte-fallback or unknown token"
                )));
            }
        }
        let whole = format!("{a}{b}");
        let Some(id) = index_of(&whole) else {
            return Err(err(format!(
                "merge {rank} makes {whole:?}, not in model.vocab"
            )));
        };
        if !in_vocab_chars(&whole) {
            continue;
        }
        splits.push([id, a.len() as u32, rank as u32]);
    }
    splits.sort_unstable();
    for w in splits.windows(2) {
        if w[0][..2] == w[1][..2] {
            return Err(unsupported(format!(
                "merges {} and {} are the same pair",
                w[0][2], w[1][2]
            )));
        }
    }
    let split_at_space = matches!(pre, PreTokenizer::Metaspace(_, true));
    if split_at_space && !byte_fallback && index_of(SPACE_SYMBOL).is_none() {
        return Err(unsupported(
            "pre_tokenizer Metaspace with split: true and no \"\u{2581}\" piece without \
             byte_fallback (unknown `\u{2581}`s would fuse across words)",
        ));
    }
    settings.hf = Some(HfBpe {
        splits,
        ignore_merges,
        fuse_unk,
        has_unk: unk_token.is_some(),
        split_at_space,
    });
    let symbols: std::collections::HashSet<&str> = symbols.iter().map(String::as_str).collect();
    let user_defined: Vec<bool> = pieces
        .iter()
        .map(|p| symbols.contains(p.text.as_str()))
        .collect();
    Tokenizer::from_raw(pieces, settings, None, Some(user_defined))
}

/// Writes `tok` (a SentencePiece model) as a Hugging Face `tokenizer.json` that the `tokenizers`
/// crate encodes like the model:
/// - the normalizer is sentencepiece's whitespace handling (see [`load`]), the user-defined
///   symbols are split off by a `Split` pre-tokenizer and taken whole through `ignore_merges`;
/// - the merges are every split of every mergeable piece into two pieces, ordered by the piece's
///   score (best first; ties by id, then by the left part's length), as Hugging Face's own
///   converter orders them;
/// - control pieces stay plain vocabulary entries rather than added tokens, since the crate would
///   match added tokens inside the text and sentencepiece never matches control pieces; they are
///   named as special tokens of a `TemplateProcessing` post-processor that adds nothing, which
///   [`load`] reads back as their kind.
///
/// Where the crate still differs from sentencepiece (the format has no way to say otherwise): a
/// stretch between user-defined symbols that is itself a vocabulary entry is taken whole
/// (`ignore_merges`, needed to take the symbols whole), and, in principle, two different splits
/// of one piece ready at once merge in rank order where sentencepiece takes the leftmost.
///
/// Refused: models whose behaviour this form cannot carry (normalization flags other than
/// sentencepiece's defaults, `Unused` pieces, user-defined symbols with spaces or `▁`).
pub fn to_hf_json(tok: &Tokenizer) -> Result<String, TokenizerError> {
    let t = tok.tables();
    if t.hf.is_some() {
        return Err(unsupported(
            "exporting a tokenizer that was itself loaded from a tokenizer.json",
        ));
    }
    if !(t.add_dummy_prefix && t.remove_extra_whitespaces && t.escape_whitespaces) {
        return Err(TokenizerError::Unsupported(format!(
            "exporting a model with add_dummy_prefix {}, remove_extra_whitespaces {}, \
             escape_whitespaces {} (only the defaults, all true, have a tokenizer.json form)",
            t.add_dummy_prefix, t.remove_extra_whitespaces, t.escape_whitespaces
        )));
    }
    let n = tok.vocab_size() as u32;
    let mut vocab = Map::new();
    let mut specials = Map::new();
    let mut unk = None;
    let mut symbols = Vec::new();
    for id in 0..n {
        let p = tok.piece(id).unwrap_or_default();
        match tok.kind(id) {
            Some(PieceKind::Unused) => {
                return Err(TokenizerError::Unsupported(format!(
                    "exporting a model with Unused pieces ({p:?}): their resegmentation has no \
                     tokenizer.json form"
                )))
            }
            Some(PieceKind::Unknown) => unk = Some(p.to_string()),
            Some(PieceKind::Control) => {
                specials.insert(p.to_string(), json!({"id": p, "ids": [id], "tokens": [p]}));
            }
            Some(PieceKind::UserDefined) => {
                if p.contains(' ') || p.contains(SPACE_SYMBOL) {
                    return Err(TokenizerError::Unsupported(format!(
                        "exporting a user-defined symbol with a space or \u{2581} ({p:?})"
                    )));
                }
                symbols.push(p.to_string());
            }
            _ => {}
        }
        vocab.insert(p.to_string(), Value::from(id));
    }
    // Longest first, so the alternation takes the longest symbol, as sentencepiece does.
    symbols.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    let escape = |s: &str| {
        s.chars()
            .map(|c| {
                if "\\.^$|?*+()[]{}".contains(c) {
                    format!("\\{c}")
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
    };
    let pre_tokenizer = if symbols.is_empty() {
        Value::Null
    } else {
        let alternation: Vec<String> = symbols.iter().map(|s| escape(s)).collect();
        json!({"type": "Split", "pattern": {"Regex": alternation.join("|")},
               "behavior": "Isolated", "invert": false})
    };

    for id in 0..n {
        let p = tok.piece(id).unwrap_or_default();
        if tok.kind(id) == Some(PieceKind::Normal) {
            if let Some(c) = p
                .chars()
                .find(|c| tok.lookup(c.encode_utf8(&mut [0; 4]).as_bytes()).is_none())
            {
                return Err(TokenizerError::Unsupported(format!(
                    "exporting piece {p:?}: its character {c:?} is not a piece, so Hugging Face's \
                     BPE could never build it"
                )));
            }
        }
    }
    let mut merged: Vec<u32> = (0..n)
        .filter(|&id| tok.kind(id) == Some(PieceKind::Normal))
        .filter(|&id| tok.piece(id).is_some_and(|p| p.chars().nth(1).is_some()))
        .collect();
    merged.sort_by(|&a, &b| {
        let (sa, sb) = (tok.score(a).unwrap_or(0.0), tok.score(b).unwrap_or(0.0));
        sb.total_cmp(&sa).then(a.cmp(&b))
    });
    let mut merges = Vec::new();
    for id in merged {
        let p = tok.piece(id).unwrap_or_default();
        for (i, _) in p.char_indices().skip(1) {
            let (l, r) = p.split_at(i);
            // What sentencepiece can have as a symbol: a character, or a merged normal piece.
            let mergeable = |s: &str| {
                tok.lookup(s.as_bytes())
                    .and_then(|id| tok.kind(id))
                    .is_some_and(|k| k == PieceKind::Normal || s.chars().nth(1).is_none())
            };
            if mergeable(l) && mergeable(r) {
                merges.push(json!([l, r]));
            }
        }
    }
    let normalizer = json!({"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"Regex": LEADING_SPACES}, "content": ""},
        {"type": "Replace", "pattern": {"Regex": SPACE_RUNS}, "content": " "},
        {"type": "Replace", "pattern": {"Regex": TRAILING_SPACES}, "content": ""},
        {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_SYMBOL},
        {"type": "Prepend", "prepend": SPACE_SYMBOL}
    ]});
    let out = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": specials
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE_SYMBOL}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": t.byte_fallback,
            "ignore_merges": true,
            "vocab": vocab,
            "merges": merges
        }
    });
    serde_json::to_string_pretty(&out).map_err(|e| err(e.to_string()))
}
