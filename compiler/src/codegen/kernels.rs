//! [`KernelSet`]: the object builder every code generator writes into (the model, the tokenizer,
//! the grammar, the output text path, the driver). One `KernelSet` is one object file: it names
//! every symbol with the library's prefix, embeds read-only data (tables, weights) in the
//! target's byte order, declares functions with C signatures (exported ones are listed for the C
//! header, the rest stay local to the object) and defines their bodies through [`Gen`].
//!
//! The kernels themselves live with their users (e.g. [`super::model`]); the inline math they
//! share is in [`super::math`].

use std::collections::HashSet;

use cranelift_codegen::ir::{
    types, AbiParam, FuncRef, InstBuilder, Signature, UserFuncName, Value,
};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{DataDescription, DataId, FuncId, Linkage, Module};
use cranelift_object::ObjectModule;
use needle_targets::Target;

use super::gen::Gen;
use super::object;
use super::weights::{WeightFormat, WeightRef};
use super::CodegenError;
use crate::abi::{CFunction, CType};

/// Builds one object file. All symbols get `prefix`; functions are exported or local as
/// declared ([`KernelSet::declare_function`]), data is local to the object.
pub struct KernelSet {
    target: Target,
    module: ObjectModule,
    prefix: String,
    ctx: Context,
    fctx: FunctionBuilderContext,
    functions: Vec<CFunction>,
    names: HashSet<String>,
    quantize_activations: bool,
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
        let module = object::new_module(target, &format!("{prefix}kernels"))?;
        let ctx = module.make_context();
        Ok(KernelSet {
            target: target.clone(),
            module,
            prefix: prefix.to_string(),
            ctx,
            fctx: FunctionBuilderContext::new(),
            functions: Vec::new(),
            names: HashSet::new(),
            quantize_activations: false,
        })
    }

    /// `--quantize-activations`: int8/int4 matrix products quantize their input rows and use
    /// integer dot products (see `model::kernels::matmul_int_dot`).
    pub fn set_quantize_activations(&mut self, on: bool) {
        self.quantize_activations = on;
    }

    pub fn quantize_activations(&self) -> bool {
        self.quantize_activations
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
        object::finish(self.module)
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
        let bytes = self.target.f32_bytes(values.iter().copied());
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
            scales: None,
            k,
            n,
            format: WeightFormat::F32,
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

    /// The symbol of a declared function, for messages.
    fn function_name(&self, id: FuncId) -> String {
        let decl = self.module.declarations().get_function_decl(id);
        decl.name.clone().unwrap_or_else(|| format!("{id}"))
    }

    /// Defines a function declared with [`KernelSet::declare_function`]. `body` gets the
    /// parameters, the addresses of `data` ([`DataAddrs::get`] by each object's `DataId`) and
    /// references to `callees` ([`Callees::get`] by each function's `FuncId`, for
    /// [`Gen::call`]), and returns the return value, if any. Looking things up by their own ids
    /// (not by position) means a reordered list cannot silently call the wrong function.
    pub fn define_function(
        &mut self,
        id: FuncId,
        data: &[DataId],
        callees: &[FuncId],
        body: impl FnOnce(&mut Gen<'_>, &[Value], &DataAddrs, &Callees) -> Option<Value>,
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
        let frefs = Callees {
            function: self.function_name(id),
            refs: callees
                .iter()
                .map(|&f| {
                    let r = self.module.declare_func_in_func(f, &mut self.ctx.func);
                    (f, r, self.function_name(f))
                })
                .collect(),
        };

        let mut b = FunctionBuilder::new(&mut self.ctx.func, &mut self.fctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        b.seal_block(entry);
        let args = b.block_params(entry).to_vec();
        let addrs = DataAddrs {
            function: frefs.function.clone(),
            addrs: data
                .iter()
                .zip(&gvs)
                .map(|(&d, &gv)| (d, b.ins().symbol_value(ptr, gv)))
                .collect(),
        };
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
}

/// The functions a generated function may call, found by their own [`FuncId`]s.
pub struct Callees {
    /// The symbol of the function being defined, for the message when a lookup fails.
    function: String,
    refs: Vec<(FuncId, FuncRef, String)>,
}

impl Callees {
    /// `id`'s reference in this function, for [`Gen::call`].
    ///
    /// # Panics
    /// If `id` was not passed as a callee to [`KernelSet::define_function`]: a bug in the code
    /// generator, which the message names.
    pub fn get(&self, id: FuncId) -> FuncRef {
        match self.refs.iter().find(|(f, _, _)| *f == id) {
            Some(&(_, r, _)) => r,
            None => panic!(
                "code generator bug: {id} is not a declared callee of `{}` (declared: {})",
                self.function,
                self.refs
                    .iter()
                    .map(|(_, _, n)| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// The addresses of the embedded data a generated function uses, found by their own
/// [`DataId`]s. Every address is computed once, in the function's entry block.
pub struct DataAddrs {
    /// The symbol of the function being defined, for the message when a lookup fails.
    function: String,
    addrs: Vec<(DataId, Value)>,
}

impl DataAddrs {
    /// `id`'s address in this function.
    ///
    /// # Panics
    /// If `id` was not passed as data to [`KernelSet::define_function`]: a bug in the code
    /// generator, which the message names.
    pub fn get(&self, id: DataId) -> Value {
        match self.addrs.iter().find(|(d, _)| *d == id) {
            Some(&(_, v)) => v,
            None => panic!(
                "code generator bug: {id} is not declared data of `{}`",
                self.function
            ),
        }
    }
}
