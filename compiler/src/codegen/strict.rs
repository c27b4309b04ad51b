//! The generated strict schema grammar (`needlec build --grammar strict`): the character
//! automaton of [`needle_runtime::strict::StrictTables`] as machine code over read-only tables,
//! step for step the same as [`needle_runtime::strict::Strict`], behind the interface of the
//! reference grammar ([`super::grammar`]) so the driver calls it the same way:
//!
//! ```c
//! void grammar_reset(uint8_t *state);
//! void grammar_feed(uint8_t *state, int32_t token);
//! const int32_t *grammar_allowed(uint8_t *state, size_t *n, size_t remaining);
//! ```
//!
//! `remaining` is the budget: the most tokens that may follow the one chosen now (`SIZE_MAX`:
//! none; the driver passes `max_gen_len - 2 - step`). The answer is sorted; it points into
//! read-only data (the class's accepted list, when no dependent token survives and the budget
//! filters nothing) or into the state block (`*n` ids). NULL with `*n = 0`: unconstrained (the
//! text left the language after a forced token) or nothing allowed, as the reference does.
//!
//! # Tables (read-only, `u32` in the target's byte order)
//!
//! Those of [`StrictTables`] under the same names (`edge_*`, `class`, `acc_start`, `accepted`,
//! `dep_start`, `dependent`, `need`, `max_need_after`, `base`, `group_*`, `grouped`), plus each
//! token's text as Unicode scalar values (`tok_start`, `tok_chars`: UTF-32, so the code steps on
//! exactly the `char`s the runtime does) and `fixed = [marker, eos]` (the lists of the states
//! before `<tool_call>` and after the closing `]`).
//!
//! # State (`state_bytes`, 4-byte aligned, native-endian `u32` words)
//!
//! | word | field |
//! |---|---|
//! | 0 | the automaton state ([`DEAD`], [`BEFORE_MARKER`], or a state below `n_states`) |
//! | 1.. | `out`: the allowed list when it is built, as long as the largest class's accepted plus dependent lists |
//! | .. | `dep`: the dependent tokens that survive, as long as the largest dependent list |
//! | .. | `bits`: one bit per token, all clear between calls (used and cleared again when the budget filters) |
//!
//! # A step, as the runtime takes it
//!
//! The class's dependent tokens are walked from the state (the ones that stay alive and whose
//! state's `need` fits the budget survive). When `max_need_after[s]` fits the budget the answer
//! is the class's accepted list merged with the survivors; otherwise the accepted tokens of the
//! groups whose target state (`base[s] + group_to[g]`) fits are marked in `bits` with the
//! survivors and read back in id order, which is the runtime's sort.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, Value};
use cranelift_module::DataId;
use needle_runtime::strict::{StrictTables, BEFORE_MARKER, DEAD};

use super::bytes::{
    declare_u32_table, i32_at, iconst32, load_i32, store_u32, to_ptr, u32_at, while_loop,
};
use super::gen::{mem, mem_ro, Gen};
use super::grammar::GrammarCode;
use super::{CodegenError, KernelSet};
use crate::abi::CType;

/// Alignment of the state block (all fields are `u32`).
pub const STATE_ALIGN: usize = 4;

const DEAD_I: i64 = DEAD as i32 as i64;
const BEFORE_I: i64 = BEFORE_MARKER as i32 as i64;

/// Generates the strict grammar over `tables` into `ks`: `grammar_reset`, `grammar_feed` and
/// `grammar_allowed` (exported with the set's prefix when `export`), two local helpers and the
/// tables. The returned [`GrammarCode`] has `budget` set: `allowed` takes the remaining steps.
pub fn define_strict_grammar(
    ks: &mut KernelSet,
    tables: &StrictTables,
    export: bool,
) -> Result<GrammarCode, CodegenError> {
    let t = Flat::new(tables)?;
    let data = |ks: &mut KernelSet, name: &str, v: &[u32]| -> Result<DataId, CodegenError> {
        declare_u32_table(ks, &format!("grammar_strict_{name}"), v.iter().copied(), 4)
    };
    let tok_start = data(ks, "tok_start", &t.tok_start)?;
    let tok_chars = data(ks, "tok_chars", &t.tok_chars)?;
    let edge_start = data(ks, "edge_start", &tables.edge_start)?;
    let edge_lo = data(ks, "edge_lo", &tables.edge_lo)?;
    let edge_hi = data(ks, "edge_hi", &tables.edge_hi)?;
    let edge_to = data(ks, "edge_to", &tables.edge_to)?;
    let class = data(ks, "class", &tables.class)?;
    let acc_start = data(ks, "acc_start", &tables.acc_start)?;
    // One word past the end: the merge reads (and ignores) `accepted[hi]` of an empty list.
    let mut acc_padded = tables.accepted.clone();
    acc_padded.push(0);
    let accepted = data(ks, "accepted", &acc_padded)?;
    let dep_start = data(ks, "dep_start", &tables.dep_start)?;
    let dependent = data(ks, "dependent", &tables.dependent)?;
    let need = data(ks, "need", &tables.need)?;
    let max_need_after = data(ks, "max_need_after", &tables.max_need_after)?;
    let base = data(ks, "base", &tables.base)?;
    let group_start = data(ks, "group_start", &tables.group_start)?;
    let group_first = data(ks, "group_first", &tables.group_first)?;
    let group_to = data(ks, "group_to", &tables.group_to)?;
    let grouped = data(ks, "grouped", &tables.grouped)?;
    let fixed = data(ks, "fixed", &[tables.marker, tables.eos])?;

    let n_states = i64::from(t.n_states);
    let vocab = i64::from(t.vocab);
    let (start, accept) = (i64::from(tables.start), i64::from(tables.accept));
    let marker = i64::from(tables.marker);
    // Word offsets of the buffers in the state block.
    let out_at = 1i64;
    let dep_at = out_at + i64::from(t.max_out);
    let bits_at = dep_at + i64::from(t.max_dep);
    let bit_words = i64::from(t.vocab.div_ceil(32));
    let state_bytes = 4 * (bits_at + bit_words) as usize;

    // ---- strict_walk(s, token) -> state or DEAD (local) -----------------------------------------
    let walk = ks.declare_function(
        "strict_walk",
        &[],
        &[(CType::I32, "s"), (CType::I32, "token")],
        CType::I32,
        false,
    )?;
    ks.define_function(
        walk,
        &[tok_start, tok_chars, edge_start, edge_lo, edge_hi, edge_to],
        &[],
        |g, a, d, _| {
            let (s0, token) = (a[0], a[1]);
            let cur = g.var(types::I32, s0);
            // `StrictTables::text`: an id outside the vocabulary has no text (the state stays).
            let v = iconst32(g, vocab);
            let known = g.icmp(IntCC::UnsignedLessThan, token, v);
            g.if_then(known, |g| {
                let lo = load_at(g, d.get(tok_start), token, 0);
                let hi = load_at(g, d.get(tok_start), token, 1);
                let (lo, hi) = (to_ptr(g, lo), to_ptr(g, hi));
                g.for_range(lo, hi, 1, |g, k| {
                    let c = i32_at(g, mem_ro(), d.get(tok_chars), k);
                    let s = g.get(cur);
                    // A state from caller memory outside the tables steps nowhere.
                    let n = iconst32(g, n_states);
                    let valid = g.icmp(IntCC::UnsignedLessThan, s, n);
                    let dead = iconst32(g, DEAD_I);
                    g.if_else(
                        valid,
                        |g| {
                            let next = step_body(
                                g,
                                s,
                                c,
                                [
                                    d.get(edge_start),
                                    d.get(edge_lo),
                                    d.get(edge_hi),
                                    d.get(edge_to),
                                ],
                            );
                            g.set(cur, next);
                        },
                        |g| g.set(cur, dead),
                    );
                    let s = g.get(cur);
                    let is_dead = g.icmp(IntCC::Equal, s, dead);
                    g.if_then(is_dead, |g| g.ret(&[dead]));
                });
            });
            Some(g.get(cur))
        },
    )?;

    // ---- grammar_reset(state) ------------------------------------------------------------------
    let reset = ks.declare_function(
        "grammar_reset",
        &["start a strict grammar machine in `state` (grammar state bytes, 4-byte aligned): before <tool_call>"],
        &[(CType::U8Ptr, "state")],
        CType::Void,
        export,
    )?;
    ks.define_function(reset, &[], &[], |g, a, _, _| {
        let s = a[0];
        let before = iconst32(g, BEFORE_I);
        store_u32(g, before, s, 0);
        // The token bits are clear between calls of `allowed`.
        let bits = g.b.ins().iadd_imm_s(s, 4 * bits_at);
        let zero = iconst32(g, 0);
        g.for_const(0, bit_words, 1, |g, w| {
            let p = g.addr(bits, w, 4);
            store_u32(g, zero, p, 0);
        });
        None
    })?;

    // ---- grammar_feed(state, token) ------------------------------------------------------------
    let feed = ks.declare_function(
        "grammar_feed",
        &["feed the chosen token to the strict machine (Strict::feed_token)"],
        &[(CType::U8Ptr, "state"), (CType::I32, "token")],
        CType::Void,
        export,
    )?;
    ks.define_function(feed, &[], &[walk], |g, a, _, f| {
        let (sp, token) = (a[0], a[1]);
        let st = load_i32(g, mem(), sp, 0);
        let dead = iconst32(g, DEAD_I);
        let is_dead = g.icmp(IntCC::Equal, st, dead);
        g.if_then(is_dead, |g| g.ret(&[]));
        let before = iconst32(g, BEFORE_I);
        let is_before = g.icmp(IntCC::Equal, st, before);
        g.if_then(is_before, |g| {
            let m = iconst32(g, marker);
            let is_marker = g.icmp(IntCC::Equal, token, m);
            let s = iconst32(g, start);
            let dead = iconst32(g, DEAD_I);
            let next = g.b.ins().select(is_marker, s, dead);
            store_u32(g, next, sp, 0);
            g.ret(&[]);
        });
        let acc = iconst32(g, accept);
        let is_accept = g.icmp(IntCC::Equal, st, acc);
        g.if_then(is_accept, |g| {
            let dead = iconst32(g, DEAD_I);
            store_u32(g, dead, sp, 0);
            g.ret(&[]);
        });
        let next = g.call(f.get(walk), &[st, token]).expect("returns");
        store_u32(g, next, sp, 0);
        None
    })?;

    // ---- grammar_allowed(state, n, remaining) --------------------------------------------------
    let allowed = ks.declare_function(
        "grammar_allowed",
        &[
            "sorted token ids allowed next when at most `remaining` tokens may follow (SIZE_MAX: no",
            "budget): *n of them, or NULL (*n = 0): unconstrained",
        ],
        &[
            (CType::U8Ptr, "state"),
            (CType::SizePtr, "n"),
            (CType::SizeT, "remaining"),
        ],
        CType::ConstI32Ptr,
        export,
    )?;
    ks.define_function(
        allowed,
        &[
            class,
            acc_start,
            accepted,
            dep_start,
            dependent,
            need,
            max_need_after,
            base,
            group_start,
            group_first,
            group_to,
            grouped,
            fixed,
        ],
        &[walk],
        |g, a, d, f| {
            let (sp, n_out, remaining) = (a[0], a[1], a[2]);
            let pt = g.ptr;
            let zero_p = g.iconst(0);
            let count = g.var(pt, zero_p);
            let result = g.var(pt, zero_p);
            let st = load_i32(g, mem(), sp, 0);
            let done = g.b.create_block();

            // The two states with one fixed token.
            let fixed_p = d.get(fixed);
            for (which, idx) in [(BEFORE_I, 0i64), (accept, 1)] {
                let k = iconst32(g, which);
                let hit = g.icmp(IntCC::Equal, st, k);
                g.if_then(hit, |g| {
                    let p = g.b.ins().iadd_imm_s(fixed_p, 4 * idx);
                    let one = g.iconst(1);
                    g.set(result, p);
                    g.set(count, one);
                    g.b.ins().jump(done, &[]);
                    let dead = g.b.create_block();
                    g.b.seal_block(dead);
                    g.b.switch_to_block(dead);
                });
            }
            // DEAD (and anything outside the tables): unconstrained.
            let n = iconst32(g, n_states);
            let live = g.icmp(IntCC::UnsignedLessThan, st, n);
            g.if_then(live, |g| {
                let c = load_at(g, d.get(class), st, 0);
                let out = g.b.ins().iadd_imm_s(sp, 4 * out_at);
                let dep = g.b.ins().iadd_imm_s(sp, 4 * dep_at);
                let bits = g.b.ins().iadd_imm_s(sp, 4 * bits_at);
                let need_p = d.get(need);
                // need[to] <= remaining, unsigned, at pointer width.
                let fits = |g: &mut Gen<'_>, to: Value| {
                    let nd = load_at(g, need_p, to, 0);
                    let nd = to_ptr(g, nd);
                    g.icmp(IntCC::UnsignedLessThanOrEqual, nd, remaining)
                };

                // The dependent tokens that survive, in id order.
                let nd = g.var(pt, zero_p);
                let lo = load_at(g, d.get(dep_start), c, 0);
                let hi = load_at(g, d.get(dep_start), c, 1);
                let (lo, hi) = (to_ptr(g, lo), to_ptr(g, hi));
                g.for_range(lo, hi, 1, |g, k| {
                    let id = i32_at(g, mem_ro(), d.get(dependent), k);
                    let to = g.call(f.get(walk), &[st, id]).expect("returns");
                    let dead = iconst32(g, DEAD_I);
                    let alive = g.icmp(IntCC::NotEqual, to, dead);
                    g.if_then(alive, |g| {
                        let ok = fits(g, to);
                        g.if_then(ok, |g| {
                            let j = g.get(nd);
                            let p = g.addr(dep, j, 4);
                            store_u32(g, id, p, 0);
                            let j1 = g.b.ins().iadd_imm_s(j, 1);
                            g.set(nd, j1);
                        });
                    });
                });

                let a_lo = load_at(g, d.get(acc_start), c, 0);
                let a_hi = load_at(g, d.get(acc_start), c, 1);
                let (a_lo, a_hi) = (to_ptr(g, a_lo), to_ptr(g, a_hi));
                let man = load_at(g, d.get(max_need_after), st, 0);
                let man = to_ptr(g, man);
                let filtered = g.icmp(IntCC::UnsignedGreaterThan, man, remaining);
                g.if_else(
                    filtered,
                    |g| {
                        // Near the end of the budget: the groups whose state can still be closed.
                        let b0 = load_at(g, d.get(base), st, 0);
                        let g_lo = load_at(g, d.get(group_start), c, 0);
                        let g_hi = load_at(g, d.get(group_start), c, 1);
                        let (g_lo, g_hi) = (to_ptr(g, g_lo), to_ptr(g, g_hi));
                        g.for_range(g_lo, g_hi, 1, |g, gi| {
                            let rel = i32_at(g, mem_ro(), d.get(group_to), gi);
                            let to = g.b.ins().iadd(b0, rel);
                            let ok = fits(g, to);
                            g.if_then(ok, |g| {
                                let f0 = u32_at(g, mem_ro(), d.get(group_first), gi);
                                let gi1 = g.b.ins().iadd_imm_s(gi, 1);
                                let f1 = u32_at(g, mem_ro(), d.get(group_first), gi1);
                                let (f0, f1) = (to_ptr(g, f0), to_ptr(g, f1));
                                g.for_range(f0, f1, 1, |g, k| {
                                    let id = i32_at(g, mem_ro(), d.get(grouped), k);
                                    set_bit(g, bits, id);
                                });
                            });
                        });
                        let m = g.get(nd);
                        g.for_n(m, |g, k| {
                            let id = i32_at(g, mem(), dep, k);
                            set_bit(g, bits, id);
                        });
                        // Read the marks back in id order, clearing them.
                        g.for_const(0, bit_words, 1, |g, w| {
                            let p = g.addr(bits, w, 4);
                            let word = load_i32(g, mem(), p, 0);
                            let nonzero = g.b.ins().icmp_imm_u(IntCC::NotEqual, word, 0);
                            g.if_then(nonzero, |g| {
                                let zero = iconst32(g, 0);
                                store_u32(g, zero, p, 0);
                                let w32 = g.b.ins().ireduce(types::I32, w);
                                let id0 = g.b.ins().ishl_imm_u(w32, 5);
                                g.for_const(0, 32, 1, |g, bit| {
                                    let b32 = g.b.ins().ireduce(types::I32, bit);
                                    let v = g.b.ins().ushr(word, b32);
                                    let v = g.b.ins().band_imm_s(v, 1);
                                    g.if_then(v, |g| {
                                        let id = g.b.ins().iadd(id0, b32);
                                        let j = g.get(count);
                                        let q = g.addr(out, j, 4);
                                        store_u32(g, id, q, 0);
                                        let j1 = g.b.ins().iadd_imm_s(j, 1);
                                        g.set(count, j1);
                                    });
                                });
                            });
                        });
                        g.set(result, out);
                    },
                    |g| {
                        let m = g.get(nd);
                        let none_survive = g.b.ins().icmp_imm_u(IntCC::Equal, m, 0);
                        g.if_else(
                            none_survive,
                            |g| {
                                // The class's accepted list as it is.
                                let p = g.addr(d.get(accepted), a_lo, 4);
                                let len = g.b.ins().isub(a_hi, a_lo);
                                g.set(result, p);
                                g.set(count, len);
                            },
                            |g| {
                                // Merge the accepted list with the survivors (disjoint, sorted).
                                let i = g.var(pt, a_lo);
                                let j = g.var(pt, zero_p);
                                let acc = d.get(accepted);
                                while_loop(
                                    g,
                                    |g| {
                                        let i = g.get(i);
                                        let j = g.get(j);
                                        let more_a = g.icmp(IntCC::UnsignedLessThan, i, a_hi);
                                        let more_d = g.icmp(IntCC::UnsignedLessThan, j, m);
                                        g.b.ins().bor(more_a, more_d)
                                    },
                                    |g| {
                                        let iv = g.get(i);
                                        let jv = g.get(j);
                                        let more_a = g.icmp(IntCC::UnsignedLessThan, iv, a_hi);
                                        let more_d = g.icmp(IntCC::UnsignedLessThan, jv, m);
                                        // Read only in range: clamp the index, the select ignores it.
                                        let ia = g.b.ins().select(more_a, iv, a_lo);
                                        let jd = g.b.ins().select(more_d, jv, zero_p);
                                        let x = u32_at(g, mem_ro(), acc, ia);
                                        let y = u32_at(g, mem(), dep, jd);
                                        let x_first = g.icmp(IntCC::UnsignedLessThan, x, y);
                                        let no_d = g.b.ins().icmp_imm_u(IntCC::Equal, more_d, 0);
                                        let x_first = g.b.ins().bor(x_first, no_d);
                                        let take_a = g.b.ins().band(more_a, x_first);
                                        let v = g.b.ins().select(take_a, x, y);
                                        let k = g.get(count);
                                        let q = g.addr(out, k, 4);
                                        store_u32(g, v, q, 0);
                                        let k1 = g.b.ins().iadd_imm_s(k, 1);
                                        g.set(count, k1);
                                        let ta = to_ptr(g, take_a);
                                        let one = g.iconst(1);
                                        let td = g.b.ins().isub(one, ta);
                                        let i1 = g.b.ins().iadd(iv, ta);
                                        let j1 = g.b.ins().iadd(jv, td);
                                        g.set(i, i1);
                                        g.set(j, j1);
                                    },
                                );
                                g.set(result, out);
                            },
                        );
                    },
                );
            });
            g.b.ins().jump(done, &[]);
            g.b.seal_block(done);
            g.b.switch_to_block(done);
            // Nothing allowed falls back to unconstrained, as the reference: NULL and 0.
            let k = g.get(count);
            let empty = g.b.ins().icmp_imm_u(IntCC::Equal, k, 0);
            let r = g.get(result);
            let zero = g.iconst(0);
            let r = g.b.ins().select(empty, zero, r);
            // A NULL `n` is tolerated.
            let has_n = g.b.ins().icmp_imm_u(IntCC::NotEqual, n_out, 0);
            g.if_then(has_n, |g| {
                let k = g.get(count);
                g.b.ins().store(mem(), k, n_out, 0);
            });
            Some(r)
        },
    )?;

    Ok(GrammarCode {
        reset,
        feed,
        allowed,
        state_bytes,
        state_align: STATE_ALIGN,
        budget: true,
    })
}

/// One character from a valid state `s`: the edge with the largest `lo <= c` (edges are sorted
/// by `lo`), taken when its `hi >= c`; else DEAD. `StrictTables::step`.
fn step_body(g: &mut Gen<'_>, s: Value, c: Value, e: [Value; 4]) -> Value {
    let [es, elo, ehi, eto] = e;
    let lo = load_at(g, es, s, 0);
    let hi = load_at(g, es, s, 1);
    let (lo, hi) = (to_ptr(g, lo), to_ptr(g, hi));
    let pt = g.ptr;
    // One past the last edge with lo <= c (0: none).
    let zero = g.iconst(0);
    let found = g.var(pt, zero);
    g.for_range(lo, hi, 1, |g, k| {
        let l = i32_at(g, mem_ro(), elo, k);
        let le = g.icmp(IntCC::UnsignedLessThanOrEqual, l, c);
        let k1 = g.b.ins().iadd_imm_s(k, 1);
        let cur = g.get(found);
        let v = g.b.ins().select(le, k1, cur);
        g.set(found, v);
    });
    let f = g.get(found);
    let dead = iconst32(g, DEAD_I);
    let r = g.var(types::I32, dead);
    let any = g.b.ins().icmp_imm_u(IntCC::NotEqual, f, 0);
    g.if_then(any, |g| {
        let k = g.b.ins().iadd_imm_s(f, -1);
        let h = i32_at(g, mem_ro(), ehi, k);
        let ok = g.icmp(IntCC::UnsignedGreaterThanOrEqual, h, c);
        g.if_then(ok, |g| {
            let to = i32_at(g, mem_ro(), eto, k);
            g.set(r, to);
        });
    });
    g.get(r)
}

/// Sets bit `id` of the bitmap at `bits`.
fn set_bit(g: &mut Gen<'_>, bits: Value, id: Value) {
    let w = g.b.ins().ushr_imm_u(id, 5);
    let w = to_ptr(g, w);
    let p = g.addr(bits, w, 4);
    let word = load_i32(g, mem(), p, 0);
    let b = g.b.ins().band_imm_s(id, 31);
    let one = iconst32(g, 1);
    let m = g.b.ins().ishl(one, b);
    let word = g.b.ins().bor(word, m);
    store_u32(g, word, p, 0);
}

/// `table[idx + extra]` for a u32 table and an i32 index.
fn load_at(g: &mut Gen<'_>, table: Value, idx: Value, extra: i32) -> Value {
    let i = to_ptr(g, idx);
    let p = g.addr(table, i, 4);
    load_i32(g, mem_ro(), p, 4 * extra)
}

/// What the generated code needs besides [`StrictTables`]' own arrays, after checking those so
/// that the code never indexes out of range.
struct Flat {
    vocab: u32,
    n_states: u32,
    tok_start: Vec<u32>,
    tok_chars: Vec<u32>,
    /// The longest allowed list a step can build: the largest accepted plus dependent lists.
    max_out: u32,
    /// The largest dependent list.
    max_dep: u32,
}

impl Flat {
    fn new(t: &StrictTables) -> Result<Self, CodegenError> {
        let bad = |what: &str| CodegenError::Invalid(format!("strict grammar tables: {what}"));
        let n = t.class.len();
        // States and the two special values must stay distinct.
        let n_states = u32::try_from(n)
            .ok()
            .filter(|&n| n < BEFORE_MARKER)
            .ok_or_else(|| bad("too many states"))?;
        let vocab = t
            .token_start
            .len()
            .checked_sub(1)
            .ok_or_else(|| bad("empty token_start"))?;
        let vocab = u32::try_from(vocab)
            .ok()
            .filter(|&v| v <= i32::MAX as u32 - 32)
            .ok_or_else(|| bad("vocabulary too large"))?;
        let n_classes = t
            .acc_start
            .len()
            .checked_sub(1)
            .ok_or_else(|| bad("no classes"))?;
        if t.edge_start.len() != n + 1
            || t.edge_lo.len() != t.edge_hi.len()
            || t.edge_lo.len() != t.edge_to.len()
            || t.need.len() != n
            || t.max_need_after.len() != n
            || t.base.len() != n
            || t.dep_start.len() != n_classes + 1
            || t.group_start.len() != n_classes + 1
            || t.group_first.len() != t.group_to.len() + 1
        {
            return Err(bad("inconsistent array lengths"));
        }
        let monotone = |v: &[u32], end: usize| {
            v.first() == Some(&0)
                && v.windows(2).all(|w| w[0] <= w[1])
                && v.last().is_some_and(|&l| l as usize == end)
        };
        if !monotone(&t.edge_start, t.edge_lo.len())
            || !monotone(&t.acc_start, t.accepted.len())
            || !monotone(&t.dep_start, t.dependent.len())
            || !monotone(&t.group_start, t.group_to.len())
            || !monotone(&t.group_first, t.grouped.len())
        {
            return Err(bad("offsets out of order"));
        }
        if t.edge_to.iter().any(|&s| s >= n_states)
            || t.class.iter().any(|&c| c as usize >= n_classes)
            || [t.start, t.accept].iter().any(|&s| s >= n_states)
        {
            return Err(bad("state or class out of range"));
        }
        let ids = t.accepted.iter().chain(&t.dependent).chain(&t.grouped);
        if ids
            .copied()
            .chain([t.marker, t.eos])
            .any(|id| id > i32::MAX as u32)
            || t.accepted
                .iter()
                .chain(&t.grouped)
                .chain(&t.dependent)
                .any(|&id| id >= vocab)
        {
            return Err(bad("token id out of range"));
        }
        // Every group target, from every state of its class, is a state.
        for (s, &c) in t.class.iter().enumerate() {
            let c = c as usize;
            for g in t.group_start[c] as usize..t.group_start[c + 1] as usize {
                if u64::from(t.base[s]) + u64::from(t.group_to[g]) >= u64::from(n_states) {
                    return Err(bad("group target out of range"));
                }
            }
        }
        let len = |v: &[u32], c: usize| v[c + 1] - v[c];
        let max_dep = (0..n_classes)
            .map(|c| len(&t.dep_start, c))
            .max()
            .unwrap_or(0);
        let max_out = (0..n_classes)
            .map(|c| len(&t.acc_start, c) + len(&t.dep_start, c))
            .max()
            .unwrap_or(0);
        let mut tok_start = Vec::with_capacity(vocab as usize + 1);
        let mut tok_chars = Vec::new();
        tok_start.push(0);
        for id in 0..vocab {
            tok_chars.extend(t.text(id).chars().map(u32::from));
            tok_start.push(u32::try_from(tok_chars.len()).map_err(|_| bad("texts too long"))?);
        }
        Ok(Flat {
            vocab,
            n_states,
            tok_start,
            tok_chars,
            max_out,
            max_dep,
        })
    }
}
