//! The reference interpreter: runs a [`Module`]'s functions on concrete data, op by op, with the
//! numerics that [`Op`] documents (spec section 2). It is an executable spec, clarity over speed:
//! it proves that the lowering, the folding and the passes compute what the original
//! implementation computes before any machine code exists, and later serves to debug codegen op by
//! op (every SSA value of the last call can be read by name, and [`Interpreter::call_observed`]
//! shows each one as it is computed).
//!
//! Everything is checked as it runs: operand shapes, the type each instruction declares (under
//! the current binding of `q` and `p`), constant data against its declaration, token ids, table
//! rows and buffer rows. A malformed module or input gives an [`IrError`], never a panic.
//!
//! # Symbols
//!
//! `q` keeps its binding across calls (it is fixed by `encode_query` and seen by every later
//! `decoder_step`); `p` must be bound by every call that uses it, since a stale position would
//! silently overwrite the KV cache. A symbol is bound by the `dims` a call passes or, when a
//! parameter's dimension is `q` (or any `a*s+b`), from the argument's shape.
//!
//! # Numerics
//!
//! Float32 throughout, in the same order of operations as the runtime's reference forward pass
//! (`needle_runtime::forward`) where that is cheap to keep: norms as `x * (1/sqrt(mean(x^2) +
//! 1e-6)) * s`, attention scores as `dot(q, k) * (1/sqrt(h))` and a max-subtracted softmax over
//! every listed block together. Sums run sequentially, so results differ from a blocked GEMM only
//! by rounding.

use std::collections::{BTreeMap, HashMap};

use crate::error::IrError;
use crate::module::{
    gate_scale, zc_norm_scale, ConstData, ConstStore, Function, Inst, Module, Op, Operand,
};
use crate::types::{ElemType, Expr, Sym, Type};

/// Epsilon inside the norms' square root (spec section 2, [`Op::ZcRmsNorm`]).
const NORM_EPS: f32 = 1e-6;

/// The most elements the interpreter allocates for one buffer from its declared shape: a
/// malformed module must get an error, not an abort on a huge allocation.
const MAX_BUFFER_ELEMENTS: usize = 1 << 28;

/// A run-time tensor: row-major data of `shape`'s element count.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: ConstData,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        Tensor {
            shape,
            data: ConstData::F32(data),
        }
    }

    pub fn i32(shape: Vec<usize>, data: Vec<i32>) -> Tensor {
        Tensor {
            shape,
            data: ConstData::I32(data),
        }
    }

    pub fn u8(shape: Vec<usize>, data: Vec<u8>) -> Tensor {
        Tensor {
            shape,
            data: ConstData::U8(data),
        }
    }

    /// Zeros of `elem` and `shape` (the caller has checked the element count).
    fn zeros(elem: ElemType, shape: Vec<usize>, count: usize) -> Tensor {
        let data = match elem {
            ElemType::F32 => ConstData::F32(vec![0.0; count]),
            ElemType::I32 => ConstData::I32(vec![0; count]),
            ElemType::U8 => ConstData::U8(vec![0; count]),
        };
        Tensor { shape, data }
    }

    pub fn elem(&self) -> ElemType {
        self.data.elem()
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            ConstData::F32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_i32(&self) -> Option<&[i32]> {
        match &self.data {
            ConstData::I32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_u8(&self) -> Option<&[u8]> {
        match &self.data {
            ConstData::U8(v) => Some(v),
            _ => None,
        }
    }

    fn view(&self) -> View<'_> {
        View {
            shape: self.shape.clone(),
            data: Data::of(&self.data),
        }
    }
}

/// Errors inside one instruction: the message, placed by the caller.
type Check<T> = Result<T, String>;

/// Borrowed tensor data: a value's, a constant's, or a buffer's first rows.
#[derive(Clone, Copy, Debug)]
enum Data<'a> {
    F32(&'a [f32]),
    I32(&'a [i32]),
    U8(&'a [u8]),
}

impl<'a> Data<'a> {
    fn of(d: &'a ConstData) -> Data<'a> {
        match d {
            ConstData::F32(v) => Data::F32(v),
            ConstData::I32(v) => Data::I32(v),
            ConstData::U8(v) => Data::U8(v),
        }
    }

    fn elem(&self) -> ElemType {
        match self {
            Data::F32(_) => ElemType::F32,
            Data::I32(_) => ElemType::I32,
            Data::U8(_) => ElemType::U8,
        }
    }

    fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::U8(v) => v.len(),
        }
    }

    /// The first `n` elements (`n` at most `len`).
    fn prefix(self, n: usize) -> Data<'a> {
        match self {
            Data::F32(v) => Data::F32(&v[..n.min(v.len())]),
            Data::I32(v) => Data::I32(&v[..n.min(v.len())]),
            Data::U8(v) => Data::U8(&v[..n.min(v.len())]),
        }
    }
}

/// An operand as read: its shape and borrowed data.
#[derive(Clone, Debug)]
struct View<'a> {
    shape: Vec<usize>,
    data: Data<'a>,
}

fn shape_text(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(","))
}

impl<'a> View<'a> {
    fn describe(&self) -> String {
        format!("{}{}", self.data.elem().name(), shape_text(&self.shape))
    }

    /// The f32 data of a rank-`N` tensor, or an error naming `what`.
    fn f32<const N: usize>(&self, what: &str) -> Check<([usize; N], &'a [f32])> {
        match (self.data, <[usize; N]>::try_from(self.shape.as_slice())) {
            (Data::F32(v), Ok(dims)) => Ok((dims, v)),
            _ => Err(format!(
                "{what} is {}, expected f32 of rank {N}",
                self.describe()
            )),
        }
    }

    /// An f32 tensor of rank at least 1: its last axis width and data.
    fn f32_rows(&self, what: &str) -> Check<(usize, &'a [f32])> {
        match (self.data, self.shape.last()) {
            (Data::F32(v), Some(&w)) => Ok((w, v)),
            _ => Err(format!(
                "{what} is {}, expected f32 with at least one axis",
                self.describe()
            )),
        }
    }
}

/// The element count of `shape`, or `None` on overflow.
fn count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Runs the functions of one module over one set of constants, owning the workspace buffers
/// (zero-initialised at their declared static shapes, kept across calls like the real workspace:
/// the cross K/V that `encode_query` stores are what `decoder_step` reads).
pub struct Interpreter<'m> {
    module: &'m Module,
    consts: &'m ConstStore,
    buffers: BTreeMap<String, Tensor>,
    bindings: BTreeMap<Sym, i64>,
    /// Every SSA value (parameters included) of the last call, kept for inspection, also when
    /// the call failed (what was computed before the failure).
    values: HashMap<String, Tensor>,
}

impl<'m> Interpreter<'m> {
    /// Allocates the module's buffers. Constants are checked when an op reads them, so a store
    /// may hold only what the functions that run need.
    pub fn new(module: &'m Module, consts: &'m ConstStore) -> Result<Interpreter<'m>, IrError> {
        let mut buffers = BTreeMap::new();
        for b in &module.buffers {
            let err = |message: String| IrError::module(format!("${}", b.name), message);
            let shape =
                b.ty.static_dims()
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| err(format!("type {} must be static with rows", b.ty)))?;
            let n = count(&shape)
                .filter(|&n| n <= MAX_BUFFER_ELEMENTS)
                .ok_or_else(|| err(format!("type {} is too large to allocate", b.ty)))?;
            if buffers
                .insert(b.name.clone(), Tensor::zeros(b.ty.elem, shape, n))
                .is_some()
            {
                return Err(err("declared twice".into()));
            }
        }
        Ok(Interpreter {
            module,
            consts,
            buffers,
            bindings: BTreeMap::new(),
            values: HashMap::new(),
        })
    }

    /// Runs `func` on `args` (one per parameter, in order) with `dims` bound (see the module docs
    /// on symbols) and returns its results.
    pub fn call(
        &mut self,
        func: &str,
        args: &[Tensor],
        dims: &[(Sym, i64)],
    ) -> Result<Vec<Tensor>, IrError> {
        self.call_observed(func, args, dims, |_, _| {})
    }

    /// [`Interpreter::call`], showing `observe` every instruction right after it ran with the
    /// value it defined (`None` for `store`): the hook for comparing codegen op by op.
    pub fn call_observed(
        &mut self,
        func: &str,
        args: &[Tensor],
        dims: &[(Sym, i64)],
        mut observe: impl FnMut(&Inst, Option<&Tensor>),
    ) -> Result<Vec<Tensor>, IrError> {
        let module = self.module;
        let f = module.func(func).ok_or_else(|| IrError {
            func: None,
            value: None,
            op: None,
            message: format!("no function @{func}"),
        })?;
        let err = |message: String| IrError::in_func(&f.name, None, message);
        self.values.clear();
        self.bind(f, args, dims).map_err(err)?;
        for inst in &f.body {
            let result = self
                .exec(inst)
                .map_err(|message| IrError::in_func(&f.name, Some(inst), message))?;
            match (&inst.result, result) {
                (Some(r), Some(t)) => {
                    observe(inst, Some(&t));
                    self.values.insert(r.name.clone(), t);
                }
                _ => observe(inst, None),
            }
        }
        f.results
            .iter()
            .map(|r| {
                self.values
                    .get(r)
                    .cloned()
                    .ok_or_else(|| err(format!("returns %{r}, which is not defined")))
            })
            .collect()
    }

    /// The value named `name` (without `%`) in the last call: a parameter or an instruction's
    /// result.
    pub fn value(&self, name: &str) -> Option<&Tensor> {
        self.values.get(name)
    }

    /// The current contents of a workspace buffer (without `$`), at its full declared size.
    pub fn buffer(&self, name: &str) -> Option<&Tensor> {
        self.buffers.get(name)
    }

    /// The current binding of a symbol.
    pub fn binding(&self, sym: Sym) -> Option<i64> {
        self.bindings.get(&sym).copied()
    }

    /// Binds the call's symbols and parameters (see the module docs on symbols).
    fn bind(&mut self, f: &Function, args: &[Tensor], dims: &[(Sym, i64)]) -> Check<()> {
        // `p` never carries over; a symbol in a parameter's shape is rebound from this call's
        // arguments (a new query has a new length) unless `dims` gives it.
        self.bindings.remove(&Sym::P);
        for p in &f.params {
            for e in &p.ty.shape {
                for s in Sym::ALL {
                    if e.coeff(s) != 0 && !dims.iter().any(|&(d, _)| d == s) {
                        self.bindings.remove(&s);
                    }
                }
            }
        }
        for &(s, v) in dims {
            self.bindings.insert(s, v);
        }
        if args.len() != f.params.len() {
            return Err(format!(
                "takes {} arguments, got {}",
                f.params.len(),
                args.len()
            ));
        }
        for (p, a) in f.params.iter().zip(args) {
            let what = || format!("argument %{}", p.name);
            if count(&a.shape) != Some(a.data.len()) {
                return Err(format!(
                    "{}: shape {} but {} elements",
                    what(),
                    shape_text(&a.shape),
                    a.data.len()
                ));
            }
            if a.elem() != p.ty.elem || a.shape.len() != p.ty.shape.len() {
                return Err(format!(
                    "{} is {}{}, declared {}",
                    what(),
                    a.elem().name(),
                    shape_text(&a.shape),
                    p.ty
                ));
            }
            // Bind symbols from the argument's shape where the declared dimension has exactly
            // one unbound symbol; then every dimension must evaluate to the argument's.
            for (e, &n) in p.ty.shape.iter().zip(&a.shape) {
                let unbound: Vec<Sym> = Sym::ALL
                    .into_iter()
                    .filter(|&s| e.coeff(s) != 0 && !self.bindings.contains_key(&s))
                    .collect();
                if let [s] = unbound[..] {
                    let c = e.coeff(s);
                    let rest = i64::try_from(n)
                        .ok()
                        .and_then(|n| n.checked_sub(e.offset))
                        .ok_or_else(|| format!("{}: dimension {n} is too large", what()))?;
                    if rest.checked_rem(c) == Some(0) {
                        if let Some(v) = rest.checked_div(c) {
                            self.bindings.insert(s, v);
                        }
                    }
                }
            }
            let want = self.shape(&p.ty)?;
            if want != a.shape {
                return Err(format!(
                    "{} has shape {}, declared {} = {}",
                    what(),
                    shape_text(&a.shape),
                    p.ty,
                    shape_text(&want)
                ));
            }
        }
        for (&s, &v) in &self.bindings {
            if let Some(d) = self.module.dims.iter().find(|d| d.sym == s) {
                if v < d.min || v > d.max {
                    return Err(format!(
                        "{} = {v} is outside its declared range {}..={}",
                        s.name(),
                        d.min,
                        d.max
                    ));
                }
            }
        }
        for (p, a) in f.params.iter().zip(args) {
            self.values.insert(p.name.clone(), a.clone());
        }
        Ok(())
    }

    /// The value of an expression under the current bindings.
    fn eval(&self, e: &Expr) -> Check<i64> {
        let mut v = e.offset;
        for s in Sym::ALL {
            let c = e.coeff(s);
            if c == 0 {
                continue;
            }
            let b = self
                .binding(s)
                .ok_or_else(|| format!("`{}` is not bound in `{e}`", s.name()))?;
            v = c
                .checked_mul(b)
                .and_then(|t| v.checked_add(t))
                .ok_or_else(|| format!("`{e}` overflows"))?;
        }
        Ok(v)
    }

    /// An expression that must be a size or a row index.
    fn eval_usize(&self, e: &Expr) -> Check<usize> {
        let v = self.eval(e)?;
        usize::try_from(v).map_err(|_| format!("`{e}` = {v} is negative"))
    }

    fn shape(&self, t: &Type) -> Check<Vec<usize>> {
        t.shape.iter().map(|e| self.eval_usize(e)).collect()
    }

    fn value_view(&self, name: &str) -> Check<View<'_>> {
        self.values
            .get(name)
            .map(Tensor::view)
            .ok_or_else(|| format!("%{name} is not defined"))
    }

    /// A constant's data, checked against its declaration.
    fn const_view(&self, name: &str) -> Check<View<'m>> {
        let decl = self
            .module
            .const_decl(name)
            .ok_or_else(|| format!("constant @{name} is not declared"))?;
        let shape = decl
            .ty
            .static_dims()
            .ok_or_else(|| format!("constant @{name} has a non-static type {}", decl.ty))?;
        let data = self
            .consts
            .get(name)
            .ok_or_else(|| format!("constant @{name} has no data"))?;
        if data.elem() != decl.ty.elem || count(&shape) != Some(data.len()) {
            return Err(format!(
                "constant @{name} is declared {} but its data is {} x {}",
                decl.ty,
                data.len(),
                data.elem().name()
            ));
        }
        Ok(View {
            shape,
            data: Data::of(data),
        })
    }

    fn operand(&self, o: &Operand) -> Check<View<'_>> {
        match o {
            Operand::Value(v) => self.value_view(v),
            Operand::Const(c) => self.const_view(c),
            Operand::Buffer { name, len } => {
                let b = self
                    .buffers
                    .get(name)
                    .ok_or_else(|| format!("buffer ${name} is not declared"))?;
                let rows = self.eval_usize(len)?;
                if rows > b.shape[0] {
                    return Err(format!(
                        "reads rows ..{len} = ..{rows} of ${name}, which has {}",
                        b.shape[0]
                    ));
                }
                let mut shape = b.shape.clone();
                shape[0] = rows;
                let n = count(&shape).unwrap_or(0);
                Ok(View {
                    shape,
                    data: Data::of(&b.data).prefix(n),
                })
            }
        }
    }

    /// A scalar f32 constant (gates, residual scales).
    fn scalar(&self, name: &str) -> Check<f32> {
        let ([], v) = self.const_view(name)?.f32::<0>(&format!("@{name}"))?;
        v.first()
            .copied()
            .ok_or_else(|| format!("@{name} has no value"))
    }

    /// Runs one instruction; returns the value it defines, checked against its declared type.
    fn exec(&mut self, inst: &Inst) -> Check<Option<Tensor>> {
        if let Op::Store { value, buffer, at } = &inst.op {
            if inst.result.is_some() {
                return Err("`store` defines no value".into());
            }
            return self.store(value, buffer, at).map(|()| None);
        }
        let Some(result) = &inst.result else {
            return Err("the op's result is not named".into());
        };
        if self.values.contains_key(&result.name) {
            return Err(format!("%{} is defined twice", result.name));
        }
        let declared = self.shape(&result.ty)?;
        let out = match &inst.op {
            Op::Embed { table, ids, scale } => {
                embed(&self.const_view(table)?, &self.value_view(ids)?, *scale)?
            }
            Op::Concat { parts } => {
                let views = parts
                    .iter()
                    .map(|p| self.operand(p))
                    .collect::<Check<Vec<_>>>()?;
                concat(&views)?
            }
            Op::MatMul { x, w } => matmul(&self.value_view(x)?, &self.const_view(w)?)?,
            Op::Reshape { x } => reshape(&self.value_view(x)?, declared.clone())?,
            Op::ZcRmsNorm { x, scale } => {
                let g = self.const_view(scale)?.f32::<1>(&format!("@{scale}"))?.1;
                let plus1: Vec<f32> = g.iter().map(|&g| zc_norm_scale(g)).collect();
                norm(&self.value_view(x)?, Some(&plus1))?
            }
            Op::RmsNorm { x, scale } => {
                let s = match scale {
                    Some(s) => Some(self.const_view(s)?.f32::<1>(&format!("@{s}"))?.1),
                    None => None,
                };
                norm(&self.value_view(x)?, s)?
            }
            Op::Rope { x, table, start } => rope(
                &self.value_view(x)?,
                &self.const_view(table)?,
                self.eval(start)?,
            )?,
            Op::Attention { q, kv } => {
                let blocks = kv
                    .iter()
                    .map(|(k, v)| Ok((self.operand(k)?, self.operand(v)?)))
                    .collect::<Check<Vec<_>>>()?;
                attention(&self.value_view(q)?, &blocks)?
            }
            Op::GatedResidual { x, y, gate } => {
                let s = gate_scale(self.scalar(gate)?);
                residual(&self.value_view(x)?, &self.value_view(y)?, s)?
            }
            Op::Residual { x, y, scale } => residual(
                &self.value_view(x)?,
                &self.value_view(y)?,
                self.scalar(scale)?,
            )?,
            Op::Logits { x, table } => logits(&self.value_view(x)?, &self.const_view(table)?)?,
            Op::ArgmaxMasked { logits, allowed } => {
                argmax_masked(&self.value_view(logits)?, &self.value_view(allowed)?)?
            }
            // Handled above; kept as an error rather than a panic path.
            Op::Store { .. } => return Err("`store` defines no value".into()),
        };
        if out.elem() != result.ty.elem || out.shape != declared {
            return Err(format!(
                "declared {} = {}{} but the op computes {}{}",
                result.ty,
                result.ty.elem.name(),
                shape_text(&declared),
                out.elem().name(),
                shape_text(&out.shape)
            ));
        }
        Ok(Some(out))
    }

    /// `store %value -> $buffer[at..]`.
    fn store(&mut self, value: &str, buffer: &str, at: &Expr) -> Check<()> {
        let at_row = self.eval_usize(at)?;
        let v = self
            .values
            .get(value)
            .ok_or_else(|| format!("%{value} is not defined"))?;
        let b = self
            .buffers
            .get_mut(buffer)
            .ok_or_else(|| format!("buffer ${buffer} is not declared"))?;
        if v.elem() != b.elem() || v.shape.is_empty() || v.shape[1..] != b.shape[1..] {
            return Err(format!(
                "stores {}{} into ${buffer} : {}{}, whose rows differ",
                v.elem().name(),
                shape_text(&v.shape),
                b.elem().name(),
                shape_text(&b.shape)
            ));
        }
        let end = at_row.saturating_add(v.shape[0]);
        if end > b.shape[0] {
            return Err(format!(
                "writes rows {at_row}..{end} of ${buffer}, which has {}",
                b.shape[0]
            ));
        }
        let row = count(&b.shape[1..]).unwrap_or(0);
        let start = at_row * row;
        let range = start..start + v.data.len();
        let bad = || format!("rows {at_row}..{end} do not fit ${buffer}'s data");
        match (&mut b.data, &v.data) {
            (ConstData::F32(d), ConstData::F32(s)) => {
                d.get_mut(range).ok_or_else(bad)?.copy_from_slice(s)
            }
            (ConstData::I32(d), ConstData::I32(s)) => {
                d.get_mut(range).ok_or_else(bad)?.copy_from_slice(s)
            }
            (ConstData::U8(d), ConstData::U8(s)) => {
                d.get_mut(range).ok_or_else(bad)?.copy_from_slice(s)
            }
            _ => return Err("element types differ".into()),
        }
        Ok(())
    }
}

/// `embed`: rows `table[ids] * scale`.
fn embed(table: &View, ids: &View, scale: f32) -> Check<Tensor> {
    let ([v, d], t) = table.f32::<2>("embedding table")?;
    let (Data::I32(ids), [n]) = (ids.data, ids.shape.as_slice()) else {
        return Err(format!(
            "ids are {}, expected i32 of rank 1",
            ids.describe()
        ));
    };
    let mut out = Vec::with_capacity(n * d);
    for &id in ids {
        let row = usize::try_from(id)
            .ok()
            .filter(|&r| r < v)
            .ok_or_else(|| format!("token id {id} is outside the table's {v} rows"))?;
        out.extend(t[row * d..(row + 1) * d].iter().map(|x| x * scale));
    }
    Ok(Tensor::f32(vec![*n, d], out))
}

/// `concat`: along the first axis.
fn concat(parts: &[View]) -> Check<Tensor> {
    let first = parts.first().ok_or("concat of nothing")?;
    if first.shape.is_empty() {
        return Err("concat of scalars".into());
    }
    let mut shape = first.shape.clone();
    shape[0] = 0;
    let mut data = match first.data {
        Data::F32(_) => ConstData::F32(Vec::new()),
        Data::I32(_) => ConstData::I32(Vec::new()),
        Data::U8(_) => ConstData::U8(Vec::new()),
    };
    for p in parts {
        if p.shape.is_empty() || p.shape[1..] != first.shape[1..] {
            return Err(format!(
                "concat of {} and {}: the rows differ",
                first.describe(),
                p.describe()
            ));
        }
        shape[0] += p.shape[0];
        match (&mut data, p.data) {
            (ConstData::F32(d), Data::F32(s)) => d.extend_from_slice(s),
            (ConstData::I32(d), Data::I32(s)) => d.extend_from_slice(s),
            (ConstData::U8(d), Data::U8(s)) => d.extend_from_slice(s),
            _ => {
                return Err(format!(
                    "concat of {} and {}: element types differ",
                    first.describe(),
                    p.describe()
                ))
            }
        }
    }
    Ok(Tensor { shape, data })
}

/// `matmul`: `x @ w`, w stored `(in, out)`.
fn matmul(x: &View, w: &View) -> Check<Tensor> {
    let ([n, k], xs) = x.f32::<2>("x")?;
    let ([k2, m], ws) = w.f32::<2>("weight")?;
    if k != k2 {
        return Err(format!("x has {k} columns but the weight has {k2} rows"));
    }
    let mut out = vec![0.0f32; n * m];
    for i in 0..n {
        let o = &mut out[i * m..(i + 1) * m];
        // Row-major accumulation: out row i += x[i][j] * w row j (walks w contiguously).
        for j in 0..k {
            let a = xs[i * k + j];
            for (o, &b) in o.iter_mut().zip(&ws[j * m..(j + 1) * m]) {
                *o += a * b;
            }
        }
    }
    Ok(Tensor::f32(vec![n, m], out))
}

/// `reshape`: same data, rows kept, the rest re-split as declared.
fn reshape(x: &View, declared: Vec<usize>) -> Check<Tensor> {
    let same = !x.shape.is_empty()
        && declared.first() == x.shape.first()
        && count(&declared) == Some(x.data.len());
    if !same {
        return Err(format!(
            "cannot reshape {} to {}: rows must stay and the element count too",
            x.describe(),
            shape_text(&declared)
        ));
    }
    let data = match x.data {
        Data::F32(v) => ConstData::F32(v.to_vec()),
        Data::I32(v) => ConstData::I32(v.to_vec()),
        Data::U8(v) => ConstData::U8(v.to_vec()),
    };
    Ok(Tensor {
        shape: declared,
        data,
    })
}

/// RMS norm over the last axis, times `scale` when given (ZCRMSNorm passes `1 + g`).
fn norm(x: &View, scale: Option<&[f32]>) -> Check<Tensor> {
    let (w, xs) = x.f32_rows("x")?;
    if let Some(s) = scale {
        if s.len() != w {
            return Err(format!(
                "the scale has {} values but x is {}",
                s.len(),
                x.describe()
            ));
        }
    }
    let mut out = xs.to_vec();
    if w == 0 {
        return Ok(Tensor::f32(x.shape.clone(), out));
    }
    for row in out.chunks_exact_mut(w) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / w as f32;
        let inv = 1.0 / (mean_sq + NORM_EPS).sqrt();
        match scale {
            Some(s) => row.iter_mut().zip(s).for_each(|(v, s)| *v = *v * inv * s),
            None => row.iter_mut().for_each(|v| *v *= inv),
        }
    }
    Ok(Tensor::f32(x.shape.clone(), out))
}

/// `rope`: row `i` of `x [n, heads, h]` rotated by table row `start + i`, whose first `h/2`
/// values are the cosines and the next `h/2` the sines; within a head, value `j` of the first
/// half pairs with value `j` of the second half.
fn rope(x: &View, table: &View, start: i64) -> Check<Tensor> {
    let ([n, heads, h], xs) = x.f32::<3>("x")?;
    let ([rows, h2], t) = table.f32::<2>("rope table")?;
    if h != h2 || h % 2 != 0 {
        return Err(format!(
            "head width {h} is odd or differs from the table's {h2}"
        ));
    }
    let first =
        usize::try_from(start).map_err(|_| format!("start position {start} is negative"))?;
    if first.checked_add(n).is_none_or(|end| end > rows) {
        return Err(format!(
            "uses table rows {first}..{} but the table has {rows}",
            first.saturating_add(n)
        ));
    }
    let half = h / 2;
    let mut out = xs.to_vec();
    for i in 0..n {
        let r = &t[(first + i) * h..(first + i + 1) * h];
        let (cos, sin) = r.split_at(half);
        for hd in 0..heads {
            let base = (i * heads + hd) * h;
            for j in 0..half {
                let (x1, x2) = (xs[base + j], xs[base + half + j]);
                out[base + j] = x1 * cos[j] - x2 * sin[j];
                out[base + half + j] = x2 * cos[j] + x1 * sin[j];
            }
        }
    }
    Ok(Tensor::f32(x.shape.clone(), out))
}

/// `attention`: for every query row and head, a softmax over the keys of all blocks together
/// (scores `dot(q, k) / sqrt(h)`), then the weighted sum of the values. Query head `i` reads KV
/// head `i / (H/K)`.
fn attention(q: &View, blocks: &[(View, View)]) -> Check<Tensor> {
    let ([n, heads, h], qs) = q.f32::<3>("q")?;
    if blocks.is_empty() {
        return Err("attends to no K/V block".into());
    }
    let mut kv_heads = None;
    let mut keys = 0usize;
    let mut parsed = Vec::with_capacity(blocks.len());
    for (i, (k, v)) in blocks.iter().enumerate() {
        let ([km, kh, kd], ks) = k.f32::<3>(&format!("block {i} k"))?;
        let ([vm, vh, vd], vs) = v.f32::<3>(&format!("block {i} v"))?;
        if km != vm || kh != vh || kd != h || vd != h {
            return Err(format!(
                "block {i}: k {} and v {} must be [rows, kv_heads, {h}] alike",
                k.describe(),
                v.describe()
            ));
        }
        if kv_heads.is_some_and(|kvh| kvh != kh) {
            return Err(format!(
                "block {i} has {kh} KV heads, an earlier one differs"
            ));
        }
        kv_heads = Some(kh);
        keys += km;
        parsed.push((km, ks, vs));
    }
    let kv_heads = kv_heads.unwrap_or(0);
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(format!(
            "{heads} query heads do not split into groups over {kv_heads} KV heads"
        ));
    }
    if keys == 0 && n > 0 {
        return Err("no keys to attend to: the softmax is undefined".into());
    }
    let group = heads / kv_heads;
    let scale = 1.0 / (h as f32).sqrt();
    let mut out = vec![0.0f32; n * heads * h];
    let mut scores = vec![0.0f32; keys];
    for r in 0..n {
        for hd in 0..heads {
            let kvh = hd / group;
            let qv = &qs[(r * heads + hd) * h..(r * heads + hd + 1) * h];
            let mut s = scores.iter_mut();
            for &(m, ks, _) in &parsed {
                for j in 0..m {
                    let kv = &ks[(j * kv_heads + kvh) * h..(j * kv_heads + kvh + 1) * h];
                    let dot: f32 = qv.iter().zip(kv).map(|(a, b)| a * b).sum();
                    if let Some(slot) = s.next() {
                        *slot = dot * scale;
                    }
                }
            }
            softmax(&mut scores);
            let o = &mut out[(r * heads + hd) * h..(r * heads + hd + 1) * h];
            let mut p = scores.iter();
            for &(m, _, vs) in &parsed {
                for j in 0..m {
                    let w = p.next().copied().unwrap_or(0.0);
                    let vv = &vs[(j * kv_heads + kvh) * h..(j * kv_heads + kvh + 1) * h];
                    for (o, &v) in o.iter_mut().zip(vv) {
                        *o += w * v;
                    }
                }
            }
        }
    }
    Ok(Tensor::f32(q.shape.clone(), out))
}

/// Max-subtracted softmax in place, as the reference.
fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// `x + s * y`.
fn residual(x: &View, y: &View, s: f32) -> Check<Tensor> {
    let (Data::F32(xs), Data::F32(ys)) = (x.data, y.data) else {
        return Err(format!("adds {} to {}", y.describe(), x.describe()));
    };
    if x.shape != y.shape {
        return Err(format!("adds {} to {}", y.describe(), x.describe()));
    }
    let out = xs.iter().zip(ys).map(|(a, b)| a + s * b).collect();
    Ok(Tensor::f32(x.shape.clone(), out))
}

/// `logits`: `x @ table^T`.
fn logits(x: &View, table: &View) -> Check<Tensor> {
    let ([n, d], xs) = x.f32::<2>("x")?;
    let ([v, d2], t) = table.f32::<2>("table")?;
    if d != d2 {
        return Err(format!("x has {d} columns but the table has {d2}"));
    }
    let mut out = Vec::with_capacity(n * v);
    for i in 0..n {
        let row = &xs[i * d..(i + 1) * d];
        for e in 0..v {
            out.push(
                row.iter()
                    .zip(&t[e * d..(e + 1) * d])
                    .map(|(a, b)| a * b)
                    .sum(),
            );
        }
    }
    Ok(Tensor::f32(vec![n, v], out))
}

/// `argmax_masked` (see [`Op::ArgmaxMasked`]): per row, the id of the largest logit among the
/// `allowed` ids, ties to the lowest id and a NaN counting as the largest (the first NaN in
/// list order wins, as in the library's kernel), ids outside the vocabulary skipped (-1 when
/// none is left); no ids at all is the unconstrained argmax, numpy's first maximum.
fn argmax_masked(logits: &View, allowed: &View) -> Check<Tensor> {
    let ([n, v], ls) = logits.f32::<2>("logits")?;
    let (Data::I32(ids), [_]) = (allowed.data, allowed.shape.as_slice()) else {
        return Err(format!(
            "allowed is {}, expected i32 ids of rank 1",
            allowed.describe()
        ));
    };
    if v == 0 {
        return Err("argmax over an empty vocabulary".into());
    }
    let candidates: Vec<usize> = if ids.is_empty() {
        (0..v).collect()
    } else {
        ids.iter()
            .filter_map(|&id| usize::try_from(id).ok().filter(|&id| id < v))
            .collect()
    };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let row = &ls[i * v..(i + 1) * v];
        let mut best: Option<usize> = None;
        for &j in &candidates {
            let x = row[j];
            let better = match best {
                None => true,
                Some(b) => {
                    let bv = row[b];
                    !bv.is_nan() && (x.is_nan() || x > bv || (x == bv && j < b))
                }
            };
            if better {
                best = Some(j);
            }
        }
        let id = match best {
            Some(j) => i32::try_from(j).map_err(|_| format!("index {j} does not fit i32"))?,
            None => -1,
        };
        out.push(id);
    }
    Ok(Tensor::i32(vec![n], out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_sample::SAMPLE;
    use crate::{parse, run_pipeline, ConstKind, PIPELINE};

    /// A module from text and a store from `(name, data)` pairs.
    fn setup(text: &str, data: &[(&str, ConstData)]) -> (Module, ConstStore) {
        let m = parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let mut store = ConstStore::default();
        for (name, d) in data {
            store.insert(*name, d.clone());
        }
        (m, store)
    }

    fn f32s(t: &Tensor) -> &[f32] {
        t.as_f32().unwrap_or_else(|| panic!("not f32: {t:?}"))
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{got:?} vs {want:?}"
            );
        }
    }

    const DENSE: &str = "\
needle_ir v1
const @emb : f32[3,2] weight plain
const @w : f32[2,3] weight plain
func @f(%ids: i32[2]) {
  %x = embed @emb, %ids, scale=2.0 : f32[2,2]
  %y = matmul %x, @w : f32[2,3]
  %l = logits %x, @emb : f32[2,3]
  %yh = reshape %y : f32[2,3,1]
  return %yh, %l
}
";

    fn dense_data() -> Vec<(&'static str, ConstData)> {
        vec![
            ("emb", ConstData::F32(vec![1., 2., 3., 4., 5., 6.])),
            ("w", ConstData::F32(vec![1., 0., 1., 0., 1., -1.])),
        ]
    }

    #[test]
    fn embed_matmul_logits_reshape() {
        let (m, store) = setup(DENSE, &dense_data());
        let mut it = Interpreter::new(&m, &store).unwrap();
        let out = it
            .call("f", &[Tensor::i32(vec![2], vec![2, 0])], &[])
            .unwrap();
        // x = 2 * [emb[2], emb[0]] = [[10, 12], [2, 4]].
        assert_eq!(f32s(it.value("x").unwrap()), [10., 12., 2., 4.]);
        // x @ [[1, 0, 1], [0, 1, -1]].
        assert_eq!(out[0].shape, [2, 3, 1]);
        assert_eq!(f32s(&out[0]), [10., 12., -2., 2., 4., -2.]);
        // x @ emb^T.
        assert_eq!(f32s(&out[1]), [34., 78., 122., 10., 22., 34.]);
    }

    #[test]
    fn residuals_apply_the_gate_or_the_scale() {
        let text = "\
needle_ir v1
const @g : f32[] weight plain
const @s : f32[] weight plain
func @f(%x: f32[1,2], %y: f32[1,2]) {
  %a = gated_residual %x, %y, @g : f32[1,2]
  %b = residual %x, %y, @s : f32[1,2]
  return %a, %b
}
";
        let (m, store) = setup(
            text,
            &[
                ("g", ConstData::F32(vec![0.])),
                ("s", ConstData::F32(vec![2.])),
            ],
        );
        let mut it = Interpreter::new(&m, &store).unwrap();
        let (x, y) = (
            Tensor::f32(vec![1, 2], vec![1., 2.]),
            Tensor::f32(vec![1, 2], vec![4., 6.]),
        );
        let out = it.call("f", &[x, y], &[]).unwrap();
        // sigmoid(0) = 1/2.
        assert_eq!(f32s(&out[0]), [3., 5.]);
        assert_eq!(f32s(&out[1]), [9., 14.]);
    }

    #[test]
    fn norms_over_the_last_axis() {
        let text = "\
needle_ir v1
const @g : f32[2] weight plain
const @s : f32[2] weight plain
func @f(%x: f32[2,2], %y: f32[1,4]) {
  %z = zcrmsnorm %x, @g : f32[2,2]
  %r = rmsnorm %x : f32[2,2]
  %rs = rmsnorm %x, @s : f32[2,2]
  %h = reshape %y : f32[1,2,2]
  %hn = rmsnorm %h : f32[1,2,2]
  return %z, %r, %rs
}
";
        let (m, store) = setup(
            text,
            &[
                ("g", ConstData::F32(vec![0.5, -1.])),
                ("s", ConstData::F32(vec![2., 1.])),
            ],
        );
        let mut it = Interpreter::new(&m, &store).unwrap();
        let x = Tensor::f32(vec![2, 2], vec![3., 4., 0., 2.]);
        let y = Tensor::f32(vec![1, 4], vec![3., 4., 0., 2.]);
        let out = it.call("f", &[x, y], &[]).unwrap();
        // Row [3, 4]: mean square 12.5; row [0, 2]: 2.
        let (a, b) = (1. / 12.5f32.sqrt(), 1. / 2f32.sqrt());
        assert_close(f32s(&out[0]), &[3. * a * 1.5, 0., 0., 0.]);
        assert_close(f32s(&out[1]), &[3. * a, 4. * a, 0., 2. * b]);
        assert_close(f32s(&out[2]), &[6. * a, 4. * a, 0., 2. * b]);
        // Per head, not over the whole row of 4.
        assert_close(f32s(it.value("hn").unwrap()), &[3. * a, 4. * a, 0., 2. * b]);
    }

    const ROPE: &str = "\
needle_ir v1
dim p in 0..=3
const @rope : f32[2,4] rope_table plain
func @f(%x: f32[1,1,4]) {
  %r = rope %x, @rope, start=p : f32[1,1,4]
  return %r
}
";

    #[test]
    fn rope_rotates_pairs_of_halves_by_the_row_at_start() {
        // Row 0: cos [1, 1], sin [0, 0] (identity). Row 1: cos [0, 1], sin [1, 0]: the first
        // pair turns by a quarter, the second not at all.
        let table = ConstData::F32(vec![1., 1., 0., 0., 0., 1., 1., 0.]);
        let (m, store) = setup(ROPE, &[("rope", table)]);
        let mut it = Interpreter::new(&m, &store).unwrap();
        let x = || Tensor::f32(vec![1, 1, 4], vec![1., 2., 3., 4.]);
        let out = it.call("f", &[x()], &[(Sym::P, 0)]).unwrap();
        assert_eq!(f32s(&out[0]), [1., 2., 3., 4.]);
        // (x1, x2) = (1, 3) -> (x1 cos - x2 sin, x2 cos + x1 sin) = (-3, 1).
        let out = it.call("f", &[x()], &[(Sym::P, 1)]).unwrap();
        assert_eq!(f32s(&out[0]), [-3., 2., 1., 4.]);
        let e = it.call("f", &[x()], &[(Sym::P, 2)]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("in @f, %r = rope: uses table rows 2..3 but the table has 2"),
            "{e}"
        );
        // `p` does not carry over from the last call.
        let e = it.call("f", &[x()], &[]).unwrap_err();
        assert!(e.message.contains("`p` is not bound"), "{e}");
        let e = it.call("f", &[x()], &[(Sym::P, 4)]).unwrap_err();
        assert!(
            e.message.contains("outside its declared range 0..=3"),
            "{e}"
        );
    }

    #[test]
    fn attention_is_one_softmax_over_all_blocks_with_grouped_heads() {
        let text = "\
needle_ir v1
dim p in 0..=1
const @k0 : f32[1,1,1] weight plain
const @v0 : f32[1,1,1] weight plain
buffer $kc : f32[2,1,1]
buffer $vc : f32[2,1,1]
func @f(%q: f32[1,2,1], %k: f32[1,1,1], %v: f32[1,1,1]) {
  store %k -> $kc[p..]
  store %v -> $vc[p..]
  %a = attention %q, (@k0, @v0), ($kc[..p+1], $vc[..p+1]) : f32[1,2,1]
  return %a
}
";
        let (m, store) = setup(
            text,
            &[
                ("k0", ConstData::F32(vec![0.])),
                ("v0", ConstData::F32(vec![10.])),
            ],
        );
        let mut it = Interpreter::new(&m, &store).unwrap();
        let t = |v: Vec<f32>| Tensor::f32(vec![1, v.len(), 1], v);
        let ln3 = 3f32.ln();
        // Head width 1: scores are q*k. Head 0 (q = 1) sees scores [0, ln 3]: weights 1/4, 3/4;
        // head 1 (q = 0) weighs both keys equally. Both read the single KV head.
        let out = it
            .call(
                "f",
                &[t(vec![1., 0.]), t(vec![ln3]), t(vec![20.])],
                &[(Sym::P, 0)],
            )
            .unwrap();
        assert_close(f32s(&out[0]), &[17.5, 15.]);
        // The buffer keeps row 0: now keys [0, ln 3, 0] with values [10, 20, 40].
        let out = it
            .call(
                "f",
                &[t(vec![1., 0.]), t(vec![0.]), t(vec![40.])],
                &[(Sym::P, 1)],
            )
            .unwrap();
        assert_close(f32s(&out[0]), &[22., 70. / 3.]);
        assert_eq!(f32s(it.buffer("vc").unwrap()), [20., 40.]);
    }

    #[test]
    fn argmax_takes_the_first_maximum_among_the_allowed() {
        let text = "\
needle_ir v1
dim a in 0..=5
func @f(%l: f32[1,5], %allowed: i32[a]) {
  %n = argmax_masked %l, %allowed : i32[1]
  return %n
}
";
        let (m, store) = setup(text, &[]);
        let mut it = Interpreter::new(&m, &store).unwrap();
        let mut argmax = |l: [f32; 5], ids: &[i32]| {
            let out = it
                .call(
                    "f",
                    &[
                        Tensor::f32(vec![1, 5], l.to_vec()),
                        Tensor::i32(vec![ids.len()], ids.to_vec()),
                    ],
                    &[],
                )
                .unwrap();
            assert_eq!(it.binding(Sym::A), Some(ids.len() as i64));
            out[0].as_i32().unwrap()[0]
        };
        let l = [1., 3., 3., 2., 3.];
        assert_eq!(argmax(l, &[0, 1, 2, 3, 4]), 1);
        assert_eq!(argmax(l, &[0, 2, 3, 4]), 2);
        assert_eq!(argmax(l, &[0, 3]), 3);
        // One allowed id (a forced step): that id, whatever the logits.
        assert_eq!(argmax(l, &[0]), 0);
        // Ties go to the lowest id, whatever the list's order.
        assert_eq!(argmax(l, &[4, 2]), 2);
        // No list: an unconstrained step, the first maximum.
        assert_eq!(argmax(l, &[]), 1);
        // Ids outside the vocabulary are skipped, as the library's kernel does; none left: -1.
        assert_eq!(argmax(l, &[-1, 3, 7]), 3);
        assert_eq!(argmax(l, &[5, -2]), -1);
        // A NaN is the maximum, as in numpy.
        assert_eq!(
            argmax([1., f32::NAN, 5., f32::NAN, 0.], &[0, 1, 2, 3, 4]),
            1
        );
    }

    #[test]
    fn concat_binds_q_from_the_argument_and_checks_its_range() {
        let text = "\
needle_ir v1
dim q in 0..=4
const @tools : i32[2] tool_tokens plain
func @f(%query: i32[q]) {
  %ids = concat %query, @tools : i32[q+2]
  return %ids
}
";
        let (m, store) = setup(text, &[("tools", ConstData::I32(vec![5, 6]))]);
        let mut it = Interpreter::new(&m, &store).unwrap();
        let out = it
            .call("f", &[Tensor::i32(vec![3], vec![7, 8, 9])], &[])
            .unwrap();
        assert_eq!(out[0], Tensor::i32(vec![5], vec![7, 8, 9, 5, 6]));
        assert_eq!(it.binding(Sym::Q), Some(3));
        // A new query rebinds q.
        let out = it.call("f", &[Tensor::i32(vec![1], vec![7])], &[]).unwrap();
        assert_eq!(out[0].shape, [3]);
        let e = it
            .call("f", &[Tensor::i32(vec![5], vec![0; 5])], &[])
            .unwrap_err();
        assert!(e.message.contains("q = 5 is outside"), "{e}");
        let e = it
            .call("f", &[Tensor::i32(vec![2], vec![0; 2])], &[(Sym::Q, 3)])
            .unwrap_err();
        assert!(
            e.message.contains("has shape [2], declared i32[q] = [3]"),
            "{e}"
        );
    }

    #[test]
    fn bad_modules_and_inputs_are_errors() {
        let (m, store) = setup(DENSE, &dense_data());
        let mut it = Interpreter::new(&m, &store).unwrap();
        let ids = |v: Vec<i32>| Tensor::i32(vec![v.len()], v);
        let e = it.call("f", &[ids(vec![3, 0])], &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "in @f, %x = embed: token id 3 is outside the table's 3 rows"
        );
        let e = it.call("f", &[ids(vec![-1, 0])], &[]).unwrap_err();
        assert!(e.message.contains("token id -1"), "{e}");
        let e = it.call("g", &[], &[]).unwrap_err();
        assert_eq!(e.to_string(), "in the module: no function @g");
        let e = it
            .call("f", &[Tensor::f32(vec![2], vec![0., 0.])], &[])
            .unwrap_err();
        assert!(e.message.contains("is f32[2], declared i32[2]"), "{e}");
        let e = it
            .call("f", &[Tensor::i32(vec![2], vec![0])], &[])
            .unwrap_err();
        assert!(e.message.contains("shape [2] but 1 elements"), "{e}");

        // A declared type that is not what the op computes.
        let bad = DENSE.replace("@w : f32[2,3]\n  %l", "@w : f32[2,4]\n  %l");
        let (m, store) = setup(&bad, &dense_data());
        let e = Interpreter::new(&m, &store)
            .unwrap()
            .call("f", &[ids(vec![0, 0])], &[])
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("in @f, %y = matmul: declared f32[2,4] = f32[2,4] but the op"),
            "{e}"
        );

        // Missing or mis-sized data.
        let (m, store) = setup(DENSE, &dense_data()[..1]);
        let e = Interpreter::new(&m, &store)
            .unwrap()
            .call("f", &[ids(vec![0, 0])], &[])
            .unwrap_err();
        assert_eq!(e.message, "constant @w has no data");
        let (m, store) = setup(DENSE, &[("emb", ConstData::F32(vec![0.; 5]))]);
        let e = Interpreter::new(&m, &store)
            .unwrap()
            .call("f", &[ids(vec![0, 0])], &[])
            .unwrap_err();
        assert!(
            e.message
                .contains("declared f32[3,2] but its data is 5 x f32"),
            "{e}"
        );

        // Storing past a buffer's end.
        let text = "\
needle_ir v1
dim p in 0..=9
buffer $b : f32[2,1]
func @f(%x: f32[1,1]) {
  store %x -> $b[p..]
  return
}
";
        let (m, store) = setup(text, &[]);
        let mut it = Interpreter::new(&m, &store).unwrap();
        let x = Tensor::f32(vec![1, 1], vec![1.]);
        it.call("f", std::slice::from_ref(&x), &[(Sym::P, 1)])
            .unwrap();
        let e = it.call("f", &[x], &[(Sym::P, 2)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "in @f, store: writes rows 2..3 of $b, which has 2"
        );
        let huge = "needle_ir v1\nbuffer $b : f32[1000000000,1000000000]\n";
        let (m, store) = setup(huge, &[]);
        assert!(Interpreter::new(&m, &store).is_err());
    }

    /// Data for every constant of the sample module: small values that vary, valid ids.
    fn sample_store(m: &Module) -> ConstStore {
        let mut store = ConstStore::default();
        for (k, c) in m.consts.iter().enumerate() {
            let n: usize = c.ty.static_dims().unwrap().iter().product();
            let data = match (c.kind, c.ty.elem) {
                (ConstKind::ToolTokens, _) => {
                    ConstData::I32((0..n as i32).map(|i| 5 + i).collect())
                }
                (_, ElemType::F32) => ConstData::F32(
                    (0..n)
                        .map(|i| ((k * 131 + i * 17) % 23) as f32 / 11.5 - 1.0)
                        .collect(),
                ),
                (_, ElemType::I32) => ConstData::I32(vec![1; n]),
                (_, ElemType::U8) => ConstData::U8(vec![1; n]),
            };
            store.insert(c.name.clone(), data);
        }
        store
    }

    /// Runs the sample's query and three decoder steps; returns the logits and tokens.
    fn run_sample(m: &Module, store: &ConstStore) -> Vec<(Vec<f32>, i32)> {
        let mut it = Interpreter::new(m, store).unwrap();
        it.call("encode_query", &[Tensor::i32(vec![2], vec![3, 9])], &[])
            .unwrap();
        let mut token = 1;
        let mut out = Vec::new();
        for p in 0..3 {
            // Unconstrained, then every id but 0 allowed, then ids 2..9.
            let ids: Vec<i32> = match p {
                0 => Vec::new(),
                1 => (1..16).collect(),
                _ => (2..9).collect(),
            };
            let allowed = Tensor::i32(vec![ids.len()], ids);
            let r = it
                .call(
                    "decoder_step",
                    &[Tensor::i32(vec![1], vec![token]), allowed.clone()],
                    &[(Sym::P, p)],
                )
                .unwrap();
            token = r[0].as_i32().unwrap()[0];
            out.push((f32s(it.value("logits").unwrap()).to_vec(), token));
        }
        out
    }

    /// The passes rewrite ops and constants but must not change what the module computes.
    #[test]
    fn the_pipeline_preserves_what_the_sample_computes() {
        let m = parse(SAMPLE).unwrap();
        let mut store = sample_store(&m);
        let before = run_sample(&m, &store);
        let out = run_pipeline(m, Some(&mut store), PIPELINE, |_, _| {}).unwrap();
        let after = run_sample(&out, &store);
        for ((lb, tb), (la, ta)) in before.iter().zip(&after) {
            assert_eq!(tb, ta);
            assert_close(la, lb);
        }
    }
}
