//! `needlec build --weights f32|f16|int8|int4`: how the library stores each weight, and the
//! float32 model it then computes with (what folding precomputes the tools side from).
//!
//! - `int8`/`int4` store every Dense `kernel` as the reference quantizes it
//!   ([`needle_runtime::quant`], the one shared implementation): the IR constant keeps the
//!   checkpoint's values and is marked [`Storage::I8`]/[`Storage::I4`]; codegen quantizes them
//!   with [`needle_runtime::quant::quantize`] and dequantizes in registers. The embedding
//!   stays in its stored precision (half for float16 checkpoints, so [`Storage::F16`]).
//! - `f16` stores the Dense kernels and the embedding as IEEE half: lossless for float16
//!   checkpoints; a float32 checkpoint's values are rounded first (and the build says so).
//! - `f32` stores everything as float32.
//!
//! Norm scales, gates and biases are tiny and stay stored as float32 in every format (under
//! `f16` their values are rounded to half like every parameter, as `needlec run --weights f16`
//! does). A weight stored
//! other than [`Storage::Plain`] is never rewritten by a pass (`fuse-norm-matmul` leaves it),
//! so the library computes exactly with the values chosen here.

use half::f16;
use needle_ir::{ConstData, ConstStore, Module, Storage};
use needle_runtime::checkpoint::{Checkpoint, DType};
use needle_runtime::config::Config;
use needle_runtime::quant::group_size;
pub use needle_runtime::quant::Precision;

use crate::const_names::{const_source, ConstSource};

/// The checkpoint path of the token embedding (also the tied output projection).
const EMBEDDING: &str = "embedding/embedding";

/// What a checkpoint tensor is, as far as weight formats go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// A Dense layer's `kernel` (`y = x @ W`): quantized by int8/int4.
    DenseKernel,
    Embedding,
    /// Norm scales, gates, biases: always float32.
    Other,
}

fn role(path: &str) -> Role {
    if path == EMBEDDING {
        Role::Embedding
    } else if path.ends_with("/kernel") {
        Role::DenseKernel
    } else {
        Role::Other
    }
}

/// How the tensor at `path` (its stored `dtype`, one layer's slice shaped `shape`) is stored
/// under `precision`.
fn storage(path: &str, dtype: DType, shape: &[usize], precision: Precision) -> Storage {
    match (role(path), precision) {
        (Role::Other, _) | (_, Precision::F32) => Storage::Plain,
        (Role::DenseKernel | Role::Embedding, Precision::F16) => Storage::F16,
        (Role::DenseKernel, Precision::Int8 | Precision::Int4) if shape.len() == 2 => {
            let group = group_size(shape[0]) as u32;
            if precision == Precision::Int8 {
                Storage::I8 { group }
            } else {
                Storage::I4 { group }
            }
        }
        // The embedding keeps its stored precision under int8/int4.
        (Role::Embedding, _) if dtype == DType::F16 => Storage::F16,
        _ => Storage::Plain,
    }
}

/// Marks every checkpoint constant of `module` with its storage under `precision`, and rounds
/// the data to half under `f16` (a no-op for float16 checkpoints). Run after the
/// constants are filled and before the passes.
pub fn apply(
    module: &mut Module,
    store: &mut ConstStore,
    config: &Config,
    checkpoint: &Checkpoint,
    precision: Precision,
) -> Result<(), String> {
    for c in &mut module.consts {
        let Some(ConstSource::Checkpoint { path, .. }) = const_source(config, &c.name) else {
            continue;
        };
        let dtype = checkpoint
            .tensors
            .get(&path)
            .map(|t| t.dtype)
            .ok_or_else(|| format!("@{}: the checkpoint has no {path}", c.name))?;
        let shape =
            c.ty.static_dims()
                .ok_or_else(|| format!("@{} : {} is not static", c.name, c.ty))?;
        c.storage = storage(&path, dtype, &shape, precision);
        // `f16` rounds every parameter, as the runtime's model does (norm scales and gates too,
        // though they stay stored as float32): both then compute with the same values.
        if precision == Precision::F16 {
            if let Some(ConstData::F32(values)) = store.data.get_mut(&c.name) {
                for v in values.iter_mut() {
                    *v = f16::from_f32(*v).to_f32();
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_storages() {
        let k = "encoder/layers/EncoderBlock_0/self_attn/q_proj/kernel";
        assert_eq!(role(k), Role::DenseKernel);
        assert_eq!(role(EMBEDDING), Role::Embedding);
        assert_eq!(role("decoder/ZCRMSNorm_0/scale"), Role::Other);
        let s = |path, dtype, shape: &[usize], p| storage(path, dtype, shape, p);
        assert_eq!(
            s(k, DType::F16, &[40, 8], Precision::Int4),
            Storage::I4 { group: 32 }
        );
        assert_eq!(
            s(k, DType::F32, &[16, 8], Precision::Int8),
            Storage::I8 { group: 16 }
        );
        assert_eq!(s(k, DType::F32, &[16, 8], Precision::F16), Storage::F16);
        assert_eq!(s(k, DType::F16, &[16, 8], Precision::F32), Storage::Plain);
        assert_eq!(
            s(EMBEDDING, DType::F16, &[8, 4], Precision::Int4),
            Storage::F16
        );
        assert_eq!(
            s(EMBEDDING, DType::F32, &[8, 4], Precision::Int4),
            Storage::Plain
        );
        assert_eq!(
            s(
                "decoder/ZCRMSNorm_0/scale",
                DType::F16,
                &[8],
                Precision::F16
            ),
            Storage::Plain
        );
    }
}
