//! The generated query tokenizer, end to end: build it for the host into a static library,
//! compile `tests/c/tokenizer_harness.c` against it, and compare its ids with the reference's
//! golden vectors and with the Rust runtime tokenizer (`Tokenizer::encode`) on the tiny-needle
//! samples, the normalized tool list, and random UTF-8 text up to the size limit.
//!
//! The harness puts text, ids and scratch right before inaccessible pages and never clears the
//! scratch, so an out-of-bounds access or a read of uninitialized scratch shows up as a crash or
//! a wrong id.

mod hf_common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use needle_runtime::tokenizer::{PieceKind, Tokenizer};
use needle_targets::{supported, Target};
use needle_test_support::{
    c, golden, random_tokenizer_text, read_json, tiny_needle, work_dir, Rng, Sample,
};
use needlec::abi::write_header;
use needlec::codegen::tokenizer::{define_tokenizer, TokenizerCode};
use needlec::codegen::KernelSet;
use needlec::emit::{check_standalone, write_archive, ArchiveMember};
use needlec::frontend::load_tokenizer;
use needlec::tools::parse_tools;
use serde::Deserialize;

const PREFIX: &str = "tk_";
/// What the driver uses for queries.
const MAX_TEXT: usize = 16384;

#[derive(Deserialize)]
struct GoldenTok {
    text: String,
    ids: Vec<u32>,
}

/// A built harness for one tokenizer model.
struct Harness {
    tok: Tokenizer,
    exe: PathBuf,
    code: TokenizerCode,
}

/// Object bytes, header text and the generated function for `target`.
fn build(target: &Target, tok: &Tokenizer, max_text: usize) -> (Vec<u8>, String, TokenizerCode) {
    let mut ks = KernelSet::new(target, PREFIX).unwrap();
    let code = define_tokenizer(&mut ks, tok, max_text, true).unwrap();
    let extra = format!(
        "#define TK_SCRATCH_BYTES {}\n#define TK_MAX_TEXT_BYTES {}\n",
        code.scratch_bytes, code.max_text_bytes
    );
    let header = write_header(
        "tk_tok",
        &["needlec tokenizer test library"],
        &extra,
        ks.functions(),
    );
    (ks.finish().unwrap(), header, code)
}

fn make_harness(model: &Path, name: &str) -> Harness {
    let tok = load_tokenizer(model).unwrap();
    let target = Target::host().expect("host target");
    let (obj, header, code) = build(&target, &tok, MAX_TEXT);
    check_standalone(&obj, PREFIX).unwrap();
    let member = ArchiveMember {
        name: format!("tok.{}", target.object_extension()),
        data: obj,
    };
    let ar = write_archive(target.archive_kind(), &[member]).unwrap();
    let rep = check_standalone(&ar, PREFIX).unwrap();
    assert_eq!(rep.exports, vec![format!("{PREFIX}tokenize")]);
    let dir = work_dir(&format!("tokenizer-{name}"));
    let exe = c::build_harness(&dir, name, &ar, &header, "tokenizer_harness.c");
    Harness { tok, exe, code }
}

fn dev4k() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| make_harness(&golden("dev4k.model"), "tokdev4k"))
}

fn tiny() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| make_harness(&tiny_needle("tokenizer.model"), "toktiny"))
}

impl Harness {
    /// Runs every `(max_ids, text)` through the generated tokenizer.
    fn run(&self, cases: &[(usize, &[u8])]) -> Vec<Vec<u32>> {
        let mut input = Vec::new();
        for (max_ids, text) in cases {
            input.extend_from_slice(format!("{max_ids} {}\n", text.len()).as_bytes());
            input.extend_from_slice(text);
        }
        let out = c::run(&self.exe, &[], &input);
        let stdout = String::from_utf8(out.stdout).expect("harness output is text");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), cases.len(), "one line per text");
        lines
            .iter()
            .map(|line| {
                let mut nums = line.split(' ').map(|s| s.parse::<u32>().expect("number"));
                let n = nums.next().expect("count") as usize;
                let ids: Vec<u32> = nums.collect();
                assert_eq!(ids.len(), n, "count matches the ids printed: {line}");
                ids
            })
            .collect()
    }

    /// Asserts the generated code gives `Tokenizer::encode`'s ids for every text (no cut).
    fn assert_same(&self, texts: &[String]) {
        // More room than any encoding needs: a byte gives at most one id, plus the prefix.
        let cases: Vec<(usize, &[u8])> =
            texts.iter().map(|t| (t.len() + 2, t.as_bytes())).collect();
        let got = self.run(&cases);
        for (text, got) in texts.iter().zip(got) {
            let want = self.tok.encode(text);
            assert_eq!(got, want, "text {text:?}");
        }
    }
}

#[test]
fn golden_strings_give_golden_ids() {
    let h = dev4k();
    let cases: Vec<GoldenTok> = read_json(&golden("tok_dev4k.json"));
    assert_eq!(cases.len(), 289);
    let inputs: Vec<(usize, &[u8])> = cases
        .iter()
        .map(|c| (c.text.len() + 2, c.text.as_bytes()))
        .collect();
    let got = h.run(&inputs);
    for (case, got) in cases.iter().zip(got) {
        assert_eq!(got, case.ids, "text {:?}", case.text);
    }
}

#[test]
fn tiny_needle_queries_and_tools_match_runtime() {
    let h = tiny();
    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    let mut texts: Vec<String> = samples.into_iter().map(|s| s.query).collect();
    let tools = std::fs::read_to_string(tiny_needle("tools.json")).unwrap();
    let tools = parse_tools(&tools).unwrap();
    texts.push(tools.normalized_json.clone());
    texts.push(format!("{} {}", texts[0], tools.normalized_json));
    // The golden strings too: they were chosen to hit the tokenizer's corners.
    let golden: Vec<GoldenTok> = read_json(&golden("tok_dev4k.json"));
    texts.extend(golden.into_iter().map(|g| g.text));
    h.assert_same(&texts);
}

/// A random text: fragments, vocabulary pieces (which make merges happen) and random characters.
fn random_text(r: &mut Rng, tok: &Tokenizer, max_len: usize) -> String {
    let pieces: Vec<&str> = (0..tok.vocab_size() as u32)
        .map(|id| tok.piece(id).unwrap_or(""))
        .collect();
    random_tokenizer_text(r, &pieces, max_len)
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn cut(mut s: String, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

/// Texts at or near the size limit: long words, long runs of spaces, 4-byte characters.
fn long_texts(r: &mut Rng, tok: &Tokenizer) -> Vec<String> {
    let mut v = vec![
        "a".repeat(MAX_TEXT),
        " ".repeat(MAX_TEXT),
        format!("{}x", " ".repeat(MAX_TEXT - 1)),
        "ab".repeat(MAX_TEXT / 2),
        "\0".repeat(MAX_TEXT),
        "🧪".repeat(MAX_TEXT / 4),
        "▁".repeat(MAX_TEXT / 3),
        "<tool_call>".repeat(MAX_TEXT / 11),
        cut("weather ".repeat(MAX_TEXT), MAX_TEXT),
        cut("a ".repeat(MAX_TEXT), MAX_TEXT),
        cut("日本語".repeat(MAX_TEXT), MAX_TEXT),
    ];
    // One huge word of vocabulary pieces (no spaces): the longest merge chains.
    let mut word = String::new();
    while word.len() < MAX_TEXT {
        let id = r.below(tok.vocab_size()) as u32;
        let p = tok.piece(id).unwrap_or("").replace('\u{2581}', "");
        word.push_str(&p);
    }
    v.push(cut(word, MAX_TEXT));
    for _ in 0..4 {
        let t = random_text(r, tok, MAX_TEXT);
        v.push(cut(t, MAX_TEXT));
    }
    v
}

fn random_differential(h: &Harness, seed: u64) {
    let mut r = Rng(seed);
    let mut texts: Vec<String> = (0..300).map(|_| random_text(&mut r, &h.tok, 120)).collect();
    texts.extend((0..40).map(|_| random_text(&mut r, &h.tok, 2000)));
    // Every user-defined symbol alone, between spaces and glued to words.
    for id in 0..h.tok.vocab_size() as u32 {
        if h.tok.kind(id) == Some(PieceKind::UserDefined) {
            let p = h.tok.piece(id).unwrap_or("").to_string();
            texts.push(p.clone());
            texts.push(format!(" {p} x{p}y  {p}"));
        }
    }
    texts.extend(long_texts(&mut r, &h.tok));
    assert!(texts.iter().all(|t| t.len() <= MAX_TEXT));
    h.assert_same(&texts);
}

#[test]
fn random_text_matches_runtime_dev4k() {
    random_differential(dev4k(), 0x9E37_79B9_7F4A_7C15);
}

#[test]
fn random_text_matches_runtime_tiny_needle() {
    random_differential(tiny(), 0xD1B5_4A32_D192_ED03);
}

#[test]
fn max_ids_cuts_to_a_prefix() {
    let h = dev4k();
    let texts = [
        "What's the weather in San Francisco?",
        "  <tool_call>日本語 🧪 a  b\u{1}",
        "",
    ];
    let mut cases: Vec<(usize, &[u8])> = Vec::new();
    for t in texts {
        let n = h.tok.encode(t).len();
        for max in 0..=n + 2 {
            cases.push((max, t.as_bytes()));
        }
    }
    let long = "ab".repeat(MAX_TEXT / 2);
    for max in [0, 1, 7, 1022, 100_000] {
        cases.push((max, long.as_bytes()));
    }
    let got = h.run(&cases);
    for ((max, text), got) in cases.iter().zip(got) {
        let text = std::str::from_utf8(text).unwrap();
        let full = h.tok.encode(text);
        let want = &full[..full.len().min(*max)];
        assert_eq!(got, want, "max_ids {max}, text {text:?}");
    }
}

#[test]
fn every_supported_target_generates_a_standalone_tokenizer() {
    let tok = load_tokenizer(&golden("dev4k.model")).unwrap();
    for s in supported() {
        let target = Target::from_triple(s.triple).unwrap();
        let (obj, _, _) = build(&target, &tok, MAX_TEXT);
        let rep = check_standalone(&obj, PREFIX).unwrap_or_else(|e| panic!("{target}: {e}"));
        assert_eq!(rep.exports, vec![format!("{PREFIX}tokenize")], "{target}");
    }
}

#[test]
fn scratch_is_linear_in_the_text_limit() {
    let h = dev4k();
    assert_eq!(h.code.max_text_bytes, MAX_TEXT);
    assert_eq!(h.code.scratch_bytes % 16, 0);
    // About 52 bytes per input byte plus small tables (see the generator's docs).
    assert!(
        h.code.scratch_bytes <= 56 * MAX_TEXT + 4096,
        "{}",
        h.code.scratch_bytes
    );
    let target = Target::host().unwrap();
    let mut ks = KernelSet::new(&target, PREFIX).unwrap();
    assert!(define_tokenizer(&mut ks, &h.tok, usize::MAX / 2, true).is_err());
}

// ---- synthetic models: the paths the bundled models do not take ------------------------------

/// Protobuf writer for a SentencePiece `ModelProto` (only the fields the runtime reads).
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn field_varint(out: &mut Vec<u8>, field: u64, v: u64) {
    varint(out, field << 3);
    varint(out, v);
}

/// Settings of a synthetic model derived from dev4k.
struct Variant {
    name: &'static str,
    /// Every how many-th multi-character normal piece becomes `Unused`.
    unused_every: usize,
    /// Scores rounded to multiples of this (many ties: the leftmost pair must win).
    score_step: f32,
    byte_fallback: bool,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

fn synthetic_model(v: &Variant) -> Vec<u8> {
    let base = load_tokenizer(&golden("dev4k.model")).unwrap();
    let mut pieces: Vec<(String, f32, u64)> = Vec::new();
    let mut multi = 0;
    for id in 0..base.vocab_size() as u32 {
        let text = base.piece(id).unwrap().to_string();
        let kind = base.kind(id).unwrap();
        if kind == PieceKind::Byte && !v.byte_fallback {
            continue;
        }
        let mut k = kind as u64;
        if kind == PieceKind::Normal && text.chars().count() > 1 {
            multi += 1;
            if multi % v.unused_every == 0 {
                k = PieceKind::Unused as u64;
            }
        }
        let score = (base.score(id).unwrap() / v.score_step).round() * v.score_step;
        pieces.push((text, score, k));
    }
    // User-defined symbols with spaces and `▁` in them, and one that is a prefix of another.
    for ud in [
        " sp ace",
        "ab c",
        "\u{2581}\u{2581}x",
        "<tool",
        "<tool_call_x>",
    ] {
        pieces.push((ud.to_string(), 0.0, PieceKind::UserDefined as u64));
    }
    let mut out = Vec::new();
    for (text, score, kind) in &pieces {
        let mut p = Vec::new();
        field_bytes(&mut p, 1, text.as_bytes());
        varint(&mut p, 2 << 3 | 5);
        p.extend_from_slice(&score.to_le_bytes());
        field_varint(&mut p, 3, *kind);
        field_bytes(&mut out, 1, &p);
    }
    let mut trainer = Vec::new();
    field_varint(&mut trainer, 3, 2); // BPE
    field_varint(&mut trainer, 35, u64::from(v.byte_fallback));
    field_bytes(&mut out, 2, &trainer);
    let mut norm = Vec::new();
    field_varint(&mut norm, 3, u64::from(v.add_dummy_prefix));
    field_varint(&mut norm, 4, u64::from(v.remove_extra_whitespaces));
    field_varint(&mut norm, 5, u64::from(v.escape_whitespaces));
    field_bytes(&mut out, 3, &norm);
    out
}

#[test]
fn synthetic_models_match_runtime() {
    let variants = [
        Variant {
            name: "unused_ties",
            unused_every: 3,
            score_step: 64.0,
            byte_fallback: true,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        },
        Variant {
            name: "unused_raw_ws",
            unused_every: 2,
            score_step: 1.0,
            byte_fallback: false,
            add_dummy_prefix: false,
            remove_extra_whitespaces: false,
            escape_whitespaces: true,
        },
        Variant {
            name: "no_escape",
            unused_every: 7,
            score_step: 16.0,
            byte_fallback: true,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: false,
        },
        Variant {
            name: "plain",
            unused_every: usize::MAX,
            score_step: 1.0,
            byte_fallback: false,
            add_dummy_prefix: false,
            remove_extra_whitespaces: true,
            escape_whitespaces: false,
        },
    ];
    let dir = work_dir("tokenizer-synthetic");
    for (k, v) in variants.iter().enumerate() {
        let path = dir.join(format!("{}.model", v.name));
        std::fs::write(&path, synthetic_model(v)).unwrap();
        let h = make_harness(&path, &format!("tok{}", v.name));
        if v.unused_every < usize::MAX {
            let t = h.tok.tables();
            assert!(t.kinds.contains(&(PieceKind::Unused as u8)), "{}", v.name);
        }
        random_differential(&h, 0x5EED_0000 + k as u64);
        let golden: Vec<GoldenTok> = read_json(&golden("tok_dev4k.json"));
        let mut texts: Vec<String> = golden.into_iter().map(|g| g.text).collect();
        texts.extend(
            [
                " sp ace",
                "x  sp ace y",
                "ab c ab  c",
                "▁▁x ▁▁x",
                "<tool_call_x><tool_call>",
            ]
            .map(String::from),
        );
        h.assert_same(&texts);
    }
}

/// Invalid UTF-8 is outside the contract, but must still stay in bounds (guard pages) and end.
#[test]
fn invalid_utf8_stays_in_bounds() {
    let h = dev4k();
    let mut r = Rng(0x0BAD_F00D);
    let mut texts: Vec<Vec<u8>> = (0..200)
        .map(|_| {
            let n = r.below(300);
            (0..n)
                .map(|_| *r.pick(&[0xC0, 0xE2, 0xF0, 0x96, 0x81, b' ', b'a', 0xFF, 0x80]))
                .collect()
        })
        .collect();
    // Lead bytes that swallow the `▁` after them: more symbols than input characters.
    texts.push(b"\xC0 ".repeat(MAX_TEXT / 2));
    texts.push(b"\xF0 ".repeat(MAX_TEXT / 2));
    texts.push(vec![0xE2; MAX_TEXT]);
    let cases: Vec<(usize, &[u8])> = texts.iter().map(|t| (4 * t.len() + 4, &t[..])).collect();
    let got = h.run(&cases);
    assert_eq!(got.len(), texts.len());
}

// ---- Hugging Face tokenizer.json: the generated code against the `tokenizers` crate ----------

/// Every tokenizer.json form the loader accepts (`hf_common::variants`), built from both bundled
/// SentencePiece models: the generated tokenizer gives the crate's ids on the golden strings, the
/// fine-tune data's queries and tool lists, random texts (invalid UTF-8 as a Rust caller hands it
/// to the crate, through `from_utf8_lossy`), and texts at the size limit.
#[test]
fn tokenizer_json_forms_give_the_crates_ids() {
    let models = [
        ("dev4k", golden("dev4k.model")),
        ("tiny", tiny_needle("tokenizer.model")),
    ];
    for (k, (model, path)) in models.iter().enumerate() {
        let sp = load_tokenizer(path).unwrap();
        let mut texts = hf_common::corpus(&sp, 0xC0DE_0000 + k as u64);
        let mut r = Rng(0x1F00_0000 + k as u64);
        texts.extend(long_texts(&mut r, &sp));
        // The most segments a text can have: a symbol every few bytes.
        texts.push(cut("x<tools>".repeat(MAX_TEXT), MAX_TEXT));
        texts.push(cut(" <tools>".repeat(MAX_TEXT), MAX_TEXT));
        texts.push(cut("<tools>\u{1F9EA}".repeat(MAX_TEXT), MAX_TEXT));
        assert!(texts.iter().all(|t| t.len() <= MAX_TEXT));
        let dir = work_dir(&format!("tokenizer-hf-{model}"));
        for (name, json) in hf_common::variants(&sp) {
            let file = dir.join(format!("{name}.json"));
            std::fs::write(&file, &json).unwrap();
            let h = make_harness(&file, &format!("tokhf{model}{name}"));
            let oracle = hf_common::oracle(&json);
            // A prefix per segment can add one id per byte: room for twice the bytes.
            let cases: Vec<(usize, &[u8])> = texts
                .iter()
                .map(|t| (2 * t.len() + 2, t.as_bytes()))
                .collect();
            let got = h.run(&cases);
            for (text, got) in texts.iter().zip(got) {
                let want = hf_common::oracle_ids(&oracle, text);
                assert_eq!(got, want, "{model} {name}: {text:?}");
            }
            // Outside the contract (invalid UTF-8) it still stays in bounds and ends.
            let bad = [b"\xC0 ".repeat(MAX_TEXT / 2), vec![0xE2; MAX_TEXT]];
            let bad: Vec<(usize, &[u8])> = bad.iter().map(|b| (4 * b.len(), &b[..])).collect();
            assert_eq!(h.run(&bad).len(), 2);
        }
    }
}
