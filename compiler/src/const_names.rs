//! The constant-naming contract between lowering and materialization: what every `@name` a
//! lowered module declares stands for, and so where its data comes from.
//!
//! Checkpoint tensors get short names from their paths ([`checkpoint_weights`]); per-layer
//! slices of stacked tensors carry the layer: `@enc.{l}.q_proj` is
//! `encoder/layers/EncoderBlock_0/self_attn/q_proj/kernel[l]`. The tables and the folded tools
//! side have fixed names (`@rope`, `@prompt.tools`, `@fold.enc.{l}.k`, ...). [`const_source`]
//! maps any name back to its source. [`crate::lower`] declares constants by these names and
//! [`crate::materialize`] fills them; neither needs the other.

use needle_runtime::checkpoint::{expected_tensors, DEC, ENC};
use needle_runtime::config::Config;

/// A checkpoint tensor (or one layer of a stacked one) as an IR constant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointWeight {
    /// IR name, without `@`.
    pub name: String,
    /// `/`-joined checkpoint path.
    pub path: String,
    /// The slice along the leading layer axis, for stacked per-layer tensors.
    pub layer: Option<usize>,
    /// Shape of the constant (the slice's).
    pub shape: Vec<usize>,
}

/// Every checkpoint tensor as IR constants, layer by layer, in the checkpoint's order (all of
/// them: the contrastive head too, which `dead-weight-elim` then drops).
pub fn checkpoint_weights(config: &Config) -> Vec<CheckpointWeight> {
    let tensors = expected_tensors(config);
    let stack_of = |path: &str| {
        [ENC, DEC]
            .into_iter()
            .find(|s| path.starts_with(&format!("{s}/")))
    };
    let mut out = Vec::new();
    let mut emitted_stacks = Vec::new();
    for (path, shape) in &tensors {
        match stack_of(path) {
            None => out.push(CheckpointWeight {
                name: short_name(path, None),
                path: path.clone(),
                layer: None,
                shape: shape.clone(),
            }),
            // A stack is emitted whole at its first tensor, layer-major, so that a layer's
            // constants read together.
            Some(stack) if !emitted_stacks.contains(&stack) => {
                emitted_stacks.push(stack);
                let members: Vec<&(String, Vec<usize>)> = tensors
                    .iter()
                    .filter(|(p, _)| stack_of(p) == Some(stack))
                    .collect();
                let layers = members
                    .first()
                    .and_then(|(_, s)| s.first().copied())
                    .unwrap_or(0);
                for l in 0..layers {
                    for (p, s) in &members {
                        out.push(CheckpointWeight {
                            name: short_name(p, Some(l)),
                            path: p.clone(),
                            layer: Some(l),
                            shape: s[1..].to_vec(),
                        });
                    }
                }
            }
            Some(_) => {}
        }
    }
    out
}

/// The short IR name of a checkpoint path (and layer), e.g.
/// `decoder/layers/DecoderBlock_0/cross_attn/k_proj/kernel` layer 1 -> `dec.1.cross.k_proj`.
fn short_name(path: &str, layer: Option<usize>) -> String {
    let trimmed = path.trim_end_matches("/kernel").trim_end_matches("/scale");
    let stacked = |prefix: &str, rest: &str, l: usize| -> String {
        let rest = match (prefix, rest) {
            ("enc", "ZCRMSNorm_0") => "norm".to_string(),
            ("enc", "attn_gate") => "gate".to_string(),
            ("dec", "ZCRMSNorm_0") => "self_norm".to_string(),
            ("dec", "ZCRMSNorm_1") => "cross_norm".to_string(),
            ("dec", "self_attn_gate") => "self_gate".to_string(),
            ("dec", "cross_attn_gate") => "cross_gate".to_string(),
            ("enc", r) => r.trim_start_matches("self_attn/").replace('/', "."),
            (_, r) => r
                .replace("self_attn/", "self/")
                .replace("cross_attn/", "cross/")
                .replace('/', "."),
        };
        format!("{prefix}.{l}.{rest}")
    };
    match (layer, trimmed) {
        (Some(l), p) if p.starts_with(&format!("{ENC}/")) => stacked("enc", &p[ENC.len() + 1..], l),
        (Some(l), p) if p.starts_with(&format!("{DEC}/")) => stacked("dec", &p[DEC.len() + 1..], l),
        (_, "embedding/embedding") => "embedding".into(),
        (_, "encoder/final_norm") => "enc.final_norm".into(),
        (_, "decoder/ZCRMSNorm_0") => "dec.final_norm".into(),
        (_, "contrastive_hidden") => "contrastive.hidden".into(),
        (_, "contrastive_hidden/bias") => "contrastive.hidden_bias".into(),
        (_, "contrastive_proj") => "contrastive.proj".into(),
        (_, p) => p.replace('/', "."),
    }
}

/// Which folded block a `folded_kv` constant is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoldedBlock {
    /// Encoder self-attention K of the tools side: after `k_norm` and RoPE at positions
    /// `q_max..q_max+S` (`[S, K, h]`).
    EncoderK,
    /// Encoder self-attention V of the tools side.
    EncoderV,
    /// Decoder cross-attention K of the tools side's encoder output, after `k_norm`.
    CrossK,
    /// Decoder cross-attention V of the tools side's encoder output.
    CrossV,
}

/// Where a constant's data comes from (what fills the `ConstStore` before the passes run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConstSource {
    /// A checkpoint tensor, or its `layer` slice along the leading axis.
    Checkpoint { path: String, layer: Option<usize> },
    /// Row `r`: `cos(r f_j)` for `j < h/2`, then `sin(r f_j)`; `f_j = rope_theta^(-2j/h)`.
    RopeTable,
    /// `<tools>` (id 5) then the tool list's token ids.
    ToolTokens,
    /// Tools-side K/V computed at build time with the isolated mask (spec section 6).
    FoldedKv { block: FoldedBlock, layer: usize },
}

/// The source of the constant named `name` (without `@`) in a module lowered from `config`.
/// Names that passes derive (`.sigmoid`, `.plus1`, `.scaled`) have their data computed by the
/// pass, so they have no source here.
pub fn const_source(config: &Config, name: &str) -> Option<ConstSource> {
    if let Some(w) = checkpoint_weights(config)
        .into_iter()
        .find(|w| w.name == name)
    {
        return Some(ConstSource::Checkpoint {
            path: w.path,
            layer: w.layer,
        });
    }
    match name {
        "rope" => return Some(ConstSource::RopeTable),
        "prompt.tools" => return Some(ConstSource::ToolTokens),
        _ => {}
    }
    let rest = name.strip_prefix("fold.")?;
    let (side, rest) = rest.split_once('.')?;
    let (layer, what) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (block, layers) = match (side, what) {
        ("enc", "k") => (FoldedBlock::EncoderK, config.num_encoder_layers),
        ("enc", "v") => (FoldedBlock::EncoderV, config.num_encoder_layers),
        ("dec", "cross_k") => (FoldedBlock::CrossK, config.num_decoder_layers),
        ("dec", "cross_v") => (FoldedBlock::CrossV, config.num_decoder_layers),
        _ => return None,
    };
    (layer < layers).then_some(ConstSource::FoldedKv { block, layer })
}

/// The small config the unit tests of the constant-naming stages (`const_names`, `lower`,
/// `materialize`, `build`) share: `needlec synth`'s `tiny` (vocab 4096, D=64, 4 heads over 2 KV
/// heads, 2 + 2 layers, the golden fixture's shape).
#[cfg(test)]
pub(crate) fn tiny_test_config() -> Config {
    crate::synth::parse_config_spec("tiny").expect("the tiny config is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Config {
        tiny_test_config()
    }

    #[test]
    fn weights_cover_the_checkpoint_exactly() {
        let config = Config::full();
        let weights = checkpoint_weights(&config);
        let mut names: Vec<&str> = weights.iter().map(|w| w.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), weights.len(), "IR names must be unique");
        for (path, shape) in expected_tensors(&config) {
            let slices: Vec<&CheckpointWeight> =
                weights.iter().filter(|w| w.path == path).collect();
            let stacked = path.starts_with(ENC) || path.starts_with(DEC);
            if stacked {
                assert_eq!(slices.len(), shape[0], "{path}");
                for (l, w) in slices.iter().enumerate() {
                    assert_eq!((w.layer, &w.shape[..]), (Some(l), &shape[1..]), "{path}");
                }
            } else {
                assert_eq!(slices.len(), 1, "{path}");
                assert_eq!(
                    (slices[0].layer, &slices[0].shape),
                    (None, &shape),
                    "{path}"
                );
            }
        }
    }
    #[test]
    fn short_names_read_like_their_paths() {
        let w = checkpoint_weights(&tiny());
        let find = |name: &str| {
            w.iter()
                .find(|w| w.name == name)
                .map(|w| (w.path.as_str(), w.layer))
        };
        assert_eq!(
            find("enc.1.q_proj"),
            Some((&*format!("{ENC}/self_attn/q_proj/kernel"), Some(1)))
        );
        assert_eq!(
            find("enc.0.gate"),
            Some((&*format!("{ENC}/attn_gate"), Some(0)))
        );
        assert_eq!(
            find("dec.1.cross.k_norm"),
            Some((&*format!("{DEC}/cross_attn/k_norm/scale"), Some(1)))
        );
        assert_eq!(
            find("dec.0.cross_norm"),
            Some((&*format!("{DEC}/ZCRMSNorm_1/scale"), Some(0)))
        );
        assert_eq!(
            find("dec.final_norm"),
            Some(("decoder/ZCRMSNorm_0/scale", None))
        );
        assert_eq!(
            find("contrastive.hidden_bias"),
            Some(("contrastive_hidden/bias", None))
        );
    }
}
