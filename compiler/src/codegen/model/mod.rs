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
//!   cache and attends over rows `..=pos`, and returns the argmax among the allowed ids. How
//!   much of the head (final norm, logits, argmax) it runs depends on the list ([`StepKind`]):
//!   unconstrained, it leaves every logit at `ws + logits_offset`; with 2 to
//!   [`sparse_logits_max`] ids only theirs (sparse logits); with one id it computes no logits
//!   and returns that id (jump-forward). The token is the same in all three. Decoding state
//!   needs no reset: row `pos` is written before rows `..=pos` are read, so a new query's steps
//!   from `pos = 0` never see an earlier query's rows. Returns -1 (computing nothing) when
//!   `pos >= max_positions` or `token` is not below the vocabulary.
//!
//! # Allowed ids
//!
//! The IR's `argmax_masked %logits, %allowed` takes the grammar's allowed ids as
//! `%allowed : i32[a]`; the step receives them as the pair `(allowed, n_allowed)`, which is also
//! where the symbol `a` comes from. `allowed == NULL` is the IR's empty list: an unconstrained
//! step.
//!
//! The IR's `logits` + `argmax_masked` define the token; codegen computes it with less work when
//! the list allows: only the listed rows of the tied embedding, each summed exactly as the full
//! logits kernel sums it and weighed by the same tie rule, so the token is bit for bit the
//! full path's; and a single listed id is the argmax whatever the logits are.
//!
//! # Workspace
//!
//! `ws` (16-byte aligned) is laid out exactly as [`needle_ir::WorkspacePlan`] says: the state
//! word (`q`), every IR buffer, the logits, then one arena for the SSA values of whichever entry
//! point runs, each value at the slot the plan gives it. This module only turns the plan's
//! places into kernel arguments; `needlec build --emit ir` prints the same plan beside the IR.

mod kernels;

use std::collections::HashMap;

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, Value};
use cranelift_module::{DataId, FuncId};
use needle_ir::{
    check_pipeline_ran, verify, ConstData, ConstStore, ElemType, Expr, Function, Module, Op,
    Operand, Place, Storage, Sym, Type, WorkspacePlan, DECODER_STEP, ENCODE_QUERY,
};

use crate::abi::CType;
use crate::codegen::gen::{mem, Gen};
use crate::codegen::weights::{f16_is_exact, WeightFormat, WeightRef};
use crate::codegen::{CodegenError, KernelSet};
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
    /// Whether `decoder_step` picks its token as [`StepKind`] says (jump-forward, sparse
    /// logits); false when the step's tail is not the final norm, logits and argmax, and every
    /// step then computes the full logits.
    pub skips_by_allowed: bool,
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
    check_pipeline_ran(module).map_err(|e| invalid(e.to_string()))?;
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

    let ws_plan =
        WorkspacePlan::of(module).map_err(|e| invalid(format!("planning the workspace: {e}")))?;
    let vocab = ws_plan
        .logits_ty
        .shape
        .get(1)
        .and_then(|e| e.as_static())
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| {
            invalid(format!(
                "logits : {} have no static vocabulary",
                ws_plan.logits_ty
            ))
        })?;

    let mut cx = Cx {
        ks,
        m: module,
        store,
        data: HashMap::new(),
        weights: HashMap::new(),
        kernels: HashMap::new(),
        count: 0,
    };
    let enc_plan = plan(&mut cx, &ws_plan, enc, Entry::Encode)?;
    let dec_plan = plan(&mut cx, &ws_plan, dec, Entry::Decode)?;

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
            "Feeds token at position pos, returns the argmax among allowed[0..n_allowed] (all",
            "ids if allowed is NULL; then the logits are left in ws); -1 on a bad pos or token.",
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
        workspace_bytes: ws_plan.total_bytes,
        workspace_align: needle_ir::plan::ALIGN,
        logits_offset: ws_plan.logits.offset,
        max_query_tokens,
        max_positions,
        skips_by_allowed: dec_plan.head.is_some(),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Encode,
    Decode,
}

struct Limits {
    max_query_tokens: usize,
    max_positions: usize,
    vocab: usize,
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
    /// The address of embedded data (one of the entry point's [`Plan::data`]).
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
    /// The kernel called (one of the entry point's [`Plan::callees`]).
    callee: FuncId,
    args: Vec<Arg>,
}

/// An entry point's kernel calls, in order.
struct Plan {
    calls: Vec<Call>,
    /// The kernels the calls name, each once, in first-use order: what the entry point
    /// imports.
    callees: Vec<FuncId>,
    /// The embedded data the calls address, likewise.
    data: Vec<DataId>,
    /// The call whose result the entry point returns.
    ret: Option<usize>,
    /// Where `decoder_step` puts its token (the IR's `%token : i32[1]`).
    token_slot: Option<usize>,
    /// Where the state word (`q`) is recorded.
    state_offset: usize,
    /// `decoder_step`'s head (final norm, logits, argmax), which the step skips or narrows by
    /// the allowed list; `None` runs every call unconditionally.
    head: Option<Head>,
}

/// The calls after the decoder layers that only pick the next token: `calls[start..logits]`
/// (the final norm, whose result nothing else reads), `calls[logits]` and `calls[argmax]`
/// (the last call).
struct Head {
    start: usize,
    logits: usize,
    /// The sparse kernel ([`kernels::sparse_logits_argmax`]) for this table.
    sparse: FuncId,
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
            Storage::I8 { group } if self.ks.quantize_activations() => WeightFormat::I8Dot {
                group: group as usize,
            },
            Storage::I4 { group } if self.ks.quantize_activations() => WeightFormat::I4Dot {
                group: group as usize,
            },
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

/// Where a value lives, as the kernels address it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loc {
    /// `ws + offset` (an arena slot).
    Ws(usize),
    /// A pointer parameter of the entry point.
    Param(usize),
    Logits,
    /// The allowed-ids parameter, passed as `(allowed, n_allowed)`.
    Allowed,
    /// The entry point's return value.
    Returned,
}

struct Val {
    loc: Loc,
    ty: Type,
}

/// Turns one function's instructions into kernel calls at the places the workspace plan gives.
struct Planner<'p, 'a> {
    cx: &'p mut Cx<'a>,
    ws: &'p WorkspacePlan,
    vals: HashMap<String, Val>,
    calls: Vec<Call>,
    callees: Vec<FuncId>,
    data: Vec<DataId>,
}

/// Appends `x` to the imports `list` the first time it is used; returns `x`.
fn import<T: PartialEq + Copy>(list: &mut Vec<T>, x: T) -> T {
    if !list.contains(&x) {
        list.push(x);
    }
    x
}

impl Planner<'_, '_> {
    /// The kernels' view of a planned place; `caller` is what the caller's memory is here.
    fn loc(&self, place: Place, caller: Loc) -> Loc {
        match place {
            Place::Arena(r) => Loc::Ws(r.offset),
            Place::Caller => caller,
            Place::Logits => Loc::Logits,
            Place::Returned => Loc::Returned,
        }
    }

    fn val(&self, name: &str) -> Result<&Val, CodegenError> {
        self.vals
            .get(name)
            .ok_or_else(|| invalid(format!("%{name} is not defined")))
    }

    fn loc_arg(&self, loc: Loc, what: &str) -> Result<Arg, CodegenError> {
        match loc {
            Loc::Ws(off) => Ok(Arg::Ws(off)),
            Loc::Param(i) => Ok(Arg::Param(i)),
            Loc::Logits => Ok(Arg::Ws(self.ws.logits.offset)),
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

    /// A workspace buffer's planned region: (offset, bytes per row).
    fn buffer(&self, name: &str) -> Result<(usize, usize), CodegenError> {
        self.ws
            .buffer(name)
            .map(|b| (b.region.offset, b.row_bytes))
            .ok_or_else(|| invalid(format!("${name} has no planned region")))
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
                let id = self.cx.data(n)?;
                Ok((Arg::Data(import(&mut self.data, id)), ty))
            }
            Operand::Buffer { name, len } => {
                let decl = self
                    .cx
                    .m
                    .buffer(name)
                    .ok_or_else(|| invalid(format!("${name} is not declared")))?;
                let mut ty = decl.ty.clone();
                ty.shape[0] = *len;
                let (off, _) = self.buffer(name)?;
                Ok((Arg::Ws(off), ty))
            }
        }
    }

    fn call(&mut self, f: FuncId, args: Vec<Arg>) {
        let callee = import(&mut self.callees, f);
        self.calls.push(Call { callee, args });
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

/// Plans one entry point's kernel calls, at the places `ws` gives its values.
fn plan(
    cx: &mut Cx<'_>,
    ws: &WorkspacePlan,
    f: &Function,
    entry: Entry,
) -> Result<Plan, CodegenError> {
    let fp = ws
        .func(&f.name)
        .ok_or_else(|| invalid(format!("@{} has no workspace plan", f.name)))?;
    let mut p = Planner {
        cx,
        ws,
        vals: HashMap::new(),
        calls: Vec::new(),
        callees: Vec::new(),
        data: Vec::new(),
    };

    let mut token_slot = None;
    let param_names: Vec<(&str, &Type)> =
        f.params.iter().map(|x| (x.name.as_str(), &x.ty)).collect();
    let planned = |k: usize| {
        fp.params
            .get(k)
            .copied()
            .ok_or_else(|| invalid(format!("@{}: parameter {k} has no place", f.name)))
    };
    match (entry, param_names.as_slice()) {
        (Entry::Encode, [(query, ty)])
            if ty.elem == ElemType::I32 && ty.shape == [Expr::sym(Sym::Q)] =>
        {
            // The query ids stay in the caller's memory: the entry point's `ids`.
            let loc = p.loc(planned(0)?, Loc::Param(1));
            p.vals.insert(
                query.to_string(),
                Val {
                    loc,
                    ty: (*ty).clone(),
                },
            );
        }
        (Entry::Decode, [(token, tty), (allowed, aty)])
            if tty.elem == ElemType::I32
                && tty.shape == [Expr::lit(1)]
                && aty.elem == ElemType::I32
                && aty.shape == [Expr::sym(Sym::A)] =>
        {
            // The token comes by value; the step stores it where the plan put it.
            let Place::Arena(slot) = planned(0)? else {
                return Err(invalid(format!("@{}: %{token} has no arena slot", f.name)));
            };
            token_slot = Some(slot.offset);
            p.vals.insert(
                token.to_string(),
                Val {
                    loc: Loc::Ws(slot.offset),
                    ty: (*tty).clone(),
                },
            );
            let loc = p.loc(planned(1)?, Loc::Allowed);
            p.vals.insert(
                allowed.to_string(),
                Val {
                    loc,
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
    // The call that wrote each value, and the head's parts as they are met.
    let mut producer: HashMap<String, usize> = HashMap::new();
    let mut logits_call: Option<(usize, Option<usize>, FuncId)> = None;
    for (i, inst) in f.body.iter().enumerate() {
        let calls_before = p.calls.len();
        let result = inst.result.as_ref();
        let res = |what: &str| {
            result.ok_or_else(|| invalid(format!("`{what}` in @{} has no result", f.name)))
        };
        // Where the plan put the result (the caller's memory holds no result).
        let planned = fp
            .insts
            .get(i)
            .and_then(|ip| ip.result)
            .map(|place| p.loc(place, Loc::Returned));
        let placed = |what: &str| {
            planned.ok_or_else(|| invalid(format!("`{what}` in @{} has no planned place", f.name)))
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
                let loc = placed(inst.op.name())?;
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
                let loc = placed(inst.op.name())?;
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
                    if wr.format.is_dot() {
                        kernels::matmul_int_dot(ks, n, &wr)
                    } else {
                        kernels::matmul(ks, n, &wr)
                    }
                })?;
                let loc = placed(inst.op.name())?;
                let args = vec![
                    p.ptr(x)?,
                    p.loc_arg(loc, "matmul")?,
                    Arg::Count(vec![r.ty.shape[0]], 1),
                ];
                p.call(k, args);
                Some(loc)
            }
            // The plan gives a reshape its input's place: nothing to copy.
            Op::Reshape { .. } => Some(placed("reshape")?),
            Op::RmsNorm {
                x,
                scale: Some(scale),
            } => {
                let r = res("norm")?;
                let d = static_dim(&r.ty, r.ty.shape.len() - 1)?;
                let data = p.cx.data(scale)?;
                let k = p.cx.kernel(format!("norm:{d}:{scale}"), "norm", |ks, n| {
                    kernels::rmsnorm(ks, n, d, Some(data))
                })?;
                norm_call(&mut p, k, x, r, placed("norm")?)?
            }
            // `check_pipeline_ran` turned these away before planning started.
            Op::ZcRmsNorm { .. } | Op::GatedResidual { .. } => {
                return Err(invalid(format!(
                    "`{}` reached codegen: run the pass pipeline first",
                    inst.op.name()
                )))
            }
            Op::RmsNorm { x, scale: None } => {
                let r = res("norm")?;
                let d = static_dim(&r.ty, r.ty.shape.len() - 1)?;
                let k = p.cx.kernel(format!("norm:{d}"), "norm", |ks, n| {
                    kernels::rmsnorm(ks, n, d, None)
                })?;
                norm_call(&mut p, k, x, r, placed("norm")?)?
            }
            Op::Rope { x, table, start } => {
                let r = res("rope")?;
                let (heads, h) = (static_dim(&r.ty, 1)?, static_dim(&r.ty, 2)?);
                let t = p.cx.data(table)?;
                let k =
                    p.cx.kernel(format!("rope:{table}:{heads}:{h}"), "rope", |ks, n| {
                        kernels::rope(ks, n, t, heads, h)
                    })?;
                let loc = placed(inst.op.name())?;
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
                for (k, v) in kv {
                    let (kp, kt) = p.operand(k)?;
                    let (vp, _) = p.operand(v)?;
                    blocks.push((kp, vp, kt));
                }
                let kv_heads = static_dim(&blocks[0].2, 1)?;
                let nb = blocks.len();
                let k = p.cx.kernel(
                    format!("attn:{nb}:{heads}:{kv_heads}:{h}"),
                    "attention",
                    |ks, n| kernels::attention(ks, n, nb, heads, kv_heads, h),
                )?;
                let loc = placed(inst.op.name())?;
                let scores =
                    fp.insts.get(i).and_then(|ip| ip.scratch).ok_or_else(|| {
                        invalid("attention has no planned scratch for its scores")
                    })?;
                let mut args = vec![
                    p.ptr(q)?,
                    p.loc_arg(loc, "attention")?,
                    Arg::Count(vec![r.ty.shape[0]], 1),
                    Arg::Ws(scores.offset),
                ];
                for (kp, vp, kt) in blocks {
                    args.extend([kp, vp, Arg::Count(vec![kt.shape[0]], 1)]);
                }
                p.call(k, args);
                Some(loc)
            }
            Op::Store { value, buffer, at } => {
                let copy = p.copy_kernel()?;
                let (off, row_bytes) = p.buffer(buffer)?;
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
            Op::Residual { x, y, scale } => {
                let r = res("residual")?;
                let s = p.cx.scalar(scale)?;
                let k = p.residual_kernel()?;
                let loc = placed(inst.op.name())?;
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
                if placed("logits")? != Loc::Logits {
                    return Err(invalid("logits planned outside the logits region"));
                }
                let w = p.cx.weight(table)?;
                let k = p.cx.kernel(format!("logits:{table}"), "logits", |ks, n| {
                    kernels::logits(ks, n, &w)
                })?;
                let sparse = p.cx.kernel(format!("sparse:{table}"), "sparse", |ks, n| {
                    kernels::sparse_logits_argmax(ks, n, &w)
                })?;
                let sparse = import(&mut p.callees, sparse);
                let args = vec![
                    p.ptr(x)?,
                    Arg::Ws(p.ws.logits.offset),
                    Arg::Count(vec![r.ty.shape[0]], 1),
                ];
                p.call(k, args);
                let norm = head_norm(f, &producer, x, p.calls.len() - 1);
                logits_call = Some((p.calls.len() - 1, norm, sparse));
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
                        "argmax_masked must pick the returned token of one row of logits among \
                         the step's allowed-ids parameter",
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
        if let (Some(r), true) = (result, p.calls.len() == calls_before + 1) {
            producer.insert(r.name.clone(), calls_before);
        }
        if let (Some(loc), Some(r)) = (loc, result) {
            p.vals.insert(
                r.name.clone(),
                Val {
                    loc,
                    ty: r.ty.clone(),
                },
            );
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
    // The head is the tail of the step: the final norm (when it is only the logits' input),
    // the logits, the argmax last.
    let head = match (entry, logits_call, ret) {
        (Entry::Decode, Some((logits, norm, sparse)), Some(argmax))
            if argmax == logits + 1 && argmax + 1 == p.calls.len() =>
        {
            Some(Head {
                start: norm.unwrap_or(logits),
                logits,
                sparse,
            })
        }
        _ => None,
    };
    Ok(Plan {
        calls: p.calls,
        callees: p.callees,
        data: p.data,
        ret,
        token_slot,
        state_offset: ws.state.offset,
        head,
    })
}

/// The call of the final norm whose result `x` the logits call `logits` reads, when it is the
/// call just before and nothing else reads `x`: then it belongs to the step's head.
fn head_norm(
    f: &Function,
    producer: &HashMap<String, usize>,
    x: &str,
    logits: usize,
) -> Option<usize> {
    let read = Operand::Value(x.to_string());
    let readers = f
        .body
        .iter()
        .filter(|i| i.op.operands().contains(&read))
        .count();
    let c = *producer.get(x)?;
    (readers == 1 && c + 1 == logits && !f.results.iter().any(|r| r == x)).then_some(c)
}

/// A norm over the last axis of `x` (rows = every other dimension), into `loc` (which the plan
/// may have made `x`'s own).
fn norm_call(
    p: &mut Planner<'_, '_>,
    k: FuncId,
    x: &str,
    r: &needle_ir::Param,
    loc: Loc,
) -> Result<Option<Loc>, CodegenError> {
    let rows = r.ty.shape[..r.ty.shape.len() - 1].to_vec();
    let args = vec![p.ptr(x)?, p.loc_arg(loc, "norm")?, Arg::Count(rows, 1)];
    p.call(k, args);
    Ok(Some(loc))
}

/// What a decoder step computes to pick its token, told from its allowed list alone (the
/// driver counts steps by the same rule, [`emit_step_kind`]). The token is the same either way:
/// the argmax among the allowed ids of the full logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// Unconstrained (no list, or an empty one), or more than [`sparse_logits_max`] ids: the
    /// final norm, every logit, the argmax.
    Full = 0,
    /// 2 to [`sparse_logits_max`] ids: the final norm and only the listed ids' logits.
    Sparse = 1,
    /// Exactly one id (jump-forward): it is the token; no norm, no logits.
    Forced = 2,
}

/// The most allowed ids a step computes sparsely: half the vocabulary. A sparse logit costs
/// what a full one does (the same dot product over one embedding row) plus loading its id, and
/// its argmax step is the same; below half the vocabulary the gathered rows (not read in order,
/// so not prefetched) still leave a wide margin. The grammar's constrained steps allow far
/// fewer (tens of ids), so in practice every constrained step is sparse.
pub fn sparse_logits_max(vocab: usize) -> usize {
    vocab / 2
}

/// Emits the [`StepKind`] (as an `i64`-typed pointer-sized integer) of a step given
/// `(allowed, n_allowed)`: a NULL list is an empty one.
pub fn emit_step_kind(g: &mut Gen<'_>, allowed: Value, n: Value, vocab: usize) -> Value {
    let zero = g.iconst(0);
    let null = g.icmp(IntCC::Equal, allowed, zero);
    let n = g.b.ins().select(null, zero, n);
    let forced = g.b.ins().icmp_imm_u(IntCC::Equal, n, 1);
    let above_one = g.b.ins().icmp_imm_u(IntCC::UnsignedGreaterThan, n, 1);
    let small = g.b.ins().icmp_imm_u(
        IntCC::UnsignedLessThanOrEqual,
        n,
        sparse_logits_max(vocab) as i64,
    );
    let sparse = g.b.ins().band(above_one, small);
    let full_k = g.iconst(StepKind::Full as i64);
    let sparse_k = g.iconst(StepKind::Sparse as i64);
    let forced_k = g.iconst(StepKind::Forced as i64);
    let k = g.b.ins().select(sparse, sparse_k, full_k);
    g.b.ins().select(forced, forced_k, k)
}

/// Defines an entry point: checks its arguments, then makes the planned calls.
fn emit_entry(
    ks: &mut KernelSet,
    id: FuncId,
    plan: &Plan,
    entry: Entry,
    limits: &Limits,
) -> Result<(), CodegenError> {
    // Every `Arg::Data` and callee was imported into `plan.data` and `plan.callees` when the
    // call was planned, so every lookup below finds its id.
    ks.define_function(id, &plan.data, &plan.callees, |g, params, addrs, frefs| {
        let ws = params[0];
        // The symbols' run-time values; `p` and `a` do not exist in the encoder (the verifier
        // keeps them out of it).
        let (q, p, a) = match entry {
            Entry::Encode => {
                let q = params[2];
                let bad = g.b.ins().icmp_imm_u(
                    IntCC::UnsignedGreaterThan,
                    q,
                    limits.max_query_tokens as i64,
                );
                g.if_then(bad, |g| g.ret(&[]));
                g.b.ins().store(mem(), q, ws, plan.state_offset as i32);
                let zero = g.iconst(0);
                (q, zero, zero)
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
                let q = g.b.ins().load(pt, mem(), ws, plan.state_offset as i32);
                let qmax = g.iconst(limits.max_query_tokens as i64);
                let over = g.icmp(IntCC::UnsignedGreaterThan, q, qmax);
                let q = g.b.ins().select(over, qmax, q);
                if let Some(slot) = plan.token_slot {
                    g.b.ins().store(mem(), token, ws, slot as i32);
                }
                (q, pos, params[4])
            }
        };
        let eval = |g: &mut Gen<'_>, e: &Expr| -> Value {
            let mut v = g.iconst(e.offset);
            for (coeff, sym) in [(e.q, q), (e.p, p), (e.a, a)] {
                if coeff != 0 {
                    let t = g.b.ins().imul_imm_s(sym, coeff);
                    v = g.b.ins().iadd(v, t);
                }
            }
            v
        };
        let arg = |g: &mut Gen<'_>, a: &Arg| -> Value {
            match a {
                Arg::Ws(off) => g.b.ins().iadd_imm_s(ws, *off as i64),
                Arg::WsRow { off, at, row_bytes } => {
                    let base = g.b.ins().iadd_imm_s(ws, *off as i64);
                    let at = eval(g, at);
                    g.addr(base, at, *row_bytes as i64)
                }
                Arg::Data(id) => addrs.get(*id),
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
            }
        };
        let emit_call = |g: &mut Gen<'_>, c: &Call| -> Option<Value> {
            let args: Vec<Value> = c.args.iter().map(|a| arg(g, a)).collect();
            g.call(frefs.get(c.callee), &args)
        };
        let (Entry::Decode, Some(head)) = (entry, &plan.head) else {
            let mut result = None;
            for (ci, c) in plan.calls.iter().enumerate() {
                let r = emit_call(g, c);
                if plan.ret == Some(ci) {
                    result = r;
                }
            }
            return result;
        };
        // The decoder layers always run (they fill the K/V cache); the head runs as the
        // allowed list says (see [`StepKind`]).
        for c in &plan.calls[..head.start] {
            emit_call(g, c);
        }
        let (allowed, n) = (params[3], params[4]);
        let kind = emit_step_kind(g, allowed, n, limits.vocab);
        let m1 = g.b.ins().iconst(types::I32, -1);
        let token = g.var(types::I32, m1);
        let forced =
            g.b.ins()
                .icmp_imm_u(IntCC::Equal, kind, StepKind::Forced as i64);
        g.if_else(
            forced,
            |g| {
                // The one allowed id is what the argmax would pick (-1 when out of range).
                let id = g.b.ins().load(types::I32, mem(), allowed, 0);
                let ok =
                    g.b.ins()
                        .icmp_imm_u(IntCC::UnsignedLessThan, id, limits.vocab as i64);
                let id = g.b.ins().select(ok, id, m1);
                g.set(token, id);
            },
            |g| {
                let sparse =
                    g.b.ins()
                        .icmp_imm_u(IntCC::Equal, kind, StepKind::Sparse as i64);
                g.if_else(
                    sparse,
                    |g| {
                        for c in &plan.calls[head.start..head.logits] {
                            emit_call(g, c);
                        }
                        let lc = &plan.calls[head.logits];
                        let x = arg(g, &lc.args[0]);
                        let y = arg(g, &lc.args[1]);
                        let t = g
                            .call(frefs.get(head.sparse), &[x, y, allowed, n])
                            .expect("returns the token");
                        g.set(token, t);
                    },
                    |g| {
                        let mut last = None;
                        for c in &plan.calls[head.start..] {
                            last = emit_call(g, c);
                        }
                        let t = last.expect("the argmax returns the token");
                        g.set(token, t);
                    },
                );
            },
        );
        Some(g.get(token))
    })
}
