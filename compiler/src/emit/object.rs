//! Object files through cranelift-object.

use cranelift_module::default_libcall_names;
use cranelift_object::{ObjectBuilder, ObjectModule};
use needle_targets::Target;

use crate::codegen::CodegenError;

/// Prefix of the names given to any library call Cranelift inserts. Generated code must never
/// contain one; if a lowering sneaks one in, the undefined symbol gets this recognizable name
/// and [`super::check::check_standalone`] rejects the object.
pub const FORBIDDEN_LIBCALL_PREFIX: &str = "needlec_forbidden_libcall_";

/// A fresh object module for `target`; `name` becomes the object's file symbol.
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
