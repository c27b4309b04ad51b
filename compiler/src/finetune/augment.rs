//! `--augment`: new argument values every epoch, so the fine-tune learns to copy what a query
//! says instead of memorizing the values its training set happens to hold.
//!
//! Why: fine-tuned for four epochs on `train.jsonl`, the tuned model's misses on `dev.jsonl` were
//! nearly all a copied detail gone wrong (107.41 became 127.41, Dallas became Blaslas) while its
//! training loss fell far below its validation loss. A variant of an example replaces each
//! argument value its query states verbatim, in the query and in the answer alike: a string by
//! another value the data gives the same tool's same argument, a number by a random one of the
//! same shape (digit count and decimals). Only labelled lines vary; the variant's answer is
//! right by construction. (Shuffling the variant's tool list as well was measured and dropped:
//! 93.6% folded exact match on dev against 94.2% without it.)

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Number, Value};

use super::model::SplitMix;
use crate::eval::data::Example;

/// The share of an epoch's labelled examples that are replaced by a variant.
pub const VARIED_SHARE: f64 = 0.5;

/// The values each `(tool, argument)` takes in the data where its query states it verbatim.
pub struct Augmenter {
    pools: BTreeMap<(String, String), Vec<String>>,
}

/// One top-level argument of one call: which call, which key.
struct Leaf<'a> {
    tool: &'a str,
    key: &'a str,
    value: &'a Value,
}

impl Augmenter {
    pub fn new<'a>(examples: impl IntoIterator<Item = &'a Example>) -> Augmenter {
        let mut pools: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for ex in examples {
            for leaf in leaves(&ex.answers) {
                if let Value::String(s) = leaf.value {
                    if count_bounded(&ex.query, s) == 1 {
                        pools
                            .entry((leaf.tool.to_string(), leaf.key.to_string()))
                            .or_default()
                            .insert(s.clone());
                    }
                }
            }
        }
        Augmenter {
            pools: pools
                .into_iter()
                .map(|(k, v)| (k, v.into_iter().collect()))
                .collect(),
        }
    }

    /// A variant of `(query, answers)`: every argument value the query states exactly once
    /// (a string, or a number as JSON writes it) replaced in both, when a replacement that the
    /// query does not already hold exists. `None` when nothing could be replaced.
    pub fn vary(
        &self,
        query: &str,
        answers: &[Value],
        rng: &mut SplitMix,
    ) -> Option<(String, Vec<Value>)> {
        let mut replacements: Vec<(Value, Value)> = Vec::new();
        let mut query = query.to_string();
        for leaf in leaves(answers) {
            if replacements.iter().any(|(old, _)| old == leaf.value) {
                continue;
            }
            let Some(text) = literal(leaf.value) else {
                continue;
            };
            if count_bounded(&query, &text) != 1 {
                continue;
            }
            let new = match leaf.value {
                Value::String(_) => {
                    let key = (leaf.tool.to_string(), leaf.key.to_string());
                    let Some(pool) = self.pools.get(&key) else {
                        continue;
                    };
                    let candidates: Vec<&String> = pool
                        .iter()
                        .filter(|v| **v != text && !query.contains(v.as_str()))
                        .collect();
                    if candidates.is_empty() {
                        continue;
                    }
                    Value::String(candidates[rng.below(candidates.len())].clone())
                }
                _ => match number_like(&text, rng) {
                    Some(v) if !query.contains(&literal(&v).unwrap_or_default()) => v,
                    _ => continue,
                },
            };
            let new_text = literal(&new).expect("replacements are literals");
            let at = find_bounded(&query, &text).expect("counted once above");
            query.replace_range(at..at + text.len(), &new_text);
            replacements.push((leaf.value.clone(), new));
        }
        if replacements.is_empty() {
            return None;
        }
        let answers = answers
            .iter()
            .map(|call| {
                let mut call = call.clone();
                if let Some(Value::Object(args)) = call.get_mut("arguments") {
                    for v in args.values_mut() {
                        if let Some((_, new)) = replacements.iter().find(|(old, _)| old == v) {
                            *v = new.clone();
                        }
                    }
                }
                call
            })
            .collect();
        Some((query, answers))
    }
}

/// The top-level arguments of every call in `answers`.
fn leaves(answers: &[Value]) -> Vec<Leaf<'_>> {
    let mut out = Vec::new();
    for call in answers {
        let Some(tool) = call.get("name").and_then(Value::as_str) else {
            continue;
        };
        if let Some(Value::Object(args)) = call.get("arguments") {
            for (key, value) in args {
                out.push(Leaf { tool, key, value });
            }
        }
    }
    out
}

/// How a value appears in a query when it is stated verbatim: a non-empty string itself, a
/// non-negative number as JSON writes it (`55`, `107.41`); `None` for anything else.
fn literal(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => {
            let text = n.to_string();
            let shape_ok = match text.split_once('.') {
                Some((int, frac)) => digits(int) && digits(frac),
                None => digits(&text),
            };
            shape_ok.then_some(text)
        }
        _ => None,
    }
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// A random number of `text`'s shape (its digit count before and after the point, no leading
/// zero, no trailing zero in the decimals so JSON writes it back the same), other than `text`.
fn number_like(text: &str, rng: &mut SplitMix) -> Option<Value> {
    let mut random_digits = |n: usize, first_nonzero: bool, last_nonzero: bool| -> String {
        (0..n)
            .map(|i| {
                let nonzero = (i == 0 && first_nonzero && n > 1) || (i == n - 1 && last_nonzero);
                let d = if nonzero {
                    1 + rng.below(9)
                } else {
                    rng.below(10)
                };
                char::from(b'0' + d as u8)
            })
            .collect()
    };
    let new = match text.split_once('.') {
        Some((int, frac)) => {
            let int = random_digits(int.len(), true, false);
            let frac = random_digits(frac.len(), false, true);
            format!("{int}.{frac}")
        }
        None => random_digits(text.len(), true, false),
    };
    if new == text {
        return None;
    }
    let value = match new.parse::<u64>() {
        Ok(n) => Value::Number(n.into()),
        Err(_) => Value::Number(Number::from_f64(new.parse::<f64>().ok()?)?),
    };
    // Only a number JSON writes back as drawn: what the query says is what the answer holds.
    (literal(&value).as_deref() == Some(new.as_str())).then_some(value)
}

/// Whether `hay[start..end]` stands alone: not glued to a letter or digit on a side where the
/// needle itself begins or ends with one, and, for a number, not part of a longer one
/// (`1,000`, `3.5`, `-2`).
fn bounded(hay: &str, start: usize, end: usize) -> bool {
    let needle = &hay[start..end];
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let numeric = needle.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let before = hay[..start].chars().next_back();
    let mut rest = hay[end..].chars();
    let (after, after2) = (rest.next(), rest.next());
    let starts_word = needle.chars().next().is_some_and(word);
    let ends_word = needle.chars().next_back().is_some_and(word);
    if starts_word && before.is_some_and(word) || ends_word && after.is_some_and(word) {
        return false;
    }
    if numeric {
        let digit = |c: Option<char>| c.is_some_and(|c| c.is_ascii_digit());
        if matches!(before, Some('.' | '-' | ',')) {
            return false;
        }
        if matches!(after, Some('.' | ',')) && digit(after2) {
            return false;
        }
    }
    true
}

fn count_bounded(hay: &str, needle: &str) -> usize {
    hay.match_indices(needle)
        .filter(|(at, _)| bounded(hay, *at, at + needle.len()))
        .count()
}

fn find_bounded(hay: &str, needle: &str) -> Option<usize> {
    hay.match_indices(needle)
        .map(|(at, _)| at)
        .find(|&at| bounded(hay, at, at + needle.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn example(query: &str, answers: Value) -> Example {
        Example {
            line: 1,
            query: query.into(),
            tools: None,
            answers: answers.as_array().unwrap().clone(),
            labelled: true,
        }
    }

    #[test]
    fn a_variant_changes_query_and_answer_together() {
        let data = [
            example(
                "Directions to Dallas by bike",
                json!([{"name": "get_directions", "arguments": {"destination": "Dallas", "mode": "cycling"}}]),
            ),
            example(
                "How do I get to Oslo",
                json!([{"name": "get_directions", "arguments": {"destination": "Oslo"}}]),
            ),
            example(
                "Tip 22% on 107.41",
                json!([{"name": "calculate_tip", "arguments": {"bill_amount": 107.41, "percentage": 22}}]),
            ),
        ];
        let aug = Augmenter::new(&data);
        let mut rng = SplitMix(7);
        let (q, a) = aug
            .vary(&data[0].query, &data[0].answers, &mut rng)
            .unwrap();
        assert_eq!(q, "Directions to Oslo by bike");
        assert_eq!(a[0]["arguments"]["destination"], "Oslo");
        // "cycling" is not in the query: it stays.
        assert_eq!(a[0]["arguments"]["mode"], "cycling");

        for _ in 0..50 {
            let (q, a) = aug
                .vary(&data[2].query, &data[2].answers, &mut rng)
                .unwrap();
            let bill = a[0]["arguments"]["bill_amount"].to_string();
            let pct = a[0]["arguments"]["percentage"].to_string();
            assert_eq!(q, format!("Tip {pct}% on {bill}"));
            let (int, frac) = bill.split_once('.').unwrap();
            assert_eq!((int.len(), frac.len()), (3, 2), "{bill}");
            assert_eq!(pct.len(), 2);
            assert_ne!(bill, "107.41");
        }
    }

    #[test]
    fn values_not_stated_once_and_alone_are_kept() {
        let aug = Augmenter::new(&[]);
        let mut rng = SplitMix(1);
        // 5 is inside 55 and 1,005: not stated alone, so nothing varies.
        let answers = json!([{"name": "set_volume", "arguments": {"level": 5}}]);
        assert!(aug
            .vary("volume 55 or 1,005", answers.as_array().unwrap(), &mut rng)
            .is_none());
        // A string with no other value in its pool stays.
        let answers = json!([{"name": "play", "arguments": {"song": "Hey"}}]);
        assert!(aug
            .vary("play Hey", answers.as_array().unwrap(), &mut rng)
            .is_none());
        // A value stated twice is ambiguous.
        let answers = json!([{"name": "set_volume", "arguments": {"level": 7}}]);
        assert!(aug
            .vary("7 or 7", answers.as_array().unwrap(), &mut rng)
            .is_none());
    }

    #[test]
    fn numbers_keep_their_shape() {
        let mut rng = SplitMix(3);
        for text in ["7", "55", "2024", "54.35", "0.5", "100.39"] {
            for _ in 0..100 {
                let Some(v) = number_like(text, &mut rng) else {
                    continue;
                };
                let new = literal(&v).unwrap();
                assert_ne!(new, text);
                let shape = |s: &str| s.split('.').map(str::len).collect::<Vec<_>>();
                assert_eq!(shape(&new), shape(text), "{text} -> {new}");
            }
        }
    }
}
