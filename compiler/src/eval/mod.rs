//! `needlec eval`: how good a checkpoint, tool list and set of build options is on a data set.
//!
//! Every example is answered by the runtime [`Engine`] with exactly the options given (the
//! library is proven identical to it by the end-to-end tests), one engine per distinct tool list
//! (examples are grouped by their normalized list, and the model and tokenizer move from one
//! engine to the next, so only one is alive at a time). [`data`] reads the examples,
//! [`metrics`] holds the figures as pure functions, [`report`] assembles them, prints the table
//! and checks the gates, and [`html`] draws the page.

pub mod data;
pub mod html;
pub mod metrics;
pub mod needle3;
pub mod report;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;

use needle_runtime::decode::{
    check_max_query_tokens, check_tools_fit, Engine, EngineError, FoldMode, GrammarKind,
};
use needle_runtime::model::Model;
use needle_runtime::quant::Precision;
use needle_runtime::tokenizer::Tokenizer;

use crate::frontend::{self, FrontendError};
use crate::tools::{self, ToolSet};

pub use data::{BadLine, Example};
pub use report::Report;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot read the data file {}: {cause}; check the --data path", .path.display())]
    DataRead {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("data file {} is not valid UTF-8 (first bad byte at offset {offset}); save it as UTF-8", .path.display())]
    DataUtf8 { path: PathBuf, offset: usize },
    #[error(
        "data file {}: {} bad line(s), and --strict-data makes any bad line an error (leave it out to skip them):\n{}",
        .path.display(), .lines.len(), list(.lines)
    )]
    BadData { path: PathBuf, lines: Vec<BadLine> },
    #[error(
        "data file {}: no usable example; each line must be one JSON object with \"query\", \"tools\" and \"answers\"{}",
        .path.display(), if .lines.is_empty() { String::new() } else { format!(", and {} line(s) are not:\n{}", .lines.len(), list(.lines)) }
    )]
    NoExamples { path: PathBuf, lines: Vec<BadLine> },
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error("--tools: {0}")]
    Tools(tools::ToolsError),
    #[error("{0}")]
    Needle3(String),
}

// By hand rather than `#[from]`, which would also make it a `source()` that a chain printer
// repeats after this message, which already holds it.
impl From<tools::ToolsError> for EvalError {
    fn from(e: tools::ToolsError) -> Self {
        EvalError::Tools(e)
    }
}

/// The bad lines, one per line, the first 20 of them.
fn list(lines: &[BadLine]) -> String {
    let mut text: Vec<String> = lines.iter().take(20).map(|b| format!("  {b}")).collect();
    if lines.len() > 20 {
        text.push(format!("  ... and {} more", lines.len() - 20));
    }
    text.join("\n")
}

/// One `--compare KEY=VALUE`: the base configuration with one option changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    Fold(FoldMode),
    Weights(Precision),
    Grammar(GrammarKind),
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Setting::Fold(m) => write!(f, "fold={}", m.name()),
            Setting::Weights(p) => write!(f, "weights={p}"),
            Setting::Grammar(g) => write!(f, "grammar={}", g.name()),
        }
    }
}

impl FromStr for Setting {
    type Err = String;

    fn from_str(s: &str) -> Result<Setting, String> {
        let (key, value) = s.split_once('=').ok_or_else(|| {
            format!(
                "{s:?} is not KEY=VALUE; use fold=none|tools, weights=f32|f16|int8|int4 or \
                 grammar=reference|strict"
            )
        })?;
        match key.trim() {
            "fold" => match value.trim() {
                "none" => Ok(Setting::Fold(FoldMode::None)),
                "tools" => Ok(Setting::Fold(FoldMode::Tools)),
                other => Err(format!("fold={other}: the fold modes are none and tools")),
            },
            "weights" => value
                .trim()
                .parse()
                .map(Setting::Weights)
                .map_err(|e| format!("weights={}: {e}", value.trim())),
            "grammar" => value
                .trim()
                .parse()
                .map(Setting::Grammar)
                .map_err(|e| format!("grammar={}: {e}", value.trim())),
            other => Err(format!(
                "{other:?} cannot be compared; the keys are fold (none|tools), weights (f32|f16|int8|int4) and grammar (reference|strict)"
            )),
        }
    }
}

/// What `needlec eval` was asked to do.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub checkpoint: PathBuf,
    pub tokenizer: PathBuf,
    pub data: PathBuf,
    /// The app's fixed tool list (a path or inline JSON); it replaces every example's own.
    pub tools: Option<String>,
    pub fold: Option<FoldMode>,
    pub weights: Option<Precision>,
    pub max_gen_len: usize,
    pub max_query_tokens: Option<usize>,
    /// `--grammar`, for the base run and every comparison.
    pub grammar: GrammarKind,
    pub compare: Vec<Setting>,
    pub strict_data: bool,
    /// Evaluate only the first N usable examples.
    pub limit: Option<usize>,
    pub target_precision: Option<f64>,
}

/// What one configuration answered for one example.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The output text, or why the engine refused the query.
    pub output: Result<String, String>,
    /// Wall time of the greedy decode, prompt to output, in milliseconds.
    pub latency_ms: f64,
    /// Only for the base configuration.
    pub confidence: Option<Scored>,
}

/// The confidence of one output and the candidate signals it was chosen from, whatever the
/// model generation (v1: `needle_runtime::confidence`; Needle 3: its confidence head).
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    /// In `[0, 1]`.
    pub value: f32,
    /// The name of the signal that is `value`.
    pub signal: &'static str,
    /// Every candidate signal, `(name, value)`, `signal` among them.
    pub signals: Vec<(&'static str, f32)>,
}

impl Scored {
    /// A v1 confidence with its signals.
    pub fn v1(c: &needle_runtime::confidence::Confidence) -> Scored {
        Scored {
            value: c.value,
            signal: needle_runtime::confidence::CONFIDENCE_SIGNAL,
            signals: c.signals.named().to_vec(),
        }
    }
}

/// An example ready to run: its normalized tool list is `tool_sets[set]`.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub example: Example,
    pub set: usize,
}

/// The examples and tool lists after reading and checking the data.
pub struct Dataset {
    pub examples: Vec<Prepared>,
    pub tool_sets: Vec<ToolSet>,
    pub bad_lines: Vec<BadLine>,
}

/// Reads the data file and normalizes each example's tool list (or `--tools`), checking that
/// each list fits the encoder; bad lines are collected (or, with `--strict-data`, an error).
pub fn prepare(opts: &EvalOptions, tokenizer: &Tokenizer) -> Result<Dataset, EvalError> {
    prepare_with(opts, tokenizer, true)
}

/// [`prepare`]; with `answers_required` false a line without `answers` is kept with none
/// ([`data::parse_lines`]).
pub fn prepare_with(
    opts: &EvalOptions,
    tokenizer: &Tokenizer,
    answers_required: bool,
) -> Result<Dataset, EvalError> {
    let text = data::read(&opts.data)?;
    let (examples, mut bad_lines) =
        data::parse_lines(&text, opts.tools.is_some(), answers_required);
    let mut tool_sets: Vec<ToolSet> = Vec::new();
    let mut by_text: HashMap<String, Result<usize, String>> = HashMap::new();
    let mut by_normalized: HashMap<String, usize> = HashMap::new();
    let fixed = opts
        .tools
        .as_deref()
        .map(tools::load_tools_arg)
        .transpose()?;
    let strict = opts.grammar == GrammarKind::Strict
        || opts
            .compare
            .contains(&Setting::Grammar(GrammarKind::Strict));
    if let (Some(fixed), true) = (&fixed, strict) {
        strict_schemas(fixed).map_err(|e| FrontendError::from(EngineError::from(e)))?;
    }
    let mut prepared = Vec::new();
    for example in examples {
        let key = match fixed {
            Some(_) => String::new(),
            None => example.tools.clone().unwrap_or_default(),
        };
        let set = by_text
            .entry(key)
            .or_insert_with(|| {
                let set = match (&fixed, &example.tools) {
                    (Some(fixed), _) => fixed.clone(),
                    (None, Some(text)) => {
                        tools::parse_tools(text).map_err(|e| format!("its tools: {e}"))?
                    }
                    (None, None) => unreachable!("data::parse requires tools without --tools"),
                };
                let n = tokenizer.encode(&set.normalized_json).len();
                check_tools_fit(n).map_err(|e| format!("its tools: {e}"))?;
                if strict {
                    strict_schemas(&set)
                        .map_err(|e| format!("its tools, under --grammar strict: {e}"))?;
                }
                if let Some(bound) = opts.max_query_tokens {
                    check_max_query_tokens(bound, n).map_err(|e| e.to_string())?;
                }
                let index = *by_normalized
                    .entry(set.normalized_json.clone())
                    .or_insert_with(|| {
                        tool_sets.push(set);
                        tool_sets.len() - 1
                    });
                Ok(index)
            })
            .clone();
        match set {
            Ok(set) => prepared.push(Prepared { example, set }),
            Err(message) => bad_lines.push(BadLine {
                line: example.line,
                message,
            }),
        }
    }
    bad_lines.sort_by_key(|b| b.line);
    if opts.strict_data && !bad_lines.is_empty() {
        return Err(EvalError::BadData {
            path: opts.data.clone(),
            lines: bad_lines,
        });
    }
    if let Some(limit) = opts.limit {
        prepared.truncate(limit);
    }
    if prepared.is_empty() {
        return Err(EvalError::NoExamples {
            path: opts.data.clone(),
            lines: bad_lines,
        });
    }
    Ok(Dataset {
        examples: prepared,
        tool_sets,
        bad_lines,
    })
}

/// Whether the strict grammar can express a tool list's schemas.
fn strict_schemas(set: &ToolSet) -> Result<(), needle_runtime::strict::StrictError> {
    let originals: Vec<String> = set.name_map.iter().map(|(_, o)| o.clone()).collect();
    needle_runtime::strict::schemas(&set.normalized_json, &originals).map(|_| ())
}

/// One configuration: the options of the base run, possibly with one changed.
#[derive(Clone, Copy, Debug)]
pub struct RunConfig {
    pub fold: FoldMode,
    pub weights: Precision,
    pub grammar: GrammarKind,
}

/// Answers every example with `model`, one engine per tool list, calling `tick` after each.
/// With `with_confidence`, each outcome carries its confidence.
#[allow(clippy::too_many_arguments)]
pub fn answer_all(
    model: Model,
    tokenizer: Tokenizer,
    dataset: &Dataset,
    fold: FoldMode,
    max_gen_len: usize,
    max_query_tokens: Option<usize>,
    grammar: GrammarKind,
    with_confidence: bool,
    tick: &dyn Fn(),
) -> Result<Vec<Outcome>, EvalError> {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); dataset.tool_sets.len()];
    for (i, p) in dataset.examples.iter().enumerate() {
        groups[p.set].push(i);
    }
    let mut outcomes: Vec<Option<Outcome>> = vec![None; dataset.examples.len()];
    let mut parts = Some((model, tokenizer));
    for (set, members) in groups.iter().enumerate() {
        if members.is_empty() {
            continue;
        }
        let (model, tokenizer) = parts.take().expect("returned by the previous engine");
        let mut engine = Engine::new(model, tokenizer, dataset.tool_sets[set].context(), fold)
            .map_err(FrontendError::from)?;
        if let Some(bound) = max_query_tokens {
            // Checked per list in `prepare`, so this cannot fail.
            engine = engine
                .with_max_query_tokens(bound)
                .map_err(FrontendError::from)?;
        }
        engine = engine.with_grammar(grammar).map_err(FrontendError::from)?;
        for &i in members {
            let query = &dataset.examples[i].example.query;
            let start = Instant::now();
            let generation = engine.generate(query, max_gen_len);
            let latency_ms = start.elapsed().as_secs_f64() * 1e3;
            let outcome = match generation {
                Ok(g) => Outcome {
                    confidence: with_confidence.then(|| Scored::v1(&engine.confidence(&g))),
                    output: Ok(g.output),
                    latency_ms,
                },
                Err(e) => Outcome {
                    output: Err(e.to_string()),
                    latency_ms,
                    confidence: None,
                },
            };
            outcomes[i] = Some(outcome);
            tick();
        }
        parts = Some(engine.into_parts());
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.expect("every example is in one group"))
        .collect())
}

/// Runs the whole evaluation: the base configuration, then each `--compare`, and assembles the
/// report. `progress` is told the total and advanced per answered example.
pub fn evaluate(
    opts: &EvalOptions,
    progress: &indicatif::ProgressBar,
) -> Result<Report, EvalError> {
    if crate::needle3::is_needle3_checkpoint(&opts.checkpoint) {
        return needle3::evaluate(opts, progress);
    }
    needle_runtime::decode::check_max_gen_len(opts.max_gen_len).map_err(FrontendError::from)?;
    let tokenizer = frontend::load_tokenizer(&opts.tokenizer)?;
    let dataset = prepare(opts, &tokenizer)?;
    let base = frontend::load_model_as(&opts.checkpoint, opts.weights)?;
    frontend::check_vocab(&tokenizer, &opts.tokenizer, base.model.config.vocab_size)?;
    let mut warnings: Vec<String> = base.warning.iter().cloned().collect();
    let attention = base.model.config.tool_attention;
    let (fold, fold_warning) = frontend::resolve_fold(opts.fold, attention);
    warnings.extend(fold_warning);
    let config = RunConfig {
        fold,
        weights: base.precision,
        grammar: opts.grammar,
    };
    progress.set_length((dataset.examples.len() * (1 + opts.compare.len())) as u64);
    let tick = || progress.inc(1);
    let base_outcomes = answer_all(
        base.model.clone(),
        tokenizer.clone(),
        &dataset,
        fold,
        opts.max_gen_len,
        opts.max_query_tokens,
        opts.grammar,
        true,
        &tick,
    )?;
    let mut compared = Vec::new();
    for &setting in &opts.compare {
        let (model, other) = match setting {
            Setting::Fold(mode) => {
                let (mode, warning) = frontend::resolve_fold(Some(mode), attention);
                if let Some(w) = warning {
                    warnings.push(format!("{setting}: {w}"));
                }
                (
                    base.model.clone(),
                    RunConfig {
                        fold: mode,
                        ..config
                    },
                )
            }
            Setting::Grammar(grammar) => (base.model.clone(), RunConfig { grammar, ..config }),
            Setting::Weights(p) => {
                let loaded = frontend::load_model_as(&opts.checkpoint, Some(p))?;
                if let Some(w) = loaded.warning {
                    warnings.push(format!("{setting}: {w}"));
                }
                (
                    loaded.model,
                    RunConfig {
                        weights: loaded.precision,
                        ..config
                    },
                )
            }
        };
        let outcomes = answer_all(
            model,
            tokenizer.clone(),
            &dataset,
            other.fold,
            opts.max_gen_len,
            opts.max_query_tokens,
            other.grammar,
            false,
            &tick,
        )?;
        compared.push((setting, other, outcomes));
    }
    Ok(report::assemble(
        opts,
        config,
        &dataset,
        &base_outcomes,
        &compared,
        warnings,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_settings_parse_and_print_back() {
        for text in [
            "fold=none",
            "fold=tools",
            "weights=int4",
            "grammar=strict",
            "grammar=reference",
        ] {
            let setting: Setting = text.parse().unwrap();
            assert_eq!(setting.to_string(), text);
        }
        assert_eq!(
            " grammar = strict".parse::<Setting>(),
            Ok(Setting::Grammar(GrammarKind::Strict))
        );
        let err = "grammar=lenient".parse::<Setting>().unwrap_err();
        assert!(err.contains("reference and strict"), "{err}");
        let err = "speed=fast".parse::<Setting>().unwrap_err();
        assert!(err.contains("grammar (reference|strict)"), "{err}");
    }
}
