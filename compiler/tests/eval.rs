//! `needlec eval` and `needlec run --confidence` end to end through the binary, on the bundled
//! model and a JSON Lines fixture made of the bundled samples, whose outputs the original
//! implementation recorded (`samples.json`): the report must show exactly those outputs, and
//! the figures must follow from them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use needle_test_support::{read_json, tiny_needle, work_dir};
use serde_json::{json, Value};

/// How many samples the fixture holds (a few seconds of decoding in each configuration).
const N: usize = 8;

fn example(name: &str) -> String {
    tiny_needle(name).to_str().unwrap().to_string()
}

fn needlec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_needlec"))
        .args(args)
        .output()
        .expect("needlec runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn samples() -> Vec<Value> {
    let all: Vec<Value> = read_json(&tiny_needle("samples.json"));
    all.into_iter().take(N).collect()
}

/// The fixture: the first `N` samples with the bundled tool list on each line (as a JSON list,
/// or once as a string holding it), and two bad lines at lines 3 and 7 (1-based).
fn fixture(dir: &Path) -> PathBuf {
    let tools: Value = read_json(&tiny_needle("tools.json"));
    let mut lines = Vec::new();
    for (i, s) in samples().iter().enumerate() {
        if lines.len() == 2 {
            lines.push("this line is not JSON".to_string());
        }
        if lines.len() == 6 {
            lines.push(json!({"query": "no answers here", "tools": tools}).to_string());
        }
        let answers: Value = serde_json::from_str(s["expected"].as_str().unwrap()).unwrap();
        let tools = if i == 1 {
            Value::String(tools.to_string())
        } else {
            tools.clone()
        };
        lines.push(json!({"query": s["query"], "tools": tools, "answers": answers}).to_string());
    }
    let path = dir.join("samples.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn eval_args<'a>(ckpt: &'a str, tok: &'a str, data: &'a str) -> Vec<&'a str> {
    vec![
        "eval",
        "--checkpoint",
        ckpt,
        "--tokenizer",
        tok,
        "--data",
        data,
        "--fold",
        "none",
        "--max-gen-len",
        "64",
    ]
}

#[test]
fn eval_reports_the_references_outputs_figures_comparison_and_pages() {
    let dir = work_dir("eval-report");
    let data = fixture(&dir);
    let (ckpt, tok) = (example("tiny-needle.pkl"), example("tokenizer.model"));
    let data_s = data.to_str().unwrap();
    let json_path = dir.join("report.json");
    let html_path = dir.join("report.html");
    let mut args = eval_args(&ckpt, &tok, data_s);
    args.extend([
        "--compare",
        "fold=tools",
        "--target-precision",
        "0.9",
        "--json",
        json_path.to_str().unwrap(),
        "--html",
        html_path.to_str().unwrap(),
    ]);
    let out = needlec(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("skipped line 3: not JSON"), "{err}");
    assert!(err.contains("skipped line 7: no \"answers\""), "{err}");
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("exact-match accuracy"), "{table}");

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let samples = samples();
    assert_eq!(report["examples"], N);
    let bad: Vec<u64> = report["bad_lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["line"].as_u64().unwrap())
        .collect();
    assert_eq!(bad, vec![3, 7]);
    // The outputs are the reference's, example by example, and the figures follow from them.
    let results = report["results"].as_array().unwrap();
    let mut right = 0;
    for (r, s) in results.iter().zip(&samples) {
        assert_eq!(r["output"], s["stock_exact"], "line {}", r["line"]);
        let exact = s["stock_exact"] == s["expected"];
        assert_eq!(r["exact"], exact, "line {}", r["line"]);
        right += usize::from(exact);
        let c = r["confidence"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&c));
        assert_eq!(r["signals"]["mean_prob"].as_f64().unwrap(), c);
    }
    assert!(
        right < N,
        "the fixture holds a sample the stock model gets wrong"
    );
    assert_eq!(
        report["accuracy"].as_f64().unwrap(),
        right as f64 / N as f64
    );
    assert_eq!(report["valid"].as_f64().unwrap(), 1.0);
    let lines: Vec<u64> = results
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![1, 2, 4, 5, 6, 8, 9, 10]);
    // The comparison: agreement and the disagreements are the reference's folded outputs'.
    let cmp = &report["comparisons"][0];
    assert_eq!(cmp["setting"], "fold=tools");
    let differ: Vec<u64> = samples
        .iter()
        .zip(&lines)
        .filter(|(s, _)| s["stock_exact"] != s["stock_folded"])
        .map(|(_, &l)| l)
        .collect();
    let listed: Vec<u64> = cmp["disagreements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["line"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, differ);
    assert_eq!(
        cmp["agreement"].as_f64().unwrap(),
        (N - differ.len()) as f64 / N as f64
    );
    for d in cmp["disagreements"].as_array().unwrap() {
        let i = lines
            .iter()
            .position(|&l| l == d["line"].as_u64().unwrap())
            .unwrap();
        assert_eq!(d["other"], samples[i]["stock_folded"]);
    }
    // Confidence figures are there, the right answers scoring above the wrong one.
    let conf = &report["confidence"];
    assert_eq!(conf["signal"], "mean_prob");
    assert!(conf["auroc"].as_f64().unwrap() > 0.5, "{conf}");
    assert_eq!(conf["reliability"].as_array().unwrap().len(), 10);
    assert!(conf["target"]["threshold"].as_f64().is_some(), "{conf}");
    assert!(!conf["curve"].as_array().unwrap().is_empty());
    assert_eq!(conf["candidates"].as_array().unwrap().len(), 7);
    assert!(report["latency_ms"]["mean"].as_f64().unwrap() > 0.0);
    assert!(report["per_tool"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["tool"] == "send_message"));

    // The page: self-contained, with its plots, and nothing to fetch.
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert_eq!(
        html.matches("<svg").count(),
        3,
        "reliability, curve, per-tool"
    );
    assert!(html.contains("class=\"bin\"") && html.contains("<polyline class=\"curve\""));
    assert!(html.contains("Disagreements with fold=tools"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no URLs"
    );
    assert!(!html.contains("<script") && !html.contains("<link"));
    renders_in_headless_chromium(&html_path, &dir);
}

/// The report in a real browser (Debian's `chromium`, headless): the page forbids every fetch
/// with its Content Security Policy, so an attempt would be logged as a violation; none is, the
/// DOM Chromium built holds the three plots, and a screenshot comes out.
fn renders_in_headless_chromium(html: &Path, dir: &Path) {
    use needle_test_support::toolchain;
    let Some(chromium) = toolchain::require("chromium", "chromium", "renders the eval report")
    else {
        return;
    };
    let page = std::fs::read_to_string(html).unwrap();
    assert!(
        page.contains("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'"),
        "the page forbids fetches"
    );
    let url = format!("file://{}", html.display());
    let run = |mode: &str, profile: &str| {
        let out = Command::new("timeout")
            .arg("120")
            .arg(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--enable-logging=stderr",
                "--v=0",
                "--window-size=1280,2000",
            ])
            .arg(format!("--user-data-dir={}", dir.join(profile).display()))
            .arg(mode)
            .arg(&url)
            .current_dir(dir)
            .output()
            .expect("chromium runs");
        let log = stderr(&out);
        assert!(out.status.success(), "chromium {mode}: {log}");
        assert!(
            !log.contains("Content Security Policy"),
            "the page tried to fetch something: {log}"
        );
        out
    };
    let dom = String::from_utf8_lossy(&run("--dump-dom", "chromium-dom").stdout).into_owned();
    assert_eq!(dom.matches("<svg").count(), 3, "{dom}");
    assert!(dom.contains("<polyline class=\"curve\""), "{dom}");
    assert!(dom.contains("Disagreements with fold=tools"), "{dom}");
    let shot = dir.join("screenshot.png");
    run(&format!("--screenshot={}", shot.display()), "chromium-shot");
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}

#[test]
fn gates_fail_with_status_3_and_say_by_how_much() {
    let dir = work_dir("eval-gates");
    let data = fixture(&dir);
    let (ckpt, tok) = (example("tiny-needle.pkl"), example("tokenizer.model"));
    let data_s = data.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = eval_args(&ckpt, &tok, data_s);
        args.extend(["--limit", "3"]);
        args.extend(extra);
        needlec(&args)
    };
    // The first three samples: the third is the one the stock model gets wrong.
    let samples = samples();
    assert_ne!(samples[2]["stock_exact"], samples[2]["expected"]);
    let out = run(&["--min-accuracy", "0.6", "--min-valid", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["--min-accuracy", "0.9"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("gate missed: accuracy 66.7% is below --min-accuracy 90.0% by 23.3%"),
        "{}",
        stderr(&out)
    );
    let out = run(&["--compare", "fold=tools", "--min-agreement", "0.99"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("gate missed: agreement with fold=tools"),
        "{}",
        stderr(&out)
    );
    // Comparing with itself agrees on everything.
    let out = run(&["--compare", "fold=none", "--min-agreement", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Gates need what they gate.
    let out = run(&["--min-agreement", "0.99"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("needs at least one --compare"));
    let out = run(&["--min-accuracy", "90"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not a share"));
}

#[test]
fn bad_data_is_reported_with_line_numbers_or_fails() {
    let dir = work_dir("eval-bad-data");
    let data = fixture(&dir);
    let (ckpt, tok) = (example("tiny-needle.pkl"), example("tokenizer.model"));
    let mut args = eval_args(&ckpt, &tok, data.to_str().unwrap());
    args.push("--strict-data");
    let out = needlec(&args);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("2 bad line(s)") && err.contains("--strict-data"),
        "{err}"
    );
    assert!(
        err.contains("line 3: not JSON") && err.contains("line 7: no \"answers\""),
        "{err}"
    );

    let missing = dir.join("missing.jsonl");
    let out = needlec(&eval_args(&ckpt, &tok, missing.to_str().unwrap()));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("cannot read the data file") && err.contains("missing.jsonl"),
        "{err}"
    );

    // Lines without tools need --tools; with it, they use the app's list.
    let no_tools = dir.join("no-tools.jsonl");
    let s = &samples()[0];
    let answers: Value = serde_json::from_str(s["expected"].as_str().unwrap()).unwrap();
    std::fs::write(
        &no_tools,
        json!({"query": s["query"], "answers": answers}).to_string(),
    )
    .unwrap();
    let out = needlec(&eval_args(&ckpt, &tok, no_tools.to_str().unwrap()));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("pass --tools"), "{}", stderr(&out));
    let tools = example("tools.json");
    let json_path = dir.join("r.json");
    let mut args = eval_args(&ckpt, &tok, no_tools.to_str().unwrap());
    args.extend(["--tools", &tools, "--json", json_path.to_str().unwrap()]);
    let out = needlec(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["results"][0]["output"], s["stock_exact"]);
}

#[test]
fn run_confidence_is_a_second_line_and_trace_has_it() {
    let (ckpt, tok, tools) = (
        example("tiny-needle-folded.pkl"),
        example("tokenizer.model"),
        example("tools.json"),
    );
    let s = &samples()[0];
    let query = s["query"].as_str().unwrap();
    let base = [
        "run",
        "--checkpoint",
        &ckpt,
        "--tokenizer",
        &tok,
        "--tools",
        &tools,
        "--query",
        query,
    ];
    let plain = needlec(&base);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let plain = String::from_utf8(plain.stdout).unwrap();
    assert_eq!(plain, format!("{}\n", s["fold_folded"].as_str().unwrap()));
    let mut args = base.to_vec();
    args.push("--confidence");
    let out = needlec(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        format!("{}\n", lines[0]),
        plain,
        "the first line is unchanged"
    );
    let conf: Value = serde_json::from_str(lines[1]).unwrap();
    let c = conf["confidence"].as_f64().unwrap();
    assert!(c > 0.5 && c <= 1.0, "{conf}");
    assert_eq!(conf["tool"], "set_alarm");
    assert_eq!(conf["signals"]["mean_prob"].as_f64().unwrap(), c);

    let mut args = base.to_vec();
    args[0] = "trace";
    let out = needlec(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let trace: Value = serde_json::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(trace["confidence"], conf);
    // The confidence is the geometric mean of the steps' probabilities where there was a choice.
    let probs: Vec<f64> = trace["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["allowed"] != json!(1))
        .map(|s| s["prob"].as_f64().unwrap())
        .collect();
    let gm = (probs.iter().map(|p| p.ln()).sum::<f64>() / probs.len() as f64).exp();
    assert!((gm - c).abs() < 1e-5, "{gm} vs {c}");
}

/// All 40 bundled samples with the bundled tool list, as eval data.
fn all_samples(dir: &Path) -> PathBuf {
    let tools: Value = read_json(&tiny_needle("tools.json"));
    let all: Vec<Value> = read_json(&tiny_needle("samples.json"));
    let lines: Vec<String> = all
        .iter()
        .map(|s| {
            let answers: Value = serde_json::from_str(s["expected"].as_str().unwrap()).unwrap();
            json!({"query": s["query"], "tools": tools, "answers": answers}).to_string()
        })
        .collect();
    let path = dir.join("all-samples.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn strict_grammar_gives_only_valid_calls_and_no_lower_accuracy() {
    let dir = work_dir("eval-strict");
    let samples = all_samples(&dir);
    let dev = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dev_head40.jsonl");
    let tok = example("tokenizer.model");
    for (ckpt, fold) in [
        ("tiny-needle.pkl", "none"),
        ("tiny-needle-folded.pkl", "tools"),
    ] {
        let ckpt = example(ckpt);
        for data in [&samples, &dev] {
            let mut accuracy = Vec::new();
            let mut reports = Vec::new();
            for grammar in ["reference", "strict"] {
                let json_path = dir.join(format!("{grammar}.json"));
                let mut args = eval_args(&ckpt, &tok, data.to_str().unwrap());
                args[8] = fold;
                args.extend(["--grammar", grammar, "--json", json_path.to_str().unwrap()]);
                if grammar == "strict" {
                    args.extend(["--min-valid", "1"]);
                } else {
                    args.extend(["--compare", "grammar=strict"]);
                }
                let out = needlec(&args);
                assert!(out.status.success(), "{grammar}: {}", stderr(&out));
                let table = String::from_utf8_lossy(&out.stdout);
                assert_eq!(
                    table.contains("--grammar strict"),
                    grammar == "strict",
                    "{table}"
                );
                let report: Value =
                    serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
                assert_eq!(report["grammar"], grammar);
                assert_eq!(report["examples"], 40);
                if grammar == "strict" {
                    assert_eq!(report["valid"], 1.0, "{ckpt} {}", data.display());
                    for r in report["results"].as_array().unwrap() {
                        assert_eq!(r["valid"], true, "{r}");
                    }
                }
                accuracy.push(report["accuracy"].as_f64().unwrap());
                reports.push(report);
            }
            // `--compare grammar=strict` from the reference run: the strict run's figures.
            let cmp = &reports[0]["comparisons"][0];
            assert_eq!(cmp["setting"], "grammar=strict");
            assert_eq!(cmp["grammar"], "strict");
            assert_eq!(cmp["accuracy"].as_f64(), Some(accuracy[1]));
            let outputs = |r: &Value| -> Vec<Value> {
                r["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["output"].clone())
                    .collect()
            };
            let same = outputs(&reports[0])
                .iter()
                .zip(outputs(&reports[1]))
                .filter(|(a, b)| *a == b)
                .count();
            assert_eq!(cmp["agreement"].as_f64(), Some(same as f64 / 40.0));
            assert_eq!(cmp["disagreements"].as_array().unwrap().len(), 40 - same);
            assert!(
                accuracy[1] >= accuracy[0],
                "{ckpt} {}: strict {} below reference {}",
                data.display(),
                accuracy[1],
                accuracy[0]
            );
        }
    }
}

#[test]
fn strict_grammar_names_the_tool_and_key_it_cannot_express() {
    let dir = work_dir("eval-strict-bad-schema");
    let (ckpt, tok) = (example("tiny-needle.pkl"), example("tokenizer.model"));
    let bad_tools = json!([{"type": "function", "function": {"name": "bookTrip",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"},
            "when": {"type": ["string", "null"]}}, "required": ["city"]}}}]);
    let bad = bad_tools.to_string();

    // run: one error naming tool and key; the reference grammar takes the same list.
    let run = |grammar: &str| {
        needlec(&[
            "run",
            "--checkpoint",
            &ckpt,
            "--tokenizer",
            &tok,
            "--tools",
            &bad,
            "--query",
            "book a trip to Rome",
            "--max-gen-len",
            "32",
            "--grammar",
            grammar,
        ])
    };
    let out = run("strict");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("\"bookTrip\"")
            && err.contains("\"when\"")
            && err.contains("not one type name"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(run("reference").status.success());

    // eval with that list as the app's: an error; as one example's own list: a bad line.
    let s = &samples()[0];
    let answers: Value = serde_json::from_str(s["expected"].as_str().unwrap()).unwrap();
    let tools: Value = read_json(&tiny_needle("tools.json"));
    let data = dir.join("mixed.jsonl");
    std::fs::write(
        &data,
        [
            json!({"query": s["query"], "tools": tools, "answers": answers}).to_string(),
            json!({"query": "book a trip", "tools": bad_tools, "answers": []}).to_string(),
        ]
        .join("\n"),
    )
    .unwrap();
    let mut args = eval_args(&ckpt, &tok, data.to_str().unwrap());
    args.extend(["--grammar", "strict", "--tools", &bad]);
    let out = needlec(&args);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("\"bookTrip\"") && err.contains("\"when\""),
        "{err}"
    );

    let mut args = eval_args(&ckpt, &tok, data.to_str().unwrap());
    args.extend(["--grammar", "strict"]);
    let out = needlec(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("line 2") && err.contains("\"bookTrip\"") && err.contains("\"when\""),
        "{err}"
    );
    args.push("--strict-data");
    assert_eq!(needlec(&args).status.code(), Some(1));
}

#[test]
fn run_and_trace_take_the_grammar_and_reference_stays_the_default() {
    let (ckpt, tok, tools) = (
        example("tiny-needle.pkl"),
        example("tokenizer.model"),
        example("tools.json"),
    );
    let query = samples()[0]["query"].as_str().unwrap().to_string();
    let base = [
        "--checkpoint",
        ckpt.as_str(),
        "--tokenizer",
        tok.as_str(),
        "--tools",
        tools.as_str(),
        "--query",
        query.as_str(),
        "--fold",
        "tools",
    ];
    let with = |cmd: &str, extra: &[&str]| {
        let mut args = vec![cmd];
        args.extend(base);
        args.extend(extra);
        let out = needlec(&args);
        assert!(out.status.success(), "{cmd} {extra:?}: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let default = with("run", &[]);
    assert_eq!(with("run", &["--grammar", "reference"]), default);
    assert_eq!(default.trim(), samples()[0]["stock_folded"]);
    let strict = with("run", &["--grammar", "strict"]);
    assert_ne!(strict, default, "the sample strict changes: a repeated key");
    let _: Value = serde_json::from_str(&strict).expect("strict output is JSON");

    let trace: Value = serde_json::from_str(&with("trace", &["--grammar", "strict"])).unwrap();
    assert_eq!(format!("{}\n", trace["output"].as_str().unwrap()), strict);
    let steps = trace["steps"].as_array().unwrap();
    assert!(steps.iter().all(|s| s["grammar_active"] == true));
    assert_eq!(steps[0]["allowed"], 1, "only <tool_call> first");

    let out = needlec(&[
        "run",
        "--checkpoint",
        &ckpt,
        "--tokenizer",
        &tok,
        "--tools",
        &tools,
        "--query",
        &query,
        "--grammar",
        "lenient",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("reference and strict"),
        "{}",
        stderr(&out)
    );
}
