//! Needle 3 libraries (`needlec build` of a Needle 3 checkpoint) through their C interface,
//! against the runtime's engine (`needle_runtime::needle3::engine`):
//!
//! - the answer code alone (`tests/c/needle3_answer_harness.c`) against `read_envelope` on
//!   crafted and random texts: think blocks, Unicode white space, JSON calls rewritten with
//!   `ensure_ascii=False`, text passed through;
//! - whole libraries of the small golden checkpoint (`tests/c/needle3_library_harness.c`):
//!   every query's calls, reasoning, generated count and heads as the engine gives them, the
//!   token-level entry's ids, the embedding, the argument checks; folded and unfolded libraries
//!   give the same bytes and bits; a ladder depth with a system turn; natively and under qemu
//!   on aarch64 and riscv64;
//! - every supported target builds a standalone library.

use std::path::{Path, PathBuf};
use std::process::Command;

use needle_runtime::confidence::chosen_tool;
use needle_runtime::needle3::engine::{read_envelope, Engine};
use needle_runtime::needle3::prompt::{encode_query, tools_json};
use needle_runtime::needle3::Model;
use needle_runtime::tokenizer::Tokenizer;
use needle_targets::{supported, Target};
use needle_test_support::c::{build_harness, run};
use needle_test_support::toolchain::require;
use needle_test_support::{work_dir, Rng};
use needlec::abi::write_header;
use needlec::build::{BuildOptions, Emit};
use needlec::codegen::needle3::answer::define_answer;
use needlec::codegen::output::define_output_with;
use needlec::codegen::KernelSet;
use needlec::emit::{check_standalone, write_archive, ArchiveMember};
use needlec::needle3::{build, tool_names, Needle3BuildOptions};

const TOOLS: &str = r#"[{"name":"get_weather","description":"Weather for a city","parameters":{"location":{"type":"string","description":"City name.","required":true}}},{"name":"send_message","description":"Send a message","parameters":{"to":{"type":"string","description":"Who.","required":true},"body":{"type":"string","description":"The text.","required":true}}}]"#;
const MAX_GEN_LEN: usize = 48;

fn fixture(name: &str) -> PathBuf {
    needle_test_support::repo_root()
        .join("tests/fixtures/needle3")
        .join(name)
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixture("n3tok2k.model")).unwrap()
}

fn hex(b: &[u8]) -> String {
    if b.is_empty() {
        return "-".into();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    if s == "-" {
        return Vec::new();
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

// ---- the answer code ----------------------------------------------------------------------------

/// Whether the runtime reads a `<tool_call>` block in `text` (the answer's `tool` is then the
/// first call's; without one it is -1).
fn has_calls_block(text: &str) -> bool {
    let mut rest = text.trim_start();
    if let Some(after) = rest.strip_prefix("<think>") {
        match after.split_once("</think>") {
            Some((_, tail)) => rest = tail.trim_start(),
            None => return false,
        }
    }
    rest.starts_with("<tool_call>")
}

fn crafted_texts() -> Vec<String> {
    [
        "",
        "   ",
        "\n\n\n",
        r#"<tool_call>[{"name":"get_weather","arguments":{"location":"Zürich"}}]</tool_call>"#,
        "<think>\nweather, Paris\n</think>\n<tool_call>[{\"name\":\"send_message\",\"arguments\":{\"to\":\"Zoë\",\"body\":\"à demain \\u00e9 \\ud83d\\ude00\"}}]</tool_call><|im_end|>",
        "<think>unclosed reasoning  ",
        "<think>\u{3000}\u{2003}x\u{a0}</think>\u{85}<tool_call>[1, 2.50, 1e5, true, null]</tool_call>",
        "<tool_call>[{\"name\"",
        "just text",
        "  <tool_call>{\"name\": \"get_weather\"}</tool_call>trailing",
        "<think></think><tool_call>[]</tool_call>",
        "<think> </think>x",
        "\u{1680}<think>a\u{2028}</think>\u{205f}<tool_call>\"\\u0000\u{7f}\u{80}\"</tool_call>",
        "<tool_call><tool_call>[1]</tool_call>",
        "<tool_call>[1]",
        "<thinking>",
        "<tool_call>[\"\\u00e9\\n\\t\\\"\\/\"]</tool_call>",
        "<tool_call> [ {\"name\" : \"send_message\" , \"arguments\" : { } } ] </tool_call>",
        "\u{202f}\u{200a}<tool_call>[{\"a\":1,\"a\":2}]</tool_call>",
        "<think>\u{2029}\n</think><tool_call>{\"name\":\"nope\"}",
        "x<think>y</think>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Random texts built from the pieces the envelope reader cares about.
fn random_texts(n: usize) -> Vec<String> {
    let pieces = [
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        "<|im_end|>",
        " ",
        "\n",
        "\t",
        "\u{a0}",
        "\u{85}",
        "\u{3000}",
        "\u{2009}",
        "\u{200b}",
        "é",
        "😀",
        "[",
        "]",
        "{",
        "}",
        ",",
        ":",
        "\"name\"",
        "\"get_weather\"",
        "\"send_message\"",
        "\"x\\u00e9\"",
        "1",
        "-2.5",
        "true",
        "word",
        "<",
        ">",
    ];
    let mut rng = Rng(31);
    (0..n)
        .map(|_| {
            let k = rng.below(12);
            let mut s = String::new();
            if rng.chance(50) {
                s.push_str(r#"<tool_call>[{"name":"get_weather","arguments":{"location":"#);
            }
            for _ in 0..k {
                let piece: &&str = rng.pick(&pieces);
                s.push_str(piece);
            }
            s
        })
        .collect()
}

#[test]
fn the_answer_code_reads_envelopes_as_the_runtime_does() {
    let target = Target::host().unwrap();
    let tok = tokenizer();
    let names: Vec<(String, String)> = tool_names(&tools_json(TOOLS).unwrap())
        .into_iter()
        .map(|n| (n.clone(), n))
        .collect();
    let mut ks = KernelSet::new(&target, "ans_").unwrap();
    let output = define_output_with(&mut ks, &tok, &names, 1 << 16, false, false).unwrap();
    define_answer(&mut ks, &output, true).unwrap();
    let header = write_header("ans", &["answer test"], "", ks.functions());
    let obj = ks.finish().unwrap();
    let rep = check_standalone(&obj, "ans_").unwrap();
    assert_eq!(rep.exports, ["ans_answer"]);
    let ar = write_archive(
        target.archive_kind(),
        &[ArchiveMember {
            name: format!("answer.{}", target.object_extension()),
            data: obj,
        }],
    )
    .unwrap();
    let dir = work_dir("library_needle3_answer");
    let exe = build_harness(&dir, "ans", &ar, &header, "needle3_answer_harness.c");
    let mut texts = crafted_texts();
    texts.extend(random_texts(400));
    let mut input = String::new();
    for t in &texts {
        let cap = output.max_output_bytes(t.len());
        input.push_str(&format!(
            "{cap} {} {}\n",
            output.scratch_bytes(t.len()),
            hex(t.as_bytes())
        ));
    }
    // A cap one byte short of a non-empty answer: the size needed comes back.
    let short = crafted_texts()[3].clone();
    input.push_str(&format!(
        "5 {} {}\n",
        output.scratch_bytes(short.len()),
        hex(short.as_bytes())
    ));
    let out = run(&exe, &[], input.as_bytes());
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), texts.len() + 1);
    let (mut parsed_seen, mut reasoning_seen, mut unicode_seen) = (0, 0, 0);
    for (text, line) in texts.iter().zip(&lines) {
        let f: Vec<&str> = line.split(' ').collect();
        let want = read_envelope(text);
        assert_eq!(f[0], "0", "{text:?}: status ({line})");
        let got = unhex(f[2]);
        assert_eq!(
            String::from_utf8_lossy(&got),
            want.calls,
            "{text:?}: the calls"
        );
        assert_eq!(f[1].parse::<usize>().unwrap(), want.calls.len());
        assert_eq!(f[4] == "1", want.parsed, "{text:?}: parsed");
        let tool = if has_calls_block(text) {
            chosen_tool(&want.calls, &names).map_or(-1, |i| i as i64)
        } else {
            -1
        };
        assert_eq!(f[3].parse::<i64>().unwrap(), tool, "{text:?}: tool");
        let (start, len, present): (usize, usize, usize) = (
            f[5].parse().unwrap(),
            f[6].parse().unwrap(),
            f[7].parse().unwrap(),
        );
        match &want.reasoning {
            Some(r) => {
                assert_eq!(present, 1, "{text:?}: reasoning");
                assert_eq!(&text[start..start + len], r, "{text:?}: reasoning");
                reasoning_seen += 1;
            }
            None => assert_eq!((present, len), (0, 0), "{text:?}: no reasoning"),
        }
        parsed_seen += usize::from(want.parsed);
        unicode_seen += usize::from(want.parsed && !want.calls.is_ascii());
    }
    let last: Vec<&str> = lines.last().unwrap().split(' ').collect();
    assert_eq!(last[0], "1", "a small cap is reported");
    assert_eq!(
        last[1].parse::<usize>().unwrap(),
        read_envelope(&short).calls.len()
    );
    // The cases exercise what they are for.
    assert!(parsed_seen >= 10 && reasoning_seen >= 5 && unicode_seen >= 2);
}

// ---- whole libraries ----------------------------------------------------------------------------

/// The small model's checkpoints: float32 safetensors, and the package's `.cact` export (CQ).
const SAFETENSORS: &str = "small.safetensors";
const CACT: &str = "small.cact";

fn options(out_dir: &Path, target: &str, fold: bool, strict: bool) -> BuildOptions {
    options_for(SAFETENSORS, out_dir, target, fold, strict)
}

fn options_for(
    checkpoint: &str,
    out_dir: &Path,
    target: &str,
    fold: bool,
    strict: bool,
) -> BuildOptions {
    BuildOptions {
        checkpoint: fixture(checkpoint),
        tokenizer: fixture("n3tok2k.model"),
        tools: TOOLS.to_string(),
        target: target.to_string(),
        cpu: None,
        features: Vec::new(),
        fold: Some(if fold {
            needle_runtime::decode::FoldMode::Tools
        } else {
            needle_runtime::decode::FoldMode::None
        }),
        weights: None,
        max_gen_len: MAX_GEN_LEN,
        max_query_tokens: Some(96),
        name: "n3lib".to_string(),
        escalate_below: 0.6,
        quantize_activations: false,
        grammar: if strict {
            needle_runtime::decode::GrammarKind::Strict
        } else {
            needle_runtime::decode::GrammarKind::Reference
        },
        max_forced_rows: 1,
        emit: vec![Emit::Staticlib, Emit::Header],
        out_dir: out_dir.to_path_buf(),
    }
}

fn queries() -> Vec<String> {
    vec![
        "What's the weather in Paris?".into(),
        String::new(),
        "  leading spaces".into(),
        "Envoie un message à Zoë: à demain 😀".into(),
        "tabs\tand\nnewlines".into(),
        "a <|im_end|> marker and </tools> inside".into(),
        // Over the 96 query-part tokens: refused.
        "word ".repeat(200),
    ]
}

/// The library for `target` linked into the harness: the command that runs it.
fn library_harness(
    checkpoint: &str,
    dir: &Path,
    target: &Target,
    fold: bool,
    strict: bool,
    n3: &Needle3BuildOptions,
) -> Vec<String> {
    let lib_dir = dir.join(if fold { "folded" } else { "unfolded" });
    std::fs::create_dir_all(&lib_dir).unwrap();
    let mut opts = options_for(checkpoint, &lib_dir, target.name, fold, strict);
    // The target's opt-in features travel with it (`--features`).
    opts.features = needle_targets::known_features(target.arch)
        .into_iter()
        .filter(|f| target.has(f))
        .map(str::to_string)
        .collect();
    build(&opts, n3).unwrap();
    let exe = lib_dir.join("needle3_library_harness");
    let src = needle_test_support::repo_root().join("tests/c/needle3_library_harness.c");
    let host = target.name == Target::host().unwrap().name;
    let (cc, cc_args, runner): (String, Vec<&str>, Vec<String>) = if host {
        (needle_test_support::c::cc(), Vec::new(), Vec::new())
    } else {
        let tc = target.test_toolchain();
        (
            tc.cc.to_string(),
            tc.cc_args.to_vec(),
            tc.runner
                .expect("a runnable target")
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )
    };
    let res = Command::new(cc)
        .args(cc_args)
        .args(needle_test_support::c::STRICT_C11)
        .arg("-DHEADER=\"n3lib.h\"")
        .arg("-I")
        .arg(&lib_dir)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .arg(lib_dir.join("libn3lib.a"))
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{target}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let mut cmd = runner;
    cmd.push(exe.display().to_string());
    cmd
}

fn run_cmd(cmd: &[String], input: &str) -> Vec<String> {
    let exe = PathBuf::from(&cmd[0]);
    let out = run(
        &exe,
        &cmd[1..].iter().map(String::as_str).collect::<Vec<_>>(),
        input.as_bytes(),
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn f32_of(hex: &str) -> f32 {
    f32::from_bits(u32::from_str_radix(hex, 16).unwrap())
}

/// Builds the folded and unfolded libraries for `target`, runs every query through both, and
/// checks them against the engine and each other.
fn check_libraries(target: &Target, tag: &str, strict: bool, n3: &Needle3BuildOptions) {
    check_libraries_of(SAFETENSORS, target, tag, strict, n3);
}

fn load(checkpoint: &str) -> Model {
    let data = std::fs::read(fixture(checkpoint)).unwrap();
    if checkpoint.ends_with(".cact") {
        Model::from_cact_bytes(&data).unwrap()
    } else {
        Model::from_safetensors_bytes(&data).unwrap()
    }
}

fn check_libraries_of(
    checkpoint: &str,
    target: &Target,
    tag: &str,
    strict: bool,
    n3: &Needle3BuildOptions,
) {
    let dir = work_dir(&format!("library_needle3_{tag}"));
    let tok = tokenizer();
    let mut model = load(checkpoint);
    if let Some(depth) = n3.layers {
        model = model.into_ladder(depth).unwrap();
    }
    let mut engine = Engine::new(
        model,
        tok.clone(),
        &n3.system,
        tools_json(TOOLS).unwrap(),
        true,
    )
    .unwrap();
    if strict {
        engine = engine.with_strict_grammar().unwrap();
    }
    let continuing = tok.continuing();
    let mut input = String::new();
    let qs = queries();
    for q in &qs {
        input.push_str(&format!("Q {}\n", hex(q.as_bytes())));
        let ids = encode_query(&continuing, q);
        input.push_str(&format!(
            "T {} {}\n",
            ids.len(),
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        ));
        input.push_str(&format!("E {}\n", hex(q.as_bytes())));
    }
    input.push_str("X\n");
    let folded = run_cmd(
        &library_harness(checkpoint, &dir, target, true, strict, n3),
        &input,
    );
    let unfolded = run_cmd(
        &library_harness(checkpoint, &dir, target, false, strict, n3),
        &input,
    );
    assert_eq!(
        folded, unfolded,
        "{target}: folded and unfolded libraries differ"
    );
    assert_eq!(folded.len(), 3 * qs.len() + 1);
    let (mut answered, mut parsed) = (0, 0);
    for (i, q) in qs.iter().enumerate() {
        let call: Vec<&str> = folded[3 * i].split(' ').collect();
        let tokens: Vec<&str> = folded[3 * i + 1].split(' ').collect();
        let embed: Vec<&str> = folded[3 * i + 2].split(' ').collect();
        let n_ids = encode_query(&continuing, q).len();
        if n_ids > 96 {
            assert_eq!(
                (call[0], tokens[0], embed[0]),
                ("4", "4", "4"),
                "{q:?}: too long"
            );
            continue;
        }
        answered += 1;
        let g = engine.generate(q, MAX_GEN_LEN - 1).unwrap();
        assert_eq!(call[0], "0", "{target} {q:?}: {}", folded[3 * i]);
        assert_eq!(unhex(call[2]), g.calls.as_bytes(), "{target} {q:?}: calls");
        assert_eq!(call[5] == "1", g.parsed, "{target} {q:?}: parsed");
        parsed += usize::from(g.parsed);
        assert_eq!(
            call[7].parse::<usize>().unwrap(),
            g.new_ids.len(),
            "{target} {q:?}"
        );
        let reasoning = g.reasoning.clone().unwrap_or_default();
        assert_eq!(
            unhex(call[13]),
            reasoning.as_bytes(),
            "{target} {q:?}: reasoning"
        );
        assert_eq!(call[8].parse::<usize>().unwrap(), reasoning.len());
        assert_eq!(
            call[14], "1",
            "{target} {q:?}: NAME_call differs from NAME_call_ex"
        );
        let logit = g.heads.confidence.unwrap();
        assert!(
            (f32_of(call[9]) - logit).abs() < 1e-5,
            "{target} {q:?}: confidence logit"
        );
        let conf = 1.0 / (1.0 + (-f64::from(logit)).exp());
        assert!(
            (f64::from(f32_of(call[1 + 2])) - conf).abs() < 1e-5,
            "{target} {q:?}: confidence"
        );
        assert_eq!(call[4] == "1", conf < 0.6, "{target} {q:?}: escalate");
        for (k, want) in g.heads.router.as_ref().unwrap().iter().enumerate() {
            assert!(
                (f32_of(call[10 + k]) - want).abs() < 1e-5,
                "{target} {q:?}: router"
            );
        }
        // The token-level entry: the engine's ids without the final EOS.
        let mut want_ids = g.new_ids.clone();
        if want_ids.last() == Some(&1) {
            want_ids.pop();
        }
        let got_ids: Vec<u32> = tokens[2..].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(
            (tokens[0], got_ids),
            ("0", want_ids),
            "{target} {q:?}: call_tokens"
        );
        let want_embedding = engine.embed(q).unwrap().unwrap();
        assert_eq!(embed[0], "0");
        assert_eq!(embed.len() - 1, want_embedding.len());
        for (got, want) in embed[1..].iter().zip(&want_embedding) {
            assert!(
                (f32_of(got) - want).abs() < 1e-5,
                "{target} {q:?}: embedding"
            );
        }
    }
    assert!(answered >= 5);
    if strict {
        // Under the strict grammar every answer is a call list.
        assert_eq!(parsed, answered, "{target}: strict answers parse");
    }
    // NULL workspace, misaligned, NULL out_len, NULL query, NULL result, bad UTF-8, too long,
    // no ids, a bad id; a zero cap; the ABI version and generation.
    let x = folded.last().unwrap();
    assert!(
        x.starts_with("1 1 2 2 2 3 4 2 6 "),
        "{target}: argument checks: {x}"
    );
    assert!(x.ends_with(" 1 3"), "{target}: model info: {x}");
}

#[test]
fn needle3_libraries_answer_as_the_engine_folded_and_unfolded() {
    check_libraries(
        &Target::host().unwrap(),
        "host",
        false,
        &Needle3BuildOptions::default(),
    );
}

#[test]
fn a_needle3_library_at_a_ladder_depth_with_a_system_turn_answers_as_the_engine() {
    let n3 = Needle3BuildOptions {
        system: "You are a helpful assistant.".into(),
        layers: Some(4),
    };
    check_libraries(&Target::host().unwrap(), "ladder", false, &n3);
}

/// A `.cact` export's library keeps its CQ weights as the file's codes (docs/needle3.md 13.1):
/// the engram tables and the embedding dequantized a row at a time (bit for bit the runtime's
/// rows), the attention, engram and logits products over the codes with the activations
/// rotated. Folded and unfolded libraries agree bit for bit, and with the engine on the
/// dequantized model; its object holds codes, not float32 copies.
#[test]
fn a_needle3_library_from_a_cact_export_keeps_its_weights_in_cq_form() {
    check_libraries_of(
        CACT,
        &Target::host().unwrap(),
        "cact",
        false,
        &Needle3BuildOptions::default(),
    );
    // x86-64 with SSSE3 looks 16 codes up a byte shuffle, as aarch64 does (under qemu below).
    let host = Target::host().unwrap();
    if host.arch == needle_targets::Arch::X86_64
        && needle_targets::host_cpu_features().contains(&"ssse3")
    {
        let ssse3 = Target::with_features(host.name, &["ssse3"]).unwrap();
        check_libraries_of(CACT, &ssse3, "cact_ssse3", false, &Default::default());
    }
    let model = load(CACT);
    let dir = work_dir("library_needle3_cact_obj");
    let mut opts = options_for(CACT, &dir, Target::host().unwrap().name, true, false);
    opts.emit = vec![Emit::Obj];
    let report = build(&opts, &Needle3BuildOptions::default()).unwrap();
    let obj = std::fs::read(&report.written[0]).unwrap();
    let file = object::File::parse(&*obj).unwrap();
    use object::{Object, ObjectSymbol};
    let size_of = |name: &str| {
        file.symbols()
            .find(|s| {
                s.name()
                    .is_ok_and(|n| n.trim_start_matches('_') == format!("n3lib_{name}"))
            })
            .map(|s| s.size() as usize)
    };
    for (s, site) in model.sites.iter().enumerate() {
        let t = site.tables_cq.as_ref().unwrap();
        assert_eq!(size_of(&format!("n3_s{s}_tables")), None, "float32 tables");
        assert_eq!(
            size_of(&format!("n3_s{s}_tables_codes")),
            Some(t.packed.len() + 1),
            "site {s}: the codes"
        );
        assert!(size_of(&format!("n3_s{s}_tables_norms")).unwrap() >= 4 * t.norms.len());
        for proj in ["key", "value"] {
            assert_eq!(size_of(&format!("n3_s{s}_{proj}")), None, "float32 {proj}");
            assert!(size_of(&format!("n3_s{s}_{proj}_codes")).is_some());
        }
    }
    // The embedding (lookups and tied logits) and every layer's attention products.
    assert_eq!(size_of("n3_embedding"), None);
    let emb = model.embedding_cq.as_ref().unwrap();
    assert_eq!(size_of("n3_embedding_codes"), Some(emb.packed.len() + 1));
    let names: Vec<String> = file
        .symbols()
        .filter_map(|s| s.name().ok().map(str::to_string))
        .collect();
    for suffix in ["_qkvg_codes", "_wout_codes", "_phi_codes"] {
        let n = names.iter().filter(|n| n.ends_with(suffix)).count();
        assert_eq!(n, model.layers.len(), "{suffix}");
    }
    assert!(!names
        .iter()
        .any(|n| n.ends_with("_qkvg") || n.ends_with("_wout") || n.ends_with("_phi")));
    // The heads' output projections (the embedding head's is the big one).
    let heads = [
        &model.heads.embedding,
        &model.heads.confidence,
        &model.heads.router,
    ];
    let n_heads = heads.into_iter().flatten().count();
    assert!(n_heads >= 2);
    let proj_codes = names.iter().filter(|n| n.ends_with("_proj_codes")).count();
    assert_eq!(proj_codes, n_heads);
    assert!(!names.iter().any(|n| n.ends_with("_proj")));
}

fn check_emulated(triple: &str, cc: &str, cc_package: &str, qemu: &str) {
    let what = format!("library_needle3: {triple} under qemu");
    if require(cc, cc_package, &what).is_none() || require(qemu, "qemu-user", &what).is_none() {
        return;
    }
    let target = Target::from_triple(triple).unwrap();
    check_libraries(&target, triple, false, &Needle3BuildOptions::default());
    check_libraries(
        &target,
        &format!("{triple}_strict"),
        true,
        &Needle3BuildOptions::default(),
    );
    check_libraries_of(
        CACT,
        &target,
        &format!("{triple}_cact"),
        false,
        &Needle3BuildOptions::default(),
    );
}

#[test]
fn strict_needle3_libraries_answer_as_the_strict_engine() {
    check_libraries(
        &Target::host().unwrap(),
        "strict",
        true,
        &Needle3BuildOptions::default(),
    );
}

#[test]
fn needle3_libraries_under_qemu_aarch64_answer_as_the_engine() {
    check_emulated(
        "aarch64-unknown-linux-gnu",
        "aarch64-linux-gnu-gcc",
        "gcc-aarch64-linux-gnu",
        "qemu-aarch64",
    );
}

#[test]
fn needle3_libraries_under_qemu_riscv64_answer_as_the_engine() {
    check_emulated(
        "riscv64gc-unknown-linux-gnu",
        "riscv64-linux-gnu-gcc",
        "gcc-riscv64-linux-gnu",
        "qemu-riscv64",
    );
}

/// Every supported target builds a standalone Needle 3 library (the build checks it) with its
/// whole C interface.
#[test]
fn every_target_builds_a_standalone_needle3_library() {
    let dir = work_dir("library_needle3_targets");
    for t in supported() {
        let out = dir.join(t.triple);
        let mut opts = options(&out, t.triple, true, true);
        opts.emit = vec![Emit::Obj, Emit::Header];
        let report = build(&opts, &Needle3BuildOptions::default()).unwrap();
        let obj = std::fs::read(&report.written[0]).unwrap();
        let rep = check_standalone(&obj, "n3lib_").unwrap();
        for f in [
            "call",
            "call_ex",
            "call_tokens",
            "embed",
            "model_info",
            "reasoning",
            "tool_name",
            "workspace_size",
        ] {
            assert!(
                rep.exports
                    .iter()
                    .any(|e| e.trim_start_matches('_') == format!("n3lib_{f}")),
                "{}: n3lib_{f} missing from {:?}",
                t.triple,
                rep.exports
            );
        }
    }
}
