//! Passes: a flat, ordered list of named steps, each `Module -> Module` plus a rewrite of the
//! constants' data where values change. [`run_pipeline`] runs them in order and verifies after
//! each, so a broken pass is caught by name.
//!
//! Each pass works with or without data: without a [`ConstStore`] (snapshots, `--emit ir`) only
//! the module changes; with one, the data of every constant a pass creates is computed from the
//! data it replaces, which must be there.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::IrError;
use crate::module::{
    gate_scale, zc_norm_scale, ConstData, ConstDecl, ConstStore, Module, Op, Operand,
};
use crate::types::Storage;
use crate::verify::verify;

/// A pass: its name (as in `--print-after NAME`) and what it does.
pub struct Pass {
    pub name: &'static str,
    pub run: fn(Module, Option<&mut ConstStore>) -> Result<Module, PassError>,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PassError {
    #[error("pass {pass}: constant @{name} has no data of the declared type")]
    MissingData { pass: &'static str, name: String },
    #[error("pass {pass}: {message}")]
    Failed { pass: &'static str, message: String },
    #[error("after pass {pass}: {error}")]
    Verify { pass: &'static str, error: IrError },
}

/// The default pipeline, in order. Dead-weight elimination runs last so it also drops the
/// constants the earlier passes replaced.
pub const PIPELINE: &[Pass] = &[
    Pass {
        name: "fold-constants",
        run: fold_constants,
    },
    Pass {
        name: "fuse-norm-matmul",
        run: fuse_norm_matmul,
    },
    Pass {
        name: "dead-weight-elim",
        run: dead_weight_elim,
    },
];

/// Runs `passes` in order, verifying after each, and shows `observe` the module after each
/// (snapshots, `--print-after`). The input must already verify.
pub fn run_pipeline(
    mut module: Module,
    mut store: Option<&mut ConstStore>,
    passes: &[Pass],
    mut observe: impl FnMut(&str, &Module),
) -> Result<Module, PassError> {
    for pass in passes {
        module = (pass.run)(module, store.as_deref_mut())?;
        verify(&module).map_err(|error| PassError::Verify {
            pass: pass.name,
            error,
        })?;
        observe(pass.name, &module);
    }
    Ok(module)
}

/// Checks that `m` holds no op that only exists before the pipeline ([`Op::removed_by_pass`]):
/// what consumers of the pipeline's output (codegen) call before they start.
pub fn check_pipeline_ran(m: &Module) -> Result<(), IrError> {
    for f in &m.funcs {
        for inst in &f.body {
            if let Some(pass) = inst.op.removed_by_pass() {
                return Err(IrError::in_func(
                    &f.name,
                    Some(inst),
                    format!(
                        "`{}` is removed by the `{pass}` pass: run the pass pipeline \
                         (needle_ir::PIPELINE) before code generation",
                        inst.op.name()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// f32 data of `name`, or the error saying it is missing.
fn f32_data<'s>(
    store: &'s ConstStore,
    pass: &'static str,
    name: &str,
) -> Result<&'s [f32], PassError> {
    match store.get(name) {
        Some(ConstData::F32(v)) => Ok(v),
        _ => Err(PassError::MissingData {
            pass,
            name: name.to_string(),
        }),
    }
}

/// Declares `new` like `old` (right after it) with data `f(old's data)`, unless it exists.
fn derive_const(
    module: &mut Module,
    store: &mut Option<&mut ConstStore>,
    pass: &'static str,
    old: &str,
    new: &str,
    f: impl Fn(&[f32]) -> Vec<f32>,
) -> Result<(), PassError> {
    if module.const_decl(new).is_some() {
        return Ok(());
    }
    let Some(index) = module.consts.iter().position(|c| c.name == old) else {
        return Err(PassError::Failed {
            pass,
            message: format!("@{old} is not declared"),
        });
    };
    if let Some(store) = store.as_deref_mut() {
        let values = f(f32_data(store, pass, old)?);
        store.insert(new, ConstData::F32(values));
    }
    let decl = ConstDecl {
        name: new.to_string(),
        ..module.consts[index].clone()
    };
    module.consts.insert(index + 1, decl);
    Ok(())
}

/// `fold-constants`: precomputes what the ops would otherwise compute on every call from
/// constants alone: `sigmoid(gate)` of gated residuals (now `residual` with `@gate.sigmoid`) and
/// `1 + g` of ZCRMSNorm scales (now `rmsnorm` with `@scale.plus1`). New names, because the data
/// differs from the checkpoint tensor the old name maps to.
pub fn fold_constants(
    mut m: Module,
    mut store: Option<&mut ConstStore>,
) -> Result<Module, PassError> {
    const PASS: &str = "fold-constants";
    let mut funcs = std::mem::take(&mut m.funcs);
    for inst in funcs.iter_mut().flat_map(|f| f.body.iter_mut()) {
        match &inst.op {
            Op::GatedResidual { x, y, gate } => {
                let new = format!("{gate}.sigmoid");
                derive_const(&mut m, &mut store, PASS, gate, &new, |g| {
                    g.iter().map(|&g| gate_scale(g)).collect()
                })?;
                inst.op = Op::Residual {
                    x: x.clone(),
                    y: y.clone(),
                    scale: new,
                };
            }
            Op::ZcRmsNorm { x, scale } => {
                let new = format!("{scale}.plus1");
                derive_const(&mut m, &mut store, PASS, scale, &new, |g| {
                    g.iter().map(|&g| zc_norm_scale(g)).collect()
                })?;
                inst.op = Op::RmsNorm {
                    x: x.clone(),
                    scale: Some(new),
                };
            }
            _ => {}
        }
    }
    m.funcs = funcs;
    Ok(m)
}

/// `fuse-norm-matmul`: when an `rmsnorm %x, @s` (over rows of width D) feeds only matmuls with
/// weights used nowhere else, scale each weight's row i by `s[i]` (`@w.scaled`) and drop `@s`
/// from the norm: `(x/rms * s) @ W = (x/rms) @ (diag(s) W)`, one multiply less per element and
/// one pass less over x. Equal up to float rounding. Norms that feed anything else (RoPE'd
/// per-head norms, logits over the tied embedding) are left alone.
pub fn fuse_norm_matmul(
    mut m: Module,
    mut store: Option<&mut ConstStore>,
) -> Result<Module, PassError> {
    const PASS: &str = "fuse-norm-matmul";
    let uses = m.const_uses();
    let mut funcs = std::mem::take(&mut m.funcs);
    for f in &mut funcs {
        // Users of each value, by instruction index (returns count as a non-matmul use).
        let mut users: BTreeMap<String, Vec<Option<usize>>> = BTreeMap::new();
        for (i, inst) in f.body.iter().enumerate() {
            for o in inst.op.operands() {
                if let Operand::Value(v) = o {
                    users.entry(v).or_default().push(Some(i));
                }
            }
        }
        for r in &f.results {
            users.entry(r.clone()).or_default().push(None);
        }
        for n in 0..f.body.len() {
            let (
                Op::RmsNorm {
                    scale: Some(scale), ..
                },
                Some(out),
            ) = (&f.body[n].op, &f.body[n].result)
            else {
                continue;
            };
            if out.ty.shape.len() != 2 {
                continue;
            }
            let scale = scale.clone();
            let Some(user_list) = users.get(&out.name) else {
                continue;
            };
            let weights: Option<Vec<(usize, String)>> = user_list
                .iter()
                .map(|&u| match u.map(|i| &f.body[i].op) {
                    Some(Op::MatMul { x, w })
                        if *x == out.name
                            && uses.get(w) == Some(&1)
                            && m.const_decl(w).is_some_and(|c| c.storage == Storage::Plain) =>
                    {
                        u.map(|i| (i, w.clone()))
                    }
                    _ => None,
                })
                .collect();
            let Some(weights) = weights else { continue };
            for (i, w) in weights {
                let new = format!("{w}.scaled");
                let cols = m
                    .const_decl(&w)
                    .and_then(|c| c.ty.static_dims())
                    .and_then(|d| d.get(1).copied())
                    .unwrap_or(1)
                    .max(1);
                let s = match store.as_deref() {
                    Some(st) => f32_data(st, PASS, &scale)?.to_vec(),
                    None => Vec::new(),
                };
                derive_const(&mut m, &mut store, PASS, &w, &new, |wv| {
                    wv.chunks(cols)
                        .zip(&s)
                        .flat_map(|(row, &si)| row.iter().map(move |&v| v * si))
                        .collect()
                })?;
                f.body[i].op.rename_const(&w, &new);
            }
            if let Op::RmsNorm { scale, .. } = &mut f.body[n].op {
                *scale = None;
            }
        }
    }
    m.funcs = funcs;
    Ok(m)
}

/// `dead-weight-elim`: drops constants no op references (the contrastive head and `log_temp`,
/// which generation never uses, and whatever earlier passes replaced), and their data.
pub fn dead_weight_elim(
    mut m: Module,
    store: Option<&mut ConstStore>,
) -> Result<Module, PassError> {
    let used: BTreeSet<String> = m.const_uses().into_keys().collect();
    m.consts.retain(|c| used.contains(&c.name));
    if let Some(store) = store {
        store.data.retain(|name, _| used.contains(name));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_sample::SAMPLE;
    use crate::{parse, print};

    fn sample() -> Module {
        parse(SAMPLE).unwrap()
    }

    /// Data for every constant of the sample: value `i` of a tensor is `base + i`.
    fn sample_store(m: &Module) -> ConstStore {
        let mut store = ConstStore::default();
        for (k, c) in m.consts.iter().enumerate() {
            let n: usize = c.ty.static_dims().unwrap().iter().product();
            let data = match c.ty.elem {
                crate::ElemType::F32 => {
                    ConstData::F32((0..n).map(|i| (k + i) as f32 * 0.5).collect())
                }
                crate::ElemType::I32 => ConstData::I32(vec![5; n]),
                crate::ElemType::U8 => ConstData::U8(vec![1; n]),
            };
            store.insert(c.name.clone(), data);
        }
        store
    }

    fn f32s<'a>(store: &'a ConstStore, name: &str) -> &'a [f32] {
        match store.get(name) {
            Some(ConstData::F32(v)) => v,
            other => panic!("@{name}: {other:?}"),
        }
    }

    #[test]
    fn fold_constants_precomputes_gates_and_norm_scales() {
        let m = sample();
        let mut store = sample_store(&m);
        let out = fold_constants(m, Some(&mut store)).unwrap();
        crate::verify(&out).unwrap();
        let text = print(&out);
        assert!(
            !text.contains("gated_residual") && !text.contains("zcrmsnorm"),
            "{text}"
        );
        assert!(
            text.contains("%x2 = residual %x, %cat, @gate.sigmoid : f32[q+3,8]"),
            "{text}"
        );
        assert!(
            text.contains("%n = rmsnorm %x, @norm.plus1 : f32[q+3,8]"),
            "{text}"
        );
        // @gate is shared by both functions: one derived constant, declared right after it.
        assert_eq!(text.matches("const @gate.sigmoid").count(), 1);
        assert!(text.contains("const @gate : f32[] weight plain\nconst @gate.sigmoid"));
        let g = f32s(&store, "gate")[0];
        assert_eq!(f32s(&store, "gate.sigmoid"), [1.0 / (1.0 + (-g).exp())]);
        let plus1: Vec<f32> = f32s(&store, "norm").iter().map(|g| 1.0 + g).collect();
        assert_eq!(f32s(&store, "norm.plus1"), plus1);
    }

    #[test]
    fn fuse_norm_matmul_scales_single_use_weights_only() {
        let m = sample();
        let mut store = sample_store(&m);
        let m = fold_constants(m, Some(&mut store)).unwrap();
        let out = fuse_norm_matmul(m, Some(&mut store)).unwrap();
        crate::verify(&out).unwrap();
        let text = print(&out);
        // The encoder's norm feeds three matmuls with weights used once: fused.
        assert!(text.contains("%n = rmsnorm %x : f32[q+3,8]"), "{text}");
        assert!(text.contains("%q = matmul %n, @wq.scaled"), "{text}");
        // A per-head norm (rank 3) and the final norm, which feeds logits, stay.
        assert!(text.contains("%n = rmsnorm %qh0, @qn :"), "{text}");
        assert!(text.contains("%f = rmsnorm %y, @final.plus1"), "{text}");
        let (s, w, fused) = (
            f32s(&store, "norm.plus1"),
            f32s(&store, "wk"),
            f32s(&store, "wk.scaled"),
        );
        for (i, row) in fused.chunks(4).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                assert_eq!(v, w[i * 4 + j] * s[i]);
            }
        }
    }

    #[test]
    fn fuse_norm_matmul_leaves_shared_weights() {
        let text = SAMPLE.replacen("%o = matmul %cat, @dq", "%o = matmul %cat, @wq", 1);
        let m = fold_constants(parse(&text).unwrap(), None).unwrap();
        let out = fuse_norm_matmul(m, None).unwrap();
        let text = print(&out);
        assert!(text.contains("%n = rmsnorm %x, @norm.plus1"), "{text}");
        assert!(!text.contains(".scaled"), "{text}");
    }

    #[test]
    fn dead_weight_elim_drops_unreferenced_constants_and_their_data() {
        let m = sample();
        let mut store = sample_store(&m);
        let out = dead_weight_elim(m, Some(&mut store)).unwrap();
        assert!(out.const_decl("head").is_none());
        assert!(store.get("head").is_none());
        assert_eq!(out.consts.len(), sample().consts.len() - 1);
        store.check(&out).unwrap();
    }

    #[test]
    fn pipeline_records_each_pass_and_keeps_data_in_step() {
        let m = sample();
        let mut store = sample_store(&m);
        let mut seen = Vec::new();
        let out = run_pipeline(m, Some(&mut store), PIPELINE, |name, m| {
            seen.push(name.to_string());
            crate::verify(m).unwrap();
        })
        .unwrap();
        assert_eq!(
            seen,
            ["fold-constants", "fuse-norm-matmul", "dead-weight-elim"]
        );
        check_pipeline_ran(&out).unwrap();
        let e = check_pipeline_ran(&sample()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "in @encode_query, %n = zcrmsnorm: `zcrmsnorm` is removed by the `fold-constants` \
             pass: run the pass pipeline (needle_ir::PIPELINE) before code generation"
        );
        store.check(&out).unwrap();
        assert!(out.const_decl("norm").is_none() && out.const_decl("norm.plus1").is_none());
        // Without data, the module comes out the same.
        let ir_only = run_pipeline(sample(), None, PIPELINE, |_, _| {}).unwrap();
        assert_eq!(ir_only, out);
    }

    #[test]
    fn pipeline_names_the_pass_that_breaks_the_module_or_lacks_data() {
        fn drop_consts(mut m: Module, _: Option<&mut ConstStore>) -> Result<Module, PassError> {
            m.consts.clear();
            Ok(m)
        }
        let broken = [Pass {
            name: "drop-consts",
            run: drop_consts,
        }];
        let e = run_pipeline(sample(), None, &broken, |_, _| {}).unwrap_err();
        assert!(
            matches!(
                e,
                PassError::Verify {
                    pass: "drop-consts",
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("after pass drop-consts: in @encode_query"),
            "{e}"
        );

        let mut store = ConstStore::default();
        let e = run_pipeline(sample(), Some(&mut store), PIPELINE, |_, _| {}).unwrap_err();
        assert_eq!(
            e,
            PassError::MissingData {
                pass: "fold-constants",
                name: "norm".into()
            }
        );
    }
}
