//! Answering a query with a Needle 3 model: the prompt of [`super::prompt`], greedy decoding
//! through the [`Cache`], and the answer read out of the output envelope
//! (`[<think>\nREASONING\n</think>\n]<tool_call>CALLS</tool_call><|im_end|>`).
//!
//! Folding (`fold = true`): the prompt up to `</tools>` depends only on the system text and the
//! tools (everything is causal and they come first), so its cache is computed once, when the
//! engine is made, and every query continues from a copy of it. Unfolded, every query runs its
//! whole prompt. The two give the same logits bit for bit: a row's arithmetic does not depend on
//! which rows run with it (tested).

use super::forward::{heads, Cache, HeadOutputs, Output};
use super::grammar::{Allowed, EnvelopeMachine, EnvelopeTables};
use super::model::Model;
use super::prompt::{encode_prompt, PromptIds, EOS};
use super::Error;
use crate::pyjson;
use crate::tokenizer::Tokenizer;

/// The prefix's state, computed once when folding.
#[derive(Clone, Debug)]
struct Prefix {
    len: usize,
    cache: Cache,
    /// The prefix's hidden cells, which the heads pool over with the rest.
    out: Output,
}

/// A Needle 3 model with its tokenizer and the app's system text and tools.
pub struct Engine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    system: String,
    tools_json: String,
    prefix: Option<Prefix>,
    /// `--grammar strict`: the envelope and schema tables.
    strict: Option<EnvelopeTables>,
}

/// One answer.
#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt: PromptIds,
    /// The generated ids (the final EOS included when it was reached).
    pub new_ids: Vec<u32>,
    /// The generated text, decoded.
    pub text: String,
    /// The `<think>` block's text, trimmed, if the model wrote one.
    pub reasoning: Option<String>,
    /// The calls: the `<tool_call>` block's JSON written compactly when it parses (`parsed`),
    /// else the block's text (or, with no block, the whole text) as generated.
    pub calls: String,
    pub parsed: bool,
    /// The heads over the prompt and the answer (its final EOS included).
    pub heads: HeadOutputs,
    /// Every step's logits (row `i` chose `new_ids[i]`).
    pub logits: Vec<Vec<f32>>,
}

impl Engine {
    /// Makes the engine; with `fold`, runs the prefix now.
    pub fn new(
        model: Model,
        tokenizer: Tokenizer,
        system: &str,
        tools_json: String,
        fold: bool,
    ) -> Result<Engine, Error> {
        super::prompt::check_tokenizer(&tokenizer)?;
        let mut engine = Engine {
            model,
            tokenizer,
            system: system.to_string(),
            tools_json,
            prefix: None,
            strict: None,
        };
        if fold {
            // Any query gives the same prefix ids; an empty one is enough to find them.
            let prompt = engine.prompt("")?;
            let mut cache = Cache::new(&engine.model);
            let out = cache.extend(&engine.model, &prompt.ids[..prompt.prefix_len])?;
            engine.prefix = Some(Prefix {
                len: prompt.prefix_len,
                cache,
                out,
            });
        }
        Ok(engine)
    }

    /// Decodes under the strict grammar from now on (`--grammar strict`): the tool list's
    /// schemas must be expressible (an error names the tool and key otherwise).
    pub fn with_strict_grammar(mut self) -> Result<Engine, Error> {
        self.strict = Some(EnvelopeTables::new(&self.tokenizer, &self.tools_json)?);
        Ok(self)
    }

    /// Whether the prefix is folded.
    pub fn folded(&self) -> bool {
        self.prefix.is_some()
    }

    /// The prompt's ids for `query`.
    pub fn prompt(&self, query: &str) -> Result<PromptIds, Error> {
        Ok(encode_prompt(
            &self.tokenizer,
            &self.system,
            &self.tools_json,
            query,
        )?)
    }

    /// Teacher forcing: the prompt for `query` followed by `answer` (token ids, EOS appended
    /// here), run as one pass after the prompt; `logits[i]` is the step that predicts
    /// `new_ids[i]`, as in [`Engine::generate`].
    pub fn forced(&self, query: &str, answer: &[u32]) -> Result<Generation, Error> {
        let prompt = self.prompt(query)?;
        let (mut cache, mut cells, out) = self.run_prompt(&prompt)?;
        let mut new_ids = answer.to_vec();
        new_ids.push(EOS);
        let mut logits = Vec::with_capacity(new_ids.len());
        if let Some(r) = out.logits.nrows().checked_sub(1) {
            logits.push(out.logits.row(r).to_vec());
        }
        cells.push(out);
        // EOS runs too: the heads read its cells. Its own logits predict nothing asked for.
        let rest = cache.extend(&self.model, &new_ids)?;
        let n = rest.logits.nrows().saturating_sub(1);
        logits.extend(rest.logits.rows().into_iter().take(n).map(|r| r.to_vec()));
        cells.push(rest);
        self.finish(prompt, new_ids, logits, cells)
    }

    /// The prompt through the model: from the folded prefix's cache when there is one.
    fn run_prompt(&self, prompt: &PromptIds) -> Result<(Cache, Vec<Output>, Output), Error> {
        Ok(match &self.prefix {
            Some(p) => {
                if p.len != prompt.prefix_len {
                    return Err(super::prompt::PromptError::Split.into());
                }
                let mut cache = p.cache.clone();
                let out = cache.extend(&self.model, &prompt.ids[p.len..])?;
                (cache, vec![p.out.clone()], out)
            }
            None => {
                let mut cache = Cache::new(&self.model);
                let out = cache.extend(&self.model, &prompt.ids)?;
                (cache, Vec::new(), out)
            }
        })
    }

    /// The embedding head over the prompt with `text` as its query, no answer (what a
    /// compiled library's `NAME_embed` gives); `None` when the model has no embedding head.
    pub fn embed(&self, text: &str) -> Result<Option<Vec<f32>>, Error> {
        let prompt = self.prompt(text)?;
        let (_, mut cells, out) = self.run_prompt(&prompt)?;
        cells.push(out);
        let joined = join_cells(&cells, prompt.ids.len());
        Ok(heads(&self.model, &prompt.ids, &joined).embedding)
    }

    /// Greedy decoding, at most `max_new` tokens, until EOS.
    pub fn generate(&self, query: &str, max_new: usize) -> Result<Generation, Error> {
        if let Some(t) = &self.strict {
            if max_new < t.calls_cost() {
                return Err(Error::StrictBudget {
                    allows: max_new,
                    needed: t.calls_cost(),
                });
            }
        }
        let mut envelope = self.strict.as_ref().map(EnvelopeMachine::new);
        let prompt = self.prompt(query)?;
        let (mut cache, mut cells, mut out) = self.run_prompt(&prompt)?;
        let mut new_ids = Vec::new();
        let mut logits = Vec::new();
        // The pass whose last row picks the next token; its rows join `cells` once read.
        while new_ids.len() < max_new {
            let Some(r) = out.logits.nrows().checked_sub(1) else {
                break;
            };
            let row: Vec<f32> = out.logits.row(r).to_vec();
            if row.iter().any(|v| !v.is_finite()) {
                return Err(Error::Config(format!(
                    "the logits at generated position {} are not finite: the weights overflow \
                     float32",
                    new_ids.len()
                )));
            }
            let remaining = max_new - new_ids.len() - 1;
            let allowed = match &envelope {
                None => None,
                Some(e) => match e.allowed(remaining) {
                    Some(a) => Some(a),
                    None => break,
                },
            };
            // The first maximum (lowest id on ties), as argmax does, among the allowed ids.
            let pick = |ids: &mut dyn Iterator<Item = usize>| {
                ids.fold(None, |b: Option<usize>, i| match b {
                    Some(b) if row[b] >= row[i] => Some(b),
                    _ => Some(i),
                })
            };
            let next = match &allowed {
                None => pick(&mut (0..row.len())),
                Some(Allowed::Only(ids)) => pick(&mut ids.iter().map(|&i| i as usize)),
                Some(Allowed::Mask(mask)) => pick(&mut (0..row.len()).filter(|&i| mask[i])),
            };
            let Some(next) = next.map(|n| n as u32) else {
                return Err(Error::Config(
                    "the strict grammar allows no token here: a needlec bug, please report it"
                        .into(),
                ));
            };
            if let Some(e) = &mut envelope {
                e.feed(next);
            }
            logits.push(row);
            new_ids.push(next);
            // EOS runs too: the heads read its cells.
            let step = cache.extend(&self.model, &[next])?;
            cells.push(std::mem::replace(&mut out, step));
            if next == EOS {
                break;
            }
        }
        cells.push(out);
        self.finish(prompt, new_ids, logits, cells)
    }

    /// The heads over every position run (prompt and answer, a final EOS included, as the
    /// package's heads read a whole training sequence), the text and the envelope.
    fn finish(
        &self,
        prompt: PromptIds,
        new_ids: Vec<u32>,
        logits: Vec<Vec<f32>>,
        cells: Vec<Output>,
    ) -> Result<Generation, Error> {
        let mut all = prompt.ids.clone();
        all.extend(&new_ids);
        let joined = join_cells(&cells, all.len());
        let heads = heads(&self.model, &all, &joined);
        let text = self
            .tokenizer
            .decode(&new_ids[..new_ids.len() - usize::from(new_ids.last() == Some(&EOS))]);
        let envelope = read_envelope(&text);
        Ok(Generation {
            prompt,
            new_ids,
            reasoning: envelope.reasoning,
            calls: envelope.calls,
            parsed: envelope.parsed,
            text,
            heads,
            logits,
        })
    }
}

/// The hidden cells of every position run, in order, cut to `len` rows.
fn join_cells(parts: &[Output], len: usize) -> Output {
    let layers = parts.first().map_or(0, |p| p.cells.len());
    let cells = (0..layers)
        .map(|l| {
            let views: Vec<_> = parts.iter().map(|p| p.cells[l].view()).collect();
            let all = ndarray::concatenate(ndarray::Axis(0), &views).expect("same widths");
            let rows = len.min(all.nrows());
            all.slice_axis(ndarray::Axis(0), ndarray::Slice::from(0..rows))
                .to_owned()
        })
        .collect();
    let logits = parts
        .last()
        .map(|p| p.logits.clone())
        .unwrap_or_else(|| ndarray::Array2::zeros((0, 0)));
    Output { logits, cells }
}

/// What the envelope holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub reasoning: Option<String>,
    pub calls: String,
    pub parsed: bool,
}

/// Reads `[<think>\nREASONING\n</think>\n]<tool_call>CALLS</tool_call>[<|im_end|>]`: the
/// reasoning trimmed, the calls written compactly when they parse as JSON; otherwise the calls
/// block's text (or the whole text, with no `<tool_call>`) as generated, `parsed` false.
pub fn read_envelope(text: &str) -> Envelope {
    let mut rest = text.trim_start();
    let mut reasoning = None;
    if let Some(after) = rest.strip_prefix("<think>") {
        match after.split_once("</think>") {
            Some((inside, tail)) => {
                let inside = inside.trim();
                reasoning = (!inside.is_empty()).then(|| inside.to_string());
                rest = tail.trim_start();
            }
            None => {
                return Envelope {
                    reasoning: Some(after.trim().to_string()),
                    calls: String::new(),
                    parsed: false,
                }
            }
        }
    }
    let Some(after) = rest.strip_prefix("<tool_call>") else {
        return Envelope {
            reasoning,
            calls: rest.to_string(),
            parsed: false,
        };
    };
    let inside = after.split_once("</tool_call>").map_or(after, |(c, _)| c);
    match pyjson::parse(inside) {
        Ok(value) => Envelope {
            reasoning,
            calls: pyjson::to_compact_string_unicode(&value),
            parsed: true,
        },
        Err(_) => Envelope {
            reasoning,
            calls: inside.to_string(),
            parsed: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_read_as_the_model_writes_them() {
        let e = read_envelope(
            "<think>\nweather, Paris\n</think>\n<tool_call>[{\"name\":\"w\",\"arguments\":{\"c\":\"Zürich\"}}]</tool_call><|im_end|>",
        );
        assert_eq!(e.reasoning.as_deref(), Some("weather, Paris"));
        assert_eq!(
            e.calls,
            "[{\"name\":\"w\",\"arguments\":{\"c\":\"Zürich\"}}]"
        );
        assert!(e.parsed);
        let e = read_envelope("<tool_call>[{\"name\": 1}]</tool_call>");
        assert_eq!(
            (e.reasoning, e.calls.as_str(), e.parsed),
            (None, "[{\"name\":1}]", true)
        );
        let e = read_envelope("<tool_call>[{\"name\"");
        assert_eq!((e.calls.as_str(), e.parsed), ("[{\"name\"", false));
        let e = read_envelope("just text");
        assert_eq!((e.calls.as_str(), e.parsed), ("just text", false));
    }
}
