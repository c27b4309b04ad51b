//! The Cranelift object module every [`super::KernelSet`] writes into, and its finished bytes.

use cranelift_module::default_libcall_names;
use cranelift_object::{ObjectBuilder, ObjectModule};
use needle_targets::Target;

use super::CodegenError;
use crate::abi::FORBIDDEN_LIBCALL_PREFIX;

/// A fresh object module for `target`; `name` becomes the object's file symbol. Any library
/// call Cranelift inserts is named with [`FORBIDDEN_LIBCALL_PREFIX`], so the standalone check
/// recognizes it.
pub fn new_module(target: &Target, name: &str) -> Result<ObjectModule, CodegenError> {
    let isa = target.isa()?;
    let default_names = default_libcall_names();
    let builder = ObjectBuilder::new(
        isa,
        name.as_bytes().to_vec(),
        Box::new(move |lc| format!("{FORBIDDEN_LIBCALL_PREFIX}{}", default_names(lc))),
    )?;
    Ok(ObjectModule::new(builder))
}

/// The finished object's bytes.
pub fn finish(module: ObjectModule) -> Result<Vec<u8>, CodegenError> {
    module
        .finish()
        .emit()
        .map_err(|e| CodegenError::Object(e.to_string()))
}
