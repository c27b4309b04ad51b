//! The model's internal kernels: generated functions with pointer-and-size interfaces that the
//! entry points call in sequence. All are local to the object (never exported): only
//! `encode_query` and `decoder_step` form the interface.
//!
//! Static sizes (model dimensions, weights, tables) are baked in; row counts and key counts,
//! which depend on `q` and `p`, are parameters. Every kernel is 4-wide ([`V4`]) over its
//! innermost contiguous axis with a scalar remainder, and fuses multiply-adds only through
//! [`Gen::mul_add`].

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, InstBuilder, StackSlotData, StackSlotKind, Value};
use cranelift_frontend::Variable;
use cranelift_module::{DataId, FuncId};

use crate::abi::CType;
use crate::codegen::gen::{mem, mem_ro, Gen, V4Var, V4};
use crate::codegen::math;
use crate::codegen::weights::{WeightAccess, WeightBlock, WeightFormat, WeightRef, DOT_GROUP};
use crate::codegen::{CodegenError, KernelSet};

/// Independent partial sums of an attention score's dot product.
const DOT_CHAINS: usize = 4;

/// Epsilon of the RMS norms (IR `zcrmsnorm`/`rmsnorm`, spec section 2).
const NORM_EPS: f32 = 1e-6;

/// Declares and defines an internal (unexported) function without callees.
pub(crate) fn internal(
    ks: &mut KernelSet,
    name: &str,
    params: &[(CType, &str)],
    ret: CType,
    data: &[DataId],
    body: impl FnOnce(&mut Gen<'_>, &[Value], &[Value]) -> Option<Value>,
) -> Result<FuncId, CodegenError> {
    let id = ks.declare_function(name, &[], params, ret, false)?;
    ks.define_function(id, data, &[], |g, a, d, _| {
        // The kernels' bodies take their tables in the order they listed them.
        let addrs: Vec<Value> = data.iter().map(|&t| d.get(t)).collect();
        body(g, a, &addrs)
    })?;
    Ok(id)
}

/// `ids[r]` as a pointer-sized row index of a table of `rows` rows: an id outside it reads row
/// 0 instead of out-of-bounds memory (the driver validates ids; this only keeps a bad call
/// memory-safe).
pub(crate) fn table_row(g: &mut Gen<'_>, ids: Value, r: Value, rows: usize) -> Value {
    let ip = g.addr(ids, r, 4);
    let id = g.b.ins().load(types::I32, mem(), ip, 0);
    let bad =
        g.b.ins()
            .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, id, rows as i64);
    let z = g.b.ins().iconst(types::I32, 0);
    let id = g.b.ins().select(bad, z, id);
    widen(g, id)
}

/// An `i32` id (non-negative) as a pointer-sized index (32-bit targets need no extension).
fn widen(g: &mut Gen<'_>, id: Value) -> Value {
    if g.ptr == types::I32 {
        id
    } else {
        let pt = g.ptr;
        g.b.ins().uextend(pt, id)
    }
}

/// A pointer-sized index below 2^31 as an `i32`.
fn narrow(g: &mut Gen<'_>, i: Value) -> Value {
    if g.ptr == types::I32 {
        i
    } else {
        g.b.ins().ireduce(types::I32, i)
    }
}

/// `x + i * 4` bytes.
fn off4(g: &mut Gen<'_>, x: Value, i: i64) -> Value {
    g.b.ins().iadd_imm_s(x, 4 * i)
}

/// `void copy(void *dst, const void *src, size_t n)`: `n` 4-byte words, bit-exact (ids and
/// floats alike). Explicit loops: Cranelift's memcpy helpers may call libc.
pub fn copy_words(ks: &mut KernelSet, name: &str) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::F32Ptr, "dst"),
        (CType::ConstF32Ptr, "src"),
        (CType::SizeT, "n"),
    ];
    internal(ks, name, &params, CType::Void, &[], |g, a, _| {
        let (dst, src, n) = (a[0], a[1], a[2]);
        let n4 = g.b.ins().band_imm_s(n, !3i64);
        let zero = g.iconst(0);
        g.for_range(zero, n4, 4, |g, i| {
            let v = g.vload(src, i);
            g.vstore(v, dst, i);
        });
        g.for_range(n4, n, 1, |g, i| {
            let p = g.addr(src, i, 4);
            let v = g.b.ins().load(types::I32, mem(), p, 0);
            let q = g.addr(dst, i, 4);
            g.b.ins().store(mem(), v, q, 0);
        });
        None
    })
}

/// `void embed(const int32_t *ids, float *out, size_t n)`: `out[r] = table[ids[r]] * scale`.
/// An id outside the table reads row 0 instead of out-of-bounds memory (the driver validates
/// ids; this only keeps a bad call memory-safe).
pub fn embed(
    ks: &mut KernelSet,
    name: &str,
    table: &WeightRef,
    scale: f32,
) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstI32Ptr, "ids"),
        (CType::F32Ptr, "out"),
        (CType::SizeT, "n"),
    ];
    let t = *table;
    internal(
        ks,
        name,
        &params,
        CType::Void,
        &t.data_ids(),
        |g, a, addrs| {
            let (ids, out, n) = (a[0], a[1], a[2]);
            let wa = WeightAccess::new(&t, addrs);
            let d = t.n as i64;
            let d4 = d / 4 * 4;
            g.for_n(n, |g, r| {
                let id = table_row(g, ids, r, t.k);
                let row = wa.row(g, id);
                let orow = g.addr(out, r, d * 4);
                let s = g.vconst(scale);
                g.for_const(0, d4, 4, |g, c| {
                    let v = row.load4(g, c);
                    let v = g.vmul(v, s);
                    g.vstore(v, orow, c);
                });
                let ss = g.f32(scale);
                g.for_const(d4, d, 1, |g, c| {
                    let v = row.load1(g, c);
                    let v = g.b.ins().fmul(v, ss);
                    g.store_f32(v, orow, c);
                });
            });
            None
        },
    )
}

/// `void matmul(const float *x, float *y, size_t rows)`: `y = x @ W`, W `[k][n]` embedded;
/// `y` must not overlap `x`.
///
/// Shaped by the target's [`KernelFacts`]: columns outer, in weight blocks of
/// `matmul_block_cols` (then halves of it down to 8, 4, single columns), rows inner: a block's
/// weights (contiguous in the panelled layout) stay in cache while every row passes over them,
/// instead of the whole matrix streaming from memory once per row tile. Within a block, rows in
/// register tiles of `matmul_rows` over `matmul_cols` columns (each weight vector loaded once
/// serves every row of the tile), then tiles of 4 rows, then single rows (the decoder, row
/// tails), which take the whole block at once. Each output is still one sum over `k` in order.
///
/// `row_tiles: false` takes every row singly (still block by block, so a block's weights serve
/// every row from cache): each row is then computed exactly as a one-row call computes it. The
/// decoder's multi-row step needs that for integer formats, whose single rows sum `x * q` per
/// group and scale the sum ([`mm_tile`]), while register tiles scale every weight first.
pub fn matmul(
    ks: &mut KernelSet,
    name: &str,
    w: &WeightRef,
    row_tiles: bool,
) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "x"),
        (CType::F32Ptr, "y"),
        (CType::SizeT, "rows"),
    ];
    let w = *w;
    let facts = ks.target().kernel_facts();
    let fma = facts.fma;
    let tile_rows = facts.matmul_rows.max(1) as i64;
    let tile_cols = facts.matmul_cols.max(4) as i64;
    let unroll = facts.matmul_unroll;
    // Block widths: the target's block, halved down to 8, then 4 and single columns.
    let mut widths = Vec::new();
    let mut wd = facts.matmul_block_cols.max(8) as i64;
    while wd >= 8 {
        widths.push(wd);
        wd /= 2;
    }
    widths.extend([4, 1]);
    internal(
        ks,
        name,
        &params,
        CType::Void,
        &w.data_ids(),
        |g, a, addrs| {
            let (x, y, rows) = (a[0], a[1], a[2]);
            let wa = WeightAccess::new(&w, addrs);
            // Rows in tiles of `tile_rows`, then of 4 (when larger), then single rows.
            let zero = g.iconst(0);
            let mut tiles: Vec<(Value, Value, i64)> = Vec::new();
            let tiled = if row_tiles {
                let ntiles = g.b.ins().udiv_imm_u(rows, tile_rows);
                g.b.ins().imul_imm_s(ntiles, tile_rows)
            } else {
                zero
            };
            if row_tiles {
                tiles.push((zero, tiled, tile_rows));
            }
            let mut done = tiled;
            if row_tiles && tile_rows > 4 {
                let rest = g.b.ins().isub(rows, tiled);
                let rest4 = g.b.ins().band_imm_s(rest, !3i64);
                let end4 = g.b.ins().iadd(tiled, rest4);
                tiles.push((tiled, end4, 4));
                done = end4;
            }
            for range in wa.column_ranges() {
                let span = range.hi - range.lo;
                let mut lo = range.lo;
                for &width in &widths {
                    let hi = lo + (range.lo + span - lo) / width * width;
                    if hi == lo {
                        continue;
                    }
                    g.for_const(lo, hi, width, |g, c| {
                        let blk = wa.block(g, &range, c).unrolled(unroll);
                        for &(r0, r1, tile) in &tiles {
                            g.for_range(r0, r1, tile, |g, r| {
                                for j0 in (0..width).step_by(tile_cols as usize) {
                                    let cols = MmCols {
                                        c,
                                        j0,
                                        width: width.min(tile_cols),
                                        fma,
                                    };
                                    mm_tile(g, &blk, &w, x, y, r, tile as usize, cols);
                                }
                            });
                        }
                        g.for_range(done, rows, 1, |g, r| {
                            let cols = MmCols {
                                c,
                                j0: 0,
                                width,
                                fma,
                            };
                            mm_tile(g, &blk, &w, x, y, r, 1, cols);
                        });
                    });
                    lo = hi;
                }
            }
            None
        },
    )
}

/// `void matmul(const float *x, float *y, size_t rows)` for `--quantize-activations`: `y = x @ W`
/// with W int8/int4 ([`WeightFormat::I8Dot`]/[`WeightFormat::I4Dot`]) and each row of `x`
/// quantized too, so the products are integer dot products. Opt-in: the outputs may differ
/// from the reference's.
///
/// Per row: each group of [`DOT_GROUP`] inputs (the weights' quantization groups) is scaled
/// by `127 / max|x|` and rounded to the nearest integer (ties to even), kept as 16-bit lanes
/// with the group's scale `max|x| / 127`, in a stack buffer. Then per column, per group: the
/// integer sum of `x_q * w_q` (8 lanes of 16-bit products added pairwise into 32 bits: one
/// `pmaddwd` on x86, the same tree on Arm and RISC-V; exact, so every target gets the same
/// sums), converted to float32 and times `scale_x * scale_w`, added to four float32 lanes
/// summed at the end. Activations are int8-ranged (|q| <= 127) like the `sdot`/VNNI schemes,
/// held in 16-bit lanes because SSE2, the x86 baseline, multiplies 16-bit lanes.
pub fn matmul_int_dot(
    ks: &mut KernelSet,
    name: &str,
    w: &WeightRef,
) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "x"),
        (CType::F32Ptr, "y"),
        (CType::SizeT, "rows"),
    ];
    let w = *w;
    let int4 = matches!(w.format, WeightFormat::I4Dot { .. });
    let (k, n) = (w.k as i64, w.n as i64);
    let gsz = DOT_GROUP as i64;
    let blocks = (k + gsz - 1) / gsz;
    let block_bytes = if int4 { gsz / 2 } else { gsz };
    internal(
        ks,
        name,
        &params,
        CType::Void,
        &w.data_ids(),
        |g, a, addrs| {
            let (x, y, rows) = (a[0], a[1], a[2]);
            let (wq, wscale) = (addrs[0], addrs[1]);
            let pt = g.ptr;
            // The quantized row: `blocks * 32` 16-bit values, then a float32 scale per block.
            let xq_bytes = blocks * gsz * 2;
            let slot = g.b.create_sized_stack_slot(StackSlotData::new(
                StackSlotKind::ExplicitSlot,
                u32::try_from(xq_bytes + blocks * 4).expect("a small stack buffer"),
                4,
            ));
            let xq = g.b.ins().stack_addr(pt, slot, 0);
            let sx = g.b.ins().iadd_imm_s(xq, xq_bytes);
            g.for_n(rows, |g, r| {
                let xrow = g.addr(x, r, k * 4);
                let yrow = g.addr(y, r, n * 4);
                quantize_row(g, xrow, xq, sx, k);
                for (lo, hi, width) in [(0, n / 4 * 4, 4i64), (n / 4 * 4, n, 1)] {
                    if lo == hi {
                        continue;
                    }
                    g.for_const(lo, hi, width, |g, c0| {
                        let zero = g.vconst(0.0);
                        let accs: Vec<V4Var> = (0..width).map(|_| g.vvar(zero)).collect();
                        g.for_const(0, blocks, 1, |g, b| {
                            let xb = g.addr(xq, b, gsz * 2);
                            let xs: Vec<Value> = (0..4)
                                .map(|i| g.b.ins().load(types::I16X8, mem(), xb, 16 * i))
                                .collect();
                            let sxb = g.load_f32(sx, b);
                            for (c, &acc) in accs.iter().enumerate() {
                                let col = g.b.ins().iadd_imm_s(c0, c as i64);
                                // Column `col`'s block `b`.
                                let cb = g.b.ins().imul_imm_s(col, blocks);
                                let cb = g.b.ins().iadd(cb, b);
                                let p = g.addr(wq, cb, block_bytes);
                                let ws = dot_block_weights(g, p, int4);
                                let mut sum = None;
                                for (wv, &xv) in ws.iter().zip(&xs) {
                                    let d = dot_i16x8(g, *wv, xv);
                                    sum = Some(match sum {
                                        None => d,
                                        Some(s) => g.b.ins().iadd(s, d),
                                    });
                                }
                                let sum = sum.expect("four vectors a block");
                                let f = g.b.ins().fcvt_from_sint(types::F32X4, sum);
                                // The scale of column `col`, block `b`: `scales[b][col]`.
                                let si = g.b.ins().imul_imm_s(b, n);
                                let si = g.b.ins().iadd(si, col);
                                let sp = g.addr(wscale, si, 4);
                                let sw = g.b.ins().load(types::F32, mem_ro(), sp, 0);
                                let scale = g.b.ins().fmul(sw, sxb);
                                let sv = g.vsplat(scale);
                                let cur = g.vget(acc);
                                let nxt = g.vmul_add(V4::Simd(f), sv, cur);
                                g.vset(acc, nxt);
                            }
                        });
                        for (c, &acc) in accs.iter().enumerate() {
                            let col = g.b.ins().iadd_imm_s(c0, c as i64);
                            let v = g.vget(acc);
                            let total = g.vsum(v);
                            g.store_f32(total, yrow, col);
                        }
                    });
                }
            });
            None
        },
    )
}

/// Quantizes `k` floats at `xrow` by blocks of [`DOT_GROUP`] (see [`matmul_int_dot`]): 16-bit
/// values at `xq` (zero past `k`), each block's scale at `sx`.
fn quantize_row(g: &mut Gen<'_>, xrow: Value, xq: Value, sx: Value, k: i64) {
    let gsz = DOT_GROUP as i64;
    let blocks = (k + gsz - 1) / gsz;
    // Whole blocks in a loop, a partial last one unrolled with scalar tails.
    let full = k / gsz;
    let quantize_block = |g: &mut Gen<'_>, b: Value, rows: i64| {
        let xb = g.addr(xrow, b, gsz * 4);
        let vecs: Vec<V4> = (0..gsz / 4)
            .map(|i| {
                let lanes = (rows - 4 * i).clamp(0, 4);
                if lanes == 4 {
                    let at = g.iconst(4 * i);
                    g.vload(xb, at)
                } else {
                    // Past `k`: zeros.
                    let z = g.f32(0.0);
                    let l: [Value; 4] = std::array::from_fn(|j| {
                        if (j as i64) < lanes {
                            let at = g.iconst(4 * i + j as i64);
                            g.load_f32(xb, at)
                        } else {
                            z
                        }
                    });
                    let mut v = g.b.ins().splat(types::F32X4, l[0]);
                    for (j, &lane) in l.iter().enumerate().skip(1) {
                        v = g.b.ins().insertlane(v, lane, j as u8);
                    }
                    V4::Simd(v)
                }
            })
            .collect();
        let mut amax = g.vconst(0.0);
        for &v in &vecs {
            let a = g.map1(v, |g, x| g.b.ins().fabs(x));
            amax = g.vmax(amax, a);
        }
        let m = g.vmax_lanes(amax);
        // scale = max / 127 (0 for an all-zero block, whose values are then all 0).
        let c127 = g.f32(127.0);
        let scale = g.b.ins().fdiv(m, c127);
        let zero = g.f32(0.0);
        let positive = g.fcmp(FloatCC::GreaterThan, m, zero);
        let inv_raw = g.b.ins().fdiv(c127, m);
        let inv = g.b.ins().select(positive, inv_raw, zero);
        let invs = g.vsplat(inv);
        // Round to nearest, ties to even: adding and subtracting 1.5 * 2^23 leaves the integer
        // part (|t| <= 127), exact in float32; then the conversion is exact.
        let magic = g.vconst(12_582_912.0);
        let q: Vec<Value> = vecs
            .iter()
            .map(|&v| {
                let t = g.vmul(v, invs);
                let up = g.vadd(t, magic);
                let r = g.vsub(up, magic);
                let V4::Simd(r) = r else {
                    unreachable!("quantized activations need 128-bit vectors")
                };
                g.b.ins().fcvt_to_sint_sat(types::I32X4, r)
            })
            .collect();
        let dst = g.addr(xq, b, gsz * 2);
        for (i, pair) in q.chunks(2).enumerate() {
            let packed = g.b.ins().snarrow(pair[0], pair[1]);
            g.b.ins().store(mem(), packed, dst, 16 * i as i32);
        }
        g.store_f32(scale, sx, b);
    };
    g.for_const(0, full, 1, |g, b| quantize_block(g, b, gsz));
    if full < blocks {
        let b = g.iconst(full);
        quantize_block(g, b, k - full * gsz);
    }
}

/// A block's 32 weights at `p` as four 16-bit vectors, in the order the activations are
/// stored: rows 0-7, 8-15, 16-23, 24-31.
fn dot_block_weights(g: &mut Gen<'_>, p: Value, int4: bool) -> [Value; 4] {
    let ro = mem_ro();
    if int4 {
        // Byte `t` holds row `t` (low nibble) and row `t + 16` (high nibble).
        let bytes = g.b.ins().load(types::I8X16, ro, p, 0);
        let lo = g.b.ins().swiden_low(bytes);
        let hi = g.b.ins().swiden_high(bytes);
        let low_nibble = |g: &mut Gen<'_>, v: Value| {
            let up = g.b.ins().ishl_imm_u(v, 12);
            g.b.ins().sshr_imm_u(up, 12)
        };
        let r0 = low_nibble(g, lo);
        let r8 = low_nibble(g, hi);
        let r16 = g.b.ins().sshr_imm_u(lo, 4);
        let r24 = g.b.ins().sshr_imm_u(hi, 4);
        [r0, r8, r16, r24]
    } else {
        let a = g.b.ins().load(types::I8X16, ro, p, 0);
        let b = g.b.ins().load(types::I8X16, ro, p, 16);
        [
            g.b.ins().swiden_low(a),
            g.b.ins().swiden_high(a),
            g.b.ins().swiden_low(b),
            g.b.ins().swiden_high(b),
        ]
    }
}

/// `a . b` of two `i16x8` as `i32x4` pairwise sums: the tree Cranelift lowers to one
/// `pmaddwd` on x86 (the wasm `i32x4.dot_i16x8_s` shape).
fn dot_i16x8(g: &mut Gen<'_>, a: Value, b: Value) -> Value {
    let al = g.b.ins().swiden_low(a);
    let bl = g.b.ins().swiden_low(b);
    let lo = g.b.ins().imul(al, bl);
    let ah = g.b.ins().swiden_high(a);
    let bh = g.b.ins().swiden_high(b);
    let hi = g.b.ins().imul(ah, bh);
    g.b.ins().iadd_pairwise(lo, hi)
}

/// Columns `c + j0 .. c + j0 + width` of a matmul tile (`width` 1 or a multiple of 4), `c`
/// the start of the weight block.
#[derive(Clone, Copy)]
struct MmCols {
    c: Value,
    j0: i64,
    width: i64,
    /// The target fuses multiply-adds ([`Gen::mul_add`]).
    fma: bool,
}

/// Rows `r..r+tile` of the product, columns `cols`.
#[allow(clippy::too_many_arguments)]
fn mm_tile(
    g: &mut Gen<'_>,
    blk: &WeightBlock,
    w: &WeightRef,
    x: Value,
    y: Value,
    r: Value,
    tile: usize,
    cols: MmCols,
) {
    let (k, n) = (w.k as i64, w.n as i64);
    let xrow0 = g.addr(x, r, k * 4);
    let yrow0 = g.addr(y, r, n * 4);
    let xrows: Vec<Value> = (0..tile)
        .map(|i| g.b.ins().iadd_imm_s(xrow0, i as i64 * k * 4))
        .collect();
    let yrows: Vec<Value> = (0..tile)
        .map(|i| g.b.ins().iadd_imm_s(yrow0, i as i64 * n * 4))
        .collect();
    let MmCols { c, j0, width, fma } = cols;
    if width >= 4 && tile == 1 && blk.grouped() {
        // One row of a quantized matrix (the decoder's steps): the sum of `x * q` over a group
        // times the group's scales, added to the total once per group. A multiply per group and
        // column instead of one per weight, and the scales need no registers in the row loop.
        let nv = width / 4;
        let zero = g.vconst(0.0);
        let totals: Vec<V4Var> = (0..nv).map(|_| g.vvar(zero)).collect();
        let partial: Vec<V4Var> = (0..nv).map(|_| g.vvar(zero)).collect();
        let cols: Vec<i64> = (0..nv).map(|j| j0 + 4 * j).collect();
        // `x[k]` through a pointer bumped per row (rows come in order): computed from `k`,
        // Cranelift rebuilds the row's address from its parts in every iteration.
        let pt = g.ptr;
        let xp = g.var(pt, xrows[0]);
        blk.for_each_row_by_group(
            g,
            &cols,
            |g, _, qs| {
                let p = g.get(xp);
                let xv = g.b.ins().load(types::F32, mem(), p, 0);
                let next = g.b.ins().iadd_imm_s(p, 4);
                g.set(xp, next);
                let xs = g.vsplat(xv);
                accumulate_row(g, &partial, xs, qs, fma);
            },
            |g, scales| {
                for (j, (&acc, &tot)) in partial.iter().zip(&totals).enumerate() {
                    let sum = g.vget(acc);
                    let cur = g.vget(tot);
                    let nxt = g.vmul_add(sum, scales[j], cur);
                    g.vset(tot, nxt);
                    let zero = g.vconst(0.0);
                    g.vset(acc, zero);
                }
            },
        );
        for (j, &tot) in totals.iter().enumerate() {
            let col = g.b.ins().iadd_imm_s(c, j0 + 4 * j as i64);
            let v = g.vget(tot);
            g.vstore(v, yrows[0], col);
        }
    } else if width >= 4 {
        let nv = width / 4;
        let zero = g.vconst(0.0);
        let accs: Vec<Vec<V4Var>> = (0..tile)
            .map(|_| (0..nv).map(|_| g.vvar(zero)).collect())
            .collect();
        let cols: Vec<i64> = (0..nv).map(|j| j0 + 4 * j).collect();
        blk.for_each_row(g, &cols, |g, kk, ws| {
            for (i, acc_row) in accs.iter().enumerate() {
                let xv = g.load_f32(xrows[i], kk);
                let xs = g.vsplat(xv);
                accumulate_row(g, acc_row, xs, ws, fma);
            }
        });
        for (i, acc_row) in accs.iter().enumerate() {
            for (j, &acc) in acc_row.iter().enumerate() {
                let col = g.b.ins().iadd_imm_s(c, j0 + 4 * j as i64);
                let v = g.vget(acc);
                g.vstore(v, yrows[i], col);
            }
        }
    } else {
        let z = g.f32(0.0);
        let accs: Vec<_> = (0..tile).map(|_| g.var(types::F32, z)).collect();
        blk.for_each_row1(g, j0, |g, kk, wv| {
            for (i, &acc) in accs.iter().enumerate() {
                let xv = g.load_f32(xrows[i], kk);
                let cur = g.get(acc);
                let nxt = g.mul_add(xv, wv, cur);
                g.set(acc, nxt);
            }
        });
        for (i, &acc) in accs.iter().enumerate() {
            let col = g.b.ins().iadd_imm_s(c, j0);
            let v = g.get(acc);
            g.store_f32(v, yrows[i], col);
        }
    }
}

/// `accs[j] += xs * ws[j]` for every column vector `j` of one row of a tile.
fn accumulate_row(g: &mut Gen<'_>, accs: &[V4Var], xs: V4, ws: &[V4], fma: bool) {
    for (&acc, &w) in accs.iter().zip(ws) {
        let cur = g.vget(acc);
        // Unfused: `acc + x * w` rather than `x * w + acc` (the same sum) so that two-operand
        // SSE adds into the accumulator's register, without a move per accumulator at the end
        // of each step.
        let nxt = if fma {
            g.vmul_add(xs, w, cur)
        } else {
            let m = g.vmul(xs, w);
            g.vadd(cur, m)
        };
        g.vset(acc, nxt);
    }
}

/// `void norm(const float *x, float *y, size_t rows)`: over rows of `d`,
/// `y = x * (1 / sqrt(mean(x^2) + 1e-6))`, times `scale[..d]` when given (already `1 + g` for
/// a zero-centred norm). `y` may equal `x`.
pub fn rmsnorm(
    ks: &mut KernelSet,
    name: &str,
    d: usize,
    scale: Option<DataId>,
) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "x"),
        (CType::F32Ptr, "y"),
        (CType::SizeT, "rows"),
    ];
    let data: Vec<DataId> = scale.into_iter().collect();
    let di = d as i64;
    internal(ks, name, &params, CType::Void, &data, |g, a, addrs| {
        let (x, y, rows) = (a[0], a[1], a[2]);
        let sc = addrs.first().copied();
        let d4 = di / 4 * 4;
        g.for_n(rows, |g, r| {
            let xrow = g.addr(x, r, di * 4);
            let yrow = g.addr(y, r, di * 4);
            let zero = g.vconst(0.0);
            let acc = g.vvar(zero);
            g.for_const(0, d4, 4, |g, i| {
                let v = g.vload(xrow, i);
                let cur = g.vget(acc);
                let nxt = g.vmul_add(v, v, cur);
                g.vset(acc, nxt);
            });
            let accv = g.vget(acc);
            let s = g.vsum(accv);
            let ss = g.var(types::F32, s);
            g.for_const(d4, di, 1, |g, i| {
                let v = g.load_f32(xrow, i);
                let cur = g.get(ss);
                let nxt = g.mul_add(v, v, cur);
                g.set(ss, nxt);
            });
            let s = g.get(ss);
            let dn = g.f32(d as f32);
            let ms = g.b.ins().fdiv(s, dn);
            let eps = g.f32(NORM_EPS);
            let ms = g.b.ins().fadd(ms, eps);
            let rms = g.b.ins().sqrt(ms);
            let one = g.f32(1.0);
            // As the reference: one reciprocal, then multiplies.
            let inv = g.b.ins().fdiv(one, rms);
            let iv = g.vsplat(inv);
            g.for_const(0, d4, 4, |g, i| {
                let v = g.vload(xrow, i);
                let mut o = g.vmul(v, iv);
                if let Some(sc) = sc {
                    let s = g.vload_with(sc, i, mem_ro());
                    o = g.vmul(o, s);
                }
                g.vstore(o, yrow, i);
            });
            g.for_const(d4, di, 1, |g, i| {
                let v = g.load_f32(xrow, i);
                let mut o = g.b.ins().fmul(v, inv);
                if let Some(sc) = sc {
                    let p = g.addr(sc, i, 4);
                    let s = g.b.ins().load(types::F32, mem_ro(), p, 0);
                    o = g.b.ins().fmul(o, s);
                }
                g.store_f32(o, yrow, i);
            });
        });
        None
    })
}

/// `void rope(const float *x, float *y, size_t rows, size_t pos0)`: x `rows x heads x h`, row
/// `r` rotated by table row `pos0 + r` (the IR's table: `cos` then `sin` of each row's `h/2`
/// angles). `y` may equal `x`. Positions are checked by the caller (the IR verifier bounds
/// them by the dimensions, the entry points bound the dimensions).
pub fn rope(
    ks: &mut KernelSet,
    name: &str,
    table: DataId,
    heads: usize,
    h: usize,
) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "x"),
        (CType::F32Ptr, "y"),
        (CType::SizeT, "rows"),
        (CType::SizeT, "pos0"),
    ];
    let (half, hd) = (h as i64 / 2, h as i64);
    let heads = heads as i64;
    internal(ks, name, &params, CType::Void, &[table], |g, a, addrs| {
        let (x, y, rows, pos0, tab) = (a[0], a[1], a[2], a[3], addrs[0]);
        let half4 = half / 4 * 4;
        g.for_n(rows, |g, r| {
            let p = g.b.ins().iadd(pos0, r);
            let crow = g.addr(tab, p, hd * 4);
            let srow = off4(g, crow, half);
            let xrow = g.addr(x, r, heads * hd * 4);
            let yrow = g.addr(y, r, heads * hd * 4);
            g.for_const(0, heads, 1, |g, hh| {
                let xa = g.addr(xrow, hh, hd * 4);
                let xb = off4(g, xa, half);
                let ya = g.addr(yrow, hh, hd * 4);
                let yb = off4(g, ya, half);
                g.for_const(0, half4, 4, |g, j| {
                    let av = g.vload(xa, j);
                    let bv = g.vload(xb, j);
                    let c = g.vload_with(crow, j, mem_ro());
                    let s = g.vload_with(srow, j, mem_ro());
                    let ac = g.vmul(av, c);
                    let bs = g.vmul(bv, s);
                    let bc = g.vmul(bv, c);
                    let as_ = g.vmul(av, s);
                    let na = g.vsub(ac, bs);
                    let nb = g.vadd(bc, as_);
                    g.vstore(na, ya, j);
                    g.vstore(nb, yb, j);
                });
                g.for_const(half4, half, 1, |g, j| {
                    let av = g.load_f32(xa, j);
                    let bv = g.load_f32(xb, j);
                    let cp = g.addr(crow, j, 4);
                    let c = g.b.ins().load(types::F32, mem_ro(), cp, 0);
                    let sp = g.addr(srow, j, 4);
                    let s = g.b.ins().load(types::F32, mem_ro(), sp, 0);
                    let ac = g.b.ins().fmul(av, c);
                    let bs = g.b.ins().fmul(bv, s);
                    let bc = g.b.ins().fmul(bv, c);
                    let as_ = g.b.ins().fmul(av, s);
                    let na = g.b.ins().fsub(ac, bs);
                    let nb = g.b.ins().fadd(bc, as_);
                    g.store_f32(na, ya, j);
                    g.store_f32(nb, yb, j);
                });
            });
        });
        None
    })
}

/// `void residual(const float *x, const float *y, float *out, size_t n, float s)`:
/// `out = x + y * s` (as the reference rounds it: product, then sum). `out` may equal `x`.
pub fn residual(ks: &mut KernelSet, name: &str) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "x"),
        (CType::ConstF32Ptr, "y"),
        (CType::F32Ptr, "out"),
        (CType::SizeT, "n"),
        (CType::F32, "s"),
    ];
    internal(ks, name, &params, CType::Void, &[], |g, a, _| {
        let (x, y, out, n, s) = (a[0], a[1], a[2], a[3], a[4]);
        let n4 = g.b.ins().band_imm_s(n, !3i64);
        let zero = g.iconst(0);
        let sv = g.vsplat(s);
        g.for_range(zero, n4, 4, |g, i| {
            let xv = g.vload(x, i);
            let yv = g.vload(y, i);
            let m = g.vmul(yv, sv);
            let o = g.vadd(xv, m);
            g.vstore(o, out, i);
        });
        g.for_range(n4, n, 1, |g, i| {
            let xv = g.load_f32(x, i);
            let yv = g.load_f32(y, i);
            let m = g.b.ins().fmul(yv, s);
            let o = g.b.ins().fadd(xv, m);
            g.store_f32(o, out, i);
        });
        None
    })
}

/// `void logits(const float *x, float *y, size_t rows)`: `y = x @ table^T` (tied embedding,
/// table `[V][D]`): four vocabulary rows at a time, each a 4-lane dot product over `D`.
pub fn logits(ks: &mut KernelSet, name: &str, table: &WeightRef) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "x"),
        (CType::F32Ptr, "y"),
        (CType::SizeT, "rows"),
    ];
    let t = *table;
    internal(
        ks,
        name,
        &params,
        CType::Void,
        &t.data_ids(),
        |g, a, addrs| {
            let (x, y, rows) = (a[0], a[1], a[2]);
            let wa = WeightAccess::new(&t, addrs);
            let (v, d) = (t.k as i64, t.n as i64);
            let (v4, d4) = (v / 4 * 4, d / 4 * 4);
            // A half table on a vector target reads eight columns a load, split into even and
            // odd columns in registers; `x` is laid out to match once per row, in blocks of
            // eight as its four even then four odd entries (`xeo`, a stack buffer).
            let pairs = t.format == WeightFormat::F16 && g.simd();
            let d8 = if pairs { d / 8 * 8 } else { 0 };
            let xeo = (d8 > 0).then(|| {
                let slot = g.b.create_sized_stack_slot(StackSlotData::new(
                    StackSlotKind::ExplicitSlot,
                    u32::try_from(d8 * 4).expect("a row of the model fits the stack"),
                    4,
                ));
                let pt = g.ptr;
                g.b.ins().stack_addr(pt, slot, 0)
            });
            g.for_n(rows, |g, r| {
                let xrow = g.addr(x, r, d * 4);
                let yrow = g.addr(y, r, v * 4);
                if let Some(xeo) = xeo {
                    g.for_const(0, d8 / 8, 1, |g, b| {
                        let src = g.addr(xrow, b, 32);
                        let dst = g.addr(xeo, b, 32);
                        for j in 0..8i32 {
                            let at = (j % 2) * 4 + j / 2;
                            let xv = g.b.ins().load(types::F32, mem(), src, 4 * j);
                            g.b.ins().store(mem(), xv, dst, 4 * at);
                        }
                    });
                }
                for (lo, hi, width) in [(0, v4, 4usize), (v4, v, 1)] {
                    g.for_const(lo, hi, width as i64, |g, t0| {
                        let erows: Vec<_> = (0..width)
                            .map(|i| {
                                let id = g.b.ins().iadd_imm_s(t0, i as i64);
                                wa.row(g, id)
                            })
                            .collect();
                        let zero = g.vconst(0.0);
                        let accs: Vec<_> = (0..width).map(|_| g.vvar(zero)).collect();
                        if let Some(xeo) = xeo {
                            g.for_const(0, d8, 8, |g, c| {
                                let xe = g.vload(xeo, c);
                                let c4 = g.b.ins().iadd_imm_s(c, 4);
                                let xo = g.vload(xeo, c4);
                                for (i, &acc) in accs.iter().enumerate() {
                                    let (ev, od) = erows[i]
                                        .load8_even_odd(g, c)
                                        .expect("a half row on a vector target");
                                    let cur = g.vget(acc);
                                    let nxt = g.vmul_add(xe, ev, cur);
                                    let nxt = g.vmul_add(xo, od, nxt);
                                    g.vset(acc, nxt);
                                }
                            });
                        }
                        g.for_const(d8, d4, 4, |g, c| {
                            let xv = g.vload(xrow, c);
                            for (i, &acc) in accs.iter().enumerate() {
                                let ev = erows[i].load4(g, c);
                                let cur = g.vget(acc);
                                let nxt = g.vmul_add(xv, ev, cur);
                                g.vset(acc, nxt);
                            }
                        });
                        for (i, &acc) in accs.iter().enumerate() {
                            let av = g.vget(acc);
                            let s = g.vsum(av);
                            let sv = g.var(types::F32, s);
                            g.for_const(d4, d, 1, |g, c| {
                                let xv = g.load_f32(xrow, c);
                                let ev = erows[i].load1(g, c);
                                let cur = g.get(sv);
                                let nxt = g.mul_add(xv, ev, cur);
                                g.set(sv, nxt);
                            });
                            let s = g.get(sv);
                            let id = g.b.ins().iadd_imm_s(t0, i as i64);
                            g.store_f32(s, yrow, id);
                        }
                    });
                }
            });
            None
        },
    )
}

/// `void attention_B(const float *q, float *out, size_t n, float *scores,
/// (const float *k, const float *v, size_t m) x B)`: softmax attention of `n` query rows
/// (`heads x h` each) over the keys of the `B` blocks together (`m_i` rows of `kv_heads x h`);
/// query head `i` uses KV head `i / (heads / kv_heads)`. `scores` needs one block of scores,
/// `min(keys, needle_targets::KernelFacts::attention_keys)` floats (the workspace plan reserves a row over
/// every key, a bound that is never smaller).
///
/// One (row, head) at a time, keys streamed in blocks of the target's `attention_keys` with a
/// running max and sum (online softmax): a block's scores (scaled by `1/sqrt(h)`), the new
/// max, the accumulated sum and weighted values rescaled by `exp(old max - new max)`, then
/// `exp(s - max)` of the block added to the sum and, times the values, to the 4-lane
/// accumulators; at the end the accumulators divided by the sum. The running max starts at the
/// most negative finite float, the score the reference gives a masked key (spec section 2), so
/// the first rescale is `exp` of a clamped huge negative, exactly 0, never NaN. Visibility
/// (causal, folded tools) is which keys the blocks hold; an empty key set gives zeros.
pub fn attention(
    ks: &mut KernelSet,
    name: &str,
    blocks: usize,
    heads: usize,
    kv_heads: usize,
    h: usize,
) -> Result<FuncId, CodegenError> {
    if blocks == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || h == 0 {
        return Err(CodegenError::Invalid(format!(
            "attention over {blocks} blocks, {heads} heads, {kv_heads} KV heads of {h}"
        )));
    }
    let names: Vec<[String; 3]> = (0..blocks)
        .map(|b| [format!("k{b}"), format!("v{b}"), format!("m{b}")])
        .collect();
    let mut params = vec![
        (CType::ConstF32Ptr, "q"),
        (CType::F32Ptr, "out"),
        (CType::SizeT, "n"),
        (CType::F32Ptr, "scores"),
    ];
    for [k, v, m] in &names {
        params.push((CType::ConstF32Ptr, k));
        params.push((CType::ConstF32Ptr, v));
        params.push((CType::SizeT, m));
    }
    let group = (heads / kv_heads) as i64;
    let facts = ks.target().kernel_facts();
    let shape = HeadShape {
        hd: h as i64,
        h4: h as i64 / 4 * 4,
        kvw: (kv_heads * h) as i64,
        scale: 1.0 / (h as f32).sqrt(),
        key_block: facts.attention_keys.max(1) as i64,
        acc_chunk: facts.attention_acc_vectors.max(1),
    };
    let qw = (heads * h) as i64;
    internal(ks, name, &params, CType::Void, &[], |g, a, _| {
        let (q, out, n, scores) = (a[0], a[1], a[2], a[3]);
        let blk: Vec<[Value; 3]> = (0..blocks)
            .map(|b| [a[4 + 3 * b], a[5 + 3 * b], a[6 + 3 * b]])
            .collect();
        g.for_n(n, |g, r| {
            let qrow = g.addr(q, r, qw * 4);
            let orow = g.addr(out, r, qw * 4);
            // KV head outer, its group of query heads inner: no division at run time.
            g.for_const(0, kv_heads as i64, 1, |g, kvh| {
                let kv_off = g.b.ins().imul_imm_s(kvh, shape.hd * 4);
                g.for_const(0, group, 1, |g, gi| {
                    let hh = g.b.ins().imul_imm_s(kvh, group);
                    let hh = g.b.ins().iadd(hh, gi);
                    let qh = g.addr(qrow, hh, shape.hd * 4);
                    let oh = g.addr(orow, hh, shape.hd * 4);
                    attend_head(g, qh, oh, scores, &blk, kv_off, &shape);
                });
            });
        });
        None
    })
}

/// The per-head constants of [`attention`].
struct HeadShape {
    /// Head width `h`, and its largest multiple of 4.
    hd: i64,
    h4: i64,
    /// Floats per key row (`kv_heads x h`).
    kvw: i64,
    scale: f32,
    /// Keys per streamed block.
    key_block: i64,
    /// Vectors of the output row accumulated in registers per pass over a block's values.
    acc_chunk: usize,
}

/// One query head against every block, keys streamed: see [`attention`].
fn attend_head(
    g: &mut Gen<'_>,
    qh: Value,
    oh: Value,
    scores: Value,
    blk: &[[Value; 3]],
    kv_off: Value,
    shape: &HeadShape,
) {
    let HeadShape {
        hd,
        h4,
        kvw,
        scale,
        key_block,
        acc_chunk,
    } = *shape;
    let qv: Vec<_> = (0..h4 / 4)
        .map(|j| {
            let i = g.iconst(4 * j);
            g.vload(qh, i)
        })
        .collect();
    let qs: Vec<_> = (h4..hd)
        .map(|j| {
            let i = g.iconst(j);
            g.load_f32(qh, i)
        })
        .collect();
    let sc = g.f32(scale);
    let lowest = g.f32(f32::MIN);
    let run_max = g.var(types::F32, lowest);
    let fz = g.f32(0.0);
    let run_sum = g.var(types::F32, fz);
    // The weighted sum of values accumulates in the output row itself: chunks of it pass
    // through registers (see `acc_chunk`), so no accumulator is spilled per key.
    let vz = g.vconst(0.0);
    for j in (0..h4).step_by(4) {
        let i = g.iconst(j);
        g.vstore(vz, oh, i);
    }
    for j in h4..hd {
        let i = g.iconst(j);
        g.store_f32(fz, oh, i);
    }
    for &[k, v, m] in blk {
        let kb = g.b.ins().iadd(k, kv_off);
        let vb = g.b.ins().iadd(v, kv_off);
        let nblocks = g.b.ins().iadd_imm_s(m, key_block - 1);
        let nblocks = g.b.ins().udiv_imm_u(nblocks, key_block);
        g.for_n(nblocks, |g, bi| {
            let j0 = g.b.ins().imul_imm_s(bi, key_block);
            let left = g.b.ins().isub(m, j0);
            let full = g.iconst(key_block);
            let is_full = g.icmp(IntCC::UnsignedGreaterThanOrEqual, left, full);
            let len = g.b.ins().select(is_full, full, left);
            let kblk = g.addr(kb, j0, kvw * 4);
            let vblk = g.addr(vb, j0, kvw * 4);

            // The block's scores and their max.
            let old_max = g.get(run_max);
            let bmax = g.var(types::F32, old_max);
            g.for_n(len, |g, j| {
                let kp = g.addr(kblk, j, kvw * 4);
                let mut dot = None;
                if !qv.is_empty() {
                    // Independent partial sums: one chain of dependent adds per key would
                    // stall on the add latency instead of the arithmetic.
                    let chains = qv.len().min(DOT_CHAINS);
                    let z = g.vconst(0.0);
                    let mut accs = vec![z; chains];
                    for (jj, &qq) in qv.iter().enumerate() {
                        let i = g.iconst(4 * jj as i64);
                        let kv = g.vload(kp, i);
                        accs[jj % chains] = g.vmul_add(qq, kv, accs[jj % chains]);
                    }
                    while accs.len() > 1 {
                        let pairs: Vec<V4> = accs
                            .chunks(2)
                            .map(|c| {
                                if c.len() == 2 {
                                    g.vadd(c[0], c[1])
                                } else {
                                    c[0]
                                }
                            })
                            .collect();
                        accs = pairs;
                    }
                    dot = Some(g.vsum(accs[0]));
                }
                let mut s = match dot {
                    Some(s) => s,
                    None => g.f32(0.0),
                };
                for (jj, &qq) in qs.iter().enumerate() {
                    let i = g.iconst(h4 + jj as i64);
                    let kv = g.load_f32(kp, i);
                    s = g.mul_add(qq, kv, s);
                }
                let s = g.b.ins().fmul(s, sc);
                g.store_f32(s, scores, j);
                let cur = g.get(bmax);
                let nxt = g.b.ins().fmax(cur, s);
                g.set(bmax, nxt);
            });
            let new_max = g.get(bmax);
            g.set(run_max, new_max);

            // Rescale what came before to the new max (exactly 1 when it did not move).
            let shift = g.b.ins().fsub(old_max, new_max);
            let corr = math::exp(g, shift);
            let cs = g.vsplat(corr);
            map_head_row(
                g,
                oh,
                (h4, hd),
                |g, v| g.vmul(v, cs),
                |g, x| g.b.ins().fmul(x, corr),
            );
            let cur = g.get(run_sum);
            let rescaled = g.b.ins().fmul(cur, corr);

            // exp(s - max), four at a time, and their sum.
            let len4 = g.b.ins().band_imm_s(len, !3i64);
            let msplat = g.vsplat(new_max);
            let vsum = g.vvar(vz);
            let z = g.iconst(0);
            g.for_range(z, len4, 4, |g, i| {
                let s = g.vload(scores, i);
                let d = g.vsub(s, msplat);
                let e = math::vexp(g, d);
                g.vstore(e, scores, i);
                let cur = g.vget(vsum);
                let nxt = g.vadd(cur, e);
                g.vset(vsum, nxt);
            });
            let vs = g.vget(vsum);
            let bsum = g.vsum(vs);
            let bsum = g.var(types::F32, bsum);
            g.for_range(len4, len, 1, |g, i| {
                let s = g.load_f32(scores, i);
                let d = g.b.ins().fsub(s, new_max);
                let e = math::exp(g, d);
                g.store_f32(e, scores, i);
                let cur = g.get(bsum);
                let nxt = g.b.ins().fadd(cur, e);
                g.set(bsum, nxt);
            });
            let bs = g.get(bsum);
            let total = g.b.ins().fadd(rescaled, bs);
            g.set(run_sum, total);

            // out += p_j v_j, `acc_chunk` vectors of the row at a time in registers.
            let vecs: Vec<i64> = (0..h4).step_by(4).collect();
            for chunk in vecs.chunks(acc_chunk) {
                let accs: Vec<V4Var> = chunk
                    .iter()
                    .map(|&c| {
                        let i = g.iconst(c);
                        let v = g.vload(oh, i);
                        g.vvar(v)
                    })
                    .collect();
                g.for_n(len, |g, j| {
                    let vp = g.addr(vblk, j, kvw * 4);
                    let p = g.load_f32(scores, j);
                    let ps = g.vsplat(p);
                    for (&c, &acc) in chunk.iter().zip(&accs) {
                        let i = g.iconst(c);
                        let vv = g.vload(vp, i);
                        let cur = g.vget(acc);
                        let nxt = g.vmul_add(ps, vv, cur);
                        g.vset(acc, nxt);
                    }
                });
                for (&c, &acc) in chunk.iter().zip(&accs) {
                    let i = g.iconst(c);
                    let v = g.vget(acc);
                    g.vstore(v, oh, i);
                }
            }
            for c in h4..hd {
                let i = g.iconst(c);
                let a0 = g.load_f32(oh, i);
                let acc = g.var(types::F32, a0);
                g.for_n(len, |g, j| {
                    let vp = g.addr(vblk, j, kvw * 4);
                    let p = g.load_f32(scores, j);
                    let i = g.iconst(c);
                    let vv = g.load_f32(vp, i);
                    let cur = g.get(acc);
                    let nxt = g.mul_add(p, vv, cur);
                    g.set(acc, nxt);
                });
                let v = g.get(acc);
                g.store_f32(v, oh, i);
            }
        });
    }

    // out = acc / sum (as the reference, a division; no keys: zeros, not 0/0).
    let sum = g.get(run_sum);
    let one = g.f32(1.0);
    let empty = g.fcmp(FloatCC::Equal, sum, fz);
    let sum = g.b.ins().select(empty, one, sum);
    let ssplat = g.vsplat(sum);
    map_head_row(
        g,
        oh,
        (h4, hd),
        |g, v| g.vdiv(v, ssplat),
        |g, x| g.b.ins().fdiv(x, sum),
    );
}

/// Rewrites a head's output row of `hd` floats at `oh` in place: `lanes` on each 4-float vector
/// of the first `h4`, `tail` on each float after them.
fn map_head_row(
    g: &mut Gen<'_>,
    oh: Value,
    (h4, hd): (i64, i64),
    lanes: impl Fn(&mut Gen<'_>, V4) -> V4,
    tail: impl Fn(&mut Gen<'_>, Value) -> Value,
) {
    for j in (0..h4).step_by(4) {
        let i = g.iconst(j);
        let cur = g.vload(oh, i);
        let nxt = lanes(g, cur);
        g.vstore(nxt, oh, i);
    }
    for j in h4..hd {
        let i = g.iconst(j);
        let cur = g.load_f32(oh, i);
        let nxt = tail(g, cur);
        g.store_f32(nxt, oh, i);
    }
}

/// `int32_t argmax(const float *logits, const int32_t *allowed, size_t n_allowed)`: the IR's
/// `argmax_masked` over its `%allowed : i32[a]` ids (`n_allowed` = `a`). `allowed == NULL`, or
/// an empty list (which the IR reads as unconstrained): the first maximum over all `vocab` ids,
/// NaN counting as the maximum (numpy's argmax). Otherwise the largest logit among the listed
/// ids, ties to the lowest id (the list need not even be sorted); ids `>= vocab` are skipped,
/// and -1 is returned when none is valid.
pub fn argmax(ks: &mut KernelSet, name: &str, vocab: usize) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "logits"),
        (CType::ConstI32Ptr, "allowed"),
        (CType::SizeT, "n_allowed"),
    ];
    internal(ks, name, &params, CType::I32, &[], |g, a, _| {
        let (x, allowed, n) = (a[0], a[1], a[2]);
        let ninf = g.f32(f32::NEG_INFINITY);
        let best = g.var(types::F32, ninf);
        let m1 = g.b.ins().iconst(types::I32, -1);
        let idx = g.var(types::I32, m1);
        let consider =
            |g: &mut Gen<'_>, id32: Value, v: Value| argmax_consider(g, best, idx, id32, v);
        let zero = g.iconst(0);
        let null = g.icmp(IntCC::Equal, allowed, zero);
        let empty = g.icmp(IntCC::Equal, n, zero);
        let all = g.b.ins().bor(null, empty);
        g.if_else(
            all,
            |g| {
                g.for_const(0, vocab as i64, 1, |g, i| {
                    let v = g.load_f32(x, i);
                    let id32 = narrow(g, i);
                    consider(g, id32, v);
                });
            },
            |g| {
                g.for_n(n, |g, i| {
                    let p = g.addr(allowed, i, 4);
                    let id32 = g.b.ins().load(types::I32, mem(), p, 0);
                    let ok =
                        g.b.ins()
                            .icmp_imm_u(IntCC::UnsignedLessThan, id32, vocab as i64);
                    g.if_then(ok, |g| {
                        let id = widen(g, id32);
                        let v = g.load_f32(x, id);
                        consider(g, id32, v);
                    });
                });
            },
        );
        Some(g.get(idx))
    })
}

/// One candidate of an argmax: whether `v` at `id32` beats the best so far (`best`, `idx`, with
/// `idx < 0` meaning none yet): first candidate, greater, a NaN over a number, or equal with a
/// lower id. The one rule [`argmax`] and [`sparse_logits_argmax`] share, so both break ties alike.
fn argmax_consider(g: &mut Gen<'_>, best: Variable, idx: Variable, id32: Value, v: Value) {
    let b = g.get(best);
    let cur = g.get(idx);
    let first = g.b.ins().icmp_imm_s(IntCC::SignedLessThan, cur, 0);
    let gt = g.fcmp(FloatCC::GreaterThan, v, b);
    let v_nan = g.fcmp(FloatCC::Unordered, v, v);
    let b_num = g.fcmp(FloatCC::Ordered, b, b);
    let nan_first = g.b.ins().band(v_nan, b_num);
    let eq = g.fcmp(FloatCC::Equal, v, b);
    let lower = g.icmp(IntCC::SignedLessThan, id32, cur);
    let tie = g.b.ins().band(eq, lower);
    let t1 = g.b.ins().bor(first, gt);
    let t2 = g.b.ins().bor(nan_first, tie);
    let take = g.b.ins().bor(t1, t2);
    let nb = g.b.ins().select(take, v, b);
    let ni = g.b.ins().select(take, id32, cur);
    g.set(best, nb);
    g.set(idx, ni);
}

/// `int32_t sparse_logits_argmax(const float *x, float *logits, const int32_t *allowed,
/// size_t n_allowed)`: [`argmax`] over a non-empty list of allowed ids with only their logits
/// computed: for each listed id below the vocabulary, the dot product of `x` with its row of
/// the tied embedding, summed exactly as [`logits`] sums a row (4-lane multiply-adds over
/// `D / 4 * 4` columns, the lanes summed, then the scalar tail), so every value is bit for bit
/// the full path's; stored at `logits[id]`, then weighed by the same rule as [`argmax`]
/// (first max in list order, ties to the lower id, a NaN counting as the maximum). -1 when no
/// listed id is in range.
pub fn sparse_logits_argmax(
    ks: &mut KernelSet,
    name: &str,
    table: &WeightRef,
) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "x"),
        (CType::F32Ptr, "logits"),
        (CType::ConstI32Ptr, "allowed"),
        (CType::SizeT, "n_allowed"),
    ];
    let t = *table;
    internal(
        ks,
        name,
        &params,
        CType::I32,
        &t.data_ids(),
        |g, a, addrs| {
            let (x, y, allowed, n) = (a[0], a[1], a[2], a[3]);
            let wa = WeightAccess::new(&t, addrs);
            let (v, d) = (t.k as i64, t.n as i64);
            let d4 = d / 4 * 4;
            let ninf = g.f32(f32::NEG_INFINITY);
            let best = g.var(types::F32, ninf);
            let m1 = g.b.ins().iconst(types::I32, -1);
            let idx = g.var(types::I32, m1);
            g.for_n(n, |g, i| {
                let p = g.addr(allowed, i, 4);
                let id32 = g.b.ins().load(types::I32, mem(), p, 0);
                let ok = g.b.ins().icmp_imm_u(IntCC::UnsignedLessThan, id32, v);
                g.if_then(ok, |g| {
                    let id = widen(g, id32);
                    let erow = wa.row(g, id);
                    let zero = g.vconst(0.0);
                    let acc = g.vvar(zero);
                    g.for_const(0, d4, 4, |g, c| {
                        let xv = g.vload(x, c);
                        let ev = erow.load4(g, c);
                        let cur = g.vget(acc);
                        let nxt = g.vmul_add(xv, ev, cur);
                        g.vset(acc, nxt);
                    });
                    let av = g.vget(acc);
                    let s = g.vsum(av);
                    let sv = g.var(types::F32, s);
                    g.for_const(d4, d, 1, |g, c| {
                        let xv = g.load_f32(x, c);
                        let ev = erow.load1(g, c);
                        let cur = g.get(sv);
                        let nxt = g.mul_add(xv, ev, cur);
                        g.set(sv, nxt);
                    });
                    let s = g.get(sv);
                    g.store_f32(s, y, id);
                    argmax_consider(g, best, idx, id32, s);
                });
            });
            Some(g.get(idx))
        },
    )
}
