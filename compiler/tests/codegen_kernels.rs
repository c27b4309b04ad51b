//! Generated kernels, end to end: build an object for the host, archive it with a header,
//! compile `tests/c/kernels_harness.c` against it with a strict C compiler, run it, and compare
//! with reference math in Rust (f64 where the reference is exact math).
//!
//! Also: the output is standalone (no undefined symbols), namespaced (all globals prefixed),
//! deterministic (byte-identical archive twice), and every supported target generates a clean
//! object.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use needle_targets::{supported, Target};
use needlec::codegen::{KernelSet, RopeTables};
use needlec::emit::{check_standalone, write_archive, write_header, ArchiveMember};

const PREFIX: &str = "nk_";
const NORM_D: usize = 22; // 5 vectors + 2 scalars
const MM_K: usize = 37;
const MM_N: usize = 45; // 2 blocks of 16 + 3 vectors + 1 scalar
const MM16_K: usize = 8;
const MM16_N: usize = 16;
const ROPE_HEADS: usize = 3;
const ROPE_HEAD_DIM: usize = 10; // half 5: 1 vector + 1 scalar
const ROPE_MAX_POS: usize = 16;
const ROPE_THETA: f64 = 10000.0;

/// Deterministic pseudo-random numbers (xorshift64*), uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 bits
        (v as f32 / (1u64 << 23) as f32) - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

struct Model {
    mm: Vec<f32>,
    mm16: Vec<f32>,
    gain: Vec<f32>,
    rope: RopeTables,
}

fn model() -> Model {
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    Model {
        mm: r.vec(MM_K * MM_N, 0.5),
        mm16: r.vec(MM16_K * MM16_N, 1.0),
        gain: r.vec(NORM_D, 0.3),
        rope: RopeTables::new(ROPE_THETA, ROPE_HEAD_DIM, ROPE_MAX_POS).unwrap(),
    }
}

/// Object bytes and the header text for `target`.
fn build(target: &Target, m: &Model) -> (Vec<u8>, String) {
    let mut ks = KernelSet::new(target, PREFIX).unwrap();
    ks.define_exp("exp").unwrap();
    ks.define_sigmoid("sigmoid").unwrap();
    ks.define_softmax("softmax").unwrap();
    ks.define_argmax("argmax").unwrap();
    let scale = ks.declare_zcrmsnorm_scale("norm_scale", &m.gain).unwrap();
    ks.define_zcrmsnorm("norm", scale, NORM_D).unwrap();
    let w = ks.declare_weights_f32("mm_w", MM_K, MM_N, &m.mm).unwrap();
    ks.define_matmul_const("matmul", &w).unwrap();
    let w16 = ks
        .declare_weights_f32("mm16_w", MM16_K, MM16_N, &m.mm16)
        .unwrap();
    ks.define_matmul_const("matmul16", &w16).unwrap();
    let rope = ks.declare_rope_tables("rope", &m.rope).unwrap();
    ks.define_rope("rope", &rope, ROPE_HEADS).unwrap();
    let extra = format!(
        "#define NK_NORM_D {NORM_D}\n#define NK_MM_K {MM_K}\n#define NK_MM_N {MM_N}\n\
         #define NK_MM16_K {MM16_K}\n#define NK_MM16_N {MM16_N}\n\
         #define NK_ROPE_HEADS {ROPE_HEADS}\n#define NK_ROPE_HEAD_DIM {ROPE_HEAD_DIM}\n"
    );
    let header = write_header(
        "nk_kern",
        &["needlec kernel test library"],
        &extra,
        ks.functions(),
    );
    (ks.finish().unwrap(), header)
}

fn archive(target: &Target, obj: Vec<u8>) -> Vec<u8> {
    let name = format!("kern.{}", target.object_extension());
    write_archive(target.archive_kind(), &[ArchiveMember { name, data: obj }]).unwrap()
}

#[test]
fn every_supported_target_generates_a_standalone_object_and_archive() {
    let m = model();
    let mut names: Vec<_> = supported()
        .into_iter()
        .map(|s| (s.triple, vec![]))
        .collect();
    names.push(("x86_64-unknown-linux-gnu", vec!["avx2", "fma"]));
    names.push(("riscv64gc-unknown-linux-gnu", vec!["v"]));
    for (triple, features) in names {
        let target = Target::with_features(triple, &features).unwrap();
        let (obj, _) = build(&target, &m);
        let rep = check_standalone(&obj, PREFIX).unwrap_or_else(|e| panic!("{target}: {e}"));
        assert_eq!(rep.exports.len(), 8, "{target}: {:?}", rep.exports);
        assert!(rep.exports.iter().all(|e| e.starts_with(PREFIX)));
        let ar = archive(&target, obj);
        let file = format!(
            "libkern-{}{}.{}",
            target.name,
            features.join("+"),
            target.staticlib_extension()
        );
        std::fs::write(work_dir().join(file), &ar).unwrap(); // for inspection with nm/objdump
        let rep = check_standalone(&ar, PREFIX).unwrap_or_else(|e| panic!("{target} archive: {e}"));
        assert_eq!(rep.objects, 1);
        assert_eq!(rep.exports.len(), 8);
    }
}

#[test]
fn check_rejects_undefined_and_unprefixed_symbols() {
    // An object whose only function calls an external symbol, and exports an unprefixed name.
    use object::write::{Object, StandardSection, Symbol, SymbolSection};
    use object::{Architecture, BinaryFormat, Endianness, SymbolFlags, SymbolKind, SymbolScope};
    let mut o = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
    let text = o.section_id(StandardSection::Text);
    let off = o.append_section_data(text, &[0xc3], 1);
    o.add_symbol(Symbol {
        name: b"unprefixed".to_vec(),
        value: off,
        size: 1,
        kind: SymbolKind::Text,
        scope: SymbolScope::Linkage,
        weak: false,
        section: SymbolSection::Section(text),
        flags: SymbolFlags::None,
    });
    o.add_symbol(Symbol {
        name: b"expf".to_vec(),
        value: 0,
        size: 0,
        kind: SymbolKind::Text,
        scope: SymbolScope::Unknown,
        weak: false,
        section: SymbolSection::Undefined,
        flags: SymbolFlags::None,
    });
    let bytes = o.write().unwrap();
    let e = check_standalone(&bytes, PREFIX).unwrap_err().to_string();
    assert!(e.contains("undefined symbol `expf`"), "{e}");
    assert!(e.contains("`unprefixed` lacks the prefix"), "{e}");
}

fn work_dir() -> PathBuf {
    sub_dir("codegen_kernels")
}

fn sub_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Builds the harness against a fresh archive for `target` (the host, possibly with CPU
/// features) in `dir`; `None` if there is no C compiler.
fn harness(target: &Target, dir: PathBuf) -> Option<PathBuf> {
    if Command::new("cc").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no `cc` on PATH; the generated kernels were not run");
        return None;
    }
    let target = target.clone();
    let m = model();
    let (obj, header) = build(&target, &m);
    let ar = archive(&target, obj);
    let (obj2, header2) = build(&target, &m);
    assert_eq!(
        ar,
        archive(&target, obj2),
        "archive bytes differ between two identical builds"
    );
    assert_eq!(header, header2);
    let rep = check_standalone(&ar, PREFIX).unwrap();
    assert!(rep.exports.iter().all(|e| e.starts_with(PREFIX)));

    std::fs::write(dir.join("libkern.a"), &ar).unwrap();
    std::fs::write(dir.join("kern.h"), &header).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/c/kernels_harness.c");
    let exe = dir.join("kernels_harness");
    let out = Command::new("cc")
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-pedantic",
            "-Werror",
            "-O1",
            "-I",
        ])
        .arg(&dir)
        .arg(&src)
        .arg(dir.join("libkern.a"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(exe)
}

/// Runs one harness command with floats (and nothing else) on stdin; returns stdout tokens.
fn run(exe: &Path, args: &[String], input: &[f32]) -> Vec<String> {
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        let text: String = input
            .iter()
            .map(|v| format!("{:08x}\n", v.to_bits()))
            .collect();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "harness {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn floats(tokens: &[String]) -> Vec<f32> {
    tokens
        .iter()
        .map(|t| f32::from_bits(u32::from_str_radix(t, 16).unwrap()))
        .collect()
}

fn args(v: &[&dyn ToString]) -> Vec<String> {
    v.iter().map(|a| a.to_string()).collect()
}

/// All kernels in one test so the archive and harness are built once per target.
#[test]
fn kernels_match_reference_math() {
    let target = Target::host().expect("host target");
    check_all_kernels(&target, work_dir());
}

/// Again with every feature the CPU has (on x86-64: AVX, FMA, SSE4.1 rounding), so the fused
/// and wider paths run too; skipped where the host has no opt-in features.
#[test]
fn kernels_match_reference_math_with_host_cpu_features() {
    let target = Target::host_native().expect("host target");
    if target.features.is_empty() {
        eprintln!("SKIPPED: the host CPU reports no opt-in features");
        return;
    }
    eprintln!("host features: {}", target.features.join(","));
    check_all_kernels(&target, sub_dir("codegen_kernels_native"));
}

fn check_all_kernels(target: &Target, dir: PathBuf) {
    let Some(exe) = harness(target, dir) else {
        return;
    };
    let m = model();
    check_exp(&exe);
    check_sigmoid(&exe);
    check_softmax(&exe);
    check_argmax(&exe);
    check_norm(&exe, &m);
    check_matmul(&exe, &m);
    check_rope(&exe, &m);
}

fn check_exp(exe: &Path) {
    let mut x: Vec<f32> = vec![
        -100.0, -88.0, 0.0, 88.0, -87.0, -87.5, -103.0, -103.9, 88.7, 1e-30, -1e-30, 1.0,
    ];
    // dense sweep over the whole useful range, with odd offsets so lanes and tails both see it
    let mut v = -104.0f32;
    while v < 88.72 {
        x.push(v);
        v += 0.0137;
    }
    let mut r = Rng(7);
    x.extend((0..2000).map(|_| r.next() * 20.0));
    x.push(0.5); // n % 4 == 1 after the pushes above, exercising the scalar tail
    let got = floats(&run(exe, &args(&[&"exp", &x.len()]), &x));
    let mut worst = 0.0f64;
    for (&xi, &yi) in x.iter().zip(&got) {
        let want = f64::from(xi).exp();
        // 4e-7 relative; plus one subnormal step, the best f32 can do below 2^-126.
        let tol = 4e-7 * want + f64::from(f32::from_bits(1));
        let err = (f64::from(yi) - want).abs();
        assert!(
            err <= tol,
            "exp({xi}) = {yi:e}, want {want:e} (err {err:e})"
        );
        if want > 1e-37 {
            worst = worst.max(err / want);
        }
    }
    eprintln!(
        "exp: worst relative error {worst:.3e} over {} inputs",
        x.len()
    );

    // special inputs: no NaN from huge negatives; overflow to inf; NaN stays NaN
    let sp = [
        f32::MIN,
        f32::NEG_INFINITY,
        -1e30,
        -104.5,
        89.0,
        100.0,
        f32::MAX,
        f32::INFINITY,
        f32::NAN,
    ];
    let got = floats(&run(exe, &args(&[&"exp", &sp.len()]), &sp));
    assert_eq!(&got[..4], &[0.0; 4], "{got:?}");
    assert!(got[4..8].iter().all(|v| *v == f32::INFINITY), "{got:?}");
    assert!(got[8].is_nan());
}

fn check_sigmoid(exe: &Path) {
    let mut r = Rng(11);
    let mut x: Vec<f32> = (0..999).map(|_| r.next() * 30.0).collect();
    x.extend([0.0, -200.0, 200.0, f32::MIN, f32::MAX]);
    let got = floats(&run(exe, &args(&[&"sigmoid", &x.len()]), &x));
    for (&xi, &yi) in x.iter().zip(&got) {
        let want = 1.0 / (1.0 + (-f64::from(xi)).exp());
        let err = (f64::from(yi) - want).abs();
        assert!(
            err <= 6e-7 * want + 1e-45,
            "sigmoid({xi}) = {yi:e}, want {want:e}"
        );
        assert!((0.0..=1.0).contains(&yi));
    }
}

fn check_softmax(exe: &Path) {
    let mut r = Rng(13);
    for (rows, n) in [(3usize, 1usize), (2, 4), (4, 7), (1, 37), (2, 128)] {
        let mut x = r.vec(rows * n, 8.0);
        if n > 4 {
            x[1] = f32::MIN; // masked score: most negative finite float
        }
        let got = floats(&run(exe, &args(&[&"softmax", &rows, &n]), &x));
        for row in 0..rows {
            let xs = &x[row * n..(row + 1) * n];
            let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // subtraction in f32 as the kernel (and a float32 reference) does it; rest in f64
            let e: Vec<f64> = xs.iter().map(|&v| f64::from(v - m).exp()).collect();
            let s: f64 = e.iter().sum();
            for (j, ej) in e.iter().enumerate() {
                let want = ej / s;
                let yi = f64::from(got[row * n + j]);
                assert!(
                    (yi - want).abs() <= 1e-6 * want + 1e-12,
                    "softmax {rows}x{n} [{row}][{j}]: {yi} vs {want}"
                );
            }
        }
    }
    // a fully masked row is uniform, not NaN
    let x = vec![f32::MIN; 6];
    let got = floats(&run(exe, &args(&[&"softmax", &1, &6]), &x));
    assert!(got.iter().all(|&v| (v - 1.0 / 6.0).abs() < 1e-7), "{got:?}");
}

fn check_argmax(exe: &Path) {
    let am = |x: &[f32]| -> usize {
        run(exe, &args(&[&"argmax", &x.len()]), x)[0]
            .parse()
            .unwrap()
    };
    let mut r = Rng(17);
    let x = r.vec(1000, 1.0);
    let want = x
        .iter()
        .enumerate()
        .fold(0, |b, (i, &v)| if v > x[b] { i } else { b });
    assert_eq!(am(&x), want);
    assert_eq!(am(&[1.0, 3.0, 2.0, 3.0]), 1, "first of ties");
    assert_eq!(am(&[5.0]), 0);
    assert_eq!(am(&[]), 0);
    assert_eq!(am(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    assert_eq!(
        am(&[1.0, f32::NAN, 9.0, f32::NAN]),
        1,
        "NaN wins, like numpy"
    );
}

fn check_norm(exe: &Path, m: &Model) {
    let mut r = Rng(19);
    let rows = 5;
    let mut x = r.vec(rows * NORM_D, 3.0);
    x[NORM_D..2 * NORM_D].fill(0.0); // all-zero row: eps keeps it finite
    let got = floats(&run(exe, &args(&[&"norm", &rows]), &x));
    for row in 0..rows {
        let xs = &x[row * NORM_D..(row + 1) * NORM_D];
        let ms: f64 = xs.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / NORM_D as f64;
        let rms = (ms + 1e-6).sqrt();
        for (j, &v) in xs.iter().enumerate() {
            let scale = f64::from(1.0f32 + m.gain[j]);
            let want = f64::from(v) / rms * scale;
            let yi = f64::from(got[row * NORM_D + j]);
            assert!(
                (yi - want).abs() <= 1e-6 * want.abs() + 1e-7,
                "norm [{row}][{j}]: {yi} vs {want}"
            );
        }
    }
}

fn check_matmul(exe: &Path, m: &Model) {
    let mut r = Rng(23);
    for (cmd, w, k, n) in [
        ("matmul", &m.mm, MM_K, MM_N),
        ("matmul16", &m.mm16, MM16_K, MM16_N),
    ] {
        for rows in [1usize, 3] {
            let x = r.vec(rows * k, 2.0);
            let got = floats(&run(exe, &args(&[&cmd, &rows]), &x));
            assert_eq!(got.len(), rows * n);
            for row in 0..rows {
                for j in 0..n {
                    let (mut want, mut mag) = (0.0f64, 0.0f64);
                    for kk in 0..k {
                        let p = f64::from(x[row * k + kk]) * f64::from(w[kk * n + j]);
                        want += p;
                        mag += p.abs();
                    }
                    let yi = f64::from(got[row * n + j]);
                    assert!(
                        (yi - want).abs() <= 1e-5 * mag,
                        "{cmd} [{row}][{j}]: {yi} vs {want}"
                    );
                }
            }
        }
    }
}

fn check_rope(exe: &Path, m: &Model) {
    let mut r = Rng(29);
    let (h, half) = (ROPE_HEAD_DIM, ROPE_HEAD_DIM / 2);
    for (rows, pos0) in [(1usize, 0usize), (4, 3), (2, ROPE_MAX_POS - 2)] {
        let x = r.vec(rows * ROPE_HEADS * h, 2.0);
        let out = run(exe, &args(&[&"rope", &rows, &pos0]), &x);
        assert_eq!(out[0], "0");
        let got = floats(&out[1..]);
        for row in 0..rows {
            let p = pos0 + row;
            for head in 0..ROPE_HEADS {
                let base = (row * ROPE_HEADS + head) * h;
                for j in 0..half {
                    let (a, b) = (f64::from(x[base + j]), f64::from(x[base + half + j]));
                    // the same f32 tables; and against exact trigonometry, looser
                    let (c, s) = (
                        f64::from(m.rope.cos[p * half + j]),
                        f64::from(m.rope.sin[p * half + j]),
                    );
                    let wa = a * c - b * s;
                    let wb = b * c + a * s;
                    let tol = 1e-6 * (a.abs() + b.abs());
                    let (ga, gb) = (f64::from(got[base + j]), f64::from(got[base + half + j]));
                    assert!(
                        (ga - wa).abs() <= tol && (gb - wb).abs() <= tol,
                        "rope p={p} h={head} j={j}"
                    );
                    let ang = p as f64 * ROPE_THETA.powf(-2.0 * j as f64 / h as f64);
                    let ea = a * ang.cos() - b * ang.sin();
                    assert!(
                        (ga - ea).abs() <= 2e-6 * (a.abs() + b.abs()),
                        "rope exact p={p} j={j}"
                    );
                }
            }
        }
    }
    // past the tables: -1 and x untouched
    let x = r.vec(2 * ROPE_HEADS * h, 1.0);
    for (rows, pos0) in [
        (2usize, ROPE_MAX_POS - 1),
        (1, ROPE_MAX_POS),
        (1, usize::MAX),
    ] {
        let out = run(
            exe,
            &args(&[&"rope", &rows, &pos0]),
            &x[..rows * ROPE_HEADS * h],
        );
        assert_eq!(out[0], "-1");
        assert_eq!(floats(&out[1..]), &x[..rows * ROPE_HEADS * h]);
    }
}
