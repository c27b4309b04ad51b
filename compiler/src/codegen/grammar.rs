//! The generated grammar: the reference's constraint machine for tool names and argument keys
//! (spec section 5) as machine code over read-only tables, step for step the same as
//! [`needle_runtime::grammar::Grammar`].
//!
//! # Interface
//!
//! ```c
//! void grammar_reset(uint8_t *state);
//! void grammar_feed(uint8_t *state, int32_t token);
//! const int32_t *grammar_allowed(const uint8_t *state, size_t *n);
//! ```
//!
//! `state` is caller memory of [`GrammarCode::state_bytes`] bytes aligned to
//! [`GrammarCode::state_align`]; the library keeps nothing else, so any number of machines can
//! run at once. `grammar_allowed` returns the sorted allowed ids (pointing into read-only data)
//! and sets `*n`, or returns NULL (and sets `*n = 0`) when the step is unconstrained.
//!
//! # Tables (read-only, `u32` in the target's byte order)
//!
//! - `tok_start[V + 1]`, `tok_chars[..]`: each token's text as Unicode scalar values (UTF-32), so
//!   the machine sees exactly the `char`s the Rust grammar sees without a UTF-8 decoder.
//! - `edge_start[N + 1]`, `edge_char[E]`, `edge_child[E]`: the shared trie, as in
//!   [`GrammarTables`].
//! - `name_end[N]`: the key-trie root that a `"` closing a name at node `i` selects (`NONE` when
//!   `i` is not a complete tool name). Folds `terminal`, `node_tool` and `key_roots` into one
//!   lookup.
//! - `allowed_start[N + 1]`, `allowed_ids[..]` (`int32_t`): per-node sorted allowed ids.
//!
//! # State (`STATE_BYTES` bytes, 4-byte aligned, native-endian `u32` fields)
//!
//! | offset | field |
//! |---|---|
//! | 0 | machine state: 0 FREE, 1 IN_NAME, 2 IN_ARG_KEY |
//! | 4 | trie node of the current span (`NONE`: off the trie) |
//! | 8 | key-trie root of the tool named last (`NONE`: unknown) |
//! | 12 | nesting depth |
//! | 16 | depth of the current `"arguments":{` object |
//! | 20 | 1 while inside the arguments (offset 16 is meaningful) |
//! | 24 | 1 inside a string value |
//! | 28 | 1 after a `\` inside a string value |
//! | 32 | last character that is not space/tab/CR/LF (`NONE`: none yet) |
//! | 36 | ring-buffer position of the next character in the tail |
//! | 40 | the last 16 characters, a ring buffer (`NONE` where nothing was written yet) |
//!
//! The tail is a ring rather than the Rust grammar's shifting array: every suffix rule is at
//! most 13 characters, so reading backwards from the write position is equivalent, and `NONE`
//! (not a Unicode scalar value) in unwritten slots makes short texts never match, as the Rust
//! `tail_len` does.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, Value};
use cranelift_module::{DataId, FuncId};
use needle_runtime::grammar::{GrammarTables, NONE};

use super::bytes::{declare_u32_table, i32_at, iconst32, load_i32, store_u32, to_ptr};
use super::gen::{mem, mem_ro, Gen};
use super::{CodegenError, KernelSet};
use crate::abi::CType;

/// The generated grammar functions, for the driver.
#[derive(Clone, Copy, Debug)]
pub struct GrammarCode {
    /// `void grammar_reset(uint8_t *state)`
    pub reset: FuncId,
    /// `void grammar_feed(uint8_t *state, int32_t token)`
    pub feed: FuncId,
    /// `const int32_t *grammar_allowed(const uint8_t *state, size_t *n)`; NULL: unconstrained.
    pub allowed: FuncId,
    pub state_bytes: usize,
    pub state_align: usize,
    /// `allowed` takes a third argument, `size_t remaining`: the most tokens that may follow the
    /// one chosen now (the strict grammar, [`super::strict`]).
    pub budget: bool,
}

// Machine states, as stored at `ST_STATE`.
const FREE: i64 = 0;
const IN_NAME: i64 = 1;
const IN_ARG_KEY: i64 = 2;

// State layout (byte offsets), see the module docs.
const ST_STATE: i32 = 0;
const ST_NODE: i32 = 4;
const ST_KEY_ROOT: i32 = 8;
const ST_DEPTH: i32 = 12;
const ST_ARGS_DEPTH: i32 = 16;
const ST_IN_ARGS: i32 = 20;
const ST_IN_STRING: i32 = 24;
const ST_ESCAPE: i32 = 28;
const ST_LAST_NON_WS: i32 = 32;
const ST_TAIL_POS: i32 = 36;
const ST_TAIL: i32 = 40;
/// Ring size; a power of two so the position wraps with a mask.
const TAIL: i32 = 16;

/// Bytes of caller memory one machine needs.
pub const STATE_BYTES: usize = (ST_TAIL + 4 * TAIL) as usize;
/// Alignment of that memory (all fields are `u32`).
pub const STATE_ALIGN: usize = 4;

/// `NONE` as an i32 immediate (same bits as `u32::MAX`).
const NONE_I: i64 = NONE as i32 as i64;

/// Generates the grammar over `tables` into `ks`: functions `grammar_reset`, `grammar_feed` and
/// `grammar_allowed` (exported with the set's prefix when `export`, else local to the object),
/// plus two local helpers and the tables.
pub fn define_grammar(
    ks: &mut KernelSet,
    tables: &GrammarTables,
    export: bool,
) -> Result<GrammarCode, CodegenError> {
    let t = FlatTables::new(tables)?;
    let data = |ks: &mut KernelSet, name: &str, v: &[u32]| -> Result<DataId, CodegenError> {
        declare_u32_table(ks, &format!("grammar_{name}"), v.iter().copied(), 4)
    };
    let tok_start = data(ks, "tok_start", &t.tok_start)?;
    let tok_chars = data(ks, "tok_chars", &t.tok_chars)?;
    let edge_start = data(ks, "edge_start", &t.edge_start)?;
    let edge_char = data(ks, "edge_char", &t.edge_char)?;
    let edge_child = data(ks, "edge_child", &t.edge_child)?;
    let name_end = data(ks, "name_end", &t.name_end)?;
    let allowed_start = data(ks, "allowed_start", &t.allowed_start)?;
    let allowed_ids = data(ks, "allowed_ids", &t.allowed_ids)?;

    let n_nodes = i64::from(t.n_nodes);
    let vocab = i64::from(t.vocab);

    // ---- grammar_child(node, c) -> child or NONE (local) ---------------------------------------
    let child = ks.declare_function(
        "grammar_child",
        &[],
        &[(CType::I32, "node"), (CType::I32, "c")],
        CType::I32,
        false,
    )?;
    ks.define_function(
        child,
        &[edge_start, edge_char, edge_child],
        &[],
        |g, a, d, _| {
            let (node, c) = (a[0], a[1]);
            let (es, ec, ek) = (d.get(edge_start), d.get(edge_char), d.get(edge_child));
            // Nodes only come from the tables, but the state is caller memory: an out-of-range node
            // reads nothing and leaves the trie rather than reading past the table.
            let n = iconst32(g, n_nodes);
            let valid = g.icmp(IntCC::UnsignedLessThan, node, n);
            g.if_then(valid, |g| {
                let lo = load_ro(g, es, node, 0);
                let hi = load_ro(g, es, node, 1);
                let (lo, hi) = (to_ptr(g, lo), to_ptr(g, hi));
                // Linear scan: a node has at most one edge per distinct character of the tool names
                // (a few dozen), and the scan finds the same unique edge a binary search would.
                g.for_range(lo, hi, 1, |g, k| {
                    let ch = i32_at(g, mem_ro(), ec, k);
                    let hit = g.icmp(IntCC::Equal, ch, c);
                    g.if_then(hit, |g| {
                        let r = i32_at(g, mem_ro(), ek, k);
                        g.ret(&[r]);
                    });
                });
            });
            Some(iconst32(g, NONE_I))
        },
    )?;

    // ---- grammar_feed_char(state, c) (local) ---------------------------------------------------
    let feed_char = ks.declare_function(
        "grammar_feed_char",
        &[],
        &[(CType::U8Ptr, "state"), (CType::I32, "c")],
        CType::Void,
        false,
    )?;
    ks.define_function(feed_char, &[name_end], &[child], |g, a, d, f| {
        feed_char_body(g, a[0], a[1], d.get(name_end), f.get(child), n_nodes);
        None
    })?;

    // ---- grammar_reset(state) ------------------------------------------------------------------
    let reset = ks.declare_function(
        "grammar_reset",
        &[
            "start a grammar machine in `state` (grammar state bytes, 4-byte aligned): FREE, empty text",
        ],
        &[(CType::U8Ptr, "state")],
        CType::Void,
        export,
    )?;
    ks.define_function(reset, &[], &[], |g, a, _, _| {
        let s = a[0];
        let zero = iconst32(g, 0);
        let none = iconst32(g, NONE_I);
        for (off, v) in [
            (ST_STATE, zero),
            (ST_NODE, none),
            (ST_KEY_ROOT, none),
            (ST_DEPTH, zero),
            (ST_ARGS_DEPTH, zero),
            (ST_IN_ARGS, zero),
            (ST_IN_STRING, zero),
            (ST_ESCAPE, zero),
            (ST_LAST_NON_WS, none),
            (ST_TAIL_POS, zero),
        ] {
            store_u32(g, v, s, off);
        }
        for i in 0..TAIL {
            store_u32(g, none, s, ST_TAIL + 4 * i);
        }
        None
    })?;

    // ---- grammar_feed(state, token) ------------------------------------------------------------
    let feed = ks.declare_function(
        "grammar_feed",
        &["feed the chosen token's text to the machine; ids out of range are ignored"],
        &[(CType::U8Ptr, "state"), (CType::I32, "token")],
        CType::Void,
        export,
    )?;
    ks.define_function(feed, &[tok_start, tok_chars], &[feed_char], |g, a, d, f| {
        let (s, token) = (a[0], a[1]);
        // Unsigned compare: negative ids are huge and ignored too, as the Rust grammar's u32 ids.
        let v = iconst32(g, vocab);
        let known = g.icmp(IntCC::UnsignedLessThan, token, v);
        g.if_then(known, |g| {
            let lo = load_ro(g, d.get(tok_start), token, 0);
            let hi = load_ro(g, d.get(tok_start), token, 1);
            let (lo, hi) = (to_ptr(g, lo), to_ptr(g, hi));
            g.for_range(lo, hi, 1, |g, k| {
                let c = i32_at(g, mem_ro(), d.get(tok_chars), k);
                g.call(f.get(feed_char), &[s, c]);
            });
        });
        None
    })?;

    // ---- grammar_allowed(state, n) -------------------------------------------------------------
    let allowed = ks.declare_function(
        "grammar_allowed",
        &[
            "sorted token ids allowed next (read-only, *n of them), or NULL (*n = 0): unconstrained",
        ],
        &[(CType::ConstU8Ptr, "state"), (CType::SizePtr, "n")],
        CType::ConstI32Ptr,
        export,
    )?;
    ks.define_function(allowed, &[allowed_start, allowed_ids], &[], |g, a, d, _| {
        let (s, n_out) = (a[0], a[1]);
        let st = load_i32(g, mem(), s, ST_STATE);
        let node = load_i32(g, mem(), s, ST_NODE);
        let free = iconst32(g, FREE);
        let active = g.icmp(IntCC::NotEqual, st, free);
        // NONE is >= n_nodes, so this also covers "the span left the trie / unknown tool".
        let n = iconst32(g, n_nodes);
        let on_trie = g.icmp(IntCC::UnsignedLessThan, node, n);
        let ok = g.b.ins().band(active, on_trie);
        let pt = g.ptr;
        let zero_p = g.iconst(0);
        let count = g.var(pt, zero_p);
        let result = g.var(pt, zero_p);
        g.if_then(ok, |g| {
            let lo = load_ro(g, d.get(allowed_start), node, 0);
            let hi = load_ro(g, d.get(allowed_start), node, 1);
            let len = g.b.ins().isub(hi, lo);
            let len = to_ptr(g, len);
            let lo = to_ptr(g, lo);
            let p = g.addr(d.get(allowed_ids), lo, 4);
            // Nothing allowed falls back to unconstrained: keep NULL and 0 then.
            let zero = g.iconst(0);
            let empty = g.icmp(IntCC::Equal, len, zero);
            let p = g.b.ins().select(empty, zero, p);
            g.set(count, len);
            g.set(result, p);
        });
        // A NULL `n` is tolerated: the caller may only want the NULL / non-NULL answer.
        let zero = g.iconst(0);
        let has_n = g.icmp(IntCC::NotEqual, n_out, zero);
        g.if_then(has_n, |g| {
            let c = g.get(count);
            g.b.ins().store(mem(), c, n_out, 0);
        });
        Some(g.get(result))
    })?;

    Ok(GrammarCode {
        reset,
        feed,
        allowed,
        state_bytes: STATE_BYTES,
        state_align: STATE_ALIGN,
        budget: false,
    })
}

/// One character through the machine: `Grammar::feed_char`, rule for rule, with early returns
/// where the Rust code returns.
fn feed_char_body(
    g: &mut Gen<'_>,
    s: Value,
    c: Value,
    name_end: Value,
    child: cranelift_codegen::ir::FuncRef,
    n_nodes: i64,
) {
    // The `"` rule looks at the previous non-blank character, before this one.
    let prev_non_ws = load_i32(g, mem(), s, ST_LAST_NON_WS);

    // Append to the tail ring.
    let pos = load_i32(g, mem(), s, ST_TAIL_POS);
    let slot = g.b.ins().band_imm_s(pos, i64::from(TAIL - 1));
    let slot_p = to_ptr(g, slot);
    let at = g.addr(s, slot_p, 4);
    store_u32(g, c, at, ST_TAIL);
    let next = g.b.ins().iadd_imm_s(slot, 1);
    let next = g.b.ins().band_imm_s(next, i64::from(TAIL - 1));
    store_u32(g, next, s, ST_TAIL_POS);

    let blank = is_any(g, c, &[' ', '\t', '\r', '\n']);
    let last = g.b.ins().select(blank, prev_non_ws, c);
    store_u32(g, last, s, ST_LAST_NON_WS);

    // ---- inside a name or key span
    let state = load_i32(g, mem(), s, ST_STATE);
    let free = iconst32(g, FREE);
    let in_span = g.icmp(IntCC::NotEqual, state, free);
    g.if_then(in_span, |g| {
        let quote = is_char(g, c, '"');
        g.if_else(
            quote,
            |g| {
                let in_name = iconst32(g, IN_NAME);
                let is_name = g.icmp(IntCC::Equal, state, in_name);
                g.if_then(is_name, |g| {
                    let node = load_i32(g, mem(), s, ST_NODE);
                    let root = lookup_node(g, name_end, node, n_nodes);
                    store_u32(g, root, s, ST_KEY_ROOT);
                });
                let free = iconst32(g, FREE);
                store_u32(g, free, s, ST_STATE);
                let none = iconst32(g, NONE_I);
                store_u32(g, none, s, ST_NODE);
            },
            |g| {
                let node = load_i32(g, mem(), s, ST_NODE);
                let none = iconst32(g, NONE_I);
                let on = g.icmp(IntCC::NotEqual, node, none);
                g.if_then(on, |g| {
                    let next = g.call(child, &[node, c]).unwrap_or(none);
                    store_u32(g, next, s, ST_NODE);
                });
            },
        );
        g.ret(&[]);
    });

    // ---- inside a string value
    let in_string = load_i32(g, mem(), s, ST_IN_STRING);
    g.if_then(in_string, |g| {
        let escape = load_i32(g, mem(), s, ST_ESCAPE);
        g.if_else(
            escape,
            |g| {
                let zero = iconst32(g, 0);
                store_u32(g, zero, s, ST_ESCAPE);
            },
            |g| {
                let backslash = is_char(g, c, '\\');
                g.if_else(
                    backslash,
                    |g| {
                        let one = iconst32(g, 1);
                        store_u32(g, one, s, ST_ESCAPE);
                    },
                    |g| {
                        let quote = is_char(g, c, '"');
                        g.if_then(quote, |g| {
                            let zero = iconst32(g, 0);
                            store_u32(g, zero, s, ST_IN_STRING);
                        });
                    },
                );
            },
        );
        g.ret(&[]);
    });

    // ---- structure: closing brackets end the step
    let close = is_any(g, c, &['}', ']']);
    g.if_then(close, |g| {
        let depth = load_i32(g, mem(), s, ST_DEPTH);
        let zero = iconst32(g, 0);
        let at_zero = g.icmp(IntCC::Equal, depth, zero);
        let dec = g.b.ins().iadd_imm_s(depth, -1);
        let depth = g.b.ins().select(at_zero, depth, dec);
        store_u32(g, depth, s, ST_DEPTH);
        let brace = is_char(g, c, '}');
        let in_args = load_i32(g, mem(), s, ST_IN_ARGS);
        let args_depth = load_i32(g, mem(), s, ST_ARGS_DEPTH);
        let below = g.icmp(IntCC::UnsignedLessThan, depth, args_depth);
        let in_args_b = g.icmp(IntCC::NotEqual, in_args, zero);
        let leave = g.b.ins().band(brace, in_args_b);
        let leave = g.b.ins().band(leave, below);
        g.if_then(leave, |g| {
            let zero = iconst32(g, 0);
            store_u32(g, zero, s, ST_IN_ARGS);
        });
        g.ret(&[]);
    });

    // Opening brackets deepen (saturating, as the Rust `u32::saturating_add`) and go on.
    let open = is_any(g, c, &['{', '[']);
    let depth = load_i32(g, mem(), s, ST_DEPTH);
    let max = iconst32(g, NONE_I);
    let not_max = g.icmp(IntCC::NotEqual, depth, max);
    let bump = g.b.ins().band(open, not_max);
    let bump = g.b.ins().uextend(types::I32, bump);
    let depth = g.b.ins().iadd(depth, bump);
    store_u32(g, depth, s, ST_DEPTH);

    // ---- the first suffix rule that applies
    let in_args = load_i32(g, mem(), s, ST_IN_ARGS);
    let zero = iconst32(g, 0);
    let out_of_args = g.icmp(IntCC::Equal, in_args, zero);
    let name_open = ends_with(g, s, next, "\"name\":\"");
    let enter_name = g.b.ins().band(out_of_args, name_open);
    g.if_then(enter_name, |g| {
        let v = iconst32(g, IN_NAME);
        store_u32(g, v, s, ST_STATE);
        let root = iconst32(g, 0);
        store_u32(g, root, s, ST_NODE);
        g.ret(&[]);
    });

    let args_open = ends_with(g, s, next, "\"arguments\":{");
    g.if_then(args_open, |g| {
        store_u32(g, depth, s, ST_ARGS_DEPTH);
        let one = iconst32(g, 1);
        store_u32(g, one, s, ST_IN_ARGS);
        g.ret(&[]);
    });

    let args_depth = load_i32(g, mem(), s, ST_ARGS_DEPTH);
    let same_depth = g.icmp(IntCC::Equal, args_depth, depth);
    let in_args_b = g.icmp(IntCC::NotEqual, in_args, zero);
    let at_args = g.b.ins().band(in_args_b, same_depth);
    let after_brace = ends_with(g, s, next, "{\"");
    let after_comma = ends_with(g, s, next, ",\"");
    let key_open = g.b.ins().bor(after_brace, after_comma);
    let enter_key = g.b.ins().band(at_args, key_open);
    g.if_then(enter_key, |g| {
        let v = iconst32(g, IN_ARG_KEY);
        store_u32(g, v, s, ST_STATE);
        let root = load_i32(g, mem(), s, ST_KEY_ROOT);
        store_u32(g, root, s, ST_NODE);
        g.ret(&[]);
    });

    let quote = is_char(g, c, '"');
    let colon = iconst32(g, i64::from(u32::from(':')));
    let after_colon = g.icmp(IntCC::Equal, prev_non_ws, colon);
    let opens = g.b.ins().band(quote, after_colon);
    g.if_then(opens, |g| {
        let one = iconst32(g, 1);
        store_u32(g, one, s, ST_IN_STRING);
    });
}

/// Whether the tail (whose next write position is `next`) ends with `pat`.
fn ends_with(g: &mut Gen<'_>, s: Value, next: Value, pat: &str) -> Value {
    let mut all: Option<Value> = None;
    for (k, ch) in pat.chars().rev().enumerate() {
        let i = g.b.ins().iadd_imm_s(next, -(k as i64 + 1));
        let i = g.b.ins().band_imm_s(i, i64::from(TAIL - 1));
        let i = to_ptr(g, i);
        let at = g.addr(s, i, 4);
        let v = load_i32(g, mem(), at, ST_TAIL);
        let eq = is_char(g, v, ch);
        all = Some(match all {
            Some(a) => g.b.ins().band(a, eq),
            None => eq,
        });
    }
    all.unwrap_or_else(|| g.b.ins().iconst(types::I8, 1))
}

/// `table[node]` when `node < n_nodes`, else `NONE`; branch-free, never reads out of range.
fn lookup_node(g: &mut Gen<'_>, table: Value, node: Value, n_nodes: i64) -> Value {
    let n = iconst32(g, n_nodes);
    let valid = g.icmp(IntCC::UnsignedLessThan, node, n);
    let zero = iconst32(g, 0);
    let idx = g.b.ins().select(valid, node, zero);
    let v = load_ro(g, table, idx, 0);
    let none = iconst32(g, NONE_I);
    g.b.ins().select(valid, v, none)
}

fn is_char(g: &mut Gen<'_>, v: Value, ch: char) -> Value {
    let k = iconst32(g, i64::from(u32::from(ch)));
    g.icmp(IntCC::Equal, v, k)
}

fn is_any(g: &mut Gen<'_>, v: Value, chars: &[char]) -> Value {
    let mut any: Option<Value> = None;
    for &ch in chars {
        let eq = is_char(g, v, ch);
        any = Some(match any {
            Some(a) => g.b.ins().bor(a, eq),
            None => eq,
        });
    }
    any.unwrap_or_else(|| g.b.ins().iconst(types::I8, 0))
}

/// `table[idx + extra]` for a u32 table and an i32 index.
fn load_ro(g: &mut Gen<'_>, table: Value, idx: Value, extra: i32) -> Value {
    let i = to_ptr(g, idx);
    let p = g.addr(table, i, 4);
    load_i32(g, mem_ro(), p, 4 * extra)
}

/// The tables as generated code reads them, checked for consistency so that the code never
/// indexes out of range.
struct FlatTables {
    vocab: u32,
    n_nodes: u32,
    tok_start: Vec<u32>,
    tok_chars: Vec<u32>,
    edge_start: Vec<u32>,
    edge_char: Vec<u32>,
    edge_child: Vec<u32>,
    name_end: Vec<u32>,
    allowed_start: Vec<u32>,
    allowed_ids: Vec<u32>,
}

impl FlatTables {
    fn new(t: &GrammarTables) -> Result<Self, CodegenError> {
        let bad = |what: &str| CodegenError::Invalid(format!("grammar tables: {what}"));
        let n = t.n_nodes();
        // Node ids and NONE must stay distinct, and the vocabulary must fit int32_t ids.
        let n_nodes = u32::try_from(n)
            .ok()
            .filter(|&n| n < NONE)
            .ok_or_else(|| bad("too many nodes"))?;
        if n == 0 {
            return Err(bad("no name-trie root"));
        }
        let vocab = t
            .token_start
            .len()
            .checked_sub(1)
            .ok_or_else(|| bad("empty token_start"))?;
        let vocab = u32::try_from(vocab)
            .ok()
            .filter(|&v| v <= i32::MAX as u32)
            .ok_or_else(|| bad("vocabulary too large"))?;
        if t.edge_start.len() != n + 1
            || t.allowed_start.len() != n + 1
            || t.node_tool.len() != n
            || t.edge_char.len() != t.edge_child.len()
        {
            return Err(bad("inconsistent array lengths"));
        }
        let monotone = |v: &[u32], end: usize| {
            v.windows(2).all(|w| w[0] <= w[1]) && v.last().is_some_and(|&l| l as usize == end)
        };
        if !monotone(&t.edge_start, t.edge_char.len())
            || !monotone(&t.allowed_start, t.allowed_ids.len())
            || t.edge_start.first() != Some(&0)
            || t.allowed_start.first() != Some(&0)
        {
            return Err(bad("offsets out of order"));
        }
        if t.edge_child.iter().any(|&c| c >= n_nodes) || t.key_roots.iter().any(|&r| r >= n_nodes) {
            return Err(bad("node out of range"));
        }
        if t.allowed_ids.iter().any(|&id| id >= vocab) {
            return Err(bad("allowed id out of range"));
        }

        let mut tok_start = Vec::with_capacity(vocab as usize + 1);
        let mut tok_chars = Vec::new();
        tok_start.push(0);
        for id in 0..vocab {
            tok_chars.extend(t.token_text(id).chars().map(u32::from));
            tok_start.push(u32::try_from(tok_chars.len()).map_err(|_| bad("texts too long"))?);
        }

        // What `Grammar::feed_char` computes when a `"` closes a name at node i.
        let name_end = (0..n)
            .map(|i| {
                if t.terminal[i] {
                    t.key_roots
                        .get(t.node_tool[i] as usize)
                        .copied()
                        .unwrap_or(NONE)
                } else {
                    NONE
                }
            })
            .collect();

        Ok(FlatTables {
            vocab,
            n_nodes,
            tok_start,
            tok_chars,
            edge_start: t.edge_start.clone(),
            edge_char: t.edge_char.clone(),
            edge_child: t.edge_child.clone(),
            name_end,
            allowed_start: t.allowed_start.clone(),
            allowed_ids: t.allowed_ids.clone(),
        })
    }
}
