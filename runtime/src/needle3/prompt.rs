//! The Needle 3 prompt (`docs/needle3.md` section 5), rendered as the package's
//! `render_example` renders it, and split where folding splits it: after `</tools>`.
//!
//! ```text
//! prefix = [<|im_start|>system\nSYSTEM<|im_end|>\n]<|im_start|>user\n<tools>TOOLS</tools>
//! prompt = prefix + \nQUERY<|im_end|>\n<|im_start|>assistant\n
//! target = [<think>\nREASONING\n</think>\n]<tool_call>CALLS</tool_call><|im_end|>
//! ```
//!
//! JSON is `json.dumps(..., separators=(",", ":"), ensure_ascii=False)`: compact, key order
//! kept, non-ASCII as is.

use crate::pyjson::{self, Value};
use crate::tokenizer::Tokenizer;

/// Special ids (`tokenizer.py`).
pub const PAD: u32 = 0;
pub const EOS: u32 = 1;
pub const BOS: u32 = 2;
pub const IM_START: u32 = 4;
pub const IM_END: u32 = 5;
pub const THINK: u32 = 6;
pub const THINK_END: u32 = 7;
pub const TOOLS: u32 = 8;
pub const TOOLS_END: u32 = 9;
pub const TOOL_CALL: u32 = 10;
pub const TOOL_CALL_END: u32 = 11;

/// The chat markers by id, as the tokenizer must spell them.
pub const MARKERS: [(u32, &str); 8] = [
    (IM_START, "<|im_start|>"),
    (IM_END, "<|im_end|>"),
    (THINK, "<think>"),
    (THINK_END, "</think>"),
    (TOOLS, "<tools>"),
    (TOOLS_END, "</tools>"),
    (TOOL_CALL, "<tool_call>"),
    (TOOL_CALL_END, "</tool_call>"),
];

/// Why a prompt cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("the tool list is not JSON: {0}")]
    ToolsJson(String),
    #[error("the tool list must be a JSON list of tools, got {0}")]
    ToolsNotList(&'static str),
    #[error(
        "the tokenizer is not a Needle 3 tokenizer: id {id} is {found:?}, where Needle 3 has \
         {want:?}; pass the tokenizer the checkpoint was trained with"
    )]
    Markers {
        id: u32,
        want: &'static str,
        found: String,
    },
    #[error(
        "the prompt does not split after `</tools>` (the tokenizer merged across it), so the \
         tools side cannot be folded; use --fold none"
    )]
    Split,
}

/// The tools as the prompt writes them: parsed (Python's rules) and dumped compactly.
pub fn tools_json(text: &str) -> Result<String, PromptError> {
    let value = pyjson::parse(text).map_err(|e| PromptError::ToolsJson(e.to_string()))?;
    match value {
        Value::Array(_) => Ok(pyjson::to_compact_string_unicode(&value)),
        other => Err(PromptError::ToolsNotList(other.kind())),
    }
}

/// Everything up to and including `</tools>`: what folding precomputes. An empty (after
/// strip) system text has no system turn.
pub fn render_prefix(system: &str, tools_json: &str) -> String {
    let system = system.trim();
    let mut s = String::new();
    if !system.is_empty() {
        s.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
    }
    s.push_str(&format!("<|im_start|>user\n<tools>{tools_json}</tools>"));
    s
}

/// What follows the prefix for `query`, up to the assistant's turn.
pub fn render_query(query: &str) -> String {
    format!("\n{query}<|im_end|>\n<|im_start|>assistant\n")
}

/// The whole prompt.
pub fn render_prompt(system: &str, tools_json: &str, query: &str) -> String {
    render_prefix(system, tools_json) + &render_query(query)
}

/// The answer as the model is trained to write it.
pub fn render_target(reasoning: &str, calls: &Value) -> String {
    let reasoning = reasoning.trim();
    let mut s = String::new();
    if !reasoning.is_empty() {
        s.push_str(&format!("<think>\n{reasoning}\n</think>\n"));
    }
    s.push_str(&format!(
        "<tool_call>{}</tool_call><|im_end|>",
        pyjson::to_compact_string_unicode(calls)
    ));
    s
}

/// Checks that `tokenizer` has the Needle 3 chat markers at their ids.
pub fn check_tokenizer(tokenizer: &Tokenizer) -> Result<(), PromptError> {
    for (id, want) in MARKERS {
        let found = tokenizer.piece(id).unwrap_or_default();
        if found != want {
            return Err(PromptError::Markers {
                id,
                want,
                found: found.to_string(),
            });
        }
    }
    Ok(())
}

/// A tokenized prompt: `[BOS] + enc(prompt)`, and how many of its ids are the prefix's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptIds {
    pub ids: Vec<u32>,
    /// `1 + len(enc(prefix))`: the ids folding precomputes (BOS included).
    pub prefix_len: usize,
}

/// Tokenizes the prompt as the package does (`[2] + enc(prompt)`) and finds the fold split.
pub fn encode_prompt(
    tokenizer: &Tokenizer,
    system: &str,
    tools_json: &str,
    query: &str,
) -> Result<PromptIds, PromptError> {
    let prefix = render_prefix(system, tools_json);
    let mut ids = vec![BOS];
    ids.extend(tokenizer.encode(&render_prompt(system, tools_json, query)));
    let mut prefix_ids = vec![BOS];
    prefix_ids.extend(tokenizer.encode(&prefix));
    // `</tools>` is a user-defined symbol: no piece crosses it, so the prompt's ids begin with
    // the prefix's. Checked, not assumed: a tokenizer that breaks it cannot fold.
    if !ids.starts_with(&prefix_ids) || prefix_ids.last() != Some(&TOOLS_END) {
        return Err(PromptError::Split);
    }
    Ok(PromptIds {
        ids,
        prefix_len: prefix_ids.len(),
    })
}

/// The ids of the prompt after the folded prefix for `query`, tokenized alone as a compiled
/// library tokenizes it: `render_query(query)` with the tokenizer's dummy prefix left out, which
/// gives the whole prompt's ids after `</tools>` (`</tools>` is a user-defined symbol, and the
/// part starts with `\n`, so nothing else in the normalization depends on what came before;
/// tested on the golden prompts and on queries with leading spaces, markers and none at all).
pub fn encode_query(continuing: &Tokenizer, query: &str) -> Vec<u32> {
    continuing.encode(&render_query(query))
}
