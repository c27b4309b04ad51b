//! The model configuration stored in a checkpoint (spec section 1).
//!
//! The reference saves only the keys its config was built with, so every key may be missing and
//! then takes the default below. Nothing in needlec may assume the 26M numbers: every dimension
//! comes from here.

use serde::{Deserialize, Serialize};

/// How the tools side of the encoder was trained to attend (spec section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolAttention {
    /// Trained without the tools mask: folding is an approximation.
    Full,
    /// Fine-tuned with isolated tool attention: folding is the checkpoint's own semantics.
    Isolated,
}

/// Needle v1 model configuration. Field names and defaults are the reference's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub num_encoder_layers: usize,
    pub num_decoder_layers: usize,
    pub d_ff: usize,
    pub max_seq_len: usize,
    pub pad_token_id: u32,
    pub rope_theta: f64,
    pub dtype: String,
    pub activation: String,
    pub num_memory_slots: usize,
    pub dropout_rate: f64,
    pub contrastive_dim: usize,
    pub no_feedforward: bool,
    pub tool_attention: ToolAttention,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vocab_size: 8192,
            d_model: 128,
            num_heads: 4,
            num_kv_heads: 2,
            num_encoder_layers: 2,
            num_decoder_layers: 2,
            d_ff: 512,
            max_seq_len: 128,
            pad_token_id: 0,
            rope_theta: 10000.0,
            dtype: "bfloat16".into(),
            activation: "drelu".into(),
            num_memory_slots: 64,
            dropout_rate: 0.1,
            contrastive_dim: 128,
            no_feedforward: true,
            tool_attention: ToolAttention::Full,
        }
    }
}

/// A configuration that cannot describe a Needle v1 SAN.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("config key `{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
    #[error(
        "this checkpoint has feed-forward blocks (config `no_feedforward` is false): it is not a \
         Needle v1 Simple Attention Network, and needlec compiles only those"
    )]
    HasFeedForward,
}

impl Config {
    /// The full-size Needle v1 (26M parameters): for synthetic checkpoints and benchmarks only.
    pub fn full() -> Self {
        Config {
            vocab_size: 8192,
            d_model: 512,
            num_heads: 8,
            num_kv_heads: 4,
            num_encoder_layers: 12,
            num_decoder_layers: 8,
            ..Config::default()
        }
    }

    /// Per-head width `h = D / H`.
    pub fn head_dim(&self) -> usize {
        // 0 for a config that `validate` rejects, so that shape arithmetic never panics first.
        self.d_model.checked_div(self.num_heads).unwrap_or(0)
    }

    /// Width of the K and V projections, `K * h`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim()
    }

    /// Query heads that share one KV head, `H / K`.
    pub fn group_size(&self) -> usize {
        self.num_heads.checked_div(self.num_kv_heads).unwrap_or(0)
    }

    /// Checks that the numbers describe a SAN needlec can run.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, problem: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                problem: problem.into(),
            })
        }
        if !self.no_feedforward {
            return Err(ConfigError::HasFeedForward);
        }
        if self.vocab_size < 6 {
            return bad(
                "vocab_size",
                format!("{} is too small: ids 0..=5 are reserved", self.vocab_size),
            );
        }
        if self.d_model == 0 {
            return bad("d_model", "must be positive");
        }
        if self.num_heads == 0 || !self.d_model.is_multiple_of(self.num_heads) {
            return bad(
                "num_heads",
                format!(
                    "{} does not divide d_model {}",
                    self.num_heads, self.d_model
                ),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(
                "num_heads",
                format!("head_dim {} must be even for RoPE", self.head_dim()),
            );
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(
                "num_kv_heads",
                format!(
                    "{} does not divide num_heads {}",
                    self.num_kv_heads, self.num_heads
                ),
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(
                "rope_theta",
                format!("{} is not a positive number", self.rope_theta),
            );
        }
        // Guard against absurd sizes in untrusted configs before anything is allocated.
        const MAX_DIM: usize = 1 << 16;
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("num_encoder_layers", self.num_encoder_layers),
            ("num_decoder_layers", self.num_decoder_layers),
        ] {
            if v > MAX_DIM {
                return bad(
                    key,
                    format!("{v} is larger than needlec supports ({MAX_DIM})"),
                );
            }
        }
        Ok(())
    }
}
