//! Checkpoint loading: the real reference pickles, safetensors round trips, synthetic
//! checkpoints, and one test per kind of bad input.

use std::path::{Path, PathBuf};

use needle_runtime::checkpoint::{expected_tensors, Checkpoint, DType};
use needle_runtime::config::{Config, ToolAttention};
use needlec::load::{load_checkpoint, LoadError};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

const TINY_RANDOM: &str = "tests/fixtures/golden/tiny_random.pkl";
const SMALL_RANDOM: &str = "tests/fixtures/golden/small_random.pkl";
const TINY_NEEDLE: &str = "examples/tiny-needle/tiny-needle.pkl";
const TINY_NEEDLE_FOLDED: &str = "examples/tiny-needle/tiny-needle-folded.pkl";
const ALL_PICKLES: [&str; 4] = [TINY_RANDOM, SMALL_RANDOM, TINY_NEEDLE, TINY_NEEDLE_FOLDED];

fn load(rel: &str) -> Checkpoint {
    load_checkpoint(&repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn assert_matches_config(ckpt: &Checkpoint) {
    let expected = expected_tensors(&ckpt.config);
    assert_eq!(ckpt.tensors.len(), expected.len());
    for (path, shape) in expected {
        let t = &ckpt.tensors[&path];
        assert_eq!(t.shape, shape, "{path}");
        assert_eq!(t.dtype, DType::F16, "{path}");
        assert_eq!(t.bytes.len(), t.numel() * 2, "{path}");
    }
}

#[test]
fn real_pickles_load() {
    let tiny = load(TINY_RANDOM);
    let c = &tiny.config;
    assert_eq!(
        (c.vocab_size, c.d_model, c.num_heads, c.num_kv_heads),
        (4096, 64, 4, 2)
    );
    assert_eq!(
        (c.num_encoder_layers, c.num_decoder_layers, c.max_seq_len),
        (2, 2, 1024)
    );
    assert_eq!(c.tool_attention, ToolAttention::Full);
    assert_matches_config(&tiny);

    let small = load(SMALL_RANDOM);
    let c = &small.config;
    assert_eq!(
        (c.vocab_size, c.d_model, c.num_heads, c.num_kv_heads),
        (4096, 96, 6, 2)
    );
    assert_eq!((c.num_encoder_layers, c.num_decoder_layers), (3, 2));
    assert_matches_config(&small);

    for rel in [TINY_NEEDLE, TINY_NEEDLE_FOLDED] {
        let ck = load(rel);
        let c = &ck.config;
        assert_eq!(
            (c.vocab_size, c.d_model, c.num_heads, c.num_kv_heads),
            (2048, 128, 4, 2)
        );
        // Keys the file omits take the reference's defaults.
        assert_eq!((c.d_ff, c.max_seq_len, c.contrastive_dim), (512, 128, 128));
        assert_eq!(c.dtype, "float32");
        assert_matches_config(&ck);
    }
    assert_eq!(load(TINY_NEEDLE).config.tool_attention, ToolAttention::Full);
    assert_eq!(
        load(TINY_NEEDLE_FOLDED).config.tool_attention,
        ToolAttention::Isolated
    );
}
