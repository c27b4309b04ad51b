//! Deterministic random checkpoints of any config, for tests and benchmarks.
//!
//! The values are not a trained model, but they are shaped like one so that a forward pass stays
//! numerically sane at any size: kernels are uniform with variance 1/fan_in (activations keep
//! their scale through each projection), zero-centered norm scales and gates are small but
//! non-zero (so every code path contributes), and `log_temp` is the usual CLIP initialization.
//! Each tensor has its own generator seeded from the seed and its path, so a tensor's values do
//! not depend on which other tensors the config has.

use std::collections::BTreeMap;

use needle_runtime::checkpoint::{expected_tensors, Checkpoint, DType, Tensor};
use needle_runtime::config::Config;

use crate::load::{config_from_json, human_bytes, LoadError, MAX_CHECKPOINT_BYTES};

/// splitmix64: tiny, fast, and statistically good enough for weights.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn symmetric(&mut self) -> f32 {
        // 24 random bits give every f32 step in [0, 1) exactly.
        let u = (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
        2.0 * u - 1.0
    }
}

/// FNV-1a, to give each tensor path its own stream.
fn path_hash(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// How a tensor is initialized: values are `center + spread * u`, `u` uniform in [-1, 1).
fn init_of(path: &str, shape: &[usize]) -> (f32, f32) {
    let leaf = path.rsplit('/').next().unwrap_or(path);
    match leaf {
        // Uniform on [-a, a] has variance a^2/3: a = sqrt(3/fan_in) gives variance 1/fan_in.
        "kernel" => {
            let fan_in = if shape.len() >= 2 {
                shape[shape.len() - 2]
            } else {
                1
            };
            (0.0, (3.0 / fan_in.max(1) as f32).sqrt())
        }
        "embedding" => (
            0.0,
            (3.0 / shape.last().copied().unwrap_or(1).max(1) as f32).sqrt(),
        ),
        // ZCRMSNorm multiplies by (1 + scale).
        "scale" => (0.0, 0.3),
        // Gates in [0.1, 0.6]: positive and away from zero so every block contributes.
        _ if leaf.ends_with("gate") => (0.35, 0.25),
        "bias" => (0.0, 0.1),
        _ => (0.0, 0.5),
    }
}

fn encode(dtype: DType, values: impl Iterator<Item = f32>, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * dtype.size());
    match dtype {
        DType::F32 => values.for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => {
            values.for_each(|v| out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()))
        }
        DType::BF16 => {
            values.for_each(|v| out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()))
        }
    }
    out
}

/// A random checkpoint holding every tensor of [`expected_tensors`] for `config`, stored as
/// `dtype`. The same (config, seed, dtype) always gives the same bytes.
pub fn synth_checkpoint(config: &Config, seed: u64, dtype: DType) -> Checkpoint {
    let mut tensors = BTreeMap::new();
    for (path, shape) in expected_tensors(config) {
        let n: usize = shape.iter().product();
        let bytes = if path == "log_temp" {
            // ln(1 / 0.07), CLIP's initial temperature.
            encode(dtype, std::iter::once(2.659_26_f32), 1)
        } else {
            let (center, spread) = init_of(&path, &shape);
            let mut rng = SplitMix(seed ^ path_hash(&path));
            encode(dtype, (0..n).map(|_| center + spread * rng.symmetric()), n)
        };
        tensors.insert(
            path,
            Tensor {
                dtype,
                shape,
                bytes,
            },
        );
    }
    Checkpoint {
        config: config.clone(),
        tensors,
    }
}

/// Parses a config spec: `full` (26M), `tiny` (D=64, H=4, K=2, 2+2 layers, V=4096), `small`
/// (D=96, H=6, K=2, 3+2 layers, V=4096), or a JSON object of config keys (others default).
/// `tiny` and `small` match the golden fixtures' configs. The result is validated.
pub fn parse_config_spec(spec: &str) -> Result<Config, LoadError> {
    let spec = spec.trim();
    let config = match spec {
        "full" => Config::full(),
        "tiny" => Config {
            vocab_size: 4096,
            d_model: 64,
            num_heads: 4,
            num_kv_heads: 2,
            num_encoder_layers: 2,
            num_decoder_layers: 2,
            max_seq_len: 1024,
            ..Config::default()
        },
        "small" => Config {
            vocab_size: 4096,
            d_model: 96,
            num_heads: 6,
            num_kv_heads: 2,
            num_encoder_layers: 3,
            num_decoder_layers: 2,
            max_seq_len: 1024,
            ..Config::default()
        },
        s if s.starts_with('{') => {
            let json: serde_json::Value = serde_json::from_str(s).map_err(|e| LoadError::Config {
                key: None,
                problem: format!("the config spec is not valid JSON: {e}"),
            })?;
            config_from_json(json)?
        }
        other => {
            return Err(LoadError::Config {
                key: None,
                problem: format!(
                    "unknown config spec {other:?}: use `full`, `tiny`, `small` or a JSON object such as \
                     {{\"d_model\": 64, \"num_heads\": 4}}"
                ),
            })
        }
    };
    config.validate()?;
    // The float32 bytes the checkpoint takes, without overflow: a huge config is refused here
    // rather than aborting on allocation, at the bound `load_checkpoint` reads back.
    let bytes: u128 = expected_tensors(&config)
        .iter()
        .map(|(_, shape)| shape.iter().map(|&d| d as u128).product::<u128>() * 4)
        .sum();
    if bytes > u128::from(MAX_CHECKPOINT_BYTES) {
        return Err(LoadError::Config {
            key: None,
            problem: format!(
                "this config makes a checkpoint of {bytes} bytes in float32, more than the {} \
                 needlec reads back as a checkpoint; use smaller dimensions (`full`, the 26M \
                 Needle model, is about 105 MB)",
                human_bytes(MAX_CHECKPOINT_BYTES)
            ),
        });
    }
    Ok(config)
}

/// A SentencePiece `.model` (`bytes`, with `have` pieces) with control pieces appended up to
/// `vocab` pieces, for pairing a small tokenizer with a random checkpoint of a larger vocabulary
/// (needlec refuses a tokenizer smaller than the model's vocabulary). Repeated protobuf fields
/// may follow the others, and control pieces never match text, so every text tokenizes as with
/// the original; only the vocabulary grows.
pub fn padded_sentencepiece(bytes: &[u8], have: usize, vocab: usize) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    for i in have..vocab {
        let name = format!("<pad_{i}>");
        // SentencePiece { piece = 1: name, score = 2: 0.0, type = 3: CONTROL (3) }
        let mut piece = vec![0x0a, name.len() as u8];
        piece.extend(name.as_bytes());
        piece.extend([0x15, 0, 0, 0, 0, 0x18, 3]);
        bytes.extend([0x0a, piece.len() as u8]);
        bytes.extend(piece);
    }
    bytes
}
