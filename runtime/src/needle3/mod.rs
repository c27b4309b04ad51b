//! Needle 3 (cactus-needle 3.2.x): the decoder-only "Laddered Simple Attention Network",
//! independent of the v1 code paths. The semantics are in `docs/needle3.md`.
//!
//! [`config`] reads the saved config, [`model`] loads a safetensors checkpoint into float32
//! weights ([`cact`] the `.cact` export, CQ codes dequantized) (and slices it to a ladder depth), [`forward`] runs a prompt through it, whole or
//! incrementally through a cache (logits, hidden cells, heads), [`prompt`] renders and tokenizes the chat prompt, [`engine`] answers queries
//! (greedy, folded or not, the output envelope read; [`grammar`] constrains it under
//! `--grammar strict`), [`generate`] rebuilds the default-config test checkpoint from its documented
//! counter-based generator.

pub mod cact;
pub mod config;
pub mod cq;
pub mod engine;
pub mod forward;
pub mod generate;
pub mod grammar;
pub mod model;
pub mod prompt;

pub use config::Config;
pub use model::Model;

/// Why a Needle 3 checkpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Needle 3 config: {0}")]
    Config(String),
    #[error("Needle 3 .cact file: {0}")]
    Cact(String),
    #[error("Needle 3 safetensors file: {0}")]
    Safetensors(String),
    #[error(
        "Needle 3 checkpoint: tensor `{name}` is missing; the checkpoint is incomplete or not a \
         Needle 3 model of this config"
    )]
    Missing { name: String },
    #[error(
        "Needle 3 checkpoint: tensor `{name}` has shape {found:?}, but the config needs \
         {expected:?}; the config and the weights disagree"
    )]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("Needle 3 checkpoint: tensor `{name}` has dtype {dtype}; only F32, F16 and BF16 are supported")]
    Dtype { name: String, dtype: String },
    #[error(
        "ladder depth {depth} is out of range: a model of {layers} layers runs at 2 to {layers}"
    )]
    Depth { depth: usize, layers: usize },
    #[error(transparent)]
    Prompt(#[from] prompt::PromptError),
    #[error("--grammar strict: {0}")]
    Strict(#[from] crate::strict::StrictError),
    #[error(
        "--grammar strict needs at least {needed} generated tokens for `<tool_call>`, the \
         shortest complete call list, `</tool_call>` and `<|im_end|>`, but --max-gen-len \
         allows {allows}: raise --max-gen-len"
    )]
    StrictBudget { allows: usize, needed: usize },
    #[error("token id {id} at position {pos} is outside the vocabulary of {vocab}")]
    Token { id: u32, pos: usize, vocab: usize },
}
