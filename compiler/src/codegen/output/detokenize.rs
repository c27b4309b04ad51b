//! `detokenize(ids, n, out)`: the text of generated ids exactly as `Tokenizer::decode`
//! (`needle_runtime::tokenizer`) gives it, from three read-only tables built here: per-id flags,
//! piece offsets and the pieces' surface bytes.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_module::DataId;
use needle_runtime::tokenizer::{PieceKind, Tokenizer, SPACE_SYMBOL};

use super::utf8_seq;
use crate::codegen::bytes::{
    bind, br_if, byte_at, copy_bytes, declare_u32_table, goto, label, place, set_byte_at, to_u32,
    u32_at,
};
use crate::codegen::gen::{mem, mem_ro, Gen};
use crate::codegen::kernels::DataAddrs;
use crate::codegen::{CodegenError, KernelSet};

/// Piece flags.
const P_BYTE: u8 = 1;
const P_STRIP: u8 = 2;
const P_SKIP: u8 = 4;

/// The detokenizer's tables, declared in the object.
pub(super) struct PieceTables {
    /// Per id (plus one never-read entry): `P_*` flags.
    pub flags: DataId,
    /// Per id plus one: where its surface starts in `bytes` (u32).
    pub offsets: DataId,
    /// The surfaces, concatenated: a byte piece's byte value, a normal piece's text with `▁` as
    /// a space, nothing for control pieces.
    pub bytes: DataId,
    /// Most bytes one id adds to the output.
    pub max_piece: usize,
}

/// `<0xNN>` with uppercase hex, as the runtime parses byte pieces.
fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 || !hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'A'..=b'F')) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Builds and declares the tables for `tok`.
pub(super) fn declare_piece_tables(
    ks: &mut KernelSet,
    tok: &Tokenizer,
) -> Result<PieceTables, CodegenError> {
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
    Ok(PieceTables {
        flags: ks.declare_rodata("output_piece_flags", flags, 1)?,
        offsets: declare_u32_table(ks, "output_piece_offsets", offsets, 4)?,
        bytes: ks.declare_rodata("output_piece_bytes", surfaces, 1)?,
        max_piece,
    })
}

/// Byte pieces are buffered in `out` itself, byte `j` of a run at `base + 3 * j` where `base` is
/// `max_piece_bytes` times the id index where the run began: the output written so far never
/// passes `max_piece_bytes` per id consumed, and decoding writes at most 3 bytes per byte read,
/// so writes stay behind the bytes still to be read (see the flush).
pub(super) fn detokenize_body(
    g: &mut Gen<'_>,
    a: &[Value],
    d: &DataAddrs,
    tables: &PieceTables,
    vocab: i64,
    mpb: i64,
    remove_extra: bool,
) -> Value {
    let (ids, n, out) = (a[0], a[1], a[2]);
    let (flags, offs, surf) = (
        d.get(tables.flags),
        d.get(tables.offsets),
        d.get(tables.bytes),
    );
    let zero = g.iconst(0);
    let one = g.iconst(1);
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
            let zero = g.iconst(0);
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
                    byte_at(g, mem(), bv, safe)
                })
                .collect();
            let invalid = g.b.ins().icmp_imm_s(IntCC::Equal, len, 0);
            let ov = g.get(o);
            g.if_else(
                invalid,
                |g| {
                    for (m, byte) in [0xEFi64, 0xBF, 0xBD].into_iter().enumerate() {
                        let c = g.iconst(byte);
                        let at = g.b.ins().iadd_imm_s(ov, m as i64);
                        set_byte_at(g, out, at, c);
                    }
                    let o2 = g.b.ins().iadd_imm_s(ov, 3);
                    g.set(o, o2);
                    let j2 = g.b.ins().iadd_imm_s(jv, 1);
                    g.set(j, j2);
                },
                |g| {
                    set_byte_at(g, out, ov, bytes[0]);
                    for (m, &byte) in bytes.iter().enumerate().skip(1) {
                        let more =
                            g.b.ins()
                                .icmp_imm_s(IntCC::UnsignedGreaterThan, len, m as i64);
                        g.if_then(more, |g| {
                            let at = g.b.ins().iadd_imm_s(ov, m as i64);
                            set_byte_at(g, out, at, byte);
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
            let zero = g.iconst(0);
            g.set(pend, zero);
        });
    };

    g.for_n(n, |g, i| {
        let next = label(g);
        let id = u32_at(g, mem(), ids, i);
        let outside =
            g.b.ins()
                .icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, id, vocab);
        br_if(g, outside, next);
        let fl = byte_at(g, mem_ro(), flags, id);
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
            let at = u32_at(g, mem_ro(), offs, id);
            let byte = byte_at(g, mem_ro(), surf, at);
            let bv = g.get(base);
            let slot = g.b.ins().imul_imm_s(pv, 3);
            let at = g.b.ins().iadd(out, bv);
            set_byte_at(g, at, slot, byte);
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
        let zero = g.iconst(0);
        let bos2 = g.b.ins().select(ends, zero, bv);
        g.set(bos, bos2);
        g.set(bos_seen, zero);
        let start = u32_at(g, mem_ro(), offs, id);
        let id1 = g.b.ins().iadd_imm_s(id, 1);
        let end = u32_at(g, mem_ro(), offs, id1);
        let strip = g.b.ins().band_imm_s(fl, i64::from(P_STRIP));
        let strip = g.b.ins().icmp_imm_s(IntCC::NotEqual, strip, 0);
        let bos_nz = g.b.ins().icmp_imm_s(IntCC::NotEqual, bos2, 0);
        let strip = g.b.ins().band(strip, bos_nz);
        let sv = g.var(g.ptr, start);
        g.if_then(strip, |g| {
            let s1 = g.b.ins().iadd_imm_s(start, 1);
            g.set(sv, s1);
            // With extra-whitespace removal every leading `▁` goes.
            let seen = g.iconst(if remove_extra { 0 } else { 1 });
            g.set(bos_seen, seen);
        });
        let s = g.get(sv);
        let cnt = g.b.ins().isub(end, s);
        let src = g.b.ins().iadd(surf, s);
        let dst = g.b.ins().iadd(out, ov);
        let reg = g.ptr;
        copy_bytes(g, mem_ro(), reg, src, dst, cnt);
        let o2 = g.b.ins().iadd(ov, cnt);
        g.set(o, o2);
        bind(g, next);
    });
    flush(g);
    g.get(o)
}
