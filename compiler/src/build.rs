//! `needlec build`: the whole pipeline, load -> lower -> materialize constants (folding the tools
//! side when asked) -> passes -> codegen -> emit, for one app's fixed tool list. The only module
//! that knows the order of the stages.

use std::path::{Path, PathBuf};

use needle_ir::{
    print, print_planned, run_pipeline, ConstStore, IrError, Module, PassError, WorkspacePlan,
    PIPELINE,
};
use needle_runtime::checkpoint::Checkpoint;
use needle_runtime::decode::{
    check_max_query_tokens, check_strict_budget, strict_tables, tool_ids, EngineError, FoldMode,
    GrammarKind, MAX_DECODE_STEPS, MAX_GEN_LEN, MAX_QUERY_TOKENS,
};
use needle_runtime::model::Model;
use needle_runtime::strict::StrictTables;
use needle_runtime::tokenizer::Tokenizer;
use needle_targets::Target;

use crate::codegen::library::{generate, LibraryInput};
use crate::codegen::CodegenError;
use crate::emit::xcframework::{self, XcframeworkError};
use crate::emit::{check_standalone, write_archive, ArchiveMember, EmitError};

use crate::frontend::{
    check_vocab, load_checkpoint_at, load_tokenizer, query_room_warning, resolve_fold,
    resolve_weights, FrontendError,
};
use crate::lower::lower_for_steps;
use crate::materialize::materialize_constants;
use crate::precision::Precision;
use crate::report::{self, ReportError, SizeReport, WorkspaceRegion};
use crate::tools::{load_tools_arg, ToolSet};

/// What `needlec build` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Emit {
    /// `libNAME.a` (`NAME.lib` on Windows).
    Staticlib,
    /// `NAME.o` (`NAME.obj` on Windows).
    Obj,
    /// `NAME.ir`: the IR after every pass.
    Ir,
    /// `NAME.h`.
    Header,
    /// `NAME.rs`: the Rust binding, a safe `Needle` type over the C interface
    /// ([`crate::codegen::rust_binding`]).
    Rust,
    /// `NAME.report.json`: bytes per component, the workspace's regions and the options
    /// ([`crate::report`]); the build's [`BuildReport::size_report`] has it as a table.
    Report,
    /// `NAME.xcframework/` and `Package.swift` ([`crate::emit::xcframework`]): the library built
    /// for every Apple target (whatever `--target` says; baseline CPUs), one slice per platform.
    Xcframework,
}

/// The default of `--max-forced-rows` ([`crate::codegen::model::MAX_FORCED_ROWS`]).
pub const MAX_FORCED_ROWS: usize = crate::codegen::model::MAX_FORCED_ROWS;

#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub checkpoint: PathBuf,
    pub tokenizer: PathBuf,
    /// A path, or inline JSON when it starts with `[`.
    pub tools: String,
    pub target: String,
    /// A named CPU level (`x86-64-v3`, `native`, ...): opt-in ISA extensions; `None`: the
    /// baseline that runs on every device of the triple.
    pub cpu: Option<String>,
    /// Extra opt-in ISA features (`fma`, `dotprod`, `v`, ...).
    pub features: Vec<String>,
    pub fold: Option<FoldMode>,
    /// How weights are stored (`--weights`); `None`: the lossless format for the checkpoint
    /// ([`needle_runtime::quant::lossless`]).
    pub weights: Option<Precision>,
    pub max_gen_len: usize,
    /// `--max-query-tokens`: the most query tokens the library reads (longer queries are cut
    /// folded and refused exact, as `needlec run --max-query-tokens`); it bounds the workspace.
    /// `None`: as many as the model allows for the tool list.
    pub max_query_tokens: Option<usize>,
    /// Prefix of every exported symbol and macro: a C identifier.
    pub name: String,
    /// `--escalate-below T`: `NAME_call_ex` sets `escalate` when the confidence is below `T`, in
    /// `[0, 1]`; 0 (the default) never escalates.
    pub escalate_below: f64,
    /// `--quantize-activations` (opt-in, int8/int4 only, targets with 128-bit vectors): matrix
    /// products quantize their input rows to int8 range per group and use integer dot products,
    /// so the outputs may differ from the reference's.
    pub quantize_activations: bool,
    /// `--grammar`: the reference's name/key grammar (the default; the library is then what it
    /// was before the strict grammar existed, byte for byte) or the strict schema grammar.
    pub grammar: GrammarKind,
    /// `--max-forced-rows`: the most consecutive forced tokens the decoder runs as one
    /// multi-row step (default [`crate::codegen::model::MAX_FORCED_ROWS`]; 1: one row per
    /// step). The answer is the same whatever it is.
    pub max_forced_rows: usize,
    pub emit: Vec<Emit>,
    pub out_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(
        "--name {0:?} is not a C identifier: it prefixes every exported symbol and macro, so use \
         letters, digits and `_`, not starting with a digit (e.g. `assistant`)"
    )]
    BadName(String),
    #[error("--max-gen-len must be between 2 and {max} (it allows max_gen_len - 1 generated tokens), got {got}")]
    MaxGenLen { got: usize, max: usize },
    #[error(
        "--escalate-below must be a confidence between 0 and 1 (0: never escalate; `needlec eval \
         --target-precision` suggests one), got {0}"
    )]
    EscalateBelow(f64),
    #[error(
        "--quantize-activations needs --weights int8 or int4 (it multiplies integer weights \
         with integer activations), but the weights are {0}: add --weights int4, or drop the flag"
    )]
    QuantizeActivationsWeights(Precision),
    #[error(
        "--quantize-activations is offered on x86-64 and aarch64 targets, not on {0}: its RISC-V \
         vector code could not be verified (the emulator the tests use aborts on it); drop the \
         flag for this target"
    )]
    QuantizeActivationsTarget(String),
    #[error("IR pass failed: {0}")]
    Pass(#[from] PassError),
    #[error("planning the workspace: {0}")]
    Plan(IrError),
    #[error("filling the constants: {0}")]
    Materialize(String),
    #[error(transparent)]
    Target(#[from] needle_targets::TargetError),
    #[error("code generation: {0}")]
    Codegen(#[from] CodegenError),
    #[error(transparent)]
    Emit(#[from] EmitError),
    #[error(transparent)]
    Xcframework(#[from] XcframeworkError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("writing {}: {cause}", .path.display())]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// The largest `--max-gen-len`: the library's decoder positions are planned for
/// [`MAX_DECODE_STEPS`] steps; `run`, `trace` and `eval` share the bound.
pub const MAX_GEN_LEN_LIMIT: usize = MAX_GEN_LEN;
const _: () = assert!(MAX_GEN_LEN_LIMIT == MAX_DECODE_STEPS + 1);

/// A lowered and optimized program with its constants' data and the inputs it was built from:
/// what [`build`] hands codegen, as a [`LibraryInput`].
pub struct Compiled {
    pub module: Module,
    pub store: ConstStore,
    pub fold: FoldMode,
    /// The IR after lowering and after each pass, for `--emit ir`; the last one annotated with
    /// the workspace plan.
    pub stages: IrStages,
    pub fold_warning: Option<String>,
    /// Set when an exact-mode tool list leaves (almost) no room for a query.
    pub room_warning: Option<String>,
    /// How the weights are stored.
    pub precision: Precision,
    /// Set when `precision` rounds the checkpoint's values: show it once.
    pub weights_notice: Option<String>,
    /// The float32 model the library computes with (the checkpoint's, after `precision`).
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub tools: ToolSet,
    pub tool_ids: Vec<u32>,
    /// The strict grammar's tables (`--grammar strict`).
    pub strict: Option<StrictTables>,
}

/// Runs load -> lower -> materialize constants -> passes.
pub fn compile(opts: &BuildOptions) -> Result<Compiled, BuildError> {
    // An unsupported target is refused before any work is done.
    target_of(opts)?;
    if !is_c_identifier(&opts.name) {
        return Err(BuildError::BadName(opts.name.clone()));
    }
    if !(2..=MAX_GEN_LEN_LIMIT).contains(&opts.max_gen_len) {
        return Err(BuildError::MaxGenLen {
            got: opts.max_gen_len,
            max: MAX_GEN_LEN_LIMIT,
        });
    }
    // NaN fails the range test too.
    if !(0.0..=1.0).contains(&opts.escalate_below) {
        return Err(BuildError::EscalateBelow(opts.escalate_below));
    }
    // A bound of 0 is wrong whatever the inputs: say so before loading anything.
    if opts.max_query_tokens == Some(0) {
        return Err(FrontendError::from(EngineError::MaxQueryTokensZero).into());
    }
    let checkpoint: Checkpoint = load_checkpoint_at(&opts.checkpoint)?;
    // The float32 model the library computes with: the checkpoint's weights in `precision`
    // (what folding precomputes the tools side from).
    let (precision, weights_notice) = resolve_weights(opts.weights, &checkpoint);
    let model = Model::from_checkpoint_as(&checkpoint, precision).map_err(|cause| {
        FrontendError::Model {
            path: opts.checkpoint.clone(),
            cause,
        }
    })?;
    let tokenizer = load_tokenizer(&opts.tokenizer)?;
    check_vocab(&tokenizer, &opts.tokenizer, model.config.vocab_size)?;
    let tools = load_tools_arg(&opts.tools).map_err(FrontendError::from)?;
    let tool_ids = tool_ids(&tokenizer, &tools.normalized_json).map_err(FrontendError::from)?;
    // The same tables and the same checks as `needlec run --grammar strict`, so that a schema
    // the grammar cannot express, or a budget too small for `[]`, fails the build as it fails
    // a run.
    let strict = match opts.grammar {
        GrammarKind::Reference => None,
        GrammarKind::Strict => {
            let tables = strict_tables(&tokenizer, &tools.context())
                .map_err(|e| FrontendError::from(EngineError::from(e)))?;
            check_strict_budget(&tables, opts.max_gen_len).map_err(FrontendError::from)?;
            Some(tables)
        }
    };
    let (fold, fold_warning) = resolve_fold(opts.fold, model.config.tool_attention);
    let room_warning = query_room_warning(fold, tool_ids.len());
    // The same check and the same bound as `needlec run --max-query-tokens`, so they agree.
    let max_query_tokens = match opts.max_query_tokens {
        Some(n) => check_max_query_tokens(n, tool_ids.len()).map_err(FrontendError::from)?,
        None => MAX_QUERY_TOKENS,
    };
    let mut module = lower_for_steps(
        &model.config,
        fold,
        tool_ids.len(),
        max_query_tokens,
        opts.max_gen_len - 1,
    );
    let mut store = ConstStore::default();
    materialize_constants(&module, &checkpoint, &model, &tool_ids, &mut store)
        .map_err(BuildError::Materialize)?;
    crate::precision::apply(
        &mut module,
        &mut store,
        &model.config,
        &checkpoint,
        precision,
    )
    .map_err(BuildError::Materialize)?;
    let (module, mut stages) = run_passes(module, Some(&mut store))?;
    store.check(&module).map_err(BuildError::Materialize)?;
    // The last stage is what codegen compiles: show it with the workspace plan codegen uses.
    let plan = WorkspacePlan::of(&module).map_err(BuildError::Plan)?;
    if let Some((_, text)) = stages.stages.last_mut() {
        *text = print_planned(&module, &plan);
    }
    Ok(Compiled {
        module,
        store,
        fold,
        stages,
        fold_warning,
        room_warning,
        precision,
        weights_notice,
        model,
        tokenizer,
        tools,
        tool_ids,
        strict,
    })
}

/// The IR after lowering and after each pass, in pipeline order: what `--emit ir` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IrStages {
    /// `(stage, IR text)`: `lowered`, then one entry per pass, named after it.
    pub stages: Vec<(String, String)>,
}

impl IrStages {
    /// The IR text after `stage` (`lowered` or a pass's name).
    pub fn after(&self, stage: &str) -> Option<&str> {
        self.stages
            .iter()
            .find(|(s, _)| s == stage)
            .map(|(_, text)| text.as_str())
    }

    /// The `--emit ir` text: every stage, each under a header line naming it.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (stage, text) in &self.stages {
            out.push_str(&format!("; ---- after {stage}\n{text}"));
            if !text.ends_with('\n') {
                out.push('\n');
            }
        }
        out
    }
}

/// Runs the pass pipeline on a lowered module, rewriting its constants' data along with it
/// when `store` is given, and records the IR after lowering and after every pass. The one path
/// from a lowered module to an optimized one: `needlec build`, `--emit ir` and the IR snapshots
/// all go through it.
pub fn run_passes(
    module: Module,
    store: Option<&mut ConstStore>,
) -> Result<(Module, IrStages), PassError> {
    let mut stages = vec![("lowered".to_string(), print(&module))];
    let module = run_pipeline(module, store, PIPELINE, |pass, m| {
        stages.push((pass.to_string(), print(m)))
    })?;
    Ok((module, IrStages { stages }))
}

/// What a build did.
#[derive(Debug)]
pub struct BuildReport {
    pub written: Vec<PathBuf>,
    /// Set when the fold mode departs from the checkpoint's semantics: show it once.
    pub fold_warning: Option<String>,
    /// Set when `--weights` rounds the checkpoint's values: show it once.
    pub weights_notice: Option<String>,
    /// Set when an exact-mode tool list leaves (almost) no room for a query: show it once.
    pub room_warning: Option<String>,
    /// One line for the user: target, fold mode, workspace size.
    pub summary: String,
    /// With [`Emit::Report`]: the size report as a table.
    pub size_report: Option<String>,
}

/// Runs the whole build and writes the requested files.
pub fn build(opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    let target = target_of(opts)?;
    // The target is known before anything loads; the weights' precision only after.
    if opts.quantize_activations && !target.int_dot_products() {
        return Err(BuildError::QuantizeActivationsTarget(target.to_string()));
    }
    let compiled = compile(opts)?;
    if opts.quantize_activations && !matches!(compiled.precision, Precision::Int8 | Precision::Int4)
    {
        return Err(BuildError::QuantizeActivationsWeights(compiled.precision));
    }
    let needs_code = opts
        .emit
        .iter()
        .any(|e| !matches!(e, Emit::Ir | Emit::Xcframework));
    let signatures: Vec<(String, Vec<String>)> = compiled
        .tools
        .tools
        .iter()
        .map(|t| (t.name.clone(), t.param_keys.clone()))
        .collect();
    let input = LibraryInput {
        module: &compiled.module,
        store: &compiled.store,
        fold: compiled.fold,
        config: &compiled.model.config,
        tokenizer: &compiled.tokenizer,
        signatures: &signatures,
        name_map: &compiled.tools.name_map,
        name: &opts.name,
        max_gen_len: opts.max_gen_len,
        escalate_below: opts.escalate_below as f32,
        quantize_activations: opts.quantize_activations,
        max_forced_rows: opts.max_forced_rows,
        strict: compiled.strict.as_ref(),
    };
    let library = if needs_code {
        let lib = generate(&input, &target)?;
        // A library that references anything outside itself, or exports an unprefixed symbol,
        // is a needlec bug: refuse to write it.
        check_standalone(&lib.object, &format!("{}_", opts.name))?;
        Some(lib)
    } else {
        None
    };
    std::fs::create_dir_all(&opts.out_dir).map_err(|cause| BuildError::Write {
        path: opts.out_dir.clone(),
        cause,
    })?;
    let name = &opts.name;
    let mut written = Vec::new();
    let mut size_report = None;
    for emit in &opts.emit {
        let (file, bytes) = match (emit, &library) {
            (Emit::Report, Some(lib)) => {
                let report = size_report_of(opts, &target, &compiled, lib)?;
                size_report = Some(report.table());
                (format!("{name}.report.json"), report.json().into_bytes())
            }
            (Emit::Ir, _) => (format!("{name}.ir"), compiled.stages.text().into_bytes()),
            (Emit::Header, Some(lib)) => (format!("{name}.h"), lib.header.clone().into_bytes()),
            (Emit::Rust, Some(lib)) => (format!("{name}.rs"), lib.binding.clone().into_bytes()),
            (Emit::Obj, Some(lib)) => (
                format!("{name}.{}", target.object_extension()),
                lib.object.clone(),
            ),
            (Emit::Staticlib, Some(lib)) => {
                let member = ArchiveMember {
                    name: format!("{name}.{}", target.object_extension()),
                    data: lib.object.clone(),
                };
                (
                    staticlib_file(&target, name),
                    write_archive(target.archive_kind(), &[member])?,
                )
            }
            (Emit::Xcframework, _) => {
                let built = apple_libraries(opts, &input)?;
                written.extend(xcframework::assemble(&opts.out_dir, name, &built)?);
                continue;
            }
            (_, None) => continue,
        };
        let path = opts.out_dir.join(file);
        write(&path, &bytes)?;
        written.push(path);
    }
    // Only a strict build says so: a reference build prints what it always printed.
    let grammar_note = match opts.grammar {
        GrammarKind::Reference => String::new(),
        GrammarKind::Strict => ", --grammar strict".to_string(),
    };
    let summary = match &library {
        Some(lib) => format!(
            "{target}, --fold {}, --weights {}{}: {} query tokens at most, workspace {} bytes, \
             code and data {} bytes",
            compiled.fold.name(),
            compiled.precision,
            grammar_note,
            lib.info.max_query_tokens,
            lib.info.layout.total,
            lib.object.len()
        ),
        None => format!(
            "{target}, --fold {}, --weights {}",
            compiled.fold.name(),
            compiled.precision
        ),
    };
    Ok(BuildReport {
        written,
        summary,
        size_report,
        fold_warning: compiled.fold_warning,
        weights_notice: compiled.weights_notice,
        room_warning: compiled.room_warning,
    })
}

/// `--report`: the library's bytes by component, its workspace regions (the model's broken
/// down by its plan), and the options that made it.
fn size_report_of(
    opts: &BuildOptions,
    target: &Target,
    compiled: &Compiled,
    lib: &crate::codegen::library::Library,
) -> Result<SizeReport, BuildError> {
    let components = report::components(&lib.object, &opts.name)?;
    let plan = WorkspacePlan::of(&compiled.module).map_err(BuildError::Plan)?;
    let mut workspace = vec![WorkspaceRegion {
        name: "model: state word".into(),
        offset: plan.state.offset,
        bytes: plan.state.bytes,
    }];
    for b in &plan.buffers {
        workspace.push(WorkspaceRegion {
            name: format!("model: buffer {}", b.name),
            offset: b.region.offset,
            bytes: b.region.bytes,
        });
    }
    workspace.push(WorkspaceRegion {
        name: "model: logits of a step".into(),
        offset: plan.logits.offset,
        bytes: plan.logits.bytes,
    });
    for f in &plan.funcs {
        workspace.push(WorkspaceRegion {
            name: format!("model: scratch of {}", f.name),
            offset: f.arena_start,
            bytes: f.arena_end - f.arena_start,
        });
        // The multi-row step: the decoder step's values, a row per token, from the same start.
        let rows = lib.info.max_forced_rows;
        if f.name == needle_ir::DECODER_STEP && rows >= 2 {
            workspace.push(WorkspaceRegion {
                name: format!("model: scratch of decoder_rows ({rows} rows)"),
                offset: f.arena_start,
                bytes: (f.arena_end - f.arena_start) * rows,
            });
        }
    }
    for &(region, offset, bytes) in &lib.info.regions {
        if region != "model" {
            workspace.push(WorkspaceRegion {
                name: region.to_string(),
                offset,
                bytes,
            });
        }
    }
    workspace.sort_by_key(|r| (r.offset, r.bytes));
    let tools = if opts.tools.trim_start().starts_with('[') {
        "(inline JSON)".to_string()
    } else {
        opts.tools.clone()
    };
    let options = [
        ("checkpoint", opts.checkpoint.display().to_string()),
        ("tokenizer", opts.tokenizer.display().to_string()),
        (
            "tools",
            format!("{tools} ({} tools)", compiled.tools.tools.len()),
        ),
        ("target", target.to_string()),
        ("fold", compiled.fold.name().to_string()),
        ("weights", compiled.precision.to_string()),
        ("max-gen-len", opts.max_gen_len.to_string()),
        ("grammar", opts.grammar.name().to_string()),
        (
            "max-forced-rows",
            lib.info.max_forced_rows.max(1).to_string(),
        ),
        ("max-query-tokens", lib.info.max_query_tokens.to_string()),
        ("name", opts.name.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Ok(SizeReport {
        options,
        object_bytes: lib.object.len() as u64,
        components,
        workspace_bytes: lib.info.layout.total,
        workspace,
    })
}

/// The target with the options' CPU level and features.
pub fn target_of(opts: &BuildOptions) -> Result<Target, BuildError> {
    let features: Vec<&str> = opts.features.iter().map(String::as_str).collect();
    Ok(Target::with_cpu(
        &opts.target,
        opts.cpu.as_deref(),
        &features,
    )?)
}

/// The library for every target an XCFramework slice holds, each checked standalone.
fn apple_libraries(
    opts: &BuildOptions,
    input: &LibraryInput<'_>,
) -> Result<Vec<xcframework::Built>, BuildError> {
    let mut built = Vec::new();
    for slice in xcframework::SLICES {
        for (triple, _) in slice.targets {
            let target = Target::with_cpu(triple, None, &[])?;
            let lib = generate(input, &target)?;
            check_standalone(&lib.object, &format!("{}_", opts.name))?;
            let member = ArchiveMember {
                name: format!("{}.{}", opts.name, target.object_extension()),
                data: lib.object,
            };
            built.push(xcframework::Built {
                triple,
                archive: write_archive(target.archive_kind(), &[member])?,
                header: lib.header,
            });
        }
    }
    Ok(built)
}

/// `libNAME.a`, or `NAME.lib` where that is the convention (Windows).
pub fn staticlib_file(target: &Target, name: &str) -> String {
    match target.staticlib_extension() {
        "lib" => format!("{name}.lib"),
        ext => format!("lib{name}.{ext}"),
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    std::fs::write(path, bytes).map_err(|cause| BuildError::Write {
        path: path.to_path_buf(),
        cause,
    })
}

pub(crate) fn is_c_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use crate::lower::lower;

    use super::*;

    #[test]
    fn run_passes_records_every_stage_in_pipeline_order() {
        let config = crate::const_names::tiny_test_config();
        let m = lower(&config, FoldMode::Tools, 36, 1022);
        let (out, stages) = run_passes(m.clone(), None).unwrap();
        let names: Vec<&str> = stages.stages.iter().map(|(s, _)| s.as_str()).collect();
        let passes: Vec<&str> = PIPELINE.iter().map(|p| p.name).collect();
        assert_eq!(names[0], "lowered");
        assert_eq!(names[1..], passes[..]);
        assert_eq!(stages.after("lowered"), Some(&*print(&m)));
        let folded = stages.after("fold-constants").unwrap();
        assert!(folded.contains("@enc.0.gate.sigmoid") && folded.contains("@contrastive.proj"));
        let last = stages.stages.last().unwrap().1.as_str();
        assert_eq!(last, print(&out));
        assert!(!last.contains("@contrastive.proj"));
        let text = stages.text();
        assert!(text.starts_with("; ---- after lowered\n"), "{text}");
        assert!(text.contains("\n; ---- after dead-weight-elim\n"), "{text}");
    }
}
