//! Every supported target, verified by running or linking what `needlec build` emits:
//! - aarch64 and riscv64 Linux: the golden cases' libraries (both fixtures, both fold modes)
//!   linked `-static` with Debian's cross compilers and run under qemu-user must give outputs
//!   byte-identical to the host library's;
//!   and so must the bundled model's `--grammar strict` library on the 40 samples (default and
//!   int4 weights: forced steps there run as multi-row steps);
//! - Android, Apple (Mach-O) and Windows (COFF): the objects are parsed (architecture, format,
//!   exports, relocations, sections, nothing undefined) and linked by lld into a shared library.
//!
//! `scripts/test` installs the toolchains (gcc-aarch64-linux-gnu, gcc-riscv64-linux-gnu,
//! qemu-user, lld) when it can; a check whose tool is still missing is skipped and reported at
//! the end of the run (under `.ci/run`, which sets `NEEDLEC_REQUIRE_TOOLS=1`, it fails).

use std::path::{Path, PathBuf};
use std::process::Command;

use needle_runtime::decode::FoldMode;
use needle_targets::{supported, Target};
use needle_test_support::toolchain::require;
use needle_test_support::{c, golden, read_json, work_dir, GreedyCase};
use needlec::build::{build, staticlib_file, BuildOptions, Emit};
use needlec::precision::Precision;
use object::{Object, ObjectSection, ObjectSymbol};

fn options(
    target: &Target,
    checkpoint: &str,
    tools: &str,
    fold: FoldMode,
    weights: Option<Precision>,
    out: &Path,
) -> BuildOptions {
    BuildOptions {
        checkpoint: golden(checkpoint),
        tokenizer: golden("dev4k.model"),
        tools: tools.to_string(),
        target: target.name.to_string(),
        cpu: None,
        features: target.features.iter().map(|f| f.to_string()).collect(),
        fold: Some(fold),
        weights,
        max_gen_len: 40,
        max_query_tokens: None,
        name: "needle".into(),
        escalate_below: 0.0,
        quantize_activations: false,
        grammar: Default::default(),
        max_forced_rows: needlec::codegen::model::MAX_FORCED_ROWS,
        emit: vec![Emit::Staticlib, Emit::Header, Emit::Obj],
        out_dir: out.to_path_buf(),
    }
}

/// Builds and links the library harness for `target`; returns the executable.
fn harness_for(target: &Target, out: &Path) -> PathBuf {
    let tc = target.test_toolchain();
    let exe = out.join("library_harness");
    let src = needle_test_support::repo_root().join("tests/c/library_harness.c");
    let res = Command::new(tc.cc)
        .args(tc.cc_args)
        .args(c::STRICT_C11)
        .args(["-pthread", "-DHEADER=\"needle.h\""])
        .arg("-I")
        .arg(out)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .arg(out.join(staticlib_file(target, "needle")))
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{target}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    exe
}

/// Answers `queries` with the harness's `ex` mode under the target's runner: per query,
/// `NAME_call_ex`'s status, confidence, escalate bit, tool, choice steps and output in hex (the
/// harness checks `NAME_call` gives the same status and bytes).
fn run_queries(target: &Target, exe: &Path, queries: &[&str]) -> String {
    let runner = target.test_toolchain().runner.expect("runnable target");
    let mut stdin = Vec::new();
    for q in queries {
        stdin.extend((q.len() as u32).to_le_bytes());
        stdin.extend(q.as_bytes());
    }
    let (program, args): (&str, Vec<&str>) = match runner.split_first() {
        Some((p, rest)) => (p, rest.to_vec()),
        None => (exe.to_str().unwrap(), vec![]),
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    if !runner.is_empty() {
        cmd.arg(exe);
    }
    let mut child = cmd
        .arg("ex")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{target}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn golden_groups() -> Vec<(String, Vec<String>)> {
    let expected: Vec<GreedyCase> = read_json(&golden("greedy_tiny.json"));
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for e in expected.iter().filter(|e| e.mode == "exact") {
        match groups.iter_mut().find(|(t, _)| *t == e.tools) {
            Some((_, qs)) => qs.push(e.query.clone()),
            None => groups.push((e.tools.clone(), vec![e.query.clone()])),
        }
    }
    groups
}

fn check_emulated(triple: &str, cc: &str, cc_package: &str, qemu: &str) {
    check_emulated_with(
        triple,
        &[],
        &["tiny_random.pkl", "small_random.pkl"],
        cc,
        cc_package,
        qemu,
    );
}

fn check_emulated_with(
    triple: &str,
    features: &[&str],
    checkpoints: &[&str],
    cc: &str,
    cc_package: &str,
    qemu: &str,
) {
    let what = format!("cross_targets: {triple}{features:?} under qemu");
    if require(cc, cc_package, &what).is_none() || require(qemu, "qemu-user", &what).is_none() {
        return;
    }
    let host = Target::host().unwrap();
    let target = Target::with_features(triple, features).unwrap();
    // The default weights for every checkpoint; int4 (packed nibbles, group scales) for the
    // first: every weight format decodes the same on every target. Where the target offers
    // it, int4 with `--quantize-activations` too: the integer dot products are exact
    // everywhere, so the answers match the host's as well.
    let vectors = target.int_dot_products();
    let builds = checkpoints.iter().enumerate().flat_map(|(i, &c)| {
        let int4 = (i == 0).then_some((c, Some(Precision::Int4), false));
        let int_dot = (i == 0 && vectors).then_some((c, Some(Precision::Int4), true));
        std::iter::once((c, None, false)).chain(int4).chain(int_dot)
    });
    for (checkpoint, weights, quantize_activations) in builds {
        for fold in [FoldMode::None, FoldMode::Tools] {
            for (g, (tools, queries)) in golden_groups().iter().enumerate() {
                let queries: Vec<&str> = queries.iter().map(String::as_str).collect();
                let w = weights.map_or("default", |p| p.name());
                let w = if quantize_activations {
                    format!("{w}-qa")
                } else {
                    w.to_string()
                };
                let tag = format!("{target}-{checkpoint}-{w}-{}-{g}", fold.name())
                    .replace([' ', '(', ')', ',', '+'], "_");
                let dir = work_dir(&tag);
                let outputs: Vec<String> = [&host, &target]
                    .iter()
                    .map(|t| {
                        let out = dir.join(t.name);
                        build(&BuildOptions {
                            quantize_activations,
                            ..options(t, checkpoint, tools, fold, weights, &out)
                        })
                        .unwrap();
                        let exe = harness_for(t, &out);
                        run_queries(t, &exe, &queries)
                    })
                    .collect();
                assert_eq!(outputs[0].lines().count(), queries.len());
                assert!(
                    outputs[0].lines().all(|l| l.starts_with("0 ")),
                    "{tag}: host statuses"
                );
                same_answers(
                    &outputs[1],
                    &outputs[0],
                    &format!("{tag}: {triple} vs host"),
                );
            }
        }
    }
}

#[test]
fn aarch64_linux_under_qemu_matches_host() {
    check_emulated(
        "aarch64-unknown-linux-gnu",
        "aarch64-linux-gnu-gcc",
        "gcc-aarch64-linux-gnu",
        "qemu-aarch64",
    );
}

/// `--grammar strict` under qemu: the bundled model's library answers the 40 samples exactly
/// as the host's does (the strict tables are target-independent data, the code that follows
/// them is generated per target), at a budget small enough to close some lists early.
fn check_strict_emulated(triple: &str, cc: &str, cc_package: &str, qemu: &str) {
    let what = format!("cross_targets: {triple} --grammar strict under qemu");
    if require(cc, cc_package, &what).is_none() || require(qemu, "qemu-user", &what).is_none() {
        return;
    }
    let host = Target::host().unwrap();
    let target = Target::with_features(triple, &[]).unwrap();
    let samples: Vec<needle_test_support::Sample> =
        read_json(&needle_test_support::tiny_needle("samples.json"));
    let queries: Vec<&str> = samples.iter().map(|s| s.query.as_str()).collect();
    let tools = needle_test_support::tiny_needle("tools.json");
    // The default weights and int4: under strict, forced steps run with the next step as
    // multi-row steps, whose integer matrix products take each row singly (as a one-row step).
    for weights in [None, Some(Precision::Int4)] {
        let w = weights.map_or("default", |p| p.name());
        let dir = work_dir(&format!("strict-{triple}-{w}"));
        let outputs: Vec<String> = [&host, &target]
            .iter()
            .map(|t| {
                let out = dir.join(t.name);
                build(&BuildOptions {
                    checkpoint: needle_test_support::tiny_needle("tiny-needle-folded.pkl"),
                    tokenizer: needle_test_support::tiny_needle("tokenizer.model"),
                    grammar: needle_runtime::decode::GrammarKind::Strict,
                    max_gen_len: 24,
                    ..options(
                        t,
                        "",
                        tools.to_str().unwrap(),
                        FoldMode::Tools,
                        weights,
                        &out,
                    )
                })
                .unwrap();
                let exe = harness_for(t, &out);
                run_queries(t, &exe, &queries)
            })
            .collect();
        assert_eq!(outputs[0].lines().count(), queries.len());
        assert!(
            outputs[0].lines().all(|l| l.starts_with("0 ")),
            "host statuses"
        );
        same_answers(
            &outputs[1],
            &outputs[0],
            &format!("strict {w}: {triple} vs host"),
        );
    }
}

#[test]
fn aarch64_strict_grammar_under_qemu_matches_host() {
    check_strict_emulated(
        "aarch64-unknown-linux-gnu",
        "aarch64-linux-gnu-gcc",
        "gcc-aarch64-linux-gnu",
        "qemu-aarch64",
    );
}

#[test]
fn riscv64_strict_grammar_under_qemu_matches_host() {
    check_strict_emulated(
        "riscv64gc-unknown-linux-gnu",
        "riscv64-linux-gnu-gcc",
        "gcc-riscv64-linux-gnu",
        "qemu-riscv64",
    );
}

#[test]
fn riscv64_linux_under_qemu_matches_host() {
    check_emulated(
        "riscv64gc-unknown-linux-gnu",
        "riscv64-linux-gnu-gcc",
        "gcc-riscv64-linux-gnu",
        "qemu-riscv64",
    );
}

/// The object of every target parses as the right format and architecture, exports exactly the
/// prefixed C interface, defines its code and data, references nothing undefined, carries
/// relocations, and links into a shared library with lld (skipped per target when the linker is
/// missing; the object checks still run).
/// The `ex` lines of a target and of the host: everything byte-identical but the confidence,
/// which may differ in its last bits (fused multiply-add where the ISA has it, in `exp`).
fn same_answers(target: &str, host: &str, what: &str) {
    assert_eq!(target.lines().count(), host.lines().count(), "{what}");
    for (t, h) in target.lines().zip(host.lines()) {
        let (tf, hf): (Vec<&str>, Vec<&str>) = (t.split(' ').collect(), h.split(' ').collect());
        // status confidence escalate tool parsed choice_steps hex
        assert_eq!(tf.len(), 7, "{what}: {t}");
        let rest = |f: &[&str]| [f[0], f[2], f[3], f[4], f[5], f[6]].join(" ");
        assert_eq!(rest(&tf), rest(&hf), "{what}");
        let conf = |s: &str| s.parse::<f32>().unwrap();
        assert!(
            (conf(tf[1]) - conf(hf[1])).abs() <= 1e-5,
            "{what}: confidence {} vs {}",
            tf[1],
            hf[1]
        );
    }
}

#[test]
fn every_target_object_is_well_formed_and_links() {
    let (tools, _) = golden_groups().remove(0);
    for t in supported() {
        let target = Target::from_triple(t.triple).unwrap();
        let dir = work_dir(&format!("objects-{}", t.triple));
        build(&options(
            &target,
            "tiny_random.pkl",
            &tools,
            FoldMode::Tools,
            // The packed int4 format: two data objects per weight (q and scales).
            Some(Precision::Int4),
            &dir,
        ))
        .unwrap();
        let obj_path = dir.join(format!("needle.{}", target.object_extension()));
        let bytes = std::fs::read(&obj_path).unwrap();
        let file = object::File::parse(&*bytes).unwrap();
        let want_format = match target.object_format() {
            needle_targets::ObjectFormat::Elf => object::BinaryFormat::Elf,
            needle_targets::ObjectFormat::MachO => object::BinaryFormat::MachO,
            needle_targets::ObjectFormat::Coff => object::BinaryFormat::Coff,
        };
        assert_eq!(file.format(), want_format, "{}", t.triple);
        let want_arch = match target.arch {
            needle_targets::Arch::X86_64 => object::Architecture::X86_64,
            needle_targets::Arch::Aarch64 => object::Architecture::Aarch64,
            needle_targets::Arch::Riscv64 => object::Architecture::Riscv64,
        };
        assert_eq!(file.architecture(), want_arch, "{}", t.triple);
        // COFF objects carry no word size of their own; the machine type above pins it.
        let is_64 = file.is_64() || file.format() == object::BinaryFormat::Coff;
        assert!(file.is_little_endian() && is_64, "{}", t.triple);
        let prefix = target.symbol_prefix();
        let mut exports: Vec<String> = file
            .symbols()
            .filter(|s| s.is_global() && s.is_definition())
            .map(|s| s.name().unwrap().strip_prefix(prefix).unwrap().to_string())
            .collect();
        exports.sort();
        assert_eq!(
            exports,
            [
                "needle_call",
                "needle_call_ex",
                "needle_call_tokens",
                "needle_model_info",
                "needle_tool_name",
                "needle_workspace_size"
            ],
            "{}",
            t.triple
        );
        assert!(
            file.symbols().all(|s| !s.is_undefined()),
            "{}: undefined symbols",
            t.triple
        );
        let text = file
            .sections()
            .find(|s| s.kind() == object::SectionKind::Text)
            .expect("code");
        assert!(
            text.size() > 0 && text.relocations().count() > 0,
            "{}: code with relocations",
            t.triple
        );
        assert!(
            file.sections()
                .any(|s| s.kind() == object::SectionKind::ReadOnlyData && s.size() > 0),
            "{}: read-only data",
            t.triple
        );
        if t.triple == "aarch64-linux-android" {
            let object::File::Elf64(elf) = &file else {
                panic!("android: ELF64")
            };
            let header = elf.elf_header();
            let e = object::Endianness::Little;
            assert_eq!(header.e_machine.get(e), object::elf::EM_AARCH64);
            assert_eq!(header.e_type.get(e), object::elf::ET_REL);
            assert_eq!(header.e_ident.os_abi, object::elf::ELFOSABI_NONE);
            let ar = std::fs::read(dir.join("libneedle.a")).unwrap();
            let report = needlec::emit::check_standalone(&ar, "needle_").unwrap();
            assert_eq!(report.objects, 1);
        }
        // A real linker for the target accepts the object on its own.
        let link = target.test_toolchain().link;
        let what = format!("cross_targets: linking the {} object", t.triple);
        let Some(linker) = require(link[0], "lld", &what) else {
            continue;
        };
        let out = dir.join("linked");
        let mut cmd = Command::new(linker);
        cmd.args(&link[1..]);
        if link[0] == "lld-link" {
            cmd.arg(format!("/out:{}", out.display()));
        } else {
            cmd.arg("-o").arg(&out);
        }
        let res = cmd.arg(&obj_path).output().unwrap();
        assert!(
            res.status.success(),
            "{}: {} failed: {}",
            t.triple,
            link[0],
            String::from_utf8_lossy(&res.stderr)
        );
    }
}

/// `--features v`: the RISC-V vector extension changes the code (f32x4 through RVV); run under
/// an emulated CPU that has it, it still matches the host byte for byte.
#[test]
fn riscv64_vector_extension_under_qemu_matches_host() {
    check_emulated_with(
        "riscv64gc-unknown-linux-gnu",
        &["v"],
        &["tiny_random.pkl"],
        "riscv64-linux-gnu-gcc",
        "gcc-riscv64-linux-gnu",
        "qemu-riscv64",
    );
}
