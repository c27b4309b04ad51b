//! The generated model code (`needlec::codegen::model`) end to end: compile a random fixture
//! with the case's tool list, generate `encode_query`/`decoder_step` for the host, link them
//! into `tests/c/model_harness.c` and compare the teacher-forced logits and argmaxes with the
//! reference's golden values, both fold modes, both fixtures.

use std::collections::BTreeMap;
use std::path::PathBuf;

use needle_ir::ConstData;
use needle_runtime::decode::{FoldMode, TOOLS_ID};
use needle_targets::Target;
use needle_test_support::c::{build_harness, run};
use needle_test_support::{golden, logit_tolerance, read_json, work_dir, ForcedCase};
use needlec::abi::write_header;
use needlec::build::{compile, BuildOptions, Compiled};
use needlec::codegen::model::{define_model, ModelCode};
use needlec::codegen::KernelSet;
use needlec::emit::{check_standalone, write_archive, ArchiveMember};
use needlec::precision::Precision;

const PREFIX: &str = "t_";

fn compile_case(
    checkpoint: &str,
    tools: &str,
    fold: FoldMode,
    weights: Option<Precision>,
) -> Compiled {
    compile_checkpoint(&golden(checkpoint), tools, fold, weights)
}

fn compile_checkpoint(
    checkpoint: &std::path::Path,
    tools: &str,
    fold: FoldMode,
    weights: Option<Precision>,
) -> Compiled {
    let opts = BuildOptions {
        checkpoint: checkpoint.to_path_buf(),
        tokenizer: golden("dev4k.model"),
        tools: tools.to_string(),
        target: "host".into(),
        cpu: None,
        features: vec![],
        fold: Some(fold),
        weights,
        max_gen_len: 512,
        max_query_tokens: None,
        name: "t".into(),
        escalate_below: 0.0,
        quantize_activations: false,
        grammar: Default::default(),
        max_forced_rows: needlec::codegen::model::MAX_FORCED_ROWS,
        emit: vec![],
        out_dir: PathBuf::from("."),
    };
    compile(&opts).unwrap_or_else(|e| panic!("compile {}: {e}", checkpoint.display()))
}

/// The harness executable for one compiled program, and the model's layout.
fn harness(dir: &std::path::Path, compiled: &Compiled) -> (PathBuf, ModelCode) {
    let target = Target::host().unwrap();
    let mut ks = KernelSet::new(&target, PREFIX).unwrap();
    let code = define_model(
        &mut ks,
        &compiled.module,
        &compiled.store,
        true,
        needlec::codegen::model::MAX_FORCED_ROWS,
    )
    .unwrap();
    // The layout the code uses is the IR's workspace plan (what `--emit ir` prints), with room
    // for the multi-row step's rows past its arena where they need it.
    let plan = needle_ir::WorkspacePlan::of(&compiled.module).unwrap();
    assert_eq!(code.logits_offset, plan.logits.offset);
    assert!(code.workspace_bytes >= plan.total_bytes);
    assert_eq!(code.max_rows, needlec::codegen::model::MAX_FORCED_ROWS);
    let functions = ks.functions().to_vec();
    let names: Vec<&str> = functions.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "t_model_encode_query",
            "t_model_decoder_step",
            "t_model_decoder_rows"
        ]
    );
    let obj = ks.finish().unwrap();
    let rep = check_standalone(&obj, PREFIX).unwrap();
    assert_eq!(
        rep.exports,
        [
            "t_model_decoder_rows",
            "t_model_decoder_step",
            "t_model_encode_query"
        ]
    );
    let vocab = compiled.model.config.vocab_size;
    let extra = format!(
        "#define MODEL_WS_BYTES {}\n#define MODEL_WS_ALIGN {}\n#define MODEL_LOGITS_OFFSET {}\n\
         #define MODEL_VOCAB {vocab}\n#define MODEL_MAX_POSITIONS {}\n\
         #define MODEL_ENCODE t_model_encode_query\n#define MODEL_STEP t_model_decoder_step\n\
         #define MODEL_ROWS t_model_decoder_rows\n#define MODEL_MAX_ROWS {}\n",
        code.workspace_bytes,
        code.workspace_align,
        code.logits_offset,
        code.max_positions,
        code.max_rows
    );
    let header = write_header("t_model", &["needlec model test"], &extra, &functions);
    let name = format!("model.{}", target.object_extension());
    let ar = write_archive(target.archive_kind(), &[ArchiveMember { name, data: obj }]).unwrap();
    let exe = build_harness(dir, "tmodel", &ar, &header, "model_harness.c");
    (exe, code)
}

/// Runs every golden case of `mode` in `forced` through generated code (weights stored as
/// `weights`, which must be the golden file's precision: the default for the float ones).
fn check(checkpoint: &str, forced: &str, mode: &str, weights: Option<Precision>) {
    let fold = match mode {
        "exact" => FoldMode::None,
        _ => FoldMode::Tools,
    };
    let cases: Vec<ForcedCase> = read_json(&golden(forced));
    let mut by_tools: BTreeMap<&str, Vec<&ForcedCase>> = BTreeMap::new();
    for c in cases.iter().filter(|c| c.mode == mode) {
        by_tools.entry(c.tools.as_str()).or_default().push(c);
    }
    assert!(!by_tools.is_empty());
    let weights_name = weights.map_or("default", |p| p.name());
    let dir = work_dir(&format!("codegen_model-{forced}-{mode}-{weights_name}"));
    for (n, (tools, group)) in by_tools.iter().enumerate() {
        let compiled = compile_case(checkpoint, tools, fold, weights);
        let sub = dir.join(n.to_string());
        std::fs::create_dir_all(&sub).unwrap();
        let (exe, code) = harness(&sub, &compiled);
        assert_eq!(
            code.max_positions,
            compiled.module.dim_bounds(needle_ir::Sym::P).1 as usize + 1
        );

        // Input: the group's cases, twice over in one workspace (state must reset).
        let mut input = String::new();
        input.push_str(&format!("{}\n", 2 * group.len()));
        for case in group.iter().chain(group.iter()) {
            let q = case.enc_ids.iter().position(|&i| i == TOOLS_ID).unwrap();
            // The tools side is the build's: `<tools>` then the tool list's ids.
            let tools_side: Vec<u32> = std::iter::once(TOOLS_ID)
                .chain(compiled.tool_ids.iter().copied())
                .collect();
            assert_eq!(case.enc_ids[q..], tools_side[..], "{}", case.query);
            if fold == FoldMode::None {
                let Some(ConstData::I32(t)) = compiled.store.get("prompt.tools") else {
                    panic!("exact mode embeds @prompt.tools")
                };
                let t: Vec<u32> = t.iter().map(|&i| i as u32).collect();
                assert_eq!(t, tools_side, "encode_query's tools side is the constant");
            }
            input.push_str(&format!("{q}"));
            for id in &case.enc_ids[..q] {
                input.push_str(&format!(" {id}"));
            }
            input.push_str(&format!("\n{}\n", case.dec_ids.len()));
            for (pos, token) in case.dec_ids.iter().enumerate() {
                let print: Vec<u32> = case.top5[pos]
                    .iter()
                    .chain(&case.probe_ids)
                    .copied()
                    .collect();
                let mut allowed: Vec<u32> = case.top5[pos][1..].to_vec();
                allowed.sort_unstable();
                input.push_str(&format!("{token} {}", print.len()));
                for id in print.iter() {
                    input.push_str(&format!(" {id}"));
                }
                input.push_str(&format!(" {}", allowed.len()));
                for id in allowed.iter() {
                    input.push_str(&format!(" {id}"));
                }
                input.push('\n');
            }
        }
        let out = run(&exe, &[], input.as_bytes());
        let text = String::from_utf8(out.stdout).unwrap();
        let runs: Vec<&str> = text.split("end\n").filter(|s| !s.is_empty()).collect();
        assert_eq!(runs.len(), 2 * group.len());
        for (i, case) in group.iter().enumerate() {
            assert_eq!(
                runs[i],
                runs[i + group.len()],
                "{checkpoint} {mode} {:?}: a second run in the same workspace differs",
                case.query
            );
            let what = format!("{forced} {mode} {:?}", case.query);
            // The multi-row steps' tokens and logits are the one-row steps', bit for bit.
            let (lines, rows): (Vec<&str>, Vec<&str>) =
                runs[i].lines().partition(|l| !l.starts_with("rows "));
            let expected_calls = {
                let (mut calls, mut pos, mut k) = (0, 0, 1);
                while pos < case.dec_ids.len() {
                    pos += k.min(case.dec_ids.len() - pos);
                    k = k % code.max_rows + 1;
                    calls += 1;
                }
                calls
            };
            assert_eq!(
                rows,
                [format!("rows {expected_calls} 0")],
                "{what}: multi-row steps (calls, mismatches)"
            );
            assert_eq!(lines.len(), case.dec_ids.len(), "{what}");
            for (pos, line) in lines.iter().enumerate() {
                let f: Vec<&str> = line.split(' ').collect();
                let best: i64 = f[0].parse().unwrap();
                let best_allowed: i64 = f[1].parse().unwrap();
                let got: Vec<f32> = f[2..]
                    .iter()
                    .map(|h| f32::from_bits(u32::from_str_radix(h, 16).unwrap()))
                    .collect();
                let (ids, vals) = (&case.top5[pos], &case.top5_vals[pos]);
                let tol = logit_tolerance(vals);
                let want: Vec<(u32, f32)> = ids
                    .iter()
                    .copied()
                    .zip(vals.iter().copied())
                    .chain(
                        case.probe_ids
                            .iter()
                            .copied()
                            .zip(case.probe_vals[pos].iter().copied()),
                    )
                    .collect();
                assert_eq!(got.len(), want.len());
                for (&g, &(id, w)) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= tol,
                        "{what}, position {pos}: logit of {id} is {g}, reference {w} (tol {tol})"
                    );
                }
                if vals[0] - vals[1] > tol {
                    assert_eq!(best, i64::from(ids[0]), "{what}, position {pos}: top-1");
                }
                if vals[1] - vals[2] > tol {
                    assert_eq!(
                        best_allowed,
                        i64::from(ids[1]),
                        "{what}, position {pos}: best allowed"
                    );
                }
            }
        }
    }
}

#[test]
fn tiny_exact() {
    check("tiny_random.pkl", "forced_tiny.json", "exact", None);
}

#[test]
fn tiny_folded() {
    check("tiny_random.pkl", "forced_tiny.json", "folded", None);
}

#[test]
fn small_exact() {
    check("small_random.pkl", "forced_small.json", "exact", None);
}

#[test]
fn small_folded() {
    check("small_random.pkl", "forced_small.json", "folded", None);
}

/// The reference's int8 goldens: the library keeps `q` and the scales and dequantizes in
/// registers, so its logits are the reference's quantized model's.
#[test]
fn int8_both_fixtures_both_modes() {
    for (checkpoint, forced) in [
        ("tiny_random.pkl", "forced_tiny_int8.json"),
        ("small_random.pkl", "forced_small_int8.json"),
    ] {
        for mode in ["exact", "folded"] {
            check(checkpoint, forced, mode, Some(Precision::Int8));
        }
    }
}

/// The same for int4, the format the reference's quantization-aware training targeted.
#[test]
fn int4_both_fixtures_both_modes() {
    for (checkpoint, forced) in [
        ("tiny_random.pkl", "forced_tiny_int4.json"),
        ("small_random.pkl", "forced_small_int4.json"),
    ] {
        for mode in ["exact", "folded"] {
            check(checkpoint, forced, mode, Some(Precision::Int4));
        }
    }
}

/// `--weights f32` of a float16 checkpoint computes with the same values as the default (f16
/// storage): the reference's float logits.
#[test]
fn tiny_f32_storage_exact() {
    check(
        "tiny_random.pkl",
        "forced_tiny.json",
        "exact",
        Some(Precision::F32),
    );
}

/// Every supported target (and the vector-less and vector RISC-V variants) generates the model
/// as a standalone object that exports only the prefixed entry points.
#[test]
fn every_supported_target_generates_a_standalone_model() {
    let compiled = compile_case(
        "tiny_random.pkl",
        &read_json::<Vec<ForcedCase>>(&golden("forced_tiny.json"))[0].tools,
        FoldMode::Tools,
        None,
    );
    let mut targets: Vec<(&str, Vec<&str>)> = needle_targets::supported()
        .into_iter()
        .map(|s| (s.triple, vec![]))
        .collect();
    targets.push(("riscv64gc-unknown-linux-gnu", vec!["v"]));
    targets.push(("x86_64-unknown-linux-gnu", vec!["avx2", "fma"]));
    // Every weight format decodes on every target (f16 is the fixture's default).
    let tools = &read_json::<Vec<ForcedCase>>(&golden("forced_tiny.json"))[0].tools;
    let formats: Vec<(Precision, Compiled)> = [Precision::F32, Precision::Int8, Precision::Int4]
        .into_iter()
        .map(|p| {
            let c = compile_case("tiny_random.pkl", tools, FoldMode::Tools, Some(p));
            (p, c)
        })
        .chain([(Precision::F16, compiled)])
        .collect();
    for (triple, features) in targets {
        let target = Target::with_features(triple, &features).unwrap();
        for (p, compiled) in &formats {
            let mut ks = KernelSet::new(&target, PREFIX).unwrap();
            define_model(
                &mut ks,
                &compiled.module,
                &compiled.store,
                false,
                needlec::codegen::model::MAX_FORCED_ROWS,
            )
            .unwrap_or_else(|e| panic!("{target} --weights {p}: {e}"));
            let obj = ks.finish().unwrap();
            let rep = check_standalone(&obj, PREFIX)
                .unwrap_or_else(|e| panic!("{target} --weights {p}: {e}"));
            assert!(rep.exports.is_empty(), "{target}: {:?}", rep.exports);
        }
    }
}

/// Codegen implements the ops the pass pipeline leaves; the lowered module (with `zcrmsnorm`
/// and `gated_residual`, which only `fold-constants` turns into what codegen knows) is refused
/// with an error that says to run the pipeline, never compiled a second way.
#[test]
fn a_module_the_passes_have_not_run_on_is_refused() {
    let compiled = compile_case(
        "tiny_random.pkl",
        &read_json::<Vec<ForcedCase>>(&golden("forced_tiny.json"))[0].tools,
        FoldMode::None,
        None,
    );
    let lowered = needle_ir::parse(compiled.stages.after("lowered").unwrap()).unwrap();
    let mut ks = KernelSet::new(&Target::host().unwrap(), PREFIX).unwrap();
    let e = define_model(&mut ks, &lowered, &compiled.store, false, 0).unwrap_err();
    assert!(
        e.to_string()
            .contains("is removed by the `fold-constants` pass: run the pass pipeline"),
        "{e}"
    );
}

/// Jump-forward and sparse logits pick exactly the full path's token: a forced step returns its
/// one id even where another has the larger logit (and -1 for an id outside the vocabulary),
/// and a sparse step breaks ties as the reference does. A random model whose embedding has two
/// equal rows (equal logits, bit for bit) and a row whose logit is NaN (which counts as the
/// largest); d_model 42 takes the dot products' scalar tail. Each step's constrained token is
/// compared with `needle_runtime::decode::argmax_among` over the same step's full logits.
#[test]
fn forced_and_sparse_steps_pick_the_full_paths_token() {
    let config = needlec::synth::parse_config_spec(
        r#"{"vocab_size":4096,"d_model":42,"num_heads":1,"num_kv_heads":1,"num_encoder_layers":1,"num_decoder_layers":1}"#,
    )
    .unwrap();
    let (v, d) = (config.vocab_size, config.d_model);
    let (tie_lo, tie_hi, nan_id) = (700usize, 900usize, 4000usize);
    let mut ckpt =
        needlec::synth::synth_checkpoint(&config, 11, needle_runtime::checkpoint::DType::F32);
    let emb = &mut ckpt.tensors.get_mut("embedding/embedding").unwrap().bytes;
    let row = |i: usize| 4 * d * i..4 * d * (i + 1);
    let lo = emb[row(tie_lo)].to_vec();
    emb[row(tie_hi)].copy_from_slice(&lo);
    // Checkpoints may not hold NaN; a row of alternating +-3e38 makes the dot product overflow
    // to infinities of both signs, whose sum is a NaN logit.
    for (i, c) in emb[row(nan_id)].chunks_mut(4).enumerate() {
        let x: f32 = if i % 2 == 0 { 3e38 } else { -3e38 };
        c.copy_from_slice(&x.to_le_bytes());
    }
    let dir = work_dir("codegen_model-forced-sparse");
    let path = dir.join("ties.safetensors");
    needlec::load::save_safetensors(&ckpt, &path).unwrap();
    let tools = &read_json::<Vec<ForcedCase>>(&golden("forced_tiny.json"))[0].tools;

    // Per step, an allowed list (ids as given; the grammar's are sorted, the kernel need not be).
    let mut every_other: Vec<u32> = (0..v as u32).step_by(2).collect(); // > vocab/2: full path
    every_other.push(tie_hi as u32);
    let lists: Vec<Vec<u32>> = vec![
        vec![tie_lo as u32, tie_hi as u32], // sparse, an exact tie: the lower id
        vec![tie_hi as u32, tie_lo as u32], // the same out of order
        vec![3, tie_lo as u32, tie_hi as u32, nan_id as u32], // a NaN is the largest
        vec![nan_id as u32, 3],             // ... wherever it is listed
        vec![17],                           // forced
        vec![2049],                         // forced
        (100..160).collect(),               // sparse, no tie
        every_other,                        // a list, too long to be sparse
        vec![v as u32],                     // forced, out of range: -1
        vec![5, v as u32 + 3],              // sparse, one id out of range
    ];
    for fold in [FoldMode::None, FoldMode::Tools] {
        let compiled = compile_checkpoint(&path, tools, fold, None);
        assert!(!compiled.tool_ids.contains(&(nan_id as u32)));
        let sub = dir.join(fold.name());
        std::fs::create_dir_all(&sub).unwrap();
        let (exe, code) = harness(&sub, &compiled);
        assert!(code.skips_by_allowed, "the step has a head to skip");
        let print: Vec<u32> = (0..v as u32).collect();
        let query = [10u32, 20, 30, 40];
        let mut input = format!("1\n{}", query.len());
        for id in query {
            input.push_str(&format!(" {id}"));
        }
        input.push_str(&format!("\n{}\n", lists.len()));
        for (pos, allowed) in lists.iter().enumerate() {
            // Fed tokens: EOS, then ids whose rows are ordinary.
            let token = if pos == 0 { 1 } else { 50 + pos };
            input.push_str(&format!("{token} {}", print.len()));
            for id in &print {
                input.push_str(&format!(" {id}"));
            }
            input.push_str(&format!(" {}", allowed.len()));
            for id in allowed {
                input.push_str(&format!(" {id}"));
            }
            input.push('\n');
        }
        let out = run(&exe, &[], input.as_bytes());
        let text = String::from_utf8(out.stdout).unwrap();
        let (lines, rows): (Vec<&str>, Vec<&str>) =
            (text.lines().filter(|l| *l != "end")).partition(|l| !l.starts_with("rows "));
        // The multi-row steps pick the same tokens (forced, sparse, NaN, ties) bit for bit.
        assert!(
            rows.len() == 1 && rows[0].ends_with(" 0"),
            "multi-row steps: {rows:?}"
        );
        assert_eq!(lines.len(), lists.len());
        for (pos, (line, allowed)) in lines.iter().zip(&lists).enumerate() {
            let f: Vec<&str> = line.split(' ').collect();
            let got: i64 = f[1].parse().unwrap();
            let logits: Vec<f32> = f[2..]
                .iter()
                .map(|h| f32::from_bits(u32::from_str_radix(h, 16).unwrap()))
                .collect();
            assert_eq!(logits.len(), v);
            assert!(logits[nan_id].is_nan());
            assert_eq!(logits[tie_lo].to_bits(), logits[tie_hi].to_bits(), "a tie");
            let valid: Vec<u32> = allowed
                .iter()
                .copied()
                .filter(|&i| (i as usize) < v)
                .collect();
            let want = if valid.is_empty() {
                -1
            } else {
                i64::from(needle_runtime::decode::argmax_among(&logits, &valid))
            };
            assert_eq!(got, want, "{fold:?} step {pos}, allowed {allowed:?}");
        }
        // The cases mean what they say: the tie went low, the NaN won, the forced ids were
        // not the largest logits.
        let pick = |pos: usize| -> i64 { lines[pos].split(' ').nth(1).unwrap().parse().unwrap() };
        assert_eq!((pick(0), pick(1)), (tie_lo as i64, tie_lo as i64));
        assert_eq!((pick(2), pick(3)), (nan_id as i64, nan_id as i64));
        assert_eq!((pick(4), pick(5), pick(8)), (17, 2049, -1));
        let best_full: Vec<i64> = lines
            .iter()
            .map(|l| l.split(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(
            best_full.iter().all(|&b| b == nan_id as i64),
            "the NaN is every full argmax"
        );
    }
}
