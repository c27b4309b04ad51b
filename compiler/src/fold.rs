//! Folding: the tools-side precomputation (spec section 6). Tool positions attend only to tool
//! positions, so for `--fold tools` their encoder K/V and the decoder's cross-attention K/V
//! of their encoder output are computed once at build time, with the runtime's own forward
//! pass, and shipped as the constants `@fold.*` ([`crate::const_names::FoldedBlock`]).
//!
//! The layouts follow the lowering's contract (see [`crate::lower`]): encoder K after `k_norm`
//! and RoPE at positions `q_max..q_max+S`, everything `[S, K, h]` row-major (the same bytes as
//! the runtime's `(S, K*h)` matrices). [`crate::materialize`] puts the blocks into the store.

use needle_runtime::forward::{rope, rope_frequencies, FoldedTools};
use needle_runtime::model::Model;

use crate::const_names::FoldedBlock;

/// The tools side's K/V for every layer, computed once.
pub struct FoldedToolsSide {
    folded: FoldedTools,
    head_dim: usize,
    freqs: Vec<f32>,
    /// The tools side's first RoPE position: the query's maximum length.
    q_max: usize,
}

impl FoldedToolsSide {
    /// Runs the tools side (`<tools>` then the tool tokens) through the model with the isolated
    /// mask; `q_max` is where the lowering puts its first position.
    pub fn precompute(model: &Model, tools_side: &[u32], q_max: usize) -> Self {
        FoldedToolsSide {
            folded: FoldedTools::precompute(model, tools_side),
            head_dim: model.config.head_dim(),
            freqs: rope_frequencies(&model.config),
            q_max,
        }
    }

    /// One folded block of `layer`, as the constant `@fold.*` holds it.
    pub fn block(&self, block: FoldedBlock, layer: usize) -> Vec<f32> {
        let f = &self.folded;
        let m = match block {
            FoldedBlock::EncoderK => {
                let mut k = f.encoder_kv[layer].0.clone();
                rope(&mut k, self.head_dim, &self.freqs, self.q_max);
                k
            }
            FoldedBlock::EncoderV => f.encoder_kv[layer].1.clone(),
            FoldedBlock::CrossK => f.cross_kv.layers[layer].0.clone(),
            FoldedBlock::CrossV => f.cross_kv.layers[layer].1.clone(),
        };
        m.iter().copied().collect()
    }
}
