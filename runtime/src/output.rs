//! Output post-processing (spec section 3, "Output").
//!
//! The model sees and emits snake_case tool names; the user must get back the names of their own
//! tool list. [`postprocess`] turns the detokenized text into what the user gets:
//!
//! 1. A leading `<tool_call>` is dropped: exactly that prefix, nothing trimmed before or after it.
//!    The golden data pins this: SentencePiece decodes `<tool_call>` followed by `▁[` as
//!    `<tool_call> [`, and the reference's outputs that do not parse (`samples.json`,
//!    `stock_folded`) start with that space, so it is kept. Greedy outputs that never emitted
//!    `<tool_call>` (`greedy_*.json`) come through unchanged.
//! 2. If the rest parses as JSON ([`crate::pyjson`], Python's `json.loads`, so surrounding
//!    whitespace is fine), each call's `name` is mapped back and the value is re-serialized
//!    compactly with non-ASCII escaped, as `json.dumps(..., separators=(",", ":"))`:
//!    * a top-level array: every element that is an object whose `name` is a string found among
//!      the snake names gets the original name, in place; anything else is left alone;
//!    * a top-level object is taken as one call and mapped the same way (it stays an object);
//!    * any other value is re-serialized untouched.
//! 3. Otherwise the text is returned with each snake name replaced by its original, as Python's
//!    `str.replace` applied in turn from the longest snake name to the shortest (ties in tool
//!    order). Replacements run one after another, so an original inserted by a longer name can
//!    itself be hit by a shorter one, as in the reference's sequential replace.
//!
//! The one input where this can differ from the reference: JSON holding an unpaired surrogate
//! escape (`"\ud800"`), which Python parses but [`crate::pyjson`] cannot (see there); such text
//! takes step 3 instead, and the user gets it as generated, names restored, instead of compacted.

use crate::pyjson::{self, Value};

/// What the model emits first; the reference strips it before anything else.
pub const TOOL_CALL_TOKEN: &str = "<tool_call>";

/// Turns detokenized model output into what the user gets. `name_map` holds
/// `(snake_name, original_name)` pairs in tool order (see `needlec::tools::ToolSet::name_map`).
pub fn postprocess(text: &str, name_map: &[(String, String)]) -> String {
    let body = text.strip_prefix(TOOL_CALL_TOKEN).unwrap_or(text);
    match pyjson::parse(body) {
        Ok(mut value) => {
            match &mut value {
                Value::Array(calls) => {
                    for call in calls {
                        restore_name(call, name_map);
                    }
                }
                Value::Object(_) => restore_name(&mut value, name_map),
                _ => {}
            }
            pyjson::to_compact_string(&value)
        }
        Err(_) => replace_names_in_text(body, name_map),
    }
}

/// Whether [`postprocess`] takes step 2 for `text`: the text after a leading `<tool_call>`
/// parses as JSON, so the user gets it re-serialized. `false`: the model's text is passed
/// through as generated (names restored), which is often not JSON at all: about 9% of random
/// queries to the bundled model, as with the reference. The library reports the same as
/// `NAME_result.parsed`.
pub fn parses_as_json(text: &str) -> bool {
    let body = text.strip_prefix(TOOL_CALL_TOKEN).unwrap_or(text);
    pyjson::parse(body).is_ok()
}

fn restore_name(call: &mut Value, name_map: &[(String, String)]) {
    let Some(snake) = call.get("name").and_then(Value::as_str) else {
        return;
    };
    if let Some((_, original)) = name_map.iter().find(|(s, _)| s == snake) {
        let original = Value::Str(original.clone());
        call.set("name", original);
    }
}

/// The fallback of step 3 in the module docs.
pub fn replace_names_in_text(text: &str, name_map: &[(String, String)]) -> String {
    let mut order: Vec<&(String, String)> = name_map.iter().collect();
    // Stable, and by characters like Python's len(), so ties keep tool order.
    order.sort_by_key(|(snake, _)| std::cmp::Reverse(snake.chars().count()));
    let mut out = text.to_string();
    for (snake, original) in order {
        if snake.is_empty() || snake == original {
            continue;
        }
        out = out.replace(snake.as_str(), original);
    }
    out
}
