//! Fuzz target `safetensors`: see `needlec_fuzz::safetensors`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| needlec_fuzz::safetensors(data));
