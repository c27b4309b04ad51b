//! The forward pass against the reference's teacher-forced logits (`forced_{tiny,small}.json`,
//! and `forced_{tiny,small}_{int8,int4}.json` with the reference's weight quantization): both
//! random fixtures, both fold modes, every decoder position.

use needle_runtime::decode::TOOLS_ID;
use needle_runtime::forward::{
    decoder_step, encode, CrossKv, DecoderCache, EncoderMask, FoldedTools,
};
use needle_runtime::model::Model;
use needle_runtime::quant::Precision;
use needle_test_support::{
    golden, golden_file, golden_precision, logit_tolerance, read_json, ForcedCase,
};

fn model(name: &str, precision: Precision) -> Model {
    let ckpt = needlec::load::load_checkpoint(&golden(name)).expect("fixture loads");
    Model::from_checkpoint_as(&ckpt, precision).expect("fixture is a valid model")
}

/// `fixture` is `tiny` or `small`; the weights are the checkpoint's in `precision`.
fn check_fixture(fixture: &str, precision: Precision) {
    let model = model(&format!("{fixture}_random.pkl"), precision);
    let forced = golden_file("forced", fixture, precision.name());
    let cases: Vec<ForcedCase> = read_json(&golden(&forced));
    assert_eq!(cases.len(), 16, "8 cases x 2 modes");
    for (n, case) in cases.iter().enumerate() {
        let what = format!("{forced} #{n} ({} mode, query {:?})", case.mode, case.query);
        assert_eq!(
            golden_precision(&case.precision),
            precision.name(),
            "{what}"
        );
        let tools_start = case
            .enc_ids
            .iter()
            .position(|&id| id == TOOLS_ID)
            .expect("prompt has <tools>");
        let (mask, cross) = match case.mode.as_str() {
            "exact" => {
                let enc = encode(&model, &case.enc_ids, EncoderMask::Full);
                (EncoderMask::Full, CrossKv::from_encoder(&model, &enc))
            }
            "folded" => {
                let folded = FoldedTools::precompute(&model, &case.enc_ids[tools_start..]);
                (
                    EncoderMask::ToolsIsolated { tools_start },
                    folded.encode_query(&model, &case.enc_ids[..tools_start]),
                )
            }
            other => panic!("{what}: unknown mode {other}"),
        };
        // The encoder output's norm pins the (masked) encoder as a whole.
        let enc = encode(&model, &case.enc_ids, mask);
        let l2 = enc.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(
            (l2 - case.enc_out_l2).abs() <= 1e-4 * case.enc_out_l2,
            "{what}: encoder output L2 {l2} vs reference {}",
            case.enc_out_l2
        );
        assert_eq!(
            cross.len(),
            case.enc_ids.len(),
            "{what}: cross-attention sees the whole prompt"
        );

        let mut cache = DecoderCache::new(&model);
        assert_eq!(
            case.top5.len(),
            case.dec_ids.len(),
            "{what}: one record per decoder position"
        );
        for (pos, &token) in case.dec_ids.iter().enumerate() {
            let logits = decoder_step(&model, &cross, &mut cache, token);
            let (ids, vals) = (&case.top5[pos], &case.top5_vals[pos]);
            let tol = logit_tolerance(vals);
            for (&id, &want) in ids
                .iter()
                .zip(vals)
                .chain(case.probe_ids.iter().zip(&case.probe_vals[pos]))
            {
                let got = logits[id as usize];
                assert!(
                    (got - want).abs() <= tol,
                    "{what}, position {pos}: logit of {id} is {got}, reference {want}"
                );
            }
            // Our best token is the reference's, unless the reference's top two are within tolerance.
            let best = needle_runtime::decode::argmax(&logits);
            if vals[0] - vals[1] > tol {
                assert_eq!(best, ids[0], "{what}, position {pos}: top-1 differs");
            }
        }
    }
}

#[test]
fn forced_tiny_matches_reference() {
    check_fixture("tiny", Precision::F16);
}

#[test]
fn forced_small_matches_reference() {
    check_fixture("small", Precision::F16);
}

#[test]
fn forced_tiny_int8_matches_reference() {
    check_fixture("tiny", Precision::Int8);
}

#[test]
fn forced_tiny_int4_matches_reference() {
    check_fixture("tiny", Precision::Int4);
}

#[test]
fn forced_small_int8_matches_reference() {
    check_fixture("small", Precision::Int8);
}

#[test]
fn forced_small_int4_matches_reference() {
    check_fixture("small", Precision::Int4);
}

/// The folded path (tools side precomputed once, query encoded against it) is the masked encoder.
#[test]
fn folded_path_equals_masked_encoder() {
    let model = model("small_random.pkl", Precision::F16);
    let cases: Vec<ForcedCase> = read_json(&golden("forced_small.json"));
    for case in cases.iter().filter(|c| c.mode == "folded") {
        let tools_start = case.enc_ids.iter().position(|&id| id == TOOLS_ID).unwrap();
        let masked = encode(
            &model,
            &case.enc_ids,
            EncoderMask::ToolsIsolated { tools_start },
        );
        let want = CrossKv::from_encoder(&model, &masked);
        let got = FoldedTools::precompute(&model, &case.enc_ids[tools_start..])
            .encode_query(&model, &case.enc_ids[..tools_start]);
        for ((k1, v1), (k2, v2)) in want.layers.iter().zip(&got.layers) {
            let diff = k1
                .iter()
                .zip(k2)
                .chain(v1.iter().zip(v2))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                diff < 1e-4,
                "query {:?}: folded K/V differ by {diff}",
                case.query
            );
        }
    }
}
