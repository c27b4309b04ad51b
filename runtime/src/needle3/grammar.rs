//! `--grammar strict` for Needle 3: the output envelope around the strict schema grammar of
//! [`crate::strict`] (`docs/needle3.md`, "Strict decoding").
//!
//! ```text
//! [<think> TEXT </think> WHITESPACE] <tool_call> CALLS </tool_call> <|im_end|> [EOS]
//! ```
//!
//! The first token is `<think>` or `<tool_call>`; inside the think block any ordinary token
//! (no marker) until `</think>`; then whitespace tokens or `<tool_call>`; CALLS is a call list
//! valid under the tool schemas (the strict machine, with `<tool_call>` as its opening marker
//! and `</tool_call>` where v1 has EOS); then `<|im_end|>` and EOS are forced. Every choice
//! leaves room to close the envelope within the token budget: the think block is closed early
//! when the list would no longer fit.

use super::prompt::{EOS, IM_END, THINK, THINK_END, TOOL_CALL, TOOL_CALL_END};
use crate::strict::{schemas, Strict, StrictError, StrictTables};
use crate::tokenizer::{PieceKind, Tokenizer};

/// The tables of one tool list over one tokenizer.
#[derive(Clone, Debug)]
pub struct EnvelopeTables {
    pub strict: StrictTables,
    /// Tokens allowed inside the think block: ordinary text, no marker, no control piece.
    pub think_text: Vec<bool>,
    /// Tokens whose text is whitespace only (between `</think>` and `<tool_call>`).
    pub whitespace: Vec<u32>,
}

impl EnvelopeTables {
    /// Compiles the strict grammar of `tools_json` (Needle's tool format, as the prompt holds
    /// it) over `tokenizer`'s vocabulary.
    pub fn new(tokenizer: &Tokenizer, tools_json: &str) -> Result<EnvelopeTables, StrictError> {
        let schemas = schemas(tools_json, &[])?;
        let texts = tokenizer.token_texts();
        let ordinary: Vec<bool> = (0..texts.len() as u32)
            .map(|id| {
                matches!(
                    tokenizer.kind(id),
                    Some(PieceKind::Normal | PieceKind::Byte)
                ) && !texts[id as usize].is_empty()
            })
            .collect();
        let whitespace = (0..texts.len() as u32)
            .filter(|&id| {
                ordinary[id as usize] && texts[id as usize].chars().all(char::is_whitespace)
            })
            .collect();
        Ok(EnvelopeTables {
            strict: StrictTables::new(&texts, &ordinary, &schemas, TOOL_CALL, TOOL_CALL_END),
            think_text: ordinary,
            whitespace,
        })
    }

    /// The fewest tokens from `<tool_call>` to `<|im_end|>`: the marker, the shortest list,
    /// `</tool_call>` and `<|im_end|>`.
    pub fn calls_cost(&self) -> usize {
        self.strict.min_tokens() as usize + 3
    }
}

/// Where in the envelope the generation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Start,
    Think,
    AfterThink,
    Calls,
    ImEnd,
    Eos,
    Done,
}

/// What may come next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allowed<'a> {
    /// Exactly these ids (sorted).
    Only(Vec<u32>),
    /// Any id whose entry is true.
    Mask(&'a [bool]),
}

/// The envelope machine over one generation.
#[derive(Clone, Debug)]
pub struct EnvelopeMachine<'a> {
    tables: &'a EnvelopeTables,
    phase: Phase,
    strict: Strict<'a>,
}

impl<'a> EnvelopeMachine<'a> {
    pub fn new(tables: &'a EnvelopeTables) -> EnvelopeMachine<'a> {
        EnvelopeMachine {
            tables,
            phase: Phase::Start,
            strict: Strict::new(&tables.strict),
        }
    }

    /// What may be chosen now when at most `remaining` tokens may follow it. `None` once the
    /// envelope is complete (nothing more is generated).
    pub fn allowed(&self, remaining: usize) -> Option<Allowed<'a>> {
        let t = self.tables;
        let calls = t.calls_cost();
        // Room for `</think>` and the whole call block after the token chosen now.
        let think_fits = remaining > calls;
        Some(match self.phase {
            Phase::Start if think_fits => Allowed::Only(vec![THINK, TOOL_CALL]),
            Phase::Start => Allowed::Only(vec![TOOL_CALL]),
            Phase::Think if think_fits => Allowed::Mask(&t.think_text),
            Phase::Think => Allowed::Only(vec![THINK_END]),
            Phase::AfterThink => {
                let mut ids = vec![TOOL_CALL];
                if remaining >= calls {
                    ids.extend(&t.whitespace);
                    ids.sort_unstable();
                }
                Allowed::Only(ids)
            }
            // `</tool_call>` and `<|im_end|>` follow the list.
            Phase::Calls => Allowed::Only(
                self.strict
                    .allowed(Some(remaining.saturating_sub(2)))
                    .unwrap_or_default(),
            ),
            Phase::ImEnd => Allowed::Only(vec![IM_END]),
            Phase::Eos => Allowed::Only(vec![EOS]),
            Phase::Done => return None,
        })
    }

    /// Takes the chosen token.
    pub fn feed(&mut self, id: u32) {
        self.phase = match (self.phase, id) {
            (Phase::Start, THINK) => Phase::Think,
            (Phase::Think, THINK_END) => Phase::AfterThink,
            (Phase::Think, _) => Phase::Think,
            (Phase::Start | Phase::AfterThink, TOOL_CALL) => {
                self.strict.feed_token(id);
                Phase::Calls
            }
            (Phase::AfterThink, _) => Phase::AfterThink,
            (Phase::Calls, TOOL_CALL_END) if self.strict.is_complete() => Phase::ImEnd,
            (Phase::Calls, _) => {
                self.strict.feed_token(id);
                Phase::Calls
            }
            (Phase::ImEnd, _) => Phase::Eos,
            (Phase::Eos | Phase::Done, _) => Phase::Done,
            (Phase::Start, _) => Phase::Done,
        };
    }
}
