//! `needlec build`: the whole pipeline, load -> fold -> lower -> passes -> codegen -> emit, for one
//! app's fixed tool list.

use std::path::{Path, PathBuf};

use needle_ir::{print, run_pipeline, ConstStore, Module, PassError, PIPELINE};
use needle_runtime::checkpoint::Checkpoint;
use needle_runtime::decode::{FoldMode, ENCODER_BUDGET, MAX_QUERY_TOKENS};
use needle_runtime::model::Model;

use crate::frontend::{load_tokenizer, resolve_fold, FrontendError};
use crate::load::load_checkpoint;
use crate::lower::lower;
use crate::tools::load_tools_arg;

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
    pub fold: Option<FoldMode>,
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
    pub model: Model,
    pub tool_ids: Vec<u32>,
}

/// Runs load -> fold -> lower -> passes.
pub fn compile(opts: &BuildOptions) -> Result<Compiled, BuildError> {
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
    let tokenizer = load_tokenizer(&opts.tokenizer)?;
    let tools = load_tools_arg(&opts.tools).map_err(FrontendError::from)?;
    let tool_ids = tokenizer.encode(&tools.normalized_json);
    if tool_ids.len() + 1 >= ENCODER_BUDGET {
        return Err(BuildError::ToolsTooLong(tool_ids.len()));
    }
    let (fold, fold_warning) = resolve_fold(opts.fold, model.config.tool_attention);
    let module = lower(&model.config, fold, tool_ids.len(), MAX_QUERY_TOKENS);
    let mut store = ConstStore::default();
    crate::fold::fill_constants(&module, &checkpoint, &model, &tool_ids, &mut store)
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
        model,
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
}

/// Runs the whole build and writes the requested files.
pub fn build(opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    let compiled = compile(opts)?;
    let mut written = Vec::new();
    std::fs::create_dir_all(&opts.out_dir).map_err(|source| BuildError::Write {
        path: opts.out_dir.clone(),
        source,
    })?;
    for emit in &opts.emit {
        if *emit == Emit::Ir {
            let path = opts.out_dir.join(format!("{}.ir", opts.name));
            write(&path, ir_text(&compiled).as_bytes())?;
            written.push(path);
        }
    }
    Ok(BuildReport {
        written,
        fold_warning: compiled.fold_warning,
    })
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
