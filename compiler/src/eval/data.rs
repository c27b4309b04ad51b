//! Evaluation data: JSON Lines in Needle's fine-tuning format, one example an object:
//! `query` (text), `tools` (the example's tool list: a JSON array, or a JSON string holding
//! one; optional when `--tools` gives the app's list) and `answers` (the expected calls: a list,
//! `[]` when no tool fits; a JSON string holding the list is accepted too). Blank lines are
//! skipped; every other line that is not such an object is a [`BadLine`] with its number.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::EvalError;

/// One example, as read.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// 1-based line number in the data file.
    pub line: usize,
    pub query: String,
    /// The example's tool list as JSON text; `None` when the line has none.
    pub tools: Option<String>,
    /// The expected calls.
    pub answers: Vec<Value>,
    /// Whether the line gave `answers` (a line without, read for `finetune --distill`, has none
    /// and is labelled by the stock model).
    pub labelled: bool,
}

/// A line that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BadLine {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for BadLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Reads the data file as UTF-8 text.
pub fn read(path: &Path) -> Result<String, EvalError> {
    let bytes = std::fs::read(path).map_err(|cause| EvalError::DataRead {
        path: path.into(),
        cause,
    })?;
    String::from_utf8(bytes).map_err(|e| EvalError::DataUtf8 {
        path: path.into(),
        offset: e.utf8_error().valid_up_to(),
    })
}

/// Parses every line; `tools_given` says whether `--tools` supplies the list, so a line
/// without `tools` is fine.
pub fn parse(text: &str, tools_given: bool) -> (Vec<Example>, Vec<BadLine>) {
    parse_lines(text, tools_given, true)
}

/// [`parse`]; with `answers_required` false a line without `answers` is read with none
/// (`needlec finetune --distill` labels such lines itself).
pub fn parse_lines(
    text: &str,
    tools_given: bool,
    answers_required: bool,
) -> (Vec<Example>, Vec<BadLine>) {
    let mut examples = Vec::new();
    let mut bad = Vec::new();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line, tools_given, answers_required) {
            Ok((query, tools, answers)) => examples.push(Example {
                line: i + 1,
                query,
                tools,
                labelled: answers.is_some(),
                answers: answers.unwrap_or_default(),
            }),
            Err(message) => bad.push(BadLine {
                line: i + 1,
                message,
            }),
        }
    }
    (examples, bad)
}

type Parsed = (String, Option<String>, Option<Vec<Value>>);

fn parse_line(line: &str, tools_given: bool, answers_required: bool) -> Result<Parsed, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| {
        format!(
            "not JSON ({e}); each line must be one object like {{\"query\": ..., \"tools\": [...], \"answers\": [...]}}"
        )
    })?;
    let Value::Object(obj) = value else {
        return Err("not a JSON object; each line must be one object with \"query\", \"tools\" and \"answers\"".into());
    };
    let query = match obj.get("query") {
        Some(Value::String(q)) => q.clone(),
        Some(_) => return Err("\"query\" is not a string".into()),
        None => return Err("no \"query\"".into()),
    };
    let tools = match obj.get("tools") {
        None | Some(Value::Null) if tools_given => None,
        None | Some(Value::Null) => {
            return Err("no \"tools\"; give the example's tool list or pass --tools".into())
        }
        Some(v @ Value::Array(_)) => Some(v.to_string()),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Array(_)) => Some(s.clone()),
            _ => return Err("\"tools\" is a string that does not hold a JSON array".into()),
        },
        Some(_) => return Err("\"tools\" must be a JSON array (or a string holding one)".into()),
    };
    let answers = match obj.get("answers") {
        Some(Value::Array(a)) => Some(a.clone()),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Array(a)) => Some(a),
            _ => return Err("\"answers\" is a string that does not hold a JSON array".into()),
        },
        Some(_) => return Err("\"answers\" must be a list of calls ([] when no tool fits)".into()),
        None if !answers_required => None,
        None => return Err("no \"answers\" (use [] when no tool fits)".into()),
    };
    Ok((query, tools, answers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_lines_bad_lines_and_their_numbers() {
        let text = concat!(
            r#"{"query": "a", "tools": [{"name": "t"}], "answers": []}"#,
            "\n\n",
            "not json\n",
            r#"{"query": "b", "tools": "[{\"name\": \"t\"}]", "answers": "[{\"name\": \"t\"}]"}"#,
            "\n",
            r#"{"query": "c", "answers": []}"#,
            "\n",
            r#"{"tools": [], "answers": []}"#,
            "\n",
            r#"{"query": "d", "tools": [], "answers": {}}"#,
            "\n",
            "[1]\n",
        );
        let (examples, bad) = parse(text, false);
        assert_eq!(examples.len(), 2);
        assert_eq!((examples[0].line, examples[1].line), (1, 4));
        assert_eq!(examples[1].answers.len(), 1);
        assert_eq!(examples[1].tools.as_deref(), Some(r#"[{"name": "t"}]"#));
        let lines: Vec<usize> = bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![3, 5, 6, 7, 8]);
        assert!(bad[0].message.starts_with("not JSON"), "{}", bad[0]);
        assert!(bad[1].message.contains("--tools"));
        assert!(bad[2].message.contains("no \"query\""));
        assert!(bad[3].message.contains("\"answers\" must be a list"));
        assert_eq!(bad[0].to_string().split(':').next(), Some("line 3"));
        // With --tools, a line without its own list is fine.
        let (examples, bad) = parse(r#"{"query": "c", "answers": []}"#, true);
        assert_eq!((examples.len(), bad.len()), (1, 0));
        assert_eq!(examples[0].tools, None);
    }
}
