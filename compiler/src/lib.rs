//! needlec: the ahead-of-time compiler for Needle tool-calling models.
//!
//! Data flows one way: [`load`] reads a checkpoint, [`tools`] normalizes the app's tool list,
//! folding precomputes the tools side, lowering builds the IR, codegen emits native code.

pub mod abi;
pub mod build;
pub mod codegen;
pub mod const_names;
pub mod emit;
pub mod fold;
pub mod frontend;
pub mod load;
pub mod lower;
pub mod materialize;
pub mod synth;
pub mod tools;
