//! The grammar machine against the reference's recorded steps (`grammar_dev4k.json`).

use std::path::Path;

use needle_runtime::grammar::{Grammar, GrammarState, GrammarTables};
use needle_runtime::tokenizer::Tokenizer;
use serde_json::Value;

const DEV4K_MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/golden/dev4k.model"
);
const GRAMMAR_GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/golden/grammar_dev4k.json"
);

/// (name, parameter keys in order) from a normalized tool list.
fn tool_keys(tools_normalized: &str) -> Vec<(String, Vec<String>)> {
    let tools: Value = serde_json::from_str(tools_normalized).unwrap();
    tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let keys = t
                .get("parameters")
                .and_then(Value::as_object)
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default();
            (t["name"].as_str().unwrap().to_string(), keys)
        })
        .collect()
}

fn state_name(s: GrammarState) -> &'static str {
    match s {
        GrammarState::Free => "FREE",
        GrammarState::InName => "IN_NAME",
        GrammarState::InArgKey => "IN_ARG_KEY",
    }
}

#[test]
fn every_step_of_every_golden_answer_matches() {
    let tok = Tokenizer::from_file(Path::new(DEV4K_MODEL)).unwrap();
    let texts = tok.token_texts();
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(GRAMMAR_GOLDEN).unwrap()).unwrap();
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 12);
    let (mut active_steps, mut constrained_steps) = (0, 0);
    for (ci, case) in cases.iter().enumerate() {
        let tools = tool_keys(case["tools_normalized"].as_str().unwrap());
        let tables = GrammarTables::new(&texts, &tools);
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let steps = case["steps"].as_array().unwrap();
        assert_eq!(steps.len(), ids.len(), "case {ci}");
        let mut g = Grammar::new(&tables);
        for (pos, (step, &id)) in steps.iter().zip(&ids).enumerate() {
            let at = format!("case {ci} ({}) position {pos}", case["answer"]);
            let active = step["active"].as_bool().unwrap();
            assert_eq!(g.is_active(), active, "{at}: active");
            if active {
                active_steps += 1;
                assert_eq!(
                    state_name(g.state()),
                    step["state"].as_str().unwrap(),
                    "{at}"
                );
                match &step["allowed"] {
                    Value::String(s) => {
                        assert_eq!(s, "all");
                        assert_eq!(g.allowed(), None, "{at}: expected unconstrained");
                    }
                    Value::Array(want) => {
                        constrained_steps += 1;
                        let want: Vec<u32> =
                            want.iter().map(|v| v.as_u64().unwrap() as u32).collect();
                        assert_eq!(g.allowed(), Some(&want[..]), "{at}: allowed");
                    }
                    other => panic!("{at}: bad allowed {other}"),
                }
            } else {
                assert_eq!(g.state(), GrammarState::Free, "{at}");
                assert_eq!(g.allowed(), None, "{at}");
            }
            g.feed_token(id);
        }
    }
    // Guards against a golden file that silently stopped exercising the grammar.
    assert_eq!((active_steps, constrained_steps), (80, 66));
}

#[test]
fn unknown_ids_and_empty_tool_lists_are_harmless() {
    let tok = Tokenizer::from_file(Path::new(DEV4K_MODEL)).unwrap();
    let texts = tok.token_texts();
    let tables = GrammarTables::new(&texts, &[]);
    let mut g = Grammar::new(&tables);
    for id in tok.encode("[{\"name\":\"") {
        g.feed_token(id);
    }
    assert_eq!(g.state(), GrammarState::InName);
    // An empty name trie allows nothing, so the step falls back to unconstrained.
    assert_eq!(g.allowed(), None);
    g.feed_token(u32::MAX);
    g.feed_token(99_999);
    assert_eq!(g.state(), GrammarState::InName);
}
