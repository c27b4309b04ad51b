//! The training graph: the Needle v1 forward pass (spec section 2) in candle, batched, with
//! autograd. It is the runtime's `forward` written over tensors, in the same order of operations,
//! so that its logits equal the runtime's (tested on the golden forced cases within 1e-4).
//!
//! Parameters are kept exactly as the checkpoint stores them (one tensor per checkpoint path,
//! per-layer tensors stacked on a leading axis), so reading and writing a checkpoint is a copy.
//! `--lora-rank` adds two factors per Dense kernel and layer (`W + A @ B`, `B` starting at zero),
//! merged back by [`TrainModel::to_checkpoint`]; `--qat` replaces every Dense kernel by the
//! runtime's group quantization of it in the forward pass, with a straight-through estimator.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use needle_runtime::checkpoint::{expected_tensors, Checkpoint, Tensor as StoredTensor, DEC, ENC};
use needle_runtime::config::Config;
use needle_runtime::quant::{self, Precision};

/// ZCRMSNorm's epsilon, as the runtime's.
const NORM_EPS: f64 = 1e-6;
/// What a masked attention score becomes: `exp` of it is exactly 0, like the runtime's
/// `f32::MIN` replacement.
const MASKED: f64 = -1e9;

/// Low-rank adapters of every Dense kernel: `path -> (A, B)`, stacked per layer like the kernel,
/// `A` is `(layers, in, r)`, `B` is `(layers, r, out)`.
struct Lora {
    adapters: BTreeMap<String, (Var, Var)>,
}

/// How `--distill` learns from the teacher: the share of the loss its distributions take (the
/// rest goes to the labels' cross-entropy) and the temperature that softens both sides' before
/// they are compared.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Distillation {
    pub weight: f64,
    pub temperature: f64,
}

impl Default for Distillation {
    /// The teacher alone, at temperature 2: measured on `dev.jsonl` (README, Fine-tuning), it
    /// beats half labels at temperature 1 (94.4% folded against 94.2% after 1500 steps, agreeing
    /// with the stock exact mode on 97.0% against 95.6%); 0.8 of the loss (94.2%) and
    /// temperature 4 (92.0%) did worse.
    fn default() -> Self {
        Distillation {
            weight: 1.0,
            temperature: 2.0,
        }
    }
}

/// The model being trained.
pub struct TrainModel {
    pub config: Config,
    /// Every checkpoint tensor, by path, in the checkpoint's own shape.
    params: BTreeMap<String, Var>,
    lora: Option<Lora>,
    qat: Option<Precision>,
    dtype: DType,
    device: Device,
}

/// One batch of teacher-forced sequences, padded and masked.
pub struct Batch {
    /// `(B, Te)` encoder ids, padded with 0.
    pub enc_ids: Tensor,
    /// `(B, 1, Te, Te)` additive mask of the encoder's self-attention.
    pub enc_mask: Tensor,
    /// `(B, 1, 1, Te)` additive mask of cross-attention (padding keys).
    pub cross_mask: Tensor,
    /// `(B, Td)` decoder inputs, padded with 0.
    pub dec_ids: Tensor,
    /// `(Td, Td)` causal additive mask.
    pub dec_mask: Tensor,
    /// Indices into the `B * Td` decoder positions of those that are scored.
    pub rows: Tensor,
    /// The target id of each scored position.
    pub targets: Tensor,
    /// Number of scored positions.
    pub n_targets: usize,
}

/// One teacher-forced training sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    /// Query tokens, `<tools>`, tool tokens: the prompt exactly as the runtime builds it.
    pub enc_ids: Vec<u32>,
    /// Where the tools side starts (the `<tools>` marker's position).
    pub n_query: usize,
    /// Decoder inputs: `[EOS, <tool_call>] + answer`.
    pub dec_in: Vec<u32>,
    /// Targets at each decoder position: `[<tool_call>] + answer + [EOS]`.
    pub targets: Vec<u32>,
}

impl Batch {
    /// Pads `seqs` into one batch; `isolate` applies the tools-isolation mask (spec section 6).
    pub fn new(seqs: &[&Sequence], isolate: bool, dtype: DType, device: &Device) -> Result<Batch> {
        let b = seqs.len();
        let te = seqs.iter().map(|s| s.enc_ids.len()).max().unwrap_or(0);
        let td = seqs.iter().map(|s| s.dec_in.len()).max().unwrap_or(0);
        let mut enc_ids = vec![0u32; b * te];
        let mut enc_mask = vec![0f32; b * te * te];
        let mut cross_mask = vec![0f32; b * te];
        let mut dec_ids = vec![0u32; b * td];
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (s, seq) in seqs.iter().enumerate() {
            let len = seq.enc_ids.len();
            enc_ids[s * te..s * te + len].copy_from_slice(&seq.enc_ids);
            for i in 0..te {
                for j in 0..te {
                    let visible = j < len && (!isolate || i < seq.n_query || j >= seq.n_query);
                    if !visible {
                        enc_mask[(s * te + i) * te + j] = MASKED as f32;
                    }
                }
            }
            for j in len..te {
                cross_mask[s * te + j] = MASKED as f32;
            }
            dec_ids[s * td..s * td + seq.dec_in.len()].copy_from_slice(&seq.dec_in);
            for (i, &t) in seq.targets.iter().enumerate() {
                rows.push((s * td + i) as u32);
                targets.push(t);
            }
        }
        let dec_mask: Vec<f32> = (0..td * td)
            .map(|k| if k % td > k / td { MASKED as f32 } else { 0.0 })
            .collect();
        let n_targets = targets.len();
        Ok(Batch {
            enc_ids: Tensor::from_vec(enc_ids, (b, te), device)?,
            enc_mask: Tensor::from_vec(enc_mask, (b, 1, te, te), device)?.to_dtype(dtype)?,
            cross_mask: Tensor::from_vec(cross_mask, (b, 1, 1, te), device)?.to_dtype(dtype)?,
            dec_ids: Tensor::from_vec(dec_ids, (b, td), device)?,
            dec_mask: Tensor::from_vec(dec_mask, (td, td), device)?.to_dtype(dtype)?,
            rows: Tensor::from_vec(rows, n_targets, device)?,
            targets: Tensor::from_vec(targets, n_targets, device)?,
            n_targets,
        })
    }
}

/// `sigmoid(g)` of a scalar tensor.
fn sigmoid(g: &Tensor) -> Result<Tensor> {
    (g.neg()?.exp()? + 1.0)?.recip()
}

/// ZCRMSNorm over the last axis: `x / sqrt(mean(x^2) + eps) * (1 + g)`.
fn zcrmsnorm(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + NORM_EPS)?
        .sqrt()?
        .recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(&(g + 1.0)?)
}

/// RoPE tables `(T, h/2)`: `cos` and `sin` of `p * f_j`, computed in float32 like the runtime.
fn rope_tables(
    config: &Config,
    t: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let freqs = needle_runtime::forward::rope_frequencies(config);
    let half = freqs.len();
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in 0..t {
        for f in &freqs {
            let (s, c) = (p as f32 * f).sin_cos();
            cos.push(c);
            sin.push(s);
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, half), device)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, (t, half), device)?.to_dtype(dtype)?,
    ))
}

/// RoPE on `(B, heads, T, h)`: the two halves of each head rotated (the runtime's layout).
fn rope(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

/// The weights of one attention block of one layer.
struct Attn {
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
}

impl TrainModel {
    /// The model of a checkpoint, every value widened to `dtype` (float32 to train, float64 for
    /// the gradient check).
    pub fn from_checkpoint(ckpt: &Checkpoint, dtype: DType, device: &Device) -> Result<TrainModel> {
        let mut params = BTreeMap::new();
        for (path, _) in expected_tensors(&ckpt.config) {
            let stored = ckpt
                .tensors
                .get(&path)
                .ok_or_else(|| candle_core::Error::Msg(format!("tensor `{path}` is missing")))?;
            let t = Tensor::from_vec(stored.to_f32(), stored.shape.as_slice(), device)?
                .to_dtype(dtype)?;
            params.insert(path, Var::from_tensor(&t)?);
        }
        Ok(TrainModel {
            config: ckpt.config.clone(),
            params,
            lora: None,
            qat: None,
            dtype,
            device: device.clone(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Trains low-rank adapters of rank `rank` instead of the weights: `A` small random
    /// (deterministic in `seed`), `B` zero, so training starts from the checkpoint exactly.
    pub fn with_lora(mut self, rank: usize, seed: u64) -> Result<TrainModel> {
        let mut rng = SplitMix(seed ^ 0x4c6f_5241);
        let mut adapters = BTreeMap::new();
        for (path, var) in &self.params {
            if !is_attention_kernel(path) {
                continue;
            }
            let (layers, rows, cols) = var.as_tensor().dims3()?;
            let bound = 1.0 / (rows as f64).sqrt();
            let a: Vec<f32> = (0..layers * rows * rank)
                .map(|_| (rng.unit() * 2.0 - 1.0) as f32 * bound as f32)
                .collect();
            let a =
                Tensor::from_vec(a, (layers, rows, rank), &self.device)?.to_dtype(self.dtype)?;
            let b = Tensor::zeros((layers, rank, cols), self.dtype, &self.device)?;
            adapters.insert(path.clone(), (Var::from_tensor(&a)?, Var::from_tensor(&b)?));
        }
        self.lora = Some(Lora { adapters });
        Ok(self)
    }

    /// Quantization-aware training: every Dense kernel is used as its `precision` quantization.
    pub fn with_qat(mut self, precision: Precision) -> TrainModel {
        self.qat = Some(precision);
        self
    }

    /// The variables the optimizer updates, split into those that get weight decay (kernels,
    /// adapters) and those that do not (embedding, norms, gates). The contrastive head takes no
    /// part in the decoder's loss and is left as it is.
    pub fn trainable(&self) -> (Vec<Var>, Vec<Var>) {
        if let Some(lora) = &self.lora {
            let vars = lora
                .adapters
                .values()
                .flat_map(|(a, b)| [a.clone(), b.clone()])
                .collect();
            return (vars, Vec::new());
        }
        let mut decay = Vec::new();
        let mut no_decay = Vec::new();
        for (path, var) in &self.params {
            if path.starts_with("contrastive") || path == "log_temp" {
                continue;
            }
            if is_attention_kernel(path) {
                decay.push(var.clone());
            } else {
                no_decay.push(var.clone());
            }
        }
        (decay, no_decay)
    }

    /// Every variable (parameters, then adapters), for snapshots.
    pub fn all_vars(&self) -> Vec<Var> {
        let mut vars: Vec<Var> = self.params.values().cloned().collect();
        if let Some(lora) = &self.lora {
            vars.extend(
                lora.adapters
                    .values()
                    .flat_map(|(a, b)| [a.clone(), b.clone()]),
            );
        }
        vars
    }

    /// A parameter by checkpoint path (tests: the finite-difference check).
    pub fn param(&self, path: &str) -> Option<&Var> {
        self.params.get(path)
    }

    fn p(&self, path: &str) -> Result<&Tensor> {
        self.params
            .get(path)
            .map(Var::as_tensor)
            .ok_or_else(|| candle_core::Error::Msg(format!("no parameter `{path}`")))
    }

    /// Layer `i` of a Dense kernel as the forward pass uses it: with its adapters added, and
    /// quantized (straight-through) under `--qat`.
    fn kernel(&self, path: &str, i: usize) -> Result<Tensor> {
        let mut w = self.p(path)?.get(i)?;
        if let Some((a, b)) = self.lora.as_ref().and_then(|l| l.adapters.get(path)) {
            w = (w + a.as_tensor().get(i)?.matmul(&b.as_tensor().get(i)?)?)?;
        }
        match self.qat {
            Some(precision) => fake_quantize_ste(&w, precision),
            None => Ok(w),
        }
    }

    fn attn(&self, prefix: &str, i: usize) -> Result<Attn> {
        Ok(Attn {
            wq: self.kernel(&format!("{prefix}/q_proj/kernel"), i)?,
            wk: self.kernel(&format!("{prefix}/k_proj/kernel"), i)?,
            wv: self.kernel(&format!("{prefix}/v_proj/kernel"), i)?,
            wo: self.kernel(&format!("{prefix}/out_proj/kernel"), i)?,
            q_norm: self.p(&format!("{prefix}/q_norm/scale"))?.get(i)?,
            k_norm: self.p(&format!("{prefix}/k_norm/scale"))?.get(i)?,
        })
    }

    /// `E[ids] * sqrt(D)`, `(B, T, D)`.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let d = self.config.d_model;
        let e = self.p("embedding/embedding")?;
        e.index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?
            .affine((d as f64).sqrt(), 0.0)
    }

    /// `x @ w` for `x` of `(B, T, in)` and `w` of `(in, out)`.
    fn dense(x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        x.reshape((b * t, d))?.matmul(w)?.reshape((b, t, w.dim(1)?))
    }

    /// Projects to `heads` heads of `h` with a per-head ZCRMSNorm: `(B, heads, T, h)`.
    fn heads(&self, x: &Tensor, w: &Tensor, norm: Option<&Tensor>, heads: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let h = self.config.head_dim();
        let mut y = Self::dense(x, w)?.reshape((b, t, heads, h))?;
        if let Some(g) = norm {
            y = zcrmsnorm(&y, g)?;
        }
        y.transpose(1, 2)?.contiguous()
    }

    /// `(B, K, T, h)` -> `(B, H, T, h)`: query head `i` reads KV head `i / group`.
    fn repeat_kv(&self, x: &Tensor) -> Result<Tensor> {
        let group = self.config.group_size();
        if group == 1 {
            return Ok(x.clone());
        }
        let (b, k, t, h) = x.dims4()?;
        x.unsqueeze(2)?
            .broadcast_as((b, k, group, t, h))?
            .reshape((b, k * group, t, h))
    }

    /// Attention of normed `xq` over normed `xkv` (or over given K/V), heads concatenated and
    /// projected by `wo`: `(B, Tq, D)`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        wo: &Tensor,
    ) -> Result<Tensor> {
        let (b, _, tq, h) = q.dims4()?;
        let k = self.repeat_kv(k)?;
        let v = self.repeat_kv(v)?;
        let scores = q.matmul(&k.t()?)?;
        let mask = match mask {
            Some(m) => m.broadcast_as(scores.shape())?,
            None => scores.zeros_like()?,
        };
        let probs = scores.apply_op2(
            &mask,
            MaskedSoftmax {
                scale: 1.0 / (h as f32).sqrt(),
            },
        )?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, tq, self.config.d_model))?;
        Self::dense(&out, wo)
    }

    /// Layer `i`'s gated self-attention sublayer of the stack under `stack` (encoder and decoder
    /// alike: pre-norm, RoPE on q and k, masked attention, residual scaled by the gate
    /// `stack/gate`).
    fn self_attention(
        &self,
        x: &Tensor,
        stack: &str,
        gate: &str,
        i: usize,
        tables: &(Tensor, Tensor),
        mask: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.config;
        let w = self.attn(&format!("{stack}/self_attn"), i)?;
        let n = zcrmsnorm(x, &self.p(&format!("{stack}/ZCRMSNorm_0/scale"))?.get(i)?)?;
        let q = rope(
            &self.heads(&n, &w.wq, Some(&w.q_norm), c.num_heads)?,
            tables,
        )?;
        let k = rope(
            &self.heads(&n, &w.wk, Some(&w.k_norm), c.num_kv_heads)?,
            tables,
        )?;
        let v = self.heads(&n, &w.wv, None, c.num_kv_heads)?;
        let out = self.attend(&q, &k, &v, Some(mask), &w.wo)?;
        let gate = sigmoid(&self.p(&format!("{stack}/{gate}"))?.get(i)?)?;
        x + out.broadcast_mul(&gate)?
    }

    /// The encoder's final-normed states `(B, Te, D)`.
    fn encode(&self, batch: &Batch) -> Result<Tensor> {
        let c = &self.config;
        let te = batch.enc_ids.dim(1)?;
        let tables = rope_tables(c, te, self.dtype, &self.device)?;
        let mut x = self.embed(&batch.enc_ids)?;
        for i in 0..c.num_encoder_layers {
            x = self.self_attention(&x, ENC, "attn_gate", i, &tables, &batch.enc_mask)?;
        }
        zcrmsnorm(&x, self.p("encoder/final_norm/scale")?)
    }

    /// The decoder's final-normed states `(B, Td, D)`.
    fn decode(&self, batch: &Batch, enc: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let td = batch.dec_ids.dim(1)?;
        let tables = rope_tables(c, td, self.dtype, &self.device)?;
        let mut x = self.embed(&batch.dec_ids)?;
        for i in 0..c.num_decoder_layers {
            x = self.self_attention(&x, DEC, "self_attn_gate", i, &tables, &batch.dec_mask)?;

            let w = self.attn(&format!("{DEC}/cross_attn"), i)?;
            let n = zcrmsnorm(&x, &self.p(&format!("{DEC}/ZCRMSNorm_1/scale"))?.get(i)?)?;
            let q = self.heads(&n, &w.wq, Some(&w.q_norm), c.num_heads)?;
            let k = self.heads(enc, &w.wk, Some(&w.k_norm), c.num_kv_heads)?;
            let v = self.heads(enc, &w.wv, None, c.num_kv_heads)?;
            let out = self.attend(&q, &k, &v, Some(&batch.cross_mask), &w.wo)?;
            let gate = sigmoid(&self.p(&format!("{DEC}/cross_attn_gate"))?.get(i)?)?;
            x = (x + out.broadcast_mul(&gate)?)?;
        }
        zcrmsnorm(&x, self.p("decoder/ZCRMSNorm_0/scale")?)
    }

    /// The logits `(N, V)` at the batch's scored positions (tied embedding).
    pub fn logits(&self, batch: &Batch) -> Result<Tensor> {
        let enc = self.encode(batch)?;
        let dec = self.decode(batch, &enc)?;
        let (b, td, d) = dec.dims3()?;
        let picked = dec.reshape((b * td, d))?.index_select(&batch.rows, 0)?;
        picked.matmul(&self.p("embedding/embedding")?.t()?)
    }

    /// Mean cross-entropy over the scored positions, and how many of them the argmax gets right.
    pub fn loss(&self, batch: &Batch) -> Result<(Tensor, usize)> {
        let logits = self.logits(batch)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &batch.targets)?;
        Ok((loss, correct(&logits, batch)?))
    }

    /// The `--distill` loss at the scored positions, and how many of them the argmax gets right
    /// against `batch`'s targets: `how.weight` times the divergence of the student's
    /// distributions from the teacher's, both softened by `how.temperature` (`KL(softmax(t/T) ||
    /// softmax(s/T))`, times `T^2` so the gradient's size does not shrink with the temperature),
    /// plus `1 - how.weight` times the labels' cross-entropy. The divergence rather than the
    /// cross-entropy: the same gradient, and a loss that reads 0 where the student matches the
    /// teacher instead of the teacher's entropy.
    pub fn soft_loss(
        &self,
        batch: &Batch,
        teacher_logits: &Tensor,
        how: Distillation,
    ) -> Result<(Tensor, usize)> {
        let logits = self.logits(batch)?;
        let t = how.temperature;
        let log_teacher = candle_nn::ops::log_softmax(&(teacher_logits.detach() / t)?, D::Minus1)?;
        let log_student = candle_nn::ops::log_softmax(&(&logits / t)?, D::Minus1)?;
        let n = batch.n_targets.max(1) as f64;
        let kl = (log_teacher.exp()? * (&log_teacher - log_student)?)?.sum_all()?;
        let mut loss = (kl * (how.weight * t * t / n))?;
        if how.weight < 1.0 {
            let hard = candle_nn::loss::cross_entropy(&logits, &batch.targets)?;
            loss = (loss + (hard * (1.0 - how.weight))?)?;
        }
        Ok((loss, correct(&logits, batch)?))
    }

    /// The checkpoint of the current weights (adapters merged; float32), with `config`.
    pub fn to_checkpoint(&self, config: &Config) -> Result<Checkpoint> {
        let mut tensors = BTreeMap::new();
        for (path, var) in &self.params {
            let mut t = var.as_tensor().clone();
            if let Some((a, b)) = self.lora.as_ref().and_then(|l| l.adapters.get(path)) {
                t = (t + a.as_tensor().matmul(b.as_tensor())?)?;
            }
            let shape = t.dims().to_vec();
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            tensors.insert(path.clone(), StoredTensor::from_f32(shape, &values));
        }
        Ok(Checkpoint {
            config: config.clone(),
            tensors,
        })
    }
}

/// How many of `batch`'s scored positions the argmax of `logits` gets right.
fn correct(logits: &Tensor, batch: &Batch) -> Result<usize> {
    let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let targets = batch.targets.to_vec1::<u32>()?;
    Ok(predicted
        .iter()
        .zip(&targets)
        .filter(|(a, b)| a == b)
        .count())
}

/// `softmax(scores * scale + mask)` over the last axis in one pass (the mask broadcast to the
/// scores' shape; `exp` of a masked entry is exactly 0), with its gradient with respect to the
/// scores: `scale * p * (g - sum(g * p))`. The scale multiplies in float32 (or float64) exactly
/// as the runtime's `scores * scale`.
struct MaskedSoftmax {
    scale: f32,
}

impl MaskedSoftmax {
    fn run<T: Real>(
        &self,
        scores: &[T],
        l1: &candle_core::Layout,
        mask: &[T],
        l2: &candle_core::Layout,
    ) -> Result<Vec<T>> {
        let Some((o1, o2)) = l1.contiguous_offsets() else {
            candle_core::bail!("masked softmax: the scores must be contiguous")
        };
        let scores = &scores[o1..o2];
        let dims = l1.dims();
        let (b, h, tq, tk) = match dims {
            [b, h, tq, tk] => (*b, *h, *tq, *tk),
            _ => candle_core::bail!("masked softmax: scores of rank 4 expected, got {dims:?}"),
        };
        let ms = l2.stride();
        let m0 = l2.start_offset();
        let scale = T::from_f32(self.scale);
        let mut out = vec![T::ZERO; scores.len()];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..tq {
                    let row = ((bi * h + hi) * tq + i) * tk;
                    let mrow = m0 + bi * ms[0] + hi * ms[1] + i * ms[2];
                    let dst = &mut out[row..row + tk];
                    let mut max = T::NEG_INFINITY;
                    for j in 0..tk {
                        let v = scores[row + j] * scale + mask[mrow + j * ms[3]];
                        dst[j] = v;
                        if v > max {
                            max = v;
                        }
                    }
                    let mut sum = T::ZERO;
                    for v in dst.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    for v in dst.iter_mut() {
                        *v = *v / sum;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The float types the masked softmax runs in.
trait Real:
    Copy
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
{
    const ZERO: Self;
    const NEG_INFINITY: Self;
    fn from_f32(v: f32) -> Self;
    fn exp(self) -> Self;
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const NEG_INFINITY: f32 = f32::NEG_INFINITY;
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn exp(self) -> f32 {
        f32::exp(self)
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const NEG_INFINITY: f64 = f64::NEG_INFINITY;
    fn from_f32(v: f32) -> f64 {
        v as f64
    }
    fn exp(self) -> f64 {
        f64::exp(self)
    }
}

impl candle_core::CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let out = match (s1, s2) {
            (S::F32(a), S::F32(m)) => S::F32(self.run(a, l1, m, l2)?),
            (S::F64(a), S::F64(m)) => S::F64(self.run(a, l1, m, l2)?),
            _ => candle_core::bail!("masked softmax: float32 or float64 scores and mask"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dot = (grad * res)?.sum_keepdim(D::Minus1)?;
        let g = (res * grad.broadcast_sub(&dot)?)?.affine(self.scale as f64, 0.0)?;
        Ok((Some(g), None))
    }
}

/// Whether `path` is an attention Dense kernel (the kernels the decoder's loss reaches; the
/// contrastive head's two are Dense kernels too but take no part in it).
fn is_attention_kernel(path: &str) -> bool {
    quant::is_dense_kernel(path) && !path.starts_with("contrastive")
}

/// `w` replaced in value by its group quantization ([`quant::fake_quantize`], the runtime's
/// own), with the gradient passing straight through: `w + stop_gradient(q(w) - w)`.
fn fake_quantize_ste(w: &Tensor, precision: Precision) -> Result<Tensor> {
    let (k, n) = w.dims2()?;
    let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let q = quant::fake_quantize(&values, k, n, precision);
    let delta: Vec<f32> = q.iter().zip(&values).map(|(q, w)| q - w).collect();
    let delta = Tensor::from_vec(delta, (k, n), w.device())?.to_dtype(w.dtype())?;
    w + delta
}

/// A tiny deterministic generator (SplitMix64) for the adapters' initial values.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
