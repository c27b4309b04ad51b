//! SentencePiece BPE tokenizer (spec section 4).
//!
//! A from-scratch reimplementation of what the `sentencepiece` library does for Needle's models
//! (BPE, identity normalization, byte fallback, user-defined symbols), checked id for id against
//! the reference's golden vectors. A Hugging Face `tokenizer.json` (BPE) is read into the same
//! tables plus its merge ranks ([`HfBpe`], [`SegmentPrefix`]) and encodes exactly as the
//! `tokenizers` crate does, or is refused (the `hf` module); `to_hf_json` writes a SentencePiece
//! model in that form.
//!
//! The compiler later emits this same algorithm as machine code over read-only tables, so
//! everything here is deliberately plain: the model is flattened into [`TokenizerTables`] (arrays
//! only, no maps), and encoding needs only scratch buffers whose size is a small multiple of the
//! input length. See [`TokenizerTables`] for the layout and the exact encoding procedure.

mod hf;
mod proto;

use std::path::{Path, PathBuf};

use proto::{Reader, Value};

/// `▁` (U+2581), SentencePiece's visible stand-in for a space.
pub const SPACE_SYMBOL: &str = "\u{2581}";
const SPACE_SYMBOL_BYTES: &[u8] = SPACE_SYMBOL.as_bytes();

/// Sentinel for "no id" in [`TokenizerTables::byte_ids`].
pub const NO_ID: u32 = u32::MAX;

/// SentencePiece's default surface for `<unk>` when decoding (` ⁇ `).
const DEFAULT_UNK_SURFACE: &str = " \u{2047} ";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    // The I/O error is part of the message, not a `source()`: a chain printer would repeat it.
    #[error("cannot read tokenizer file {}: {cause}", .path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("tokenizer model truncated at byte {offset}: {what}")]
    Truncated { offset: usize, what: &'static str },
    #[error("tokenizer model malformed at byte {offset}: {what}")]
    Malformed { offset: usize, what: String },
    #[error("unsupported tokenizer model: {0}")]
    Unsupported(String),
    #[error("invalid tokenizer model: {0}")]
    Invalid(String),
    #[error("invalid tokenizer.json: {0}")]
    HfJson(String),
    #[error(
        "tokenizer.json uses {0}, which needlec cannot reproduce exactly (use the SentencePiece \
         .model, or a tokenizer.json written by `needlec tokenizer export`)"
    )]
    HfUnsupported(String),
}

/// SentencePiece's piece types, with the protobuf enum's numbering (stored as `u8` in the tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PieceKind {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

impl PieceKind {
    fn from_proto(v: u64) -> Option<PieceKind> {
        Some(match v {
            1 => PieceKind::Normal,
            2 => PieceKind::Unknown,
            3 => PieceKind::Control,
            4 => PieceKind::UserDefined,
            5 => PieceKind::Unused,
            6 => PieceKind::Byte,
            _ => return None,
        })
    }

    /// Pieces that BPE merges may produce (sentencepiece's `pieces_` map; the others live in its
    /// `reserved_id_map_` and can only be matched as whole symbols).
    pub fn mergeable(self) -> bool {
        matches!(
            self,
            PieceKind::Normal | PieceKind::UserDefined | PieceKind::Unused
        )
    }
}

/// The whole tokenizer as flat arrays, ready to be written into read-only data.
///
/// Layout (n = vocabulary size, ids are `0..n`):
/// - `pieces[piece_offsets[i] .. piece_offsets[i+1]]` is the UTF-8 text of piece `i`
///   (`piece_offsets` has n+1 entries, non-decreasing, last = `pieces.len()`).
/// - `scores[i]` (f32) and `kinds[i]` ([`PieceKind`] as u8).
/// - `sorted`: the ids that can be found by text, sorted by their bytes (plain lexicographic
///   byte order), for binary search. For a SentencePiece model that is every piece; for a
///   tokenizer.json it leaves out multi-character pieces that no merge produces.
/// - `user_defined`: ids of user-defined symbols, longest first; the longest one that is a
///   prefix of the remaining text is taken as one frozen symbol.
/// - `byte_ids[b]`: id of the piece `<0xBB>`, or [`NO_ID`].
///
/// Encoding a text:
/// 1. Normalize (identity, plus the whitespace rules below, controlled by the flags): at each
///    position take a user-defined symbol if one matches, else one UTF-8 character. Leading
///    spaces are dropped; `▁` is prepended (`add_dummy_prefix`); each space becomes `▁`
///    (`escape_whitespaces`), runs of spaces keep only their first (`remove_extra_whitespaces`);
///    finally trailing `▁`s are removed, including ones that were literally in the input.
/// 2. Split the normalized text into symbols: user-defined matches (frozen, never merged) or
///    single characters.
/// 3. Merge: repeatedly take, among adjacent unfrozen symbol pairs whose concatenation is a
///    mergeable piece, the one with the highest score (ties: leftmost) and merge it. The
///    reference keeps a priority queue of candidate pairs with lazy deletion (a pair is stale
///    when either side is now empty or their lengths no longer add up); so does this code.
/// 4. Emit each symbol's id. A symbol not in the vocabulary (or the unknown piece itself) becomes
///    its UTF-8 bytes' `byte_ids` when `byte_fallback`, else `unk_id`. An `Unused` piece is
///    split back into the two halves it was last merged from (sentencepiece's resegmentation).
#[derive(Debug, Clone)]
pub struct TokenizerTables {
    pub pieces: String,
    pub piece_offsets: Vec<u32>,
    pub scores: Vec<f32>,
    pub kinds: Vec<u8>,
    pub sorted: Vec<u32>,
    pub user_defined: Vec<u32>,
    pub byte_ids: [u32; 256],
    pub unk_id: u32,
    pub byte_fallback: bool,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
    /// What `<unk>` decodes to.
    pub unk_surface: String,
    /// How each segment between user-defined symbols gets a `▁` (Hugging Face normalizers and
    /// pre-tokenizers); [`SegmentPrefix::None`] for a SentencePiece model.
    pub segment_prefix: SegmentPrefix,
    /// Hugging Face BPE by merge ranks instead of sentencepiece's piece scores (`None` for a
    /// SentencePiece model).
    pub hf: Option<HfBpe>,
}

/// Where a Hugging Face tokenizer.json puts a `▁` in front of a segment: a segment is a stretch of
/// text between user-defined symbols (added tokens), or the whole text when there are none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentPrefix {
    /// Never (or only the SentencePiece dummy prefix, see `add_dummy_prefix`).
    None,
    /// Before every segment (a `Prepend("▁")` normalizer).
    Always,
    /// Before every segment that does not start with a space or `▁` (Metaspace, `always`).
    UnlessSpace,
    /// Only before the first segment, if the text does not start with a user-defined symbol, and
    /// if the segment does not start with a space or `▁` (Metaspace, `first`).
    FirstUnlessSpace,
}

/// The Hugging Face BPE model's merge rules, as the `tokenizers` crate applies them.
///
/// Symbols start as single characters (or the user-defined symbols, frozen), exactly as for
/// sentencepiece; what changes is which neighbours merge and in what order. A pair of symbols
/// `(a, b)` merges when `model.merges` lists it; the pair with the lowest rank goes first (ties:
/// leftmost). Since every symbol's id is the id of its text (single characters and merge
/// results are vocabulary entries), a merge is found by text: the concatenation's id plus the
/// left part's byte length. The merge loop is then the sentencepiece one with `score = -rank`
/// (exact in f32 for ranks below 2^24).
#[derive(Debug, Clone)]
pub struct HfBpe {
    /// `[result id, left part's byte length, rank]` per merge, sorted by (id, length).
    pub splits: Vec<[u32; 3]>,
    /// A segment (pre-tokenized word) that is itself a vocabulary entry becomes that id, unmerged.
    pub ignore_merges: bool,
    /// Consecutive unknown characters give one unknown id (only without byte fallback).
    pub fuse_unk: bool,
    /// Whether `unk_id` is a real token; without one, unknown characters give no id at all.
    pub has_unk: bool,
    /// Metaspace's `split: true`: every `▁` starts a new word, so no merge (and no whole-word
    /// lookup) reaches across one; a pair whose right symbol starts with `▁` never merges.
    pub split_at_space: bool,
}

/// Whether a symbol's bytes start a Metaspace word.
fn starts_word(bytes: &[u8]) -> bool {
    bytes.starts_with(SPACE_SYMBOL_BYTES)
}

impl HfBpe {
    /// The rank of the merge that makes piece `id` from a left part of `left_len` bytes.
    pub fn rank(&self, id: u32, left_len: u32) -> Option<u32> {
        let i = self
            .splits
            .binary_search_by(|s| (s[0], s[1]).cmp(&(id, left_len)))
            .ok()?;
        self.splits.get(i).map(|s| s[2])
    }
}

#[derive(Debug, Clone)]
pub struct Tokenizer {
    t: TokenizerTables,
}

/// One piece as read from a model file, before flattening.
struct RawPiece {
    text: String,
    score: f32,
    kind: PieceKind,
}

/// Settings read from a model file that change behaviour.
struct Settings {
    byte_fallback: bool,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    unk_surface: String,
    segment_prefix: SegmentPrefix,
    hf: Option<HfBpe>,
}

impl Default for Settings {
    fn default() -> Self {
        // The protobuf defaults of TrainerSpec / NormalizerSpec.
        Settings {
            byte_fallback: false,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
            unk_surface: DEFAULT_UNK_SURFACE.to_string(),
            segment_prefix: SegmentPrefix::None,
            hf: None,
        }
    }
}

fn malformed(offset: usize, what: impl Into<String>) -> TokenizerError {
    TokenizerError::Malformed {
        offset,
        what: what.into(),
    }
}

fn utf8_field(bytes: &[u8], offset: usize, what: &str) -> Result<String, TokenizerError> {
    std::str::from_utf8(bytes)
        .map(str::to_string)
        .map_err(|e| malformed(offset + e.valid_up_to(), format!("{what}: invalid UTF-8")))
}

fn parse_piece(buf: &[u8], base: usize) -> Result<RawPiece, TokenizerError> {
    let mut r = Reader::new(buf, base);
    let mut text = None;
    let mut score = 0.0f32;
    let mut kind = PieceKind::Normal;
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (1, Value::Bytes(b, at)) => text = Some(utf8_field(b, at, "piece")?),
            (2, Value::Fixed32(bits)) => score = f32::from_bits(bits),
            (3, Value::Varint(v)) => {
                kind = PieceKind::from_proto(v)
                    .ok_or_else(|| malformed(r.offset(), format!("unknown piece type {v}")))?;
            }
            (1..=3, _) => return Err(malformed(r.offset(), "piece field has wrong wire type")),
            _ => {}
        }
    }
    let text = text.ok_or_else(|| malformed(base, "piece without text"))?;
    Ok(RawPiece { text, score, kind })
}

fn parse_trainer_spec(buf: &[u8], base: usize, s: &mut Settings) -> Result<(), TokenizerError> {
    let mut r = Reader::new(buf, base);
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            // model_type: UNIGRAM = 1, BPE = 2, WORD = 3, CHAR = 4.
            (3, Value::Varint(v)) if v != 2 => {
                return Err(TokenizerError::Unsupported(format!(
                    "model_type {v} (only BPE = 2 is implemented)"
                )))
            }
            (24, Value::Varint(v)) if v != 0 => {
                return Err(TokenizerError::Unsupported(
                    "treat_whitespace_as_suffix".into(),
                ))
            }
            (35, Value::Varint(v)) => s.byte_fallback = v != 0,
            (44, Value::Bytes(b, at)) => s.unk_surface = utf8_field(b, at, "unk_surface")?,
            _ => {}
        }
    }
    Ok(())
}

fn parse_normalizer_spec(
    buf: &[u8],
    base: usize,
    s: Option<&mut Settings>,
) -> Result<(), TokenizerError> {
    let mut r = Reader::new(buf, base);
    let mut s = s;
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (2, Value::Bytes(b, _)) if !b.is_empty() => {
                // A precompiled charsmap means real normalization (NFKC etc.), not identity.
                return Err(TokenizerError::Unsupported(
                    "normalization rules (precompiled_charsmap); only identity is implemented"
                        .into(),
                ));
            }
            (3, Value::Varint(v)) => {
                if let Some(s) = s.as_deref_mut() {
                    s.add_dummy_prefix = v != 0;
                }
            }
            (4, Value::Varint(v)) => {
                if let Some(s) = s.as_deref_mut() {
                    s.remove_extra_whitespaces = v != 0;
                }
            }
            (5, Value::Varint(v)) => {
                if let Some(s) = s.as_deref_mut() {
                    s.escape_whitespaces = v != 0;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// `<0xNN>` (uppercase hex, as sentencepiece writes it) to its byte.
fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 || !hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'A'..=b'F')) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Length of the UTF-8 sequence a lead byte announces, like sentencepiece's `OneCharLen`.
fn one_char_len(lead: u8) -> usize {
    match lead >> 4 {
        0xC | 0xD => 2,
        0xE => 3,
        0xF => 4,
        _ => 1,
    }
}

/// Decodes one character the way sentencepiece's `IsValidDecodeUTF8` does: strict UTF-8
/// (no overlongs, no surrogates, at most U+10FFFF); an invalid sequence consumes exactly one
/// byte. Returns the character (None = invalid) and the bytes consumed (>= 1 for non-empty input).
fn sp_decode_utf8(b: &[u8]) -> (Option<char>, usize) {
    let trail = |i: usize| b.get(i).is_some_and(|&c| c & 0xC0 == 0x80);
    let bits = |i: usize| u32::from(b.get(i).copied().unwrap_or(0) & 0x3F);
    let Some(&b0) = b.first() else {
        return (None, 0);
    };
    let (len, cp, min) = if b0 < 0x80 {
        return (Some(char::from(b0)), 1);
    } else if b0 & 0xE0 == 0xC0 && trail(1) {
        (2, (u32::from(b0 & 0x1F) << 6) | bits(1), 0x80)
    } else if b0 & 0xF0 == 0xE0 && trail(1) && trail(2) {
        (
            3,
            (u32::from(b0 & 0x0F) << 12) | (bits(1) << 6) | bits(2),
            0x800,
        )
    } else if b0 & 0xF8 == 0xF0 && trail(1) && trail(2) && trail(3) {
        (
            4,
            (u32::from(b0 & 0x07) << 18) | (bits(1) << 12) | (bits(2) << 6) | bits(3),
            0x10000,
        )
    } else {
        return (None, 1);
    };
    match char::from_u32(cp) {
        Some(c) if cp >= min => (Some(c), len),
        _ => (None, 1),
    }
}

/// Appends the surfaces of a run of byte pieces, as sentencepiece's `ProcessBytePieces`.
fn flush_bytes(bytes: &mut Vec<u8>, out: &mut String) {
    let mut rest: &[u8] = bytes;
    while !rest.is_empty() {
        let (c, used) = sp_decode_utf8(rest);
        out.push(c.unwrap_or('\u{FFFD}'));
        rest = rest.get(used.max(1)..).unwrap_or(&[]);
    }
    bytes.clear();
}

/// A symbol of the merge loop: a byte range of the normalized text plus list links.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
    freeze: bool,
}

const NONE: usize = usize::MAX;

/// A candidate merge of `left` with its right neighbour `right`.
#[derive(Clone, Copy)]
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

/// Whether `a` is merged before `b`: higher score first, then the leftmost.
fn pair_before(a: &Pair, b: &Pair) -> bool {
    a.score > b.score || (a.score == b.score && a.left < b.left)
}

/// Binary max-heap of pairs, written out by hand so the generated code can mirror it.
struct Agenda {
    heap: Vec<Pair>,
}

impl Agenda {
    fn push(&mut self, p: Pair) {
        self.heap.push(p);
        let mut i = self.heap.len() - 1;
        while i > 0 {
            let parent = (i - 1) / 2;
            if pair_before(&self.heap[i], &self.heap[parent]) {
                self.heap.swap(i, parent);
                i = parent;
            } else {
                break;
            }
        }
    }

    fn pop(&mut self) -> Option<Pair> {
        let last = self.heap.len().checked_sub(1)?;
        self.heap.swap(0, last);
        let top = self.heap.pop();
        let n = self.heap.len();
        let mut i = 0;
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut best = i;
            if l < n && pair_before(&self.heap[l], &self.heap[best]) {
                best = l;
            }
            if r < n && pair_before(&self.heap[r], &self.heap[best]) {
                best = r;
            }
            if best == i {
                break;
            }
            self.heap.swap(i, best);
            i = best;
        }
        top
    }
}

impl Tokenizer {
    /// This tokenizer without the dummy prefix: how a text is tokenized where it continues a
    /// longer one right after a user-defined symbol (no piece crosses one, and only a text's
    /// very start gets the prefix), e.g. Needle 3's query part after the folded `</tools>`
    /// (`needle3::prompt::encode_query`).
    pub fn continuing(&self) -> Tokenizer {
        let mut t = self.t.clone();
        t.add_dummy_prefix = false;
        Tokenizer { t }
    }

    pub fn from_file(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|cause| TokenizerError::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        Self::from_model_bytes(&bytes)
    }

    /// Parses a SentencePiece `ModelProto` (the `.model` file).
    pub fn from_model_bytes(bytes: &[u8]) -> Result<Tokenizer, TokenizerError> {
        if bytes.is_empty() {
            return Err(TokenizerError::Invalid(
                "the file is empty (0 bytes); pass the SentencePiece `.model` file itself".into(),
            ));
        }
        let mut r = Reader::new(bytes, 0);
        let mut pieces = Vec::new();
        let mut settings = Settings::default();
        let mut saw_trainer_spec = false;
        while let Some((field, value)) = r.next_field()? {
            match (field, value) {
                (1, Value::Bytes(b, at)) => pieces.push(parse_piece(b, at)?),
                (2, Value::Bytes(b, at)) => {
                    saw_trainer_spec = true;
                    parse_trainer_spec(b, at, &mut settings)?;
                }
                (3, Value::Bytes(b, at)) => parse_normalizer_spec(b, at, Some(&mut settings))?,
                // denormalizer_spec: only its charsmap matters (identity is all we implement).
                (5, Value::Bytes(b, at)) => parse_normalizer_spec(b, at, None)?,
                (1..=3 | 5, _) => {
                    return Err(malformed(
                        r.offset(),
                        format!("field {field}: wrong wire type"),
                    ))
                }
                _ => {}
            }
        }
        if !saw_trainer_spec {
            // Without it the model type defaults to unigram, which we do not implement.
            return Err(TokenizerError::Unsupported(
                "no trainer_spec, so model_type is unigram (only BPE is implemented)".into(),
            ));
        }
        Self::from_raw(pieces, settings, None, None)
    }

    /// Builds a tokenizer from a Hugging Face `tokenizer.json` whose model is BPE, encoding
    /// exactly as the `tokenizers` crate does (`encode(text, add_special_tokens=false)`), or
    /// refuses it, naming the feature it cannot reproduce (see the `hf` module).
    pub fn from_hf_json(json: &str) -> Result<Tokenizer, TokenizerError> {
        hf::load(json)
    }

    /// This SentencePiece model as a Hugging Face `tokenizer.json` that the `tokenizers` crate
    /// encodes the same way (see the `hf` module for the form and what is refused).
    pub fn to_hf_json(&self) -> Result<String, TokenizerError> {
        hf::to_hf_json(self)
    }

    /// `searchable`: which pieces go into the lookup index (`None` = all); `matched`: which are
    /// matched in the text as frozen symbols (`None` = the user-defined pieces).
    fn from_raw(
        pieces: Vec<RawPiece>,
        s: Settings,
        searchable: Option<Vec<bool>>,
        matched: Option<Vec<bool>>,
    ) -> Result<Tokenizer, TokenizerError> {
        let n = pieces.len();
        if n == 0 {
            return Err(TokenizerError::Invalid("no pieces".into()));
        }
        if n >= (u32::MAX / 2) as usize {
            return Err(TokenizerError::Invalid(format!("{n} pieces is too many")));
        }
        let mut text = String::new();
        let mut piece_offsets = Vec::with_capacity(n + 1);
        let mut scores = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        let mut byte_ids = [NO_ID; 256];
        let mut unk_id = None;
        piece_offsets.push(0u32);
        for (id, p) in pieces.iter().enumerate() {
            if p.text.is_empty() {
                return Err(TokenizerError::Invalid(format!("piece {id} is empty")));
            }
            text.push_str(&p.text);
            let end = u32::try_from(text.len())
                .map_err(|_| TokenizerError::Invalid("pieces exceed 4 GiB".into()))?;
            piece_offsets.push(end);
            scores.push(p.score);
            kinds.push(p.kind as u8);
            match p.kind {
                PieceKind::Unknown if unk_id.replace(id as u32).is_some() => {
                    return Err(TokenizerError::Invalid(
                        "more than one unknown piece".into(),
                    ));
                }
                PieceKind::Byte => {
                    if !s.byte_fallback {
                        return Err(TokenizerError::Invalid(format!(
                            "byte piece {} although byte_fallback is off",
                            p.text
                        )));
                    }
                    let b = parse_byte_piece(&p.text).ok_or_else(|| {
                        TokenizerError::Invalid(format!("byte piece {id} is {:?}", p.text))
                    })?;
                    byte_ids[usize::from(b)] = id as u32;
                }
                _ => {}
            }
        }
        // A Hugging Face BPE model may have no unknown token: unknown characters then vanish.
        let unk_id = match (unk_id, &s.hf) {
            (Some(id), _) => id,
            (None, Some(hf)) if !hf.has_unk => 0,
            (None, _) => return Err(TokenizerError::Invalid("no unknown piece (<unk>)".into())),
        };

        let mut sorted: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                searchable
                    .as_ref()
                    .is_none_or(|v| v.get(i as usize) == Some(&true))
            })
            .collect();
        let text_of = |i: u32| {
            let a = piece_offsets[i as usize] as usize;
            let b = piece_offsets[i as usize + 1] as usize;
            &text.as_bytes()[a..b]
        };
        sorted.sort_by(|&a, &b| text_of(a).cmp(text_of(b)).then(a.cmp(&b)));
        for w in sorted.windows(2) {
            if text_of(w[0]) == text_of(w[1]) {
                return Err(TokenizerError::Invalid(format!(
                    "piece {:?} is defined twice (ids {} and {})",
                    String::from_utf8_lossy(text_of(w[0])),
                    w[0],
                    w[1]
                )));
            }
        }
        let mut user_defined: Vec<u32> = (0..n as u32)
            .filter(|&i| match &matched {
                Some(m) => m.get(i as usize) == Some(&true),
                None => kinds[i as usize] == PieceKind::UserDefined as u8,
            })
            .collect();
        user_defined.sort_by(|&a, &b| text_of(b).len().cmp(&text_of(a).len()).then(a.cmp(&b)));

        Ok(Tokenizer {
            t: TokenizerTables {
                pieces: text,
                piece_offsets,
                scores,
                kinds,
                sorted,
                user_defined,
                byte_ids,
                unk_id,
                byte_fallback: s.byte_fallback,
                add_dummy_prefix: s.add_dummy_prefix,
                remove_extra_whitespaces: s.remove_extra_whitespaces,
                escape_whitespaces: s.escape_whitespaces,
                unk_surface: s.unk_surface,
                segment_prefix: s.segment_prefix,
                hf: s.hf,
            },
        })
    }

    /// The flat tables the compiler serializes (see [`TokenizerTables`]).
    pub fn tables(&self) -> &TokenizerTables {
        &self.t
    }

    pub fn vocab_size(&self) -> usize {
        self.t.scores.len()
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        let i = usize::try_from(id).ok()?;
        let a = *self.t.piece_offsets.get(i)? as usize;
        let b = *self.t.piece_offsets.get(i.checked_add(1)?)? as usize;
        self.t.pieces.get(a..b)
    }

    pub fn kind(&self, id: u32) -> Option<PieceKind> {
        let k = *self.t.kinds.get(usize::try_from(id).ok()?)?;
        PieceKind::from_proto(u64::from(k))
    }

    pub fn score(&self, id: u32) -> Option<f32> {
        self.t.scores.get(usize::try_from(id).ok()?).copied()
    }

    /// Id of the piece whose text is exactly `bytes`, among the searchable ones.
    pub fn lookup(&self, bytes: &[u8]) -> Option<u32> {
        let t = &self.t;
        let text = t.pieces.as_bytes();
        let i = t
            .sorted
            .binary_search_by(|&id| {
                let i = id as usize;
                let piece = match (t.piece_offsets.get(i), t.piece_offsets.get(i + 1)) {
                    (Some(&a), Some(&b)) => text.get(a as usize..b as usize).unwrap_or(&[]),
                    _ => &[],
                };
                piece.cmp(bytes)
            })
            .ok()?;
        self.t.sorted.get(i).copied()
    }

    /// Length of the longest user-defined symbol that `rest` starts with.
    fn match_user_defined(&self, rest: &[u8]) -> Option<usize> {
        // `user_defined` is sorted longest first, so the first hit is the longest.
        self.t.user_defined.iter().find_map(|&id| {
            let p = self.piece(id)?.as_bytes();
            rest.starts_with(p).then_some(p.len())
        })
    }

    /// Length of the next normalization / segmentation unit of `rest` (non-empty) and whether
    /// it is a user-defined symbol.
    fn next_unit(&self, rest: &[u8]) -> (usize, bool) {
        match self.match_user_defined(rest) {
            Some(len) => (len, true),
            None => (one_char_len(rest[0]).min(rest.len()), false),
        }
    }

    /// Sentencepiece's `Normalizer::Normalize` with an identity charsmap.
    pub fn normalize(&self, text: &str) -> String {
        let t = &self.t;
        let mut input = text.as_bytes();
        if t.remove_extra_whitespaces {
            while input.first() == Some(&b' ') {
                let (len, _) = self.next_unit(input);
                if len != 1 {
                    // A user-defined symbol starting with a space is kept.
                    break;
                }
                input = &input[1..];
            }
        }
        let mut out: Vec<u8> = Vec::with_capacity(input.len() * 3 + 3);
        if input.is_empty() {
            return String::new();
        }
        let space: &[u8] = if t.escape_whitespaces {
            SPACE_SYMBOL_BYTES
        } else {
            b" "
        };
        if t.add_dummy_prefix {
            out.extend_from_slice(space);
        }
        let mut is_prev_space = t.remove_extra_whitespaces;
        // Segment prefixes (Hugging Face): whether the next plain unit starts a segment, and
        // whether a user-defined symbol came before it.
        let mut seg_start = true;
        let mut after_symbol = false;
        while !input.is_empty() {
            let (len, frozen) = self.next_unit(input);
            let (unit, rest) = input.split_at(len);
            if frozen {
                seg_start = true;
                after_symbol = true;
            } else if seg_start {
                seg_start = false;
                let spacey = unit == b" " || unit == SPACE_SYMBOL_BYTES;
                let prefix = match t.segment_prefix {
                    SegmentPrefix::None => false,
                    SegmentPrefix::Always => true,
                    SegmentPrefix::UnlessSpace => !spacey,
                    SegmentPrefix::FirstUnlessSpace => !spacey && !after_symbol,
                };
                if prefix {
                    out.extend_from_slice(SPACE_SYMBOL_BYTES);
                }
            }
            let mut sp = unit;
            if is_prev_space {
                while let [b' ', tail @ ..] = sp {
                    sp = tail;
                }
            }
            if let Some(&last) = sp.last() {
                for &b in sp {
                    if b == b' ' {
                        out.extend_from_slice(space);
                    } else {
                        out.push(b);
                    }
                }
                is_prev_space = last == b' ';
            }
            input = rest;
            if !t.remove_extra_whitespaces {
                is_prev_space = false;
            }
        }
        if t.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        // Only whole UTF-8 units were copied and only ASCII spaces replaced, so this never fails.
        String::from_utf8(out).unwrap_or_default()
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        let norm = self.normalize(text);
        self.encode_normalized(norm.as_bytes())
    }

    /// The ids of an already normalized text (what [`Tokenizer::normalize`] returns): the
    /// segmentation and merges of [`Tokenizer::encode`] without its normalization.
    pub fn encode_normalized_text(&self, normalized: &str) -> Vec<u32> {
        self.encode_normalized(normalized.as_bytes())
    }

    /// [`Tokenizer::encode`], but only when the text takes at most `max` tokens: otherwise
    /// `Err(n)` with `n > max` tokens it takes at least, found without tokenizing an overlong
    /// text. Every token covers at most [`Tokenizer::max_piece_bytes`] bytes of the normalized
    /// text, so a normalized text longer than `max` times that cannot fit; only a text short
    /// enough to fit is tokenized, which bounds the work by `max` whatever the text's length.
    pub fn encode_at_most(&self, text: &str, max: usize) -> Result<Vec<u32>, usize> {
        let norm = self.normalize(text);
        let widest = self.max_piece_bytes();
        if norm.len() > max.saturating_mul(widest) {
            return Err(norm.len().div_ceil(widest));
        }
        let ids = self.encode_normalized(norm.as_bytes());
        if ids.len() > max {
            return Err(ids.len());
        }
        Ok(ids)
    }

    /// The most normalized-text bytes one token covers: the longest piece, and at least 4 (an
    /// unknown character, up to 4 bytes of UTF-8, becomes one token).
    pub fn max_piece_bytes(&self) -> usize {
        self.t
            .piece_offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
            .max(4)
    }

    /// Like [`Tokenizer::encode`] but returning the pieces' texts (byte pieces as `<0xNN>`).
    pub fn encode_pieces(&self, text: &str) -> Vec<String> {
        self.encode(text)
            .iter()
            .map(|&id| self.piece(id).unwrap_or("").to_string())
            .collect()
    }

    fn encode_normalized(&self, norm: &[u8]) -> Vec<u32> {
        let mut syms: Vec<Symbol> = Vec::with_capacity(norm.len());
        let mut pos = 0;
        while pos < norm.len() {
            let (len, freeze) = self.next_unit(&norm[pos..]);
            let i = syms.len();
            syms.push(Symbol {
                start: pos,
                len,
                prev: if i == 0 { NONE } else { i - 1 },
                next: if pos + len < norm.len() { i + 1 } else { NONE },
                freeze,
            });
            pos += len;
        }
        if self.t.hf.as_ref().is_some_and(|h| h.ignore_merges) {
            self.take_whole_words(norm, &mut syms);
        }

        // (piece id, left range, right range) for every Unused piece a candidate pair formed;
        // the last entry for an id wins, like the reference's `rev_merge[piece] = ...`.
        let mut rev_merge: Vec<(u32, usize, usize, usize, usize)> = Vec::new();
        let mut agenda = Agenda {
            heap: Vec::with_capacity(syms.len() * 3),
        };
        let add_pair = |syms: &[Symbol],
                        agenda: &mut Agenda,
                        rev_merge: &mut Vec<(u32, usize, usize, usize, usize)>,
                        left: usize,
                        right: usize| {
            if left == NONE || right == NONE {
                return;
            }
            let (l, r) = (syms[left], syms[right]);
            if l.freeze || r.freeze {
                return;
            }
            let Some(id) = self.lookup(&norm[l.start..r.start + r.len]) else {
                return;
            };
            if let Some(hf) = &self.t.hf {
                if hf.split_at_space && starts_word(&norm[r.start..]) {
                    return;
                }
                // Only a listed merge, by its rank (the lowest first).
                if let Some(rank) = hf.rank(id, l.len as u32) {
                    agenda.push(Pair {
                        score: -(rank as f32),
                        left,
                        right,
                        size: l.len + r.len,
                    });
                }
                return;
            }
            let Some(kind) = self.kind(id) else { return };
            if !kind.mergeable() {
                return;
            }
            agenda.push(Pair {
                score: self.score(id).unwrap_or(0.0),
                left,
                right,
                size: l.len + r.len,
            });
            if kind == PieceKind::Unused {
                rev_merge.push((id, l.start, l.len, r.start, r.len));
            }
        };
        for i in 1..syms.len() {
            add_pair(&syms, &mut agenda, &mut rev_merge, i - 1, i);
        }
        while let Some(top) = agenda.pop() {
            let (l, r) = (syms[top.left], syms[top.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != top.size {
                continue;
            }
            syms[top.left].len = l.len + r.len;
            syms[top.left].next = r.next;
            if r.next != NONE {
                syms[r.next].prev = top.left;
            }
            syms[top.right].len = 0;
            add_pair(&syms, &mut agenda, &mut rev_merge, l.prev, top.left);
            add_pair(&syms, &mut agenda, &mut rev_merge, top.left, r.next);
        }

        if let Some(hf) = &self.t.hf {
            return self.hf_ids(hf, norm, &syms);
        }
        let mut ids = Vec::with_capacity(syms.len());
        let mut stack: Vec<(usize, usize)> = Vec::new();
        let mut idx = if syms.is_empty() { NONE } else { 0 };
        while idx != NONE {
            let s = syms[idx];
            stack.push((s.start, s.len));
            while let Some((start, len)) = stack.pop() {
                let bytes = &norm[start..start + len];
                let id = self.lookup(bytes);
                let kind = id.and_then(|id| self.kind(id));
                match (id, kind) {
                    (Some(id), Some(PieceKind::Unused)) => {
                        match rev_merge.iter().rev().find(|m| m.0 == id) {
                            Some(&(_, ls, ll, rs, rl)) => {
                                stack.push((rs, rl));
                                stack.push((ls, ll));
                            }
                            None => ids.push(id),
                        }
                    }
                    (Some(id), Some(k)) if k != PieceKind::Unknown => ids.push(id),
                    _ if self.t.byte_fallback => {
                        ids.extend(bytes.iter().map(|&b| {
                            let id = self.t.byte_ids[usize::from(b)];
                            if id == NO_ID {
                                self.t.unk_id
                            } else {
                                id
                            }
                        }));
                    }
                    _ => ids.push(self.t.unk_id),
                }
            }
            idx = s.next;
        }
        ids
    }

    /// Hugging Face's `ignore_merges`: each stretch of unfrozen symbols (a pre-tokenized word)
    /// whose whole text is a vocabulary entry becomes one frozen symbol.
    fn take_whole_words(&self, norm: &[u8], syms: &mut [Symbol]) {
        let mut i = 0;
        while i < syms.len() {
            if syms[i].freeze {
                i += 1;
                continue;
            }
            let mut j = i;
            let split = self.t.hf.as_ref().is_some_and(|h| h.split_at_space);
            while j + 1 < syms.len()
                && !syms[j + 1].freeze
                && !(split && starts_word(&norm[syms[j + 1].start..]))
            {
                j += 1;
            }
            let (start, end) = (syms[i].start, syms[j].start + syms[j].len);
            if self.lookup(&norm[start..end]).is_some() {
                syms[i].len = end - start;
                syms[i].next = syms[j].next;
                syms[i].freeze = true;
                if let Some(after) = syms.get_mut(j + 1) {
                    after.prev = i;
                }
                for s in &mut syms[i + 1..=j] {
                    s.len = 0;
                }
            }
            i = j + 1;
        }
    }

    /// The ids of the symbols left after a Hugging Face merge loop: each symbol's text is a
    /// token, except single characters outside the vocabulary, which become their bytes' pieces
    /// (`byte_fallback`), one unknown id (per run of them with `fuse_unk`), or nothing.
    fn hf_ids(&self, hf: &HfBpe, norm: &[u8], syms: &[Symbol]) -> Vec<u32> {
        let mut ids = Vec::with_capacity(syms.len());
        let mut prev_unknown = false;
        let mut idx = if syms.is_empty() { NONE } else { 0 };
        while idx != NONE {
            let s = syms[idx];
            let bytes = &norm[s.start..s.start + s.len];
            match self.lookup(bytes) {
                Some(id) => {
                    ids.push(id);
                    prev_unknown = false;
                }
                None if self.t.byte_fallback => {
                    ids.extend(bytes.iter().map(|&b| self.t.byte_ids[usize::from(b)]));
                }
                None => {
                    if hf.has_unk && !(hf.fuse_unk && prev_unknown) {
                        ids.push(self.t.unk_id);
                    }
                    prev_unknown = true;
                }
            }
            idx = s.next;
        }
        ids
    }

    /// Sentencepiece's `DecodeIds`: control pieces vanish, `<unk>` becomes the unknown surface,
    /// runs of byte pieces are decoded as UTF-8 (each invalid byte a U+FFFD), `▁` becomes a
    /// space, and leading spaces of the text are dropped. Ids outside the vocabulary are skipped
    /// (the reference raises an error instead).
    pub fn decode(&self, ids: &[u32]) -> String {
        let t = &self.t;
        let mut text = String::new();
        let mut bytes = Vec::new();
        let mut is_bos_ws = true;
        let mut bos_ws_seen = false;
        for &id in ids {
            let (Some(kind), Some(piece)) = (self.kind(id), self.piece(id)) else {
                continue;
            };
            if kind == PieceKind::Byte {
                bytes.push(parse_byte_piece(piece).unwrap_or(0));
                continue;
            }
            flush_bytes(&mut bytes, &mut text);
            if bos_ws_seen || !text.is_empty() {
                is_bos_ws = false;
            }
            bos_ws_seen = false;
            match kind {
                PieceKind::Control => {}
                PieceKind::Unknown => text.push_str(&t.unk_surface),
                _ => {
                    let mut p = piece;
                    if is_bos_ws && (t.add_dummy_prefix || t.remove_extra_whitespaces) {
                        if let Some(rest) = p.strip_prefix(SPACE_SYMBOL) {
                            p = rest;
                            // With extra-whitespace removal every leading `▁` goes, so a consumed
                            // one does not end the leading run.
                            bos_ws_seen = !t.remove_extra_whitespaces;
                        }
                    }
                    text.push_str(&p.replace(SPACE_SYMBOL, " "));
                }
            }
        }
        flush_bytes(&mut bytes, &mut text);
        text
    }

    /// The grammar's text of a token (spec section 5): empty for control and unknown pieces,
    /// the Latin-1 character U+00NN for `<0xNN>`, otherwise the piece with `▁` as a space.
    pub fn token_text(&self, id: u32) -> String {
        let (Some(kind), Some(piece)) = (self.kind(id), self.piece(id)) else {
            return String::new();
        };
        match kind {
            PieceKind::Control | PieceKind::Unknown => String::new(),
            PieceKind::Byte => parse_byte_piece(piece)
                .map(|b| char::from(b).to_string())
                .unwrap_or_default(),
            _ => piece.replace(SPACE_SYMBOL, " "),
        }
    }

    pub fn token_texts(&self) -> Vec<String> {
        (0..self.vocab_size() as u32)
            .map(|id| self.token_text(id))
            .collect()
    }
}
