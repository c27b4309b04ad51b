//! Needle 3 checkpoints through the command line: `inspect` of both file formats, `run` folded
//! and unfolded (the same answer), `--layers`, `--system`, and clear refusals where Needle 3 is
//! not taken yet or an option does not fit the checkpoint.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(name: &str) -> String {
    needle_test_support::repo_root()
        .join("tests/fixtures/needle3")
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

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "needlec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails_with(out: &Output, message: &str) {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(message), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
}

/// The golden cases' first tool list, as a file.
fn tools_file(test: &str) -> PathBuf {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("small.json")).unwrap()).unwrap();
    let path = std::env::temp_dir().join(format!(
        "needlec-n3-tools-{test}-{}.json",
        std::process::id()
    ));
    std::fs::write(
        &path,
        serde_json::to_string(&json["cases"][0]["example"]["tools"]).unwrap(),
    )
    .unwrap();
    path
}

#[test]
fn inspect_describes_both_needle3_formats() {
    let st = ok(&needlec(&["inspect", &fixture("small.safetensors")]));
    assert!(
        st.starts_with("generation: Needle 3 (safetensors)\n"),
        "{st}"
    );
    assert!(st.contains("  num_layers      6\n"), "{st}");
    assert!(st.contains("depth: 6 layers; ladder depths 2 to 6"), "{st}");
    assert!(
        st.lines()
            .any(|l| l.starts_with("embedding/embedding ") && l.contains("[2048, 128]")),
        "{st}"
    );
    let cact = ok(&needlec(&["inspect", &fixture("small.cact")]));
    assert!(
        cact.starts_with("generation: Needle 3 (.cact export)\n"),
        "{cact}"
    );
    assert!(cact.contains("cq4, group"), "{cact}");
    assert!(cact.contains(" f16 "), "{cact}");
}

#[test]
fn run_answers_the_same_folded_and_unfolded_at_any_depth() {
    let tools = tools_file("run");
    let run = |ckpt: &str, extra: &[&str]| {
        let tok = fixture_tok();
        let args = [
            "run",
            "--checkpoint",
            ckpt,
            "--tokenizer",
            &tok,
            "--tools",
            tools.to_str().unwrap(),
            "--query",
            "What's the weather in Paris?",
            "--system",
            "You are a helpful on-device assistant.",
            "--max-gen-len",
            "12",
            "--confidence",
        ];
        ok(&needlec(&[args.as_slice(), extra].concat()))
    };
    for ckpt in [fixture("small.safetensors"), fixture("small.cact")] {
        let folded = run(&ckpt, &[]);
        assert_eq!(folded, run(&ckpt, &["--fold", "none"]), "{ckpt}");
        assert_eq!(folded.lines().count(), 2, "{folded}");
        let details: serde_json::Value =
            serde_json::from_str(folded.lines().nth(1).unwrap()).unwrap();
        let p = details["confidence"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p), "{details}");
        assert_eq!(details["router"].as_array().unwrap().len(), 3);
        assert!(details["generated_tokens"].as_u64().unwrap() <= 11);
        let shallow = run(&ckpt, &["--layers", "3"]);
        assert_eq!(shallow, run(&ckpt, &["--layers", "3", "--fold", "none"]));
        assert_ne!(shallow, folded, "depth 3 is another model");
    }
    std::fs::remove_file(tools).ok();
}

fn fixture_tok() -> String {
    fixture("n3tok2k.model")
}

#[test]
fn bad_needle3_requests_get_one_clear_error() {
    let tools_path = tools_file("bad");
    let tools = tools_path.to_str().unwrap();
    let (cact, tok) = (fixture("small.cact"), fixture_tok());
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--checkpoint",
            &cact,
            "--tokenizer",
            &tok,
            "--tools",
            tools,
            "--query",
            "hi",
        ];
        args.extend(extra);
        needlec(&args)
    };
    fails_with(
        &run(&["--layers", "9"]),
        "ladder depth 9 is out of range: a model of 6 layers runs at 2 to 6",
    );
    fails_with(
        &run(&["--weights", "int4"]),
        "not yet supported for Needle 3",
    );
    let v1_tok = needle_test_support::tiny_needle("tokenizer.model");
    fails_with(
        &needlec(&[
            "run",
            "--checkpoint",
            &cact,
            "--tokenizer",
            v1_tok.to_str().unwrap(),
            "--tools",
            tools,
            "--query",
            "hi",
        ]),
        "is not a Needle 3 tokenizer: id 4 is",
    );
    let build = |extra: &[&str]| {
        let mut args = vec![
            "build",
            "--checkpoint",
            &cact,
            "--tokenizer",
            &tok,
            "--tools",
            tools,
            "--out-dir",
            "/tmp/needlec-n3-never",
        ];
        args.extend(extra);
        needlec(&args)
    };
    fails_with(
        &build(&["--weights", "int4"]),
        "a Needle 3 build does not take --weights int4",
    );
    fails_with(
        &build(&["--grammar", "strict", "--max-gen-len", "4"]),
        "raise --max-gen-len",
    );
    fails_with(
        &build(&["--max-gen-len", "64", "--max-query-tokens", "4"]),
        "a Needle 3 build does not take --max-query-tokens 4: the model reads 512 positions",
    );
    fails_with(
        &build(&[]),
        "leaves 0 for the query part, and its markup alone is 6; give a smaller --max-gen-len",
    );
    fails_with(
        &build(&["--layers", "9"]),
        "ladder depth 9 is out of range: a model of 6 layers runs at 2 to 6",
    );
    let v1 = needle_test_support::tiny_needle("tiny-needle.pkl");
    let v1_tools = needle_test_support::tiny_needle("tools.json");
    fails_with(
        &needlec(&[
            "run",
            "--checkpoint",
            v1.to_str().unwrap(),
            "--tokenizer",
            v1_tok.to_str().unwrap(),
            "--tools",
            v1_tools.to_str().unwrap(),
            "--query",
            "hi",
            "--layers",
            "2",
        ]),
        "--system and --layers are for Needle 3 checkpoints",
    );
    std::fs::remove_file(&tools_path).ok();
}

/// `trace` teacher-forces an answer through the prompt, folded or not, with the same steps.
#[test]
fn build_writes_a_needle3_library_and_its_header() {
    let tools_path = tools_file("build");
    let out_dir = std::env::temp_dir().join(format!("needlec-n3-build-{}", std::process::id()));
    let out = needlec(&[
        "build",
        "--checkpoint",
        &fixture("small.cact"),
        "--tokenizer",
        &fixture_tok(),
        "--tools",
        tools_path.to_str().unwrap(),
        "--max-gen-len",
        "64",
        "--layers",
        "3",
        "--system",
        "Be brief.",
        "--name",
        "assistant",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Needle 3 (3 layers), --fold tools"),
        "{stderr}"
    );
    let header = std::fs::read_to_string(out_dir.join("assistant.h")).unwrap();
    for decl in [
        "int32_t assistant_call(void *workspace,",
        "int32_t assistant_call_ex(",
        "assistant_result *result);",
        "int32_t assistant_call_tokens(",
        "int32_t assistant_embed(",
        "void assistant_model_info(assistant_info *info);",
        "#define ASSISTANT_FOLD_TOOLS 1",
        "float router[3];",
    ] {
        assert!(header.contains(decl), "{decl} missing:\n{header}");
    }
    assert!(out_dir.join("libassistant.a").is_file());
    // The Apple targets as one XCFramework; v1-only outputs are refused by name.
    let xc = needlec(&[
        "build",
        "--checkpoint",
        &fixture("small.safetensors"),
        "--tokenizer",
        &fixture_tok(),
        "--tools",
        tools_path.to_str().unwrap(),
        "--max-gen-len",
        "64",
        "--name",
        "assistant",
        "--emit",
        "xcframework",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        xc.status.success(),
        "{}",
        String::from_utf8_lossy(&xc.stderr)
    );
    for f in [
        "assistant.xcframework/Info.plist",
        "assistant.xcframework/ios-arm64/libassistant.a",
        "assistant.xcframework/macos-arm64_x86_64/libassistant.a",
        "assistant.xcframework/macos-arm64_x86_64/Headers/assistant.h",
        "Package.swift",
    ] {
        assert!(out_dir.join(f).is_file(), "{f}");
    }
    fails_with(
        &needlec(&[
            "build",
            "--checkpoint",
            &fixture("small.safetensors"),
            "--tokenizer",
            &fixture_tok(),
            "--tools",
            tools_path.to_str().unwrap(),
            "--emit",
            "rust",
            "--out-dir",
            out_dir.to_str().unwrap(),
        ]),
        "a Needle 3 build does not take --emit rust: a Needle 3 build writes staticlib, obj, \
         header and xcframework",
    );
    std::fs::remove_dir_all(&out_dir).ok();
    std::fs::remove_file(&tools_path).ok();
}

#[test]
fn trace_forces_an_answer_and_reports_every_step() {
    let tools = tools_file("trace");
    let trace = |fold: &str| -> serde_json::Value {
        let out = ok(&needlec(&[
            "trace",
            "--checkpoint",
            &fixture("small.safetensors"),
            "--tokenizer",
            &fixture_tok(),
            "--tools",
            tools.to_str().unwrap(),
            "--query",
            "What's the weather in Paris?",
            "--fold",
            fold,
            "--answer",
            r#"[{"name":"get_weather","arguments":{"location":"Paris"}}]"#,
        ]));
        serde_json::from_str(&out).unwrap()
    };
    let mut folded = trace("tools");
    let mut whole = trace("none");
    assert_eq!(folded["folded"], true);
    assert_eq!(whole["folded"], false);
    assert_eq!(
        folded["text"],
        r#"<tool_call>[{"name":"get_weather","arguments":{"location":"Paris"}}]</tool_call><|im_end|>"#
    );
    assert_eq!(folded["parsed"], true);
    let steps = folded["steps"].as_array().unwrap();
    assert_eq!(steps.len(), folded["new_ids"].as_array().unwrap().len());
    assert_eq!(steps[0]["top"].as_array().unwrap().len(), 5);
    let ids = folded["prompt_ids"].as_array().unwrap();
    let split = folded["prefix_len"].as_u64().unwrap() as usize;
    assert_eq!(ids[split - 1], 9, "the split falls after </tools>");
    folded["folded"] = serde_json::Value::Null;
    whole["folded"] = serde_json::Value::Null;
    assert_eq!(folded, whole);
    std::fs::remove_file(tools).ok();
}

/// `--grammar strict` closes the envelope with a valid call list within the budget, and
/// refuses a budget too small for it.
#[test]
fn strict_grammar_closes_the_envelope_from_the_command_line() {
    let tools = tools_file("strict");
    let run = |max_gen_len: &str| {
        needlec(&[
            "run",
            "--checkpoint",
            &fixture("small.cact"),
            "--tokenizer",
            &fixture_tok(),
            "--tools",
            tools.to_str().unwrap(),
            "--query",
            "Set a timer for 10 minutes",
            "--grammar",
            "strict",
            "--max-gen-len",
            max_gen_len,
            "--confidence",
        ])
    };
    let out = ok(&run("40"));
    let calls: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(calls.is_array(), "{out}");
    let details: serde_json::Value = serde_json::from_str(out.lines().nth(1).unwrap()).unwrap();
    assert_eq!(details["parsed"], true, "{out}");
    fails_with(&run("4"), "--grammar strict needs at least");
    std::fs::remove_file(tools).ok();
}

/// `eval` of a Needle 3 checkpoint: the golden cases as data, folded and unfolded agree on
/// every example, strict outputs are all valid calls, and the confidence is the head's.
#[test]
fn eval_runs_needle3_with_fold_and_grammar_comparisons() {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("small.json")).unwrap()).unwrap();
    let data = std::env::temp_dir().join(format!("needlec-n3-eval-{}.jsonl", std::process::id()));
    let lines: Vec<String> = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let e = &c["example"];
            serde_json::json!({"query": e["query"], "tools": e["tools"], "answers": e["answers"]})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let report = std::env::temp_dir().join(format!("needlec-n3-eval-{}.json", std::process::id()));
    let eval = |extra: &[&str]| {
        let (ckpt, tok) = (fixture("small.safetensors"), fixture_tok());
        let args = [
            "eval",
            "--checkpoint",
            &ckpt,
            "--tokenizer",
            &tok,
            "--data",
            data.to_str().unwrap(),
            "--max-gen-len",
            "40",
        ];
        needlec(&[args.as_slice(), extra].concat())
    };
    let out = ok(&eval(&[
        "--compare",
        "fold=none",
        "--grammar",
        "strict",
        "--json",
        report.to_str().unwrap(),
    ]));
    assert!(out.contains("3 examples"), "{out}");
    assert!(
        out.contains("compare fold=none") && out.contains("agreement 100.0%"),
        "{out}"
    );
    assert!(out.contains("valid calls                100.0%"), "{out}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["confidence"]["signal"], "confidence_head");
    assert_eq!(r["confidence"]["examples"], 3);
    fails_with(
        &eval(&["--compare", "weights=int4"]),
        "--compare weights=int4 is not yet supported for Needle 3",
    );
    std::fs::remove_file(&data).ok();
    std::fs::remove_file(&report).ok();
}
