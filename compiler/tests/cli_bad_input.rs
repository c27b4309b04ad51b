//! Bad input at the command line, as an attacker would give it (issue #12's findings 1 to 10):
//! each gets one clear error (or a warning), never a panic, a hang or an answer that hides it.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use needle_test_support::{golden, tiny_needle, work_dir};

fn needlec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_needlec"))
        .args(args)
        .output()
        .expect("needlec runs")
}

fn path(p: std::path::PathBuf) -> String {
    p.to_str().unwrap().to_string()
}

fn example(name: &str) -> String {
    path(tiny_needle(name))
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs needlec, expects it to fail with status 1 and no panic, and returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = needlec(args);
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

fn run_args<'a>(ckpt: &'a str, tok: &'a str, tools: &'a str, query: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--checkpoint",
        ckpt,
        "--tokenizer",
        tok,
        "--tools",
        tools,
        "--query",
        query,
    ]
}

/// `needlec synth` into `dir`.
fn synth(dir: &std::path::Path, config: &str, file: &str) -> String {
    let p = path(dir.join(file));
    let out = needlec(&["synth", "--config", config, "-o", &p]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    p
}

// ---- 1: one sentence per cause -----------------------------------------------------------------

#[test]
fn a_load_error_names_its_cause_and_its_file_once() {
    let dir = work_dir("bad-input-truncated");
    let full = std::fs::read(tiny_needle("tiny-needle.pkl")).unwrap();
    let pkl = path(dir.join("truncated.pkl"));
    std::fs::write(&pkl, &full[..1000]).unwrap();
    let st = synth(&dir, "tiny", "whole.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let st_cut = path(dir.join("cut.safetensors"));
    std::fs::write(&st_cut, &bytes[..5000]).unwrap();
    let (tok, tools) = (example("tokenizer.model"), example("tools.json"));
    let out_dir = path(dir.join("out"));
    for (ckpt, cause) in [(&pkl, "ends early"), (&st_cut, "incomplete metadata")] {
        let runs: [Vec<&str>; 3] = [
            run_args(ckpt, &tok, &tools, "hi"),
            vec![
                "build",
                "--checkpoint",
                ckpt,
                "--tokenizer",
                &tok,
                "--tools",
                &tools,
                "--out-dir",
                &out_dir,
            ],
            vec!["convert", ckpt, "-o", &out_dir],
        ];
        for args in runs {
            let stderr = fails(&args);
            assert_eq!(stderr.matches(cause).count(), 1, "{stderr}");
            assert_eq!(stderr.matches(ckpt.as_str()).count(), 1, "{stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
        }
    }
}

// ---- 2: the tokenizer must fit the model -------------------------------------------------------

#[test]
fn a_tokenizer_that_does_not_fit_the_model_is_refused_and_named() {
    let dir = work_dir("bad-input-vocab");
    // `tiny` has a vocabulary of 4096; the bundled tokenizer has 2048 pieces.
    let ckpt = synth(&dir, "tiny", "tiny.safetensors");
    let tok = example("tokenizer.model");
    let tools = example("tools.json");
    let stderr = fails(&run_args(&ckpt, &tok, &tools, "hi"));
    assert!(
        stderr.contains(&format!("tokenizer {tok} has 2048 pieces"))
            && stderr.contains("vocabulary is 4096"),
        "{stderr}"
    );
    let out_dir = path(dir.join("out"));
    let stderr = fails(&[
        "build",
        "--checkpoint",
        &ckpt,
        "--tokenizer",
        &tok,
        "--tools",
        &tools,
        "--out-dir",
        &out_dir,
    ]);
    assert!(stderr.contains("2048 pieces"), "{stderr}");
    // Fewer pieces than the special ids: named as the tokenizer's fault, not the tool list's.
    let small = path(dir.join("small.json"));
    std::fs::write(
        &small,
        r#"{"model":{"type":"BPE","unk_token":"<unk>","vocab":{"<unk>":0,"<s>":1,"</s>":2},"merges":[]}}"#,
    )
    .unwrap();
    let stderr = fails(&run_args(&example("tiny-needle.pkl"), &small, &tools, "hi"));
    assert!(
        stderr.contains(&format!("tokenizer {small} has 3 pieces"))
            && stderr.contains("special ids")
            && !stderr.contains("tool list"),
        "{stderr}"
    );
}

// ---- 3: overflow at run time -------------------------------------------------------------------

#[test]
fn weights_that_overflow_at_run_time_are_an_error_not_an_empty_answer() {
    let dir = work_dir("bad-input-overflow");
    let ckpt = synth(&dir, "tiny", "tiny.safetensors");
    // The final decoder norm's scale at 3e38 is finite (the loader accepts it) but makes the
    // logits overflow.
    let mut c = needlec::load::load_checkpoint(std::path::Path::new(&ckpt)).unwrap();
    let scale = c.tensors.get_mut("decoder/ZCRMSNorm_0/scale").unwrap();
    for v in scale.bytes.chunks_exact_mut(4) {
        v.copy_from_slice(&3e38f32.to_le_bytes());
    }
    let over = path(dir.join("overflow.safetensors"));
    needlec::load::save_safetensors(&c, std::path::Path::new(&over)).unwrap();
    let tok = path(golden("dev4k.model"));
    let tools = example("tools.json");
    for fold in ["none", "tools"] {
        let mut args = run_args(&over, &tok, &tools, "turn on the lights");
        args.extend(["--fold", fold]);
        let out = needlec(&args);
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(out.stdout.is_empty());
        assert!(stderr.contains("logits are not finite"), "{stderr}");
    }
    // The same checkpoint unchanged answers (an empty answer, with success).
    let out = needlec(&run_args(&ckpt, &tok, &tools, "turn on the lights"));
    assert!(out.status.success(), "{}", stderr_of(&out));
}

// ---- 4: --max-gen-len is capped everywhere ------------------------------------------------------

#[test]
fn max_gen_len_above_512_is_refused_by_every_command() {
    let (ckpt, tok, tools) = (
        example("tiny-needle.pkl"),
        example("tokenizer.model"),
        example("tools.json"),
    );
    for cmd in ["run", "trace"] {
        let mut args = run_args(&ckpt, &tok, &tools, "hi");
        args[0] = cmd;
        args.extend(["--max-gen-len", "513"]);
        let stderr = fails(&args);
        assert!(
            stderr.contains("--max-gen-len must be between 2 and 512") && stderr.contains("513"),
            "{stderr}"
        );
    }
    let dir = work_dir("bad-input-gen-len");
    let data = path(dir.join("d.jsonl"));
    std::fs::write(&data, "{\"query\": \"hi\", \"answers\": []}\n").unwrap();
    let stderr = fails(&[
        "eval",
        "--checkpoint",
        &ckpt,
        "--tokenizer",
        &tok,
        "--tools",
        &tools,
        "--data",
        &data,
        "--max-gen-len",
        "100000",
    ]);
    assert!(stderr.contains("between 2 and 512"), "{stderr}");
}

// ---- 5: closed pipes and full disks ------------------------------------------------------------

#[test]
fn a_closed_pipe_ends_quietly_and_a_full_disk_is_an_error() {
    let (ckpt, tok, tools) = (
        example("tiny-needle.pkl"),
        example("tokenizer.model"),
        example("tools.json"),
    );
    let mut args = run_args(&ckpt, &tok, &tools, "turn off the kitchen lights");
    args[0] = "trace";
    let mut child = Command::new(env!("CARGO_BIN_EXE_needlec"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before needlec writes anything (loading takes longer).
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = stderr_of(&out);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(stderr.is_empty(), "{stderr}");

    args[0] = "run";
    let out = Command::new(env!("CARGO_BIN_EXE_needlec"))
        .args(&args)
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("writing to standard output") && stderr.contains("No space left"),
        "{stderr}"
    );
}

// ---- 6: endless and enormous inputs ------------------------------------------------------------

#[test]
fn endless_inputs_are_refused_without_reading_them_all() {
    let (ckpt, tok, tools) = (
        example("tiny-needle.pkl"),
        example("tokenizer.model"),
        example("tools.json"),
    );
    let cases: [(Vec<&str>, &str); 4] = [
        (
            run_args("/dev/zero", &tok, &tools, "hi"),
            "/dev/zero is not a checkpoint needlec can read",
        ),
        (vec!["inspect", "/dev/zero"], "all zero bytes"),
        (
            run_args(&ckpt, "/dev/zero", &tools, "hi"),
            "tokenizer /dev/zero is larger than the 64 MiB",
        ),
        (
            run_args(&ckpt, &tok, "/dev/zero", "hi"),
            "tool list file /dev/zero is larger than the 4 MiB",
        ),
    ];
    for (args, want) in cases {
        let start = Instant::now();
        let stderr = fails(&args);
        assert!(stderr.contains(want), "{stderr}");
        assert!(start.elapsed() < Duration::from_secs(20), "{args:?}");
    }
    // A config far too large for memory is refused before anything is allocated.
    let dir = work_dir("bad-input-synth");
    let out = path(dir.join("huge.safetensors"));
    let stderr = fails(&[
        "synth",
        "--config",
        r#"{"vocab_size":65536,"d_model":16384,"num_heads":64,"num_kv_heads":64,"num_encoder_layers":64,"num_decoder_layers":64}"#,
        "-o",
        &out,
    ]);
    assert!(
        stderr.contains("more than the 4 GiB needlec reads back"),
        "{stderr}"
    );
}

// ---- 7: safetensors whose header length starts with 0x80 ---------------------------------------

#[test]
fn safetensors_with_a_header_length_starting_0x80_is_not_taken_for_a_pickle() {
    let dir = work_dir("bad-input-0x80");
    let st = synth(&dir, "tiny", "tiny.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Pad the JSON header with spaces (the format allows it) to a length of 128 + 256k.
    let padded = (n + 1).next_multiple_of(256) + 128;
    let mut out = (padded as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&bytes[8..8 + n]);
    out.resize(8 + padded, b' ');
    out.extend_from_slice(&bytes[8 + n..]);
    assert_eq!(out[0], 0x80);
    let odd = path(dir.join("odd.safetensors"));
    std::fs::write(&odd, &out).unwrap();
    let res = needlec(&["inspect", &odd]);
    assert!(res.status.success(), "{}", stderr_of(&res));
    assert!(String::from_utf8_lossy(&res.stdout).contains("embedding/embedding"));
    // Cut short, it is still named a safetensors file, not an unsupported pickle.
    let cut = path(dir.join("cut.safetensors"));
    std::fs::write(&cut, &out[..4000]).unwrap();
    let stderr = fails(&["inspect", &cut]);
    assert!(
        stderr.contains("safetensors") && !stderr.contains("pickle protocol"),
        "{stderr}"
    );
}

// ---- 8: a huge tool list is refused before it is tokenized -------------------------------------

#[test]
fn a_huge_tool_list_is_refused_quickly() {
    let dir = work_dir("bad-input-huge-tools");
    // About 3 MB: under the file bound, so the token budget refuses it.
    let description = "Turn the lights on or off in one room of the house. ".repeat(60_000);
    let tools = serde_json::json!([{
        "name": "toggle_lights",
        "description": description,
        "parameters": {"room": {"type": "string", "description": "Which room.", "required": true}}
    }]);
    let file = path(dir.join("huge.json"));
    std::fs::write(&file, tools.to_string()).unwrap();
    let start = Instant::now();
    let stderr = fails(&run_args(
        &example("tiny-needle.pkl"),
        &example("tokenizer.model"),
        &file,
        "hi",
    ));
    let took = start.elapsed();
    assert!(
        stderr.contains("the tool list takes at least") && stderr.contains("no room for a query"),
        "{stderr}"
    );
    // Tokenizing all of it took 17 s; reading, parsing and measuring it takes well under 1 s.
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

// ---- 9: empty tool lists and lists that leave no room for a query ------------------------------

#[test]
fn an_empty_tool_list_is_refused() {
    let (ckpt, tok) = (example("tiny-needle.pkl"), example("tokenizer.model"));
    let stderr = fails(&run_args(&ckpt, &tok, "[]", "hi"));
    assert!(
        stderr.contains("inline --tools JSON is empty") && stderr.contains("at least one tool"),
        "{stderr}"
    );
    let dir = work_dir("bad-input-empty-tools");
    let file = path(dir.join("empty.json"));
    std::fs::write(&file, " [ ]\n").unwrap();
    let stderr = fails(&run_args(&ckpt, &tok, &file, "hi"));
    assert!(
        stderr.contains(&format!("tool list file {file} is empty")),
        "{stderr}"
    );
}

#[test]
fn a_tool_list_that_leaves_almost_no_room_for_a_query_warns() {
    let tok = needlec::frontend::load_tokenizer(&tiny_needle("tokenizer.model")).unwrap();
    let list = |words: usize| {
        serde_json::json!([{
            "name": "toggle_lights",
            "description": "lights ".repeat(words),
            "parameters": {"room": {"type": "string", "description": "Which room.", "required": true}}
        }])
        .to_string()
    };
    let tokens = |words: usize| {
        tok.encode(
            &needlec::tools::parse_tools(&list(words))
                .unwrap()
                .normalized_json,
        )
        .len()
    };
    // The most words that still fit, found by bisection: the tools then leave fewer than 16
    // query tokens (but at least one).
    let (mut lo, mut hi) = (0, 2000);
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if tokens(mid) <= 1022 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let n = tokens(lo);
    assert!((1008..=1022).contains(&n), "{n}");
    let dir = work_dir("bad-input-no-room");
    let file = path(dir.join("long.json"));
    std::fs::write(&file, list(lo)).unwrap();
    let (ckpt, tokp) = (example("tiny-needle.pkl"), example("tokenizer.model"));
    let mut args = run_args(&ckpt, &tokp, &file, "hi");
    args.extend(["--fold", "none", "--max-gen-len", "3"]);
    let out = needlec(&args);
    let stderr = stderr_of(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the tool list takes {n} tokens, which leaves room for only"
        )),
        "{stderr}"
    );
    // Folded, the query is cut rather than refused: no warning.
    args.extend(["--fold", "tools"]);
    let out = needlec(&args);
    assert!(
        !stderr_of(&out).contains("leaves room"),
        "{}",
        stderr_of(&out)
    );
}

// ---- 10: messages that named the wrong thing ---------------------------------------------------

#[test]
fn empty_tokenizer_unwritable_output_and_the_headers_err_token() {
    let dir = work_dir("bad-input-messages");
    let empty = path(dir.join("empty.model"));
    std::fs::write(&empty, b"").unwrap();
    let stderr = fails(&run_args(
        &example("tiny-needle.pkl"),
        &empty,
        &example("tools.json"),
        "hi",
    ));
    assert!(
        stderr.contains(&format!("tokenizer {empty} is empty")) && !stderr.contains("trainer_spec"),
        "{stderr}"
    );
    let unwritable = path(dir.join("no/such/dir/x.safetensors"));
    let stderr = fails(&["convert", &example("tiny-needle.pkl"), "-o", &unwritable]);
    assert!(
        stderr.contains(&format!("cannot write {unwritable}")) && !stderr.contains("cannot read"),
        "{stderr}"
    );
    let out_dir = path(dir.join("out"));
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
        "--emit",
        "header",
        "--out-dir",
        &out_dir,
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let header = std::fs::read_to_string(dir.join("out/assistant.h")).unwrap();
    let line = header
        .lines()
        .find(|l| l.starts_with("#define ASSISTANT_ERR_TOKEN "))
        .expect("ERR_TOKEN");
    assert!(line.contains("(assistant_call_tokens only)"), "{line}");
    assert!(
        header.contains("#define ASSISTANT_ERR_NUMERIC 8 /* the model's logits are not finite"),
        "{header}"
    );
}

/// A schema the strict grammar cannot express: `needlec build --grammar strict` stops with the
/// error `needlec run --grammar strict` gives (naming the tool and the key) and writes nothing;
/// an unknown grammar name is refused by both.
#[test]
fn build_and_run_refuse_an_inexpressible_schema_alike() {
    let (ckpt, tok) = (
        example("tiny-needle-folded.pkl"),
        example("tokenizer.model"),
    );
    let tools = r#"[{"name":"bookTrip","description":"d","parameters":{"when":{"type":["string","null"],"description":"x","required":true}}}]"#;
    let mut run = run_args(&ckpt, &tok, tools, "book a trip");
    run.extend(["--grammar", "strict"]);
    let run_err = fails(&run);
    assert!(
        run_err.contains("tool \"bookTrip\", parameter \"when\"")
            && run_err.contains("--grammar reference"),
        "{run_err}"
    );
    let dir = work_dir("bad-input-strict-build");
    let out = path(dir.join("out"));
    let build = [
        "build",
        "--checkpoint",
        &ckpt,
        "--tokenizer",
        &tok,
        "--tools",
        tools,
        "--grammar",
        "strict",
        "--out-dir",
        &out,
    ];
    assert_eq!(fails(&build), run_err);
    assert!(!dir.join("out").exists(), "a refused build wrote files");
    let mut bogus = build.to_vec();
    bogus[8] = "strictest";
    let out = needlec(&bogus);
    assert_eq!(out.status.code(), Some(2), "clap refuses the value");
    assert!(
        stderr_of(&out).contains("reference and strict"),
        "{}",
        stderr_of(&out)
    );
}

/// `--max-forced-rows` outside 1 to 64 (or not a number) is refused before anything loads,
/// naming the flag and the range.
#[test]
fn max_forced_rows_outside_its_range_is_refused() {
    let (ckpt, tok, tools) = (
        example("tiny-needle.pkl"),
        example("tokenizer.model"),
        example("tools.json"),
    );
    let out_dir = path(work_dir("bad-input-forced-rows"));
    for n in ["0", "65", "x"] {
        let out = needlec(&[
            "build",
            "--checkpoint",
            &ckpt,
            "--tokenizer",
            &tok,
            "--tools",
            &tools,
            "--out-dir",
            &out_dir,
            "--max-forced-rows",
            n,
        ]);
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{n}: {stderr}");
        assert!(
            stderr.starts_with("error: invalid value") && stderr.contains("--max-forced-rows"),
            "{n}: {stderr}"
        );
        if n != "x" {
            assert!(stderr.contains("not in 1..=64"), "{n}: {stderr}");
        }
    }
}

// ---- needlec finetune ----------------------------------------------------------------------------

/// `needlec finetune` from the bundled stock model on `data`, writing `out`, plus `extra`.
fn finetune_args<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "finetune",
        "--checkpoint",
        &example("tiny-needle.pkl"),
        "--tokenizer",
        &example("tokenizer.model"),
        "--data",
        data,
        "--out",
        out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn finetune_fails(data: &str, out: &str, extra: &[&str]) -> String {
    let args = finetune_args(data, out, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(&args)
}

const GOOD_LINE: &str = r#"{"query": "What's the weather in Paris?", "tools": [{"name": "get_weather", "description": "Get the weather.", "parameters": {"location": {"type": "string", "description": "City.", "required": true}}}], "answers": [{"name": "get_weather", "arguments": {"location": "Paris"}}]}"#;

#[test]
fn finetune_refuses_a_line_without_answers_unless_distilling() {
    let dir = work_dir("bad-input-finetune-answers");
    let data = dir.join("data.jsonl");
    let no_answers = r#"{"query": "hi", "tools": [{"name": "get_weather", "description": "Get the weather.", "parameters": {}}]}"#;
    std::fs::write(&data, format!("{GOOD_LINE}\n{no_answers}\n")).unwrap();
    let out = path(dir.join("out.safetensors"));
    let err = finetune_fails(&path(data.clone()), &out, &["--steps", "1"]);
    assert!(err.contains("line 2: no \"answers\""), "{err}");
    assert!(err.contains("--distill"), "{err}");
    assert!(err.contains("data.jsonl"), "{err}");
    assert!(!std::path::Path::new(&out).exists(), "nothing written");
    // With --distill the stock model labels it, and training runs.
    let args = finetune_args(&path(data), &out, &["--steps", "1", "--distill"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = needlec(&args);
    assert!(run.status.success(), "{}", stderr_of(&run));
    assert!(std::path::Path::new(&out).exists());
}

#[test]
fn finetune_refuses_an_ema_decay_outside_0_to_1() {
    let dir = work_dir("bad-input-finetune-ema");
    let data = dir.join("data.jsonl");
    std::fs::write(&data, format!("{GOOD_LINE}\n")).unwrap();
    let out = path(dir.join("out.safetensors"));
    for decay in ["1", "0", "-0.5", "NaN"] {
        let err = finetune_fails(&path(data.clone()), &out, &["--ema", decay]);
        assert!(err.contains(&format!("--ema {decay}")), "{decay}: {err}");
        assert!(err.contains("between 0 and 1"), "{decay}: {err}");
    }
    assert!(!std::path::Path::new(&out).exists(), "nothing written");
}

#[test]
fn finetune_refuses_a_distillation_weight_or_temperature_out_of_range() {
    let dir = work_dir("bad-input-finetune-distill");
    let data = dir.join("data.jsonl");
    std::fs::write(&data, format!("{GOOD_LINE}\n")).unwrap();
    let out = path(dir.join("out.safetensors"));
    for (flag, values, says) in [
        (
            "--distill-weight",
            &["1.5", "-0.1", "NaN"][..],
            "between 0 and 1",
        ),
        (
            "--distill-temperature",
            &["0", "-1", "inf", "NaN"][..],
            "not a positive number",
        ),
    ] {
        for value in values {
            let err = finetune_fails(&path(data.clone()), &out, &["--distill", flag, value]);
            assert!(err.contains(&format!("{flag} {value}")), "{err}");
            assert!(err.contains(says), "{flag} {value}: {err}");
        }
    }
    // Without --distill there is no teacher to weigh.
    let err = finetune_fails(&path(data), &out, &["--distill-weight", "0.5"]);
    assert!(
        err.contains("--distill-weight tunes how --distill learns")
            && err.contains("add --distill"),
        "{err}"
    );
    assert!(!std::path::Path::new(&out).exists(), "nothing written");
}

#[test]
fn finetune_refuses_augment_without_a_labelled_line() {
    let dir = work_dir("bad-input-finetune-augment");
    let data = dir.join("data.jsonl");
    let no_answers = r#"{"query": "weather in Paris", "tools": [{"name": "get_weather", "description": "Get the weather.", "parameters": {}}]}"#;
    std::fs::write(&data, format!("{no_answers}\n")).unwrap();
    let out = path(dir.join("out.safetensors"));
    let err = finetune_fails(
        &path(data),
        &out,
        &["--steps", "1", "--distill", "--augment"],
    );
    assert!(err.contains("--augment varies labelled examples"), "{err}");
    assert!(err.contains("drop --augment"), "{err}");
    assert!(!std::path::Path::new(&out).exists(), "nothing written");
}

#[test]
fn finetune_refuses_a_tool_list_that_does_not_fit_the_encoder() {
    let dir = work_dir("bad-input-finetune-tools");
    let data = dir.join("data.jsonl");
    let long = "very long description ".repeat(400);
    let line = format!(
        r#"{{"query": "hi", "tools": [{{"name": "t", "description": "{long}", "parameters": {{}}}}], "answers": []}}"#
    );
    std::fs::write(&data, format!("{GOOD_LINE}\n{line}\n")).unwrap();
    let err = finetune_fails(&path(data), &path(dir.join("o.safetensors")), &[]);
    assert!(err.contains("line 2: its tools"), "{err}");
    assert!(err.contains("1024-token encoder budget"), "{err}");
}

#[test]
fn finetune_refuses_an_empty_data_file_and_an_unwritable_output() {
    let dir = work_dir("bad-input-finetune-empty");
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let err = finetune_fails(&path(empty), &path(dir.join("o.safetensors")), &[]);
    assert!(err.contains("empty.jsonl holds no example"), "{err}");

    let data = dir.join("data.jsonl");
    std::fs::write(&data, format!("{GOOD_LINE}\n")).unwrap();
    let out = path(dir.join("no-such-dir").join("o.safetensors"));
    let err = finetune_fails(&path(data), &out, &[]);
    assert!(err.contains("cannot write the output"), "{err}");
    assert!(err.contains("no-such-dir"), "{err}");
}

#[test]
fn finetune_stops_at_a_non_finite_loss_and_keeps_the_last_good_weights() {
    let dir = work_dir("bad-input-finetune-nan");
    let data = dir.join("data.jsonl");
    std::fs::write(&data, format!("{GOOD_LINE}\n{GOOD_LINE}\n")).unwrap();
    let out = path(dir.join("o.safetensors"));
    // A learning rate that throws the weights out of float32's range at the first step.
    let err = finetune_fails(
        &path(data),
        &out,
        &["--steps", "5", "--batch-size", "1", "--lr", "1e30"],
    );
    assert!(err.contains("at step 2"), "{err}");
    assert!(
        err.contains("last weights that gave a finite loss"),
        "{err}"
    );
    // What it kept is a checkpoint that answers.
    let run = needlec(&run_args(
        &out,
        &example("tokenizer.model"),
        &example("tools.json"),
        "Turn off the lights in the kitchen",
    ));
    assert!(run.status.success(), "{}", stderr_of(&run));
}
