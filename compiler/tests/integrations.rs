//! The integrations in `examples/` and `cmake/`, driven as an app team would: the CMake function
//! compiles the bundled model at build time for an app that then answers like `needlec run`.

use std::path::{Path, PathBuf};
use std::process::Command;

use needle_test_support::{repo_root, tiny_needle, toolchain, work_dir};

fn needlec() -> &'static str {
    env!("CARGO_BIN_EXE_needlec")
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `needlec SUB` with the bundled model as the integration examples build it: folded, int4 (the
/// phone build), `--max-gen-len 128` (as `examples/cmake/CMakeLists.txt` says).
fn needlec_bundled(sub: &str) -> Command {
    let mut cmd = Command::new(needlec());
    cmd.arg(sub)
        .arg("--checkpoint")
        .arg(tiny_needle("tiny-needle-folded.pkl"))
        .arg("--tokenizer")
        .arg(tiny_needle("tokenizer.model"))
        .arg("--tools")
        .arg(tiny_needle("tools.json"))
        .args(["--weights", "int4", "--max-gen-len", "128"]);
    cmd
}

/// `needlec run` with the options `examples/cmake/CMakeLists.txt` builds with.
fn reference_answer(query: &str) -> String {
    run_ok(needlec_bundled("run").args(["--query", query]))
}

fn configure_and_build(cmake: &Path, source: &Path, build: &Path) {
    run_ok(
        Command::new(cmake)
            .arg("-S")
            .arg(source)
            .arg("-B")
            .arg(build)
            .arg(format!("-DNEEDLEC_EXECUTABLE={}", needlec())),
    );
    run_ok(Command::new(cmake).arg("--build").arg(build));
}

#[test]
fn cmake_needlec_add_model_builds_an_app_that_answers_like_needlec_run() {
    let Some(cmake) = toolchain::require("cmake", "cmake", "builds examples/cmake") else {
        return;
    };
    let build: PathBuf = work_dir("cmake-example");
    let source = repo_root().join("examples/cmake");
    configure_and_build(&cmake, &source, &build);
    for query in [
        "Turn off the lights in the kitchen",
        "What's the weather like in Paris?",
    ] {
        let got = run_ok(Command::new(build.join("ask")).arg(query));
        assert_eq!(got, reference_answer(query), "{query}");
    }
    // A second build with nothing changed runs nothing; touching the tool list's copy would
    // re-run needlec (the custom command depends on the inputs).
    let again = run_ok(Command::new(&cmake).arg("--build").arg(&build));
    assert!(!again.contains("needlec: compiling"), "{again}");
}

#[test]
fn cmake_needlec_add_model_refuses_bad_arguments_clearly() {
    let Some(cmake) = toolchain::require("cmake", "cmake", "builds examples/cmake") else {
        return;
    };
    let dir = work_dir("cmake-bad");
    let module = repo_root().join("cmake/Needlec.cmake");
    let cases = [
        (
            "needlec_add_model(assistant TOKENIZER t TOOLS t)",
            "needlec_add_model(assistant): CHECKPOINT is required",
        ),
        (
            "needlec_add_model(my-model CHECKPOINT c TOKENIZER t TOOLS t)",
            "'my-model' is not a C identifier",
        ),
        (
            "needlec_add_model(assistant CHECKPOINT nowhere.pkl TOKENIZER t TOOLS t)",
            "nowhere.pkl does not exist",
        ),
        (
            "needlec_add_model(assistant CHECKPOINT c TOKENIZER t TOOLS t WEIGHT int4)",
            "unknown arguments: WEIGHT;int4",
        ),
    ];
    for (i, (call, want)) in cases.iter().enumerate() {
        let src = dir.join(format!("case{i}"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(
            src.join("CMakeLists.txt"),
            format!(
                "cmake_minimum_required(VERSION 3.16)\nproject(bad C)\ninclude({})\n{call}\n",
                module.display()
            ),
        )
        .unwrap();
        let out = Command::new(&cmake)
            .arg("-S")
            .arg(&src)
            .arg("-B")
            .arg(src.join("build"))
            .arg(format!("-DNEEDLEC_EXECUTABLE={}", needlec()))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{call}: configured");
        assert!(err.contains(want), "{call}: {err}");
    }
}

/// Every `needlec SUB ...` command of a shell script (continuation lines joined), split into
/// words.
fn needlec_commands(script: &str) -> Vec<Vec<String>> {
    let joined = script.replace("\\\n", " ");
    joined
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("needlec ") && !l.starts_with("needlec --version"))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

#[test]
fn the_ci_workflow_example_parses_and_uses_real_options() {
    use yaml_rust2::YamlLoader;
    let text = std::fs::read_to_string(repo_root().join("examples/ci/github-actions.yml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("the workflow is YAML");
    let job = &docs[0]["jobs"]["needle"];
    let steps = job["steps"].as_vec().expect("a list of steps");
    let runs: Vec<&str> = steps.iter().filter_map(|s| s["run"].as_str()).collect();
    let commands: Vec<Vec<String>> = runs.iter().flat_map(|r| needlec_commands(r)).collect();
    let subs: Vec<&str> = commands.iter().map(|c| c[1].as_str()).collect();
    assert_eq!(subs, ["eval", "build"], "{commands:?}");
    assert!(
        steps
            .iter()
            .any(|s| s["uses"].as_str() == Some("actions/upload-artifact@v4")),
        "the libraries are uploaded"
    );
    // Each option the workflow passes is one the subcommand has.
    for cmd in &commands {
        let help = run_ok(Command::new(needlec()).args([&cmd[1], "--help"]));
        for flag in cmd.iter().filter(|w| w.starts_with("--")) {
            assert!(
                help.contains(flag.as_str()),
                "needlec {} has no {flag}",
                cmd[1]
            );
        }
    }
    let eval = &commands[0];
    for gate in ["--min-accuracy", "--min-agreement"] {
        assert!(eval.iter().any(|w| w == gate), "eval gates on {gate}");
    }
    // The three targets are ones needlec builds for.
    let targets = run_ok(Command::new(needlec()).arg("targets"));
    let build_step = runs.iter().find(|r| r.contains("needlec build")).unwrap();
    let list = build_step
        .split("for target in ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .expect("a loop over targets");
    let wanted: Vec<&str> = list.split_whitespace().collect();
    assert_eq!(wanted.len(), 3, "{wanted:?}");
    for t in wanted {
        assert!(
            targets
                .lines()
                .any(|l| l.split_whitespace().next() == Some(t)),
            "{t} is not a needlec target"
        );
    }
}

/// `needlec build` for a target into `out` with the bundled model (folded, int4: the phone build).
fn build_bundled(target: &str, extra: &[&str], out: &Path) {
    run_ok(
        needlec_bundled("build")
            .args(["--target", target])
            .args(extra)
            .arg("--out-dir")
            .arg(out),
    );
}

/// The JDK's `jni.h` directory (`/usr/lib/jvm/*/include`), if a JDK is installed.
fn jni_include() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/jvm")
        .ok()?
        .flatten()
        .map(|e| e.path().join("include"))
        .filter(|d| d.join("jni.h").is_file() && d.join("linux/jni_md.h").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}

/// `examples/android/`: the JNI wrapper compiles with clang for `aarch64-linux-android` against
/// the JDK's `jni.h` and the header `needlec build` wrote, and links with `ld.lld` and the
/// library into a shared object for AArch64 that exports the three natives the Kotlin class
/// declares and needs nothing at all from outside (no undefined symbol: no libc, no libm).
#[test]
fn android_jni_wrapper_builds_and_links_for_aarch64_linux_android() {
    let what = "builds the Android JNI wrapper (examples/android)";
    let (Some(clang), Some(lld)) = (
        toolchain::require("clang", "clang", what),
        toolchain::require("ld.lld", "lld", what),
    ) else {
        return;
    };
    let Some(jni) = jni_include() else {
        toolchain::skip(&format!(
            "{what}: no JDK jni.h under /usr/lib/jvm (install Debian's `openjdk-17-jdk-headless`)"
        ));
        return;
    };
    let dir = work_dir("android-jni");
    let out = dir.join("out");
    build_bundled("aarch64-linux-android", &[], &out);
    // jni.h includes <stdio.h>, which the NDK's Bionic sysroot provides; the wrapper uses
    // nothing from it, so an empty one stands in for the sysroot here.
    let sysroot = dir.join("sysroot-stub");
    std::fs::create_dir_all(&sysroot).unwrap();
    std::fs::write(sysroot.join("stdio.h"), "/* NDK sysroot stand-in */\n").unwrap();
    let example = repo_root().join("examples/android");
    let obj = dir.join("needle_jni.o");
    run_ok(
        Command::new(&clang)
            .args([
                "--target=aarch64-linux-android24",
                "-ffreestanding",
                "-nostdlibinc",
                "-std=c11",
                "-O2",
                "-fPIC",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-c",
            ])
            .arg("-I")
            .arg(&sysroot)
            .arg("-I")
            .arg(&jni)
            .arg("-I")
            .arg(jni.join("linux"))
            .arg("-I")
            .arg(&out)
            .arg(example.join("needle_jni.c"))
            .arg("-o")
            .arg(&obj),
    );
    let so = dir.join("libneedle_jni.so");
    run_ok(
        Command::new(&lld)
            .args([
                "-shared",
                "--no-undefined",
                "-z",
                "max-page-size=16384",
                "-soname",
                "libneedle_jni.so",
            ])
            .arg(&obj)
            .arg(out.join("libneedle.a"))
            .arg("-o")
            .arg(&so),
    );
    use object::{Object, ObjectSymbol};
    let bytes = std::fs::read(&so).unwrap();
    let file = object::File::parse(&*bytes).unwrap();
    assert_eq!(file.architecture(), object::Architecture::Aarch64);
    assert_eq!(file.kind(), object::ObjectKind::Dynamic);
    let undefined: Vec<String> = file
        .dynamic_symbols()
        .filter(|s| s.is_undefined() && !s.name().unwrap_or("").is_empty())
        .map(|s| s.name().unwrap().to_string())
        .collect();
    assert!(undefined.is_empty(), "needs from outside: {undefined:?}");
    let exported: Vec<String> = file
        .dynamic_symbols()
        .filter(|s| s.is_definition())
        .filter_map(|s| s.name().ok())
        .filter_map(|n| n.strip_prefix("Java_dev_needlec_Needle_"))
        .map(str::to_string)
        .collect();
    // Every native the Kotlin class declares is exported, and nothing more.
    let kotlin = std::fs::read_to_string(example.join("Needle.kt")).unwrap();
    assert!(kotlin.starts_with("package dev.needlec\n"));
    let mut declared: Vec<String> = kotlin
        .split("external fun ")
        .skip(1)
        .map(|rest| rest.split('(').next().unwrap().to_string())
        .collect();
    declared.sort();
    let mut exported = exported;
    exported.sort();
    assert_eq!(declared, ["nativeCall", "nativeLayout", "toolName"]);
    assert_eq!(exported, declared);
}

/// The architecture of the one object in a static library, and whether it defines `symbol`.
fn archive_member_arch(archive: &[u8], symbol: &str) -> (object::Architecture, bool) {
    use object::{Object, ObjectSymbol};
    let ar = object::read::archive::ArchiveFile::parse(archive).unwrap();
    let members: Vec<_> = ar.members().map(Result::unwrap).collect();
    assert_eq!(members.len(), 1);
    let data = members[0].data(archive).unwrap();
    let obj = object::File::parse(data).unwrap();
    assert_eq!(obj.format(), object::BinaryFormat::MachO);
    let defines = obj
        .symbols()
        .any(|s| s.is_definition() && s.name() == Ok(symbol));
    (obj.architecture(), defines)
}

/// `needlec build --emit xcframework`: the XCFramework folder (its Info.plist parsed by Python's
/// plistlib, the reader of Apple's format, and every library, header and module map it names
/// present), the iOS slice an arm64 Mach-O archive, the macOS slice a universal archive of
/// arm64 and x86_64, and a Package.swift whose binary target is that folder. No Apple machine
/// is available to link or run it.
#[test]
fn xcframework_has_the_standard_layout_and_a_swift_package() {
    let Some(python) = toolchain::require(
        "python3",
        "python3-minimal",
        "parses the XCFramework's Info.plist",
    ) else {
        return;
    };
    let dir = work_dir("xcframework");
    let out = dir.join("out");
    build_bundled("x86_64-unknown-linux-gnu", &["--emit", "xcframework"], &out);
    let root = out.join("needle.xcframework");
    let plist = run_ok(
        Command::new(python)
            .args([
                "-c",
                "import json, plistlib, sys; print(json.dumps(plistlib.load(open(sys.argv[1], 'rb'))))",
            ])
            .arg(root.join("Info.plist")),
    );
    let plist: serde_json::Value = serde_json::from_str(&plist).unwrap();
    assert_eq!(plist["CFBundlePackageType"], "XFWK");
    assert_eq!(plist["XCFrameworkFormatVersion"], "1.0");
    let libs = plist["AvailableLibraries"].as_array().unwrap();
    let mut seen = Vec::new();
    for lib in libs {
        let id = lib["LibraryIdentifier"].as_str().unwrap();
        let platform = lib["SupportedPlatform"].as_str().unwrap();
        let archs: Vec<&str> = lib["SupportedArchitectures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        // The identifier is platform-archs, as xcodebuild -create-xcframework names slices.
        assert_eq!(id, format!("{platform}-{}", archs.join("_")));
        let slice = root.join(id);
        let library = std::fs::read(slice.join(lib["LibraryPath"].as_str().unwrap())).unwrap();
        let headers = slice.join(lib["HeadersPath"].as_str().unwrap());
        let header = std::fs::read_to_string(headers.join("needle.h")).unwrap();
        assert!(header.contains("needle_call_ex") && header.contains("parsed"));
        let triples = if platform == "ios" {
            "aarch64-apple-ios."
        } else {
            "aarch64-apple-darwin and x86_64-apple-darwin."
        };
        assert!(header.contains(&format!("compiled by needlec for {triples}")));
        let map = std::fs::read_to_string(headers.join("module.modulemap")).unwrap();
        assert!(map.starts_with("module needle {") && map.contains("header \"needle.h\""));
        let mut found: Vec<object::Architecture> = Vec::new();
        if archs.len() == 1 {
            let (arch, defines) = archive_member_arch(&library, "_needle_call_ex");
            assert!(defines, "{id}");
            found.push(arch);
        } else {
            use object::read::macho::{FatArch, MachOFatFile32};
            let fat = MachOFatFile32::parse(&*library).unwrap();
            for arch in fat.arches() {
                let data = arch.data(&*library).unwrap();
                let (member_arch, defines) = archive_member_arch(data, "_needle_call_ex");
                assert!(defines, "{id}");
                assert_eq!(
                    member_arch,
                    arch.architecture(),
                    "{id}: fat entry vs member"
                );
                found.push(member_arch);
            }
        }
        let want: Vec<object::Architecture> = archs
            .iter()
            .map(|a| match *a {
                "arm64" => object::Architecture::Aarch64,
                "x86_64" => object::Architecture::X86_64,
                other => panic!("unexpected architecture {other}"),
            })
            .collect();
        assert_eq!(found, want, "{id}");
        seen.push(id.to_string());
    }
    seen.sort();
    assert_eq!(seen, ["ios-arm64", "macos-arm64_x86_64"]);
    let package = std::fs::read_to_string(out.join("Package.swift")).unwrap();
    assert!(package.starts_with("// swift-tools-version:"));
    assert!(
        package.contains(".binaryTarget(name: \"needle\", path: \"needle.xcframework\")"),
        "{package}"
    );
    assert!(package.contains(".library(name: \"needle\", targets: [\"needle\"])"));
    // Only what was asked for: no Linux library beside it.
    assert!(!out.join("libneedle.a").exists());
}
