//! The figures of `needlec eval`, as pure functions over parsed calls and scores.
//!
//! Calls are compared as JSON values: objects regardless of member order, numbers by value
//! (`5` equals `5.0`, as Python's `==` after `json.loads`), everything else exactly.

use serde::Serialize;
use serde_json::Value;

/// JSON equality: objects regardless of member order, numbers by value.
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y || matches!((x.as_f64(), y.as_f64()), (Some(p), Some(q)) if p == q)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// How one output scores against the expected calls.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CallScore {
    /// The output is exactly the expected list of calls.
    pub exact: bool,
    /// The output calls the same tools as expected, as a multiset (`[]` for `[]`).
    pub tool_selection: bool,
    /// Argument `(tool, key, value)` triples of the output that match an expected one.
    pub args_matched: usize,
    /// Argument triples in the output.
    pub args_predicted: usize,
    /// Argument triples expected.
    pub args_expected: usize,
}

/// Scores `output` (the parsed output, `None` when it is not JSON) against `expected`.
pub fn score_calls(output: Option<&Value>, expected: &[Value]) -> CallScore {
    let expected_triples = arg_triples(expected);
    let Some(Value::Array(calls)) = output else {
        return CallScore {
            args_expected: expected_triples.len(),
            ..CallScore::default()
        };
    };
    let exact =
        calls.len() == expected.len() && calls.iter().zip(expected).all(|(a, b)| json_eq(a, b));
    let names = |calls: &[Value]| -> Option<Vec<String>> {
        let mut names = calls
            .iter()
            .map(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
            .collect::<Option<Vec<_>>>()?;
        names.sort();
        Some(names)
    };
    let tool_selection = matches!((names(calls), names(expected)), (Some(a), Some(b)) if a == b);
    let predicted = arg_triples(calls);
    let mut used = vec![false; expected_triples.len()];
    let mut matched = 0;
    for (name, key, value) in &predicted {
        let hit = expected_triples
            .iter()
            .enumerate()
            .position(|(i, (n, k, v))| !used[i] && n == name && k == key && json_eq(v, value));
        if let Some(i) = hit {
            used[i] = true;
            matched += 1;
        }
    }
    CallScore {
        exact,
        tool_selection,
        args_matched: matched,
        args_predicted: predicted.len(),
        args_expected: expected_triples.len(),
    }
}

/// Every `(tool name, argument key, value)` of the calls that are objects with a string `name`
/// and an object `arguments`.
fn arg_triples(calls: &[Value]) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for call in calls {
        let (Some(name), Some(Value::Object(args))) = (
            call.get("name").and_then(Value::as_str),
            call.get("arguments"),
        ) else {
            continue;
        };
        for (key, value) in args {
            out.push((name.to_string(), key.clone(), value.clone()));
        }
    }
    out
}

/// One tool's parameters as the validity check needs them.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSchema {
    /// The name the user sees (restored).
    pub name: String,
    pub params: Vec<ParamSchema>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamSchema {
    pub key: String,
    /// The declared `type` (`None`: not declared, anything goes).
    pub ty: Option<String>,
    pub required: bool,
    /// The declared `enum` values, if any.
    pub allowed: Option<Vec<Value>>,
}

/// The schemas of a normalized tool list (Needle format, as `tools::ToolSet::normalized_json`
/// holds it) with each tool's name given by `names` (the originals, in tool order).
pub fn schemas(normalized: &Value, names: &[String]) -> Vec<ToolSchema> {
    let Some(tools) = normalized.as_array() else {
        return Vec::new();
    };
    tools
        .iter()
        .zip(names)
        .map(|(tool, name)| ToolSchema {
            name: name.clone(),
            params: tool
                .get("parameters")
                .and_then(Value::as_object)
                .map(|params| {
                    params
                        .iter()
                        .map(|(key, spec)| ParamSchema {
                            key: key.clone(),
                            ty: spec.get("type").and_then(Value::as_str).map(str::to_string),
                            required: spec.get("required") == Some(&Value::Bool(true)),
                            allowed: spec.get("enum").and_then(Value::as_array).cloned(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

/// Whether `output` is a valid list of calls under `tools`: a JSON array (possibly empty) of
/// objects, each with a `name` of a listed tool and an `arguments` object holding every
/// required parameter, only declared ones, each of its declared type (`string`, `integer`,
/// `number`, `boolean`, `array`, `object`, `null`; other types are not checked) and among the
/// `enum` values when listed. `Err` says the first thing wrong.
pub fn validate_calls(output: Option<&Value>, tools: &[ToolSchema]) -> Result<(), String> {
    let Some(output) = output else {
        return Err("not JSON".into());
    };
    let Value::Array(calls) = output else {
        return Err(format!("a JSON {}, not an array of calls", kind(output)));
    };
    for (i, call) in calls.iter().enumerate() {
        let Value::Object(call) = call else {
            return Err(format!("call {i} is a JSON {}, not an object", kind(call)));
        };
        let Some(name) = call.get("name").and_then(Value::as_str) else {
            return Err(format!("call {i} has no string \"name\""));
        };
        let Some(tool) = tools.iter().find(|t| t.name == name) else {
            return Err(format!(
                "call {i} names {name:?}, which is not a listed tool"
            ));
        };
        let Some(Value::Object(args)) = call.get("arguments") else {
            return Err(format!("call {i} ({name}) has no \"arguments\" object"));
        };
        for (key, value) in args {
            let Some(param) = tool.params.iter().find(|p| &p.key == key) else {
                return Err(format!(
                    "call {i} ({name}) has an undeclared argument {key:?}"
                ));
            };
            if let Some(ty) = &param.ty {
                if !has_type(value, ty) {
                    return Err(format!(
                        "call {i} ({name}) argument {key:?} is a JSON {}, not {ty}",
                        kind(value)
                    ));
                }
            }
            if let Some(allowed) = &param.allowed {
                if !allowed.iter().any(|a| json_eq(a, value)) {
                    return Err(format!(
                        "call {i} ({name}) argument {key:?} is {value}, not one of its enum values"
                    ));
                }
            }
        }
        if let Some(missing) = tool
            .params
            .iter()
            .find(|p| p.required && !args.contains_key(&p.key))
        {
            return Err(format!(
                "call {i} ({name}) lacks the required argument {:?}",
                missing.key
            ));
        }
    }
    Ok(())
}

fn has_type(value: &Value, ty: &str) -> bool {
    match ty {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "null" => value.is_null(),
        _ => true,
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `part / whole`, 0 when `whole` is 0.
pub fn ratio(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The area under the ROC curve of `scores` for telling `correct` from wrong: the probability
/// that a random right answer scores above a random wrong one, ties counting half (the
/// Mann-Whitney statistic). `None` when every answer is right or every one wrong.
pub fn auroc(scores: &[f64], correct: &[bool]) -> Option<f64> {
    let mut pairs: Vec<(f64, bool)> = scores
        .iter()
        .copied()
        .zip(correct.iter().copied())
        .collect();
    let pos = pairs.iter().filter(|p| p.1).count();
    let neg = pairs.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Sum of the ranks of the right answers, tied scores sharing their mean rank.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < pairs.len() {
        let mut j = i;
        while j < pairs.len() && pairs[j].0 == pairs[i].0 {
            j += 1;
        }
        let mean_rank = (i + 1 + j) as f64 / 2.0;
        rank_sum += mean_rank * pairs[i..j].iter().filter(|p| p.1).count() as f64;
        i = j;
    }
    let u = rank_sum - (pos * (pos + 1)) as f64 / 2.0;
    Some(u / (pos * neg) as f64)
}

/// One bin of a reliability diagram.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bin {
    pub lo: f64,
    pub hi: f64,
    pub count: usize,
    /// The mean confidence in the bin (the bin's midpoint when empty).
    pub confidence: f64,
    /// The share of right answers in the bin (0 when empty).
    pub accuracy: f64,
}

/// `bins` equal-width confidence bins over `[0, 1]`; a score of exactly 1 falls in the last.
pub fn reliability(scores: &[f64], correct: &[bool], bins: usize) -> Vec<Bin> {
    let bins = bins.max(1);
    let mut sum = vec![0.0; bins];
    let mut right = vec![0usize; bins];
    let mut count = vec![0usize; bins];
    for (&s, &c) in scores.iter().zip(correct) {
        let b = ((s.clamp(0.0, 1.0) * bins as f64) as usize).min(bins - 1);
        sum[b] += s;
        count[b] += 1;
        right[b] += usize::from(c);
    }
    (0..bins)
        .map(|b| {
            let (lo, hi) = (b as f64 / bins as f64, (b + 1) as f64 / bins as f64);
            Bin {
                lo,
                hi,
                count: count[b],
                confidence: if count[b] == 0 {
                    (lo + hi) / 2.0
                } else {
                    sum[b] / count[b] as f64
                },
                accuracy: ratio(right[b], count[b]),
            }
        })
        .collect()
}

/// Expected calibration error: the count-weighted mean of `|accuracy - confidence|` over the
/// bins.
pub fn ece(bins: &[Bin]) -> f64 {
    let n: usize = bins.iter().map(|b| b.count).sum();
    bins.iter()
        .map(|b| b.count as f64 * (b.accuracy - b.confidence).abs())
        .sum::<f64>()
        / n.max(1) as f64
}

/// One point of the precision/coverage curve: answering only when the confidence is at least
/// `threshold` keeps `coverage` of the examples, of which `precision` are right.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CurvePoint {
    pub threshold: f64,
    pub coverage: f64,
    pub precision: f64,
}

/// The curve over every distinct score, from the highest threshold (least coverage) down.
pub fn precision_coverage(scores: &[f64], correct: &[bool]) -> Vec<CurvePoint> {
    let mut pairs: Vec<(f64, bool)> = scores
        .iter()
        .copied()
        .zip(correct.iter().copied())
        .collect();
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let n = pairs.len();
    let mut out = Vec::new();
    let (mut kept, mut right) = (0, 0);
    let mut i = 0;
    while i < n {
        let threshold = pairs[i].0;
        while i < n && pairs[i].0 == threshold {
            kept += 1;
            right += usize::from(pairs[i].1);
            i += 1;
        }
        out.push(CurvePoint {
            threshold,
            coverage: ratio(kept, n),
            precision: ratio(right, kept),
        });
    }
    out
}

/// The lowest threshold (so the most coverage) whose precision reaches `target`; `None` when
/// none does.
pub fn threshold_for_precision(curve: &[CurvePoint], target: f64) -> Option<&CurvePoint> {
    curve
        .iter()
        .filter(|p| p.precision >= target)
        .max_by(|a, b| a.coverage.total_cmp(&b.coverage))
}

/// The `q`-quantile (0..=1) of `sorted` values, nearest rank; 0 for no values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn calls_compare_as_json() {
        assert!(json_eq(
            &json!({"a": 1, "b": [1.0]}),
            &json!({"b": [1], "a": 1.0})
        ));
        assert!(!json_eq(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(!json_eq(&json!("1"), &json!(1)));
        assert!(!json_eq(&json!([1, 2]), &json!([2, 1])));
    }

    #[test]
    fn scores_count_exact_tools_and_arguments() {
        let expected = vec![json!({"name": "t", "arguments": {"a": 1, "b": "x"}})];
        let right = json!([{"arguments": {"b": "x", "a": 1.0}, "name": "t"}]);
        assert_eq!(
            score_calls(Some(&right), &expected),
            CallScore {
                exact: true,
                tool_selection: true,
                args_matched: 2,
                args_predicted: 2,
                args_expected: 2
            }
        );
        let half = json!([{"name": "t", "arguments": {"a": 1, "b": "y", "c": 3}}]);
        let s = score_calls(Some(&half), &expected);
        assert!(!s.exact && s.tool_selection);
        assert_eq!(
            (s.args_matched, s.args_predicted, s.args_expected),
            (1, 3, 2)
        );
        let wrong_tool = json!([{"name": "u", "arguments": {"a": 1}}]);
        let s = score_calls(Some(&wrong_tool), &expected);
        assert!(!s.tool_selection && s.args_matched == 0);
        // Not JSON: nothing right, the expected arguments still count.
        assert_eq!(score_calls(None, &expected).args_expected, 2);
        // `[]` for `[]` is exact.
        assert!(score_calls(Some(&json!([])), &[]).exact);
        assert!(!score_calls(Some(&json!([])), &expected).tool_selection);
    }

    fn schema() -> Vec<ToolSchema> {
        let tools = json!([{"name": "set_timer", "parameters": {
            "minutes": {"type": "integer", "required": true},
            "unit": {"type": "string", "required": false, "enum": ["s", "min"]},
            "loud": {"type": "boolean"}}}]);
        schemas(&tools, &["setTimer".to_string()])
    }

    #[test]
    fn validity_follows_the_schemas() {
        let tools = schema();
        let ok = |v: Value| validate_calls(Some(&v), &tools);
        assert_eq!(ok(json!([])), Ok(()));
        assert_eq!(
            ok(
                json!([{"name": "setTimer", "arguments": {"minutes": 5, "unit": "s", "loud": true}}])
            ),
            Ok(())
        );
        let err = |v: Value| ok(v).unwrap_err();
        assert!(err(json!({"name": "setTimer"})).contains("not an array"));
        assert!(err(json!([{"name": "set_timer", "arguments": {}}])).contains("not a listed tool"));
        assert!(err(json!([{"name": "setTimer"}])).contains("no \"arguments\""));
        assert!(err(json!([{"name": "setTimer", "arguments": {}}]))
            .contains("required argument \"minutes\""));
        assert!(
            err(json!([{"name": "setTimer", "arguments": {"minutes": 5.5}}]))
                .contains("not integer")
        );
        assert!(
            err(json!([{"name": "setTimer", "arguments": {"minutes": 5, "x": 1}}]))
                .contains("undeclared")
        );
        assert!(
            err(json!([{"name": "setTimer", "arguments": {"minutes": 5, "unit": "h"}}]))
                .contains("enum")
        );
        assert_eq!(validate_calls(None, &tools), Err("not JSON".into()));
    }

    #[test]
    fn auroc_is_the_mann_whitney_statistic() {
        assert_eq!(
            auroc(&[0.9, 0.8, 0.2, 0.1], &[true, true, false, false]),
            Some(1.0)
        );
        assert_eq!(
            auroc(&[0.1, 0.2, 0.8, 0.9], &[true, true, false, false]),
            Some(0.0)
        );
        assert_eq!(auroc(&[0.5, 0.5], &[true, false]), Some(0.5));
        // One of the four right/wrong pairs is ordered wrongly.
        assert_eq!(
            auroc(&[0.9, 0.3, 0.4, 0.1], &[true, true, false, false]),
            Some(0.75)
        );
        assert_eq!(auroc(&[0.9, 0.3], &[true, true]), None);
    }

    #[test]
    fn calibration_bins_and_ece() {
        let scores = [0.95, 0.95, 0.15, 1.0];
        let correct = [true, false, false, true];
        let bins = reliability(&scores, &correct, 10);
        assert_eq!(bins.len(), 10);
        assert_eq!(bins[9].count, 3, "1.0 falls in the last bin");
        assert!((bins[9].accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(bins[1].count, 1);
        // |2/3 - 0.9667| * 3 + |0 - 0.15| * 1, over 4.
        let want = ((2.0 / 3.0 - (0.95 + 0.95 + 1.0) / 3.0f64).abs() * 3.0 + 0.15) / 4.0;
        assert!((ece(&bins) - want).abs() < 1e-12);
        assert_eq!(ece(&reliability(&[], &[], 10)), 0.0);
    }

    #[test]
    fn the_curve_and_the_threshold_for_a_precision() {
        let scores = [0.9, 0.8, 0.8, 0.4, 0.2];
        let correct = [true, true, false, true, false];
        let curve = precision_coverage(&scores, &correct);
        let pts: Vec<(f64, f64, f64)> = curve
            .iter()
            .map(|p| (p.threshold, p.coverage, p.precision))
            .collect();
        assert_eq!(
            pts,
            vec![
                (0.9, 0.2, 1.0),
                (0.8, 0.6, 2.0 / 3.0),
                (0.4, 0.8, 0.75),
                (0.2, 1.0, 0.6)
            ]
        );
        assert_eq!(threshold_for_precision(&curve, 0.7).unwrap().threshold, 0.4);
        assert_eq!(threshold_for_precision(&curve, 1.0).unwrap().threshold, 0.9);
        assert!(threshold_for_precision(&curve[1..], 1.0).is_none());
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(
            (quantile(&v, 0.5), quantile(&v, 0.95), quantile(&v, 0.0)),
            (2.0, 4.0, 1.0)
        );
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
