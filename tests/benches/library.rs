//! The generated library against the host runtime (`needlec run`'s engine), side by side in one
//! run, on a full-size random checkpoint (26M parameters, float16 like the original ones) with a
//! 3-tool schema and a ~15-token query, in both fold modes, in every weight format, and int4
//! again for `--cpu x86-64-v3` (FMA) where the host has it.
//!
//! Prints, per engine and mode: query prefill tokens/s, decode tokens/s, the whole call in ms,
//! and the library/runtime ratios. Prefill is timed as a call that stops after one decoder step
//! (`--max-gen-len 2`); decode as the difference to a call of `DECODE_LEN - 1` steps.
//!
//! Then the bundled trained model on its 40 samples, under the reference grammar and under
//! `--grammar strict` (with and without the multi-row step).
//!
//! Run: `cargo bench -p needlec-tests --bench library`; only the bundled model's part (seconds,
//! not minutes): `NEEDLE_BENCH_ONLY=bundled cargo bench -p needlec-tests --bench library`.

use std::path::Path;
use std::process::Command;

use needle_runtime::checkpoint::DType;
use needle_runtime::config::Config;
use needle_runtime::decode::{Engine, FoldMode, GrammarKind, ToolContext};
use needle_runtime::model::Model;
use needle_test_support::c::build_harness;
use needle_test_support::{best_of, golden, work_dir};
use needlec::build::{build, BuildOptions, Emit};
use needlec::frontend::load_tokenizer;
use needlec::precision::Precision;
use needlec::tools::parse_tools;

const TOOLS: &str = r#"[{"name":"get_weather","description":"Get current weather for a city.","parameters":{"location":{"type":"string","description":"City name.","required":true}}},{"name":"set_timer","description":"Start a countdown timer.","parameters":{"minutes":{"type":"integer","description":"Timer length in minutes.","required":true}}},{"name":"send_message","description":"Send a text message to a contact.","parameters":{"recipient":{"type":"string","description":"Name of the contact.","required":true},"message":{"type":"string","description":"The message text.","required":true}}}]"#;
const QUERY: &str = "What's the weather going to be like in San Francisco tomorrow?";
const DECODE_LEN: usize = 33;
const REPEATS: usize = 5;

#[cfg(target_arch = "x86_64")]
fn host_has_fma() -> bool {
    std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
}

#[cfg(not(target_arch = "x86_64"))]
fn host_has_fma() -> bool {
    false
}

/// A library built for the bench: its harness and sizes.
struct BenchLibrary {
    exe: std::path::PathBuf,
    archive_bytes: u64,
    workspace_bytes: u64,
}

/// What a library is built from.
struct Inputs<'a> {
    checkpoint: &'a Path,
    tokenizer: &'a Path,
    tools: &'a str,
}

/// The `NAME_WORKSPACE_SIZE` a generated header defines.
fn workspace_size(header: &str) -> u64 {
    let line = header
        .lines()
        .find(|l| l.starts_with("#define NEEDLE_WORKSPACE_SIZE "))
        .expect("the header defines the workspace size");
    line.trim_end_matches(')')
        .rsplit(')')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{line}: {e}"))
}

/// Builds `model` into a library linked with the timing harness.
/// The library for `model` as `needlec build` makes it with these options; `strict`:
/// `--grammar strict --max-forced-rows N` (`None`: the reference grammar, default rows).
#[allow(clippy::too_many_arguments)]
fn build_library(
    dir: &Path,
    model: &Inputs<'_>,
    fold: FoldMode,
    weights: Precision,
    cpu: Option<&str>,
    quantize_activations: bool,
    max_gen_len: usize,
    strict: Option<usize>,
) -> BenchLibrary {
    let stem = model.checkpoint.file_stem().unwrap().to_string_lossy();
    let level = format!(
        "{}{}{}",
        cpu.unwrap_or("base"),
        if quantize_activations { "-qa" } else { "" },
        strict.map_or(String::new(), |r| format!("-strict{r}"))
    );
    let out = dir.join(format!(
        "{stem}-{}-{weights}-{level}-{max_gen_len}",
        fold.name()
    ));
    let opts = BuildOptions {
        checkpoint: model.checkpoint.to_path_buf(),
        tokenizer: model.tokenizer.to_path_buf(),
        tools: model.tools.into(),
        target: needle_targets::Target::host().unwrap().name.to_string(),
        cpu: cpu.map(str::to_string),
        features: vec![],
        fold: Some(fold),
        weights: Some(weights),
        max_gen_len,
        max_query_tokens: None,
        name: "needle".into(),
        escalate_below: 0.0,
        quantize_activations,
        grammar: if strict.is_some() {
            GrammarKind::Strict
        } else {
            GrammarKind::Reference
        },
        max_forced_rows: strict.unwrap_or(needlec::codegen::model::MAX_FORCED_ROWS),
        emit: vec![Emit::Staticlib, Emit::Header],
        out_dir: out.clone(),
    };
    build(&opts).expect("build");
    let archive = std::fs::read(out.join("libneedle.a")).unwrap();
    let header = std::fs::read_to_string(out.join("needle.h")).unwrap();
    BenchLibrary {
        exe: build_harness(&out, "needle", &archive, &header, "bench_harness.c"),
        archive_bytes: archive.len() as u64,
        workspace_bytes: workspace_size(&header),
    }
}

/// Seconds of one call of `query` (best of [`REPEATS`]).
fn call_secs(lib: &BenchLibrary, query: &str) -> f64 {
    let run = Command::new(&lib.exe)
        .args([query, &REPEATS.to_string()])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    String::from_utf8(run.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// `model` padded with control pieces up to `vocab` pieces (see `synth::padded_sentencepiece`).
fn padded_model(model: &Path, vocab: usize) -> Vec<u8> {
    let have = load_tokenizer(model).unwrap().vocab_size();
    needlec::synth::padded_sentencepiece(&std::fs::read(model).unwrap(), have, vocab)
}

fn main() {
    let dir = work_dir("bench-library");
    if std::env::var("NEEDLE_BENCH_ONLY").as_deref() == Ok("bundled") {
        bundled_samples(&dir);
        return;
    }
    let config = Config::full();
    // needlec refuses a tokenizer smaller than the model's vocabulary: dev4k padded to it.
    let tokenizer_path = dir.join("dev4k-padded.model");
    std::fs::write(
        &tokenizer_path,
        padded_model(&golden("dev4k.model"), config.vocab_size),
    )
    .unwrap();
    let tokenizer = load_tokenizer(&tokenizer_path).unwrap();
    let tools = parse_tools(TOOLS).unwrap().context();
    // With tied embeddings a random model predicts the token it was fed, so it answers EOS to
    // the initial EOS and stops. Zeroing the EOS row of the embedding keeps its logit at 0 while
    // others are larger, so the random model decodes the whole length and the steps timed are
    // real decoder steps (the arithmetic is unchanged).
    let mut ckpt = needlec::synth::synth_checkpoint(&config, 11, DType::F16);
    let embedding = ckpt.tensors.get_mut("embedding/embedding").unwrap();
    embedding.bytes[2 * config.d_model..4 * config.d_model].fill(0);
    let model = Model::from_checkpoint(&ckpt).unwrap();
    let path = dir.join("full.safetensors");
    needlec::load::save_safetensors(&ckpt, &path).unwrap();

    println!(
        "full-size random checkpoint: D={} H={} K={} {}+{} layers V={}, f16; 3 tools; query {QUERY:?}",
        config.d_model, config.num_heads, config.num_kv_heads, config.num_encoder_layers, config.num_decoder_layers,
        config.vocab_size
    );
    println!(
        "{:<8} {:<12} {:>14} {:>14} {:>10}",
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
                "{:<8} {:<12} {:>14.1} {:>14.1} {:>10.2}",
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
        let mut f32_call = None;
        let full = Inputs {
            checkpoint: &path,
            tokenizer: &tokenizer_path,
            tools: TOOLS,
        };
        // x86-64-v3 (AVX2, FMA) only where this host runs it.
        let v3 = host_has_fma().then_some("x86-64-v3");
        // Then int4 with `--quantize-activations` (opt-in, approximate).
        let levels = Precision::ALL
            .map(|w| (w, None, false))
            .into_iter()
            .chain(v3.map(|cpu| (Precision::Int4, Some(cpu), false)))
            .chain([(Precision::Int4, None, true)]);
        for (weights, cpu, qa) in levels {
            let short = build_library(&dir, &full, fold, weights, cpu, qa, 2, None);
            let long = build_library(&dir, &full, fold, weights, cpu, qa, DECODE_LEN, None);
            let (short_secs, long_secs) = (call_secs(&short, QUERY), call_secs(&long, QUERY));
            let name = match (cpu, qa) {
                (Some(_), _) => format!("lib {weights} v3"),
                (None, true) => format!("lib {weights} qa"),
                (None, false) => format!("lib {weights}"),
            };
            let l = row(&name, short_secs, long_secs);
            let f32_call = *f32_call.get_or_insert(l.2);
            println!(
                "{:<8} {:<12} {:>13.2}x {:>13.2}x {:>9.2}x  (library / runtime; call: runtime / \
                 library); call vs f32 library {:.2}x faster; archive {} bytes, workspace {} bytes",
                fold.name(),
                "ratio",
                l.0 / r.0,
                l.1 / r.1,
                r.2 / l.2,
                f32_call / l.2,
                long.archive_bytes,
                long.workspace_bytes,
            );
        }
    }
    bundled_samples(&dir);
}

/// The bundled trained model on its 40 samples: the whole call per sample (mean of each
/// sample's best time) for the runtime and the library in its default (f16) and int4 formats,
/// and the share of decoder steps that skip logits (forced) or compute only the allowed rows
/// (sparse), as the runtime's grammar decides them and the library follows
/// (`library_e2e::jump_forward_and_sparse_steps_follow_the_grammar` checks they agree).
fn bundled_samples(dir: &Path) {
    let root = needle_test_support::repo_root().join("examples/tiny-needle");
    let samples: Vec<needle_test_support::Sample> =
        needle_test_support::read_json(&root.join("samples.json"));
    let tools_json = std::fs::read_to_string(root.join("tools.json")).unwrap();
    let tokenizer_path = root.join("tokenizer.model");
    let tokenizer = load_tokenizer(&tokenizer_path).unwrap();
    let tools = parse_tools(&tools_json).unwrap().context();
    println!("\nbundled model (examples/tiny-needle), 40 samples, mean call ms per sample:");
    println!(
        "{:<24} {:<8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "checkpoint", "fold", "runtime", "lib f16", "lib int4", "forced", "sparse", "full"
    );
    for (file, fold) in [
        ("tiny-needle.pkl", FoldMode::None),
        ("tiny-needle-folded.pkl", FoldMode::Tools),
    ] {
        let checkpoint = root.join(file);
        let loaded = needlec::frontend::load_model_as(&checkpoint, None).unwrap();
        let vocab = loaded.model.config.vocab_size;
        let sparse_max = needlec::codegen::model::sparse_logits_max(vocab);
        let engine = Engine::new(loaded.model, tokenizer.clone(), tools.clone(), fold).unwrap();
        let (mut rt, mut steps) = (0.0, [0usize; 3]);
        for s in &samples {
            rt += best_of(REPEATS, || {
                engine.generate(&s.query, 512).unwrap();
            });
            for step in engine.generate(&s.query, 512).unwrap().steps {
                match step.allowed {
                    Some(1) => steps[0] += 1,
                    Some(n) if n >= 2 && n <= sparse_max => steps[1] += 1,
                    _ => steps[2] += 1,
                }
            }
        }
        let model = Inputs {
            checkpoint: &checkpoint,
            tokenizer: &tokenizer_path,
            tools: &tools_json,
        };
        let lib = |weights: Precision| {
            let lib = build_library(dir, &model, fold, weights, None, false, 512, None);
            samples
                .iter()
                .map(|s| call_secs(&lib, &s.query))
                .sum::<f64>()
        };
        let n = samples.len() as f64;
        let total = steps.iter().sum::<usize>() as f64;
        let pct = |k: usize| 100.0 * steps[k] as f64 / total;
        println!(
            "{:<24} {:<8} {:>9.3} {:>9.3} {:>9.3} {:>7.1}% {:>7.1}% {:>7.1}%",
            file,
            fold.name(),
            rt / n * 1e3,
            lib(Precision::F16) / n * 1e3,
            lib(Precision::Int4) / n * 1e3,
            pct(0),
            pct(1),
            pct(2)
        );
    }
    bundled_strict(&root, &samples, &tokenizer, &tools, dir);
}

/// The bundled model under `--grammar strict`: call ms for the runtime and the library (f16
/// with the multi-row step and without it, `--max-forced-rows 1`; int4 with it), the step
/// kinds as above, and the steps the library runs in multi-row steps (forced steps batched
/// with the step after them) and the forced steps it runs no row for (those a decode ends on,
/// its EOS), as `needlec::codegen::model::forced_row_calls` counts them and the library follows
/// (`library_e2e::multi_row_forced_steps_answer_as_one_row_steps` checks they agree).
fn bundled_strict(
    root: &Path,
    samples: &[needle_test_support::Sample],
    tokenizer: &needle_runtime::tokenizer::Tokenizer,
    tools: &ToolContext,
    dir: &Path,
) {
    use needlec::codegen::model::{forced_row_calls, MAX_FORCED_ROWS};
    let tools_json = std::fs::read_to_string(root.join("tools.json")).unwrap();
    let tokenizer_path = root.join("tokenizer.model");
    println!("\nthe same under --grammar strict (multi-row: --max-forced-rows {MAX_FORCED_ROWS}; one-row: 1):");
    println!(
        "{:<24} {:<8} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>9} {:>7}",
        "checkpoint",
        "fold",
        "runtime",
        "f16 multi",
        "f16 one",
        "int4 mult",
        "forced",
        "sparse",
        "full",
        "multi-row",
        "no row"
    );
    for (file, fold) in [
        ("tiny-needle.pkl", FoldMode::None),
        ("tiny-needle-folded.pkl", FoldMode::Tools),
    ] {
        let checkpoint = root.join(file);
        let loaded = needlec::frontend::load_model_as(&checkpoint, None).unwrap();
        let vocab = loaded.model.config.vocab_size;
        let sparse_max = needlec::codegen::model::sparse_logits_max(vocab);
        let engine = Engine::new(loaded.model, tokenizer.clone(), tools.clone(), fold)
            .unwrap()
            .with_grammar(GrammarKind::Strict)
            .unwrap();
        let (mut rt, mut steps, mut multi, mut unrun) = (0.0, [0usize; 3], 0usize, 0usize);
        for s in samples {
            rt += best_of(REPEATS, || {
                engine.generate(&s.query, 512).unwrap();
            });
            let g = engine.generate(&s.query, 512).unwrap();
            let allowed: Vec<Option<usize>> = g.steps.iter().map(|st| st.allowed).collect();
            for a in &allowed {
                match *a {
                    Some(1) => steps[0] += 1,
                    Some(n) if n >= 2 && n <= sparse_max => steps[1] += 1,
                    _ => steps[2] += 1,
                }
            }
            let calls = forced_row_calls(allowed.iter().copied(), MAX_FORCED_ROWS);
            multi += calls.iter().filter(|&&r| r >= 2).sum::<usize>();
            unrun += allowed.len() - calls.iter().sum::<usize>();
        }
        let model = Inputs {
            checkpoint: &checkpoint,
            tokenizer: &tokenizer_path,
            tools: &tools_json,
        };
        let lib = |weights: Precision, rows: usize| {
            let lib = build_library(dir, &model, fold, weights, None, false, 512, Some(rows));
            samples
                .iter()
                .map(|s| call_secs(&lib, &s.query))
                .sum::<f64>()
        };
        let n = samples.len() as f64;
        let total = steps.iter().sum::<usize>() as f64;
        let pct = |k: usize| 100.0 * k as f64 / total;
        println!(
            "{:<24} {:<8} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>6.1}% {:>6.1}% {:>6.1}% {:>8.1}% {:>6.1}%",
            file,
            fold.name(),
            rt / n * 1e3,
            lib(Precision::F16, MAX_FORCED_ROWS) / n * 1e3,
            lib(Precision::F16, 1) / n * 1e3,
            lib(Precision::Int4, MAX_FORCED_ROWS) / n * 1e3,
            pct(steps[0]),
            pct(steps[1]),
            pct(steps[2]),
            pct(multi),
            pct(unrun),
        );
    }
}
