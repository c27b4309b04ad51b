//! The verifier: a module is well formed when names are unique and declared, every value is
//! defined before use, every op's operands have the types it needs and its declared result type
//! is the one it computes, row ranges stay inside their buffers and tables, and both entry points
//! exist. Errors name the function, the value and the op.

use std::collections::{BTreeSet, HashMap};

use crate::error::IrError;
use crate::module::{Function, Inst, Module, Op, Operand, DECODER_STEP, ENCODE_QUERY};
use crate::print::print_inst;
use crate::types::{ConstKind, ElemType, Expr, Storage, Sym, Type};

pub fn verify(m: &Module) -> Result<(), IrError> {
    let mut seen = BTreeSet::new();
    for d in &m.dims {
        if !seen.insert(d.sym) {
            return Err(IrError::module(
                format!("dim {}", d.sym.name()),
                "declared twice",
            ));
        }
        if d.min < 0 || d.min > d.max {
            return Err(IrError::module(
                format!("dim {}", d.sym.name()),
                format!("range {}..={} is empty or negative", d.min, d.max),
            ));
        }
    }
    let mut names = BTreeSet::new();
    for c in &m.consts {
        let what = format!("@{}", c.name);
        if !names.insert(c.name.as_str()) {
            return Err(IrError::module(what, "declared twice"));
        }
        let Some(dims) = c.ty.static_dims() else {
            return Err(IrError::module(
                what,
                format!("type {} is not static", c.ty),
            ));
        };
        let weight = c.kind == ConstKind::Weight && c.ty.elem == ElemType::F32;
        let ok = match c.storage {
            Storage::Plain => true,
            Storage::F16 => weight,
            // Groups run along the rows; a short last group is the reference's zero padding.
            Storage::I8 { group } | Storage::I4 { group } => {
                weight && dims.len() == 2 && group > 0 && group as usize <= dims[0]
            }
        };
        if !ok {
            return Err(IrError::module(
                what,
                format!(
                    "storage {} needs an f32 weight{}, not {} {}",
                    c.storage,
                    match c.storage {
                        Storage::I8 { .. } | Storage::I4 { .. } =>
                            " matrix with at least as many rows as its group",
                        _ => "",
                    },
                    c.kind.name(),
                    c.ty
                ),
            ));
        }
    }
    let mut names = BTreeSet::new();
    for b in &m.buffers {
        let what = format!("${}", b.name);
        if !names.insert(b.name.as_str()) {
            return Err(IrError::module(what, "declared twice"));
        }
        if b.ty.shape.is_empty() || b.ty.static_dims().is_none() {
            return Err(IrError::module(
                what,
                format!("type {} must be static with rows", b.ty),
            ));
        }
    }
    let mut names = BTreeSet::new();
    for f in &m.funcs {
        if !names.insert(f.name.as_str()) {
            return Err(IrError::module(
                format!("@{}", f.name),
                "function declared twice",
            ));
        }
        FuncVerifier {
            m,
            f,
            env: HashMap::new(),
        }
        .run()?;
    }
    check_entry_points(m)
}

/// The driver calls these two with fixed signatures; anything else is a lowering bug.
fn check_entry_points(m: &Module) -> Result<(), IrError> {
    let entry_err = |name: &str, message: String| IrError::in_func(name, None, message);
    let Some(enc) = m.func(ENCODE_QUERY) else {
        return Err(IrError::module(
            format!("@{ENCODE_QUERY}"),
            "entry point missing",
        ));
    };
    let query_ty = Type::new(ElemType::I32, vec![Expr::sym(Sym::Q)]);
    if enc.params.len() != 1 || enc.params[0].ty != query_ty || !enc.results.is_empty() {
        return Err(entry_err(
            ENCODE_QUERY,
            format!("must take one {query_ty} (the query ids) and return nothing"),
        ));
    }
    let Some(dec) = m.func(DECODER_STEP) else {
        return Err(IrError::module(
            format!("@{DECODER_STEP}"),
            "entry point missing",
        ));
    };
    let token_ty = Type::fixed(ElemType::I32, &[1]);
    let param_ok = dec.params.first().is_some_and(|p| p.ty == token_ty);
    let result_ty = dec.results.first().and_then(|r| {
        dec.params
            .iter()
            .find(|p| &p.name == r)
            .map(|p| &p.ty)
            .or_else(|| {
                dec.body
                    .iter()
                    .filter_map(|i| i.result.as_ref())
                    .find(|p| &p.name == r)
                    .map(|p| &p.ty)
            })
    });
    if !param_ok || dec.results.len() != 1 || result_ty != Some(&token_ty) {
        return Err(entry_err(
            DECODER_STEP,
            format!(
                "must take the token as its first parameter {token_ty} and return one {token_ty}"
            ),
        ));
    }
    Ok(())
}

struct FuncVerifier<'a> {
    m: &'a Module,
    f: &'a Function,
    env: HashMap<&'a str, Type>,
}

type Check<T> = Result<T, String>;

impl<'a> FuncVerifier<'a> {
    fn err(&self, inst: Option<&Inst>, message: impl Into<String>) -> IrError {
        IrError::in_func(&self.f.name, inst, message)
    }

    fn run(mut self) -> Result<(), IrError> {
        let f = self.f;
        for p in &f.params {
            self.check_type(&p.ty)
                .map_err(|e| self.err(None, format!("parameter %{}: {e}", p.name)))?;
            if self.env.insert(&p.name, p.ty.clone()).is_some() {
                return Err(self.err(None, format!("parameter %{} declared twice", p.name)));
            }
        }
        for inst in &f.body {
            self.check_inst(inst)
                .map_err(|e| self.err(Some(inst), format!("{e}\n  in: {}", print_inst(inst))))?;
            if let Some(r) = &inst.result {
                self.env.insert(&r.name, r.ty.clone());
            }
        }
        for r in &f.results {
            if !self.env.contains_key(r.as_str()) {
                return Err(self.err(None, format!("returns %{r}, which is not defined")));
            }
        }
        Ok(())
    }

    fn check_inst(&self, inst: &'a Inst) -> Check<()> {
        match (&inst.op, &inst.result) {
            (Op::Store { .. }, Some(_)) => return Err("`store` defines no value".into()),
            (Op::Store { .. }, None) => return self.check_store(&inst.op),
            (_, None) => return Err("the op's result is not named".into()),
            (_, Some(r)) => {
                if self.env.contains_key(r.name.as_str()) {
                    return Err(format!("%{} is defined twice", r.name));
                }
                self.check_type(&r.ty)?;
                let got = self.infer(&inst.op, &r.ty)?;
                if got != r.ty {
                    return Err(format!("declared {} but the op computes {got}", r.ty));
                }
            }
        }
        Ok(())
    }

    /// A type may use only declared symbols, and `encode_query` runs before any position exists.
    fn check_expr(&self, e: &Expr) -> Check<()> {
        for s in Sym::ALL {
            if e.coeff(s) == 0 {
                continue;
            }
            if !self.m.dims.iter().any(|d| d.sym == s) {
                return Err(format!("symbol `{}` has no `dim` declaration", s.name()));
            }
            if !s.in_encoder() && self.f.name == ENCODE_QUERY {
                return Err(format!(
                    "`{}` ({}) does not exist in encode_query",
                    s.name(),
                    s.meaning()
                ));
            }
        }
        Ok(())
    }

    fn check_type(&self, t: &Type) -> Check<()> {
        t.shape.iter().try_for_each(|e| self.check_expr(e))
    }

    fn range(&self, e: &Expr) -> (i128, i128) {
        e.range(|s| self.m.dim_bounds(s))
    }

    fn value(&self, name: &str) -> Check<&Type> {
        self.env
            .get(name)
            .ok_or_else(|| format!("%{name} is used before it is defined"))
    }

    fn constant(&self, name: &str) -> Check<&'a Type> {
        self.m
            .const_decl(name)
            .map(|c| &c.ty)
            .ok_or_else(|| format!("constant @{name} is not declared"))
    }

    fn operand(&self, o: &Operand) -> Check<Type> {
        match o {
            Operand::Value(v) => self.value(v).cloned(),
            Operand::Const(c) => self.constant(c).cloned(),
            Operand::Buffer { name, len } => {
                let b = self
                    .m
                    .buffer(name)
                    .ok_or_else(|| format!("buffer ${name} is not declared"))?;
                self.check_expr(len)?;
                let rows = b.ty.shape[0].as_static().unwrap_or(0);
                let (lo, hi) = self.range(len);
                if lo < 0 || hi > rows as i128 {
                    return Err(format!(
                        "reads rows ..{len} (up to {hi}) of ${name}, which has {rows}"
                    ));
                }
                let mut shape = b.ty.shape.clone();
                shape[0] = *len;
                Ok(Type::new(b.ty.elem, shape))
            }
        }
    }

    fn check_store(&self, op: &Op) -> Check<()> {
        let Op::Store { value, buffer, at } = op else {
            return Ok(());
        };
        let v = self.value(value)?;
        let b = self
            .m
            .buffer(buffer)
            .ok_or_else(|| format!("buffer ${buffer} is not declared"))?;
        self.check_expr(at)?;
        if v.elem != b.ty.elem || v.shape.is_empty() || v.shape[1..] != b.ty.shape[1..] {
            return Err(format!(
                "stores {v} into ${buffer} : {}, whose rows differ",
                b.ty
            ));
        }
        let rows = b.ty.shape[0].as_static().unwrap_or(0) as i128;
        let end = at.checked_add(v.shape[0]).ok_or("row range overflows")?;
        let (lo, _) = self.range(at);
        let (_, hi) = self.range(&end);
        if lo < 0 || hi > rows {
            return Err(format!(
                "writes rows {at}..{end} (up to {hi}) of ${buffer}, which has {rows}"
            ));
        }
        Ok(())
    }

    /// The type `op` computes; `declared` is consulted only by `reshape`, whose result type is
    /// its only attribute.
    fn infer(&self, op: &Op, declared: &Type) -> Check<Type> {
        match op {
            Op::Embed { table, ids, scale } => {
                let [v, d] = f32_dims::<2>("embedding table", self.constant(table)?)?;
                let [n] = dims_of::<1>("ids", ElemType::I32, self.value(ids)?)?;
                let _ = v;
                if !scale.is_finite() {
                    return Err(format!("scale {scale} is not finite"));
                }
                Ok(Type::f32(vec![n, d]))
            }
            Op::Concat { parts } => {
                let mut types = parts.iter().map(|p| self.operand(p));
                let first = types.next().ok_or("concat of nothing")??;
                if first.shape.is_empty() {
                    return Err("concat of scalars".into());
                }
                let mut rows = first.shape[0];
                for t in types {
                    let t = t?;
                    if t.elem != first.elem
                        || t.shape.is_empty()
                        || t.shape[1..] != first.shape[1..]
                    {
                        return Err(format!("concat of {first} and {t}: the rows differ"));
                    }
                    rows = rows.checked_add(t.shape[0]).ok_or("row count overflows")?;
                }
                let mut shape = first.shape.clone();
                shape[0] = rows;
                Ok(Type::new(first.elem, shape))
            }
            Op::MatMul { x, w } => {
                let [n, k] = f32_dims::<2>("x", self.value(x)?)?;
                let [k2, out] = f32_dims::<2>("weight", self.constant(w)?)?;
                if k != k2 {
                    return Err(format!("x has {k} columns but @{w} has {k2} rows"));
                }
                Ok(Type::f32(vec![n, out]))
            }
            Op::Reshape { x } => {
                let t = self.value(x)?;
                let count = |t: &Type| -> Option<i64> {
                    t.shape[1..]
                        .iter()
                        .try_fold(1i64, |acc, d| acc.checked_mul(d.as_static()?))
                };
                let same = t.elem == declared.elem
                    && !t.shape.is_empty()
                    && !declared.shape.is_empty()
                    && t.shape[0] == declared.shape[0]
                    && count(t).is_some()
                    && count(t) == count(declared);
                if !same {
                    return Err(format!(
                        "cannot reshape {t} to {declared}: rows must stay and the rest must be \
                         static with the same element count"
                    ));
                }
                Ok(declared.clone())
            }
            Op::ZcRmsNorm { x, scale }
            | Op::RmsNorm {
                x,
                scale: Some(scale),
            } => {
                let t = self.value(x)?;
                let [d] = f32_dims::<1>("scale", self.constant(scale)?)?;
                if t.elem != ElemType::F32 || t.shape.last() != Some(&d) {
                    return Err(format!("scale @{scale} has {d} values but x is {t}"));
                }
                Ok(t.clone())
            }
            Op::RmsNorm { x, scale: None } => {
                let t = self.value(x)?;
                if t.elem != ElemType::F32 || t.shape.is_empty() {
                    return Err(format!("x is {t}, not an f32 tensor with an axis"));
                }
                Ok(t.clone())
            }
            Op::Rope { x, table, start } => {
                let t = self.value(x)?;
                let [n, _heads, h] = f32_dims::<3>("x", t)?;
                let [positions, h2] = f32_dims::<2>("rope table", self.constant(table)?)?;
                self.check_expr(start)?;
                if h != h2 || h.as_static().is_none_or(|h| h % 2 != 0) {
                    return Err(format!(
                        "head width {h} is odd or differs from the table's {h2}"
                    ));
                }
                let end = start.checked_add(n).ok_or("position range overflows")?;
                let (lo, _) = self.range(start);
                let (_, hi) = self.range(&end);
                let positions = positions.as_static().unwrap_or(0) as i128;
                if lo < 0 || hi > positions {
                    return Err(format!(
                        "uses table rows {start}..{end} ({lo}..{hi} at the extremes), but \
                         @{table} has {positions}"
                    ));
                }
                Ok(t.clone())
            }
            Op::Attention { q, kv } => {
                let t = self.value(q)?;
                let [_n, heads, h] = f32_dims::<3>("q", t)?;
                if kv.is_empty() {
                    return Err("attends to no K/V block".into());
                }
                let mut kv_heads = None;
                for (i, (k, v)) in kv.iter().enumerate() {
                    let (kt, vt) = (self.operand(k)?, self.operand(v)?);
                    let [km, kh, kd] = f32_dims::<3>("k", &kt)?;
                    let [vm, vh, vd] = f32_dims::<3>("v", &vt)?;
                    if km != vm || kh != vh || kd != h || vd != h {
                        return Err(format!(
                            "block {i}: k {kt} and v {vt} must be [rows, kv_heads, {h}] alike"
                        ));
                    }
                    if kv_heads.is_some_and(|k| k != kh) {
                        return Err(format!(
                            "block {i} has {kh} KV heads, an earlier one differs"
                        ));
                    }
                    kv_heads = Some(kh);
                }
                let groups = heads.as_static().zip(kv_heads.and_then(|k| k.as_static()));
                if !groups.is_some_and(|(h, k)| k > 0 && h % k == 0) {
                    return Err(format!(
                        "{heads} query heads do not split into groups over the KV heads"
                    ));
                }
                Ok(t.clone())
            }
            Op::Store { .. } => Err("`store` defines no value".into()),
            Op::GatedResidual { x, y, gate: s } | Op::Residual { x, y, scale: s } => {
                let (tx, ty) = (self.value(x)?, self.value(y)?);
                f32_dims::<0>("gate", self.constant(s)?)?;
                if tx != ty || tx.elem != ElemType::F32 {
                    return Err(format!("adds {ty} to {tx}"));
                }
                Ok(tx.clone())
            }
            Op::Logits { x, table } => {
                let [n, d] = f32_dims::<2>("x", self.value(x)?)?;
                let [v, d2] = f32_dims::<2>("table", self.constant(table)?)?;
                if d != d2 {
                    return Err(format!("x has {d} columns but @{table} has {d2}"));
                }
                Ok(Type::f32(vec![n, v]))
            }
            Op::ArgmaxMasked { logits, allowed } => {
                let [n, _vocab] = f32_dims::<2>("logits", self.value(logits)?)?;
                dims_of::<1>("allowed ids", ElemType::I32, self.value(allowed)?)?;
                Ok(Type::new(ElemType::I32, vec![n]))
            }
        }
    }
}

fn dims_of<const N: usize>(what: &str, elem: ElemType, t: &Type) -> Check<[Expr; N]> {
    match <[Expr; N]>::try_from(t.shape.as_slice()) {
        Ok(dims) if t.elem == elem => Ok(dims),
        _ => Err(format!(
            "{what} is {t}, expected {} of rank {N}",
            elem.name()
        )),
    }
}

fn f32_dims<const N: usize>(what: &str, t: &Type) -> Check<[Expr; N]> {
    dims_of(what, ElemType::F32, t)
}

#[cfg(test)]
mod tests {
    use crate::test_sample::SAMPLE;
    use crate::{parse, verify};

    /// Verifies the sample with `from` replaced by `to` (which must occur) and returns the error.
    fn error(from: &str, to: &str) -> super::IrError {
        assert!(SAMPLE.contains(from), "{from}");
        let m = parse(&SAMPLE.replacen(from, to, 1)).unwrap();
        verify(&m).expect_err("should not verify")
    }

    #[test]
    fn use_before_definition_names_function_value_and_op() {
        let e = error("%q = matmul %n, @wq", "%q = matmul %qh, @wq");
        assert_eq!(e.func.as_deref(), Some("encode_query"));
        assert_eq!(e.value.as_deref(), Some("q"));
        assert_eq!(e.op, Some("matmul"));
        assert!(e.to_string().starts_with(
            "in @encode_query, %q = matmul: %qh is used before it is defined\n  in: %q = matmul"
        ));
    }

    #[test]
    fn declared_type_must_be_the_computed_one() {
        let e = error(
            "%q = matmul %n, @wq : f32[q+3,8]",
            "%q = matmul %n, @wq : f32[q+3,9]",
        );
        assert!(
            e.message
                .starts_with("declared f32[q+3,9] but the op computes f32[q+3,8]"),
            "{e}"
        );
        let e = error("%k = matmul %n, @wk", "%k = matmul %n, @dq");
        assert!(
            e.message
                .starts_with("declared f32[q+3,4] but the op computes f32[q+3,8]"),
            "{e}"
        );
    }

    #[test]
    fn shapes_must_agree() {
        let e = error("%o = matmul %cat, @dq", "%o = matmul %cat, @wk");
        assert_eq!(e.op, Some("matmul"));
        assert!(
            e.message
                .starts_with("declared f32[1,8] but the op computes f32[1,4]"),
            "{e}"
        );
        let e = error("reshape %q : f32[q+3,2,4]", "reshape %q : f32[q+3,3,4]");
        assert!(
            e.message
                .starts_with("cannot reshape f32[q+3,8] to f32[q+3,3,4]"),
            "{e}"
        );
        let e = error("(%kh, %vh)", "(%kh, %qh)");
        assert!(
            e.message
                .starts_with("block 0: k f32[q+3,1,4] and v f32[q+3,2,4]"),
            "{e}"
        );
    }

    #[test]
    fn constants_and_buffers_must_be_declared() {
        let e = error("@wq : f32[q+3,8]", "@nope : f32[q+3,8]");
        assert!(
            e.message.starts_with("constant @nope is not declared"),
            "{e}"
        );
        let e = error("store %kh -> $cache[p..]", "store %kh -> $kv[p..]");
        assert_eq!(
            (e.func.as_deref(), e.value.as_deref(), e.op),
            (Some("decoder_step"), None, Some("store"))
        );
        assert!(e.message.starts_with("buffer $kv is not declared"), "{e}");
        let e = error("const @gate : f32[] weight plain\n", "");
        assert!(
            e.message.starts_with("constant @gate is not declared"),
            "{e}"
        );
    }

    #[test]
    fn row_ranges_stay_inside_buffers_and_tables() {
        // p goes up to 3, so rows ..p+2 reach 5 of the cache's 4.
        let e = error(
            "$cache[..p+1], $cache[..p+1]",
            "$cache[..p+2], $cache[..p+2]",
        );
        assert!(
            e.message
                .starts_with("reads rows ..p+2 (up to 5) of $cache, which has 4"),
            "{e}"
        );
        let e = error("start=8-q", "start=9-q");
        assert!(
            e.message
                .starts_with("uses table rows 9-q..12 (1..12 at the extremes), but @rope has 11"),
            "{e}"
        );
        let e = error("store %kh -> $cache[p..]", "store %kh -> $cache[p+1..]");
        assert!(
            e.message
                .starts_with("writes rows p+1..p+2 (up to 5) of $cache"),
            "{e}"
        );
    }

    #[test]
    fn module_level_rules() {
        let e = error("func @decoder_step", "func @step");
        assert_eq!(
            e.to_string(),
            "in the module, @decoder_step: entry point missing"
        );
        let e = error("dim p in 0..=3", "dim p in 4..=3");
        assert_eq!(
            e.to_string(),
            "in the module, dim p: range 4..=3 is empty or negative"
        );
        let e = error(
            "const @dk : f32[8,4] weight plain",
            "const @dk : f32[8,4] weight i4g16",
        );
        assert!(
            e.message
                .starts_with("storage i4g16 needs an f32 weight matrix"),
            "{e}"
        );
        let e = error(
            "const @tools : i32[3] tool_tokens plain",
            "const @tools : i32[3] tool_tokens f16",
        );
        assert!(
            e.message.starts_with("storage f16 needs an f32 weight,"),
            "{e}"
        );
        // A short last group is the reference's zero padding: 8 rows in groups of 3.
        let ok = SAMPLE.replace(
            "const @dk : f32[8,4] weight plain",
            "const @dk : f32[8,4] weight i4g3",
        );
        verify(&parse(&ok).unwrap()).unwrap();
        let e = error(
            "const @dk : f32[8,4] weight plain",
            "const @dk : f32[q,4] weight plain",
        );
        assert_eq!(
            e.to_string(),
            "in the module, @dk: type f32[q,4] is not static"
        );
        let e = error(
            "%ids = concat %query, @tools : i32[q+3]",
            "%ids = concat %query, @tools : i32[q+p+3]",
        );
        assert!(
            e.message
                .starts_with("`p` (the decoder position) does not exist in encode_query"),
            "{e}"
        );
        let e = error("%allowed: i32[a]", "%allowed: u8[16]");
        assert_eq!(e.op, Some("argmax_masked"));
        assert!(
            e.message
                .starts_with("allowed ids is u8[16], expected i32 of rank 1"),
            "{e}"
        );
        let e = error(
            "%ids = concat %query, @tools : i32[q+3]",
            "%ids = concat %query, @tools : i32[q+a+3]",
        );
        assert!(
            e.message
                .starts_with("`a` (the allowed-id count) does not exist in encode_query"),
            "{e}"
        );
        let e = error("return %next", "return %logits");
        assert!(e.message.starts_with("must take the token"), "{e}");
        let e = error("%x2 = gated_residual", "%x = gated_residual");
        assert!(e.message.starts_with("%x is defined twice"), "{e}");
    }
}
