//! The generated output text path (spec section 3, "Output"): UTF-8 validation of the query,
//! detokenization of generated ids, and the post-processing that turns the detokenized text into
//! what the user gets. Each function produces exactly the bytes of its Rust counterpart:
//!
//! * `validate_utf8(s, len)`: 1 when `std::str::from_utf8` accepts the bytes, else 0.
//! * `detokenize(ids, n, out)`: `Tokenizer::decode` (`needle_runtime::tokenizer`); `out` needs
//!   `n * max_piece_bytes` bytes.
//! * `postprocess(text, len, out, cap, out_len, scratch, tool)`:
//!   `needle_runtime::output::postprocess` with the name map baked in; Python-exact JSON as
//!   `needle_runtime::pyjson` does it. When `tool` (an `int32_t[2]`) is not NULL, `tool[0]` gets
//!   the first call's tool index as `needle_runtime::confidence::chosen_tool` reads it (-1 for
//!   none), from the same parse: the JSON tree when the text is JSON, else a scan for the first
//!   `"name"` member; `tool[1]` gets 1 when the text (after `<tool_call>`) parsed as JSON, 0 when
//!   it took the text path (`needle_runtime::output::parses_as_json`).
//!
//! Everything is plain integer code over caller memory and read-only tables: no globals, no
//! recursion (the JSON parser is a state machine over a node array in `scratch`, with parent links
//! instead of a call stack), no floating point at all (see "Floats" below), so no libcalls.
//!
//! ## Postprocess statuses
//! * [`STATUS_OK`]: `out[0..*out_len]` holds the result.
//! * [`STATUS_TOO_SMALL`]: `cap` was too small; `*out_len` is the size needed (what `out` holds
//!   is unspecified; nothing at or beyond `out + cap` is written).
//! * [`STATUS_INEXACT`]: the text is JSON holding a float literal this code does not convert
//!   exactly (below); nothing useful is in `out`. The caller may fall back to another path.
//! * [`STATUS_INVALID_UTF8`]: `text` is not UTF-8 (the runtime only takes `&str`; `detokenize`
//!   always produces UTF-8, so this means a caller bug).
//!
//! ## Floats
//! Python prints a float with the shortest digits that round-trip. A decimal literal with at most
//! 15 significant digits whose value lies in the normal double range round-trips through a double
//! unchanged (DBL_DIG = 15) and no shorter decimal maps to the same double, so its repr digits
//! are exactly its own significant digits: the conversion needs only digit shuffling. Handled:
//! * zero (any exponent) -> `0.0` / `-0.0`;
//! * at most 15 significant digits with decimal exponent `X` (of the first significant digit) in
//!   `-307..=308`: the digits themselves, laid out as `float.__repr__` does;
//! * `X >= 309`, or `X = 308` above `1.79769313486231e308` -> `Infinity` / `-Infinity`;
//! * `X <= -325` -> `0.0` / `-0.0` (underflow: below half the smallest subnormal).
//!
//! Returned as [`STATUS_INEXACT`] (only when the whole text is otherwise valid JSON, since a text
//! that is not JSON takes the exact text path instead): a float literal with more than 15
//! significant digits (after dropping leading and trailing zeros, e.g. `3.141592653589793`), or
//! one with `X` in `-324..=-308` (subnormal territory, e.g. `5e-324`). Model outputs like `8`,
//! `0.5`, `1e5`, `-3.25`, `1.0`, `1e-07` are exact; ints of any length are copied verbatim.
//!
//! ## Scratch
//! For a text of `L` bytes the JSON path uses a node array (`32 * (L + 2)` bytes) and a buffer of
//! canonical scalars and keys (every input byte yields at most 6 canonical bytes: DEL becomes
//! `\u007f`), the text path two buffers bounded by the sequential-replacement growth of the name
//! map. [`OutputCode::scratch_bytes`] and [`OutputCode::max_output_bytes`] compute both from `L`;
//! the generated code derives the same layout from its `len` argument, so any `L` works as long
//! as the caller sized `scratch` for it (node links are u32: texts stay far below 4 GiB / 32).
//! A hard float that a later duplicate key overwrites still reports [`STATUS_INEXACT`]: the
//! status is conservative, never a silently different output.
//!
//! ## Layout
//! This module plans sizes and declares and defines the functions; the pieces live in
//! `detokenize.rs` (the piece tables and `detokenize`), `names.rs` (tool-name restoration on both
//! paths) and `json.rs` (the `postprocess` state machine). Byte-level building blocks come from
//! [`crate::codegen::bytes`].

mod detokenize;
mod json;
mod names;

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, Value};
use cranelift_frontend::Variable;
use cranelift_module::FuncId;
use needle_runtime::tokenizer::Tokenizer;

use super::bytes::{
    bind, br_if, byte_at, goto, in_range, label, masked_eq, memeq_body, place, put_body,
    set_byte_at,
};
use super::gen::{mem, Gen};
use super::kernels::KernelSet;
use super::CodegenError;
use crate::abi::CType;

/// `postprocess` wrote the result.
pub const STATUS_OK: i32 = 0;
/// `cap` too small; `*out_len` is the size needed.
pub const STATUS_TOO_SMALL: i32 = 1;
/// JSON with a float literal this code cannot convert exactly (see the module docs).
pub const STATUS_INEXACT: i32 = 2;
/// `text` is not valid UTF-8.
pub const STATUS_INVALID_UTF8: i32 = 3;

/// What the model emits first; stripped as `needle_runtime::output` does.
const TOOL_CALL: &[u8] = b"<tool_call>";
/// The canonical (serialized) form of the key `name`.
const NAME_KEY: &[u8] = b"\"name\"";

/// Bytes of one JSON node in scratch (eight u32 fields, laid out in `json.rs`).
const NODE_BYTES: usize = 32;

/// The generated output functions and the sizes a caller plans with.
#[derive(Clone, Debug)]
pub struct OutputCode {
    /// `int32_t validate_utf8(const uint8_t *s, size_t len)`: 1 valid, 0 not.
    pub validate_utf8: FuncId,
    /// `size_t detokenize(const int32_t *ids, size_t n, uint8_t *out)`: bytes written.
    pub detokenize: FuncId,
    /// `int32_t postprocess(const uint8_t *text, size_t len, uint8_t *out, size_t cap,
    /// size_t *out_len, uint8_t *scratch, int32_t tool[2])`: see the module docs for the
    /// statuses; `tool` may be NULL.
    pub postprocess: FuncId,
    /// Most bytes one id adds to `detokenize`'s output (`out` needs `n * max_piece_bytes`).
    pub max_piece_bytes: usize,
    /// The `max_text_bytes` the caller planned with (documentation for the driver).
    pub max_text_bytes: usize,
    plan: Plan,
}

impl OutputCode {
    /// Bytes of `scratch` `postprocess` needs for a text of up to `max_text` bytes.
    pub fn scratch_bytes(&self, max_text: usize) -> usize {
        self.plan.scratch(max_text)
    }

    /// Largest result `postprocess` can produce for a text of up to `max_text` bytes.
    pub fn max_output_bytes(&self, max_text: usize) -> usize {
        self.plan.output(max_text)
    }
}

/// Sizes derived from the name map; mirrored by the generated layout code.
#[derive(Clone, Debug)]
struct Plan {
    /// Longest canonical original name.
    max_orig: usize,
    /// Largest growth of one restored name (canonical original minus canonical snake).
    max_delta: usize,
    /// Text-path replacements in order: (snake bytes, original bytes).
    passes: Vec<(usize, usize)>,
    /// `ensure_ascii` (v1's `json.dumps`); false writes non-ASCII characters as themselves
    /// (Needle 3's `ensure_ascii=False`).
    ascii: bool,
}

impl Plan {
    /// A restored name sits in an object of at least `{"name":""}` (11 source bytes).
    fn restores(l: usize) -> usize {
        l / 11 + 1
    }
    fn canon_bytes(&self, l: usize) -> usize {
        6 * l + 16 + Self::restores(l) * self.max_orig
    }
    fn json_scratch(&self, l: usize) -> usize {
        NODE_BYTES * (l + 2) + self.canon_bytes(l) + 16
    }
    /// Bound on the text path's length after all replacements (each pass can at most replace
    /// every `snake.len()` bytes by `orig.len()` bytes).
    fn fallback(&self, l: usize) -> usize {
        let mut x = l;
        for &(s, o) in &self.passes {
            if o > s {
                x = x.saturating_add((x / s).saturating_mul(o - s));
            }
        }
        x
    }
    fn scratch(&self, l: usize) -> usize {
        self.json_scratch(l)
            .max(self.fallback(l).saturating_mul(2))
            .max(1)
    }
    fn output(&self, l: usize) -> usize {
        (6 * l + Self::restores(l) * self.max_delta).max(self.fallback(l))
    }
}

/// The output path's local helper functions, by id: what the generated bodies look up in their
/// [`Callees`](super::kernels::Callees) (each body may call only those it declared).
#[derive(Clone, Copy)]
pub(super) struct Helpers {
    pub valid: FuncId,
    pub memeq: FuncId,
    pub put: FuncId,
    pub replace: FuncId,
    pub restore: FuncId,
    pub first_tool_json: FuncId,
    pub first_tool_text: FuncId,
}

/// Defines `validate_utf8`, `detokenize` and `postprocess` (names get the library prefix) and
/// their internal helpers in `ks`. `name_map` is `(snake_name, original_name)` in tool order.
/// `postprocess` writes JSON as v1's reference does (`ensure_ascii`).
pub fn define_output(
    ks: &mut KernelSet,
    tok: &Tokenizer,
    name_map: &[(String, String)],
    max_text_bytes: usize,
    export: bool,
) -> Result<OutputCode, CodegenError> {
    define_output_with(ks, tok, name_map, max_text_bytes, export, true)
}

/// [`define_output`], choosing how `postprocess` writes non-ASCII characters: escaped
/// (`ascii`, `needle_runtime::pyjson::to_compact_string`) or as themselves
/// (`to_compact_string_unicode`, Needle 3's calls).
pub fn define_output_with(
    ks: &mut KernelSet,
    tok: &Tokenizer,
    name_map: &[(String, String)],
    max_text_bytes: usize,
    export: bool,
    ascii: bool,
) -> Result<OutputCode, CodegenError> {
    let pieces = detokenize::declare_piece_tables(ks, tok)?;
    let names = names::declare_name_tables(ks, name_map)?;
    let plan = Plan {
        max_orig: names.max_orig,
        max_delta: names.max_delta,
        passes: names.passes.iter().map(|p| (p.1, p.3)).collect(),
        ascii,
    };

    // ---- declarations -------------------------------------------------------------------------
    use CType::{ConstI32Ptr, ConstU8Ptr, I32Ptr, SizePtr, SizeT, U8Ptr, I32};
    let f_valid = ks.declare_function(
        "validate_utf8",
        &["1 if s[0..len) is valid UTF-8 (no surrogates, no overlongs, <= U+10FFFF), else 0"],
        &[(ConstU8Ptr, "s"), (SizeT, "len")],
        I32,
        export,
    )?;
    let f_detok = ks.declare_function(
        "detokenize",
        &[
            "Text of generated ids (SentencePiece DecodeIds); out needs n * MAX_PIECE_BYTES bytes.",
            "Returns the bytes written (always UTF-8).",
        ],
        &[(ConstI32Ptr, "ids"), (SizeT, "n"), (U8Ptr, "out")],
        SizeT,
        export,
    )?;
    let f_post = ks.declare_function(
        "postprocess",
        &[
            "What the user gets from detokenized text: 0 ok (*out_len bytes in out),",
            "1 cap too small (*out_len = size needed), 2 JSON float not converted exactly,",
            "3 text not UTF-8. scratch: see the generator's scratch_bytes(len).",
            "tool (may be NULL): int32_t[2], the first call's tool index (-1 for none),",
            "then 1 when the text parsed as JSON (0: passed through as text).",
        ],
        &[
            (ConstU8Ptr, "text"),
            (SizeT, "len"),
            (U8Ptr, "out"),
            (SizeT, "cap"),
            (SizePtr, "out_len"),
            (U8Ptr, "scratch"),
            (I32Ptr, "tool"),
        ],
        I32,
        export,
    )?;
    let f_memeq = ks.declare_function(
        "output_memeq",
        &[],
        &[(ConstU8Ptr, "a"), (ConstU8Ptr, "b"), (SizeT, "n")],
        I32,
        false,
    )?;
    let f_put = ks.declare_function(
        "output_put",
        &[],
        &[
            (U8Ptr, "dst"),
            (SizeT, "cap"),
            (SizeT, "w"),
            (ConstU8Ptr, "src"),
            (SizeT, "n"),
        ],
        SizeT,
        false,
    )?;
    let f_replace = ks.declare_function(
        "output_replace",
        &[],
        &[
            (ConstU8Ptr, "src"),
            (SizeT, "n"),
            (U8Ptr, "dst"),
            (SizeT, "cap"),
            (ConstU8Ptr, "pat"),
            (SizeT, "plen"),
            (ConstU8Ptr, "rep"),
            (SizeT, "rlen"),
        ],
        SizeT,
        false,
    )?;
    let f_restore = ks.declare_function(
        "output_restore_name",
        &[],
        &[
            (U8Ptr, "nodes"),
            (U8Ptr, "canon"),
            (SizeT, "cl"),
            (SizeT, "obj"),
        ],
        SizeT,
        false,
    )?;

    let f_tool_json = ks.declare_function(
        "output_first_tool_json",
        &[],
        &[(U8Ptr, "nodes"), (U8Ptr, "canon")],
        I32,
        false,
    )?;
    let f_tool_text = ks.declare_function(
        "output_first_tool_text",
        &[],
        &[(ConstU8Ptr, "body"), (SizeT, "n")],
        I32,
        false,
    )?;

    let helpers = Helpers {
        valid: f_valid,
        memeq: f_memeq,
        put: f_put,
        replace: f_replace,
        restore: f_restore,
        first_tool_json: f_tool_json,
        first_tool_text: f_tool_text,
    };

    // ---- definitions --------------------------------------------------------------------------
    ks.define_function(f_valid, &[], &[], |g, a, _, _| {
        Some(validate_utf8_body(g, a[0], a[1]))
    })?;

    let t = tok.tables();
    let remove_extra = t.remove_extra_whitespaces;
    let mpb = pieces.max_piece as i64;
    let vocab_i = tok.vocab_size() as i64;
    let piece_data = [pieces.flags, pieces.offsets, pieces.bytes];
    ks.define_function(f_detok, &piece_data, &[], |g, a, d, _| {
        Some(detokenize::detokenize_body(
            g,
            a,
            d,
            &pieces,
            vocab_i,
            mpb,
            remove_extra,
        ))
    })?;

    ks.define_function(f_memeq, &[], &[], |g, a, _, _| {
        Some(memeq_body(g, a[0], a[1], a[2]))
    })?;

    ks.define_function(f_put, &[], &[], |g, a, _, _| {
        Some(put_body(g, a[0], a[1], a[2], a[3], a[4]))
    })?;

    ks.define_function(f_replace, &[], &[f_memeq, f_put], |g, a, _, f| {
        Some(names::replace_body(g, a, f, &helpers))
    })?;

    ks.define_function(
        f_restore,
        &[names.names, names.table, names.consts],
        &[f_memeq, f_put],
        |g, a, d, f| Some(names::restore_body(g, a, d, &names, f, &helpers)),
    )?;

    ks.define_function(
        f_tool_json,
        &[names.names, names.table, names.consts],
        &[f_memeq],
        |g, a, d, f| Some(names::first_tool_json_body(g, a, d, &names, f, &helpers)),
    )?;

    ks.define_function(
        f_tool_text,
        &[names.names, names.snakes, names.consts],
        &[f_memeq],
        |g, a, d, f| Some(names::first_tool_text_body(g, a, d, &names, f, &helpers)),
    )?;

    let plan2 = plan.clone();
    ks.define_function(
        f_post,
        &[names.consts, names.names],
        &[
            f_valid,
            f_memeq,
            f_put,
            f_replace,
            f_restore,
            f_tool_json,
            f_tool_text,
        ],
        |g, a, d, f| {
            let mut p = json::Post::new(g, a, d, &names, f, &helpers, &plan2);
            Some(p.body(g))
        },
    )?;

    Ok(OutputCode {
        validate_utf8: f_valid,
        detokenize: f_detok,
        postprocess: f_post,
        max_piece_bytes: pieces.max_piece,
        max_text_bytes,
        plan,
    })
}

/// Body of `validate_utf8(s, n)`: 1 when `s[0..n]` is strict UTF-8, else 0.
fn validate_utf8_body(g: &mut Gen<'_>, s: Value, n: Value) -> Value {
    let zero = g.iconst(0);
    let i = g.var(g.ptr, zero);
    let top = label(g);
    let good = label(g);
    let bad = label(g);
    bind(g, top);
    let iv = g.get(i);
    let done = g.b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, iv, n);
    br_if(g, done, good);
    let (len, _) = utf8_seq(g, s, 1, iv, n);
    let invalid = g.b.ins().icmp_imm_s(IntCC::Equal, len, 0);
    br_if(g, invalid, bad);
    let next = g.b.ins().iadd(iv, len);
    g.set(i, next);
    goto(g, top);
    place(g, bad);
    let r0 = g.b.ins().iconst(types::I32, 0);
    g.ret(&[r0]);
    place(g, good);
    g.b.ins().iconst(types::I32, 1)
}

/// `dst[w++] = c` when `w < cap`; `w` always advances (it counts the bytes needed).
fn put1(g: &mut Gen<'_>, dst: Value, cap: Value, w: Variable, c: Value) {
    let wv = g.get(w);
    let fits = g.b.ins().icmp(IntCC::UnsignedLessThan, wv, cap);
    g.if_then(fits, |g| set_byte_at(g, dst, wv, c));
    let w2 = g.b.ins().iadd_imm_s(wv, 1);
    g.set(w, w2);
}

/// One strict UTF-8 sequence (Rust's and sentencepiece's rules) starting at element `i < n` of
/// the bytes `base[stride * j]`: returns (length, code point), length 0 when invalid.
fn utf8_seq(g: &mut Gen<'_>, base: Value, stride: i64, i: Value, n: Value) -> (Value, Value) {
    let mut b = Vec::with_capacity(4);
    for m in 0..4i64 {
        let j = g.b.ins().iadd_imm_s(i, m);
        let v = if m == 0 {
            let off = g.b.ins().imul_imm_s(j, stride);
            byte_at(g, mem(), base, off)
        } else {
            // Never read past the end: load a valid index, then discard.
            let inside = g.b.ins().icmp(IntCC::UnsignedLessThan, j, n);
            let idx = g.b.ins().select(inside, j, i);
            let off = g.b.ins().imul_imm_s(idx, stride);
            let raw = byte_at(g, mem(), base, off);
            let zero = g.iconst(0);
            g.b.ins().select(inside, raw, zero)
        };
        b.push(v);
    }
    let t: Vec<Value> = (1..4).map(|m| masked_eq(g, b[m], 0xC0, 0x80)).collect();
    let low6: Vec<Value> = (1..4).map(|m| g.b.ins().band_imm_s(b[m], 0x3F)).collect();
    let ascii = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, b[0], 0x80);
    // Two bytes.
    let h2 = g.b.ins().band_imm_s(b[0], 0x1F);
    let h2 = g.b.ins().ishl_imm_s(h2, 6);
    let cp2 = g.b.ins().bor(h2, low6[0]);
    let lead2 = masked_eq(g, b[0], 0xE0, 0xC0);
    let min2 =
        g.b.ins()
            .icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, cp2, 0x80);
    let ok2 = g.b.ins().band(lead2, t[0]);
    let ok2 = g.b.ins().band(ok2, min2);
    // Three bytes.
    let h3 = g.b.ins().band_imm_s(b[0], 0x0F);
    let h3 = g.b.ins().ishl_imm_s(h3, 12);
    let m3 = g.b.ins().ishl_imm_s(low6[0], 6);
    let cp3 = g.b.ins().bor(h3, m3);
    let cp3 = g.b.ins().bor(cp3, low6[1]);
    let lead3 = masked_eq(g, b[0], 0xF0, 0xE0);
    let min3 =
        g.b.ins()
            .icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, cp3, 0x800);
    let surr = in_range(g, cp3, 0xD800, 0xDFFF);
    let ok3 = g.b.ins().band(lead3, t[0]);
    let ok3 = g.b.ins().band(ok3, t[1]);
    let ok3 = g.b.ins().band(ok3, min3);
    let ok3 = g.b.ins().band_not(ok3, surr);
    // Four bytes.
    let h4 = g.b.ins().band_imm_s(b[0], 0x07);
    let h4 = g.b.ins().ishl_imm_s(h4, 18);
    let m4a = g.b.ins().ishl_imm_s(low6[0], 12);
    let m4b = g.b.ins().ishl_imm_s(low6[1], 6);
    let cp4 = g.b.ins().bor(h4, m4a);
    let cp4 = g.b.ins().bor(cp4, m4b);
    let cp4 = g.b.ins().bor(cp4, low6[2]);
    let lead4 = masked_eq(g, b[0], 0xF8, 0xF0);
    let range4 = in_range(g, cp4, 0x10000, 0x10FFFF);
    let ok4 = g.b.ins().band(lead4, t[0]);
    let ok4 = g.b.ins().band(ok4, t[1]);
    let ok4 = g.b.ins().band(ok4, t[2]);
    let ok4 = g.b.ins().band(ok4, range4);

    let zero = g.iconst(0);
    let mut len = zero;
    let mut cp = zero;
    for (ok, l, c) in [
        (ok4, 4, cp4),
        (ok3, 3, cp3),
        (ok2, 2, cp2),
        (ascii, 1, b[0]),
    ] {
        let lv = g.iconst(l);
        len = g.b.ins().select(ok, lv, len);
        cp = g.b.ins().select(ok, c, cp);
    }
    (len, cp)
}
