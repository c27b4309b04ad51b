//! The `needlec` command line, run as a user would: outputs on the bundled model, the trace and
//! tokenize views, and the exit status and message of bad input.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use needle_test_support::{golden, tiny_needle, work_dir};

fn example(name: &str) -> String {
    tiny_needle(name).to_str().unwrap().to_string()
}

fn needlec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_needlec"))
        .args(args)
        .output()
        .expect("needlec runs")
}

/// `needlec run` on `checkpoint`, a file of the bundled example, with the example's tool list
/// and tokenizer, then `extra` arguments.
fn run_example(checkpoint: &str, query: &str, extra: &[&str]) -> Output {
    let (ckpt, tools, tok) = (
        example(checkpoint),
        example("tools.json"),
        example("tokenizer.model"),
    );
    let mut args = run_args(&ckpt, &tools, &tok, query);
    args.extend(extra);
    needlec(&args)
}

fn run_args<'a>(
    checkpoint: &'a str,
    tools: &'a str,
    tokenizer: &'a str,
    query: &'a str,
) -> Vec<&'a str> {
    vec![
        "run",
        "--checkpoint",
        checkpoint,
        "--tokenizer",
        tokenizer,
        "--tools",
        tools,
        "--query",
        query,
    ]
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "needlec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn run_prints_the_reference_output_newline_terminated() {
    let out = run_example(
        "tiny-needle-folded.pkl",
        "I need an alarm at 11:50 AM for stretching",
        &[],
    );
    assert_eq!(
        stdout(&out),
        "[{\"name\":\"set_alarm\",\"arguments\":{\"time\":\"11:50 AM\",\"label\":\"stretching\"}}]\n"
    );
}

#[test]
fn run_accepts_inline_tools_and_restores_original_names() {
    // The tool is declared in camelCase; the model sees `set_timer` and the user gets `setTimer` back.
    let tools = std::fs::read_to_string(example("tools.json"))
        .unwrap()
        .replace("\"set_timer\"", "\"setTimer\"");
    let (ckpt, tok) = (
        example("tiny-needle-folded.pkl"),
        example("tokenizer.model"),
    );
    let out = needlec(&run_args(
        &ckpt,
        tools.trim_start(),
        &tok,
        "Remind me in 8 minutes with a timer",
    ));
    assert_eq!(
        stdout(&out),
        "[{\"name\":\"setTimer\",\"arguments\":{\"minutes\":8}}]\n"
    );
}

#[test]
fn folding_a_full_attention_checkpoint_warns_once() {
    let out = run_example(
        "tiny-needle.pkl",
        "Remind me in 8 minutes with a timer",
        &["--fold", "tools"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success());
    assert_eq!(stderr.matches("warning:").count(), 1, "{stderr}");
    assert!(stderr.contains("differ from the reference"), "{stderr}");
}

#[test]
fn trace_reports_forced_decoder_positions() {
    let (ckpt, tools, tok) = (
        example("tiny-needle-folded.pkl"),
        example("tools.json"),
        example("tokenizer.model"),
    );
    let answer = r#"[{"name":"set_timer","arguments":{"minutes":8}}]"#;
    let mut args = run_args(&ckpt, &tools, &tok, "Remind me in 8 minutes with a timer");
    args[0] = "trace";
    args.extend(["--answer", answer]);
    let trace: serde_json::Value = serde_json::from_str(&stdout(&needlec(&args))).unwrap();
    let dec_ids = trace["dec_ids"].as_array().unwrap();
    assert_eq!(dec_ids[..2], [serde_json::json!(1), serde_json::json!(4)]);
    let steps = trace["steps"].as_array().unwrap();
    assert_eq!(steps.len(), dec_ids.len());
    // A trained model predicts the forced answer: each step's top-1 is the next forced token.
    for (i, step) in steps.iter().enumerate() {
        let top = step["top"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        let want = dec_ids.get(i + 1).and_then(|v| v.as_u64()).unwrap_or(1);
        assert_eq!(top[0][0].as_u64().unwrap(), want, "step {i}");
    }
    // The grammar constrains the tool name right after `"name":"`.
    assert!(steps
        .iter()
        .any(|s| s["grammar_active"] == true && s["allowed"].as_u64().unwrap() > 0));
    let n_query = trace["n_query_tokens"].as_u64().unwrap() as usize;
    assert_eq!(trace["enc_ids"][n_query], 5, "<tools> follows the query");
}

#[test]
fn tokenize_reads_json_lines() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_needlec"))
        .args([
            "tokenize",
            "--tokenizer",
            golden("dev4k.model").to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"\"set a timer for 10 minutes\"\n\"\"\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    // ids from the reference's tok_dev4k.json
    assert_eq!(stdout(&out), "[432,298,465,406,2189,463]\n[]\n");
}

/// `tokenizer export` writes the Hugging Face form; `--tokenizer` reads it back with the golden
/// ids (the `tokenizers` crate's side of the round trip is in `tests/tests/hf_tokenizer.rs`), and
/// exporting a file that is already a tokenizer.json is refused with the reason.
#[test]
fn tokenizer_export_round_trips_through_tokenize() {
    let dir = work_dir("cli-tokenizer-export");
    let json = dir.join("tokenizer.json");
    let json_arg = json.to_str().unwrap();
    let model = golden("dev4k.model");
    let out = needlec(&[
        "tokenizer",
        "export",
        "--tokenizer",
        model.to_str().unwrap(),
        "-o",
        json_arg,
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = std::fs::read_to_string(&json).unwrap();
    assert!(text.contains("\"ignore_merges\": true"), "{text:.200}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_needlec"))
        .args(["tokenize", "--tokenizer", json_arg])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"\"set a timer for 10 minutes\"\n\"<tool_call>\"\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "[432,298,465,406,2189,463]\n[3981,4]\n");
    let again = dir.join("again.json");
    let out = needlec(&[
        "tokenizer",
        "export",
        "--tokenizer",
        json_arg,
        "-o",
        again.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("loaded from a tokenizer.json"),
        "{}",
        stderr_of(&out)
    );
    assert!(!again.exists());
}

#[cfg(unix)]
#[test]
fn invalid_utf8_query_is_refused() {
    use std::os::unix::ffi::OsStrExt;
    let out = Command::new(env!("CARGO_BIN_EXE_needlec"))
        .args([
            "run",
            "--checkpoint",
            &example("tiny-needle.pkl"),
            "--tokenizer",
            &example("tokenizer.model"),
        ])
        .args(["--tools", &example("tools.json"), "--query"])
        .arg(std::ffi::OsStr::from_bytes(b"timer \xff\xfe"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--query is not valid UTF-8"), "{stderr}");
}

#[test]
fn oversized_tool_list_is_refused_with_the_budget() {
    let desc = "word ".repeat(1200);
    let tools = format!(r#"[{{"name":"big","description":"{desc}","parameters":{{}}}}]"#);
    let (ckpt, tok) = (example("tiny-needle.pkl"), example("tokenizer.model"));
    let out = needlec(&run_args(&ckpt, &tools, &tok, "hi"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("leaves no room for a query in the 1024-token encoder budget"),
        "{stderr}"
    );
}

#[test]
fn missing_checkpoint_names_the_path() {
    let (tools, tok) = (example("tools.json"), example("tokenizer.model"));
    let out = needlec(&run_args("/nonexistent/needle.pkl", &tools, &tok, "hi"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("/nonexistent/needle.pkl"),
        "{stderr}"
    );
}

#[test]
fn inspect_and_convert_round_trip() {
    let dir = work_dir("cli-convert");
    let st = dir.join("tiny.safetensors");
    let out = needlec(&[
        "convert",
        &example("tiny-needle-folded.pkl"),
        "-o",
        st.to_str().unwrap(),
    ]);
    stdout(&out);
    let from_pkl = stdout(&needlec(&["inspect", &example("tiny-needle-folded.pkl")]));
    let from_st = stdout(&needlec(&["inspect", st.to_str().unwrap()]));
    assert_eq!(
        from_pkl, from_st,
        "the converted file holds the same config and tensors"
    );
    assert!(from_pkl.contains("isolated"), "{from_pkl}");
    // The converted checkpoint answers like the original.
    let (tools, tok) = (example("tools.json"), example("tokenizer.model"));
    let q = "Remind me in 8 minutes with a timer";
    let a = stdout(&needlec(&run_args(
        &example("tiny-needle-folded.pkl"),
        &tools,
        &tok,
        q,
    )));
    let b = stdout(&needlec(&run_args(st.to_str().unwrap(), &tools, &tok, q)));
    assert_eq!(a, b);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn unsupported_targets_are_refused_before_any_work() {
    for triple in [
        "riscv32gc-unknown-linux-gnu",
        "armv7-unknown-linux-gnueabihf",
        "i686-unknown-linux-gnu",
        "wasm32-unknown-unknown",
    ] {
        // The checkpoint does not exist: the target must be refused before anything is read.
        let out = needlec(&[
            "build",
            "--checkpoint",
            "/nonexistent.pkl",
            "--tokenizer",
            "/nonexistent.model",
            "--tools",
            "[]",
            "--target",
            triple,
            "--out-dir",
            "/tmp/needlec-never",
        ]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("target `{triple}` is not supported")),
            "{stderr}"
        );
        assert!(
            stderr.contains("Cranelift has no code generator"),
            "{stderr}"
        );
        assert!(
            stderr.contains("aarch64-linux-android")
                && stderr.contains("riscv64gc-unknown-linux-gnu"),
            "{stderr}"
        );
        assert!(!stderr.contains("nonexistent"), "{stderr}");
    }
}

#[test]
fn targets_lists_every_triple_with_its_options() {
    let out = stdout(&needlec(&["targets"]));
    for triple in [
        "x86_64-unknown-linux-gnu",
        "x86_64-apple-darwin",
        "x86_64-pc-windows-msvc",
        "aarch64-unknown-linux-gnu",
        "aarch64-linux-android",
        "aarch64-apple-darwin",
        "aarch64-apple-ios",
        "riscv64gc-unknown-linux-gnu",
    ] {
        assert!(out.contains(triple), "{triple} missing:\n{out}");
    }
    assert!(
        out.contains("x86-64-v3") && out.contains("dotprod") && out.contains("--features: v,"),
        "{out}"
    );
}

#[test]
fn unknown_cpu_and_feature_are_named() {
    let base = [
        "build",
        "--checkpoint",
        "/x.pkl",
        "--tokenizer",
        "/x.model",
        "--tools",
        "[]",
        "--out-dir",
        "/tmp/n",
    ];
    let mut args = base.to_vec();
    args.extend([
        "--target",
        "aarch64-unknown-linux-gnu",
        "--features",
        "avx2",
    ]);
    let stderr = String::from_utf8(needlec(&args).stderr).unwrap();
    assert!(
        stderr.contains("unknown feature `avx2`") && stderr.contains("dotprod"),
        "{stderr}"
    );
    let mut args = base.to_vec();
    args.extend(["--target", "x86_64-unknown-linux-gnu", "--cpu", "pentium"]);
    let stderr = String::from_utf8(needlec(&args).stderr).unwrap();
    assert!(
        stderr.contains("unknown --cpu `pentium`") && stderr.contains("x86-64-v3"),
        "{stderr}"
    );
}

/// A golden fixture's path as an argument.
fn golden_arg(name: &str) -> String {
    golden(name).to_str().unwrap().to_string()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes a float32 random checkpoint of `config` (a `needlec synth --config` value) and returns
/// its path (in a directory of its own: another test removes its scratch directory when done).
fn synth(config: &str, file: &str) -> String {
    let dir = std::env::temp_dir().join(format!("needlec-cli-synth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(file).to_str().unwrap().to_string();
    stdout(&needlec(&["synth", "--config", config, "-o", &path]));
    path
}

#[test]
fn weights_give_the_references_quantized_answers() {
    // A golden case whose int4 answer differs from both the checkpoint's own weights' and int8's,
    // with no near-tie in any of the three.
    let case = |file: &str| -> serde_json::Value {
        let all: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(golden_arg(file)).unwrap()).unwrap();
        all[2].clone()
    };
    let (ckpt, tok) = (golden_arg("small_random.pkl"), golden_arg("dev4k.model"));
    let mut outputs = Vec::new();
    for (weights, file) in [
        (None, "greedy_small.json"),
        (Some("f16"), "greedy_small.json"),
        (Some("int8"), "greedy_small_int8.json"),
        (Some("int4"), "greedy_small_int4.json"),
    ] {
        let want = case(file);
        assert_eq!(want["mode"], "exact");
        let mut args = run_args(
            &ckpt,
            want["tools"].as_str().unwrap(),
            &tok,
            want["query"].as_str().unwrap(),
        );
        args.extend(["--max-gen-len", "40"]);
        if let Some(w) = weights {
            args.extend(["--weights", w]);
        }
        let out = needlec(&args);
        assert_eq!(
            stdout(&out),
            format!("{}\n", want["output"].as_str().unwrap()),
            "--weights {weights:?}"
        );
        assert!(
            !stderr_of(&out).contains("warning"),
            "no rounding of a float16 checkpoint"
        );
        outputs.push(stdout(&out));
    }
    assert_ne!(outputs[0], outputs[3], "int4 changes this answer");
    assert_ne!(outputs[2], outputs[3], "int4 and int8 differ");
}

#[test]
fn trace_takes_the_weights_too() {
    let (ckpt, tools, tok) = (
        example("tiny-needle-folded.pkl"),
        example("tools.json"),
        example("tokenizer.model"),
    );
    let top_logit = |weights: &str| {
        let mut args = run_args(&ckpt, &tools, &tok, "Remind me in 8 minutes with a timer");
        args[0] = "trace";
        args.extend(["--weights", weights]);
        let trace: serde_json::Value = serde_json::from_str(&stdout(&needlec(&args))).unwrap();
        trace["steps"][0]["top"][0][1].as_f64().unwrap()
    };
    assert_eq!(top_logit("f16"), top_logit("f32"), "lossless for float16");
    assert_ne!(
        top_logit("f16"),
        top_logit("int4"),
        "int4 changes the logits"
    );
}

#[test]
fn unknown_weights_are_refused_with_the_choices() {
    let out = run_example("tiny-needle.pkl", "hi", &["--weights", "int2"]);
    assert!(!out.status.success());
    let stderr = stderr_of(&out);
    assert!(
        stderr.contains("unknown weight format `int2`")
            && stderr.contains("f32, f16, int8 or int4"),
        "{stderr}"
    );
}

#[test]
fn f16_rounding_a_float32_checkpoint_warns_once() {
    let ckpt = synth("tiny", "tiny-f32.safetensors");
    let tok = golden_arg("dev4k.model");
    let tools = r#"[{"name":"set_timer","description":"Start a timer.","parameters":{}}]"#;
    let mut args = run_args(&ckpt, tools, &tok, "set a timer");
    args.extend(["--max-gen-len", "4"]);
    let plain = needlec(&args);
    stdout(&plain);
    assert!(
        !stderr_of(&plain).contains("warning"),
        "the default is f32 for a float32 checkpoint: {}",
        stderr_of(&plain)
    );
    args.extend(["--weights", "f16"]);
    let out = needlec(&args);
    stdout(&out);
    let stderr = stderr_of(&out);
    assert_eq!(stderr.matches("warning:").count(), 1, "{stderr}");
    assert!(
        stderr.contains("rounds this checkpoint's float32"),
        "{stderr}"
    );
}

#[test]
fn a_kernel_with_an_empty_input_axis_cannot_be_quantized() {
    // d_model 2 makes the contrastive head's second kernel (d_model / 4 = 0 rows, 128 columns).
    let ckpt = synth(
        r#"{"d_model":2,"num_heads":1,"num_kv_heads":1,"vocab_size":4096,"num_encoder_layers":1,"num_decoder_layers":1}"#,
        "d2.safetensors",
    );
    let tok = golden_arg("dev4k.model");
    let tools = r#"[{"name":"ping","description":"Ping.","parameters":{}}]"#;
    let mut args = run_args(&ckpt, tools, &tok, "hi");
    args.extend(["--max-gen-len", "3"]);
    stdout(&needlec(&args));
    args.extend(["--weights", "int4"]);
    let out = needlec(&args);
    assert!(!out.status.success());
    let stderr = stderr_of(&out);
    assert!(
        stderr.contains("`contrastive_proj/kernel` has shape [0, 128]")
            && stderr.contains("input axis")
            && stderr.contains("use --weights f32 or f16"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("contrastive_proj").count(),
        1,
        "said once: {stderr}"
    );
}

#[test]
fn max_query_tokens_of_zero_or_above_the_limit_is_refused() {
    let (ckpt, tools, tok) = (
        example("tiny-needle-folded.pkl"),
        example("tools.json"),
        example("tokenizer.model"),
    );
    let mut args = run_args(&ckpt, &tools, &tok, "hi");
    args.extend(["--max-query-tokens", "0"]);
    let stderr = stderr_of(&needlec(&args));
    assert!(
        stderr.contains("--max-query-tokens must be at least 1"),
        "{stderr}"
    );
    let mut args = run_args(&ckpt, &tools, &tok, "hi");
    args.extend(["--max-query-tokens", "1023"]);
    let out = needlec(&args);
    assert!(!out.status.success());
    let stderr = stderr_of(&out);
    // The 6-tool list takes 309 tokens: 1024 - 1 - 309 = 714 are left for the query.
    assert!(
        stderr.contains("--max-query-tokens 1023 is above this model's limit of 714")
            && stderr.contains("use at most 714"),
        "{stderr}"
    );
    let mut args = run_args(&ckpt, &tools, &tok, "hi");
    args.extend(["--max-query-tokens", "714"]);
    stdout(&needlec(&args));
}

/// `build --max-query-tokens` takes the same checks as `run`'s, and prints the workspace the
/// bound gives.
#[test]
fn build_max_query_tokens_of_zero_or_above_the_limit_is_refused() {
    let dir = std::env::temp_dir().join(format!("needlec-cli-mqt-{}", std::process::id()));
    let (ckpt, tools, tok) = (
        example("tiny-needle-folded.pkl"),
        example("tools.json"),
        example("tokenizer.model"),
    );
    let build = |bound: &str| {
        needlec(&[
            "build",
            "--checkpoint",
            &ckpt,
            "--tokenizer",
            &tok,
            "--tools",
            &tools,
            "--max-query-tokens",
            bound,
            "--emit",
            "header",
            "--out-dir",
            dir.to_str().unwrap(),
        ])
    };
    let out = build("0");
    assert!(!out.status.success());
    let stderr = stderr_of(&out);
    assert!(
        stderr.contains("--max-query-tokens must be at least 1"),
        "{stderr}"
    );
    assert!(!dir.join("needle.h").exists(), "nothing written");
    let out = build("715");
    assert!(!out.status.success());
    let stderr = stderr_of(&out);
    // The 6-tool list takes 309 tokens: 1024 - 1 - 309 = 714 are left for the query.
    assert!(
        stderr.contains("--max-query-tokens 715 is above this model's limit of 714")
            && stderr.contains("use at most 714"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let out = build("40");
    let stderr = stderr_of(&out);
    assert!(out.status.success(), "{stderr}");
    let header = std::fs::read_to_string(dir.join("needle.h")).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        header.contains("#define NEEDLE_MAX_QUERY_TOKENS ((size_t)40)"),
        "{header}"
    );
    let size = header
        .split("#define NEEDLE_WORKSPACE_SIZE ((size_t)")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap();
    assert!(
        stderr.contains("40 query tokens at most")
            && stderr.contains(&format!("workspace {size} bytes")),
        "{stderr}"
    );
}

/// `--escalate-below` takes a confidence in [0, 1]: anything else is refused before any work,
/// with what is wrong and what to pass; a valid one lands in the header.
#[test]
fn build_escalate_below_outside_zero_to_one_is_refused() {
    let dir = std::env::temp_dir().join(format!("needlec-cli-esc-{}", std::process::id()));
    let (ckpt, tools, tok) = (
        example("tiny-needle-folded.pkl"),
        example("tools.json"),
        example("tokenizer.model"),
    );
    let build = |t: &str| {
        needlec(&[
            "build",
            "--checkpoint",
            &ckpt,
            "--tokenizer",
            &tok,
            "--tools",
            &tools,
            &format!("--escalate-below={t}"),
            "--emit",
            "header",
            "--out-dir",
            dir.to_str().unwrap(),
        ])
    };
    for bad in ["1.5", "-0.1", "NaN", "inf"] {
        let out = build(bad);
        assert!(!out.status.success(), "{bad} accepted");
        let stderr = stderr_of(&out);
        assert!(
            stderr.contains("--escalate-below must be a confidence between 0 and 1")
                && stderr.contains(&format!("got {}", bad.parse::<f64>().unwrap())),
            "{bad}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!dir.join("needle.h").exists(), "nothing written for {bad}");
    }
    let out = build("high");
    assert!(!out.status.success());
    let stderr = stderr_of(&out);
    assert!(
        stderr.contains("invalid value 'high' for '--escalate-below <T>'"),
        "{stderr}"
    );
    let out = build("0.875");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let header = std::fs::read_to_string(dir.join("needle.h")).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        header.contains("#define NEEDLE_ESCALATE_BELOW 0.875f"),
        "{header}"
    );
    assert!(
        header.contains("    float escalate_below;\n")
            && header.contains("typedef struct needle_result {")
            && header.contains("size_t *out_len, needle_result *result);"),
        "{header}"
    );
}

#[test]
fn max_query_tokens_cuts_folded_queries_and_refuses_exact_ones() {
    let (tools, tok) = (example("tools.json"), example("tokenizer.model"));
    let query = "I need an alarm at 11:50 AM for stretching"; // 10 tokens
    let trace = |ckpt: &str, fold: &str, bound: &str| {
        let mut args = run_args(ckpt, &tools, &tok, query);
        args[0] = "trace";
        args.extend(["--fold", fold, "--max-query-tokens", bound]);
        needlec(&args)
    };
    let folded = example("tiny-needle-folded.pkl");
    let cut: serde_json::Value =
        serde_json::from_str(&stdout(&trace(&folded, "tools", "4"))).unwrap();
    assert_eq!(cut["n_query_tokens"], 4);
    assert_eq!(cut["enc_ids"][4], 5, "<tools> right after the cut query");
    let whole: serde_json::Value =
        serde_json::from_str(&stdout(&trace(&folded, "tools", "10"))).unwrap();
    assert_eq!(whole["n_query_tokens"], 10);

    let stock = example("tiny-needle.pkl");
    let out = trace(&stock, "none", "9");
    assert!(!out.status.success());
    let stderr = stderr_of(&out);
    assert!(
        stderr.contains("the query is 10 tokens, more than the 9") && stderr.contains("refuses"),
        "{stderr}"
    );
    // Within the bound, exact mode answers exactly as without it.
    let bounded: serde_json::Value =
        serde_json::from_str(&stdout(&trace(&stock, "none", "10"))).unwrap();
    let mut args = run_args(&stock, &tools, &tok, query);
    args[0] = "trace";
    let free: serde_json::Value = serde_json::from_str(&stdout(&needlec(&args))).unwrap();
    assert_eq!(bounded, free);
}

/// `--emit ir` writes the IR after every stage; the last, what codegen compiles, carries the
/// workspace plan as comments, and still reads back as a module that verifies.
#[test]
fn emit_ir_shows_every_stage_and_the_workspace_plan() {
    let dir = std::env::temp_dir().join(format!("needlec-cli-ir-{}", std::process::id()));
    let out = needlec(&[
        "build",
        "--checkpoint",
        &example("tiny-needle-folded.pkl"),
        "--tokenizer",
        &example("tokenizer.model"),
        "--tools",
        &example("tools.json"),
        "--emit",
        "ir",
        "--out-dir",
        dir.to_str().unwrap(),
    ]);
    stdout(&out);
    let text = std::fs::read_to_string(dir.join("needle.ir")).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let stages: Vec<(&str, &str)> = text
        .split("; ---- after ")
        .skip(1)
        .map(|s| s.split_once('\n').unwrap())
        .collect();
    let names: Vec<&str> = stages.iter().map(|s| s.0).collect();
    assert_eq!(
        names,
        [
            "lowered",
            "fold-constants",
            "fuse-norm-matmul",
            "dead-weight-elim"
        ]
    );
    for (i, (name, ir)) in stages.iter().enumerate() {
        let planned = ir.contains("# workspace plan of the model: ");
        assert_eq!(planned, i == stages.len() - 1, "{name}");
        let m = needle_ir::parse(ir).unwrap_or_else(|e| panic!("{name}: {e}"));
        needle_ir::verify(&m).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let last = stages.last().unwrap().1;
    assert!(
        last.contains("  # %allowed: the caller's memory\n"),
        "{last}"
    );
    assert!(last.contains(": i32[1]  # returned, no memory\n"), "{last}");
}

/// `--emit rust` writes `NAME.rs` beside the header, its constants the header's macros (the
/// crate in examples/rust compiles, links and runs the same binding).
#[test]
fn emit_rust_writes_a_binding_whose_limits_are_the_headers() {
    let dir = std::env::temp_dir().join(format!("needlec-cli-rust-{}", std::process::id()));
    let out = needlec(&[
        "build",
        "--checkpoint",
        &example("tiny-needle-folded.pkl"),
        "--tokenizer",
        &example("tokenizer.model"),
        "--tools",
        &example("tools.json"),
        "--name",
        "assistant",
        "--max-gen-len",
        "64",
        "--emit",
        "header",
        "--emit",
        "rust",
        "--out-dir",
        dir.to_str().unwrap(),
    ]);
    stdout(&out);
    let header = std::fs::read_to_string(dir.join("assistant.h")).unwrap();
    let binding = std::fs::read_to_string(dir.join("assistant.rs")).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    for limit in [
        "WORKSPACE_SIZE",
        "MAX_QUERY_BYTES",
        "MAX_QUERY_TOKENS",
        "MAX_GEN_LEN",
        "MAX_OUTPUT_BYTES",
    ] {
        let value = header
            .split(&format!("#define ASSISTANT_{limit} ((size_t)"))
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .unwrap_or_else(|| panic!("{limit} in the header"));
        assert!(
            binding.contains(&format!("pub const {limit}: usize = {value};")),
            "{limit} = {value}:\n{binding}"
        );
    }
    assert!(binding.contains("#[link(name = \"assistant\", kind = \"static\")]"));
    assert!(binding.contains("pub fn assistant_call_ex("));
    assert!(binding.contains("pub const TOOL_NAMES: &[&str] = &[\n    \"get_weather\",\n"));
}

#[test]
fn unknown_weight_format_is_refused_with_the_choices() {
    let out = needlec(&[
        "build",
        "--checkpoint",
        "/nonexistent.pkl",
        "--tokenizer",
        "/nonexistent.model",
        "--tools",
        "[]",
        "--weights",
        "int2",
        "--out-dir",
        "/tmp/needlec-never",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown weight format `int2`")
            && stderr.contains("f32, f16, int8 or int4"),
        "{stderr}"
    );
    assert!(!stderr.contains("nonexistent"), "{stderr}");
}
