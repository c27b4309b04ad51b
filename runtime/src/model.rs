//! Float32 weights of a validated Needle v1 checkpoint, arranged for the forward pass.
//!
//! Per-layer tensors arrive stacked on a leading layer axis (Flax `nn.scan`); here they are split
//! per layer so that each layer owns plain row-major matrices (`y = x @ W`, `W` is `(in, out)`).

use std::collections::BTreeMap;

use ndarray::{Array1, Array2};

use crate::checkpoint::{expected_tensors, Checkpoint, DEC, ENC};
use crate::config::{Config, ConfigError};
use crate::quant::{self, Precision, PrecisionError};

/// Why a checkpoint cannot be used as a Needle v1 model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // Not `#[from]`, which would also make the config error a `source()` that a chain printer
    // repeats after this message, which already holds it.
    #[error("invalid config: {0}")]
    Config(ConfigError),
    #[error(
        "tensor `{path}` is missing; a Needle v1 checkpoint with this config needs it with shape \
         {expected:?} (is this a Needle v1 checkpoint, and does the file hold the whole `params` tree?)"
    )]
    Missing { path: String, expected: Vec<usize> },
    #[error(
        "tensor `{path}` has shape {found:?} but the config implies {expected:?}; the config and \
         the weights disagree: fix whichever is wrong"
    )]
    Shape {
        path: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{path}` holds {bytes} bytes, but shape {shape:?} of {dtype} needs {needed}: the file is corrupt")]
    ByteLength {
        path: String,
        shape: Vec<usize>,
        dtype: &'static str,
        bytes: usize,
        needed: usize,
    },
    #[error(transparent)]
    Precision(#[from] PrecisionError),
}

impl From<ConfigError> for ModelError {
    fn from(e: ConfigError) -> Self {
        ModelError::Config(e)
    }
}

/// Checks that a checkpoint has every tensor its config implies, with the right shape and byte
/// length, so that building a [`Model`] cannot fail halfway. Loaders run a fuller, user-facing
/// diagnosis first (needlec's `load::check_checkpoint`: blame, extra tensors, non-finite values);
/// this is the guard that keeps [`Model::from_checkpoint`] total for checkpoints from anywhere.
pub fn validate(ckpt: &Checkpoint) -> Result<(), ModelError> {
    let c = &ckpt.config;
    c.validate()?;
    for (path, shape) in expected_tensors(c) {
        let t = ckpt.tensors.get(&path).ok_or_else(|| ModelError::Missing {
            path: path.clone(),
            expected: shape.clone(),
        })?;
        // `log_temp` may be stored as a 0-d array or a 1-element array; both mean a scalar.
        let scalar_ok = shape.is_empty() && t.numel() == 1;
        if t.shape != shape && !scalar_ok {
            return Err(ModelError::Shape {
                path,
                expected: shape,
                found: t.shape.clone(),
            });
        }
        let needed = t.numel() * t.dtype.size();
        if t.bytes.len() != needed {
            return Err(ModelError::ByteLength {
                path,
                shape: t.shape.clone(),
                dtype: t.dtype.name(),
                bytes: t.bytes.len(),
                needed,
            });
        }
    }
    Ok(())
}

/// The weights of one attention block.
#[derive(Clone, Debug)]
pub struct AttentionWeights {
    /// `(D, D)`.
    pub wq: Array2<f32>,
    /// `(D, K*h)`.
    pub wk: Array2<f32>,
    /// `(D, K*h)`.
    pub wv: Array2<f32>,
    /// `(D, D)`.
    pub wo: Array2<f32>,
    /// `(h,)` ZCRMSNorm scale of each query head.
    pub q_norm: Array1<f32>,
    /// `(h,)` ZCRMSNorm scale of each key head.
    pub k_norm: Array1<f32>,
}

#[derive(Clone, Debug)]
pub struct EncoderLayer {
    pub norm: Array1<f32>,
    /// The raw gate; the residual is scaled by `sigmoid(gate)`.
    pub gate: f32,
    pub attn: AttentionWeights,
}

#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub self_norm: Array1<f32>,
    pub cross_norm: Array1<f32>,
    pub self_gate: f32,
    pub cross_gate: f32,
    pub self_attn: AttentionWeights,
    pub cross_attn: AttentionWeights,
}

/// The contrastive (tool-retrieval) head: `relu(mean(enc) @ hidden + hidden_bias) @ proj`,
/// L2-normalized (spec section 2). `log_temp` is the trained similarity temperature.
#[derive(Clone, Debug)]
pub struct ContrastiveHead {
    /// `(D, D/4)`.
    pub hidden: Array2<f32>,
    /// `(D/4,)`.
    pub hidden_bias: Array1<f32>,
    /// `(D/4, contrastive_dim)`.
    pub proj: Array2<f32>,
    pub log_temp: f32,
}

/// A Needle v1 model in float32.
#[derive(Clone, Debug)]
pub struct Model {
    pub config: Config,
    /// `(V, D)`, also the tied output projection.
    pub embedding: Array2<f32>,
    pub encoder: Vec<EncoderLayer>,
    pub encoder_norm: Array1<f32>,
    pub decoder: Vec<DecoderLayer>,
    pub decoder_norm: Array1<f32>,
    pub contrastive: ContrastiveHead,
}

/// Slices layer `i` out of values stacked on a leading layer axis of `layers` entries.
fn layer_slice(all: &[f32], layers: usize, i: usize) -> Vec<f32> {
    let per = all.len() / layers;
    all[i * per..(i + 1) * per].to_vec()
}

impl AttentionWeights {
    /// The four Dense kernels, for transforms that treat them alike.
    fn kernels_mut(&mut self) -> [&mut Array2<f32>; 4] {
        [&mut self.wq, &mut self.wk, &mut self.wv, &mut self.wo]
    }

    fn map_values(&mut self, f: fn(f32) -> f32) {
        for w in self.kernels_mut() {
            w.mapv_inplace(f);
        }
        self.q_norm.mapv_inplace(f);
        self.k_norm.mapv_inplace(f);
    }
}

impl Model {
    /// [`Model::from_checkpoint`], then the weights as `precision` gives them (spec section 7 and
    /// `docs/spec.md`): `f32` as stored; `f16` every value rounded to IEEE half (a no-op for
    /// float16 checkpoints); `int8`/`int4` every Dense kernel, per layer, replaced by its
    /// dequantized group quantization ([`quant::fake_quantize`]), everything else as stored.
    /// The model stays float32: this is the oracle of every precision.
    pub fn from_checkpoint_as(
        ckpt: &Checkpoint,
        precision: Precision,
    ) -> Result<Model, ModelError> {
        validate(ckpt)?;
        quant::check(ckpt, precision)?;
        let mut model = Model::from_checkpoint(ckpt)?;
        match precision {
            // Rounding values that are already half is the identity: skip the pass.
            Precision::F16 if quant::f16_rounds(ckpt, precision) => {
                model.map_values(quant::round_to_f16)
            }
            Precision::F32 | Precision::F16 => {}
            Precision::Int8 | Precision::Int4 => {
                let attentions = model.encoder.iter_mut().map(|l| &mut l.attn).chain(
                    model
                        .decoder
                        .iter_mut()
                        .flat_map(|l| [&mut l.self_attn, &mut l.cross_attn]),
                );
                let head = &mut model.contrastive;
                let kernels = attentions
                    .flat_map(|attn| attn.kernels_mut())
                    .chain([&mut head.hidden, &mut head.proj]);
                for w in kernels {
                    let (k, n) = w.dim();
                    let row_major = w.as_slice().expect("built row-major");
                    let dequantized = quant::fake_quantize(row_major, k, n, precision);
                    *w = Array2::from_shape_vec((k, n), dequantized).expect("same shape");
                }
            }
        }
        Ok(model)
    }

    /// Applies `f` to every parameter value the model holds.
    fn map_values(&mut self, f: fn(f32) -> f32) {
        self.embedding.mapv_inplace(f);
        self.encoder_norm.mapv_inplace(f);
        self.decoder_norm.mapv_inplace(f);
        for layer in &mut self.encoder {
            layer.norm.mapv_inplace(f);
            layer.gate = f(layer.gate);
            layer.attn.map_values(f);
        }
        for layer in &mut self.decoder {
            layer.self_norm.mapv_inplace(f);
            layer.cross_norm.mapv_inplace(f);
            layer.self_gate = f(layer.self_gate);
            layer.cross_gate = f(layer.cross_gate);
            layer.self_attn.map_values(f);
            layer.cross_attn.map_values(f);
        }
        let head = &mut self.contrastive;
        head.hidden.mapv_inplace(f);
        head.hidden_bias.mapv_inplace(f);
        head.proj.mapv_inplace(f);
        head.log_temp = f(head.log_temp);
    }

    /// Validates the checkpoint ([`validate`]) and converts it to float32.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Model, ModelError> {
        validate(ckpt)?;
        let c = ckpt.config.clone();
        // Widen each tensor once; per-layer views are sliced out of these.
        let values: BTreeMap<&str, Vec<f32>> = ckpt
            .tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t.to_f32()))
            .collect();
        let (d, kv, h) = (c.d_model, c.kv_dim(), c.head_dim());
        // Validation guarantees every lookup below succeeds with the right shape.
        let t = |p: &str| values[p].as_slice();
        let (l, m) = (c.num_encoder_layers, c.num_decoder_layers);
        let n_layers = |p: &str| if p.starts_with(ENC) { l } else { m };
        let mat = |p: &str, i: usize, rows: usize, cols: usize| {
            Array2::from_shape_vec((rows, cols), layer_slice(t(p), n_layers(p), i))
                .expect("validated shape")
        };
        let vec_l = |p: &str, i: usize| Array1::from_vec(layer_slice(t(p), n_layers(p), i));
        let scalar_l = |p: &str, i: usize| layer_slice(t(p), n_layers(p), i)[0];
        let attn = |prefix: &str, i: usize| AttentionWeights {
            wq: mat(&format!("{prefix}/q_proj/kernel"), i, d, d),
            wk: mat(&format!("{prefix}/k_proj/kernel"), i, d, kv),
            wv: mat(&format!("{prefix}/v_proj/kernel"), i, d, kv),
            wo: mat(&format!("{prefix}/out_proj/kernel"), i, d, d),
            q_norm: vec_l(&format!("{prefix}/q_norm/scale"), i),
            k_norm: vec_l(&format!("{prefix}/k_norm/scale"), i),
        };
        debug_assert_eq!(h * c.num_heads, d);
        let encoder = (0..c.num_encoder_layers)
            .map(|i| EncoderLayer {
                norm: vec_l(&format!("{ENC}/ZCRMSNorm_0/scale"), i),
                gate: scalar_l(&format!("{ENC}/attn_gate"), i),
                attn: attn(&format!("{ENC}/self_attn"), i),
            })
            .collect();
        let decoder = (0..c.num_decoder_layers)
            .map(|i| DecoderLayer {
                self_norm: vec_l(&format!("{DEC}/ZCRMSNorm_0/scale"), i),
                cross_norm: vec_l(&format!("{DEC}/ZCRMSNorm_1/scale"), i),
                self_gate: scalar_l(&format!("{DEC}/self_attn_gate"), i),
                cross_gate: scalar_l(&format!("{DEC}/cross_attn_gate"), i),
                self_attn: attn(&format!("{DEC}/self_attn"), i),
                cross_attn: attn(&format!("{DEC}/cross_attn"), i),
            })
            .collect();
        Ok(Model {
            embedding: Array2::from_shape_vec((c.vocab_size, d), t("embedding/embedding").to_vec())
                .expect("validated shape"),
            encoder,
            encoder_norm: Array1::from_vec(t("encoder/final_norm/scale").to_vec()),
            decoder,
            decoder_norm: Array1::from_vec(t("decoder/ZCRMSNorm_0/scale").to_vec()),
            contrastive: ContrastiveHead {
                hidden: Array2::from_shape_vec((d, d / 4), t("contrastive_hidden/kernel").to_vec())
                    .expect("validated shape"),
                hidden_bias: Array1::from_vec(t("contrastive_hidden/bias").to_vec()),
                proj: Array2::from_shape_vec(
                    (d / 4, c.contrastive_dim),
                    t("contrastive_proj/kernel").to_vec(),
                )
                .expect("validated shape"),
                log_temp: t("log_temp")[0],
            },
            config: c,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Tensor;

    /// A float32 checkpoint of `config` whose values are not representable in half.
    fn checkpoint(config: Config) -> Checkpoint {
        let tensors = expected_tensors(&config)
            .into_iter()
            .map(|(path, shape)| {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n)
                    .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1.0001e-3)
                    .collect();
                (path, Tensor::from_f32(shape, &values))
            })
            .collect();
        Checkpoint { config, tensors }
    }

    fn small() -> Config {
        Config {
            vocab_size: 16,
            d_model: 40, // one group of 32 rows and a short one of 8
            num_heads: 2,
            num_kv_heads: 1,
            num_encoder_layers: 1,
            num_decoder_layers: 1,
            ..Config::default()
        }
    }

    #[test]
    fn precisions_change_exactly_what_they_should() {
        let ckpt = checkpoint(small());
        let f32_model = Model::from_checkpoint_as(&ckpt, Precision::F32).unwrap();
        let f16_model = Model::from_checkpoint_as(&ckpt, Precision::F16).unwrap();
        let int4 = Model::from_checkpoint_as(&ckpt, Precision::Int4).unwrap();
        // f16: every value rounded, the embedding included.
        let (e32, e16) = (&f32_model.embedding, &f16_model.embedding);
        assert!(e32
            .iter()
            .zip(e16)
            .all(|(a, b)| quant::round_to_f16(*a) == *b));
        assert!(e32.iter().zip(e16).any(|(a, b)| a != b));
        assert_eq!(
            f16_model.decoder[0].cross_gate,
            quant::round_to_f16(f32_model.decoder[0].cross_gate)
        );
        // int4: the kernels are their dequantized quantization, everything else as stored.
        let (a, b) = (
            &f32_model.decoder[0].cross_attn,
            &int4.decoder[0].cross_attn,
        );
        let (k, n) = a.wv.dim();
        let want = quant::fake_quantize(a.wv.as_slice().unwrap(), k, n, Precision::Int4);
        assert_eq!(b.wv.as_slice().unwrap(), &want[..]);
        assert_ne!(a.wv, b.wv);
        assert_eq!(a.k_norm, b.k_norm);
        assert_eq!(f32_model.embedding, int4.embedding);
        assert_eq!(f32_model.encoder[0].gate, int4.encoder[0].gate);
        // The contrastive head's two kernels are Dense kernels too; its bias is not.
        let (a, b) = (&f32_model.contrastive, &int4.contrastive);
        let (k, n) = a.proj.dim();
        let want = quant::fake_quantize(a.proj.as_slice().unwrap(), k, n, Precision::Int4);
        assert_eq!(b.proj.as_slice().unwrap(), &want[..]);
        assert_ne!(a.hidden, b.hidden);
        assert_eq!((&a.hidden_bias, a.log_temp), (&b.hidden_bias, b.log_temp));
    }

    #[test]
    fn contrastive_head_mean_pools_projects_and_normalizes() {
        let model = Model::from_checkpoint(&checkpoint(small())).unwrap();
        let (d, c) = (model.config.d_model, model.config.contrastive_dim);
        let x = Array2::from_shape_fn((3, d), |(i, j)| ((i * 31 + j * 7) % 11) as f32 * 0.1 - 0.5);
        let got = crate::forward::contrastive_embedding(&model, &x);
        let h = &model.contrastive;
        let mean: Vec<f32> = (0..d)
            .map(|j| (0..3).map(|i| x[[i, j]]).sum::<f32>() / 3.0)
            .collect();
        let hidden: Vec<f32> = (0..d / 4)
            .map(|k| {
                let z: f32 = (0..d).map(|j| mean[j] * h.hidden[[j, k]]).sum();
                (z + h.hidden_bias[k]).max(0.0)
            })
            .collect();
        assert!(
            hidden.iter().any(|&v| v > 0.0),
            "a case where relu keeps something"
        );
        let out: Vec<f32> = (0..c)
            .map(|m| (0..d / 4).map(|k| hidden[k] * h.proj[[k, m]]).sum())
            .collect();
        let norm = (out.iter().map(|v| v * v).sum::<f32>() + 1e-12).sqrt();
        assert_eq!(got.len(), c);
        for (a, b) in got.iter().zip(&out) {
            assert!((a - b / norm).abs() < 1e-5, "{a} vs {}", b / norm);
        }
        assert!((got.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-4);
    }

    #[test]
    fn an_empty_input_axis_is_an_error_not_a_panic() {
        // d_model 2: the contrastive head's second kernel has d_model / 4 = 0 rows.
        let ckpt = checkpoint(Config {
            d_model: 2,
            num_heads: 1,
            ..small()
        });
        for p in [Precision::Int8, Precision::Int4] {
            let err = Model::from_checkpoint_as(&ckpt, p).unwrap_err();
            assert!(
                matches!(&err, ModelError::Precision(PrecisionError::EmptyInputAxis { path, .. })
                    if path == "contrastive_proj/kernel"),
                "{err}"
            );
        }
        assert!(Model::from_checkpoint_as(&ckpt, Precision::F16).is_ok());
    }

    #[test]
    fn f16_refuses_values_half_cannot_hold() {
        let mut ckpt = checkpoint(small());
        let path = format!("{ENC}/attn_gate");
        ckpt.tensors
            .insert(path.clone(), Tensor::from_f32(vec![1], &[1e6]));
        let err = Model::from_checkpoint_as(&ckpt, Precision::F16).unwrap_err();
        assert!(
            matches!(&err, ModelError::Precision(PrecisionError::F16Overflow { path: p, .. }) if *p == path),
            "{err}"
        );
        assert!(Model::from_checkpoint_as(&ckpt, Precision::F32).is_ok());
    }
}
