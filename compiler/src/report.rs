//! `needlec build --report`: where a library's bytes go (flash) and what its workspace holds
//! (RAM), for firmware teams sizing a build.
//!
//! The bytes are read back from the emitted object, not estimated: every symbol's size (or,
//! where the format records none, as in COFF, the distance to the next symbol of its section),
//! grouped by what the symbol is. The generators name everything `PREFIX_kind...`, so the name
//! says the component: `model_w<N>_embedding`, `model_w<N>_enc_<L>_...` (a layer's weights and
//! their scales), `model_c<N>_fold_...` (the folded tools side), `tokenize_*`, `grammar_*`,
//! `output_*` tables, `model_k<N>_*` kernels. Bytes of a section no symbol covers (alignment)
//! are reported as such, so the components add up to the sections' total.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};
use serde::Serialize;

/// One component of the library and its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Component {
    pub name: String,
    pub bytes: u64,
}

/// A region of the workspace (regions of different phases of a call may share bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkspaceRegion {
    pub name: String,
    pub offset: usize,
    pub bytes: usize,
}

/// What `--report` prints and writes as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct SizeReport {
    /// The build options, as given on the command line (resolved defaults included).
    pub options: BTreeMap<String, String>,
    /// Bytes of the object file.
    pub object_bytes: u64,
    /// Bytes of its code and read-only data (what goes to flash), by component, largest first.
    pub components: Vec<Component>,
    pub workspace_bytes: usize,
    /// In offset order.
    pub workspace: Vec<WorkspaceRegion>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read back the emitted object to size it: {0}")]
pub struct ReportError(String);

/// The components of `object`, whose exported and internal symbols start with `prefix_`.
pub fn components(object: &[u8], prefix: &str) -> Result<Vec<Component>, ReportError> {
    let file = object::File::parse(object).map_err(|e| ReportError(e.to_string()))?;
    let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
    for section in file.sections() {
        let kind = section.kind();
        let code = kind == SectionKind::Text;
        if !(code || is_data(kind)) || section.size() == 0 {
            continue;
        }
        let mut syms: Vec<(u64, u64, String)> = file
            .symbols()
            .filter(|s| s.section_index() == Some(section.index()))
            .filter(|s| {
                matches!(
                    s.kind(),
                    SymbolKind::Text | SymbolKind::Data | SymbolKind::Unknown
                )
            })
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_string())))
            .collect();
        syms.sort();
        syms.dedup_by_key(|s| s.0);
        let (start, end) = (section.address(), section.address() + section.size());
        let mut covered = 0;
        for (i, (addr, size, name)) in syms.iter().enumerate() {
            let next = syms.get(i + 1).map_or(end, |s| s.0);
            let bytes = if *size > 0 { *size } else { next - addr };
            covered += bytes;
            *by_name.entry(component_of(name, prefix, code)).or_default() += bytes;
        }
        let rest = (end - start).saturating_sub(covered);
        if rest > 0 {
            *by_name
                .entry("alignment and unnamed bytes".into())
                .or_default() += rest;
        }
    }
    let mut out: Vec<Component> = by_name
        .into_iter()
        .map(|(name, bytes)| Component { name, bytes })
        .collect();
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
    Ok(out)
}

fn is_data(kind: SectionKind) -> bool {
    matches!(
        kind,
        SectionKind::ReadOnlyData
            | SectionKind::ReadOnlyDataWithRel
            | SectionKind::ReadOnlyString
            | SectionKind::Data
    )
}

/// The component a symbol belongs to (see the module docs for the naming).
fn component_of(symbol: &str, prefix: &str, code: bool) -> String {
    // Mach-O prepends an underscore to every C symbol.
    let name = symbol
        .strip_prefix('_')
        .filter(|n| n.starts_with(prefix))
        .unwrap_or(symbol);
    let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('_')) else {
        return if code { "other code" } else { "other data" }.into();
    };
    if code {
        return if rest.starts_with("model_k") {
            "code: model kernels".into()
        } else {
            "code: tokenizer, grammar, output and entry points".into()
        };
    }
    if let Some(model) = rest.strip_prefix("model_") {
        // `w<N>_...` or `c<N>_...`: drop the numbering.
        let what = model
            .trim_start_matches(['w', 'c'])
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start_matches('_');
        if what == "embedding" {
            return "embedding (token table, tied logits)".into();
        }
        if what.starts_with("fold_enc") {
            return "folded tools side: encoder keys and values".into();
        }
        if what.starts_with("fold_dec") {
            return "folded tools side: decoder cross-attention keys and values".into();
        }
        for (side, label) in [("enc_", "encoder layer"), ("dec_", "decoder layer")] {
            if let Some(layer) = what.strip_prefix(side) {
                let n: String = layer.chars().take_while(char::is_ascii_digit).collect();
                if !n.is_empty() {
                    return format!("{label} {n:>2}: weights, norms, gates");
                }
            }
        }
        return "other model constants (RoPE tables, final norm)".into();
    }
    for (kind, label) in [
        ("tokenize_", "tokenizer tables"),
        ("grammar_", "grammar tables"),
        ("output_", "output tables (detokenizer, names)"),
        ("tool_", "output tables (detokenizer, names)"),
    ] {
        if rest.starts_with(kind) {
            return label.into();
        }
    }
    "other data".into()
}

impl SizeReport {
    /// The report as a table for a terminal.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let flash: u64 = self.components.iter().map(|c| c.bytes).sum();
        let _ = writeln!(s, "build options:");
        for (k, v) in &self.options {
            let _ = writeln!(s, "  {k:<18} {v}");
        }
        let _ = writeln!(
            s,
            "\ncode and read-only data: {} bytes (object file {} bytes)",
            group(flash),
            group(self.object_bytes)
        );
        let _ = writeln!(s, "  {:<62} {:>13} {:>7}", "component", "bytes", "share");
        for c in &self.components {
            let share = 100.0 * c.bytes as f64 / flash.max(1) as f64;
            let _ = writeln!(s, "  {:<62} {:>13} {:>6.1}%", c.name, group(c.bytes), share);
        }
        let _ = writeln!(
            s,
            "\nworkspace: {} bytes (regions of different phases of a call share bytes)",
            group(self.workspace_bytes as u64)
        );
        let _ = writeln!(s, "  {:<62} {:>13} {:>13}", "region", "offset", "bytes");
        for r in &self.workspace {
            let _ = writeln!(
                s,
                "  {:<62} {:>13} {:>13}",
                r.name,
                group(r.offset as u64),
                group(r.bytes as u64)
            );
        }
        s
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes") + "\n"
    }
}

/// `12345678` as `12,345,678`.
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_name_their_components() {
        let c = |s: &str, code| component_of(s, "app", code);
        assert_eq!(
            c("app_model_w1_embedding", false),
            "embedding (token table, tied logits)"
        );
        assert_eq!(
            c("_app_model_w12_enc_3_q_proj_scales", false),
            "encoder layer  3: weights, norms, gates"
        );
        assert_eq!(
            c("app_model_c40_dec_11_cross_norm_plus1", false),
            "decoder layer 11: weights, norms, gates"
        );
        assert_eq!(
            c("app_model_c7_fold_dec_0_cross_k", false),
            "folded tools side: decoder cross-attention keys and values"
        );
        assert_eq!(
            c("app_model_c15_rope", false),
            "other model constants (RoPE tables, final norm)"
        );
        assert_eq!(c("app_grammar_allowed_ids", false), "grammar tables");
        assert_eq!(
            c("app_tool_names", false),
            "output tables (detokenizer, names)"
        );
        assert_eq!(c("app_model_k_3_matmul", true), "code: model kernels");
        assert_eq!(
            c("app_call", true),
            "code: tokenizer, grammar, output and entry points"
        );
        assert_eq!(c("memcpy", true), "other code");
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(23017944), "23,017,944");
    }
}
