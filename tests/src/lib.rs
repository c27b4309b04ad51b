//! Shared helpers for the end-to-end tests: fixture paths and readers of the reference
//! implementation's golden files (`tests/fixtures/golden/`, see its README).

use std::path::PathBuf;

use needle_runtime::quant::Precision;
use serde::Deserialize;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A file under `tests/fixtures/golden/`.
pub fn golden(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/golden").join(name)
}

/// A file of the bundled trained model, `examples/tiny-needle/`.
pub fn tiny_needle(name: &str) -> PathBuf {
    repo_root().join("examples/tiny-needle").join(name)
}

/// Reads and parses a JSON fixture.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &std::path::Path) -> T {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// One entry of `forced_{tiny,small}.json`.
#[derive(Debug, Deserialize)]
pub struct ForcedCase {
    pub query: String,
    pub tools: String,
    pub answer: String,
    pub mode: String,
    pub enc_ids: Vec<u32>,
    pub dec_ids: Vec<u32>,
    pub top5: Vec<Vec<u32>>,
    pub top5_vals: Vec<Vec<f32>>,
    pub probe_ids: Vec<u32>,
    pub probe_vals: Vec<Vec<f32>>,
    pub enc_out_l2: f32,
    /// `int8`/`int4` in the quantized files; absent in the float32 ones.
    #[serde(default)]
    pub precision: Option<String>,
}

/// One entry of `greedy_{tiny,small}.json`.
#[derive(Debug, Deserialize)]
pub struct GreedyCase {
    pub query: String,
    pub tools: String,
    pub mode: String,
    pub enc_ids: Vec<u32>,
    pub n_query_tokens: usize,
    pub gen_ids: Vec<u32>,
    pub text: String,
    pub output: String,
    pub step_gaps: Vec<f32>,
    /// `int8`/`int4` in the quantized files; absent in the float32 ones.
    #[serde(default)]
    pub precision: Option<String>,
    /// Present in the quantized files (the float32 ones take it from `cases.json`).
    #[serde(default)]
    pub max_gen_len: Option<usize>,
}

/// One entry of `cases.json`.
#[derive(Debug, Deserialize)]
pub struct Case {
    pub query: String,
    pub tools: String,
    pub answer: String,
    pub max_gen_len: usize,
}

/// One entry of `examples/tiny-needle/samples.json`.
#[derive(Debug, Deserialize)]
pub struct Sample {
    pub query: String,
    pub expected: String,
    pub stock_exact: String,
    pub stock_folded: String,
    pub fold_folded: String,
    pub stock_exact_min_gap: f32,
    pub fold_folded_min_gap: f32,
}

/// The golden file of `kind` (`forced`, `greedy`) for `fixture` (`tiny`, `small`) computed with
/// the weights in `precision`: `forced_tiny.json` for the checkpoint's own (float16) weights,
/// `forced_tiny_int4.json` for int4, ...
pub fn golden_file(kind: &str, fixture: &str, precision: Precision) -> String {
    match precision {
        Precision::Int8 | Precision::Int4 => format!("{kind}_{fixture}_{precision}.json"),
        Precision::F32 | Precision::F16 => format!("{kind}_{fixture}.json"),
    }
}

/// The precision a golden record was computed with: its `precision` field, float16 (the
/// fixtures' stored weights) when it has none.
pub fn golden_precision(field: &Option<String>) -> Precision {
    match field {
        Some(name) => name
            .parse()
            .unwrap_or_else(|e| panic!("golden record: {e}")),
        None => Precision::F16,
    }
}

impl Sample {
    /// The reference's output for one checkpoint/fold combination: `stock_exact`,
    /// `stock_folded` or `fold_folded`.
    pub fn output(&self, combination: &str) -> &str {
        match combination {
            "stock_exact" => &self.stock_exact,
            "stock_folded" => &self.stock_folded,
            "fold_folded" => &self.fold_folded,
            other => panic!("no combination {other:?} in samples.json"),
        }
    }
}

/// One entry of `examples/tiny-needle/samples_quantized.json`: the reference's outputs with its
/// int8 and int4 weight quantization, `{combination}_{int8,int4}` (and `_min_gap`).
#[derive(Debug, Deserialize)]
pub struct QuantizedSample {
    pub query: String,
    pub expected: String,
    #[serde(flatten)]
    pub fields: std::collections::BTreeMap<String, serde_json::Value>,
}

impl QuantizedSample {
    /// The reference's output for `combination` (as [`Sample::output`]) in `precision`.
    pub fn output(&self, combination: &str, precision: Precision) -> &str {
        let key = format!("{combination}_{precision}");
        self.fields
            .get(&key)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("samples_quantized.json: no string `{key}`"))
    }
}

/// Logits agree when within 1e-3 of the step's logit scale (the golden README's tolerance).
pub fn logit_tolerance(golden_values: &[f32]) -> f32 {
    let scale = golden_values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    1e-3 * scale.max(1e-2)
}

/// Building and running C harnesses against generated libraries.
pub mod c {
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};

    /// A fresh scratch directory for one test, under the build's target directory.
    pub fn work_dir(test: &str) -> PathBuf {
        let base = std::env::var_os("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("needlec-tests"));
        let dir = base.join(format!("{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    /// The C compiler the tests use (`$CC`, else `cc`).
    pub fn cc() -> String {
        std::env::var("CC").unwrap_or_else(|_| "cc".into())
    }

    /// Writes `lib{name}.a` and `{name}.h` into `dir`, compiles `harness` (a C file under
    /// `tests/c/`) against them with strict warnings, and returns the executable's path.
    pub fn build_harness(
        dir: &Path,
        name: &str,
        archive: &[u8],
        header: &str,
        harness: &str,
    ) -> PathBuf {
        build_harness_with(dir, name, archive, header, harness, &[])
    }

    /// [`build_harness`] with extra compiler arguments (e.g. `-pthread`).
    pub fn build_harness_with(
        dir: &Path,
        name: &str,
        archive: &[u8],
        header: &str,
        harness: &str,
        extra: &[&str],
    ) -> PathBuf {
        std::fs::write(dir.join(format!("lib{name}.a")), archive).expect("write archive");
        std::fs::write(dir.join(format!("{name}.h")), header).expect("write header");
        let src = crate::repo_root().join("tests/c").join(harness);
        let exe = dir.join(harness.trim_end_matches(".c"));
        let out = Command::new(cc())
            .args([
                "-std=c11",
                "-O1",
                "-Wall",
                "-Wextra",
                "-pedantic",
                "-Werror",
            ])
            .arg(format!("-DHEADER=\"{name}.h\""))
            .arg("-I")
            .arg(dir)
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .arg("-L")
            .arg(dir)
            .arg(format!("-l{name}"))
            .args(extra)
            .output()
            .expect("run the C compiler");
        assert!(
            out.status.success(),
            "compiling {} failed:\n{}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        exe
    }

    /// Runs `exe` with `args`, feeding `stdin`; panics with its stderr if it fails. Stdin is
    /// written from another thread so that a harness that answers as it reads cannot deadlock
    /// on full pipes.
    pub fn run(exe: &Path, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start harness");
        let mut pipe = child.stdin.take().expect("stdin");
        let input = stdin.to_vec();
        let writer = std::thread::spawn(move || pipe.write_all(&input));
        let out = child.wait_with_output().expect("harness runs");
        writer.join().expect("stdin writer").expect("feed harness");
        assert!(
            out.status.success(),
            "{} failed ({}):\n{}",
            exe.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

/// Host tools the tests drive (cross compilers, emulators, linkers): found, or the test that
/// needs one is skipped loudly.
///
/// `scripts/test` installs what it can and then runs the suite with `NEEDLEC_SKIP_LOG` naming a
/// file; each skip appends one line there, and the script prints them all at the end of the run,
/// so a skipped check never passes silently. With `NEEDLEC_REQUIRE_TOOLS=1` (what `.ci/run`
/// sets) a missing tool fails the test instead.
pub mod toolchain {
    use std::io::Write;
    use std::path::PathBuf;

    /// The path of `tool`: on `PATH`, or among LLVM's versioned tools (Debian installs
    /// `ld64.lld` only as `/usr/lib/llvm-N/bin/ld64.lld`).
    pub fn find(tool: &str) -> Option<PathBuf> {
        let on_path = std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
        });
        on_path.or_else(|| {
            let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("llvm-"))
                })
                .collect();
            dirs.sort();
            dirs.into_iter()
                .rev()
                .map(|d| d.join("bin").join(tool))
                .find(|p| p.is_file())
        })
    }

    /// `tool` (from Debian's `package`) for the check `what`; `None` after recording a skip
    /// when it is missing (a panic instead under `NEEDLEC_REQUIRE_TOOLS=1`).
    pub fn require(tool: &str, package: &str, what: &str) -> Option<PathBuf> {
        if let Some(path) = find(tool) {
            return Some(path);
        }
        let reason = format!(
            "{what}: `{tool}` is missing (install Debian's `{package}`; scripts/test does when it can)"
        );
        if std::env::var("NEEDLEC_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
            panic!("{reason}");
        }
        skip(&reason);
        None
    }

    /// Records a skipped check: to stderr, and as one line of `$NEEDLEC_SKIP_LOG` when set.
    pub fn skip(reason: &str) {
        eprintln!("SKIPPED {reason}");
        if let Some(log) = std::env::var_os("NEEDLEC_SKIP_LOG") {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap_or_else(|e| panic!("opening the skip log {}: {e}", log.display()));
            // One write per line, so lines from concurrent tests do not interleave.
            file.write_all(format!("{reason}\n").as_bytes())
                .expect("writing the skip log");
        }
    }
}
