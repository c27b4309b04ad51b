//! needlec: the ahead-of-time compiler for Needle tool-calling models.
//!
//! Data flows one way, in the order [`build`] runs it: [`load`] reads the checkpoint (and
//! [`tools`] normalizes the app's tool list, [`frontend`] the inputs `run` shares), [`lower`]
//! builds the IR of what runs at run time, [`materialize`] fills every constant the IR declares
//! (by the names of [`const_names`]; for `--fold tools` with the tools side that [`fold`]
//! precomputes), the passes of `needle_ir` optimize module and constants together, [`codegen`]
//! generates the native library and its C header, and [`emit`] archives and checks it. [`abi`]
//! is the C interface codegen and emit share. [`build`] is the only module that knows this
//! order; the README's layout section lists which module may use which.

#![forbid(unsafe_code)]

pub mod abi;
pub mod build;
pub mod codegen;
pub mod const_names;
pub mod emit;
pub mod eval;
#[cfg(feature = "finetune")]
pub mod finetune;
pub mod fold;
pub mod frontend;
pub mod load;
pub mod lower;
pub mod materialize;
pub mod needle3;
pub mod precision;
pub mod report;
pub mod synth;
pub mod tools;
