//! Python-exact JSON (spec section 3).
//!
//! The reference turns text into tokens with `json.dumps(json.loads(text), separators=(",", ":"))`
//! and post-processes model output the same way, so every byte of that round trip reaches the
//! tokenizer or the user. This module reproduces CPython's `json` module (default arguments:
//! `strict=True` loads, `ensure_ascii=True` and `allow_nan=True` dumps) rather than generic JSON:
//!
//! * Numbers keep Python's int/float split: a literal with a fraction or an exponent is a float
//!   (`1E5` -> `100000.0`), anything else an int kept as verbatim digits (big ints survive; `-0`
//!   becomes `0` because Python's `int("-0")` is `0`). Floats print as `float.__repr__`: shortest
//!   round-trip digits, exponent form when the decimal exponent is `< -4` or `>= 16` (`1e-07`,
//!   `1e+21`), otherwise positional with at least one fractional digit (`1.0`).
//! * `NaN`, `Infinity` and `-Infinity` are accepted, as `json.loads` does, and written back the
//!   same way; a literal that overflows (`1e400`) becomes `Infinity`, as `float()` makes it.
//! * Objects keep key order; a duplicate key keeps the first key's position with the last value,
//!   which is what building a Python dict does.
//! * Strings are written ASCII-only with Python's escapes; `/` and DEL are handled as Python does
//!   (`/` verbatim, DEL as `\u007f`).
//!
//! Known deviation: Python accepts an unpaired surrogate escape (`"\ud800"`) and keeps it in the
//! string; a Rust `String` cannot hold one, so [`parse`] rejects it with an error that says so.
//! Integers longer than Python's 4300-digit conversion limit are accepted here (Python 3.11+
//! raises `ValueError`); a tool list or tool call never gets near it.
//!
//! Nesting deeper than [`MAX_DEPTH`] is rejected: Python fails there too (`RecursionError`), and a
//! bound keeps the recursive parser from overflowing the stack on hostile input.

use std::collections::HashMap;
use std::fmt::{self, Write as _};

/// Deepest nesting [`parse`] accepts (about CPython's default recursion limit).
pub const MAX_DEPTH: usize = 1000;

/// A JSON value as Python's `json.loads` builds it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// An int literal's digits with optional leading `-`, verbatim except `-0` -> `0`.
    Int(String),
    Float(f64),
    Str(String),
    Array(Vec<Value>),
    /// Members in first-occurrence order; keys are unique.
    Object(Vec<(String, Value)>),
}

impl Value {
    /// The member `key` of an object; `None` for other values.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Sets `key` as `dict[key] = value` does: in place if present, appended otherwise.
    /// Returns `false` (and changes nothing) when `self` is not an object.
    pub fn set(&mut self, key: &str, value: Value) -> bool {
        match self {
            Value::Object(members) => {
                match members.iter_mut().find(|(k, _)| k == key) {
                    Some(slot) => slot.1 = value,
                    None => members.push((key.to_string(), value)),
                }
                true
            }
            _ => false,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// "an object", "a string", ...: for error messages that say what was found instead.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }
}

/// Why [`parse`] failed, located like Python's `JSONDecodeError` (1-based line and column,
/// counted in characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    /// Python's wording where it has one, e.g. `Expecting ',' delimiter`.
    pub message: String,
    pub line: usize,
    pub column: usize,
    /// Character (not byte) offset from the start, as Python's `pos`.
    pub offset: usize,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Python's own layout, so messages read the same as the reference's.
        write!(
            f,
            "{}: line {} column {} (char {})",
            self.message, self.line, self.column, self.offset
        )
    }
}

impl std::error::Error for JsonError {}

/// Parses `text` as Python's `json.loads(text)` does (see the module docs for the one deviation).
pub fn parse(text: &str) -> Result<Value, JsonError> {
    let mut p = Parser {
        src: text,
        bytes: text.as_bytes(),
        pos: 0,
    };
    if text.starts_with('\u{feff}') {
        return Err(p.error_at(
            0,
            "Unexpected UTF-8 BOM (strip it or save the file without one)",
        ));
    }
    p.skip_ws();
    let value = p.value(0)?;
    p.skip_ws();
    if p.pos != p.bytes.len() {
        return Err(p.error_at(p.pos, "Extra data"));
    }
    Ok(value)
}

struct Parser<'a> {
    src: &'a str,
    bytes: &'a [u8],
    /// Byte offset; always on a char boundary between tokens.
    pos: usize,
}

impl Parser<'_> {
    fn error_at(&self, byte_pos: usize, message: impl Into<String>) -> JsonError {
        // Python counts in code points; only errors pay for the conversion.
        let before = &self.src[..byte_pos.min(self.src.len())];
        let offset = before.chars().count();
        let line = before.matches('\n').count() + 1;
        let column = match before.rfind('\n') {
            Some(nl) => before[nl + 1..].chars().count() + 1,
            None => offset + 1,
        };
        JsonError {
            message: message.into(),
            line,
            column,
            offset,
        }
    }

    fn skip_ws(&mut self) {
        // Python's json whitespace is exactly these four.
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    fn starts_with(&self, lit: &str) -> bool {
        self.bytes[self.pos..].starts_with(lit.as_bytes())
    }

    fn value(&mut self, depth: usize) -> Result<Value, JsonError> {
        let Some(&b) = self.bytes.get(self.pos) else {
            return Err(self.error_at(self.pos, "Expecting value"));
        };
        match b {
            b'"' => self.string().map(Value::Str),
            b'{' | b'[' if depth >= MAX_DEPTH => {
                Err(self.error_at(self.pos, format!("Nesting deeper than {MAX_DEPTH} levels")))
            }
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'n' if self.starts_with("null") => {
                self.pos += 4;
                Ok(Value::Null)
            }
            b't' if self.starts_with("true") => {
                self.pos += 4;
                Ok(Value::Bool(true))
            }
            b'f' if self.starts_with("false") => {
                self.pos += 5;
                Ok(Value::Bool(false))
            }
            b'N' if self.starts_with("NaN") => {
                self.pos += 3;
                Ok(Value::Float(f64::NAN))
            }
            b'I' if self.starts_with("Infinity") => {
                self.pos += 8;
                Ok(Value::Float(f64::INFINITY))
            }
            b'-' if self.starts_with("-Infinity") => {
                self.pos += 9;
                Ok(Value::Float(f64::NEG_INFINITY))
            }
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(self.error_at(self.pos, "Expecting value")),
        }
    }

    /// Python's `-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?`: an optional part that does not match in
    /// full is simply not taken (`1.` is the int 1 followed by extra data).
    fn number(&mut self) -> Result<Value, JsonError> {
        let start = self.pos;
        let digits = |p: usize| {
            self.bytes[p..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count()
        };
        let mut end = start;
        if self.bytes[end] == b'-' {
            end += 1;
        }
        match self.bytes.get(end) {
            Some(b'0') => end += 1,
            Some(b'1'..=b'9') => end += digits(end),
            _ => return Err(self.error_at(start, "Expecting value")),
        }
        let mut is_float = false;
        if self.bytes.get(end) == Some(&b'.') && digits(end + 1) > 0 {
            end += 1 + digits(end + 1);
            is_float = true;
        }
        if let Some(b'e' | b'E') = self.bytes.get(end) {
            let mut e = end + 1;
            if let Some(b'+' | b'-') = self.bytes.get(e) {
                e += 1;
            }
            let n = digits(e);
            if n > 0 {
                end = e + n;
                is_float = true;
            }
        }
        let text = &self.src[start..end];
        self.pos = end;
        if is_float {
            // Correctly rounded like CPython's float(); overflow gives inf as there.
            match text.parse::<f64>() {
                Ok(f) => Ok(Value::Float(f)),
                Err(_) => Err(self.error_at(start, "Invalid number")),
            }
        } else if text == "-0" {
            Ok(Value::Int("0".to_string()))
        } else {
            Ok(Value::Int(text.to_string()))
        }
    }

    fn string(&mut self) -> Result<String, JsonError> {
        let open = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            // Copy the run of ordinary characters in one go.
            let run_start = self.pos;
            while let Some(&b) = self.bytes.get(self.pos) {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            out.push_str(&self.src[run_start..self.pos]);
            match self.bytes.get(self.pos) {
                None => return Err(self.error_at(open, "Unterminated string starting at")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => self.escape(open, &mut out)?,
                Some(_) => return Err(self.error_at(self.pos, "Invalid control character at")),
            }
        }
    }

    fn escape(&mut self, open: usize, out: &mut String) -> Result<(), JsonError> {
        let at = self.pos;
        let Some(&c) = self.bytes.get(self.pos + 1) else {
            return Err(self.error_at(open, "Unterminated string starting at"));
        };
        self.pos += 2;
        let simple = match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => return self.unicode_escape(at, out),
            _ => {
                let shown: String = self.src[at..].chars().take(2).collect();
                return Err(self.error_at(at, format!("Invalid \\escape {shown}")));
            }
        };
        out.push(simple);
        Ok(())
    }

    fn hex4(&self, at: usize) -> Option<u32> {
        let h = self.bytes.get(at..at + 4)?;
        if !h.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        // All four are ASCII hex digits, so this is valid UTF-8 and parses.
        u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    }

    /// `self.pos` is just past `\u`; `at` is the backslash.
    fn unicode_escape(&mut self, at: usize, out: &mut String) -> Result<(), JsonError> {
        // Python points at the `u` for a bad hex escape, and (C scanner quirk) also calls an
        // escape that ends the input "invalid" rather than the string unterminated.
        if self.pos + 4 >= self.bytes.len() {
            return Err(self.error_at(at + 1, "Invalid \\uXXXX escape"));
        }
        let Some(hi) = self.hex4(self.pos) else {
            return Err(self.error_at(at + 1, "Invalid \\uXXXX escape"));
        };
        self.pos += 4;
        let unpaired = |p: &Self, u: u32| {
            p.error_at(
                at,
                format!(
                    "Unpaired surrogate \\u{u:04x} (Python keeps it, but needlec cannot \
                     represent it; escape the whole character as a \\uXXXX\\uXXXX pair)"
                ),
            )
        };
        let code = if (0xd800..0xdc00).contains(&hi) {
            // A high surrogate pairs only with an immediately following `\u` low surrogate.
            if self.bytes.get(self.pos..self.pos + 2) != Some(b"\\u") {
                return Err(unpaired(self, hi));
            }
            if self.pos + 6 >= self.bytes.len() {
                return Err(self.error_at(self.pos + 1, "Invalid \\uXXXX escape"));
            }
            let Some(lo) = self.hex4(self.pos + 2) else {
                return Err(self.error_at(self.pos + 1, "Invalid \\uXXXX escape"));
            };
            if !(0xdc00..0xe000).contains(&lo) {
                return Err(unpaired(self, hi));
            }
            self.pos += 6;
            0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
        } else if (0xdc00..0xe000).contains(&hi) {
            return Err(unpaired(self, hi));
        } else {
            hi
        };
        match char::from_u32(code) {
            Some(ch) => {
                out.push(ch);
                Ok(())
            }
            None => Err(self.error_at(at, "Invalid \\uXXXX escape")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, JsonError> {
        self.pos += 1;
        let mut members: Vec<(String, Value)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        self.skip_ws();
        if self.bytes.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            return Ok(Value::Object(members));
        }
        loop {
            if self.bytes.get(self.pos) != Some(&b'"') {
                return Err(self.error_at(
                    self.pos,
                    "Expecting property name enclosed in double quotes",
                ));
            }
            let key = self.string()?;
            self.skip_ws();
            if self.bytes.get(self.pos) != Some(&b':') {
                return Err(self.error_at(self.pos, "Expecting ':' delimiter"));
            }
            self.pos += 1;
            self.skip_ws();
            let value = self.value(depth)?;
            match index.get(&key) {
                Some(&i) => members[i].1 = value,
                None => {
                    index.insert(key.clone(), members.len());
                    members.push((key, value));
                }
            }
            self.skip_ws();
            match self.bytes.get(self.pos) {
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(members));
                }
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                }
                _ => return Err(self.error_at(self.pos, "Expecting ',' delimiter")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, JsonError> {
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.bytes.get(self.pos) == Some(&b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value(depth)?);
            self.skip_ws();
            match self.bytes.get(self.pos) {
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                }
                _ => return Err(self.error_at(self.pos, "Expecting ',' delimiter")),
            }
        }
    }
}

/// `json.dumps(value, separators=(",", ":"))`: compact, ASCII-only, Python's float repr.
pub fn to_compact_string(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, true);
    out
}

/// `json.dumps(value, separators=(",", ":"), ensure_ascii=False)`: as [`to_compact_string`],
/// but non-ASCII characters (and DEL) are written as themselves; only `"`, `\\` and the
/// control characters below U+0020 are escaped. Needle 3's prompt renders tools and calls so.
pub fn to_compact_string_unicode(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, false);
    out
}

fn write_value(out: &mut String, value: &Value, ascii: bool) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Int(digits) => out.push_str(digits),
        Value::Float(f) => out.push_str(&float_repr(*f)),
        Value::Str(s) => write_str(out, s, ascii),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item, ascii);
            }
            out.push(']');
        }
        Value::Object(members) => {
            out.push('{');
            for (i, (key, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(out, key, ascii);
                out.push(':');
                write_value(out, item, ascii);
            }
            out.push('}');
        }
    }
}

/// Python's `py_encode_basestring_ascii` (`ascii`): everything outside `' '..='~'` is escaped;
/// or `py_encode_basestring`: only `"`, `\\` and the control characters.
fn write_str(out: &mut String, s: &str, ascii: bool) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            c if !ascii && !matches!(c, '"' | '\\' | '\u{0}'..='\u{1f}') => out.push(c),
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(ch),
            _ => {
                let mut units = [0u16; 2];
                for unit in ch.encode_utf16(&mut units) {
                    // Writing to a String cannot fail.
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// Python's `float.__repr__` as `json.dumps` uses it (`NaN`/`Infinity` for the non-finite).
pub fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    // Rust's `{:e}` finds the shortest digit count that round-trips, as Python's repr does, but
    // when two such strings are equally close (910857286436051.25 -> ...051.2 or ...051.3) it
    // rounds up where Python's dtoa rounds half to even. Precision formatting is exact with
    // ties-to-even, so re-rounding to the same count gives Python's choice.
    let shortest = format!("{f:e}");
    let n_digits = shortest
        .split('e')
        .next()
        .unwrap_or("")
        .bytes()
        .filter(u8::is_ascii_digit)
        .count();
    let even = format!("{:.*e}", n_digits.saturating_sub(1), f);
    let sci = if even.parse::<f64>() == Ok(f) {
        even
    } else {
        shortest
    };
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let n = digits.len() as i32;
    let mut out = String::from(sign);
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp + 1;
            if n <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', (int_len - n) as usize));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len as usize]);
                out.push('.');
                out.push_str(&digits[int_len as usize..]);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if n > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(
            out,
            "e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.unsigned_abs()
        );
    }
    out
}
