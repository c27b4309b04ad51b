//! Whole queries against the reference: greedy constrained decoding on the random fixtures
//! (`greedy_{tiny,small}.json`, and `greedy_{tiny,small}_{int8,int4}.json` with the reference's
//! weight quantization) and the 40 samples of the bundled trained model in all three
//! checkpoint/fold combinations, with its own weights and in int8 and int4.

use needle_runtime::decode::{Engine, FoldMode};
use needle_runtime::quant::Precision;
use needle_test_support::{
    golden, golden_file, golden_precision, read_json, tiny_needle, Case, GreedyCase,
    QuantizedSample, Sample,
};
use needlec::frontend::{load_model_as, load_tokenizer, load_with, ModelOptions};
use needlec::tools::parse_tools;

/// Steps whose reference top-1/top-2 gap is below this may legitimately flip (golden README).
const FLIP_GAP: f32 = 1e-3;

/// `fixture` is `tiny` or `small`; the weights are the checkpoint's in `precision`.
fn check_greedy(fixture: &str, precision: Precision) {
    let greedy = golden_file("greedy", fixture, precision.name());
    let cases: Vec<Case> = read_json(&golden("cases.json"));
    let expected: Vec<GreedyCase> = read_json(&golden(&greedy));
    assert_eq!(expected.len(), 2 * cases.len());
    let checkpoint = golden(&format!("{fixture}_random.pkl"));
    let loaded = load_model_as(&checkpoint, Some(precision)).unwrap();
    let model = loaded.model;
    let tokenizer = load_tokenizer(&golden("dev4k.model")).unwrap();
    for want in &expected {
        assert_eq!(
            golden_precision(&want.precision),
            precision.name(),
            "{greedy}"
        );
        let case = cases
            .iter()
            .find(|c| c.query == want.query && c.tools == want.tools)
            .expect("case");
        let fold = if want.mode == "folded" {
            FoldMode::Tools
        } else {
            FoldMode::None
        };
        let tools = parse_tools(&want.tools).unwrap();
        let engine = Engine::new(model.clone(), tokenizer.clone(), tools.context(), fold).unwrap();
        let max_gen_len = want.max_gen_len.unwrap_or(case.max_gen_len);
        let got = engine.generate(&want.query, max_gen_len).unwrap();
        let what = format!("{greedy} {} {:?}", want.mode, want.query);
        assert_eq!(got.prompt.enc_ids, want.enc_ids, "{what}: encoder ids");
        assert_eq!(got.prompt.n_query_tokens, want.n_query_tokens, "{what}");
        // Identical ids up to the first step where the reference itself was nearly tied.
        let stable = want
            .step_gaps
            .iter()
            .position(|&g| g < FLIP_GAP)
            .unwrap_or(want.step_gaps.len());
        let n = stable.min(want.gen_ids.len());
        assert_eq!(
            got.gen_ids[..n.min(got.gen_ids.len())],
            want.gen_ids[..n],
            "{what}: generated ids"
        );
        if stable >= want.gen_ids.len() {
            assert_eq!(got.gen_ids, want.gen_ids, "{what}: generated ids");
            assert_eq!(got.text, want.text, "{what}: text");
            assert_eq!(got.output, want.output, "{what}: output");
        }
    }
}

#[test]
fn greedy_tiny_matches_reference() {
    check_greedy("tiny", Precision::F16);
}

#[test]
fn greedy_small_matches_reference() {
    check_greedy("small", Precision::F16);
}

#[test]
fn greedy_tiny_int8_matches_reference() {
    check_greedy("tiny", Precision::Int8);
}

#[test]
fn greedy_tiny_int4_matches_reference() {
    check_greedy("tiny", Precision::Int4);
}

#[test]
fn greedy_small_int8_matches_reference() {
    check_greedy("small", Precision::Int8);
}

#[test]
fn greedy_small_int4_matches_reference() {
    check_greedy("small", Precision::Int4);
}

/// The bundled trained model answers the 40 samples exactly as the reference did, for the stock
/// checkpoint exact and folded, and the fold-tuned checkpoint folded (its default), with the
/// checkpoints' own weights (`precision` `None`) or in int8/int4 (`samples_quantized.json`).
fn check_samples(precision: Option<Precision>) {
    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    let quantized: Vec<QuantizedSample> = read_json(&tiny_needle("samples_quantized.json"));
    assert_eq!(samples.len(), 40);
    assert_eq!(quantized.len(), 40);
    let tools = tiny_needle("tools.json");
    let tokenizer = tiny_needle("tokenizer.model");
    let tools = tools.to_str().unwrap();
    // (checkpoint, --fold, the mode it resolves to, the combination's name in the samples, how
    // many of the reference's own-weights outputs are the expected answer per the model's README)
    let combos = [
        ("tiny-needle.pkl", None, FoldMode::None, "stock_exact", 39),
        (
            "tiny-needle.pkl",
            Some(FoldMode::Tools),
            FoldMode::Tools,
            "stock_folded",
            21,
        ),
        (
            "tiny-needle-folded.pkl",
            None,
            FoldMode::Tools,
            "fold_folded",
            40,
        ),
    ];
    for (checkpoint, fold, resolved, combination, n_right) in combos {
        let options = ModelOptions {
            fold,
            weights: precision,
            ..ModelOptions::default()
        };
        let loaded = load_with(&tiny_needle(checkpoint), &tokenizer, tools, &options).unwrap();
        assert_eq!(loaded.engine.fold, resolved, "{checkpoint}: fold mode");
        assert_eq!(
            loaded.fold_warning.is_some(),
            checkpoint == "tiny-needle.pkl" && fold.is_some()
        );
        assert_eq!(loaded.weights, precision.unwrap_or(Precision::F16));
        assert!(loaded.weights_warning.is_none(), "float16 checkpoints");
        let mut right = 0;
        for (s, q) in samples.iter().zip(&quantized) {
            assert_eq!(
                s.query, q.query,
                "the two sample files list the same queries"
            );
            let want = match precision {
                None => s.output(combination),
                Some(p) => q.output(combination, p.name()),
            };
            let got = loaded.engine.generate(&s.query, 512).unwrap();
            assert_eq!(
                got.output, want,
                "{checkpoint} {combination} {precision:?}: {:?}",
                s.query
            );
            right += usize::from(got.output == s.expected);
        }
        if precision.is_none() {
            assert_eq!(right, n_right, "{checkpoint} {combination}: answers right");
        }
    }
}

#[test]
fn tiny_needle_samples_match_reference() {
    check_samples(None);
}

#[test]
fn tiny_needle_samples_int8_match_reference() {
    check_samples(Some(Precision::Int8));
}

#[test]
fn tiny_needle_samples_int4_match_reference() {
    check_samples(Some(Precision::Int4));
}
