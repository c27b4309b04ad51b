//! Helpers shared by the tests of the workspace's crates (the runtime's, the compiler's and the
//! end-to-end tests in `tests/`): one home instead of a copy per test file.
//!
//! - fixture paths ([`repo_root`], [`golden`], [`tiny_needle`]) and readers ([`read_json`],
//!   [`read_text`], the golden-file entries [`ForcedCase`], [`GreedyCase`], [`Case`], [`Sample`],
//!   [`GrammarCase`]), and the golden logit tolerance ([`logit_tolerance`]);
//! - [`work_dir`], a fresh scratch directory per test;
//! - [`Rng`], the seeded xorshift64* generator of the randomized tests;
//! - [`tool_keys`], the (name, parameter keys) of a normalized tool list;
//! - [`c`], building C harnesses against generated libraries and running them;
//! - [`toolchain`], finding host tools or recording a skip.
//!
//! It depends on no workspace crate, so `needle-runtime` can take it as a dev-dependency without a
//! cycle; helpers that need a crate's types stay beside that crate's tests.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support/ has a parent")
        .to_path_buf()
}

/// A file under `tests/fixtures/golden/`.
pub fn golden(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/golden").join(name)
}

/// A file under `tests/fixtures/finetune/` (a copy of the fine-tune data's `dev.jsonl`).
pub fn finetune(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/finetune").join(name)
}

/// A file of the bundled trained model, `examples/tiny-needle/`.
pub fn tiny_needle(name: &str) -> PathBuf {
    repo_root().join("examples/tiny-needle").join(name)
}

/// Reads a text fixture.
pub fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Reads and parses a JSON fixture.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> T {
    serde_json::from_str(&read_text(path))
        .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
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
    /// The reference's output for `combination` (as [`Sample::output`]) with the weights in
    /// `precision` (`int8` or `int4`).
    pub fn output(&self, combination: &str, precision: &str) -> &str {
        let key = format!("{combination}_{precision}");
        self.fields
            .get(&key)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("samples_quantized.json: no string `{key}`"))
    }
}

/// The golden file of `kind` (`forced`, `greedy`) for `fixture` (`tiny`, `small`) computed with
/// the weights in `precision` (`--weights` spelling): `forced_tiny_int4.json` for int4,
/// `forced_tiny.json` for the checkpoint's own (float16) weights (`f16`, `f32`).
pub fn golden_file(kind: &str, fixture: &str, precision: &str) -> String {
    match precision {
        "int8" | "int4" => format!("{kind}_{fixture}_{precision}.json"),
        _ => format!("{kind}_{fixture}.json"),
    }
}

/// The precision a golden record was computed with: its `precision` field, `f16` (the
/// fixtures' stored weights) when it has none.
pub fn golden_precision(field: &Option<String>) -> &str {
    field.as_deref().unwrap_or("f16")
}

/// One entry of `grammar_dev4k.json`: an answer's token ids and, before each of them, what the
/// reference's grammar said.
#[derive(Debug, Deserialize)]
pub struct GrammarCase {
    pub tools: String,
    pub tools_normalized: String,
    pub answer: String,
    pub ids: Vec<u32>,
    pub steps: Vec<GrammarStep>,
}

/// The reference grammar before one token of a [`GrammarCase`].
#[derive(Debug, Deserialize)]
pub struct GrammarStep {
    pub active: bool,
    /// When active: `FREE`, `IN_NAME` or `IN_ARG_KEY`.
    #[serde(default)]
    pub state: Option<String>,
    /// When active: `"all"`, or the allowed ids.
    #[serde(default)]
    pub allowed: Option<serde_json::Value>,
}

impl GrammarStep {
    /// The ids the grammar allows here; `None` when it constrains nothing (inactive, or `"all"`).
    pub fn allowed_ids(&self) -> Option<Vec<u32>> {
        use serde_json::Value;
        match &self.allowed {
            _ if !self.active => None,
            Some(Value::String(s)) if s == "all" => None,
            Some(Value::Array(ids)) => Some(
                ids.iter()
                    .map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
                    .collect::<Option<_>>()
                    .unwrap_or_else(|| panic!("allowed ids that are not u32: {ids:?}")),
            ),
            other => panic!("an active step whose `allowed` is neither \"all\" nor ids: {other:?}"),
        }
    }
}

/// Logits agree when within 1e-3 of the step's logit scale (the golden README's tolerance).
pub fn logit_tolerance(golden_values: &[f32]) -> f32 {
    let scale = golden_values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    1e-3 * scale.max(1e-2)
}

/// `max |got - want| / max |want|`: how far a vector is from a reference, relative to the
/// reference's scale (the Needle 3 tests' measure).
pub fn max_rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// The fastest of `repeats` timed runs of `f` (after one untimed warm-up run), in seconds.
pub fn best_of(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..repeats)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// A fresh scratch directory for one test (emptied first; one per process), under
/// `$CARGO_TARGET_TMPDIR` when that is set, else `needlec-tests/` in the system's temp directory.
pub fn work_dir(test: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("needlec-tests"));
    let dir = base.join(format!("{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Deterministic pseudo-random numbers (xorshift64*), so randomized tests are reproducible
/// without a dependency. The sequence for a seed never changes: some tests pin counts drawn
/// from it.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() >> 33) as usize % n.max(1)
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    /// One of `items`, uniformly.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// Uniform in [-1, 1), on a grid of 2^-23 (24 random bits).
    pub fn signed_unit(&mut self) -> f32 {
        let v = self.next_u64() >> 40;
        (v as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// Text fragments that hit a tokenizer's corners: spaces and their runs, control characters,
/// user-defined and control piece texts, `▁`, scripts, emoji with joiners, noncharacters.
pub const TOKENIZER_FRAGMENTS: &[&str] = &[
    " ",
    " ",
    "  ",
    "     ",
    "\t",
    "\n",
    "\r\n",
    "\0",
    "\u{1}",
    "\u{7f}",
    "\u{1b}[0m",
    "the",
    "weather",
    "San Francisco",
    "set a timer",
    "alarm",
    "11:50 AM",
    "a",
    "b",
    "Z",
    "42",
    "3.14",
    "-",
    "_",
    "'s",
    "?",
    "!",
    ",",
    ".",
    "\"",
    "{",
    "}",
    "[",
    "]",
    ":",
    "\\",
    "/",
    "<",
    ">",
    "<tool_call>",
    "</tool_call>",
    "<tools>",
    "</tools>",
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<0x41>",
    "▁",
    "▁▁",
    "▁a",
    "é",
    "è",
    "ü",
    "ß",
    "ñ",
    "ç",
    "ø",
    "Å",
    "привет",
    "мир",
    "日本語",
    "中文",
    "한국어",
    "العربية",
    "हिन्दी",
    "ελληνικά",
    "🙂",
    "🎉",
    "👍🏽",
    "🧪",
    "👨‍👩‍👧",
    "\u{fffd}",
    "\u{200b}",
    "\u{a0}",
    "\u{3000}",
    "\u{10ffff}",
    "\u{e000}",
];

/// A random text for tokenizer tests: [`TOKENIZER_FRAGMENTS`], vocabulary `pieces` (which make
/// merges happen; `▁` turned back into a space half of the time) and random characters, about
/// `max_len` bytes at most (the last fragment may go over).
pub fn random_tokenizer_text(r: &mut Rng, pieces: &[&str], max_len: usize) -> String {
    let mut s = String::new();
    let target = r.below(max_len + 1);
    while s.len() < target {
        let frag = match r.below(10) {
            0..=3 => r.pick(TOKENIZER_FRAGMENTS).to_string(),
            4..=7 => {
                let p = pieces.get(r.below(pieces.len())).copied().unwrap_or("");
                if r.below(2) == 0 {
                    p.replace('\u{2581}', " ")
                } else {
                    p.to_string()
                }
            }
            8 => char::from(r.below(128) as u8).to_string(),
            _ => {
                let cp = r.below(0x11_0000) as u32;
                char::from_u32(cp).map(String::from).unwrap_or_default()
            }
        };
        s.push_str(&frag);
    }
    s
}

/// Random bytes for tokenizer tests: like [`random_tokenizer_text`], with invalid UTF-8 mixed in
/// (stray continuation bytes, truncated sequences, overlong forms, surrogates, bytes past F4).
pub fn random_tokenizer_bytes(r: &mut Rng, pieces: &[&str], max_len: usize) -> Vec<u8> {
    const BAD: &[&[u8]] = &[
        b"\x80",
        b"\xBF",
        b"\xC0\xAF",
        b"\xC3",
        b"\xE2\x96",
        b"\xED\xA0\x80",
        b"\xF0\x9F\x98",
        b"\xF4\x90\x80\x80",
        b"\xF8\x88\x80\x80\x80",
        b"\xFE",
        b"\xFF",
    ];
    let mut out = Vec::new();
    while out.len() < max_len {
        if r.chance(30) {
            let bad: &&[u8] = r.pick(BAD);
            out.extend_from_slice(bad);
        } else {
            let budget = (max_len - out.len()).min(24);
            out.extend_from_slice(random_tokenizer_text(r, pieces, budget).as_bytes());
        }
    }
    out
}

/// (name, parameter keys in order) of each tool of a normalized tool list (Needle's own format,
/// as in `tools_norm.json`).
pub fn tool_keys(tools_normalized: &str) -> Vec<(String, Vec<String>)> {
    use serde_json::Value;
    let tools: Value = serde_json::from_str(tools_normalized).expect("a JSON tool list");
    tools
        .as_array()
        .expect("a JSON array of tools")
        .iter()
        .map(|t| {
            let keys = t
                .get("parameters")
                .and_then(Value::as_object)
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default();
            (t["name"].as_str().expect("a tool name").to_string(), keys)
        })
        .collect()
}

/// Building and running C harnesses against generated libraries.
pub mod c {
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};

    /// How every harness is compiled: C11, optimized a little, every warning an error.
    pub const STRICT_C11: [&str; 6] = [
        "-std=c11",
        "-O1",
        "-Wall",
        "-Wextra",
        "-pedantic",
        "-Werror",
    ];

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
            .args(STRICT_C11)
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
