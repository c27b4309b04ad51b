//! The object builder ([`KernelSet`]) and the inline `exp` ([`needlec::codegen::math`]), end
//! to end: build a small object for the host with `KernelSet` alone, archive it with a header,
//! compile `tests/c/kernels_harness.c` against it with a strict C compiler, run it, and compare
//! with reference math in Rust.
//!
//! The object holds `nk_exp`, an elementwise map of `math::vexp` / `math::exp` (the polynomial
//! the model's softmax and sigmoid use) so that its accuracy is measured through real machine
//! code, `nk_ln`, the float64 `math::ln_f64` the library's confidence takes per decode step,
//! and `nk_table`, which returns an embedded f32 table's entries through a local helper
//! (data in the target's byte order, data relocations, a local function and a call).
//!
//! Also: the output is standalone (no undefined symbols), namespaced (all globals prefixed, local
//! symbols not exported), deterministic (byte-identical archive twice), and every supported
//! target generates a clean object.
//!
//! The model's own kernels (matmul, norm, RoPE, attention, argmax) are checked against the
//! reference's golden logits in `tests/tests/codegen_model.rs` and `library_e2e.rs`.

use std::path::{Path, PathBuf};

use cranelift_codegen::ir::{types, InstBuilder};
use needle_targets::{supported, Target};
use needle_test_support::c::{self, build_harness};
use needle_test_support::toolchain::require;
use needle_test_support::{work_dir, Rng};
use needlec::abi::{write_header, CType};
use needlec::codegen::{math, KernelSet};
use needlec::emit::{check_standalone, write_archive, ArchiveMember};

const PREFIX: &str = "nk_";
/// The exported functions; the local helper `nk_table_at` and the data must not be among them.
const EXPORTS: [&str; 3] = ["nk_exp", "nk_ln", "nk_table"];
/// Embedded through `declare_f32_data`, read back bit for bit.
const TABLE: [f32; 7] = [
    1.0,
    -2.5,
    std::f32::consts::PI,
    f32::MIN_POSITIVE,
    1e-45, // smallest subnormal
    -0.0,
    f32::MAX,
];

/// Object bytes and the header text for `target`.
fn build(target: &Target) -> (Vec<u8>, String) {
    let mut ks = KernelSet::new(target, PREFIX).unwrap();

    // void nk_exp(const float *x, float *y, size_t n): 4 lanes at a time, then a scalar tail.
    let params = [
        (CType::ConstF32Ptr, "x"),
        (CType::F32Ptr, "y"),
        (CType::SizeT, "n"),
    ];
    let doc = ["y[i] = exp(x[i]) (needlec's inline exp); y may equal x"];
    let exp = ks
        .declare_function("exp", &doc, &params, CType::Void, true)
        .unwrap();
    ks.define_function(exp, &[], &[], |g, a, _, _| {
        let (x, y, n) = (a[0], a[1], a[2]);
        let n4 = g.b.ins().band_imm_s(n, !3i64);
        let zero = g.iconst(0);
        g.for_range(zero, n4, 4, |g, i| {
            let v = g.vload(x, i);
            let r = math::vexp(g, v);
            g.vstore(r, y, i);
        });
        g.for_range(n4, n, 1, |g, i| {
            let v = g.load_f32(x, i);
            let r = math::exp(g, v);
            g.store_f32(r, y, i);
        });
        None
    })
    .unwrap();

    // void nk_ln(const float *x, float *y, size_t n): l = ln_f64((double)x[i]) as two floats,
    // y[2i] = (float)l and y[2i+1] = (float)(l - y[2i]), so the test reads about 48 bits of l.
    let doc = ["y[2i], y[2i+1] = ln((double)x[i]) as a float and its remainder (needlec's ln_f64)"];
    let ln = ks
        .declare_function("ln", &doc, &params, CType::Void, true)
        .unwrap();
    ks.define_function(ln, &[], &[], |g, a, _, _| {
        let (x, y, n) = (a[0], a[1], a[2]);
        g.for_n(n, |g, i| {
            let v = g.load_f32(x, i);
            let v = g.b.ins().fpromote(types::F64, v);
            let l = math::ln_f64(g, v);
            let hi = g.b.ins().fdemote(types::F32, l);
            let hi64 = g.b.ins().fpromote(types::F64, hi);
            let lo = g.b.ins().fsub(l, hi64);
            let lo = g.b.ins().fdemote(types::F32, lo);
            let i2 = g.b.ins().imul_imm_s(i, 2);
            g.store_f32(hi, y, i2);
            let i3 = g.b.ins().iadd_imm_s(i2, 1);
            g.store_f32(lo, y, i3);
        });
        None
    })
    .unwrap();

    // float nk_table(size_t i) -> nk_table_at(i), a local function reading the embedded table.
    let table = ks.declare_f32_data("table_data", &TABLE).unwrap();
    let at = ks
        .declare_function("table_at", &[], &[(CType::SizeT, "i")], CType::F32, false)
        .unwrap();
    let get = ks
        .declare_function(
            "table",
            &["entry i of the embedded table; i < NK_TABLE_LEN"],
            &[(CType::SizeT, "i")],
            CType::F32,
            true,
        )
        .unwrap();
    // defined before its callee, as declare_function allows
    ks.define_function(get, &[], &[at], |g, a, _, f| g.call(f.get(at), &[a[0]]))
        .unwrap();
    ks.define_function(at, &[table], &[], |g, a, d, _| {
        Some(g.load_f32(d.get(table), a[0]))
    })
    .unwrap();

    let extra = format!("#define NK_TABLE_LEN {}\n", TABLE.len());
    let header = write_header(
        "nk_kern",
        &["needlec object-builder test library"],
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
    let mut names: Vec<_> = supported()
        .into_iter()
        .map(|s| (s.triple, vec![]))
        .collect();
    names.push(("x86_64-unknown-linux-gnu", vec!["avx2", "fma"]));
    names.push(("riscv64gc-unknown-linux-gnu", vec!["v"]));
    let dir = work_dir("codegen_kernels_targets");
    for (triple, features) in names {
        let target = Target::with_features(triple, &features).unwrap();
        let (obj, _) = build(&target);
        let rep = check_standalone(&obj, PREFIX).unwrap_or_else(|e| panic!("{target}: {e}"));
        assert_eq!(rep.exports, EXPORTS, "{target}");
        let ar = archive(&target, obj);
        let file = format!(
            "libkern-{}{}.{}",
            target.name,
            features.join("+"),
            target.staticlib_extension()
        );
        std::fs::write(dir.join(file), &ar).unwrap(); // for inspection with nm/objdump
        let rep = check_standalone(&ar, PREFIX).unwrap_or_else(|e| panic!("{target} archive: {e}"));
        assert_eq!(rep.objects, 1);
        assert_eq!(rep.exports, EXPORTS, "{target} archive");
    }
}

/// Callees are looked up by their own ids: a function that was not declared as a callee is a
/// code generator bug, reported with both functions' names rather than calling another one.
#[test]
#[should_panic(expected = "is not a declared callee of `nk_caller` (declared: `nk_declared`)")]
fn calling_an_undeclared_callee_names_the_functions() {
    let mut ks = KernelSet::new(&Target::host().unwrap(), PREFIX).unwrap();
    let sig = |ks: &mut KernelSet, name: &str| {
        ks.declare_function(name, &[], &[(CType::SizeT, "i")], CType::SizeT, false)
            .unwrap()
    };
    let (caller, declared, other) = (
        sig(&mut ks, "caller"),
        sig(&mut ks, "declared"),
        sig(&mut ks, "other"),
    );
    let _ = ks.define_function(caller, &[], &[declared], |g, a, _, f| {
        g.call(f.get(other), &[a[0]])
    });
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

/// Builds the harness against a fresh archive for `target` (the host, possibly with CPU
/// features) in `dir`; `None`, recorded as a skip, if there is no C compiler.
fn harness(target: &Target, dir: &Path) -> Option<PathBuf> {
    require("cc", "gcc", "running the generated kernels")?;
    let (obj, header) = build(target);
    let ar = archive(target, obj);
    let (obj2, header2) = build(target);
    assert_eq!(
        ar,
        archive(target, obj2),
        "archive bytes differ between two identical builds"
    );
    assert_eq!(header, header2);
    assert_eq!(check_standalone(&ar, PREFIX).unwrap().exports, EXPORTS);
    Some(build_harness(
        dir,
        "kern",
        &ar,
        &header,
        "kernels_harness.c",
    ))
}

/// Runs one harness command with floats (and nothing else) on stdin; returns stdout tokens.
fn run(exe: &Path, args: &[String], input: &[f32]) -> Vec<String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let text: String = input
        .iter()
        .map(|v| format!("{:08x}\n", v.to_bits()))
        .collect();
    let out = c::run(exe, &args, text.as_bytes());
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

/// Everything in one test so the archive and harness are built once per target.
#[test]
fn generated_code_matches_reference_math() {
    let target = Target::host().expect("host target");
    check_generated(&target, &work_dir("codegen_kernels"));
}

/// Again with every feature the CPU has (on x86-64: AVX, FMA, SSE4.1 rounding), so the fused
/// and wider paths of `exp` run too; skipped where the host has no opt-in features.
#[test]
fn generated_code_matches_reference_math_with_host_cpu_features() {
    let target = Target::host_native().expect("host target");
    if target.features.is_empty() {
        eprintln!("SKIPPED: the host CPU reports no opt-in features");
        return;
    }
    eprintln!("host features: {}", target.features.join(","));
    check_generated(&target, &work_dir("codegen_kernels_native"));
}

fn check_generated(target: &Target, dir: &Path) {
    let Some(exe) = harness(target, dir) else {
        return;
    };
    check_exp(&exe);
    check_ln(&exe);
    check_table(&exe);
}

/// `math::ln_f64` (the confidence's per-step logarithm) against Rust's `f64::ln`: over the
/// range the library feeds it (sums in `[1, vocabulary]`) and far beyond, to 1e-14 relative.
fn check_ln(exe: &Path) {
    let mut x: Vec<f32> = vec![
        1.0,
        std::f32::consts::SQRT_2,
        1.414_213_4,
        2.0,
        0.5,
        8192.0,
        f32::MIN_POSITIVE,
        f32::MAX,
        1.0 + f32::EPSILON,
    ];
    let mut v = 1.0f32;
    while v < 70_000.0 {
        x.push(v);
        v *= 1.0009;
    }
    let mut r = Rng(11);
    x.extend((0..2000).map(|_| (r.signed_unit() * 80.0).exp()));
    let got = floats(&run(exe, &args(&[&"ln", &x.len()]), &x));
    assert_eq!(got.len(), 2 * x.len());
    let mut worst = 0.0f64;
    for (i, &xi) in x.iter().enumerate() {
        let l = f64::from(got[2 * i]) + f64::from(got[2 * i + 1]);
        let want = f64::from(xi).ln();
        let err = (l - want).abs();
        assert!(
            err <= 1e-14 * want.abs().max(1.0),
            "ln({xi}) = {l:e}, want {want:e} (err {err:e})"
        );
        worst = worst.max(err);
    }
    eprintln!(
        "ln_f64: worst absolute error {worst:.3e} over {} inputs",
        x.len()
    );
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
    x.extend((0..2000).map(|_| r.signed_unit() * 20.0));
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

/// The embedded table comes back bit for bit (byte order, data relocation, local call).
fn check_table(exe: &Path) {
    let got = floats(&run(exe, &args(&[&"table", &TABLE.len()]), &[]));
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(&TABLE));
}
