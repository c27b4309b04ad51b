//! The generated Needle 3 step (`needlec::codegen::needle3`) end to end: generate it for the
//! host from the small golden checkpoint at each stored ladder depth, link it into
//! `tests/c/needle3_harness.c`, feed each golden prompt position by position, and compare every
//! position's logits with the reference package's (`tests/fixtures/needle3/small.json`, within
//! the 2e-3 relative, the argmax exactly; the heads within 1e-5) and with the runtime's
//! forward pass (measured: 7e-7 relative to both; the heads 4e-7).

use std::path::PathBuf;
use std::process::Command;

use needle_runtime::needle3::forward::forward;
use needle_runtime::needle3::Model;
use needle_targets::{supported, Target};
use needle_test_support::c::{build_harness, run};
use needle_test_support::toolchain::require;
use needle_test_support::{max_rel_diff, work_dir};
use needlec::abi::write_header;
use needlec::codegen::needle3::{define_needle3_model, Needle3Code};
use needlec::codegen::KernelSet;
use needlec::emit::{check_standalone, write_archive, ArchiveMember};
use serde_json::Value;

const PREFIX: &str = "t3_";

fn fixture(name: &str) -> PathBuf {
    needle_test_support::repo_root()
        .join("tests/fixtures/needle3")
        .join(name)
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// The step of `model` for `target` as a static archive, its header and its layout.
fn generate(
    target: &Target,
    model: &Model,
    positions: usize,
    prefix: Option<&[u32]>,
) -> (Vec<u8>, String, Needle3Code) {
    let mut ks = KernelSet::new(target, PREFIX).unwrap();
    let code = define_needle3_model(&mut ks, model, positions, prefix, true).unwrap();
    let functions = ks.functions().to_vec();
    let obj = ks.finish().unwrap();
    let rep = check_standalone(&obj, PREFIX).unwrap();
    assert_eq!(
        rep.exports,
        ["t3_n3_heads", "t3_n3_rows", "t3_n3_step"],
        "{target}"
    );
    let head_floats: usize = code.head_outputs.iter().map(|(_, n)| n).sum();
    let extra = format!(
        "#define N3_WS_BYTES {}\n#define N3_WS_ALIGN {}\n#define N3_LOGITS_OFFSET {}\n\
         #define N3_VOCAB_OUT {}\n#define N3_MAX_POSITIONS {}\n#define N3_STEP t3_n3_step\n\
         #define N3_HEADS t3_n3_heads\n#define N3_HEAD_FLOATS {head_floats}\n\
         #define N3_ROWS t3_n3_rows\n#define N3_MAX_ROWS {}\n",
        code.workspace_bytes,
        code.workspace_align,
        code.logits_offset,
        code.logits_vocab,
        code.max_positions,
        code.max_rows,
    );
    let header = write_header(
        "t3_model",
        &["needlec Needle 3 step test"],
        &extra,
        &functions,
    );
    let name = format!("needle3.{}", target.object_extension());
    let ar = write_archive(target.archive_kind(), &[ArchiveMember { name, data: obj }]).unwrap();
    (ar, header, code)
}

/// The harness for `model` on `target` (the host, or one run under its emulator), and how to
/// run it.
fn harness(
    dir: &std::path::Path,
    target: &Target,
    model: &Model,
    positions: usize,
    prefix: Option<&[u32]>,
) -> (Vec<String>, Needle3Code) {
    let (ar, header, code) = generate(target, model, positions, prefix);
    if target.name == Target::host().unwrap().name {
        let exe = build_harness(dir, "t3model", &ar, &header, "needle3_harness.c");
        return (vec![exe.display().to_string()], code);
    }
    std::fs::write(dir.join("libt3model.a"), &ar).unwrap();
    std::fs::write(dir.join("t3model.h"), &header).unwrap();
    let tc = target.test_toolchain();
    let exe = dir.join("needle3_harness");
    let src = needle_test_support::repo_root().join("tests/c/needle3_harness.c");
    let res = Command::new(tc.cc)
        .args(tc.cc_args)
        .args(needle_test_support::c::STRICT_C11)
        .arg("-DHEADER=\"t3model.h\"")
        .arg("-I")
        .arg(dir)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .arg(dir.join("libt3model.a"))
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{target}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let mut cmd: Vec<String> = tc
        .runner
        .expect("a runnable target")
        .iter()
        .map(|s| s.to_string())
        .collect();
    cmd.push(exe.display().to_string());
    (cmd, code)
}

/// What the harness prints for one prompt: per position from `start`, the argmax and the
/// logits; then the heads' outputs.
struct Steps {
    rows: Vec<(i64, Vec<f32>)>,
    heads: Vec<f32>,
}

fn hex_floats<'a>(it: impl Iterator<Item = &'a str>) -> Vec<f32> {
    it.map(|h| f32::from_bits(u32::from_str_radix(h, 16).unwrap()))
        .collect()
}

/// Feeds `ids` from position `start` to the harness `cmd`.
fn run_steps(cmd: &[String], start: usize, ids: &[u32]) -> Steps {
    let mut input = format!("1 {start} {}", ids.len());
    for id in ids {
        input.push_str(&format!(" {id}"));
    }
    let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
    let out = run(std::path::Path::new(&cmd[0]), &args, input.as_bytes());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let rows: Vec<(i64, Vec<f32>)> = (0..ids.len())
        .map(|_| {
            let mut it = lines.next().expect("a line per position").split(' ');
            let best = it.next().unwrap().parse().unwrap();
            (best, hex_floats(it))
        })
        .collect();
    let mut it = lines.next().expect("the heads").split(' ');
    assert_eq!(it.next(), Some("heads"));
    let heads = hex_floats(it.filter(|s| !s.is_empty()));
    // The same positions through the multi-row entry: bit for bit, and the bad calls refused.
    let rows_line = lines.next().expect("the rows check");
    let calls_bad: Vec<usize> = rows_line
        .strip_prefix("rows ")
        .expect("rows")
        .split(' ')
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(calls_bad[0] >= ids.len().min(2) / 2, "{rows_line}");
    assert_eq!(
        calls_bad[1], 0,
        "multi-row calls differ from one-row steps: {rows_line}"
    );
    assert_eq!(lines.next(), Some("end"));
    Steps { rows, heads }
}

/// The largest absolute difference of the heads' outputs from a golden run's.
fn heads_diff(code: &Needle3Code, heads: &[f32], run: &Value) -> f32 {
    let mut at = 0;
    let mut worst = 0f32;
    for (name, n) in &code.head_outputs {
        let want: Vec<f32> = match run[*name].as_array() {
            Some(a) => a.iter().map(|v| v.as_f64().unwrap() as f32).collect(),
            None => vec![run[*name].as_f64().unwrap() as f32],
        };
        assert_eq!(want.len(), *n, "{name}");
        for (g, w) in heads[at..at + n].iter().zip(&want) {
            worst = worst.max((g - w).abs());
        }
        at += n;
    }
    assert_eq!(at, heads.len());
    worst
}

/// Every golden run of `weights` through generated code for `full` sliced to its depth.
fn check(target: &Target, full: &Model, weights: &str, test: &str) {
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("small.json")).unwrap()).unwrap();
    let bin: Vec<f32> = std::fs::read(fixture("small.bin"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut depths: Vec<usize> = json["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["weights"] == weights)
        .map(|r| r["depth"].as_u64().unwrap() as usize)
        .collect();
    depths.sort_unstable();
    depths.dedup();
    assert!(depths.len() >= 3, "{weights}: runs at {depths:?}");
    let positions = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["ids"].as_array().unwrap().len())
        .max()
        .unwrap();
    let mut worst = [0f32; 2];
    for depth in depths {
        let model = full.clone().into_ladder(depth).unwrap();
        let dir = work_dir(&format!("{test}_{depth}"));
        let (exe, code) = harness(&dir, target, &model, positions, None);
        assert_eq!(code.logits_vocab, model.config.logits_vocab());
        for r in json["runs"].as_array().unwrap() {
            if r["weights"] != weights || r["depth"].as_u64() != Some(depth as u64) {
                continue;
            }
            let case = &json["cases"][r["case"].as_u64().unwrap() as usize];
            let ids: Vec<u32> = usizes(&case["ids"]).iter().map(|&i| i as u32).collect();
            let what = format!("{target} {weights} case {} depth {depth}", r["case"]);
            let steps = run_steps(&exe, 0, &ids);
            let d_heads = heads_diff(&code, &steps.heads, r);
            assert_eq!(code.head_outputs.len(), 3, "the fixture has every head");
            assert!(d_heads <= 1e-5, "{what}: heads differ by {d_heads}");
            let got = steps.rows;
            // The golden argmax of every position, exactly.
            let want_argmax = usizes(&r["argmax"]);
            for (t, (best, _)) in got.iter().enumerate() {
                assert_eq!(*best, want_argmax[t] as i64, "{what}: argmax at {t}");
            }
            // The golden logits rows, within the tolerance.
            let rows = usizes(&r["logit_rows"]);
            let off = r["logits"]["offset"].as_u64().unwrap() as usize / 4;
            let v = code.logits_vocab;
            let want = &bin[off..off + rows.len() * v];
            let got_rows: Vec<f32> = rows.iter().flat_map(|&t| got[t].1.clone()).collect();
            let r_golden = max_rel_diff(&got_rows, want);
            // Every row against the runtime's forward pass.
            let reference = forward(&model, &ids).unwrap();
            let all: Vec<f32> = got.iter().flat_map(|(_, l)| l.clone()).collect();
            let rt: Vec<f32> = reference.logits.iter().copied().collect();
            let r_runtime = max_rel_diff(&all, &rt);
            eprintln!(
                "{what}: golden rel {r_golden:.2e}, runtime rel {r_runtime:.2e}, heads abs {d_heads:.2e}"
            );
            assert!(
                r_golden <= 2e-3,
                "{what}: logits differ from the reference by {r_golden}"
            );
            assert!(
                r_runtime <= 1e-5,
                "{what}: logits differ from the runtime by {r_runtime}"
            );
            worst = [worst[0].max(r_golden), worst[1].max(r_runtime)];
        }
    }
    eprintln!(
        "{weights}: worst golden rel {:.2e}, runtime rel {:.2e}",
        worst[0], worst[1]
    );
}

#[test]
fn the_generated_step_gives_the_reference_logits_at_every_depth() {
    let data = std::fs::read(fixture("small.safetensors")).unwrap();
    let model = Model::from_safetensors_bytes(&data).unwrap();
    check(&Target::host().unwrap(), &model, "f32", "n3_step_f32");
}

#[test]
fn the_generated_step_of_the_cact_export_gives_the_reference_cq4_logits() {
    let data = std::fs::read(fixture("small.cact")).unwrap();
    let model = Model::from_cact_bytes(&data).unwrap();
    check(&Target::host().unwrap(), &model, "cq4", "n3_step_cq4");
}

/// The step under qemu-user on the emulated Linux targets: the same golden checks as on the
/// host (the argmax exactly; the logits within tolerance, since targets with a native FMA fuse
/// the products' multiply-adds), and folding bit for bit (the folded rows made with the
/// target's fused multiply-adds).
fn check_emulated(triple: &str, cc: &str, cc_package: &str, qemu: &str) {
    let what = format!("codegen_needle3: {triple} under qemu");
    if require(cc, cc_package, &what).is_none() || require(qemu, "qemu-user", &what).is_none() {
        return;
    }
    let target = Target::from_triple(triple).unwrap();
    let data = std::fs::read(fixture("small.safetensors")).unwrap();
    let model = Model::from_safetensors_bytes(&data).unwrap();
    check(&target, &model, "f32", &format!("n3_step_{triple}"));
    check_folding(&target, &format!("n3_fold_{triple}"));
}

#[test]
fn the_generated_step_under_qemu_aarch64_gives_the_reference_logits() {
    check_emulated(
        "aarch64-unknown-linux-gnu",
        "aarch64-linux-gnu-gcc",
        "gcc-aarch64-linux-gnu",
        "qemu-aarch64",
    );
}

#[test]
fn the_generated_step_under_qemu_riscv64_gives_the_reference_logits() {
    check_emulated(
        "riscv64gc-unknown-linux-gnu",
        "riscv64-linux-gnu-gcc",
        "gcc-riscv64-linux-gnu",
        "qemu-riscv64",
    );
}

/// Every supported target generates the step as a standalone object (nothing undefined, the
/// one export).
#[test]
fn every_target_generates_a_standalone_step() {
    let data = std::fs::read(fixture("small.safetensors")).unwrap();
    let model = Model::from_safetensors_bytes(&data).unwrap();
    for t in supported() {
        let target = Target::from_triple(t.triple).unwrap();
        let (ar, _, code) = generate(&target, &model, 64, None);
        assert!(!ar.is_empty() && code.max_positions == 64, "{target}");
    }
}

/// Folding on `target`: the prompt up to `</tools>` run at build time with the step's own
/// arithmetic for the target, its rows read-only data; the step then takes the positions after
/// it and gives the unfolded step's logits and heads bit for bit (and so the reference's argmax);
/// positions inside the prefix are refused (-1).
fn check_folding(target: &Target, test: &str) {
    let data = std::fs::read(fixture("small.safetensors")).unwrap();
    let model = Model::from_safetensors_bytes(&data).unwrap();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("small.json")).unwrap()).unwrap();
    let case = &json["cases"][0];
    let ids: Vec<u32> = usizes(&case["ids"]).iter().map(|&i| i as u32).collect();
    let p0 = case["tools_end_pos"].as_u64().unwrap() as usize + 1;
    assert_eq!(ids[p0 - 1], needle_runtime::needle3::prompt::TOOLS_END);
    let dir = work_dir(&format!("{test}_folded"));
    let (folded, code) = harness(&dir, target, &model, ids.len(), Some(&ids[..p0]));
    assert_eq!(code.first_position, p0);
    let got = run_steps(&folded, p0, &ids[p0..]);
    let unfolded_dir = work_dir(&format!("{test}_unfolded"));
    let (unfolded, _) = harness(&unfolded_dir, target, &model, ids.len(), None);
    let want = run_steps(&unfolded, 0, &ids);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    assert_eq!(
        bits(&got.heads),
        bits(&want.heads),
        "{target}: folded heads"
    );
    let d_heads = heads_diff(&code, &got.heads, &json["runs"][0]);
    assert!(
        d_heads <= 1e-5,
        "{target}: folded heads differ by {d_heads}"
    );
    let want_argmax = usizes(&json["runs"][0]["argmax"]);
    assert_eq!(json["runs"][0]["case"], 0);
    for (i, (best, logits)) in got.rows.iter().enumerate() {
        let t = p0 + i;
        assert_eq!(*best, want_argmax[t] as i64, "{target}: argmax at {t}");
        assert_eq!(*best, want.rows[t].0, "{target}: argmax at {t}");
        assert_eq!(
            bits(logits),
            bits(&want.rows[t].1),
            "{target}: position {t}: folded and unfolded logits differ"
        );
    }
    // A position inside the folded prefix is not a step.
    let args: Vec<&str> = folded[1..].iter().map(String::as_str).collect();
    let early = run(
        std::path::Path::new(&folded[0]),
        &args,
        format!("1 {} 1 {}", p0 - 1, ids[p0 - 1]).as_bytes(),
    );
    let text = String::from_utf8(early.stdout).unwrap();
    assert!(text.starts_with("-1 "), "{text}");
}

#[test]
fn the_folded_step_continues_the_prefix_bit_for_bit() {
    check_folding(&Target::host().unwrap(), "n3_fold_host");
}

/// A source that lacks the three heads.
struct Headless(needle_runtime::needle3::generate::Generated);

impl needle_runtime::needle3::model::Source for Headless {
    fn has(&self, name: &str) -> bool {
        !name.split('/').next().unwrap_or("").ends_with("_head") && self.0.has(name)
    }

    fn get(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<Vec<f32>, needle_runtime::needle3::Error> {
        self.0.get(name, shape)
    }
}

/// Configs the golden fixture does not cover, with generated weights, against the runtime:
/// every layer global with no conv taps and no engram sites; one KV head, two lanes, head
/// widths from `d_model / num_heads` and logits over part of the vocabulary; no heads at all.
/// The step's logits and heads within 1e-5 of the runtime's, folding bit for bit.
#[test]
fn configs_without_taps_sites_window_or_heads_follow_the_runtime() {
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("small.json")).unwrap()).unwrap();
    let base = json["config"].clone();
    // (name, config changes, whether the model has its heads)
    type Variant = (&'static str, Vec<(&'static str, Value)>, bool);
    let variants: [Variant; 3] = [
        (
            "plain",
            vec![
                ("qkv_conv_taps", 0.into()),
                ("engram_layers", serde_json::json!([])),
                ("sliding_window", 0.into()),
                ("global_layers", serde_json::json!([])),
            ],
            true,
        ),
        (
            "narrow",
            vec![
                ("num_kv_heads", 1.into()),
                ("mhc_lanes", 2.into()),
                ("qk_head_dim", 0.into()),
                ("v_head_dim", 0.into()),
                ("out_vocab", 1000.into()),
                ("sliding_window", 5.into()),
            ],
            true,
        ),
        ("headless", vec![], false),
    ];
    let host = Target::host().unwrap();
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 977 + 13) % 2000 + 3).collect();
    let p0 = 15;
    for (name, changes, heads) in variants {
        let mut cfg = base.clone();
        for (k, v) in changes {
            cfg[k] = v;
        }
        let config = needle_runtime::needle3::Config::from_json(&cfg.to_string()).unwrap();
        let layers = config.num_layers;
        let generated = needle_runtime::needle3::generate::Generated { num_layers: layers };
        let model = if heads {
            Model::load(config, &mut { generated }).unwrap()
        } else {
            Model::load(config, &mut Headless(generated)).unwrap()
        };
        let dir = work_dir(&format!("n3_variant_{name}"));
        let (exe, code) = harness(&dir, &host, &model, ids.len(), None);
        assert_eq!(code.logits_vocab, model.config.logits_vocab(), "{name}");
        assert_eq!(code.head_outputs.len(), if heads { 3 } else { 0 }, "{name}");
        let got = run_steps(&exe, 0, &ids);
        let reference = forward(&model, &ids).unwrap();
        let all: Vec<f32> = got.rows.iter().flat_map(|(_, l)| l.clone()).collect();
        let rt: Vec<f32> = reference.logits.iter().copied().collect();
        let r = max_rel_diff(&all, &rt);
        assert!(r <= 1e-5, "{name}: logits differ from the runtime by {r}");
        let h = needle_runtime::needle3::forward::heads(&model, &ids, &reference);
        let want: Vec<f32> = h
            .confidence
            .into_iter()
            .chain(h.router.into_iter().flatten())
            .chain(h.embedding.into_iter().flatten())
            .collect();
        assert_eq!(want.len(), got.heads.len(), "{name}");
        for (a, b) in got.heads.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5, "{name}: heads {a} vs {b}");
        }
        let fold_dir = work_dir(&format!("n3_variant_{name}_folded"));
        let (folded, _) = harness(&fold_dir, &host, &model, ids.len(), Some(&ids[..p0]));
        let f = run_steps(&folded, p0, &ids[p0..]);
        for (i, (_, l)) in f.rows.iter().enumerate() {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(
                bits(l),
                bits(&got.rows[p0 + i].1),
                "{name}: folded position {}",
                p0 + i
            );
        }
        eprintln!("{name}: logits rel {r:.2e}");
    }
}
