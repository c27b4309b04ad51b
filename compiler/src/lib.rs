//! needlec: the ahead-of-time compiler for Needle tool-calling models.
//!
//! Data flows one way: [`load`] reads a checkpoint, [`tools`] normalizes the app's tool list,
//! folding precomputes the tools side, lowering builds the IR, codegen emits native code.

pub mod build;
pub mod codegen;
pub mod emit;
pub mod fold;
pub mod frontend;
pub mod load;
pub mod lower;
pub mod precision;
pub mod synth;
pub mod tools;
