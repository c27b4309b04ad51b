//! A loaded checkpoint: its config and its named tensors, as the file stored them.
//!
//! Loaders (pickle, safetensors) produce this; [`crate::model::Model`] validates it against the
//! config and converts it to float32 for the forward pass. Tensors keep their stored dtype so that
//! converting between file formats is lossless.

use std::collections::BTreeMap;

use crate::config::Config;

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
        }
    }
}

/// One stored tensor: little-endian bytes in row-major order.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Tensor {
    /// Number of elements (1 for a 0-d tensor).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A float32 tensor from values.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        Tensor {
            dtype: DType::F32,
            shape,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The values widened to float32 (exact for every stored dtype).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }
}

/// A checkpoint as loaded from disk, before validation against its config.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub config: Config,
    /// Tensors by `/`-joined path, e.g. `encoder/layers/EncoderBlock_0/attn_gate`.
    pub tensors: BTreeMap<String, Tensor>,
}

/// Prefix of the stacked encoder layer tensors (Flax `nn.scan` stacks layers on a leading axis).
pub const ENC: &str = "encoder/layers/EncoderBlock_0";
/// Prefix of the stacked decoder layer tensors.
pub const DEC: &str = "decoder/layers/DecoderBlock_0";

/// Every tensor a Needle v1 SAN checkpoint of this config must hold, with its shape (spec
/// section 1), in a stable order. Loaders, validation and the synthetic generator share this list.
pub fn expected_tensors(c: &Config) -> Vec<(String, Vec<usize>)> {
    let (d, h, kv) = (c.d_model, c.head_dim(), c.kv_dim());
    let mut out: Vec<(String, Vec<usize>)> =
        vec![("embedding/embedding".into(), vec![c.vocab_size, d])];
    let attn = |out: &mut Vec<(String, Vec<usize>)>, prefix: &str, n: usize| {
        out.push((format!("{prefix}/q_proj/kernel"), vec![n, d, d]));
        out.push((format!("{prefix}/k_proj/kernel"), vec![n, d, kv]));
        out.push((format!("{prefix}/v_proj/kernel"), vec![n, d, kv]));
        out.push((format!("{prefix}/out_proj/kernel"), vec![n, d, d]));
        out.push((format!("{prefix}/q_norm/scale"), vec![n, h]));
        out.push((format!("{prefix}/k_norm/scale"), vec![n, h]));
    };
    let (l, m) = (c.num_encoder_layers, c.num_decoder_layers);
    out.push((format!("{ENC}/ZCRMSNorm_0/scale"), vec![l, d]));
    out.push((format!("{ENC}/attn_gate"), vec![l]));
    attn(&mut out, &format!("{ENC}/self_attn"), l);
    out.push(("encoder/final_norm/scale".into(), vec![d]));
    out.push((format!("{DEC}/ZCRMSNorm_0/scale"), vec![m, d]));
    out.push((format!("{DEC}/ZCRMSNorm_1/scale"), vec![m, d]));
    out.push((format!("{DEC}/self_attn_gate"), vec![m]));
    out.push((format!("{DEC}/cross_attn_gate"), vec![m]));
    attn(&mut out, &format!("{DEC}/self_attn"), m);
    attn(&mut out, &format!("{DEC}/cross_attn"), m);
    out.push(("decoder/ZCRMSNorm_0/scale".into(), vec![d]));
    out.push(("contrastive_hidden/kernel".into(), vec![d, d / 4]));
    out.push(("contrastive_hidden/bias".into(), vec![d / 4]));
    out.push((
        "contrastive_proj/kernel".into(),
        vec![d / 4, c.contrastive_dim],
    ));
    out.push(("log_temp".into(), vec![]));
    out
}
