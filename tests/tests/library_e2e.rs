//! The emitted library, end to end: `needlec build` for the host, a C harness linked against
//! `libneedle.a`, and its answers compared with the reference's golden outputs and with
//! `needlec run`'s engine, in both fold modes, plus the C interface's contracts.

use std::path::{Path, PathBuf};

use needle_runtime::decode::{Engine, FoldMode};
use needle_runtime::output::parses_as_json;
use needle_test_support::c::{build_harness_with, run};
use needle_test_support::{
    golden, read_json, tiny_needle, work_dir, Case, GreedyCase, QuantizedSample, Sample,
};
use needlec::build::{build, BuildOptions, Emit};
use needlec::frontend::{load_model, load_model_as, load_tokenizer};
use needlec::precision::Precision;
use needlec::tools::parse_tools;

fn host() -> String {
    needle_targets::Target::host()
        .expect("host is supported")
        .name
        .to_string()
}

fn options(
    checkpoint: &Path,
    tokenizer: &Path,
    tools: &str,
    fold: Option<FoldMode>,
    max_gen_len: usize,
    out: &Path,
) -> BuildOptions {
    BuildOptions {
        checkpoint: checkpoint.to_path_buf(),
        tokenizer: tokenizer.to_path_buf(),
        tools: tools.to_string(),
        target: host(),
        cpu: None,
        features: vec![],
        fold,
        weights: None,
        max_gen_len,
        max_query_tokens: None,
        name: "needle".into(),
        escalate_below: 0.0,
        quantize_activations: false,
        grammar: Default::default(),
        max_forced_rows: needlec::codegen::model::MAX_FORCED_ROWS,
        emit: vec![Emit::Staticlib, Emit::Header],
        out_dir: out.to_path_buf(),
    }
}

/// Options for the bundled trained model (`examples/tiny-needle/`) with its 6-tool list.
fn bundled(
    checkpoint: &str,
    fold: Option<FoldMode>,
    max_gen_len: usize,
    out: &Path,
) -> BuildOptions {
    let tools = tiny_needle("tools.json");
    options(
        &tiny_needle(checkpoint),
        &tiny_needle("tokenizer.model"),
        tools.to_str().expect("UTF-8 path"),
        fold,
        max_gen_len,
        out,
    )
}

/// The bundled model (`checkpoint` of `examples/tiny-needle/`) with its 6-tool list, loaded as
/// `needlec run` loads it under `options`: the runtime a library is compared with.
fn bundled_model(
    checkpoint: &str,
    options: &needlec::frontend::ModelOptions,
) -> needlec::frontend::Loaded {
    let tools = tiny_needle("tools.json");
    needlec::frontend::load_with(
        &tiny_needle(checkpoint),
        &tiny_needle("tokenizer.model"),
        tools.to_str().expect("UTF-8 path"),
        options,
    )
    .unwrap()
}

/// Builds `libneedle.a` + `needle.h` into a fresh directory and links the harness against them.
fn build_library(test: &str, opts_for: impl FnOnce(&Path) -> BuildOptions) -> PathBuf {
    let dir = work_dir(test);
    let opts = opts_for(&dir.join("out"));
    build(&opts).unwrap_or_else(|e| panic!("{test}: needlec build failed: {e}"));
    let archive = std::fs::read(dir.join("out/libneedle.a")).unwrap();
    let header = std::fs::read_to_string(dir.join("out/needle.h")).unwrap();
    build_harness_with(
        &dir,
        "needle",
        &archive,
        &header,
        "library_harness.c",
        &["-pthread"],
    )
}

/// Runs the harness in `mode` (`answer` or `threads`) over `queries`.
fn answers(exe: &Path, mode: &str, queries: &[&str]) -> Vec<(i32, String)> {
    let mut stdin = Vec::new();
    for q in queries {
        stdin.extend((q.len() as u32).to_le_bytes());
        stdin.extend(q.as_bytes());
    }
    let out = run(exe, &[mode], &stdin);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let (status, hex) = line.split_once(' ').expect("status and hex");
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            (
                status.parse().unwrap(),
                String::from_utf8(bytes).expect("output is UTF-8"),
            )
        })
        .collect()
}

/// Runs the harness's `steps` mode over `queries`: per query, the status and the library's
/// decoder steps as forced, sparse, full, then the forced steps that ran in multi-row steps and
/// those steps (`needlec::codegen::driver::STEP_COUNTS`).
fn step_counts(exe: &Path, queries: &[&str]) -> Vec<(i32, [usize; 5])> {
    let mut stdin = Vec::new();
    for q in queries {
        stdin.extend((q.len() as u32).to_le_bytes());
        stdin.extend(q.as_bytes());
    }
    let out = run(exe, &["steps"], &stdin);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let f: Vec<usize> = line.split(' ').map(|x| x.parse().unwrap()).collect();
            assert_eq!(f.len(), 6, "{line}");
            (f[0] as i32, [f[1], f[2], f[3], f[4], f[5]])
        })
        .collect()
}

/// Every greedy golden case of `greedy` through libraries built with `--weights weights` (the
/// golden file's precision; `None`: the default, for the float goldens): the reference's output
/// wherever it had no near-tie, and always `needlec run`'s engine over the same weights.
fn check_golden(checkpoint: &str, greedy: &str, weights: Option<Precision>) {
    let cases: Vec<Case> = read_json(&golden("cases.json"));
    let expected: Vec<GreedyCase> = read_json(&golden(greedy));
    let model = load_model_as(&golden(checkpoint), weights).unwrap().model;
    let tokenizer = load_tokenizer(&golden("dev4k.model")).unwrap();
    // One library per (mode, tool list): the tools are fixed at build time.
    let mut groups: Vec<(String, String)> = expected
        .iter()
        .map(|e| (e.mode.clone(), e.tools.clone()))
        .collect();
    groups.dedup();
    groups.sort();
    groups.dedup();
    for (g, (mode, tools)) in groups.iter().enumerate() {
        let fold = if mode == "folded" {
            FoldMode::Tools
        } else {
            FoldMode::None
        };
        let max_gen_len = cases[0].max_gen_len;
        let exe = build_library(&format!("{greedy}-{g}"), |out| BuildOptions {
            weights,
            ..options(
                &golden(checkpoint),
                &golden("dev4k.model"),
                tools,
                Some(fold),
                max_gen_len,
                out,
            )
        });
        let group: Vec<&GreedyCase> = expected
            .iter()
            .filter(|e| &e.mode == mode && &e.tools == tools)
            .collect();
        let queries: Vec<&str> = group.iter().map(|e| e.query.as_str()).collect();
        let got = answers(&exe, "answer", &queries);
        let engine = Engine::new(
            model.clone(),
            tokenizer.clone(),
            parse_tools(tools).unwrap().context(),
            fold,
        )
        .unwrap();
        for (want, (status, output)) in group.iter().zip(&got) {
            let what = format!("{greedy} {mode} {:?}", want.query);
            assert_eq!(*status, 0, "{what}: status");
            let run = engine.generate(&want.query, max_gen_len).unwrap();
            assert_eq!(output, &run.output, "{what}: library vs needlec run");
            // The reference's own output wherever it had no near-tie to flip.
            if want.step_gaps.iter().all(|&gap| gap >= 1e-3) {
                assert_eq!(output, &want.output, "{what}: library vs reference");
            }
        }
    }
}

#[test]
fn golden_cases_tiny_both_modes() {
    check_golden("tiny_random.pkl", "greedy_tiny.json", None);
}

#[test]
fn golden_cases_small_both_modes() {
    check_golden("small_random.pkl", "greedy_small.json", None);
}

#[test]
fn golden_cases_int8_both_fixtures_both_modes() {
    check_golden(
        "tiny_random.pkl",
        "greedy_tiny_int8.json",
        Some(Precision::Int8),
    );
    check_golden(
        "small_random.pkl",
        "greedy_small_int8.json",
        Some(Precision::Int8),
    );
}

#[test]
fn golden_cases_int4_both_fixtures_both_modes() {
    check_golden(
        "tiny_random.pkl",
        "greedy_tiny_int4.json",
        Some(Precision::Int4),
    );
    check_golden(
        "small_random.pkl",
        "greedy_small_int4.json",
        Some(Precision::Int4),
    );
}

/// The bundled trained model built `--weights int8` and `int4`: the reference's quantized
/// outputs for all 40 samples in the three checkpoint/fold combinations
/// (`samples_quantized.json`), and archives that shrink as the formats say.
#[test]
fn tiny_needle_quantized_samples_all_combinations() {
    let samples: Vec<QuantizedSample> = read_json(&tiny_needle("samples_quantized.json"));
    let queries: Vec<&str> = samples.iter().map(|s| s.query.as_str()).collect();
    let combos = QUANTIZED_COMBOS;
    for p in [Precision::Int8, Precision::Int4] {
        for (i, (checkpoint, fold, combo)) in combos.into_iter().enumerate() {
            let exe = build_library(&format!("samples-{p}-{i}"), |out| BuildOptions {
                weights: Some(p),
                ..bundled(checkpoint, fold, 512, out)
            });
            let got = answers(&exe, "answer", &queries);
            for (s, (status, output)) in samples.iter().zip(&got) {
                let what = format!("--weights {p} {combo} {:?}", s.query);
                assert_eq!(*status, 0, "{what}");
                assert_eq!(output, s.output(combo, p.name()), "{what}");
            }
        }
    }
}

/// The checkpoint/fold combinations `samples_quantized.json` records: checkpoint, fold (`None`:
/// the checkpoint's default), and the record's key.
const QUANTIZED_COMBOS: [(&str, Option<FoldMode>, &str); 3] = [
    ("tiny-needle.pkl", Some(FoldMode::None), "stock_exact"),
    ("tiny-needle.pkl", Some(FoldMode::Tools), "stock_folded"),
    ("tiny-needle-folded.pkl", None, "fold_folded"),
];

/// `--quantize-activations` (opt-in, approximate): the bundled model's 40 samples in every
/// checkpoint/fold combination, int8 and int4, against the reference's quantized outputs. The
/// agreement is printed (the README records it) and must stay high: a wrong integer kernel
/// answers nonsense, not 90% of the samples.
#[test]
fn quantized_activations_agree_with_the_exact_quantized_model() {
    let samples: Vec<QuantizedSample> = read_json(&tiny_needle("samples_quantized.json"));
    let queries: Vec<&str> = samples.iter().map(|s| s.query.as_str()).collect();
    let combos = QUANTIZED_COMBOS;
    for p in [Precision::Int8, Precision::Int4] {
        for (i, (checkpoint, fold, combo)) in combos.into_iter().enumerate() {
            let exe = build_library(&format!("samples-qa-{p}-{i}"), |out| BuildOptions {
                weights: Some(p),
                quantize_activations: true,
                ..bundled(checkpoint, fold, 512, out)
            });
            let got = answers(&exe, "answer", &queries);
            let agree = samples
                .iter()
                .zip(&got)
                .filter(|(s, (status, output))| *status == 0 && output == s.output(combo, p.name()))
                .count();
            println!(
                "--quantize-activations --weights {p} {combo}: {agree}/{} samples as the \
                 reference's {p} model",
                samples.len()
            );
            assert!(
                agree * 10 >= samples.len() * 9,
                "--weights {p} {combo}: only {agree} of {} samples agree",
                samples.len()
            );
        }
    }
}

/// `--quantize-activations` says what it needs.
#[test]
fn quantized_activations_need_integer_weights_and_vectors() {
    let dir = work_dir("qa-errors");
    let err = build(&BuildOptions {
        weights: Some(Precision::F16),
        quantize_activations: true,
        ..bundled("tiny-needle-folded.pkl", None, 64, &dir)
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("needs --weights int8 or int4") && err.contains("f16"),
        "{err}"
    );
    let err = build(&BuildOptions {
        weights: Some(Precision::Int4),
        quantize_activations: true,
        target: "riscv64gc-unknown-linux-gnu".into(),
        ..bundled("tiny-needle-folded.pkl", None, 64, &dir)
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("x86-64 and aarch64") && err.contains("riscv64"),
        "{err}"
    );
    // On aarch64 (run under qemu by cross_targets) it generates.
    let target = "aarch64-unknown-linux-gnu";
    build(&BuildOptions {
        weights: Some(Precision::Int4),
        quantize_activations: true,
        target: target.into(),
        emit: vec![Emit::Obj],
        ..bundled("tiny-needle-folded.pkl", None, 64, &dir.join(target))
    })
    .unwrap_or_else(|e| panic!("{target}: {e}"));
}

/// Bytes of the weight data in a static library: its `NAME_model_w*` symbols (values and
/// scales), read from the archive's objects.
fn weight_bytes(archive: &[u8]) -> u64 {
    use object::read::archive::ArchiveFile;
    use object::{Object, ObjectSymbol};
    let parsed = ArchiveFile::parse(archive).expect("an archive");
    let mut total = 0;
    for member in parsed.members() {
        let data = member.unwrap().data(archive).unwrap();
        let Ok(file) = object::File::parse(data) else {
            continue;
        };
        total += file
            .symbols()
            .filter(|s| s.name().is_ok_and(|n| n.starts_with("needle_model_w")))
            .map(|s| s.size())
            .sum::<u64>();
    }
    total
}

/// Archive sizes: the weight formats shrink the Dense kernels as they should (f16 half of
/// f32; int8 a byte plus a 4-byte scale per 32 values; int4 half a byte plus the scale), and
/// the embedding stays half under int8/int4. Measured on the weight data itself: code size
/// differs by format too (packed rows are unrolled per pack), which the README's figures show.
#[test]
fn weight_formats_shrink_the_archive() {
    let size = |p: Precision| {
        let dir = work_dir(&format!("sizes-{p}"));
        let opts = BuildOptions {
            weights: Some(p),
            ..bundled("tiny-needle-folded.pkl", None, 64, &dir)
        };
        build(&opts).unwrap();
        weight_bytes(&std::fs::read(dir.join("libneedle.a")).unwrap()) as f64
    };
    let [f32_, f16_, int8, int4] = Precision::ALL.map(size);
    // The bundled model: 2+2 layers of D=128 (kernels 0.23M values), embedding 2048 x 128.
    let config = load_model(&tiny_needle("tiny-needle-folded.pkl"))
        .unwrap()
        .config;
    let (d, kv) = (config.d_model, config.kv_dim());
    let per_layer = 2 * d * d + 2 * d * kv;
    let kernels = (config.num_encoder_layers + 2 * config.num_decoder_layers) * per_layer;
    let kernels = kernels as f64;
    let embedding = (config.vocab_size * d) as f64;
    let close = |got: f64, want: f64, what: &str| {
        assert!(
            (got - want).abs() <= 0.02 * want.abs() + 4096.0,
            "{what}: {got} bytes saved, expected about {want}"
        );
    };
    close(f32_ - f16_, 2.0 * (kernels + embedding), "f32 -> f16");
    close(
        f16_ - int8,
        kernels * (2.0 - 1.0 - 4.0 / 32.0),
        "f16 -> int8",
    );
    close(int8 - int4, kernels * 0.5, "int8 -> int4");
}

/// The bundled trained model: the reference's outputs for all 40 samples in the three
/// checkpoint/fold combinations.
#[test]
fn tiny_needle_samples_all_combinations() {
    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    let queries: Vec<&str> = samples.iter().map(|s| s.query.as_str()).collect();
    type Combo = (&'static str, Option<FoldMode>, fn(&Sample) -> &str);
    let combos: [Combo; 3] = [
        ("tiny-needle.pkl", Some(FoldMode::None), |s| &s.stock_exact),
        ("tiny-needle.pkl", Some(FoldMode::Tools), |s| {
            &s.stock_folded
        }),
        ("tiny-needle-folded.pkl", None, |s| &s.fold_folded),
    ];
    for (i, (checkpoint, fold, expected)) in combos.into_iter().enumerate() {
        let exe = build_library(&format!("samples-{i}"), |out| {
            bundled(checkpoint, fold, 512, out)
        });
        let got = answers(&exe, "answer", &queries);
        for (s, (status, output)) in samples.iter().zip(&got) {
            assert_eq!(*status, 0, "{checkpoint} {fold:?} {:?}", s.query);
            assert_eq!(output, expected(s), "{checkpoint} {fold:?} {:?}", s.query);
        }
    }
}

/// The bundled model's tokenizer exported to a Hugging Face tokenizer.json (`needlec tokenizer
/// export`) builds a library that gives the reference's answers on the 40 samples, as the
/// `.model` does.
#[test]
fn library_built_from_the_exported_tokenizer_json_gives_the_same_answers() {
    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    let queries: Vec<&str> = samples.iter().map(|s| s.query.as_str()).collect();
    let json = work_dir("export-tokenizer").join("tokenizer.json");
    let sp = load_tokenizer(&tiny_needle("tokenizer.model")).unwrap();
    std::fs::write(&json, sp.to_hf_json().unwrap()).unwrap();
    let tools = tiny_needle("tools.json");
    let exe = build_library("samples-exported-tokenizer", |out| {
        options(
            &tiny_needle("tiny-needle-folded.pkl"),
            &json,
            tools.to_str().expect("UTF-8 path"),
            None,
            512,
            out,
        )
    });
    let got = answers(&exe, "answer", &queries);
    for (s, (status, output)) in samples.iter().zip(&got) {
        assert_eq!(*status, 0, "{:?}", s.query);
        assert_eq!(output, &s.fold_folded, "{:?}", s.query);
    }
}

/// Jump-forward and sparse logits on the bundled model's 40 samples, in the sample test's three
/// checkpoint/fold combinations: the library's count of decoder steps that took the one allowed
/// token without logits (forced), computed only the allowed ids' logits (sparse) or all of them
/// (full) equals, query by query, what the runtime's grammar allowed at each of its steps, and
/// the answers stay the reference's. Prints the fractions (the README's figures).
#[test]
fn jump_forward_and_sparse_steps_follow_the_grammar() {
    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    let queries: Vec<&str> = samples.iter().map(|s| s.query.as_str()).collect();
    let tools = tiny_needle("tools.json");
    type Combo = (&'static str, Option<FoldMode>, fn(&Sample) -> &str);
    let combos: [Combo; 3] = [
        ("tiny-needle.pkl", Some(FoldMode::None), |s| &s.stock_exact),
        ("tiny-needle.pkl", Some(FoldMode::Tools), |s| {
            &s.stock_folded
        }),
        ("tiny-needle-folded.pkl", None, |s| &s.fold_folded),
    ];
    let mut all = [0usize; 3];
    for (i, (checkpoint, fold, expected)) in combos.into_iter().enumerate() {
        let exe = build_library(&format!("steps-{i}"), |out| {
            bundled(checkpoint, fold, 512, out)
        });
        let loaded = needlec::frontend::load(
            &tiny_needle(checkpoint),
            &tiny_needle("tokenizer.model"),
            tools.to_str().unwrap(),
            fold,
        )
        .unwrap();
        let vocab = loaded.engine.model.config.vocab_size;
        let sparse_max = needlec::codegen::model::sparse_logits_max(vocab);
        let got = step_counts(&exe, &queries);
        let answered = answers(&exe, "answer", &queries);
        let mut totals = [0usize; 3];
        let mut sizes = Vec::new();
        for ((s, line), (status, output)) in samples.iter().zip(&got).zip(&answered) {
            let what = format!("{checkpoint} {fold:?} {:?}", s.query);
            assert_eq!((*status, output.as_str()), (0, expected(s)), "{what}");
            let run = loaded.engine.generate(&s.query, 512).unwrap();
            // forced, sparse, full: what the runtime's grammar allowed at each step.
            let mut want = [0usize; 3];
            for step in &run.steps {
                sizes.extend(step.allowed.filter(|&n| n > 0));
                match step.allowed {
                    Some(1) => want[0] += 1,
                    Some(n) if n >= 2 && n <= sparse_max => want[1] += 1,
                    _ => want[2] += 1,
                }
            }
            assert_eq!(want.iter().sum::<usize>(), run.steps.len());
            assert_eq!((line.0, &line.1[..3]), (0, &want[..]), "{what}: steps");
            for k in 0..3 {
                totals[k] += want[k];
                all[k] += want[k];
            }
        }
        let n: usize = totals.iter().sum();
        println!(
            "{checkpoint} fold {:?}: {n} decoder steps, forced {} ({:.1}%), sparse {} ({:.1}%), full {} ({:.1}%)",
            loaded.engine.fold,
            totals[0],
            100.0 * totals[0] as f64 / n as f64,
            totals[1],
            100.0 * totals[1] as f64 / n as f64,
            totals[2],
            100.0 * totals[2] as f64 / n as f64,
        );
        // The bundled grammar lists every token that continues a name or key along its trie, so
        // it never allows exactly one: no forced steps here (the model tests force some).
        assert!(totals[1] > 0, "the samples exercise the sparse path");
        sizes.sort_unstable();
        if let (Some(lo), Some(hi)) = (sizes.first(), sizes.last()) {
            println!(
                "  allowed ids per constrained step: min {lo}, median {}, max {hi} (vocabulary {vocab})",
                sizes[sizes.len() / 2]
            );
        }
    }
    let n: usize = all.iter().sum();
    println!(
        "all: {n} decoder steps, forced {:.1}%, sparse {:.1}%, full {:.1}%",
        100.0 * all[0] as f64 / n as f64,
        100.0 * all[1] as f64 / n as f64,
        100.0 * all[2] as f64 / n as f64,
    );
}

/// Statuses, the too-small buffer, bad workspaces, invalid UTF-8, token level, model info, and
/// concurrent calls from threads with separate workspaces.
#[test]
fn c_interface_contracts_and_threads() {
    let exe = build_library("contracts", |out| {
        bundled("tiny-needle-folded.pkl", None, 512, out)
    });
    let out = String::from_utf8(run(&exe, &["contracts"], b"").stdout).unwrap();
    assert!(
        out.contains("ok call\n") && out.contains("ok tokens\n"),
        "{out}"
    );
    assert!(out.contains("info 3 2048 128 4 2 2 2\n"), "{out}");
    // The default threshold: never escalate.
    assert!(out.contains("escalate_below 0\n"), "{out}");
    assert!(out.contains("ok call_ex get_weather\n"), "{out}");
    let names: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("tool "))
        .collect();
    assert_eq!(
        names,
        [
            "get_weather",
            "set_timer",
            "send_message",
            "play_music",
            "toggle_lights",
            "set_alarm"
        ]
    );

    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    let queries: Vec<&str> = samples.iter().take(8).map(|s| s.query.as_str()).collect();
    let threaded = answers(&exe, "threads", &queries);
    for (s, (status, output)) in samples.iter().zip(&threaded) {
        assert_eq!((*status, output.as_str()), (0, s.fold_folded.as_str()));
    }
}

/// Same inputs, same bytes; every export carries the prefix; nothing is undefined.
#[test]
fn builds_are_deterministic_standalone_and_prefixed() {
    let build_once = |name: &str| {
        let dir = work_dir(&format!("determinism-{name}"));
        let mut opts = bundled("tiny-needle-folded.pkl", None, 64, &dir);
        opts.name = name.into();
        opts.emit = vec![Emit::Staticlib, Emit::Header, Emit::Obj];
        build(&opts).unwrap();
        let read = |f: String| std::fs::read(dir.join(f)).unwrap();
        (
            read(format!("lib{name}.a")),
            read(format!("{name}.h")),
            read(format!("{name}.o")),
        )
    };
    let (a1, h1, o1) = build_once("assistant");
    let (a2, h2, o2) = build_once("assistant");
    assert!(
        a1 == a2 && h1 == h2 && o1 == o2,
        "two builds of the same inputs differ"
    );
    let report = needlec::emit::check_standalone(&a1, "assistant_").unwrap();
    let mut exports = report.exports.clone();
    exports.sort();
    assert_eq!(
        exports,
        [
            "assistant_call",
            "assistant_call_ex",
            "assistant_call_tokens",
            "assistant_model_info",
            "assistant_tool_name",
            "assistant_workspace_size"
        ]
    );
    let header = String::from_utf8(h1).unwrap();
    for needle in [
        "#define ASSISTANT_WORKSPACE_SIZE",
        "#define ASSISTANT_ERR_OUT_TOO_SMALL",
        "assistant_info",
        "#define ASSISTANT_ESCALATE_BELOW 0.0f",
        "} assistant_result;",
        "int32_t assistant_call_ex(void *workspace, const uint8_t *query, size_t query_len, \
         uint8_t *out, size_t out_cap, size_t *out_len, assistant_result *result);",
        "see assistant_result",
        "extern \"C\"",
    ] {
        assert!(header.contains(needle), "header lacks {needle}");
    }
    // Two models link into one program: a second name gives disjoint symbols.
    let (b, _, _) = build_once("other");
    let other = needlec::emit::check_standalone(&b, "other_").unwrap();
    assert!(other.exports.iter().all(|e| !exports.contains(e)));
}

/// The header compiles warning-free as C11 and as C++17.
#[test]
fn header_compiles_as_c_and_cxx() {
    let dir = work_dir("header");
    build(&bundled("tiny-needle.pkl", None, 64, &dir)).unwrap();
    for (compiler, std, file) in [
        ("cc", "-std=c11", "use.c"),
        ("c++", "-std=c++17", "use.cpp"),
    ] {
        std::fs::write(
            dir.join(file),
            "#include \"needle.h\"\nint main(void) { return (int)needle_workspace_size() == 0; }\n",
        )
        .unwrap();
        let out = std::process::Command::new(compiler)
            .args([std, "-Wall", "-Wextra", "-pedantic", "-Werror", "-I"])
            .arg(&dir)
            .arg(dir.join(file))
            .arg("-o")
            .arg(dir.join(format!("{file}.out")))
            .arg(dir.join("libneedle.a"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{compiler}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The README's quick start: the example app linked against the bundled model's library.
#[test]
fn example_app_answers_like_needlec_run() {
    let dir = work_dir("example-app");
    build(&bundled("tiny-needle-folded.pkl", None, 512, &dir)).unwrap();
    let exe = dir.join("ask");
    let src = needle_test_support::repo_root().join("examples/c/ask.c");
    let out = std::process::Command::new(needle_test_support::c::cc())
        .args(["-std=c11", "-Wall", "-Wextra", "-pedantic", "-Werror", "-I"])
        .arg(&dir)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .arg(dir.join("libneedle.a"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(&exe)
        .arg("Turn off the lights in the kitchen")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "[{\"name\":\"toggle_lights\",\"arguments\":{\"room\":\"kitchen\",\"state\":false}}]\n"
    );
}

/// `--cpu native` opts into this machine's ISA extensions (FMA and wider vectors where it has
/// them): different code, the same answers on the trained model (its decisions are far from ties).
#[test]
fn native_cpu_build_gives_the_same_answers() {
    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    let queries: Vec<&str> = samples.iter().map(|s| s.query.as_str()).collect();
    let exe = build_library("native-cpu", |out| {
        let mut o = bundled("tiny-needle-folded.pkl", None, 512, out);
        o.cpu = Some("native".into());
        o
    });
    for (s, (status, output)) in samples.iter().zip(answers(&exe, "answer", &queries)) {
        assert_eq!(
            (status, output.as_str()),
            (0, s.fold_folded.as_str()),
            "{:?}",
            s.query
        );
    }
}

/// A query longer than the tool list leaves room for: the folded library cuts it as
/// `needlec run --fold tools` does; the exact library refuses it, since the reference would cut
/// the tool list instead and a cut query would silently differ.
#[test]
fn long_queries_are_cut_when_folded_and_refused_when_exact() {
    let tools = tiny_needle("tools.json");
    let long = "please set a timer for ten minutes ".repeat(150);
    let short = "Start a 35 minute timer.";
    let loaded = needlec::frontend::load(
        &tiny_needle("tiny-needle-folded.pkl"),
        &tiny_needle("tokenizer.model"),
        tools.to_str().unwrap(),
        None,
    )
    .unwrap();
    assert!(
        loaded.engine.prompt(&long).n_query_tokens < loaded.engine.tokenizer.encode(&long).len()
    );
    for fold in [FoldMode::Tools, FoldMode::None] {
        let exe = build_library(&format!("long-{}", fold.name()), |out| {
            bundled("tiny-needle-folded.pkl", Some(fold), 512, out)
        });
        let got = answers(&exe, "answer", &[&long, short]);
        assert_eq!(got[1].0, 0, "{fold:?}: a short query still works");
        if fold == FoldMode::Tools {
            let want = loaded.engine.generate(&long, 512).unwrap().output;
            assert_eq!(got[0], (0, want), "folded: cut like needlec run");
        } else {
            assert_eq!(got[0], (4, String::new()), "exact: ERR_QUERY_TOO_LONG");
        }
    }
}

/// `NAME_WORKSPACE_SIZE` in a generated header.
fn workspace_size(header: &str) -> usize {
    header
        .split("#define NEEDLE_WORKSPACE_SIZE ((size_t)")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no NEEDLE_WORKSPACE_SIZE in {header}"))
}

/// `needlec build --max-query-tokens N` answers exactly as `needlec run --max-query-tokens N`
/// in both fold modes: a short query as without the bound, a long one cut (folded) or refused
/// with `ERR_QUERY_TOO_LONG` (exact); and the workspace shrinks with N.
#[test]
fn bounded_query_answers_like_needlec_run_with_the_same_bound() {
    const BOUND: usize = 8;
    let short = "Start a 35 minute timer.";
    let long = "I need an alarm at 11:50 AM for stretching";
    let queries = [short, long];
    for fold in [FoldMode::Tools, FoldMode::None] {
        let options = needlec::frontend::ModelOptions {
            fold: Some(fold),
            weights: None,
            max_query_tokens: Some(BOUND),
            ..Default::default()
        };
        let engine = bundled_model("tiny-needle-folded.pkl", &options).engine;
        let tokens = |q: &str| engine.tokenizer.encode(q).len();
        assert!(tokens(short) <= BOUND && tokens(long) > BOUND);
        let mut sizes = Vec::new();
        for bound in [None, Some(64), Some(BOUND)] {
            let name = format!("bounded-{}-{bound:?}", fold.name());
            let mut out_dir = PathBuf::new();
            let exe = build_library(&name, |out| {
                out_dir = out.to_path_buf();
                BuildOptions {
                    max_query_tokens: bound,
                    ..bundled("tiny-needle-folded.pkl", Some(fold), 64, out)
                }
            });
            let header = std::fs::read_to_string(out_dir.join("needle.h")).unwrap();
            sizes.push(workspace_size(&header));
            if bound != Some(BOUND) {
                continue;
            }
            assert!(header.contains(&format!(
                "#define NEEDLE_MAX_QUERY_TOKENS ((size_t){BOUND})"
            )));
            let got = answers(&exe, "answer", &queries);
            for (q, got) in queries.iter().zip(&got) {
                let want = match engine.generate(q, 64) {
                    Ok(g) => (0, g.output),
                    Err(needle_runtime::decode::EngineError::QueryTooLong { .. }) => {
                        (4, String::new())
                    }
                    Err(e) => panic!("{q:?}: {e}"),
                };
                assert_eq!(got, &want, "{fold:?} {q:?}");
            }
            // The long query: cut and answered folded, refused exact.
            assert_eq!(got[1].0, if fold == FoldMode::Tools { 0 } else { 4 });
            assert_eq!(got[0].0, 0);
        }
        assert!(
            sizes[0] > sizes[1] && sizes[1] > sizes[2],
            "{fold:?}: {sizes:?}"
        );
    }
}

/// Widths that are not multiples of the kernels' 16-column blocks (d_model 44 = 2x16 + 8 + 4,
/// K/V width 22 = 16 + 4 + 1 + 1) take every tail path of the generated matmuls; the library
/// must still answer like the runtime, in both fold modes.
#[test]
fn odd_widths_answer_like_the_runtime() {
    let config = needlec::synth::parse_config_spec(
        r#"{"vocab_size":4096,"d_model":44,"num_heads":2,"num_kv_heads":1,"num_encoder_layers":2,"num_decoder_layers":2}"#,
    )
    .unwrap();
    let mut ckpt =
        needlec::synth::synth_checkpoint(&config, 5, needle_runtime::checkpoint::DType::F32);
    // A random model with tied embeddings answers EOS to EOS at once; a zero EOS row keeps its
    // logit at 0 so the model decodes every step and the kernels run for real.
    let embedding = ckpt.tensors.get_mut("embedding/embedding").unwrap();
    embedding.bytes[4 * config.d_model..8 * config.d_model].fill(0);
    let dir = work_dir("odd-widths");
    let path = dir.join("odd.safetensors");
    needlec::load::save_safetensors(&ckpt, &path).unwrap();
    let cases: Vec<Case> = read_json(&golden("cases.json"));
    let tools = &cases[0].tools;
    let queries: Vec<&str> = cases
        .iter()
        .filter(|c| &c.tools == tools)
        .map(|c| c.query.as_str())
        .collect();
    let tokenizer = load_tokenizer(&golden("dev4k.model")).unwrap();
    // Every weight format: 44 rows make a short last quantization group (32 + 12), and 44 and
    // 22 columns leave row-major tails after the panels of 8. The runtime computes with the
    // same rounded or quantized kernels.
    for weights in Precision::ALL {
        let model = needle_runtime::model::Model::from_checkpoint_as(&ckpt, weights).unwrap();
        for fold in [FoldMode::None, FoldMode::Tools] {
            let exe = build_library(&format!("odd-{weights}-{}", fold.name()), |out| {
                BuildOptions {
                    weights: Some(weights),
                    ..options(&path, &golden("dev4k.model"), tools, Some(fold), 24, out)
                }
            });
            let engine = Engine::new(
                model.clone(),
                tokenizer.clone(),
                parse_tools(tools).unwrap().context(),
                fold,
            )
            .unwrap();
            for (q, (status, output)) in queries.iter().zip(answers(&exe, "answer", &queries)) {
                assert_eq!(status, 0);
                assert_eq!(
                    output,
                    engine.generate(q, 24).unwrap().output,
                    "--weights {weights} {fold:?} {q:?}"
                );
            }
        }
    }
}

/// One query's answer from the harness's `ex` mode (`NAME_call_ex`, checked there to give
/// `NAME_call`'s status and bytes).
#[derive(Debug)]
struct ExAnswer {
    status: i32,
    confidence: f32,
    escalate: bool,
    tool: i32,
    /// `NAME_result.parsed`: the model's text parsed as JSON.
    parsed: bool,
    choice_steps: usize,
    output: String,
}

fn ex_answers(exe: &Path, queries: &[&str]) -> Vec<ExAnswer> {
    let mut stdin = Vec::new();
    for q in queries {
        stdin.extend((q.len() as u32).to_le_bytes());
        stdin.extend(q.as_bytes());
    }
    let out = run(exe, &["ex"], &stdin);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f.len(), 7, "{line}");
            let hex = f[6];
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            ExAnswer {
                status: f[0].parse().unwrap(),
                confidence: f[1].parse().unwrap(),
                escalate: match f[2] {
                    "0" => false,
                    "1" => true,
                    e => panic!("escalate {e} in {line}"),
                },
                tool: f[3].parse().unwrap(),
                parsed: match f[4] {
                    "0" => false,
                    "1" => true,
                    p => panic!("parsed {p} in {line}"),
                },
                choice_steps: f[5].parse().unwrap(),
                output: String::from_utf8(bytes).expect("output is UTF-8"),
            }
        })
        .collect()
}

/// A threshold strictly between two of `values` near their median, at least `gap` from every
/// value, so that some fall below it and some do not.
fn threshold_between(values: &[f32], gap: f32) -> f32 {
    let mut v = values.to_vec();
    v.sort_by(f32::total_cmp);
    let mid = v.len() / 2;
    let mut pairs: Vec<usize> = (0..v.len() - 1).collect();
    pairs.sort_by_key(|&k| k.abs_diff(mid));
    let k = pairs
        .into_iter()
        .find(|&k| v[k + 1] - v[k] > 2.0 * gap)
        .unwrap_or_else(|| panic!("no two confidences {} apart: {v:?}", 2.0 * gap));
    (v[k] + v[k + 1]) / 2.0
}

/// `NAME_call_ex` on every bundled sample (and three requests no tool covers), both checkpoints
/// in both fold modes: the same answer
/// as `NAME_call`; the confidence of `needlec run --confidence` (the runtime's `Engine`) within
/// 1e-4, the same choice steps and the same tool; and `escalate` set exactly below the
/// `--escalate-below` threshold baked in (one between the samples' confidences).
#[test]
fn call_ex_reports_the_runtimes_confidence_tool_and_escalate_bit() {
    const TOLERANCE: f32 = 1e-4;
    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    let mut queries: Vec<&str> = samples.iter().map(|s| s.query.as_str()).collect();
    // Requests no tool covers (answered `[]`: tool -1), the empty one included.
    queries.extend(["Tell me a joke", "", "hello"]);
    let combos = [
        ("tiny-needle.pkl", FoldMode::None),
        ("tiny-needle.pkl", FoldMode::Tools),
        ("tiny-needle-folded.pkl", FoldMode::Tools),
        ("tiny-needle-folded.pkl", FoldMode::None),
    ];
    let mut worst = 0.0f32;
    let mut tools_seen = std::collections::BTreeSet::new();
    for (i, (checkpoint, fold)) in combos.into_iter().enumerate() {
        let options = needlec::frontend::ModelOptions {
            fold: Some(fold),
            ..Default::default()
        };
        let engine = bundled_model(checkpoint, &options).engine;
        let want: Vec<_> = queries
            .iter()
            .map(|q| {
                let g = engine.generate(q, 512).unwrap();
                let c = engine.confidence(&g);
                (g, c)
            })
            .collect();
        let values: Vec<f32> = want.iter().map(|(_, c)| c.value).collect();
        let t = threshold_between(&values, 10.0 * TOLERANCE);
        let exe = build_library(&format!("call-ex-{i}"), |out| BuildOptions {
            escalate_below: f64::from(t),
            ..bundled(checkpoint, Some(fold), 512, out)
        });
        let got = ex_answers(&exe, &queries);
        assert_eq!(got.len(), queries.len());
        let mut escalated = 0;
        for (q, (got, (g, c))) in queries.iter().zip(got.iter().zip(&want)) {
            let what = format!("{checkpoint} {fold:?} {q:?}: {got:?}, runtime {}", c.value);
            assert_eq!(
                (got.status, got.output.as_str()),
                (0, g.output.as_str()),
                "{what}"
            );
            assert!((0.0..=1.0).contains(&got.confidence), "{what}");
            let diff = (got.confidence - c.value).abs();
            assert!(diff <= TOLERANCE, "{what}");
            worst = worst.max(diff);
            let choices = g.steps.iter().filter(|s| s.allowed != Some(1)).count();
            assert_eq!(got.choice_steps, choices, "{what}");
            assert_eq!(got.tool, c.tool.map_or(-1, |t| t as i32), "{what}");
            assert_eq!(got.parsed, parses_as_json(&g.text), "{what}");
            assert_eq!(got.escalate, c.value < t, "{what} threshold {t}");
            escalated += usize::from(got.escalate);
            tools_seen.insert(got.tool);
        }
        assert!(
            escalated > 0 && escalated < queries.len(),
            "{checkpoint} {fold:?}: {escalated} of {} escalated below {t}",
            queries.len()
        );
    }
    eprintln!("largest confidence difference from the runtime: {worst:e}; tools {tools_seen:?}");
    // The samples call every tool, and the extra requests none.
    assert_eq!(
        tools_seen.into_iter().collect::<Vec<_>>(),
        [-1, 0, 1, 2, 3, 4, 5]
    );
}

/// Weights that are finite (the loader accepts them) but overflow float32 at run time make the
/// logits NaN or infinite: the library returns `NEEDLE_ERR_NUMERIC` (8), as `needlec run`
/// errs, rather than OK with an empty or arbitrary answer.
#[test]
fn overflowing_weights_give_err_numeric() {
    let config = needlec::synth::parse_config_spec("tiny").unwrap();
    let mut ckpt =
        needlec::synth::synth_checkpoint(&config, 3, needle_runtime::checkpoint::DType::F32);
    let scale = ckpt.tensors.get_mut("decoder/ZCRMSNorm_0/scale").unwrap();
    for v in scale.bytes.chunks_exact_mut(4) {
        v.copy_from_slice(&3e38f32.to_le_bytes());
    }
    let dir = work_dir("overflow");
    let path = dir.join("overflow.safetensors");
    needlec::load::save_safetensors(&ckpt, &path).unwrap();
    let tools = std::fs::read_to_string(tiny_needle("tools.json")).unwrap();
    let model = needle_runtime::model::Model::from_checkpoint(&ckpt).unwrap();
    let tokenizer = load_tokenizer(&golden("dev4k.model")).unwrap();
    let queries = ["turn on the lights in the kitchen", "hi"];
    for fold in [FoldMode::None, FoldMode::Tools] {
        let exe = build_library(&format!("overflow-{}", fold.name()), |out| {
            options(&path, &golden("dev4k.model"), &tools, Some(fold), 16, out)
        });
        let engine = Engine::new(
            model.clone(),
            tokenizer.clone(),
            parse_tools(&tools).unwrap().context(),
            fold,
        )
        .unwrap();
        for (q, (status, output)) in queries.iter().zip(answers(&exe, "answer", &queries)) {
            let err = engine.generate(q, 16).unwrap_err();
            assert!(err.to_string().contains("not finite"), "{err}");
            assert_eq!((status, output.as_str()), (8, ""), "{fold:?} {q:?}");
        }
    }
}

// ---- Random queries (issue #12: finding 11 and the engine-free property test) -----------------

/// `NAME_MAX_QUERY_BYTES` of every library (`needlec::codegen::library::MAX_QUERY_BYTES`).
const MAX_QUERY_BYTES: usize = 16384;

/// `#define NEEDLE_MAX_QUERY_TOKENS` of a generated header.
fn max_query_tokens(header: &str) -> usize {
    header
        .split("#define NEEDLE_MAX_QUERY_TOKENS ((size_t)")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no NEEDLE_MAX_QUERY_TOKENS in {header}"))
}

/// Runs the harness in `mode` over raw byte queries: per query the status and output bytes.
fn answers_bytes(exe: &Path, mode: &str, queries: &[Vec<u8>]) -> Vec<(i32, Vec<u8>)> {
    let mut stdin = Vec::new();
    for q in queries {
        stdin.extend((q.len() as u32).to_le_bytes());
        stdin.extend(q);
    }
    let out = run(exe, &[mode], &stdin);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let (status, hex) = line.split_once(' ').expect("status and hex");
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            (status.parse().unwrap(), bytes)
        })
        .collect()
}

/// Characters for the Unicode queries: ASCII, Latin-1, Greek, Cyrillic, CJK, combining marks,
/// emoji (4-byte UTF-8), controls, NUL, a BOM, SentencePiece's own `▁` and the tokenizer's
/// special-looking text.
const UNICODE_POOL: &[&str] = &[
    "a",
    "Z",
    "7",
    " ",
    "  ",
    "\t",
    "\n",
    "\0",
    "é",
    "ß",
    "Ω",
    "ж",
    "中",
    "文",
    "の",
    "한",
    "\u{301}",
    "😀",
    "🦀",
    "\u{feff}",
    "▁",
    "<tool_call>",
    "<s>",
    "</s>",
    "<unk>",
    "\"",
    "{",
    "}",
    "[",
    "]",
    "\\",
    "timer",
    "alarm",
    "weather",
    "Paris",
    "call",
    "set_timer",
    "name",
    "\u{10ffff}",
    "\u{7f}",
];

/// Byte sequences that make a query invalid UTF-8: a lone continuation byte, an overlong
/// encoding, an encoded surrogate, a code point above U+10FFFF, a truncated sequence, 0xFF.
const INVALID_UTF8: &[&[u8]] = &[
    &[0x80],
    &[0xc0, 0x80],
    &[0xed, 0xa0, 0x80],
    &[0xf4, 0x90, 0x80, 0x80],
    &[0xe2, 0x82],
    &[0xff],
];

/// One random query: printable ASCII, Unicode, a bundled sample mutated, invalid UTF-8 or empty,
/// chosen by `r`. `samples` are real requests (so some answers are real calls).
fn random_query(r: &mut needle_test_support::Rng, samples: &[&str]) -> Vec<u8> {
    match r.below(10) {
        0..=2 => (0..r.below(80)).map(|_| b' ' + r.below(95) as u8).collect(),
        3..=4 => (0..r.below(40))
            .map(|_| *r.pick(UNICODE_POOL))
            .collect::<String>()
            .into_bytes(),
        5..=7 => {
            let mut q = r.pick(samples).as_bytes().to_vec();
            for _ in 0..r.below(4) {
                let at = r.below(q.len() + 1);
                let piece = r.pick(UNICODE_POOL).as_bytes();
                q.splice(at..at, piece.iter().copied());
            }
            // Keep it UTF-8: cut only at a character boundary.
            let s = String::from_utf8_lossy(&q).into_owned();
            s.into_bytes()
        }
        8 => {
            let mut q = r.pick(samples).as_bytes().to_vec();
            let at = r.below(q.len() + 1);
            q.splice(at..at, r.pick(INVALID_UTF8).iter().copied());
            q
        }
        _ => Vec::new(),
    }
}

/// Queries at the length limits: exactly `MAX_QUERY_BYTES` bytes (ASCII, and ending in a 4-byte
/// character), one byte more, and (for the token limit of exact mode) the longest query of
/// `max_tokens` tokens and one a word longer.
fn limit_queries(engine: &Engine, max_tokens: usize) -> Vec<Vec<u8>> {
    let mut q = Vec::new();
    let ascii = "set a timer for ten minutes ".repeat(MAX_QUERY_BYTES / 20);
    q.push(ascii.as_bytes()[..MAX_QUERY_BYTES].to_vec());
    q.push(ascii.as_bytes()[..MAX_QUERY_BYTES + 1].to_vec());
    let mut emoji = ascii.as_bytes()[..MAX_QUERY_BYTES - 4].to_vec();
    emoji.extend("😀".as_bytes());
    q.push(emoji.clone());
    emoji.push(b'!');
    q.push(emoji);
    let mut text = String::from("Wake me up");
    let words = [
        " at",
        " seven",
        " tomorrow",
        " please",
        " and",
        " remind",
        " me",
    ];
    let mut i = 0;
    loop {
        let longer = format!("{text}{}", words[i % words.len()]);
        if engine.tokenizer.encode(&longer).len() > max_tokens {
            q.push(text.into_bytes());
            q.push(longer.into_bytes());
            break;
        }
        text = longer;
        i += 1;
    }
    q
}

/// What the library must return for `query`, from the runtime: ERR_UTF8 (3) where the runtime
/// cannot even take the bytes (`&str`); ERR_QUERY_TOO_LONG (4) over the byte limit, in exact
/// mode over `max_tokens` query tokens (where the runtime, like the reference, would cut the
/// tool list instead: the library refuses, as the README says), or where the runtime refuses
/// the query's length; else OK and the runtime's output.
fn runtime_answer(
    engine: &Engine,
    query: &[u8],
    max_gen_len: usize,
    exact_max_tokens: Option<usize>,
) -> (i32, Vec<u8>) {
    let Ok(q) = std::str::from_utf8(query) else {
        return (3, Vec::new());
    };
    if query.len() > MAX_QUERY_BYTES {
        return (4, Vec::new());
    }
    if exact_max_tokens.is_some_and(|max| engine.tokenizer.encode(q).len() > max) {
        return (4, Vec::new());
    }
    match engine.generate(q, max_gen_len) {
        Ok(g) => (0, g.output.into_bytes()),
        Err(needle_runtime::decode::EngineError::QueryTooLong { .. }) => (4, Vec::new()),
        Err(e) => panic!("{q:?}: {e}"),
    }
}

/// The property test that needs no engine beyond the runtime: for both bundled checkpoints in
/// both fold modes, the library and the runtime give identical statuses and bytes on random
/// queries (printable ASCII, Unicode, mutated samples, invalid UTF-8, empty) and on queries at
/// the byte and token limits. Deterministic (a fixed seed per configuration).
#[test]
fn random_queries_answer_byte_for_byte_like_the_runtime() {
    const PER_CONFIG: usize = 250;
    const MAX_GEN: usize = 64;
    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    let sample_queries: Vec<&str> = samples.iter().map(|s| s.query.as_str()).collect();
    let combos = [
        ("tiny-needle.pkl", FoldMode::None),
        ("tiny-needle.pkl", FoldMode::Tools),
        ("tiny-needle-folded.pkl", FoldMode::Tools),
        ("tiny-needle-folded.pkl", FoldMode::None),
    ];
    for (i, (checkpoint, fold)) in combos.into_iter().enumerate() {
        let options = needlec::frontend::ModelOptions {
            fold: Some(fold),
            ..Default::default()
        };
        let engine = bundled_model(checkpoint, &options).engine;
        let mut out_dir = PathBuf::new();
        let exe = build_library(&format!("random-{i}"), |out| {
            out_dir = out.to_path_buf();
            bundled(checkpoint, Some(fold), MAX_GEN, out)
        });
        let header = std::fs::read_to_string(out_dir.join("needle.h")).unwrap();
        let mut r = needle_test_support::Rng(0x5eed_0000 + i as u64);
        let mut queries: Vec<Vec<u8>> = (0..PER_CONFIG)
            .map(|_| random_query(&mut r, &sample_queries))
            .collect();
        let max_tokens = max_query_tokens(&header);
        queries.extend(limit_queries(&engine, max_tokens));
        let exact_max = (fold == FoldMode::None).then_some(max_tokens);
        let got = answers_bytes(&exe, "answer", &queries);
        assert_eq!(got.len(), queries.len());
        let mut statuses = std::collections::BTreeMap::new();
        for (q, got) in queries.iter().zip(&got) {
            let want = runtime_answer(&engine, q, MAX_GEN, exact_max);
            let shown: String = String::from_utf8_lossy(q).chars().take(200).collect();
            assert!(
                got == &want,
                "{checkpoint} {fold:?} query of {} bytes {shown:?}: library {:?}, runtime {:?}",
                q.len(),
                (got.0, String::from_utf8_lossy(&got.1)),
                (want.0, String::from_utf8_lossy(&want.1)),
            );
            *statuses.entry(got.0).or_insert(0usize) += 1;
        }
        eprintln!("{checkpoint} {fold:?}: statuses {statuses:?}");
        // Every kind of query was seen: answers, invalid UTF-8 and too long.
        assert!(
            statuses.contains_key(&0) && statuses.contains_key(&3) && statuses.contains_key(&4)
        );
    }
}

/// Finding 11: about 9% of random queries make the model emit text that is not JSON, which the
/// library passes through byte for byte as the reference does. `NAME_result.parsed` says which:
/// 1 exactly when the answer parses as JSON (checked with serde_json on the same bytes), and
/// both kinds occur.
#[test]
fn call_ex_reports_whether_the_answer_parsed_as_json() {
    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    let sample_queries: Vec<&str> = samples.iter().map(|s| s.query.as_str()).collect();
    let exe = build_library("parsed-flag", |out| {
        bundled("tiny-needle-folded.pkl", Some(FoldMode::Tools), 64, out)
    });
    let mut r = needle_test_support::Rng(0x0b5e_55ed);
    let queries: Vec<String> = (0..300)
        .filter_map(|_| String::from_utf8(random_query(&mut r, &sample_queries)).ok())
        .collect();
    let refs: Vec<&str> = queries.iter().map(String::as_str).collect();
    let got = ex_answers(&exe, &refs);
    assert_eq!(got.len(), refs.len());
    let (mut json, mut text) = (0, 0);
    for (q, a) in refs.iter().zip(&got) {
        assert_eq!(a.status, 0, "{q:?}: {a:?}");
        let is_json = serde_json::from_slice::<serde_json::Value>(a.output.as_bytes()).is_ok();
        assert_eq!(a.parsed, is_json, "{q:?}: {a:?}");
        if a.parsed {
            json += 1;
        } else {
            text += 1;
        }
    }
    eprintln!("{json} answers parsed as JSON, {text} passed through as text");
    assert!(json > 0 && text > 0, "{json} JSON, {text} text");
}

/// Runs the harness under valgrind's memcheck in `mode` over `queries`: no invalid read or
/// write, no use of uninitialised values, no bad free (`--error-exitcode`), and the same output
/// as without valgrind. Leaks are the harness's, not the library's (it allocates nothing).
fn memcheck(valgrind: &Path, exe: &Path, mode: &str, queries: &[Vec<u8>]) -> String {
    let mut stdin = Vec::new();
    for q in queries {
        stdin.extend((q.len() as u32).to_le_bytes());
        stdin.extend(q);
    }
    let input = exe.with_extension(format!("{mode}.in"));
    std::fs::write(&input, &stdin).unwrap();
    let out = std::process::Command::new(valgrind)
        .args([
            "--tool=memcheck",
            "--error-exitcode=99",
            "--leak-check=no",
            "--quiet",
        ])
        .arg(exe)
        .arg(mode)
        .stdin(std::fs::File::open(&input).unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "memcheck {} {mode}: {stderr}",
        exe.display()
    );
    assert!(!stderr.contains("Invalid"), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let plain = run(exe, &[mode], &stdin);
    assert_eq!(
        stdout,
        String::from_utf8(plain.stdout).unwrap(),
        "{mode}: the same output with and without valgrind"
    );
    stdout
}

/// The emitted library under valgrind memcheck: the golden cases (every tool list, both fold
/// modes, the golden random checkpoint), then the bundled model's C-interface contracts (every
/// error path), its samples and a few random queries (invalid UTF-8 and the byte limit among
/// them). Any invalid read or write fails the test.
#[test]
fn library_is_clean_under_valgrind_memcheck() {
    let Some(valgrind) = needle_test_support::toolchain::require(
        "valgrind",
        "valgrind",
        "runs the emitted library under memcheck",
    ) else {
        return;
    };
    let cases: Vec<Case> = read_json(&golden("cases.json"));
    let mut tool_lists: Vec<&str> = cases.iter().map(|c| c.tools.as_str()).collect();
    tool_lists.sort();
    tool_lists.dedup();
    for (t, tools) in tool_lists.iter().enumerate() {
        let queries: Vec<Vec<u8>> = cases
            .iter()
            .filter(|c| c.tools == *tools)
            .map(|c| c.query.clone().into_bytes())
            .collect();
        for fold in [FoldMode::None, FoldMode::Tools] {
            let exe = build_library(&format!("memcheck-golden-{t}-{}", fold.name()), |out| {
                options(
                    &golden("tiny_random.pkl"),
                    &golden("dev4k.model"),
                    tools,
                    Some(fold),
                    cases[0].max_gen_len,
                    out,
                )
            });
            let out = memcheck(&valgrind, &exe, "answer", &queries);
            assert_eq!(out.lines().count(), queries.len());
            assert!(out.lines().all(|l| l.starts_with("0 ")), "{out}");
        }
    }
    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    let sample_queries: Vec<&str> = samples.iter().map(|s| s.query.as_str()).collect();
    let mut r = needle_test_support::Rng(0x7a1_6e1d);
    let mut queries: Vec<Vec<u8>> = sample_queries
        .iter()
        .take(4)
        .map(|q| q.as_bytes().to_vec())
        .chain((0..6).map(|_| random_query(&mut r, &sample_queries)))
        .collect();
    queries.push(b"hi \xed\xa0\x80".to_vec());
    queries.push(vec![b'a'; MAX_QUERY_BYTES]);
    queries.push(vec![b'a'; MAX_QUERY_BYTES + 1]);
    let exe = build_library("memcheck-bundled", |out| {
        bundled("tiny-needle-folded.pkl", Some(FoldMode::Tools), 128, out)
    });
    let out = memcheck(&valgrind, &exe, "contracts", &[]);
    assert!(out.contains("ok call_ex"), "{out}");
    let out = memcheck(&valgrind, &exe, "answer", &queries);
    let statuses: Vec<&str> = out.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(statuses.len(), queries.len());
    assert!(statuses.contains(&"0") && statuses.contains(&"3") && statuses.contains(&"4"));
    memcheck(&valgrind, &exe, "ex", &queries);
}

/// `needlec build --grammar strict`: on every bundled sample (and three requests no tool
/// covers), with both checkpoints and both fold modes, the library's answer is byte for byte
/// `needlec run --grammar strict`'s (the runtime engine with the strict grammar), at the default
/// budget and at small ones where the budget closes the list early; `NAME_call_ex` reports the
/// runtime's confidence (within 1e-4), choice steps and tool; and the decoder steps take the
/// runtime's strict lists (one allowed id: jump-forward without logits; a short list: sparse
/// logits; else full), query by query.
#[test]
fn strict_library_answers_like_needlec_run_strict() {
    use needle_runtime::decode::GrammarKind;
    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    let mut queries: Vec<&str> = samples.iter().map(|s| s.query.as_str()).collect();
    queries.extend(["Tell me a joke", "", "hello"]);
    let combos = [
        ("tiny-needle.pkl", FoldMode::None, [512, 12]),
        ("tiny-needle.pkl", FoldMode::Tools, [512, 64]),
        ("tiny-needle-folded.pkl", FoldMode::None, [512, 64]),
        ("tiny-needle-folded.pkl", FoldMode::Tools, [512, 12]),
    ];
    let (mut forced, mut cut) = (0, 0);
    for (i, (checkpoint, fold, lens)) in combos.into_iter().enumerate() {
        let options = needlec::frontend::ModelOptions {
            fold: Some(fold),
            grammar: GrammarKind::Strict,
            ..Default::default()
        };
        let loaded = bundled_model(checkpoint, &options);
        let engine = &loaded.engine;
        let sparse_max = needlec::codegen::model::sparse_logits_max(engine.model.config.vocab_size);
        for max_gen_len in lens {
            let exe = build_library(&format!("strict-{i}-{max_gen_len}"), |out| BuildOptions {
                grammar: GrammarKind::Strict,
                ..bundled(checkpoint, Some(fold), max_gen_len, out)
            });
            let got = ex_answers(&exe, &queries);
            let steps = step_counts(&exe, &queries);
            // Four threads with their own workspaces answer as one does.
            let threaded = answers(&exe, "threads", &queries);
            for (t, g) in threaded.iter().zip(&got) {
                assert_eq!((t.0, &t.1), (g.status, &g.output), "{checkpoint} threads");
            }
            assert_eq!(threaded.len(), got.len());
            assert_eq!((got.len(), steps.len()), (queries.len(), queries.len()));
            for ((q, got), line) in queries.iter().zip(&got).zip(&steps) {
                let what = format!("{checkpoint} {fold:?} max_gen_len {max_gen_len} {q:?}");
                let run = engine.generate(q, max_gen_len).unwrap();
                let c = engine.confidence(&run);
                assert_eq!(got.status, 0, "{what}");
                assert_eq!(
                    got.output, run.output,
                    "{what}: library vs needlec run --grammar strict"
                );
                assert!(
                    (got.confidence - c.value).abs() <= 1e-4,
                    "{what}: {got:?} vs {}",
                    c.value
                );
                let choices = run.steps.iter().filter(|s| s.allowed != Some(1)).count();
                assert_eq!(got.choice_steps, choices, "{what}");
                assert_eq!(got.tool, c.tool.map_or(-1, |t| t as i32), "{what}");
                assert!(!got.escalate, "{what}");
                // The strict grammar's guarantee, as the library reports it: always JSON.
                assert!(
                    got.parsed && needle_runtime::output::parses_as_json(&run.text),
                    "{what}: {}",
                    run.text
                );
                let mut want = [0usize; 3];
                for step in &run.steps {
                    match step.allowed {
                        Some(1) => want[0] += 1,
                        Some(n) if n >= 2 && n <= sparse_max => want[1] += 1,
                        _ => want[2] += 1,
                    }
                }
                assert_eq!((line.0, &line.1[..3]), (0, &want[..]), "{what}: steps");
                forced += want[0];
                // Answers the budget cut short: the list is still complete and valid JSON.
                if run.steps.len() == max_gen_len - 1 {
                    cut += 1;
                    assert!(
                        needle_runtime::pyjson::parse(&run.output).is_ok(),
                        "{what}: {}",
                        run.output
                    );
                }
            }
        }
    }
    // The strict grammar forces literal runs (`{"name":"`, `"arguments":`): jump-forward works;
    // and max_gen_len 12 closes some answers early.
    assert!(forced > 0, "no forced step in any strict decode");
    assert!(cut > 0, "the small budgets never bit");
}

/// A tool whose parameter type the strict grammar cannot express fails `needlec build
/// --grammar strict` with the same message as `needlec run --grammar strict`, naming the tool
/// and the key; so does a budget too small for `[]`. The reference grammar builds both.
#[test]
fn strict_build_refuses_what_strict_run_refuses() {
    use needle_runtime::decode::GrammarKind;
    let tools = r#"[{"name":"f","description":"d","parameters":{"when":{"type":"date","description":"x","required":true}}}]"#;
    let run_err = match needlec::frontend::load_with(
        &tiny_needle("tiny-needle-folded.pkl"),
        &tiny_needle("tokenizer.model"),
        tools,
        &needlec::frontend::ModelOptions {
            grammar: GrammarKind::Strict,
            ..Default::default()
        },
    ) {
        Ok(_) => panic!("run accepted a schema the strict grammar cannot express"),
        Err(e) => e.to_string(),
    };
    assert!(
        run_err.contains("\"f\"") && run_err.contains("\"when\""),
        "{run_err}"
    );
    let dir = work_dir("strict-refused");
    let opts = |grammar, max_gen_len, tools: &str| BuildOptions {
        grammar,
        tools: tools.to_string(),
        ..bundled("tiny-needle-folded.pkl", None, max_gen_len, &dir)
    };
    let build_err = build(&opts(GrammarKind::Strict, 64, tools))
        .unwrap_err()
        .to_string();
    assert_eq!(build_err, run_err);
    build(&opts(GrammarKind::Reference, 64, tools)).unwrap();

    // `<tool_call>` plus the shortest list take `needed` tokens: max_gen_len `needed` allows
    // one too few, `needed + 1` builds.
    let bundled_tools = std::fs::read_to_string(tiny_needle("tools.json")).unwrap();
    let loaded = needlec::frontend::load_with(
        &tiny_needle("tiny-needle-folded.pkl"),
        &tiny_needle("tokenizer.model"),
        &bundled_tools,
        &needlec::frontend::ModelOptions {
            grammar: GrammarKind::Strict,
            ..Default::default()
        },
    )
    .unwrap();
    let needed = loaded.engine.strict_tables().unwrap().min_tokens() as usize + 1;
    let err = build(&opts(GrammarKind::Strict, needed, &bundled_tools))
        .unwrap_err()
        .to_string();
    let run_err = loaded
        .engine
        .generate("hello", needed)
        .unwrap_err()
        .to_string();
    assert!(err.ends_with(&run_err), "{err} / {run_err}");
    assert!(err.contains("--grammar strict needs at least"), "{err}");
    build(&opts(GrammarKind::Strict, needed + 1, &bundled_tools)).unwrap();
}

/// The multi-row forced step (`--max-forced-rows`): under `--grammar strict` on the bundled
/// samples, in every weight format (float32, half, int8, int4: the integer formats take their
/// rows singly inside each weight block, as a one-row step computes them) and both fold modes,
/// a library that runs runs of forced tokens as multi-row steps answers exactly as one that
/// runs every step as one row (`--max-forced-rows 1`): the same status and bytes, the same
/// confidence bit for bit, the same choice steps and tool. The step counts prove the multi-row
/// path ran, exactly as `forced_row_calls` predicts from the runtime's allowed lists, and
/// never with `--max-forced-rows 1`. A bound of 2 splits the same runs into more steps.
#[test]
fn multi_row_forced_steps_answer_as_one_row_steps() {
    use needle_runtime::decode::GrammarKind;
    use needlec::codegen::model::{forced_row_calls, MAX_FORCED_ROWS};
    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    let mut queries: Vec<&str> = samples.iter().map(|s| s.query.as_str()).collect();
    queries.extend(["Tell me a joke", ""]);
    let combos = [
        (None, FoldMode::None, 512),
        (Some(Precision::F32), FoldMode::Tools, 512),
        (Some(Precision::Int8), FoldMode::Tools, 64),
        (Some(Precision::Int4), FoldMode::None, 512),
    ];
    let mut multi_rows = 0;
    for (i, (weights, fold, max_gen_len)) in combos.into_iter().enumerate() {
        let checkpoint = "tiny-needle.pkl";
        let options = needlec::frontend::ModelOptions {
            fold: Some(fold),
            grammar: GrammarKind::Strict,
            weights,
            ..Default::default()
        };
        let loaded = bundled_model(checkpoint, &options);
        let lib = |rows: usize| {
            build_library(&format!("multirow-{i}-{rows}"), |out| BuildOptions {
                grammar: GrammarKind::Strict,
                weights,
                max_forced_rows: rows,
                ..bundled(checkpoint, Some(fold), max_gen_len, out)
            })
        };
        let what = format!("{weights:?} {fold:?} max_gen_len {max_gen_len}");
        let one = lib(1);
        let want = ex_answers(&one, &queries);
        for rows in [MAX_FORCED_ROWS, 2] {
            let exe = lib(rows);
            let got = ex_answers(&exe, &queries);
            assert_eq!(got.len(), want.len(), "{what}");
            for ((q, g), w) in queries.iter().zip(&got).zip(&want) {
                let what = format!("{what} --max-forced-rows {rows} {q:?}");
                assert_eq!((g.status, &g.output), (w.status, &w.output), "{what}");
                assert_eq!(
                    (g.confidence.to_bits(), g.choice_steps, g.tool, g.parsed),
                    (w.confidence.to_bits(), w.choice_steps, w.tool, w.parsed),
                    "{what}"
                );
            }
            for (q, line) in queries.iter().zip(step_counts(&exe, &queries)) {
                let run = loaded.engine.generate(q, max_gen_len).unwrap();
                let calls = forced_row_calls(run.steps.iter().map(|s| s.allowed), rows);
                let multi: Vec<usize> = calls.into_iter().filter(|&n| n >= 2).collect();
                assert!(multi.iter().all(|&n| n <= rows), "{what} {q:?}");
                assert_eq!(
                    (line.0, line.1[3], line.1[4]),
                    (0, multi.iter().sum::<usize>(), multi.len()),
                    "{what} --max-forced-rows {rows} {q:?}: multi-row steps"
                );
                if rows == MAX_FORCED_ROWS {
                    multi_rows += line.1[3];
                }
            }
        }
        for line in step_counts(&one, &queries) {
            assert_eq!(
                (line.1[3], line.1[4]),
                (0, 0),
                "{what}: --max-forced-rows 1"
            );
        }
    }
    assert!(multi_rows > 0, "no multi-row step ran");
}
