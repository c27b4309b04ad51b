//! The generated query tokenizer: SentencePiece BPE encoding as machine code over read-only
//! tables, the same procedure as [`needle_runtime::tokenizer::Tokenizer::encode`] step for step
//! (see the runtime's `TokenizerTables` docs), so that it gives the same ids for every input.
//! A tokenizer loaded from a Hugging Face `tokenizer.json` runs the same phases with the
//! Hugging Face rules the runtime applies there: a `▁` per segment between user-defined symbols
//! (segment prefixes), whole segments taken as they are (`ignore_merges`), merges by rank
//! instead of score (never onto a symbol that starts with `▁` under Metaspace's word splitting), and ids emitted per symbol (byte fallback or one, possibly fused, unknown id
//! for a character outside the vocabulary).
//!
//! Generated C interface (names get the library prefix):
//!
//! ```c
//! size_t tokenize(const uint8_t *text, size_t len, int32_t *ids, size_t max_ids, uint8_t *scratch);
//! ```
//!
//! It writes the first `min(n, max_ids)` ids of the full encoding and returns that count. Outside
//! the preconditions it stays in bounds rather than guessing: `len > max_text_bytes` returns 0,
//! and invalid UTF-8 gives some ids without touching memory past `text`, `ids` or `scratch`.
//!
//! Read-only tables (all integers u32 in the target's byte order):
//! - `pieces`: the texts of the pieces the code ever compares against, concatenated.
//! - `sorted`: `(offset, len, id)` per searchable piece, in byte order of the text (binary search).
//! - `scores` (f32) and `kinds` (u8) per id.
//! - `byte_ids[256]`: the byte-fallback id of each byte, `unk_id` already put where none exists.
//! - `user_defined`: `(offset, len)` per user-defined symbol, longest first (first hit wins).
//! - `unused_slot[id]`: only when the model has `Unused` pieces: each one's slot in the scratch
//!   table that remembers how it was last formed (the reference's `rev_merge`, last entry wins).
//! - `splits`: only for a Hugging Face model: `(result id, left part's length, rank)` per merge,
//!   sorted, for binary search (the runtime's `HfBpe`); a pair's score is `-rank`.
//!
//! Scratch (caller-provided, 16-byte aligned; every region starts at a multiple of 16), for
//! `M = max_text_bytes` and `S = M + 1` symbols at most (one per input byte, plus the dummy
//! prefix):
//! - normalized text: `sp * (M + 1)` bytes, `sp` = 3 (the bytes of `▁`) or 1 (no escaping), plus
//!   `3 * (M + 1)` with segment prefixes (a `▁` per segment, at most one segment per byte);
//! - symbols: `16 * S` (start, len, prev, next as u32) + `S` freeze flags (with segment
//!   prefixes `S = 2 (M + 1)`: a prefix symbol per segment);
//! - merge heap: `16 * 2S` (score, left, right, size): at most `S - 1` initial pairs, and each
//!   merge pops one and pushes at most two, so it never holds more than `2 (S - 1)`;
//! - resegmentation: `16 * unused pieces` + a stack of `8 * (max piece bytes + 2)`.
//!
//! That is about 52 bytes per input byte (850 KiB for 16 KiB of text). Nothing is written
//! anywhere else: the code keeps no state between calls and has no writable globals.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, FuncRef, InstBuilder, Value};
use cranelift_frontend::Variable;
use cranelift_module::{DataId, FuncId};
use needle_runtime::tokenizer::{PieceKind, SegmentPrefix, Tokenizer, NO_ID, SPACE_SYMBOL};

use super::bytes::{
    bytes_equal, cmp_imm, declare_u32_table, flag, load_u32, load_u8, store_u32, store_u8, to_ptr,
    to_u32, while_loop,
};
use super::gen::{mem, mem_ro, Gen};
use super::{CodegenError, KernelSet};
use crate::abi::CType;

/// The generated tokenizer, as the driver needs it.
#[derive(Clone, Copy, Debug)]
pub struct TokenizerCode {
    /// `size_t tokenize(const uint8_t *text, size_t len, int32_t *ids, size_t max_ids,
    /// uint8_t *scratch)`.
    pub encode: FuncId,
    /// Scratch needed for any text of up to `max_text_bytes` (alignment 16).
    pub scratch_bytes: usize,
    pub max_text_bytes: usize,
}

/// Largest supported `max_text_bytes`: every index into the scratch regions must fit a u32
/// (the normalized text is up to 3x the input, the heap 2x its symbols).
const MAX_TEXT_LIMIT: usize = 1 << 26;

/// "No symbol" / "no id" in the u32 fields the code stores (read back zero-extended).
const NONE: i64 = 0xFFFF_FFFF;

/// Bytes of one symbol record and one heap entry.
const SYM: i64 = 16;
const PAIR: i64 = 16;

fn round16(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// Where each scratch region starts, and the capacities the code checks against.
#[derive(Clone, Copy, Debug)]
struct Layout {
    norm: usize,
    syms: usize,
    freeze: usize,
    heap: usize,
    rev: usize,
    stack: usize,
    total: usize,
    sym_cap: usize,
    heap_cap: usize,
    stack_cap: usize,
}

impl Layout {
    /// `segments`: whether segment prefixes (a `▁` per stretch between user-defined symbols,
    /// Hugging Face) can add up to 3 bytes and one symbol per input byte.
    fn new(
        max_text: usize,
        space_len: usize,
        segments: bool,
        n_unused: usize,
        max_piece: usize,
    ) -> Self {
        let per_byte = if segments { 2 } else { 1 };
        let sym_cap = per_byte * (max_text + 1);
        let heap_cap = 2 * sym_cap;
        // Resegmentation splits a symbol (at most max(max_piece, 4) bytes: a piece or one
        // character) into halves of at least one byte each, so the stack never holds more
        // entries than that symbol has bytes.
        let stack_cap = max_piece.max(4) + 2;
        let norm = 0;
        let prefixes = if segments { SPACE_SYMBOL.len() } else { 0 };
        let syms = norm + round16((space_len + prefixes) * (max_text + 1));
        let freeze = syms + round16(SYM as usize * sym_cap);
        let heap = freeze + round16(sym_cap);
        let rev = heap + round16(PAIR as usize * heap_cap);
        let stack = rev + round16(16 * n_unused);
        let total = stack + round16(8 * stack_cap);
        Layout {
            norm,
            syms,
            freeze,
            heap,
            rev,
            stack,
            total,
            sym_cap,
            heap_cap,
            stack_cap,
        }
    }
}

/// The tables, declared in `ks`.
struct Tables {
    pieces: DataId,
    sorted: DataId,
    n_sorted: usize,
    scores: DataId,
    kinds: DataId,
    bytes: DataId,
    user_defined: Option<(DataId, usize)>,
    unused_slot: Option<DataId>,
    n_unused: usize,
    max_piece: usize,
    /// Hugging Face merges: `(result id, left length, rank)` per merge and their count.
    splits: Option<(DataId, usize)>,
}

fn declare_tables(ks: &mut KernelSet, tok: &Tokenizer) -> Result<Tables, CodegenError> {
    let t = tok.tables();
    let n = t.scores.len();
    if n == 0 || t.kinds.len() != n || t.piece_offsets.len() != n + 1 {
        return Err(CodegenError::Invalid(
            "tokenizer tables have inconsistent sizes".into(),
        ));
    }
    if n >= i32::MAX as usize {
        return Err(CodegenError::Invalid(format!(
            "tokenizer: {n} pieces do not fit int32_t ids"
        )));
    }
    let range = |id: u32| -> Result<(u32, u32), CodegenError> {
        let i = id as usize;
        match (t.piece_offsets.get(i), t.piece_offsets.get(i + 1)) {
            (Some(&a), Some(&b)) if a <= b && b as usize <= t.pieces.len() => Ok((a, b - a)),
            _ => Err(CodegenError::Invalid(format!(
                "tokenizer: piece {id} has no valid text range"
            ))),
        }
    };
    let mut sorted = Vec::with_capacity(3 * t.sorted.len());
    let mut max_piece = 0usize;
    for &id in &t.sorted {
        let (off, len) = range(id)?;
        max_piece = max_piece.max(len as usize);
        sorted.extend([off, len, id]);
    }
    let mut ud = Vec::with_capacity(2 * t.user_defined.len());
    for &id in &t.user_defined {
        let (off, len) = range(id)?;
        if len == 0 {
            return Err(CodegenError::Invalid(format!(
                "tokenizer: user-defined piece {id} is empty"
            )));
        }
        ud.extend([off, len]);
    }
    // Only pieces the lookup can find can become merged symbols.
    let unused: Vec<u32> = t
        .sorted
        .iter()
        .copied()
        .filter(|&id| t.kinds[id as usize] == PieceKind::Unused as u8)
        .collect();
    let unk = t.unk_id;
    if unk as usize >= n {
        return Err(CodegenError::Invalid(format!(
            "tokenizer: unknown id {unk} is out of range"
        )));
    }
    let byte_ids = t.byte_ids.map(|b| if b == NO_ID { unk } else { b });

    let pieces = ks.declare_rodata("tokenize_pieces", t.pieces.as_bytes().to_vec(), 16)?;
    let sorted = declare_u32_table(ks, "tokenize_sorted", sorted, 16)?;
    let scores = ks.declare_f32_data("tokenize_scores", &t.scores)?;
    let kinds = ks.declare_rodata("tokenize_kinds", t.kinds.clone(), 16)?;
    let bytes = declare_u32_table(ks, "tokenize_byte_ids", byte_ids, 16)?;
    let user_defined = if t.user_defined.is_empty() {
        None
    } else {
        Some((
            declare_u32_table(ks, "tokenize_user_defined", ud, 16)?,
            t.user_defined.len(),
        ))
    };
    let unused_slot = if unused.is_empty() {
        None
    } else {
        let mut slot = vec![NONE as u32; n];
        for (k, &id) in unused.iter().enumerate() {
            slot[id as usize] = to_u32(k, "tokenizer: unused pieces")?;
        }
        Some(declare_u32_table(ks, "tokenize_unused_slot", slot, 16)?)
    };
    let splits = match &t.hf {
        Some(hf) if !hf.splits.is_empty() => {
            let flat: Vec<u32> = hf.splits.iter().flatten().copied().collect();
            Some((
                declare_u32_table(ks, "tokenize_splits", flat, 16)?,
                hf.splits.len(),
            ))
        }
        _ => None,
    };
    Ok(Tables {
        splits,
        pieces,
        sorted,
        n_sorted: t.sorted.len(),
        scores,
        kinds,
        bytes,
        user_defined,
        unused_slot,
        n_unused: unused.len(),
        max_piece,
    })
}

/// Builds the tokenizer for `tok` into `ks`: the exported (if `export`) function `tokenize` and
/// two internal helpers, with their tables.
pub fn define_tokenizer(
    ks: &mut KernelSet,
    tok: &Tokenizer,
    max_text_bytes: usize,
    export: bool,
) -> Result<TokenizerCode, CodegenError> {
    if max_text_bytes > MAX_TEXT_LIMIT {
        return Err(CodegenError::Invalid(format!(
            "tokenizer: max_text_bytes {max_text_bytes} is above the supported {MAX_TEXT_LIMIT}"
        )));
    }
    let t = tok.tables();
    let tabs = declare_tables(ks, tok)?;
    let space: &[u8] = if t.escape_whitespaces {
        needle_runtime::tokenizer::SPACE_SYMBOL.as_bytes()
    } else {
        b" "
    };
    let segments = t.segment_prefix != SegmentPrefix::None;
    let layout = Layout::new(
        max_text_bytes,
        space.len(),
        segments,
        tabs.n_unused,
        tabs.max_piece,
    );

    let lookup = define_lookup(ks, &tabs)?;
    let rank = match tabs.splits {
        Some((data, count)) => Some(define_rank(ks, data, count)?),
        None => None,
    };
    let ud = match tabs.user_defined {
        Some((data, count)) => Some(define_user_defined(ks, tabs.pieces, data, count)?),
        None => None,
    };

    let scratch_doc = format!(
        "scratch: {} bytes, 16-byte aligned; text must be valid UTF-8 of at most {max_text_bytes} bytes",
        layout.total
    );
    let encode = ks.declare_function(
        "tokenize",
        &[
            "Encodes text with the model's SentencePiece tokenizer; writes the first",
            "min(n, max_ids) of its n ids to ids and returns that count.",
            &scratch_doc,
        ],
        &[
            (CType::ConstU8Ptr, "text"),
            (CType::SizeT, "len"),
            (CType::I32Ptr, "ids"),
            (CType::SizeT, "max_ids"),
            (CType::U8Ptr, "scratch"),
        ],
        CType::SizeT,
        export,
    )?;
    let mut data = vec![tabs.scores, tabs.kinds, tabs.bytes];
    if let Some(slot) = tabs.unused_slot {
        data.push(slot);
    }
    let mut callees = vec![lookup];
    if let Some(ud) = ud {
        callees.push(ud);
    }
    if let Some(rank) = rank {
        callees.push(rank);
    }
    let flags = Flags {
        add_dummy_prefix: t.add_dummy_prefix,
        remove_extra_whitespaces: t.remove_extra_whitespaces,
        byte_fallback: t.byte_fallback,
        unk_id: i64::from(t.unk_id),
        space: space.to_vec(),
        max_text: max_text_bytes as i64,
        segment_prefix: t.segment_prefix,
        hf: t.hf.as_ref().map(|h| HfFlags {
            ignore_merges: h.ignore_merges,
            fuse_unk: h.fuse_unk,
            has_unk: h.has_unk,
            split_at_space: h.split_at_space,
        }),
    };
    ks.define_function(encode, &data, &callees, |g, a, d, f| {
        let imports = Imports {
            scores: d.get(tabs.scores),
            kinds: d.get(tabs.kinds),
            byte_ids: d.get(tabs.bytes),
            unused_slot: tabs.unused_slot.map(|slot| d.get(slot)),
            lookup: f.get(lookup),
            ud: ud.map(|ud| f.get(ud)),
            rank: rank.map(|r| f.get(r)),
        };
        Some(encode_body(g, a, &imports, &flags, &layout))
    })?;
    Ok(TokenizerCode {
        encode,
        scratch_bytes: layout.total,
        max_text_bytes,
    })
}

/// Build-time settings baked into the code.
struct Flags {
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    byte_fallback: bool,
    unk_id: i64,
    space: Vec<u8>,
    max_text: i64,
    segment_prefix: SegmentPrefix,
    /// Hugging Face BPE (merges by rank), or sentencepiece's (by score).
    hf: Option<HfFlags>,
}

/// The Hugging Face model's switches (see the runtime's `HfBpe`).
#[derive(Clone, Copy)]
struct HfFlags {
    ignore_merges: bool,
    fuse_unk: bool,
    has_unk: bool,
    split_at_space: bool,
}

/// What `tokenize` addresses and calls, looked up by id in its [`super::kernels::DataAddrs`]
/// and [`super::kernels::Callees`].
struct Imports {
    scores: Value,
    kinds: Value,
    byte_ids: Value,
    unused_slot: Option<Value>,
    lookup: FuncRef,
    ud: Option<FuncRef>,
    rank: Option<FuncRef>,
}

// ---- internal functions ---------------------------------------------------------------------

/// `size_t tokenize_lookup(const uint8_t *s, size_t len)`: the id of the searchable piece whose
/// text is exactly `s[0..len]`, or 0xFFFFFFFF. Binary search over `sorted` in plain byte order,
/// as the runtime's `lookup`.
fn define_lookup(ks: &mut KernelSet, tabs: &Tables) -> Result<FuncId, CodegenError> {
    let id = ks.declare_function(
        "tokenize_lookup",
        &[],
        &[(CType::ConstU8Ptr, "s"), (CType::SizeT, "len")],
        CType::SizeT,
        false,
    )?;
    let (n_sorted, max_piece) = (tabs.n_sorted as i64, tabs.max_piece as i64);
    ks.define_function(id, &[tabs.pieces, tabs.sorted], &[], |g, a, d, _| {
        let (s, len) = (a[0], a[1]);
        let (pieces, sorted) = (d.get(tabs.pieces), d.get(tabs.sorted));
        let none = g.iconst(NONE);
        // No piece is longer than max_piece: long runs of unmergeable text end here at once.
        let too_long = cmp_imm(g, IntCC::UnsignedGreaterThan, len, max_piece);
        g.if_then(too_long, |g| g.ret(&[none]));
        let lo = g.iconst(0);
        let lo = g.var(g.ptr, lo);
        let hi = g.iconst(n_sorted);
        let hi = g.var(g.ptr, hi);
        while_loop(
            g,
            |g| {
                let (l, h) = (g.get(lo), g.get(hi));
                g.icmp(IntCC::UnsignedLessThan, l, h)
            },
            |g| {
                let (l, h) = (g.get(lo), g.get(hi));
                let sum = g.b.ins().iadd(l, h);
                let mid = g.b.ins().ushr_imm_u(sum, 1);
                let e = g.addr(sorted, mid, 12);
                let off = load_u32(g, mem_ro(), e, 0);
                let plen = load_u32(g, mem_ro(), e, 4);
                let p = g.b.ins().iadd(pieces, off);
                // Compare piece p[0..plen] with s[0..len]: first differing byte, else length.
                let shorter = g.icmp(IntCC::UnsignedLessThan, plen, len);
                let common = g.b.ins().select(shorter, plen, len);
                let i = g.iconst(0);
                let i = g.var(g.ptr, i);
                // 0: equal so far, 1: piece < s, 2: piece > s.
                let ord = g.iconst(0);
                let ord = g.var(g.ptr, ord);
                while_loop(
                    g,
                    |g| {
                        let iv = g.get(i);
                        let more = g.icmp(IntCC::UnsignedLessThan, iv, common);
                        let o = g.get(ord);
                        let undecided = cmp_imm(g, IntCC::Equal, o, 0);
                        g.b.ins().band(more, undecided)
                    },
                    |g| {
                        let iv = g.get(i);
                        let pa = g.b.ins().iadd(p, iv);
                        let pb = g.b.ins().iadd(s, iv);
                        let x = load_u8(g, mem_ro(), pa, 0);
                        let y = load_u8(g, mem(), pb, 0);
                        let lt = g.icmp(IntCC::UnsignedLessThan, x, y);
                        let gt = g.icmp(IntCC::UnsignedGreaterThan, x, y);
                        let lt = to_ptr(g, lt);
                        let gt = to_ptr(g, gt);
                        let gt2 = g.b.ins().ishl_imm_u(gt, 1);
                        let o = g.b.ins().bor(lt, gt2);
                        g.set(ord, o);
                        let next = g.b.ins().iadd_imm_s(iv, 1);
                        g.set(i, next);
                    },
                );
                let o = g.get(ord);
                let undecided = cmp_imm(g, IntCC::Equal, o, 0);
                g.if_then(undecided, |g| {
                    let lt = g.icmp(IntCC::UnsignedLessThan, plen, len);
                    let gt = g.icmp(IntCC::UnsignedGreaterThan, plen, len);
                    let lt = to_ptr(g, lt);
                    let gt = to_ptr(g, gt);
                    let gt2 = g.b.ins().ishl_imm_u(gt, 1);
                    let o = g.b.ins().bor(lt, gt2);
                    g.set(ord, o);
                });
                let o = g.get(ord);
                let found = cmp_imm(g, IntCC::Equal, o, 0);
                g.if_then(found, |g| {
                    let id = load_u32(g, mem_ro(), e, 8);
                    g.ret(&[id]);
                });
                let less = cmp_imm(g, IntCC::Equal, o, 1);
                g.if_else(
                    less,
                    |g| {
                        let m1 = g.b.ins().iadd_imm_s(mid, 1);
                        g.set(lo, m1);
                    },
                    |g| g.set(hi, mid),
                );
            },
        );
        Some(none)
    })?;
    Ok(id)
}

/// `size_t tokenize_match_user_defined(const uint8_t *s, size_t len)`: the length of the longest
/// user-defined symbol that `s[0..len]` starts with, or 0 (the table is longest first, so the
/// first hit is the answer).
fn define_user_defined(
    ks: &mut KernelSet,
    pieces: DataId,
    table: DataId,
    count: usize,
) -> Result<FuncId, CodegenError> {
    let id = ks.declare_function(
        "tokenize_match_user_defined",
        &[],
        &[(CType::ConstU8Ptr, "s"), (CType::SizeT, "len")],
        CType::SizeT,
        false,
    )?;
    ks.define_function(id, &[pieces, table], &[], |g, a, d, _| {
        let (s, len, pieces, table) = (a[0], a[1], d.get(pieces), d.get(table));
        g.for_const(0, count as i64, 1, |g, k| {
            let e = g.addr(table, k, 8);
            let off = load_u32(g, mem_ro(), e, 0);
            let plen = load_u32(g, mem_ro(), e, 4);
            let fits = g.icmp(IntCC::UnsignedLessThanOrEqual, plen, len);
            g.if_then(fits, |g| {
                let p = g.b.ins().iadd(pieces, off);
                let eq = bytes_equal(g, mem_ro(), p, s, plen);
                let hit = cmp_imm(g, IntCC::NotEqual, eq, 0);
                g.if_then(hit, |g| g.ret(&[plen]));
            });
        });
        Some(g.iconst(0))
    })?;
    Ok(id)
}

/// `size_t tokenize_rank(size_t id, size_t left_len)`: the rank of the Hugging Face merge that
/// makes piece `id` from a left part of `left_len` bytes, or 0xFFFFFFFF. Binary search over the
/// `(id, left_len, rank)` triples, as the runtime's `HfBpe::rank`.
fn define_rank(ks: &mut KernelSet, table: DataId, count: usize) -> Result<FuncId, CodegenError> {
    let id = ks.declare_function(
        "tokenize_rank",
        &[],
        &[(CType::SizeT, "id"), (CType::SizeT, "left_len")],
        CType::SizeT,
        false,
    )?;
    ks.define_function(id, &[table], &[], |g, a, d, _| {
        let (want_id, want_len, table) = (a[0], a[1], d.get(table));
        let lo = g.iconst(0);
        let lo = g.var(g.ptr, lo);
        let hi = g.iconst(count as i64);
        let hi = g.var(g.ptr, hi);
        while_loop(
            g,
            |g| {
                let (l, h) = (g.get(lo), g.get(hi));
                g.icmp(IntCC::UnsignedLessThan, l, h)
            },
            |g| {
                let (l, h) = (g.get(lo), g.get(hi));
                let sum = g.b.ins().iadd(l, h);
                let mid = g.b.ins().ushr_imm_u(sum, 1);
                let e = g.addr(table, mid, 12);
                let eid = load_u32(g, mem_ro(), e, 0);
                let elen = load_u32(g, mem_ro(), e, 4);
                // entry < wanted: (eid, elen) before (want_id, want_len).
                let id_lt = g.icmp(IntCC::UnsignedLessThan, eid, want_id);
                let id_eq = g.icmp(IntCC::Equal, eid, want_id);
                let len_lt = g.icmp(IntCC::UnsignedLessThan, elen, want_len);
                let len_eq = g.icmp(IntCC::Equal, elen, want_len);
                let tie_lt = g.b.ins().band(id_eq, len_lt);
                let less = g.b.ins().bor(id_lt, tie_lt);
                let found = g.b.ins().band(id_eq, len_eq);
                g.if_then(found, |g| {
                    let r = load_u32(g, mem_ro(), e, 8);
                    g.ret(&[r]);
                });
                g.if_else(
                    less,
                    |g| {
                        let m1 = g.b.ins().iadd_imm_s(mid, 1);
                        g.set(lo, m1);
                    },
                    |g| g.set(hi, mid),
                );
            },
        );
        Some(g.iconst(NONE))
    })?;
    Ok(id)
}

// ---- the encoder ----------------------------------------------------------------------------

/// Everything the pieces of the encoder share: table and scratch addresses (entry-block values,
/// so valid everywhere), the helpers and the heap's fill.
#[derive(Clone, Copy)]
struct Ctx {
    /// The pointer-sized 0 made on entry.
    zero: Value,
    scores: Value,
    kinds: Value,
    byte_ids: Value,
    unused_slot: Option<Value>,
    norm: Value,
    syms: Value,
    freeze: Value,
    heap: Value,
    rev: Value,
    /// The resegmentation stack.
    stack: Value,
    heap_n: Variable,
    heap_cap: i64,
    lookup: FuncRef,
    ud: Option<FuncRef>,
    /// Hugging Face merges by rank (`None` with no merges at all).
    rank: Option<FuncRef>,
    hf: bool,
    /// Metaspace words: a symbol starting with `▁` never merges with its left neighbour.
    split_at_space: bool,
}

/// The runtime's `next_unit`: at `s[0..n]` (n > 0), a user-defined symbol if one matches
/// (frozen), else one UTF-8 character by its lead byte (clamped to n). Returns (length, frozen)
/// as pointer-sized values.
fn next_unit(g: &mut Gen<'_>, c: &Ctx, s: Value, n: Value) -> (Value, Value) {
    let zero = g.iconst(0);
    let ulen = g.var(g.ptr, zero);
    let frozen = g.var(g.ptr, zero);
    if let Some(ud) = c.ud {
        let m = g.call(ud, &[s, n]).unwrap_or(zero);
        g.set(ulen, m);
        let hit = cmp_imm(g, IntCC::NotEqual, m, 0);
        let hit = to_ptr(g, hit);
        g.set(frozen, hit);
    }
    let cur = g.get(ulen);
    let none = cmp_imm(g, IntCC::Equal, cur, 0);
    g.if_then(none, |g| {
        // one_char_len: lead >> 4 of 0xC/0xD: 2, 0xE: 3, 0xF: 4, else 1.
        let lead = load_u8(g, mem(), s, 0);
        let hi = g.b.ins().ushr_imm_u(lead, 4);
        let a = cmp_imm(g, IntCC::UnsignedGreaterThanOrEqual, hi, 0xC);
        let b = cmp_imm(g, IntCC::UnsignedGreaterThanOrEqual, hi, 0xE);
        let d = cmp_imm(g, IntCC::Equal, hi, 0xF);
        let (a, b, d) = (to_ptr(g, a), to_ptr(g, b), to_ptr(g, d));
        let l = g.b.ins().iadd(a, b);
        let l = g.b.ins().iadd(l, d);
        let l = g.b.ins().iadd_imm_s(l, 1);
        let over = g.icmp(IntCC::UnsignedGreaterThan, l, n);
        let l = g.b.ins().select(over, n, l);
        g.set(ulen, l);
    });
    (g.get(ulen), g.get(frozen))
}

/// Whether the symbol record at `e` (of the normalized text) starts with `▁`: 0 / 1, reading only
/// the symbol's own bytes.
fn starts_word(g: &mut Gen<'_>, c: &Ctx, e: Value) -> Value {
    let start = load_u32(g, mem(), e, 0);
    let len = load_u32(g, mem(), e, 4);
    let res = flag(g, false);
    let fits = cmp_imm(
        g,
        IntCC::UnsignedGreaterThanOrEqual,
        len,
        SPACE_SYMBOL.len() as i64,
    );
    g.if_then(fits, |g| {
        let p = g.b.ins().iadd(c.norm, start);
        let hit = flag(g, true);
        for (k, &byte) in SPACE_SYMBOL.as_bytes().iter().enumerate() {
            let b = load_u8(g, mem(), p, k as i32);
            let eq = cmp_imm(g, IntCC::Equal, b, i64::from(byte));
            let eq = to_ptr(g, eq);
            let h = g.get(hit);
            let h = g.b.ins().band(h, eq);
            g.set(hit, h);
        }
        let h = g.get(hit);
        g.set(res, h);
    });
    g.get(res)
}

/// Address of heap entry `i`.
fn pair_at(g: &mut Gen<'_>, c: &Ctx, i: Value) -> Value {
    g.addr(c.heap, i, PAIR)
}

/// Whether the entry at `a` is merged before the one at `b`: higher score, then leftmost.
/// Ordered float compares, exactly Rust's `>` and `==` on f32.
fn pair_before(g: &mut Gen<'_>, a: Value, b: Value) -> Value {
    let sa = g.b.ins().load(types::F32, mem(), a, 0);
    let sb = g.b.ins().load(types::F32, mem(), b, 0);
    let la = load_u32(g, mem(), a, 4);
    let lb = load_u32(g, mem(), b, 4);
    let gt = g.fcmp(FloatCC::GreaterThan, sa, sb);
    let eq = g.fcmp(FloatCC::Equal, sa, sb);
    let left = g.icmp(IntCC::UnsignedLessThan, la, lb);
    let tie = g.b.ins().band(eq, left);
    g.b.ins().bor(gt, tie)
}

fn swap_pairs(g: &mut Gen<'_>, a: Value, b: Value) {
    for off in [0, 8] {
        let x = g.b.ins().load(types::I64, mem(), a, off);
        let y = g.b.ins().load(types::I64, mem(), b, off);
        g.b.ins().store(mem(), y, a, off);
        g.b.ins().store(mem(), x, b, off);
    }
}

/// The runtime's `Agenda::push`: append, then sift up.
fn heap_push(g: &mut Gen<'_>, c: &Ctx, score: Value, left: Value, right: Value, size: Value) {
    let n = g.get(c.heap_n);
    // Never false (see the module docs for the bound); it only guards memory.
    let room = cmp_imm(g, IntCC::UnsignedLessThan, n, c.heap_cap);
    g.if_then(room, |g| {
        let e = pair_at(g, c, n);
        g.b.ins().store(mem(), score, e, 0);
        store_u32(g, left, e, 4);
        store_u32(g, right, e, 8);
        store_u32(g, size, e, 12);
        let n1 = g.b.ins().iadd_imm_s(n, 1);
        g.set(c.heap_n, n1);
        let i = g.var(g.ptr, n);
        let go = flag(g, true);
        while_loop(
            g,
            |g| {
                let iv = g.get(i);
                let pos = cmp_imm(g, IntCC::NotEqual, iv, 0);
                let gv = g.get(go);
                let gv = cmp_imm(g, IntCC::NotEqual, gv, 0);
                g.b.ins().band(pos, gv)
            },
            |g| {
                let iv = g.get(i);
                let im1 = g.b.ins().iadd_imm_s(iv, -1);
                let parent = g.b.ins().ushr_imm_u(im1, 1);
                let ei = pair_at(g, c, iv);
                let ep = pair_at(g, c, parent);
                let before = pair_before(g, ei, ep);
                g.if_else(
                    before,
                    |g| {
                        swap_pairs(g, ei, ep);
                        g.set(i, parent);
                    },
                    |g| {
                        let z = g.iconst(0);
                        g.set(go, z);
                    },
                );
            },
        );
    });
}

/// The runtime's `Agenda::pop` on a non-empty heap: the top entry's (left, right, size).
fn heap_pop(g: &mut Gen<'_>, c: &Ctx) -> (Value, Value, Value) {
    let zero = g.iconst(0);
    let top = pair_at(g, c, zero);
    let left = load_u32(g, mem(), top, 4);
    let right = load_u32(g, mem(), top, 8);
    let size = load_u32(g, mem(), top, 12);
    let n = g.get(c.heap_n);
    let n = g.b.ins().iadd_imm_s(n, -1);
    g.set(c.heap_n, n);
    // swap(0, last) + pop: the last entry moves to the top (a no-op when it is the top).
    let last = pair_at(g, c, n);
    for off in [0, 8] {
        let x = g.b.ins().load(types::I64, mem(), last, off);
        g.b.ins().store(mem(), x, top, off);
    }
    let i = g.var(g.ptr, zero);
    let go = flag(g, true);
    while_loop(
        g,
        |g| g.get(go),
        |g| {
            let iv = g.get(i);
            let twice = g.b.ins().ishl_imm_u(iv, 1);
            let l = g.b.ins().iadd_imm_s(twice, 1);
            let r = g.b.ins().iadd_imm_s(twice, 2);
            let best = g.var(g.ptr, iv);
            for child in [l, r] {
                let inside = g.icmp(IntCC::UnsignedLessThan, child, n);
                g.if_then(inside, |g| {
                    let ec = pair_at(g, c, child);
                    let bv = g.get(best);
                    let eb = pair_at(g, c, bv);
                    let before = pair_before(g, ec, eb);
                    g.if_then(before, |g| g.set(best, child));
                });
            }
            let bv = g.get(best);
            let same = g.icmp(IntCC::Equal, bv, iv);
            g.if_else(
                same,
                |g| {
                    let z = g.iconst(0);
                    g.set(go, z);
                },
                |g| {
                    let ei = pair_at(g, c, iv);
                    let eb = pair_at(g, c, bv);
                    swap_pairs(g, ei, eb);
                    g.set(i, bv);
                },
            );
        },
    );
    (left, right, size)
}

/// The runtime's `add_pair`: if both symbols exist and are not frozen and their concatenation
/// is a mergeable piece, push the pair (and remember how an `Unused` piece was formed).
fn add_pair(g: &mut Gen<'_>, c: &Ctx, left: Value, right: Value) {
    let l_ok = cmp_imm(g, IntCC::NotEqual, left, NONE);
    let r_ok = cmp_imm(g, IntCC::NotEqual, right, NONE);
    let both = g.b.ins().band(l_ok, r_ok);
    // Nested: no symbol is read before both indices are known to be real.
    g.if_then(both, |g| {
        let fl = g.b.ins().iadd(c.freeze, left);
        let fr = g.b.ins().iadd(c.freeze, right);
        let fl = load_u8(g, mem(), fl, 0);
        let fr = load_u8(g, mem(), fr, 0);
        let frozen = g.b.ins().bor(fl, fr);
        let free = cmp_imm(g, IntCC::Equal, frozen, 0);
        g.if_then(free, |g| {
            let sl = g.addr(c.syms, left, SYM);
            let sr = g.addr(c.syms, right, SYM);
            let lstart = load_u32(g, mem(), sl, 0);
            let llen = load_u32(g, mem(), sl, 4);
            let rstart = load_u32(g, mem(), sr, 0);
            let rlen = load_u32(g, mem(), sr, 4);
            let p = g.b.ins().iadd(c.norm, lstart);
            let end = g.b.ins().iadd(rstart, rlen);
            let n = g.b.ins().isub(end, lstart);
            let id = g.call(c.lookup, &[p, n]).unwrap_or(p);
            let found = cmp_imm(g, IntCC::NotEqual, id, NONE);
            if c.hf {
                // Only a listed merge, by rank: score = -rank (exact below 2^24); with
                // Metaspace words, never onto a symbol that starts a word.
                let found = if c.split_at_space {
                    let word = starts_word(g, c, sr);
                    let inside = cmp_imm(g, IntCC::Equal, word, 0);
                    let inside = to_ptr(g, inside);
                    let found = to_ptr(g, found);
                    g.b.ins().band(found, inside)
                } else {
                    found
                };
                if let Some(rank) = c.rank {
                    g.if_then(found, |g| {
                        let r = g.call(rank, &[id, llen]).unwrap_or(id);
                        let listed = cmp_imm(g, IntCC::NotEqual, r, NONE);
                        g.if_then(listed, |g| {
                            let f = g.b.ins().fcvt_from_uint(types::F32, r);
                            let score = g.b.ins().fneg(f);
                            let size = g.b.ins().iadd(llen, rlen);
                            heap_push(g, c, score, left, right, size);
                        });
                    });
                }
                return;
            }
            g.if_then(found, |g| {
                let ka = g.b.ins().iadd(c.kinds, id);
                let kind = load_u8(g, mem_ro(), ka, 0);
                // Mergeable kinds: Normal (1), UserDefined (4), Unused (5).
                let mask = g.iconst(
                    (1 << PieceKind::Normal as i64)
                        | (1 << PieceKind::UserDefined as i64)
                        | (1 << PieceKind::Unused as i64),
                );
                let bit = g.b.ins().ushr(mask, kind);
                let bit = g.b.ins().band_imm_u(bit, 1);
                g.if_then(bit, |g| {
                    let sa = g.addr(c.scores, id, 4);
                    let score = g.b.ins().load(types::F32, mem_ro(), sa, 0);
                    let size = g.b.ins().iadd(llen, rlen);
                    heap_push(g, c, score, left, right, size);
                    if let Some(slots) = c.unused_slot {
                        let unused = cmp_imm(g, IntCC::Equal, kind, PieceKind::Unused as i64);
                        g.if_then(unused, |g| {
                            let sa = g.addr(slots, id, 4);
                            let slot = load_u32(g, mem_ro(), sa, 0);
                            let e = g.addr(c.rev, slot, 16);
                            store_u32(g, lstart, e, 0);
                            store_u32(g, llen, e, 4);
                            store_u32(g, rstart, e, 8);
                            store_u32(g, rlen, e, 12);
                        });
                    }
                });
            });
        });
    });
}

/// The body of `tokenize(text, len, ids, max_ids, scratch)`: argument checks, then the four
/// phases of the runtime's `encode`, each a function below.
fn encode_body(g: &mut Gen<'_>, a: &[Value], imports: &Imports, fl: &Flags, lay: &Layout) -> Value {
    let (text, len, ids, max_ids, scratch) = (a[0], a[1], a[2], a[3], a[4]);
    let zero = g.iconst(0);
    // Nothing to write; also, later code may assume room for one id.
    let no_room = cmp_imm(g, IntCC::Equal, max_ids, 0);
    g.if_then(no_room, |g| g.ret(&[zero]));
    // Outside the precondition: refuse rather than overrun the scratch.
    let too_long = cmp_imm(g, IntCC::UnsignedGreaterThan, len, fl.max_text);
    g.if_then(too_long, |g| g.ret(&[zero]));

    let region = |g: &mut Gen<'_>, off: usize| g.b.ins().iadd_imm_s(scratch, off as i64);
    let heap_n = g.var(g.ptr, zero);
    let c = Ctx {
        zero,
        scores: imports.scores,
        kinds: imports.kinds,
        byte_ids: imports.byte_ids,
        unused_slot: imports.unused_slot,
        norm: region(g, lay.norm),
        syms: region(g, lay.syms),
        freeze: region(g, lay.freeze),
        heap: region(g, lay.heap),
        rev: region(g, lay.rev),
        stack: region(g, lay.stack),
        heap_n,
        heap_cap: lay.heap_cap as i64,
        lookup: imports.lookup,
        ud: imports.ud,
        rank: imports.rank,
        hf: fl.hf.is_some(),
        split_at_space: fl.hf.is_some_and(|h| h.split_at_space),
    };
    let nlen = normalize(g, &c, fl, text, len);
    let (nsyms, nonempty) = split_symbols(g, &c, lay, nlen);
    if fl.hf.is_some_and(|h| h.ignore_merges) {
        take_whole_words(g, &c, nsyms);
    }
    merge(g, &c, lay, nsyms);
    match fl.hf {
        Some(hf) => emit_hf_ids(g, &c, fl, hf, ids, max_ids, nonempty),
        None => emit_ids(g, &c, fl, lay, ids, max_ids, nonempty),
    }
}

/// Phase 1: the normalized text in `norm` (leading, trailing and repeated spaces dropped as the
/// flags say, spaces escaped, the dummy prefix added); returns its length. Returns 0 from
/// `tokenize` when nothing is left.
fn normalize(g: &mut Gen<'_>, c: &Ctx, fl: &Flags, text: Value, len: Value) -> Value {
    let zero = c.zero;
    let space_len = fl.space.len() as i64;
    let inp = g.var(g.ptr, text);
    let n = g.var(g.ptr, len);
    if fl.remove_extra_whitespaces {
        // Drop leading spaces, but not a user-defined symbol that starts with one.
        let go = flag(g, true);
        while_loop(
            g,
            |g| {
                let res = flag(g, false);
                let gv = g.get(go);
                let nv = g.get(n);
                let more = cmp_imm(g, IntCC::NotEqual, nv, 0);
                let gv = cmp_imm(g, IntCC::NotEqual, gv, 0);
                let both = g.b.ins().band(more, gv);
                g.if_then(both, |g| {
                    let p = g.get(inp);
                    let b = load_u8(g, mem(), p, 0);
                    let sp = cmp_imm(g, IntCC::Equal, b, i64::from(b' '));
                    let sp = to_ptr(g, sp);
                    g.set(res, sp);
                });
                g.get(res)
            },
            |g| {
                let (p, nv) = (g.get(inp), g.get(n));
                let (ulen, _) = next_unit(g, c, p, nv);
                let one = cmp_imm(g, IntCC::Equal, ulen, 1);
                g.if_else(
                    one,
                    |g| {
                        let p1 = g.b.ins().iadd_imm_s(p, 1);
                        let n1 = g.b.ins().iadd_imm_s(nv, -1);
                        g.set(inp, p1);
                        g.set(n, n1);
                    },
                    |g| {
                        let z = g.iconst(0);
                        g.set(go, z);
                    },
                );
            },
        );
    }
    let nv = g.get(n);
    let empty = cmp_imm(g, IntCC::Equal, nv, 0);
    g.if_then(empty, |g| g.ret(&[zero]));

    let out = g.var(g.ptr, zero);
    let put_space = |g: &mut Gen<'_>| {
        let o = g.get(out);
        let p = g.b.ins().iadd(c.norm, o);
        for (k, &byte) in fl.space.iter().enumerate() {
            let v = g.iconst(i64::from(byte));
            store_u8(g, v, p, k as i32);
        }
        let o = g.b.ins().iadd_imm_s(o, space_len);
        g.set(out, o);
    };
    if fl.add_dummy_prefix {
        put_space(g);
    }
    let prev_space = flag(g, fl.remove_extra_whitespaces);
    // Segment prefixes: whether the next plain unit starts a segment, and whether a
    // user-defined symbol came before.
    let segments =
        (fl.segment_prefix != SegmentPrefix::None).then(|| (flag(g, true), flag(g, false)));
    while_loop(
        g,
        |g| {
            let nv = g.get(n);
            cmp_imm(g, IntCC::NotEqual, nv, 0)
        },
        |g| {
            let (p, nv) = (g.get(inp), g.get(n));
            let (ulen, frozen) = next_unit(g, c, p, nv);
            if let Some((seg_start, after_symbol)) = segments {
                segment_prefix(g, c, fl, out, (seg_start, after_symbol), p, ulen, frozen);
            }
            let sp = g.var(g.ptr, p);
            let splen = g.var(g.ptr, ulen);
            let ps = g.get(prev_space);
            let ps = cmp_imm(g, IntCC::NotEqual, ps, 0);
            g.if_then(ps, |g| {
                // After a space, the unit's own leading spaces go.
                while_loop(
                    g,
                    |g| {
                        let res = flag(g, false);
                        let l = g.get(splen);
                        let more = cmp_imm(g, IntCC::NotEqual, l, 0);
                        g.if_then(more, |g| {
                            let q = g.get(sp);
                            let b = load_u8(g, mem(), q, 0);
                            let is = cmp_imm(g, IntCC::Equal, b, i64::from(b' '));
                            let is = to_ptr(g, is);
                            g.set(res, is);
                        });
                        g.get(res)
                    },
                    |g| {
                        let q = g.get(sp);
                        let q = g.b.ins().iadd_imm_s(q, 1);
                        g.set(sp, q);
                        let l = g.get(splen);
                        let l = g.b.ins().iadd_imm_s(l, -1);
                        g.set(splen, l);
                    },
                );
            });
            let l = g.get(splen);
            let some = cmp_imm(g, IntCC::NotEqual, l, 0);
            g.if_then(some, |g| {
                let q = g.get(sp);
                g.for_n(l, |g, i| {
                    let pa = g.b.ins().iadd(q, i);
                    let b = load_u8(g, mem(), pa, 0);
                    let is = cmp_imm(g, IntCC::Equal, b, i64::from(b' '));
                    g.if_else(
                        is,
                        |g| put_space(g),
                        |g| {
                            let o = g.get(out);
                            let pd = g.b.ins().iadd(c.norm, o);
                            store_u8(g, b, pd, 0);
                            let o = g.b.ins().iadd_imm_s(o, 1);
                            g.set(out, o);
                        },
                    );
                });
                let lastp = g.b.ins().iadd(q, l);
                let last = g.b.ins().load(types::I8, mem(), lastp, -1);
                let is = cmp_imm(g, IntCC::Equal, last, i64::from(b' '));
                let is = to_ptr(g, is);
                g.set(prev_space, is);
            });
            let p1 = g.b.ins().iadd(p, ulen);
            let n1 = g.b.ins().isub(nv, ulen);
            g.set(inp, p1);
            g.set(n, n1);
            if !fl.remove_extra_whitespaces {
                let z = g.iconst(0);
                g.set(prev_space, z);
            }
        },
    );
    if fl.remove_extra_whitespaces {
        // Trailing spaces go, including `▁`s that were literally in the input.
        let go = flag(g, true);
        while_loop(
            g,
            |g| g.get(go),
            |g| {
                let o = g.get(out);
                let fits = cmp_imm(g, IntCC::UnsignedGreaterThanOrEqual, o, space_len);
                let z = g.iconst(0);
                g.set(go, z);
                g.if_then(fits, |g| {
                    let start = g.b.ins().iadd_imm_s(o, -space_len);
                    let base = g.b.ins().iadd(c.norm, start);
                    let hit = flag(g, true);
                    for (k, &byte) in fl.space.iter().enumerate() {
                        let b = load_u8(g, mem(), base, k as i32);
                        let eq = cmp_imm(g, IntCC::Equal, b, i64::from(byte));
                        let eq = to_ptr(g, eq);
                        let h = g.get(hit);
                        let h = g.b.ins().band(h, eq);
                        g.set(hit, h);
                    }
                    let h = g.get(hit);
                    g.if_then(h, |g| {
                        g.set(out, start);
                        let one = g.iconst(1);
                        g.set(go, one);
                    });
                });
            },
        );
    }
    g.get(out)
}

/// The runtime's segment prefix at a unit of `ulen` bytes at `p`: a user-defined symbol (`frozen`)
/// starts a new segment; the first plain unit of a segment gets a `▁` in front as the rule says.
#[allow(clippy::too_many_arguments)]
fn segment_prefix(
    g: &mut Gen<'_>,
    c: &Ctx,
    fl: &Flags,
    out: Variable,
    (seg_start, after_symbol): (Variable, Variable),
    p: Value,
    ulen: Value,
    frozen: Value,
) {
    let is_frozen = cmp_imm(g, IntCC::NotEqual, frozen, 0);
    g.if_else(
        is_frozen,
        |g| {
            let one = g.iconst(1);
            g.set(seg_start, one);
            g.set(after_symbol, one);
        },
        |g| {
            let ss = g.get(seg_start);
            let ss = cmp_imm(g, IntCC::NotEqual, ss, 0);
            g.if_then(ss, |g| {
                let z = g.iconst(0);
                g.set(seg_start, z);
                // Whether the unit is a space or `▁` (read only as far as the unit goes).
                let spacey = flag(g, false);
                let b0 = load_u8(g, mem(), p, 0);
                let one = cmp_imm(g, IntCC::Equal, ulen, 1);
                let sp = cmp_imm(g, IntCC::Equal, b0, i64::from(b' '));
                let is_sp = g.b.ins().band(one, sp);
                let is_sp = to_ptr(g, is_sp);
                g.set(spacey, is_sp);
                let three = cmp_imm(g, IntCC::Equal, ulen, SPACE_SYMBOL.len() as i64);
                g.if_then(three, |g| {
                    let hit = flag(g, true);
                    for (k, &byte) in SPACE_SYMBOL.as_bytes().iter().enumerate() {
                        let b = load_u8(g, mem(), p, k as i32);
                        let eq = cmp_imm(g, IntCC::Equal, b, i64::from(byte));
                        let eq = to_ptr(g, eq);
                        let h = g.get(hit);
                        let h = g.b.ins().band(h, eq);
                        g.set(hit, h);
                    }
                    let h = g.get(hit);
                    g.set(spacey, h);
                });
                let s = g.get(spacey);
                let not_spacey = cmp_imm(g, IntCC::Equal, s, 0);
                let not_spacey = to_ptr(g, not_spacey);
                let put = match fl.segment_prefix {
                    SegmentPrefix::None => g.iconst(0),
                    SegmentPrefix::Always => g.iconst(1),
                    SegmentPrefix::UnlessSpace => not_spacey,
                    SegmentPrefix::FirstUnlessSpace => {
                        let a = g.get(after_symbol);
                        let first = cmp_imm(g, IntCC::Equal, a, 0);
                        let first = to_ptr(g, first);
                        g.b.ins().band(not_spacey, first)
                    }
                };
                g.if_then(put, |g| {
                    let o = g.get(out);
                    let pd = g.b.ins().iadd(c.norm, o);
                    for (k, &byte) in SPACE_SYMBOL.as_bytes().iter().enumerate() {
                        let v = g.iconst(i64::from(byte));
                        store_u8(g, v, pd, k as i32);
                    }
                    let o = g.b.ins().iadd_imm_s(o, SPACE_SYMBOL.len() as i64);
                    g.set(out, o);
                });
            });
        },
    );
}

/// Phase 2: one symbol per unit of the normalized text (`nlen` bytes), linked in order, with
/// user-defined symbols frozen. Returns the symbol count and whether it is non-zero.
fn split_symbols(g: &mut Gen<'_>, c: &Ctx, lay: &Layout, nlen: Value) -> (Value, Value) {
    let zero = c.zero;
    let count = g.var(g.ptr, zero);
    let pos = g.var(g.ptr, zero);
    let sym_cap = lay.sym_cap as i64;
    while_loop(
        g,
        |g| {
            let (pv, sv) = (g.get(pos), g.get(count));
            let more = g.icmp(IntCC::UnsignedLessThan, pv, nlen);
            // Valid UTF-8 never reaches the cap (one symbol per input character at most).
            let room = cmp_imm(g, IntCC::UnsignedLessThan, sv, sym_cap);
            g.b.ins().band(more, room)
        },
        |g| {
            let (pv, sv) = (g.get(pos), g.get(count));
            let p = g.b.ins().iadd(c.norm, pv);
            let rest = g.b.ins().isub(nlen, pv);
            let (ulen, frozen) = next_unit(g, c, p, rest);
            let e = g.addr(c.syms, sv, SYM);
            store_u32(g, pv, e, 0);
            store_u32(g, ulen, e, 4);
            let first = cmp_imm(g, IntCC::Equal, sv, 0);
            let none = g.iconst(NONE);
            let prev = g.b.ins().iadd_imm_s(sv, -1);
            let prev = g.b.ins().select(first, none, prev);
            store_u32(g, prev, e, 8);
            let end = g.b.ins().iadd(pv, ulen);
            let inside = g.icmp(IntCC::UnsignedLessThan, end, nlen);
            let next = g.b.ins().iadd_imm_s(sv, 1);
            let next = g.b.ins().select(inside, next, none);
            store_u32(g, next, e, 12);
            let fa = g.b.ins().iadd(c.freeze, sv);
            store_u8(g, frozen, fa, 0);
            let sv1 = g.b.ins().iadd_imm_s(sv, 1);
            g.set(count, sv1);
            g.set(pos, end);
        },
    );
    let nsyms = g.get(count);
    // The last symbol written may have been cut short by the cap: end the list there.
    let some = cmp_imm(g, IntCC::NotEqual, nsyms, 0);
    g.if_then(some, |g| {
        let last = g.b.ins().iadd_imm_s(nsyms, -1);
        let e = g.addr(c.syms, last, SYM);
        let none = g.iconst(NONE);
        store_u32(g, none, e, 12);
    });
    (nsyms, some)
}

/// Hugging Face's `ignore_merges`, as the runtime's `take_whole_words`: each stretch of unfrozen
/// symbols whose whole text is a vocabulary entry becomes one frozen symbol.
fn take_whole_words(g: &mut Gen<'_>, c: &Ctx, nsyms: Value) {
    let i = g.var(g.ptr, c.zero);
    let frozen_at = |g: &mut Gen<'_>, k: Value| {
        let fa = g.b.ins().iadd(c.freeze, k);
        load_u8(g, mem(), fa, 0)
    };
    while_loop(
        g,
        |g| {
            let iv = g.get(i);
            g.icmp(IntCC::UnsignedLessThan, iv, nsyms)
        },
        |g| {
            let iv = g.get(i);
            let f = frozen_at(g, iv);
            let fz = cmp_imm(g, IntCC::NotEqual, f, 0);
            g.if_else(
                fz,
                |g| {
                    let i1 = g.b.ins().iadd_imm_s(iv, 1);
                    g.set(i, i1);
                },
                |g| {
                    // j: the last symbol of the stretch.
                    let j = g.var(g.ptr, iv);
                    while_loop(
                        g,
                        |g| {
                            let res = flag(g, false);
                            let jv = g.get(j);
                            let j1 = g.b.ins().iadd_imm_s(jv, 1);
                            let inside = g.icmp(IntCC::UnsignedLessThan, j1, nsyms);
                            g.if_then(inside, |g| {
                                let f = frozen_at(g, j1);
                                let free = cmp_imm(g, IntCC::Equal, f, 0);
                                let free = to_ptr(g, free);
                                let free = if c.split_at_space {
                                    let e = g.addr(c.syms, j1, SYM);
                                    let word = starts_word(g, c, e);
                                    let same = cmp_imm(g, IntCC::Equal, word, 0);
                                    let same = to_ptr(g, same);
                                    g.b.ins().band(free, same)
                                } else {
                                    free
                                };
                                g.set(res, free);
                            });
                            g.get(res)
                        },
                        |g| {
                            let jv = g.get(j);
                            let j1 = g.b.ins().iadd_imm_s(jv, 1);
                            g.set(j, j1);
                        },
                    );
                    let jv = g.get(j);
                    let si = g.addr(c.syms, iv, SYM);
                    let sj = g.addr(c.syms, jv, SYM);
                    let start = load_u32(g, mem(), si, 0);
                    let jstart = load_u32(g, mem(), sj, 0);
                    let jlen = load_u32(g, mem(), sj, 4);
                    let end = g.b.ins().iadd(jstart, jlen);
                    let n = g.b.ins().isub(end, start);
                    let p = g.b.ins().iadd(c.norm, start);
                    let id = g.call(c.lookup, &[p, n]).unwrap_or(p);
                    let found = cmp_imm(g, IntCC::NotEqual, id, NONE);
                    g.if_then(found, |g| {
                        store_u32(g, n, si, 4);
                        let jnext = load_u32(g, mem(), sj, 12);
                        store_u32(g, jnext, si, 12);
                        let one = g.iconst(1);
                        let fa = g.b.ins().iadd(c.freeze, iv);
                        store_u8(g, one, fa, 0);
                        let has_next = cmp_imm(g, IntCC::NotEqual, jnext, NONE);
                        g.if_then(has_next, |g| {
                            let sn = g.addr(c.syms, jnext, SYM);
                            store_u32(g, iv, sn, 8);
                        });
                        let i1 = g.b.ins().iadd_imm_s(iv, 1);
                        let j1 = g.b.ins().iadd_imm_s(jv, 1);
                        g.for_range(i1, j1, 1, |g, k| {
                            let sk = g.addr(c.syms, k, SYM);
                            let z = g.iconst(0);
                            store_u32(g, z, sk, 4);
                        });
                    });
                    let j1 = g.b.ins().iadd_imm_s(jv, 1);
                    g.set(i, j1);
                },
            );
        },
    );
}

/// Phase 3: BPE merges of the `nsyms` symbols, best-scoring pair first, through the heap.
fn merge(g: &mut Gen<'_>, c: &Ctx, lay: &Layout, nsyms: Value) {
    if c.unused_slot.is_some() {
        // Forget how Unused pieces were formed in an earlier call.
        g.for_const(0, (lay.stack - lay.rev) as i64, 8, |g, i| {
            let p = g.b.ins().iadd(c.rev, i);
            let z = g.b.ins().iconst(types::I64, 0);
            g.b.ins().store(mem(), z, p, 0);
        });
    }
    let one = g.iconst(1);
    g.for_range(one, nsyms, 1, |g, i| {
        let im1 = g.b.ins().iadd_imm_s(i, -1);
        add_pair(g, c, im1, i);
    });
    while_loop(
        g,
        |g| {
            let hn = g.get(c.heap_n);
            cmp_imm(g, IntCC::NotEqual, hn, 0)
        },
        |g| {
            let (left, right, size) = heap_pop(g, c);
            let sl = g.addr(c.syms, left, SYM);
            let sr = g.addr(c.syms, right, SYM);
            let llen = load_u32(g, mem(), sl, 4);
            let rlen = load_u32(g, mem(), sr, 4);
            let sum = g.b.ins().iadd(llen, rlen);
            let a_ok = cmp_imm(g, IntCC::NotEqual, llen, 0);
            let b_ok = cmp_imm(g, IntCC::NotEqual, rlen, 0);
            let s_ok = g.icmp(IntCC::Equal, sum, size);
            let ok = g.b.ins().band(a_ok, b_ok);
            let ok = g.b.ins().band(ok, s_ok);
            // Otherwise a stale entry: one side was merged away or grew since it was pushed.
            g.if_then(ok, |g| {
                let lprev = load_u32(g, mem(), sl, 8);
                let rnext = load_u32(g, mem(), sr, 12);
                store_u32(g, sum, sl, 4);
                store_u32(g, rnext, sl, 12);
                let has_next = cmp_imm(g, IntCC::NotEqual, rnext, NONE);
                g.if_then(has_next, |g| {
                    let sn = g.addr(c.syms, rnext, SYM);
                    store_u32(g, left, sn, 8);
                });
                let z = g.iconst(0);
                store_u32(g, z, sr, 4);
                add_pair(g, c, lprev, left);
                add_pair(g, c, left, rnext);
            });
        },
    );
}

/// Phase 4: the ids of the surviving symbols in order into `ids` (resegmenting `Unused` pieces,
/// byte fallback or the unknown id for pieces not in the vocabulary); returns the count written,
/// returning early from `tokenize` once `max_ids` are written. `nonempty`: any symbols at all.
fn emit_ids(
    g: &mut Gen<'_>,
    c: &Ctx,
    fl: &Flags,
    lay: &Layout,
    ids: Value,
    max_ids: Value,
    nonempty: Value,
) -> Value {
    let zero = c.zero;
    let (stack, byte_ids) = (c.stack, c.byte_ids);
    let written = g.var(g.ptr, zero);
    let emit = |g: &mut Gen<'_>, id: Value| {
        // `written < max_ids` holds here: the call returns as soon as they are equal.
        let w = g.get(written);
        let p = g.addr(ids, w, 4);
        store_u32(g, id, p, 0);
        let w1 = g.b.ins().iadd_imm_s(w, 1);
        g.set(written, w1);
        let full = g.icmp(IntCC::Equal, w1, max_ids);
        g.if_then(full, |g| g.ret(&[w1]));
    };
    let first = g.iconst(0);
    let none = g.iconst(NONE);
    let first = g.b.ins().select(nonempty, first, none);
    let idx = g.var(g.ptr, first);
    let sp = g.var(g.ptr, zero);
    let stack_cap = lay.stack_cap as i64;
    let push = |g: &mut Gen<'_>, start: Value, slen: Value| {
        let s = g.get(sp);
        let e = g.addr(stack, s, 8);
        store_u32(g, start, e, 0);
        store_u32(g, slen, e, 4);
        let s1 = g.b.ins().iadd_imm_s(s, 1);
        g.set(sp, s1);
    };
    while_loop(
        g,
        |g| {
            let i = g.get(idx);
            cmp_imm(g, IntCC::NotEqual, i, NONE)
        },
        |g| {
            let i = g.get(idx);
            let e = g.addr(c.syms, i, SYM);
            let start = load_u32(g, mem(), e, 0);
            let slen = load_u32(g, mem(), e, 4);
            let next = load_u32(g, mem(), e, 12);
            push(g, start, slen);
            while_loop(
                g,
                |g| {
                    let s = g.get(sp);
                    cmp_imm(g, IntCC::NotEqual, s, 0)
                },
                |g| {
                    let s = g.get(sp);
                    let s = g.b.ins().iadd_imm_s(s, -1);
                    g.set(sp, s);
                    let e = g.addr(stack, s, 8);
                    let st = load_u32(g, mem(), e, 0);
                    let ln = load_u32(g, mem(), e, 4);
                    let p = g.b.ins().iadd(c.norm, st);
                    let id = g.call(c.lookup, &[p, ln]).unwrap_or(p);
                    let found = cmp_imm(g, IntCC::NotEqual, id, NONE);
                    // Unknown (2) unless found: then the piece's kind.
                    let unknown = PieceKind::Unknown as i64;
                    let k0 = g.iconst(unknown);
                    let kind = g.var(g.ptr, k0);
                    g.if_then(found, |g| {
                        let ka = g.b.ins().iadd(c.kinds, id);
                        let k = load_u8(g, mem_ro(), ka, 0);
                        g.set(kind, k);
                    });
                    let handled = flag(g, false);
                    if let Some(slots) = c.unused_slot {
                        // Resegmentation: an Unused piece goes back to the halves it was last
                        // formed from, if it was formed in this text at all.
                        let k = g.get(kind);
                        let unused = cmp_imm(g, IntCC::Equal, k, PieceKind::Unused as i64);
                        g.if_then(unused, |g| {
                            let sa = g.addr(slots, id, 4);
                            let slot = load_u32(g, mem_ro(), sa, 0);
                            let r = g.addr(c.rev, slot, 16);
                            let ll = load_u32(g, mem(), r, 4);
                            let formed = cmp_imm(g, IntCC::NotEqual, ll, 0);
                            let s = g.get(sp);
                            // Never false (see the module docs); it only guards memory.
                            let room = cmp_imm(g, IntCC::UnsignedLessThanOrEqual, s, stack_cap - 2);
                            let go = g.b.ins().band(formed, room);
                            g.if_then(go, |g| {
                                let ls = load_u32(g, mem(), r, 0);
                                let rs = load_u32(g, mem(), r, 8);
                                let rl = load_u32(g, mem(), r, 12);
                                push(g, rs, rl);
                                push(g, ls, ll);
                                let one = g.iconst(1);
                                g.set(handled, one);
                            });
                        });
                    }
                    let h = g.get(handled);
                    let todo = cmp_imm(g, IntCC::Equal, h, 0);
                    g.if_then(todo, |g| {
                        let k = g.get(kind);
                        let known = cmp_imm(g, IntCC::NotEqual, k, unknown);
                        g.if_else(
                            known,
                            |g| emit(g, id),
                            |g| {
                                if fl.byte_fallback {
                                    g.for_n(ln, |g, j| {
                                        let q = g.b.ins().iadd(p, j);
                                        let b = load_u8(g, mem(), q, 0);
                                        let ba = g.addr(byte_ids, b, 4);
                                        let bid = load_u32(g, mem_ro(), ba, 0);
                                        emit(g, bid);
                                    });
                                } else {
                                    let unk = g.iconst(fl.unk_id);
                                    emit(g, unk);
                                }
                            },
                        );
                    });
                },
            );
            g.set(idx, next);
        },
    );
    g.get(written)
}

/// Phase 4 for a Hugging Face model, as the runtime's `hf_ids`: each surviving symbol's id; a
/// symbol outside the vocabulary (a single character) gives its bytes' pieces with byte
/// fallback, else the unknown id (once per run with `fuse_unk`). Returns the count written,
/// returning early from `tokenize` once `max_ids` are written.
fn emit_hf_ids(
    g: &mut Gen<'_>,
    c: &Ctx,
    fl: &Flags,
    hf: HfFlags,
    ids: Value,
    max_ids: Value,
    nonempty: Value,
) -> Value {
    let zero = c.zero;
    let written = g.var(g.ptr, zero);
    let emit = |g: &mut Gen<'_>, id: Value| {
        // `written < max_ids` holds here: the call returns as soon as they are equal.
        let w = g.get(written);
        let p = g.addr(ids, w, 4);
        store_u32(g, id, p, 0);
        let w1 = g.b.ins().iadd_imm_s(w, 1);
        g.set(written, w1);
        let full = g.icmp(IntCC::Equal, w1, max_ids);
        g.if_then(full, |g| g.ret(&[w1]));
    };
    let first = g.iconst(0);
    let none = g.iconst(NONE);
    let first = g.b.ins().select(nonempty, first, none);
    let idx = g.var(g.ptr, first);
    let prev_unknown = flag(g, false);
    while_loop(
        g,
        |g| {
            let i = g.get(idx);
            cmp_imm(g, IntCC::NotEqual, i, NONE)
        },
        |g| {
            let i = g.get(idx);
            let e = g.addr(c.syms, i, SYM);
            let start = load_u32(g, mem(), e, 0);
            let slen = load_u32(g, mem(), e, 4);
            let next = load_u32(g, mem(), e, 12);
            let p = g.b.ins().iadd(c.norm, start);
            let id = g.call(c.lookup, &[p, slen]).unwrap_or(p);
            let found = cmp_imm(g, IntCC::NotEqual, id, NONE);
            g.if_else(
                found,
                |g| {
                    emit(g, id);
                    let z = g.iconst(0);
                    g.set(prev_unknown, z);
                },
                |g| {
                    if fl.byte_fallback {
                        g.for_n(slen, |g, j| {
                            let q = g.b.ins().iadd(p, j);
                            let b = load_u8(g, mem(), q, 0);
                            let ba = g.addr(c.byte_ids, b, 4);
                            let bid = load_u32(g, mem_ro(), ba, 0);
                            emit(g, bid);
                        });
                    } else if hf.has_unk {
                        let pu = g.get(prev_unknown);
                        let skip = if hf.fuse_unk {
                            cmp_imm(g, IntCC::NotEqual, pu, 0)
                        } else {
                            cmp_imm(g, IntCC::NotEqual, zero, 0)
                        };
                        let put = cmp_imm(g, IntCC::Equal, skip, 0);
                        g.if_then(put, |g| {
                            let unk = g.iconst(fl.unk_id);
                            emit(g, unk);
                        });
                        let one = g.iconst(1);
                        g.set(prev_unknown, one);
                    }
                },
            );
            g.set(idx, next);
        },
    );
    g.get(written)
}
