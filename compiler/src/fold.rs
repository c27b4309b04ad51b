//! Folding: the build-time evaluation that fills every constant of a lowered module that is not a
//! checkpoint slice: the RoPE table, the tool tokens, and (for `--fold tools`) the tools side's
//! encoder and cross-attention K/V, computed once with the runtime's own forward pass.
//!
//! The layouts follow the contract documented in [`crate::lower`]: folded encoder K after
//! `k_norm` and RoPE at positions `q_max..q_max+S`, everything `[S, K, h]` row-major (the same
//! bytes as the runtime's `(S, K*h)` matrices).

use needle_ir::{ConstData, ConstStore, Module, Sym};
use needle_runtime::checkpoint::Checkpoint;
use needle_runtime::decode::TOOLS_ID;
use needle_runtime::forward::{rope, rope_frequencies, FoldedTools};
use needle_runtime::model::Model;

use crate::lower::{const_source, fill_weights, ConstSource, FoldedBlock};

/// Fills `store` with the data of every constant `module` declares: checkpoint slices, the RoPE
/// table, the tools-side token ids (`<tools>` first), and the folded K/V when the module has them.
pub fn fill_constants(
    module: &Module,
    checkpoint: &Checkpoint,
    model: &Model,
    tool_ids: &[u32],
    store: &mut ConstStore,
) -> Result<(), String> {
    let config = &model.config;
    fill_weights(module, config, checkpoint, store)?;
    let tools_side: Vec<u32> = std::iter::once(TOOLS_ID)
        .chain(tool_ids.iter().copied())
        .collect();
    let freqs = rope_frequencies(config);
    let half = config.head_dim() / 2;
    // Folded constants sit at positions q_max.. (the lowering's position plan).
    let q_max = module.dim_bounds(Sym::Q).1 as usize;
    let mut folded: Option<FoldedTools> = None;
    for c in &module.consts {
        let data = match const_source(config, &c.name) {
            None | Some(ConstSource::Checkpoint { .. }) => continue,
            Some(ConstSource::RopeTable) => {
                let rows =
                    c.ty.static_dims()
                        .and_then(|d| d.first().copied())
                        .unwrap_or(0);
                let mut t = Vec::with_capacity(rows * 2 * half);
                for r in 0..rows {
                    // The same float32 arithmetic as the runtime's RoPE.
                    let (sin, cos): (Vec<f32>, Vec<f32>) =
                        freqs.iter().map(|f| (r as f32 * f).sin_cos()).unzip();
                    t.extend(cos);
                    t.extend(sin);
                }
                ConstData::F32(t)
            }
            Some(ConstSource::ToolTokens) => {
                ConstData::I32(tools_side.iter().map(|&id| id as i32).collect())
            }
            Some(ConstSource::FoldedKv { block, layer }) => {
                let f = folded.get_or_insert_with(|| FoldedTools::precompute(model, &tools_side));
                let m = match block {
                    FoldedBlock::EncoderK => {
                        let mut k = f.encoder_kv[layer].0.clone();
                        rope(&mut k, config.head_dim(), &freqs, q_max);
                        k
                    }
                    FoldedBlock::EncoderV => f.encoder_kv[layer].1.clone(),
                    FoldedBlock::CrossK => f.cross_kv.layers[layer].0.clone(),
                    FoldedBlock::CrossV => f.cross_kv.layers[layer].1.clone(),
                };
                ConstData::F32(m.iter().copied().collect())
            }
        };
        store.insert(c.name.clone(), data);
    }
    store.check(module)
}
