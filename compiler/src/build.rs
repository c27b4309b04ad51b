//! `needlec build`: the whole pipeline, load -> fold -> lower -> passes -> codegen -> emit, for one
//! app's fixed tool list.

use std::path::{Path, PathBuf};

use needle_ir::{print, run_pipeline, ConstStore, Module, PassError, PIPELINE};
use needle_runtime::checkpoint::Checkpoint;
use needle_runtime::decode::{FoldMode, ENCODER_BUDGET, MAX_QUERY_TOKENS};
use needle_runtime::model::Model;
use needle_runtime::tokenizer::Tokenizer;
use needle_targets::Target;

use crate::codegen::library::generate;
use crate::codegen::CodegenError;
use crate::emit::{check_standalone, write_archive, ArchiveMember};

use crate::frontend::{load_tokenizer, resolve_fold, FrontendError};
use crate::load::load_checkpoint;
use crate::lower::lower;
use crate::precision::Precision;
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
}

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
    /// ([`crate::precision::lossless`]).
    pub weights: Option<Precision>,
    pub max_gen_len: usize,
    /// Prefix of every exported symbol and macro: a C identifier.
    pub name: String,
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
        "the tool list takes {0} tokens, which leaves no room for a query in the {ENCODER_BUDGET}-token \
         encoder budget (the `<tools>` marker takes one more); shorten descriptions or drop tools"
    )]
    ToolsTooLong(usize),
    #[error("IR pass failed: {0}")]
    Pass(#[from] PassError),
    #[error("folding: {0}")]
    Fold(String),
    #[error(transparent)]
    Target(#[from] needle_targets::TargetError),
    #[error("code generation: {0}")]
    Codegen(#[from] CodegenError),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The decoder's positions are bounded by the lowering's position dimension.
pub const MAX_GEN_LEN_LIMIT: usize = 512;

/// A lowered, folded and optimized program with its constants: what codegen consumes.
pub struct Compiled {
    pub module: Module,
    pub store: ConstStore,
    pub fold: FoldMode,
    /// The IR after lowering and after each pass, for `--emit ir`.
    pub stages: Vec<(String, String)>,
    pub fold_warning: Option<String>,
    /// How the weights are stored.
    pub precision: Precision,
    /// Set when `precision` rounds the checkpoint's values: show it once.
    pub weights_notice: Option<String>,
    /// The float32 model the library computes with (the checkpoint's, after `precision`).
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub tools: ToolSet,
    pub tool_ids: Vec<u32>,
}

/// Runs load -> fold -> lower -> passes.
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
    let checkpoint: Checkpoint =
        load_checkpoint(&opts.checkpoint).map_err(|source| FrontendError::Checkpoint {
            path: opts.checkpoint.clone(),
            source: Box::new(source),
        })?;
    let model = Model::from_checkpoint(&checkpoint).map_err(|source| FrontendError::Model {
        path: opts.checkpoint.clone(),
        source,
    })?;
    let precision = opts
        .weights
        .unwrap_or_else(|| crate::precision::lossless(&checkpoint));
    let weights_notice = crate::precision::rounding_notice(&checkpoint, precision);
    let model = crate::precision::effective_model(&model, precision);
    let tokenizer = load_tokenizer(&opts.tokenizer)?;
    let tools = load_tools_arg(&opts.tools).map_err(FrontendError::from)?;
    let tool_ids = tokenizer.encode(&tools.normalized_json);
    if tool_ids.len() + 1 >= ENCODER_BUDGET {
        return Err(BuildError::ToolsTooLong(tool_ids.len()));
    }
    let (fold, fold_warning) = resolve_fold(opts.fold, model.config.tool_attention);
    let mut module = lower(&model.config, fold, tool_ids.len(), MAX_QUERY_TOKENS);
    let mut store = ConstStore::default();
    crate::fold::fill_constants(&module, &checkpoint, &model, &tool_ids, &mut store)
        .map_err(BuildError::Fold)?;
    crate::precision::apply(
        &mut module,
        &mut store,
        &model.config,
        &checkpoint,
        precision,
    )
    .map_err(BuildError::Fold)?;
    let mut stages = vec![("lowered".to_string(), print(&module))];
    let module = run_pipeline(module, Some(&mut store), PIPELINE, |pass, m| {
        stages.push((pass.to_string(), print(m)))
    })?;
    store.check(&module).map_err(BuildError::Fold)?;
    Ok(Compiled {
        module,
        store,
        fold,
        stages,
        fold_warning,
        precision,
        weights_notice,
        model,
        tokenizer,
        tools,
        tool_ids,
    })
}

/// The `--emit ir` text: every stage, each under a header line naming it.
pub fn ir_text(compiled: &Compiled) -> String {
    let mut out = String::new();
    for (stage, text) in &compiled.stages {
        out.push_str(&format!("; ---- after {stage}\n{text}"));
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// What a build did.
#[derive(Debug)]
pub struct BuildReport {
    pub written: Vec<PathBuf>,
    /// Set when the fold mode departs from the checkpoint's semantics: show it once.
    pub fold_warning: Option<String>,
    /// Set when `--weights` rounds the checkpoint's values: show it once.
    pub weights_notice: Option<String>,
    /// One line for the user: target, fold mode, workspace size.
    pub summary: String,
}

/// Runs the whole build and writes the requested files.
pub fn build(opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    let target = target_of(opts)?;
    let compiled = compile(opts)?;
    let needs_code = opts.emit.iter().any(|e| *e != Emit::Ir);
    let library = if needs_code {
        let lib = generate(
            &compiled,
            &compiled.tokenizer,
            &target,
            &opts.name,
            opts.max_gen_len,
        )?;
        // A library that references anything outside itself, or exports an unprefixed symbol,
        // is a needlec bug: refuse to write it.
        check_standalone(&lib.object, &format!("{}_", opts.name))?;
        Some(lib)
    } else {
        None
    };
    std::fs::create_dir_all(&opts.out_dir).map_err(|source| BuildError::Write {
        path: opts.out_dir.clone(),
        source,
    })?;
    let name = &opts.name;
    let mut written = Vec::new();
    for emit in &opts.emit {
        let (file, bytes) = match (emit, &library) {
            (Emit::Ir, _) => (format!("{name}.ir"), ir_text(&compiled).into_bytes()),
            (Emit::Header, Some(lib)) => (format!("{name}.h"), lib.header.clone().into_bytes()),
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
            (_, None) => continue,
        };
        let path = opts.out_dir.join(file);
        write(&path, &bytes)?;
        written.push(path);
    }
    let summary = match &library {
        Some(lib) => format!(
            "{target}, --fold {}, --weights {}: {} query tokens at most, workspace {} bytes, code \
             and data {} bytes",
            compiled.fold.name(),
            compiled.precision,
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
        fold_warning: compiled.fold_warning,
        weights_notice: compiled.weights_notice,
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

/// `libNAME.a`, or `NAME.lib` where that is the convention (Windows).
pub fn staticlib_file(target: &Target, name: &str) -> String {
    match target.staticlib_extension() {
        "lib" => format!("{name}.lib"),
        ext => format!("lib{name}.{ext}"),
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    std::fs::write(path, bytes).map_err(|source| BuildError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn is_c_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
