//! The IR, run by the reference interpreter (`needle_ir::interp`), against the original
//! implementation's golden vectors (`tests/fixtures/golden/`, see its README): load the random
//! checkpoints, lower in both fold modes, fill the constants, run the whole pass pipeline, then
//! interpret `encode_query` and every teacher-forced `decoder_step`. Agreement here means the
//! lowering, the folder and the passes compute what the reference computes, before any codegen.

use needle_ir::{
    run_pipeline, ConstStore, Interpreter, Module, Sym, Tensor, DECODER_STEP, ENCODE_QUERY,
    PIPELINE,
};
use needle_runtime::checkpoint::Checkpoint;
use needle_runtime::decode::{MAX_QUERY_TOKENS, TOOLS_ID};
use needle_runtime::forward::{
    decoder_step, encode, CrossKv, DecoderCache, EncoderMask, FoldedTools,
};
use needle_runtime::model::Model;
use needle_test_support::{golden, read_json, ForcedCase, GreedyCase};
use needlec::load::load_checkpoint;
use needlec::lower::{lower, FoldMode};
use needlec::materialize::materialize_constants;

/// The golden README's tolerance: `1e-3` relative to the step's largest golden logit (at least
/// `1e-2`).
const REL_TOL: f32 = 1e-3;
const MIN_SCALE: f32 = 1e-2;
/// Greedy steps whose golden top-1/top-2 gap is below this may legitimately flip (README).
const MIN_GAP: f32 = 1e-3;
const EOS_ID: i32 = 1;

fn fold_mode(mode: &str) -> FoldMode {
    match mode {
        "exact" => FoldMode::None,
        "folded" => FoldMode::Tools,
        other => panic!("unknown golden mode {other:?}"),
    }
}

/// The golden encoder input split at the first `<tools>`: the query's ids and the tool list's.
fn split_prompt(enc_ids: &[u32]) -> (Vec<i32>, Vec<u32>) {
    let at = enc_ids
        .iter()
        .position(|&id| id == TOOLS_ID)
        .expect("the prompt has a <tools> token");
    let query = enc_ids[..at].iter().map(|&id| id as i32).collect();
    (query, enc_ids[at + 1..].to_vec())
}

struct Fixture {
    checkpoint: Checkpoint,
    model: Model,
}

fn fixture(pkl: &str) -> Fixture {
    let checkpoint = load_checkpoint(&golden(pkl)).unwrap_or_else(|e| panic!("{pkl}: {e}"));
    let model = Model::from_checkpoint(&checkpoint).unwrap_or_else(|e| panic!("{pkl}: {e}"));
    Fixture { checkpoint, model }
}

/// What `needlec build` would hand codegen for this tool list: the module after the whole
/// pipeline and its constants' data.
fn compile(fx: &Fixture, fold: FoldMode, tool_ids: &[u32]) -> (Module, ConstStore) {
    let module = lower(&fx.model.config, fold, tool_ids.len(), MAX_QUERY_TOKENS);
    let mut store = ConstStore::default();
    materialize_constants(&module, &fx.checkpoint, &fx.model, tool_ids, &mut store)
        .unwrap_or_else(|e| panic!("materialize_constants: {e}"));
    let module = run_pipeline(module, Some(&mut store), PIPELINE, |_, _| {})
        .unwrap_or_else(|e| panic!("pipeline: {e}"));
    store.check(&module).unwrap();
    (module, store)
}

fn token(id: i32) -> Tensor {
    Tensor::i32(vec![1], vec![id])
}

/// Every id listed as allowed (the step's `%allowed : i32[a]` with `a = V`).
fn all_allowed(vocab: usize) -> Tensor {
    Tensor::i32(vec![vocab], (0..vocab as i32).collect())
}

/// Runs decoder steps from position `p`: returns the argmax and the step's logits.
fn step(it: &mut Interpreter, vocab: usize, tok: i32, p: usize) -> (i32, Vec<f32>) {
    let out = it
        .call(
            DECODER_STEP,
            &[token(tok), all_allowed(vocab)],
            &[(Sym::P, p as i64)],
        )
        .unwrap_or_else(|e| panic!("step {p}: {e}"));
    let next = out[0].as_i32().expect("i32 token")[0];
    let logits = it
        .value("logits")
        .and_then(Tensor::as_f32)
        .expect("decoder_step defines %logits")
        .to_vec();
    (next, logits)
}

/// Every teacher-forced step of every case of `mode` in `json`: the logits at the golden top-5
/// and probe ids within tolerance, and the returned argmax where the golden top-1 is clear.
fn forced(pkl: &str, json: &str, mode: &str) {
    let fx = fixture(pkl);
    let vocab = fx.model.config.vocab_size;
    let cases: Vec<ForcedCase> = read_json(&golden(json));
    let mut failures = Vec::new();
    let (mut checked, mut worst) = (0usize, 0f32);
    for (ci, case) in cases.iter().enumerate().filter(|(_, c)| c.mode == mode) {
        let (query, tool_ids) = split_prompt(&case.enc_ids);
        let (module, store) = compile(&fx, fold_mode(mode), &tool_ids);
        let mut it = Interpreter::new(&module, &store).unwrap();
        it.call(ENCODE_QUERY, &[Tensor::i32(vec![query.len()], query)], &[])
            .unwrap_or_else(|e| panic!("case {ci}: {e}"));
        for (p, &tok) in case.dec_ids.iter().enumerate() {
            let (next, logits) = step(&mut it, vocab, tok as i32, p);
            let vals = case.top5_vals[p].iter().chain(&case.probe_vals[p]);
            let scale = vals.fold(MIN_SCALE, |m, v| m.max(v.abs()));
            let tol = REL_TOL * scale;
            let ids = case.top5[p].iter().chain(&case.probe_ids);
            let want = case.top5_vals[p].iter().chain(&case.probe_vals[p]);
            for (&id, &w) in ids.zip(want) {
                let got = logits[id as usize];
                let err = (got - w).abs();
                worst = worst.max(err / tol);
                checked += 1;
                // A NaN logit must fail too.
                if err.is_nan() || err > tol {
                    failures.push(format!(
                        "case {ci} step {p} id {id}: {got} vs golden {w} (tol {tol:.2e})"
                    ));
                }
            }
            let top = &case.top5_vals[p];
            if top[0] - top[1] > tol && next != case.top5[p][0] as i32 {
                failures.push(format!(
                    "case {ci} step {p}: argmax {next}, golden top-1 {} by a gap of {}",
                    case.top5[p][0],
                    top[0] - top[1]
                ));
            }
        }
    }
    eprintln!("{json} {mode}: {checked} logits checked, worst error {worst:.2e} of the tolerance");
    assert!(checked > 0, "no {mode} cases in {json}");
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn forced_tiny_exact() {
    forced("tiny_random.pkl", "forced_tiny.json", "exact");
}

#[test]
fn forced_tiny_folded() {
    forced("tiny_random.pkl", "forced_tiny.json", "folded");
}

#[test]
fn forced_small_exact() {
    forced("small_random.pkl", "forced_small.json", "exact");
}

#[test]
fn forced_small_folded() {
    forced("small_random.pkl", "forced_small.json", "folded");
}

/// Greedy decoding of `greedy_tiny.json`'s first query in both modes, fed back its own argmax
/// with every token allowed, for as long as the golden steps are clear (gap above `MIN_GAP`).
/// The random model's text never contains a `"`, so the reference grammar (which starts at
/// `"name":"`) was never active and listing every id is the reference's choice.
#[test]
fn greedy_tiny_first_query() {
    let fx = fixture("tiny_random.pkl");
    let vocab = fx.model.config.vocab_size;
    let cases: Vec<GreedyCase> = read_json(&golden("greedy_tiny.json"));
    let first = &cases[0].enc_ids;
    for case in cases.iter().filter(|c| &c.enc_ids == first) {
        assert!(
            !case.text.contains('"'),
            "{}: the grammar may have been active",
            case.mode
        );
        let (query, tool_ids) = split_prompt(&case.enc_ids);
        assert_eq!(query.len(), case.n_query_tokens);
        let (module, store) = compile(&fx, fold_mode(&case.mode), &tool_ids);
        let mut it = Interpreter::new(&module, &store).unwrap();
        it.call(ENCODE_QUERY, &[Tensor::i32(vec![query.len()], query)], &[])
            .unwrap();
        let clear = case
            .step_gaps
            .iter()
            .take_while(|&&g| g > MIN_GAP)
            .count()
            .min(case.gen_ids.len());
        assert!(clear > 0, "{}: no clear step to compare", case.mode);
        let mut gen = Vec::new();
        let mut tok = EOS_ID;
        for p in 0..clear {
            let (next, _) = step(&mut it, vocab, tok, p);
            if next == EOS_ID {
                break;
            }
            gen.push(next as u32);
            tok = next;
        }
        assert_eq!(
            gen,
            case.gen_ids[..clear],
            "{}: the first {clear} clear steps",
            case.mode
        );
    }
}

/// The query lengths the golden cases do not reach, against the runtime's forward pass (itself
/// checked against the golden vectors elsewhere): the empty query (folded: no run-time encoder
/// rows at all), one token, and the longest query the module accepts (folded: the query then
/// sits exactly at the reference's positions; exact: the encoder is full at 1024 tokens).
#[test]
fn edge_query_lengths_match_the_runtime() {
    let fx = fixture("tiny_random.pkl");
    let vocab = fx.model.config.vocab_size;
    let cases: Vec<ForcedCase> = read_json(&golden("forced_tiny.json"));
    let (_, tool_ids) = split_prompt(&cases[0].enc_ids);
    let tools_side: Vec<u32> = std::iter::once(TOOLS_ID)
        .chain(tool_ids.iter().copied())
        .collect();
    for fold in [FoldMode::None, FoldMode::Tools] {
        let (module, store) = compile(&fx, fold, &tool_ids);
        let q_max = module.dim_bounds(Sym::Q).1 as usize;
        let folded = FoldedTools::precompute(&fx.model, &tools_side);
        for q in [0, 1, q_max] {
            // Arbitrary ids away from the control tokens.
            let query: Vec<u32> = (0..q as u32).map(|i| 10 + (i * 37) % 4000).collect();
            let cross: CrossKv = match fold {
                FoldMode::Tools => folded.encode_query(&fx.model, &query),
                FoldMode::None => {
                    let ids: Vec<u32> = query.iter().chain(&tools_side).copied().collect();
                    CrossKv::from_encoder(&fx.model, &encode(&fx.model, &ids, EncoderMask::Full))
                }
            };
            let mut cache = DecoderCache::new(&fx.model);
            let mut it = Interpreter::new(&module, &store).unwrap();
            let ids: Vec<i32> = query.iter().map(|&id| id as i32).collect();
            it.call(ENCODE_QUERY, &[Tensor::i32(vec![q], ids)], &[])
                .unwrap_or_else(|e| panic!("{fold:?} q={q}: {e}"));
            for (p, tok) in [1u32, 4, 331, 303].into_iter().enumerate() {
                let want = decoder_step(&fx.model, &cross, &mut cache, tok);
                let (_, got) = step(&mut it, vocab, tok as i32, p);
                // `f32::max` below would skip a NaN.
                assert!(got.iter().all(|v| v.is_finite()), "{fold:?} q={q} step {p}");
                let scale = want.iter().fold(MIN_SCALE, |m, v| m.max(v.abs()));
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst <= REL_TOL * scale,
                    "{fold:?} q={q} step {p}: logits differ by {worst} (scale {scale})"
                );
            }
        }
    }
}
