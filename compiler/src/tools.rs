//! The app tool list: Needle format and OpenAI-style definitions (spec section 3).
//!
//! The model was trained on tool lists in the reference's exact text form, so the list is parsed
//! and re-serialized with [`needle_runtime::pyjson`] (Python's `json.loads` + compact
//! `json.dumps`), and each tool's `name` is rewritten to snake_case in place.
//!
//! # Snake case
//!
//! [`snake_case`] is the rule `tests/fixtures/golden/tools_norm.json` pins, written as the regex
//! passes it is equivalent to:
//!
//! 1. `.` and `-` become `_`;
//! 2. `([A-Z]+)([A-Z][a-z])` -> `\1_\2` (an acronym ends before a capitalized word:
//!    `HTTPServer` -> `HTTP_Server`);
//! 3. `([a-z0-9])([A-Z])` -> `\1_\2` (`setTimer` -> `set_Timer`, `v2Api` -> `v2_Api`);
//! 4. lower-case (Unicode, like `str.lower`), runs of `_` collapse to one, `_` stripped from both
//!    ends (`__dunder__x` -> `dunder_x`).
//!
//! Character classes are ASCII as in Python's `re`; other characters (spaces included) pass
//! through untouched apart from lower-casing.
//!
//! # OpenAI-style definitions
//!
//! An element is converted to the Needle form when it is either
//! * wrapped: it has no `name` but a `function` object (`{"type": "function", "function":
//!   {...}}`), whose content is then used; or
//! * bare JSON Schema: its `parameters` has `"type": "object"` (the string). A Needle tool can
//!   never look like this, since there every value of `parameters` is a parameter spec object.
//!
//! The Needle tool built from a definition has, in this order: `name`; `description` if the
//! definition has one; `parameters`, holding each of `properties` in order, its schema object
//! copied key by key, then `required` set to whether the key is listed in the schema's
//! `required` array (an existing `required` member of the property is overwritten in place,
//! as a Python dict assignment would). Other members of the definition (`strict`, ...) are
//! dropped, as are `required` entries naming no property. A schema without `properties` gives
//! no parameters. Lists may mix both formats element by element.

use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use needle_runtime::pyjson::{self, Value};

/// The normalized tool list and what the grammar and post-processing need from it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSet {
    /// What the tokenizer encodes after the `<tools>` token.
    pub normalized_json: String,
    /// `(snake_name, original_name)` in tool order; what `needle_runtime::output` maps back.
    pub name_map: Vec<(String, String)>,
    pub tools: Vec<ToolSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolSignature {
    /// The snake_case name the model sees.
    pub name: String,
    pub original_name: String,
    /// The parameter keys in order; the grammar constrains argument keys to these.
    pub param_keys: Vec<String>,
}

/// Where a tool list came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Text handed to [`parse_tools`] directly.
    Text,
    /// `--tools '[...]'`.
    Inline,
    /// `--tools path`.
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Text => write!(f, "tool list"),
            Origin::Inline => write!(f, "inline --tools JSON"),
            Origin::File(path) => write!(f, "tool list file {}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ToolsError {
    // The I/O error is part of the message, not a `source()`: a chain printer would repeat it.
    #[error("cannot read {}: {cause}; check the --tools path (inline JSON must start with '[')", .path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "tool list file {} is larger than the {} MiB a tool list may take (one that fits the \
         model's 1024-token encoder budget is a few KB): it is not a tool list, or not a file \
         (an endless device or pipe?)",
        .path.display(), MAX_TOOLS_BYTES >> 20
    )]
    TooLarge { path: PathBuf },
    #[error(
        "{origin} is empty (`[]`): the model would then invent a tool to call; give at least one \
         tool"
    )]
    Empty { origin: Origin },
    #[error("{} is not valid UTF-8 (first bad byte at offset {offset}); save it as UTF-8", .path.display())]
    InvalidUtf8 { path: PathBuf, offset: usize },
    #[error(
        "{origin}: invalid JSON at line {line}, column {column}: {message}; fix the JSON there"
    )]
    Json {
        origin: Origin,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{origin}: the top-level value is {found}, but a tool list must be a JSON array; wrap the tools in [ ... ]")]
    NotAnArray { origin: Origin, found: &'static str },
    #[error("{origin}: tool at index {index} is {found}, but each tool must be an object like {{\"name\": ..., \"description\": ..., \"parameters\": {{...}}}}")]
    ToolNotObject {
        origin: Origin,
        index: usize,
        found: &'static str,
    },
    #[error("{origin}: tool at index {index} has no \"name\"; give it one (OpenAI-style tools need {{\"type\": \"function\", \"function\": {{\"name\": ...}}}})")]
    MissingName { origin: Origin, index: usize },
    #[error(
        "{origin}: tool at index {index} has a \"name\" that is {found}; the name must be a string"
    )]
    NameNotString {
        origin: Origin,
        index: usize,
        found: &'static str,
    },
    #[error("{origin}: tool at index {index} has the name {name:?}, which is empty in snake_case; use a name with letters or digits")]
    EmptyName {
        origin: Origin,
        index: usize,
        name: String,
    },
    #[error("{origin}: tools at index {first_index} ({first_name:?}) and index {index} ({name:?}) both become {snake:?} in snake_case; rename one of them")]
    DuplicateName {
        origin: Origin,
        first_index: usize,
        first_name: String,
        index: usize,
        name: String,
        snake: String,
    },
    #[error("{origin}: tool at index {index}: {message}")]
    InvalidTool {
        origin: Origin,
        index: usize,
        message: String,
    },
}

/// The most bytes a `--tools` file may have. A list must fit the encoder's 1024-token budget,
/// a few KB of JSON even pretty-printed; this bound only keeps endless inputs from exhausting
/// memory, and the token budget itself is checked while tokenizing.
pub const MAX_TOOLS_BYTES: u64 = 4 << 20;

/// Parses and normalizes a tool list given as JSON text.
pub fn parse_tools(json_text: &str) -> Result<ToolSet, ToolsError> {
    parse_from(json_text, Origin::Text)
}

/// The `--tools` argument: inline JSON when it starts with `[` after leading whitespace, else a
/// file path. An app's tool list may not be empty (a list in eval data may).
pub fn load_tools_arg(arg: &str) -> Result<ToolSet, ToolsError> {
    let (set, origin) = load_tools_arg_any(arg)?;
    if set.tools.is_empty() {
        return Err(ToolsError::Empty { origin });
    }
    Ok(set)
}

fn load_tools_arg_any(arg: &str) -> Result<(ToolSet, Origin), ToolsError> {
    let (text, origin) = tools_arg_text(arg)?;
    Ok((parse_from(&text, origin.clone())?, origin))
}

/// The `--tools` argument's JSON text as given (inline, or the file's, bounded, without a BOM),
/// checked to be a valid tool list. Needle 3 renders the list into its prompt as written.
pub fn load_tools_arg_text(arg: &str) -> Result<String, ToolsError> {
    let (text, origin) = tools_arg_text(arg)?;
    let set = parse_from(&text, origin.clone())?;
    if set.tools.is_empty() {
        return Err(ToolsError::Empty { origin });
    }
    Ok(text)
}

fn tools_arg_text(arg: &str) -> Result<(String, Origin), ToolsError> {
    if arg.trim_start().starts_with('[') {
        return Ok((arg.to_string(), Origin::Inline));
    }
    let path = Path::new(arg);
    let read_err = |cause| ToolsError::Read {
        path: path.to_path_buf(),
        cause,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_TOOLS_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_TOOLS_BYTES {
        return Err(ToolsError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let text = String::from_utf8(bytes).map_err(|e| ToolsError::InvalidUtf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })?;
    // Editors on Windows like to prepend a BOM; it carries no meaning in a JSON file.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text).to_string();
    Ok((text, Origin::File(path.to_path_buf())))
}

fn parse_from(text: &str, origin: Origin) -> Result<ToolSet, ToolsError> {
    let value = pyjson::parse(text).map_err(|e| ToolsError::Json {
        origin: origin.clone(),
        line: e.line,
        column: e.column,
        message: e.message,
    })?;
    let Value::Array(items) = value else {
        return Err(ToolsError::NotAnArray {
            origin,
            found: value.kind(),
        });
    };
    let mut tools = Vec::with_capacity(items.len());
    let mut signatures: Vec<ToolSignature> = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let mut tool = to_needle_tool(item, index, &origin)?;
        let original = match tool.get("name") {
            None => return Err(ToolsError::MissingName { origin, index }),
            Some(Value::Str(s)) => s.clone(),
            Some(other) => {
                return Err(ToolsError::NameNotString {
                    origin,
                    index,
                    found: other.kind(),
                })
            }
        };
        let snake = snake_case(&original);
        if snake.is_empty() {
            return Err(ToolsError::EmptyName {
                origin,
                index,
                name: original,
            });
        }
        if let Some(first_index) = signatures.iter().position(|s| s.name == snake) {
            return Err(ToolsError::DuplicateName {
                origin,
                first_index,
                first_name: signatures[first_index].original_name.clone(),
                index,
                name: original,
                snake,
            });
        }
        let param_keys = match tool.get("parameters") {
            None => Vec::new(),
            Some(Value::Object(members)) => members.iter().map(|(k, _)| k.clone()).collect(),
            Some(other) => {
                return Err(ToolsError::InvalidTool {
                    origin,
                    index,
                    message: format!(
                        "\"parameters\" is {}, but it must be an object mapping each parameter \
                         name to its spec",
                        other.kind()
                    ),
                })
            }
        };
        tool.set("name", Value::Str(snake.clone()));
        signatures.push(ToolSignature {
            name: snake,
            original_name: original,
            param_keys,
        });
        tools.push(tool);
    }
    Ok(ToolSet {
        normalized_json: pyjson::to_compact_string(&Value::Array(tools)),
        name_map: signatures
            .iter()
            .map(|s| (s.name.clone(), s.original_name.clone()))
            .collect(),
        tools: signatures,
    })
}

/// Returns the element in Needle form (see the module docs for when and how it converts).
fn to_needle_tool(item: Value, index: usize, origin: &Origin) -> Result<Value, ToolsError> {
    if !matches!(item, Value::Object(_)) {
        return Err(ToolsError::ToolNotObject {
            origin: origin.clone(),
            index,
            found: item.kind(),
        });
    }
    let def = match (item.get("name"), item.get("function")) {
        (None, Some(f @ Value::Object(_))) => f.clone(),
        _ => item,
    };
    let schema = match def.get("parameters") {
        Some(p) if p.get("type").and_then(Value::as_str) == Some("object") => p,
        _ => return Ok(def),
    };
    let invalid = |message: String| ToolsError::InvalidTool {
        origin: origin.clone(),
        index,
        message,
    };
    let required: Vec<&str> = match schema.get("required") {
        None => Vec::new(),
        Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
        Some(other) => {
            return Err(invalid(format!(
                "the JSON Schema \"required\" is {}, but it must be an array of property names",
                other.kind()
            )))
        }
    };
    let mut params = Vec::new();
    match schema.get("properties") {
        None => {}
        Some(Value::Object(props)) => {
            for (key, prop) in props {
                if !matches!(prop, Value::Object(_)) {
                    return Err(invalid(format!(
                        "property {key:?} has a schema that is {}; each property needs an object \
                         such as {{\"type\": \"string\", \"description\": ...}}",
                        prop.kind()
                    )));
                }
                let mut spec = prop.clone();
                spec.set("required", Value::Bool(required.contains(&key.as_str())));
                params.push((key.clone(), spec));
            }
        }
        Some(other) => {
            return Err(invalid(format!(
                "the JSON Schema \"properties\" is {}, but it must be an object",
                other.kind()
            )))
        }
    }
    let mut tool = Vec::new();
    if let Some(name) = def.get("name") {
        tool.push(("name".to_string(), name.clone()));
    }
    if let Some(description) = def.get("description") {
        tool.push(("description".to_string(), description.clone()));
    }
    tool.push(("parameters".to_string(), Value::Object(params)));
    Ok(Value::Object(tool))
}

/// The reference's snake_case rule (module docs, "Snake case").
pub fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name
        .chars()
        .map(|c| if c == '.' || c == '-' { '_' } else { c })
        .collect();

    // Pass 2. With re.sub's left-to-right, non-overlapping scan, `[A-Z]+[A-Z][a-z]` matches
    // exactly where a maximal uppercase run of length >= 2 is followed by a lowercase letter,
    // and splits before the run's last letter.
    let mut split_acronyms = Vec::with_capacity(chars.len() + 4);
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_uppercase() {
            let run = chars[i..]
                .iter()
                .take_while(|c| c.is_ascii_uppercase())
                .count();
            let end = i + run;
            let followed_by_lower = chars.get(end).is_some_and(|c| c.is_ascii_lowercase());
            if run >= 2 && followed_by_lower {
                split_acronyms.extend_from_slice(&chars[i..end - 1]);
                split_acronyms.push('_');
                split_acronyms.push(chars[end - 1]);
            } else {
                split_acronyms.extend_from_slice(&chars[i..end]);
            }
            i = end;
        } else {
            split_acronyms.push(chars[i]);
            i += 1;
        }
    }

    // Pass 3: matches cannot overlap, since an uppercase letter never starts one.
    let mut split_words = String::with_capacity(split_acronyms.len() + 4);
    for (j, &c) in split_acronyms.iter().enumerate() {
        if j > 0 {
            let prev = split_acronyms[j - 1];
            if c.is_ascii_uppercase() && (prev.is_ascii_lowercase() || prev.is_ascii_digit()) {
                split_words.push('_');
            }
        }
        split_words.push(c);
    }

    let lower = split_words.to_lowercase();
    let mut out = String::with_capacity(lower.len());
    for c in lower.chars() {
        if c == '_' && (out.is_empty() || out.ends_with('_')) {
            continue;
        }
        out.push(c);
    }
    while out.ends_with('_') {
        out.pop();
    }
    out
}
