//! The bundled Needle model, compiled by needlec from `build.rs` and called through the Rust
//! binding needlec emits (`needlec build --emit rust`): `Needle::new()` owns a workspace,
//! `call(&mut self, query)` answers with tool-call JSON.
//!
//! ```no_run
//! let mut model = needle_example::Needle::new();
//! let answer = model.call("Turn off the lights in the kitchen")?;
//! # Ok::<(), needle_example::Error>(())
//! ```

// The generated binding's C boundary is the only `unsafe` in this crate.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod needle {
    include!(concat!(env!("OUT_DIR"), "/needle.rs"));
}

pub use needle::{
    Answer, Error, ModelInfo, Needle, FOLD_TOOLS, MAX_GEN_LEN, MAX_OUTPUT_BYTES, MAX_QUERY_BYTES,
    MAX_QUERY_TOKENS, TARGET, TOOL_NAMES, VOCAB_SIZE, WORKSPACE_SIZE,
};
