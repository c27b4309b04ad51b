//! Fuzz target `eval_data`: see `needlec_fuzz::eval_data`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| needlec_fuzz::eval_data(data));
