//! Kernels: standalone generated functions with simple C interfaces (pointers and sizes), and
//! [`KernelSet`], the builder that puts them, with their read-only data, into one object.
//!
//! Every kernel is 4-wide over its innermost contiguous axis (see [`V4`]), with a scalar loop for
//! the remainder. Static sizes (model dimensions) are baked in; dynamic ones (rows, sequence
//! length) are parameters.

use std::collections::HashSet;

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    types, AbiParam, FuncRef, InstBuilder, Signature, UserFuncName, Value,
};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{DataDescription, DataId, FuncId, Linkage, Module};
use cranelift_object::ObjectModule;
use needle_targets::Target;

use super::gen::{mem_ro, Gen};
use super::math;
use super::weights::{WeightAccess, WeightFormat, WeightRef};
use super::CodegenError;
use crate::emit::header::{CFunction, CType};
use crate::emit::object as emit_object;

/// Epsilon of ZCRMSNorm (spec section 2).
pub const ZCRMSNORM_EPS: f32 = 1e-6;

/// Build-time RoPE tables: `cos[p][j]`, `sin[p][j]` for positions `p < max_pos` and
/// `j < half = head_dim / 2`.
#[derive(Clone, Debug)]
pub struct RopeTables {
    pub max_pos: usize,
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTables {
    /// Angles `p * theta^(-2j/head_dim)` computed in f64, rounded once to f32.
    pub fn new(theta: f64, head_dim: usize, max_pos: usize) -> Result<Self, CodegenError> {
        if head_dim == 0 || head_dim & 1 == 1 || !(theta.is_finite() && theta > 0.0) {
            return Err(CodegenError::Invalid(format!(
                "RoPE needs an even head_dim > 0 and a positive theta (got {head_dim}, {theta})"
            )));
        }
        let half = head_dim / 2;
        let freqs: Vec<f64> = (0..half)
            .map(|j| theta.powf(-2.0 * j as f64 / head_dim as f64))
            .collect();
        Ok(Self::from_angles(max_pos, half, |p, j| p as f64 * freqs[j]))
    }

    /// Tables from float32 frequencies, with angles rounded to f32 as a float32 reference
    /// computes them (`p as f32 * f`); only cos/sin themselves are evaluated in f64.
    pub fn from_frequencies(freqs: &[f32], max_pos: usize) -> Self {
        Self::from_angles(max_pos, freqs.len(), |p, j| f64::from(p as f32 * freqs[j]))
    }

    fn from_angles(max_pos: usize, half: usize, angle: impl Fn(usize, usize) -> f64) -> Self {
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for j in 0..half {
                let a = angle(p, j);
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeTables {
            max_pos,
            half,
            cos,
            sin,
        }
    }
}

/// RoPE tables declared in a [`KernelSet`].
#[derive(Clone, Copy, Debug)]
pub struct RopeRef {
    pub cos: DataId,
    pub sin: DataId,
    pub max_pos: usize,
    pub half: usize,
}

/// Builds one object file of kernels. All symbols get `prefix`; functions are exported, data
/// is local to the object.
pub struct KernelSet {
    target: Target,
    module: ObjectModule,
    prefix: String,
    ctx: Context,
    fctx: FunctionBuilderContext,
    functions: Vec<CFunction>,
    names: HashSet<String>,
}

fn is_c_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

impl KernelSet {
    /// `prefix` starts every symbol (e.g. `"mymodel_"`); it must be a C identifier.
    pub fn new(target: &Target, prefix: &str) -> Result<Self, CodegenError> {
        if !is_c_identifier(prefix) {
            return Err(CodegenError::Invalid(format!(
                "symbol prefix `{prefix}` is not a C identifier"
            )));
        }
        let module = emit_object::new_module(target, &format!("{prefix}kernels"))?;
        let ctx = module.make_context();
        Ok(KernelSet {
            target: target.clone(),
            module,
            prefix: prefix.to_string(),
            ctx,
            fctx: FunctionBuilderContext::new(),
            functions: Vec::new(),
            names: HashSet::new(),
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The exported functions so far, for the C header.
    pub fn functions(&self) -> &[CFunction] {
        &self.functions
    }

    /// The object file bytes.
    pub fn finish(self) -> Result<Vec<u8>, CodegenError> {
        emit_object::finish(self.module)
    }

    fn symbol(&mut self, name: &str) -> Result<String, CodegenError> {
        if !is_c_identifier(name) {
            return Err(CodegenError::Invalid(format!(
                "`{name}` is not a C identifier"
            )));
        }
        let sym = format!("{}{}", self.prefix, name);
        if !self.names.insert(sym.clone()) {
            return Err(CodegenError::Invalid(format!(
                "symbol `{sym}` defined twice"
            )));
        }
        Ok(sym)
    }

    // ---- data ---------------------------------------------------------------------------------

    /// Read-only bytes, local to the object, aligned to `align` (a power of two).
    pub fn declare_rodata(
        &mut self,
        name: &str,
        bytes: Vec<u8>,
        align: u64,
    ) -> Result<DataId, CodegenError> {
        let sym = self.symbol(name)?;
        let id = self
            .module
            .declare_data(&sym, Linkage::Local, false, false)?;
        let mut d = DataDescription::new();
        d.define(bytes.into_boxed_slice());
        d.set_align(align);
        self.module.define_data(id, &d)?;
        Ok(id)
    }

    /// Read-only f32 array in the target's byte order, 16-byte aligned (vector loads).
    pub fn declare_f32_data(&mut self, name: &str, values: &[f32]) -> Result<DataId, CodegenError> {
        let big = matches!(
            self.target.triple.endianness(),
            Ok(target_lexicon::Endianness::Big)
        );
        let bytes = values
            .iter()
            .flat_map(|v| {
                if big {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                }
            })
            .collect();
        self.declare_rodata(name, bytes, 16)
    }

    /// A `[k][n]` float32 weight matrix (row-major, `y = x @ W`).
    pub fn declare_weights_f32(
        &mut self,
        name: &str,
        k: usize,
        n: usize,
        values: &[f32],
    ) -> Result<WeightRef, CodegenError> {
        if k == 0 || n == 0 || values.len() != k * n {
            return Err(CodegenError::Invalid(format!(
                "weights `{name}`: {} values for a {k}x{n} matrix",
                values.len()
            )));
        }
        let data = self.declare_f32_data(name, values)?;
        Ok(WeightRef {
            data,
            k,
            n,
            format: WeightFormat::F32,
        })
    }

    /// The multiplier of a ZCRMSNorm, `1 + g`, folded at build time (as float32 would compute it).
    pub fn declare_zcrmsnorm_scale(
        &mut self,
        name: &str,
        g: &[f32],
    ) -> Result<DataId, CodegenError> {
        let one_plus: Vec<f32> = g.iter().map(|&v| 1.0 + v).collect();
        self.declare_f32_data(name, &one_plus)
    }

    pub fn declare_rope_tables(
        &mut self,
        name: &str,
        t: &RopeTables,
    ) -> Result<RopeRef, CodegenError> {
        if t.cos.len() != t.max_pos * t.half || t.sin.len() != t.cos.len() || t.half == 0 {
            return Err(CodegenError::Invalid(format!(
                "RoPE tables `{name}` have inconsistent sizes"
            )));
        }
        let cos = self.declare_f32_data(&format!("{name}_cos"), &t.cos)?;
        let sin = self.declare_f32_data(&format!("{name}_sin"), &t.sin)?;
        Ok(RopeRef {
            cos,
            sin,
            max_pos: t.max_pos,
            half: t.half,
        })
    }

    // ---- the function-definition scaffold -----------------------------------------------------

    /// Declares function `prefix+name` without defining it yet (so that functions can call each
    /// other in any order). `export`: part of the library's C interface (listed for the header);
    /// otherwise local to the object, invisible to the linker.
    pub fn declare_function(
        &mut self,
        name: &str,
        doc: &[&str],
        params: &[(CType, &str)],
        ret: CType,
        export: bool,
    ) -> Result<FuncId, CodegenError> {
        let sym = self.symbol(name)?;
        let sig = self.signature(params, ret)?;
        let linkage = if export {
            Linkage::Export
        } else {
            Linkage::Local
        };
        let id = self.module.declare_function(&sym, linkage, &sig)?;
        if export {
            self.functions.push(CFunction {
                name: sym,
                ret,
                params: params.iter().map(|&(t, n)| (t, n.to_string())).collect(),
                doc: doc.iter().map(|s| s.to_string()).collect(),
            });
        }
        Ok(id)
    }

    fn signature(&self, params: &[(CType, &str)], ret: CType) -> Result<Signature, CodegenError> {
        let ptr = self.module.target_config().pointer_type();
        let abi = |t: CType| -> Result<AbiParam, CodegenError> {
            Ok(AbiParam::new(match t {
                t if t.is_pointer_sized() => ptr,
                CType::I32 => types::I32,
                CType::F32 => types::F32,
                _ => {
                    return Err(CodegenError::Invalid(format!(
                        "`{}` cannot be a parameter",
                        t.c()
                    )))
                }
            }))
        };
        let mut sig = self.module.make_signature();
        for &(t, _) in params {
            sig.params.push(abi(t)?);
        }
        if ret != CType::Void {
            sig.returns.push(abi(ret)?);
        }
        Ok(sig)
    }

    /// Defines a function declared with [`KernelSet::declare_function`]. `body` gets the
    /// parameters, the addresses of `data` (in order) and references to `callees` (in order, for
    /// [`Gen::call`]), and returns the return value, if any.
    pub fn define_function(
        &mut self,
        id: FuncId,
        data: &[DataId],
        callees: &[FuncId],
        body: impl FnOnce(&mut Gen<'_>, &[Value], &[Value], &[FuncRef]) -> Option<Value>,
    ) -> Result<(), CodegenError> {
        let frontend = self.module.target_config();
        let ptr = frontend.pointer_type();
        let sig = self
            .module
            .declarations()
            .get_function_decl(id)
            .signature
            .clone();
        self.module.clear_context(&mut self.ctx);
        self.ctx.func.signature = sig;
        self.ctx.func.name = UserFuncName::user(0, id.as_u32());
        let gvs: Vec<_> = data
            .iter()
            .map(|&d| self.module.declare_data_in_func(d, &mut self.ctx.func))
            .collect();
        let frefs: Vec<FuncRef> = callees
            .iter()
            .map(|&f| self.module.declare_func_in_func(f, &mut self.ctx.func))
            .collect();

        let mut b = FunctionBuilder::new(&mut self.ctx.func, &mut self.fctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        b.seal_block(entry);
        let args = b.block_params(entry).to_vec();
        let addrs: Vec<Value> = gvs
            .iter()
            .map(|&gv| b.ins().symbol_value(ptr, gv))
            .collect();
        let mut g = Gen::new(b, ptr, self.target.simd_f32x4(), self.target.native_fma());
        let r = body(&mut g, &args, &addrs, &frefs);
        match r {
            Some(v) => g.b.ins().return_(&[v]),
            None => g.b.ins().return_(&[]),
        };
        g.b.seal_all_blocks();
        g.b.finalize(frontend);

        self.module.define_function(id, &mut self.ctx)?;
        Ok(())
    }

    /// Declares and defines exported function `prefix+name` (no callees).
    fn define(
        &mut self,
        name: &str,
        doc: &[&str],
        params: &[(CType, &str)],
        ret: CType,
        data: &[DataId],
        body: impl FnOnce(&mut Gen<'_>, &[Value], &[Value]) -> Option<Value>,
    ) -> Result<FuncId, CodegenError> {
        let id = self.declare_function(name, doc, params, ret, true)?;
        self.define_function(id, data, &[], |g, a, d, _| body(g, a, d))?;
        Ok(id)
    }

    // ---- kernels ------------------------------------------------------------------------------

    /// `void NAME(const float *x, float *y, size_t n)`: `y[i] = exp(x[i])` (`y` may be `x`).
    pub fn define_exp(&mut self, name: &str) -> Result<FuncId, CodegenError> {
        self.define_map(
            name,
            "y[i] = exp(x[i]); relative error < 2e-7, 0 below -103.9, inf above 88.73",
            math::exp,
        )
    }

    /// `void NAME(const float *x, float *y, size_t n)`: `y[i] = 1 / (1 + exp(-x[i]))`.
    pub fn define_sigmoid(&mut self, name: &str) -> Result<FuncId, CodegenError> {
        self.define_map(name, "y[i] = 1 / (1 + exp(-x[i]))", math::sigmoid)
    }

    /// Elementwise map with a polymorphic (f32 / f32x4) operation.
    fn define_map(
        &mut self,
        name: &str,
        doc: &str,
        op: fn(&mut Gen<'_>, Value) -> Value,
    ) -> Result<FuncId, CodegenError> {
        let params = [
            (CType::ConstF32Ptr, "x"),
            (CType::F32Ptr, "y"),
            (CType::SizeT, "n"),
        ];
        self.define(
            name,
            &[doc, "y may equal x"],
            &params,
            CType::Void,
            &[],
            |g, a, _| {
                let (x, y, n) = (a[0], a[1], a[2]);
                let n4 = g.b.ins().band_imm_s(n, !3i64);
                let zero = g.iconst(0);
                g.for_range(zero, n4, 4, |g, i| {
                    let v = g.vload(x, i);
                    let r = g.map1(v, op);
                    g.vstore(r, y, i);
                });
                g.for_range(n4, n, 1, |g, i| {
                    let v = g.load_f32(x, i);
                    let r = op(g, v);
                    g.store_f32(r, y, i);
                });
                None
            },
        )
    }

    /// `void NAME(const float *x, float *y, size_t rows)`: `y[r] = x[r] @ W` with `x` of
    /// `rows x k` and `y` of `rows x n`, W embedded. `y` must not overlap `x`.
    ///
    /// Columns in blocks of 16 (four 4-lane accumulators, enough independent adds to hide the
    /// latency), then blocks of 4, then single columns; the k loop runs innermost so each
    /// accumulator is written once.
    pub fn define_matmul_const(
        &mut self,
        name: &str,
        w: &WeightRef,
    ) -> Result<FuncId, CodegenError> {
        let (k, n) = (w.k as i64, w.n as i64);
        let doc = format!(
            "y[r][j] = sum_k x[r][k] * W[k][j]; x: rows x {k}, y: rows x {n}; y must not overlap x"
        );
        let params = [
            (CType::ConstF32Ptr, "x"),
            (CType::F32Ptr, "y"),
            (CType::SizeT, "rows"),
        ];
        let w = *w;
        self.define(
            name,
            &[&doc],
            &params,
            CType::Void,
            &w.data_ids(),
            |g, a, addrs| {
                let (x, y, rows) = (a[0], a[1], a[2]);
                let wa = WeightAccess::new(&w, addrs);
                let n16 = n / 16 * 16;
                let n4 = n / 4 * 4;
                g.for_n(rows, |g, r| {
                    let xrow = g.addr(x, r, k * 4);
                    let yrow = g.addr(y, r, n * 4);
                    for (lo, hi, width) in [(0, n16, 4usize), (n16, n4, 1)] {
                        g.for_const(lo, hi, 4 * width as i64, |g, c| {
                            let zero = g.vconst(0.0);
                            let accs: Vec<_> = (0..width).map(|_| g.vvar(zero)).collect();
                            g.for_const(0, k, 1, |g, kk| {
                                let xv = g.load_f32(xrow, kk);
                                let xs = g.vsplat(xv);
                                let row = wa.row(g, kk);
                                for (j, &acc) in accs.iter().enumerate() {
                                    let col = g.b.ins().iadd_imm_s(c, 4 * j as i64);
                                    let wv = row.load4(g, col);
                                    let cur = g.vget(acc);
                                    let nxt = g.vmul_add(xs, wv, cur);
                                    g.vset(acc, nxt);
                                }
                            });
                            for (j, &acc) in accs.iter().enumerate() {
                                let col = g.b.ins().iadd_imm_s(c, 4 * j as i64);
                                let v = g.vget(acc);
                                g.vstore(v, yrow, col);
                            }
                        });
                    }
                    g.for_const(n4, n, 1, |g, c| {
                        let z = g.f32(0.0);
                        let acc = g.var(types::F32, z);
                        g.for_const(0, k, 1, |g, kk| {
                            let xv = g.load_f32(xrow, kk);
                            let row = wa.row(g, kk);
                            let wv = row.load1(g, c);
                            let cur = g.get(acc);
                            let nxt = g.mul_add(xv, wv, cur);
                            g.set(acc, nxt);
                        });
                        let v = g.get(acc);
                        g.store_f32(v, yrow, c);
                    });
                });
                None
            },
        )
    }

    /// `void NAME(const float *x, float *y, size_t rows)`: ZCRMSNorm over rows of `d`,
    /// `y = x / sqrt(mean(x^2) + 1e-6) * scale` with `scale = 1 + g` from
    /// [`KernelSet::declare_zcrmsnorm_scale`]. `y` may equal `x`.
    pub fn define_zcrmsnorm(
        &mut self,
        name: &str,
        scale: DataId,
        d: usize,
    ) -> Result<FuncId, CodegenError> {
        if d == 0 {
            return Err(CodegenError::Invalid("zcrmsnorm over 0 values".into()));
        }
        let di = d as i64;
        let doc =
            format!("y = x / sqrt(mean(x^2) + 1e-6) * (1 + g) over rows of {d}; y may equal x");
        let params = [
            (CType::ConstF32Ptr, "x"),
            (CType::F32Ptr, "y"),
            (CType::SizeT, "rows"),
        ];
        self.define(
            name,
            &[&doc],
            &params,
            CType::Void,
            &[scale],
            |g, a, addrs| {
                let (x, y, rows, sc) = (a[0], a[1], a[2], addrs[0]);
                let d4 = di / 4 * 4;
                g.for_n(rows, |g, r| {
                    let xrow = g.addr(x, r, di * 4);
                    let yrow = g.addr(y, r, di * 4);
                    let zero = g.vconst(0.0);
                    let acc = g.vvar(zero);
                    g.for_const(0, d4, 4, |g, i| {
                        let v = g.vload(xrow, i);
                        let cur = g.vget(acc);
                        let nxt = g.vmul_add(v, v, cur);
                        g.vset(acc, nxt);
                    });
                    let accv = g.vget(acc);
                    let s = g.vsum(accv);
                    let ss = g.var(types::F32, s);
                    g.for_const(d4, di, 1, |g, i| {
                        let v = g.load_f32(xrow, i);
                        let cur = g.get(ss);
                        let nxt = g.mul_add(v, v, cur);
                        g.set(ss, nxt);
                    });
                    let s = g.get(ss);
                    let dn = g.f32(d as f32);
                    let ms = g.b.ins().fdiv(s, dn);
                    let eps = g.f32(ZCRMSNORM_EPS);
                    let ms = g.b.ins().fadd(ms, eps);
                    let rms = g.b.ins().sqrt(ms);
                    let rv = g.vsplat(rms);
                    g.for_const(0, d4, 4, |g, i| {
                        let v = g.vload(xrow, i);
                        let q = g.vdiv(v, rv);
                        let s = g.vload_with(sc, i, mem_ro());
                        let o = g.vmul(q, s);
                        g.vstore(o, yrow, i);
                    });
                    g.for_const(d4, di, 1, |g, i| {
                        let v = g.load_f32(xrow, i);
                        let q = g.b.ins().fdiv(v, rms);
                        let p = g.addr(sc, i, 4);
                        let s = g.b.ins().load(types::F32, mem_ro(), p, 0);
                        let o = g.b.ins().fmul(q, s);
                        g.store_f32(o, yrow, i);
                    });
                });
                None
            },
        )
    }

    /// `void NAME(float *x, size_t rows, size_t n)`: softmax of each row of `n`, in place:
    /// subtract the row maximum, exponentiate, divide by the sum.
    pub fn define_softmax(&mut self, name: &str) -> Result<FuncId, CodegenError> {
        let params = [
            (CType::F32Ptr, "x"),
            (CType::SizeT, "rows"),
            (CType::SizeT, "n"),
        ];
        let doc = "softmax of each row of n, in place (max-subtracted)";
        self.define(name, &[doc], &params, CType::Void, &[], |g, a, _| {
            let (x, rows, n) = (a[0], a[1], a[2]);
            let n4 = g.b.ins().band_imm_s(n, !3i64);
            let row_bytes = g.b.ins().imul_imm_s(n, 4);
            g.for_n(rows, |g, r| {
                let off = g.b.ins().imul(r, row_bytes);
                let xr = g.b.ins().iadd(x, off);
                let zero = g.iconst(0);

                let ninf = g.vconst(f32::NEG_INFINITY);
                let mv = g.vvar(ninf);
                g.for_range(zero, n4, 4, |g, i| {
                    let v = g.vload(xr, i);
                    let cur = g.vget(mv);
                    let nxt = g.vmax(cur, v);
                    g.vset(mv, nxt);
                });
                let mvv = g.vget(mv);
                let m0 = g.vmax_lanes(mvv);
                let m = g.var(types::F32, m0);
                g.for_range(n4, n, 1, |g, i| {
                    let v = g.load_f32(xr, i);
                    let cur = g.get(m);
                    let nxt = g.b.ins().fmax(cur, v);
                    g.set(m, nxt);
                });
                let m = g.get(m);
                let msplat = g.vsplat(m);

                let vzero = g.vconst(0.0);
                let sv = g.vvar(vzero);
                g.for_range(zero, n4, 4, |g, i| {
                    let v = g.vload(xr, i);
                    let d = g.vsub(v, msplat);
                    let e = math::vexp(g, d);
                    g.vstore(e, xr, i);
                    let cur = g.vget(sv);
                    let nxt = g.vadd(cur, e);
                    g.vset(sv, nxt);
                });
                let svv = g.vget(sv);
                let s0 = g.vsum(svv);
                let s = g.var(types::F32, s0);
                g.for_range(n4, n, 1, |g, i| {
                    let v = g.load_f32(xr, i);
                    let d = g.b.ins().fsub(v, m);
                    let e = math::exp(g, d);
                    g.store_f32(e, xr, i);
                    let cur = g.get(s);
                    let nxt = g.b.ins().fadd(cur, e);
                    g.set(s, nxt);
                });
                let s = g.get(s);
                let ssplat = g.vsplat(s);
                g.for_range(zero, n4, 4, |g, i| {
                    let v = g.vload(xr, i);
                    let q = g.vdiv(v, ssplat);
                    g.vstore(q, xr, i);
                });
                g.for_range(n4, n, 1, |g, i| {
                    let v = g.load_f32(xr, i);
                    let q = g.b.ins().fdiv(v, s);
                    g.store_f32(q, xr, i);
                });
            });
            None
        })
    }

    /// `int32_t NAME(float *x, size_t rows, size_t pos0)`: RoPE in place on `x` of
    /// `rows x heads x head_dim`, row `r` at position `pos0 + r`: each head's halves `a`, `b`
    /// become `a*cos - b*sin`, `b*cos + a*sin`. Returns 0, or -1 (and leaves `x` alone) when a
    /// position is past the tables.
    pub fn define_rope(
        &mut self,
        name: &str,
        t: &RopeRef,
        heads: usize,
    ) -> Result<FuncId, CodegenError> {
        if heads == 0 {
            return Err(CodegenError::Invalid("rope over 0 heads".into()));
        }
        let t = *t;
        let (half, hd, max_pos) = (t.half as i64, 2 * t.half as i64, t.max_pos as i64);
        let doc = format!(
            "RoPE in place; x: rows x {heads} x {hd}; positions pos0.. must be < {max_pos}, else returns -1"
        );
        let params = [
            (CType::F32Ptr, "x"),
            (CType::SizeT, "rows"),
            (CType::SizeT, "pos0"),
        ];
        self.define(
            name,
            &[&doc],
            &params,
            CType::I32,
            &[t.cos, t.sin],
            |g, a, addrs| {
                let (x, rows, pos0, cos, sin) = (a[0], a[1], a[2], addrs[0], addrs[1]);
                // pos0 + rows <= max_pos, without overflow: pos0 <= max_pos && rows <= max_pos - pos0
                let maxp = g.iconst(max_pos);
                let over = g.icmp(IntCC::UnsignedGreaterThan, pos0, maxp);
                let room = g.b.ins().isub(maxp, pos0);
                let over2 = g.icmp(IntCC::UnsignedGreaterThan, rows, room);
                let bad = g.b.ins().bor(over, over2);
                g.if_then(bad, |g| {
                    let m1 = g.b.ins().iconst(types::I32, -1);
                    g.ret(&[m1]);
                });
                let half4 = half / 4 * 4;
                g.for_n(rows, |g, r| {
                    let p = g.b.ins().iadd(pos0, r);
                    let crow = g.addr(cos, p, half * 4);
                    let srow = g.addr(sin, p, half * 4);
                    let xrow = g.addr(x, r, heads as i64 * hd * 4);
                    g.for_const(0, heads as i64, 1, |g, h| {
                        let xa = g.addr(xrow, h, hd * 4);
                        let xb = g.b.ins().iadd_imm_s(xa, half * 4);
                        g.for_const(0, half4, 4, |g, j| {
                            let av = g.vload(xa, j);
                            let bv = g.vload(xb, j);
                            let c = g.vload_with(crow, j, mem_ro());
                            let s = g.vload_with(srow, j, mem_ro());
                            let ac = g.vmul(av, c);
                            let bs = g.vmul(bv, s);
                            let bc = g.vmul(bv, c);
                            let as_ = g.vmul(av, s);
                            let na = g.vsub(ac, bs);
                            let nb = g.vadd(bc, as_);
                            g.vstore(na, xa, j);
                            g.vstore(nb, xb, j);
                        });
                        g.for_const(half4, half, 1, |g, j| {
                            let av = g.load_f32(xa, j);
                            let bv = g.load_f32(xb, j);
                            let cp = g.addr(crow, j, 4);
                            let c = g.b.ins().load(types::F32, mem_ro(), cp, 0);
                            let sp = g.addr(srow, j, 4);
                            let s = g.b.ins().load(types::F32, mem_ro(), sp, 0);
                            let ac = g.b.ins().fmul(av, c);
                            let bs = g.b.ins().fmul(bv, s);
                            let bc = g.b.ins().fmul(bv, c);
                            let as_ = g.b.ins().fmul(av, s);
                            let na = g.b.ins().fsub(ac, bs);
                            let nb = g.b.ins().fadd(bc, as_);
                            g.store_f32(na, xa, j);
                            g.store_f32(nb, xb, j);
                        });
                    });
                });
                Some(g.b.ins().iconst(types::I32, 0))
            },
        )
    }

    /// `size_t NAME(const float *x, size_t n)`: index of the first maximum, NaN counting as the
    /// maximum (as numpy's argmax); 0 when `n == 0`. Scalar: one compare per element is cheap
    /// next to the matmul that produced the logits.
    pub fn define_argmax(&mut self, name: &str) -> Result<FuncId, CodegenError> {
        let params = [(CType::ConstF32Ptr, "x"), (CType::SizeT, "n")];
        let doc = "index of the first maximum (NaN counts as maximum, like numpy); 0 if n == 0";
        self.define(name, &[doc], &params, CType::SizeT, &[], |g, a, _| {
            let (x, n) = (a[0], a[1]);
            let zero = g.iconst(0);
            let empty = g.icmp(IntCC::Equal, n, zero);
            g.if_then(empty, |g| {
                let z = g.iconst(0);
                g.ret(&[z]);
            });
            let x0 = g.load_f32(x, zero);
            let best = g.var(types::F32, x0);
            let pt = g.ptr;
            let idx = g.var(pt, zero);
            let one = g.iconst(1);
            g.for_range(one, n, 1, |g, i| {
                let v = g.load_f32(x, i);
                let b = g.get(best);
                let gt = g.fcmp(FloatCC::GreaterThan, v, b);
                let v_nan = g.fcmp(FloatCC::Unordered, v, v);
                let b_num = g.fcmp(FloatCC::Ordered, b, b);
                let nan_first = g.b.ins().band(v_nan, b_num);
                let take = g.b.ins().bor(gt, nan_first);
                let nb = g.b.ins().select(take, v, b);
                let cur = g.get(idx);
                let ni = g.b.ins().select(take, i, cur);
                g.set(best, nb);
                g.set(idx, ni);
            });
            Some(g.get(idx))
        })
    }
}
