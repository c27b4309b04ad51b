//! Snapshots of the IR that `needlec::lower` produces for the tiny fixture config, after each pass
//! of the pipeline, in both fold modes. Review a change with
//! `INSTA_UPDATE=always cargo test -p needlec --test lower_snapshots` and a diff of
//! `compiler/tests/snapshots/` (or `cargo insta review`).

use needle_ir::{parse, print, verify};
use needle_runtime::config::Config;
use needle_runtime::decode::MAX_QUERY_TOKENS;
use needlec::build::run_passes;
use needlec::lower::{lower, FoldMode};
use needlec::synth::parse_config_spec;

/// The tiny fixture's config (vocab 4096, d_model 64, 4 heads over 2 KV heads, 2 + 2 layers), as
/// `needlec synth --config tiny` defines it.
fn tiny() -> Config {
    parse_config_spec("tiny").expect("the built-in tiny config")
}

const N_TOOL_TOKENS: usize = 36;

fn snapshot_pipeline(fold: FoldMode, mode: &str) {
    let module = lower(&tiny(), fold, N_TOOL_TOKENS, MAX_QUERY_TOKENS);
    verify(&module).unwrap();
    // The same path as `needlec build` and `--emit ir`.
    let (_, stages) = run_passes(module, None).unwrap();
    for (i, (stage, text)) in stages.stages.iter().enumerate() {
        // Every stage's text must read back to itself.
        assert_eq!(&print(&parse(text).unwrap()), text, "{stage}");
        insta::assert_snapshot!(format!("{mode}_{i}_{stage}"), text);
    }
}

#[test]
fn tiny_exact_after_each_pass() {
    snapshot_pipeline(FoldMode::None, "exact");
}

#[test]
fn tiny_folded_after_each_pass() {
    snapshot_pipeline(FoldMode::Tools, "folded");
}
