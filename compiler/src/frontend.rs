//! The front of the pipeline shared by `needlec run`, `trace` and `build`: load and validate the
//! checkpoint, the tokenizer and the tool list, and decide the fold mode, the weight precision
//! (`--weights`) and the query bound (`--max-query-tokens`).

use std::path::{Path, PathBuf};

use needle_runtime::checkpoint::Checkpoint;
use needle_runtime::config::ToolAttention;
use needle_runtime::decode::{
    query_token_limit, Engine, EngineError, FoldMode, GrammarKind, ToolContext, ENCODER_BUDGET,
    EOS_ID, TOOLS_ID, TOOL_CALL_ID,
};
use needle_runtime::model::{Model, ModelError};
use needle_runtime::quant::{self, Precision};
use needle_runtime::tokenizer::{Tokenizer, TokenizerError};

use crate::load::{human_bytes, load_checkpoint, read_limited, Limited, LoadError};
use crate::tools::{load_tools_arg, ToolSet, ToolsError};

/// Why run, trace or build could not load their inputs. Each message holds its cause, and no
/// variant exposes it again as `source()`: a chain printer (`{:#}` of `anyhow`) would repeat it.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("{}", checkpoint_text(.path, .cause))]
    Checkpoint {
        path: PathBuf,
        cause: Box<LoadError>,
    },
    #[error("checkpoint {}: {cause}", .path.display())]
    Model { path: PathBuf, cause: ModelError },
    #[error("cannot read tokenizer {}: {cause}", .path.display())]
    TokenizerIo {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("loading tokenizer {}: {cause}", .path.display())]
    Tokenizer {
        path: PathBuf,
        cause: TokenizerError,
    },
    #[error("tokenizer {} looks like a JSON tokenizer but is not valid UTF-8", .path.display())]
    TokenizerUtf8 { path: PathBuf },
    #[error(
        "tokenizer {} is empty (0 bytes): pass the SentencePiece `.model` (or `tokenizer.json`) \
         the checkpoint was trained with",
        .path.display()
    )]
    TokenizerEmpty { path: PathBuf },
    #[error(
        "tokenizer {} is larger than the {} a tokenizer may take: it is not a tokenizer, or not a \
         file (an endless device or pipe?)",
        .path.display(), human_bytes(MAX_TOKENIZER_BYTES)
    )]
    TokenizerTooLarge { path: PathBuf },
    #[error(
        "tokenizer {} has {pieces} pieces, fewer than the {SPECIAL_IDS} special ids every Needle \
         tokenizer has (EOS = {EOS_ID}, <tool_call> = {TOOL_CALL_ID}, <tools> = {TOOLS_ID}): it \
         is not a Needle tokenizer",
        .path.display()
    )]
    TokenizerTooSmall { path: PathBuf, pieces: usize },
    #[error(
        "tokenizer {} has {tokenizer} pieces but the checkpoint's vocabulary is {model}: the \
         model would emit ids the tokenizer cannot render (answers would come out cut short), so \
         they do not belong together; pass the tokenizer the checkpoint was trained with",
        .path.display()
    )]
    VocabMismatch {
        path: PathBuf,
        tokenizer: usize,
        model: usize,
    },
    // Tool list errors name their origin (file or inline JSON) themselves.
    #[error(transparent)]
    Tools(#[from] ToolsError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The checkpoint's path, then the error, unless the error names the path itself.
fn checkpoint_text(path: &Path, cause: &LoadError) -> String {
    if cause.names_path() {
        cause.to_string()
    } else {
        format!("loading checkpoint {}: {cause}", path.display())
    }
}

/// The most bytes a tokenizer file may have: a SentencePiece model of 250k pieces is a few MB,
/// its `tokenizer.json` some tens of MB.
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// Pieces every Needle tokenizer has before its learned ones: ids 0 to [`TOOLS_ID`].
pub const SPECIAL_IDS: usize = TOOLS_ID as usize + 1;

/// Reads a SentencePiece `.model` file, or a Hugging Face `tokenizer.json` (told apart by content).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, FrontendError> {
    let read = read_limited(
        path,
        MAX_TOKENIZER_BYTES,
        0,
        |cause| FrontendError::TokenizerIo {
            path: path.into(),
            cause,
        },
        |_| Ok(()),
    )?;
    let Limited::Read(bytes) = read else {
        return Err(FrontendError::TokenizerTooLarge { path: path.into() });
    };
    if bytes.is_empty() {
        return Err(FrontendError::TokenizerEmpty { path: path.into() });
    }
    let tokenizer = if bytes.first() == Some(&b'{') {
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| FrontendError::TokenizerUtf8 { path: path.into() })?;
        Tokenizer::from_hf_json(text)
    } else {
        Tokenizer::from_model_bytes(&bytes)
    };
    let tokenizer = tokenizer.map_err(|cause| FrontendError::Tokenizer {
        path: path.into(),
        cause,
    })?;
    if tokenizer.vocab_size() < SPECIAL_IDS {
        return Err(FrontendError::TokenizerTooSmall {
            path: path.into(),
            pieces: tokenizer.vocab_size(),
        });
    }
    Ok(tokenizer)
}

/// Refuses a tokenizer whose pieces are not exactly the model's vocabulary: fewer, and the model
/// emits ids it cannot render; more, and queries tokenize to ids the model has no row for.
pub fn check_vocab(
    tokenizer: &Tokenizer,
    tokenizer_path: &Path,
    model_vocab: usize,
) -> Result<(), FrontendError> {
    if tokenizer.vocab_size() != model_vocab {
        return Err(FrontendError::VocabMismatch {
            path: tokenizer_path.into(),
            tokenizer: tokenizer.vocab_size(),
            model: model_vocab,
        });
    }
    Ok(())
}

/// Loads and validates a checkpoint (see [`load_checkpoint`]), naming it in errors.
pub fn load_checkpoint_at(path: &Path) -> Result<Checkpoint, FrontendError> {
    load_checkpoint(path).map_err(|cause| FrontendError::Checkpoint {
        path: path.into(),
        cause: Box::new(cause),
    })
}

/// The fewest query tokens an exact-mode tool list should leave room for; below it `run`,
/// `trace` and `build` warn (a library would refuse any longer query).
pub const MIN_QUERY_ROOM: usize = 16;

/// A warning when the tool list leaves room for fewer than [`MIN_QUERY_ROOM`] query tokens in
/// exact mode (`--fold none`), where a longer query is refused (or, without a bound, the
/// reference cuts the tools); folded mode cuts the query instead, and says nothing here.
pub fn query_room_warning(fold: FoldMode, n_tool_tokens: usize) -> Option<String> {
    let room = query_token_limit(n_tool_tokens);
    (fold == FoldMode::None && room < MIN_QUERY_ROOM).then(|| {
        format!(
            "the tool list takes {n_tool_tokens} tokens, which leaves room for only {room} query \
             token(s) in the {ENCODER_BUDGET}-token encoder budget (fewer than {MIN_QUERY_ROOM}): \
             almost every query will be refused or cut; shorten descriptions or drop tools"
        )
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
    let ckpt = load_checkpoint_at(path)?;
    let (precision, warning) = resolve_weights(requested, &ckpt);
    let model =
        Model::from_checkpoint_as(&ckpt, precision).map_err(|cause| FrontendError::Model {
            path: path.into(),
            cause,
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
    /// Set when the tool list leaves (almost) no room for a query ([`query_room_warning`]).
    pub room_warning: Option<String>,
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
            .chain(&self.room_warning)
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
    let tokenizer_path = tokenizer;
    let tokenizer = load_tokenizer(tokenizer_path)?;
    check_vocab(&tokenizer, tokenizer_path, loaded.model.config.vocab_size)?;
    let tools = load_tools_arg(tools)?;
    let (fold, fold_warning) = resolve_fold(options.fold, loaded.model.config.tool_attention);
    let mut engine = Engine::new(loaded.model, tokenizer, tools.context(), fold)?;
    let room_warning = query_room_warning(fold, engine.tool_ids().len());
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
        room_warning,
        weights: loaded.precision,
        weights_warning: loaded.warning,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each cause once, and the checkpoint's path once, in the message and in its chain
    /// (`{:#}`): the wrappers hold their cause in the message, not again as a `source()`.
    #[test]
    fn a_truncated_checkpoint_names_its_cause_once() {
        let dir = std::env::temp_dir().join(format!("needlec-frontend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let full = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-needle/tiny-needle.pkl"),
        )
        .unwrap();
        let cut = dir.join("truncated.pkl");
        std::fs::write(&cut, &full[..1000]).unwrap();
        let missing = dir.join("missing.pkl");
        for (path, cause) in [(&cut, "ends early"), (&missing, "No such file")] {
            let Err(e) = load_model(path) else {
                panic!("{} loaded", path.display())
            };
            let shown = format!("{:#}", anyhow::Error::new(e));
            assert_eq!(shown.matches(cause).count(), 1, "{shown}");
            let name = path.display().to_string();
            assert_eq!(shown.matches(&name).count(), 1, "{shown}");
        }
        let e = load_tokenizer(&missing).err().unwrap();
        let shown = format!("{:#}", anyhow::Error::new(e));
        assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn room_for_a_query_is_warned_about_in_exact_mode_only() {
        assert!(query_room_warning(FoldMode::None, 1010).is_some());
        assert!(query_room_warning(FoldMode::None, 1024 - 1 - MIN_QUERY_ROOM).is_none());
        assert!(query_room_warning(FoldMode::Tools, 1020).is_none());
    }
}
