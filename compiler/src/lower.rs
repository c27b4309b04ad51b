//! Lowering: from a model config and the fold mode to the IR (`needle_ir`) of what runs at run
//! time. The tools side is fixed at build time; here it is only a length (`n_tool_tokens`) and,
//! in folded mode, constants that folding precomputes.
//!
//! # The program
//!
//! - `encode_query(%query: i32[q])` runs the encoder and stores, for every decoder layer, the
//!   cross-attention K/V of the encoder output in workspace buffers `$cross.{l}.k/v`.
//! - `decoder_step(%token: i32[1], %allowed: i32[a]) -> i32[1]` consumes the token at position
//!   `p` (0 for the initial EOS), appends its self-attention K/V to `$dec.{l}.self_k/v` at row
//!   `p`, attends over rows `..p+1` and over the cross K/V, and returns the argmax among the `a`
//!   allowed ids (all ids when `a` is 0).
//!
//! # Exact mode (`FoldMode::None`)
//!
//! The prompt `query ++ <tools> ++ tool tokens` is embedded and encoded at run time; the tools
//! part is the constant `@prompt.tools` (`<tools>` first). RoPE positions are `0..q+S`, as in the
//! reference.
//!
//! # Folded mode (`FoldMode::Tools`, spec section 6)
//!
//! Tool positions attend only to tool positions, so their states do not depend on the query, and
//! since RoPE scores depend only on position differences, not on the query's length either. Only
//! the `q` query rows run; in each encoder layer they attend to their own K/V and to the tools
//! side's constant K/V `@fold.enc.{l}.k/v`, and the decoder's cross-attention sees the query rows'
//! K/V (`$cross.{l}.*`) plus the constant `@fold.dec.{l}.cross_k/v`.
//!
//! Positions: the tools side sits at the fixed absolute positions `Q..Q+S`, where `Q` is the
//! largest query length `q_max`, and the query at `Q-q..Q` (right before it). Every difference
//! of positions is then the reference's (query at `0..q`, tools at `q..q+S`), the folded
//! constants are computed once at positions that do not depend on `q` (for the longest query
//! they are exactly the reference's positions), and every position is non-negative, so one RoPE
//! table indexed by position serves everything. `@fold.enc.{l}.k` is stored after `k_norm` and
//! after RoPE at those positions (no run-time rotation of constants); V and the cross K/V (no
//! RoPE in cross-attention; cross K after `k_norm`) are stored as attention uses them.
//!
//! # Lengths
//!
//! The reference cuts the query to 1022 tokens and then the tools to fit 1024 in all. Folding
//! needs the whole tools side, so the query's maximum here is `min(max_query_tokens, 1022,
//! 1024 - S)`: for a long tool list, a query longer than that must be cut by the driver where the
//! reference would cut the tools instead. Both modes use the same bound, so they agree on it.
//!
//! # Constant names
//!
//! Constants are declared by the names of [`crate::const_names`], which says what each stands
//! for; [`crate::materialize`] fills their data after lowering.

use needle_ir::{
    BufferDecl, ConstDecl, ConstKind, DimDecl, ElemType, Expr, Function, Inst, Module, Op, Operand,
    Param, Storage, Sym, Type, DECODER_STEP, ENCODE_QUERY,
};
use needle_runtime::config::Config;
use needle_runtime::decode::{check_tools_fit, ENCODER_BUDGET, MAX_DECODE_STEPS, MAX_QUERY_TOKENS};

use crate::const_names::checkpoint_weights;

/// Whether the tools side of the encoder is computed at build time (`--fold tools`) or run
/// (`--fold none`): the runtime's notion, so `needlec run` and `needlec build` agree on it.
pub use needle_runtime::decode::FoldMode;

/// The sizes every part of the lowering shares, from the config and the call.
struct Dims {
    d: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    /// Tools-side length: `<tools>` and the tool tokens.
    tools_side: usize,
    /// The query's maximum length.
    q_max: usize,
    /// The most decoder steps a call runs (`max_gen_len - 1`): the self K/V caches' rows.
    steps_max: usize,
    fold: FoldMode,
}

impl Dims {
    /// Encoder rows at run time: `q+S` exact, `q` folded.
    fn enc_rows(&self) -> Expr {
        match self.fold {
            FoldMode::None => q().checked_add(lit(self.tools_side)).unwrap_or_default(),
            FoldMode::Tools => q(),
        }
    }

    /// Rows of the cross K/V buffers, at their largest.
    fn cross_rows_max(&self) -> usize {
        match self.fold {
            FoldMode::None => self.q_max + self.tools_side,
            FoldMode::Tools => self.q_max,
        }
    }

    /// RoPE position of the first encoder row: 0 exact, `q_max - q` folded (see module docs).
    fn enc_rope_start(&self) -> Expr {
        match self.fold {
            FoldMode::None => lit(0),
            FoldMode::Tools => Expr::lit(self.q_max as i64).with_coeff(Sym::Q, -1),
        }
    }

    /// Positions the RoPE table must cover: the encoder's (folded: the query's only; the tools
    /// side is rotated at build time) and the decoder's.
    fn rope_rows(&self) -> usize {
        let enc = match self.fold {
            FoldMode::None => self.q_max + self.tools_side,
            FoldMode::Tools => self.q_max,
        };
        enc.max(MAX_DECODE_STEPS)
    }

    /// `[rows, heads, head_dim]`.
    fn heads_ty(&self, rows: Expr, heads: usize) -> Type {
        Type::f32(vec![rows, lit(heads), lit(self.head_dim)])
    }
}

fn q() -> Expr {
    Expr::sym(Sym::Q)
}

fn lit(n: usize) -> Expr {
    Expr::lit(n as i64)
}

/// Lowers the model to the IR. `n_tool_tokens` counts the tool list's tokens (the `<tools>`
/// token not included); `max_query_tokens` is the query's cut (1022 in the reference).
///
/// # Panics
///
/// If the config is not valid (`Config::validate`), or the tools side leaves no room for a query
/// (`decode::check_tools_fit`): the caller checks both first.
pub fn lower(
    config: &Config,
    fold: FoldMode,
    n_tool_tokens: usize,
    max_query_tokens: usize,
) -> Module {
    lower_for_steps(
        config,
        fold,
        n_tool_tokens,
        max_query_tokens,
        MAX_DECODE_STEPS,
    )
}

/// [`lower`] for calls of at most `max_decode_steps` decoder steps (`--max-gen-len` - 1, at
/// most [`MAX_DECODE_STEPS`]): the decoder's positions, and so its K/V caches, stop there.
///
/// # Panics
///
/// As [`lower`], and if `max_decode_steps` is 0 or above [`MAX_DECODE_STEPS`].
pub fn lower_for_steps(
    config: &Config,
    fold: FoldMode,
    n_tool_tokens: usize,
    max_query_tokens: usize,
    max_decode_steps: usize,
) -> Module {
    assert!(
        (1..=MAX_DECODE_STEPS).contains(&max_decode_steps),
        "lower needs 1..={MAX_DECODE_STEPS} decoder steps, got {max_decode_steps}"
    );
    assert!(
        config.validate().is_ok(),
        "lower needs a valid config: {:?}",
        config.validate()
    );
    if let Err(e) = check_tools_fit(n_tool_tokens) {
        panic!("lower needs a tool list that fits: {e}");
    }
    let tools_side = n_tool_tokens + 1;
    let dims = Dims {
        d: config.d_model,
        heads: config.num_heads,
        kv_heads: config.num_kv_heads,
        head_dim: config.head_dim(),
        vocab: config.vocab_size,
        tools_side,
        q_max: max_query_tokens
            .min(MAX_QUERY_TOKENS)
            .min(ENCODER_BUDGET - tools_side),
        steps_max: max_decode_steps,
        fold,
    };
    let mut consts: Vec<ConstDecl> = checkpoint_weights(config)
        .into_iter()
        .map(|w| ConstDecl {
            name: w.name,
            ty: Type::fixed(ElemType::F32, &w.shape),
            kind: ConstKind::Weight,
            storage: Storage::Plain,
        })
        .collect();
    let mut declare = |name: String, ty: Type, kind: ConstKind| {
        consts.push(ConstDecl {
            name,
            ty,
            kind,
            storage: Storage::Plain,
        })
    };
    declare(
        "rope".into(),
        Type::fixed(ElemType::F32, &[dims.rope_rows(), dims.head_dim]),
        ConstKind::RopeTable,
    );
    let kv_block = dims.heads_ty(lit(tools_side), dims.kv_heads);
    match fold {
        FoldMode::None => declare(
            "prompt.tools".into(),
            Type::fixed(ElemType::I32, &[tools_side]),
            ConstKind::ToolTokens,
        ),
        FoldMode::Tools => {
            for l in 0..config.num_encoder_layers {
                for kv in ["k", "v"] {
                    declare(
                        format!("fold.enc.{l}.{kv}"),
                        kv_block.clone(),
                        ConstKind::FoldedKv,
                    );
                }
            }
            for l in 0..config.num_decoder_layers {
                for kv in ["cross_k", "cross_v"] {
                    declare(
                        format!("fold.dec.{l}.{kv}"),
                        kv_block.clone(),
                        ConstKind::FoldedKv,
                    );
                }
            }
        }
    }

    let mut buffers = Vec::new();
    for l in 0..config.num_decoder_layers {
        for (name, rows) in [
            (format!("cross.{l}.k"), dims.cross_rows_max()),
            (format!("cross.{l}.v"), dims.cross_rows_max()),
            (format!("dec.{l}.self_k"), dims.steps_max),
            (format!("dec.{l}.self_v"), dims.steps_max),
        ] {
            let ty = Type::fixed(ElemType::F32, &[rows, dims.kv_heads, dims.head_dim]);
            buffers.push(BufferDecl { name, ty });
        }
    }

    Module {
        dims: vec![
            DimDecl {
                sym: Sym::Q,
                min: 0,
                max: dims.q_max as i64,
            },
            DimDecl {
                sym: Sym::P,
                min: 0,
                max: dims.steps_max as i64 - 1,
            },
            DimDecl {
                sym: Sym::A,
                min: 0,
                max: dims.vocab as i64,
            },
        ],
        consts,
        buffers,
        funcs: vec![encode_query(config, &dims), decoder_step(config, &dims)],
    }
}

/// Appends instructions to a function body, naming results readably (`%e0.q`, `%d1.cross.att`).
struct Builder {
    body: Vec<Inst>,
}

impl Builder {
    fn op(&mut self, name: impl Into<String>, ty: Type, op: Op) -> String {
        let name = name.into();
        self.body.push(Inst {
            result: Some(Param {
                name: name.clone(),
                ty,
            }),
            op,
        });
        name
    }

    fn store(&mut self, value: &str, buffer: String, at: Expr) {
        self.body.push(Inst {
            result: None,
            op: Op::Store {
                value: value.to_string(),
                buffer,
                at,
            },
        });
    }

    /// `x @ w`, split into `heads` heads: `[rows, heads, head_dim]`.
    fn project_heads(
        &mut self,
        dims: &Dims,
        x: &str,
        rows: Expr,
        w: String,
        heads: usize,
        name: &str,
    ) -> String {
        let flat = self.op(
            name,
            Type::f32(vec![rows, lit(heads * dims.head_dim)]),
            Op::MatMul {
                x: x.to_string(),
                w,
            },
        );
        self.op(
            format!("{name}h"),
            dims.heads_ty(rows, heads),
            Op::Reshape { x: flat },
        )
    }

    /// Attention of `q` over the `kv` blocks, heads merged, the output projection, and the gated
    /// residual onto `x`: what every attention sublayer ends with. Returns the new `[rows, D]`.
    #[allow(clippy::too_many_arguments)]
    fn attend_residual(
        &mut self,
        dims: &Dims,
        prefix: &str,
        q: String,
        kv: Vec<(Operand, Operand)>,
        rows: Expr,
        out_proj: String,
        x: String,
        out: String,
        gate: String,
    ) -> String {
        let att = self.op(
            format!("{prefix}.att"),
            dims.heads_ty(rows, dims.heads),
            Op::Attention { q, kv },
        );
        let ty = Type::f32(vec![rows, lit(dims.d)]);
        let cat = self.op(format!("{prefix}.cat"), ty.clone(), Op::Reshape { x: att });
        let o = self.op(
            format!("{prefix}.o"),
            ty.clone(),
            Op::MatMul {
                x: cat,
                w: out_proj,
            },
        );
        self.op(out, ty, Op::GatedResidual { x, y: o, gate })
    }

    fn norm(&mut self, name: impl Into<String>, x: &str, ty: Type, scale: String) -> String {
        self.op(
            name,
            ty,
            Op::ZcRmsNorm {
                x: x.to_string(),
                scale,
            },
        )
    }
}

/// One self-attention sublayer's query, key and value heads after QK-norm and RoPE.
struct SelfAttn {
    q: String,
    k: String,
    v: String,
}

/// `norm -> q/k/v projections -> QK-norm -> RoPE` for `rows` rows starting at position `start`.
/// `w` names the weights: `w("q_proj")` etc.
fn self_attn_inputs(
    b: &mut Builder,
    dims: &Dims,
    x: &str,
    rows: Expr,
    start: Expr,
    w: &dyn Fn(&str) -> String,
    prefix: &str,
) -> SelfAttn {
    let qh_ty = dims.heads_ty(rows, dims.heads);
    let kh_ty = dims.heads_ty(rows, dims.kv_heads);
    let qh = b.project_heads(
        dims,
        x,
        rows,
        w("q_proj"),
        dims.heads,
        &format!("{prefix}.q"),
    );
    let kh = b.project_heads(
        dims,
        x,
        rows,
        w("k_proj"),
        dims.kv_heads,
        &format!("{prefix}.k"),
    );
    let vh = b.project_heads(
        dims,
        x,
        rows,
        w("v_proj"),
        dims.kv_heads,
        &format!("{prefix}.v"),
    );
    let qn = b.norm(format!("{prefix}.qn"), &qh, qh_ty.clone(), w("q_norm"));
    let kn = b.norm(format!("{prefix}.kn"), &kh, kh_ty.clone(), w("k_norm"));
    let rope = |x: String| Op::Rope {
        x,
        table: "rope".into(),
        start,
    };
    let qr = b.op(format!("{prefix}.qr"), qh_ty, rope(qn));
    let kr = b.op(format!("{prefix}.kr"), kh_ty, rope(kn));
    SelfAttn {
        q: qr,
        k: kr,
        v: vh,
    }
}

fn encode_query(config: &Config, dims: &Dims) -> Function {
    let mut b = Builder { body: Vec::new() };
    let rows = dims.enc_rows();
    let ids = match dims.fold {
        FoldMode::None => b.op(
            "ids",
            Type::new(ElemType::I32, vec![rows]),
            Op::Concat {
                parts: vec![
                    Operand::Value("query".into()),
                    Operand::Const("prompt.tools".into()),
                ],
            },
        ),
        FoldMode::Tools => "query".to_string(),
    };
    let x_ty = Type::f32(vec![rows, lit(dims.d)]);
    let scale = (dims.d as f32).sqrt();
    let mut x = b.op(
        "x",
        x_ty.clone(),
        Op::Embed {
            table: "embedding".into(),
            ids,
            scale,
        },
    );
    for l in 0..config.num_encoder_layers {
        let p = format!("e{l}");
        let w = |s: &str| format!("enc.{l}.{s}");
        let n = b.norm(format!("{p}.n"), &x, x_ty.clone(), w("norm"));
        let a = self_attn_inputs(&mut b, dims, &n, rows, dims.enc_rope_start(), &w, &p);
        let mut kv = vec![(Operand::Value(a.k), Operand::Value(a.v))];
        if dims.fold == FoldMode::Tools {
            kv.push((
                Operand::Const(format!("fold.enc.{l}.k")),
                Operand::Const(format!("fold.enc.{l}.v")),
            ));
        }
        x = b.attend_residual(
            dims,
            &p,
            a.q,
            kv,
            rows,
            w("out_proj"),
            x,
            format!("{p}.x"),
            w("gate"),
        );
    }
    let enc = b.norm("enc", &x, x_ty, "enc.final_norm".into());
    // Cross-attention K/V depend only on the encoder output: computed once per query, here.
    for l in 0..config.num_decoder_layers {
        let p = format!("c{l}");
        let w = |s: &str| format!("dec.{l}.cross.{s}");
        let kh = b.project_heads(
            dims,
            &enc,
            rows,
            w("k_proj"),
            dims.kv_heads,
            &format!("{p}.k"),
        );
        let kn = b.norm(
            format!("{p}.kn"),
            &kh,
            dims.heads_ty(rows, dims.kv_heads),
            w("k_norm"),
        );
        let vh = b.project_heads(
            dims,
            &enc,
            rows,
            w("v_proj"),
            dims.kv_heads,
            &format!("{p}.v"),
        );
        b.store(&kn, format!("cross.{l}.k"), lit(0));
        b.store(&vh, format!("cross.{l}.v"), lit(0));
    }
    Function {
        name: ENCODE_QUERY.into(),
        params: vec![Param {
            name: "query".into(),
            ty: Type::new(ElemType::I32, vec![q()]),
        }],
        body: b.body,
        results: vec![],
    }
}

fn decoder_step(config: &Config, dims: &Dims) -> Function {
    let mut b = Builder { body: Vec::new() };
    let one = lit(1);
    let pos = Expr::sym(Sym::P);
    let x_ty = Type::f32(vec![one, lit(dims.d)]);
    let scale = (dims.d as f32).sqrt();
    let mut x = b.op(
        "x",
        x_ty.clone(),
        Op::Embed {
            table: "embedding".into(),
            ids: "token".into(),
            scale,
        },
    );
    let cross_rows = dims.enc_rows();
    for l in 0..config.num_decoder_layers {
        // Self-attention over the cache: this token's K/V first go to row p, then rows ..p+1
        // are exactly the causal window.
        let p = format!("d{l}.self");
        let w = |s: &str| format!("dec.{l}.self.{s}");
        let n = b.norm(
            format!("{p}.n"),
            &x,
            x_ty.clone(),
            format!("dec.{l}.self_norm"),
        );
        let a = self_attn_inputs(&mut b, dims, &n, one, pos, &w, &p);
        let (cache_k, cache_v) = (format!("dec.{l}.self_k"), format!("dec.{l}.self_v"));
        b.store(&a.k, cache_k.clone(), pos);
        b.store(&a.v, cache_v.clone(), pos);
        let window = pos.checked_add(one).unwrap_or_default();
        let kv = vec![(
            Operand::Buffer {
                name: cache_k,
                len: window,
            },
            Operand::Buffer {
                name: cache_v,
                len: window,
            },
        )];
        x = b.attend_residual(
            dims,
            &p,
            a.q,
            kv,
            one,
            w("out_proj"),
            x,
            format!("d{l}.h"),
            format!("dec.{l}.self_gate"),
        );

        // Cross-attention: no RoPE; keys are the encoder's, from the buffers (and constants).
        let p = format!("d{l}.cross");
        let w = |s: &str| format!("dec.{l}.cross.{s}");
        let n = b.norm(
            format!("{p}.n"),
            &x,
            x_ty.clone(),
            format!("dec.{l}.cross_norm"),
        );
        let qh = b.project_heads(dims, &n, one, w("q_proj"), dims.heads, &format!("{p}.q"));
        let qn = b.norm(
            format!("{p}.qn"),
            &qh,
            dims.heads_ty(one, dims.heads),
            w("q_norm"),
        );
        let mut kv = vec![(
            Operand::Buffer {
                name: format!("cross.{l}.k"),
                len: cross_rows,
            },
            Operand::Buffer {
                name: format!("cross.{l}.v"),
                len: cross_rows,
            },
        )];
        if dims.fold == FoldMode::Tools {
            kv.push((
                Operand::Const(format!("fold.dec.{l}.cross_k")),
                Operand::Const(format!("fold.dec.{l}.cross_v")),
            ));
        }
        x = b.attend_residual(
            dims,
            &p,
            qn,
            kv,
            one,
            w("out_proj"),
            x,
            format!("d{l}.x"),
            format!("dec.{l}.cross_gate"),
        );
    }
    let f = b.norm("f", &x, x_ty, "dec.final_norm".into());
    let logits = b.op(
        "logits",
        Type::f32(vec![one, lit(dims.vocab)]),
        Op::Logits {
            x: f,
            table: "embedding".into(),
        },
    );
    let next = b.op(
        "next",
        Type::new(ElemType::I32, vec![one]),
        Op::ArgmaxMasked {
            logits,
            allowed: "allowed".into(),
        },
    );
    Function {
        name: DECODER_STEP.into(),
        params: vec![
            Param {
                name: "token".into(),
                ty: Type::fixed(ElemType::I32, &[1]),
            },
            Param {
                name: "allowed".into(),
                ty: Type::new(ElemType::I32, vec![Expr::sym(Sym::A)]),
            },
        ],
        body: b.body,
        results: vec![next],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::const_names::{const_source, ConstSource, FoldedBlock};
    use needle_ir::{print, run_pipeline, verify, ConstData, ConstStore, PIPELINE};

    fn tiny() -> Config {
        crate::const_names::tiny_test_config()
    }

    const MODES: [FoldMode; 2] = [FoldMode::None, FoldMode::Tools];

    #[test]
    fn lowered_modules_verify_for_several_configs() {
        let configs = [tiny(), Config::default(), Config::full()];
        for config in &configs {
            for fold in MODES {
                for (tools, max_q) in [(36, 1022), (0, 1022), (1000, 1022), (36, 5)] {
                    let m = lower(config, fold, tools, max_q);
                    verify(&m).unwrap_or_else(|e| panic!("{fold:?} {tools} {max_q}: {e}"));
                    run_pipeline(m, None, PIPELINE, |_, _| {}).unwrap();
                }
            }
        }
    }

    #[test]
    fn the_query_bound_leaves_room_for_the_whole_tools_side() {
        let m = lower(&tiny(), FoldMode::Tools, 36, 1022);
        assert_eq!(m.dim_bounds(Sym::Q), (0, 1024 - 37));
        let m = lower(&tiny(), FoldMode::None, 0, 1022);
        assert_eq!(m.dim_bounds(Sym::Q), (0, 1022));
        let m = lower(&tiny(), FoldMode::None, 36, 100);
        assert_eq!(m.dim_bounds(Sym::Q), (0, 100));
    }

    #[test]
    #[should_panic(expected = "no room for a query")]
    fn a_tools_side_that_fills_the_encoder_is_refused() {
        lower(&tiny(), FoldMode::Tools, 1023, 1022);
    }

    #[test]
    fn every_constant_has_a_source() {
        let config = tiny();
        for fold in MODES {
            let m = lower(&config, fold, 36, 1022);
            for c in &m.consts {
                let source = const_source(&config, &c.name);
                assert!(source.is_some(), "@{} has no source", c.name);
            }
        }
        assert_eq!(
            const_source(&config, "fold.dec.1.cross_v"),
            Some(ConstSource::FoldedKv {
                block: FoldedBlock::CrossV,
                layer: 1
            })
        );
        assert_eq!(
            const_source(&config, "fold.enc.2.k"),
            None,
            "layer out of range"
        );
    }

    #[test]
    fn folded_encoder_attends_to_constants_and_rotates_the_query_before_the_tools() {
        let text = print(&lower(&tiny(), FoldMode::Tools, 36, 1022));
        assert!(
            text.contains("rope %e0.qn, @rope, start=987-q : f32[q,4,16]"),
            "{text}"
        );
        assert!(text.contains("attention %e0.qr, (%e0.kr, %e0.vh), (@fold.enc.0.k, @fold.enc.0.v)"));
        assert!(text.contains(
            "($cross.1.k[..q], $cross.1.v[..q]), (@fold.dec.1.cross_k, @fold.dec.1.cross_v)"
        ));
        assert!(!text.contains("prompt.tools"));
        let exact = print(&lower(&tiny(), FoldMode::None, 36, 1022));
        assert!(
            exact.contains("concat %query, @prompt.tools : i32[q+37]"),
            "{exact}"
        );
        assert!(!exact.contains("@fold."));
    }

    /// With data, the pipeline computes the derived constants and keeps the store in step.
    #[test]
    fn pipeline_rewrites_the_data_with_the_module() {
        let config = tiny();
        let m = lower(&config, FoldMode::Tools, 36, 1022);
        let mut store = ConstStore::default();
        for c in &m.consts {
            let n: usize = c.ty.static_dims().unwrap().iter().product();
            let data = match c.ty.elem {
                ElemType::F32 => ConstData::F32((0..n).map(|i| (i % 7) as f32 * 0.25).collect()),
                ElemType::I32 => ConstData::I32(vec![5; n]),
                ElemType::U8 => ConstData::U8(vec![1; n]),
            };
            store.insert(c.name.clone(), data);
        }
        store.check(&m).unwrap();
        let out = run_pipeline(m, Some(&mut store), PIPELINE, |_, _| {}).unwrap();
        store.check(&out).unwrap();
        // q_proj of encoder layer 0 was scaled by (1 + norm) row by row: row 1 of the norm is
        // 0.25, so row 1 of the weight (64 values from index 64) grew by 1.25.
        let Some(ConstData::F32(w)) = store.get("enc.0.q_proj.scaled") else {
            panic!()
        };
        assert_eq!(w[64], ((64 % 7) as f32 * 0.25) * 1.25);
        assert!(store.get("contrastive.proj").is_none());
        let Some(ConstData::F32(g)) = store.get("enc.1.gate.sigmoid") else {
            panic!()
        };
        assert_eq!(g, &vec![0.5]);
    }
}
