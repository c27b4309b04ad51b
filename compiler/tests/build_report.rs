//! `needlec build --report` on the bundled model: the components it names add up to the emitted
//! object's code and read-only data, read back independently here; the ones whose size follows
//! from the model are exactly that size; the workspace regions fit in the header's workspace.

use std::path::Path;
use std::process::Command;

use needle_test_support::{tiny_needle, work_dir};
use object::{Object, ObjectSection, SectionKind};
use serde_json::Value;

fn build_with_report(dir: &Path, fold: &str) -> (String, Value, Vec<u8>, String) {
    let ckpt = if fold == "tools" {
        "tiny-needle-folded.pkl"
    } else {
        "tiny-needle.pkl"
    };
    let out = Command::new(env!("CARGO_BIN_EXE_needlec"))
        .args(["build", "--checkpoint"])
        .arg(tiny_needle(ckpt))
        .arg("--tokenizer")
        .arg(tiny_needle("tokenizer.model"))
        .arg("--tools")
        .arg(tiny_needle("tools.json"))
        .args(["--fold", fold, "--weights", "int4", "--max-gen-len", "64"])
        .args(["--report", "--emit", "obj", "--emit", "header", "--out-dir"])
        .arg(dir)
        .output()
        .expect("needlec runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("needle.report.json")).unwrap())
            .unwrap();
    let object = std::fs::read(dir.join("needle.o")).unwrap();
    let header = std::fs::read_to_string(dir.join("needle.h")).unwrap();
    (table, json, object, header)
}

fn component(report: &Value, name: &str) -> Option<u64> {
    report["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .map(|c| c["bytes"].as_u64().unwrap())
}

#[test]
fn the_report_accounts_for_every_byte_and_sizes_what_the_model_fixes() {
    for fold in ["tools", "none"] {
        let dir = work_dir(&format!("build-report-{fold}"));
        let (table, report, object, header) = build_with_report(&dir, fold);

        // Every byte of code and read-only data is in exactly one component.
        let file = object::File::parse(&*object).unwrap();
        let flash: u64 = file
            .sections()
            .filter(|s| {
                matches!(
                    s.kind(),
                    SectionKind::Text | SectionKind::ReadOnlyData | SectionKind::Data
                )
            })
            .map(|s| s.size())
            .sum();
        let components = report["components"].as_array().unwrap();
        let total: u64 = components
            .iter()
            .map(|c| c["bytes"].as_u64().unwrap())
            .sum();
        assert_eq!(total, flash, "{fold}: {report:#}");
        assert_eq!(report["object_bytes"].as_u64(), Some(object.len() as u64));

        // The bundled model: vocabulary 2048, d_model 128, float16; 2 + 2 layers.
        assert_eq!(
            component(&report, "embedding (token table, tied logits)"),
            Some(2048 * 128 * 2),
            "{fold}: the float16 embedding, whole and alone"
        );
        for layer in [
            "encoder layer  0",
            "encoder layer  1",
            "decoder layer  0",
            "decoder layer  1",
        ] {
            let name = format!("{layer}: weights, norms, gates");
            assert!(
                component(&report, &name).is_some_and(|b| b > 0),
                "{fold}: {name}"
            );
        }
        let folded = component(&report, "folded tools side: encoder keys and values");
        assert_eq!(
            folded.is_some(),
            fold == "tools",
            "{fold}: folded K/V iff folded"
        );
        for kind in ["tokenizer tables", "grammar tables", "code: model kernels"] {
            assert!(component(&report, kind).is_some(), "{fold}: {kind}");
        }

        // The workspace: the header's size, every region inside it.
        let size: u64 = header
            .lines()
            .find_map(|l| l.strip_prefix("#define NEEDLE_WORKSPACE_SIZE ((size_t)"))
            .and_then(|v| v.trim_end_matches(')').parse().ok())
            .expect("the header defines the workspace size");
        assert_eq!(report["workspace_bytes"].as_u64(), Some(size));
        for r in report["workspace"].as_array().unwrap() {
            let end = r["offset"].as_u64().unwrap() + r["bytes"].as_u64().unwrap();
            assert!(end <= size, "{fold}: {r} ends past {size}");
        }
        assert_eq!(report["options"]["weights"], "int4");
        assert_eq!(report["options"]["fold"], fold);
        assert_eq!(report["options"]["grammar"], "reference");

        // The table says the same.
        assert!(
            table.contains("embedding (token table, tied logits)"),
            "{table}"
        );
        assert!(table.contains("524,288"), "{table}");
        assert!(table.contains("workspace: "), "{table}");
    }
}

/// `--grammar strict`: the report names the option, counts the strict tables as grammar tables
/// (more of them than the reference's tries), and the summary line says so.
#[test]
fn a_strict_build_reports_its_grammar_and_tables() {
    let reference_dir = work_dir("build-report-grammar-reference");
    let (_, reference, _, _) = build_with_report(&reference_dir, "tools");
    let dir = work_dir("build-report-grammar-strict");
    let out = Command::new(env!("CARGO_BIN_EXE_needlec"))
        .args(["build", "--checkpoint"])
        .arg(tiny_needle("tiny-needle-folded.pkl"))
        .arg("--tokenizer")
        .arg(tiny_needle("tokenizer.model"))
        .arg("--tools")
        .arg(tiny_needle("tools.json"))
        .args([
            "--fold",
            "tools",
            "--weights",
            "int4",
            "--max-gen-len",
            "64",
        ])
        .args([
            "--grammar",
            "strict",
            "--report",
            "--emit",
            "obj",
            "--out-dir",
        ])
        .arg(&dir)
        .output()
        .expect("needlec runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("--grammar strict:"), "{stderr}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("needle.report.json")).unwrap())
            .unwrap();
    assert_eq!(report["options"]["grammar"], "strict");
    let strict = component(&report, "grammar tables").expect("grammar tables");
    let reference = component(&reference, "grammar tables").expect("grammar tables");
    assert!(
        strict > reference,
        "strict {strict} vs reference {reference}"
    );
}
