//! Constant materialization: after lowering, fill the data of every constant the module
//! declares, by what its name stands for ([`crate::const_names`]): checkpoint slices widened to
//! float32, the RoPE table, the tools-side token ids, and (for `--fold tools`) the folded K/V
//! that [`crate::fold`] precomputes. The passes then rewrite this data together with the module.

use needle_ir::{ConstData, ConstStore, Module, Sym};
use needle_runtime::checkpoint::Checkpoint;
use needle_runtime::config::Config;
use needle_runtime::decode::tools_side;
use needle_runtime::forward::rope_frequencies;
use needle_runtime::model::Model;

use crate::const_names::{const_source, ConstSource};
use crate::fold::FoldedToolsSide;

/// Fills `store` with the data of every constant `module` declares: checkpoint slices, the RoPE
/// table, the tools-side token ids (`<tools>` first), and the folded K/V when the module has them.
pub fn materialize_constants(
    module: &Module,
    checkpoint: &Checkpoint,
    model: &Model,
    tool_ids: &[u32],
    store: &mut ConstStore,
) -> Result<(), String> {
    let config = &model.config;
    fill_weights(module, config, checkpoint, store)?;
    let tools_side = tools_side(tool_ids);
    let freqs = rope_frequencies(config);
    // Folded constants sit at positions q_max.. (the lowering's position plan).
    let q_max = module.dim_bounds(Sym::Q).1 as usize;
    let mut folded: Option<FoldedToolsSide> = None;
    for c in &module.consts {
        let data = match const_source(config, &c.name) {
            None | Some(ConstSource::Checkpoint { .. }) => continue,
            Some(ConstSource::RopeTable) => {
                let rows =
                    c.ty.static_dims()
                        .and_then(|d| d.first().copied())
                        .unwrap_or(0);
                let mut t = Vec::with_capacity(rows * freqs.len() * 2);
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
                let f = folded
                    .get_or_insert_with(|| FoldedToolsSide::precompute(model, &tools_side, q_max));
                ConstData::F32(f.block(block, layer))
            }
        };
        store.insert(c.name.clone(), data);
    }
    store.check(module)
}

/// Fills the store with the data of every checkpoint-sourced constant of `module` (one layer's
/// slice of a stacked tensor, widened to f32). Tables and folded K/V come from elsewhere.
pub fn fill_weights(
    module: &Module,
    config: &Config,
    checkpoint: &Checkpoint,
    store: &mut ConstStore,
) -> Result<(), String> {
    for c in &module.consts {
        let Some(ConstSource::Checkpoint { path, layer }) = const_source(config, &c.name) else {
            continue;
        };
        let tensor = checkpoint
            .tensors
            .get(&path)
            .ok_or_else(|| format!("checkpoint has no tensor {path} for @{}", c.name))?;
        let values = tensor.to_f32();
        let want: usize = c.ty.static_dims().unwrap_or_default().iter().product();
        let start = layer.unwrap_or(0) * want;
        let slice = values.get(start..start + want).ok_or_else(|| {
            format!(
                "{path} {:?} is too small for @{} : {}",
                tensor.shape, c.name, c.ty
            )
        })?;
        store.insert(c.name.clone(), ConstData::F32(slice.to_vec()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use needle_runtime::checkpoint::{expected_tensors, Tensor};
    use needle_runtime::decode::FoldMode;

    use crate::lower::lower;

    fn tiny() -> Config {
        crate::const_names::tiny_test_config()
    }

    #[test]
    fn weights_are_filled_from_checkpoint_slices() {
        let config = tiny();
        let tensors = expected_tensors(&config)
            .into_iter()
            .map(|(path, shape)| {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
                (path, Tensor::from_f32(shape, &values))
            })
            .collect();
        let checkpoint = Checkpoint {
            config: config.clone(),
            tensors,
        };
        let m = lower(&config, FoldMode::None, 36, 1022);
        let mut store = ConstStore::default();
        fill_weights(&m, &config, &checkpoint, &mut store).unwrap();
        // Layer 1 of the stacked (L, D, K*h) k_proj starts after layer 0's 64*32 values.
        let Some(ConstData::F32(k)) = store.get("enc.1.k_proj") else {
            panic!()
        };
        assert_eq!((k.len(), k[0]), (64 * 32, (64 * 32) as f32));
        let Some(ConstData::F32(g)) = store.get("dec.1.cross_gate") else {
            panic!()
        };
        assert_eq!(g, &vec![1.0]);
        assert!(
            store.get("rope").is_none(),
            "tables are not checkpoint tensors"
        );
    }
}
