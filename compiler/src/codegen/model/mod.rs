//! The model code: the IR's `encode_query` and `decoder_step` as two generated functions that
//! call internal kernels ([`kernels`]) in the IR's order, with every tensor in the caller's
//! workspace.
//!
//! # Interface (what the driver calls)
//!
//! - `void encode_query(uint8_t *ws, const int32_t *ids, size_t q)`: the encoder over the query
//!   (exact mode: `query ++ @prompt.tools`, the tool ids coming from the embedded constant;
//!   folded: the query rows against the folded constants); leaves every decoder layer's
//!   cross-attention K/V in the workspace and records `q` there for the decoder. A `q` above
//!   [`ModelCode::max_query_tokens`] does nothing (the driver validates; this keeps a bad call
//!   memory-safe).
//! - `int32_t decoder_step(uint8_t *ws, int32_t token, size_t pos, const int32_t *allowed,
//!   size_t n_allowed)`: feeds `token` at `pos`, writes its self-attention K/V at row `pos` of the
//!   cache and attends over rows `..=pos`, leaves the logits at `ws + logits_offset`, and returns
//!   the argmax. Decoding state needs no reset: row `pos` is written before rows `..=pos` are
//!   read, so a new query's steps from `pos = 0` never see an earlier query's rows. Returns -1
//!   (computing nothing) when `pos >= max_positions` or `token` is not below the vocabulary.
//!
//! # Allowed ids instead of a mask
//!
//! The IR's `argmax_masked %logits, %allowed` takes a `u8[V]` mask. The driver's grammar yields
//! a sorted list of allowed ids instead, so codegen replaces the mask parameter by the pair
//! `(allowed, n_allowed)`: `allowed == NULL` (or an empty list, the all-zero mask that the IR
//! reads as unconstrained) takes the first maximum over every id, as numpy's argmax (NaN counts
//! as the maximum); otherwise the largest logit among the listed ids, ties to the lowest id.
//!
//! # Workspace
//!
//! `ws` (16-byte aligned) holds, at offsets fixed at build time: a 16-byte state word (`q`),
//! every IR buffer (cross K/V, self-attention caches) at its static size, the logits, then one
//! arena for the SSA values of whichever entry point runs (the two never run at once, so they
//! share it). Arena slots are planned per function by a linear scan over the straight-line
//! body: each value gets the space of its largest shape (the `q`/`p` bounds), `reshape` aliases
//! its input, norms, RoPE and residuals write over an input that dies there, and space is
//! reused once a value's last use has passed.

mod kernels;

use std::collections::HashMap;

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, Value};
use cranelift_module::{DataId, FuncId};
use needle_ir::{
    verify, ConstData, ConstStore, ElemType, Expr, Function, Module, Op, Operand, Storage, Sym,
    Type, DECODER_STEP, ENCODE_QUERY,
};

use crate::codegen::gen::{mem, Gen};
use crate::codegen::weights::{f16_is_exact, WeightFormat, WeightRef};
use crate::codegen::{CodegenError, KernelSet};
use crate::emit::CType;
use needle_runtime::quant::group_size;

/// What the driver needs to call the model code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelCode {
    /// `void encode_query(uint8_t *ws, const int32_t *ids, size_t q)`
    pub encode_query: FuncId,
    /// `int32_t decoder_step(uint8_t *ws, int32_t token, size_t pos, const int32_t *allowed,
    /// size_t n_allowed)`
    pub decoder_step: FuncId,
    /// Bytes the model needs at `ws` (its own region; the driver puts other regions after it).
    pub workspace_bytes: usize,
    /// Alignment `ws` needs (16 or more).
    pub workspace_align: usize,
    /// `f32[V]` logits of the last `decoder_step`, at `ws + logits_offset`.
    pub logits_offset: usize,
    /// The module's `q` bound.
    pub max_query_tokens: usize,
    /// Decoder positions `0..max_positions` (the module's `p` bound + 1).
    pub max_positions: usize,
}

const ALIGN: usize = 16;
/// The state word (`q` as a `size_t`) sits at the start of the workspace.
const STATE_OFFSET: usize = 0;

fn round_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

fn invalid(msg: impl Into<String>) -> CodegenError {
    CodegenError::Invalid(msg.into())
}

/// Defines the model's two entry points (and their kernels and data) in `ks`. `export` makes
/// the entry points part of the object's interface (tests); the library keeps them internal
/// and exports its driver instead.
pub fn define_model(
    ks: &mut KernelSet,
    module: &Module,
    store: &ConstStore,
    export: bool,
) -> Result<ModelCode, CodegenError> {
    verify(module).map_err(|e| invalid(format!("the IR module does not verify: {e}")))?;
    let enc = module
        .func(ENCODE_QUERY)
        .ok_or_else(|| invalid(format!("the module has no @{ENCODE_QUERY}")))?;
    let dec = module
        .func(DECODER_STEP)
        .ok_or_else(|| invalid(format!("the module has no @{DECODER_STEP}")))?;
    let (q_lo, q_hi) = module.dim_bounds(Sym::Q);
    let (p_lo, p_hi) = module.dim_bounds(Sym::P);
    if q_lo < 0 || p_lo < 0 || q_hi < 0 || p_hi < 0 {
        return Err(invalid("negative dimension bounds"));
    }
    let max_query_tokens = q_hi as usize;
    let max_positions = p_hi as usize + 1;

    // Fixed part of the layout: state, buffers, logits.
    let mut off = round_up(STATE_OFFSET + 16);
    let mut buffers = HashMap::new();
    for b in &module.buffers {
        let dims =
            b.ty.static_dims()
                .ok_or_else(|| invalid(format!("buffer ${} : {} is not static", b.name, b.ty)))?;
        let row_bytes = dims[1..].iter().product::<usize>() * b.ty.elem.size();
        let bytes = dims.iter().product::<usize>() * b.ty.elem.size();
        buffers.insert(b.name.clone(), (off, row_bytes));
        off = round_up(off + bytes);
    }
    let logits_ty = dec
        .body
        .iter()
        .find_map(|i| match (&i.op, &i.result) {
            (Op::Logits { .. }, Some(r)) => Some(r.ty.clone()),
            _ => None,
        })
        .ok_or_else(|| invalid(format!("@{DECODER_STEP} computes no logits")))?;
    let vocab = logits_ty
        .shape
        .get(1)
        .and_then(|e| e.as_static())
        .ok_or_else(|| invalid(format!("logits : {logits_ty} have no static vocabulary")))?
        as usize;
    let logits_offset = off;
    let logits_bytes = max_bytes(module, &logits_ty);
    let arena_start = round_up(off + logits_bytes);

    let mut cx = Cx {
        ks,
        m: module,
        store,
        data: HashMap::new(),
        weights: HashMap::new(),
        kernels: HashMap::new(),
        count: 0,
    };
    let layout = Layout {
        buffers,
        logits_offset,
        logits_bytes,
        arena_start,
    };
    let enc_plan = plan(&mut cx, &layout, enc, Entry::Encode)?;
    let dec_plan = plan(&mut cx, &layout, dec, Entry::Decode)?;
    let workspace_bytes = round_up(enc_plan.arena_end.max(dec_plan.arena_end));

    let ks = cx.ks;
    let encode_query = ks.declare_function(
        "model_encode_query",
        &[
            "Encodes the query (ids < vocabulary, q <= the query bound) and leaves the",
            "cross-attention K/V in ws.",
        ],
        &[
            (CType::U8Ptr, "ws"),
            (CType::ConstI32Ptr, "ids"),
            (CType::SizeT, "q"),
        ],
        CType::Void,
        export,
    )?;
    let decoder_step = ks.declare_function(
        "model_decoder_step",
        &[
            "Feeds token at position pos, leaves the logits in ws, returns the argmax among",
            "allowed[0..n_allowed] (all ids if allowed is NULL); -1 on a bad pos or token.",
        ],
        &[
            (CType::U8Ptr, "ws"),
            (CType::I32, "token"),
            (CType::SizeT, "pos"),
            (CType::ConstI32Ptr, "allowed"),
            (CType::SizeT, "n_allowed"),
        ],
        CType::I32,
        export,
    )?;
    let limits = Limits {
        max_query_tokens,
        max_positions,
        vocab,
    };
    emit_entry(ks, encode_query, &enc_plan, Entry::Encode, &limits)?;
    emit_entry(ks, decoder_step, &dec_plan, Entry::Decode, &limits)?;
    Ok(ModelCode {
        encode_query,
        decoder_step,
        workspace_bytes,
        workspace_align: ALIGN,
        logits_offset,
        max_query_tokens,
        max_positions,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Encode,
    Decode,
}

struct Layout {
    /// Buffer name -> (offset, bytes per row).
    buffers: HashMap<String, (usize, usize)>,
    logits_offset: usize,
    logits_bytes: usize,
    arena_start: usize,
}

struct Limits {
    max_query_tokens: usize,
    max_positions: usize,
    vocab: usize,
}

/// Bytes of a tensor of type `ty` at its largest (dimensions at their bounds).
fn max_bytes(m: &Module, ty: &Type) -> usize {
    let n: i128 = ty
        .shape
        .iter()
        .map(|e| e.range(|s| m.dim_bounds(s)).1.max(0))
        .product();
    usize::try_from(n).unwrap_or(usize::MAX / 2) * ty.elem.size()
}

/// The static product of the dimensions after the first.
fn row_elems(ty: &Type) -> Result<usize, CodegenError> {
    ty.shape[1..]
        .iter()
        .map(|e| e.as_static().map(|v| v as usize))
        .product::<Option<usize>>()
        .ok_or_else(|| invalid(format!("{ty}: only the first dimension may be dynamic")))
}

fn static_dim(ty: &Type, i: usize) -> Result<usize, CodegenError> {
    ty.shape
        .get(i)
        .and_then(|e| e.as_static())
        .map(|v| v as usize)
        .ok_or_else(|| invalid(format!("{ty}: dimension {i} must be static")))
}

/// A run-time argument of a kernel call.
#[derive(Clone, Debug)]
enum Arg {
    /// `ws + off`.
    Ws(usize),
    /// `ws + off + at * row_bytes`.
    WsRow {
        off: usize,
        at: Expr,
        row_bytes: usize,
    },
    /// The address of embedded data.
    Data(DataId),
    /// A parameter of the entry point.
    Param(usize),
    /// The product of the dimensions, times a constant.
    Count(Vec<Expr>, usize),
    /// A position or dimension.
    Dim(Expr),
    F32(f32),
}

struct Call {
    f: FuncId,
    args: Vec<Arg>,
}

struct Plan {
    calls: Vec<Call>,
    /// The call whose result the entry point returns.
    ret: Option<usize>,
    /// Where `decoder_step` puts its token (the IR's `%token : i32[1]`).
    token_slot: Option<usize>,
    arena_end: usize,
}

/// Module-wide codegen state: constants and kernels, each declared once.
struct Cx<'a> {
    ks: &'a mut KernelSet,
    m: &'a Module,
    store: &'a ConstStore,
    data: HashMap<String, DataId>,
    weights: HashMap<String, WeightRef>,
    kernels: HashMap<String, FuncId>,
    count: usize,
}

impl Cx<'_> {
    /// A fresh symbol name (C identifier) that still says what it is.
    fn symbol(&mut self, what: &str, name: &str) -> String {
        self.count += 1;
        let clean: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("model_{what}{}_{clean}", self.count)
    }

    fn values(&self, name: &str) -> Result<&ConstData, CodegenError> {
        // The data are the logical f32 values whatever the storage; weights encode them.
        self.storage(name)?;
        self.store
            .get(name)
            .ok_or_else(|| invalid(format!("@{name} has no data")))
    }

    fn storage(&self, name: &str) -> Result<Storage, CodegenError> {
        self.m
            .const_decl(name)
            .map(|d| d.storage)
            .ok_or_else(|| invalid(format!("@{name} is not declared")))
    }

    /// `values` (row-major `[k][n]`) embedded in `format`: the values, and the scales of an
    /// integer format.
    fn weight_data(
        &mut self,
        name: &str,
        k: usize,
        n: usize,
        values: &[f32],
        format: WeightFormat,
    ) -> Result<WeightRef, CodegenError> {
        let sym = self.symbol("w", name);
        let (data, scales) = if matches!(format, WeightFormat::F32 | WeightFormat::F32Panels) {
            let packed = format.layout(k, n, values);
            (self.ks.declare_f32_data(&sym, &packed)?, None)
        } else {
            let enc = format.encode(k, n, values);
            let data = self.ks.declare_rodata(&sym, enc.bytes, 16)?;
            let scales = match enc.scales {
                Some(sc) => Some(self.ks.declare_f32_data(&format!("{sym}_scales"), &sc)?),
                None => None,
            };
            (data, scales)
        };
        Ok(WeightRef {
            data,
            scales,
            k,
            n,
            format,
        })
    }

    fn f32_values(&self, name: &str) -> Result<&[f32], CodegenError> {
        match self.values(name)? {
            ConstData::F32(v) => Ok(v),
            _ => Err(invalid(format!("@{name} is not f32 data"))),
        }
    }

    /// Embedded data of constant `name` (f32, or i32 stored bit for bit).
    fn data(&mut self, name: &str) -> Result<DataId, CodegenError> {
        if let Some(&id) = self.data.get(name) {
            return Ok(id);
        }
        let values: Vec<f32> = match self.values(name)? {
            ConstData::F32(v) => v.clone(),
            // Same bytes as the i32s in the target's order: f32 bits pass through unchanged.
            ConstData::I32(v) => v.iter().map(|&i| f32::from_bits(i as u32)).collect(),
            ConstData::U8(_) => return Err(invalid(format!("@{name}: u8 constants unsupported"))),
        };
        let sym = self.symbol("c", name);
        let id = self.ks.declare_f32_data(&sym, &values)?;
        self.data.insert(name.to_string(), id);
        Ok(id)
    }

    /// Data derived at build time from a constant, declared once under `key`.
    fn derived(&mut self, key: &str, values: &[f32]) -> Result<DataId, CodegenError> {
        if let Some(&id) = self.data.get(key) {
            return Ok(id);
        }
        let sym = self.symbol("c", key);
        let id = self.ks.declare_f32_data(&sym, values)?;
        self.data.insert(key.to_string(), id);
        Ok(id)
    }

    /// A `[k][n]` matrix constant as weights.
    fn weight(&mut self, name: &str) -> Result<WeightRef, CodegenError> {
        if let Some(w) = self.weights.get(name) {
            return Ok(*w);
        }
        let ty = &self
            .m
            .const_decl(name)
            .ok_or_else(|| invalid(format!("@{name} is not declared")))?
            .ty;
        let (k, n) = (static_dim(ty, 0)?, static_dim(ty, 1)?);
        if ty.shape.len() != 2 || ty.elem != ElemType::F32 {
            return Err(invalid(format!("@{name} : {ty} is not an f32 matrix")));
        }
        let values = self.f32_values(name)?.to_vec();
        if values.len() != k * n {
            return Err(invalid(format!(
                "@{name}: {} values for {k}x{n}",
                values.len()
            )));
        }
        // Tables are read by rows: row-major, half where the storage says so (and loses
        // nothing), else float32.
        let format = match self.storage(name)? {
            Storage::F16 if f16_is_exact(&values) => WeightFormat::F16,
            Storage::Plain | Storage::F16 => WeightFormat::F32,
            s => {
                return Err(invalid(format!(
                    "@{name} is stored {s}, but it is read as a table (rows), which only \
                     plain and f16 storage support"
                )))
            }
        };
        let w = self.weight_data(name, k, n, &values, format)?;
        self.weights.insert(name.to_string(), w);
        Ok(w)
    }

    /// A `[k][n]` matrix constant as the right operand of matrix products: laid out in column
    /// panels ([`WeightFormat::F32Panels`]), declared once (apart from [`Cx::weight`]'s
    /// row-major copy, which only tables need).
    fn matmul_weight(&mut self, name: &str) -> Result<WeightRef, CodegenError> {
        let key = format!("matmul:{name}");
        if let Some(w) = self.weights.get(&key) {
            return Ok(*w);
        }
        let ty = &self
            .m
            .const_decl(name)
            .ok_or_else(|| invalid(format!("@{name} is not declared")))?
            .ty;
        let (k, n) = (static_dim(ty, 0)?, static_dim(ty, 1)?);
        if ty.shape.len() != 2 || ty.elem != ElemType::F32 {
            return Err(invalid(format!("@{name} : {ty} is not an f32 matrix")));
        }
        let values = self.f32_values(name)?;
        if values.len() != k * n {
            return Err(invalid(format!(
                "@{name}: {} values for {k}x{n}",
                values.len()
            )));
        }
        let format = match self.storage(name)? {
            Storage::Plain => WeightFormat::F32Panels,
            Storage::F16 if f16_is_exact(values) => WeightFormat::F16Panels,
            // Values that are not halves (or not finite) keep float32: nothing is lost.
            Storage::F16 => WeightFormat::F32Panels,
            Storage::I8 { group } | Storage::I4 { group } if group as usize != group_size(k) => {
                return Err(invalid(format!(
                    "@{name} is stored in groups of {group} rows; the reference's quantization \
                     groups {k} rows by {}",
                    group_size(k)
                )))
            }
            Storage::I8 { group } => WeightFormat::I8Panels {
                group: group as usize,
            },
            Storage::I4 { group } => WeightFormat::I4Panels {
                group: group as usize,
            },
        };
        let values = values.to_vec();
        let w = self.weight_data(name, k, n, &values, format)?;
        self.weights.insert(key, w);
        Ok(w)
    }

    /// The scalar value of a `f32[]` constant.
    fn scalar(&self, name: &str) -> Result<f32, CodegenError> {
        match self.f32_values(name)? {
            [v] => Ok(*v),
            _ => Err(invalid(format!("@{name} is not a scalar"))),
        }
    }

    fn kernel(
        &mut self,
        key: String,
        what: &str,
        make: impl FnOnce(&mut KernelSet, &str) -> Result<FuncId, CodegenError>,
    ) -> Result<FuncId, CodegenError> {
        if let Some(&f) = self.kernels.get(&key) {
            return Ok(f);
        }
        let sym = self.symbol("k_", what);
        let f = make(self.ks, &sym)?;
        self.kernels.insert(key, f);
        Ok(f)
    }
}

/// Where a value lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loc {
    /// An arena slot group (values sharing storage).
    Arena(usize),
    /// A pointer parameter of the entry point.
    Param(usize),
    Logits,
    /// The mask parameter, replaced by `(allowed, n_allowed)`.
    Allowed,
    /// The entry point's return value.
    Returned,
}

struct Val {
    loc: Loc,
    ty: Type,
}

struct Group {
    off: usize,
    size: usize,
    /// Index of the last instruction that reads it.
    last: usize,
    live: bool,
}

struct Planner<'p, 'a> {
    cx: &'p mut Cx<'a>,
    layout: &'p Layout,
    vals: HashMap<String, Val>,
    groups: Vec<Group>,
    last: HashMap<String, usize>,
    calls: Vec<Call>,
    arena_end: usize,
}

impl Planner<'_, '_> {
    /// The lowest free arena offset that fits `bytes`.
    fn alloc(&mut self, bytes: usize, last: usize) -> usize {
        let size = round_up(bytes.max(1));
        let mut live: Vec<(usize, usize)> = self
            .groups
            .iter()
            .filter(|g| g.live)
            .map(|g| (g.off, g.size))
            .collect();
        live.sort_unstable();
        let mut off = self.layout.arena_start;
        for (o, s) in live {
            if o >= off + size {
                break;
            }
            off = off.max(o + s);
        }
        self.arena_end = self.arena_end.max(off + size);
        self.groups.push(Group {
            off,
            size,
            last,
            live: true,
        });
        self.groups.len() - 1
    }

    fn last_use(&self, name: &str, def: usize) -> usize {
        self.last.get(name).copied().unwrap_or(def).max(def)
    }

    /// A fresh slot for result `name` of type `ty`, defined at instruction `i`.
    fn fresh(&mut self, name: &str, ty: &Type, i: usize) -> Loc {
        let bytes = max_bytes(self.cx.m, ty);
        let last = self.last_use(name, i);
        Loc::Arena(self.alloc(bytes, last))
    }

    /// The result's slot: `x`'s when `x` is an arena value that dies at `i` and is large
    /// enough (ops that may write over their input), else a fresh one.
    fn in_place(&mut self, name: &str, ty: &Type, x: &str, i: usize) -> Result<Loc, CodegenError> {
        let bytes = max_bytes(self.cx.m, ty);
        let last = self.last_use(name, i);
        if let Loc::Arena(g) = self.val(x)?.loc {
            let grp = &mut self.groups[g];
            if grp.live && grp.last <= i && grp.size >= bytes {
                grp.last = last;
                return Ok(Loc::Arena(g));
            }
        }
        Ok(self.fresh(name, ty, i))
    }

    fn val(&self, name: &str) -> Result<&Val, CodegenError> {
        self.vals
            .get(name)
            .ok_or_else(|| invalid(format!("%{name} is not defined")))
    }

    fn loc_arg(&self, loc: Loc, what: &str) -> Result<Arg, CodegenError> {
        match loc {
            Loc::Arena(g) => Ok(Arg::Ws(self.groups[g].off)),
            Loc::Param(i) => Ok(Arg::Param(i)),
            Loc::Logits => Ok(Arg::Ws(self.layout.logits_offset)),
            Loc::Allowed | Loc::Returned => {
                Err(invalid(format!("{what} cannot be read as a tensor here")))
            }
        }
    }

    fn ptr(&self, name: &str) -> Result<Arg, CodegenError> {
        self.loc_arg(self.val(name)?.loc, &format!("%{name}"))
    }

    fn ty(&self, name: &str) -> Result<Type, CodegenError> {
        Ok(self.val(name)?.ty.clone())
    }

    /// An `attention`/`concat` operand: its address and type (a buffer's rows cut to `len`).
    fn operand(&mut self, o: &Operand) -> Result<(Arg, Type), CodegenError> {
        match o {
            Operand::Value(n) => Ok((self.ptr(n)?, self.ty(n)?)),
            Operand::Const(n) => {
                let ty = self
                    .cx
                    .m
                    .const_decl(n)
                    .ok_or_else(|| invalid(format!("@{n} is not declared")))?
                    .ty
                    .clone();
                Ok((Arg::Data(self.cx.data(n)?), ty))
            }
            Operand::Buffer { name, len } => {
                let decl = self
                    .cx
                    .m
                    .buffer(name)
                    .ok_or_else(|| invalid(format!("${name} is not declared")))?;
                let mut ty = decl.ty.clone();
                ty.shape[0] = *len;
                let &(off, _) = self
                    .layout
                    .buffers
                    .get(name)
                    .ok_or_else(|| invalid(format!("${name} has no slot")))?;
                Ok((Arg::Ws(off), ty))
            }
        }
    }

    fn call(&mut self, f: FuncId, args: Vec<Arg>) {
        self.calls.push(Call { f, args });
    }

    fn copy_kernel(&mut self) -> Result<FuncId, CodegenError> {
        self.cx.kernel("copy".into(), "copy", kernels::copy_words)
    }

    fn residual_kernel(&mut self) -> Result<FuncId, CodegenError> {
        self.cx.kernel("residual".into(), "residual", |ks, n| {
            kernels::residual(ks, n)
        })
    }
}

/// Plans one entry point: its kernel calls and its arena.
fn plan(
    cx: &mut Cx<'_>,
    layout: &Layout,
    f: &Function,
    entry: Entry,
) -> Result<Plan, CodegenError> {
    // Last reader of each value; a reshape's readers read its input too.
    let mut last: HashMap<String, usize> = HashMap::new();
    for (i, inst) in f.body.iter().enumerate() {
        for o in inst.op.operands() {
            if let Operand::Value(n) = o {
                last.insert(n, i);
            }
        }
    }
    for inst in f.body.iter().rev() {
        if let (Op::Reshape { x }, Some(r)) = (&inst.op, &inst.result) {
            if let Some(&l) = last.get(&r.name) {
                let e = last.entry(x.clone()).or_insert(l);
                *e = (*e).max(l);
            }
        }
    }
    let mut p = Planner {
        cx,
        layout,
        vals: HashMap::new(),
        groups: Vec::new(),
        last,
        calls: Vec::new(),
        arena_end: layout.arena_start,
    };

    let mut token_slot = None;
    let param_names: Vec<(&str, &Type)> =
        f.params.iter().map(|x| (x.name.as_str(), &x.ty)).collect();
    match (entry, param_names.as_slice()) {
        (Entry::Encode, [(query, ty)])
            if ty.elem == ElemType::I32 && ty.shape == [Expr::sym(Sym::Q)] =>
        {
            p.vals.insert(
                query.to_string(),
                Val {
                    loc: Loc::Param(1),
                    ty: (*ty).clone(),
                },
            );
        }
        (Entry::Decode, [(token, tty), (allowed, aty)])
            if tty.elem == ElemType::I32
                && tty.shape == [Expr::lit(1)]
                && aty.elem == ElemType::U8
                && aty.shape.len() == 1 =>
        {
            let last = p.last_use(token, 0);
            let g = p.alloc(4, last);
            token_slot = Some(p.groups[g].off);
            p.vals.insert(
                token.to_string(),
                Val {
                    loc: Loc::Arena(g),
                    ty: (*tty).clone(),
                },
            );
            p.vals.insert(
                allowed.to_string(),
                Val {
                    loc: Loc::Allowed,
                    ty: (*aty).clone(),
                },
            );
        }
        _ => {
            return Err(invalid(format!(
                "@{} has unexpected parameters {:?}",
                f.name, param_names
            )))
        }
    }

    let mut ret = None;
    for (i, inst) in f.body.iter().enumerate() {
        let result = inst.result.as_ref();
        let res = |what: &str| {
            result.ok_or_else(|| invalid(format!("`{what}` in @{} has no result", f.name)))
        };
        let loc = match &inst.op {
            Op::Embed { table, ids, scale } => {
                let r = res("embed")?;
                let w = p.cx.weight(table)?;
                let scale = *scale;
                let k = p.cx.kernel(
                    format!("embed:{table}:{}", scale.to_bits()),
                    "embed",
                    |ks, n| kernels::embed(ks, n, &w, scale),
                )?;
                let loc = p.fresh(&r.name, &r.ty, i);
                let args = vec![
                    p.ptr(ids)?,
                    p.loc_arg(loc, "embed")?,
                    Arg::Count(vec![r.ty.shape[0]], 1),
                ];
                p.call(k, args);
                Some(loc)
            }
            Op::Concat { parts } => {
                let r = res("concat")?;
                if r.ty.elem.size() != 4 {
                    return Err(invalid(format!("concat of {}: 4-byte elements only", r.ty)));
                }
                let copy = p.copy_kernel()?;
                let loc = p.fresh(&r.name, &r.ty, i);
                let Arg::Ws(off) = p.loc_arg(loc, "concat")? else {
                    return Err(invalid("concat result outside the arena"));
                };
                let row = row_elems(&r.ty)?;
                let mut at = Expr::lit(0);
                for part in parts {
                    let (src, ty) = p.operand(part)?;
                    let args = vec![
                        Arg::WsRow {
                            off,
                            at,
                            row_bytes: row * 4,
                        },
                        src,
                        Arg::Count(vec![ty.shape[0]], row),
                    ];
                    p.call(copy, args);
                    at = at
                        .checked_add(ty.shape[0])
                        .ok_or_else(|| invalid("concat rows overflow"))?;
                }
                Some(loc)
            }
            Op::MatMul { x, w } => {
                let r = res("matmul")?;
                let wr = p.cx.matmul_weight(w)?;
                let k = p.cx.kernel(format!("matmul:{w}"), "matmul", |ks, n| {
                    kernels::matmul(ks, n, &wr)
                })?;
                let loc = p.fresh(&r.name, &r.ty, i);
                let args = vec![
                    p.ptr(x)?,
                    p.loc_arg(loc, "matmul")?,
                    Arg::Count(vec![r.ty.shape[0]], 1),
                ];
                p.call(k, args);
                Some(loc)
            }
            Op::Reshape { x } => {
                let loc = p.val(x)?.loc;
                if let Loc::Arena(g) = loc {
                    let r = res("reshape")?;
                    let l = p.last_use(&r.name, i);
                    let grp = &mut p.groups[g];
                    grp.last = grp.last.max(l);
                }
                Some(loc)
            }
            Op::ZcRmsNorm { x, scale }
            | Op::RmsNorm {
                x,
                scale: Some(scale),
            } => {
                let r = res("norm")?;
                let d = static_dim(&r.ty, r.ty.shape.len() - 1)?;
                let zero_centred = matches!(inst.op, Op::ZcRmsNorm { .. });
                let (key, data) = if zero_centred {
                    let plus1: Vec<f32> = p.cx.f32_values(scale)?.iter().map(|g| 1.0 + g).collect();
                    let key = format!("{scale}#plus1");
                    (key.clone(), p.cx.derived(&key, &plus1)?)
                } else {
                    (scale.clone(), p.cx.data(scale)?)
                };
                let k = p.cx.kernel(format!("norm:{d}:{key}"), "norm", |ks, n| {
                    kernels::rmsnorm(ks, n, d, Some(data))
                })?;
                norm_call(&mut p, k, x, r, i)?
            }
            Op::RmsNorm { x, scale: None } => {
                let r = res("norm")?;
                let d = static_dim(&r.ty, r.ty.shape.len() - 1)?;
                let k = p.cx.kernel(format!("norm:{d}"), "norm", |ks, n| {
                    kernels::rmsnorm(ks, n, d, None)
                })?;
                norm_call(&mut p, k, x, r, i)?
            }
            Op::Rope { x, table, start } => {
                let r = res("rope")?;
                let (heads, h) = (static_dim(&r.ty, 1)?, static_dim(&r.ty, 2)?);
                let t = p.cx.data(table)?;
                let k =
                    p.cx.kernel(format!("rope:{table}:{heads}:{h}"), "rope", |ks, n| {
                        kernels::rope(ks, n, t, heads, h)
                    })?;
                let loc = p.in_place(&r.name, &r.ty, x, i)?;
                let args = vec![
                    p.ptr(x)?,
                    p.loc_arg(loc, "rope")?,
                    Arg::Count(vec![r.ty.shape[0]], 1),
                    Arg::Dim(*start),
                ];
                p.call(k, args);
                Some(loc)
            }
            Op::Attention { q, kv } => {
                let r = res("attention")?;
                let (heads, h) = (static_dim(&r.ty, 1)?, static_dim(&r.ty, 2)?);
                let mut blocks = Vec::new();
                let mut keys_max = 0usize;
                for (k, v) in kv {
                    let (kp, kt) = p.operand(k)?;
                    let (vp, _) = p.operand(v)?;
                    keys_max += max_bytes(p.cx.m, &Type::f32(vec![kt.shape[0]])) / 4;
                    blocks.push((kp, vp, kt));
                }
                let kv_heads = static_dim(&blocks[0].2, 1)?;
                let nb = blocks.len();
                let k = p.cx.kernel(
                    format!("attn:{nb}:{heads}:{kv_heads}:{h}"),
                    "attention",
                    |ks, n| kernels::attention(ks, n, nb, heads, kv_heads, h),
                )?;
                let loc = p.fresh(&r.name, &r.ty, i);
                let facts = p.cx.ks.target().kernel_facts();
                let scratch = kernels::attention_scratch(&facts, keys_max);
                let scores = p.alloc(scratch * 4, i);
                let mut args = vec![
                    p.ptr(q)?,
                    p.loc_arg(loc, "attention")?,
                    Arg::Count(vec![r.ty.shape[0]], 1),
                    Arg::Ws(p.groups[scores].off),
                ];
                for (kp, vp, kt) in blocks {
                    args.extend([kp, vp, Arg::Count(vec![kt.shape[0]], 1)]);
                }
                p.call(k, args);
                Some(loc)
            }
            Op::Store { value, buffer, at } => {
                let copy = p.copy_kernel()?;
                let &(off, row_bytes) = layout
                    .buffers
                    .get(buffer)
                    .ok_or_else(|| invalid(format!("${buffer} has no slot")))?;
                let ty = p.ty(value)?;
                let args = vec![
                    Arg::WsRow {
                        off,
                        at: *at,
                        row_bytes,
                    },
                    p.ptr(value)?,
                    Arg::Count(vec![ty.shape[0]], row_elems(&ty)?),
                ];
                p.call(copy, args);
                None
            }
            Op::GatedResidual { x, y, gate: s } | Op::Residual { x, y, scale: s } => {
                let r = res("residual")?;
                let v = p.cx.scalar(s)?;
                // sigmoid as the reference computes it in float32.
                let s = if matches!(inst.op, Op::GatedResidual { .. }) {
                    1.0 / (1.0 + (-v).exp())
                } else {
                    v
                };
                let k = p.residual_kernel()?;
                let loc = p.in_place(&r.name, &r.ty, x, i)?;
                let args = vec![
                    p.ptr(x)?,
                    p.ptr(y)?,
                    p.loc_arg(loc, "residual")?,
                    Arg::Count(vec![r.ty.shape[0]], row_elems(&r.ty)?),
                    Arg::F32(s),
                ];
                p.call(k, args);
                Some(loc)
            }
            Op::Logits { x, table } => {
                let r = res("logits")?;
                if max_bytes(p.cx.m, &r.ty) > layout.logits_bytes {
                    return Err(invalid("more than one logits result"));
                }
                let w = p.cx.weight(table)?;
                let k = p.cx.kernel(format!("logits:{table}"), "logits", |ks, n| {
                    kernels::logits(ks, n, &w)
                })?;
                let args = vec![
                    p.ptr(x)?,
                    Arg::Ws(layout.logits_offset),
                    Arg::Count(vec![r.ty.shape[0]], 1),
                ];
                p.call(k, args);
                Some(Loc::Logits)
            }
            Op::ArgmaxMasked { logits, allowed } => {
                let r = res("argmax_masked")?;
                let lt = p.ty(logits)?;
                if entry != Entry::Decode
                    || p.val(allowed)?.loc != Loc::Allowed
                    || lt.shape.first() != Some(&Expr::lit(1))
                    || !f.results.contains(&r.name)
                {
                    return Err(invalid(
                        "argmax_masked must pick the returned token of one row of logits with \
                         the step's mask parameter",
                    ));
                }
                let vocab = static_dim(&lt, 1)?;
                let k = p.cx.kernel(format!("argmax:{vocab}"), "argmax", |ks, n| {
                    kernels::argmax(ks, n, vocab)
                })?;
                let args = vec![p.ptr(logits)?, Arg::Param(3), Arg::Param(4)];
                p.call(k, args);
                ret = Some(p.calls.len() - 1);
                Some(Loc::Returned)
            }
        };
        if let (Some(loc), Some(r)) = (loc, result) {
            p.vals.insert(
                r.name.clone(),
                Val {
                    loc,
                    ty: r.ty.clone(),
                },
            );
        }
        for g in p.groups.iter_mut() {
            if g.live && g.last <= i {
                g.live = false;
            }
        }
    }
    match (entry, ret, f.results.len()) {
        (Entry::Encode, None, 0) | (Entry::Decode, Some(_), 1) => {}
        _ => {
            return Err(invalid(format!(
                "@{} must return {}",
                f.name,
                if entry == Entry::Encode {
                    "nothing"
                } else {
                    "the argmax_masked token"
                }
            )))
        }
    }
    Ok(Plan {
        calls: p.calls,
        ret,
        token_slot,
        arena_end: p.arena_end,
    })
}

/// A norm over the last axis of `x` (rows = every other dimension), in place when it can.
fn norm_call(
    p: &mut Planner<'_, '_>,
    k: FuncId,
    x: &str,
    r: &needle_ir::Param,
    i: usize,
) -> Result<Option<Loc>, CodegenError> {
    let loc = p.in_place(&r.name, &r.ty, x, i)?;
    let rows = r.ty.shape[..r.ty.shape.len() - 1].to_vec();
    let args = vec![p.ptr(x)?, p.loc_arg(loc, "norm")?, Arg::Count(rows, 1)];
    p.call(k, args);
    Ok(Some(loc))
}

/// Defines an entry point: checks its arguments, then makes the planned calls.
fn emit_entry(
    ks: &mut KernelSet,
    id: FuncId,
    plan: &Plan,
    entry: Entry,
    limits: &Limits,
) -> Result<(), CodegenError> {
    let mut data: Vec<DataId> = Vec::new();
    let mut callees: Vec<FuncId> = Vec::new();
    for c in &plan.calls {
        if !callees.contains(&c.f) {
            callees.push(c.f);
        }
        for a in &c.args {
            if let Arg::Data(d) = a {
                if !data.contains(d) {
                    data.push(*d);
                }
            }
        }
    }
    ks.define_function(id, &data, &callees, |g, params, addrs, frefs| {
        let ws = params[0];
        let (q, p) = match entry {
            Entry::Encode => {
                let q = params[2];
                let bad = g.b.ins().icmp_imm_u(
                    IntCC::UnsignedGreaterThan,
                    q,
                    limits.max_query_tokens as i64,
                );
                g.if_then(bad, |g| g.ret(&[]));
                g.b.ins().store(mem(), q, ws, STATE_OFFSET as i32);
                let zero = g.iconst(0);
                (q, zero)
            }
            Entry::Decode => {
                let (token, pos) = (params[1], params[2]);
                let bad_pos = g.b.ins().icmp_imm_u(
                    IntCC::UnsignedGreaterThanOrEqual,
                    pos,
                    limits.max_positions as i64,
                );
                let bad_tok = g.b.ins().icmp_imm_u(
                    IntCC::UnsignedGreaterThanOrEqual,
                    token,
                    limits.vocab as i64,
                );
                let bad = g.b.ins().bor(bad_pos, bad_tok);
                g.if_then(bad, |g| {
                    let m1 = g.b.ins().iconst(types::I32, -1);
                    g.ret(&[m1]);
                });
                // The recorded q, bounded so that a step without a query stays in bounds.
                let pt = g.ptr;
                let q = g.b.ins().load(pt, mem(), ws, STATE_OFFSET as i32);
                let qmax = g.iconst(limits.max_query_tokens as i64);
                let over = g.icmp(IntCC::UnsignedGreaterThan, q, qmax);
                let q = g.b.ins().select(over, qmax, q);
                if let Some(slot) = plan.token_slot {
                    g.b.ins().store(mem(), token, ws, slot as i32);
                }
                (q, pos)
            }
        };
        let eval = |g: &mut Gen<'_>, e: &Expr| -> Value {
            let mut v = g.iconst(e.offset);
            for (coeff, sym) in [(e.q, q), (e.p, p)] {
                if coeff != 0 {
                    let t = g.b.ins().imul_imm_s(sym, coeff);
                    v = g.b.ins().iadd(v, t);
                }
            }
            v
        };
        let mut result = None;
        for (ci, c) in plan.calls.iter().enumerate() {
            let args: Vec<Value> = c
                .args
                .iter()
                .map(|a| match a {
                    Arg::Ws(off) => g.b.ins().iadd_imm_s(ws, *off as i64),
                    Arg::WsRow { off, at, row_bytes } => {
                        let base = g.b.ins().iadd_imm_s(ws, *off as i64);
                        let at = eval(g, at);
                        g.addr(base, at, *row_bytes as i64)
                    }
                    Arg::Data(d) => addrs[data.iter().position(|x| x == d).unwrap_or(0)],
                    Arg::Param(i) => params[*i],
                    Arg::Count(dims, factor) => {
                        let mut v = g.iconst(*factor as i64);
                        for d in dims {
                            if let Some(s) = d.as_static() {
                                v = g.b.ins().imul_imm_s(v, s);
                            } else {
                                let e = eval(g, d);
                                v = g.b.ins().imul(v, e);
                            }
                        }
                        v
                    }
                    Arg::Dim(e) => eval(g, e),
                    Arg::F32(x) => g.f32(*x),
                })
                .collect();
            let f = frefs[callees.iter().position(|x| *x == c.f).unwrap_or(0)];
            let r = g.call(f, &args);
            if plan.ret == Some(ci) {
                result = r;
            }
        }
        result
    })
}
