//! Target facts for needlec.
//!
//! Everything that depends on the target family lives here and nowhere else: which triples are
//! supported, the Cranelift ISA flags for each (baseline plus opt-in features), what the target
//! can do natively that code generation must know about (f32x4 SIMD, fused multiply-add), the
//! object and archive formats, the symbol mangling, and the C toolchain and emulator tests use.
//!
//! Code generation asks questions ([`Target::simd_f32x4`], [`Target::native_fma`]) instead of
//! matching on architectures, so adding a target means editing this crate only.

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

use cranelift_codegen::isa::{self, OwnedTargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use target_lexicon::{Architecture, BinaryFormat, Endianness, Triple};

/// The triples needlec can build for, with a one-line note each.
const SUPPORTED: &[(&str, &str)] = &[
    (
        "x86_64-unknown-linux-gnu",
        "Linux on x86-64 (SSE2 baseline)",
    ),
    ("x86_64-apple-darwin", "macOS on Intel"),
    ("x86_64-pc-windows-msvc", "Windows on x86-64, MSVC ABI"),
    (
        "aarch64-unknown-linux-gnu",
        "Linux on 64-bit Arm (NEON baseline)",
    ),
    ("aarch64-linux-android", "Android on 64-bit Arm"),
    ("aarch64-apple-darwin", "macOS on Apple silicon"),
    ("aarch64-apple-ios", "iOS"),
    (
        "riscv64gc-unknown-linux-gnu",
        "Linux on RISC-V RV64GC (no vector extension by default)",
    ),
];

/// Opt-in features per architecture: (feature name as given by the user, Cranelift setting,
/// features it implies). Implications are applied so that e.g. `fma` alone gives a consistent
/// AVX-capable ISA instead of an invalid combination.
const X86_FEATURES: &[(&str, &str, &[&str])] = &[
    ("sse3", "has_sse3", &[]),
    ("ssse3", "has_ssse3", &["sse3"]),
    ("sse41", "has_sse41", &["ssse3"]),
    ("sse42", "has_sse42", &["sse41"]),
    ("popcnt", "has_popcnt", &[]),
    ("avx", "has_avx", &["sse42"]),
    ("avx2", "has_avx2", &["avx"]),
    ("fma", "has_fma", &["avx"]),
    ("bmi1", "has_bmi1", &[]),
    ("bmi2", "has_bmi2", &[]),
    ("lzcnt", "has_lzcnt", &[]),
];
const AARCH64_FEATURES: &[(&str, &str, &[&str])] = &[
    ("lse", "has_lse", &[]),
    ("fp16", "has_fp16", &[]),
    ("dotprod", "has_dotprod", &[]),
    ("i8mm", "has_i8mm", &[]),
];
const RISCV64_FEATURES: &[(&str, &str, &[&str])] = &[
    ("v", "has_v", &[]),
    ("zba", "has_zba", &[]),
    ("zbb", "has_zbb", &[]),
    ("zbs", "has_zbs", &[]),
    ("zfa", "has_zfa", &[]),
    ("zicond", "has_zicond", &[]),
];

/// Named CPU levels per architecture: (name, features it enables). `native` (the running CPU)
/// is handled separately; the baseline is the empty list and runs on every device of the triple.
const CPUS: &[(Arch, &str, &[&str])] = &[
    (Arch::X86_64, "x86-64", &[]),
    (Arch::X86_64, "x86-64-v2", &["sse42", "popcnt"]),
    (
        Arch::X86_64,
        "x86-64-v3",
        &["sse42", "popcnt", "avx2", "fma", "bmi1", "bmi2", "lzcnt"],
    ),
    (Arch::Aarch64, "generic", &[]),
    (
        Arch::Aarch64,
        "armv8.2-a+dotprod",
        &["lse", "fp16", "dotprod"],
    ),
    (Arch::Riscv64, "rv64gc", &[]),
    (Arch::Riscv64, "rv64gcv", &["v", "zba", "zbb", "zbs"]),
];

/// Errors from target selection. All user-reachable: they carry what to do instead.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("`{triple}` is not a target triple: {message}")]
    Parse { triple: String, message: String },
    #[error("target `{triple}` is not supported: {reason}.\nSupported targets:\n{supported}")]
    Unsupported {
        triple: String,
        reason: String,
        supported: String,
    },
    #[error("unknown feature `{feature}` for {arch}; known features: {known}")]
    UnknownFeature {
        feature: String,
        arch: String,
        known: String,
    },
    #[error(
        "unknown --cpu `{cpu}` for {arch}; known: {known}, or `native` when building for the host"
    )]
    UnknownCpu {
        cpu: String,
        arch: String,
        known: String,
    },
    #[error("Cranelift refused the settings for `{triple}`: {message}")]
    Isa { triple: String, message: String },
}

/// Architecture families needlec generates code for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    X86_64,
    Aarch64,
    Riscv64,
}

/// Object file format of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectFormat {
    Elf,
    MachO,
    Coff,
}

/// Static archive flavour the target's linker expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArchiveKind {
    /// System V / GNU `ar`: `/` symbol table, `//` long-name table.
    Gnu,
    /// BSD `ar` as Apple's `ld` expects: `__.SYMDEF` symbol table, `#1/len` long names.
    Bsd,
    /// MSVC `.lib`: GNU layout with a `/` linker member, which `link.exe` and `lld-link` accept.
    Coff,
}

/// How tests build and run C code for this target on a Linux x86-64 host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestToolchain {
    /// C compiler command (a cross compiler when the target is not the host).
    pub cc: &'static str,
    /// Extra arguments for `cc` (e.g. `--target=` for clang).
    pub cc_args: &'static [&'static str],
    /// Program that runs a target executable on the host, with its arguments; empty: run
    /// directly. `None` as a whole: the result cannot be run here, only compiled and linked.
    pub runner: Option<&'static [&'static str]>,
    /// A linker command that links the library's object, alone, into a shared library: proof
    /// that a real linker for the target accepts it (then `-o OUT OBJ`, or `/out:OUT OBJ` for
    /// `lld-link`). From Debian's `lld` package.
    pub link: &'static [&'static str],
}

/// Everything needlec knows about one target.
#[derive(Clone, Debug)]
pub struct Target {
    /// The canonical triple, as in [`supported`].
    pub name: &'static str,
    pub triple: Triple,
    pub arch: Arch,
    /// Opt-in features enabled, after implications, sorted.
    pub features: Vec<&'static str>,
}

/// The shape of the generated model's kernels on one target and CPU level
/// ([`Target::kernel_facts`]). Every matrix product reads weights in column panels of 8 (two
/// 4-lane vectors; the int4 packing pairs columns within a panel), so column counts here are
/// multiples of 8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFacts {
    /// Vector registers the register allocator can use (float registers where the 4 lanes are
    /// scalar).
    pub vector_registers: usize,
    /// Rows of a multi-row matrix-product tile (prefill): every weight vector loaded serves
    /// this many rows.
    pub matmul_rows: usize,
    /// Columns of a multi-row tile (a multiple of 8).
    pub matmul_cols: usize,
    /// Columns of a weight block that stays in cache while every row passes over it (a
    /// multiple of `matmul_cols`); single rows (decode) take a whole block at once.
    pub matmul_block_cols: usize,
    /// Weight rows per step of a matrix product's inner loop (unrolling).
    pub matmul_unroll: usize,
    /// Keys per block of streamed attention (online softmax): a block's scores are all the
    /// scratch attention needs.
    pub attention_keys: usize,
    /// Vectors of an attention output row accumulated in registers per pass over a key
    /// block's values (the rest of the row waits in memory): about half the registers.
    pub attention_acc_vectors: usize,
    /// Matrix products accumulate with fused multiply-adds.
    pub fma: bool,
}

impl KernelFacts {
    /// Vector registers a multi-row tile keeps live: accumulators, one weight vector per 4
    /// columns, one broadcast, and one scratch product without FMA.
    pub fn matmul_tile_registers(&self) -> usize {
        let accs = self.matmul_rows * self.matmul_cols / 4;
        accs + self.matmul_cols / 4 + 1 + usize::from(!self.fma)
    }
}

/// One entry of the supported list.
#[derive(Clone, Copy, Debug)]
pub struct SupportedTarget {
    pub triple: &'static str,
    pub note: &'static str,
}

/// The targets needlec supports.
pub fn supported() -> Vec<SupportedTarget> {
    SUPPORTED
        .iter()
        .map(|&(triple, note)| SupportedTarget { triple, note })
        .collect()
}

/// The opt-in features of an architecture (`--features`).
pub fn known_features(arch: Arch) -> Vec<&'static str> {
    arch_features(arch).iter().map(|(n, _, _)| *n).collect()
}

/// The named CPU levels of an architecture (`--cpu`).
pub fn cpus(arch: Arch) -> Vec<&'static str> {
    CPUS.iter()
        .filter(|(a, _, _)| *a == arch)
        .map(|(_, n, _)| *n)
        .collect()
}

fn supported_list() -> String {
    SUPPORTED
        .iter()
        .map(|(t, n)| format!("  {t:<30} {n}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn arch_features(arch: Arch) -> &'static [(&'static str, &'static str, &'static [&'static str])] {
    match arch {
        Arch::X86_64 => X86_FEATURES,
        Arch::Aarch64 => AARCH64_FEATURES,
        Arch::Riscv64 => RISCV64_FEATURES,
    }
}

/// Why a parsed triple is not supported, in words a user can act on.
fn unsupported_reason(t: &Triple) -> String {
    match t.architecture {
        Architecture::X86_64 | Architecture::Aarch64(_) => format!(
            "needlec has no target facts (ABI, object format, toolchain) for OS `{}` / environment `{}` yet",
            t.operating_system, t.environment
        ),
        Architecture::Riscv64(_) => {
            "only riscv64gc is supported: Cranelift's RISC-V backend assumes the G extensions (use riscv64gc-...)".to_string()
        }
        Architecture::S390x => {
            "Cranelift has an s390x backend, but needlec does not target s390x".to_string()
        }
        other => format!("Cranelift has no code generator for the `{other}` architecture"),
    }
}

impl Target {
    /// The target for `triple`, baseline features only.
    pub fn from_triple(triple: &str) -> Result<Target, TargetError> {
        Target::with_features(triple, &[])
    }

    /// The target for `triple` with opt-in `features` (e.g. `["avx2", "fma"]` on x86-64).
    pub fn with_features(triple: &str, features: &[&str]) -> Result<Target, TargetError> {
        // `host`: the machine needlec runs on.
        let host_triple;
        let triple = if triple == "host" {
            host_triple = Triple::host().to_string();
            host_triple.as_str()
        } else {
            triple
        };
        let parsed = Triple::from_str(triple).map_err(|e| TargetError::Parse {
            triple: triple.to_string(),
            message: e.to_string(),
        })?;
        let name = SUPPORTED
            .iter()
            .map(|(name, _)| *name)
            .find(|name| Triple::from_str(name).is_ok_and(|s| s == parsed))
            .ok_or_else(|| TargetError::Unsupported {
                triple: triple.to_string(),
                reason: unsupported_reason(&parsed),
                supported: supported_list(),
            })?;
        let arch = match parsed.architecture {
            Architecture::X86_64 => Arch::X86_64,
            Architecture::Aarch64(_) => Arch::Aarch64,
            Architecture::Riscv64(_) => Arch::Riscv64,
            // Unreachable through SUPPORTED, but an error is cheaper than a panic to reason about.
            _ => {
                return Err(TargetError::Unsupported {
                    triple: triple.to_string(),
                    reason: unsupported_reason(&parsed),
                    supported: supported_list(),
                })
            }
        };
        let table = arch_features(arch);
        let mut enabled: Vec<&'static str> = Vec::new();
        let mut todo: Vec<String> = features
            .iter()
            .map(|f| f.trim().to_ascii_lowercase())
            .collect();
        while let Some(f) = todo.pop() {
            let Some(&(name, _, implies)) = table.iter().find(|(n, _, _)| *n == f) else {
                return Err(TargetError::UnknownFeature {
                    feature: f,
                    arch: format!("{arch:?}"),
                    known: table
                        .iter()
                        .map(|(n, _, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            if !enabled.contains(&name) {
                enabled.push(name);
                todo.extend(implies.iter().map(|s| s.to_string()));
            }
        }
        enabled.sort_unstable();
        Ok(Target {
            name,
            triple: parsed,
            arch,
            features: enabled,
        })
    }

    /// The target for `triple` with a named CPU level (`--cpu`, see [`cpus`]; `native`: every
    /// feature of the running CPU, for the host triple only) plus extra `features`.
    pub fn with_cpu(
        triple: &str,
        cpu: Option<&str>,
        features: &[&str],
    ) -> Result<Target, TargetError> {
        let base = Target::from_triple(triple)?;
        let mut all: Vec<&str> = features.to_vec();
        match cpu {
            None => {}
            Some("native") if Target::host().is_ok_and(|h| h.name == base.name) => {
                all.extend(host_cpu_features());
            }
            Some(name) => {
                let Some(&(_, _, feats)) =
                    CPUS.iter().find(|(a, n, _)| *a == base.arch && *n == name)
                else {
                    return Err(TargetError::UnknownCpu {
                        cpu: name.to_string(),
                        arch: format!("{:?}", base.arch),
                        known: cpus(base.arch).join(", "),
                    });
                };
                all.extend(feats);
            }
        }
        Target::with_features(triple, &all)
    }

    /// The target of the machine needlec runs on, when it is a supported one.
    pub fn host() -> Result<Target, TargetError> {
        Target::from_triple(&Triple::host().to_string())
    }

    /// The host target with every opt-in feature the running CPU has (for tests and
    /// `--target native`-style builds).
    pub fn host_native() -> Result<Target, TargetError> {
        let host = Target::host()?;
        Target::with_features(host.name, &host_cpu_features())
    }

    /// Whether an opt-in feature is enabled.
    pub fn has(&self, feature: &str) -> bool {
        self.features.contains(&feature)
    }

    pub fn object_format(&self) -> ObjectFormat {
        match self.triple.binary_format {
            BinaryFormat::Macho => ObjectFormat::MachO,
            BinaryFormat::Coff => ObjectFormat::Coff,
            _ => ObjectFormat::Elf,
        }
    }

    pub fn archive_kind(&self) -> ArchiveKind {
        match self.object_format() {
            ObjectFormat::Elf => ArchiveKind::Gnu,
            ObjectFormat::MachO => ArchiveKind::Bsd,
            ObjectFormat::Coff => ArchiveKind::Coff,
        }
    }

    /// Whether the target stores multi-byte values most significant byte first. None of the
    /// supported targets does; data writers ask through [`Target::u32_bytes`] and
    /// [`Target::f32_bytes`] anyway, so no generator hard-codes an order.
    pub fn is_big_endian(&self) -> bool {
        matches!(self.triple.endianness(), Ok(Endianness::Big))
    }

    /// `u32` values as the target stores them in memory: what generated code loads from a
    /// read-only table.
    pub fn u32_bytes(&self, values: impl IntoIterator<Item = u32>) -> Vec<u8> {
        let big = self.is_big_endian();
        values
            .into_iter()
            .flat_map(|v| {
                if big {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                }
            })
            .collect()
    }

    /// `f32` values as the target stores them in memory (IEEE 754 bits in its byte order).
    pub fn f32_bytes(&self, values: impl IntoIterator<Item = f32>) -> Vec<u8> {
        self.u32_bytes(values.into_iter().map(f32::to_bits))
    }

    /// Prefix the object format puts before C names (`_` on Apple). The `object` crate, used by
    /// cranelift-object, adds it itself when writing symbols: code generation declares plain C
    /// names; only readers of symbol tables (archive index, self-checks) need this.
    pub fn symbol_prefix(&self) -> &'static str {
        match self.object_format() {
            ObjectFormat::MachO => "_",
            _ => "",
        }
    }

    /// File extensions for an object and a static library.
    pub fn object_extension(&self) -> &'static str {
        match self.object_format() {
            ObjectFormat::Coff => "obj",
            _ => "o",
        }
    }
    pub fn staticlib_extension(&self) -> &'static str {
        match self.object_format() {
            ObjectFormat::Coff => "lib",
            _ => "a",
        }
    }

    /// Whether Cranelift lowers f32x4 arithmetic to native vector instructions here. RISC-V
    /// without the V extension has no 128-bit vectors; code generation then uses 4 scalar lanes.
    /// Whether `--quantize-activations` (16-bit integer dot products) is offered: on x86-64
    /// and aarch64. RISC-V's vector code for it generates, but qemu-riscv64 (the emulator the
    /// tests run RISC-V code on) aborts on it, so it could not be checked and is refused
    /// rather than shipped unverified; without vectors there is nothing to gain.
    pub fn int_dot_products(&self) -> bool {
        matches!(self.arch, Arch::X86_64 | Arch::Aarch64) && self.simd_f32x4()
    }

    /// Whether Cranelift lowers `swizzle` (a byte shuffle by a vector of indices) to one
    /// native instruction: aarch64's `tbl`, x86-64's `pshufb` (SSSE3; without it a libcall,
    /// which a standalone object must not reference). RISC-V's vector code for it is not
    /// checked under the emulator, so it is not used there.
    pub fn byte_shuffles(&self) -> bool {
        match self.arch {
            Arch::X86_64 => self.has("ssse3"),
            Arch::Aarch64 => true,
            Arch::Riscv64 => false,
        }
    }

    /// Whether x86-64's `pshufb` is there to use directly (SSSE3): for indices known to be below
    /// 16 it is `swizzle` without the saturating add Cranelift's `swizzle` spends on x86-64 to
    /// zero out-of-range lanes.
    pub fn pshufb(&self) -> bool {
        self.arch == Arch::X86_64 && self.has("ssse3")
    }

    pub fn simd_f32x4(&self) -> bool {
        match self.arch {
            Arch::X86_64 | Arch::Aarch64 => true,
            Arch::Riscv64 => self.has("v"),
        }
    }

    /// Whether Cranelift's `fma` is a native instruction. Without it (x86-64 below FMA3) Cranelift
    /// lowers `fma` to a call to `fmaf`, which a standalone object must not reference.
    pub fn native_fma(&self) -> bool {
        match self.arch {
            Arch::X86_64 => self.has("fma"),
            Arch::Aarch64 | Arch::Riscv64 => true,
        }
    }

    /// How the generated model's kernels are shaped for this target and CPU level: register
    /// tiles, unrolling and block sizes. Code generation asks for these instead of matching on
    /// the architecture.
    pub fn kernel_facts(&self) -> KernelFacts {
        let fma = self.native_fma();
        match self.arch {
            // 16 xmm registers. Without FMA (SSE2 baseline) `acc + x * w` needs a scratch
            // register per step: 4 rows x 8 columns is 8 accumulators, 2 weight vectors, a
            // broadcast and a product. With FMA (`x86-64-v3`) 6 rows would fit in registers (12
            // accumulators + 2 weights + 1 broadcast), but measured 35% slower: Cranelift spills
            // and adds moves around the fused form, so the tile stays 4 x 8.
            Arch::X86_64 => KernelFacts {
                vector_registers: 16,
                attention_acc_vectors: 8,
                matmul_rows: 4,
                matmul_cols: 8,
                matmul_block_cols: 16,
                matmul_unroll: 1,
                attention_keys: 64,
                fma,
            },
            // NEON has 32 vector registers: 8 rows x 8 columns is 16 accumulators, 2 weight
            // vectors and 8 broadcasts, with room to spare for the loop's addresses.
            Arch::Aarch64 => KernelFacts {
                vector_registers: 32,
                attention_acc_vectors: 16,
                matmul_rows: 8,
                matmul_cols: 8,
                matmul_block_cols: 32,
                matmul_unroll: 1,
                attention_keys: 64,
                fma,
            },
            // With `v`: 32 vector registers like NEON, but Cranelift's RISC-V vector lowering
            // re-establishes the vector length around instructions; a middle tile keeps spills
            // away. Without it the 4 lanes are scalar float registers (32 of them): 2 rows x 8
            // columns is 16 accumulators and 8 weights.
            Arch::Riscv64 if self.has("v") => KernelFacts {
                vector_registers: 32,
                attention_acc_vectors: 16,
                matmul_rows: 4,
                matmul_cols: 8,
                matmul_block_cols: 16,
                matmul_unroll: 1,
                attention_keys: 64,
                fma,
            },
            Arch::Riscv64 => KernelFacts {
                vector_registers: 32,
                attention_acc_vectors: 4,
                matmul_rows: 2,
                matmul_cols: 8,
                matmul_block_cols: 16,
                matmul_unroll: 1,
                attention_keys: 64,
                fma,
            },
        }
    }

    /// Whether `floor`/`ceil`/`nearest`/`trunc` are native. x86-64 needs SSE4.1 (`roundps`);
    /// without it Cranelift emits libcalls, so code generation must avoid them.
    pub fn native_round(&self) -> bool {
        match self.arch {
            Arch::X86_64 => self.has("sse41"),
            Arch::Aarch64 | Arch::Riscv64 => true,
        }
    }

    /// The Cranelift ISA for this target: speed-optimized, probes inline (no `__probestack`
    /// libcall), no unwind tables (the generated code never unwinds).
    ///
    /// `is_pic` stays off on purpose. Generated code only references its own object's symbols,
    /// which cranelift-module declares colocated; Cranelift lowers those PC-relative (x86-64
    /// `lea rip+`, aarch64 `adrp/add`, riscv64 `auipc/addi`), so the code is position-independent
    /// anyway and links into PIEs and shared objects. With `is_pic` on, Cranelift would route even
    /// colocated data through the GOT (x86-64 `GOTPCREL`, COFF `.refptr` stubs).
    pub fn isa(&self) -> Result<OwnedTargetIsa, TargetError> {
        let err = |e: &dyn fmt::Display| TargetError::Isa {
            triple: self.name.to_string(),
            message: e.to_string(),
        };
        let mut shared = settings::builder();
        for (k, v) in [
            ("opt_level", "speed"),
            ("is_pic", "false"),
            ("enable_probestack", "false"),
            ("probestack_strategy", "inline"),
            ("unwind_info", "false"),
            ("enable_verifier", "true"),
        ] {
            shared.set(k, v).map_err(|e| err(&e))?;
        }
        let flags = settings::Flags::new(shared);
        let mut builder = isa::lookup(self.triple.clone()).map_err(|e| err(&e))?;
        if self.arch == Arch::Riscv64 {
            // "gc": G is Cranelift's baseline; C (compressed) is part of the triple's promise.
            builder.enable("has_c").map_err(|e| err(&e))?;
        }
        for f in &self.features {
            if let Some((_, setting, _)) = arch_features(self.arch).iter().find(|(n, _, _)| n == f)
            {
                builder.enable(setting).map_err(|e| err(&e))?;
            }
        }
        builder.finish(flags).map_err(|e| err(&e))
    }

    /// The C toolchain tests use for this target on a Linux x86-64 host.
    pub fn test_toolchain(&self) -> TestToolchain {
        const NONE: Option<&[&str]> = None;
        match self.name {
            "x86_64-unknown-linux-gnu" => TestToolchain {
                cc: "cc",
                cc_args: &[],
                runner: Some(&[]),
                link: &["ld.lld", "-shared"],
            },
            "aarch64-unknown-linux-gnu" => TestToolchain {
                cc: "aarch64-linux-gnu-gcc",
                cc_args: &["-static"],
                runner: Some(&["qemu-aarch64"]),
                link: &["ld.lld", "-shared"],
            },
            "riscv64gc-unknown-linux-gnu" => TestToolchain {
                cc: "riscv64-linux-gnu-gcc",
                cc_args: &["-static"],
                // Code built with `v` needs an emulated CPU that has the vector extension.
                runner: Some(if self.has("v") {
                    &[
                        "qemu-riscv64",
                        "-cpu",
                        "rv64,v=true,vlen=128,vext_spec=v1.0",
                    ]
                } else {
                    &["qemu-riscv64"]
                }),
                link: &["ld.lld", "-shared"],
            },
            "aarch64-linux-android" => TestToolchain {
                cc: "clang",
                cc_args: &["--target=aarch64-linux-android"],
                runner: NONE,
                link: &["ld.lld", "-shared"],
            },
            "x86_64-apple-darwin" => TestToolchain {
                cc: "clang",
                cc_args: &["--target=x86_64-apple-macos11"],
                runner: NONE,
                link: &[
                    "ld64.lld",
                    "-dylib",
                    "-arch",
                    "x86_64",
                    "-platform_version",
                    "macos",
                    "11.0",
                    "11.0",
                ],
            },
            "aarch64-apple-darwin" => TestToolchain {
                cc: "clang",
                cc_args: &["--target=arm64-apple-macos11"],
                runner: NONE,
                link: &[
                    "ld64.lld",
                    "-dylib",
                    "-arch",
                    "arm64",
                    "-platform_version",
                    "macos",
                    "11.0",
                    "11.0",
                ],
            },
            "aarch64-apple-ios" => TestToolchain {
                cc: "clang",
                cc_args: &["--target=arm64-apple-ios14"],
                runner: NONE,
                link: &[
                    "ld64.lld",
                    "-dylib",
                    "-arch",
                    "arm64",
                    "-platform_version",
                    "ios",
                    "14.0",
                    "14.0",
                ],
            },
            _ => TestToolchain {
                cc: "clang",
                cc_args: &["--target=x86_64-pc-windows-msvc"],
                runner: NONE,
                link: &["lld-link", "/dll", "/noentry", "/machine:x64"],
            },
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)?;
        if !self.features.is_empty() {
            write!(f, " (+{})", self.features.join(",+"))?;
        }
        Ok(())
    }
}

/// Opt-in features (names as in this crate) of the CPU running this process.
pub fn host_cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut out: Vec<&'static str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($std:tt => $ours:expr),*) => {
                $(if std::arch::is_x86_feature_detected!($std) { out.push($ours); })*
            };
        }
        probe!("sse3" => "sse3", "ssse3" => "ssse3", "sse4.1" => "sse41", "sse4.2" => "sse42",
               "popcnt" => "popcnt", "avx" => "avx", "avx2" => "avx2", "fma" => "fma",
               "bmi1" => "bmi1", "bmi2" => "bmi2", "lzcnt" => "lzcnt");
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! probe {
            ($($std:tt => $ours:expr),*) => {
                $(if std::arch::is_aarch64_feature_detected!($std) { out.push($ours); })*
            };
        }
        probe!("lse" => "lse", "fp16" => "fp16", "dotprod" => "dotprod", "i8mm" => "i8mm");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_target_builds_an_isa() {
        for t in supported() {
            let target = Target::from_triple(t.triple).unwrap();
            assert_eq!(target.name, t.triple);
            let isa = target.isa().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(isa.triple(), &target.triple);
        }
    }

    #[test]
    fn formats_and_prefixes() {
        let mac = Target::from_triple("aarch64-apple-darwin").unwrap();
        assert_eq!(mac.object_format(), ObjectFormat::MachO);
        assert_eq!(mac.archive_kind(), ArchiveKind::Bsd);
        assert_eq!(mac.symbol_prefix(), "_");
        let win = Target::from_triple("x86_64-pc-windows-msvc").unwrap();
        assert_eq!(win.object_format(), ObjectFormat::Coff);
        assert_eq!(win.staticlib_extension(), "lib");
        let linux = Target::from_triple("x86_64-unknown-linux-gnu").unwrap();
        assert_eq!(linux.object_format(), ObjectFormat::Elf);
        assert_eq!(linux.archive_kind(), ArchiveKind::Gnu);
        assert_eq!(linux.symbol_prefix(), "");
        assert!(linux.simd_f32x4() && !linux.native_fma() && !linux.native_round());
        let android = Target::from_triple("aarch64-linux-android").unwrap();
        assert_eq!(android.arch, Arch::Aarch64);
        assert!(android.native_fma());
        let rv = Target::from_triple("riscv64gc-unknown-linux-gnu").unwrap();
        assert!(!rv.simd_f32x4());
        assert!(Target::with_features("riscv64gc-unknown-linux-gnu", &["v"])
            .unwrap()
            .simd_f32x4());
    }

    #[test]
    fn data_bytes_follow_the_target_byte_order() {
        for t in supported() {
            let target = Target::from_triple(t.triple).unwrap();
            // Every supported target is little-endian; a big-endian one must flip this.
            assert!(!target.is_big_endian(), "{}", t.triple);
            assert_eq!(
                target.u32_bytes([0x0102_0304, 7]),
                [4, 3, 2, 1, 7, 0, 0, 0],
                "{}",
                t.triple
            );
            assert_eq!(
                target.f32_bytes([1.0, -2.0]),
                [0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0]
            );
        }
    }

    #[test]
    fn features_imply_their_prerequisites() {
        let t = Target::with_features("x86_64-unknown-linux-gnu", &["fma"]).unwrap();
        assert_eq!(
            t.features,
            ["avx", "fma", "sse3", "sse41", "sse42", "ssse3"]
        );
        assert!(t.native_fma() && t.native_round());
        t.isa().unwrap();
        let e = Target::with_features("x86_64-unknown-linux-gnu", &["neon"]).unwrap_err();
        assert!(e.to_string().contains("known features"), "{e}");
        let e = Target::with_features("aarch64-unknown-linux-gnu", &["avx"]).unwrap_err();
        assert!(matches!(e, TargetError::UnknownFeature { .. }));
    }

    #[test]
    fn unsupported_triples_say_why_and_list_the_supported_ones() {
        for (triple, why) in [
            ("riscv32imac-unknown-none-elf", "no code generator"),
            ("armv7-unknown-linux-gnueabihf", "no code generator"),
            ("i686-unknown-linux-gnu", "no code generator"),
            ("wasm32-unknown-unknown", "no code generator"),
            ("x86_64-unknown-freebsd", "no target facts"),
            ("riscv64-unknown-linux-gnu", "riscv64gc"),
            ("s390x-unknown-linux-gnu", "does not target"),
        ] {
            let e = Target::from_triple(triple).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, TargetError::Unsupported { .. }),
                "{triple}: {msg}"
            );
            assert!(msg.contains(why), "{triple}: {msg}");
            assert!(
                msg.contains("aarch64-apple-ios") && msg.contains("riscv64gc-unknown-linux-gnu"),
                "{msg}"
            );
        }
        assert!(matches!(
            Target::from_triple("not a triple").unwrap_err(),
            TargetError::Parse { .. }
        ));
    }

    #[test]
    fn kernel_tiles_fit_each_targets_registers() {
        for t in supported() {
            for cpu in std::iter::once(None).chain(
                cpus(Target::from_triple(t.triple).unwrap().arch)
                    .into_iter()
                    .map(Some),
            ) {
                let target = Target::with_cpu(t.triple, cpu, &[]).unwrap();
                let f = target.kernel_facts();
                assert!(
                    f.matmul_tile_registers() <= f.vector_registers,
                    "{} {cpu:?}: {f:?}",
                    t.triple
                );
                assert_eq!(f.matmul_cols % 8, 0, "whole panels");
                assert_eq!(f.matmul_block_cols % f.matmul_cols, 0);
                assert!(f.matmul_rows >= 1 && f.attention_keys >= 4);
                assert_eq!(f.fma, target.native_fma());
            }
        }
        let v3 = Target::with_cpu("x86_64-unknown-linux-gnu", Some("x86-64-v3"), &[]).unwrap();
        let base = Target::from_triple("x86_64-unknown-linux-gnu").unwrap();
        let arm = Target::from_triple("aarch64-unknown-linux-gnu").unwrap();
        assert!(v3.kernel_facts().fma && !base.kernel_facts().fma);
        assert!(
            arm.kernel_facts().matmul_rows * arm.kernel_facts().matmul_cols
                > base.kernel_facts().matmul_rows * base.kernel_facts().matmul_cols,
            "NEON's 32 registers hold a larger tile than x86's 16"
        );
    }

    #[test]
    fn host_native_builds_an_isa() {
        if let Ok(t) = Target::host_native() {
            t.isa().unwrap();
        }
    }

    #[test]
    fn aliases_parse_to_the_canonical_name() {
        assert_eq!(
            Target::from_triple("x86_64-linux-gnu").unwrap().name,
            "x86_64-unknown-linux-gnu"
        );
        assert_eq!(
            Target::from_triple("aarch64-unknown-linux-android")
                .unwrap()
                .name,
            "aarch64-linux-android"
        );
    }
}
