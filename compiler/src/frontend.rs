//! The front of the pipeline shared by `needlec run`, `trace` and `build`: load and validate the
//! checkpoint, the tokenizer and the tool list, and decide the fold mode, the weight precision
//! (`--weights`) and the query bound (`--max-query-tokens`).

use std::path::{Path, PathBuf};

use needle_runtime::checkpoint::Checkpoint;
use needle_runtime::config::ToolAttention;
use needle_runtime::decode::{Engine, EngineError, FoldMode, GrammarKind, ToolContext};
use needle_runtime::model::{Model, ModelError};
use needle_runtime::quant::{self, Precision};
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

/// Loads and validates a checkpoint as a float32 model, with its stored weights.
pub fn load_model(path: &Path) -> Result<Model, FrontendError> {
    Ok(load_model_as(path, None)?.model)
}

/// A model loaded with the weights in one precision.
pub struct LoadedModel {
    /// The float32 oracle of those weights (quantized kernels dequantized).
    pub model: Model,
    pub precision: Precision,
    /// Set when the precision rounds the checkpoint's values (`f16` over float32): show it once.
    pub warning: Option<String>,
}

/// Loads and validates a checkpoint with its weights in `requested` precision (`None`: the
/// lossless one, [`resolve_weights`]).
pub fn load_model_as(
    path: &Path,
    requested: Option<Precision>,
) -> Result<LoadedModel, FrontendError> {
    let ckpt = load_checkpoint(path).map_err(|source| FrontendError::Checkpoint {
        path: path.into(),
        source: Box::new(source),
    })?;
    let (precision, warning) = resolve_weights(requested, &ckpt);
    let model =
        Model::from_checkpoint_as(&ckpt, precision).map_err(|source| FrontendError::Model {
            path: path.into(),
            source,
        })?;
    Ok(LoadedModel {
        model,
        precision,
        warning,
    })
}

/// The weight precision to use and, when it rounds the checkpoint's values, a warning to show
/// once. The default is the lossless choice ([`quant::lossless`]: `f16` for float16 checkpoints,
/// else `f32`), which computes exactly what the checkpoint holds. The integer precisions are
/// the reference's own quantization and need no warning.
pub fn resolve_weights(
    requested: Option<Precision>,
    ckpt: &Checkpoint,
) -> (Precision, Option<String>) {
    let precision = requested.unwrap_or_else(|| quant::lossless(ckpt));
    let warning = quant::f16_rounds(ckpt, precision).then(|| {
        "--weights f16 rounds this checkpoint's float32 (or bfloat16) weights to IEEE half: \
         outputs may differ slightly from the checkpoint's own (use --weights f32 to keep them)"
            .to_string()
    });
    (precision, warning)
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

/// The choices `needlec run` and `trace` share with `build` beyond the input files.
#[derive(Clone, Copy, Debug, Default)]
pub struct ModelOptions {
    /// `--fold`; `None`: as the checkpoint says ([`resolve_fold`]).
    pub fold: Option<FoldMode>,
    /// `--weights`; `None`: the lossless choice ([`resolve_weights`]).
    pub weights: Option<Precision>,
    /// `--max-query-tokens`; `None`: as many as the reference keeps. Checked against the
    /// model's limit for the tool list by `needle_runtime::decode::check_max_query_tokens`.
    pub max_query_tokens: Option<usize>,
    /// `--grammar`: the reference's name/key grammar (the default) or the strict schema grammar.
    pub grammar: GrammarKind,
}

/// Everything `needlec run` needs, loaded and checked.
pub struct Loaded {
    pub engine: Engine,
    pub tools: ToolSet,
    /// Set when the fold mode departs from the checkpoint's semantics.
    pub fold_warning: Option<String>,
    /// The weight precision the engine computes with.
    pub weights: Precision,
    /// Set when that precision rounds the checkpoint's values.
    pub weights_warning: Option<String>,
}

impl Loaded {
    /// The warnings to show once, in order.
    pub fn warnings(&self) -> impl Iterator<Item = &str> {
        self.weights_warning
            .iter()
            .chain(&self.fold_warning)
            .map(String::as_str)
    }
}

/// Loads checkpoint, tokenizer and tools (`tools` is a path or inline JSON) and prepares the
/// engine; in folded mode this precomputes the tools side.
pub fn load(
    checkpoint: &Path,
    tokenizer: &Path,
    tools: &str,
    fold: Option<FoldMode>,
) -> Result<Loaded, FrontendError> {
    let options = ModelOptions {
        fold,
        ..ModelOptions::default()
    };
    load_with(checkpoint, tokenizer, tools, &options)
}

/// [`load`] with every option: weights in a precision and a bounded query.
pub fn load_with(
    checkpoint: &Path,
    tokenizer: &Path,
    tools: &str,
    options: &ModelOptions,
) -> Result<Loaded, FrontendError> {
    // A bound of 0 is wrong whatever the inputs: say so before loading anything.
    if options.max_query_tokens == Some(0) {
        return Err(EngineError::MaxQueryTokensZero.into());
    }
    let loaded = load_model_as(checkpoint, options.weights)?;
    let tokenizer = load_tokenizer(tokenizer)?;
    let tools = load_tools_arg(tools)?;
    let (fold, fold_warning) = resolve_fold(options.fold, loaded.model.config.tool_attention);
    let mut engine = Engine::new(loaded.model, tokenizer, tools.context(), fold)?;
    if let Some(n) = options.max_query_tokens {
        engine = engine.with_max_query_tokens(n)?;
    }
    if options.grammar != GrammarKind::Reference {
        engine = engine.with_grammar(options.grammar)?;
    }
    Ok(Loaded {
        engine,
        tools,
        fold_warning,
        weights: loaded.precision,
        weights_warning: loaded.warning,
    })
}
