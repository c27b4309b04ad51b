//! The generated output text path (spec section 3, "Output"): UTF-8 validation of the query,
//! detokenization of generated ids, and the post-processing that turns the detokenized text into
//! what the user gets. Each function produces exactly the bytes of its Rust counterpart:
//!
//! * `validate_utf8(s, len)`: 1 when `std::str::from_utf8` accepts the bytes, else 0.
//! * `detokenize(ids, n, out)`: `Tokenizer::decode` (`needle_runtime::tokenizer`); `out` needs
//!   `n * max_piece_bytes` bytes.
//! * `postprocess(text, len, out, cap, out_len, scratch)`: `needle_runtime::output::postprocess`
//!   with the name map baked in; Python-exact JSON as `needle_runtime::pyjson` does it.
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

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, Block, FuncRef, InstBuilder, Value};
use cranelift_frontend::Variable;
use cranelift_module::FuncId;
use needle_runtime::pyjson;
use needle_runtime::tokenizer::{PieceKind, Tokenizer, SPACE_SYMBOL};

use super::gen::{mem, mem_ro, Gen};
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

/// Deepest nesting the JSON parser accepts (`pyjson::MAX_DEPTH`).
const MAX_DEPTH: i64 = pyjson::MAX_DEPTH as i64;

/// Node layout in scratch: eight u32 fields.
const NODE_BYTES: usize = 32;
const F_KIND: i64 = 0; // K_SCALAR, K_ARRAY, K_OBJECT
const F_A: i64 = 1; // scalar: canonical offset; container: first child
const F_B: i64 = 2; // scalar: canonical length; container: last child
const F_KOFF: i64 = 3; // member key: canonical offset
const F_KLEN: i64 = 4; // member key: canonical length, NONE for non-members
const F_NEXT: i64 = 5; // next sibling
const F_PARENT: i64 = 6;
const K_SCALAR: i64 = 0;
const K_ARRAY: i64 = 1;
const K_OBJECT: i64 = 2;
const NONE: i64 = 0xFFFF_FFFF;

/// Detokenizer piece flags.
const P_BYTE: u8 = 1;
const P_STRIP: u8 = 2;
const P_SKIP: u8 = 4;

/// The generated output functions and the sizes a caller plans with.
#[derive(Clone, Debug)]
pub struct OutputCode {
    /// `int32_t validate_utf8(const uint8_t *s, size_t len)`: 1 valid, 0 not.
    pub validate_utf8: FuncId,
    /// `size_t detokenize(const int32_t *ids, size_t n, uint8_t *out)`: bytes written.
    pub detokenize: FuncId,
    /// `int32_t postprocess(const uint8_t *text, size_t len, uint8_t *out, size_t cap,
    /// size_t *out_len, uint8_t *scratch)`: see the module docs for the statuses.
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

/// `<0xNN>` with uppercase hex, as the runtime parses byte pieces.
fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 || !hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'A'..=b'F')) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

fn to_u32(v: usize, what: &str) -> Result<u32, CodegenError> {
    u32::try_from(v).map_err(|_| CodegenError::Invalid(format!("{what} exceeds 4 GiB")))
}

/// Defines `validate_utf8`, `detokenize` and `postprocess` (names get the library prefix) and
/// their internal helpers in `ks`. `name_map` is `(snake_name, original_name)` in tool order.
pub fn define_output(
    ks: &mut KernelSet,
    tok: &Tokenizer,
    name_map: &[(String, String)],
    max_text_bytes: usize,
    export: bool,
) -> Result<OutputCode, CodegenError> {
    // ---- detokenizer tables -------------------------------------------------------------------
    let t = tok.tables();
    let strip_enabled = t.add_dummy_prefix || t.remove_extra_whitespaces;
    let vocab = tok.vocab_size();
    let mut flags = Vec::with_capacity(vocab + 1);
    let mut offsets = vec![0u32];
    let mut surfaces: Vec<u8> = Vec::new();
    let mut max_piece = 1usize;
    for id in 0..vocab as u32 {
        let start = surfaces.len();
        let mut fl = 0u8;
        match (tok.kind(id), tok.piece(id)) {
            (Some(PieceKind::Byte), Some(p)) => {
                // The byte's value is its "surface"; runs are decoded as UTF-8 at flush time,
                // at most 3 output bytes (U+FFFD) per byte.
                fl |= P_BYTE;
                surfaces.push(parse_byte_piece(p).unwrap_or(0));
                max_piece = max_piece.max(3);
            }
            (Some(PieceKind::Control), Some(_)) => {}
            (Some(PieceKind::Unknown), Some(_)) => {
                surfaces.extend_from_slice(t.unk_surface.as_bytes());
            }
            (Some(_), Some(p)) => {
                if strip_enabled && p.starts_with(SPACE_SYMBOL) {
                    fl |= P_STRIP;
                }
                surfaces.extend_from_slice(p.replace(SPACE_SYMBOL, " ").as_bytes());
            }
            _ => fl |= P_SKIP,
        }
        max_piece = max_piece.max(surfaces.len() - start);
        flags.push(fl);
        offsets.push(to_u32(surfaces.len(), "piece table")?);
    }
    flags.push(P_SKIP); // never read; keeps the table non-empty
    surfaces.push(0);
    let d_flags = ks.declare_rodata("output_piece_flags", flags, 1)?;
    let d_offs = ks.declare_rodata("output_piece_offsets", ks.target().u32_bytes(offsets), 4)?;
    let d_surf = ks.declare_rodata("output_piece_bytes", surfaces, 1)?;

    // ---- name tables --------------------------------------------------------------------------
    let canon = |s: &str| pyjson::to_compact_string(&pyjson::Value::Str(s.to_string()));
    let mut name_bytes: Vec<u8> = Vec::new();
    let mut name_tab: Vec<u32> = Vec::new();
    let (mut max_orig, mut max_delta) = (0usize, 0usize);
    for (snake, orig) in name_map {
        let (cs, co) = (canon(snake), canon(orig));
        max_orig = max_orig.max(co.len());
        max_delta = max_delta.max(co.len().saturating_sub(cs.len()));
        for c in [&cs, &co] {
            name_tab.push(to_u32(name_bytes.len(), "name table")?);
            name_tab.push(to_u32(c.len(), "name table")?);
            name_bytes.extend_from_slice(c.as_bytes());
        }
    }
    // Text path: longest snake name first by characters (stable: ties keep tool order), empty and
    // identity entries skipped, as `replace_names_in_text`.
    let mut order: Vec<&(String, String)> = name_map.iter().collect();
    order.sort_by_key(|(s, _)| std::cmp::Reverse(s.chars().count()));
    let mut passes = Vec::new(); // (snake off, len, orig off, len) into name_bytes
    for (snake, orig) in order {
        if snake.is_empty() || snake == orig {
            continue;
        }
        let so = name_bytes.len();
        name_bytes.extend_from_slice(snake.as_bytes());
        let oo = name_bytes.len();
        name_bytes.extend_from_slice(orig.as_bytes());
        passes.push((so, snake.len(), oo, orig.len()));
    }
    let mut consts = TOOL_CALL.to_vec();
    consts.extend_from_slice(NAME_KEY);
    let name_count = name_map.len();
    name_bytes.push(0);
    name_tab.push(0);
    let d_names = ks.declare_rodata("output_names", name_bytes, 1)?;
    let d_name_tab = ks.declare_rodata("output_name_table", ks.target().u32_bytes(name_tab), 4)?;
    let d_consts = ks.declare_rodata("output_consts", consts, 1)?;
    let plan = Plan {
        max_orig,
        max_delta,
        passes: passes.iter().map(|p| (p.1, p.3)).collect(),
    };

    // ---- declarations -------------------------------------------------------------------------
    use CType::{ConstI32Ptr, ConstU8Ptr, SizePtr, SizeT, U8Ptr, I32};
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
        ],
        &[
            (ConstU8Ptr, "text"),
            (SizeT, "len"),
            (U8Ptr, "out"),
            (SizeT, "cap"),
            (SizePtr, "out_len"),
            (U8Ptr, "scratch"),
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

    // ---- definitions --------------------------------------------------------------------------
    ks.define_function(f_valid, &[], &[], |g, a, _, _| {
        let (s, n) = (a[0], a[1]);
        let zero = k(g, 0);
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
        Some(g.b.ins().iconst(types::I32, 1))
    })?;

    let remove_extra = t.remove_extra_whitespaces;
    let mpb = max_piece as i64;
    let vocab_i = vocab as i64;
    ks.define_function(f_detok, &[d_flags, d_offs, d_surf], &[], |g, a, d, _| {
        Some(define_detokenize(g, a, d, vocab_i, mpb, remove_extra))
    })?;

    ks.define_function(f_memeq, &[], &[], |g, a, _, _| {
        let (p, q, n) = (a[0], a[1], a[2]);
        let fail = label(g);
        g.for_n(n, |g, i| {
            let x = ld8(g, p, i);
            let y = ld8(g, q, i);
            let ne = g.b.ins().icmp(IntCC::NotEqual, x, y);
            br_if(g, ne, fail);
        });
        let r1 = g.b.ins().iconst(types::I32, 1);
        g.ret(&[r1]);
        place(g, fail);
        Some(g.b.ins().iconst(types::I32, 0))
    })?;

    ks.define_function(f_put, &[], &[], |g, a, _, _| {
        let (dst, cap, w, src, n) = (a[0], a[1], a[2], a[3], a[4]);
        let end = g.b.ins().iadd(w, n);
        let fits = g.b.ins().icmp(IntCC::UnsignedLessThanOrEqual, end, cap);
        g.if_then(fits, |g| {
            let base = g.b.ins().iadd(dst, w);
            g.for_n(n, |g, i| {
                let x = ld8(g, src, i);
                st8(g, base, i, x);
            });
        });
        Some(end)
    })?;

    ks.define_function(f_replace, &[], &[f_memeq, f_put], |g, a, _, f| {
        let (src, n, dst, cap, pat, plen, rep, rlen) =
            (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
        let (memeq, put) = (f[0], f[1]);
        let zero = k(g, 0);
        let i = g.var(g.ptr, zero);
        let w = g.var(g.ptr, zero);
        let top = label(g);
        let done = label(g);
        let plain = label(g);
        bind(g, top);
        let iv = g.get(i);
        let end = g.b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, iv, n);
        br_if(g, end, done);
        // Candidate only when the pattern fits and its first byte matches (cheap filter).
        let rest = g.b.ins().isub(n, iv);
        let short = g.b.ins().icmp(IntCC::UnsignedLessThan, rest, plen);
        br_if(g, short, plain);
        let c = ld8(g, src, iv);
        let z = k(g, 0);
        let p0 = ld8(g, pat, z);
        let ne = g.b.ins().icmp(IntCC::NotEqual, c, p0);
        br_if(g, ne, plain);
        let at = g.b.ins().iadd(src, iv);
        let eq = g.call(memeq, &[at, pat, plen]).expect("memeq returns");
        let no = g.b.ins().icmp_imm_s(IntCC::Equal, eq, 0);
        br_if(g, no, plain);
        let wv = g.get(w);
        let w2 = g
            .call(put, &[dst, cap, wv, rep, rlen])
            .expect("put returns");
        g.set(w, w2);
        let i2 = g.b.ins().iadd(iv, plen);
        g.set(i, i2);
        goto(g, top);
        place(g, plain);
        let iv = g.get(i);
        let c = ld8(g, src, iv);
        put1(g, dst, cap, w, c);
        let i2 = g.b.ins().iadd_imm_s(iv, 1);
        g.set(i, i2);
        goto(g, top);
        place(g, done);
        Some(g.get(w))
    })?;

    ks.define_function(
        f_restore,
        &[d_names, d_name_tab, d_consts],
        &[f_memeq, f_put],
        |g, a, d, f| Some(define_restore(g, a, d, f, name_count as i64)),
    )?;

    let pass_info = passes
        .iter()
        .map(|&(so, sl, oo, ol)| (so as i64, sl as i64, oo as i64, ol as i64))
        .collect::<Vec<_>>();
    let plan2 = plan.clone();
    ks.define_function(
        f_post,
        &[d_consts, d_names],
        &[f_valid, f_memeq, f_put, f_replace, f_restore],
        |g, a, d, f| {
            let mut p = Post::new(g, a, d, f, &plan2, &pass_info, name_count > 0);
            Some(p.body(g))
        },
    )?;

    Ok(OutputCode {
        validate_utf8: f_valid,
        detokenize: f_detok,
        postprocess: f_post,
        max_piece_bytes: max_piece,
        max_text_bytes,
        plan,
    })
}

// ---- building blocks --------------------------------------------------------------------------

fn k(g: &mut Gen<'_>, v: i64) -> Value {
    g.iconst(v)
}

fn label(g: &mut Gen<'_>) -> Block {
    g.b.create_block()
}

/// Unconditional jump; what follows is unreachable until the next [`bind`].
fn goto(g: &mut Gen<'_>, to: Block) {
    g.b.ins().jump(to, &[]);
    let dead = g.b.create_block();
    g.b.switch_to_block(dead);
}

/// Places `l` right after a [`goto`] or a return (the current block is empty and unreachable).
fn place(g: &mut Gen<'_>, l: Block) {
    g.b.switch_to_block(l);
}

/// Conditional jump to `t` or `e`; what follows is unreachable until the next [`place`].
fn branch(g: &mut Gen<'_>, cond: Value, t: Block, e: Block) {
    g.b.ins().brif(cond, t, &[], e, &[]);
    let dead = g.b.create_block();
    g.b.switch_to_block(dead);
}

/// Places `l` here, falling through into it from the code before.
fn bind(g: &mut Gen<'_>, l: Block) {
    g.b.ins().jump(l, &[]);
    g.b.switch_to_block(l);
}

/// Jumps to `to` when `cond` is non-zero, else continues.
fn br_if(g: &mut Gen<'_>, cond: Value, to: Block) {
    let next = g.b.create_block();
    g.b.ins().brif(cond, to, &[], next, &[]);
    g.b.switch_to_block(next);
}

/// Byte `p[i]`, zero-extended to the pointer type.
fn ld8(g: &mut Gen<'_>, p: Value, i: Value) -> Value {
    let a = g.b.ins().iadd(p, i);
    g.b.ins().uload8(g.ptr, mem(), a, 0)
}

fn ld8_ro(g: &mut Gen<'_>, p: Value, i: Value) -> Value {
    let a = g.b.ins().iadd(p, i);
    g.b.ins().uload8(g.ptr, mem_ro(), a, 0)
}

fn st8(g: &mut Gen<'_>, p: Value, i: Value, v: Value) {
    let a = g.b.ins().iadd(p, i);
    g.b.ins().istore8(mem(), v, a, 0);
}

/// u32 element `p[i]` (native byte order), zero-extended.
fn ld32(g: &mut Gen<'_>, p: Value, i: Value, ro: bool) -> Value {
    let a = g.addr(p, i, 4);
    let flags = if ro { mem_ro() } else { mem() };
    if g.ptr == types::I32 {
        g.b.ins().load(types::I32, flags, a, 0)
    } else {
        g.b.ins().uload32(flags, a, 0)
    }
}

fn st32(g: &mut Gen<'_>, p: Value, i: Value, v: Value) {
    let a = g.addr(p, i, 4);
    if g.ptr == types::I32 {
        g.b.ins().store(mem(), v, a, 0);
    } else {
        g.b.ins().istore32(mem(), v, a, 0);
    }
}

/// `dst[w++] = c` when `w < cap`; `w` always advances (it counts the bytes needed).
fn put1(g: &mut Gen<'_>, dst: Value, cap: Value, w: Variable, c: Value) {
    let wv = g.get(w);
    let fits = g.b.ins().icmp(IntCC::UnsignedLessThan, wv, cap);
    g.if_then(fits, |g| st8(g, dst, wv, c));
    let w2 = g.b.ins().iadd_imm_s(wv, 1);
    g.set(w, w2);
}

/// `(x & mask) == want` as a flag.
fn masked_eq(g: &mut Gen<'_>, x: Value, mask: i64, want: i64) -> Value {
    let m = g.b.ins().band_imm_s(x, mask);
    g.b.ins().icmp_imm_s(IntCC::Equal, m, want)
}

fn in_range(g: &mut Gen<'_>, x: Value, lo: i64, hi_incl: i64) -> Value {
    let d = g.b.ins().iadd_imm_s(x, -lo);
    g.b.ins()
        .icmp_imm_s(IntCC::UnsignedLessThanOrEqual, d, hi_incl - lo)
}

/// One strict UTF-8 sequence (Rust's and sentencepiece's rules) starting at element `i < n` of
/// the bytes `base[stride * j]`: returns (length, code point), length 0 when invalid.
fn utf8_seq(g: &mut Gen<'_>, base: Value, stride: i64, i: Value, n: Value) -> (Value, Value) {
    let mut b = Vec::with_capacity(4);
    for m in 0..4i64 {
        let j = g.b.ins().iadd_imm_s(i, m);
        let v = if m == 0 {
            let off = g.b.ins().imul_imm_s(j, stride);
            ld8(g, base, off)
        } else {
            // Never read past the end: load a valid index, then discard.
            let inside = g.b.ins().icmp(IntCC::UnsignedLessThan, j, n);
            let idx = g.b.ins().select(inside, j, i);
            let off = g.b.ins().imul_imm_s(idx, stride);
            let raw = ld8(g, base, off);
            let zero = k(g, 0);
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

    let zero = k(g, 0);
    let mut len = zero;
    let mut cp = zero;
    for (ok, l, c) in [
        (ok4, 4, cp4),
        (ok3, 3, cp3),
        (ok2, 2, cp2),
        (ascii, 1, b[0]),
    ] {
        let lv = k(g, l);
        len = g.b.ins().select(ok, lv, len);
        cp = g.b.ins().select(ok, c, cp);
    }
    (len, cp)
}

// ---- detokenize -------------------------------------------------------------------------------

/// Byte pieces are buffered in `out` itself, byte `j` of a run at `base + 3 * j` where `base` is
/// `max_piece_bytes` times the id index where the run began: the output written so far never
/// passes `max_piece_bytes` per id consumed, and decoding writes at most 3 bytes per byte read,
/// so writes stay behind the bytes still to be read (see the flush).
fn define_detokenize(
    g: &mut Gen<'_>,
    a: &[Value],
    d: &[Value],
    vocab: i64,
    mpb: i64,
    remove_extra: bool,
) -> Value {
    let (ids, n, out) = (a[0], a[1], a[2]);
    let (flags, offs, surf) = (d[0], d[1], d[2]);
    let zero = k(g, 0);
    let one = k(g, 1);
    let o = g.var(g.ptr, zero);
    let bos = g.var(g.ptr, one);
    let bos_seen = g.var(g.ptr, zero);
    let pend = g.var(g.ptr, zero);
    let base = g.var(g.ptr, zero);

    let flush = |g: &mut Gen<'_>| {
        let kk = g.get(pend);
        let has = g.b.ins().icmp_imm_s(IntCC::NotEqual, kk, 0);
        g.if_then(has, |g| {
            let bo = g.get(base);
            let bv = g.b.ins().iadd(out, bo);
            let zero = k(g, 0);
            let j = g.var(g.ptr, zero);
            let top = label(g);
            let done = label(g);
            bind(g, top);
            let jv = g.get(j);
            let end = g.b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, jv, kk);
            br_if(g, end, done);
            let (len, _) = utf8_seq(g, bv, 3, jv, kk);
            // All bytes of the sequence are loaded (inside utf8_seq) before anything is written.
            let j3 = g.b.ins().imul_imm_s(jv, 3);
            let bytes: Vec<Value> = (0..4)
                .map(|m| {
                    let off = g.b.ins().iadd_imm_s(j3, 3 * m);
                    let inside = g.b.ins().iadd_imm_s(jv, m);
                    let inside = g.b.ins().icmp(IntCC::UnsignedLessThan, inside, kk);
                    let safe = g.b.ins().select(inside, off, j3);
                    ld8(g, bv, safe)
                })
                .collect();
            let invalid = g.b.ins().icmp_imm_s(IntCC::Equal, len, 0);
            let ov = g.get(o);
            g.if_else(
                invalid,
                |g| {
                    for (m, byte) in [0xEFi64, 0xBF, 0xBD].into_iter().enumerate() {
                        let c = k(g, byte);
                        let at = g.b.ins().iadd_imm_s(ov, m as i64);
                        st8(g, out, at, c);
                    }
                    let o2 = g.b.ins().iadd_imm_s(ov, 3);
                    g.set(o, o2);
                    let j2 = g.b.ins().iadd_imm_s(jv, 1);
                    g.set(j, j2);
                },
                |g| {
                    st8(g, out, ov, bytes[0]);
                    for (m, &byte) in bytes.iter().enumerate().skip(1) {
                        let more =
                            g.b.ins()
                                .icmp_imm_s(IntCC::UnsignedGreaterThan, len, m as i64);
                        g.if_then(more, |g| {
                            let at = g.b.ins().iadd_imm_s(ov, m as i64);
                            st8(g, out, at, byte);
                        });
                    }
                    let o2 = g.b.ins().iadd(ov, len);
                    g.set(o, o2);
                    let j2 = g.b.ins().iadd(jv, len);
                    g.set(j, j2);
                },
            );
            goto(g, top);
            place(g, done);
            let zero = k(g, 0);
            g.set(pend, zero);
        });
    };

    g.for_n(n, |g, i| {
        let next = label(g);
        let id = ld32(g, ids, i, false);
        let outside =
            g.b.ins()
                .icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, id, vocab);
        br_if(g, outside, next);
        let fl = ld8_ro(g, flags, id);
        let skip = g.b.ins().band_imm_s(fl, i64::from(P_SKIP));
        br_if(g, skip, next);
        let is_byte = g.b.ins().band_imm_s(fl, i64::from(P_BYTE));
        let not_byte = label(g);
        let zero_flag = g.b.ins().icmp_imm_s(IntCC::Equal, is_byte, 0);
        br_if(g, zero_flag, not_byte);
        {
            let pv = g.get(pend);
            let first = g.b.ins().icmp_imm_s(IntCC::Equal, pv, 0);
            g.if_then(first, |g| {
                let b0 = g.b.ins().imul_imm_s(i, mpb);
                g.set(base, b0);
            });
            let at = ld32(g, offs, id, true);
            let byte = ld8_ro(g, surf, at);
            let bv = g.get(base);
            let slot = g.b.ins().imul_imm_s(pv, 3);
            let at = g.b.ins().iadd(out, bv);
            st8(g, at, slot, byte);
            let p2 = g.b.ins().iadd_imm_s(pv, 1);
            g.set(pend, p2);
            goto(g, next);
        }
        place(g, not_byte);
        flush(g);
        // The leading-whitespace state of `Tokenizer::decode`.
        let ov = g.get(o);
        let seen = g.get(bos_seen);
        let nonempty = g.b.ins().icmp_imm_s(IntCC::NotEqual, ov, 0);
        let seen_nz = g.b.ins().icmp_imm_s(IntCC::NotEqual, seen, 0);
        let ends = g.b.ins().bor(nonempty, seen_nz);
        let bv = g.get(bos);
        let zero = k(g, 0);
        let bos2 = g.b.ins().select(ends, zero, bv);
        g.set(bos, bos2);
        g.set(bos_seen, zero);
        let start = ld32(g, offs, id, true);
        let id1 = g.b.ins().iadd_imm_s(id, 1);
        let end = ld32(g, offs, id1, true);
        let strip = g.b.ins().band_imm_s(fl, i64::from(P_STRIP));
        let strip = g.b.ins().icmp_imm_s(IntCC::NotEqual, strip, 0);
        let bos_nz = g.b.ins().icmp_imm_s(IntCC::NotEqual, bos2, 0);
        let strip = g.b.ins().band(strip, bos_nz);
        let sv = g.var(g.ptr, start);
        g.if_then(strip, |g| {
            let s1 = g.b.ins().iadd_imm_s(start, 1);
            g.set(sv, s1);
            // With extra-whitespace removal every leading `▁` goes.
            let seen = k(g, if remove_extra { 0 } else { 1 });
            g.set(bos_seen, seen);
        });
        let s = g.get(sv);
        let cnt = g.b.ins().isub(end, s);
        let src = g.b.ins().iadd(surf, s);
        let dst = g.b.ins().iadd(out, ov);
        g.for_n(cnt, |g, t| {
            let c = ld8_ro(g, src, t);
            st8(g, dst, t, c);
        });
        let o2 = g.b.ins().iadd(ov, cnt);
        g.set(o, o2);
        bind(g, next);
    });
    flush(g);
    g.get(o)
}

// ---- JSON nodes -------------------------------------------------------------------------------

fn nget(g: &mut Gen<'_>, nodes: Value, node: Value, field: i64) -> Value {
    let i = g.b.ins().imul_imm_s(node, (NODE_BYTES / 4) as i64);
    let i = g.b.ins().iadd_imm_s(i, field);
    ld32(g, nodes, i, false)
}

fn nset(g: &mut Gen<'_>, nodes: Value, node: Value, field: i64, v: Value) {
    let i = g.b.ins().imul_imm_s(node, (NODE_BYTES / 4) as i64);
    let i = g.b.ins().iadd_imm_s(i, field);
    st32(g, nodes, i, v);
}

/// `output_restore_name(nodes, canon, cl, obj) -> cl'`: if object `obj` has a member `name`
/// whose value is a string equal to a snake name (first in tool order), its value becomes the
/// original name, appended to the canonical buffer at `cl`.
fn define_restore(g: &mut Gen<'_>, a: &[Value], d: &[Value], f: &[FuncRef], count: i64) -> Value {
    let (nodes, canon, cl, obj) = (a[0], a[1], a[2], a[3]);
    let (names, tab, consts) = (d[0], d[1], d[2]);
    let (memeq, put) = (f[0], f[1]);
    let first = nget(g, nodes, obj, F_A);
    let m = g.var(g.ptr, first);
    let top = label(g);
    let adv = label(g);
    let done = label(g);
    bind(g, top);
    let mv = g.get(m);
    let end = g.b.ins().icmp_imm_s(IntCC::Equal, mv, NONE);
    br_if(g, end, done);
    let kl = nget(g, nodes, mv, F_KLEN);
    let other =
        g.b.ins()
            .icmp_imm_s(IntCC::NotEqual, kl, NAME_KEY.len() as i64);
    br_if(g, other, adv);
    let koff = nget(g, nodes, mv, F_KOFF);
    let kp = g.b.ins().iadd(canon, koff);
    let np = g.b.ins().iadd_imm_s(consts, TOOL_CALL.len() as i64);
    let eq = g.call(memeq, &[kp, np, kl]).expect("memeq returns");
    let ne = g.b.ins().icmp_imm_s(IntCC::Equal, eq, 0);
    br_if(g, ne, adv);
    // Keys are unique after parsing, so this is the `name` member.
    let kind = nget(g, nodes, mv, F_KIND);
    let not_scalar = g.b.ins().icmp_imm_s(IntCC::NotEqual, kind, K_SCALAR);
    br_if(g, not_scalar, done);
    let off = nget(g, nodes, mv, F_A);
    let len = nget(g, nodes, mv, F_B);
    let short = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, len, 2);
    br_if(g, short, done);
    let c0 = ld8(g, canon, off);
    let not_str = g.b.ins().icmp_imm_s(IntCC::NotEqual, c0, i64::from(b'"'));
    br_if(g, not_str, done);
    let vp = g.b.ins().iadd(canon, off);
    let cnt = k(g, count);
    g.for_n(cnt, |g, t| {
        let t4 = g.b.ins().imul_imm_s(t, 4);
        let so = ld32(g, tab, t4, true);
        let t1 = g.b.ins().iadd_imm_s(t4, 1);
        let sl = ld32(g, tab, t1, true);
        let t2 = g.b.ins().iadd_imm_s(t4, 2);
        let oo = ld32(g, tab, t2, true);
        let t3 = g.b.ins().iadd_imm_s(t4, 3);
        let ol = ld32(g, tab, t3, true);
        let same_len = g.b.ins().icmp(IntCC::Equal, sl, len);
        g.if_then(same_len, |g| {
            let sp = g.b.ins().iadd(names, so);
            let eq = g.call(memeq, &[vp, sp, len]).expect("memeq returns");
            g.if_then(eq, |g| {
                let op = g.b.ins().iadd(names, oo);
                let huge = k(g, i64::MAX);
                let cl2 = g
                    .call(put, &[canon, huge, cl, op, ol])
                    .expect("put returns");
                nset(g, nodes, mv, F_A, cl);
                nset(g, nodes, mv, F_B, ol);
                g.ret(&[cl2]);
            });
        });
    });
    goto(g, done);
    place(g, adv);
    let nx = nget(g, nodes, mv, F_NEXT);
    g.set(m, nx);
    goto(g, top);
    place(g, done);
    cl
}

// ---- postprocess ------------------------------------------------------------------------------

/// The postprocess function under construction: its arguments, layout and parser state.
struct Post<'p> {
    out: Value,
    cap: Value,
    out_len: Value,
    names: Value,
    memeq: FuncRef,
    put: FuncRef,
    replace: FuncRef,
    restore: FuncRef,
    body: Value,
    blen: Value,
    blen_m1: Value,
    nodes: Value,
    cbuf: Value,
    tmp: Value,
    buf_a: Value,
    buf_b: Value,
    huge: Value,
    passes: &'p [(i64, i64, i64, i64)],
    restore_names: bool,
    // parser state
    pos: Variable,
    cur: Variable,
    nn: Variable,
    cl: Variable,
    depth: Variable,
    hard: Variable,
    koff: Variable,
    klen: Variable,
    node: Variable,
    vstart: Variable,
    // states
    value_l: Block,
    key_l: Block,
    after_l: Block,
    close_l: Block,
    number_l: Block,
    scalar_l: Block,
    success_l: Block,
    fail_l: Block,
}

impl<'p> Post<'p> {
    fn new(
        g: &mut Gen<'_>,
        a: &[Value],
        d: &[Value],
        f: &[FuncRef],
        plan: &Plan,
        passes: &'p [(i64, i64, i64, i64)],
        restore_names: bool,
    ) -> Self {
        let (text, len, out, cap, out_len, scratch) = (a[0], a[1], a[2], a[3], a[4], a[5]);
        let (consts, names) = (d[0], d[1]);
        let (valid, memeq, put, replace, restore) = (f[0], f[1], f[2], f[3], f[4]);
        let ok = g.call(valid, &[text, len]).expect("validate returns");
        let bad = g.b.ins().icmp_imm_s(IntCC::Equal, ok, 0);
        g.if_then(bad, |g| {
            let zero = k(g, 0);
            g.b.ins().store(mem(), zero, out_len, 0);
            let st = g.b.ins().iconst(types::I32, i64::from(STATUS_INVALID_UTF8));
            g.ret(&[st]);
        });
        // `<tool_call>` prefix.
        let zero = k(g, 0);
        let has = g.var(g.ptr, zero);
        let long = g.b.ins().icmp_imm_s(
            IntCC::UnsignedGreaterThanOrEqual,
            len,
            TOOL_CALL.len() as i64,
        );
        g.if_then(long, |g| {
            let n = k(g, TOOL_CALL.len() as i64);
            let eq = g.call(memeq, &[text, consts, n]).expect("memeq returns");
            let eq = if g.ptr == types::I32 {
                eq
            } else {
                g.b.ins().uextend(g.ptr, eq)
            };
            g.set(has, eq);
        });
        let hv = g.get(has);
        let skip = g.b.ins().imul_imm_s(hv, TOOL_CALL.len() as i64);
        let body = g.b.ins().iadd(text, skip);
        let blen = g.b.ins().isub(len, skip);
        let blen_m1 = g.b.ins().iadd_imm_s(blen, -1);
        // Layout from `len`, as Plan computes it.
        let nb = g.b.ins().iadd_imm_s(len, 2);
        let nb = g.b.ins().imul_imm_s(nb, NODE_BYTES as i64);
        let cbuf = g.b.ins().iadd(scratch, nb);
        let c6 = g.b.ins().imul_imm_s(len, 6);
        let c6 = g.b.ins().iadd_imm_s(c6, 16);
        let r = g.b.ins().udiv_imm_s(len, 11);
        let r = g.b.ins().iadd_imm_s(r, 1);
        let r = g.b.ins().imul_imm_s(r, plan.max_orig as i64);
        let csize = g.b.ins().iadd(c6, r);
        let tmp = g.b.ins().iadd(cbuf, csize);
        let mut x = len;
        for &(s, o) in &plan.passes {
            if o > s {
                let q = g.b.ins().udiv_imm_s(x, s as i64);
                let q = g.b.ins().imul_imm_s(q, (o - s) as i64);
                x = g.b.ins().iadd(x, q);
            }
        }
        let buf_b = g.b.ins().iadd(scratch, x);
        let huge = k(g, i64::MAX);
        let none = k(g, NONE);
        let var = |g: &mut Gen<'_>, init: Value| g.var(g.ptr, init);
        Post {
            out,
            cap,
            out_len,
            names,
            memeq,
            put,
            replace,
            restore,
            body,
            blen,
            blen_m1,
            nodes: scratch,
            cbuf,
            tmp,
            buf_a: scratch,
            buf_b,
            huge,
            passes,
            restore_names,
            pos: var(g, zero),
            cur: var(g, none),
            nn: var(g, zero),
            cl: var(g, zero),
            depth: var(g, zero),
            hard: var(g, zero),
            koff: var(g, zero),
            klen: var(g, zero),
            node: var(g, zero),
            vstart: var(g, zero),
            value_l: label(g),
            key_l: label(g),
            after_l: label(g),
            close_l: label(g),
            number_l: label(g),
            scalar_l: label(g),
            success_l: label(g),
            fail_l: label(g),
        }
    }

    // ---- small pieces ----

    /// The byte at `p`, or 256 past the end.
    fn peek_at(&self, g: &mut Gen<'_>, p: Value) -> Value {
        let inside = g.b.ins().icmp(IntCC::UnsignedLessThan, p, self.blen);
        let idx = g.b.ins().umin(p, self.blen_m1);
        let raw = ld8(g, self.body, idx);
        let eof = k(g, 256);
        g.b.ins().select(inside, raw, eof)
    }

    fn peek(&self, g: &mut Gen<'_>) -> Value {
        let p = g.get(self.pos);
        self.peek_at(g, p)
    }

    fn is_digit(g: &mut Gen<'_>, c: Value) -> Value {
        in_range(g, c, i64::from(b'0'), i64::from(b'9'))
    }

    fn eq(g: &mut Gen<'_>, c: Value, ch: u8) -> Value {
        g.b.ins().icmp_imm_s(IntCC::Equal, c, i64::from(ch))
    }

    fn ne(g: &mut Gen<'_>, c: Value, ch: u8) -> Value {
        g.b.ins().icmp_imm_s(IntCC::NotEqual, c, i64::from(ch))
    }

    fn advance(&self, g: &mut Gen<'_>, n: i64) {
        let p = g.get(self.pos);
        let p2 = g.b.ins().iadd_imm_s(p, n);
        g.set(self.pos, p2);
    }

    /// Python's JSON whitespace: space, tab, LF, CR.
    fn skip_ws(&self, g: &mut Gen<'_>) {
        let top = label(g);
        let done = label(g);
        bind(g, top);
        let c = self.peek(g);
        let mut is = Self::eq(g, c, b' ');
        for ch in [b'\t', b'\n', b'\r'] {
            let e = Self::eq(g, c, ch);
            is = g.b.ins().bor(is, e);
        }
        let not = g.b.ins().icmp_imm_s(IntCC::Equal, is, 0);
        br_if(g, not, done);
        self.advance(g, 1);
        goto(g, top);
        place(g, done);
    }

    /// Advances `var` over ASCII digits.
    fn digits(&self, g: &mut Gen<'_>, var: Variable) {
        let top = label(g);
        let done = label(g);
        bind(g, top);
        let v = g.get(var);
        let c = self.peek_at(g, v);
        let d = Self::is_digit(g, c);
        let not = g.b.ins().icmp_imm_s(IntCC::Equal, d, 0);
        br_if(g, not, done);
        let v2 = g.b.ins().iadd_imm_s(v, 1);
        g.set(var, v2);
        goto(g, top);
        place(g, done);
    }

    /// Appends byte `v` to the canonical buffer.
    fn wr(&self, g: &mut Gen<'_>, v: Value) {
        let c = g.get(self.cl);
        st8(g, self.cbuf, c, v);
        let c2 = g.b.ins().iadd_imm_s(c, 1);
        g.set(self.cl, c2);
    }

    fn wr_lit(&self, g: &mut Gen<'_>, s: &[u8]) {
        for &ch in s {
            let v = k(g, i64::from(ch));
            self.wr(g, v);
        }
    }

    /// Appends `n` bytes from `src` to the canonical buffer.
    fn cput(&self, g: &mut Gen<'_>, src: Value, n: Value) {
        let c = g.get(self.cl);
        let c2 = g
            .call(self.put, &[self.cbuf, self.huge, c, src, n])
            .expect("put returns");
        g.set(self.cl, c2);
    }

    /// `\uXXXX` with lowercase hex, as Python's `ensure_ascii`.
    fn wr_u(&self, g: &mut Gen<'_>, u: Value) {
        self.wr_lit(g, b"\\u");
        for shift in [12i64, 8, 4, 0] {
            let d = g.b.ins().ushr_imm_s(u, shift);
            let d = g.b.ins().band_imm_s(d, 15);
            let small = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, d, 10);
            let dig = g.b.ins().iadd_imm_s(d, 48);
            let hex = g.b.ins().iadd_imm_s(d, 87);
            let ch = g.b.ins().select(small, dig, hex);
            self.wr(g, ch);
        }
    }

    /// Writes code point `cp` as `json.dumps` does inside a string.
    fn emit_cp(&self, g: &mut Gen<'_>, cp: Value) {
        let mut esc = k(g, 0);
        for (c, e) in [
            (b'"', b'"'),
            (b'\\', b'\\'),
            (b'\n', b'n'),
            (b'\r', b'r'),
            (b'\t', b't'),
            (8u8, b'b'),
            (12u8, b'f'),
        ] {
            let is = Self::eq(g, cp, c);
            let ev = k(g, i64::from(e));
            esc = g.b.ins().select(is, ev, esc);
        }
        let short = label(g);
        let print = label(g);
        let u4 = label(g);
        let done = label(g);
        let has_esc = g.b.ins().icmp_imm_s(IntCC::NotEqual, esc, 0);
        br_if(g, has_esc, short);
        let printable = in_range(g, cp, 0x20, 0x7E);
        br_if(g, printable, print);
        let bmp = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, cp, 0x10000);
        br_if(g, bmp, u4);
        let c2 = g.b.ins().iadd_imm_s(cp, -0x10000);
        let hi = g.b.ins().ushr_imm_s(c2, 10);
        let hi = g.b.ins().iadd_imm_s(hi, 0xD800);
        let lo = g.b.ins().band_imm_s(c2, 0x3FF);
        let lo = g.b.ins().iadd_imm_s(lo, 0xDC00);
        self.wr_u(g, hi);
        self.wr_u(g, lo);
        goto(g, done);
        place(g, short);
        self.wr_lit(g, b"\\");
        self.wr(g, esc);
        goto(g, done);
        place(g, print);
        self.wr(g, cp);
        goto(g, done);
        place(g, u4);
        self.wr_u(g, cp);
        bind(g, done);
    }

    /// Four hex digits at `p` (all in range): (value, all-valid flag).
    fn hex4(&self, g: &mut Gen<'_>, p: Value) -> (Value, Value) {
        let mut v = k(g, 0);
        let mut ok = g.b.ins().icmp_imm_s(IntCC::Equal, v, 0);
        for m in 0..4 {
            let at = g.b.ins().iadd_imm_s(p, m);
            let c = ld8(g, self.body, at);
            let isd = in_range(g, c, i64::from(b'0'), i64::from(b'9'));
            let isl = in_range(g, c, i64::from(b'a'), i64::from(b'f'));
            let isu = in_range(g, c, i64::from(b'A'), i64::from(b'F'));
            let dd = g.b.ins().iadd_imm_s(c, -48);
            let dl = g.b.ins().iadd_imm_s(c, -87);
            let du = g.b.ins().iadd_imm_s(c, -55);
            let h = g.b.ins().select(isl, dl, du);
            let h = g.b.ins().select(isd, dd, h);
            let any = g.b.ins().bor(isd, isl);
            let any = g.b.ins().bor(any, isu);
            ok = g.b.ins().band(ok, any);
            let v16 = g.b.ins().ishl_imm_s(v, 4);
            v = g.b.ins().bor(v16, h);
        }
        (v, ok)
    }

    /// A string at `pos` (on its `"`): canonical form appended to the buffer; jumps to the
    /// failure state on anything `pyjson` rejects (including unpaired surrogate escapes).
    fn string(&self, g: &mut Gen<'_>) {
        let fail = self.fail_l;
        self.wr_lit(g, b"\"");
        self.advance(g, 1);
        let zero = k(g, 0);
        let cpv = g.var(g.ptr, zero);
        let top = label(g);
        let close = label(g);
        let esc = label(g);
        let multi = label(g);
        let uesc = label(g);
        let emit = label(g);
        bind(g, top);
        let p = g.get(self.pos);
        let end =
            g.b.ins()
                .icmp(IntCC::UnsignedGreaterThanOrEqual, p, self.blen);
        br_if(g, end, fail);
        let b = ld8(g, self.body, p);
        let q = Self::eq(g, b, b'"');
        br_if(g, q, close);
        let ctl = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, b, 0x20);
        br_if(g, ctl, fail);
        let bs = Self::eq(g, b, b'\\');
        br_if(g, bs, esc);
        let hi =
            g.b.ins()
                .icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, b, 0x80);
        br_if(g, hi, multi);
        g.set(cpv, b);
        self.advance(g, 1);
        goto(g, emit);

        // Raw non-ASCII: the text is valid UTF-8 (checked on entry).
        place(g, multi);
        let (len, cp) = utf8_seq(g, self.body, 1, p, self.blen);
        g.set(cpv, cp);
        let p2 = g.b.ins().iadd(p, len);
        g.set(self.pos, p2);
        goto(g, emit);

        place(g, esc);
        let p1 = g.b.ins().iadd_imm_s(p, 1);
        let end =
            g.b.ins()
                .icmp(IntCC::UnsignedGreaterThanOrEqual, p1, self.blen);
        br_if(g, end, fail);
        let e = ld8(g, self.body, p1);
        let is_u = Self::eq(g, e, b'u');
        br_if(g, is_u, uesc);
        let mut cp = k(g, NONE);
        for (c, v) in [
            (b'"', b'"'),
            (b'\\', b'\\'),
            (b'/', b'/'),
            (b'b', 8u8),
            (b'f', 12),
            (b'n', b'\n'),
            (b'r', b'\r'),
            (b't', b'\t'),
        ] {
            let is = Self::eq(g, e, c);
            let vv = k(g, i64::from(v));
            cp = g.b.ins().select(is, vv, cp);
        }
        let bad = g.b.ins().icmp_imm_s(IntCC::Equal, cp, NONE);
        br_if(g, bad, fail);
        g.set(cpv, cp);
        self.advance(g, 2);
        goto(g, emit);

        place(g, uesc);
        let p6 = g.b.ins().iadd_imm_s(p, 6);
        let short = g.b.ins().icmp(IntCC::UnsignedGreaterThan, p6, self.blen);
        br_if(g, short, fail);
        let p2 = g.b.ins().iadd_imm_s(p, 2);
        let (h, ok) = self.hex4(g, p2);
        let not_ok = g.b.ins().icmp_imm_s(IntCC::Equal, ok, 0);
        br_if(g, not_ok, fail);
        g.set(self.pos, p6);
        let low = in_range(g, h, 0xDC00, 0xDFFF);
        br_if(g, low, fail);
        g.set(cpv, h);
        let high = in_range(g, h, 0xD800, 0xDBFF);
        let single = g.b.ins().icmp_imm_s(IntCC::Equal, high, 0);
        br_if(g, single, emit);
        // A high surrogate pairs only with an immediately following `\u` low surrogate.
        let p12 = g.b.ins().iadd_imm_s(p, 12);
        let short = g.b.ins().icmp(IntCC::UnsignedGreaterThan, p12, self.blen);
        br_if(g, short, fail);
        let c6 = ld8(g, self.body, p6);
        let n6 = Self::ne(g, c6, b'\\');
        br_if(g, n6, fail);
        let p7 = g.b.ins().iadd_imm_s(p, 7);
        let c7 = ld8(g, self.body, p7);
        let n7 = Self::ne(g, c7, b'u');
        br_if(g, n7, fail);
        let p8 = g.b.ins().iadd_imm_s(p, 8);
        let (lo, ok) = self.hex4(g, p8);
        let not_ok = g.b.ins().icmp_imm_s(IntCC::Equal, ok, 0);
        br_if(g, not_ok, fail);
        let is_low = in_range(g, lo, 0xDC00, 0xDFFF);
        let not_low = g.b.ins().icmp_imm_s(IntCC::Equal, is_low, 0);
        br_if(g, not_low, fail);
        let hh = g.b.ins().iadd_imm_s(h, -0xD800);
        let hh = g.b.ins().ishl_imm_s(hh, 10);
        let ll = g.b.ins().iadd_imm_s(lo, -0xDC00);
        let c = g.b.ins().iadd(hh, ll);
        let c = g.b.ins().iadd_imm_s(c, 0x10000);
        g.set(cpv, c);
        g.set(self.pos, p12);
        goto(g, emit);

        place(g, emit);
        let c = g.get(cpv);
        self.emit_cp(g, c);
        goto(g, top);

        place(g, close);
        self.wr_lit(g, b"\"");
        let p1 = g.b.ins().iadd_imm_s(p, 1);
        g.set(self.pos, p1);
    }

    /// Gets the node for the value about to be parsed: the root, a new element or member
    /// appended to the current container, or (a duplicate key) the earlier member with that
    /// key, emptied for the new value so it keeps its position (Python's dict update).
    fn alloc_slot(&self, g: &mut Gen<'_>) {
        let nodes = self.nodes;
        let root = label(g);
        let obj = label(g);
        let scan = label(g);
        let new_key = label(g);
        let new_elem = label(g);
        let link = label(g);
        let done = label(g);
        let cu = g.get(self.cur);
        let is_root = g.b.ins().icmp_imm_s(IntCC::Equal, cu, NONE);
        br_if(g, is_root, root);
        let kind = nget(g, nodes, cu, F_KIND);
        let is_obj = g.b.ins().icmp_imm_s(IntCC::Equal, kind, K_OBJECT);
        branch(g, is_obj, obj, new_elem);

        place(g, root);
        let n = g.get(self.nn);
        let none = k(g, NONE);
        nset(g, nodes, n, F_KLEN, none);
        nset(g, nodes, n, F_NEXT, none);
        nset(g, nodes, n, F_PARENT, none);
        g.set(self.node, n);
        let n1 = g.b.ins().iadd_imm_s(n, 1);
        g.set(self.nn, n1);
        goto(g, done);

        place(g, obj);
        let first = nget(g, nodes, cu, F_A);
        let m = g.var(g.ptr, first);
        bind(g, scan);
        let mv = g.get(m);
        let end = g.b.ins().icmp_imm_s(IntCC::Equal, mv, NONE);
        br_if(g, end, new_key);
        let kl = nget(g, nodes, mv, F_KLEN);
        let want = g.get(self.klen);
        let same_len = g.b.ins().icmp(IntCC::Equal, kl, want);
        let other = label(g);
        let zero_len = g.b.ins().icmp_imm_s(IntCC::Equal, same_len, 0);
        br_if(g, zero_len, other);
        let ko = nget(g, nodes, mv, F_KOFF);
        let kp = g.b.ins().iadd(self.cbuf, ko);
        let wo = g.get(self.koff);
        let wp = g.b.ins().iadd(self.cbuf, wo);
        let eq = g.call(self.memeq, &[kp, wp, want]).expect("memeq returns");
        let differ = g.b.ins().icmp_imm_s(IntCC::Equal, eq, 0);
        br_if(g, differ, other);
        g.set(self.node, mv);
        goto(g, done);
        place(g, other);
        let nx = nget(g, nodes, mv, F_NEXT);
        g.set(m, nx);
        goto(g, scan);

        place(g, new_key);
        let n = g.get(self.nn);
        let ko = g.get(self.koff);
        let kl = g.get(self.klen);
        nset(g, nodes, n, F_KOFF, ko);
        nset(g, nodes, n, F_KLEN, kl);
        goto(g, link);

        place(g, new_elem);
        let n = g.get(self.nn);
        let none = k(g, NONE);
        nset(g, nodes, n, F_KLEN, none);
        bind(g, link);
        let n = g.get(self.nn);
        let cu = g.get(self.cur);
        let none = k(g, NONE);
        nset(g, nodes, n, F_NEXT, none);
        nset(g, nodes, n, F_PARENT, cu);
        let first = nget(g, nodes, cu, F_A);
        let empty = g.b.ins().icmp_imm_s(IntCC::Equal, first, NONE);
        g.if_else(
            empty,
            |g| nset(g, nodes, cu, F_A, n),
            |g| {
                let last = nget(g, nodes, cu, F_B);
                nset(g, nodes, last, F_NEXT, n);
            },
        );
        nset(g, nodes, cu, F_B, n);
        g.set(self.node, n);
        let n1 = g.b.ins().iadd_imm_s(n, 1);
        g.set(self.nn, n1);
        bind(g, done);
    }

    // ---- states ----

    fn body(&mut self, g: &mut Gen<'_>) -> Value {
        let fail = self.fail_l;
        let empty = g.b.ins().icmp_imm_s(IntCC::Equal, self.blen, 0);
        br_if(g, empty, fail);
        self.skip_ws(g);
        goto(g, self.value_l);
        self.state_value(g);
        self.state_key(g);
        self.state_after(g);
        self.state_number(g);
        self.state_success(g);
        self.state_fail(g);
        g.b.ins().iconst(types::I32, 0)
    }

    fn state_value(&self, g: &mut Gen<'_>) {
        let fail = self.fail_l;
        place(g, self.value_l);
        let c = self.peek(g);
        let cl = g.get(self.cl);
        g.set(self.vstart, cl);
        self.alloc_slot(g);
        let string = label(g);
        let open = label(g);
        let q = Self::eq(g, c, b'"');
        br_if(g, q, string);
        let ob = Self::eq(g, c, b'{');
        let ab = Self::eq(g, c, b'[');
        let o = g.b.ins().bor(ob, ab);
        br_if(g, o, open);
        let lits: [(&[u8], Block); 6] = [
            (b"null", fail),
            (b"true", fail),
            (b"false", fail),
            (b"NaN", fail),
            (b"Infinity", fail),
            (b"-Infinity", self.number_l),
        ];
        for (lit, miss) in lits {
            let try_l = label(g);
            let next = label(g);
            let first = Self::eq(g, c, lit[0]);
            branch(g, first, try_l, next);
            place(g, try_l);
            let p = g.get(self.pos);
            let end = g.b.ins().iadd_imm_s(p, lit.len() as i64);
            let over = g.b.ins().icmp(IntCC::UnsignedGreaterThan, end, self.blen);
            br_if(g, over, miss);
            let mut all = g.b.ins().iconst(types::I8, 1);
            for (m, &ch) in lit.iter().enumerate() {
                let at = g.b.ins().iadd_imm_s(p, m as i64);
                let b = ld8(g, self.body, at);
                let e = Self::eq(g, b, ch);
                all = g.b.ins().band(all, e);
            }
            let not = g.b.ins().icmp_imm_s(IntCC::Equal, all, 0);
            br_if(g, not, miss);
            self.wr_lit(g, lit);
            g.set(self.pos, end);
            goto(g, self.scalar_l);
            place(g, next);
        }
        let d = Self::is_digit(g, c);
        br_if(g, d, self.number_l);
        goto(g, fail);

        place(g, string);
        self.string(g);
        goto(g, self.scalar_l);

        place(g, open);
        let depth = g.get(self.depth);
        let deep =
            g.b.ins()
                .icmp_imm_s(IntCC::SignedGreaterThanOrEqual, depth, MAX_DEPTH);
        br_if(g, deep, fail);
        let is_obj = Self::eq(g, c, b'{');
        let kobj = k(g, K_OBJECT);
        let karr = k(g, K_ARRAY);
        let kind = g.b.ins().select(is_obj, kobj, karr);
        let nd = g.get(self.node);
        let none = k(g, NONE);
        nset(g, self.nodes, nd, F_KIND, kind);
        nset(g, self.nodes, nd, F_A, none);
        nset(g, self.nodes, nd, F_B, none);
        let d1 = g.b.ins().iadd_imm_s(depth, 1);
        g.set(self.depth, d1);
        g.set(self.cur, nd);
        self.advance(g, 1);
        self.skip_ws(g);
        let c2 = self.peek(g);
        let cobj = k(g, i64::from(b'}'));
        let carr = k(g, i64::from(b']'));
        let closing = g.b.ins().select(is_obj, cobj, carr);
        let is_close = g.b.ins().icmp(IntCC::Equal, c2, closing);
        br_if(g, is_close, self.close_l);
        branch(g, is_obj, self.key_l, self.value_l);

        // A finished scalar: its canonical text is `vstart..cl`.
        place(g, self.scalar_l);
        let nd = g.get(self.node);
        let s = g.get(self.vstart);
        let e = g.get(self.cl);
        let len = g.b.ins().isub(e, s);
        let ks = k(g, K_SCALAR);
        nset(g, self.nodes, nd, F_KIND, ks);
        nset(g, self.nodes, nd, F_A, s);
        nset(g, self.nodes, nd, F_B, len);
        goto(g, self.after_l);
    }

    fn state_key(&self, g: &mut Gen<'_>) {
        let fail = self.fail_l;
        place(g, self.key_l);
        let c = self.peek(g);
        let nq = Self::ne(g, c, b'"');
        br_if(g, nq, fail);
        let s = g.get(self.cl);
        self.string(g);
        let e = g.get(self.cl);
        let len = g.b.ins().isub(e, s);
        g.set(self.koff, s);
        g.set(self.klen, len);
        self.skip_ws(g);
        let c = self.peek(g);
        let nc = Self::ne(g, c, b':');
        br_if(g, nc, fail);
        self.advance(g, 1);
        self.skip_ws(g);
        goto(g, self.value_l);
    }

    fn state_after(&self, g: &mut Gen<'_>) {
        let fail = self.fail_l;
        let top_end = label(g);
        place(g, self.after_l);
        self.skip_ws(g);
        let cu = g.get(self.cur);
        let at_top = g.b.ins().icmp_imm_s(IntCC::Equal, cu, NONE);
        br_if(g, at_top, top_end);
        let c = self.peek(g);
        let kind = nget(g, self.nodes, cu, F_KIND);
        let is_obj = g.b.ins().icmp_imm_s(IntCC::Equal, kind, K_OBJECT);
        let cobj = k(g, i64::from(b'}'));
        let carr = k(g, i64::from(b']'));
        let closing = g.b.ins().select(is_obj, cobj, carr);
        let is_close = g.b.ins().icmp(IntCC::Equal, c, closing);
        br_if(g, is_close, self.close_l);
        let nc = Self::ne(g, c, b',');
        br_if(g, nc, fail);
        self.advance(g, 1);
        self.skip_ws(g);
        branch(g, is_obj, self.key_l, self.value_l);

        place(g, top_end);
        let p = g.get(self.pos);
        let all = g.b.ins().icmp(IntCC::Equal, p, self.blen);
        branch(g, all, self.success_l, fail);

        place(g, self.close_l);
        self.advance(g, 1);
        let cu = g.get(self.cur);
        let parent = nget(g, self.nodes, cu, F_PARENT);
        g.set(self.cur, parent);
        let d = g.get(self.depth);
        let d1 = g.b.ins().iadd_imm_s(d, -1);
        g.set(self.depth, d1);
        goto(g, self.after_l);
    }

    /// `-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?`, optional parts taken only when complete. Ints are
    /// copied (`-0` -> `0`); floats are rewritten as Python's repr (module docs).
    fn state_number(&self, g: &mut Gen<'_>) {
        let fail = self.fail_l;
        let scalar = self.scalar_l;
        place(g, self.number_l);
        let start = g.get(self.pos);
        let c0 = self.peek_at(g, start);
        let neg = Self::eq(g, c0, b'-');
        let negp = g.b.ins().uextend(g.ptr, neg);
        let ip = g.b.ins().iadd(start, negp);
        g.set(self.pos, ip);
        let c = self.peek_at(g, ip);
        let zero_l = label(g);
        let digits_l = label(g);
        let int_done = label(g);
        let z = Self::eq(g, c, b'0');
        br_if(g, z, zero_l);
        let d = Self::is_digit(g, c);
        branch(g, d, digits_l, fail);
        place(g, zero_l);
        let ip1 = g.b.ins().iadd_imm_s(ip, 1);
        g.set(self.pos, ip1);
        goto(g, int_done);
        place(g, digits_l);
        self.digits(g, self.pos);
        bind(g, int_done);
        let ie = g.get(self.pos);
        let fs = g.var(g.ptr, ie);
        let fe = g.var(g.ptr, ie);
        let zero = k(g, 0);
        let isf = g.var(g.ptr, zero);
        let ev = g.var(g.ptr, zero);
        // Fraction.
        let c = self.peek_at(g, ie);
        let ie1 = g.b.ins().iadd_imm_s(ie, 1);
        let c1 = self.peek_at(g, ie1);
        let dot = Self::eq(g, c, b'.');
        let dig = Self::is_digit(g, c1);
        let frac = g.b.ins().band(dot, dig);
        g.if_then(frac, |g| {
            g.set(self.pos, ie1);
            self.digits(g, self.pos);
            g.set(fs, ie1);
            let e = g.get(self.pos);
            g.set(fe, e);
            let one = k(g, 1);
            g.set(isf, one);
        });
        // Exponent.
        let p2 = g.get(self.pos);
        let c = self.peek_at(g, p2);
        let le = Self::eq(g, c, b'e');
        let ue = Self::eq(g, c, b'E');
        let is_e = g.b.ins().bor(le, ue);
        g.if_then(is_e, |g| {
            let e1 = g.b.ins().iadd_imm_s(p2, 1);
            let cs = self.peek_at(g, e1);
            let plus = Self::eq(g, cs, b'+');
            let minus = Self::eq(g, cs, b'-');
            let sg = g.b.ins().bor(plus, minus);
            let sgp = g.b.ins().uextend(g.ptr, sg);
            let e2 = g.b.ins().iadd(e1, sgp);
            let cd = self.peek_at(g, e2);
            let has = Self::is_digit(g, cd);
            g.if_then(has, |g| {
                let cur = g.var(g.ptr, e2);
                let zero = k(g, 0);
                let acc = g.var(g.ptr, zero);
                let top = label(g);
                let done = label(g);
                bind(g, top);
                let v = g.get(cur);
                let c = self.peek_at(g, v);
                let dv = g.b.ins().iadd_imm_s(c, -48);
                let isd = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, dv, 10);
                let not = g.b.ins().icmp_imm_s(IntCC::Equal, isd, 0);
                br_if(g, not, done);
                // Saturates: anything past 1e8 is out of every range that matters.
                let a = g.get(acc);
                let big =
                    g.b.ins()
                        .icmp_imm_s(IntCC::UnsignedGreaterThan, a, 100_000_000);
                let a10 = g.b.ins().imul_imm_s(a, 10);
                let a10 = g.b.ins().iadd(a10, dv);
                let a2 = g.b.ins().select(big, a, a10);
                g.set(acc, a2);
                let v1 = g.b.ins().iadd_imm_s(v, 1);
                g.set(cur, v1);
                goto(g, top);
                place(g, done);
                let a = g.get(acc);
                let na = g.b.ins().ineg(a);
                let sv = g.b.ins().select(minus, na, a);
                g.set(ev, sv);
                let v = g.get(cur);
                g.set(self.pos, v);
                let one = k(g, 1);
                g.set(isf, one);
            });
        });
        let float_l = label(g);
        let f = g.get(isf);
        br_if(g, f, float_l);
        // Int: verbatim, except that Python's int("-0") is 0.
        let p = g.get(self.pos);
        let ln = g.b.ins().isub(p, start);
        let two = g.b.ins().icmp_imm_s(IntCC::Equal, ln, 2);
        let s1 = g.b.ins().iadd_imm_s(start, 1);
        let c1 = self.peek_at(g, s1);
        let z1 = Self::eq(g, c1, b'0');
        let m0 = g.b.ins().band(two, neg);
        let m0 = g.b.ins().band(m0, z1);
        g.if_else(
            m0,
            |g| self.wr_lit(g, b"0"),
            |g| {
                let src = g.b.ins().iadd(self.body, start);
                self.cput(g, src, ln);
            },
        );
        goto(g, scalar);

        // Float: significant digits D and the decimal exponent X of the first one.
        place(g, float_l);
        let hard_l = label(g);
        let inf_l = label(g);
        let zero_l = label(g);
        let exp_l = label(g);
        let small_l = label(g);
        let split_l = label(g);
        let nint = g.b.ins().isub(ie, ip);
        let fsv = g.get(fs);
        let fev = g.get(fe);
        let nfrac = g.b.ins().isub(fev, fsv);
        let tot = g.b.ins().iadd(nint, nfrac);
        let body = self.body;
        // Index of digit `t` of int digits ++ fraction digits.
        let digit_at = |g: &mut Gen<'_>, t: Value| {
            let in_int = g.b.ins().icmp(IntCC::UnsignedLessThan, t, nint);
            let a = g.b.ins().iadd(ip, t);
            let fb = g.b.ins().isub(fsv, nint);
            let b = g.b.ins().iadd(fb, t);
            let at = g.b.ins().select(in_int, a, b);
            ld8(g, body, at)
        };
        let first = g.var(g.ptr, tot);
        let zero = k(g, 0);
        let last = g.var(g.ptr, zero);
        g.for_n(tot, |g, t| {
            let dch = digit_at(g, t);
            let nz = Self::ne(g, dch, b'0');
            g.if_then(nz, |g| {
                let fv = g.get(first);
                let unset = g.b.ins().icmp(IntCC::Equal, fv, tot);
                let f2 = g.b.ins().select(unset, t, fv);
                g.set(first, f2);
                g.set(last, t);
            });
        });
        let fv = g.get(first);
        let lv = g.get(last);
        let all_zero = g.b.ins().icmp(IntCC::Equal, fv, tot);
        br_if(g, all_zero, zero_l);
        let n = g.b.ins().isub(lv, fv);
        let n = g.b.ins().iadd_imm_s(n, 1);
        let many = g.b.ins().icmp_imm_s(IntCC::UnsignedGreaterThan, n, 15);
        br_if(g, many, hard_l);
        let tmp = self.tmp;
        g.for_n(n, |g, t| {
            let tt = g.b.ins().iadd(fv, t);
            let dch = digit_at(g, tt);
            st8(g, tmp, t, dch);
        });
        let e = g.get(ev);
        let x = g.b.ins().iadd(e, nint);
        let x = g.b.ins().isub(x, fv);
        let x = g.b.ins().iadd_imm_s(x, -1);
        let z0 = k(g, 0);
        let d0 = ld8(g, tmp, z0);
        // Overflow: from X = 309 on, or at X = 308 above the largest 15-digit value below
        // DBL_MAX (1.79769313486231e308; the next one, ...232e308, is past DBL_MAX plus half an
        // ulp). D is compared digit by digit, padded with zeros to 15 digits.
        let over =
            g.b.ins()
                .icmp_imm_s(IntCC::SignedGreaterThanOrEqual, x, 309);
        let at308 = g.b.ins().icmp_imm_s(IntCC::Equal, x, 308);
        let mut lt = g.b.ins().iconst(types::I8, 0);
        let mut gt = g.b.ins().iconst(types::I8, 0);
        for (t, &limit) in b"179769313486231".iter().enumerate() {
            let ti = t as i64;
            let dt = g.b.ins().iadd_imm_s(tmp, ti);
            let dt = g.b.ins().uload8(g.ptr, mem(), dt, 0);
            let inside = g.b.ins().icmp_imm_s(IntCC::UnsignedGreaterThan, n, ti);
            let zc = k(g, i64::from(b'0'));
            let dt = g.b.ins().select(inside, dt, zc);
            let open = g.b.ins().bor(lt, gt);
            let less =
                g.b.ins()
                    .icmp_imm_s(IntCC::UnsignedLessThan, dt, i64::from(limit));
            let more =
                g.b.ins()
                    .icmp_imm_s(IntCC::UnsignedGreaterThan, dt, i64::from(limit));
            let less = g.b.ins().band_not(less, open);
            let more = g.b.ins().band_not(more, open);
            lt = g.b.ins().bor(lt, less);
            gt = g.b.ins().bor(gt, more);
        }
        let at308 = g.b.ins().band(at308, gt);
        let inf = g.b.ins().bor(over, at308);
        br_if(g, inf, inf_l);
        let under = g.b.ins().icmp_imm_s(IntCC::SignedLessThanOrEqual, x, -325);
        br_if(g, under, zero_l);
        let subn = g.b.ins().icmp_imm_s(IntCC::SignedLessThanOrEqual, x, -308);
        br_if(g, subn, hard_l);
        g.if_then(neg, |g| self.wr_lit(g, b"-"));
        let lo = g.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, x, -4);
        let hi = g.b.ins().icmp_imm_s(IntCC::SignedLessThan, x, 16);
        let positional = g.b.ins().band(lo, hi);
        let not_pos = g.b.ins().icmp_imm_s(IntCC::Equal, positional, 0);
        br_if(g, not_pos, exp_l);
        let below1 = g.b.ins().icmp_imm_s(IntCC::SignedLessThan, x, 0);
        br_if(g, below1, small_l);
        let ip1 = g.b.ins().iadd_imm_s(x, 1);
        let split = g.b.ins().icmp(IntCC::UnsignedGreaterThan, n, ip1);
        br_if(g, split, split_l);
        // All digits before the point: D, zeros, ".0".
        self.cput(g, tmp, n);
        let zeros = g.b.ins().isub(ip1, n);
        g.for_n(zeros, |g, _| self.wr_lit(g, b"0"));
        self.wr_lit(g, b".0");
        goto(g, scalar);

        place(g, split_l);
        self.cput(g, tmp, ip1);
        self.wr_lit(g, b".");
        let rest = g.b.ins().iadd(tmp, ip1);
        let rn = g.b.ins().isub(n, ip1);
        self.cput(g, rest, rn);
        goto(g, scalar);

        place(g, small_l);
        self.wr_lit(g, b"0.");
        let zeros = g.b.ins().ineg(x);
        let zeros = g.b.ins().iadd_imm_s(zeros, -1);
        g.for_n(zeros, |g, _| self.wr_lit(g, b"0"));
        self.cput(g, tmp, n);
        goto(g, scalar);

        place(g, exp_l);
        self.wr(g, d0);
        let more = g.b.ins().icmp_imm_s(IntCC::UnsignedGreaterThan, n, 1);
        g.if_then(more, |g| {
            self.wr_lit(g, b".");
            let rest = g.b.ins().iadd_imm_s(tmp, 1);
            let rn = g.b.ins().iadd_imm_s(n, -1);
            self.cput(g, rest, rn);
        });
        self.wr_lit(g, b"e");
        let xneg = g.b.ins().icmp_imm_s(IntCC::SignedLessThan, x, 0);
        let mc = k(g, i64::from(b'-'));
        let pc = k(g, i64::from(b'+'));
        let sc = g.b.ins().select(xneg, mc, pc);
        self.wr(g, sc);
        let nx = g.b.ins().ineg(x);
        let ax = g.b.ins().select(xneg, nx, x);
        let hundreds =
            g.b.ins()
                .icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, ax, 100);
        g.if_then(hundreds, |g| {
            let h = g.b.ins().udiv_imm_s(ax, 100);
            let ch = g.b.ins().iadd_imm_s(h, 48);
            self.wr(g, ch);
        });
        let tens = g.b.ins().udiv_imm_s(ax, 10);
        let t10 = g.b.ins().udiv_imm_s(tens, 10);
        let t10 = g.b.ins().imul_imm_s(t10, 10);
        let td = g.b.ins().isub(tens, t10);
        let ch = g.b.ins().iadd_imm_s(td, 48);
        self.wr(g, ch);
        let u10 = g.b.ins().imul_imm_s(tens, 10);
        let ud = g.b.ins().isub(ax, u10);
        let ch = g.b.ins().iadd_imm_s(ud, 48);
        self.wr(g, ch);
        goto(g, scalar);

        place(g, inf_l);
        g.if_then(neg, |g| self.wr_lit(g, b"-"));
        self.wr_lit(g, b"Infinity");
        goto(g, scalar);

        place(g, zero_l);
        g.if_then(neg, |g| self.wr_lit(g, b"-"));
        self.wr_lit(g, b"0.0");
        goto(g, scalar);

        place(g, hard_l);
        let one = k(g, 1);
        g.set(self.hard, one);
        goto(g, scalar);
    }

    /// Stores `*out_len = w` and returns OK or TOO_SMALL.
    fn finish(&self, g: &mut Gen<'_>, w: Value) {
        g.b.ins().store(mem(), w, self.out_len, 0);
        let fits = g.b.ins().icmp(IntCC::UnsignedLessThanOrEqual, w, self.cap);
        let ok = g.b.ins().iconst(types::I32, i64::from(STATUS_OK));
        let small = g.b.ins().iconst(types::I32, i64::from(STATUS_TOO_SMALL));
        let st = g.b.ins().select(fits, ok, small);
        g.ret(&[st]);
    }

    fn put1(&self, g: &mut Gen<'_>, w: Variable, c: Value) {
        put1(g, self.out, self.cap, w, c);
    }

    fn put_span(&self, g: &mut Gen<'_>, w: Variable, off: Value, len: Value) {
        let wv = g.get(w);
        let src = g.b.ins().iadd(self.cbuf, off);
        let w2 = g
            .call(self.put, &[self.out, self.cap, wv, src, len])
            .expect("put returns");
        g.set(w, w2);
    }

    fn state_success(&self, g: &mut Gen<'_>) {
        let nodes = self.nodes;
        place(g, self.success_l);
        let h = g.get(self.hard);
        g.if_then(h, |g| {
            let zero = k(g, 0);
            g.b.ins().store(mem(), zero, self.out_len, 0);
            let st = g.b.ins().iconst(types::I32, i64::from(STATUS_INEXACT));
            g.ret(&[st]);
        });
        let root = k(g, 0);
        if self.restore_names {
            let rk = nget(g, nodes, root, F_KIND);
            let is_arr = g.b.ins().icmp_imm_s(IntCC::Equal, rk, K_ARRAY);
            let is_obj = g.b.ins().icmp_imm_s(IntCC::Equal, rk, K_OBJECT);
            g.if_then(is_arr, |g| {
                let first = nget(g, nodes, root, F_A);
                let m = g.var(g.ptr, first);
                let top = label(g);
                let done = label(g);
                bind(g, top);
                let mv = g.get(m);
                let end = g.b.ins().icmp_imm_s(IntCC::Equal, mv, NONE);
                br_if(g, end, done);
                let kind = nget(g, nodes, mv, F_KIND);
                let obj = g.b.ins().icmp_imm_s(IntCC::Equal, kind, K_OBJECT);
                g.if_then(obj, |g| {
                    let c = g.get(self.cl);
                    let c2 = g
                        .call(self.restore, &[nodes, self.cbuf, c, mv])
                        .expect("restore returns");
                    g.set(self.cl, c2);
                });
                let nx = nget(g, nodes, mv, F_NEXT);
                g.set(m, nx);
                goto(g, top);
                place(g, done);
            });
            g.if_then(is_obj, |g| {
                let c = g.get(self.cl);
                let c2 = g
                    .call(self.restore, &[nodes, self.cbuf, c, root])
                    .expect("restore returns");
                g.set(self.cl, c2);
            });
        }
        // Serialize: pre-order walk over the reachable nodes with parent links.
        let zero = k(g, 0);
        let w = g.var(g.ptr, zero);
        let nd = g.var(g.ptr, zero);
        let visit = label(g);
        let next = label(g);
        let done = label(g);
        let cont = label(g);
        let down = label(g);
        let up = label(g);
        bind(g, visit);
        let n = g.get(nd);
        let kl = nget(g, nodes, n, F_KLEN);
        let member = g.b.ins().icmp_imm_s(IntCC::NotEqual, kl, NONE);
        g.if_then(member, |g| {
            let ko = nget(g, nodes, n, F_KOFF);
            self.put_span(g, w, ko, kl);
            let colon = k(g, i64::from(b':'));
            self.put1(g, w, colon);
        });
        let kind = nget(g, nodes, n, F_KIND);
        let container = g.b.ins().icmp_imm_s(IntCC::NotEqual, kind, K_SCALAR);
        br_if(g, container, cont);
        let a = nget(g, nodes, n, F_A);
        let b = nget(g, nodes, n, F_B);
        self.put_span(g, w, a, b);
        goto(g, next);

        place(g, cont);
        let is_obj = g.b.ins().icmp_imm_s(IntCC::Equal, kind, K_OBJECT);
        let ob = k(g, i64::from(b'{'));
        let ab = k(g, i64::from(b'['));
        let open = g.b.ins().select(is_obj, ob, ab);
        self.put1(g, w, open);
        let first = nget(g, nodes, n, F_A);
        let has = g.b.ins().icmp_imm_s(IntCC::NotEqual, first, NONE);
        br_if(g, has, down);
        let oc = k(g, i64::from(b'}'));
        let ac = k(g, i64::from(b']'));
        let close = g.b.ins().select(is_obj, oc, ac);
        self.put1(g, w, close);
        goto(g, next);
        place(g, down);
        g.set(nd, first);
        goto(g, visit);

        place(g, next);
        let n = g.get(nd);
        let is_root = g.b.ins().icmp_imm_s(IntCC::Equal, n, 0);
        br_if(g, is_root, done);
        let parent = nget(g, nodes, n, F_PARENT);
        let sib = nget(g, nodes, n, F_NEXT);
        let last = g.b.ins().icmp_imm_s(IntCC::Equal, sib, NONE);
        br_if(g, last, up);
        let comma = k(g, i64::from(b','));
        self.put1(g, w, comma);
        g.set(nd, sib);
        goto(g, visit);
        place(g, up);
        let pk = nget(g, nodes, parent, F_KIND);
        let pobj = g.b.ins().icmp_imm_s(IntCC::Equal, pk, K_OBJECT);
        let oc = k(g, i64::from(b'}'));
        let ac = k(g, i64::from(b']'));
        let close = g.b.ins().select(pobj, oc, ac);
        self.put1(g, w, close);
        g.set(nd, parent);
        goto(g, next);

        place(g, done);
        let wv = g.get(w);
        self.finish(g, wv);
    }

    /// Not JSON: the text with snake names replaced, longest first, one pass per name.
    fn state_fail(&self, g: &mut Gen<'_>) {
        place(g, self.fail_l);
        let zero = k(g, 0);
        if self.passes.is_empty() {
            let w = g
                .call(self.put, &[self.out, self.cap, zero, self.body, self.blen])
                .expect("put returns");
            self.finish(g, w);
            return;
        }
        let mut src = self.body;
        let mut n = self.blen;
        for (i, &(so, sl, oo, ol)) in self.passes.iter().enumerate() {
            let last = i + 1 == self.passes.len();
            let (dst, cap) = if last {
                (self.out, self.cap)
            } else if i % 2 == 0 {
                (self.buf_a, self.huge)
            } else {
                (self.buf_b, self.huge)
            };
            let pat = g.b.ins().iadd_imm_s(self.names, so);
            let rep = g.b.ins().iadd_imm_s(self.names, oo);
            let plen = k(g, sl);
            let rlen = k(g, ol);
            n = g
                .call(self.replace, &[src, n, dst, cap, pat, plen, rep, rlen])
                .expect("replace returns");
            src = dst;
        }
        self.finish(g, n);
    }
}
