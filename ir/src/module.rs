//! The IR's data structures: a module of dimension bounds, constants, workspace buffers and
//! functions whose bodies are straight-line SSA over model-level ops.

use std::collections::BTreeMap;

use crate::types::{ConstKind, ElemType, Expr, Storage, Sym, Type};

/// Entry point that encodes the query and fills the cross-attention K/V buffers.
pub const ENCODE_QUERY: &str = "encode_query";
/// Entry point that consumes one token at position `p` and returns the next one.
pub const DECODER_STEP: &str = "decoder_step";

/// A whole program: what runs at run time, with its constants referenced by name.
#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    /// Inclusive range of each symbol the module uses.
    pub dims: Vec<DimDecl>,
    pub consts: Vec<ConstDecl>,
    pub buffers: Vec<BufferDecl>,
    pub funcs: Vec<Function>,
}

/// `dim q in 0..=987`: the symbol's inclusive range. Workspace sizes use the maximum.
/// `q` and `p` are fixed by the lowering; `a`, the allowed-id count, ranges over `0..=V`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DimDecl {
    pub sym: Sym,
    pub min: i64,
    pub max: i64,
}

/// `const @enc.0.q_proj : f32[64,64] weight plain`: a named tensor whose data lives beside the
/// module in a [`ConstStore`], never in the text.
#[derive(Clone, Debug, PartialEq)]
pub struct ConstDecl {
    pub name: String,
    pub ty: Type,
    pub kind: ConstKind,
    pub storage: Storage,
}

/// `buffer $dec.0.self_k : f32[511,2,16]`: a region of the caller's workspace that lives across
/// entry-point calls (KV cache, cross-attention K/V). Static shape: its size is planned at build
/// time.
#[derive(Clone, Debug, PartialEq)]
pub struct BufferDecl {
    pub name: String,
    pub ty: Type,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    pub name: String,
    pub params: Vec<Param>,
    pub body: Vec<Inst>,
    /// Values returned, in order.
    pub results: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: String,
    pub ty: Type,
}

/// One instruction: `%name = op ... : type`, or a bare op with no result (`store`).
#[derive(Clone, Debug, PartialEq)]
pub struct Inst {
    pub result: Option<Param>,
    pub op: Op,
}

/// A tensor read by `attention` or `concat`, which accept any of the three.
#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    /// `%name`: an SSA value of this function.
    Value(String),
    /// `@name`: a constant.
    Const(String),
    /// `$name[..len]`: the first `len` rows of a workspace buffer.
    Buffer { name: String, len: Expr },
}

/// The model-level ops. Numerics follow spec section 2; what an op leaves implicit is fixed here:
/// norms use eps 1e-6 over the last axis, attention scales scores by `1/sqrt(head_dim)`.
/// Fields named `x`, `y`, `ids`... are SSA values; fields naming a constant are `@` names.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `embed @table, %ids, scale=S`: rows `table[ids]` times `S`. ids `i32[n]`, result `f32[n,D]`.
    Embed {
        table: String,
        ids: String,
        scale: f32,
    },
    /// `concat a, b, ...`: along the first axis.
    Concat { parts: Vec<Operand> },
    /// `matmul %x, @w`: `x @ w`, w stored `(in, out)`.
    MatMul { x: String, w: String },
    /// `reshape %x`: same rows, the rest re-split (heads split or merged); the result type says how.
    Reshape { x: String },
    /// `zcrmsnorm %x, @g`: `x / sqrt(mean(x^2) + 1e-6) * (1 + g)` over the last axis
    /// ([`zc_norm_scale`]). `fold-constants` rewrites it to `rmsnorm`; codegen never sees it.
    ZcRmsNorm { x: String, scale: String },
    /// `rmsnorm %x[, @s]`: `x / sqrt(mean(x^2) + 1e-6)`, times `s` when given.
    RmsNorm { x: String, scale: Option<String> },
    /// `rope %x, @table, start=E`: x `[n, heads, h]`; row `i` is rotated by table row `E + i`
    /// (table row `r` = `[cos(r f_0..), sin(r f_0..)]`, spec section 2).
    Rope {
        x: String,
        table: String,
        start: Expr,
    },
    /// `attention %q, (k, v), (k, v)...`: softmax over the keys of every listed block together;
    /// every query row sees every key (masks are expressed by which blocks are listed).
    /// q `[n, H, h]`, each k/v `[m_i, K, h]`; query head `i` uses KV head `i / (H/K)`.
    Attention {
        q: String,
        kv: Vec<(Operand, Operand)>,
    },
    /// `store %v -> $buf[at..]`: writes v's rows at row `at` of a workspace buffer.
    Store {
        value: String,
        buffer: String,
        at: Expr,
    },
    /// `gated_residual %x, %y, @g`: `x + sigmoid(g) * y`, g a scalar ([`gate_scale`]).
    /// `fold-constants` rewrites it to `residual`; codegen never sees it.
    GatedResidual { x: String, y: String, gate: String },
    /// `residual %x, %y, @s`: `x + s * y`, s a scalar (a gated residual after fold-constants).
    Residual { x: String, y: String, scale: String },
    /// `logits %x, @table`: `x @ table^T` (tied embedding).
    Logits { x: String, table: String },
    /// `argmax_masked %logits, %allowed`: per row of logits `f32[n, V]`, the id of the largest
    /// logit among the ids listed in `allowed : i32[a]` (the grammar's allowed ids, ascending),
    /// ties to the lowest id, a NaN counting as the largest (as numpy's argmax). Ids outside
    /// `0..V` are skipped; when every listed id is, the result is -1. An empty list (`a = 0`)
    /// is an unconstrained step: the first maximum over every id. This is what the library runs:
    /// its step takes the list as `(allowed, n_allowed)` and never sees a `u8[V]` mask, so steps
    /// with few allowed ids (sparse logits) or one (a forced token) can be told from the list.
    ArgmaxMasked { logits: String, allowed: String },
}

/// The factor a `zcrmsnorm` scale `g` multiplies its column by: `1 + g` (zero-centred, so a
/// scale of zero is the identity). The one definition the interpreter and `fold-constants` use.
pub fn zc_norm_scale(g: f32) -> f32 {
    1.0 + g
}

/// The factor a `gated_residual` gate `g` multiplies `y` by: `sigmoid(g)`, computed as the
/// reference does in float32. The one definition the interpreter and `fold-constants` use.
pub fn gate_scale(g: f32) -> f32 {
    1.0 / (1.0 + (-g).exp())
}

impl Op {
    /// The op's name in the text format.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Embed { .. } => "embed",
            Op::Concat { .. } => "concat",
            Op::MatMul { .. } => "matmul",
            Op::Reshape { .. } => "reshape",
            Op::ZcRmsNorm { .. } => "zcrmsnorm",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::Store { .. } => "store",
            Op::GatedResidual { .. } => "gated_residual",
            Op::Residual { .. } => "residual",
            Op::Logits { .. } => "logits",
            Op::ArgmaxMasked { .. } => "argmax_masked",
        }
    }

    /// Every operand in text order, as generic operands (for use counts and def-use checks).
    pub fn operands(&self) -> Vec<Operand> {
        let v = |s: &String| Operand::Value(s.clone());
        let c = |s: &String| Operand::Const(s.clone());
        match self {
            Op::Embed { table, ids, .. } => vec![c(table), v(ids)],
            Op::Concat { parts } => parts.clone(),
            Op::MatMul { x, w } => vec![v(x), c(w)],
            Op::Reshape { x } => vec![v(x)],
            Op::ZcRmsNorm { x, scale } => vec![v(x), c(scale)],
            Op::RmsNorm { x, scale } => std::iter::once(v(x)).chain(scale.iter().map(c)).collect(),
            Op::Rope { x, table, .. } => vec![v(x), c(table)],
            Op::Attention { q, kv } => std::iter::once(v(q))
                .chain(kv.iter().flat_map(|(k, val)| [k.clone(), val.clone()]))
                .collect(),
            Op::Store { value, .. } => vec![v(value)],
            Op::GatedResidual { x, y, gate } => vec![v(x), v(y), c(gate)],
            Op::Residual { x, y, scale } => vec![v(x), v(y), c(scale)],
            Op::Logits { x, table } => vec![v(x), c(table)],
            Op::ArgmaxMasked { logits, allowed } => vec![v(logits), v(allowed)],
        }
    }

    /// The pass that removes this op, for ops that exist only before the pipeline (the
    /// checkpoint's parametrization, which codegen does not implement); `None` for the rest.
    pub fn removed_by_pass(&self) -> Option<&'static str> {
        match self {
            Op::ZcRmsNorm { .. } | Op::GatedResidual { .. } => Some("fold-constants"),
            _ => None,
        }
    }

    /// Renames every reference to constant `from` (passes that replace a constant's data).
    pub fn rename_const(&mut self, from: &str, to: &str) {
        let fix = |s: &mut String| {
            if s == from {
                *s = to.to_string();
            }
        };
        let fix_operand = |o: &mut Operand| {
            if let Operand::Const(s) = o {
                fix(s);
            }
        };
        match self {
            Op::Embed { table, .. } | Op::Logits { table, .. } | Op::Rope { table, .. } => {
                fix(table)
            }
            Op::MatMul { w, .. } => fix(w),
            Op::ZcRmsNorm { scale, .. } | Op::Residual { scale, .. } => fix(scale),
            Op::RmsNorm { scale, .. } => scale.iter_mut().for_each(fix),
            Op::GatedResidual { gate, .. } => fix(gate),
            Op::Concat { parts } => parts.iter_mut().for_each(fix_operand),
            Op::Attention { kv, .. } => kv.iter_mut().for_each(|(k, v)| {
                fix_operand(k);
                fix_operand(v);
            }),
            Op::Reshape { .. } | Op::Store { .. } | Op::ArgmaxMasked { .. } => {}
        }
    }
}

impl Module {
    pub fn func(&self, name: &str) -> Option<&Function> {
        self.funcs.iter().find(|f| f.name == name)
    }

    pub fn const_decl(&self, name: &str) -> Option<&ConstDecl> {
        self.consts.iter().find(|c| c.name == name)
    }

    pub fn buffer(&self, name: &str) -> Option<&BufferDecl> {
        self.buffers.iter().find(|b| b.name == name)
    }

    /// Inclusive range of a symbol; an undeclared one is pinned at 0 (the verifier reports it).
    pub fn dim_bounds(&self, sym: Sym) -> (i64, i64) {
        self.dims
            .iter()
            .find(|d| d.sym == sym)
            .map_or((0, 0), |d| (d.min, d.max))
    }

    /// How many times each constant is referenced across all functions.
    pub fn const_uses(&self) -> BTreeMap<String, usize> {
        let mut uses = BTreeMap::new();
        for inst in self.funcs.iter().flat_map(|f| &f.body) {
            for o in inst.op.operands() {
                if let Operand::Const(name) = o {
                    *uses.entry(name).or_insert(0) += 1;
                }
            }
        }
        uses
    }

    /// Bytes of workspace the buffers take (each at its static size).
    pub fn buffer_bytes(&self) -> usize {
        self.buffers
            .iter()
            .map(|b| {
                let n: usize = b.ty.static_dims().unwrap_or_default().iter().product();
                n * b.ty.elem.size()
            })
            .sum()
    }
}

/// The data of one constant, row-major, in its logical element type.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstData {
    F32(Vec<f32>),
    I32(Vec<i32>),
    U8(Vec<u8>),
}

impl ConstData {
    pub fn elem(&self) -> ElemType {
        match self {
            ConstData::F32(_) => ElemType::F32,
            ConstData::I32(_) => ElemType::I32,
            ConstData::U8(_) => ElemType::U8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            ConstData::F32(v) => v.len(),
            ConstData::I32(v) => v.len(),
            ConstData::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The constants' data, by name, beside a module. The compiler fills it (checkpoint slices,
/// folded K/V, tables); passes that change a constant's values rewrite it here.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConstStore {
    pub data: BTreeMap<String, ConstData>,
}

impl ConstStore {
    pub fn insert(&mut self, name: impl Into<String>, data: ConstData) {
        self.data.insert(name.into(), data);
    }

    pub fn get(&self, name: &str) -> Option<&ConstData> {
        self.data.get(name)
    }

    /// Checks that every declared constant has data of its type and size, and nothing more.
    pub fn check(&self, module: &Module) -> Result<(), String> {
        for c in &module.consts {
            let Some(data) = self.data.get(&c.name) else {
                return Err(format!("constant @{} has no data", c.name));
            };
            let dims = c.ty.static_dims().unwrap_or_default();
            let want: usize = dims.iter().product();
            if data.elem() != c.ty.elem || data.len() != want {
                return Err(format!(
                    "constant @{} is declared {} but its data is {} x {}",
                    c.name,
                    c.ty,
                    data.len(),
                    data.elem().name()
                ));
            }
        }
        if let Some(extra) = self.data.keys().find(|k| module.const_decl(k).is_none()) {
            return Err(format!(
                "data for @{extra}, which the module does not declare"
            ));
        }
        Ok(())
    }
}
