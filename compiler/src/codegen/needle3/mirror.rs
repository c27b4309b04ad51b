//! The generated step's arithmetic in plain Rust, operation for operation, so that the folded
//! prefix's rows are the ones the step itself would write: folded and unfolded libraries then
//! give the same logits bit for bit, as the runtime's engine does.
//!
//! Each function follows one kernel: the same operations in the same order, a multiply-add
//! fused exactly where the generated code fuses one (v1's norm and matrix product, and `exp`,
//! on targets with a native FMA: `fma`), `exp` by the same polynomial as
//! [`crate::codegen::math::exp`]. Only what the prefix's rows and the heads' pooling depend
//! on is here (not the logits).

use std::borrow::Cow;

use needle_runtime::needle3::cq::{fwht, CqTensor};
use needle_runtime::needle3::forward::rope_tables;
use needle_runtime::needle3::Model;

use super::kernels::pool_stride;
use super::side_by_side;

const EPS: f32 = 1e-6;

/// `a * b + c`, fused where the target fuses it.
fn mul_add(a: f32, b: f32, c: f32, fma: bool) -> f32 {
    if fma {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// [`crate::codegen::math::exp`], with its constants.
pub fn exp(x: f32, fma: bool) -> f32 {
    use crate::codegen::math::{
        EXP_HI, EXP_LO, EXP_POLY, LN2_HI, LN2_LO, LOG2E, ROUND_MAGIC, ROUND_MAGIC_BITS,
    };
    let x = x.clamp(EXP_LO, EXP_HI);
    let t = mul_add(x, LOG2E, ROUND_MAGIC, fma);
    let nf = t - ROUND_MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC_BITS);
    let r = x - nf * LN2_HI;
    let r = r - nf * LN2_LO;
    let mut p = EXP_POLY[0];
    for &k in &EXP_POLY[1..] {
        p = mul_add(p, r, k, fma);
    }
    let z = r * r;
    let p = mul_add(p, z, r, fma) + 1.0;
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let pow2 = |n: i32| f32::from_bits(((n + 127) << 23) as u32);
    p * pow2(n1) * pow2(n2)
}

fn sigmoid(x: f32, fma: bool) -> f32 {
    1.0 / (1.0 + exp(-x, fma))
}

/// [`crate::codegen::math::ln_f64`].
fn ln_f64(x: f64) -> f64 {
    let bits = x.to_bits() as i64;
    let e = ((bits >> 52) & 0x7FF) - 1023;
    let m = f64::from_bits(((bits & ((1 << 52) - 1)) | (1023 << 52)) as u64);
    let big = m >= std::f64::consts::SQRT_2;
    let (m, e) = if big { (m * 0.5, e + 1) } else { (m, e) };
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let mut s = 1.0 / 19.0;
    for k in (0..9).rev() {
        s = s * t2 + 1.0 / f64::from(2 * k + 1);
    }
    (e as f64) * std::f64::consts::LN_2 + (t + t) * s
}

fn ln32(x: f32) -> f32 {
    ln_f64(f64::from(x)) as f32
}

/// v1's `rmsnorm`: four partial sums of squares, then the tail.
fn rmsnorm(x: &[f32], scale: Option<&[f32]>, fma: bool) -> Vec<f32> {
    let d = x.len();
    let d4 = d / 4 * 4;
    let mut acc = [0f32; 4];
    for i in (0..d4).step_by(4) {
        for l in 0..4 {
            acc[l] = mul_add(x[i + l], x[i + l], acc[l], fma);
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for &v in &x[d4..] {
        s = mul_add(v, v, s, fma);
    }
    let inv = 1.0 / (s / d as f32 + EPS).sqrt();
    x.iter()
        .enumerate()
        .map(|(i, &v)| match scale {
            Some(sc) => v * inv * sc[i],
            None => v * inv,
        })
        .collect()
}

/// v1's `matmul` of one row: each output one sum over the inputs in order.
fn matmul(x: &[f32], w: &[f32], n: usize, fma: bool) -> Vec<f32> {
    let mut y = vec![0f32; n];
    for (k, &xv) in x.iter().enumerate() {
        let row = &w[k * n..(k + 1) * n];
        for (acc, &wv) in y.iter_mut().zip(row) {
            *acc = if fma {
                xv.mul_add(wv, *acc)
            } else {
                *acc + xv * wv
            };
        }
    }
    y
}

/// A matrix product as the step holds it: float32 `(k, n)` row-major (v1's `matmul`), or
/// CQ codes stored `(n, k)` ([`super::cq::matmul`]).
enum Product<'a> {
    F32(Vec<f32>, usize),
    Cq(Cow<'a, CqTensor>),
}

impl<'a> Product<'a> {
    /// Over the codes where there are some, else over `values()` (only made then).
    fn new(
        values: impl FnOnce() -> Vec<f32>,
        n: usize,
        codes: Option<Cow<'a, CqTensor>>,
    ) -> Product<'a> {
        match codes {
            Some(t) => Product::Cq(t),
            None => Product::F32(values(), n),
        }
    }

    fn apply(&self, x: &[f32], fma: bool) -> Vec<f32> {
        match self {
            Product::F32(w, n) => matmul(x, w, *n, fma),
            Product::Cq(t) => cq_matmul(x, t, fma),
        }
    }
}

/// [`super::cq::matmul`] of one row: the row rotated per group, then per output and group the
/// levels times the rotated values in four lanes (lane `l` takes values `l, l+4, ...`), `(l0 +
/// l1) + (l2 + l3)`, and the output `+= norm * that`.
fn cq_matmul(x: &[f32], t: &CqTensor, fma: bool) -> Vec<f32> {
    let (g, gpr) = (t.group, t.groups_per_row());
    let scale = 1.0 / (g as f32).sqrt();
    let mut xr = vec![0f32; t.padded_cols()];
    xr[..x.len()].copy_from_slice(x);
    for grp in xr.chunks_exact_mut(g) {
        fwht(grp);
    }
    xr.iter_mut().for_each(|v| *v *= scale);
    (0..t.rows)
        .map(|c| {
            let mut acc = 0f32;
            for gi in 0..gpr {
                let mut lanes = [0f32; 4];
                for i in 0..g {
                    let k = gi * g + i;
                    let level = t.code_levels[t.code(c, k)];
                    lanes[i % 4] = mul_add(level, xr[k], lanes[i % 4], fma);
                }
                let gs = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
                acc = mul_add(t.norms[c * gpr + gi], gs, acc, fma);
            }
            acc
        })
        .collect()
}

/// The kernels' sequential dot product.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0, |s, (x, y)| s + x * y)
}

/// The attention scores' `dot4`: four partial sums, then the tail.
fn dot4(a: &[f32], b: &[f32]) -> f32 {
    let n4 = a.len() / 4 * 4;
    let mut acc = [0f32; 4];
    for i in (0..n4).step_by(4) {
        for l in 0..4 {
            acc[l] += a[i + l] * b[i + l];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for i in n4..a.len() {
        s += a[i] * b[i];
    }
    s
}

fn inv_rms(x: &[f32]) -> f32 {
    1.0 / (dot(x, x) / x.len() as f32 + EPS).sqrt()
}

fn one_plus(g: &[f32]) -> Vec<f32> {
    g.iter().map(|v| 1.0 + v).collect()
}

/// What the step has written for the positions run so far: the rows of its caches and, per
/// position, its hidden cells (for the heads' pooling).
pub struct Rows {
    pub ids: Vec<u32>,
    /// Per layer: pre-conv q|k|v rows, keys, values (flat).
    pub pre: Vec<Vec<f32>>,
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// Per site: the values before their taps.
    pub w: Vec<Vec<f32>>,
    /// Per position, its `L+1` cells (flat).
    pub cells: Vec<Vec<f32>>,
}

/// Runs `ids` from position 0 through the step's arithmetic for a target that fuses
/// multiply-adds or not.
pub fn run(model: &Model, ids: &[u32], fma: bool) -> Rows {
    let c = &model.config;
    let (d, n, l_n) = (c.d_model, c.mhc_lanes, model.layers.len());
    let (h_n, k_n, dq, dv) = (c.num_heads, c.num_kv_heads, c.qk_head_dim(), c.v_head_dim());
    let (qw, kw, vw, gw) = (h_n * dq, k_n * dq, k_n * dv, h_n * dv);
    let cw = qw + kw + vw;
    let (cos, sin) = rope_tables(c, 0, ids.len());
    let mut rows = Rows {
        ids: Vec::new(),
        pre: vec![Vec::new(); l_n],
        k: vec![Vec::new(); l_n],
        v: vec![Vec::new(); l_n],
        w: vec![Vec::new(); model.sites.len()],
        cells: Vec::new(),
    };
    // Each layer's weights as the step holds them (concatenated, `1 + g` scales), made once.
    struct Mats<'a> {
        phi: Product<'a>,
        cat: Product<'a>,
        taps: Vec<f32>,
        wout: Product<'a>,
        norm_in: Vec<f32>,
        q_norm: Vec<f32>,
        k_norm: Vec<f32>,
        post_norm: Vec<f32>,
        pre_hada: Vec<f32>,
    }
    let mats: Vec<Mats> = model
        .layers
        .iter()
        .map(|w| {
            let mhc = &w.mhc;
            let n_taps = w.q_taps.nrows();
            Mats {
                phi: Product::new(
                    || {
                        side_by_side(
                            &[
                                (&flat2(&mhc.phi_pre), n),
                                (&flat2(&mhc.phi_post), n),
                                (&flat2(&mhc.phi_res), n * n),
                            ],
                            n * d,
                        )
                    },
                    2 * n + n * n,
                    mhc.phi_cq.as_ref().map(Cow::Borrowed),
                ),
                cat: Product::new(
                    || {
                        side_by_side(
                            &[
                                (&flat2(&w.wq), qw),
                                (&flat2(&w.wk), kw),
                                (&flat2(&w.wv), vw),
                                (&flat2(&w.wgate), gw),
                            ],
                            d,
                        )
                    },
                    cw + gw,
                    w.cq.as_ref()
                        .and_then(|c| CqTensor::concat_rows(&[&c.q, &c.k, &c.v, &c.gate]))
                        .map(Cow::Owned),
                ),
                taps: if n_taps == 0 {
                    vec![1.0; cw]
                } else {
                    side_by_side(
                        &[
                            (&flat2(&w.q_taps), qw),
                            (&flat2(&w.k_taps), kw),
                            (&flat2(&w.v_taps), vw),
                        ],
                        n_taps,
                    )
                },
                wout: Product::new(
                    || flat2(&w.wout),
                    d,
                    w.cq.as_ref().map(|c| Cow::Borrowed(&c.out)),
                ),
                norm_in: one_plus(&w.norm_in),
                q_norm: one_plus(&w.q_norm),
                k_norm: one_plus(&w.k_norm),
                post_norm: one_plus(&w.post_norm),
                pre_hada: one_plus(&w.pre_hada),
            }
        })
        .collect();
    let site_mats: Vec<(Product, Product, Vec<f32>)> = model
        .sites
        .iter()
        .map(|s| {
            (
                Product::new(
                    || flat2(&s.key_proj),
                    d,
                    s.key_cq.as_ref().map(Cow::Borrowed),
                ),
                Product::new(
                    || flat2(&s.value_proj),
                    d,
                    s.value_cq.as_ref().map(Cow::Borrowed),
                ),
                flat2(&s.taps),
            )
        })
        .collect();
    for (t, &tok) in ids.iter().enumerate() {
        rows.ids.push(tok);
        let sqrt_d = (d as f32).sqrt();
        let x0: Vec<f32> = model
            .embedding
            .row(tok as usize)
            .iter()
            .map(|v| v * sqrt_d)
            .collect();
        let mut cells = x0.clone();
        let mut x: Vec<f32> = (0..n).flat_map(|_| x0.iter().copied()).collect();
        for (l, (w, wm)) in model.layers.iter().zip(&mats).enumerate() {
            let mhc = &w.mhc;
            let z = rmsnorm(&x, None, fma);
            let mix = wm.phi.apply(&z, fma);
            let lane = l % n;
            let mut u = vec![0f32; d];
            for i in 0..n {
                let off = if i == lane { 4.0 } else { -4.0 };
                let h = sigmoid(mhc.a_pre * mix[i] + mhc.b_pre[i] + off, fma);
                for (uc, &xc) in u.iter_mut().zip(&x[i * d..(i + 1) * d]) {
                    *uc += h * xc;
                }
            }
            let mut b = u.clone();
            if let Some(si) = c.engram_layers.iter().position(|&s| s == l) {
                let site = &model.sites[si];
                let m = gather(model, si, &rows.ids, t);
                let (key, value, site_taps) = &site_mats[si];
                let ek = key.apply(&m, fma);
                let wrow = value.apply(&m, fma);
                rows.w[si].extend(&wrow);
                let ev = taps(
                    &rows.w[si],
                    d,
                    t,
                    site_taps,
                    site.taps.nrows(),
                    c.engram_dilation(),
                    None,
                );
                let ua: Vec<f32> = {
                    let inv = inv_rms(&b);
                    b.iter().map(|v| v * inv).collect()
                };
                let ka: Vec<f32> = {
                    let inv = inv_rms(&ek);
                    ek.iter().map(|v| v * inv).collect()
                };
                let alpha = sigmoid(dot(&ua, &ka) / (d as f32).sqrt(), fma);
                for (bc, &e) in b.iter_mut().zip(&ev) {
                    *bc += alpha * e;
                }
            }
            let a = rmsnorm(&b, Some(&wm.norm_in), fma);
            let qkvg = wm.cat.apply(&a, fma);
            rows.pre[l].extend(&qkvg[..cw]);
            let window = (!c.is_global(l)).then_some(c.sliding_window);
            let n_taps = w.q_taps.nrows();
            let conv = taps(&rows.pre[l], cw, t, &wm.taps, n_taps.max(1), 1, window);
            let (qn, kn) = (&wm.q_norm, &wm.k_norm);
            let rope = |head: &mut [f32]| {
                let half = dq / 2;
                for i in 0..half {
                    let (x1, x2) = (head[i], head[i + half]);
                    let (cs, sn) = (cos[[t, i]], sin[[t, i]]);
                    head[i] = x1 * cs - x2 * sn;
                    head[i + half] = x2 * cs + x1 * sn;
                }
            };
            let mut q = Vec::with_capacity(qw);
            for head in conv[..qw].chunks_exact(dq) {
                let mut h = rmsnorm(head, Some(qn), fma);
                rope(&mut h);
                q.extend(h);
            }
            for head in conv[qw..qw + kw].chunks_exact(dq) {
                let mut h = rmsnorm(head, Some(kn), fma);
                rope(&mut h);
                rows.k[l].extend(h);
            }
            rows.v[l].extend(&conv[qw + kw..cw]);
            let lo = window.map_or(0, |win| (t + 1).saturating_sub(win));
            let group = h_n / k_n;
            let scale = 1.0 / (dq as f32).sqrt();
            let mut o = vec![0f32; gw];
            for h in 0..h_n {
                let g = h / group;
                let qh = &q[h * dq..(h + 1) * dq];
                let scores: Vec<f32> = (lo..=t)
                    .map(|s| dot4(qh, &rows.k[l][s * kw + g * dq..s * kw + (g + 1) * dq]) * scale)
                    .collect();
                let m = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let es: Vec<f32> = scores.iter().map(|&s| exp(s - m, fma)).collect();
                let total = es.iter().fold(0f32, |a, &e| a + e);
                let oh = &mut o[h * dv..(h + 1) * dv];
                for (i, &e) in es.iter().enumerate() {
                    let p = e / total;
                    let s = lo + i;
                    let vr = &rows.v[l][s * vw + g * dv..s * vw + (g + 1) * dv];
                    for (oc, &vc) in oh.iter_mut().zip(vr) {
                        *oc += p * vc;
                    }
                }
            }
            for (oc, &gv) in o.iter_mut().zip(&qkvg[cw..]) {
                *oc *= sigmoid(gv, fma);
            }
            let t1 = wm.wout.apply(&o, fma);
            let t1 = rmsnorm(&t1, Some(&wm.post_norm), fma);
            let ag = 1.0 / (1.0 + (-w.attn_gate).exp());
            for (bc, &tv) in b.iter_mut().zip(&t1) {
                *bc += tv * ag;
            }
            let m = rmsnorm(&b, Some(&wm.pre_hada), fma);
            let t1 = mlp(model, l, &m, fma);
            for (bc, &tv) in b.iter_mut().zip(&t1) {
                *bc += tv;
            }
            let y: Vec<f32> = b.iter().zip(&u).map(|(p, q)| p - q).collect();
            x = mhc_post(&x, &mix, &y, model, l, fma);
            // The cell: the lane mean, as `lane_mean` sums it.
            for ci in 0..d {
                let mut s = 0f32;
                for i in 0..n {
                    s += x[i * d + ci];
                }
                cells.push(s / n as f32);
            }
        }
        rows.cells.push(cells);
    }
    rows
}

/// An array's values, row-major.
fn flat2<'a>(a: impl IntoIterator<Item = &'a f32>) -> Vec<f32> {
    a.into_iter().copied().collect()
}

/// `engram_gather` of site `si` at position `t`.
fn gather(model: &Model, si: usize, ids: &[u32], t: usize) -> Vec<f32> {
    let c = &model.config;
    let heads = c.engram_heads();
    let stride = c.engram_seed_stride();
    let (slots, sub) = (c.engram_slots, c.engram_sub_dim());
    let tables = &model.sites[si].tables;
    let mut m = vec![0f32; c.engram_tables() * sub];
    for (oi, &order) in c.engram_orders.iter().enumerate() {
        for hh in 0..heads {
            let e = oi * heads + hh;
            let mut acc = 0x9E37_79B9u32.wrapping_mul((oi * stride + hh + 1) as u32);
            for j in 0..order {
                let tok = if t >= j { ids[t - j] } else { 0 };
                acc = (acc ^ tok).wrapping_mul(0x0100_0193);
            }
            acc ^= acc >> 15;
            let slot = (acc % slots as u32) as usize;
            if t + 1 >= order {
                m[e * sub..(e + 1) * sub].copy_from_slice(
                    &tables[(e * slots + slot) * sub..(e * slots + slot + 1) * sub],
                );
            }
        }
    }
    m
}

/// `taps`: `out[c] = taps[0][c] * rows[t][c] + sum_j taps[j][c] * rows[t - j*dil][c]`.
fn taps(
    rows: &[f32],
    width: usize,
    t: usize,
    table: &[f32],
    n_taps: usize,
    dil: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let cur = &rows[t * width..(t + 1) * width];
    let mut out: Vec<f32> = cur.iter().zip(table).map(|(x, tp)| tp * x).collect();
    let last = window.map_or(n_taps, |w| n_taps.min(w));
    for j in 1..last {
        let back = j * dil;
        if t < back {
            continue;
        }
        let src = &rows[(t - back) * width..(t - back + 1) * width];
        let tr = &table[j * width..(j + 1) * width];
        for ((o, &x), &tp) in out.iter_mut().zip(src).zip(tr) {
            *o += tp * x;
        }
    }
    out
}

/// `mhc_post`.
fn mhc_post(x: &[f32], mix: &[f32], y: &[f32], model: &Model, l: usize, fma: bool) -> Vec<f32> {
    let c = &model.config;
    let (n, d) = (c.mhc_lanes, c.d_model);
    let mhc = &model.layers[l].mhc;
    let lane = l % n;
    let mut r: Vec<f32> = (0..n * n)
        .map(|ij| mhc.a_res * mix[2 * n + ij] + mhc.b_res[ij])
        .collect();
    for _ in 0..20 {
        for (stride, step) in [(n, 1), (1, n)] {
            for line in 0..n {
                let idx: Vec<usize> = (0..n).map(|k| line * stride + k * step).collect();
                let mx = idx.iter().fold(f32::NEG_INFINITY, |m, &i| m.max(r[i]));
                let sum = idx.iter().fold(0f32, |s, &i| s + exp(r[i] - mx, fma));
                let lse = mx + ln32(sum);
                for &i in &idx {
                    r[i] -= lse;
                }
            }
        }
    }
    let r: Vec<f32> = r.iter().map(|&v| exp(v, fma)).collect();
    let mut next = vec![0f32; n * d];
    for i in 0..n {
        let off = if i == lane { 0.0 } else { -4.0 };
        let hpost = 2.0 * sigmoid(mhc.a_post * mix[n + i] + mhc.b_post[i] + off, fma);
        for ci in 0..d {
            let mut acc = 0f32;
            for j in 0..n {
                acc += r[i * n + j] * x[j * d + ci];
            }
            next[i * d + ci] = acc + hpost * y[ci];
        }
    }
    next
}

/// `mlp`.
fn mlp(model: &Model, l: usize, x: &[f32], fma: bool) -> Vec<f32> {
    let c = &model.config;
    let d = c.d_model;
    let nn = c.hada_n();
    let (fa, fb) = c.hada_factors();
    let m = &model.layers[l].mlp;
    let rank = m.cond_v.ncols();
    let cv = flat2(&m.cond_v);
    let cu = flat2(&m.cond_u);
    let mut cnd: Vec<f32> = (0..rank)
        .map(|j| (0..d).fold(0f32, |s, i| s + x[i] * cv[i * rank + j]))
        .collect();
    let mx = cnd.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let es: Vec<f32> = cnd.iter().map(|&v| exp(v - mx, fma)).collect();
    let sum = es.iter().fold(0f32, |s, &e| s + e);
    for (cj, &e) in cnd.iter_mut().zip(&es) {
        *cj = e / sum;
    }
    let cond: Vec<f32> = (0..nn)
        .map(|ci| (0..rank).fold(0f32, |s, j| s + cnd[j] * cu[j * nn + ci]) + 1.0)
        .collect();
    let kron = |z: &[f32], am: &[f32], bm: &[f32]| -> Vec<f32> {
        let mut tmp = vec![0f32; nn];
        for r in 0..fa {
            for li in 0..fb {
                tmp[r * fb + li] = (0..fb).fold(0f32, |s, i| s + z[r * fb + i] * bm[i * fb + li]);
            }
        }
        let mut out = vec![0f32; nn];
        for r in 0..fa {
            for li in 0..fb {
                out[r * fb + li] = (0..fa).fold(0f32, |s, i| s + am[i * fa + r] * tmp[i * fb + li]);
            }
        }
        out
    };
    let z1: Vec<f32> = (0..nn)
        .map(|ci| {
            if ci < d {
                x[ci] * m.d1[ci]
            } else {
                0.0 * m.d1[ci]
            }
        })
        .collect();
    let z2 = kron(&z1, &flat2(&m.w1a), &flat2(&m.w1b));
    let z1: Vec<f32> = model.p1.iter().map(|&i| z2[i]).collect();
    let act: Vec<f32> = (0..nn)
        .map(|ci| {
            let p = cond[ci] * m.d2[ci] * z1[ci] + m.b2[ci];
            p * sigmoid(p, fma)
        })
        .collect();
    let z2 = kron(&act, &flat2(&m.w2a), &flat2(&m.w2b));
    let z1: Vec<f32> = model.p2.iter().map(|&i| z2[i]).collect();
    let z1: Vec<f32> = z1.iter().zip(&m.d3).map(|(z, dv)| z * dv).collect();
    let z2 = kron(&z1, &flat2(&m.w3a), &flat2(&m.w3b));
    (0..d).map(|ci| z2[ci] * m.d4[ci]).collect()
}

/// A head's pooling states after `rows`' positions, as `pool_init` and `pool_add` make them.
pub fn pool_states(
    head: &needle_runtime::needle3::model::Head,
    rows: &Rows,
    pad: u32,
    d: usize,
    fma: bool,
) -> Vec<f32> {
    let k = head.probes_per_row;
    let stride = pool_stride(d);
    let cells_n = rows.cells.first().map_or(0, |c| c.len() / d);
    let mut state = vec![0f32; cells_n * k * stride];
    for st in state.chunks_exact_mut(stride) {
        st[0] = f32::NEG_INFINITY;
    }
    let sqrt_d = (d as f32).sqrt();
    for (t, cells) in rows.cells.iter().enumerate() {
        if rows.ids[t] == pad {
            continue;
        }
        for r in 0..cells_n {
            let cell = &cells[r * d..(r + 1) * d];
            for p in 0..k {
                let probe = &head.probes[(r * k + p) * d..(r * k + p + 1) * d];
                let s = dot(cell, probe) / sqrt_d;
                let st = &mut state[(r * k + p) * stride..(r * k + p + 1) * stride];
                let m2 = st[0].max(s);
                let old = exp(st[0] - m2, fma);
                let e = exp(s - m2, fma);
                st[1] = st[1] * old + e;
                st[0] = m2;
                for (a, &xv) in st[4..].iter_mut().zip(cell) {
                    *a = *a * old + e * xv;
                }
            }
        }
    }
    state
}
