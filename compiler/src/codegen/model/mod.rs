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
//! - `int32_t decoder_rows(uint8_t *ws, const int32_t *tokens, size_t pos, const int32_t
//!   *allowed, size_t n_allowed, size_t rows)` (when the bound is 2 or more, `RowsPlan`): the
//!   multi-row step, `rows` tokens at positions `pos..pos + rows` through the decoder layers at
//!   once (K/V into the cache), then the head on the last row with the list: the token
//!   `decoder_step` would return at `pos + rows - 1`, computed bit for bit as it would be. The
//!   driver runs forced steps' rows with the next step's through it.
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

pub(crate) mod kernels;

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
    /// `int32_t decoder_rows(uint8_t *ws, const int32_t *tokens, size_t pos, const int32_t
    /// *allowed, size_t n_allowed, size_t rows)`: the multi-row step (`RowsPlan`):
    /// `decoder_step`'s layers for `rows` (at most [`ModelCode::max_rows`]) tokens at positions
    /// `pos..pos + rows`, their K/V written into the cache, then its head on the last row with
    /// the allowed list: the token `decoder_step` would return at `pos + rows - 1`. `None` when
    /// the step's layers are not row-wise or the bound is below 2.
    pub decoder_rows: Option<FuncId>,
    /// The most rows `decoder_rows` takes (0 without it); the workspace holds that many.
    pub max_rows: usize,
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
    max_rows: usize,
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
    let copy = cx.kernel("copy".into(), "copy", kernels::copy_words)?;
    let rows_plan = RowsPlan::of(&dec_plan, max_rows, copy);

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
    let decoder_rows = match &rows_plan {
        Some(rp) => {
            let id = ks.declare_function(
                "model_decoder_rows",
                &[
                    "Feeds tokens[0..rows] at positions pos..pos+rows (1 <= rows <= the row",
                    "bound) in one multi-row step, then returns the last row's token as",
                    "model_decoder_step would (-1 on bad arguments).",
                ],
                &[
                    (CType::U8Ptr, "ws"),
                    (CType::ConstI32Ptr, "tokens"),
                    (CType::SizeT, "pos"),
                    (CType::ConstI32Ptr, "allowed"),
                    (CType::SizeT, "n_allowed"),
                    (CType::SizeT, "rows"),
                ],
                CType::I32,
                export,
            )?;
            emit_rows(ks, id, &dec_plan, rp, &limits)?;
            Some(id)
        }
        None => None,
    };
    Ok(ModelCode {
        encode_query,
        decoder_step,
        // The multi-row step's arena may reach past the plan's largest.
        workspace_bytes: ws_plan
            .total_bytes
            .max(rows_plan.as_ref().map_or(0, |rp| rp.end)),
        workspace_align: needle_ir::plan::ALIGN,
        logits_offset: ws_plan.logits.offset,
        max_query_tokens,
        max_positions,
        skips_by_allowed: dec_plan.head.is_some(),
        decoder_rows,
        max_rows: rows_plan.as_ref().map_or(0, |rp| rp.max_rows),
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
    /// What the multi-row step calls instead, when the kernel's rows would not each be
    /// computed as a one-row call computes them (integer matrix products; see
    /// [`kernels::matmul`]).
    rows_callee: Option<FuncId>,
    /// An `attention` call: the bytes of one row of its query and of its result. The
    /// multi-row step makes it once per row, each row at its own position (causal).
    attention: Option<(usize, usize)>,
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
    /// The entry point's arena: `arena_start..arena_end` of the workspace.
    arena: (usize, usize),
}

/// The calls after the decoder layers that only pick the next token: `calls[start..logits]`
/// (the final norm, whose result nothing else reads), `calls[logits]` and `calls[argmax]`
/// (the last call).
struct Head {
    start: usize,
    logits: usize,
    /// The sparse kernel ([`kernels::sparse_logits_argmax`]) for this table.
    sparse: FuncId,
    /// Bytes of the head's input row (the last layer's output, one token).
    row_bytes: usize,
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
        self.calls.push(Call {
            callee,
            args,
            rows_callee: None,
            attention: None,
        });
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
    let mut logits_call: Option<(usize, Option<usize>, FuncId, usize)> = None;
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
                        kernels::matmul(ks, n, &wr, true)
                    }
                })?;
                // Integer panels: a one-row call sums per group, register tiles do not; the
                // decoder's multi-row step takes every row singly (block by block).
                let rows_k = if entry == Entry::Decode && wr.scales.is_some() && !wr.format.is_dot()
                {
                    Some(
                        p.cx.kernel(format!("matmul1:{w}"), "matmul_rows", |ks, n| {
                            kernels::matmul(ks, n, &wr, false)
                        })?,
                    )
                } else {
                    None
                };
                let loc = placed(inst.op.name())?;
                let args = vec![
                    p.ptr(x)?,
                    p.loc_arg(loc, "matmul")?,
                    Arg::Count(vec![r.ty.shape[0]], 1),
                ];
                p.call(k, args);
                if let Some(c) = p.calls.last_mut() {
                    c.rows_callee = rows_k;
                }
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
                let rows = (row_elems(&p.ty(q)?)? * 4, row_elems(&r.ty)? * 4);
                p.call(k, args);
                if let Some(c) = p.calls.last_mut() {
                    c.attention = Some(rows);
                }
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
                let row_bytes = row_elems(&p.ty(x)?)? * 4;
                logits_call = Some((p.calls.len() - 1, norm, sparse, row_bytes));
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
        (Entry::Decode, Some((logits, norm, sparse, row_bytes)), Some(argmax))
            if argmax == logits + 1 && argmax + 1 == p.calls.len() =>
        {
            Some(Head {
                start: norm.unwrap_or(logits),
                logits,
                sparse,
                row_bytes,
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
        arena: (fp.arena_start, fp.arena_end),
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

/// The lengths of the runs of consecutive forced steps (exactly one allowed id) in a decode,
/// given each step's allowed count in order (`None`: unconstrained), as the runtime's
/// `Step::allowed` reports them. The measure of how much a multi-row step could batch.
pub fn forced_runs(allowed: impl IntoIterator<Item = Option<usize>>) -> Vec<usize> {
    let mut runs = Vec::new();
    let mut cur = 0;
    for a in allowed {
        if a == Some(1) {
            cur += 1;
        } else if cur > 0 {
            runs.push(cur);
            cur = 0;
        }
    }
    if cur > 0 {
        runs.push(cur);
    }
    runs
}

/// The rows of each decoder call a decode makes with the multi-row step, given each step's
/// allowed count in order (as [`forced_runs`] takes them) and the row bound: every step adds
/// its row; a step with a choice (not exactly one allowed id) runs the rows gathered so far
/// with its own in one call (1 row: the one-row `decoder_step`; more: `decoder_rows`), and so
/// does a forced step that fills the bound; rows still gathered at the end (forced steps the
/// decode ends on) never run. The library's step counts follow this rule (tests compare).
/// Empty for a bound below 2 (no multi-row step).
pub fn forced_row_calls(
    allowed: impl IntoIterator<Item = Option<usize>>,
    max_rows: usize,
) -> Vec<usize> {
    let mut calls = Vec::new();
    if max_rows < 2 {
        return calls;
    }
    let mut pending = 0;
    for a in allowed {
        pending += 1;
        if a != Some(1) || pending == max_rows {
            calls.push(pending);
            pending = 0;
        }
    }
    calls
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
        Some(emit_head(
            g,
            plan,
            head,
            allowed,
            n,
            limits.vocab,
            frefs,
            &arg,
        ))
    })
}

/// The step's head as the allowed list `(allowed, n)` says ([`StepKind`]): the token. `arg`
/// gives the entry point's values of the head calls' arguments (`Arg::Param(3)` and `(4)`
/// being `allowed` and `n`).
#[allow(clippy::too_many_arguments)]
fn emit_head(
    g: &mut Gen<'_>,
    plan: &Plan,
    head: &Head,
    allowed: Value,
    n: Value,
    vocab: usize,
    frefs: &crate::codegen::kernels::Callees,
    arg: &dyn Fn(&mut Gen<'_>, &Arg) -> Value,
) -> Value {
    let emit_call = |g: &mut Gen<'_>, c: &Call| -> Option<Value> {
        let args: Vec<Value> = c.args.iter().map(|a| arg(g, a)).collect();
        g.call(frefs.get(c.callee), &args)
    };
    let kind = emit_step_kind(g, allowed, n, vocab);
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
                    .icmp_imm_u(IntCC::UnsignedLessThan, id, vocab as i64);
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
    g.get(token)
}

/// The default bound on the rows of the decoder's multi-row step (`decoder_rows`): forced
/// steps waiting for the next step with a choice, and its own row. Eight rows of every decoder
/// value stay small next to the encoder's arena (the full-size model, folded with
/// `--max-query-tokens 128 --max-gen-len 64`: 57 KB more workspace). On the bundled samples the
/// strict grammar never forces two steps in a row, so two rows is all a step takes there; a
/// grammar with longer literal runs would take up to this many.
pub const MAX_FORCED_ROWS: usize = 8;

/// An argument of a `decoder_rows` call, from the one-row step's [`Arg`].
#[derive(Clone, Debug)]
enum RowsArg {
    /// As in the one-row step (buffers, data, constants), `p` being the call's position.
    Same(Arg),
    /// A decoder value in the arena at `off` in the one-row plan: here `rows` rows of it, at
    /// `start + (off - start) * max_rows` ([`RowsPlan::arena_at`]).
    Arena(usize),
    /// The one-row step's token slot: the step's `tokens` parameter.
    Tokens,
    /// A count per token row (a row count or a row's elements): `rows` times this.
    PerRow(usize),
}

struct RowsCall {
    callee: FuncId,
    args: Vec<RowsArg>,
    /// See [`Call::attention`].
    attention: Option<(usize, usize)>,
}

/// `decoder_rows`: the decoder layers of `decoder_step` (not its head) for several tokens at
/// consecutive positions at once. Every decoder value of the one-row plan becomes `max_rows`
/// rows: its arena slot is scaled by `max_rows` from the arena's start, which keeps slots that
/// did not overlap apart and in-place ops in place. Matrix products take all rows in one call
/// (each weight block read once for every row); attention runs row by row, row `i` at position
/// `pos + i` over the cache rows `..=pos + i` (causal, the rows before it written by the same
/// step's `store`, which wrote all the rows' K/V first).
struct RowsPlan {
    calls: Vec<RowsCall>,
    callees: Vec<FuncId>,
    data: Vec<DataId>,
    state_offset: usize,
    arena_start: usize,
    max_rows: usize,
    /// Bytes of workspace the step needs (its scaled arena's end).
    end: usize,
    /// The head's input (the last layer's output) in the one-row plan: the last row's is copied
    /// there, and the one-row step's head runs on it.
    head_input: usize,
    copy: FuncId,
}

impl RowsPlan {
    fn arena_at(&self, off: usize) -> usize {
        self.arena_start + (off - self.arena_start) * self.max_rows
    }

    /// The multi-row form of `plan` (the decoder step's), or `None` when its layers are not
    /// row-wise in the way [`RowsPlan`] needs (then every forced step runs as one row).
    fn of(plan: &Plan, max_rows: usize, copy: FuncId) -> Option<RowsPlan> {
        let head = plan.head.as_ref()?;
        let token_slot = plan.token_slot?;
        if max_rows < 2 {
            return None;
        }
        let (arena_start, arena_end) = plan.arena;
        let head_input = match plan.calls[head.start].args.first() {
            Some(Arg::Ws(off)) if *off >= arena_start && *off != token_slot => *off,
            _ => return None,
        };
        let mut calls = Vec::new();
        let mut callees = plan.callees.clone();
        for c in &plan.calls[..head.start] {
            let mut args = Vec::new();
            for a in &c.args {
                let ra = match a {
                    Arg::Ws(off) if *off == token_slot => RowsArg::Tokens,
                    Arg::Ws(off) if *off >= arena_start => RowsArg::Arena(*off),
                    Arg::Count(dims, f) if dims.first() == Some(&Expr::lit(1)) => {
                        let rest: Option<usize> = dims[1..]
                            .iter()
                            .map(|d| d.as_static().map(|v| v as usize))
                            .product();
                        RowsArg::PerRow(rest? * f)
                    }
                    // An attention's key count (`p + 1` of the cache, `q + t` of the query).
                    Arg::Count(..) if c.attention.is_some() => RowsArg::Same(a.clone()),
                    Arg::Count(..) | Arg::Param(_) => return None,
                    Arg::Ws(_) | Arg::WsRow { .. } | Arg::Data(_) | Arg::Dim(_) | Arg::F32(_) => {
                        RowsArg::Same(a.clone())
                    }
                };
                args.push(ra);
            }
            if c.attention.is_some()
                && !matches!(args.get(..2), Some([RowsArg::Arena(_), RowsArg::Arena(_)]))
            {
                return None;
            }
            let callee = c.rows_callee.unwrap_or(c.callee);
            import(&mut callees, callee);
            calls.push(RowsCall {
                callee,
                args,
                attention: c.attention,
            });
        }
        let end = arena_start + (arena_end - arena_start) * max_rows;
        import(&mut callees, copy);
        Some(RowsPlan {
            head_input,
            copy,
            calls,
            callees,
            data: plan.data.clone(),
            state_offset: plan.state_offset,
            arena_start,
            max_rows,
            end: end.next_multiple_of(needle_ir::plan::ALIGN),
        })
    }
}

/// `e` with `q` and `p` at their run-time values (`a` is not used by the decoder layers).
fn eval_dims(g: &mut Gen<'_>, e: &Expr, q: Value, p: Value) -> Value {
    let mut v = g.iconst(e.offset);
    for (coeff, sym) in [(e.q, q), (e.p, p)] {
        if coeff != 0 {
            let t = g.b.ins().imul_imm_s(sym, coeff);
            v = g.b.ins().iadd(v, t);
        }
    }
    v
}

/// Defines `int32_t decoder_rows(ws, tokens, pos, allowed, n_allowed, rows)`: feeds
/// `tokens[0..rows]` at positions `pos..pos + rows` (their K/V into the cache rows), then runs
/// the step's head on the last row as `decoder_step` would at `pos + rows - 1` with the list
/// `(allowed, n_allowed)`, and returns its token (one allowed id: that id, no logits). -1 and
/// nothing computed unless `1 <= rows <= max_rows` and `pos + rows <= max_positions`; the tokens
/// must be below the vocabulary (the driver's; a bad id reads embedding row 0, memory-safe).
fn emit_rows(
    ks: &mut KernelSet,
    id: FuncId,
    plan: &Plan,
    rp: &RowsPlan,
    limits: &Limits,
) -> Result<(), CodegenError> {
    let head = plan.head.as_ref().expect("a rows plan has a head");
    ks.define_function(id, &rp.data, &rp.callees, |g, params, addrs, frefs| {
        let (ws, tokens, pos) = (params[0], params[1], params[2]);
        let (allowed, n_allowed, rows) = (params[3], params[4], params[5]);
        let none = g.b.ins().icmp_imm_u(IntCC::Equal, rows, 0);
        let many =
            g.b.ins()
                .icmp_imm_u(IntCC::UnsignedGreaterThan, rows, rp.max_rows as i64);
        let far = g.b.ins().icmp_imm_u(
            IntCC::UnsignedGreaterThanOrEqual,
            pos,
            limits.max_positions as i64,
        );
        let bad = g.b.ins().bor(none, many);
        let bad = g.b.ins().bor(bad, far);
        let refuse = |g: &mut Gen<'_>| {
            let m1 = g.b.ins().iconst(types::I32, -1);
            g.ret(&[m1]);
        };
        g.if_then(bad, refuse);
        // `pos < max_positions` and `rows <= max_rows`: the sum cannot wrap.
        let end = g.b.ins().iadd(pos, rows);
        let past =
            g.b.ins()
                .icmp_imm_u(IntCC::UnsignedGreaterThan, end, limits.max_positions as i64);
        g.if_then(past, refuse);
        let pt = g.ptr;
        let q = g.b.ins().load(pt, mem(), ws, rp.state_offset as i32);
        let qmax = g.iconst(limits.max_query_tokens as i64);
        let over = g.icmp(IntCC::UnsignedGreaterThan, q, qmax);
        let q = g.b.ins().select(over, qmax, q);
        // One argument; `row` is `Some((i, row bytes))` for a row-by-row call's query (0) and
        // result (1) pointers, `n_rows` what a per-row count multiplies.
        let value =
            |g: &mut Gen<'_>, a: &RowsArg, p: Value, n_rows: Value, row: Option<(Value, usize)>| {
                match a {
                    RowsArg::Tokens => tokens,
                    RowsArg::Arena(off) => {
                        let base = g.b.ins().iadd_imm_s(ws, rp.arena_at(*off) as i64);
                        match row {
                            Some((i, bytes)) => g.addr(base, i, bytes as i64),
                            None => base,
                        }
                    }
                    RowsArg::PerRow(n) => g.b.ins().imul_imm_s(n_rows, *n as i64),
                    RowsArg::Same(a) => match a {
                        Arg::Ws(off) => g.b.ins().iadd_imm_s(ws, *off as i64),
                        Arg::WsRow { off, at, row_bytes } => {
                            let base = g.b.ins().iadd_imm_s(ws, *off as i64);
                            let at = eval_dims(g, at, q, p);
                            g.addr(base, at, *row_bytes as i64)
                        }
                        Arg::Data(id) => addrs.get(*id),
                        Arg::Count(dims, factor) => {
                            let mut v = g.iconst(*factor as i64);
                            for d in dims {
                                let e = eval_dims(g, d, q, p);
                                v = g.b.ins().imul(v, e);
                            }
                            v
                        }
                        Arg::Dim(e) => eval_dims(g, e, q, p),
                        Arg::F32(x) => g.f32(*x),
                        // Only the head reads parameters: the allowed list.
                        Arg::Param(3) => allowed,
                        Arg::Param(4) => n_allowed,
                        Arg::Param(_) => g.iconst(0),
                    },
                }
            };
        for c in &rp.calls {
            let f = frefs.get(c.callee);
            match c.attention {
                Some((q_bytes, out_bytes)) => g.for_n(rows, |g, i| {
                    let p = g.b.ins().iadd(pos, i);
                    let one = g.iconst(1);
                    let args: Vec<Value> = (c.args.iter().enumerate())
                        .map(|(k, a)| {
                            let row = match k {
                                0 => Some((i, q_bytes)),
                                1 => Some((i, out_bytes)),
                                _ => None,
                            };
                            value(g, a, p, one, row)
                        })
                        .collect();
                    g.call(f, &args);
                }),
                None => {
                    let args: Vec<Value> = c
                        .args
                        .iter()
                        .map(|a| value(g, a, pos, rows, None))
                        .collect();
                    g.call(f, &args);
                }
            }
        }
        // The last row's layer output where the one-row step has it (forward over a region
        // at or above it: the copy is safe), then the one-row head.
        let last = g.b.ins().iadd_imm_s(rows, -1);
        let from = g.b.ins().iadd_imm_s(ws, rp.arena_at(rp.head_input) as i64);
        let from = g.addr(from, last, head.row_bytes as i64);
        let to = g.b.ins().iadd_imm_s(ws, rp.head_input as i64);
        let words = g.iconst((head.row_bytes / 4) as i64);
        g.call(frefs.get(rp.copy), &[to, from, words]);
        let p_last = g.b.ins().iadd(pos, last);
        let one = g.iconst(1);
        let arg = |g: &mut Gen<'_>, a: &Arg| value(g, &RowsArg::Same(a.clone()), p_last, one, None);
        Some(emit_head(
            g,
            plan,
            head,
            allowed,
            n_allowed,
            limits.vocab,
            frefs,
            &arg,
        ))
    })
}
