//! The Needle 3 float32 forward pass over a whole prompt (docs/needle3.md sections 2-4):
//! embedding, engram memory, the layers with their hyper-connection lanes, tied logits, the
//! hidden cells, and the three probe-pooling heads.
//!
//! Matrices are row-major `(positions, features)`; products go through `ndarray`.

use ndarray::{Array2, ArrayView2, Axis, Slice};

use super::config::Config;
use super::model::{Head, Layer, Model};
use super::Error;

/// The norms' epsilon inside the square root.
const EPS: f32 = 1e-6;

/// What one pass computes.
#[derive(Clone, Debug)]
pub struct Output {
    /// `(T, V_out)`: row t predicts token t+1.
    pub logits: Array2<f32>,
    /// The hidden cells, `L+1` matrices `(T, D)`: 0 the scaled embedding, `l+1` the lane mean
    /// after layer l.
    pub cells: Vec<Array2<f32>>,
}

/// The heads' outputs (section 4); `None` where the checkpoint lacks the head.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadOutputs {
    /// The confidence logit (no sigmoid).
    pub confidence: Option<f32>,
    /// The router's three logits.
    pub router: Option<Vec<f32>>,
    /// The unit-length text embedding.
    pub embedding: Option<Vec<f32>>,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `x / sqrt(mean(x^2) + eps)` in place.
fn unit(x: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + EPS).sqrt();
    x.iter_mut().for_each(|v| *v *= inv);
}

/// ZCRMSNorm `(1 + g) * unit(x)` in place.
fn zc(x: &mut [f32], g: &[f32]) {
    unit(x);
    x.iter_mut().zip(g).for_each(|(v, g)| *v *= 1.0 + g);
}

fn zc_rows(x: &Array2<f32>, g: &[f32]) -> Array2<f32> {
    let mut y = x.clone();
    for mut row in y.rows_mut() {
        zc(row.as_slice_mut().expect("standard layout"), g);
    }
    y
}

fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}

fn logsumexp(x: impl Iterator<Item = f32> + Clone) -> f32 {
    let m = x.clone().fold(f32::NEG_INFINITY, f32::max);
    m + x.map(|v| (v - m).exp()).sum::<f32>().ln()
}

/// The engram table row each position reads, `[t][e]` (section 3).
pub fn engram_indices(config: &Config, ids: &[u32]) -> Vec<Vec<usize>> {
    let heads = config.engram_heads();
    let stride = config.engram_seed_stride() as u32;
    let tables = config.engram_tables();
    let slots = config.engram_slots as u32;
    let mut out = vec![vec![0usize; tables]; ids.len()];
    for (oi, &order) in config.engram_orders.iter().enumerate() {
        for hh in 0..heads {
            let seed = 0x9E37_79B9u32.wrapping_mul((oi as u32) * stride + hh as u32 + 1);
            for (t, row) in out.iter_mut().enumerate() {
                let mut acc = seed;
                for j in 0..order {
                    let tok = if t >= j { ids[t - j] } else { 0 };
                    acc = (acc ^ tok).wrapping_mul(0x0100_0193);
                }
                acc ^= acc >> 15;
                row[oi * heads + hh] = (acc % slots) as usize;
            }
        }
    }
    out
}

/// Per site, the key `ek` and the tapped value `ev`, `(T, D)` each.
fn engram_sites(model: &Model, ids: &[u32]) -> Vec<(Array2<f32>, Array2<f32>)> {
    let c = &model.config;
    if model.sites.is_empty() {
        return Vec::new();
    }
    let t_n = ids.len();
    let (e_n, s_n, slots) = (c.engram_tables(), c.engram_sub_dim(), c.engram_slots);
    let heads = c.engram_heads();
    let dil = c.engram_dilation();
    let idx = engram_indices(c, ids);
    model
        .sites
        .iter()
        .map(|site| {
            let mut m = Array2::<f32>::zeros((t_n, e_n * s_n));
            for (t, row) in idx.iter().enumerate() {
                for (e, &slot) in row.iter().enumerate() {
                    let order = c.engram_orders[e / heads];
                    if t + 1 < order {
                        continue;
                    }
                    let at = (e * slots + slot) * s_n;
                    row_slice_mut(&mut m, t)[e * s_n..(e + 1) * s_n]
                        .copy_from_slice(&site.tables[at..at + s_n]);
                }
            }
            let ek = m.dot(&site.key_proj);
            let w = m.dot(&site.value_proj);
            let mut ev = Array2::<f32>::zeros(w.raw_dim());
            for j in 0..site.taps.nrows() {
                let sh = j * dil;
                if sh >= t_n {
                    break;
                }
                let tap = site.taps.row(j);
                let src = w.slice_axis(Axis(0), Slice::from(..t_n - sh));
                let mut dst = ev.slice_axis_mut(Axis(0), Slice::from(sh..));
                dst.zip_mut_with(&(&src * &tap), |a, b| *a += b);
            }
            (ek, ev)
        })
        .collect()
}

/// RoPE tables `(cos, sin)`, `(T, dq/2)` each, in float32 like the reference.
fn rope_tables(c: &Config, t_n: usize) -> (Array2<f32>, Array2<f32>) {
    let dq = c.qk_head_dim();
    let half = dq / 2;
    let theta = c.rope_theta as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / dq as f32))
        .collect();
    let mut cos = Array2::zeros((t_n, half));
    let mut sin = Array2::zeros((t_n, half));
    for t in 0..t_n {
        for (i, f) in freqs.iter().enumerate() {
            let a = t as f32 * f;
            cos[[t, i]] = a.cos();
            sin[[t, i]] = a.sin();
        }
    }
    (cos, sin)
}

/// Causal depthwise conv over positions: `out[t] = sum_j taps[j] * x[t-j] * ok_j(t)`.
fn conv(x: &Array2<f32>, taps: &Array2<f32>, window: Option<usize>) -> Array2<f32> {
    if taps.nrows() == 0 {
        return x.clone();
    }
    let t_n = x.nrows();
    let mut out = x * &taps.row(0);
    for j in 1..taps.nrows() {
        if j >= t_n || window.is_some_and(|w| j >= w) {
            continue;
        }
        let src = x.slice_axis(Axis(0), Slice::from(..t_n - j));
        let mut dst = out.slice_axis_mut(Axis(0), Slice::from(j..));
        dst.zip_mut_with(&(&src * &taps.row(j)), |a, b| *a += b);
    }
    out
}

/// Head-wise ZCRMSNorm and RoPE of a `(T, heads*dq)` matrix in place.
fn norm_rope(x: &mut Array2<f32>, g: &[f32], dq: usize, cos: &Array2<f32>, sin: &Array2<f32>) {
    let half = dq / 2;
    for (t, mut row) in x.rows_mut().into_iter().enumerate() {
        for head in row
            .as_slice_mut()
            .expect("standard layout")
            .chunks_exact_mut(dq)
        {
            zc(head, g);
            for i in 0..half {
                let (x1, x2) = (head[i], head[i + half]);
                let (c, s) = (cos[[t, i]], sin[[t, i]]);
                head[i] = x1 * c - x2 * s;
                head[i + half] = x2 * c + x1 * s;
            }
        }
    }
}

/// `kron(z; A, B)` of every row: `Y = A^T Z B` with `Z` the row viewed `(a, b)`.
fn kron(z: &Array2<f32>, a: &Array2<f32>, b: &Array2<f32>) -> Array2<f32> {
    let (t_n, fa, fb) = (z.nrows(), a.nrows(), b.nrows());
    let zb = z.to_shape((t_n * fa, fb)).expect("contiguous").dot(b);
    let mut out = Array2::<f32>::zeros((t_n, fa * fb));
    let at = a.t();
    for t in 0..t_n {
        let w = zb.slice_axis(Axis(0), Slice::from(t * fa..(t + 1) * fa));
        let y = at.dot(&w);
        out.row_mut(t)
            .assign(&y.to_shape(fa * fb).expect("contiguous"));
    }
    out
}

fn standard(a: &Array2<f32>) -> &[f32] {
    a.as_slice().expect("standard layout")
}

fn row_slice(a: &Array2<f32>, t: usize) -> &[f32] {
    let w = a.ncols();
    &standard(a)[t * w..(t + 1) * w]
}

fn row_slice_mut(a: &mut Array2<f32>, t: usize) -> &mut [f32] {
    let w = a.ncols();
    &mut a.as_slice_mut().expect("standard layout")[t * w..(t + 1) * w]
}

fn permute(z: &Array2<f32>, p: &[usize]) -> Array2<f32> {
    let mut out = Array2::zeros(z.raw_dim());
    for (mut o, i) in out.rows_mut().into_iter().zip(z.rows()) {
        for (m, &src) in p.iter().enumerate() {
            o[m] = i[src];
        }
    }
    out
}

/// The layer's block on the routed input `u` (section 2.2); returns `Block(u)`.
fn block(
    model: &Model,
    l: usize,
    u: &Array2<f32>,
    site: Option<&(Array2<f32>, Array2<f32>)>,
    rope: &(Array2<f32>, Array2<f32>),
) -> Array2<f32> {
    let c = &model.config;
    let w: &Layer = &model.layers[l];
    let (t_n, d) = (u.nrows(), c.d_model);
    let (h_n, k_n, dq, dv) = (c.num_heads, c.num_kv_heads, c.qk_head_dim(), c.v_head_dim());
    let mut u = u.clone();
    if let Some((ek, ev)) = site {
        for t in 0..t_n {
            let mut a = u.row(t).to_vec();
            let mut b = ek.row(t).to_vec();
            unit(&mut a);
            unit(&mut b);
            let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let alpha = sigmoid(dot / (d as f32).sqrt());
            let mut row = u.row_mut(t);
            row.zip_mut_with(&ev.row(t), |x, e| *x += alpha * e);
        }
    }
    let a = zc_rows(&u, &w.norm_in);
    let window = (!c.is_global(l)).then_some(c.sliding_window);
    let mut q = conv(&a.dot(&w.wq), &w.q_taps, window);
    let mut k = conv(&a.dot(&w.wk), &w.k_taps, window);
    let v = conv(&a.dot(&w.wv), &w.v_taps, window);
    norm_rope(&mut q, &w.q_norm, dq, &rope.0, &rope.1);
    norm_rope(&mut k, &w.k_norm, dq, &rope.0, &rope.1);
    let scale = 1.0 / (dq as f32).sqrt();
    let group = h_n / k_n;
    let mut o = Array2::<f32>::zeros((t_n, h_n * dv));
    let mut scores = vec![0f32; t_n];
    let (qs, ks, vs) = (standard(&q), standard(&k), standard(&v));
    let os = o.as_slice_mut().expect("standard layout");
    let (qw, kw, vw, ow) = (h_n * dq, k_n * dq, k_n * dv, h_n * dv);
    for h in 0..h_n {
        let g = h / group;
        for t in 0..t_n {
            let lo = window.map_or(0, |win| (t + 1).saturating_sub(win));
            let qh = &qs[t * qw + h * dq..t * qw + (h + 1) * dq];
            let sc = &mut scores[..t + 1 - lo];
            for (i, sv) in sc.iter_mut().enumerate() {
                let kr = &ks[(lo + i) * kw + g * dq..(lo + i) * kw + (g + 1) * dq];
                *sv = qh.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            softmax(sc);
            let oh = &mut os[t * ow + h * dv..t * ow + (h + 1) * dv];
            for (i, &p) in sc.iter().enumerate() {
                let vr = &vs[(lo + i) * vw + g * dv..(lo + i) * vw + (g + 1) * dv];
                oh.iter_mut().zip(vr).for_each(|(a, b)| *a += p * b);
            }
        }
    }
    let gate = a.dot(&w.wgate).mapv(sigmoid);
    let o = (o * gate).dot(&w.wout);
    let o = zc_rows(&o, &w.post_norm);
    let x = &u + &(o * sigmoid(w.attn_gate));

    let m = zc_rows(&x, &w.pre_hada);
    let mlp = &w.mlp;
    let nn = c.hada_n();
    let mut cond = m.dot(&mlp.cond_v);
    for mut row in cond.rows_mut() {
        softmax(row.as_slice_mut().expect("standard layout"));
    }
    let cond = cond.dot(&mlp.cond_u) + 1.0;
    let mut z = Array2::<f32>::zeros((t_n, nn));
    z.slice_axis_mut(Axis(1), Slice::from(..d)).assign(&m);
    let d1 = ndarray::ArrayView1::from(&mlp.d1[..]);
    let z = permute(&kron(&(z * d1), &mlp.w1a, &mlp.w1b), &model.p1);
    let d2 = ndarray::ArrayView1::from(&mlp.d2[..]);
    let b2 = ndarray::ArrayView1::from(&mlp.b2[..]);
    let pre = &(&(&cond * &d2) * &z) + &b2;
    let act = pre.mapv(|p| p * sigmoid(p));
    let z = permute(&kron(&act, &mlp.w2a, &mlp.w2b), &model.p2);
    let d3 = ndarray::ArrayView1::from(&mlp.d3[..]);
    let z = kron(&(z * d3), &mlp.w3a, &mlp.w3b);
    let d4 = ndarray::ArrayView1::from(&mlp.d4[..d]);
    x + &(&z.slice_axis(Axis(1), Slice::from(..d)) * &d4)
}

/// `Sinkhorn(M)` of an `n x n` row-major matrix: 20 rounds of row then column log-normalization,
/// then `exp`.
fn sinkhorn(m: &mut [f32], n: usize) {
    for _ in 0..20 {
        for i in 0..n {
            let lse = logsumexp(m[i * n..(i + 1) * n].iter().copied());
            m[i * n..(i + 1) * n].iter_mut().for_each(|v| *v -= lse);
        }
        for j in 0..n {
            let lse = logsumexp((0..n).map(|i| m[i * n + j]));
            (0..n).for_each(|i| m[i * n + j] -= lse);
        }
    }
    m.iter_mut().for_each(|v| *v = v.exp());
}

/// Runs the whole prompt `ids` (BOS included) through the model.
pub fn forward(model: &Model, ids: &[u32]) -> Result<Output, Error> {
    let c = &model.config;
    let (t_n, d, n) = (ids.len(), c.d_model, c.mhc_lanes);
    for (pos, &id) in ids.iter().enumerate() {
        if id as usize >= c.vocab_size {
            return Err(Error::Token {
                id,
                pos,
                vocab: c.vocab_size,
            });
        }
    }
    let sqrt_d = (d as f32).sqrt();
    let mut x0 = Array2::<f32>::zeros((t_n, d));
    for (t, &id) in ids.iter().enumerate() {
        x0.row_mut(t)
            .assign(&(&model.embedding.row(id as usize) * sqrt_d));
    }
    let sites = engram_sites(model, ids);
    let rope = rope_tables(c, t_n);
    let mut x = Array2::<f32>::zeros((t_n, n * d));
    for i in 0..n {
        x.slice_axis_mut(Axis(1), Slice::from(i * d..(i + 1) * d))
            .assign(&x0);
    }
    let mut cells = Vec::with_capacity(c.num_layers + 1);
    cells.push(x0);
    for (l, layer) in model.layers.iter().enumerate() {
        let mhc = &layer.mhc;
        let mut z = x.clone();
        for mut row in z.rows_mut() {
            unit(row.as_slice_mut().expect("standard layout"));
        }
        let zp = z.dot(&mhc.phi_pre);
        let zo = z.dot(&mhc.phi_post);
        let zr = z.dot(&mhc.phi_res);
        let lane = l % n;
        let mut u = Array2::<f32>::zeros((t_n, d));
        for t in 0..t_n {
            let xr = row_slice(&x, t);
            let ur = row_slice_mut(&mut u, t);
            for i in 0..n {
                let off = if i == lane { 4.0 } else { -4.0 };
                let hpre = sigmoid(mhc.a_pre * zp[[t, i]] + mhc.b_pre[i] + off);
                ur.iter_mut()
                    .zip(&xr[i * d..(i + 1) * d])
                    .for_each(|(a, b)| *a += hpre * b);
            }
        }
        let site = c
            .engram_layers
            .iter()
            .position(|&s| s == l)
            .and_then(|i| sites.get(i));
        let y = block(model, l, &u, site, &rope) - &u;
        let mut next = Array2::<f32>::zeros((t_n, n * d));
        let mut r = vec![0f32; n * n];
        for t in 0..t_n {
            for (ij, rv) in r.iter_mut().enumerate() {
                *rv = mhc.a_res * zr[[t, ij]] + mhc.b_res[ij];
            }
            sinkhorn(&mut r, n);
            let xr = row_slice(&x, t);
            let yr = row_slice(&y, t);
            let nr = row_slice_mut(&mut next, t);
            for i in 0..n {
                let off = if i == lane { 0.0 } else { -4.0 };
                let hpost = 2.0 * sigmoid(mhc.a_post * zo[[t, i]] + mhc.b_post[i] + off);
                let dst = &mut nr[i * d..(i + 1) * d];
                for j in 0..n {
                    let rij = r[i * n + j];
                    dst.iter_mut()
                        .zip(&xr[j * d..(j + 1) * d])
                        .for_each(|(a, b)| *a += rij * b);
                }
                dst.iter_mut().zip(yr).for_each(|(a, b)| *a += hpost * b);
            }
        }
        x = next;
        cells.push(lane_mean(&x, n, d));
    }
    let mut h = lane_mean(&x, n, d);
    for mut row in h.rows_mut() {
        zc(
            row.as_slice_mut().expect("standard layout"),
            &model.final_norm,
        );
    }
    let vocab = c.logits_vocab();
    let logits = h.dot(
        &model
            .embedding
            .slice_axis(Axis(0), Slice::from(..vocab))
            .t(),
    );
    Ok(Output { logits, cells })
}

fn lane_mean(x: &Array2<f32>, n: usize, d: usize) -> Array2<f32> {
    let mut m = Array2::<f32>::zeros((x.nrows(), d));
    for i in 0..n {
        m += &x.slice_axis(Axis(1), Slice::from(i * d..(i + 1) * d));
    }
    m / n as f32
}

/// One probe-pooling head over the hidden cells (section 4); `keep[t]`: token t is not pad.
fn run_head(head: &Head, cells: &[Array2<f32>], keep: &[bool], d: usize) -> Vec<f32> {
    let (rows, k, q_n) = (cells.len(), head.probes_per_row, head.queries);
    let sqrt_d = (d as f32).sqrt();
    let mut pooled = Array2::<f32>::zeros((rows * k, d));
    for (r, cell) in cells.iter().enumerate() {
        for p in 0..k {
            let at = (r * k + p) * d;
            let probe = ndarray::ArrayView1::from(&head.probes[at..at + d]);
            let mut s: Vec<f32> = cell.dot(&probe).iter().map(|v| v / sqrt_d).collect();
            for (sv, &kp) in s.iter_mut().zip(keep) {
                if !kp {
                    *sv = f32::NEG_INFINITY;
                }
            }
            softmax(&mut s);
            let mut out = pooled.row_mut(r * k + p);
            for (t, &w) in s.iter().enumerate() {
                if w != 0.0 {
                    out.scaled_add(w, &cell.row(t));
                }
            }
            let slice = out.as_slice_mut().expect("standard layout");
            unit(slice);
            let g = head.gain[r * k + p];
            slice.iter_mut().for_each(|v| *v *= g);
        }
    }
    let mut cat = Vec::with_capacity(q_n * d);
    for j in 0..q_n {
        let mut u: Vec<f32> = pooled
            .dot(&head.query.row(j))
            .iter()
            .zip(&head.row_bias[j * rows * k..(j + 1) * rows * k])
            .map(|(v, b)| v / sqrt_d + b)
            .collect();
        softmax(&mut u);
        let p = ndarray::ArrayView1::from(&u[..]).dot(&pooled);
        cat.extend(p.iter());
    }
    let cat = ndarray::Array1::from(cat);
    let mut y = cat.dot(&head.proj).to_vec();
    if let Some(b) = &head.bias {
        y.iter_mut().zip(b).for_each(|(v, b)| *v += b);
    }
    y
}

/// The three heads on a pass's hidden cells (`ids` to mask pad tokens).
pub fn heads(model: &Model, ids: &[u32], out: &Output) -> HeadOutputs {
    let keep: Vec<bool> = ids
        .iter()
        .map(|&i| i != model.config.pad_token_id)
        .collect();
    let d = model.config.d_model;
    let run = |h: &Option<Head>| h.as_ref().map(|h| run_head(h, &out.cells, &keep, d));
    HeadOutputs {
        confidence: run(&model.heads.confidence).map(|y| y[0]),
        router: run(&model.heads.router),
        embedding: run(&model.heads.embedding).map(|y| {
            let norm = (y.iter().map(|v| v * v).sum::<f32>() + 1e-12).sqrt();
            y.iter().map(|v| v / norm).collect()
        }),
    }
}

/// A view of the cells of position `t` as `(L+1, D)`.
pub fn cells_at(out: &Output, t: usize) -> Array2<f32> {
    let views: Vec<ArrayView2<f32>> = out
        .cells
        .iter()
        .map(|c| c.slice_axis(Axis(0), Slice::from(t..t + 1)))
        .collect();
    ndarray::concatenate(Axis(0), &views).expect("same widths")
}
