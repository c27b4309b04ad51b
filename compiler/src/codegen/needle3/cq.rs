//! CQ weights kept in CQ form in the library (`docs/needle3.md` section 13.1): a tensor's codes
//! as the `.cact` file packs them, its groups' norms and its levels in read-only data, read
//! where they are used instead of float32 copies.
//!
//! Tables read by row (the engram tables, the embedding) are dequantized a gathered row at a
//! time, with the operations of [`CqTensor::dequantize_row`] in the same order, so a row comes
//! out as the runtime's float32 copy of it, bit for bit. Matrix products ([`matmul`]) rotate
//! the activations instead and sum over the codes' levels; the fold's mirror sums alike.

use cranelift_codegen::ir::{types, InstBuilder, StackSlotData, StackSlotKind, Value};
use cranelift_module::{DataId, FuncId};
use needle_runtime::needle3::cq::CqTensor;

use crate::abi::CType;
use crate::codegen::gen::{mem, mem_ro, Gen, V4};
use crate::codegen::model::kernels::{internal, table_row};
use crate::codegen::{CodegenError, KernelSet};

/// A CQ tensor in the object's read-only data.
#[derive(Clone, Copy, Debug)]
pub struct CqData {
    /// The packed codes, with a zero byte after them (a code is read as two bytes).
    pub codes: DataId,
    /// float32 norms, `groups_per_row` a row.
    pub norms: DataId,
    /// float32 level of every code.
    pub levels: DataId,
    pub shape: CqShape,
}

/// The geometry code generation needs.
#[derive(Clone, Copy, Debug)]
pub struct CqShape {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// Bits a code takes.
    pub width: usize,
}

impl CqShape {
    fn row_bytes(&self) -> i64 {
        (self.groups_per_row() * self.group * self.width / 8) as i64
    }

    fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.group)
    }
}

impl CqData {
    /// Declares `t`'s codes, norms and levels as `NAME_codes`, `NAME_norms`, `NAME_levels`.
    pub fn declare(ks: &mut KernelSet, name: &str, t: &CqTensor) -> Result<CqData, CodegenError> {
        let mut codes = t.packed.clone();
        codes.push(0);
        let codes = ks.declare_rodata(&format!("{name}_codes"), codes, 16)?;
        let norms = ks.declare_f32_data(&format!("{name}_norms"), &t.norms)?;
        let levels = ks.declare_f32_data(&format!("{name}_levels"), &t.code_levels)?;
        Ok(CqData {
            codes,
            norms,
            levels,
            shape: CqShape {
                rows: t.rows,
                cols: t.cols,
                group: t.group,
                width: t.width(),
            },
        })
    }

    /// The data objects, in the order [`dequantize_row`] takes their addresses.
    pub fn data_ids(&self) -> [DataId; 3] {
        [self.codes, self.norms, self.levels]
    }
}

/// A stack buffer of `floats` float32 values in the function being generated.
pub fn stack_floats(g: &mut Gen<'_>, floats: usize) -> Value {
    let slot = g.b.create_sized_stack_slot(StackSlotData::new(
        StackSlotKind::ExplicitSlot,
        u32::try_from(4 * floats).expect("a small stack buffer"),
        4,
    ));
    let pt = g.ptr;
    g.b.ins().stack_addr(pt, slot, 0)
}

/// The code of value `k` (a run-time index into the padded row) of the row whose codes start
/// at byte `row_base`, as a pointer-sized integer.
fn code_at(g: &mut Gen<'_>, codes: Value, row_base: Value, k: Value, width: usize) -> Value {
    let pt = g.ptr;
    let bit = g.b.ins().imul_imm_s(k, width as i64);
    let byte = g.b.ins().ushr_imm_u(bit, 3);
    let shift = g.b.ins().band_imm_s(bit, 7);
    let p = g.b.ins().iadd(codes, row_base);
    let p = g.b.ins().iadd(p, byte);
    let lo = g.b.ins().uload8(pt, mem_ro(), p, 0);
    let hi = g.b.ins().uload8(pt, mem_ro(), p, 1);
    let hi = g.b.ins().ishl_imm_s(hi, 8);
    let word = g.b.ins().bor(lo, hi);
    let word = g.b.ins().ushr(word, shift);
    g.b.ins().band_imm_s(word, (1 << width) - 1)
}

/// The unnormalized Walsh-Hadamard transform of `n` floats at `x`, stage by stage as
/// [`needle_runtime::needle3::cq::fwht`] runs it.
pub fn fwht(g: &mut Gen<'_>, x: Value, n: usize) {
    let mut h = 1i64;
    while (h as usize) < n {
        g.for_const(0, n as i64, 2 * h, |g, i| {
            g.for_const(0, h, 1, |g, j| {
                let a_i = g.b.ins().iadd(i, j);
                let b_i = g.b.ins().iadd_imm_s(a_i, h);
                let a = g.load_f32(x, a_i);
                let b = g.load_f32(x, b_i);
                let s = g.b.ins().fadd(a, b);
                let d = g.b.ins().fsub(a, b);
                g.store_f32(s, x, a_i);
                g.store_f32(d, x, b_i);
            });
        });
        h *= 2;
    }
}

/// Row `row` (run-time) of the tensor into `dst` (`cols` floats), `addrs` the addresses of
/// [`CqData::data_ids`], `scratch` a buffer of `group` floats: per group `level * norm`, the
/// transform, times `1 / sqrt(group)`.
pub fn dequantize_row(
    g: &mut Gen<'_>,
    addrs: &[Value],
    s: &CqShape,
    row: Value,
    dst: Value,
    scratch: Value,
) {
    let (codes, norms, levels) = (addrs[0], addrs[1], addrs[2]);
    let gsz = s.group as i64;
    let gpr = s.groups_per_row() as i64;
    let scale = 1.0 / (s.group as f32).sqrt();
    let row_base = g.b.ins().imul_imm_s(row, s.row_bytes());
    let norm_row = g.b.ins().imul_imm_s(row, gpr);
    let one_group = |g: &mut Gen<'_>, gi: Value, count: i64| {
        let ni = g.b.ins().iadd(norm_row, gi);
        let np = g.addr(norms, ni, 4);
        let norm = g.b.ins().load(types::F32, mem_ro(), np, 0);
        let k0 = g.b.ins().imul_imm_s(gi, gsz);
        g.for_const(0, gsz, 1, |g, i| {
            let k = g.b.ins().iadd(k0, i);
            let code = code_at(g, codes, row_base, k, s.width);
            let lp = g.addr(levels, code, 4);
            let level = g.b.ins().load(types::F32, mem_ro(), lp, 0);
            let v = g.b.ins().fmul(level, norm);
            g.store_f32(v, scratch, i);
        });
        fwht(g, scratch, s.group);
        let out = g.addr(dst, k0, 4);
        g.for_const(0, count, 1, |g, i| {
            let v = g.load_f32(scratch, i);
            let sc = g.f32(scale);
            let v = g.b.ins().fmul(v, sc);
            let p = g.addr(out, i, 4);
            g.b.ins().store(mem(), v, p, 0);
        });
    };
    let full = (s.cols / s.group) as i64;
    g.for_const(0, full, 1, |g, gi| one_group(g, gi, gsz));
    if full < gpr {
        let gi = g.iconst(full);
        one_group(g, gi, s.cols as i64 - full * gsz);
    }
}

/// Rows per tile of [`matmul`]: each tile's codes are looked up once for all its rows.
pub const MATMUL_ROWS: usize = 4;

/// The byte-interleaving masks of [`lookup16`] (indices 16-31 are the second vector's).
const ZIP_LO8: [u8; 16] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];
const ZIP_HI8: [u8; 16] = [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31];
const ZIP_LO16: [u8; 16] = [0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23];
const ZIP_HI16: [u8; 16] = [8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31];

/// The levels of a 4-bit tensor as four byte planes: plane `b` holds byte `b` (little-endian)
/// of every code's float32 level, so that a byte shuffle by the codes picks that byte of 16
/// levels at once.
fn level_planes(levels: &[f32]) -> Vec<u8> {
    let mut planes = vec![0u8; 64];
    for (code, level) in levels.iter().take(16).enumerate() {
        for (b, byte) in level.to_le_bytes().into_iter().enumerate() {
            planes[16 * b + code] = byte;
        }
    }
    planes
}

fn shuffle(g: &mut Gen<'_>, a: Value, b: Value, mask: [u8; 16]) -> Value {
    let imm =
        g.b.func
            .dfg
            .immediates
            .push(cranelift_codegen::ir::ConstantData::from(mask.to_vec()));
    g.b.ins().shuffle(a, b, imm)
}

fn le() -> cranelift_codegen::ir::MemFlagsData {
    cranelift_codegen::ir::MemFlagsData::new()
        .with_endianness(cranelift_codegen::ir::Endianness::Little)
}

/// The levels of 16 consecutive 4-bit codes at `p` (8 bytes), in order, as four `f32x4`: the
/// nibbles spread to bytes, four byte shuffles of the level planes, and two rounds of byte
/// interleaving that put each level's four bytes together.
fn lookup16(g: &mut Gen<'_>, planes: &[Value; 4], p: Value, pshufb: bool) -> [V4; 4] {
    let v = g.b.ins().uload8x8(mem_ro(), p, 0);
    let mask = g.b.ins().iconst(types::I16, 0x0f);
    let mask = g.b.ins().splat(types::I16X8, mask);
    let lo = g.b.ins().band(v, mask);
    let hi = g.b.ins().ushr_imm_u(v, 4);
    let hi = g.b.ins().ishl_imm_u(hi, 8);
    let idx = g.b.ins().bor(lo, hi);
    let idx = g.b.ins().bitcast(types::I8X16, le(), idx);
    let p: Vec<Value> = planes
        .iter()
        .map(|&t| {
            if pshufb {
                g.b.ins().x86_pshufb(t, idx)
            } else {
                g.b.ins().swizzle(t, idx)
            }
        })
        .collect();
    let a_lo = shuffle(g, p[0], p[1], ZIP_LO8);
    let a_hi = shuffle(g, p[0], p[1], ZIP_HI8);
    let b_lo = shuffle(g, p[2], p[3], ZIP_LO8);
    let b_hi = shuffle(g, p[2], p[3], ZIP_HI8);
    let f = [
        shuffle(g, a_lo, b_lo, ZIP_LO16),
        shuffle(g, a_lo, b_lo, ZIP_HI16),
        shuffle(g, a_hi, b_hi, ZIP_LO16),
        shuffle(g, a_hi, b_hi, ZIP_HI16),
    ];
    f.map(|x| V4::Simd(g.b.ins().bitcast(types::F32X4, le(), x)))
}

/// The levels of the 4 codes from value `k` of the row whose codes start at `row_base`, one
/// scalar lookup each (any code width).
fn lookup4(g: &mut Gen<'_>, addrs: &[Value], s: &CqShape, row_base: Value, k: Value) -> V4 {
    let l: [Value; 4] = std::array::from_fn(|i| {
        let ki = g.b.ins().iadd_imm_s(k, i as i64);
        let code = code_at(g, addrs[0], row_base, ki, s.width);
        let lp = g.addr(addrs[2], code, 4);
        g.b.ins().load(types::F32, mem_ro(), lp, 0)
    });
    if g.simd() {
        let mut v = g.b.ins().splat(types::F32X4, l[0]);
        for (j, &lane) in l.iter().enumerate().skip(1) {
            v = g.b.ins().insertlane(v, lane, j as u8);
        }
        V4::Simd(v)
    } else {
        V4::Lanes(l)
    }
}

/// `rows` rows of `k` floats at `x` rotated into `buf` (`padded_cols` floats a row): zero
/// padding, then per group the transform times `1 / sqrt(group)` (the weights' rotation,
/// applied to the activations instead: `H` is symmetric).
fn rotate_rows(g: &mut Gen<'_>, s: &CqShape, x: Value, r0: Value, rows: usize, buf: Value) {
    let (k, kp, gsz) = (
        s.cols as i64,
        (s.groups_per_row() * s.group) as i64,
        s.group as i64,
    );
    let scale = 1.0 / (s.group as f32).sqrt();
    for r in 0..rows as i64 {
        let ri = g.b.ins().iadd_imm_s(r0, r);
        let src = g.addr(x, ri, 4 * k);
        let dst = g.b.ins().iadd_imm_s(buf, 4 * r * kp);
        g.for_const(0, k, 1, |g, i| {
            let v = g.load_f32(src, i);
            g.store_f32(v, dst, i);
        });
        g.for_const(k, kp, 1, |g, i| {
            let z = g.f32(0.0);
            g.store_f32(z, dst, i);
        });
        for gi in 0..kp / gsz {
            let at = g.b.ins().iadd_imm_s(dst, 4 * gi * gsz);
            fwht(g, at, s.group);
        }
        g.for_const(0, kp, 1, |g, i| {
            let v = g.load_f32(dst, i);
            let sc = g.f32(scale);
            let v = g.b.ins().fmul(v, sc);
            g.store_f32(v, dst, i);
        });
    }
}

/// `void NAME(const float *x, float *y, size_t rows)`: `y = x @ W` for the CQ tensor `W`
/// stored `(out, in)` (rows of `w` are the outputs): each input row rotated once per group,
/// then per output `c` and group `g` the levels of the codes (looked up in registers: 16 at a
/// time by byte shuffles where the target has them and the codes are 4-bit, the levels' byte
/// planes then in `NAME_planes`, else one by one) dotted
/// with the rotated row in four lanes (lane `l` sums values `l, l+4, ...` in order),
/// `(l0 + l1) + (l2 + l3)`, and `y += norm * that` across groups in order. Rows run in tiles of
/// [`MATMUL_ROWS`] that share the lookups; every row sums alike.
pub fn matmul(
    ks: &mut KernelSet,
    name: &str,
    w: &CqData,
    levels: &[f32],
) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "x"),
        (CType::F32Ptr, "y"),
        (CType::SizeT, "rows"),
    ];
    let s = w.shape;
    let fast = ks.target().byte_shuffles() && s.width == 4 && s.group.is_multiple_of(16);
    let pshufb = ks.target().pshufb();
    let mut data = w.data_ids().to_vec();
    if fast {
        data.push(ks.declare_rodata(&format!("{name}_planes"), level_planes(levels), 16)?);
    }
    let (n, gsz, gpr) = (s.rows as i64, s.group as i64, s.groups_per_row() as i64);
    let kp = gpr * gsz;
    internal(ks, name, &params, CType::Void, &data, |g, a, addrs| {
        let (x, y, rows) = (a[0], a[1], a[2]);
        let buf = stack_floats(g, MATMUL_ROWS * kp as usize);
        let planes: Option<[Value; 4]> = fast.then(|| {
            std::array::from_fn(|b| {
                g.b.ins()
                    .load(types::I8X16, mem_ro(), addrs[3], 16 * b as i32)
            })
        });
        let tile = |g: &mut Gen<'_>, r0: Value, t: usize| {
            rotate_rows(g, &s, x, r0, t, buf);
            g.for_const(0, n, 1, |g, c| {
                let zero = g.f32(0.0);
                let accs: Vec<_> = (0..t).map(|_| g.var(types::F32, zero)).collect();
                let row_base = g.b.ins().imul_imm_s(c, s.row_bytes());
                let norm_row = g.b.ins().imul_imm_s(c, gpr);
                g.for_const(0, gpr, 1, |g, gi| {
                    let vz = g.vconst(0.0);
                    let gaccs: Vec<_> = (0..t).map(|_| g.vvar(vz)).collect();
                    let k0 = g.b.ins().imul_imm_s(gi, gsz);
                    // One step a loop iteration (unrolling a group's steps measured slower:
                    // 575 against 385 ms a call).
                    let step = if fast { 16 } else { 4 };
                    g.for_const(0, gsz, step, |g, j| {
                        let k = g.b.ins().iadd(k0, j);
                        let ws: Vec<V4> = match planes {
                            Some(pl) => {
                                let byte = g.b.ins().ushr_imm_u(k, 1);
                                let p = g.b.ins().iadd(addrs[0], row_base);
                                let p = g.b.ins().iadd(p, byte);
                                lookup16(g, &pl, p, pshufb).to_vec()
                            }
                            None => vec![lookup4(g, addrs, &s, row_base, k)],
                        };
                        for (r, &acc) in gaccs.iter().enumerate() {
                            let xr = g.b.ins().iadd_imm_s(buf, 4 * r as i64 * kp);
                            for (q, &wv) in ws.iter().enumerate() {
                                let kq = g.b.ins().iadd_imm_s(k, 4 * q as i64);
                                let xv = g.vload(xr, kq);
                                let cur = g.vget(acc);
                                let next = g.vmul_add(wv, xv, cur);
                                g.vset(acc, next);
                            }
                        }
                    });
                    let ni = g.b.ins().iadd(norm_row, gi);
                    let np = g.addr(addrs[1], ni, 4);
                    let norm = g.b.ins().load(types::F32, mem_ro(), np, 0);
                    for (r, &acc) in accs.iter().enumerate() {
                        let gv = g.vget(gaccs[r]);
                        let gs = g.vsum(gv);
                        let cur = g.get(acc);
                        let next = g.mul_add(norm, gs, cur);
                        g.set(acc, next);
                    }
                });
                for (r, &acc) in accs.iter().enumerate() {
                    let ri = g.b.ins().iadd_imm_s(r0, r as i64);
                    let yrow = g.addr(y, ri, 4 * n);
                    let v = g.get(acc);
                    g.store_f32(v, yrow, c);
                }
            });
        };
        let t = MATMUL_ROWS as i64;
        let tiles = g.b.ins().udiv_imm_u(rows, t);
        let tiled = g.b.ins().imul_imm_s(tiles, t);
        let zero = g.iconst(0);
        g.for_range(zero, tiled, t, |g, r0| tile(g, r0, MATMUL_ROWS));
        g.for_range(tiled, rows, 1, |g, r0| tile(g, r0, 1));
        None
    })
}

/// `void NAME(const int32_t *ids, float *out, size_t n)`: v1's embedding lookup from a CQ
/// table: row `ids[r]` dequantized (as [`dequantize_row`]) times `scale`, the float32 table's
/// product bit for bit. An id outside the table reads row 0 (the driver validates ids).
pub fn embed(
    ks: &mut KernelSet,
    name: &str,
    w: &CqData,
    scale: f32,
) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstI32Ptr, "ids"),
        (CType::F32Ptr, "out"),
        (CType::SizeT, "n"),
    ];
    let s = w.shape;
    internal(
        ks,
        name,
        &params,
        CType::Void,
        &w.data_ids(),
        |g, a, addrs| {
            let (ids, out, n) = (a[0], a[1], a[2]);
            let scratch = stack_floats(g, s.group);
            let d = s.cols as i64;
            g.for_n(n, |g, r| {
                let id = table_row(g, ids, r, s.rows);
                let orow = g.addr(out, r, d * 4);
                dequantize_row(g, addrs, &s, id, orow, scratch);
                g.for_const(0, d, 1, |g, c| {
                    let v = g.load_f32(orow, c);
                    let sc = g.f32(scale);
                    let v = g.b.ins().fmul(v, sc);
                    g.store_f32(v, orow, c);
                });
            });
            None
        },
    )
}
