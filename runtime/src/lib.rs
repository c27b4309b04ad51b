//! Reference semantics of Needle v1 in plain Rust.
//!
//! This crate is the oracle every other part of needlec is checked against, and the engine of
//! `needlec run`. It knows nothing about files: loaders (in the `needlec` crate) turn a checkpoint
//! into a [`checkpoint::Checkpoint`], and everything here works on that.
//!
//! Pipeline of one call: [`tokenizer`] encodes the query and the normalized tool list,
//! [`forward`] runs the encoder and decoder, [`grammar`] constrains tool names and argument keys
//! (or [`strict`], with `--grammar strict`, the whole call list under the tool schemas),
//! [`decode`] drives greedy generation, and [`output`] turns the generated text into what the user
//! gets (tool names restored).
//!
//! [`needle3`] is the Needle 3 generation (decoder-only, docs/needle3.md), separate from all of the
//! above.

#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod confidence;
pub mod config;
pub mod decode;
pub mod forward;
pub mod grammar;
pub mod model;
pub mod needle3;
pub mod output;
pub mod pyjson;
pub mod quant;
pub mod strict;
pub mod tokenizer;
