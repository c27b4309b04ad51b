//! The strict schema grammar (`--grammar strict`, docs/spec.md "The strict grammar").
//!
//! Where the reference grammar ([`crate::grammar`]) only keeps tool names and argument keys on
//! their tries, this one guarantees that the generated text is a call list that is valid under the
//! tool schemas, and that it is complete within the token budget.
//!
//! # The language
//!
//! After the `<tool_call>` token (forced first), the text is, with no whitespace outside strings
//! except one optional space before the list (the tokenizer's dummy prefix: the model was trained
//! on `<tool_call>` followed by `▁[`):
//!
//! ```text
//! list   := "[" "]" | "[" call ("," call)* "]"
//! call   := "{\"name\":\"" NAME "\",\"arguments\":" object(params of NAME) "}"
//! object := "{" (KEY ":" value) ("," KEY ":" value)* "}"   keys in declaration order, optional
//!           ones may be left out, required ones may not; "{}" when nothing is required
//! value  := string | integer | number | boolean | null | enum literal | array | object
//! ```
//!
//! Strings are JSON strings (no raw control characters; `\uXXXX` escapes, but no surrogate
//! halves, which Python's `json.dumps` would write back unpaired); integers are
//! `-?(0|[1-9][0-9]{0,17})` (so they fit an i64); numbers add an optional fraction of at most 17
//! digits and no exponent; an `enum` allows exactly the compact JSON text of each listed scalar;
//! arrays hold any number of items of their `items` schema. This is the form of every answer in
//! the fine-tuning data (Python's `json.dumps` with compact separators, keys in the order the
//! tool declares them).
//!
//! # Tables
//!
//! The language is regular (the schemas nest to a fixed depth), so it is compiled into one
//! deterministic character automaton: states with sorted character-range edges. Every state has a
//! *class*. A state built from a shared template (a string, an integer, a number, a boolean, a
//! null: the same local states wherever the value occurs) has the class of its place in the
//! template; every other state (literals, the name and key tries, enum tries) is a class of its
//! own. For every class the tokens are split once, at construction, into three sets, the first
//! and last stored as sorted lists (as XGrammar does):
//! - accepted: the token's whole text stays inside the template instance (or, for a class of its
//!   own, is walked entirely): allowed wherever the class occurs;
//! - rejected (not stored): no state of the class can take it;
//! - dependent: the text leaves the template (a closing `"`, or the `,`/`}`/`]` after a number),
//!   so the answer depends on what follows this instance; these few are walked at run time.
//!
//! A decode step then costs the class's accepted list plus the walk of its dependent list.
//!
//! Termination: `need[s]`, the fewest tokens that take state `s` to a complete list, is computed
//! exactly at construction (breadth-first over the token transitions, backwards from the end).
//! A token is allowed only if the state it leads to needs no more tokens than the budget has left
//! after it, so the list is always closed in time; `max_need_after[s]` (the most any allowed token
//! can leave to do) tells when that filter can be skipped. When it cannot, the class's accepted
//! tokens are also stored grouped by the state they lead to (relative to the template instance),
//! so the filter looks at one `need` per group, not at each token.

use std::collections::VecDeque;

use crate::pyjson::{self, Value};

/// "No state": the text has left the language (only after a teacher-forced token).
pub const DEAD: u32 = u32::MAX;
/// The machine before the `<tool_call>` token.
pub const BEFORE_MARKER: u32 = u32::MAX - 1;
/// A need no token sequence meets.
pub const UNREACHABLE: u32 = u32::MAX;

/// What may follow a value in this language: the only characters a template exits on apart
/// from a string's closing quote.
const FOLLOW: [char; 3] = [',', '}', ']'];
/// Digits of an integer (and of a number's integer part): below 10^18, so it fits an i64.
const MAX_INT_DIGITS: usize = 18;
/// Digits of a number's fraction.
const MAX_FRACTION_DIGITS: usize = 17;

/// A parameter's schema as far as the strict grammar expresses it.
#[derive(Clone, Debug, PartialEq)]
pub enum Schema {
    String,
    Integer,
    Number,
    Boolean,
    Null,
    /// The exact compact JSON texts of the allowed values.
    Enum(Vec<String>),
    Array(Box<Schema>),
    Object(Vec<Property>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Property {
    pub key: String,
    pub required: bool,
    pub schema: Schema,
}

/// One tool as the strict grammar sees it: its snake_case name and its parameters in order.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSchema {
    pub name: String,
    pub params: Vec<Property>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StrictError {
    #[error(
        "tool {tool:?}, parameter {key:?}: {what}; the strict grammar expresses the types string, \
         integer, number, boolean, null, array (with \"items\") and object (with \"properties\"), \
         and \"enum\" lists of strings, numbers, booleans or null: change that parameter's \
         schema, or use --grammar reference"
    )]
    Unsupported {
        tool: String,
        key: String,
        what: String,
    },
    #[error("the normalized tool list is not a JSON array of tools: {0}")]
    NotAList(String),
}

/// Reads the schemas from the normalized tool list (Needle's format, as the encoder reads it).
/// `names` gives each tool's original name for error messages.
pub fn schemas(normalized_json: &str, names: &[String]) -> Result<Vec<ToolSchema>, StrictError> {
    let value = pyjson::parse(normalized_json).map_err(|e| StrictError::NotAList(e.message))?;
    let Value::Array(tools) = value else {
        return Err(StrictError::NotAList(value.kind().to_string()));
    };
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let Some(name) = tool.get("name").and_then(Value::as_str) else {
            return Err(StrictError::NotAList(format!(
                "tool {i} has no string name"
            )));
        };
        let shown = names.get(i).cloned().unwrap_or_else(|| name.to_string());
        let params = match tool.get("parameters") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(members)) => {
                let mut params = Vec::with_capacity(members.len());
                for (key, spec) in members {
                    let schema = schema_of(spec, &shown, key)?;
                    let required = spec.get("required") == Some(&Value::Bool(true));
                    params.push(Property {
                        key: key.clone(),
                        required,
                        schema,
                    });
                }
                params
            }
            Some(other) => {
                return Err(StrictError::Unsupported {
                    tool: shown,
                    key: String::new(),
                    what: format!("\"parameters\" is {}, not an object", other.kind()),
                })
            }
        };
        out.push(ToolSchema {
            name: name.to_string(),
            params,
        });
    }
    Ok(out)
}

fn unsupported(tool: &str, key: &str, what: String) -> StrictError {
    StrictError::Unsupported {
        tool: tool.to_string(),
        key: key.to_string(),
        what,
    }
}

/// The schema of one parameter (`key` is its path, `a.b` or `a[]` when nested).
fn schema_of(spec: &Value, tool: &str, key: &str) -> Result<Schema, StrictError> {
    if !matches!(spec, Value::Object(_)) {
        return Err(unsupported(
            tool,
            key,
            format!("the schema is {}, not an object", spec.kind()),
        ));
    }
    let ty = spec.get("type");
    if let Some(values) = spec.get("enum") {
        let Value::Array(values) = values else {
            return Err(unsupported(tool, key, "\"enum\" is not a list".into()));
        };
        let mut texts = Vec::new();
        for v in values {
            let fits = match (ty.and_then(Value::as_str), v) {
                (_, Value::Array(_) | Value::Object(_)) => {
                    return Err(unsupported(
                        tool,
                        key,
                        format!(
                            "the enum value {} is not a scalar",
                            pyjson::to_compact_string(v)
                        ),
                    ))
                }
                (None, _) => true,
                (Some("string"), Value::Str(_)) => true,
                (Some("integer"), Value::Int(_)) => true,
                (Some("number"), Value::Int(_) | Value::Float(_)) => true,
                (Some("boolean"), Value::Bool(_)) => true,
                (Some("null"), Value::Null) => true,
                _ => false,
            };
            let text = literal_text(v);
            if fits && !texts.contains(&text) {
                texts.push(text);
            }
        }
        if texts.is_empty() {
            return Err(unsupported(
                tool,
                key,
                "\"enum\" lists no value of the declared type".into(),
            ));
        }
        return Ok(Schema::Enum(texts));
    }
    let ty = match ty {
        Some(Value::Str(t)) => t.as_str(),
        Some(other) => {
            return Err(unsupported(
                tool,
                key,
                format!(
                    "the type {} is not one type name",
                    pyjson::to_compact_string(other)
                ),
            ))
        }
        None => return Err(unsupported(tool, key, "no \"type\" is declared".into())),
    };
    Ok(match ty {
        "string" => Schema::String,
        "integer" => Schema::Integer,
        "number" => Schema::Number,
        "boolean" => Schema::Boolean,
        "null" => Schema::Null,
        "array" => {
            let Some(items) = spec.get("items") else {
                return Err(unsupported(
                    tool,
                    key,
                    "an array without \"items\" (its items' type is needed)".into(),
                ));
            };
            Schema::Array(Box::new(schema_of(items, tool, &format!("{key}[]"))?))
        }
        "object" => {
            let Some(Value::Object(props)) = spec.get("properties") else {
                return Err(unsupported(
                    tool,
                    key,
                    "an object without \"properties\" (its keys are needed)".into(),
                ));
            };
            let required: Vec<&str> = match spec.get("required") {
                Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            let mut out = Vec::with_capacity(props.len());
            for (k, sub) in props {
                out.push(Property {
                    key: k.clone(),
                    required: required.contains(&k.as_str())
                        || sub.get("required") == Some(&Value::Bool(true)),
                    schema: schema_of(sub, tool, &format!("{key}.{k}"))?,
                });
            }
            Schema::Object(out)
        }
        other => {
            return Err(unsupported(
                tool,
                key,
                format!("the type {other:?} is not one the strict grammar expresses"),
            ))
        }
    })
}

/// A scalar's text as the model writes it: compact JSON, non-ASCII characters as they are.
fn literal_text(v: &Value) -> String {
    match v {
        Value::Str(s) => quoted(s),
        other => pyjson::to_compact_string(other),
    }
}

/// A JSON string literal escaping only what JSON requires.
pub fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One edge: characters `lo..=hi` lead to `to`; `exit` marks an edge that leaves its template
/// instance (its target depends on where the value occurs).
#[derive(Clone, Copy, Debug)]
struct Edge {
    lo: char,
    hi: char,
    to: u32,
    exit: bool,
}

/// The shared templates: each has a fixed number of local states, one class per local state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Template {
    String,
    Integer,
    Number,
    Boolean,
    Null,
}

impl Template {
    fn index(self) -> usize {
        self as usize
    }

    fn n_states(self) -> usize {
        match self {
            // entry, body, escape, \u + 4 hex (the second after a `d`)
            Template::String => 8,
            // entry, minus, zero, 18 digit counts
            Template::Integer => 3 + MAX_INT_DIGITS,
            // the integer's, a dot, 17 fraction digit counts
            Template::Number => 3 + MAX_INT_DIGITS + 1 + MAX_FRACTION_DIGITS,
            // entry, t r u e, f a l s e
            Template::Boolean => 10,
            // entry, n u l l
            Template::Null => 5,
        }
    }
}

struct Builder {
    edges: Vec<Vec<Edge>>,
    class: Vec<u32>,
    /// Template instance of a state, or `u32::MAX` for a state of its own class.
    inst: Vec<u32>,
    /// A template state whose value may end here (it exits on the characters that follow).
    exits_on_follow: Vec<bool>,
    n_classes: u32,
    n_insts: u32,
    template_class: [Option<u32>; 5],
}

impl Builder {
    fn state(&mut self) -> u32 {
        let class = self.n_classes;
        self.n_classes += 1;
        self.push(class, u32::MAX)
    }

    fn push(&mut self, class: u32, inst: u32) -> u32 {
        self.edges.push(Vec::new());
        self.class.push(class);
        self.inst.push(inst);
        self.exits_on_follow.push(false);
        (self.edges.len() - 1) as u32
    }

    fn edge(&mut self, from: u32, lo: char, hi: char, to: u32, exit: bool) {
        self.edges[from as usize].push(Edge { lo, hi, to, exit });
    }

    fn on(&mut self, from: u32, c: char, to: u32) {
        self.edge(from, c, c, to, false);
    }

    /// Copies `from`'s edges onto `to` (marked as exits when `exit`).
    fn copy_edges(&mut self, from: u32, to: u32, exit: bool) {
        let copied: Vec<Edge> = self.edges[from as usize]
            .iter()
            .map(|e| Edge { exit, ..*e })
            .collect();
        self.edges[to as usize].extend(copied);
    }

    /// A chain of own-class states spelling `text` from `from`; the last character leads to
    /// `to`.
    fn literal(&mut self, from: u32, text: &str, to: u32) {
        let chars: Vec<char> = text.chars().collect();
        let mut cur = from;
        for (i, &c) in chars.iter().enumerate() {
            let next = if i + 1 == chars.len() {
                to
            } else {
                self.state()
            };
            self.on(cur, c, next);
            cur = next;
        }
    }

    /// A trie of own-class states from `root`: each word's last character leads to its target.
    /// No word may be a prefix of another (each ends with a closing quote and what follows it).
    fn trie(&mut self, root: u32, words: &[(String, u32)]) {
        for (word, target) in words {
            let chars: Vec<char> = word.chars().collect();
            let mut cur = root;
            for (i, &c) in chars.iter().enumerate() {
                let last = i + 1 == chars.len();
                let existing = self.edges[cur as usize]
                    .iter()
                    .find(|e| e.lo == c && e.hi == c)
                    .map(|e| e.to);
                cur = match existing {
                    Some(next) if !last => next,
                    _ => {
                        let next = if last { *target } else { self.state() };
                        self.on(cur, c, next);
                        next
                    }
                };
            }
        }
    }

    /// A new instance of a shared template: its states, local edges, and the exits into
    /// `cont` (the state after the value). Returns the entry state (before the first character).
    fn template(&mut self, t: Template, cont: u32) -> u32 {
        let base_class = match self.template_class[t.index()] {
            Some(c) => c,
            None => {
                let c = self.n_classes;
                self.n_classes += t.n_states() as u32;
                self.template_class[t.index()] = Some(c);
                c
            }
        };
        let inst = self.n_insts;
        self.n_insts += 1;
        let s: Vec<u32> = (0..t.n_states() as u32)
            .map(|i| self.push(base_class + i, inst))
            .collect();
        let l = |b: &mut Builder, from: usize, lo: char, hi: char, to: usize| {
            b.edge(s[from], lo, hi, s[to], false)
        };
        let mut ends = Vec::new();
        match t {
            Template::String => {
                let (entry, body, esc, u1, u2d, u2, u3, u4) = (0, 1, 2, 3, 4, 5, 6, 7);
                l(self, entry, '"', '"', body);
                l(self, body, ' ', '!', body);
                l(self, body, '#', '[', body);
                l(self, body, ']', char::MAX, body);
                l(self, body, '\\', '\\', esc);
                self.edge(s[body], '"', '"', cont, true);
                for c in ['"', '\\', '/', 'b', 'f', 'n', 'r', 't'] {
                    l(self, esc, c, c, body);
                }
                l(self, esc, 'u', 'u', u1);
                // `\uD800`-`\uDFFF` are surrogate halves: after a `d`, only 0-7 may follow.
                for (lo, hi) in [('0', '9'), ('A', 'C'), ('E', 'F'), ('a', 'c'), ('e', 'f')] {
                    l(self, u1, lo, hi, u2);
                }
                l(self, u1, 'D', 'D', u2d);
                l(self, u1, 'd', 'd', u2d);
                l(self, u2d, '0', '7', u3);
                for (lo, hi) in [('0', '9'), ('A', 'F'), ('a', 'f')] {
                    l(self, u2, lo, hi, u3);
                    l(self, u3, lo, hi, u4);
                    l(self, u4, lo, hi, body);
                }
            }
            Template::Integer | Template::Number => {
                let (entry, minus, zero) = (0, 1, 2);
                let digit = |k: usize| 2 + k; // k digits read, 1..=18
                l(self, entry, '-', '-', minus);
                for from in [entry, minus] {
                    l(self, from, '0', '0', zero);
                    l(self, from, '1', '9', digit(1));
                }
                for k in 1..MAX_INT_DIGITS {
                    l(self, digit(k), '0', '9', digit(k + 1));
                }
                ends.push(zero);
                ends.extend((1..=MAX_INT_DIGITS).map(digit));
                if t == Template::Number {
                    let dot = 3 + MAX_INT_DIGITS;
                    let frac = |k: usize| dot + k; // k fraction digits, 1..=17
                    for &e in &ends.clone() {
                        l(self, e, '.', '.', dot);
                    }
                    l(self, dot, '0', '9', frac(1));
                    for k in 1..MAX_FRACTION_DIGITS {
                        l(self, frac(k), '0', '9', frac(k + 1));
                    }
                    ends.extend((1..=MAX_FRACTION_DIGITS).map(frac));
                }
            }
            Template::Boolean => {
                for (i, c) in "true".chars().enumerate() {
                    l(self, if i == 0 { 0 } else { i }, c, c, i + 1);
                }
                for (i, c) in "false".chars().enumerate() {
                    l(self, if i == 0 { 0 } else { 4 + i }, c, c, 5 + i);
                }
                ends.extend([4, 9]);
            }
            Template::Null => {
                for (i, c) in "null".chars().enumerate() {
                    l(self, i, c, c, i + 1);
                }
                ends.push(4);
            }
        }
        for e in ends {
            self.copy_edges(cont, s[e], true);
            self.exits_on_follow[s[e] as usize] = true;
        }
        s[0]
    }

    /// Fills `entry` (a fresh own-class state, before the value's first character) with the
    /// value of `schema`, followed by `cont`.
    fn value(&mut self, schema: &Schema, entry: u32, cont: u32) {
        match schema {
            Schema::String => self.shared(Template::String, entry, cont),
            Schema::Integer => self.shared(Template::Integer, entry, cont),
            Schema::Number => self.shared(Template::Number, entry, cont),
            Schema::Boolean => self.shared(Template::Boolean, entry, cont),
            Schema::Null => self.shared(Template::Null, entry, cont),
            Schema::Enum(texts) => {
                // A trie whose complete values continue as `cont` does.
                let mut ends = Vec::new();
                for text in texts {
                    let mut cur = entry;
                    for c in text.chars() {
                        let existing = self.edges[cur as usize]
                            .iter()
                            .find(|e| e.lo == c && e.hi == c && !e.exit)
                            .map(|e| e.to);
                        cur = match existing {
                            Some(next) => next,
                            None => {
                                let next = self.state();
                                self.on(cur, c, next);
                                next
                            }
                        };
                    }
                    if !ends.contains(&cur) {
                        ends.push(cur);
                    }
                }
                for e in ends {
                    self.copy_edges(cont, e, false);
                }
            }
            Schema::Array(items) => {
                let open = self.state();
                let sep = self.state();
                let item = self.state();
                self.on(entry, '[', open);
                self.on(sep, ',', item);
                self.on(sep, ']', cont);
                self.value(items, item, sep);
                self.copy_edges(item, open, false);
                self.on(open, ']', cont);
            }
            Schema::Object(props) => {
                let open = self.state();
                self.on(entry, '{', open);
                self.object(props, open, cont);
            }
        }
    }

    /// The entry of a shared template instance, reached from `entry` as the template's own
    /// entry is: `entry` takes a copy of its edges.
    fn shared(&mut self, t: Template, entry: u32, cont: u32) {
        let own = self.template(t, cont);
        self.copy_edges(own, entry, false);
    }

    /// The members of an object after its `{` (state `open`), then `}` leading to `cont`.
    fn object(&mut self, props: &[Property], open: u32, cont: u32) {
        let n = props.len();
        // sep[j]: after the value of key j.
        let sep: Vec<u32> = (0..n).map(|_| self.state()).collect();
        let entries: Vec<u32> = (0..n).map(|_| self.state()).collect();
        // Keys k >= from that may come next: up to and including the first required one.
        let candidates = |from: usize| -> Vec<usize> {
            let mut out = Vec::new();
            for (k, p) in props.iter().enumerate().skip(from) {
                out.push(k);
                if p.required {
                    break;
                }
            }
            out
        };
        let may_close = |from: usize| props.iter().skip(from).all(|p| !p.required);
        let keys = |b: &mut Builder, at: u32, from: usize, entries: &[u32]| {
            let words: Vec<(String, u32)> = candidates(from)
                .into_iter()
                .map(|k| (format!("{}:", quoted(&props[k].key)), entries[k]))
                .collect();
            b.trie(at, &words);
        };
        // Backwards, so that each value's continuation has its edges before the value copies
        // them.
        for j in (0..n).rev() {
            if j + 1 < n && !candidates(j + 1).is_empty() {
                let after_comma = self.state();
                self.on(sep[j], ',', after_comma);
                keys(self, after_comma, j + 1, &entries);
            }
            if may_close(j + 1) {
                self.on(sep[j], '}', cont);
            }
            self.value(&props[j].schema, entries[j], sep[j]);
        }
        keys(self, open, 0, &entries);
        if may_close(0) {
            self.on(open, '}', cont);
        }
    }
}

/// The strict grammar of one tool list over one vocabulary, as flat tables.
///
/// - States `0..n_states`; `start` is the state after `<tool_call>`, `accept` the complete list.
/// - `edge_start[s]..edge_start[s+1]` index the edges of state `s`, sorted by `edge_lo`; an edge
///   takes characters `edge_lo..=edge_hi` to `edge_to`.
/// - `class[s]`; for class `c`, `accepted[acc_start[c]..acc_start[c+1]]` and
///   `dependent[dep_start[c]..dep_start[c+1]]` are sorted token ids.
/// - `need[s]`: fewest tokens from `s` to `accept` ([`UNREACHABLE`] if none);
///   `max_need_after[s]`: the largest `need` any token allowed at `s` leads to.
/// - For the budget: each class's accepted tokens again, grouped by the state they lead to:
///   group `g` in `group_start[c]..group_start[c+1]` holds
///   `grouped[group_first[g]..group_first[g+1]]`, which lead to state `base[s] + group_to[g]`
///   from a state `s` of the class. `base[s]` is the first state of `s`'s template instance (a
///   template's states are numbered in a row, the same way in every instance), 0 for a state
///   of its own class (its `group_to` are absolute).
#[derive(Clone, Debug)]
pub struct StrictTables {
    pub start: u32,
    pub accept: u32,
    pub edge_start: Vec<u32>,
    pub edge_lo: Vec<u32>,
    pub edge_hi: Vec<u32>,
    pub edge_to: Vec<u32>,
    pub class: Vec<u32>,
    pub acc_start: Vec<u32>,
    pub accepted: Vec<u32>,
    pub dep_start: Vec<u32>,
    pub dependent: Vec<u32>,
    pub need: Vec<u32>,
    pub max_need_after: Vec<u32>,
    pub base: Vec<u32>,
    pub group_start: Vec<u32>,
    pub group_first: Vec<u32>,
    pub group_to: Vec<u32>,
    pub grouped: Vec<u32>,
    pub token_start: Vec<u32>,
    pub token_text: String,
    /// The `<tool_call>` token, forced first, and EOS, allowed only at `accept`.
    pub marker: u32,
    pub eos: u32,
}

/// How a token's text fares from a class's states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Accept,
    Reject,
    Dependent,
}

impl StrictTables {
    /// Compiles the grammar of `tools` over a vocabulary. `token_texts[id]` is each token's
    /// text as the reference grammar sees it; tokens with `usable[id]` false (control pieces,
    /// `<tool_call>`, `<tools>`, unknown, unused) and tokens with empty text are never allowed
    /// inside the list.
    pub fn new(
        token_texts: &[String],
        usable: &[bool],
        tools: &[ToolSchema],
        marker: u32,
        eos: u32,
    ) -> StrictTables {
        let mut b = Builder {
            edges: Vec::new(),
            class: Vec::new(),
            inst: Vec::new(),
            exits_on_follow: Vec::new(),
            n_classes: 0,
            n_insts: 0,
            template_class: [None; 5],
        };
        let start = b.state();
        let spaced = b.state();
        let open = b.state();
        let accept = b.state();
        let after_call = b.state();
        let call = b.state();
        b.on(start, ' ', spaced);
        b.on(start, '[', open);
        b.on(spaced, '[', open);
        b.on(after_call, ',', call);
        b.on(after_call, ']', accept);
        let mut names = Vec::with_capacity(tools.len());
        for tool in tools {
            let close = b.state();
            b.on(close, '}', after_call);
            let args_open = b.state();
            b.object(&tool.params, args_open, close);
            let after_name = b.state();
            b.literal(after_name, ",\"arguments\":{", args_open);
            let word = quoted(&tool.name);
            names.push((word[1..].to_string(), after_name));
        }
        let name_root = b.state();
        b.literal(call, "{\"name\":\"", name_root);
        b.trie(name_root, &names);
        b.on(open, ']', accept);
        b.copy_edges(call, open, false);

        let mut tables = StrictTables {
            start,
            accept,
            edge_start: vec![0],
            edge_lo: Vec::new(),
            edge_hi: Vec::new(),
            edge_to: Vec::new(),
            class: b.class.clone(),
            acc_start: vec![0],
            accepted: Vec::new(),
            dep_start: vec![0],
            dependent: Vec::new(),
            need: Vec::new(),
            max_need_after: Vec::new(),
            base: Vec::new(),
            group_start: vec![0],
            group_first: vec![0],
            group_to: Vec::new(),
            grouped: Vec::new(),
            token_start: vec![0],
            token_text: String::new(),
            marker,
            eos,
        };
        let mut exit_flags: Vec<Vec<bool>> = Vec::with_capacity(b.edges.len());
        for edges in &mut b.edges {
            edges.sort_by_key(|e| e.lo);
            for e in edges.iter() {
                tables.edge_lo.push(u32::from(e.lo));
                tables.edge_hi.push(u32::from(e.hi));
                tables.edge_to.push(e.to);
            }
            exit_flags.push(edges.iter().map(|e| e.exit).collect());
            tables.edge_start.push(tables.edge_lo.len() as u32);
        }
        for t in token_texts {
            tables.token_text.push_str(t);
            tables.token_start.push(tables.token_text.len() as u32);
        }

        // Tokens sorted by their first character, so a state's candidates are a few ranges.
        let mut by_first: Vec<(char, u32)> = token_texts
            .iter()
            .enumerate()
            .filter(|&(id, t)| !t.is_empty() && usable.get(id).copied().unwrap_or(false))
            .filter_map(|(id, t)| t.chars().next().map(|c| (c, id as u32)))
            .collect();
        by_first.sort_unstable();

        // One representative state per class.
        let n_classes = b.n_classes as usize;
        let mut rep = vec![u32::MAX; n_classes];
        for (s, &c) in b.class.iter().enumerate() {
            if rep[c as usize] == u32::MAX {
                rep[c as usize] = s as u32;
            }
        }
        for &s in &rep {
            let mut acc = Vec::new();
            let mut dep = Vec::new();
            if s != u32::MAX {
                let shared = b.inst[s as usize] != u32::MAX;
                let mut ranges: Vec<(char, char)> =
                    tables.edges(s).map(|(lo, hi, _)| (lo, hi)).collect();
                if shared && b.exits_on_follow[s as usize] {
                    ranges.extend(FOLLOW.iter().map(|&c| (c, c)));
                }
                for (lo, hi) in ranges {
                    let from = by_first.partition_point(|&(c, _)| c < lo);
                    for &(c, id) in &by_first[from..] {
                        if c > hi {
                            break;
                        }
                        match tables.classify(&b, &exit_flags, s, shared, tables.text(id)) {
                            Outcome::Accept => acc.push(id),
                            Outcome::Dependent => dep.push(id),
                            Outcome::Reject => {}
                        }
                    }
                }
            }
            acc.sort_unstable();
            acc.dedup();
            dep.sort_unstable();
            dep.dedup();
            tables.accepted.extend(acc);
            tables.acc_start.push(tables.accepted.len() as u32);
            tables.dependent.extend(dep);
            tables.dep_start.push(tables.dependent.len() as u32);
        }
        tables.compute_need();

        // Instance bases: a template's states are pushed in a row, entry first.
        let mut first_of_inst = vec![u32::MAX; b.n_insts as usize];
        for (st, &i) in b.inst.iter().enumerate() {
            if i != u32::MAX && first_of_inst[i as usize] == u32::MAX {
                first_of_inst[i as usize] = st as u32;
            }
        }
        tables.base = b
            .inst
            .iter()
            .map(|&i| match i {
                u32::MAX => 0,
                i => first_of_inst[i as usize],
            })
            .collect();
        for (c, &s) in rep.iter().enumerate() {
            let mut by_target: Vec<(u32, u32)> = Vec::new();
            if s != u32::MAX {
                let (a, e) = (
                    tables.acc_start[c] as usize,
                    tables.acc_start[c + 1] as usize,
                );
                for &id in &tables.accepted[a..e] {
                    let to = tables.walk(s, tables.text(id));
                    by_target.push((to - tables.base[s as usize], id));
                }
            }
            by_target.sort_unstable();
            let mut last = None;
            for (target, id) in by_target {
                if last != Some(target) {
                    if last.is_some() {
                        tables.group_first.push(tables.grouped.len() as u32);
                    }
                    tables.group_to.push(target);
                    last = Some(target);
                }
                tables.grouped.push(id);
            }
            if last.is_some() {
                tables.group_first.push(tables.grouped.len() as u32);
            }
            tables.group_start.push(tables.group_to.len() as u32);
        }
        tables
    }

    /// The edges of state `s` as `(lo, hi, to)`.
    fn edges(&self, s: u32) -> impl Iterator<Item = (char, char, u32)> + '_ {
        let (a, b) = (
            self.edge_start[s as usize] as usize,
            self.edge_start[s as usize + 1] as usize,
        );
        (a..b).map(move |i| {
            (
                char::from_u32(self.edge_lo[i]).unwrap_or('\0'),
                char::from_u32(self.edge_hi[i]).unwrap_or('\0'),
                self.edge_to[i],
            )
        })
    }

    /// The index of the edge of `s` that takes `c`.
    fn edge_index(&self, s: u32, c: char) -> Option<usize> {
        let a = *self.edge_start.get(s as usize)? as usize;
        let b = *self.edge_start.get(s as usize + 1)? as usize;
        let c = u32::from(c);
        let lo = &self.edge_lo[a..b];
        let i = lo.partition_point(|&l| l <= c);
        if i > 0 && self.edge_hi[a + i - 1] >= c {
            Some(a + i - 1)
        } else {
            None
        }
    }

    /// The state after character `c` from `s`, or [`DEAD`].
    pub fn step(&self, s: u32, c: char) -> u32 {
        self.edge_index(s, c).map_or(DEAD, |i| self.edge_to[i])
    }

    /// The state after the whole `text` from `s`, or [`DEAD`].
    pub fn walk(&self, mut s: u32, text: &str) -> u32 {
        for c in text.chars() {
            s = self.step(s, c);
            if s == DEAD {
                return DEAD;
            }
        }
        s
    }

    fn classify(
        &self,
        b: &Builder,
        exit_flags: &[Vec<bool>],
        s: u32,
        shared: bool,
        text: &str,
    ) -> Outcome {
        let mut cur = s;
        for c in text.chars() {
            match self.edge_index(cur, c) {
                None => {
                    return if shared && b.exits_on_follow[cur as usize] && FOLLOW.contains(&c) {
                        Outcome::Dependent
                    } else {
                        Outcome::Reject
                    };
                }
                Some(i) => {
                    let local = i - self.edge_start[cur as usize] as usize;
                    if shared && exit_flags[cur as usize][local] {
                        return Outcome::Dependent;
                    }
                    cur = self.edge_to[i];
                }
            }
        }
        Outcome::Accept
    }

    pub fn n_states(&self) -> usize {
        self.class.len()
    }

    /// The text of token `id` (empty for unknown ids).
    pub fn text(&self, id: u32) -> &str {
        let i = id as usize;
        match (self.token_start.get(i), self.token_start.get(i + 1)) {
            (Some(&a), Some(&b)) => self.token_text.get(a as usize..b as usize).unwrap_or(""),
            _ => "",
        }
    }

    fn class_lists(&self, s: u32) -> (&[u32], &[u32]) {
        let c = self.class[s as usize] as usize;
        let acc = &self.accepted[self.acc_start[c] as usize..self.acc_start[c + 1] as usize];
        let dep = &self.dependent[self.dep_start[c] as usize..self.dep_start[c + 1] as usize];
        (acc, dep)
    }

    /// Every token whose whole text keeps the machine alive from state `s` (no budget), sorted,
    /// with the state each leads to.
    pub fn live_tokens(&self, s: u32) -> Vec<(u32, u32)> {
        let (acc, dep) = self.class_lists(s);
        let mut out: Vec<(u32, u32)> = acc
            .iter()
            .map(|&id| (id, self.walk(s, self.text(id))))
            .chain(
                dep.iter()
                    .map(|&id| (id, self.walk(s, self.text(id))))
                    .filter(|&(_, to)| to != DEAD),
            )
            .collect();
        out.sort_unstable();
        out
    }

    fn compute_need(&mut self) {
        let n = self.n_states();
        let mut reverse: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut forward: Vec<Vec<u32>> = vec![Vec::new(); n];
        for s in 0..n as u32 {
            for (_, to) in self.live_tokens(s) {
                reverse[to as usize].push(s);
                forward[s as usize].push(to);
            }
        }
        let mut need = vec![UNREACHABLE; n];
        need[self.accept as usize] = 0;
        let mut queue = VecDeque::from([self.accept]);
        while let Some(s) = queue.pop_front() {
            for &p in &reverse[s as usize] {
                if need[p as usize] == UNREACHABLE {
                    need[p as usize] = need[s as usize] + 1;
                    queue.push_back(p);
                }
            }
        }
        self.max_need_after = forward
            .iter()
            .map(|tos| tos.iter().map(|&t| need[t as usize]).max().unwrap_or(0))
            .collect();
        self.need = need;
    }

    /// The fewest tokens after `<tool_call>` that make a complete list (`[]`).
    pub fn min_tokens(&self) -> u32 {
        self.need[self.start as usize]
    }
}

/// The strict machine over one generation: a state of [`StrictTables`].
#[derive(Clone, Debug)]
pub struct Strict<'a> {
    tables: &'a StrictTables,
    state: u32,
}

impl<'a> Strict<'a> {
    pub fn new(tables: &'a StrictTables) -> Strict<'a> {
        Strict {
            tables,
            state: BEFORE_MARKER,
        }
    }

    pub fn state(&self) -> u32 {
        self.state
    }

    /// Whether the text so far is a complete call list.
    pub fn is_complete(&self) -> bool {
        self.state == self.tables.accept
    }

    /// The sorted ids allowed next when at most `remaining` tokens may follow the one chosen now
    /// (`None`: no budget). `None` once a forced token left the language (unconstrained).
    pub fn allowed(&self, remaining: Option<usize>) -> Option<Vec<u32>> {
        let t = self.tables;
        let fits = |to: u32| remaining.is_none_or(|r| (t.need[to as usize] as usize) <= r);
        match self.state {
            DEAD => None,
            BEFORE_MARKER => Some(vec![t.marker]),
            s if s == t.accept => Some(vec![t.eos]),
            s => {
                let (acc, dep) = t.class_lists(s);
                let mut ids: Vec<u32> = match remaining {
                    // Near the end of the budget: the groups whose state can still be closed.
                    Some(r) if t.max_need_after[s as usize] as usize > r => {
                        let c = t.class[s as usize] as usize;
                        let base = t.base[s as usize];
                        let mut ids = Vec::new();
                        for g in t.group_start[c] as usize..t.group_start[c + 1] as usize {
                            if fits(base + t.group_to[g]) {
                                let (a, e) =
                                    (t.group_first[g] as usize, t.group_first[g + 1] as usize);
                                ids.extend_from_slice(&t.grouped[a..e]);
                            }
                        }
                        ids
                    }
                    _ => acc.to_vec(),
                };
                ids.extend(dep.iter().copied().filter(|&id| {
                    let to = t.walk(s, t.text(id));
                    to != DEAD && fits(to)
                }));
                ids.sort_unstable();
                Some(ids)
            }
        }
    }

    pub fn feed_token(&mut self, id: u32) {
        let t = self.tables;
        self.state = match self.state {
            DEAD => DEAD,
            BEFORE_MARKER if id == t.marker => t.start,
            BEFORE_MARKER => DEAD,
            s if s == t.accept => DEAD,
            s => t.walk(s, t.text(id)),
        };
    }
}
