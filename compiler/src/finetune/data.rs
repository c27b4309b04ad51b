//! Training data: the JSON Lines `needlec eval` reads, turned into teacher-forced sequences.
//!
//! The encoder input is the runtime's prompt (spec section 3): the query's tokens cut to what the
//! tool list leaves of the budget, `<tools>`, the tool list's tokens. The decoder is fed
//! `[EOS, <tool_call>] + tokens(answer)` and learns `[<tool_call>] + tokens(answer) + [EOS]`,
//! where the answer is the expected calls with the model's (snake_case) tool names, serialized as
//! the model emits them (Python's compact `json.dumps`). A line without `answers` (allowed with
//! `--distill`) is labelled by the stock model's own greedy exact-mode output instead.

use std::collections::HashMap;
use std::path::Path;

use needle_runtime::decode::{
    query_token_limit, tool_ids, Engine, FoldMode, ENCODER_BUDGET, EOS_ID, TOOLS_ID, TOOL_CALL_ID,
};
use needle_runtime::model::Model;
use needle_runtime::pyjson;
use needle_runtime::tokenizer::Tokenizer;
use serde_json::Value;

use super::model::Sequence;
use super::FinetuneError;
use crate::eval::{self, Dataset, EvalError, EvalOptions};
use crate::tools::ToolSet;

/// Reads a data file: every line must be usable (a bad line is an error naming it), and with
/// `answers_required` every line must have `answers`.
pub fn read_dataset(
    path: &Path,
    tokenizer: &Tokenizer,
    answers_required: bool,
    what: &'static str,
) -> Result<Dataset, FinetuneError> {
    let opts = EvalOptions {
        checkpoint: Default::default(),
        tokenizer: Default::default(),
        data: path.to_path_buf(),
        tools: None,
        fold: None,
        weights: None,
        max_gen_len: 64,
        max_query_tokens: None,
        grammar: Default::default(),
        compare: Vec::new(),
        strict_data: true,
        limit: None,
        target_precision: None,
    };
    eval::prepare_with(&opts, tokenizer, answers_required).map_err(|e| match e {
        EvalError::BadData { path, lines } => {
            let no_answers = lines
                .iter()
                .any(|l| l.message.starts_with("no \"answers\""));
            FinetuneError::BadData {
                what,
                path,
                hint: if no_answers && answers_required {
                    "; a line without \"answers\" needs --distill (the stock model then labels it)"
                } else {
                    ""
                },
                lines: lines
                    .iter()
                    .take(20)
                    .map(|l| format!("  {l}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            }
        }
        EvalError::NoExamples { path, .. } => FinetuneError::Empty { what, path },
        other => FinetuneError::Eval(other),
    })
}

/// The answer text the model emits for `answers`: tool names as the model knows them, Python's
/// compact JSON.
pub fn answer_text(answers: &[Value], set: &ToolSet) -> String {
    let snake: HashMap<&str, &str> = set
        .name_map
        .iter()
        .map(|(snake, original)| (original.as_str(), snake.as_str()))
        .collect();
    let calls: Vec<Value> = answers
        .iter()
        .map(|call| {
            let mut call = call.clone();
            if let Some(Value::String(name)) = call.get_mut("name") {
                if let Some(s) = snake.get(name.as_str()) {
                    *name = (*s).to_string();
                }
            }
            call
        })
        .collect();
    let text = Value::Array(calls).to_string();
    match pyjson::parse(&text) {
        Ok(v) => pyjson::to_compact_string(&v),
        Err(_) => text,
    }
}

/// The encoder input for `query` with the tool list of `tool_ids`, as the runtime builds it.
pub fn prompt(tokenizer: &Tokenizer, query: &str, tool_ids: &[u32]) -> (Vec<u32>, usize) {
    let mut enc = tokenizer.encode(query);
    enc.truncate(query_token_limit(tool_ids.len()));
    let n_query = enc.len();
    enc.push(TOOLS_ID);
    let room = ENCODER_BUDGET - enc.len();
    enc.extend(tool_ids.iter().take(room));
    (enc, n_query)
}

/// Teacher-forced sequences of every labelled example (a line with `answers`), each with the
/// index of its example in `dataset.examples` (what `--augment` varies).
pub fn sequences(
    dataset: &Dataset,
    tokenizer: &Tokenizer,
) -> Result<Vec<(Sequence, usize)>, FinetuneError> {
    let tools = tool_ids_of(dataset, tokenizer)?;
    Ok(dataset
        .examples
        .iter()
        .enumerate()
        .filter(|(_, p)| p.example.labelled)
        .map(|(i, p)| {
            let seq = labelled_sequence(
                tokenizer,
                &p.example.query,
                &p.example.answers,
                &dataset.tool_sets[p.set],
                &tools[p.set],
            );
            (seq, i)
        })
        .collect())
}

/// The teacher-forced sequence of `query` answered by `answers`, with the tool list `set`
/// (tokenized as `tool_ids`).
pub fn labelled_sequence(
    tokenizer: &Tokenizer,
    query: &str,
    answers: &[Value],
    set: &ToolSet,
    tool_ids: &[u32],
) -> Sequence {
    let (enc_ids, n_query) = prompt(tokenizer, query, tool_ids);
    let answer = tokenizer.encode(&answer_text(answers, set));
    let mut dec_in = vec![EOS_ID, TOOL_CALL_ID];
    dec_in.extend(&answer);
    let mut targets = vec![TOOL_CALL_ID];
    targets.extend(&answer);
    targets.push(EOS_ID);
    Sequence {
        enc_ids,
        n_query,
        dec_in,
        targets,
    }
}

/// The most tokens a distillation label may take before it is dropped as a runaway.
pub const DISTILL_MAX_GEN_LEN: usize = 128;

/// Teacher-forced sequences of the unlabelled examples (lines without `answers`), labelled by
/// `model`'s own greedy exact-mode output (self-distillation); an example whose output does not
/// end within [`DISTILL_MAX_GEN_LEN`] is left out. Returns the sequences and how many were left
/// out.
pub fn distilled(
    dataset: &Dataset,
    model: &Model,
    tokenizer: &Tokenizer,
    tick: &dyn Fn(),
) -> Result<(Vec<Sequence>, usize), FinetuneError> {
    let mut out = Vec::new();
    let mut dropped = 0;
    for (set, tool_set) in dataset.tool_sets.iter().enumerate() {
        let engine = Engine::new(
            model.clone(),
            tokenizer.clone(),
            tool_set.context(),
            FoldMode::None,
        )
        .map_err(|e| FinetuneError::Eval(EvalError::Frontend(e.into())))?;
        for p in dataset
            .examples
            .iter()
            .filter(|p| p.set == set && !p.example.labelled)
        {
            tick();
            let Ok(g) = engine.generate(&p.example.query, DISTILL_MAX_GEN_LEN) else {
                dropped += 1;
                continue;
            };
            if g.gen_ids.len() + 1 >= DISTILL_MAX_GEN_LEN {
                dropped += 1;
                continue;
            }
            let mut dec_in = vec![EOS_ID];
            dec_in.extend(&g.gen_ids);
            let mut targets = g.gen_ids.clone();
            targets.push(EOS_ID);
            out.push(Sequence {
                enc_ids: g.prompt.enc_ids.clone(),
                n_query: g.prompt.n_query_tokens,
                dec_in,
                targets,
            });
        }
    }
    Ok((out, dropped))
}

pub fn tool_ids_of(
    dataset: &Dataset,
    tokenizer: &Tokenizer,
) -> Result<Vec<Vec<u32>>, FinetuneError> {
    dataset
        .tool_sets
        .iter()
        .map(|set| {
            tool_ids(tokenizer, &set.normalized_json)
                .map_err(|e| FinetuneError::Eval(EvalError::Frontend(e.into())))
        })
        .collect()
}
