//! `needlec eval --html`: one self-contained page (inline CSS and SVG, no script, nothing
//! fetched) with the headline figures, the reliability diagram, the precision/coverage curve,
//! per-tool accuracy and the comparison table. Inline SVG in HTML needs no namespace URL, so
//! the page holds no URL at all.

use std::fmt::Write;

use super::metrics::{Bin, CurvePoint};
use super::report::{pct, Report};

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:70em}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}\
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}\
figure{display:inline-block;margin:1em 2em 1em 0;vertical-align:top}figcaption{font-weight:600}\
.miss{color:#b00}code{background:#f5f5f5;padding:0 .2em}";

/// The page's Content Security Policy: nothing may be fetched (only the inline style applies),
/// so a report opened in a browser never touches the network, even if a value shown in it
/// looked like markup.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'";

/// The whole page.
pub fn page(r: &Report) -> String {
    let mut h = String::new();
    let w = &mut h;
    let _ = write!(
        w,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\"><title>needlec eval: {}</title><style>{STYLE}</style></head><body>\n",
        escape(&r.data)
    );
    let _ = writeln!(w, "<h1>needlec eval</h1>");
    let _ = writeln!(
        w,
        "<p><code>{}</code> on <code>{}</code>: {} examples, {} bad line(s); <code>--fold {}</code> <code>--weights {}</code> <code>--max-gen-len {}</code></p>",
        escape(&r.checkpoint),
        escape(&r.data),
        r.examples,
        r.bad_lines.len(),
        r.fold,
        escape(&r.weights),
        r.max_gen_len
    );
    for warning in &r.warnings {
        let _ = writeln!(w, "<p class=\"miss\">warning: {}</p>", escape(warning));
    }
    let _ = writeln!(w, "<table><tr><th>figure</th><th>value</th></tr>");
    let rows = [
        ("exact-match accuracy", pct(r.accuracy)),
        ("tool-selection accuracy", pct(r.tool_selection)),
        ("argument precision", pct(r.argument_precision)),
        ("argument recall", pct(r.argument_recall)),
        ("valid calls", pct(r.valid)),
        ("refused queries", r.errors.to_string()),
        (
            "latency per call, mean / p50 / p95 (ms)",
            format!(
                "{:.2} / {:.2} / {:.2}",
                r.latency_ms.mean, r.latency_ms.p50, r.latency_ms.p95
            ),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(w, "<tr><td>{k}</td><td class=\"n\">{v}</td></tr>");
    }
    let _ = writeln!(w, "</table>");

    let c = &r.confidence;
    let _ = writeln!(
        w,
        "<h2>Confidence</h2><p>The confidence is the <code>{}</code> signal: AUROC {}, expected calibration error {:.3}, over {} outputs.</p>",
        c.signal,
        c.auroc.map_or("-".into(), |a| format!("{a:.3}")),
        c.ece,
        c.examples
    );
    if let Some(t) = &c.target {
        let _ = match (t.threshold, t.coverage) {
            (Some(th), Some(cov)) => writeln!(
                w,
                "<p>Target precision {}: threshold <b>{th:.4}</b> (coverage {}).</p>",
                pct(t.target),
                pct(cov)
            ),
            _ => writeln!(
                w,
                "<p class=\"miss\">Target precision {}: no threshold reaches it.</p>",
                pct(t.target)
            ),
        };
    }
    let _ = writeln!(
        w,
        "<figure><figcaption>Reliability diagram</figcaption>{}</figure>",
        reliability_svg(&c.reliability)
    );
    let _ = writeln!(
        w,
        "<figure><figcaption>Precision / coverage</figcaption>{}</figure>",
        curve_svg(&c.curve)
    );
    let _ = writeln!(
        w,
        "<table><tr><th>candidate signal</th><th>AUROC</th><th>ECE</th></tr>"
    );
    for cand in &c.candidates {
        let _ = writeln!(
            w,
            "<tr><td>{}{}</td><td class=\"n\">{}</td><td class=\"n\">{:.3}</td></tr>",
            cand.signal,
            if cand.signal == c.signal {
                " (chosen)"
            } else {
                ""
            },
            cand.auroc.map_or("-".into(), |a| format!("{a:.3}")),
            cand.ece
        );
    }
    let _ = writeln!(w, "</table>");

    let _ = writeln!(w, "<h2>Per-tool accuracy</h2>");
    let _ = writeln!(w, "{}", per_tool_svg(r));
    let _ = writeln!(
        w,
        "<table><tr><th>tool</th><th>examples</th><th>right</th><th>accuracy</th></tr>"
    );
    for t in &r.per_tool {
        let _ = writeln!(
            w,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            escape(&t.tool),
            t.examples,
            t.correct,
            pct(t.accuracy)
        );
    }
    let _ = writeln!(w, "</table>");

    let _ = writeln!(w, "<h2>Comparisons</h2>");
    if r.comparisons.is_empty() {
        let _ = writeln!(
            w,
            "<p>None (<code>--compare KEY=VALUE</code> adds one).</p>"
        );
    } else {
        let _ = writeln!(
            w,
            "<table><tr><th>setting</th><th>fold</th><th>weights</th><th>accuracy</th><th>agreement</th><th>disagreements</th></tr>"
        );
        for cmp in &r.comparisons {
            let _ = writeln!(
                w,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                escape(&cmp.setting),
                cmp.fold,
                escape(&cmp.weights),
                pct(cmp.accuracy),
                pct(cmp.agreement),
                cmp.disagreements.len()
            );
        }
        let _ = writeln!(w, "</table>");
        for cmp in r.comparisons.iter().filter(|c| !c.disagreements.is_empty()) {
            let _ = writeln!(
                w,
                "<h3>Disagreements with {}</h3><table><tr><th>line</th><th>query</th><th>base</th><th>{}</th></tr>",
                escape(&cmp.setting),
                escape(&cmp.setting)
            );
            for d in &cmp.disagreements {
                let _ = writeln!(
                    w,
                    "<tr><td class=\"n\">{}</td><td>{}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
                    d.line,
                    escape(&d.query),
                    escape(&d.base),
                    escape(&d.other)
                );
            }
            let _ = writeln!(w, "</table>");
        }
    }
    let _ = writeln!(w, "</body></html>");
    h
}

/// Plot area: `SIZE` square with a margin for the axes.
const SIZE: f64 = 260.0;
const M: f64 = 40.0;

fn x(v: f64) -> f64 {
    M + v.clamp(0.0, 1.0) * SIZE
}

/// `v` in `[lo, 1]` to the vertical pixel.
fn y(v: f64, lo: f64) -> f64 {
    M + SIZE - ((v - lo) / (1.0 - lo)).clamp(0.0, 1.0) * SIZE
}

fn frame(w: &mut String, x_label: &str, y_label: &str, y_lo: f64) {
    let _ = write!(
        w,
        "<rect x=\"{M}\" y=\"{M}\" width=\"{SIZE}\" height=\"{SIZE}\" fill=\"none\" stroke=\"#888\"/>"
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let yv = y_lo + f * (1.0 - y_lo);
        let _ = write!(
            w,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{f:.2}</text><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{yv:.2}</text>",
            x(f),
            M + SIZE + 14.0,
            M - 4.0,
            y(yv, y_lo) + 3.0
        );
    }
    let _ = write!(
        w,
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{x_label}</text><text x=\"12\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\" transform=\"rotate(-90 12 {:.1})\">{y_label}</text>",
        M + SIZE / 2.0,
        M + SIZE + 30.0,
        M + SIZE / 2.0,
        M + SIZE / 2.0
    );
}

/// Bars: each bin's accuracy over its confidence range; the diagonal is perfect calibration.
pub fn reliability_svg(bins: &[Bin]) -> String {
    let mut w = String::new();
    let side = SIZE + 2.0 * M;
    let _ = write!(
        w,
        "<svg width=\"{side}\" height=\"{side}\" viewBox=\"0 0 {side} {side}\" role=\"img\" aria-label=\"reliability diagram\">"
    );
    frame(&mut w, "confidence", "accuracy", 0.0);
    for b in bins.iter().filter(|b| b.count > 0) {
        let _ = write!(
            w,
            "<rect class=\"bin\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#4a7fb5\" opacity=\"0.8\"><title>{:.1}-{:.1}: {} examples, accuracy {:.3}, mean confidence {:.3}</title></rect>",
            x(b.lo) + 1.0,
            y(b.accuracy, 0.0),
            (x(b.hi) - x(b.lo) - 2.0).max(1.0),
            y(0.0, 0.0) - y(b.accuracy, 0.0),
            b.lo,
            b.hi,
            b.count,
            b.accuracy,
            b.confidence
        );
    }
    let _ = write!(
        w,
        "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#c33\" stroke-dasharray=\"4 3\"/></svg>",
        x(0.0),
        y(0.0, 0.0),
        x(1.0),
        y(1.0, 0.0)
    );
    w
}

/// Precision against coverage as the threshold falls; the vertical axis starts at the lowest
/// precision reached, rounded down to a tenth.
pub fn curve_svg(curve: &[CurvePoint]) -> String {
    let mut w = String::new();
    let side = SIZE + 2.0 * M;
    let lowest = curve.iter().map(|p| p.precision).fold(1.0f64, f64::min);
    let lo = (lowest * 10.0).floor().min(9.0) / 10.0;
    let _ = write!(
        w,
        "<svg width=\"{side}\" height=\"{side}\" viewBox=\"0 0 {side} {side}\" role=\"img\" aria-label=\"precision coverage curve\">"
    );
    frame(&mut w, "coverage", "precision", lo);
    let points: Vec<String> = curve
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.coverage), y(p.precision, lo)))
        .collect();
    let _ = write!(
        w,
        "<polyline class=\"curve\" points=\"{}\" fill=\"none\" stroke=\"#4a7fb5\" stroke-width=\"2\"/></svg>",
        points.join(" ")
    );
    w
}

/// One horizontal bar per tool.
pub fn per_tool_svg(r: &Report) -> String {
    let row = 18.0;
    let label = 180.0;
    let bar = 300.0;
    let height = row * r.per_tool.len() as f64 + 10.0;
    let width = label + bar + 60.0;
    let mut w = String::new();
    let _ = write!(
        w,
        "<svg width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"per-tool accuracy\">"
    );
    for (i, t) in r.per_tool.iter().enumerate() {
        let top = 5.0 + row * i as f64;
        let _ = write!(
            w,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text><rect x=\"{label}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#4a7fb5\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{} ({})</text>",
            label - 6.0,
            top + 12.0,
            escape(&t.tool),
            t.accuracy * bar,
            row - 4.0,
            label + t.accuracy * bar + 4.0,
            top + 12.0,
            pct(t.accuracy),
            t.examples
        );
    }
    let _ = write!(w, "</svg>");
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::metrics;

    #[test]
    fn escaping_and_svg_shapes() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let bins = metrics::reliability(&[0.95, 0.15], &[true, false], 10);
        let svg = reliability_svg(&bins);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(
            svg.matches("class=\"bin\"").count(),
            2,
            "one bar per non-empty bin"
        );
        let curve = metrics::precision_coverage(&[0.9, 0.5], &[true, false]);
        let svg = curve_svg(&curve);
        assert!(
            svg.contains("<polyline class=\"curve\" points=\"170.0,40.0 300.0,300.0\""),
            "{svg}"
        );
        assert!(!svg.contains("http"));
    }
}
