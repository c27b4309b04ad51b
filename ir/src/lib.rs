//! The needlec IR: what runs at run time, at the level of the model.
//!
//! A [`Module`] holds tensors with static shapes except for three symbols (`q`, the query
//! length, `p`, the decoder position, and `a`, the number of token ids a step may choose among),
//! named constants referenced by `@name` whose data lives beside the module in a
//! [`ConstStore`], workspace buffers (`$name`: KV cache, cross-attention K/V) and two entry
//! points, `encode_query` and `decoder_step`, each a straight-line list of model-level ops
//! (`embed`, `matmul`, `zcrmsnorm`, `rope`, `attention`, `gated_residual`, `logits`,
//! `argmax_masked`, ...). The module is the contract that ships: codegen implements exactly
//! these ops on the module the [`PIPELINE`] leaves ([`check_pipeline_ran`]), at the workspace
//! places [`WorkspacePlan`] assigns, and the interpreter runs the same semantics on data.
//!
//! Stages, one file each: [`types`] and [`module`] (the data), [`print`] and [`parse`] (the text
//! format, which round-trips), [`verify`] (well-formedness), [`passes`] (the pipeline),
//! [`plan`] (the workspace layout, an analysis codegen consumes and `--emit ir` prints),
//! [`interp`] (the reference interpreter that runs a module on data); both the verifier and the
//! interpreter report an [`IrError`] ([`error`]). The lowering from a model config lives in the
//! compiler (`needlec::lower`).

#![forbid(unsafe_code)]

pub mod error;
pub mod interp;
pub mod module;
pub mod parse;
pub mod passes;
pub mod plan;
pub mod print;
pub mod types;
pub mod verify;

pub use error::IrError;
pub use interp::{Interpreter, Tensor};
pub use module::{
    gate_scale, zc_norm_scale, BufferDecl, ConstData, ConstDecl, ConstStore, DimDecl, Function,
    Inst, Module, Op, Operand, Param, DECODER_STEP, ENCODE_QUERY,
};
pub use parse::{parse, ParseError};
pub use passes::{check_pipeline_ran, run_pipeline, Pass, PassError, PIPELINE};
pub use plan::{print_planned, Place, WorkspacePlan};
pub use print::print;
pub use types::{ConstKind, ElemType, Expr, Storage, Sym, Type};
pub use verify::verify;

#[cfg(test)]
mod test_sample;
