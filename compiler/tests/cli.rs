//! The `needlec` command line, run as a user would: outputs on the bundled model, the trace and
//! tokenize views, and the exit status and message of bad input.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn example(name: &str) -> String {
    root()
        .join("examples/tiny-needle")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

fn needlec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_needlec"))
        .args(args)
        .output()
        .expect("needlec runs")
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
    let (ckpt, tools, tok) = (
        example("tiny-needle-folded.pkl"),
        example("tools.json"),
        example("tokenizer.model"),
    );
    let out = needlec(&run_args(
        &ckpt,
        &tools,
        &tok,
        "I need an alarm at 11:50 AM for stretching",
    ));
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
    let (ckpt, tools, tok) = (
        example("tiny-needle.pkl"),
        example("tools.json"),
        example("tokenizer.model"),
    );
    let mut args = run_args(&ckpt, &tools, &tok, "Remind me in 8 minutes with a timer");
    args.extend(["--fold", "tools"]);
    let out = needlec(&args);
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
    let golden = root().join("tests/fixtures/golden");
    let mut child = Command::new(env!("CARGO_BIN_EXE_needlec"))
        .args([
            "tokenize",
            "--tokenizer",
            golden.join("dev4k.model").to_str().unwrap(),
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
    let dir = std::env::temp_dir().join(format!("needlec-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
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
        stderr.contains("unknown weight format \"int2\": use one of f32, f16, int8, int4"),
        "{stderr}"
    );
    assert!(!stderr.contains("nonexistent"), "{stderr}");
}
