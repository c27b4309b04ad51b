//! The strict grammar's tables against a direct check of the text against the schemas.
//!
//! `direct` below is a recursive-descent reading of the language (docs/spec.md, "The strict
//! grammar") that shares nothing with the automaton: it says whether a text is a complete call
//! list, a prefix of one, or neither. On random token sequences over the bundled vocabulary the
//! tables must allow exactly the tokens after which the text is still a complete list or a
//! prefix of one, and, under a budget, must always close the list in time.

use needle_runtime::strict::{
    schemas, Property, Schema, Strict, StrictError, StrictTables, ToolSchema, DEAD,
};
use needle_runtime::tokenizer::{PieceKind, Tokenizer};
use needle_test_support::{tiny_needle, Rng};

const MARKER: u32 = 4;
const EOS: u32 = 1;

fn prop(key: &str, required: bool, schema: Schema) -> Property {
    Property {
        key: key.into(),
        required,
        schema,
    }
}

/// Tools that use every kind of value the grammar has.
fn tools() -> Vec<ToolSchema> {
    use Schema::*;
    vec![
        ToolSchema {
            name: "set_alarm".into(),
            params: vec![
                prop("time", true, String),
                prop("label", false, String),
                prop("repeat", false, Boolean),
            ],
        },
        ToolSchema {
            name: "set_timer".into(),
            params: vec![prop("minutes", true, Integer), prop("label", false, String)],
        },
        ToolSchema {
            name: "tip".into(),
            params: vec![
                prop("amount", true, Number),
                prop(
                    "percent",
                    false,
                    Enum(vec!["1".into(), "10".into(), "15.5".into()]),
                ),
                prop(
                    "unit",
                    false,
                    Enum(vec!["\"c\"".into(), "\"f\"".into(), "null".into()]),
                ),
            ],
        },
        ToolSchema {
            name: "stop".into(),
            params: vec![],
        },
        ToolSchema {
            name: "plan".into(),
            params: vec![
                prop("nothing", false, Null),
                prop("days", false, Array(Box::new(Integer))),
                prop(
                    "stops",
                    true,
                    Array(Box::new(Object(vec![
                        prop("city", true, String),
                        prop("nights", false, Integer),
                    ]))),
                ),
                prop(
                    "who",
                    false,
                    Object(vec![
                        prop("name", false, String),
                        prop("age", false, Number),
                    ]),
                ),
            ],
        },
    ]
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Verdict {
    Complete,
    Prefix,
    Invalid,
}

#[derive(Debug)]
enum Stop {
    Eof,
    Bad,
}

type R = Result<(), Stop>;

struct Direct<'a> {
    s: Vec<char>,
    i: usize,
    tools: &'a [ToolSchema],
}

impl Direct<'_> {
    fn peek(&self) -> Result<char, Stop> {
        self.s.get(self.i).copied().ok_or(Stop::Eof)
    }

    fn lit(&mut self, text: &str) -> R {
        for c in text.chars() {
            if self.peek()? != c {
                return Err(Stop::Bad);
            }
            self.i += 1;
        }
        Ok(())
    }

    /// A word among `words` (each read up to its closing quote, which is consumed): the index.
    fn word(&mut self, words: &[&str]) -> Result<usize, Stop> {
        let mut got = String::new();
        loop {
            let c = self.peek()?;
            self.i += 1;
            if c == '"' {
                return words.iter().position(|w| *w == got).ok_or(Stop::Bad);
            }
            got.push(c);
            if !words.iter().any(|w| w.starts_with(&got)) {
                return Err(Stop::Bad);
            }
        }
    }

    fn list(&mut self) -> R {
        if self.peek()? == ' ' {
            self.i += 1;
        }
        self.lit("[")?;
        if self.peek()? == ']' {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.call()?;
            match self.peek()? {
                ',' => self.i += 1,
                ']' => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(Stop::Bad),
            }
        }
    }

    fn call(&mut self) -> R {
        self.lit("{\"name\":\"")?;
        let names: Vec<&str> = self.tools.iter().map(|t| t.name.as_str()).collect();
        let t = self.word(&names)?;
        self.lit(",\"arguments\":")?;
        let params = self.tools[t].params.clone();
        self.object(&params)?;
        self.lit("}")
    }

    fn object(&mut self, props: &[Property]) -> R {
        self.lit("{")?;
        let mut next = 0;
        loop {
            if self.peek()? == '}' {
                if props[next..].iter().any(|p| p.required) {
                    return Err(Stop::Bad);
                }
                self.i += 1;
                return Ok(());
            }
            // Keys in order: optional ones may be skipped, required ones may not.
            let mut candidates = Vec::new();
            for (k, p) in props.iter().enumerate().skip(next) {
                candidates.push(k);
                if p.required {
                    break;
                }
            }
            if candidates.is_empty() {
                return Err(Stop::Bad);
            }
            if next > 0 {
                self.lit(",")?;
            }
            self.lit("\"")?;
            let keys: Vec<&str> = candidates.iter().map(|&k| props[k].key.as_str()).collect();
            let k = candidates[self.word(&keys)?];
            self.lit(":")?;
            self.value(&props[k].schema)?;
            next = k + 1;
        }
    }

    fn digits(&mut self, max: usize) -> R {
        let mut n = 0;
        while self.peek()?.is_ascii_digit() {
            if n == max {
                return Ok(());
            }
            self.i += 1;
            n += 1;
        }
        if n == 0 {
            return Err(Stop::Bad);
        }
        Ok(())
    }

    fn number(&mut self, fraction: bool) -> R {
        if self.peek()? == '-' {
            self.i += 1;
        }
        match self.peek()? {
            '0' => self.i += 1,
            '1'..='9' => self.digits(18)?,
            _ => return Err(Stop::Bad),
        }
        if fraction && self.peek()? == '.' {
            self.i += 1;
            self.digits(17)?;
        }
        Ok(())
    }

    fn value(&mut self, schema: &Schema) -> R {
        match schema {
            Schema::String => {
                self.lit("\"")?;
                loop {
                    let c = self.peek()?;
                    self.i += 1;
                    match c {
                        '"' => return Ok(()),
                        '\\' => match self.peek()? {
                            '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't' => self.i += 1,
                            'u' => {
                                self.i += 1;
                                for k in 0..4 {
                                    let h = self.peek()?;
                                    let surrogate = k == 1
                                        && matches!(self.s[self.i - 1], 'd' | 'D')
                                        && !('0'..='7').contains(&h);
                                    if !h.is_ascii_hexdigit() || surrogate {
                                        return Err(Stop::Bad);
                                    }
                                    self.i += 1;
                                }
                            }
                            _ => return Err(Stop::Bad),
                        },
                        c if (c as u32) < 0x20 => return Err(Stop::Bad),
                        _ => {}
                    }
                }
            }
            Schema::Integer => self.number(false),
            Schema::Number => self.number(true),
            Schema::Boolean => match self.peek()? {
                't' => self.lit("true"),
                _ => self.lit("false"),
            },
            Schema::Null => self.lit("null"),
            Schema::Enum(texts) => {
                let mut got = String::new();
                loop {
                    match self.peek() {
                        Ok(c) if texts.iter().any(|t| t.starts_with(&format!("{got}{c}"))) => {
                            got.push(c);
                            self.i += 1;
                        }
                        Err(stop) => return Err(stop),
                        Ok(_) if texts.contains(&got) => return Ok(()),
                        Ok(_) => return Err(Stop::Bad),
                    }
                }
            }
            Schema::Array(item) => {
                self.lit("[")?;
                if self.peek()? == ']' {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.value(item)?;
                    match self.peek()? {
                        ',' => self.i += 1,
                        ']' => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(Stop::Bad),
                    }
                }
            }
            Schema::Object(props) => self.object(props),
        }
    }
}

/// The text after `<tool_call>` read directly against the schemas.
fn direct(text: &str, tools: &[ToolSchema]) -> Verdict {
    let mut p = Direct {
        s: text.chars().collect(),
        i: 0,
        tools,
    };
    match p.list() {
        Ok(()) if p.i == p.s.len() => Verdict::Complete,
        Ok(()) => Verdict::Invalid,
        Err(Stop::Eof) => Verdict::Prefix,
        Err(Stop::Bad) => Verdict::Invalid,
    }
}

fn vocabulary() -> (Vec<String>, Vec<bool>) {
    let tok = Tokenizer::from_file(&tiny_needle("tokenizer.model")).unwrap();
    let texts = tok.token_texts();
    let usable = (0..texts.len() as u32)
        .map(|id| {
            matches!(tok.kind(id), Some(PieceKind::Normal | PieceKind::Byte))
                && id != MARKER
                && id != 5
        })
        .collect();
    (texts, usable)
}

#[test]
fn the_direct_check_reads_the_language() {
    let tools = tools();
    let ok = |t: &str| direct(t, &tools);
    assert_eq!(ok(" []"), Verdict::Complete);
    assert_eq!(
        ok("[{\"name\":\"stop\",\"arguments\":{}}]"),
        Verdict::Complete
    );
    assert_eq!(
        ok("[{\"name\":\"tip\",\"arguments\":{\"amount\":1.5,\"percent\":10,\"unit\":null}}]"),
        Verdict::Complete
    );
    assert_eq!(
        ok("[{\"name\":\"tip\",\"arguments\":{\"amount\":1.5,\"unit\":\"c\",\"percent\":10}}]"),
        Verdict::Invalid
    );
    assert_eq!(
        ok("[{\"name\":\"set_timer\",\"arguments\":{}}]"),
        Verdict::Invalid
    );
    assert_eq!(
        ok("[{\"name\":\"set_timer\",\"arguments\":{\"minutes\":01"),
        Verdict::Invalid
    );
    assert_eq!(
        ok("[{\"name\":\"set_timer\",\"arguments\":{\"minutes\":-1"),
        Verdict::Prefix
    );
    assert_eq!(ok("[{\"name\":\"set_t"), Verdict::Prefix);
    assert_eq!(ok("[{\"name\":\"set_x"), Verdict::Invalid);
    assert_eq!(ok("[] "), Verdict::Invalid);
}

#[test]
fn tables_allow_exactly_the_tokens_that_keep_the_text_valid() {
    let tools = tools();
    let (texts, usable) = vocabulary();
    let tables = StrictTables::new(&texts, &usable, &tools, MARKER, EOS);
    // Classes are shared: far fewer than states.
    assert!(tables.acc_start.len() - 1 < tables.n_states(), "classes");
    let mut rng = Rng(0x5eed_57c1);
    let (mut checked, mut completes, mut dependent_walks) = (0usize, 0usize, 0usize);
    for seq in 0..60 {
        let mut text = String::new();
        let mut m = Strict::new(&tables);
        assert_eq!(m.allowed(None), Some(vec![MARKER]));
        m.feed_token(MARKER);
        for _ in 0..50 {
            let state = m.state();
            assert_ne!(state, DEAD);
            let verdict = direct(&text, &tools);
            assert_eq!(
                verdict == Verdict::Complete,
                m.is_complete(),
                "sequence {seq}: {text:?}"
            );
            if m.is_complete() {
                completes += 1;
                assert_eq!(m.allowed(None), Some(vec![EOS]));
                break;
            }
            let allowed = m.allowed(None).expect("constrained");
            assert!(!allowed.is_empty(), "{text:?}");
            assert_eq!(m.allowed(Some(10_000)).as_ref(), Some(&allowed));
            // Under a budget: exactly the allowed tokens whose state can still be closed in time.
            for r in 0..20 {
                let want: Vec<u32> = allowed
                    .iter()
                    .copied()
                    .filter(|&id| {
                        tables.need[tables.walk(state, &texts[id as usize]) as usize] as usize <= r
                    })
                    .collect();
                assert_eq!(m.allowed(Some(r)), Some(want), "{text:?} with {r} left");
            }
            let c = tables.class[state as usize] as usize;
            dependent_walks += (tables.dep_start[c + 1] - tables.dep_start[c]) as usize;
            for (id, t) in texts.iter().enumerate() {
                let id = id as u32;
                let want = usable[id as usize]
                    && !t.is_empty()
                    && direct(&format!("{text}{t}"), &tools) != Verdict::Invalid;
                let got = allowed.binary_search(&id).is_ok();
                assert_eq!(
                    got, want,
                    "sequence {seq}: after {text:?}, token {id} {t:?}"
                );
                if usable[id as usize] && !t.is_empty() {
                    assert_eq!(tables.walk(state, t) != DEAD, want, "token {id} {t:?}");
                }
                checked += 1;
            }
            // Mostly a random allowed token, sometimes one that closes something.
            let closing: Vec<u32> = allowed
                .iter()
                .copied()
                .filter(|&id| texts[id as usize].contains(['"', ',', '}', ']']))
                .collect();
            let next = if !closing.is_empty() && rng.chance(40) {
                *rng.pick(&closing)
            } else {
                *rng.pick(&allowed)
            };
            text.push_str(&texts[next as usize]);
            m.feed_token(next);
        }
    }
    assert!(checked > 100_000, "{checked}");
    assert!(completes > 5, "{completes}");
    // The run-time part is small next to a scan of the vocabulary.
    assert!(
        dependent_walks < checked / 10,
        "{dependent_walks} of {checked}"
    );
}

#[test]
fn under_a_budget_the_list_is_always_closed_in_time() {
    let tools = tools();
    let (texts, usable) = vocabulary();
    let tables = StrictTables::new(&texts, &usable, &tools, MARKER, EOS);
    let mut rng = Rng(7);
    let min = tables.min_tokens() as usize;
    assert!((1..=2).contains(&min), "`[]` takes {min} tokens");
    for budget in min..40 {
        for _ in 0..20 {
            let mut m = Strict::new(&tables);
            m.feed_token(MARKER);
            let mut text = String::new();
            let mut left = budget;
            while !m.is_complete() {
                assert!(left > 0, "budget {budget}: ran out at {text:?}");
                let allowed = m.allowed(Some(left - 1)).expect("constrained");
                assert!(!allowed.is_empty(), "budget {budget}: stuck at {text:?}");
                let next = *rng.pick(&allowed);
                text.push_str(&texts[next as usize]);
                m.feed_token(next);
                left -= 1;
            }
            assert_eq!(direct(&text, &tools), Verdict::Complete, "{text:?}");
        }
    }
}

#[test]
fn a_forced_token_outside_the_language_leaves_the_step_unconstrained() {
    let tools = tools();
    let (texts, usable) = vocabulary();
    let tables = StrictTables::new(&texts, &usable, &tools, MARKER, EOS);
    let mut m = Strict::new(&tables);
    m.feed_token(EOS + 1);
    assert_eq!(m.state(), DEAD);
    assert_eq!(m.allowed(Some(5)), None);
}

#[test]
fn schemas_come_from_the_normalized_list_and_unsupported_ones_are_named() {
    let list = r#"[{"name":"get_weather","description":"d","parameters":{"location":{"type":"string","description":"x","required":true},"unit":{"type":"string","enum":["celsius","fahrenheit"],"required":false},"days":{"type":"array","items":{"type":"integer"},"required":false},"where":{"type":"object","properties":{"lat":{"type":"number"},"lon":{"type":"number"}},"required":["lat"]}}}]"#;
    let got = schemas(list, &["getWeather".into()]).unwrap();
    assert_eq!(got[0].name, "get_weather");
    let p = &got[0].params;
    assert_eq!(
        (p[0].key.as_str(), p[0].required, &p[0].schema),
        ("location", true, &Schema::String)
    );
    assert_eq!(
        p[1].schema,
        Schema::Enum(vec!["\"celsius\"".into(), "\"fahrenheit\"".into()])
    );
    assert_eq!(p[2].schema, Schema::Array(Box::new(Schema::Integer)));
    assert_eq!(
        p[3].schema,
        Schema::Object(vec![
            prop("lat", true, Schema::Number),
            prop("lon", false, Schema::Number)
        ])
    );

    let bad = |spec: &str| {
        let list = format!(r#"[{{"name":"book_trip","parameters":{{"when":{spec}}}}}]"#);
        schemas(&list, &["bookTrip".into()]).unwrap_err()
    };
    for (spec, key, what) in [
        (r#"{"type":"date"}"#, "when", "\"date\""),
        (r#"{"description":"no type"}"#, "when", "no \"type\""),
        (r#"{"type":["string","null"]}"#, "when", "not one type name"),
        (r#"{"type":"array"}"#, "when", "without \"items\""),
        (
            r#"{"type":"array","items":{"type":"tuple"}}"#,
            "when[]",
            "\"tuple\"",
        ),
        (r#"{"type":"object"}"#, "when", "without \"properties\""),
        (
            r#"{"type":"object","properties":{"x":{}}}"#,
            "when.x",
            "no \"type\"",
        ),
        (
            r#"{"type":"string","enum":[1,2]}"#,
            "when",
            "no value of the declared type",
        ),
        (r#"{"enum":[{"a":1}]}"#, "when", "not a scalar"),
    ] {
        let err = bad(spec);
        let StrictError::Unsupported {
            tool,
            key: k,
            what: w,
        } = &err
        else {
            panic!("{spec}: {err}");
        };
        assert_eq!((tool.as_str(), k.as_str()), ("bookTrip", key), "{spec}");
        assert!(w.contains(what), "{spec}: {w}");
        let message = err.to_string();
        assert!(
            message.contains("\"bookTrip\"") && message.contains(&format!("{key:?}")),
            "{message}"
        );
        assert!(message.contains("--grammar reference"), "{message}");
    }
}

#[test]
fn token_lists_are_stored_once_per_class_and_the_run_time_part_is_small() {
    let (texts, usable) = vocabulary();
    let list = std::fs::read_to_string(tiny_needle("tools.json")).unwrap();
    let tools = schemas(&list, &[]).unwrap();
    let tables = StrictTables::new(&texts, &usable, &tools, MARKER, EOS);
    let n_classes = tables.acc_start.len() - 1;
    let len = |start: &[u32], c: usize| (start[c + 1] - start[c]) as usize;
    // What per-state lists would hold, against what the per-class lists hold.
    let per_state: usize = tables
        .class
        .iter()
        .map(|&c| len(&tables.acc_start, c as usize))
        .sum();
    assert!(
        tables.accepted.len() * 3 < per_state,
        "{} stored, {per_state} per state",
        tables.accepted.len()
    );
    // No class leaves more than a few dozen tokens to the run-time walk, against a vocabulary of
    // 2048.
    let worst = (0..n_classes)
        .map(|c| len(&tables.dep_start, c))
        .max()
        .unwrap();
    assert!(worst < 100, "{worst}");
    // `[]` is one token here (`▁[]`); a call needs a dozen or so.
    assert_eq!(tables.min_tokens(), 1);
    let max_need = tables
        .need
        .iter()
        .filter(|&&n| n != u32::MAX)
        .max()
        .unwrap();
    assert!((8..30).contains(max_need), "{max_need}");
}
