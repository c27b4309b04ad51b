//! Fuzz target `sentencepiece`: see `needlec_fuzz::sentencepiece`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| needlec_fuzz::sentencepiece(data));
