//! `needlec finetune`: the training graph against the runtime (the oracle) on the golden forced
//! cases, a finite-difference check of its gradients, determinism under `--seed`, and a short
//! end-to-end run that makes folding better.

use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor, D};
use needle_runtime::decode::TOOLS_ID;
use needle_runtime::forward::{
    decoder_step, encode, CrossKv, DecoderCache, EncoderMask, FoldedTools,
};
use needle_runtime::model::Model;
use needle_test_support::{
    finetune, golden, logit_tolerance, read_json, tiny_needle, work_dir, ForcedCase,
};
use needlec::finetune::model::{Batch, Distillation, Sequence, TrainModel};

fn needlec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_needlec"))
        .args(args)
        .output()
        .expect("needlec runs")
}

fn s(p: &std::path::Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Where the tools side starts: the `<tools>` marker.
fn n_query(enc_ids: &[u32]) -> usize {
    enc_ids
        .iter()
        .position(|&t| t == TOOLS_ID)
        .expect("a <tools> marker")
}

/// The runtime's logits at every decoder position of a teacher-forced case.
fn runtime_logits(model: &Model, case: &ForcedCase, folded: bool) -> Vec<Vec<f32>> {
    let nq = n_query(&case.enc_ids);
    let cross = if folded {
        FoldedTools::precompute(model, &case.enc_ids[nq..]).encode_query(model, &case.enc_ids[..nq])
    } else {
        CrossKv::from_encoder(model, &encode(model, &case.enc_ids, EncoderMask::Full))
    };
    let mut cache = DecoderCache::new(model);
    case.dec_ids
        .iter()
        .map(|&t| decoder_step(model, &cross, &mut cache, t))
        .collect()
}

fn sequence(case: &ForcedCase) -> Sequence {
    let mut targets = case.dec_ids[1..].to_vec();
    targets.push(1);
    Sequence {
        enc_ids: case.enc_ids.clone(),
        n_query: n_query(&case.enc_ids),
        dec_in: case.dec_ids.clone(),
        targets,
    }
}

/// Every golden forced case of both fixtures and both modes, all cases of a mode in one padded
/// batch: the training graph's logits equal the runtime's within 1e-4 at every position and
/// every vocabulary entry, and the golden top-5 within the golden tolerance.
#[test]
fn training_logits_equal_the_runtime_on_the_golden_forced_cases() {
    for fixture in ["tiny", "small"] {
        let ckpt = needlec::frontend::load_checkpoint_at(&golden(&format!("{fixture}_random.pkl")))
            .unwrap();
        let runtime = Model::from_checkpoint(&ckpt).unwrap();
        let train = TrainModel::from_checkpoint(&ckpt, DType::F32, &Device::Cpu).unwrap();
        let cases: Vec<ForcedCase> = read_json(&golden(&format!("forced_{fixture}.json")));
        for mode in ["exact", "folded"] {
            let cases: Vec<&ForcedCase> = cases.iter().filter(|c| c.mode == mode).collect();
            assert!(cases.len() >= 4, "{fixture} {mode}: {} cases", cases.len());
            let seqs: Vec<Sequence> = cases.iter().map(|c| sequence(c)).collect();
            let refs: Vec<&Sequence> = seqs.iter().collect();
            let batch = Batch::new(&refs, mode == "folded", DType::F32, &Device::Cpu).unwrap();
            let logits = train.logits(&batch).unwrap().to_vec2::<f32>().unwrap();
            let mut row = 0;
            let mut worst = 0.0f32;
            for case in &cases {
                let want = runtime_logits(&runtime, case, mode == "folded");
                for (pos, want) in want.iter().enumerate() {
                    let got = &logits[row];
                    row += 1;
                    for (a, b) in got.iter().zip(want) {
                        worst = worst.max((a - b).abs());
                    }
                    for (id, v) in case.top5[pos].iter().zip(&case.top5_vals[pos]) {
                        let tol = logit_tolerance(&case.top5_vals[pos]);
                        assert!(
                            (got[*id as usize] - v).abs() <= tol,
                            "{fixture} {mode} {:?} position {pos}: id {id} {} vs golden {v}",
                            case.query,
                            got[*id as usize]
                        );
                    }
                }
            }
            assert_eq!(row, logits.len());
            assert!(
                worst <= 1e-4,
                "{fixture} {mode}: largest difference {worst}"
            );
        }
    }
}

/// The tiny random fixture in float64 and a batch of its first two golden forced cases
/// (isolated), for gradient checks.
fn tiny_f64_batch() -> (TrainModel, Vec<Sequence>, Batch) {
    let ckpt = needlec::frontend::load_checkpoint_at(&golden("tiny_random.pkl")).unwrap();
    let model = TrainModel::from_checkpoint(&ckpt, DType::F64, &Device::Cpu).unwrap();
    let cases: Vec<ForcedCase> = read_json(&golden("forced_tiny.json"));
    let seqs: Vec<Sequence> = cases.iter().take(2).map(sequence).collect();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let batch = Batch::new(&refs, true, DType::F64, &Device::Cpu).unwrap();
    (model, seqs, batch)
}

/// The gradient of the loss (float64 graph, isolation mask, two padded sequences) against central
/// differences, for entries of an encoder kernel, a decoder cross-attention kernel, the
/// embedding, a norm scale and a gate.
#[test]
fn gradients_match_finite_differences() {
    let (model, seqs, batch) = tiny_f64_batch();
    let loss_of = |m: &TrainModel| m.loss(&batch).unwrap().0.to_scalar::<f64>().unwrap();
    let (loss, _) = model.loss(&batch).unwrap();
    let grads = loss.backward().unwrap();
    let probes: [(&str, usize); 6] = [
        (
            "encoder/layers/EncoderBlock_0/self_attn/q_proj/kernel",
            64 * 64 + 3 * 64 + 5,
        ),
        (
            "decoder/layers/DecoderBlock_0/cross_attn/v_proj/kernel",
            2 * 32 + 7,
        ),
        (
            "decoder/layers/DecoderBlock_0/self_attn/out_proj/kernel",
            100,
        ),
        ("embedding/embedding", seqs[0].targets[3] as usize * 64 + 11),
        ("encoder/layers/EncoderBlock_0/ZCRMSNorm_0/scale", 64 + 9),
        ("decoder/layers/DecoderBlock_0/cross_attn_gate", 1),
    ];
    let eps = 1e-5;
    for (path, index) in probes {
        let var = model.param(path).unwrap();
        let shape = var.as_tensor().dims().to_vec();
        let analytic = grads
            .get(var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[index];
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let at = |delta: f64| {
            let mut v = base.clone();
            v[index] += delta;
            var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            loss_of(&model)
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        at(0.0);
        let err = (analytic - numeric).abs();
        assert!(
            err <= 1e-6 + 1e-4 * numeric.abs(),
            "{path}[{index}]: analytic {analytic} vs numeric {numeric}"
        );
        assert!(
            analytic != 0.0,
            "{path}[{index}]: a zero gradient proves nothing"
        );
    }
    // Sanity: the loss is a real cross-entropy over the vocabulary.
    let logits = model.logits(&batch).unwrap();
    assert_eq!(logits.dim(D::Minus1).unwrap(), 4096);
}

/// `--distill`'s soft targets, half the loss at temperature 1: against a teacher certain of each
/// label the loss is the labels' cross-entropy, and against the student's own distributions the
/// soft half contributes no gradient (its derivative is `softmax(student) - teacher`), so the
/// gradient is half the labels'.
#[test]
fn soft_targets_reduce_to_the_labels_and_vanish_at_the_teacher() {
    let half = Distillation {
        weight: 0.5,
        temperature: 1.0,
    };
    let (model, _, batch) = tiny_f64_batch();
    let (hard, _) = model.loss(&batch).unwrap();
    let hard_value = hard.to_scalar::<f64>().unwrap();

    let targets = batch.targets.to_vec1::<u32>().unwrap();
    let mut certain = vec![0f64; targets.len() * 4096];
    for (row, &t) in targets.iter().enumerate() {
        certain[row * 4096 + t as usize] = 200.0;
    }
    let certain = Tensor::from_vec(certain, (targets.len(), 4096), &Device::Cpu).unwrap();
    let (soft, correct) = model.soft_loss(&batch, &certain, half).unwrap();
    assert!(
        (soft.to_scalar::<f64>().unwrap() - hard_value).abs() < 1e-9,
        "a certain teacher: {} vs the labels' {hard_value}",
        soft.to_scalar::<f64>().unwrap()
    );
    assert_eq!(correct, model.loss(&batch).unwrap().1);

    let own = model.logits(&batch).unwrap().detach();
    let (soft, _) = model.soft_loss(&batch, &own, half).unwrap();
    let soft_grads = soft.backward().unwrap();
    let hard_grads = hard.backward().unwrap();
    let path = "decoder/layers/DecoderBlock_0/self_attn/out_proj/kernel";
    let var = model.param(path).unwrap();
    let flat = |g: &candle_core::backprop::GradStore| {
        g.get(var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let (soft_g, hard_g) = (flat(&soft_grads), flat(&hard_grads));
    assert!(hard_g.iter().any(|&g| g != 0.0));
    for (i, (s, h)) in soft_g.iter().zip(&hard_g).enumerate() {
        assert!(
            (s - 0.5 * h).abs() <= 1e-9 + 1e-6 * h.abs(),
            "{path}[{i}]: {s} vs half of {h}"
        );
    }
}

/// The default `--distill` loss (the teacher alone, temperature 2) is `T^2` times the mean
/// divergence `KL(softmax(t/T) || softmax(s/T))`, recomputed here row by row in plain float64
/// against a teacher that disagrees with the student; it is 0, with no gradient, against the
/// student's own distributions; and weight 0 is the labels' cross-entropy exactly.
#[test]
fn distillation_is_the_tempered_divergence_weighted_against_the_labels() {
    let (model, _, batch) = tiny_f64_batch();
    let how = Distillation::default();
    assert_eq!((how.weight, how.temperature), (1.0, 2.0));
    let student = model.logits(&batch).unwrap().detach();
    let (rows, vocab) = student.dims2().unwrap();
    let s_rows = student.to_vec2::<f64>().unwrap();
    // A teacher unlike the student: its logits reversed along the vocabulary, sharpened.
    let t_rows: Vec<Vec<f64>> = s_rows
        .iter()
        .map(|r| r.iter().rev().map(|x| 3.0 * x).collect())
        .collect();
    let teacher = Tensor::from_vec(t_rows.concat(), (rows, vocab), &Device::Cpu).unwrap();
    let log_softmax = |r: &[f64], t: f64| {
        let max = r.iter().fold(f64::MIN, |m, &x| m.max(x / t));
        let sum: f64 = r.iter().map(|&x| (x / t - max).exp()).sum();
        r.iter()
            .map(|&x| x / t - max - sum.ln())
            .collect::<Vec<f64>>()
    };
    let t = how.temperature;
    let expected: f64 = s_rows
        .iter()
        .zip(&t_rows)
        .map(|(s, te)| {
            let (ls, lt) = (log_softmax(s, t), log_softmax(te, t));
            lt.iter()
                .zip(&ls)
                .map(|(lt, ls)| lt.exp() * (lt - ls))
                .sum::<f64>()
        })
        .sum::<f64>()
        * t
        * t
        / batch.n_targets as f64;
    let (loss, _) = model.soft_loss(&batch, &teacher, how).unwrap();
    let loss = loss.to_scalar::<f64>().unwrap();
    assert!(expected > 0.1, "a teacher this unlike the student diverges");
    assert!(
        (loss - expected).abs() <= 1e-9 * expected,
        "{loss} vs {expected} recomputed"
    );

    let (at_teacher, _) = model.soft_loss(&batch, &student, how).unwrap();
    assert!(at_teacher.to_scalar::<f64>().unwrap().abs() < 1e-12);
    let grads = at_teacher.backward().unwrap();
    let var = model
        .param("decoder/layers/DecoderBlock_0/self_attn/out_proj/kernel")
        .unwrap();
    let g = grads.get(var).unwrap().abs().unwrap().max_all().unwrap();
    assert!(g.to_scalar::<f64>().unwrap() < 1e-12);

    let labels_only = Distillation {
        weight: 0.0,
        temperature: 2.0,
    };
    let (mixed, _) = model.soft_loss(&batch, &teacher, labels_only).unwrap();
    let (hard, _) = model.loss(&batch).unwrap();
    assert_eq!(
        mixed.to_scalar::<f64>().unwrap(),
        hard.to_scalar::<f64>().unwrap()
    );
}

/// `--ema`'s average and the weight snapshots stay outside the autograd graph: a snapshot of a
/// variable, and an average updated from itself step after step, record no operation (a recorded
/// one held every earlier average alive: 7 MB a step on the bundled model, until the run was
/// killed for memory), and the average is still `decay * average + (1 - decay) * weights`.
#[test]
fn the_moving_average_keeps_no_graph_of_earlier_steps() {
    let var = candle_core::Var::from_vec(vec![1f32, 2.0, 3.0], 3, &Device::Cpu).unwrap();
    let snap = needlec::finetune::snapshot(&var).unwrap();
    assert!(!snap.track_op(), "a snapshot records its variable");
    let mut average = vec![snap];
    let mut expected = vec![1f32, 2.0, 3.0];
    for step in 0..3 {
        let now: Vec<f32> = vec![10.0 * step as f32, -1.0, 0.5];
        var.set(&Tensor::new(now.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
        needlec::finetune::update_average(&mut average, std::slice::from_ref(&var), 0.9).unwrap();
        for (e, n) in expected.iter_mut().zip(&now) {
            *e = 0.9 * *e + 0.1 * n;
        }
        assert!(
            !average[0].track_op(),
            "step {step}: the average records its past"
        );
        let got = average[0].to_vec1::<f32>().unwrap();
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-5, "step {step}: {got:?} vs {expected:?}");
        }
    }
}

/// Trains `steps` steps on the first examples of the training fixture; returns the output bytes.
/// `needlec finetune` from the bundled stock model on the committed head of `train.jsonl`,
/// writing `out`, plus `extra`; it must succeed.
fn run_finetune(out: &std::path::Path, extra: &[&str]) -> Output {
    let (ckpt, tok, data, out_s) = (
        s(&tiny_needle("tiny-needle.pkl")),
        s(&tiny_needle("tokenizer.model")),
        s(&finetune("train_head.jsonl")),
        s(out),
    );
    let mut args = vec![
        "finetune",
        "--checkpoint",
        &ckpt,
        "--tokenizer",
        &tok,
        "--data",
        &data,
        "--out",
        &out_s,
    ];
    args.extend_from_slice(extra);
    let run = needlec(&args);
    assert!(
        run.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    run
}

/// [`run_finetune`] into `dir/name`; the bytes written.
fn train(dir: &std::path::Path, name: &str, extra: &[&str]) -> Vec<u8> {
    let out = dir.join(name);
    run_finetune(&out, extra);
    std::fs::read(&out).unwrap()
}

#[test]
fn the_same_seed_gives_the_same_bytes() {
    let dir = work_dir("finetune-seed");
    let args = [
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--isolate-tools",
        "--seed",
        "7",
    ];
    let a = train(&dir, "a.safetensors", &args);
    let b = train(&dir, "b.safetensors", &args);
    assert!(a == b, "two runs with --seed 7 differ");
    let c = train(
        &dir,
        "c.safetensors",
        &[
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--isolate-tools",
            "--seed",
            "8",
        ],
    );
    assert!(a != c, "--seed changes nothing");
    // --augment draws its variants from the same seed: reproducible, and a different run.
    let augmented = [&args[..], &["--augment"]].concat();
    let d = train(&dir, "d.safetensors", &augmented);
    let e = train(&dir, "e.safetensors", &augmented);
    assert!(d == e, "two --augment runs with --seed 7 differ");
    assert!(a != d, "--augment changes nothing");
    // The output is a checkpoint every command loads, and says it was trained isolated.
    let inspect = needlec(&["inspect", &s(&dir.join("a.safetensors"))]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    assert!(text.contains("\"isolated\""), "{text}");
}

/// The end-to-end run's size: steps of 8 examples, dev examples scored, the gain it must show.
const E2E_STEPS: &str = "40";
const E2E_DEV: usize = 60;
const E2E_GAIN: f64 = 0.1;

/// A CI-sized run from the stock model with `--isolate-tools` makes folded decoding better on
/// held-out examples: the full run is a benchmark (README, "Fine-tuning").
#[test]
fn a_short_isolated_finetune_makes_folding_better() {
    use needle_runtime::decode::FoldMode;
    let dir = work_dir("finetune-e2e");
    let tuned = train(
        &dir,
        "tuned.safetensors",
        &[
            "--steps",
            E2E_STEPS,
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--isolate-tools",
        ],
    );
    assert!(!tuned.is_empty());
    let tokenizer = needlec::frontend::load_tokenizer(&tiny_needle("tokenizer.model")).unwrap();
    let mut dev =
        needlec::finetune::data::read_dataset(&finetune("dev.jsonl"), &tokenizer, true, "--val")
            .unwrap();
    dev.examples.truncate(E2E_DEV);
    let accuracy = |path: &std::path::Path| {
        let ckpt = needlec::frontend::load_checkpoint_at(path).unwrap();
        needlec::finetune::exact_match(&ckpt, &tokenizer, &dev, FoldMode::Tools, 64).unwrap()
    };
    let stock = accuracy(&tiny_needle("tiny-needle.pkl"));
    let after = accuracy(&dir.join("tuned.safetensors"));
    eprintln!("folded exact match on {E2E_DEV} dev examples: stock {stock:.3}, tuned {after:.3}");
    assert!(
        after >= stock + E2E_GAIN,
        "folded exact match {after:.3} after the short run, {stock:.3} before"
    );
}

/// `--qat int4`'s forward pass is the runtime's int4 model (the reference's quantization), and
/// `--lora-rank` starts exactly from the checkpoint (the adapters' `B` is zero).
#[test]
fn qat_computes_the_quantized_model_and_lora_starts_from_the_checkpoint() {
    use needle_runtime::quant::Precision;
    let ckpt = needlec::frontend::load_checkpoint_at(&golden("tiny_random.pkl")).unwrap();
    let cases: Vec<ForcedCase> = read_json(&golden("forced_tiny_int4.json"));
    let cases: Vec<&ForcedCase> = cases.iter().filter(|c| c.mode == "exact").take(3).collect();
    let seqs: Vec<Sequence> = cases.iter().map(|c| sequence(c)).collect();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let batch = Batch::new(&refs, false, DType::F32, &Device::Cpu).unwrap();
    let int4 = Model::from_checkpoint_as(&ckpt, Precision::Int4).unwrap();
    let qat = TrainModel::from_checkpoint(&ckpt, DType::F32, &Device::Cpu)
        .unwrap()
        .with_qat(Precision::Int4);
    let got = qat.logits(&batch).unwrap().to_vec2::<f32>().unwrap();
    let want: Vec<Vec<f32>> = cases
        .iter()
        .flat_map(|c| runtime_logits(&int4, c, false))
        .collect();
    let worst = got
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 1e-4, "qat vs the runtime's int4 model: {worst}");
    // And it is not the float model.
    let plain = TrainModel::from_checkpoint(&ckpt, DType::F32, &Device::Cpu).unwrap();
    let float = plain.logits(&batch).unwrap().to_vec2::<f32>().unwrap();
    assert!(float != got);
    let lora = TrainModel::from_checkpoint(&ckpt, DType::F32, &Device::Cpu)
        .unwrap()
        .with_lora(4, 3)
        .unwrap();
    assert_eq!(
        lora.logits(&batch).unwrap().to_vec2::<f32>().unwrap(),
        float
    );
}

/// `--lora-rank` and `--qat` runs write plain checkpoints: the stock model's tensors, same
/// shapes, the attention kernels changed.
#[test]
fn lora_and_qat_runs_write_plain_checkpoints() {
    let dir = work_dir("finetune-lora-qat");
    let stock = needlec::frontend::load_checkpoint_at(&tiny_needle("tiny-needle.pkl")).unwrap();
    for (name, extra) in [
        ("lora.safetensors", ["--lora-rank", "4"]),
        ("qat.safetensors", ["--qat", "int4"]),
    ] {
        let mut args = vec!["--steps", "2", "--batch-size", "2", "--isolate-tools"];
        args.extend_from_slice(&extra);
        train(&dir, name, &args);
        let tuned = needlec::frontend::load_checkpoint_at(&dir.join(name)).unwrap();
        assert_eq!(
            tuned.tensors.keys().collect::<Vec<_>>(),
            stock.tensors.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (path, t) in &tuned.tensors {
            assert_eq!(t.shape, stock.tensors[path].shape, "{name} {path}");
        }
        let kernel = "decoder/layers/DecoderBlock_0/cross_attn/q_proj/kernel";
        assert_ne!(
            tuned.tensors[kernel].to_f32(),
            stock.tensors[kernel].to_f32(),
            "{name}: the kernels did not move"
        );
        assert_eq!(
            tuned.config.tool_attention,
            needle_runtime::config::ToolAttention::Isolated
        );
    }
}

/// Each validation reports how often the model, folded under `--isolate-tools`, answers as the
/// stock model does in exact mode: the stock model itself agrees everywhere unfolded and not
/// everywhere folded (its encoder was trained with tools that see the query).
#[test]
fn validation_reports_agreement_with_the_stock_exact_mode() {
    let dir = work_dir("finetune-agreement");
    let dev = s(&finetune("dev.jsonl"));
    let step0 = |isolate: bool| {
        let mut args = vec![
            "--val",
            &dev,
            "--val-limit",
            "40",
            "--steps",
            "1",
            "--batch-size",
            "2",
        ];
        if isolate {
            args.push("--isolate-tools");
        }
        let run = run_finetune(&dir.join("o.safetensors"), &args);
        let err = String::from_utf8_lossy(&run.stderr).to_string();
        let line = err
            .lines()
            .find(|l| l.contains("step 0 (as loaded)"))
            .unwrap_or_else(|| panic!("no step-0 line: {err}"))
            .to_string();
        let pct = line
            .rsplit("agreement with the stock exact mode ")
            .next()
            .and_then(|t| t.trim_end_matches('%').parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no agreement in {line:?}"));
        (line, pct)
    };
    let (line, unfolded) = step0(false);
    assert_eq!(unfolded, 100.0, "{line}");
    let (line, folded) = step0(true);
    assert!(folded < 95.0, "naive folding agrees {folded}%: {line}");
}

/// `--ema D` keeps the moving average of the weights: with D near 0 it is the live weights, with
/// D near 1 it has hardly left the starting checkpoint.
#[test]
fn ema_keeps_the_moving_average_of_the_weights() {
    let dir = work_dir("finetune-ema");
    let base = ["--steps", "3", "--batch-size", "2", "--seed", "3"];
    let load = |name: &str| needlec::frontend::load_checkpoint_at(&dir.join(name)).unwrap();
    train(&dir, "live.safetensors", &base);
    train(
        &dir,
        "near0.safetensors",
        &[&base[..], &["--ema", "1e-9"]].concat(),
    );
    train(
        &dir,
        "near1.safetensors",
        &[&base[..], &["--ema", "0.999999"]].concat(),
    );
    let stock = needlec::frontend::load_checkpoint_at(&tiny_needle("tiny-needle.pkl")).unwrap();
    let (live, near0, near1) = (
        load("live.safetensors"),
        load("near0.safetensors"),
        load("near1.safetensors"),
    );
    let max_diff = |a: &needle_runtime::checkpoint::Checkpoint,
                    b: &needle_runtime::checkpoint::Checkpoint| {
        a.tensors
            .iter()
            .flat_map(|(k, t)| {
                t.to_f32()
                    .into_iter()
                    .zip(b.tensors[k].to_f32())
                    .map(|(x, y)| (x - y).abs())
                    .collect::<Vec<_>>()
            })
            .fold(0.0f32, f32::max)
    };
    let moved = max_diff(&live, &stock);
    assert!(moved > 1e-4, "training moved nothing ({moved})");
    assert!(
        max_diff(&near0, &live) < 1e-6,
        "decay ~0 is not the live weights"
    );
    assert!(
        max_diff(&near1, &stock) < moved * 1e-3,
        "decay ~1 left the checkpoint"
    );
}
