//! Compiles the bundled model for the crate's target with needlec's library API (no needlec
//! binary, no subprocess) into OUT_DIR: `libneedle.a` and its Rust binding `needle.rs`.

use std::path::PathBuf;

use needlec::build::{build, BuildOptions, Emit, MAX_FORCED_ROWS};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let target = std::env::var("TARGET").expect("set by cargo");
    let model = manifest.join("../tiny-needle");
    let inputs = ["tiny-needle-folded.pkl", "tokenizer.model", "tools.json"].map(|f| model.join(f));
    for input in &inputs {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    let [checkpoint, tokenizer, tools] = inputs;
    let opts = BuildOptions {
        checkpoint,
        tokenizer,
        tools: tools.display().to_string(),
        target,
        cpu: None,
        features: Vec::new(),
        // The checkpoint was fine-tuned with isolated tool attention: folding is exact.
        fold: None,
        // The lossless format for the checkpoint (float16): answers exactly as the reference.
        weights: None,
        max_gen_len: 128,
        max_query_tokens: None,
        name: "needle".into(),
        escalate_below: 0.0,
        quantize_activations: false,
        grammar: Default::default(),
        max_forced_rows: MAX_FORCED_ROWS,
        emit: vec![Emit::Staticlib, Emit::Rust],
        out_dir: out_dir.clone(),
    };
    if let Err(e) = build(&opts) {
        // Cargo shows a failed build script's stderr: one clear sentence.
        eprintln!("needlec could not compile the bundled model: {e}");
        std::process::exit(1);
    }
    println!("cargo:rustc-link-search=native={}", out_dir.display());
}
