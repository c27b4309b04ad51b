//! The grammar machine against the reference's recorded steps (`grammar_dev4k.json`).

use needle_runtime::grammar::{Grammar, GrammarState, GrammarTables};
use needle_runtime::tokenizer::Tokenizer;
use needle_test_support::{golden, read_json, tool_keys};
use serde_json::Value;

fn state_name(s: GrammarState) -> &'static str {
    match s {
        GrammarState::Free => "FREE",
        GrammarState::InName => "IN_NAME",
        GrammarState::InArgKey => "IN_ARG_KEY",
    }
}

#[test]
fn every_step_of_every_golden_answer_matches() {
    let tok = Tokenizer::from_file(&golden("dev4k.model")).unwrap();
    let texts = tok.token_texts();
    let cases: Value = read_json(&golden("grammar_dev4k.json"));
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
    let tok = Tokenizer::from_file(&golden("dev4k.model")).unwrap();
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
