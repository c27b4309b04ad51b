//! Tool-list normalization against the reference's golden files, OpenAI conversion, errors.

use std::path::{Path, PathBuf};

use needle_test_support::{golden, read_json, tiny_needle, work_dir};
use needlec::tools::{load_tools_arg, parse_tools, snake_case, Origin, ToolSet, ToolsError};

/// The entries of a JSON fixture that holds an array.
fn entries(path: &Path) -> Vec<serde_json::Value> {
    read_json(path)
}

/// The bundled model's tool list, as the path argument `--tools` takes.
fn example_tools() -> String {
    tiny_needle("tools.json").to_str().unwrap().to_string()
}

fn ok(text: &str) -> ToolSet {
    parse_tools(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn err(text: &str) -> ToolsError {
    match parse_tools(text) {
        Ok(set) => panic!("{text}: expected an error, got {set:?}"),
        Err(e) => e,
    }
}

#[test]
fn golden_tools_norm_all_cases() {
    let cases = entries(&golden("tools_norm.json"));
    assert_eq!(cases.len(), 11);
    for case in &cases {
        let input = case["input"].as_str().unwrap();
        let set = ok(input);
        assert_eq!(
            set.normalized_json,
            case["normalized"].as_str().unwrap(),
            "{input}"
        );
        // name_map is a Python dict dumped in insertion order (serde_json keeps it).
        let want: Vec<(String, String)> = case["name_map"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        assert_eq!(set.name_map, want, "{input}");
        let names: Vec<(String, String)> = set
            .tools
            .iter()
            .map(|t| (t.name.clone(), t.original_name.clone()))
            .collect();
        assert_eq!(names, want);
    }
}

#[test]
fn golden_cases_answers_use_our_snake_names() {
    // The reference's answers call tools by the snake names it built (e.g. `navigateTo` ->
    // `navigate_to`). Teacher-forced answers may call a tool of another case's list, so check
    // against all lists together.
    let cases = entries(&golden("cases.json"));
    let tools: Vec<_> = cases
        .iter()
        .flat_map(|c| ok(c["tools"].as_str().unwrap()).tools)
        .collect();
    let mut calls = 0;
    for case in &cases {
        let answer: Vec<serde_json::Value> =
            serde_json::from_str(case["answer"].as_str().unwrap()).unwrap();
        for call in answer {
            let name = call["name"].as_str().unwrap();
            let tool = tools.iter().find(|t| t.name == name);
            let tool = tool.unwrap_or_else(|| panic!("{name} is not a snake name of ours"));
            for key in call["arguments"].as_object().unwrap().keys() {
                assert!(tool.param_keys.contains(key), "{name}: {key}");
            }
            calls += 1;
        }
    }
    assert_eq!(calls, 7);
}

#[test]
fn snake_case_rule() {
    // Beyond the golden cases: what the Python regexes in the module docs give (run with
    // CPython 3.11), so the documented rule and the code agree.
    let cases = [
        ("ABCDef", "abc_def"),
        ("ABcDEf", "a_bc_d_ef"),
        ("aBCd", "a_b_cd"),
        ("getURLs", "get_ur_ls"),
        ("XMLHttpRequest2Go", "xml_http_request2_go"),
        ("iOS", "i_os"),
        ("a1B2c3", "a1_b2c3"),
        ("IPv6Address", "i_pv6_address"),
        ("Ärger", "ärger"),
        ("get weather", "get weather"),
        ("--x--y--", "x_y"),
        ("...", ""),
        ("_", ""),
        ("HTTP2Server", "http2_server"),
        ("ÉtéABC", "étéabc"),
        ("snake_case", "snake_case"),
        ("A", "a"),
        ("aB", "a_b"),
        ("ABC123Def", "abc123_def"),
        ("version2", "version2"),
        ("__init__", "init"),
    ];
    for (name, want) in cases {
        assert_eq!(snake_case(name), want, "{name}");
    }
}

#[test]
fn example_tools_file_by_path_and_inline() {
    let by_path = load_tools_arg(&example_tools()).unwrap();
    let text = std::fs::read_to_string(example_tools()).unwrap();
    let inline = load_tools_arg(&format!("\n  {text}")).unwrap();
    assert_eq!(by_path, inline);
    let names: Vec<&str> = by_path.tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "get_weather",
            "set_timer",
            "send_message",
            "play_music",
            "toggle_lights",
            "set_alarm"
        ]
    );
    assert_eq!(by_path.tools[4].param_keys, ["room", "state"]);
    // The reference's expected answers only use keys of the tool they call.
    for sample in entries(&tiny_needle("samples.json")) {
        let expected: Vec<serde_json::Value> =
            serde_json::from_str(sample["expected"].as_str().unwrap()).unwrap();
        for call in expected {
            let tool = by_path.tools.iter().find(|t| t.name == call["name"]);
            let tool = tool.expect("expected answer calls a listed tool");
            for key in call["arguments"].as_object().unwrap().keys() {
                assert!(tool.param_keys.contains(key));
            }
        }
    }
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = work_dir(&format!("tools-{name}")).join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn file_with_bom_and_whitespace_name_is_a_path() {
    let path = temp_file("bom.json", "\u{feff}[{\"name\":\"setTimer\"}]".as_bytes());
    let set = load_tools_arg(path.to_str().unwrap()).unwrap();
    assert_eq!(set.normalized_json, r#"[{"name":"set_timer"}]"#);
    std::fs::remove_file(path).unwrap();
}

const OPENAI: &str = r#"[
  {"type": "function", "function": {
     "name": "getWeather", "description": "Weather for a city.", "strict": true,
     "parameters": {"type": "object",
        "properties": {
          "location": {"type": "string", "description": "City."},
          "unit": {"type": "string", "enum": ["c", "f"], "required": "stale"},
          "days": {"type": "integer", "description": "How many days."}
        },
        "required": ["location", "days", "not_a_property"]}}},
  {"name": "set_timer", "description": "Timer.",
   "parameters": {"minutes": {"type": "integer", "required": true}}},
  {"name": "ping", "parameters": {"type": "object"}},
  {"function": {"name": "noParams", "parameters": {"type": "object", "properties": {}}}}
]"#;

#[test]
fn openai_definitions_convert_and_mix_with_needle_tools() {
    let set = ok(OPENAI);
    assert_eq!(
        set.normalized_json,
        concat!(
            r#"[{"name":"get_weather","description":"Weather for a city.","parameters":{"#,
            r#""location":{"type":"string","description":"City.","required":true},"#,
            r#""unit":{"type":"string","enum":["c","f"],"required":false},"#,
            r#""days":{"type":"integer","description":"How many days.","required":true}}},"#,
            r#"{"name":"set_timer","description":"Timer.","parameters":{"minutes":{"type":"integer","required":true}}},"#,
            r#"{"name":"ping","parameters":{}},"#,
            r#"{"name":"no_params","parameters":{}}]"#
        )
    );
    assert_eq!(
        set.name_map,
        [
            ("get_weather".to_string(), "getWeather".to_string()),
            ("set_timer".to_string(), "set_timer".to_string()),
            ("ping".to_string(), "ping".to_string()),
            ("no_params".to_string(), "noParams".to_string()),
        ]
    );
    assert_eq!(set.tools[0].param_keys, ["location", "unit", "days"]);
    assert!(set.tools[2].param_keys.is_empty());
}

#[test]
fn needle_parameters_named_type_are_not_mistaken_for_a_schema() {
    let text =
        r#"[{"name":"t","parameters":{"type":{"type":"string"},"properties":{"type":"object"}}}]"#;
    let set = ok(text);
    assert_eq!(set.normalized_json, text);
    assert_eq!(set.tools[0].param_keys, ["type", "properties"]);
}

#[test]
fn invalid_json_reports_line_and_column() {
    let e = err("[\n  {\"name\": \"a\",}\n]");
    match &e {
        ToolsError::Json {
            origin,
            line,
            column,
            message,
        } => {
            assert_eq!(origin, &Origin::Text);
            assert_eq!((*line, *column), (2, 16));
            assert_eq!(message, "Expecting property name enclosed in double quotes");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        "tool list: invalid JSON at line 2, column 16: Expecting property name enclosed in double \
         quotes; fix the JSON there"
    );
    let inline = load_tools_arg("[{]").unwrap_err();
    assert!(
        inline
            .to_string()
            .starts_with("inline --tools JSON: invalid JSON at line 1, column 3"),
        "{inline}"
    );
}

#[test]
fn not_an_array() {
    let e = err(r#"{"name":"a"}"#);
    assert!(
        matches!(
            e,
            ToolsError::NotAnArray {
                found: "an object",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("must be a JSON array"), "{e}");
}

#[test]
fn element_not_an_object() {
    let e = err(r#"[{"name":"a"}, "b"]"#);
    assert!(
        matches!(
            e,
            ToolsError::ToolNotObject {
                index: 1,
                found: "a string",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("tool at index 1 is a string"), "{e}");
}

#[test]
fn missing_name() {
    let e = err(r#"[{"name":"a"},{"description":"x"}]"#);
    assert!(
        matches!(e, ToolsError::MissingName { index: 1, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("tool at index 1 has no \"name\""),
        "{e}"
    );
    // A wrapped definition whose function lacks a name is reported the same way.
    let e = err(r#"[{"type":"function","function":{"description":"x"}}]"#);
    assert!(
        matches!(e, ToolsError::MissingName { index: 0, .. }),
        "{e:?}"
    );
}

#[test]
fn name_not_a_string() {
    let e = err(r#"[{"name":7}]"#);
    assert!(
        matches!(
            e,
            ToolsError::NameNotString {
                index: 0,
                found: "a number",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("the name must be a string"), "{e}");
}

#[test]
fn name_empty_after_snake_case() {
    let e = err(r#"[{"name":"ok"},{"name":"-._"}]"#);
    match &e {
        ToolsError::EmptyName { index, name, .. } => {
            assert_eq!((*index, name.as_str()), (1, "-._"));
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("empty in snake_case"), "{e}");
    assert!(matches!(
        err(r#"[{"name":""}]"#),
        ToolsError::EmptyName { index: 0, .. }
    ));
}

#[test]
fn names_colliding_after_snake_case() {
    let e = err(r#"[{"name":"x"},{"name":"setTimer"},{"name":"set-timer"}]"#);
    match &e {
        ToolsError::DuplicateName {
            first_index,
            first_name,
            index,
            name,
            snake,
            ..
        } => {
            assert_eq!(*first_index, 1);
            assert_eq!(first_name, "setTimer");
            assert_eq!(*index, 2);
            assert_eq!(name, "set-timer");
            assert_eq!(snake, "set_timer");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        "tool list: tools at index 1 (\"setTimer\") and index 2 (\"set-timer\") both become \
         \"set_timer\" in snake_case; rename one of them"
    );
}

#[test]
fn malformed_parameters_and_schemas() {
    let cases = [
        (
            r#"[{"name":"a","parameters":[]}]"#,
            "\"parameters\" is an array",
        ),
        (
            r#"[{"name":"a","parameters":{"type":"object","properties":[]}}]"#,
            "\"properties\" is an array",
        ),
        (
            r#"[{"name":"a","parameters":{"type":"object","required":"x"}}]"#,
            "\"required\" is a string",
        ),
        (
            r#"[{"name":"a","parameters":{"type":"object","properties":{"p":true}}}]"#,
            "property \"p\" has a schema that is a boolean",
        ),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(
            matches!(e, ToolsError::InvalidTool { index: 0, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains(want), "{text}: {e}");
    }
}

#[test]
fn unreadable_file() {
    let missing = std::env::temp_dir().join("needlec-tools-definitely-missing.json");
    let e = load_tools_arg(missing.to_str().unwrap()).unwrap_err();
    match &e {
        ToolsError::Read { path, cause } => {
            assert_eq!(path, &missing);
            assert_eq!(cause.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    let shown = e.to_string();
    assert!(shown.contains(missing.to_str().unwrap()), "{shown}");
    assert!(shown.contains("inline JSON must start with '['"), "{shown}");
}

#[test]
fn invalid_utf8_file() {
    let path = temp_file("latin1.json", b"[{\"name\":\"caf\xe9\"}]");
    let e = load_tools_arg(path.to_str().unwrap()).unwrap_err();
    assert!(
        matches!(e, ToolsError::InvalidUtf8 { offset: 13, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("not valid UTF-8"), "{e}");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn json_error_in_file_names_the_file() {
    let path = temp_file("bad.json", b"[\n{\"name\": }]");
    let e = load_tools_arg(path.to_str().unwrap()).unwrap_err();
    assert!(
        matches!(&e, ToolsError::Json { origin: Origin::File(p), line: 2, column: 10, .. } if p == &path),
        "{e:?}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn garbage_never_panics() {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let text = std::fs::read_to_string(example_tools()).unwrap() + OPENAI;
    for (cut, _) in text.char_indices() {
        let _ = parse_tools(&text[..cut]);
        let _ = parse_tools(&format!("[{}", &text[cut..]));
    }
    for _ in 0..5_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let alphabet = b"[]{}\",:namefunctionparameters";
        let bytes: Vec<u8> = state
            .to_le_bytes()
            .iter()
            .map(|b| alphabet[*b as usize % alphabet.len()])
            .collect();
        let _ = parse_tools(&String::from_utf8_lossy(&bytes));
    }
}

#[test]
fn golden_greedy_outputs_with_name_map_from_our_tools() {
    let paths = ["greedy_tiny.json", "greedy_small.json"];
    let mut n = 0;
    for path in paths {
        for e in entries(&golden(path)) {
            let set = ok(e["tools"].as_str().unwrap());
            let out =
                needle_runtime::output::postprocess(e["text"].as_str().unwrap(), &set.name_map);
            assert_eq!(out, e["output"].as_str().unwrap(), "{path}: {}", e["query"]);
            n += 1;
        }
    }
    assert_eq!(n, 32);
}

#[test]
fn example_samples_postprocess_to_themselves() {
    let set = load_tools_arg(&example_tools()).unwrap();
    for sample in entries(&tiny_needle("samples.json")) {
        for key in ["expected", "stock_exact", "fold_folded", "stock_folded"] {
            let out = sample[key].as_str().unwrap();
            let raw = format!("<tool_call>{out}");
            assert_eq!(
                needle_runtime::output::postprocess(&raw, &set.name_map),
                out
            );
        }
    }
}
