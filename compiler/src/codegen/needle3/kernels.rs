//! The Needle 3 kernels that v1 has no counterpart for (`docs/needle3.md` sections 2-3): the
//! causal taps over cached rows, windowed attention with separate q/k and v head widths, the
//! hyper-connection lanes with Sinkhorn routing, the engram gather and injection, and the
//! Monarch-factored Hadamard MLP. The matrix products, norms, RoPE, embedding, tied logits and
//! argmax are v1's kernels ([`crate::codegen::model::kernels`]).
//!
//! Every kernel computes one position (the step's row), in float32, summing in the order the
//! runtime's forward pass (`needle_runtime::needle3::forward`) sums, so that the generated code
//! and the runtime agree to float32 rounding.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, Value};
use cranelift_module::{DataId, FuncId};

use super::cq::{self, CqData};
use crate::abi::CType;
use crate::codegen::gen::{mem_ro, Gen, V4};
use crate::codegen::math;
use crate::codegen::model::kernels::internal;
use crate::codegen::{CodegenError, KernelSet};

/// The norms' epsilon (section 2).
const EPS: f32 = 1e-6;

fn load_ro(g: &mut Gen<'_>, base: Value, index: Value) -> Value {
    let p = g.addr(base, index, 4);
    g.b.ins().load(types::F32, mem_ro(), p, 0)
}

/// `sum_i a[i] * b[i]` over `n` floats, in order (as the runtime's iterator sum).
fn dot(g: &mut Gen<'_>, a: Value, b: Value, n: i64, b_ro: bool) -> Value {
    let zero = g.f32(0.0);
    let acc = g.var(types::F32, zero);
    g.for_const(0, n, 1, |g, i| {
        let x = g.load_f32(a, i);
        let y = if b_ro {
            load_ro(g, b, i)
        } else {
            g.load_f32(b, i)
        };
        let p = g.b.ins().fmul(x, y);
        let s = g.get(acc);
        let s = g.b.ins().fadd(s, p);
        g.set(acc, s);
    });
    g.get(acc)
}

/// `y[i] = y[i] + a * x[i]` over `n` floats, four lanes at a time (each element's operations
/// are those of the scalar loop, so the result is too).
fn axpy(g: &mut Gen<'_>, y: Value, a: Value, x: Value, n: i64, x_ro: bool) {
    let n4 = n / 4 * 4;
    let av = g.vsplat(a);
    g.for_const(0, n4, 4, |g, i| {
        let xv = if x_ro {
            g.vload_with(x, i, mem_ro())
        } else {
            g.vload(x, i)
        };
        let m = g.vmul(av, xv);
        let yv = g.vload(y, i);
        let s = g.vadd(yv, m);
        g.vstore(s, y, i);
    });
    g.for_const(n4, n, 1, |g, i| {
        let xv = if x_ro {
            load_ro(g, x, i)
        } else {
            g.load_f32(x, i)
        };
        let m = g.b.ins().fmul(a, xv);
        let yv = g.load_f32(y, i);
        let s = g.b.ins().fadd(yv, m);
        g.store_f32(s, y, i);
    });
}

/// `n` zeros at `y`.
fn zeros(g: &mut Gen<'_>, y: Value, n: i64) {
    let n4 = n / 4 * 4;
    let z = g.vconst(0.0);
    g.for_const(0, n4, 4, |g, i| g.vstore(z, y, i));
    let zs = g.f32(0.0);
    g.for_const(n4, n, 1, |g, i| g.store_f32(zs, y, i));
}

/// `sum_i a[i] * b[i]` in four partial sums (lane `l` takes `i = l mod 4` below `n4`), added as
/// `(s0 + s1) + (s2 + s3)`, then the tail in order; unfused (the mirror's `dot4`).
fn dot4(g: &mut Gen<'_>, a: Value, b: Value, n: i64) -> Value {
    let n4 = n / 4 * 4;
    let z = g.vconst(0.0);
    let acc = g.vvar(z);
    g.for_const(0, n4, 4, |g, i| {
        let x = g.vload(a, i);
        let y = g.vload(b, i);
        let m = g.vmul(x, y);
        let cur = g.vget(acc);
        let nxt = g.vadd(cur, m);
        g.vset(acc, nxt);
    });
    let accv = g.vget(acc);
    let s = g.vsum(accv);
    let sv = g.var(types::F32, s);
    g.for_const(n4, n, 1, |g, i| {
        let x = g.load_f32(a, i);
        let y = g.load_f32(b, i);
        let m = g.b.ins().fmul(x, y);
        let cur = g.get(sv);
        let nxt = g.b.ins().fadd(cur, m);
        g.set(sv, nxt);
    });
    g.get(sv)
}

/// `1 / sqrt(mean(x^2) + eps)` of `n` floats, as the runtime's `unit` computes it.
fn inv_rms(g: &mut Gen<'_>, x: Value, n: i64) -> Value {
    let ss = dot(g, x, x, n, false);
    let nf = g.f32(n as f32);
    let ms = g.b.ins().fdiv(ss, nf);
    let eps = g.f32(EPS);
    let ms = g.b.ins().fadd(ms, eps);
    let rms = g.b.ins().sqrt(ms);
    let one = g.f32(1.0);
    g.b.ins().fdiv(one, rms)
}

/// Row `r`'s address, `stride` bytes a row: below `p0` (the folded prefix) in the read-only
/// rows at `ro`, else in the workspace's at `ws`. With no prefix there is no choice to make.
fn row_at(g: &mut Gen<'_>, ws: Value, ro: Value, r: Value, stride: i64, p0: usize) -> Value {
    let w = g.addr(ws, r, stride);
    if p0 == 0 {
        return w;
    }
    let o = g.addr(ro, r, stride);
    let folded = g.b.ins().icmp_imm_u(IntCC::UnsignedLessThan, r, p0 as i64);
    g.b.ins().select(folded, o, w)
}

/// `ln(x)` of a positive f32, through [`math::ln_f64`].
fn ln32(g: &mut Gen<'_>, x: Value) -> Value {
    let x64 = g.b.ins().fpromote(types::F64, x);
    let l = math::ln_f64(g, x64);
    g.b.ins().fdemote(types::F32, l)
}

/// `void taps(const float *rows, const float *folded, float *out, size_t t)`: the causal
/// depthwise conv of row `t` of `rows` (`width` floats a row, every row up to `t` written; rows
/// below `p0` in `folded` instead), `out[c] = sum_j taps[j][c] * rows[t - j*dil][c]` over the
/// taps `j` with `j*dil <= t` and, with a `window`, `j < window` (section 2.3 step 2 and the
/// engram values' taps of section 3). Row `t` itself is at or past `p0`.
#[allow(clippy::too_many_arguments)]
pub fn taps(
    ks: &mut KernelSet,
    name: &str,
    table: DataId,
    n_taps: usize,
    width: usize,
    dil: usize,
    window: Option<usize>,
    p0: usize,
) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "rows"),
        (CType::ConstF32Ptr, "folded"),
        (CType::F32Ptr, "out"),
        (CType::SizeT, "t"),
    ];
    let (w, dil) = (width as i64, dil as i64);
    let last = match window {
        Some(win) => n_taps.min(win) as i64,
        None => n_taps as i64,
    };
    internal(ks, name, &params, CType::Void, &[table], |g, a, d| {
        let (rows, folded, out, t, tab) = (a[0], a[1], a[2], a[3], d[0]);
        let cur = g.addr(rows, t, w * 4);
        let w4 = w / 4 * 4;
        g.for_const(0, w4, 4, |g, c| {
            let x = g.vload(cur, c);
            let tp = g.vload_with(tab, c, mem_ro());
            let o = g.vmul(tp, x);
            g.vstore(o, out, c);
        });
        g.for_const(w4, w, 1, |g, c| {
            let x = g.load_f32(cur, c);
            let tp = load_ro(g, tab, c);
            let o = g.b.ins().fmul(tp, x);
            g.store_f32(o, out, c);
        });
        for j in 1..last {
            let back = j * dil;
            let ok =
                g.b.ins()
                    .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, t, back);
            g.if_then(ok, |g| {
                let src_t = g.b.ins().iadd_imm_s(t, -back);
                let src = row_at(g, rows, folded, src_t, w * 4, p0);
                let jv = g.iconst(j);
                let trow = g.addr(tab, jv, w * 4);
                g.for_const(0, w4, 4, |g, c| {
                    let x = g.vload(src, c);
                    let tp = g.vload_with(trow, c, mem_ro());
                    let p = g.vmul(tp, x);
                    let o = g.vload(out, c);
                    let o = g.vadd(o, p);
                    g.vstore(o, out, c);
                });
                g.for_const(w4, w, 1, |g, c| {
                    let x = g.load_f32(src, c);
                    let tp = load_ro(g, trow, c);
                    let p = g.b.ins().fmul(tp, x);
                    let o = g.load_f32(out, c);
                    let o = g.b.ins().fadd(o, p);
                    g.store_f32(o, out, c);
                });
            });
        }
        None
    })
}

/// The head geometry of [`attention`].
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub dq: usize,
    pub dv: usize,
    pub window: Option<usize>,
    /// Rows below this are the folded prefix's (read-only).
    pub p0: usize,
}

/// `void attention(const float *q, const float *k, const float *v, const float *k_folded,
/// const float *v_folded, float *out, size_t t, float *scores)`: row `t`'s query heads against
/// the cached keys and values of rows `lo..=t` (`lo = t + 1 - window` on a sliding layer, else
/// 0; rows below `p0` from the folded prefix's), GQA, plain softmax (section 2.3 step 5).
pub fn attention(ks: &mut KernelSet, name: &str, s: &AttnShape) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "q"),
        (CType::ConstF32Ptr, "k"),
        (CType::ConstF32Ptr, "v"),
        (CType::ConstF32Ptr, "k_folded"),
        (CType::ConstF32Ptr, "v_folded"),
        (CType::F32Ptr, "out"),
        (CType::SizeT, "t"),
        (CType::F32Ptr, "scores"),
    ];
    let (dq, dv) = (s.dq as i64, s.dv as i64);
    let (kw, vw) = ((s.kv_heads * s.dq) as i64, (s.kv_heads * s.dv) as i64);
    let group = (s.heads / s.kv_heads) as i64;
    let scale = 1.0 / (s.dq as f32).sqrt();
    let window = s.window.map(|w| w as i64);
    let heads = s.heads as i64;
    internal(ks, name, &params, CType::Void, &[], |g, a, _| {
        let (q, k, v, kf, vf) = (a[0], a[1], a[2], a[3], a[4]);
        let (out, t, scores) = (a[5], a[6], a[7]);
        let p0 = s.p0;
        let lo = match window {
            Some(win) => {
                // (t + 1).saturating_sub(win)
                let t1 = g.b.ins().iadd_imm_s(t, 1);
                let wv = g.iconst(win);
                let big = g.icmp(IntCC::UnsignedGreaterThan, t1, wv);
                let d = g.b.ins().isub(t1, wv);
                let zero = g.iconst(0);
                g.b.ins().select(big, d, zero)
            }
            None => g.iconst(0),
        };
        let t1 = g.b.ins().iadd_imm_s(t, 1);
        let n = g.b.ins().isub(t1, lo);
        let sc = g.f32(scale);
        g.for_const(0, heads, 1, |g, h| {
            let kvh = g.b.ins().udiv_imm_u(h, group);
            let qh = g.addr(q, h, dq * 4);
            let koff = g.b.ins().imul_imm_s(kvh, dq * 4);
            let voff = g.b.ins().imul_imm_s(kvh, dv * 4);
            let ninf = g.f32(f32::NEG_INFINITY);
            let mx = g.var(types::F32, ninf);
            g.for_n(n, |g, i| {
                let row = g.b.ins().iadd(lo, i);
                let kr = row_at(g, k, kf, row, kw * 4, p0);
                let kr = g.b.ins().iadd(kr, koff);
                let d = dot4(g, qh, kr, dq);
                let d = g.b.ins().fmul(d, sc);
                g.store_f32(d, scores, i);
                let m = g.get(mx);
                let m = g.b.ins().fmax(m, d);
                g.set(mx, m);
            });
            let m = g.get(mx);
            let zero = g.f32(0.0);
            let sum = g.var(types::F32, zero);
            g.for_n(n, |g, i| {
                let s = g.load_f32(scores, i);
                let e = g.b.ins().fsub(s, m);
                let e = math::exp(g, e);
                g.store_f32(e, scores, i);
                let acc = g.get(sum);
                let acc = g.b.ins().fadd(acc, e);
                g.set(sum, acc);
            });
            let total = g.get(sum);
            g.for_n(n, |g, i| {
                let s = g.load_f32(scores, i);
                let p = g.b.ins().fdiv(s, total);
                g.store_f32(p, scores, i);
            });
            let oh = g.addr(out, h, dv * 4);
            zeros(g, oh, dv);
            g.for_n(n, |g, i| {
                let p = g.load_f32(scores, i);
                let row = g.b.ins().iadd(lo, i);
                let vr = row_at(g, v, vf, row, vw * 4, p0);
                let vr = g.b.ins().iadd(vr, voff);
                axpy(g, oh, p, vr, dv, false);
            });
        });
        None
    })
}

/// `void gate(float *o, const float *gate)`: `o[c] *= sigmoid(gate[c])` over `n` floats
/// (section 2.3 step 6).
pub fn gate(ks: &mut KernelSet, name: &str, n: usize) -> Result<FuncId, CodegenError> {
    let params = [(CType::F32Ptr, "o"), (CType::ConstF32Ptr, "gate")];
    internal(ks, name, &params, CType::Void, &[], |g, a, _| {
        let (o, gt) = (a[0], a[1]);
        let (n, n4) = (n as i64, n as i64 / 4 * 4);
        g.for_const(0, n4, 4, |g, c| {
            let x = g.vload(gt, c);
            let s = g.map1(x, math::sigmoid);
            let v = g.vload(o, c);
            let v = g.vmul(v, s);
            g.vstore(v, o, c);
        });
        g.for_const(n4, n, 1, |g, c| {
            let x = g.load_f32(gt, c);
            let s = math::sigmoid(g, x);
            let v = g.load_f32(o, c);
            let v = g.b.ins().fmul(v, s);
            g.store_f32(v, o, c);
        });
        None
    })
}

/// `void sub(const float *x, const float *y, float *out)`: `out = x - y` over `n` floats.
pub fn sub(ks: &mut KernelSet, name: &str, n: usize) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "x"),
        (CType::ConstF32Ptr, "y"),
        (CType::F32Ptr, "out"),
    ];
    internal(ks, name, &params, CType::Void, &[], |g, a, _| {
        g.for_const(0, n as i64, 1, |g, c| {
            let x = g.load_f32(a[0], c);
            let y = g.load_f32(a[1], c);
            let v = g.b.ins().fsub(x, y);
            g.store_f32(v, a[2], c);
        });
        None
    })
}

/// `void copy(const float *x, float *out, size_t n)`.
pub fn copy(ks: &mut KernelSet, name: &str) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "x"),
        (CType::F32Ptr, "out"),
        (CType::SizeT, "n"),
    ];
    internal(ks, name, &params, CType::Void, &[], |g, a, _| {
        g.for_n(a[2], |g, c| {
            let x = g.load_f32(a[0], c);
            g.store_f32(x, a[1], c);
        });
        None
    })
}

/// `void lanes(const float *x0, float *x)`: every one of the `n` lanes of `x` a copy of `x0`
/// (`d` floats), the stream's start (section 2).
pub fn spread_lanes(
    ks: &mut KernelSet,
    name: &str,
    n: usize,
    d: usize,
) -> Result<FuncId, CodegenError> {
    let params = [(CType::ConstF32Ptr, "x0"), (CType::F32Ptr, "x")];
    let (n, d) = (n as i64, d as i64);
    internal(ks, name, &params, CType::Void, &[], |g, a, _| {
        g.for_const(0, n, 1, |g, i| {
            let lane = g.addr(a[1], i, d * 4);
            g.for_const(0, d, 1, |g, c| {
                let x = g.load_f32(a[0], c);
                g.store_f32(x, lane, c);
            });
        });
        None
    })
}

/// `void lane_mean(const float *x, float *out)`: `out = (sum_i x[i]) / n` over the `n` lanes.
pub fn lane_mean(
    ks: &mut KernelSet,
    name: &str,
    n: usize,
    d: usize,
) -> Result<FuncId, CodegenError> {
    let params = [(CType::ConstF32Ptr, "x"), (CType::F32Ptr, "out")];
    let (n, d) = (n as i64, d as i64);
    internal(ks, name, &params, CType::Void, &[], |g, a, _| {
        let d4 = d / 4 * 4;
        g.for_const(0, d4, 4, |g, c| {
            let mut acc = g.vconst(0.0);
            for i in 0..n {
                let idx = g.b.ins().iadd_imm_s(c, i * d);
                let x = g.vload(a[0], idx);
                acc = g.vadd(acc, x);
            }
            let nf = g.vconst(n as f32);
            let m = g.vdiv(acc, nf);
            g.vstore(m, a[1], c);
        });
        g.for_const(d4, d, 1, |g, c| {
            let zero = g.f32(0.0);
            let acc = g.var(types::F32, zero);
            for i in 0..n {
                let idx = g.b.ins().iadd_imm_s(c, i * d);
                let x = g.load_f32(a[0], idx);
                let s = g.get(acc);
                let s = g.b.ins().fadd(s, x);
                g.set(acc, s);
            }
            let s = g.get(acc);
            let nf = g.f32(n as f32);
            let m = g.b.ins().fdiv(s, nf);
            g.store_f32(m, a[1], c);
        });
        None
    })
}

/// One layer's hyper-connection constants (section 2.1).
pub struct MhcConsts {
    pub lanes: usize,
    pub d: usize,
    /// `l mod n`.
    pub lane: usize,
    pub a_pre: f32,
    pub a_post: f32,
    pub a_res: f32,
    pub b_pre: Vec<f32>,
    pub b_post: Vec<f32>,
    pub b_res: Vec<f32>,
}

/// `void mhc_pre(const float *x, const float *mix, float *u)`: the block input `u = sum_i
/// sigmoid(a_pre * mix[i] + b_pre[i] + off_i) * x[i]`, `mix` the row's `z @ [phi_pre | phi_post
/// | phi_res]` (section 2.1 step 3).
pub fn mhc_pre(ks: &mut KernelSet, name: &str, m: &MhcConsts) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "x"),
        (CType::ConstF32Ptr, "mix"),
        (CType::F32Ptr, "u"),
    ];
    let d = m.d as i64;
    internal(ks, name, &params, CType::Void, &[], |g, a, _| {
        let (x, mix, u) = (a[0], a[1], a[2]);
        zeros(g, u, d);
        for i in 0..m.lanes {
            let off = if i == m.lane { 4.0 } else { -4.0 };
            let iv = g.iconst(i as i64);
            let zp = g.load_f32(mix, iv);
            let ap = g.f32(m.a_pre);
            let v = g.b.ins().fmul(ap, zp);
            let bp = g.f32(m.b_pre[i]);
            let v = g.b.ins().fadd(v, bp);
            let o = g.f32(off);
            let v = g.b.ins().fadd(v, o);
            let h = math::sigmoid(g, v);
            let lane = g.iconst(i as i64 * d * 4);
            let xl = g.b.ins().iadd(x, lane);
            axpy(g, u, h, xl, d, false);
        }
        None
    })
}

/// `void mhc_post(const float *x, const float *mix, const float *y, float *next, float *r)`:
/// the lanes after the layer, `next[i] = sum_j R[i][j] * x[j] + hpost[i] * y` with
/// `R = Sinkhorn(a_res * mix[2n..] + b_res)` (in `r`, `n*n` floats of scratch) and `hpost[i] =
/// 2 * sigmoid(a_post * mix[n + i] + b_post[i] + off_i)` (section 2.1 steps 5-7).
pub fn mhc_post(ks: &mut KernelSet, name: &str, m: &MhcConsts) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "x"),
        (CType::ConstF32Ptr, "mix"),
        (CType::ConstF32Ptr, "y"),
        (CType::F32Ptr, "next"),
        (CType::F32Ptr, "r"),
    ];
    let (n, d) = (m.lanes as i64, m.d as i64);
    internal(ks, name, &params, CType::Void, &[], |g, a, _| {
        let (x, mix, y, next, r) = (a[0], a[1], a[2], a[3], a[4]);
        for ij in 0..n * n {
            let at = g.iconst(2 * n + ij);
            let zr = g.load_f32(mix, at);
            let ar = g.f32(m.a_res);
            let v = g.b.ins().fmul(ar, zr);
            let br = g.f32(m.b_res[ij as usize]);
            let v = g.b.ins().fadd(v, br);
            let idx = g.iconst(ij);
            g.store_f32(v, r, idx);
        }
        // Sinkhorn: 20 rounds of row, then column, log-normalization.
        g.for_const(0, 20, 1, |g, _| {
            for (stride, step) in [(n, 1), (1, n)] {
                for line in 0..n {
                    let idx: Vec<i64> = (0..n).map(|k| line * stride + k * step).collect();
                    let ninf = g.f32(f32::NEG_INFINITY);
                    let mut mx = ninf;
                    let vals: Vec<Value> = idx
                        .iter()
                        .map(|&i| {
                            let iv = g.iconst(i);
                            g.load_f32(r, iv)
                        })
                        .collect();
                    for &v in &vals {
                        mx = g.b.ins().fmax(mx, v);
                    }
                    let mut sum = g.f32(0.0);
                    for &v in &vals {
                        let e = g.b.ins().fsub(v, mx);
                        let e = math::exp(g, e);
                        sum = g.b.ins().fadd(sum, e);
                    }
                    let l = ln32(g, sum);
                    let lse = g.b.ins().fadd(mx, l);
                    for (&i, &v) in idx.iter().zip(&vals) {
                        let nv = g.b.ins().fsub(v, lse);
                        let iv = g.iconst(i);
                        g.store_f32(nv, r, iv);
                    }
                }
            }
        });
        for ij in 0..n * n {
            let iv = g.iconst(ij);
            let v = g.load_f32(r, iv);
            let e = math::exp(g, v);
            g.store_f32(e, r, iv);
        }
        for i in 0..n {
            let off = if i as usize == m.lane { 0.0 } else { -4.0 };
            let at = g.iconst(n + i);
            let zo = g.load_f32(mix, at);
            let ap = g.f32(m.a_post);
            let v = g.b.ins().fmul(ap, zo);
            let bp = g.f32(m.b_post[i as usize]);
            let v = g.b.ins().fadd(v, bp);
            let o = g.f32(off);
            let v = g.b.ins().fadd(v, o);
            let s = math::sigmoid(g, v);
            let two = g.f32(2.0);
            let hpost = g.b.ins().fmul(two, s);
            let rij: Vec<Value> = (0..n)
                .map(|j| {
                    let iv = g.iconst(i * n + j);
                    g.load_f32(r, iv)
                })
                .collect();
            let dst = g.iconst(i * d * 4);
            let dst = g.b.ins().iadd(next, dst);
            let d4 = d / 4 * 4;
            let rv4: Vec<V4> = rij.iter().map(|&rv| g.vsplat(rv)).collect();
            let hp4 = g.vsplat(hpost);
            g.for_const(0, d4, 4, |g, c| {
                let mut acc = g.vconst(0.0);
                for (j, &rv) in rv4.iter().enumerate() {
                    let idx = g.b.ins().iadd_imm_s(c, j as i64 * d);
                    let xv = g.vload(x, idx);
                    let p = g.vmul(rv, xv);
                    acc = g.vadd(acc, p);
                }
                let yv = g.vload(y, c);
                let p = g.vmul(hp4, yv);
                let acc = g.vadd(acc, p);
                g.vstore(acc, dst, c);
            });
            g.for_const(d4, d, 1, |g, c| {
                let mut acc = g.f32(0.0);
                for (j, &rv) in rij.iter().enumerate() {
                    let idx = g.b.ins().iadd_imm_s(c, j as i64 * d);
                    let xv = g.load_f32(x, idx);
                    let p = g.b.ins().fmul(rv, xv);
                    acc = g.b.ins().fadd(acc, p);
                }
                let yv = g.load_f32(y, c);
                let p = g.b.ins().fmul(hpost, yv);
                let acc = g.b.ins().fadd(acc, p);
                g.store_f32(acc, dst, c);
            });
        }
        None
    })
}

/// One site's engram geometry (section 3).
pub struct EngramShape {
    pub orders: Vec<usize>,
    pub heads: usize,
    pub stride: usize,
    pub slots: usize,
    /// Row width `S` of a table.
    pub sub: usize,
}

/// A site's tables: float32 rows, or CQ codes dequantized a gathered row at a time.
pub enum Tables {
    F32(DataId),
    Cq(CqData),
}

/// `void engram_gather(const int32_t *ids, const int32_t *folded, float *m, size_t t)`: the
/// n-gram rows of position `t` (`ids[..=t]` written, those below `p0` in `folded`): `m =
/// concat_e(Table_e[index[t][e]] * ok[t][e])`, `index` the hash of section 3.
pub fn engram_gather(
    ks: &mut KernelSet,
    name: &str,
    tables: &Tables,
    e: &EngramShape,
    p0: usize,
) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstI32Ptr, "ids"),
        (CType::ConstI32Ptr, "folded"),
        (CType::F32Ptr, "m"),
        (CType::SizeT, "t"),
    ];
    let (slots, sub) = (e.slots as i64, e.sub as i64);
    let data: Vec<DataId> = match tables {
        Tables::F32(id) => vec![*id],
        Tables::Cq(cq) => cq.data_ids().to_vec(),
    };
    internal(ks, name, &params, CType::Void, &data, |g, a, d| {
        let (ids, folded, m, t, tab) = (a[0], a[1], a[2], a[3], d[0]);
        let scratch = match tables {
            Tables::Cq(cq) => Some((cq.shape, cq::stack_floats(g, cq.shape.group))),
            Tables::F32(_) => None,
        };
        for (oi, &order) in e.orders.iter().enumerate() {
            for hh in 0..e.heads {
                let table = (oi * e.heads + hh) as i64;
                let seed = 0x9E37_79B9u32.wrapping_mul((oi * e.stride + hh + 1) as u32);
                let mut acc = g.b.ins().iconst(types::I32, i64::from(seed as i32));
                for j in 0..order as i64 {
                    let ok =
                        g.b.ins()
                            .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, t, j);
                    let src = g.b.ins().iadd_imm_s(t, -j);
                    let zero = g.iconst(0);
                    let src = g.b.ins().select(ok, src, zero);
                    let p = row_at(g, ids, folded, src, 4, p0);
                    let tok = g.b.ins().load(types::I32, crate::codegen::gen::mem(), p, 0);
                    let z32 = g.b.ins().iconst(types::I32, 0);
                    let tok = g.b.ins().select(ok, tok, z32);
                    let x = g.b.ins().bxor(acc, tok);
                    acc = g.b.ins().imul_imm_s(x, 0x0100_0193);
                }
                let sh = g.b.ins().ushr_imm_s(acc, 15);
                let acc = g.b.ins().bxor(acc, sh);
                let slot = g.b.ins().urem_imm_u(acc, slots);
                let slot = if g.ptr == types::I32 {
                    slot
                } else {
                    let pt = g.ptr;
                    g.b.ins().uextend(pt, slot)
                };
                let row = g.b.ins().iadd_imm_s(slot, table * slots);
                let dst = g.iconst(table * sub * 4);
                let dst = g.b.ins().iadd(m, dst);
                let valid =
                    g.b.ins()
                        .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, t, order as i64 - 1);
                g.if_else(
                    valid,
                    |g| match scratch {
                        Some((shape, buf)) => cq::dequantize_row(g, d, &shape, row, dst, buf),
                        None => {
                            let src = g.addr(tab, row, sub * 4);
                            g.for_const(0, sub, 1, |g, c| {
                                let v = load_ro(g, src, c);
                                g.store_f32(v, dst, c);
                            });
                        }
                    },
                    |g| {
                        g.for_const(0, sub, 1, |g, c| {
                            let z = g.f32(0.0);
                            g.store_f32(z, dst, c);
                        });
                    },
                );
            }
        }
        None
    })
}

/// `void engram_inject(float *u, const float *ek, const float *ev, float *tmp)`: `u += alpha *
/// ev` with `alpha = sigmoid(dot(unit(u), unit(ek)) / sqrt(D))` (section 2.2 step 1); `tmp`
/// holds `2*D` floats of scratch.
pub fn engram_inject(ks: &mut KernelSet, name: &str, d: usize) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::F32Ptr, "u"),
        (CType::ConstF32Ptr, "ek"),
        (CType::ConstF32Ptr, "ev"),
        (CType::F32Ptr, "tmp"),
    ];
    let d = d as i64;
    internal(ks, name, &params, CType::Void, &[], |g, a, _| {
        let (u, ek, ev, tmp) = (a[0], a[1], a[2], a[3]);
        let off = g.iconst(d * 4);
        let tmp_b = g.b.ins().iadd(tmp, off);
        for (src, dst) in [(u, tmp), (ek, tmp_b)] {
            let inv = inv_rms(g, src, d);
            g.for_const(0, d, 1, |g, c| {
                let x = g.load_f32(src, c);
                let x = g.b.ins().fmul(x, inv);
                g.store_f32(x, dst, c);
            });
        }
        let dd = dot(g, tmp, tmp_b, d, false);
        let sq = g.f32((d as f32).sqrt());
        let s = g.b.ins().fdiv(dd, sq);
        let alpha = math::sigmoid(g, s);
        axpy(g, u, alpha, ev, d, false);
        None
    })
}

/// One layer's Hadamard MLP data (section 2.4), each a read-only f32 object.
pub struct MlpData {
    pub d: usize,
    pub n: usize,
    pub a: usize,
    pub b: usize,
    /// Columns of `cond_v`.
    pub rank: usize,
    pub w1a: DataId,
    pub w1b: DataId,
    pub w2a: DataId,
    pub w2b: DataId,
    pub w3a: DataId,
    pub w3b: DataId,
    pub d1: DataId,
    pub d2: DataId,
    pub b2: DataId,
    pub d3: DataId,
    pub d4: DataId,
    pub cond_v: DataId,
    pub cond_u: DataId,
    /// `p1`, `p2` as u32 (shared by every layer).
    pub p1: DataId,
    pub p2: DataId,
}

/// `kron(z; A, B)` of one row into `out` through `tmp` (`a*b` floats each): `tmp = Z B`, then
/// `out = A^T tmp`, `Z` the row viewed `(a, b)`. Each output row is a sum of scaled rows, in
/// order of the summed index, four columns at a time.
fn kron(
    g: &mut Gen<'_>,
    z: Value,
    out: Value,
    tmp: Value,
    (am, a): (Value, i64),
    (bm, b): (Value, i64),
) {
    // tmp[r][:] = sum_i Z[r][i] * B[i][:]
    g.for_const(0, a, 1, |g, r| {
        let drow = g.addr(tmp, r, b * 4);
        zeros(g, drow, b);
        g.for_const(0, b, 1, |g, i| {
            let zi = g.b.ins().imul_imm_s(r, b);
            let zi = g.b.ins().iadd(zi, i);
            let coef = g.load_f32(z, zi);
            let brow = g.addr(bm, i, b * 4);
            axpy(g, drow, coef, brow, b, true);
        });
    });
    // out[r][:] = sum_i A[i][r] * tmp[i][:]
    g.for_const(0, a, 1, |g, r| {
        let drow = g.addr(out, r, b * 4);
        zeros(g, drow, b);
        g.for_const(0, a, 1, |g, i| {
            let ai = g.b.ins().imul_imm_s(i, a);
            let ai = g.b.ins().iadd(ai, r);
            let coef = load_ro(g, am, ai);
            let trow = g.addr(tmp, i, b * 4);
            axpy(g, drow, coef, trow, b, false);
        });
    });
}

/// `out[m] = src[p[m]] * scale[m]` over `n` (p a u32 table; `scale` optional).
fn permute(g: &mut Gen<'_>, src: Value, dst: Value, p: Value, n: i64) {
    g.for_const(0, n, 1, |g, m| {
        let pp = g.addr(p, m, 4);
        let i = g.b.ins().load(types::I32, mem_ro(), pp, 0);
        let i = if g.ptr == types::I32 {
            i
        } else {
            let pt = g.ptr;
            g.b.ins().uextend(pt, i)
        };
        let v = g.load_f32(src, i);
        g.store_f32(v, dst, m);
    });
}

/// `void mlp(const float *x, float *out, float *s)`: the Hadamard MLP of one row (section 2.4);
/// `s` holds `3*N + 2*rank` floats of scratch. `out` gets `D` floats.
pub fn mlp(ks: &mut KernelSet, name: &str, w: &MlpData) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "x"),
        (CType::F32Ptr, "out"),
        (CType::F32Ptr, "s"),
    ];
    let data = [
        w.w1a, w.w1b, w.w2a, w.w2b, w.w3a, w.w3b, w.d1, w.d2, w.b2, w.d3, w.d4, w.cond_v, w.cond_u,
        w.p1, w.p2,
    ];
    let (d, n, a, b, rank) = (
        w.d as i64,
        w.n as i64,
        w.a as i64,
        w.b as i64,
        w.rank as i64,
    );
    internal(ks, name, &params, CType::Void, &data, |g, args, dd| {
        let (x, out, s) = (args[0], args[1], args[2]);
        let [w1a, w1b, w2a, w2b, w3a, w3b, d1, d2, b2, d3, d4, cv, cu, p1, p2] =
            <[Value; 15]>::try_from(dd).expect("15 data objects");
        let at = |g: &mut Gen<'_>, floats: i64| {
            let o = g.iconst(floats * 4);
            g.b.ins().iadd(s, o)
        };
        let z1 = s;
        let z2 = at(g, n);
        let z3 = at(g, 2 * n);
        let cnd = at(g, 3 * n);
        // cond = 1 + softmax(x @ cond_v) @ cond_u.
        g.for_const(0, rank, 1, |g, j| {
            let zero = g.f32(0.0);
            let acc = g.var(types::F32, zero);
            g.for_const(0, d, 1, |g, i| {
                let xv = g.load_f32(x, i);
                let wi = g.b.ins().imul_imm_s(i, rank);
                let wi = g.b.ins().iadd(wi, j);
                let wv = load_ro(g, cv, wi);
                let p = g.b.ins().fmul(xv, wv);
                let sacc = g.get(acc);
                let sacc = g.b.ins().fadd(sacc, p);
                g.set(acc, sacc);
            });
            let v = g.get(acc);
            g.store_f32(v, cnd, j);
        });
        {
            let ninf = g.f32(f32::NEG_INFINITY);
            let mut mx = ninf;
            let vals: Vec<Value> = (0..rank)
                .map(|j| {
                    let iv = g.iconst(j);
                    g.load_f32(cnd, iv)
                })
                .collect();
            for &v in &vals {
                mx = g.b.ins().fmax(mx, v);
            }
            let mut sum = g.f32(0.0);
            let es: Vec<Value> = vals
                .iter()
                .map(|&v| {
                    let e = g.b.ins().fsub(v, mx);
                    math::exp(g, e)
                })
                .collect();
            for &e in &es {
                sum = g.b.ins().fadd(sum, e);
            }
            for (j, &e) in es.iter().enumerate() {
                let p = g.b.ins().fdiv(e, sum);
                let iv = g.iconst(j as i64);
                g.store_f32(p, cnd, iv);
            }
        }
        // z3 = cond (N floats).
        g.for_const(0, n, 1, |g, c| {
            let zero = g.f32(0.0);
            let acc = g.var(types::F32, zero);
            for j in 0..rank {
                let jv = g.iconst(j);
                let pj = g.load_f32(cnd, jv);
                let ui = g.b.ins().iadd_imm_s(c, j * n);
                let u = load_ro(g, cu, ui);
                let p = g.b.ins().fmul(pj, u);
                let sacc = g.get(acc);
                let sacc = g.b.ins().fadd(sacc, p);
                g.set(acc, sacc);
            }
            let v = g.get(acc);
            let one = g.f32(1.0);
            let v = g.b.ins().fadd(v, one);
            g.store_f32(v, z3, c);
        });
        // z1 = pad(x) * d1.
        g.for_const(0, n, 1, |g, c| {
            let dv = load_ro(g, d1, c);
            let inside = g.b.ins().icmp_imm_u(IntCC::UnsignedLessThan, c, d);
            let zero = g.iconst(0);
            let ci = g.b.ins().select(inside, c, zero);
            let xv = g.load_f32(x, ci);
            let zf = g.f32(0.0);
            let xv = g.b.ins().select(inside, xv, zf);
            let v = g.b.ins().fmul(xv, dv);
            g.store_f32(v, z1, c);
        });
        // Each product goes z1 -> z2 through its own temp `kt`; the permutation brings it back.
        let kt = at(g, 3 * n + rank);
        kron(g, z1, z2, kt, (w1a, a), (w1b, b));
        permute(g, z2, z1, p1, n);
        // pre = ((cond * d2) * z) + b2; silu.
        g.for_const(0, n, 1, |g, c| {
            let cv = g.load_f32(z3, c);
            let dv = load_ro(g, d2, c);
            let v = g.b.ins().fmul(cv, dv);
            let z = g.load_f32(z1, c);
            let v = g.b.ins().fmul(v, z);
            let bv = load_ro(g, b2, c);
            let p = g.b.ins().fadd(v, bv);
            let sg = math::sigmoid(g, p);
            let act = g.b.ins().fmul(p, sg);
            g.store_f32(act, z1, c);
        });
        kron(g, z1, z2, kt, (w2a, a), (w2b, b));
        permute(g, z2, z1, p2, n);
        g.for_const(0, n, 1, |g, c| {
            let dv = load_ro(g, d3, c);
            let z = g.load_f32(z1, c);
            let v = g.b.ins().fmul(z, dv);
            g.store_f32(v, z1, c);
        });
        kron(g, z1, z2, kt, (w3a, a), (w3b, b));
        g.for_const(0, d, 1, |g, c| {
            let z = g.load_f32(z2, c);
            let dv = load_ro(g, d4, c);
            let v = g.b.ins().fmul(z, dv);
            g.store_f32(v, out, c);
        });
        None
    })
}

/// Floats of scratch [`mlp`] needs.
pub fn mlp_scratch(n: usize, rank: usize) -> usize {
    4 * n + rank
}

/// Floats of one probe's pooling state: the running max, the running sum, two floats of
/// padding (16-byte rows), then the running weighted sum of the cells (`D`).
pub fn pool_stride(d: usize) -> usize {
    d + 4
}

/// `void pool_init(float *state)`: every one of `probes` pooling states empty (max -inf, sum
/// and weighted sum 0), or, with `folded`, the folded prefix's states (copied).
pub fn pool_init(
    ks: &mut KernelSet,
    name: &str,
    probes: usize,
    d: usize,
    folded: Option<DataId>,
) -> Result<FuncId, CodegenError> {
    let params = [(CType::F32Ptr, "state")];
    let total = (probes * pool_stride(d)) as i64;
    let stride = pool_stride(d) as i64;
    let data: Vec<DataId> = folded.into_iter().collect();
    internal(ks, name, &params, CType::Void, &data, |g, a, dd| {
        let st = a[0];
        match dd.first() {
            Some(&src) => g.for_const(0, total, 1, |g, i| {
                let v = load_ro(g, src, i);
                g.store_f32(v, st, i);
            }),
            None => g.for_const(0, probes as i64, 1, |g, p| {
                let row = g.addr(st, p, stride * 4);
                let ninf = g.f32(f32::NEG_INFINITY);
                let zero = g.f32(0.0);
                let i0 = g.iconst(0);
                g.store_f32(ninf, row, i0);
                g.for_const(1, stride, 1, |g, i| g.store_f32(zero, row, i));
            }),
        }
        None
    })
}

/// `void pool_add(const float *cell, const float *probes, float *state)`: one position's
/// cell of one row into that row's `k` probe states (section 4, online): `s = dot(cell,
/// probe) / sqrt(D)`, the max moved to `max(m, s)`, the sum and the weighted sum rescaled by
/// `exp(m - m')` and `exp(s - m')` (times the cell) added.
pub fn pool_add(
    ks: &mut KernelSet,
    name: &str,
    k: usize,
    d: usize,
) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "cell"),
        (CType::ConstF32Ptr, "probes"),
        (CType::F32Ptr, "state"),
    ];
    let (di, stride) = (d as i64, pool_stride(d) as i64);
    internal(ks, name, &params, CType::Void, &[], |g, a, _| {
        let (cell, probes, state) = (a[0], a[1], a[2]);
        g.for_const(0, k as i64, 1, |g, p| {
            let probe = g.addr(probes, p, di * 4);
            let st = g.addr(state, p, stride * 4);
            let dd = dot(g, cell, probe, di, true);
            let sq = g.f32((d as f32).sqrt());
            let s = g.b.ins().fdiv(dd, sq);
            let i0 = g.iconst(0);
            let i1 = g.iconst(1);
            let m = g.load_f32(st, i0);
            let m2 = g.b.ins().fmax(m, s);
            let dm = g.b.ins().fsub(m, m2);
            let old = math::exp(g, dm);
            let ds = g.b.ins().fsub(s, m2);
            let e = math::exp(g, ds);
            let sum = g.load_f32(st, i1);
            let sum = g.b.ins().fmul(sum, old);
            let sum = g.b.ins().fadd(sum, e);
            g.store_f32(m2, st, i0);
            g.store_f32(sum, st, i1);
            let acc = g.b.ins().iadd_imm_s(st, 16);
            g.for_const(0, di, 1, |g, c| {
                let v = g.load_f32(acc, c);
                let v = g.b.ins().fmul(v, old);
                let x = g.load_f32(cell, c);
                let x = g.b.ins().fmul(e, x);
                let v = g.b.ins().fadd(v, x);
                g.store_f32(v, acc, c);
            });
        });
        None
    })
}

/// A head's output projection.
#[derive(Clone, Copy)]
pub enum Proj {
    F32(DataId),
    Cq(FuncId),
}

/// One head's read-only data (section 4).
pub struct HeadData {
    pub d: usize,
    /// `(L+1) * k` probes.
    pub rows: usize,
    pub queries: usize,
    pub out: usize,
    pub gain: DataId,
    pub query: DataId,
    pub row_bias: DataId,
    /// `(queries * D) x out`, row-major; or, where the checkpoint's `proj` is CQ codes,
    /// `void proj_mm(const float *x, float *y, size_t rows)` over them ([`super::cq::matmul`]).
    pub proj: Proj,
    pub bias: Option<DataId>,
    /// Divide the output by its norm (the embedding head).
    pub normalize: bool,
}

/// `void head(const float *state, float *out, float *scratch)`: a head's output from its
/// pooling states: each probe's pooled cell `R = unit(acc / sum) * gain`, then per query `j`
/// the softmax over every probe of `dot(R, query[j]) / sqrt(D) + row_bias[j]` pooling the `R`s,
/// the pooled vectors concatenated through `proj` (+ `bias`). `scratch` holds `rows * D + rows
/// + queries * D` floats.
pub fn head(ks: &mut KernelSet, name: &str, h: &HeadData) -> Result<FuncId, CodegenError> {
    let params = [
        (CType::ConstF32Ptr, "state"),
        (CType::F32Ptr, "out"),
        (CType::F32Ptr, "scratch"),
    ];
    let (proj_f32, proj_mm) = match h.proj {
        Proj::F32(id) => (Some(id), None),
        Proj::Cq(f) => (None, Some(f)),
    };
    let mut data = vec![h.gain, h.query, h.row_bias];
    data.extend(proj_f32);
    data.extend(h.bias);
    let (d, rows, qn, out_n) = (h.d as i64, h.rows as i64, h.queries as i64, h.out as i64);
    let stride = pool_stride(h.d) as i64;
    let sqrt_d = (h.d as f32).sqrt();
    let normalize = h.normalize;
    let id = ks.declare_function(name, &[], &params, CType::Void, false)?;
    let callees: Vec<FuncId> = proj_mm.into_iter().collect();
    ks.define_function(id, &data, &callees, |g, a, addrs, f| {
        let (state, out, scratch) = (a[0], a[1], a[2]);
        let (gain, query, row_bias) =
            (addrs.get(h.gain), addrs.get(h.query), addrs.get(h.row_bias));
        let proj = proj_f32.map(|t| addrs.get(t));
        let bias = h.bias.map(|t| addrs.get(t));
        let pooled = scratch;
        let u_off = g.iconst(rows * d * 4);
        let u = g.b.ins().iadd(scratch, u_off);
        let cat_off = g.iconst((rows * d + rows) * 4);
        let cat = g.b.ins().iadd(scratch, cat_off);
        // R = unit(acc / sum) * gain.
        g.for_const(0, rows, 1, |g, r| {
            let st = g.addr(state, r, stride * 4);
            let i1 = g.iconst(1);
            let sum = g.load_f32(st, i1);
            let acc = g.b.ins().iadd_imm_s(st, 16);
            let prow = g.addr(pooled, r, d * 4);
            g.for_const(0, d, 1, |g, c| {
                let v = g.load_f32(acc, c);
                let v = g.b.ins().fdiv(v, sum);
                g.store_f32(v, prow, c);
            });
            let inv = inv_rms(g, prow, d);
            let gv = load_ro(g, gain, r);
            g.for_const(0, d, 1, |g, c| {
                let v = g.load_f32(prow, c);
                let v = g.b.ins().fmul(v, inv);
                let v = g.b.ins().fmul(v, gv);
                g.store_f32(v, prow, c);
            });
        });
        g.for_const(0, qn, 1, |g, j| {
            let qj = g.addr(query, j, d * 4);
            let ninf = g.f32(f32::NEG_INFINITY);
            let mx = g.var(types::F32, ninf);
            g.for_const(0, rows, 1, |g, r| {
                let prow = g.addr(pooled, r, d * 4);
                let dv = dot(g, prow, qj, d, true);
                let sq = g.f32(sqrt_d);
                let v = g.b.ins().fdiv(dv, sq);
                let bi = g.b.ins().imul_imm_s(j, rows);
                let bi = g.b.ins().iadd(bi, r);
                let b = load_ro(g, row_bias, bi);
                let v = g.b.ins().fadd(v, b);
                g.store_f32(v, u, r);
                let m = g.get(mx);
                let m = g.b.ins().fmax(m, v);
                g.set(mx, m);
            });
            let m = g.get(mx);
            let zero = g.f32(0.0);
            let sum = g.var(types::F32, zero);
            g.for_const(0, rows, 1, |g, r| {
                let v = g.load_f32(u, r);
                let e = g.b.ins().fsub(v, m);
                let e = math::exp(g, e);
                g.store_f32(e, u, r);
                let s = g.get(sum);
                let s = g.b.ins().fadd(s, e);
                g.set(sum, s);
            });
            let total = g.get(sum);
            let cj = g.addr(cat, j, d * 4);
            g.for_const(0, d, 1, |g, c| {
                let z = g.f32(0.0);
                g.store_f32(z, cj, c);
            });
            g.for_const(0, rows, 1, |g, r| {
                let e = g.load_f32(u, r);
                let w = g.b.ins().fdiv(e, total);
                let prow = g.addr(pooled, r, d * 4);
                g.for_const(0, d, 1, |g, c| {
                    let x = g.load_f32(prow, c);
                    let x = g.b.ins().fmul(w, x);
                    let o = g.load_f32(cj, c);
                    let o = g.b.ins().fadd(o, x);
                    g.store_f32(o, cj, c);
                });
            });
        });
        let zero = g.f32(0.0);
        let norm = g.var(types::F32, zero);
        if let Some(mm) = proj_mm {
            let one = g.iconst(1);
            let r = f.get(mm);
            g.call(r, &[cat, out, one]);
        }
        g.for_const(0, out_n, 1, |g, o| {
            let mut y = match proj {
                None => g.load_f32(out, o),
                Some(proj) => {
                    let z = g.f32(0.0);
                    let acc = g.var(types::F32, z);
                    g.for_const(0, qn * d, 1, |g, i| {
                        let x = g.load_f32(cat, i);
                        let wi = g.b.ins().imul_imm_s(i, out_n);
                        let wi = g.b.ins().iadd(wi, o);
                        let w = load_ro(g, proj, wi);
                        let p = g.b.ins().fmul(x, w);
                        let s = g.get(acc);
                        let s = g.b.ins().fadd(s, p);
                        g.set(acc, s);
                    });
                    g.get(acc)
                }
            };
            if let Some(b) = bias {
                let bv = load_ro(g, b, o);
                y = g.b.ins().fadd(y, bv);
            }
            g.store_f32(y, out, o);
            let sq = g.b.ins().fmul(y, y);
            let n = g.get(norm);
            let n = g.b.ins().fadd(n, sq);
            g.set(norm, n);
        });
        if normalize {
            let n = g.get(norm);
            let eps = g.f32(1e-12);
            let n = g.b.ins().fadd(n, eps);
            let n = g.b.ins().sqrt(n);
            g.for_const(0, out_n, 1, |g, o| {
                let y = g.load_f32(out, o);
                let y = g.b.ins().fdiv(y, n);
                g.store_f32(y, out, o);
            });
        }
        None
    })?;
    Ok(id)
}
