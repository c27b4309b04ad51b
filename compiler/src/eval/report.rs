//! The report of `needlec eval`: every figure ([`assemble`]), the table on stdout
//! ([`Report::table`]) and the CI gates ([`Gates::check`]). `--json` writes [`Report`] as is.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;
use serde_json::Value;

use super::metrics::{self, Bin, CallScore, CurvePoint};
use super::{BadLine, Dataset, EvalOptions, Outcome, RunConfig, Setting};

/// Name of the per-tool row for examples whose answer is `[]`.
pub const NO_CALL: &str = "(no call)";

/// Everything `needlec eval` measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub data: String,
    pub checkpoint: String,
    /// The base configuration's options.
    pub fold: &'static str,
    pub weights: String,
    pub max_gen_len: usize,
    pub max_query_tokens: Option<usize>,
    /// `--grammar`: `reference` or `strict`.
    pub grammar: &'static str,
    /// Examples evaluated.
    pub examples: usize,
    pub bad_lines: Vec<BadLine>,
    pub warnings: Vec<String>,
    /// Exact match of the calls as JSON, after name restoration.
    pub accuracy: f64,
    /// The same tools called (as a multiset).
    pub tool_selection: f64,
    /// Micro-averaged over `(tool, key, value)` argument triples.
    pub argument_precision: f64,
    pub argument_recall: f64,
    /// Share of outputs that are valid calls under the tool schemas.
    pub valid: f64,
    /// Examples the engine refused (e.g. a query over `--max-query-tokens` with `--fold none`).
    pub errors: usize,
    pub per_tool: Vec<ToolAccuracy>,
    pub latency_ms: Latency,
    pub confidence: ConfidenceReport,
    pub comparisons: Vec<Comparison>,
    pub results: Vec<ExampleResult>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ToolAccuracy {
    /// A tool named in the expected answers, or [`NO_CALL`].
    pub tool: String,
    pub examples: usize,
    pub correct: usize,
    pub accuracy: f64,
}

/// Per call, greedy decode only (the confidence's extra encoder pass excluded).
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConfidenceReport {
    /// The signal that is the confidence (v1: `needle_runtime::confidence::CONFIDENCE_SIGNAL`;
    /// Needle 3: `confidence_head`).
    pub signal: &'static str,
    /// Examples with an output (refused queries have no confidence).
    pub examples: usize,
    pub auroc: Option<f64>,
    /// Expected calibration error over 10 equal-width bins.
    pub ece: f64,
    pub reliability: Vec<Bin>,
    pub curve: Vec<CurvePoint>,
    pub target: Option<TargetPrecision>,
    /// Every candidate signal's AUROC, best first.
    pub candidates: Vec<Candidate>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    pub signal: &'static str,
    pub auroc: Option<f64>,
    pub ece: f64,
}

/// With `--target-precision`: the threshold that reaches it with the most coverage.
#[derive(Clone, Debug, Serialize)]
pub struct TargetPrecision {
    pub target: f64,
    /// `None` when no threshold reaches the target.
    pub threshold: Option<f64>,
    pub coverage: Option<f64>,
    pub precision: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// `KEY=VALUE` as given.
    pub setting: String,
    pub fold: &'static str,
    pub weights: String,
    pub grammar: &'static str,
    /// The compared configuration's exact-match accuracy.
    pub accuracy: f64,
    /// Share of examples with byte-identical outputs.
    pub agreement: f64,
    pub disagreements: Vec<Disagreement>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Disagreement {
    pub line: usize,
    pub query: String,
    pub base: String,
    pub other: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExampleResult {
    pub line: usize,
    pub query: String,
    pub expected: Value,
    /// The output text (`None` when the engine refused the query; see `error`).
    pub output: Option<String>,
    pub error: Option<String>,
    pub exact: bool,
    pub tool_selection: bool,
    pub valid: bool,
    /// Why the output is not a valid call, when it is not.
    pub invalid: Option<String>,
    pub confidence: Option<f64>,
    pub signals: Option<BTreeMap<&'static str, f64>>,
    pub latency_ms: f64,
}

fn output_text(o: &Outcome) -> String {
    match &o.output {
        Ok(text) => text.clone(),
        Err(e) => format!("error: {e}"),
    }
}

fn parsed(o: &Outcome) -> Option<Value> {
    o.output
        .as_ref()
        .ok()
        .and_then(|t| serde_json::from_str(t).ok())
}

fn score(o: &Outcome, expected: &[Value]) -> CallScore {
    metrics::score_calls(parsed(o).as_ref(), expected)
}

/// Builds the report from every configuration's outcomes (in example order).
pub fn assemble(
    opts: &EvalOptions,
    config: RunConfig,
    dataset: &Dataset,
    base: &[Outcome],
    compared: &[(Setting, RunConfig, Vec<Outcome>)],
    warnings: Vec<String>,
) -> Report {
    let schemas: Vec<Vec<metrics::ToolSchema>> = dataset
        .tool_sets
        .iter()
        .map(|set| {
            let normalized: Value =
                serde_json::from_str(&set.normalized_json).unwrap_or(Value::Null);
            let names: Vec<String> = set.name_map.iter().map(|(_, o)| o.clone()).collect();
            metrics::schemas(&normalized, &names)
        })
        .collect();
    let n = dataset.examples.len();
    let mut results = Vec::with_capacity(n);
    let (mut exact, mut selected, mut valid) = (0, 0, 0);
    let (mut matched, mut predicted, mut expected_args) = (0, 0, 0);
    let mut per_tool: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (p, o) in dataset.examples.iter().zip(base) {
        let s = score(o, &p.example.answers);
        let validity = metrics::validate_calls(parsed(o).as_ref(), &schemas[p.set]);
        exact += usize::from(s.exact);
        selected += usize::from(s.tool_selection);
        valid += usize::from(validity.is_ok());
        matched += s.args_matched;
        predicted += s.args_predicted;
        expected_args += s.args_expected;
        let mut tools: Vec<String> = p
            .example
            .answers
            .iter()
            .map(|a| {
                a.get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("(unnamed)")
                    .to_string()
            })
            .collect();
        if tools.is_empty() {
            tools.push(NO_CALL.into());
        }
        tools.sort();
        tools.dedup();
        for tool in tools {
            let entry = per_tool.entry(tool).or_default();
            entry.0 += 1;
            entry.1 += usize::from(s.exact);
        }
        results.push(ExampleResult {
            line: p.example.line,
            query: p.example.query.clone(),
            expected: Value::Array(p.example.answers.clone()),
            output: o.output.as_ref().ok().cloned(),
            error: o.output.as_ref().err().cloned(),
            exact: s.exact,
            tool_selection: s.tool_selection,
            valid: validity.is_ok(),
            invalid: validity.err(),
            confidence: o.confidence.as_ref().map(|c| f64::from(c.value)),
            signals: o
                .confidence
                .as_ref()
                .map(|c| c.signals.iter().map(|&(k, v)| (k, f64::from(v))).collect()),
            latency_ms: o.latency_ms,
        });
    }
    let mut latencies: Vec<f64> = base.iter().map(|o| o.latency_ms).collect();
    latencies.sort_by(f64::total_cmp);
    let latency_ms = Latency {
        mean: latencies.iter().sum::<f64>() / n.max(1) as f64,
        p50: metrics::quantile(&latencies, 0.5),
        p95: metrics::quantile(&latencies, 0.95),
        max: latencies.last().copied().unwrap_or(0.0),
    };
    let confidence = confidence_report(&results, base, opts.target_precision);
    let comparisons = compared
        .iter()
        .map(|(setting, cfg, outcomes)| {
            let mut disagreements = Vec::new();
            let mut right = 0;
            for ((p, b), o) in dataset.examples.iter().zip(base).zip(outcomes) {
                right += usize::from(score(o, &p.example.answers).exact);
                if b.output != o.output {
                    disagreements.push(Disagreement {
                        line: p.example.line,
                        query: p.example.query.clone(),
                        base: output_text(b),
                        other: output_text(o),
                    });
                }
            }
            Comparison {
                setting: setting.to_string(),
                fold: cfg.fold.name(),
                weights: cfg.weights.to_string(),
                grammar: cfg.grammar.name(),
                accuracy: metrics::ratio(right, n),
                agreement: metrics::ratio(n - disagreements.len(), n),
                disagreements,
            }
        })
        .collect();
    Report {
        data: opts.data.display().to_string(),
        checkpoint: opts.checkpoint.display().to_string(),
        fold: config.fold.name(),
        weights: config.weights.to_string(),
        max_gen_len: opts.max_gen_len,
        max_query_tokens: opts.max_query_tokens,
        grammar: opts.grammar.name(),
        examples: n,
        bad_lines: dataset.bad_lines.clone(),
        warnings,
        accuracy: metrics::ratio(exact, n),
        tool_selection: metrics::ratio(selected, n),
        argument_precision: metrics::ratio(matched, predicted),
        argument_recall: metrics::ratio(matched, expected_args),
        valid: metrics::ratio(valid, n),
        errors: base.iter().filter(|o| o.output.is_err()).count(),
        per_tool: per_tool
            .into_iter()
            .map(|(tool, (examples, correct))| ToolAccuracy {
                tool,
                examples,
                correct,
                accuracy: metrics::ratio(correct, examples),
            })
            .collect(),
        latency_ms,
        confidence,
        comparisons,
        results,
    }
}

fn confidence_report(
    results: &[ExampleResult],
    base: &[Outcome],
    target: Option<f64>,
) -> ConfidenceReport {
    let scored: Vec<(&super::Scored, bool)> = base
        .iter()
        .zip(results)
        .filter_map(|(o, r)| o.confidence.as_ref().map(|c| (c, r.exact)))
        .collect();
    let correct: Vec<bool> = scored.iter().map(|s| s.1).collect();
    let values = |name: &str| -> Vec<f64> {
        scored
            .iter()
            .map(|(s, _)| {
                let v = s.signals.iter().find(|(k, _)| *k == name).map(|&(_, v)| v);
                f64::from(v.unwrap_or(0.0))
            })
            .collect()
    };
    // Every output of a run has the same signals (one model generation).
    let names: Vec<&'static str> = scored
        .first()
        .map(|(s, _)| s.signals.iter().map(|&(k, _)| k).collect())
        .unwrap_or_default();
    let signal = scored
        .first()
        .map_or(needle_runtime::confidence::CONFIDENCE_SIGNAL, |(s, _)| {
            s.signal
        });
    let mut candidates: Vec<Candidate> = names
        .iter()
        .map(|name| {
            let v = values(name);
            Candidate {
                signal: name,
                auroc: metrics::auroc(&v, &correct),
                ece: metrics::ece(&metrics::reliability(&v, &correct, 10)),
            }
        })
        .collect();
    candidates.sort_by(|a, b| b.auroc.unwrap_or(-1.0).total_cmp(&a.auroc.unwrap_or(-1.0)));
    let chosen = values(signal);
    let reliability = metrics::reliability(&chosen, &correct, 10);
    let curve = metrics::precision_coverage(&chosen, &correct);
    let target = target.map(|t| {
        let hit = metrics::threshold_for_precision(&curve, t);
        TargetPrecision {
            target: t,
            threshold: hit.map(|p| p.threshold),
            coverage: hit.map(|p| p.coverage),
            precision: hit.map(|p| p.precision),
        }
    });
    ConfidenceReport {
        signal,
        examples: scored.len(),
        auroc: metrics::auroc(&chosen, &correct),
        ece: metrics::ece(&reliability),
        reliability,
        curve,
        target,
        candidates,
    }
}

/// The `--min-*` thresholds of CI.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gates {
    pub min_accuracy: Option<f64>,
    pub min_agreement: Option<f64>,
    pub min_valid: Option<f64>,
}

impl Gates {
    /// One line per figure that misses its threshold, saying by how much.
    pub fn check(&self, report: &Report) -> Vec<String> {
        let mut missed = Vec::new();
        let mut gate = |what: &str, value: f64, min: Option<f64>, flag: &str| {
            if let Some(min) = min {
                if value < min {
                    missed.push(format!(
                        "{what} {} is below {flag} {} by {}",
                        pct(value),
                        pct(min),
                        pct(min - value)
                    ));
                }
            }
        };
        gate(
            "accuracy",
            report.accuracy,
            self.min_accuracy,
            "--min-accuracy",
        );
        gate(
            "valid-call share",
            report.valid,
            self.min_valid,
            "--min-valid",
        );
        for c in &report.comparisons {
            gate(
                &format!("agreement with {}", c.setting),
                c.agreement,
                self.min_agreement,
                "--min-agreement",
            );
        }
        missed
    }
}

/// A share as a percentage with one decimal... or more when it matters (`0.05%`).
pub fn pct(v: f64) -> String {
    let p = v * 100.0;
    if p != 0.0 && p.abs() < 0.1 {
        format!("{p:.3}%")
    } else {
        format!("{p:.1}%")
    }
}

fn opt3(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3}"))
}

impl Report {
    /// The readable summary for stdout.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let w = &mut t;
        let _ = writeln!(
            w,
            "needlec eval: {} examples from {} ({} bad line(s) skipped)",
            self.examples,
            self.data,
            self.bad_lines.len()
        );
        let _ = writeln!(
            w,
            "checkpoint {}  --fold {}  --weights {}  --max-gen-len {}{}",
            self.checkpoint,
            self.fold,
            self.weights,
            self.max_gen_len,
            if self.grammar == "reference" {
                String::new()
            } else {
                format!("  --grammar {}", self.grammar)
            }
        );
        let _ = writeln!(w);
        let rows = [
            ("exact-match accuracy", pct(self.accuracy)),
            ("tool-selection accuracy", pct(self.tool_selection)),
            ("argument precision", pct(self.argument_precision)),
            ("argument recall", pct(self.argument_recall)),
            ("valid calls", pct(self.valid)),
            ("refused queries", self.errors.to_string()),
            (
                "latency per call (ms)",
                format!(
                    "mean {:.2}  p50 {:.2}  p95 {:.2}  max {:.2}",
                    self.latency_ms.mean,
                    self.latency_ms.p50,
                    self.latency_ms.p95,
                    self.latency_ms.max
                ),
            ),
        ];
        for (k, v) in rows {
            let _ = writeln!(w, "  {k:<26} {v}");
        }
        let c = &self.confidence;
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "confidence ({}): AUROC {}  ECE {:.3}  over {} outputs",
            c.signal,
            opt3(c.auroc),
            c.ece,
            c.examples
        );
        if let Some(t) = &c.target {
            match (t.threshold, t.coverage, t.precision) {
                (Some(th), Some(cov), Some(p)) => {
                    let _ = writeln!(
                        w,
                        "  target precision {}: threshold {th:.4} (precision {}, coverage {}); pass it as --escalate-below",
                        pct(t.target),
                        pct(p),
                        pct(cov)
                    );
                }
                _ => {
                    let _ = writeln!(
                        w,
                        "  target precision {}: no threshold reaches it",
                        pct(t.target)
                    );
                }
            }
        }
        let _ = writeln!(w, "  {:<18} {:>7} {:>7}", "candidate", "AUROC", "ECE");
        for cand in &c.candidates {
            let _ = writeln!(
                w,
                "  {:<18} {:>7} {:>7.3}",
                cand.signal,
                opt3(cand.auroc),
                cand.ece
            );
        }
        let _ = writeln!(w);
        let _ = writeln!(w, "  {:<24} {:>8} {:>9}", "tool", "examples", "accuracy");
        for row in &self.per_tool {
            let _ = writeln!(
                w,
                "  {:<24} {:>8} {:>9}",
                row.tool,
                row.examples,
                pct(row.accuracy)
            );
        }
        for cmp in &self.comparisons {
            let _ = writeln!(w);
            let _ = writeln!(
                w,
                "compare {} (--fold {} --weights {}): agreement {} ({} disagreement(s)), accuracy {}",
                cmp.setting,
                cmp.fold,
                cmp.weights,
                pct(cmp.agreement),
                cmp.disagreements.len(),
                pct(cmp.accuracy)
            );
            for d in cmp.disagreements.iter().take(10) {
                let _ = writeln!(w, "  line {}: {:?}", d.line, d.query);
                let _ = writeln!(w, "    base:  {}", d.base);
                let _ = writeln!(w, "    other: {}", d.other);
            }
            if cmp.disagreements.len() > 10 {
                let _ = writeln!(
                    w,
                    "  ... {} more (all in the --json report)",
                    cmp.disagreements.len() - 10
                );
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_keep_small_figures_visible() {
        assert_eq!(pct(0.956), "95.6%");
        assert_eq!(pct(0.0004), "0.040%");
        assert_eq!(pct(0.0), "0.0%");
    }
}
