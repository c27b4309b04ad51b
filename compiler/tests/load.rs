//! Checkpoint loading: the real reference pickles, safetensors round trips, synthetic
//! checkpoints, and one test per kind of bad input.

use std::path::PathBuf;

use needle_runtime::checkpoint::{expected_tensors, Checkpoint, DType, Tensor};
use needle_runtime::config::{ConfigError, ToolAttention};
use needle_test_support::{repo_root, work_dir};
use needlec::load::{
    check_checkpoint, inspect_report, load_checkpoint, load_pickle_bytes, save_safetensors,
    LoadError,
};
use needlec::synth::{parse_config_spec, synth_checkpoint};
use safetensors::tensor::{Dtype, TensorView};

fn repo(rel: &str) -> PathBuf {
    repo_root().join(rel)
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

/// The raw bytes of a real fixture.
fn fixture_bytes(rel: &str) -> Vec<u8> {
    std::fs::read(repo(rel)).unwrap()
}

/// Decodes an IEEE half by hand, independently of the `half` crate.
fn f16_by_hand(bits: u16) -> f32 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let mant = f32::from(bits & 0x3ff);
    match exp {
        0 => sign * mant / 1024.0 * 2f32.powi(-14),
        _ => sign * (1.0 + mant / 1024.0) * 2f32.powi(exp - 15),
    }
}

#[test]
fn real_pickle_spot_values() {
    // Offsets from `python3 -m pickletools tiny_random.pkl`: the embedding's data is the BINBYTES at
    // byte 175, the first tensor of the file.
    let raw = fixture_bytes(TINY_RANDOM);
    assert_eq!(raw[175], b'B');
    let len = u32::from_le_bytes([raw[176], raw[177], raw[178], raw[179]]) as usize;
    assert_eq!(len, 4096 * 64 * 2);
    let ck = load(TINY_RANDOM);
    let emb = &ck.tensors["embedding/embedding"];
    assert_eq!(emb.bytes, raw[180..180 + len]);
    assert_eq!(&raw[180..182], b"\x99\x1c");
    let v = emb.to_f32();
    assert_eq!(v[0], f16_by_hand(0x1c99));
    // exponent 7, mantissa 153: (1 + 153/1024) * 2^-8.
    assert_eq!(v[0], (1.0 + 153.0 / 1024.0) / 256.0);
    // The last element of row 0 and the first of row 1 (row-major, D = 64).
    assert_eq!(
        v[63],
        f16_by_hand(u16::from_le_bytes([raw[180 + 126], raw[180 + 127]]))
    );
    assert_eq!(
        v[64],
        f16_by_hand(u16::from_le_bytes([raw[180 + 128], raw[180 + 129]]))
    );

    // small_random's log_temp is a 0-d array holding b'\x99\xa4' (pickletools, byte 1145223).
    let small = load(SMALL_RANDOM);
    let lt = &small.tensors["log_temp"];
    assert!(lt.shape.is_empty());
    assert_eq!(lt.bytes, b"\x99\xa4");
    // sign 1, exponent 9, mantissa 153: -(1 + 153/1024) * 2^-6.
    assert_eq!(lt.to_f32(), vec![-(1.0 + 153.0 / 1024.0) / 64.0]);
    assert_eq!(lt.to_f32()[0], f16_by_hand(0xa499));

    // tiny-needle's contrastive_hidden/bias is 32 zeros (SHORT_BINBYTES at byte 187).
    let tn = load(TINY_NEEDLE);
    let bias = &tn.tensors["contrastive_hidden/bias"];
    assert_eq!(bias.shape, vec![32]);
    assert!(bias.to_f32().iter().all(|&x| x == 0.0));
}

/// Pickles written by real numpy in every encoding the loader supports, checked against the values
/// numpy itself wrote to `expected.json` (see `tests/data/gen_pickles.py`).
#[test]
fn numpy_written_pickles_match_numpy_values() {
    let data = repo("compiler/tests/data");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("expected.json")).unwrap())
            .unwrap();
    let files = expected["files"].as_object().unwrap();
    assert_eq!(files.len(), 4);
    for (name, tensors) in files {
        let ck = load_checkpoint(&data.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let c = &ck.config;
        assert_eq!(
            (c.vocab_size, c.d_model, c.num_heads, c.num_kv_heads),
            (16, 8, 2, 1),
            "{name}"
        );
        assert_eq!(
            (
                c.num_encoder_layers,
                c.num_decoder_layers,
                c.contrastive_dim
            ),
            (1, 2, 4),
            "{name}"
        );
        // rope_theta was pickled as the int 10000.
        assert_eq!(c.rope_theta, 10000.0);
        let tensors = tensors.as_object().unwrap();
        assert_eq!(ck.tensors.len(), tensors.len(), "{name}");
        for (path, want) in tensors {
            let t = &ck.tensors[path];
            assert_eq!(
                t.dtype.name(),
                want["dtype"].as_str().unwrap(),
                "{name} {path}"
            );
            let shape: Vec<usize> = want["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(t.shape, shape, "{name} {path}");
            let values: Vec<f32> = want["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(t.to_f32(), values, "{name} {path}");
        }
    }
}

/// A scratch file of this test binary (one directory shared by all its tests: names differ).
fn tmp(name: &str) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| work_dir("load")).join(name)
}

#[test]
fn safetensors_round_trip() {
    for (i, rel) in ALL_PICKLES.iter().enumerate() {
        let ck = load(rel);
        let path = tmp(&format!("rt{i}.safetensors"));
        save_safetensors(&ck, &path).unwrap();
        let back = load_checkpoint(&path).unwrap();
        assert_eq!(back, ck, "{rel}");
        // Deterministic bytes: saving again writes the same file.
        let first = std::fs::read(&path).unwrap();
        save_safetensors(&back, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), first, "{rel}");
        // The `.safetensors` extension plays no part: content decides.
        let renamed = tmp(&format!("rt{i}.pkl"));
        std::fs::write(&renamed, &first).unwrap();
        assert_eq!(load_checkpoint(&renamed).unwrap(), ck);
        // A truncated safetensors file is recognized as one and reported as corrupt.
        std::fs::write(&renamed, &first[..first.len() - 100]).unwrap();
        let e = load_checkpoint(&renamed).unwrap_err();
        assert!(matches!(e, LoadError::Safetensors { .. }), "{e}");
    }
}

/// Views for writing a checkpoint with the safetensors crate directly (bypassing needlec's writer).
fn st_views(ck: &Checkpoint) -> Vec<(String, TensorView<'_>)> {
    ck.tensors
        .iter()
        .map(|(k, t)| {
            let dtype = match t.dtype {
                DType::F16 => Dtype::F16,
                DType::BF16 => Dtype::BF16,
                DType::F32 => Dtype::F32,
            };
            (
                k.clone(),
                TensorView::new(dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect()
}

#[test]
fn safetensors_dotted_names_and_sidecar_config() {
    let ck = synth_checkpoint(&parse_config_spec("tiny").unwrap(), 3, DType::BF16);
    let dir = tmp("sidecar");
    std::fs::create_dir_all(&dir).unwrap();
    let views = st_views(&ck)
        .into_iter()
        .map(|(k, v)| (k.replace('/', "."), v));
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    // Without a config anywhere: a clear error.
    let e = load_checkpoint(&path).unwrap_err();
    assert!(matches!(e, LoadError::Safetensors { .. }), "{e}");
    assert!(
        e.to_string().contains("needle_config") && e.to_string().contains("config.json"),
        "{e}"
    );
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&ck.config).unwrap(),
    )
    .unwrap();
    assert_eq!(load_checkpoint(&path).unwrap(), ck);
}

#[test]
fn synth_is_deterministic_and_valid() {
    for spec in [
        "tiny",
        "small",
        r#"{"d_model": 32, "num_heads": 2, "num_kv_heads": 1, "vocab_size": 100}"#,
    ] {
        let c = parse_config_spec(spec).unwrap();
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let a = synth_checkpoint(&c, 7, dtype);
            check_checkpoint(&a).unwrap();
            assert_eq!(a, synth_checkpoint(&c, 7, dtype));
            let b = synth_checkpoint(&c, 8, dtype);
            for (path, t) in &a.tensors {
                assert_eq!(t.dtype, dtype);
                if path != "log_temp" {
                    assert_ne!(t.bytes, b.tensors[path].bytes, "{path}");
                }
                // Norm scales and gates are non-zero so that every block contributes.
                let v = t.to_f32();
                assert!(
                    path == "log_temp" || v.iter().all(|x| x.is_finite() && x.abs() < 2.0),
                    "{path}"
                );
            }
            let gates = a.tensors["encoder/layers/EncoderBlock_0/attn_gate"].to_f32();
            assert!(
                gates.iter().all(|&g| (0.09..=0.61).contains(&g)),
                "{gates:?}"
            );
            assert!((a.tensors["log_temp"].to_f32()[0] - 2.659).abs() < 0.01);
        }
    }
    let small = parse_config_spec("small").unwrap();
    assert_eq!(small, load(SMALL_RANDOM).config);
    assert_eq!(parse_config_spec("tiny").unwrap(), load(TINY_RANDOM).config);
}

#[test]
fn synth_full_is_fast() {
    let c = parse_config_spec("full").unwrap();
    let t0 = std::time::Instant::now();
    let ck = synth_checkpoint(&c, 1, DType::F16);
    let dt = t0.elapsed();
    let n: usize = ck.tensors.values().map(|t| t.numel()).sum();
    assert!((20_000_000..40_000_000).contains(&n), "{n}");
    check_checkpoint(&ck).unwrap();
    eprintln!("synth full: {n} parameters in {dt:?}");
    assert!(dt.as_secs_f64() < 5.0, "{dt:?}");
    // Kernels keep activations at unit scale: variance close to 1 / fan_in.
    let q = ck.tensors["encoder/layers/EncoderBlock_0/self_attn/q_proj/kernel"].to_f32();
    let var = q.iter().map(|x| x * x).sum::<f32>() / q.len() as f32;
    assert!((var * 512.0 - 1.0).abs() < 0.05, "{var}");
}

#[test]
fn parse_config_spec_errors() {
    let e = parse_config_spec("huge").unwrap_err();
    assert!(e.to_string().contains("full"), "{e}");
    let e = parse_config_spec(r#"{"d_model": "wide"}"#).unwrap_err();
    assert!(
        matches!(&e, LoadError::Config { key: Some(k), .. } if k == "d_model"),
        "{e}"
    );
    let e = parse_config_spec(r#"{"num_heads": 3}"#).unwrap_err();
    assert!(matches!(e, LoadError::InvalidConfig(_)), "{e}");
}

#[test]
fn inspect_report_lists_everything() {
    let ck = load(TINY_NEEDLE_FOLDED);
    let r = inspect_report(&ck);
    for key in [
        "vocab_size",
        "d_ff",
        "rope_theta",
        "no_feedforward",
        "tool_attention",
        "isolated",
    ] {
        assert!(r.contains(key), "{key} in\n{r}");
    }
    let n: usize = ck.tensors.values().map(|t| t.numel()).sum();
    assert!(r.contains(&format!("parameters: {n}")), "{r}");
    assert!(
        r.contains("embedding/embedding") && r.contains("[2048, 128]") && r.contains("float16")
    );
    assert_eq!(r.lines().count(), 17 + 3 + ck.tensors.len());
}

// ---- bad inputs -------------------------------------------------------------------------------

#[test]
fn truncated_pickles() {
    let raw = fixture_bytes(TINY_RANDOM);
    for cut in [
        1,
        2,
        5,
        11,
        12,
        100,
        179,
        180,
        5000,
        raw.len() / 2,
        raw.len() - 10,
        raw.len() - 1,
    ] {
        let e = load_pickle_bytes(&raw[..cut]).unwrap_err();
        assert!(matches!(e, LoadError::Truncated { .. }), "cut {cut}: {e}");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
    // Through the file API too.
    let path = tmp("truncated.pkl");
    std::fs::write(&path, &raw[..raw.len() / 3]).unwrap();
    assert!(matches!(
        load_checkpoint(&path).unwrap_err(),
        LoadError::Truncated { .. }
    ));
    // Every cut point of a small numpy pickle fails cleanly.
    let small = std::fs::read(repo("compiler/tests/data/p4_bf16.pkl")).unwrap();
    for cut in 0..small.len() {
        assert!(load_pickle_bytes(&small[..cut]).is_err(), "cut {cut}");
    }
}

#[test]
fn corrupted_opcode() {
    let mut raw = fixture_bytes(TINY_RANDOM);
    raw[11] = 0xff; // was EMPTY_DICT
    let e = load_pickle_bytes(&raw).unwrap_err();
    assert!(matches!(e, LoadError::Pickle { offset: 11, .. }), "{e}");
    assert!(e.to_string().contains("0xff"), "{e}");
}

/// Flipping any single byte of a real pickle must give an error or a checkpoint, never a panic.
#[test]
fn single_byte_corruptions_never_panic() {
    let orig = std::fs::read(repo("compiler/tests/data/p4_bf16.pkl")).unwrap();
    let mut data = orig.clone();
    for i in 0..orig.len() {
        for v in [0x00, 0xff, orig[i] ^ 0x01, b'(', b'h', b'R', b'b', b't'] {
            data[i] = v;
            if let Ok(ck) = load_pickle_bytes(&data) {
                let _ = check_checkpoint(&ck);
            }
        }
        data[i] = orig[i];
    }
}

#[test]
fn foreign_globals_are_refused() {
    // GLOBAL 'os system' (protocol 2 text form).
    let e = load_pickle_bytes(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.").unwrap_err();
    assert!(
        matches!(&e, LoadError::ForbiddenGlobal { offset: 2, name } if name == "os.system"),
        "{e}"
    );
    // STACK_GLOBAL builtins.eval (protocol 4 form), after PROTO (2) and two strings (10 + 6).
    let e =
        load_pickle_bytes(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.").unwrap_err();
    assert!(
        matches!(&e, LoadError::ForbiddenGlobal { offset: 18, name } if name == "builtins.eval"),
        "{e}"
    );
    assert!(e.to_string().contains("builtins.eval"));
    // Inside a real checkpoint: rename the module `numpy` of `numpy.ndarray` (byte 84) to `posix`.
    let mut raw = fixture_bytes(TINY_RANDOM);
    assert_eq!(&raw[86..91], b"numpy");
    raw[86..91].copy_from_slice(b"posix");
    let e = load_pickle_bytes(&raw).unwrap_err();
    assert!(
        matches!(&e, LoadError::ForbiddenGlobal { offset: 102, name } if name == "posix.ndarray"),
        "{e}"
    );
}

#[test]
fn hostile_structures() {
    // Memo miss.
    let e = load_pickle_bytes(b"\x80\x04h\x05.").unwrap_err();
    assert!(
        matches!(e, LoadError::Pickle { offset: 2, .. }) && e.to_string().contains("memo"),
        "{e}"
    );
    // Stack underflow.
    let e = load_pickle_bytes(b"\x80\x04s.").unwrap_err();
    assert!(e.to_string().contains("underflow"), "{e}");
    // POP past a MARK.
    let e = load_pickle_bytes(b"\x80\x04N(0.").unwrap_err();
    assert!(e.to_string().contains("underflow"), "{e}");
    // An absurd length is checked before anything is allocated.
    let mut bomb = b"\x80\x04\x8e".to_vec();
    bomb.extend_from_slice(&u64::MAX.to_le_bytes());
    let e = load_pickle_bytes(&bomb).unwrap_err();
    assert!(
        matches!(e, LoadError::Truncated { .. }) && e.to_string().contains("declares"),
        "{e}"
    );
    // Deep nesting: 200 dicts, each the value of key 'a' in the one above.
    let mut deep = b"\x80\x04}".to_vec();
    for _ in 0..200 {
        deep.extend_from_slice(b"\x8c\x01a}");
    }
    deep.extend(std::iter::repeat_n(b's', 200));
    deep.push(b'.');
    let e = load_pickle_bytes(&deep).unwrap_err();
    assert!(e.to_string().contains("nest"), "{e}");
    // A dict containing itself.
    let e = load_pickle_bytes(b"\x80\x04}\x94\x8c\x01ah\x00s.").unwrap_err();
    assert!(e.to_string().contains("nest"), "{e}");
    // A memo bomb: a 10-level tree where each level holds the level below 8 times.
    let mut bomb = b"\x80\x04}\x94".to_vec();
    for level in 0..10u8 {
        bomb.push(b'}');
        bomb.push(b'(');
        for k in 0..8u8 {
            bomb.extend_from_slice(&[0x8c, 1, b'a' + k, b'h', level]);
        }
        bomb.extend_from_slice(b"u\x94");
    }
    bomb.push(b'.');
    let e = load_pickle_bytes(&bomb).unwrap_err();
    assert!(e.to_string().contains("over and over"), "{e}");
    // Not a dict at the top.
    let e = load_pickle_bytes(b"\x80\x04K\x07.").unwrap_err();
    assert!(matches!(e, LoadError::Structure { .. }), "{e}");
    // Out-of-band buffer.
    let e = load_pickle_bytes(b"\x80\x05\x97.").unwrap_err();
    assert!(e.to_string().contains("out-of-band"), "{e}");
}

#[test]
fn array_size_mismatch_names_tensor() {
    // The embedding's shape (4096, 64): BININT2 4096 at byte 119 becomes 4095.
    let mut raw = fixture_bytes(TINY_RANDOM);
    assert_eq!(&raw[119..122], b"M\x00\x10");
    raw[120..122].copy_from_slice(&4095u16.to_le_bytes());
    let e = load_pickle_bytes(&raw).unwrap_err();
    match &e {
        LoadError::BadArray {
            path,
            offset,
            problem,
        } => {
            assert_eq!(path, "embedding/embedding");
            assert_eq!(*offset, 524480);
            assert!(
                problem.contains("524160") && problem.contains("524288"),
                "{problem}"
            );
        }
        other => panic!("{other}"),
    }
}

fn save_and_load(ck: &Checkpoint, name: &str) -> LoadError {
    let path = tmp(name);
    save_safetensors(ck, &path).unwrap();
    load_checkpoint(&path).unwrap_err()
}

#[test]
fn wrong_shape() {
    let mut ck = load(TINY_RANDOM);
    let t = ck
        .tensors
        .get_mut("decoder/layers/DecoderBlock_0/cross_attn/k_proj/kernel")
        .unwrap();
    // (2, 64, 32) stored as (2, 32, 64): same bytes, wrong layout.
    t.shape = vec![2, 32, 64];
    let e = save_and_load(&ck, "wrong_shape.safetensors");
    match &e {
        LoadError::WrongShape {
            path,
            expected,
            found,
            ..
        } => {
            assert_eq!(
                path,
                "decoder/layers/DecoderBlock_0/cross_attn/k_proj/kernel"
            );
            assert_eq!(
                (expected.as_slice(), found.as_slice()),
                (&[2, 64, 32][..], &[2, 32, 64][..])
            );
        }
        other => panic!("{other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("this tensor is likely") && msg.contains("d_model"),
        "{msg}"
    );

    // A config that does not belong to the tensors: the config is blamed.
    let mut ck = load(TINY_RANDOM);
    ck.config.d_model = 128;
    let e = save_and_load(&ck, "wrong_config.safetensors");
    assert!(matches!(e, LoadError::WrongShape { .. }), "{e}");
    assert!(e.to_string().contains("the config is likely wrong"), "{e}");
}

#[test]
fn missing_tensor() {
    let mut ck = load(TINY_RANDOM);
    ck.tensors.remove("log_temp");
    let e = save_and_load(&ck, "missing.safetensors");
    assert!(
        matches!(&e, LoadError::MissingTensor { path, .. } if path == "log_temp"),
        "{e}"
    );
}

#[test]
fn nan_and_inf_weights() {
    let mut ck = load(TINY_RANDOM);
    let t = ck.tensors.get_mut("encoder/final_norm/scale").unwrap();
    t.bytes[10..12].copy_from_slice(&half::f16::NAN.to_le_bytes());
    let e = save_and_load(&ck, "nan.safetensors");
    assert!(
        matches!(&e, LoadError::NonFinite { path, index: 5, count: 1, .. } if path == "encoder/final_norm/scale"),
        "{e}"
    );
    let mut ck = synth_checkpoint(&parse_config_spec("tiny").unwrap(), 1, DType::F32);
    let t = ck.tensors.get_mut("contrastive_proj/kernel").unwrap();
    t.bytes[0..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let e = save_and_load(&ck, "inf.safetensors");
    assert!(
        matches!(&e, LoadError::NonFinite { path, .. } if path == "contrastive_proj/kernel"),
        "{e}"
    );
}

#[test]
fn feed_forward_checkpoint_is_refused() {
    let mut ck = load(TINY_RANDOM);
    ck.config.no_feedforward = false;
    ck.tensors.insert(
        "encoder/layers/EncoderBlock_0/ffn/kernel".into(),
        Tensor::from_f32(vec![2, 64, 512], &vec![0.0; 2 * 64 * 512]),
    );
    let e = save_and_load(&ck, "ff.safetensors");
    assert!(
        matches!(e, LoadError::InvalidConfig(ConfigError::HasFeedForward)),
        "{e}"
    );
    assert!(e.to_string().contains("feed-forward"), "{e}");
}

#[test]
fn unexpected_tensor() {
    let mut ck = load(TINY_RANDOM);
    ck.tensors.insert(
        "lm_head/kernel".into(),
        Tensor::from_f32(vec![2], &[0.0, 1.0]),
    );
    let e = save_and_load(&ck, "extra.safetensors");
    assert!(
        matches!(&e, LoadError::UnexpectedTensors { paths } if paths == &["lm_head/kernel"]),
        "{e}"
    );
}

#[test]
fn not_a_checkpoint() {
    for (name, bytes) in [
        ("text.pkl", &b"hello, world\n"[..]),
        ("empty.pkl", &b""[..]),
        ("json.safetensors", &b"{\"d_model\": 64}"[..]),
        ("zip.pkl", &b"PK\x03\x04\x14\x00\x00\x00"[..]),
    ] {
        let path = tmp(name);
        std::fs::write(&path, bytes).unwrap();
        let e = load_checkpoint(&path).unwrap_err();
        assert!(matches!(e, LoadError::UnknownFormat { .. }), "{name}: {e}");
        assert!(
            e.to_string().contains("safetensors") && e.to_string().contains("pickle"),
            "{e}"
        );
    }
    let e = load_checkpoint(&tmp("does-not-exist.pkl")).unwrap_err();
    assert!(matches!(e, LoadError::Io { .. }), "{e}");
}

#[test]
fn bad_config_type() {
    // In tiny_random.pkl, `d_model` is BININT1 64 (`K@`) right after its key; make it NEWTRUE and
    // MEMOIZE (same length, and nothing later reads the memo).
    let mut raw = fixture_bytes(TINY_RANDOM);
    let key = b"\x8c\x07d_model\x94";
    let at = raw.windows(key.len()).rposition(|w| w == key).unwrap() + key.len();
    assert_eq!(&raw[at..at + 2], b"K@");
    raw[at..at + 2].copy_from_slice(b"\x88\x94");
    let e = load_pickle_bytes(&raw).unwrap_err();
    assert!(
        matches!(&e, LoadError::Config { key: Some(k), .. } if k == "d_model"),
        "{e}"
    );
    assert!(e.to_string().contains("true"), "{e}");

    // The same through safetensors metadata.
    let ck = synth_checkpoint(&parse_config_spec("tiny").unwrap(), 1, DType::F16);
    let mut config = serde_json::to_value(&ck.config).unwrap();
    config["num_kv_heads"] = serde_json::json!("2");
    let meta = std::collections::HashMap::from([("needle_config".to_string(), config.to_string())]);
    let path = tmp("badcfg.safetensors");
    safetensors::serialize_to_file(st_views(&ck), Some(meta), &path).unwrap();
    let e = load_checkpoint(&path).unwrap_err();
    assert!(
        matches!(&e, LoadError::Config { key: Some(k), .. } if k == "num_kv_heads"),
        "{e}"
    );
}

#[test]
fn unknown_config_keys_are_ignored_whatever_their_type() {
    // Insert `'betas': (0.9, 0.99)` into tiny_random's config, just before its closing SETITEMS
    // (byte 681374 per pickletools).
    let mut raw = fixture_bytes(TINY_RANDOM);
    assert_eq!(&raw[681373..681376], b"\x88uu");
    let mut extra = b"\x8c\x05betasG".to_vec();
    extra.extend_from_slice(&0.9f64.to_be_bytes());
    extra.push(b'G');
    extra.extend_from_slice(&0.99f64.to_be_bytes());
    extra.push(0x86);
    raw.splice(681374..681374, extra);
    let ck = load_pickle_bytes(&raw).unwrap();
    assert_eq!(ck.config, load(TINY_RANDOM).config);
    check_checkpoint(&ck).unwrap();
}
