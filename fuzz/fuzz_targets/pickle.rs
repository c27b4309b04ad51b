//! Fuzz target `pickle`: see `needlec_fuzz::pickle`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| needlec_fuzz::pickle(data));
