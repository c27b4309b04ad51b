//! Fuzz target `hf_tokenizer`: see `needlec_fuzz::hf_tokenizer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| needlec_fuzz::hf_tokenizer(data));
