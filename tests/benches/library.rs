//! The generated library against the host runtime (`needlec run`'s engine), side by side in one
//! run, on a full-size random checkpoint (26M parameters, float32) with a 3-tool schema and a
//! ~15-token query, in both fold modes.
//!
//! Prints, per engine and mode: query prefill tokens/s, decode tokens/s, the whole call in ms,
//! and the library/runtime ratios. Prefill is timed as a call that stops after one decoder step
//! (`--max-gen-len 2`); decode as the difference to a call of `DECODE_LEN - 1` steps.
//!
//! Run: `cargo bench -p needlec-tests --bench library`

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use needle_runtime::checkpoint::DType;
use needle_runtime::config::Config;
use needle_runtime::decode::{Engine, FoldMode};
use needle_runtime::model::Model;
use needle_test_support::c::build_harness;
use needle_test_support::{golden, work_dir};
use needlec::build::{build, BuildOptions, Emit};
use needlec::frontend::load_tokenizer;
use needlec::precision::Precision;
use needlec::tools::parse_tools;

const TOOLS: &str = r#"[{"name":"get_weather","description":"Get current weather for a city.","parameters":{"location":{"type":"string","description":"City name.","required":true}}},{"name":"set_timer","description":"Start a countdown timer.","parameters":{"minutes":{"type":"integer","description":"Timer length in minutes.","required":true}}},{"name":"send_message","description":"Send a text message to a contact.","parameters":{"recipient":{"type":"string","description":"Name of the contact.","required":true},"message":{"type":"string","description":"The message text.","required":true}}}]"#;
const QUERY: &str = "What's the weather going to be like in San Francisco tomorrow?";
const DECODE_LEN: usize = 33;
const REPEATS: usize = 5;

fn best_of(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Seconds of one library call, and the archive's bytes.
fn library_time(
    dir: &Path,
    checkpoint: &Path,
    fold: FoldMode,
    weights: Precision,
    max_gen_len: usize,
) -> (f64, u64) {
    let out = dir.join(format!("{}-{weights}-{max_gen_len}", fold.name()));
    let opts = BuildOptions {
        checkpoint: checkpoint.to_path_buf(),
        tokenizer: golden("dev4k.model"),
        tools: TOOLS.into(),
        target: needle_targets::Target::host().unwrap().name.to_string(),
        cpu: None,
        features: vec![],
        fold: Some(fold),
        weights: Some(weights),
        max_gen_len,
        max_query_tokens: None,
        name: "needle".into(),
        emit: vec![Emit::Staticlib, Emit::Header],
        out_dir: out.clone(),
    };
    build(&opts).expect("build");
    let archive = std::fs::read(out.join("libneedle.a")).unwrap();
    let header = std::fs::read_to_string(out.join("needle.h")).unwrap();
    let exe = build_harness(&out, "needle", &archive, &header, "bench_harness.c");
    let run = Command::new(exe)
        .args([QUERY, &REPEATS.to_string()])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let secs = String::from_utf8(run.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (secs, archive.len() as u64)
}

fn main() {
    let dir = work_dir("bench-library");
    let config = Config::full();
    let tokenizer = load_tokenizer(&golden("dev4k.model")).unwrap();
    let tools = parse_tools(TOOLS).unwrap().context();
    // With tied embeddings a random model predicts the token it was fed, so it answers EOS to
    // the initial EOS and stops. Zeroing the EOS row of the embedding keeps its logit at 0 while
    // others are larger, so the random model decodes the whole length and the steps timed are
    // real decoder steps (the arithmetic is unchanged).
    let mut ckpt = needlec::synth::synth_checkpoint(&config, 11, DType::F32);
    let embedding = ckpt.tensors.get_mut("embedding/embedding").unwrap();
    embedding.bytes[4 * config.d_model..8 * config.d_model].fill(0);
    let model = Model::from_checkpoint(&ckpt).unwrap();
    let path = dir.join("full.safetensors");
    needlec::load::save_safetensors(&ckpt, &path).unwrap();

    println!(
        "full-size random checkpoint: D={} H={} K={} {}+{} layers V={}, f32; 3 tools; query {QUERY:?}",
        config.d_model, config.num_heads, config.num_kv_heads, config.num_encoder_layers, config.num_decoder_layers,
        config.vocab_size
    );
    println!(
        "{:<8} {:<8} {:>14} {:>14} {:>10}",
        "mode", "engine", "prefill tok/s", "decode tok/s", "call ms"
    );
    for fold in [FoldMode::None, FoldMode::Tools] {
        let engine = Engine::new(model.clone(), tokenizer.clone(), tools.clone(), fold).unwrap();
        let prompt = engine.prompt(QUERY);
        let generated = engine.generate(QUERY, DECODE_LEN).unwrap().gen_ids.len();
        assert_eq!(
            generated,
            DECODE_LEN - 1,
            "{}: the random model stopped early",
            fold.name()
        );
        // Tokens the encoder runs per query: the whole prompt exact, the query alone folded.
        let prefill_tokens = if fold == FoldMode::Tools {
            prompt.n_query_tokens
        } else {
            prompt.enc_ids.len()
        } as f64;
        let generated = engine.generate(QUERY, DECODE_LEN).unwrap().gen_ids.len();
        assert!(
            generated + 1 >= DECODE_LEN - 1,
            "the random model stopped early; pick another seed"
        );
        let steps = (DECODE_LEN - 2) as f64;

        let rt_short = best_of(REPEATS, || {
            engine.generate(QUERY, 2).unwrap();
        });
        let rt_long = best_of(REPEATS, || {
            engine.generate(QUERY, DECODE_LEN).unwrap();
        });

        let row = |name: &str, short: f64, long: f64| {
            let prefill = prefill_tokens / short;
            let decode = steps / (long - short);
            println!(
                "{:<8} {:<8} {:>14.1} {:>14.1} {:>10.2}",
                fold.name(),
                name,
                prefill,
                decode,
                long * 1e3
            );
            (prefill, decode, long)
        };
        let r = row("runtime", rt_short, rt_long);
        // The library in every weight format (`--weights`), side by side.
        for weights in Precision::ALL {
            let (lib_short, bytes) = library_time(&dir, &path, fold, weights, 2);
            let (lib_long, _) = library_time(&dir, &path, fold, weights, DECODE_LEN);
            let l = row(&format!("lib {weights}"), lib_short, lib_long);
            println!(
                "{:<8} {:<8} {:>13.2}x {:>13.2}x {:>9.2}x  (library / runtime; call: runtime / \
                 library); archive {bytes} bytes",
                fold.name(),
                "ratio",
                l.0 / r.0,
                l.1 / r.1,
                r.2 / l.2
            );
        }
    }
}
