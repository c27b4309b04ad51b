//! The module graph of `needlec` is the one the README's "Which module may use which" table
//! states: every `crate::` (and, in `main.rs`, `needlec::`) import of a module's non-test code
//! must be allowed by its row, and every module must have a row. A new import that breaks the
//! layering, or a new module without a place in it, fails here with the file and line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The words in backticks of `cell`, up to the first `(` (what follows it is commentary).
fn ticked(cell: &str) -> Vec<String> {
    let cell = cell.split('(').next().unwrap_or("");
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(|m| m.trim_end_matches('/').trim_end_matches(".rs").to_string())
        .collect()
}

/// module -> the modules it may use, from the README's table.
fn allowed() -> BTreeMap<String, BTreeSet<String>> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("### Which module may use which")
        .nth(1)
        .expect("the README has a \"Which module may use which\" section");
    let mut table = BTreeMap::new();
    for line in section.lines().skip_while(|l| !l.starts_with('|')) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').collect();
        let (Some(modules), Some(uses)) = (cells.get(1), cells.get(2)) else {
            continue;
        };
        let uses: BTreeSet<String> = ticked(uses).into_iter().collect();
        for m in ticked(modules) {
            table.insert(m, uses.clone());
        }
    }
    assert!(
        !table.is_empty(),
        "no table rows found in the README section"
    );
    table
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The crate modules `line` refers to through `prefix` (`crate::` or `needlec::`).
fn referenced<'a>(line: &'a str, prefix: &str) -> Vec<&'a str> {
    line.match_indices(prefix)
        .filter(|(at, _)| {
            // Not the tail of a longer path (`super::crate::` cannot occur, `xcrate::` can).
            !line[..*at].ends_with(|c: char| c.is_alphanumeric() || c == '_')
        })
        .map(|(at, _)| {
            let rest = &line[at + prefix.len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|m| !m.is_empty())
        .collect()
}

#[test]
fn imports_follow_the_readme_module_graph() {
    let allowed = allowed();
    let src = root().join("compiler/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" {
            continue;
        }
        let Some(may_use) = allowed.get(&module) else {
            problems.push(format!(
                "compiler/src/{}: module `{module}` has no row in the README's table",
                rel.display()
            ));
            continue;
        };
        let prefix = if module == "main" {
            "needlec::"
        } else {
            "crate::"
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            // Unit tests may chain stages; by convention they close the file.
            if code.starts_with("#[cfg(test)]") {
                break;
            }
            if code.starts_with("//") {
                continue;
            }
            let used_here: BTreeSet<&str> = referenced(line, prefix).into_iter().collect();
            for used in used_here {
                if used != module && !may_use.contains(used) {
                    problems.push(format!(
                        "compiler/src/{}:{}: `{module}` uses `{used}`, which its README row does not allow",
                        rel.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The README's layout section names every source module of the crates (a newcomer finds each
/// file there): each `.rs` file's name (a `mod.rs` by its folder, as `name/`) in backticks.
#[test]
fn the_readme_layout_names_every_module() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let layout = readme
        .split("## Layout")
        .nth(1)
        .and_then(|s| s.split("### Which module may use which").next())
        .expect("the README has a \"Layout\" section");
    let mut missing = Vec::new();
    for krate in ["compiler", "ir", "runtime", "targets", "test-support"] {
        let src = root().join(krate).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        files.sort();
        for file in files {
            let stem = file.file_stem().unwrap().to_string_lossy().to_string();
            let named = match stem.as_str() {
                // The crate itself: its row names it.
                "lib" => continue,
                "mod" => {
                    let dir = file.parent().unwrap().file_name().unwrap();
                    vec![format!("`{}/`", dir.to_string_lossy())]
                }
                _ => vec![
                    format!("`{stem}`"),
                    format!("`{stem}/`"),
                    format!("`{stem}.rs`"),
                ],
            };
            if !named.iter().any(|n| layout.contains(n.as_str())) {
                missing.push(file.strip_prefix(root()).unwrap().display().to_string());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the README's layout section does not name: {}",
        missing.join(", ")
    );
}

#[test]
fn the_graph_reader_sees_imports() {
    assert_eq!(
        referenced(
            "use crate::abi::{CType, write_header}; crate::fold::x",
            "crate::"
        ),
        ["abi", "fold"]
    );
    assert!(referenced("let xcrate::y = 1;", "crate::").is_empty());
    assert_eq!(
        ticked("the stages: `load`, `emit/` (`x`)"),
        ["load", "emit"]
    );
    let table = allowed();
    assert!(table["abi"].is_empty());
    assert!(table["materialize"].contains("fold"));
    assert!(!table["codegen"].contains("emit"));
}
