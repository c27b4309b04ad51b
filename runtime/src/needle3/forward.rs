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
    engram_indices_from(config, ids, 0)
}

/// [`engram_indices`] of positions `start..` only (the earlier ids are their context).
fn engram_indices_from(config: &Config, ids: &[u32], start: usize) -> Vec<Vec<usize>> {
    let heads = config.engram_heads();
    let stride = config.engram_seed_stride() as u32;
    let tables = config.engram_tables();
    let slots = config.engram_slots as u32;
    let mut out = vec![vec![0usize; tables]; ids.len().saturating_sub(start)];
    for (oi, &order) in config.engram_orders.iter().enumerate() {
        for hh in 0..heads {
            let seed = 0x9E37_79B9u32.wrapping_mul((oi as u32) * stride + hh as u32 + 1);
            for (r, row) in out.iter_mut().enumerate() {
                let t = start + r;
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

/// Per site, the key `ek` and the tapped value `ev` of the new positions `start..`, `(T', D)`
/// each; appends the new rows of `w` (the value before its taps) to the cache's.
fn engram_sites(
    model: &Model,
    ids: &[u32],
    start: usize,
    site_w: &mut [Vec<f32>],
) -> Vec<(Array2<f32>, Array2<f32>)> {
    let c = &model.config;
    if model.sites.is_empty() {
        return Vec::new();
    }
    let (t_new, d) = (ids.len() - start, c.d_model);
    let (e_n, s_n, slots) = (c.engram_tables(), c.engram_sub_dim(), c.engram_slots);
    let heads = c.engram_heads();
    let dil = c.engram_dilation();
    let idx = engram_indices_from(c, ids, start);
    model
        .sites
        .iter()
        .zip(site_w.iter_mut())
        .map(|(site, w_all)| {
            let mut m = Array2::<f32>::zeros((t_new, e_n * s_n));
            for (r, row) in idx.iter().enumerate() {
                for (e, &slot) in row.iter().enumerate() {
                    let order = c.engram_orders[e / heads];
                    if start + r + 1 < order {
                        continue;
                    }
                    let at = (e * slots + slot) * s_n;
                    row_slice_mut(&mut m, r)[e * s_n..(e + 1) * s_n]
                        .copy_from_slice(&site.tables[at..at + s_n]);
                }
            }
            let ek = m.dot(&site.key_proj);
            w_all.extend(m.dot(&site.value_proj).iter());
            let mut ev = Array2::<f32>::zeros((t_new, d));
            for r in 0..t_new {
                let t = start + r;
                let out = row_slice_mut(&mut ev, r);
                for (j, tap) in site.taps.rows().into_iter().enumerate() {
                    let Some(src) = t.checked_sub(j * dil) else {
                        break;
                    };
                    let w = &w_all[src * d..(src + 1) * d];
                    for ((o, &tp), &wv) in out.iter_mut().zip(tap.iter()).zip(w) {
                        *o += tp * wv;
                    }
                }
            }
            (ek, ev)
        })
        .collect()
}

/// RoPE tables `(cos, sin)` of positions `start..start+rows`, `(rows, dq/2)` each, in float32
/// like the reference.
pub fn rope_tables(c: &Config, start: usize, rows: usize) -> (Array2<f32>, Array2<f32>) {
    let dq = c.qk_head_dim();
    let half = dq / 2;
    let theta = c.rope_theta as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / dq as f32))
        .collect();
    let mut cos = Array2::zeros((rows, half));
    let mut sin = Array2::zeros((rows, half));
    for r in 0..rows {
        for (i, f) in freqs.iter().enumerate() {
            let a = (start + r) as f32 * f;
            cos[[r, i]] = a.cos();
            sin[[r, i]] = a.sin();
        }
    }
    (cos, sin)
}

/// The causal depthwise conv of the new rows `x` (positions `start..`), `out[t] = sum_j taps[j] *
/// x[t-j] * ok_j(t)`, reading earlier positions from `prev` (every pre-conv row so far, flat);
/// then appends `x` to `prev`.
fn conv(
    x: Array2<f32>,
    taps: &Array2<f32>,
    window: Option<usize>,
    start: usize,
    prev: &mut Vec<f32>,
) -> Array2<f32> {
    let width = x.ncols();
    prev.extend(x.iter());
    if taps.nrows() == 0 {
        return x;
    }
    let mut out = &x * &taps.row(0);
    for r in 0..x.nrows() {
        let t = start + r;
        let o = row_slice_mut(&mut out, r);
        for (j, tap) in taps.rows().into_iter().enumerate().skip(1) {
            if j > t || window.is_some_and(|w| j >= w) {
                break;
            }
            let src = &prev[(t - j) * width..(t - j + 1) * width];
            for ((o, &tp), &v) in o.iter_mut().zip(tap.iter()).zip(src) {
                *o += tp * v;
            }
        }
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

/// The layer's block on the routed input `u` of positions `start..` (section 2.2), reading and
/// extending the layer's cache; returns `Block(u)`.
#[allow(clippy::too_many_arguments)]
fn block(
    model: &Model,
    l: usize,
    u: &Array2<f32>,
    site: Option<&(Array2<f32>, Array2<f32>)>,
    rope: &(Array2<f32>, Array2<f32>),
    start: usize,
    cache: &mut LayerCache,
) -> Array2<f32> {
    let c = &model.config;
    let w: &Layer = &model.layers[l];
    let (t_new, d) = (u.nrows(), c.d_model);
    let (h_n, k_n, dq, dv) = (c.num_heads, c.num_kv_heads, c.qk_head_dim(), c.v_head_dim());
    let mut u = u.clone();
    if let Some((ek, ev)) = site {
        for r in 0..t_new {
            let mut a = u.row(r).to_vec();
            let mut b = ek.row(r).to_vec();
            unit(&mut a);
            unit(&mut b);
            let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let alpha = sigmoid(dot / (d as f32).sqrt());
            let mut row = u.row_mut(r);
            row.zip_mut_with(&ev.row(r), |x, e| *x += alpha * e);
        }
    }
    let a = zc_rows(&u, &w.norm_in);
    let window = (!c.is_global(l)).then_some(c.sliding_window);
    let mut q = conv(a.dot(&w.wq), &w.q_taps, window, start, &mut cache.q_pre);
    let mut k = conv(a.dot(&w.wk), &w.k_taps, window, start, &mut cache.k_pre);
    let v = conv(a.dot(&w.wv), &w.v_taps, window, start, &mut cache.v_pre);
    norm_rope(&mut q, &w.q_norm, dq, &rope.0, &rope.1);
    norm_rope(&mut k, &w.k_norm, dq, &rope.0, &rope.1);
    cache.k.extend(k.iter());
    cache.v.extend(v.iter());
    let scale = 1.0 / (dq as f32).sqrt();
    let group = h_n / k_n;
    let mut o = Array2::<f32>::zeros((t_new, h_n * dv));
    let mut scores = vec![0f32; start + t_new];
    let (qs, ks, vs) = (standard(&q), &cache.k[..], &cache.v[..]);
    let os = o.as_slice_mut().expect("standard layout");
    let (qw, kw, vw, ow) = (h_n * dq, k_n * dq, k_n * dv, h_n * dv);
    for h in 0..h_n {
        let g = h / group;
        for r in 0..t_new {
            let t = start + r;
            let lo = window.map_or(0, |win| (t + 1).saturating_sub(win));
            let qh = &qs[r * qw + h * dq..r * qw + (h + 1) * dq];
            let sc = &mut scores[..t + 1 - lo];
            for (i, sv) in sc.iter_mut().enumerate() {
                let kr = &ks[(lo + i) * kw + g * dq..(lo + i) * kw + (g + 1) * dq];
                *sv = qh.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            softmax(sc);
            let oh = &mut os[r * ow + h * dv..r * ow + (h + 1) * dv];
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
    x.clone() + &mlp(model, l, &x)
}

/// The Hadamard MLP of layer `l` on the block's post-attention rows `x` (section 2.4).
fn mlp(model: &Model, l: usize, x: &Array2<f32>) -> Array2<f32> {
    let c = &model.config;
    let (t_new, d) = (x.nrows(), c.d_model);
    let w = &model.layers[l];
    let m = zc_rows(x, &w.pre_hada);
    let mlp = &w.mlp;
    let nn = c.hada_n();
    let mut cond = m.dot(&mlp.cond_v);
    for mut row in cond.rows_mut() {
        softmax(row.as_slice_mut().expect("standard layout"));
    }
    let cond = cond.dot(&mlp.cond_u) + 1.0;
    let mut z = Array2::<f32>::zeros((t_new, nn));
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
    &z.slice_axis(Axis(1), Slice::from(..d)) * &d4
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

/// What one layer carries from earlier positions to later ones: the pre-conv q/k/v rows (the
/// conv taps read the last `c-1`) and the K/V rows after norm and RoPE, all flat row-major.
#[derive(Clone, Debug, Default)]
struct LayerCache {
    q_pre: Vec<f32>,
    k_pre: Vec<f32>,
    v_pre: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The state a model carries across positions, for incremental decoding: the token ids (the
/// engram hashes read the last `max(orders)-1`), each site's engram values before their taps
/// (the taps read back `3 * max(orders)` rows) and each layer's [`LayerCache`]. The lanes mix
/// only within a position, so nothing else crosses positions. Every row is kept.
#[derive(Clone, Debug)]
pub struct Cache {
    ids: Vec<u32>,
    site_w: Vec<Vec<f32>>,
    layers: Vec<LayerCache>,
}

impl Cache {
    /// An empty cache for `model` (position 0 comes next).
    pub fn new(model: &Model) -> Cache {
        Cache {
            ids: Vec::new(),
            site_w: vec![Vec::new(); model.sites.len()],
            layers: vec![LayerCache::default(); model.layers.len()],
        }
    }

    /// The number of positions run so far.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no position has been run.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Runs the next positions `ids` after those already in the cache: their logits and hidden
    /// cells (rows relative to the first new position). Running a prompt in any split gives the
    /// logits of running it whole, up to float32 rounding.
    pub fn extend(&mut self, model: &Model, ids: &[u32]) -> Result<Output, Error> {
        let c = &model.config;
        if self.layers.len() != model.layers.len() || self.site_w.len() != model.sites.len() {
            return Err(Error::Config(
                "the cache was made for a model of another depth".into(),
            ));
        }
        let (start, t_new, d, n) = (self.ids.len(), ids.len(), c.d_model, c.mhc_lanes);
        for (r, &id) in ids.iter().enumerate() {
            if id as usize >= c.vocab_size {
                return Err(Error::Token {
                    id,
                    pos: start + r,
                    vocab: c.vocab_size,
                });
            }
        }
        self.ids.extend_from_slice(ids);
        let sqrt_d = (d as f32).sqrt();
        let mut x0 = Array2::<f32>::zeros((t_new, d));
        for (r, &id) in ids.iter().enumerate() {
            x0.row_mut(r)
                .assign(&(&model.embedding.row(id as usize) * sqrt_d));
        }
        let sites = engram_sites(model, &self.ids, start, &mut self.site_w);
        let rope = rope_tables(c, start, t_new);
        let mut x = Array2::<f32>::zeros((t_new, n * d));
        for i in 0..n {
            x.slice_axis_mut(Axis(1), Slice::from(i * d..(i + 1) * d))
                .assign(&x0);
        }
        let mut cells = Vec::with_capacity(c.num_layers + 1);
        cells.push(x0);
        for (l, (layer, cache)) in model.layers.iter().zip(&mut self.layers).enumerate() {
            let mhc = &layer.mhc;
            let mut z = x.clone();
            for mut row in z.rows_mut() {
                unit(row.as_slice_mut().expect("standard layout"));
            }
            let zp = z.dot(&mhc.phi_pre);
            let zo = z.dot(&mhc.phi_post);
            let zr = z.dot(&mhc.phi_res);
            let lane = l % n;
            let mut u = Array2::<f32>::zeros((t_new, d));
            for r in 0..t_new {
                let xr = row_slice(&x, r);
                let ur = row_slice_mut(&mut u, r);
                for i in 0..n {
                    let off = if i == lane { 4.0 } else { -4.0 };
                    let hpre = sigmoid(mhc.a_pre * zp[[r, i]] + mhc.b_pre[i] + off);
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
            let y = block(model, l, &u, site, &rope, start, cache) - &u;
            let mut next = Array2::<f32>::zeros((t_new, n * d));
            let mut rm = vec![0f32; n * n];
            for r in 0..t_new {
                for (ij, rv) in rm.iter_mut().enumerate() {
                    *rv = mhc.a_res * zr[[r, ij]] + mhc.b_res[ij];
                }
                sinkhorn(&mut rm, n);
                let xr = row_slice(&x, r);
                let yr = row_slice(&y, r);
                let nr = row_slice_mut(&mut next, r);
                for i in 0..n {
                    let off = if i == lane { 0.0 } else { -4.0 };
                    let hpost = 2.0 * sigmoid(mhc.a_post * zo[[r, i]] + mhc.b_post[i] + off);
                    let dst = &mut nr[i * d..(i + 1) * d];
                    for j in 0..n {
                        let rij = rm[i * n + j];
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
}

/// Runs the whole prompt `ids` (BOS included) through the model.
pub fn forward(model: &Model, ids: &[u32]) -> Result<Output, Error> {
    Cache::new(model).extend(model, ids)
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

/// Greedy decoding as `run.generate` does it: runs `prompt` (BOS included), then appends the
/// argmax token (the lowest id on ties) until `eos` or `max_new` tokens; returns the new tokens
/// (`eos` included when reached).
pub fn greedy(model: &Model, prompt: &[u32], max_new: usize, eos: u32) -> Result<Vec<u32>, Error> {
    let mut cache = Cache::new(model);
    let mut out = cache.extend(model, prompt)?;
    let mut new = Vec::new();
    while new.len() < max_new {
        let Some(r) = out.logits.nrows().checked_sub(1) else {
            break;
        };
        let last = out.logits.row(r);
        let mut best = 0;
        for (i, &v) in last.iter().enumerate() {
            if v > last[best] {
                best = i;
            }
        }
        let next = best as u32;
        new.push(next);
        if next == eos {
            break;
        }
        out = cache.extend(model, &[next])?;
    }
    Ok(new)
}
