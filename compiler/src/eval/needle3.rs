//! `needlec eval` of a Needle 3 checkpoint: the same data, metrics and report as v1, each
//! example answered by the Needle 3 engine ([`crate::needle3`]) with its tool list rendered as
//! given, and the confidence head's score as the confidence.

use std::time::Instant;

use needle_runtime::decode::{FoldMode, GrammarKind};
use needle_runtime::needle3::engine::Engine;
use needle_runtime::needle3::prompt::tools_json;
use needle_runtime::quant::Precision;

use super::{
    prepare, report, Dataset, EvalError, EvalOptions, Outcome, RunConfig, Scored, Setting,
};
use crate::frontend::{self, FrontendError};
use crate::needle3::{load_model, Needle3Error};
use crate::tools;

/// The name of the Needle 3 confidence signal: `sigmoid` of the confidence head's logit.
pub const CONFIDENCE_HEAD: &str = "confidence_head";

fn refuse(message: String) -> EvalError {
    EvalError::Needle3(message)
}

/// Runs the evaluation of a Needle 3 checkpoint.
pub fn evaluate(
    opts: &EvalOptions,
    progress: &indicatif::ProgressBar,
) -> Result<report::Report, EvalError> {
    if opts.weights.is_some() || opts.max_query_tokens.is_some() {
        return Err(refuse(
            "--weights and --max-query-tokens are not yet supported for Needle 3 checkpoints: \
             drop them"
                .into(),
        ));
    }
    if let Some(s) = opts
        .compare
        .iter()
        .find(|s| matches!(s, Setting::Weights(_)))
    {
        return Err(refuse(format!(
            "--compare {s} is not yet supported for Needle 3 checkpoints (fold and grammar are)"
        )));
    }
    needle_runtime::decode::check_max_gen_len(opts.max_gen_len).map_err(FrontendError::from)?;
    let tokenizer = frontend::load_tokenizer(&opts.tokenizer)?;
    let dataset = prepare(opts, &tokenizer)?;
    let model = load_model(&opts.checkpoint, None).map_err(|e| refuse(e.to_string()))?;
    let fixed = opts
        .tools
        .as_deref()
        .map(tools::load_tools_arg_text)
        .transpose()?;
    // The tool list of each set as the prompt renders it: the first member's own text.
    let mut texts: Vec<Option<String>> = vec![None; dataset.tool_sets.len()];
    for p in &dataset.examples {
        if texts[p.set].is_none() {
            let raw = fixed.clone().or_else(|| p.example.tools.clone());
            texts[p.set] = Some(raw.unwrap_or_default());
        }
    }
    let config = RunConfig {
        fold: opts.fold.unwrap_or(FoldMode::Tools),
        weights: Precision::F32,
        grammar: opts.grammar,
    };
    progress.set_length((dataset.examples.len() * (1 + opts.compare.len())) as u64);
    let tick = || progress.inc(1);
    let answer = |run: RunConfig, scored: bool| {
        answer_all(
            &model,
            &tokenizer,
            &dataset,
            &texts,
            run,
            opts.max_gen_len,
            scored,
            &tick,
        )
    };
    let base = answer(config, true)?;
    let mut compared = Vec::new();
    for &setting in &opts.compare {
        let other = match setting {
            Setting::Fold(fold) => RunConfig { fold, ..config },
            Setting::Grammar(grammar) => RunConfig { grammar, ..config },
            Setting::Weights(_) => unreachable!("refused above"),
        };
        compared.push((setting, other, answer(other, false)?));
    }
    Ok(report::assemble(
        opts,
        config,
        &dataset,
        &base,
        &compared,
        Vec::new(),
    ))
}

/// Answers every example under `run`, one engine (and one folded prefix) per tool list.
#[allow(clippy::too_many_arguments)]
fn answer_all(
    model: &needle_runtime::needle3::Model,
    tokenizer: &needle_runtime::tokenizer::Tokenizer,
    dataset: &Dataset,
    texts: &[Option<String>],
    run: RunConfig,
    max_gen_len: usize,
    scored: bool,
    tick: &dyn Fn(),
) -> Result<Vec<Outcome>, EvalError> {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; dataset.examples.len()];
    for (set, text) in texts.iter().enumerate() {
        let Some(text) = text else { continue };
        let engine_err =
            |e: needle_runtime::needle3::Error| refuse(Needle3Error::Engine(e).to_string());
        let rendered = tools_json(text).map_err(|e| engine_err(e.into()))?;
        let mut engine = Engine::new(
            model.clone(),
            tokenizer.clone(),
            "",
            rendered,
            run.fold == FoldMode::Tools,
        )
        .map_err(engine_err)?;
        if run.grammar == GrammarKind::Strict {
            engine = engine.with_strict_grammar().map_err(engine_err)?;
        }
        for (i, p) in dataset.examples.iter().enumerate() {
            if p.set != set {
                continue;
            }
            let start = Instant::now();
            let g = engine.generate(&p.example.query, max_gen_len - 1);
            let latency_ms = start.elapsed().as_secs_f64() * 1e3;
            outcomes[i] = Some(match g {
                Ok(g) => Outcome {
                    confidence: scored.then_some(g.heads.confidence).flatten().map(|logit| {
                        let p = (1.0 / (1.0 + (-f64::from(logit)).exp())) as f32;
                        Scored {
                            value: p,
                            signal: CONFIDENCE_HEAD,
                            signals: vec![(CONFIDENCE_HEAD, p)],
                        }
                    }),
                    output: Ok(g.calls),
                    latency_ms,
                },
                Err(e) => Outcome {
                    output: Err(e.to_string()),
                    latency_ms,
                    confidence: None,
                },
            });
            tick();
        }
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.expect("every example is in one set"))
        .collect())
}
