//! The Needle 3 runtime against the reference package's vectors (`tests/fixtures/needle3/`,
//! made by cactus-needle 3.2.8 with `scripts/needle3/make_golden.py`): loading, the MLP
//! permutations, engram hashing, and the float32 forward pass at every stored ladder depth.

use std::path::PathBuf;

use needle_runtime::needle3::cact::{Cact, CqWeights, Format};
use needle_runtime::needle3::forward::{engram_indices, forward, greedy, heads, Cache};
use needle_runtime::needle3::model::{is_needle3_safetensors, mt_permutation, Model};
use needle_runtime::needle3::{generate, Config, Error};
use needle_test_support::max_rel_diff;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    needle_test_support::repo_root()
        .join("tests/fixtures/needle3")
        .join(name)
}

fn golden(name: &str) -> (Value, Vec<f32>) {
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap())
            .unwrap();
    let bin = std::fs::read(fixture(json["bin"].as_str().unwrap())).unwrap();
    let floats = bin
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (json, floats)
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The block `{offset, shape}` of the golden binary.
fn block<'a>(bin: &'a [f32], at: &Value) -> &'a [f32] {
    let off = at["offset"].as_u64().unwrap() as usize / 4;
    let len: usize = usizes(&at["shape"]).iter().product();
    &bin[off..off + len]
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
        .unwrap()
}

/// Every run of a golden file with these `weights`: logits rows, argmax and row norms at every position, hidden
/// cells, and the heads; returns the worst relative differences (logits, hidden, heads abs).
fn check_runs(
    json: &Value,
    bin: &[f32],
    full: &Model,
    weights: &str,
    depths: Option<&[usize]>,
    tol: [f32; 3],
) -> [f32; 3] {
    let mut worst = [0f32; 3];
    for run in json["runs"].as_array().unwrap() {
        let depth = run["depth"].as_u64().unwrap() as usize;
        if run["weights"] != weights || depths.is_some_and(|d| !d.contains(&depth)) {
            continue;
        }
        let case = &json["cases"][run["case"].as_u64().unwrap() as usize];
        let ids: Vec<u32> = usizes(&case["ids"]).iter().map(|&i| i as u32).collect();
        let model = full.clone().into_ladder(depth).unwrap();
        assert_eq!(
            model.config.num_layers,
            usizes(&run["layers"]).len(),
            "depth {depth}"
        );
        let out = forward(&model, &ids).unwrap();
        let what = format!("{weights} case {} depth {depth}", run["case"]);

        let rows = usizes(&run["logit_rows"]);
        let v = out.logits.ncols();
        let got: Vec<f32> = rows
            .iter()
            .flat_map(|&t| out.logits.row(t).to_vec())
            .collect();
        let r_logits = max_rel_diff(&got, block(bin, &run["logits"]));
        assert_eq!(usizes(&run["logits"]["shape"]), [rows.len(), v]);

        let want_argmax = usizes(&run["argmax"]);
        let want_l2 = f32s(&run["logits_row_l2"]);
        assert_eq!(want_argmax.len(), ids.len());
        for (t, row) in out.logits.rows().into_iter().enumerate() {
            let row = row.to_vec();
            assert_eq!(
                argmax(&row),
                want_argmax[t],
                "{what}: argmax at position {t}"
            );
            let l2 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(
                (l2 - want_l2[t]).abs() <= 1e-4 * want_l2[t],
                "{what}: logits row {t} norm {l2} vs {}",
                want_l2[t]
            );
        }

        let hidden_rows = usizes(&run["hidden_rows"]);
        let got: Vec<f32> = hidden_rows
            .iter()
            .flat_map(|&t| out.cells.iter().flat_map(move |c| c.row(t).to_vec()))
            .collect();
        let r_hidden = max_rel_diff(&got, block(bin, &run["hidden"]));

        let h = heads(&model, &ids, &out);
        let mut d_heads =
            (h.confidence.unwrap() - run["confidence"].as_f64().unwrap() as f32).abs();
        for (a, b) in h.router.unwrap().iter().zip(f32s(&run["router"])) {
            d_heads = d_heads.max((a - b).abs());
        }
        for (a, b) in h.embedding.unwrap().iter().zip(f32s(&run["embedding"])) {
            d_heads = d_heads.max((a - b).abs());
        }
        eprintln!(
            "{what}: logits rel {r_logits:.2e}, hidden rel {r_hidden:.2e}, heads abs {d_heads:.2e}"
        );
        assert!(
            r_logits <= tol[0],
            "{what}: logits differ by {r_logits} relative"
        );
        assert!(
            r_hidden <= tol[1],
            "{what}: hidden cells differ by {r_hidden} relative"
        );
        assert!(d_heads <= tol[2], "{what}: heads differ by {d_heads}");
        worst = [
            worst[0].max(r_logits),
            worst[1].max(r_hidden),
            worst[2].max(d_heads),
        ];
    }
    worst
}

#[test]
fn the_small_checkpoint_matches_the_reference_at_every_depth() {
    let data = std::fs::read(fixture("small.safetensors")).unwrap();
    assert!(is_needle3_safetensors(&data));
    let model = Model::from_safetensors_bytes(&data).unwrap();
    let (json, bin) = golden("small");
    assert_eq!(model.p1, usizes(&json["hada"]["p1"]));
    assert_eq!(model.p2, usizes(&json["hada"]["p2"]));
    for case in json["cases"].as_array().unwrap() {
        let ids: Vec<u32> = usizes(&case["ids"]).iter().map(|&i| i as u32).collect();
        let want: Vec<Vec<usize>> = case["engram_indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(usizes)
            .collect();
        assert_eq!(engram_indices(&model.config, &ids), want);
    }
    let worst = check_runs(&json, &bin, &model, "f32", None, [1e-5; 3]);
    eprintln!("small, worst: {worst:?}");
}

#[test]
fn numpy_permutations_of_both_widths() {
    let (json, _) = golden("default");
    assert_eq!(mt_permutation(11, 1024), usizes(&json["hada"]["p1"]));
    assert_eq!(mt_permutation(13, 1024), usizes(&json["hada"]["p2"]));
}

#[test]
fn the_generator_regenerates_every_default_parameter() {
    let (json, _) = golden("default");
    let layers = json["config"]["num_layers"].as_u64().unwrap() as usize;
    let checks = json["param_checks"].as_object().unwrap();
    assert!(checks.len() > 70);
    for (path, chk) in checks {
        let shape = usizes(&chk["shape"]);
        let v =
            generate::tensor(path, &shape, layers).unwrap_or_else(|| panic!("no rule for {path}"));
        let first = f32s(&chk["first"]);
        assert_eq!(v[..first.len()], first[..], "{path}");
        assert_eq!(
            *v.last().unwrap(),
            chk["last"].as_f64().unwrap() as f32,
            "{path}"
        );
        let sum: f64 = v.iter().map(|&x| f64::from(x)).sum();
        let want = chk["sum"].as_f64().unwrap();
        assert!(
            (sum - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{path}: sum {sum} vs {want}"
        );
    }
}

#[test]
fn the_default_config_matches_the_reference_at_every_depth() {
    let (json, bin) = golden("default");
    let config: Config = Config::from_json(&json["config"].to_string()).unwrap();
    let mut src = generate::Generated {
        num_layers: config.num_layers,
    };
    let model = Model::load(config, &mut src).unwrap();
    let worst = check_runs(&json, &bin, &model, "f32", None, [1e-5; 3]);
    eprintln!("default, worst: {worst:?}");
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let data = std::fs::read(fixture("small.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&data).unwrap();
    let metadata = meta.metadata().clone();
    let rewrite = |skip: &str, reshape: Option<(&str, Vec<usize>)>| {
        let mut views = Vec::new();
        for (name, view) in st.tensors() {
            if name == skip {
                continue;
            }
            let shape = match &reshape {
                Some((n, s)) if *n == name => s.clone(),
                _ => view.shape().to_vec(),
            };
            views.push((
                name,
                safetensors::tensor::TensorView::new(view.dtype(), shape, view.data()).unwrap(),
            ));
        }
        safetensors::serialize(views, metadata.clone()).unwrap()
    };
    let e = Model::from_safetensors_bytes(&rewrite("stack/mhc_phi_res", None)).unwrap_err();
    assert!(
        matches!(&e, Error::Missing { name } if name == "stack/mhc_phi_res"),
        "{e}"
    );
    let e = Model::from_safetensors_bytes(&rewrite(
        "",
        Some(("stack/layers/block/attn_gate", vec![3, 2])),
    ))
    .unwrap_err();
    assert!(
        e.to_string().contains("attn_gate") && e.to_string().contains("[6]"),
        "{e}"
    );
    // A v1-style file (config under `needle_config`) is not taken for Needle 3.
    let mut v1_meta = std::collections::HashMap::new();
    v1_meta.insert(
        "needle_config".to_string(),
        "{\"d_model\": 128}".to_string(),
    );
    let views: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    let v1 = safetensors::serialize(views, Some(v1_meta)).unwrap();
    assert!(!is_needle3_safetensors(&v1));
    assert!(matches!(
        Model::from_safetensors_bytes(&v1),
        Err(Error::Safetensors(_))
    ));
    assert!(Model::from_safetensors_bytes(&data[..data.len() / 2]).is_err());
    // The reference reads format_version "2" only.
    let mut old = metadata.clone().unwrap();
    old.insert("format_version".into(), "1".into());
    let views: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    let e = Model::from_safetensors_bytes(&safetensors::serialize(views, Some(old)).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("format_version"), "{e}");
}

/// Runs `ids` through a cache in the given chunk sizes (the last one repeats to the end) and
/// returns the logits rows and the hidden cells, position by position.
fn incremental(model: &Model, ids: &[u32], chunks: &[usize]) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut cache = Cache::new(model);
    let (mut logits, mut cells) = (Vec::new(), Vec::new());
    let mut at = 0;
    let mut sizes = chunks
        .iter()
        .copied()
        .chain(std::iter::repeat(*chunks.last().unwrap()));
    while at < ids.len() {
        let n = sizes.next().unwrap().min(ids.len() - at);
        assert_eq!(cache.len(), at);
        let out = cache.extend(model, &ids[at..at + n]).unwrap();
        assert_eq!(out.logits.nrows(), n);
        for r in 0..n {
            logits.push(out.logits.row(r).to_vec());
            cells.push(out.cells.iter().flat_map(|c| c.row(r).to_vec()).collect());
        }
        at += n;
    }
    (logits, cells)
}

#[test]
fn cached_decoding_gives_the_full_pass_logits() {
    let data = std::fs::read(fixture("small.safetensors")).unwrap();
    let full = Model::from_safetensors_bytes(&data).unwrap();
    let (json, bin) = golden("small");
    let case = &json["cases"][0];
    let ids: Vec<u32> = usizes(&case["ids"]).iter().map(|&i| i as u32).collect();
    let tools_end = case["tools_end_pos"].as_u64().unwrap() as usize;
    let prompt_len = case["prompt_len"].as_u64().unwrap() as usize;
    for depth in [6, 3] {
        let model = full.clone().into_ladder(depth).unwrap();
        let whole = forward(&model, &ids).unwrap();
        let run = json["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["depth"] == depth && r["weights"] == "f32" && r["case"] == 0)
            .unwrap();
        let rows = usizes(&run["logit_rows"]);
        let want_rows = block(&bin, &run["logits"]);
        let v = whole.logits.ncols();
        let argmax_want = usizes(&run["argmax"]);
        // Token by token; the tools prefix then token by token (the fold boundary); the prompt
        // then the answer; uneven chunks that cross the sliding window (16) and the conv taps.
        for chunks in [
            vec![1],
            vec![tools_end + 1, 1],
            vec![prompt_len, 7],
            vec![5, 17, 2, 33],
        ] {
            let (logits, cells) = incremental(&model, &ids, &chunks);
            let mut worst = 0f32;
            for (t, row) in logits.iter().enumerate() {
                worst = worst.max(max_rel_diff(row, &whole.logits.row(t).to_vec()));
                assert_eq!(
                    argmax(row),
                    argmax_want[t],
                    "depth {depth} {chunks:?}: argmax at {t}"
                );
                let whole_cells: Vec<f32> =
                    whole.cells.iter().flat_map(|c| c.row(t).to_vec()).collect();
                let rc = max_rel_diff(&cells[t], &whole_cells);
                assert!(
                    rc <= 1e-5,
                    "depth {depth} {chunks:?}: cells at {t} differ by {rc}"
                );
            }
            let got: Vec<f32> = rows.iter().flat_map(|&t| logits[t].clone()).collect();
            let r_golden = max_rel_diff(&got, want_rows);
            assert_eq!(got.len(), rows.len() * v);
            eprintln!(
                "depth {depth} chunks {chunks:?}: vs whole pass {worst:.2e}, vs reference {r_golden:.2e}"
            );
            // Every position's arithmetic is the same in any split (row-wise GEMM), so the
            // logits are bit-identical: what folding a prefix needs.
            assert_eq!(
                worst, 0.0,
                "depth {depth} {chunks:?}: logits differ by {worst}"
            );
            assert!(
                r_golden <= 1e-5,
                "depth {depth} {chunks:?}: vs reference {r_golden}"
            );
        }
    }
}

#[test]
fn the_cact_export_reads_as_the_reference_reads_it() {
    let data = std::fs::read(fixture("small.cact")).unwrap();
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("small_cact.json")).unwrap())
            .unwrap();
    let cact = Cact::parse(&data).unwrap();
    let hdr = &summary["header"];
    assert_eq!(
        cact.entries.len(),
        hdr["num_tensors"].as_u64().unwrap() as usize
    );
    assert_eq!(cact.codebook, f32s(&hdr["codebook"]));
    assert_eq!(cact.header.global_mask, 0b100100);
    assert_eq!(cact.header.engram_sites, [1, 3, 4]);
    let recs = summary["tensors"].as_array().unwrap();
    for (rec, e) in recs.iter().zip(&cact.entries) {
        let name = rec["name"].as_str().unwrap();
        assert_eq!(e.shape, usizes(&rec["shape"]), "{name}");
        assert_eq!(e.offset, rec["offset"].as_u64().unwrap(), "{name}");
        if e.format == Format::Raw {
            let pieces = u32::from_le_bytes(e.raw[..4].try_into().unwrap());
            assert_eq!(pieces as u64, rec["n_pieces"].as_u64().unwrap());
            continue;
        }
        let sum: f64 = e.values.iter().map(|&v| f64::from(v)).sum();
        let want = rec["sum"].as_f64().unwrap();
        let sumsq = rec["sumsq"].as_f64().unwrap();
        assert!(
            (sum - want).abs() <= 1e-5 * sumsq.max(1.0),
            "{name}: sum {sum} vs {want}"
        );
        for (&at, want) in usizes(&rec["at"]).iter().zip(f32s(&rec["values"])) {
            let got = e.values[at];
            assert!(
                (got - want).abs() <= 1e-6 * want.abs() + 1e-7,
                "{name}[{at}]: {got} vs {want}"
            );
        }
    }
}

/// A one-tensor `.cact` file: header (only the tag, count and codebook length set), the
/// codebooks, one directory record, the blob at the next 64-byte boundary.
fn one_tensor_cact(codebook: &[f32], record: [u32; 4], shape: [u32; 2], blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in [0x05E1_2A84u32, 1, codebook.len() as u32] {
        out.extend(v.to_le_bytes());
    }
    out.resize(196, 0);
    for v in codebook {
        out.extend(v.to_le_bytes());
    }
    let offset = (out.len() + 44).div_ceil(64) * 64;
    let [dtype, ndim, group, bits] = record;
    out.extend([dtype as u8, ndim as u8, 0, 0]);
    for v in [shape[0], shape[1], 0, 0] {
        out.extend(v.to_le_bytes());
    }
    out.extend((offset as u64).to_le_bytes());
    out.extend((blob.len() as u64).to_le_bytes());
    out.extend(group.to_le_bytes());
    out.extend(bits.to_le_bytes());
    out.resize(offset, 0);
    out.extend_from_slice(blob);
    out
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn every_cq_code_width_dequantizes_as_the_package_does() {
    let cq: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("cq_codes.json")).unwrap()).unwrap();
    let books = &cq["codebooks_group128"];
    let codebook: Vec<f32> = ["2", "3", "4"]
        .iter()
        .flat_map(|b| f32s(&books[*b]))
        .collect();
    let cases = cq["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let bits = case["bits"].as_u64().unwrap() as u32;
        let (rows, cols) = (
            case["out"].as_u64().unwrap() as u32,
            case["in"].as_u64().unwrap() as u32,
        );
        let group = case["group"].as_u64().unwrap() as u32;
        let mut blob = hex(case["packed_hex"].as_str().unwrap());
        blob.extend(hex(case["norms_hex"].as_str().unwrap()));
        let file = one_tensor_cact(&codebook, [3, 2, group, bits], [rows, cols], &blob);
        let cact = Cact::parse(&file).unwrap();
        let want = f32s(&case["dequantized"]);
        let got = &cact.entries[0].values;
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs() + 1e-7,
                "bits {bits} [{i}]: {g} vs {w}"
            );
        }
    }
}

#[test]
fn the_cact_model_matches_the_reference_cq4_runs() {
    let data = std::fs::read(fixture("small.cact")).unwrap();
    let model = Model::from_cact_bytes(&data).unwrap();
    let st = Model::from_safetensors_bytes(&std::fs::read(fixture("small.safetensors")).unwrap())
        .unwrap();
    assert_eq!(
        model.config, st.config,
        "the header's config is the checkpoint's"
    );
    let (json, bin) = golden("small");
    let worst = check_runs(&json, &bin, &model, "cq4", None, [1e-5; 3]);
    eprintln!("small cq4 from .cact, worst: {worst:?}");
}

#[test]
fn bad_cact_files_are_refused_with_the_reason() {
    let data = std::fs::read(fixture("small.cact")).unwrap();
    let msg = |bytes: &[u8]| Cact::parse(bytes).unwrap_err().to_string();
    assert!(
        msg(&data[..100]).contains("truncated"),
        "{}",
        msg(&data[..100])
    );
    let cut = &data[..data.len() - 5000];
    assert!(msg(cut).contains("past the file's end"), "{}", msg(cut));
    let mut bad = data.clone();
    bad[0] ^= 1;
    assert!(msg(&bad).contains("not a .cact file"));
    let dir = 196 + 28 * 4;
    // Entry 1's offset moved onto entry 0's bytes.
    let mut bad = data.clone();
    let off0 = u64::from_le_bytes(bad[dir + 20..dir + 28].try_into().unwrap());
    bad[dir + 44 + 20..dir + 44 + 28].copy_from_slice(&off0.to_le_bytes());
    assert!(msg(&bad).contains("overlap"), "{}", msg(&bad));
    let mut bad = data.clone();
    bad[dir + 20] = 1;
    assert!(msg(&bad).contains("aligned"), "{}", msg(&bad));
    let mut bad = data.clone();
    bad[dir] = 9;
    assert!(msg(&bad).contains("unknown dtype 9"), "{}", msg(&bad));
    let mut bad = data.clone();
    bad[dir + 40] = 6;
    assert!(msg(&bad).contains("code width 6"), "{}", msg(&bad));
    // Ternary: crumb 2 is no code.
    let file = one_tensor_cact(&[0.0; 28], [3, 2, 128, 5], [1, 128], &[0b10u8; 34]);
    assert!(msg(&file).contains("crumb 2"), "{}", msg(&file));
    let file = one_tensor_cact(&[0.0; 28], [3, 2, 128, 5], [1, 128], &[0; 33]);
    assert!(msg(&file).contains("take 34"), "{}", msg(&file));
}

/// The default config's cq4 runs, with the weights quantized here as the package's
/// `cq_quantize` does. A few hundred of the 121M codes sit so close to a midpoint that JAX's
/// float32 rotation and ours pick neighbouring levels (docs/needle3.md section 10), so the bound
/// is the issue's 2e-3 relative (measured: logits 1.1e-3, hidden cells 1.3e-3), with the argmax
/// still equal at every position.
#[test]
fn the_default_config_quantized_here_matches_the_reference_cq4_runs() {
    let (json, bin) = golden("default");
    let cq: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("cq_codes.json")).unwrap()).unwrap();
    let config: Config = Config::from_json(&json["config"].to_string()).unwrap();
    let mut src = CqWeights::new(
        generate::Generated {
            num_layers: config.num_layers,
        },
        128,
        f32s(&cq["codebooks_group128"]["4"]),
    );
    let model = Model::load(config, &mut src).unwrap();
    let worst = check_runs(&json, &bin, &model, "cq4", None, [2e-3, 2e-3, 1e-3]);
    eprintln!("default cq4 quantized here, worst: {worst:?}");
}

/// The v1 runtime's SentencePiece tokenizer reads the Needle 3 tokenizers (user-defined chat
/// markers included) and encodes the golden prompts to the reference's ids:
/// `[2] + enc(prompt) + enc(target) + [1]` (docs/needle3.md section 5).
#[test]
fn the_tokenizer_gives_the_reference_ids() {
    for (name, model) in [("small", "n3tok2k.model"), ("default", "n3tok8k.model")] {
        let tok = needle_runtime::tokenizer::Tokenizer::from_file(&fixture(model)).unwrap();
        let (json, _) = golden(name);
        for case in json["cases"].as_array().unwrap() {
            let mut ids = vec![2u32];
            ids.extend(tok.encode(case["prompt"].as_str().unwrap()));
            let prompt_len = ids.len();
            ids.extend(tok.encode(case["target"].as_str().unwrap()));
            ids.push(1);
            let want: Vec<u32> = usizes(&case["ids"]).iter().map(|&i| i as u32).collect();
            assert_eq!(ids, want, "{name}: {}", case["prompt"]);
            assert_eq!(prompt_len, case["prompt_len"].as_u64().unwrap() as usize);
            assert_eq!(want[case["tools_end_pos"].as_u64().unwrap() as usize], 9);
        }
    }
}

/// Greedy decoding through the cache: its first token is the reference's argmax after the
/// prompt, and every token is the argmax of a whole pass over everything before it.
#[test]
fn greedy_decoding_follows_the_whole_pass_argmax() {
    let data = std::fs::read(fixture("small.safetensors")).unwrap();
    let model = Model::from_safetensors_bytes(&data).unwrap();
    let (json, _) = golden("small");
    let case = &json["cases"][0];
    let ids: Vec<u32> = usizes(&case["ids"]).iter().map(|&i| i as u32).collect();
    let prompt_len = case["prompt_len"].as_u64().unwrap() as usize;
    let run = json["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["depth"] == 6 && r["weights"] == "f32" && r["case"] == 0)
        .unwrap();
    let new = greedy(&model, &ids[..prompt_len], 12, 1).unwrap();
    assert!(!new.is_empty() && new.len() <= 12);
    assert_eq!(new[0] as usize, usizes(&run["argmax"])[prompt_len - 1]);
    let mut all = ids[..prompt_len].to_vec();
    all.extend(&new);
    let whole = forward(&model, &all).unwrap();
    for (i, &tok) in new.iter().enumerate() {
        let row = whole.logits.row(prompt_len - 1 + i).to_vec();
        assert_eq!(argmax(&row), tok as usize, "generated token {i}");
    }
    assert!(greedy(&model, &ids[..prompt_len], 0, 1).unwrap().is_empty());
}

/// The prompt and target are rendered as the package renders them (compact JSON, non-ASCII as
/// is, the system turn only when given), and the fold split falls right after `</tools>`.
#[test]
fn prompts_render_and_split_as_the_reference_renders_them() {
    use needle_runtime::needle3::prompt::{
        encode_prompt, render_prompt, render_target, tools_json,
    };
    use needle_runtime::pyjson;
    for (name, model) in [("small", "n3tok2k.model"), ("default", "n3tok8k.model")] {
        let tok = needle_runtime::tokenizer::Tokenizer::from_file(&fixture(model)).unwrap();
        let (json, _) = golden(name);
        for case in json["cases"].as_array().unwrap() {
            let ex = &case["example"];
            let system = ex["system"].as_str().unwrap_or("");
            let tools = tools_json(&serde_json::to_string(&ex["tools"]).unwrap()).unwrap();
            let query = ex["query"].as_str().unwrap();
            assert_eq!(
                render_prompt(system, &tools, query),
                case["prompt"].as_str().unwrap()
            );
            let answers = pyjson::parse(&serde_json::to_string(&ex["answers"]).unwrap()).unwrap();
            let reasoning = ex["reasoning"].as_str().unwrap_or("");
            assert_eq!(
                render_target(reasoning, &answers),
                case["target"].as_str().unwrap()
            );
            let p = encode_prompt(&tok, system, &tools, query).unwrap();
            let prompt_len = case["prompt_len"].as_u64().unwrap() as usize;
            let want: Vec<u32> = usizes(&case["ids"])[..prompt_len]
                .iter()
                .map(|&i| i as u32)
                .collect();
            assert_eq!(p.ids, want);
            assert_eq!(
                p.prefix_len,
                case["tools_end_pos"].as_u64().unwrap() as usize + 1
            );
        }
    }
}

/// Folding the prefix changes nothing: every step's logits are bit for bit those of running
/// the whole prompt, at full depth and on a ladder depth; the answer is greedy decoding's.
#[test]
fn folded_and_unfolded_engines_give_bit_identical_logits() {
    use needle_runtime::needle3::engine::Engine;
    use needle_runtime::needle3::prompt::tools_json;
    let data = std::fs::read(fixture("small.safetensors")).unwrap();
    let tok = needle_runtime::tokenizer::Tokenizer::from_file(&fixture("n3tok2k.model")).unwrap();
    let (json, _) = golden("small");
    for depth in [6, 3] {
        for case in json["cases"].as_array().unwrap() {
            let ex = &case["example"];
            let system = ex["system"].as_str().unwrap_or("");
            let tools = tools_json(&serde_json::to_string(&ex["tools"]).unwrap()).unwrap();
            let query = ex["query"].as_str().unwrap();
            let engine = |fold| {
                let model = Model::from_safetensors_bytes(&data)
                    .unwrap()
                    .into_ladder(depth)
                    .unwrap();
                Engine::new(model, tok.clone(), system, tools.clone(), fold).unwrap()
            };
            let (folded, whole) = (engine(true), engine(false));
            assert!(folded.folded() && !whole.folded());
            let a = folded.generate(query, 8).unwrap();
            let b = whole.generate(query, 8).unwrap();
            assert_eq!(a.new_ids, b.new_ids);
            assert_eq!(a.logits.len(), b.logits.len());
            for (i, (x, y)) in a.logits.iter().zip(&b.logits).enumerate() {
                let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same, "depth {depth}, step {i}: logits differ");
            }
            assert_eq!(a.heads, b.heads);
            let greedy_ids = greedy(&whole.model, &a.prompt.ids, 8, 1).unwrap();
            assert_eq!(a.new_ids, greedy_ids);
        }
    }
}

/// Teacher forcing the golden answers through the engine, folded and not, at every depth:
/// the logits of every answer position and the heads (over the whole sequence, EOS included)
/// are the reference's within the forward pass's tolerance.
#[test]
fn forced_answers_through_the_engine_match_the_reference() {
    use needle_runtime::needle3::engine::Engine;
    use needle_runtime::needle3::prompt::tools_json;
    let data = std::fs::read(fixture("small.safetensors")).unwrap();
    let tok = needle_runtime::tokenizer::Tokenizer::from_file(&fixture("n3tok2k.model")).unwrap();
    let (json, bin) = golden("small");
    let mut checked = 0;
    for run in json["runs"].as_array().unwrap() {
        if run["weights"] != "f32" {
            continue;
        }
        let depth = run["depth"].as_u64().unwrap() as usize;
        let case = &json["cases"][run["case"].as_u64().unwrap() as usize];
        let ex = &case["example"];
        let ids: Vec<u32> = usizes(&case["ids"]).iter().map(|&i| i as u32).collect();
        let prompt_len = case["prompt_len"].as_u64().unwrap() as usize;
        let answer = &ids[prompt_len..ids.len() - 1];
        let tools = tools_json(&serde_json::to_string(&ex["tools"]).unwrap()).unwrap();
        for fold in [true, false] {
            let model = Model::from_safetensors_bytes(&data)
                .unwrap()
                .into_ladder(depth)
                .unwrap();
            let system = ex["system"].as_str().unwrap_or("");
            let engine = Engine::new(model, tok.clone(), system, tools.clone(), fold).unwrap();
            let g = engine
                .forced(ex["query"].as_str().unwrap(), answer)
                .unwrap();
            assert_eq!(g.prompt.ids, ids[..prompt_len]);
            assert_eq!(g.new_ids, ids[prompt_len..]);
            let want = block(&bin, &run["logits"]);
            let v = g.logits[0].len();
            let (mut got, mut exp) = (Vec::new(), Vec::new());
            for (k, &t) in usizes(&run["logit_rows"]).iter().enumerate() {
                if t + 1 >= prompt_len && t + 1 - prompt_len < g.logits.len() {
                    got.extend(&g.logits[t + 1 - prompt_len]);
                    exp.extend(&want[k * v..(k + 1) * v]);
                }
            }
            assert!(!got.is_empty());
            let r = max_rel_diff(&got, &exp);
            assert!(r <= 2e-3, "depth {depth} fold {fold}: logits rel {r}");
            let d =
                (g.heads.confidence.unwrap() - run["confidence"].as_f64().unwrap() as f32).abs();
            assert!(
                d <= 1e-3,
                "depth {depth} fold {fold}: confidence off by {d}"
            );
            for (a, b) in g.heads.router.unwrap().iter().zip(f32s(&run["router"])) {
                assert!((a - b).abs() <= 1e-3, "router {a} vs {b}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 12, "{checked}");
}

/// Under the strict grammar every answer closes its envelope within the budget with a call
/// list valid under the schemas (it parses, names a listed tool), folded or not alike; a budget
/// too small for the shortest envelope is refused before decoding.
#[test]
fn strict_decoding_always_closes_a_valid_envelope() {
    use needle_runtime::needle3::engine::Engine;
    use needle_runtime::needle3::prompt::tools_json;
    let data = std::fs::read(fixture("small.safetensors")).unwrap();
    let tok = needle_runtime::tokenizer::Tokenizer::from_file(&fixture("n3tok2k.model")).unwrap();
    let (json, _) = golden("small");
    for case in json["cases"].as_array().unwrap() {
        let ex = &case["example"];
        let tools = tools_json(&serde_json::to_string(&ex["tools"]).unwrap()).unwrap();
        let names: Vec<&str> = ex["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        let query = ex["query"].as_str().unwrap();
        let engine = |fold| {
            let model = Model::from_safetensors_bytes(&data).unwrap();
            Engine::new(model, tok.clone(), "", tools.clone(), fold)
                .unwrap()
                .with_strict_grammar()
                .unwrap()
        };
        let (folded, whole) = (engine(true), engine(false));
        for budget in [20, 48] {
            let g = folded.generate(query, budget).unwrap();
            assert!(g.new_ids.len() <= budget);
            assert!(g.parsed, "budget {budget}: {:?}", g.text);
            assert!(
                g.text.trim_end().ends_with("</tool_call><|im_end|>"),
                "budget {budget}: {:?}",
                g.text
            );
            let calls: Value = serde_json::from_str(&g.calls).unwrap();
            for call in calls.as_array().unwrap() {
                assert!(names.contains(&call["name"].as_str().unwrap()), "{call}");
                assert!(call["arguments"].is_object(), "{call}");
            }
            let w = whole.generate(query, budget).unwrap();
            assert_eq!(g.new_ids, w.new_ids);
        }
        let err = folded.generate(query, 3).unwrap_err().to_string();
        assert!(err.contains("--grammar strict needs at least"), "{err}");
    }
}

/// The query part tokenized alone (`encode_query`, no dummy prefix) is the whole prompt's ids
/// after `</tools>`: what lets a compiled library tokenize only the query.
#[test]
fn the_query_part_tokenizes_alone_as_within_the_prompt() {
    use needle_runtime::needle3::prompt::{encode_prompt, encode_query, tools_json};
    for model in ["n3tok2k.model", "n3tok8k.model"] {
        let tok = needle_runtime::tokenizer::Tokenizer::from_model_bytes(
            &std::fs::read(fixture(model)).unwrap(),
        )
        .unwrap();
        let continuing = tok.continuing();
        let tools =
            tools_json(r#"[{"name":"get_weather","parameters":{"location":{"type":"string"}}}]"#)
                .unwrap();
        for query in [
            "What's the weather in Paris?",
            "",
            " leading space",
            "   three leading spaces and  double  spaces ",
            "a marker <tool_call> inside</tools> and <|im_end|>",
            "\nnewline first",
            "unicode: café 東京 🙂",
            "trailing space ",
        ] {
            for system in ["", "You are a helpful assistant."] {
                let whole = encode_prompt(&tok, system, &tools, query).unwrap();
                assert_eq!(
                    encode_query(&continuing, query),
                    whole.ids[whole.prefix_len..],
                    "{model}: {query:?}"
                );
            }
        }
    }
}

/// A `.cact` export's embedding and engram tables come with their codes (a library embeds
/// those), and the codes dequantize to exactly the values the model runs on.
#[test]
fn a_cact_model_keeps_the_codes_of_its_tables() {
    let data = std::fs::read(fixture("small.cact")).unwrap();
    let model = Model::from_cact_bytes(&data).unwrap();
    let emb = model.embedding_cq.as_ref().expect("the embedding's codes");
    assert_eq!((emb.rows, emb.cols), model.embedding.dim());
    let values: Vec<f32> = model.embedding.iter().copied().collect();
    assert!(emb.dequantize() == values);
    assert!(!model.sites.is_empty());
    for site in &model.sites {
        let t = site.tables_cq.as_ref().expect("the tables' codes");
        assert!(t.dequantize() == site.tables);
    }
    // The attention and engram projections' codes, `(out, in)`: the matrices transposed.
    let transposed = |t: &needle_runtime::needle3::cq::CqTensor, m: &ndarray::Array2<f32>| {
        assert_eq!((t.cols, t.rows), m.dim());
        t.dequantize() == m.t().iter().copied().collect::<Vec<f32>>()
    };
    for layer in &model.layers {
        let cq = layer.cq.as_ref().expect("the projections' codes");
        assert!(transposed(&cq.q, &layer.wq) && transposed(&cq.k, &layer.wk));
        assert!(transposed(&cq.v, &layer.wv) && transposed(&cq.gate, &layer.wgate));
        assert!(transposed(&cq.out, &layer.wout));
        let phi = layer.mhc.phi_cq.as_ref().expect("the lanes' phi codes");
        let n = layer.mhc.phi_pre.ncols();
        let rows = |lo: usize, hi: usize| phi.rows(lo, hi);
        assert!(transposed(&rows(0, n), &layer.mhc.phi_pre));
        assert!(transposed(&rows(n, 2 * n), &layer.mhc.phi_post));
        assert!(transposed(&rows(2 * n, phi.rows), &layer.mhc.phi_res));
    }
    for site in &model.sites {
        assert!(transposed(site.key_cq.as_ref().unwrap(), &site.key_proj));
        assert!(transposed(
            site.value_cq.as_ref().unwrap(),
            &site.value_proj
        ));
    }
    let heads = [
        &model.heads.embedding,
        &model.heads.confidence,
        &model.heads.router,
    ];
    for h in heads.into_iter().flatten() {
        assert!(transposed(
            h.proj_cq.as_ref().expect("a head's proj codes"),
            &h.proj
        ));
    }
    // A ladder slice keeps the codes of the sites it keeps.
    let sliced = model.clone().into_ladder(2).unwrap();
    assert!(sliced.embedding_cq.is_some());
    assert!(sliced.sites.iter().all(|s| s.tables_cq.is_some()));
}

/// Quantizing here packs codes as a `.cact` file does, at every code width: the packed codes
/// and float16 norms read back through the file's reader give the same tensor, and
/// dequantize to `cq_quantize`'s values.
#[test]
fn codes_quantized_here_read_back_as_a_cact_blob() {
    use needle_runtime::needle3::cact::cq_quantize;
    use needle_runtime::needle3::cq::CqTensor;
    let (rows, cols, group) = (5, 40, 16);
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 3) as f32))
        .collect();
    let books: [&[f32]; 5] = [
        &[-0.2, 0.2],
        &[-0.3, -0.1, 0.0, 0.3],
        &[-0.4, -0.25, -0.1, -0.02, 0.02, 0.1, 0.25, 0.4],
        &[
            -0.5, -0.4, -0.3, -0.22, -0.15, -0.1, -0.05, -0.01, 0.01, 0.05, 0.1, 0.15, 0.22, 0.3,
            0.4, 0.5,
        ],
        &[-0.3, 0.0, 0.3],
    ];
    for levels in books {
        let t = CqTensor::encode(&values, cols, group, levels);
        let mut blob = t.packed.clone();
        blob.extend(
            t.norms
                .iter()
                .flat_map(|&n| half::f16::from_f32(n).to_le_bytes()),
        );
        let back = CqTensor::from_blob(&blob, rows, cols, group, t.bits, levels).unwrap();
        assert_eq!(back, t, "{} levels", levels.len());
        assert!(t.dequantize() == cq_quantize(&values, cols, group, levels));
        // Every code is one of the levels' (ternary: never crumb 2).
        for r in 0..rows {
            for k in 0..t.padded_cols() {
                let code = t.code(r, k);
                assert!(code < t.code_levels.len() && !(t.bits == 5 && code == 2));
            }
        }
    }
}
