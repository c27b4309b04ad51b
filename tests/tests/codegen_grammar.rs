//! The generated grammar (`needlec::codegen::grammar`), end to end: build it for the host with
//! the `gr_` prefix, archive it with a header, run `tests/c/grammar_harness.c` over token
//! sequences, and compare the allowed set before every step with
//! - the reference's recorded steps (`grammar_dev4k.json`), and
//! - the Rust runtime grammar on the bundled model's tokenizer and tools, over the token
//!   sequences of its sample answers and over random / mutated sequences (unknown ids,
//!   specials, byte pieces).
//!
//! Also: every supported target generates a standalone object exporting exactly the three
//! functions, and generation is deterministic.
//!
//! The strict grammar (`needlec::codegen::strict`, `tests/c/strict_harness.c`) is compared the
//! same way with [`needle_runtime::strict::Strict`], with and without a token budget, on the
//! bundled model's tools and on a tool list with every schema form the grammar expresses.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use needle_runtime::decode::strict_tables;
use needle_runtime::grammar::{Grammar, GrammarTables};
use needle_runtime::strict::{Strict, StrictTables};
use needle_runtime::tokenizer::{PieceKind, Tokenizer};
use needle_targets::{supported, Target};
use needle_test_support::{
    c, golden, read_json, tiny_needle, tool_keys, work_dir, GrammarCase, Rng, Sample,
};
use needlec::abi::write_header;
use needlec::codegen::grammar::define_grammar;
use needlec::codegen::strict::define_strict_grammar;
use needlec::codegen::KernelSet;
use needlec::emit::{check_standalone, write_archive, ArchiveMember};

const PREFIX: &str = "gr_";
const EXPORTS: [&str; 3] = ["gr_grammar_allowed", "gr_grammar_feed", "gr_grammar_reset"];

/// Numbers input files, so that runs of one harness never share one.
static NEXT_INPUT: AtomicUsize = AtomicUsize::new(0);

/// The allowed set before one step: `None` = unconstrained.
type Allowed = Option<Vec<u32>>;

/// Object bytes and header for `tables` on `target`.
fn build(target: &Target, tables: &GrammarTables) -> (Vec<u8>, String) {
    let mut ks = KernelSet::new(target, PREFIX).unwrap();
    let code = define_grammar(&mut ks, tables, true).unwrap();
    let extra = format!(
        "#define GR_STATE_BYTES {}\n#define GR_STATE_ALIGN {}\n",
        code.state_bytes, code.state_align
    );
    let header = write_header(
        "gr_grammar",
        &["needlec grammar test library"],
        &extra,
        ks.functions(),
    );
    (ks.finish().unwrap(), header)
}

fn archive(target: &Target, obj: Vec<u8>) -> Vec<u8> {
    let name = format!("grammar.{}", target.object_extension());
    write_archive(target.archive_kind(), &[ArchiveMember { name, data: obj }]).unwrap()
}

/// The harness built against a fresh grammar library for `tables`, in its own directory.
fn harness(test: &str, tables: &GrammarTables) -> PathBuf {
    let target = Target::host().expect("host target");
    let (obj, header) = build(&target, tables);
    let rep = check_standalone(&obj, PREFIX).unwrap();
    assert_eq!(rep.exports, EXPORTS);
    let dir = work_dir(test);
    c::build_harness(
        &dir,
        "gr",
        &archive(&target, obj),
        &header,
        "grammar_harness.c",
    )
}

/// Runs the harness over `seqs`; per sequence, the allowed set before each token and after the
/// last one. Ids are passed as int32 bit patterns, as a C caller would.
fn run(exe: &Path, seqs: &[Vec<u32>]) -> Vec<Vec<Allowed>> {
    let mut input = String::new();
    for s in seqs {
        input.push_str(&s.len().to_string());
        for &id in s {
            input.push(' ');
            input.push_str(&(id as i32).to_string());
        }
        input.push('\n');
    }
    // Through a file: `c::run` writes stdin before reading stdout, which would deadlock once
    // both pipes are full.
    let path = exe.with_file_name(format!(
        "input-{}.txt",
        NEXT_INPUT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, input).unwrap();
    let out = c::run(exe, &[path.to_str().unwrap()], b"");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut records = vec![Vec::new()];
    for line in text.lines() {
        match line {
            "--" => records.push(Vec::new()),
            "all" => records.last_mut().unwrap().push(None),
            ids => records
                .last_mut()
                .unwrap()
                .push(Some(ids.split(' ').map(|v| v.parse().unwrap()).collect())),
        }
    }
    assert_eq!(records.pop(), Some(vec![]), "output ends with a record");
    assert_eq!(records.len(), seqs.len());
    for (r, s) in records.iter().zip(seqs) {
        assert_eq!(r.len(), s.len() + 1);
    }
    records
}

/// The Rust runtime grammar over `seq`, in the harness's shape.
fn reference(tables: &GrammarTables, seq: &[u32]) -> Vec<Allowed> {
    let mut g = Grammar::new(tables);
    let mut steps = Vec::with_capacity(seq.len() + 1);
    for &id in seq {
        steps.push(g.allowed().map(<[u32]>::to_vec));
        g.feed_token(id);
    }
    steps.push(g.allowed().map(<[u32]>::to_vec));
    steps
}

/// Compares generated and Rust grammar at every step; returns the number of constrained steps.
fn assert_same(
    what: &str,
    tables: &GrammarTables,
    seqs: &[Vec<u32>],
    got: &[Vec<Allowed>],
) -> usize {
    let mut constrained = 0;
    for (si, (seq, got)) in seqs.iter().zip(got).enumerate() {
        let want = reference(tables, seq);
        for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g,
                w,
                "{what}: sequence {si} step {pos} (ids so far {:?})",
                &seq[..pos]
            );
            constrained += usize::from(w.is_some());
        }
    }
    constrained
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
        let ids = case.ids.clone();
        let exe = harness(&format!("grammar-golden-{ci}"), &tables);
        let got = run(&exe, std::slice::from_ref(&ids)).remove(0);
        assert_eq!(case.steps.len(), ids.len(), "case {ci}");
        for (pos, step) in case.steps.iter().enumerate() {
            let at = format!("case {ci} ({:?}) position {pos}", case.answer);
            let want: Allowed = step.allowed_ids();
            active_steps += usize::from(step.active);
            constrained_steps += usize::from(want.is_some());
            assert_eq!(got[pos], want, "{at}");
        }
        // The step after the last token has no golden entry; the Rust grammar covers it.
        assert_same(&format!("case {ci}"), &tables, &[ids], &[got]);
    }
    // Guards against a golden file that silently stopped exercising the grammar.
    assert_eq!((active_steps, constrained_steps), (80, 66));
}

/// Token ids a random sequence draws from, weighted towards what drives the machine.
struct Pools {
    vocab: u32,
    bytes: Vec<u32>,
    /// Tokens of the grammar's trigger texts, tool names and keys, and JSON punctuation.
    structural: Vec<u32>,
}

impl Pools {
    fn new(tok: &Tokenizer, tools: &[(String, Vec<String>)]) -> Pools {
        let vocab = tok.vocab_size() as u32;
        let bytes = (0..vocab)
            .filter(|&id| tok.kind(id) == Some(PieceKind::Byte))
            .collect();
        let mut texts: Vec<String> = [
            "\"name\":\"",
            "\"arguments\":{",
            "{\"",
            ",\"",
            "\"",
            ":",
            ": ",
            "}",
            "]",
            "[",
            "{",
            "\\",
            "\\\"",
            " ",
            "\n",
            "\t",
            ",",
            "[{\"name\":\"",
            "\"}}]",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (name, keys) in tools {
            texts.push(name.clone());
            texts.push(format!("{name}\""));
            texts.extend(keys.iter().cloned());
            texts.extend(keys.iter().map(|k| format!("\"{k}\":")));
        }
        let mut structural: Vec<u32> = texts.iter().flat_map(|t| tok.encode(t)).collect();
        structural.sort_unstable();
        structural.dedup();
        Pools {
            vocab,
            bytes,
            structural,
        }
    }

    fn draw(&self, r: &mut Rng) -> u32 {
        let v = self.vocab;
        match r.below(20) {
            0..=6 => r.below(v as usize) as u32,
            7..=8 => r.below(5) as u32, // specials (pad, eos, bos, unk, <tool_call>, ...)
            9..=10 if !self.bytes.is_empty() => *r.pick(&self.bytes),
            11 => *r.pick(&[v, v + 1, v + 1000, 99_999, u32::MAX, 0x8000_0000]),
            _ => *r.pick(&self.structural),
        }
    }
}

/// Random sequences, and the `base` sequences with random insertions, deletions and
/// replacements (which keep enough structure to enter names and keys often).
fn random_sequences(r: &mut Rng, pools: &Pools, base: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if i % 3 == 0 || base.is_empty() {
            let len = r.below(120);
            out.push((0..len).map(|_| pools.draw(r)).collect());
        } else {
            let mut s = base[r.below(base.len())].clone();
            let edits = 1 + r.below(6);
            for _ in 0..edits {
                let at = r.below(s.len() + 1);
                match r.below(3) {
                    0 => s.insert(at, pools.draw(r)),
                    1 if at < s.len() => {
                        s.remove(at);
                    }
                    _ if at < s.len() => s[at] = pools.draw(r),
                    _ => s.push(pools.draw(r)),
                }
            }
            out.push(s);
        }
    }
    out
}

/// Call-shaped texts with random whitespace, nesting and string contents: what reaches the
/// rules random tokens rarely do (escapes, `:` before a string after blanks, brackets and
/// `"name":"` inside strings, nested objects before a later key, names and keys off the trie).
struct TextGen<'a> {
    r: &'a mut Rng,
    tools: &'a [(String, Vec<String>)],
}

impl TextGen<'_> {
    fn ws(&mut self) -> &'static str {
        self.r
            .pick::<&str>(&["", "", "", "", " ", " ", "\n", "\t", "\r\n", "  "])
    }

    fn string(&mut self) -> String {
        let n = self.r.below(8);
        let mut s = String::from("\"");
        for _ in 0..n {
            s.push_str(self.r.pick::<&str>(&[
                "a",
                "b",
                "7",
                " ",
                ",",
                ":",
                "{",
                "}",
                "[",
                "]",
                "\\\"",
                "\\\\",
                "\\n",
                "é",
                "→",
                "\\\":",
                "\\\",\\\"",
                "\"name\":\"",
                "{\"",
                ",\"",
            ]));
        }
        // Now and then an unterminated or doubly closed string, as a model may produce.
        s.push_str(
            self.r
                .pick::<&str>(&["\"", "\"", "\"", "\"", "\"", "", "\"\""]),
        );
        s
    }

    fn value(&mut self, depth: usize, keys: &[String]) -> String {
        match self.r.below(if depth > 2 { 3 } else { 6 }) {
            0 => self.string(),
            1 => self.r.pick(&["1", "-2.5", "true", "null", "0"]).to_string(),
            2 => self.string(),
            3 => {
                let n = self.r.below(4);
                let items: Vec<String> = (0..n).map(|_| self.value(depth + 1, keys)).collect();
                let sep = format!(",{}", self.ws());
                format!("[{}]", items.join(&sep))
            }
            _ => self.object(depth + 1, keys),
        }
    }

    fn key(&mut self, keys: &[String]) -> String {
        if keys.is_empty() || self.r.below(4) == 0 {
            return self.string();
        }
        let k = keys[self.r.below(keys.len())].clone();
        match self.r.below(6) {
            0 => format!("\"{}\"", &k[..self.r.below(k.len() + 1)]),
            1 => format!("\"{k}x\""),
            _ => format!("\"{k}\""),
        }
    }

    fn object(&mut self, depth: usize, keys: &[String]) -> String {
        let n = self.r.below(4);
        let mut s = String::from("{");
        for i in 0..n {
            if i > 0 {
                s.push(',');
                s.push_str(self.ws());
            }
            let k = self.key(keys);
            s.push_str(&k);
            s.push_str(self.ws());
            s.push(':');
            s.push_str(self.ws());
            let v = self.value(depth, keys);
            s.push_str(&v);
        }
        s.push_str(self.ws());
        s.push('}');
        s
    }

    fn call(&mut self) -> String {
        let (name, keys) = if self.tools.is_empty() || self.r.below(5) == 0 {
            ("no_such_tool".to_string(), vec!["a".to_string()])
        } else {
            self.tools[self.r.below(self.tools.len())].clone()
        };
        let name = match self.r.below(6) {
            0 => name[..self.r.below(name.len() + 1)].to_string(),
            1 => format!("{name}_x"),
            _ => name,
        };
        let (w1, w2, w3) = (self.ws(), self.ws(), self.ws());
        let args = self.object(0, &keys);
        format!("{{\"name\":{w1}\"{name}\",{w2}\"arguments\":{w3}{args}}}")
    }

    fn answer(&mut self) -> String {
        let n = 1 + self.r.below(3);
        let calls: Vec<String> = (0..n).map(|_| self.call()).collect();
        let sep = format!(",{}", self.ws());
        format!("[{}]", calls.join(&sep))
    }
}

/// `<tool_call>` and the tokens of generated call texts.
fn text_sequences(
    r: &mut Rng,
    tok: &Tokenizer,
    tools: &[(String, Vec<String>)],
    n: usize,
) -> Vec<Vec<u32>> {
    let mut g = TextGen { r, tools };
    (0..n)
        .map(|_| {
            let mut ids = vec![4];
            ids.extend(tok.encode(&g.answer()));
            ids
        })
        .collect()
}

#[test]
fn matches_the_rust_grammar_on_the_bundled_model() {
    let tok = Tokenizer::from_file(&tiny_needle("tokenizer.model")).unwrap();
    let texts = tok.token_texts();
    assert_eq!(tok.piece(4), Some("<tool_call>"));
    let set = needlec::tools::load_tools_arg(tiny_needle("tools.json").to_str().unwrap()).unwrap();
    let tools: Vec<(String, Vec<String>)> = set
        .tools
        .iter()
        .map(|t| (t.name.clone(), t.param_keys.clone()))
        .collect();
    let tables = GrammarTables::new(&texts, &tools);
    let exe = harness("grammar-tiny", &tables);

    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    assert_eq!(samples.len(), 40);
    let answers: Vec<Vec<u32>> = samples
        .iter()
        .map(|s| {
            let mut ids = vec![4];
            ids.extend(tok.encode(&s.expected));
            ids
        })
        .collect();
    let got = run(&exe, &answers);
    let constrained = assert_same("samples", &tables, &answers, &got);
    // Every answer names a tool, and most have arguments: each constrains several steps.
    assert!(constrained >= 80, "only {constrained} constrained steps");

    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    let pools = Pools::new(&tok, &tools);
    let seqs = random_sequences(&mut r, &pools, &answers, 600);
    let got = run(&exe, &seqs);
    let constrained = assert_same("random", &tables, &seqs, &got);
    assert!(constrained >= 500, "only {constrained} constrained steps");

    let texts = text_sequences(&mut r, &tok, &tools, 1500);
    let mut seqs = random_sequences(&mut r, &pools, &texts, 500);
    seqs.extend(texts);
    let got = run(&exe, &seqs);
    let constrained = assert_same("generated texts", &tables, &seqs, &got);
    assert!(constrained >= 2000, "only {constrained} constrained steps");
}

#[test]
fn no_tools_and_unknown_ids_are_harmless() {
    let tok = Tokenizer::from_file(&golden("dev4k.model")).unwrap();
    let tables = GrammarTables::new(&tok.token_texts(), &[]);
    let exe = harness("grammar-empty", &tables);
    let mut seqs = vec![tok.encode("[{\"name\":\"")];
    seqs[0].extend([u32::MAX, 99_999, tok.vocab_size() as u32]);
    seqs[0].extend(tok.encode("x\",\"arguments\":{\"a\":1}}]"));
    let mut r = Rng(7);
    let pools = Pools::new(&tok, &[]);
    seqs.extend(random_sequences(&mut r, &pools, &seqs.clone(), 100));
    let got = run(&exe, &seqs);
    // An empty name trie allows nothing, so every step is unconstrained.
    assert_eq!(assert_same("no tools", &tables, &seqs, &got), 0);
}

#[test]
fn every_supported_target_generates_a_standalone_deterministic_object() {
    let tok = Tokenizer::from_file(&golden("dev4k.model")).unwrap();
    let tools = vec![
        (
            "get_weather".to_string(),
            vec!["location".to_string(), "unit".to_string()],
        ),
        ("set_timer".to_string(), vec!["minutes".to_string()]),
    ];
    let tables = GrammarTables::new(&tok.token_texts(), &tools);
    let mut triples: Vec<(&str, Vec<&str>)> = supported()
        .into_iter()
        .map(|s| (s.triple, vec![]))
        .collect();
    triples.push(("riscv64gc-unknown-linux-gnu", vec!["v"]));
    for (triple, features) in triples {
        let target = Target::with_features(triple, &features).unwrap();
        let (obj, header) = build(&target, &tables);
        let rep = check_standalone(&obj, PREFIX).unwrap_or_else(|e| panic!("{target}: {e}"));
        assert_eq!(rep.exports, EXPORTS, "{target}");
        let (again, header2) = build(&target, &tables);
        assert!(
            obj == again && header == header2,
            "{target}: not deterministic"
        );
        let ar = archive(&target, obj);
        let rep = check_standalone(&ar, PREFIX).unwrap_or_else(|e| panic!("{target} archive: {e}"));
        assert_eq!(rep.exports, EXPORTS, "{target} archive");
    }
}

// ---- the strict grammar ------------------------------------------------------------------------

/// Object bytes and header of the strict grammar over `tables` on `target`.
fn build_strict(target: &Target, tables: &StrictTables) -> (Vec<u8>, String) {
    let mut ks = KernelSet::new(target, PREFIX).unwrap();
    let code = define_strict_grammar(&mut ks, tables, true).unwrap();
    assert!(code.budget);
    let extra = format!(
        "#define GR_STATE_BYTES {}\n#define GR_STATE_ALIGN {}\n",
        code.state_bytes, code.state_align
    );
    let header = write_header(
        "gr_grammar",
        &["needlec strict grammar test library"],
        &extra,
        ks.functions(),
    );
    (ks.finish().unwrap(), header)
}

fn strict_harness(test: &str, tables: &StrictTables) -> PathBuf {
    let target = Target::host().expect("host target");
    let (obj, header) = build_strict(&target, tables);
    let rep = check_standalone(&obj, PREFIX).unwrap();
    assert_eq!(rep.exports, EXPORTS);
    c::build_harness(
        &work_dir(test),
        "gr",
        &archive(&target, obj),
        &header,
        "strict_harness.c",
    )
}

/// One strict run: the budget before the first token (`None`: none) and the tokens.
type Budgeted = (Option<usize>, Vec<u32>);

fn run_strict(exe: &Path, seqs: &[Budgeted]) -> Vec<Vec<Allowed>> {
    let mut input = String::new();
    for (budget, s) in seqs {
        let b = budget.map_or(-1, |b| b as i64);
        input.push_str(&format!("{b} {}", s.len()));
        for &id in s {
            input.push_str(&format!(" {}", id as i32));
        }
        input.push('\n');
    }
    let path = exe.with_file_name(format!(
        "input-{}.txt",
        NEXT_INPUT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, input).unwrap();
    let out = c::run(exe, &[path.to_str().unwrap()], b"");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut records = vec![Vec::new()];
    for line in text.lines() {
        match line {
            "--" => records.push(Vec::new()),
            "all" => records.last_mut().unwrap().push(None),
            ids => records
                .last_mut()
                .unwrap()
                .push(Some(ids.split(' ').map(|v| v.parse().unwrap()).collect())),
        }
    }
    assert_eq!(records.pop(), Some(vec![]), "output ends with a record");
    assert_eq!(records.len(), seqs.len());
    records
}

/// The runtime's strict machine over `seq`, in the harness's shape (an empty list, which the
/// library reports as NULL, is `None`: both mean "every id").
fn strict_reference(tables: &StrictTables, budget: Option<usize>, seq: &[u32]) -> Vec<Allowed> {
    let mut m = Strict::new(tables);
    let mut steps = Vec::with_capacity(seq.len() + 1);
    for i in 0..=seq.len() {
        let remaining = budget.map(|b| b.saturating_sub(i));
        steps.push(m.allowed(remaining).filter(|ids| !ids.is_empty()));
        if let Some(&id) = seq.get(i) {
            m.feed_token(id);
        }
    }
    steps
}

/// Compares library and runtime at every step; returns the constrained steps and how many of
/// them the budget changed (the list differs from the one without a budget).
fn assert_same_strict(
    what: &str,
    tables: &StrictTables,
    seqs: &[Budgeted],
    got: &[Vec<Allowed>],
) -> (usize, usize) {
    let (mut constrained, mut filtered) = (0, 0);
    for (si, ((budget, seq), got)) in seqs.iter().zip(got).enumerate() {
        let want = strict_reference(tables, *budget, seq);
        assert_eq!(got.len(), want.len(), "{what}: sequence {si}");
        let free = strict_reference(tables, None, seq);
        for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g,
                w,
                "{what}: sequence {si} (budget {budget:?}) step {pos} (ids so far {:?})",
                &seq[..pos]
            );
            constrained += usize::from(w.is_some());
            filtered += usize::from(w != &free[pos]);
        }
    }
    (constrained, filtered)
}

/// Walks through the runtime's allowed lists, choosing at random (mostly the lowest ids, which
/// are the punctuation, so that lists close), with a random budget or none: token sequences
/// that stay in the language and end where the budget bites.
fn strict_walks(r: &mut Rng, tables: &StrictTables, n: usize) -> Vec<Budgeted> {
    (0..n)
        .map(|i| {
            let budget = (i % 4 != 0).then(|| 2 + r.below(40));
            let mut m = Strict::new(tables);
            let mut seq = Vec::new();
            let len = budget.map_or(60, |b| b + 1);
            for k in 0..len {
                let Some(ids) = m.allowed(budget.map(|b| b.saturating_sub(k))) else {
                    break;
                };
                if ids.is_empty() {
                    break;
                }
                let id = if r.chance(50) {
                    ids[r.below(ids.len().min(8))]
                } else {
                    *r.pick(&ids)
                };
                seq.push(id);
                if id == tables.eos {
                    break;
                }
                m.feed_token(id);
            }
            (budget, seq)
        })
        .collect()
}

/// Sequences that leave the language too: random and mutated ones (unknown ids, specials, byte
/// pieces), each with a budget or none.
fn with_budgets(r: &mut Rng, seqs: Vec<Vec<u32>>) -> Vec<Budgeted> {
    seqs.into_iter()
        .map(|s| (r.chance(50).then(|| r.below(30)), s))
        .collect()
}

#[test]
fn strict_matches_the_runtime_on_the_bundled_model() {
    let tok = Tokenizer::from_file(&tiny_needle("tokenizer.model")).unwrap();
    let set = needlec::tools::load_tools_arg(tiny_needle("tools.json").to_str().unwrap()).unwrap();
    let tables = strict_tables(&tok, &set.context()).unwrap();
    let exe = strict_harness("strict-tiny", &tables);
    let tools: Vec<(String, Vec<String>)> = set
        .tools
        .iter()
        .map(|t| (t.name.clone(), t.param_keys.clone()))
        .collect();

    let samples: Vec<Sample> = read_json(&tiny_needle("samples.json"));
    let answers: Vec<Vec<u32>> = samples
        .iter()
        .map(|s| {
            let mut ids = vec![4];
            ids.extend(tok.encode(&s.expected));
            ids.push(1);
            ids
        })
        .collect();
    let mut seqs: Vec<Budgeted> = answers.iter().map(|a| (None, a.clone())).collect();
    // The same answers under budgets that fit them exactly, and one token short.
    seqs.extend(answers.iter().map(|a| (Some(a.len() - 1), a.clone())));
    seqs.extend(answers.iter().map(|a| (Some(a.len() - 2), a.clone())));
    let got = run_strict(&exe, &seqs);
    let (constrained, filtered) = assert_same_strict("samples", &tables, &seqs, &got);
    assert!(constrained >= 1000, "only {constrained} constrained steps");
    assert!(filtered > 0, "the budget never changed a list");

    let mut r = Rng(0x5EED_5EED_1234_5678);
    let mut seqs = strict_walks(&mut r, &tables, 400);
    let pools = Pools::new(&tok, &tools);
    let random = random_sequences(&mut r, &pools, &answers, 300);
    seqs.extend(with_budgets(&mut r, random));
    let texts = text_sequences(&mut r, &tok, &tools, 300);
    seqs.extend(with_budgets(&mut r, texts));
    let got = run_strict(&exe, &seqs);
    let (constrained, filtered) = assert_same_strict("random", &tables, &seqs, &got);
    assert!(constrained >= 5000, "only {constrained} constrained steps");
    assert!(filtered >= 200, "the budget changed only {filtered} lists");
}

/// Every schema form the strict grammar expresses (strings, integers, numbers, booleans, null,
/// enums, arrays, nested objects, optional keys), over the golden 4k vocabulary.
#[test]
fn strict_matches_the_runtime_on_every_schema_form() {
    let tok = Tokenizer::from_file(&golden("dev4k.model")).unwrap();
    let tools = r#"[
      {"name":"set_alarm","description":"d","parameters":{
        "hour":{"type":"integer","description":"h","required":true},
        "label":{"type":"string","description":"l","required":false},
        "ratio":{"type":"number","description":"r","required":false},
        "loud":{"type":"boolean","description":"b","required":true}}},
      {"name":"plan","description":"d","parameters":{
        "mode":{"type":"string","enum":["fast","slow","a\"b"],"description":"m","required":true},
        "tags":{"type":"array","items":{"type":"string"},"description":"t","required":false},
        "nums":{"type":"array","items":{"type":"number"},"description":"n","required":false},
        "where":{"type":"object","properties":{"lat":{"type":"number"},"lon":{"type":"number"},
                 "name":{"type":"string"}},"required":["lat","lon"],"description":"w","required":false},
        "nothing":{"type":"null","description":"z","required":false}}},
      {"name":"ping","description":"no parameters","parameters":{}}
    ]"#;
    let set = needlec::tools::load_tools_arg(tools).unwrap();
    let tables = strict_tables(&tok, &set.context()).unwrap();
    let exe = strict_harness("strict-forms", &tables);
    let mut r = Rng(42);
    let mut seqs = strict_walks(&mut r, &tables, 600);
    let texts = [
        r#"[{"name":"set_alarm","arguments":{"hour":7,"label":"wake \"up\" \u00e9\n","loud":true}}]"#,
        r#"[{"name":"plan","arguments":{"mode":"a\"b","tags":["x","y"],"nums":[1.5,-2,0.25],"where":{"lat":1,"lon":-0.5},"nothing":null}},{"name":"ping","arguments":{}}]"#,
        r#"[{"name":"set_alarm","arguments":{"hour":-12345678901234567,"ratio":3.14159,"loud":false}}]"#,
        r#"[]"#,
    ];
    let base: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            let mut ids = vec![4];
            ids.extend(tok.encode(t));
            ids.push(1);
            ids
        })
        .collect();
    let base_at = seqs.len();
    for b in &base {
        seqs.push((None, b.clone()));
        seqs.push((Some(b.len() - 1), b.clone()));
    }
    let pools = Pools::new(&tok, &[]);
    let random = random_sequences(&mut r, &pools, &base, 300);
    seqs.extend(with_budgets(&mut r, random));
    let got = run_strict(&exe, &seqs);
    let (constrained, filtered) = assert_same_strict("forms", &tables, &seqs, &got);
    // The hand-written answers are in the language: the library allows each of their tokens.
    for (k, b) in base.iter().enumerate() {
        for (pos, &id) in b.iter().enumerate() {
            let allowed = got[base_at + 2 * k][pos].as_ref();
            assert!(
                allowed.is_some_and(|a| a.contains(&id)),
                "answer {k} token {pos} ({id}) is not allowed"
            );
        }
    }
    assert!(constrained >= 5000, "only {constrained} constrained steps");
    assert!(filtered >= 200, "the budget changed only {filtered} lists");
}

#[test]
fn strict_generates_a_standalone_deterministic_object_for_every_target() {
    let tok = Tokenizer::from_file(&tiny_needle("tokenizer.model")).unwrap();
    let set = needlec::tools::load_tools_arg(tiny_needle("tools.json").to_str().unwrap()).unwrap();
    let tables = strict_tables(&tok, &set.context()).unwrap();
    let mut triples: Vec<(&str, Vec<&str>)> = supported()
        .into_iter()
        .map(|s| (s.triple, vec![]))
        .collect();
    triples.push(("riscv64gc-unknown-linux-gnu", vec!["v"]));
    for (triple, features) in triples {
        let target = Target::with_features(triple, &features).unwrap();
        let (obj, header) = build_strict(&target, &tables);
        let rep = check_standalone(&obj, PREFIX).unwrap_or_else(|e| panic!("{target}: {e}"));
        assert_eq!(rep.exports, EXPORTS, "{target}");
        let (again, header2) = build_strict(&target, &tables);
        assert!(
            obj == again && header == header2,
            "{target}: not deterministic"
        );
    }
}
