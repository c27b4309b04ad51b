//! The front of the pipeline shared by `needlec run`, `trace` and `build`: load and validate the
//! checkpoint, the tokenizer and the tool list, and decide the fold mode.

use std::path::{Path, PathBuf};

use needle_runtime::config::ToolAttention;
use needle_runtime::decode::{Engine, EngineError, FoldMode, ToolContext};
use needle_runtime::model::{Model, ModelError};
use needle_runtime::tokenizer::{Tokenizer, TokenizerError};

use crate::load::{load_checkpoint, LoadError};
use crate::tools::{load_tools_arg, ToolSet, ToolsError};

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("loading checkpoint {path}: {source}")]
    Checkpoint {
        path: PathBuf,
        source: Box<LoadError>,
    },
    #[error("checkpoint {path}: {source}")]
    Model { path: PathBuf, source: ModelError },
    #[error("cannot read tokenizer {path}: {source}")]
    TokenizerIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading tokenizer {path}: {source}")]
    Tokenizer {
        path: PathBuf,
        source: TokenizerError,
    },
    #[error("tokenizer {path} looks like a JSON tokenizer but is not valid UTF-8")]
    TokenizerUtf8 { path: PathBuf },
    #[error("tool list: {0}")]
    Tools(#[from] ToolsError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Reads a SentencePiece `.model` file, or a Hugging Face `tokenizer.json` (told apart by content).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, FrontendError> {
    let bytes = std::fs::read(path).map_err(|source| FrontendError::TokenizerIo {
        path: path.into(),
        source,
    })?;
    let tokenizer = if bytes.first() == Some(&b'{') {
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| FrontendError::TokenizerUtf8 { path: path.into() })?;
        Tokenizer::from_hf_json(text)
    } else {
        Tokenizer::from_model_bytes(&bytes)
    };
    tokenizer.map_err(|source| FrontendError::Tokenizer {
        path: path.into(),
        source,
    })
}

/// Loads and validates a checkpoint as a float32 model.
pub fn load_model(path: &Path) -> Result<Model, FrontendError> {
    let ckpt = load_checkpoint(path).map_err(|source| FrontendError::Checkpoint {
        path: path.into(),
        source: Box::new(source),
    })?;
    Model::from_checkpoint(&ckpt).map_err(|source| FrontendError::Model {
        path: path.into(),
        source,
    })
}

/// The fold mode to use and, when it departs from the checkpoint's semantics, a warning to show
/// once. The default follows the checkpoint (spec section 6).
pub fn resolve_fold(
    requested: Option<FoldMode>,
    attention: ToolAttention,
) -> (FoldMode, Option<String>) {
    match (requested, attention) {
        (Some(FoldMode::Tools), ToolAttention::Full) => (
            FoldMode::Tools,
            Some(
                "--fold tools on a checkpoint trained with full tool attention: outputs will differ \
                 from the reference's (use a checkpoint fine-tuned with isolated tool attention, or \
                 --fold none)"
                    .into(),
            ),
        ),
        (Some(mode), _) => (mode, None),
        (None, ToolAttention::Isolated) => (FoldMode::Tools, None),
        (None, ToolAttention::Full) => (FoldMode::None, None),
    }
}

impl ToolSet {
    /// What the runtime needs of the tool list.
    pub fn context(&self) -> ToolContext {
        ToolContext {
            normalized_json: self.normalized_json.clone(),
            name_map: self.name_map.clone(),
            signatures: self
                .tools
                .iter()
                .map(|t| (t.name.clone(), t.param_keys.clone()))
                .collect(),
        }
    }
}

/// Everything `needlec run` needs, loaded and checked.
pub struct Loaded {
    pub engine: Engine,
    pub tools: ToolSet,
    /// Set when the fold mode departs from the checkpoint's semantics.
    pub fold_warning: Option<String>,
}

/// Loads checkpoint, tokenizer and tools (`tools` is a path or inline JSON) and prepares the
/// engine; in folded mode this precomputes the tools side.
pub fn load(
    checkpoint: &Path,
    tokenizer: &Path,
    tools: &str,
    fold: Option<FoldMode>,
) -> Result<Loaded, FrontendError> {
    let model = load_model(checkpoint)?;
    let tokenizer = load_tokenizer(tokenizer)?;
    let tools = load_tools_arg(tools)?;
    let (fold, fold_warning) = resolve_fold(fold, model.config.tool_attention);
    let engine = Engine::new(model, tokenizer, tools.context(), fold)?;
    Ok(Loaded {
        engine,
        tools,
        fold_warning,
    })
}
