//! The grammar machine against the reference's recorded steps (`grammar_dev4k.json`).

use needle_runtime::grammar::{Grammar, GrammarState, GrammarTables};
use needle_runtime::tokenizer::Tokenizer;
use needle_test_support::{golden, read_json, tool_keys, GrammarCase};

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
    let cases: Vec<GrammarCase> = read_json(&golden("grammar_dev4k.json"));
    assert_eq!(cases.len(), 12);
    let (mut active_steps, mut constrained_steps) = (0, 0);
    for (ci, case) in cases.iter().enumerate() {
        let tables = GrammarTables::new(&texts, &tool_keys(&case.tools_normalized));
        assert_eq!(case.steps.len(), case.ids.len(), "case {ci}");
        let mut g = Grammar::new(&tables);
        for (pos, (step, &id)) in case.steps.iter().zip(&case.ids).enumerate() {
            let at = format!("case {ci} ({:?}) position {pos}", case.answer);
            assert_eq!(g.is_active(), step.active, "{at}: active");
            if step.active {
                active_steps += 1;
                assert_eq!(Some(state_name(g.state())), step.state.as_deref(), "{at}");
                let want = step.allowed_ids();
                constrained_steps += usize::from(want.is_some());
                assert_eq!(g.allowed(), want.as_deref(), "{at}: allowed");
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
