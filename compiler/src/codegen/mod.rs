//! Code generation with Cranelift: the object builder every generator writes into
//! ([`kernels::KernelSet`]), the building layer ([`gen`]) with the byte-level toolkit of the text
//! generators ([`bytes`]), inline math ([`math`]), embedded weights ([`weights`]), and the
//! generators that use them: the model ([`model`]), the tokenizer ([`tokenizer`]), the grammars
//! ([`grammar`], and [`strict`] for `--grammar strict`), the output text path ([`output`]), the C-interface driver ([`driver`]), the
//! whole library ([`library`]) and its Rust binding ([`rust_binding`]).
//!
//! Generated code references no symbol outside its own object: no libc, no libm, no allocator.
//! Cranelift silently lowers a few instructions to library calls on some targets (`fma` below
//! x86 FMA3; `floor`/`ceil`/`nearest`/`trunc` below SSE4.1), so this module never emits them
//! unless [`needle_targets::Target`] says they are native, and `emit::check_standalone` verifies
//! the result has no undefined symbols.

pub mod bytes;
pub mod driver;
pub mod gen;
pub mod grammar;
pub mod kernels;
pub mod library;
pub mod math;
pub mod model;
pub mod needle3;
pub mod object;
pub mod output;
pub mod rust_binding;
pub mod strict;
pub mod tokenizer;
pub mod weights;

pub use gen::{Gen, V4};
pub use kernels::KernelSet;
pub use weights::{WeightFormat, WeightRef};

use needle_targets::TargetError;

/// Errors from code generation.
#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("invalid code generation request: {0}")]
    Invalid(String),
    /// Cranelift rejected a function or a declaration: a bug in needlec, reported not panicked.
    #[error("Cranelift: {0}")]
    Module(String),
    #[error("writing the object: {0}")]
    Object(String),
}

impl From<cranelift_module::ModuleError> for CodegenError {
    fn from(e: cranelift_module::ModuleError) -> Self {
        // Display names the failing item; Debug carries verifier details.
        CodegenError::Module(format!("{e}\n{e:?}"))
    }
}
