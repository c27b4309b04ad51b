//! How far to trust one call: signals read off a greedy decode, and the confidence score.
//!
//! Every signal uses only what a compiled library has at hand during or right after its decode
//! loop, so the library can compute the same numbers:
//! - per step, the chosen token's probability under the grammar mask and its margin over the
//!   next most probable allowed token ([`crate::decode::Step`]); steps where the grammar allowed
//!   exactly one token carry no choice and are skipped;
//! - which span the grammar was in (tool name, argument key, free text);
//! - the checkpoint's contrastive head: the query embedded alone (one extra encoder pass over
//!   the query tokens, full attention, mean-pooled, projected, L2-normalized) against each
//!   tool's embedding, which depends only on the tool list (build-time constants for a library).
//!
//! The signals are all in `[0, 1]`, higher meaning more trustworthy; `needlec eval` measures
//! how well each one tells right answers from wrong ones (AUROC), and [`CONFIDENCE_SIGNAL`]
//! names the one chosen as *the* confidence (`docs/spec.md` defines it).

use crate::decode::Step;
use crate::grammar::GrammarState;
use crate::output::TOOL_CALL_TOKEN;
use crate::pyjson::{self, Value};

/// The signal that is the confidence (chosen by AUROC on the fine-tuning dev set, both fold
/// modes; see `docs/spec.md`).
pub const CONFIDENCE_SIGNAL: &str = "mean_prob";

/// Every signal of one call, each in `[0, 1]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Signals {
    /// The smallest chosen-token probability over the steps with a choice (1 if none).
    pub min_prob: f32,
    /// The geometric mean of those probabilities (1 if none).
    pub mean_prob: f32,
    /// The product of the chosen-token probabilities over the tool-name steps with a choice: the
    /// probability of the name(s) given the prefix (1 when no name was generated).
    pub name_prob: f32,
    /// The smallest margin over those name steps, clamped to `[0, 1]` (1 when none).
    pub name_margin: f32,
    /// The smallest margin over every step with a choice, clamped to `[0, 1]` (1 when none).
    pub min_margin: f32,
    /// `(cos + 1) / 2` between the query's and the first called tool's contrastive
    /// embeddings; with no known tool called, `1 - ` that for the tool closest to the query.
    pub tool_similarity: f32,
    /// The contrastive head's own retrieval probability, `softmax(cos * exp(log_temp))` over the
    /// tools, of the first called tool; with no known tool called, `1 -` the largest one.
    pub retrieval_prob: f32,
}

/// The confidence of one call and what it was computed from.
#[derive(Clone, Debug, PartialEq)]
pub struct Confidence {
    /// The confidence in `[0, 1]`: the [`CONFIDENCE_SIGNAL`] signal.
    pub value: f32,
    /// The index in the tool list of the first call's tool; `None` for `[]`, text that is not a
    /// call, or a name not in the list.
    pub tool: Option<usize>,
    pub signals: Signals,
}

impl Signals {
    /// From the decode steps, the chosen tool, and the contrastive similarities (`cosines[t]`:
    /// query against tool `t`) at temperature `exp(log_temp)`.
    pub fn new(steps: &[Step], tool: Option<usize>, cosines: &[f32], log_temp: f32) -> Signals {
        let choice = |s: &&Step| s.allowed != Some(1);
        let probs: Vec<f32> = steps
            .iter()
            .filter(choice)
            .map(|s| clamp01(s.prob))
            .collect();
        let min_prob = probs.iter().copied().fold(1.0f32, f32::min);
        let mean_prob = if probs.is_empty() {
            1.0
        } else {
            let mean_log =
                probs.iter().map(|&p| f64::from(p).ln()).sum::<f64>() / probs.len() as f64;
            mean_log.exp() as f32
        };
        let names = || {
            steps
                .iter()
                .filter(choice)
                .filter(|s| s.span == GrammarState::InName)
        };
        let name_prob = names().map(|s| clamp01(s.prob)).product::<f32>();
        let name_margin = names().map(|s| clamp01(s.margin)).fold(1.0f32, f32::min);
        let min_margin = steps
            .iter()
            .filter(choice)
            .map(|s| clamp01(s.margin))
            .fold(1.0f32, f32::min);
        let (tool_similarity, retrieval_prob) = contrastive_signals(tool, cosines, log_temp);
        Signals {
            min_prob: clamp01(min_prob),
            mean_prob: clamp01(mean_prob),
            name_prob: clamp01(name_prob),
            name_margin: clamp01(name_margin),
            min_margin: clamp01(min_margin),
            tool_similarity,
            retrieval_prob,
        }
    }

    /// Every signal by name, in a fixed order: what `needlec eval` compares.
    pub fn named(&self) -> [(&'static str, f32); 7] {
        [
            ("min_prob", self.min_prob),
            ("mean_prob", self.mean_prob),
            ("name_prob", self.name_prob),
            ("name_margin", self.name_margin),
            ("min_margin", self.min_margin),
            ("tool_similarity", self.tool_similarity),
            ("retrieval_prob", self.retrieval_prob),
        ]
    }

    /// The signal called `name`.
    pub fn get(&self, name: &str) -> Option<f32> {
        self.named()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    /// The confidence: the [`CONFIDENCE_SIGNAL`] signal.
    pub fn confidence(&self) -> f32 {
        self.get(CONFIDENCE_SIGNAL).expect("a named signal")
    }
}

/// NaN (from a NaN logit) counts as no confidence at all.
fn clamp01(v: f32) -> f32 {
    if v.is_nan() {
        0.0
    } else {
        v.clamp(0.0, 1.0)
    }
}

/// `(tool_similarity, retrieval_prob)` of [`Signals`].
fn contrastive_signals(tool: Option<usize>, cosines: &[f32], log_temp: f32) -> (f32, f32) {
    if cosines.is_empty() {
        return (0.5, 0.5);
    }
    let scale = log_temp.exp();
    let max = cosines.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f32 = cosines.iter().map(|&c| ((c - max) * scale).exp()).sum();
    let prob = |c: f32| ((c - max) * scale).exp() / z;
    match tool.and_then(|t| cosines.get(t)) {
        Some(&c) => (clamp01((c + 1.0) / 2.0), clamp01(prob(c))),
        None => (clamp01(1.0 - (max + 1.0) / 2.0), clamp01(1.0 - prob(max))),
    }
}

/// The index of the first call's tool in `name_map` (snake names, as the model writes them),
/// read from the generated text: the first element's `name` when the text is JSON (an array,
/// or a single object), else the first `"name"` member written (`"name"`, optional blanks, `:`,
/// optional blanks, a string: the span the grammar constrains), so a call whose arguments went
/// wrong still has its tool. `None` for `[]` or a name not in the list.
pub fn chosen_tool(text: &str, name_map: &[(String, String)]) -> Option<usize> {
    let body = text.strip_prefix(TOOL_CALL_TOKEN).unwrap_or(text);
    let name = match pyjson::parse(body) {
        Ok(value) => {
            let first = match &value {
                Value::Array(calls) => calls.first()?,
                Value::Object(_) => &value,
                _ => return None,
            };
            first.get("name")?.as_str()?.to_string()
        }
        Err(_) => first_name_member(body)?,
    };
    name_map.iter().position(|(snake, _)| *snake == name)
}

/// The string value of the first `"name": "..."` in `text` (no escapes inside: tool names
/// have none), if one is written out to its closing quote.
fn first_name_member(text: &str) -> Option<String> {
    let blank = |c: char| matches!(c, ' ' | '\t' | '\r' | '\n');
    let after = &text[text.find("\"name\"")? + 6..];
    let after = after.trim_start_matches(blank).strip_prefix(':')?;
    let after = after.trim_start_matches(blank).strip_prefix('"')?;
    Some(after[..after.find('"')?].to_string())
}

/// Cosine of two L2-normalized vectors (their dot product).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(allowed: Option<usize>, span: GrammarState, prob: f32, margin: f32) -> Step {
        Step {
            top: Vec::new(),
            grammar_active: allowed.is_some(),
            allowed,
            next: 0,
            span,
            prob,
            margin,
        }
    }

    #[test]
    fn signals_skip_forced_steps_and_read_the_name_span() {
        use GrammarState::*;
        let steps = [
            step(None, Free, 0.9, 0.8),
            step(Some(3), InName, 0.5, 0.1),
            step(Some(1), InName, 0.01, 1.0), // forced: ignored
            step(Some(2), InName, 0.8, 0.6),
            step(None, Free, 0.4, -0.2),
        ];
        let s = Signals::new(&steps, Some(0), &[0.5, -0.5], 0.0);
        assert_eq!(s.min_prob, 0.4);
        let gm = (0.9f64 * 0.5 * 0.8 * 0.4).powf(0.25) as f32;
        assert!((s.mean_prob - gm).abs() < 1e-6);
        assert!((s.name_prob - 0.4).abs() < 1e-6);
        assert!((s.name_margin - 0.1).abs() < 1e-6);
        assert_eq!(s.min_margin, 0.0, "negative margins clamp to 0");
        assert!((s.tool_similarity - 0.75).abs() < 1e-6);
        let p0 = 1.0 / (1.0 + (-1.0f32).exp());
        assert!((s.retrieval_prob - p0).abs() < 1e-6);
        // No tool called: trust in `[]` grows as the best tool fits the query less.
        let none = Signals::new(&steps, None, &[0.5, -0.5], 0.0);
        assert!((none.tool_similarity - 0.25).abs() < 1e-6);
        assert!((none.retrieval_prob - (1.0 - p0)).abs() < 1e-6);
        assert_eq!(s.confidence(), s.get(CONFIDENCE_SIGNAL).unwrap());
    }

    #[test]
    fn no_choice_means_full_confidence_and_nan_means_none() {
        let s = Signals::new(&[], None, &[], 0.0);
        assert_eq!((s.min_prob, s.mean_prob, s.name_prob), (1.0, 1.0, 1.0));
        let nan = Signals::new(
            &[step(None, GrammarState::Free, f32::NAN, f32::NAN)],
            None,
            &[],
            0.0,
        );
        assert_eq!(
            (nan.min_prob, nan.mean_prob, nan.min_margin),
            (0.0, 0.0, 0.0)
        );
        assert!(nan.named().iter().all(|(_, v)| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn the_chosen_tool_comes_from_the_first_call() {
        let map = vec![
            ("get_weather".to_string(), "getWeather".to_string()),
            ("set_timer".to_string(), "setTimer".to_string()),
        ];
        let call = r#"<tool_call>[{"name":"set_timer","arguments":{}},{"name":"get_weather"}]"#;
        assert_eq!(chosen_tool(call, &map), Some(1));
        assert_eq!(chosen_tool("<tool_call>[]", &map), None);
        assert_eq!(chosen_tool(r#"[{"name":"nope"}]"#, &map), None);
        assert_eq!(chosen_tool("[{\"name\":", &map), None);
        // Arguments gone wrong: the name is still read.
        let broken = r#"<tool_call>[{"name": "get_weather","arguments":{"x":"a" b b"#;
        assert_eq!(chosen_tool(broken, &map), Some(0));
        assert_eq!(chosen_tool(r#"[{"name":"set_ti"#, &map), None);
        assert_eq!(chosen_tool(r#"{"name":"get_weather"}"#, &map), Some(0));
    }
}
