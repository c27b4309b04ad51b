//! The float32 forward pass (spec section 2), with a KV cache for decoding and the folded
//! tools side (spec section 6).
//!
//! Matrices are row-major `(positions, features)`; matrix products go through `ndarray`
//! (backed by the `matrixmultiply` GEMM).

use ndarray::{concatenate, Array1, Array2, ArrayView2, Axis, Slice};

use crate::config::Config;
use crate::model::{AttentionWeights, Model};

/// ZCRMSNorm's epsilon inside the square root.
const NORM_EPS: f32 = 1e-6;

/// `sigmoid` as the reference computes it in float32.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// ZCRMSNorm over the last axis of every row: `x / sqrt(mean(x^2) + eps) * (1 + g)`.
pub fn zcrmsnorm_rows(x: &mut Array2<f32>, g: &Array1<f32>) {
    for mut row in x.rows_mut() {
        zcrmsnorm(
            row.as_slice_mut()
                .expect("rows of a standard-layout array are contiguous"),
            g,
        );
    }
}

/// ZCRMSNorm of one vector in place.
pub fn zcrmsnorm(x: &mut [f32], g: &Array1<f32>) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + NORM_EPS).sqrt();
    for (v, g) in x.iter_mut().zip(g.iter()) {
        *v = *v * inv * (1.0 + g);
    }
}

/// ZCRMSNorm over each head's `h` values (QK-norm).
fn head_norm(x: &mut Array2<f32>, head_dim: usize, g: &Array1<f32>) {
    for v in x
        .as_slice_mut()
        .expect("standard layout")
        .chunks_exact_mut(head_dim)
    {
        zcrmsnorm(v, g);
    }
}

/// RoPE frequencies `f_j = theta^(-2j/h)`, computed in float32 like the reference.
pub fn rope_frequencies(config: &Config) -> Vec<f32> {
    let h = config.head_dim();
    let theta = config.rope_theta as f32;
    (0..h / 2)
        .map(|j| 1.0 / theta.powf((2 * j) as f32 / h as f32))
        .collect()
}

/// Applies RoPE in place to every head of every row; row `r` is at position `first_pos + r`.
pub fn rope(x: &mut Array2<f32>, head_dim: usize, freqs: &[f32], first_pos: usize) {
    let half = head_dim / 2;
    for (r, mut row) in x.rows_mut().into_iter().enumerate() {
        let p = (first_pos + r) as f32;
        for head in row
            .as_slice_mut()
            .expect("standard layout")
            .chunks_exact_mut(head_dim)
        {
            let (a, b) = head.split_at_mut(half);
            for j in 0..half {
                let (sin, cos) = (p * freqs[j]).sin_cos();
                let (x1, x2) = (a[j], b[j]);
                a[j] = x1 * cos - x2 * sin;
                b[j] = x2 * cos + x1 * sin;
            }
        }
    }
}

/// Which key positions a query position may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderMask {
    /// Every position sees every position (the reference, `--fold none`).
    Full,
    /// Positions from `tools_start` on see only each other; query positions see everything
    /// (`--fold tools`, spec section 6).
    ToolsIsolated { tools_start: usize },
}

impl EncoderMask {
    fn visible(self, query_pos: usize, key_pos: usize) -> bool {
        match self {
            EncoderMask::Full => true,
            EncoderMask::ToolsIsolated { tools_start } => {
                query_pos < tools_start || key_pos >= tools_start
            }
        }
    }
}

/// Scaled dot-product attention with GQA. `q` is `(Tq, H*h)`, `k`/`v` are `(Tk, K*h)`; `visible`
/// says whether query row `i` may see key row `j`. Returns the heads concatenated, `(Tq, H*h)`,
/// before the output projection.
fn attend(
    config: &Config,
    q: ArrayView2<f32>,
    k: ArrayView2<f32>,
    v: ArrayView2<f32>,
    visible: impl Fn(usize, usize) -> bool,
) -> Array2<f32> {
    let h = config.head_dim();
    let group = config.group_size();
    let scale = 1.0 / (h as f32).sqrt();
    let (tq, tk) = (q.nrows(), k.nrows());
    let mut out = Array2::<f32>::zeros((tq, config.num_heads * h));
    for head in 0..config.num_heads {
        let kv = head / group;
        // Columns of one head (`slice_axis`, not the `s!` macro, which expands to unsafe code).
        let cols = |i: usize| Slice::from(i * h..(i + 1) * h);
        let qh = q.slice_axis(Axis(1), cols(head));
        let kh = k.slice_axis(Axis(1), cols(kv));
        let vh = v.slice_axis(Axis(1), cols(kv));
        let mut scores = qh.dot(&kh.t()) * scale;
        for i in 0..tq {
            let mut row = scores.row_mut(i);
            for j in 0..tk {
                if !visible(i, j) {
                    // The reference masks with the most negative finite float, not -inf, so a
                    // fully masked row becomes a uniform softmax rather than NaN.
                    row[j] = f32::MIN;
                }
            }
            softmax(row.as_slice_mut().expect("standard layout"));
        }
        out.slice_axis_mut(Axis(1), cols(head))
            .assign(&scores.dot(&vh));
    }
    out
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Embeds token ids: `E[token] * sqrt(D)`. Ids must be below the vocabulary size.
fn embed(model: &Model, ids: &[u32]) -> Array2<f32> {
    let scale = (model.config.d_model as f32).sqrt();
    let mut x = Array2::<f32>::zeros((ids.len(), model.config.d_model));
    for (r, &id) in ids.iter().enumerate() {
        x.row_mut(r)
            .assign(&(&model.embedding.row(id as usize) * scale));
    }
    x
}

/// Query projection with QK-norm (no RoPE).
fn project_q(config: &Config, w: &AttentionWeights, x: &Array2<f32>) -> Array2<f32> {
    let mut q = x.dot(&w.wq);
    head_norm(&mut q, config.head_dim(), &w.q_norm);
    q
}

/// Key and value projections with QK-norm on the keys (no RoPE).
fn project_kv(
    config: &Config,
    w: &AttentionWeights,
    x: &Array2<f32>,
) -> (Array2<f32>, Array2<f32>) {
    let mut k = x.dot(&w.wk);
    head_norm(&mut k, config.head_dim(), &w.k_norm);
    (k, x.dot(&w.wv))
}

/// The whole encoder over a prompt, positions `0..T`: the reference computation, used for
/// `--fold none` and as the oracle for the folded path. Returns the final-normed states `(T, D)`.
pub fn encode(model: &Model, ids: &[u32], mask: EncoderMask) -> Array2<f32> {
    let c = &model.config;
    let freqs = rope_frequencies(c);
    let mut x = embed(model, ids);
    for layer in &model.encoder {
        let mut n = x.clone();
        zcrmsnorm_rows(&mut n, &layer.norm);
        let mut q = project_q(c, &layer.attn, &n);
        let (mut k, v) = project_kv(c, &layer.attn, &n);
        rope(&mut q, c.head_dim(), &freqs, 0);
        rope(&mut k, c.head_dim(), &freqs, 0);
        let heads = attend(c, q.view(), k.view(), v.view(), |i, j| mask.visible(i, j));
        x = x + heads.dot(&layer.attn.wo) * sigmoid(layer.gate);
    }
    zcrmsnorm_rows(&mut x, &model.encoder_norm);
    x
}

/// The contrastive head over encoder states `(T, D)` (spec section 2): the mean over the rows,
/// `relu(. @ hidden + hidden_bias) @ proj`, divided by `sqrt(sum(v^2) + 1e-12)`. No rows give
/// the head's output for a zero mean.
pub fn contrastive_embedding(model: &Model, enc_out: &Array2<f32>) -> Vec<f32> {
    let head = &model.contrastive;
    let rows = enc_out.nrows().max(1) as f32;
    let mean = enc_out.sum_axis(Axis(0)) / rows;
    let hidden = (mean.dot(&head.hidden) + &head.hidden_bias).mapv(|v| v.max(0.0));
    let v = hidden.dot(&head.proj);
    let norm = (v.iter().map(|x| x * x).sum::<f32>() + 1e-12).sqrt();
    v.iter().map(|x| x / norm).collect()
}

/// Cross-attention keys and values of every decoder layer, `(T_enc, K*h)` each.
#[derive(Clone, Debug)]
pub struct CrossKv {
    pub layers: Vec<(Array2<f32>, Array2<f32>)>,
}

impl CrossKv {
    /// Projects the encoder output once per query for every decoder layer.
    pub fn from_encoder(model: &Model, enc_out: &Array2<f32>) -> CrossKv {
        let layers = model
            .decoder
            .iter()
            .map(|l| project_kv(&model.config, &l.cross_attn, enc_out))
            .collect();
        CrossKv { layers }
    }

    /// Appends the rows of `other` after this one's, layer by layer.
    pub fn concat(&self, other: &CrossKv) -> CrossKv {
        let layers = self
            .layers
            .iter()
            .zip(&other.layers)
            .map(|((k1, v1), (k2, v2))| {
                (
                    concatenate(Axis(0), &[k1.view(), k2.view()]).expect("same width"),
                    concatenate(Axis(0), &[v1.view(), v2.view()]).expect("same width"),
                )
            })
            .collect();
        CrossKv { layers }
    }

    /// Number of encoder positions visible to cross-attention.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.nrows())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The tools side of the encoder, computed once for a fixed tool list (`--fold tools`).
///
/// With the tools-isolated mask, positions from `<tools>` on never see the query, and RoPE makes
/// their attention depend only on relative positions, so their states do not depend on the query
/// at all. What the query side needs from them is, per encoder layer, their keys (QK-normed, stored
/// before RoPE so that the query side applies RoPE at their true positions `q..q+n`, exactly as the
/// reference) and values, and per decoder layer their cross-attention keys and values.
#[derive(Clone, Debug)]
pub struct FoldedTools {
    /// Number of tools-side positions, the `<tools>` marker included.
    pub len: usize,
    /// Per encoder layer: `(keys before RoPE, values)`, `(n, K*h)` each.
    pub encoder_kv: Vec<(Array2<f32>, Array2<f32>)>,
    /// Per decoder layer cross-attention K/V of the tools positions.
    pub cross_kv: CrossKv,
}

impl FoldedTools {
    /// Runs the tools side (`[<tools>] + tool tokens`) through the encoder on its own.
    pub fn precompute(model: &Model, tools_ids: &[u32]) -> FoldedTools {
        let c = &model.config;
        let freqs = rope_frequencies(c);
        let mut x = embed(model, tools_ids);
        let mut encoder_kv = Vec::with_capacity(model.encoder.len());
        for layer in &model.encoder {
            let mut n = x.clone();
            zcrmsnorm_rows(&mut n, &layer.norm);
            let mut q = project_q(c, &layer.attn, &n);
            let (k, v) = project_kv(c, &layer.attn, &n);
            let mut k_rot = k.clone();
            // Positions 0..n instead of q..q+n: only relative positions matter here.
            rope(&mut q, c.head_dim(), &freqs, 0);
            rope(&mut k_rot, c.head_dim(), &freqs, 0);
            let heads = attend(c, q.view(), k_rot.view(), v.view(), |_, _| true);
            x = x + heads.dot(&layer.attn.wo) * sigmoid(layer.gate);
            encoder_kv.push((k, v));
        }
        zcrmsnorm_rows(&mut x, &model.encoder_norm);
        FoldedTools {
            len: tools_ids.len(),
            encoder_kv,
            cross_kv: CrossKv::from_encoder(model, &x),
        }
    }

    /// Encodes the query tokens (positions `0..q`) against the folded tools side and returns the
    /// cross-attention K/V of the whole prompt, query rows first.
    pub fn encode_query(&self, model: &Model, query_ids: &[u32]) -> CrossKv {
        let c = &model.config;
        let freqs = rope_frequencies(c);
        let nq = query_ids.len();
        let mut x = embed(model, query_ids);
        for (layer, (tools_k, tools_v)) in model.encoder.iter().zip(&self.encoder_kv) {
            let mut n = x.clone();
            zcrmsnorm_rows(&mut n, &layer.norm);
            let mut q = project_q(c, &layer.attn, &n);
            let (k, v) = project_kv(c, &layer.attn, &n);
            let mut k_all = concatenate(Axis(0), &[k.view(), tools_k.view()]).expect("same width");
            let v_all = concatenate(Axis(0), &[v.view(), tools_v.view()]).expect("same width");
            rope(&mut q, c.head_dim(), &freqs, 0);
            rope(&mut k_all, c.head_dim(), &freqs, 0);
            let heads = attend(c, q.view(), k_all.view(), v_all.view(), |_, _| true);
            x = x + heads.dot(&layer.attn.wo) * sigmoid(layer.gate);
        }
        zcrmsnorm_rows(&mut x, &model.encoder_norm);
        debug_assert_eq!(x.nrows(), nq);
        CrossKv::from_encoder(model, &x).concat(&self.cross_kv)
    }
}

/// The decoder's self-attention KV cache: per layer, the RoPE'd keys and the values of every
/// position decoded so far.
#[derive(Clone, Debug)]
pub struct DecoderCache {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

impl DecoderCache {
    pub fn new(model: &Model) -> DecoderCache {
        DecoderCache {
            layers: vec![(Vec::new(), Vec::new()); model.decoder.len()],
            len: 0,
        }
    }

    /// Number of positions already decoded (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One decoder step: feeds `token` at position `cache.len()`, appends to the cache and returns the
/// logits over the vocabulary.
pub fn decoder_step(
    model: &Model,
    cross: &CrossKv,
    cache: &mut DecoderCache,
    token: u32,
) -> Vec<f32> {
    let c = &model.config;
    let freqs = rope_frequencies(c);
    let kv_dim = c.kv_dim();
    let pos = cache.len;
    let mut x = embed(model, &[token]);
    for ((layer, (cache_k, cache_v)), (cross_k, cross_v)) in model
        .decoder
        .iter()
        .zip(cache.layers.iter_mut())
        .zip(&cross.layers)
    {
        let mut n = x.clone();
        zcrmsnorm_rows(&mut n, &layer.self_norm);
        let mut q = project_q(c, &layer.self_attn, &n);
        let (mut k, v) = project_kv(c, &layer.self_attn, &n);
        rope(&mut q, c.head_dim(), &freqs, pos);
        rope(&mut k, c.head_dim(), &freqs, pos);
        cache_k.extend(k.iter());
        cache_v.extend(v.iter());
        let ks = ArrayView2::from_shape((pos + 1, kv_dim), cache_k).expect("cache rows");
        let vs = ArrayView2::from_shape((pos + 1, kv_dim), cache_v).expect("cache rows");
        // Causality is implicit: the cache holds only positions up to this one.
        let heads = attend(c, q.view(), ks, vs, |_, _| true);
        x = x + heads.dot(&layer.self_attn.wo) * sigmoid(layer.self_gate);

        let mut n = x.clone();
        zcrmsnorm_rows(&mut n, &layer.cross_norm);
        let q = project_q(c, &layer.cross_attn, &n);
        let heads = attend(c, q.view(), cross_k.view(), cross_v.view(), |_, _| true);
        x = x + heads.dot(&layer.cross_attn.wo) * sigmoid(layer.cross_gate);
    }
    cache.len += 1;
    zcrmsnorm_rows(&mut x, &model.decoder_norm);
    // Tied embedding: logits = x @ E^T.
    model.embedding.dot(&x.row(0)).to_vec()
}
