//! The Needle 3 answer from generated text: the output envelope read exactly as the runtime's
//! `needle_runtime::needle3::engine::read_envelope` reads it, and the calls written by the
//! output code's `postprocess` (built with `ensure_ascii` off, the tool names mapped to
//! themselves):
//!
//! ```text
//! [<think>\nREASONING\n</think>\n]<tool_call>CALLS</tool_call><|im_end|>
//! ```
//!
//! `int32_t answer(const uint8_t *text, size_t len, uint8_t *out, size_t cap, size_t *out_len,
//! uint8_t *scratch, int32_t tool[2], size_t reasoning[3])`: the statuses, `out`, `cap`,
//! `scratch` and `tool` are `postprocess`'s (`tool[1]` is the runtime's `parsed`). The
//! reasoning is a span of `text`: `reasoning[0]` its start, `reasoning[1]` its length,
//! `reasoning[2]` 1 when there is one. Whitespace is trimmed as Rust's `str::trim` trims it
//! (Unicode `White_Space`), as the runtime does.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, Value};
use cranelift_frontend::Variable;
use cranelift_module::FuncId;

use crate::abi::CType;
use crate::codegen::bytes::{byte_at, copy_bytes, flag, in_range, to_ptr, while_loop};
use crate::codegen::gen::{mem, Gen};
use crate::codegen::output::OutputCode;
use crate::codegen::{CodegenError, KernelSet};

const THINK: &[u8] = b"<think>";
const THINK_END: &[u8] = b"</think>";
const TOOL_CALL: &[u8] = b"<tool_call>";
const TOOL_CALL_END: &[u8] = b"</tool_call>";

/// The generated answer function.
#[derive(Clone, Copy, Debug)]
pub struct AnswerCode {
    pub answer: FuncId,
}

/// Defines `answer` (exported when `export`) over `output`'s `postprocess`.
pub fn define_answer(
    ks: &mut KernelSet,
    output: &OutputCode,
    export: bool,
) -> Result<AnswerCode, CodegenError> {
    use CType::{ConstU8Ptr, I32Ptr, SizePtr, SizeT, U8Ptr, I32};
    let answer = ks.declare_function(
        "answer",
        &[
            "The answer of generated text: the calls after <tool_call> as postprocess writes",
            "them (same statuses, out, scratch and tool), and reasoning[0..3] = the <think>",
            "block's trimmed span in text (start, length) and 1 when there is one.",
        ],
        &[
            (ConstU8Ptr, "text"),
            (SizeT, "len"),
            (U8Ptr, "out"),
            (SizeT, "cap"),
            (SizePtr, "out_len"),
            (U8Ptr, "scratch"),
            (I32Ptr, "tool"),
            (SizePtr, "reasoning"),
        ],
        I32,
        export,
    )?;
    let post = output.postprocess;
    let valid = output.validate_utf8;
    ks.define_function(answer, &[], &[post, valid], |g, a, _, f| {
        let (text, len, out, cap, out_len, scratch, tool, reasoning) =
            (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
        let post = f.get(post);
        let valid = f.get(valid);
        let ptr = g.ptr;
        let zero = g.iconst(0);
        for k in 0..3 {
            g.b.ins().store(mem(), zero, reasoning, 8 * k);
        }
        g.b.ins().store(mem(), zero, out_len, 0);
        let has_tool = g.b.ins().icmp_imm_u(IntCC::NotEqual, tool, 0);
        g.if_then(has_tool, |g| {
            let m1 = g.b.ins().iconst(types::I32, -1);
            g.b.ins().store(mem(), m1, tool, 0);
            let z = g.b.ins().iconst(types::I32, 0);
            g.b.ins().store(mem(), z, tool, 4);
        });
        // The trims below step over whole characters: the text must be UTF-8 (as postprocess
        // requires; detokenized text always is).
        let ok = g.call(valid, &[text, len]).expect("returns");
        let bad = g.b.ins().icmp_imm_u(IntCC::Equal, ok, 0);
        g.if_then(bad, |g| {
            let st = g.b.ins().iconst(
                types::I32,
                i64::from(crate::codegen::output::STATUS_INVALID_UTF8),
            );
            g.ret(&[st]);
        });
        let t = Text { text, len };
        let rest = t.trim_start(g, zero);
        let rest = g.var(ptr, rest);
        let r = g.get(rest);
        let think = t.starts_with(g, r, THINK);
        g.if_then(think, |g| {
            let r = g.get(rest);
            let after = g.b.ins().iadd_imm_s(r, THINK.len() as i64);
            let end = t.find(g, after, THINK_END);
            let found = g.b.ins().icmp(IntCC::NotEqual, end, len);
            g.if_else(
                found,
                |g| {
                    let s = t.trim_start(g, after);
                    let e = t.trim_end(g, s, end);
                    let n = g.b.ins().isub(e, s);
                    let some = g.b.ins().icmp_imm_u(IntCC::NotEqual, n, 0);
                    g.if_then(some, |g| {
                        g.b.ins().store(mem(), s, reasoning, 0);
                        g.b.ins().store(mem(), n, reasoning, 8);
                        let one = g.iconst(1);
                        g.b.ins().store(mem(), one, reasoning, 16);
                    });
                    let tail = g.b.ins().iadd_imm_s(end, THINK_END.len() as i64);
                    let tail = t.trim_start(g, tail);
                    g.set(rest, tail);
                },
                |g| {
                    // An unclosed block: all of it is the reasoning, and there are no calls.
                    let s = t.trim_start(g, after);
                    let e = t.trim_end(g, s, len);
                    let n = g.b.ins().isub(e, s);
                    g.b.ins().store(mem(), s, reasoning, 0);
                    g.b.ins().store(mem(), n, reasoning, 8);
                    let one = g.iconst(1);
                    g.b.ins().store(mem(), one, reasoning, 16);
                    let st = g.b.ins().iconst(types::I32, 0);
                    g.ret(&[st]);
                },
            );
        });
        let r = g.get(rest);
        let calls = t.starts_with(g, r, TOOL_CALL);
        let no_calls = g.b.ins().icmp_imm_u(IntCC::Equal, calls, 0);
        g.if_then(no_calls, |g| {
            // No `<tool_call>`: the rest as generated.
            let r = g.get(rest);
            let n = g.b.ins().isub(len, r);
            g.b.ins().store(mem(), n, out_len, 0);
            let small = g.b.ins().icmp(IntCC::UnsignedGreaterThan, n, cap);
            g.if_then(small, |g| {
                let st = g.b.ins().iconst(
                    types::I32,
                    i64::from(crate::codegen::output::STATUS_TOO_SMALL),
                );
                g.ret(&[st]);
            });
            let src = g.b.ins().iadd(text, r);
            copy_bytes(g, mem(), ptr, src, out, n);
            let st = g.b.ins().iconst(types::I32, 0);
            g.ret(&[st]);
        });
        // `<tool_call>` up to the first `</tool_call>` (or the end): postprocess strips the
        // opening marker and parses the rest.
        let r = g.get(rest);
        let after = g.b.ins().iadd_imm_s(r, TOOL_CALL.len() as i64);
        let end = t.find(g, after, TOOL_CALL_END);
        let n = g.b.ins().isub(end, r);
        let src = g.b.ins().iadd(text, r);
        g.call(post, &[src, n, out, cap, out_len, scratch, tool])
    })?;
    Ok(AnswerCode { answer })
}

/// The text being read.
struct Text {
    text: Value,
    len: Value,
}

impl Text {
    /// The byte at `i` (only where `i < len`).
    fn at(&self, g: &mut Gen<'_>, i: Value) -> Value {
        byte_at(g, mem(), self.text, i)
    }

    /// Whether `text[i..]` starts with `lit` (pointer-sized 0 / 1).
    fn starts_with(&self, g: &mut Gen<'_>, i: Value, lit: &[u8]) -> Value {
        let hit = flag(g, false);
        let end = g.b.ins().iadd_imm_s(i, lit.len() as i64);
        let fits =
            g.b.ins()
                .icmp(IntCC::UnsignedLessThanOrEqual, end, self.len);
        g.if_then(fits, |g| {
            let mut all = g.b.ins().iconst(types::I8, 1);
            for (k, &c) in lit.iter().enumerate() {
                let p = g.b.ins().iadd_imm_s(i, k as i64);
                let b = self.at(g, p);
                let eq = g.b.ins().icmp_imm_u(IntCC::Equal, b, i64::from(c));
                all = g.b.ins().band(all, eq);
            }
            let ptr = g.ptr;
            let all = g.b.ins().uextend(ptr, all);
            g.set(hit, all);
        });
        g.get(hit)
    }

    /// The first `i >= from` where `text[i..]` starts with `lit`, or `len`.
    fn find(&self, g: &mut Gen<'_>, from: Value, lit: &[u8]) -> Value {
        let ptr = g.ptr;
        let i = g.var(ptr, from);
        let found = flag(g, false);
        while_loop(
            g,
            |g| {
                let f = g.get(found);
                let not = g.b.ins().icmp_imm_u(IntCC::Equal, f, 0);
                let iv = g.get(i);
                let room = g.b.ins().iadd_imm_s(iv, lit.len() as i64);
                let fits =
                    g.b.ins()
                        .icmp(IntCC::UnsignedLessThanOrEqual, room, self.len);
                g.b.ins().band(not, fits)
            },
            |g| {
                let iv = g.get(i);
                let hit = self.starts_with(g, iv, lit);
                g.set(found, hit);
                let no = g.b.ins().icmp_imm_u(IntCC::Equal, hit, 0);
                g.if_then(no, |g| {
                    let next = g.b.ins().iadd_imm_s(iv, 1);
                    g.set(i, next);
                });
            },
        );
        let f = g.get(found);
        let f = g.b.ins().icmp_imm_u(IntCC::NotEqual, f, 0);
        let iv = g.get(i);
        g.b.ins().select(f, iv, self.len)
    }

    /// Bytes of the white-space character starting at `i` (0: none there).
    fn space_at(&self, g: &mut Gen<'_>, i: Value, end: Value) -> Value {
        let ptr = g.ptr;
        let zero = g.iconst(0);
        let n = g.var(ptr, zero);
        let b: Vec<Variable> = (0..3).map(|_| g.var(ptr, zero)).collect();
        for (k, v) in b.iter().enumerate() {
            let p = g.b.ins().iadd_imm_s(i, k as i64);
            let inside = g.b.ins().icmp(IntCC::UnsignedLessThan, p, end);
            let v = *v;
            g.if_then(inside, |g| {
                let x = self.at(g, p);
                let x = to_ptr(g, x);
                // 0x100 + byte: never 0, so a missing byte matches nothing below.
                let x = g.b.ins().iadd_imm_s(x, 0x100);
                g.set(v, x);
            });
        }
        let (b0, b1, b2) = (g.get(b[0]), g.get(b[1]), g.get(b[2]));
        let eq =
            |g: &mut Gen<'_>, x: Value, c: i64| g.b.ins().icmp_imm_u(IntCC::Equal, x, 0x100 + c);
        // One byte: \t \n \v \f \r and space.
        let ctl = in_range(g, b0, 0x109, 0x10D);
        let sp = eq(g, b0, 0x20);
        let one = g.b.ins().bor(ctl, sp);
        // Two: U+0085, U+00A0.
        let c2 = eq(g, b0, 0xC2);
        let x85 = eq(g, b1, 0x85);
        let xa0 = eq(g, b1, 0xA0);
        let t = g.b.ins().bor(x85, xa0);
        let two = g.b.ins().band(c2, t);
        // Three: U+1680, U+2000..=U+200A, U+2028, U+2029, U+202F, U+205F, U+3000.
        let e1 = eq(g, b0, 0xE1);
        let e2 = eq(g, b0, 0xE2);
        let e3 = eq(g, b0, 0xE3);
        let x9a = eq(g, b1, 0x9A);
        let x80 = eq(g, b1, 0x80);
        let x81 = eq(g, b1, 0x81);
        let y80 = eq(g, b2, 0x80);
        let u1680 = g.b.ins().band(e1, x9a);
        let u1680 = g.b.ins().band(u1680, y80);
        let low = in_range(g, b2, 0x180, 0x18A);
        let ya8 = eq(g, b2, 0xA8);
        let ya9 = eq(g, b2, 0xA9);
        let yaf = eq(g, b2, 0xAF);
        let any = g.b.ins().bor(low, ya8);
        let any = g.b.ins().bor(any, ya9);
        let any = g.b.ins().bor(any, yaf);
        let u20 = g.b.ins().band(e2, x80);
        let u20 = g.b.ins().band(u20, any);
        let y9f = eq(g, b2, 0x9F);
        let u205f = g.b.ins().band(e2, x81);
        let u205f = g.b.ins().band(u205f, y9f);
        let u3000 = g.b.ins().band(e3, x80);
        let u3000 = g.b.ins().band(u3000, y80);
        let three = g.b.ins().bor(u1680, u20);
        let three = g.b.ins().bor(three, u205f);
        let three = g.b.ins().bor(three, u3000);
        let n1 = g.iconst(1);
        let n2 = g.iconst(2);
        let n3 = g.iconst(3);
        let r = g.b.ins().select(three, n3, zero);
        let r = g.b.ins().select(two, n2, r);
        let r = g.b.ins().select(one, n1, r);
        g.set(n, r);
        g.get(n)
    }

    /// The first index at or after `i` that is not white space.
    fn trim_start(&self, g: &mut Gen<'_>, i: Value) -> Value {
        let ptr = g.ptr;
        let at = g.var(ptr, i);
        let more = flag(g, true);
        while_loop(
            g,
            |g| {
                let m = g.get(more);
                let m = g.b.ins().icmp_imm_u(IntCC::NotEqual, m, 0);
                let iv = g.get(at);
                let inside = g.b.ins().icmp(IntCC::UnsignedLessThan, iv, self.len);
                g.b.ins().band(m, inside)
            },
            |g| {
                let iv = g.get(at);
                let n = self.space_at(g, iv, self.len);
                let next = g.b.ins().iadd(iv, n);
                g.set(at, next);
                let go = g.b.ins().icmp_imm_u(IntCC::NotEqual, n, 0);
                let go = g.b.ins().uextend(ptr, go);
                g.set(more, go);
            },
        );
        g.get(at)
    }

    /// The end of `text[start..end]` with trailing white space dropped. The text is UTF-8, so
    /// a white-space character ending at `e` starts at `e - 1`, `e - 2` or `e - 3`: the first
    /// of those that starts one exactly `k` bytes long is it.
    fn trim_end(&self, g: &mut Gen<'_>, start: Value, end: Value) -> Value {
        let ptr = g.ptr;
        let at = g.var(ptr, end);
        let more = flag(g, true);
        while_loop(
            g,
            |g| {
                let m = g.get(more);
                let m = g.b.ins().icmp_imm_u(IntCC::NotEqual, m, 0);
                let e = g.get(at);
                let inside = g.b.ins().icmp(IntCC::UnsignedGreaterThan, e, start);
                g.b.ins().band(m, inside)
            },
            |g| {
                let e = g.get(at);
                let zero = g.iconst(0);
                let found = g.var(ptr, zero);
                for k in 1..=3i64 {
                    let room = g.b.ins().isub(e, start);
                    let fits =
                        g.b.ins()
                            .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, room, k);
                    let f = g.get(found);
                    let none = g.b.ins().icmp_imm_u(IntCC::Equal, f, 0);
                    let try_it = g.b.ins().band(fits, none);
                    g.if_then(try_it, |g| {
                        let s = g.b.ins().iadd_imm_s(e, -k);
                        let n = self.space_at(g, s, e);
                        let exact = g.b.ins().icmp_imm_u(IntCC::Equal, n, k);
                        g.if_then(exact, |g| {
                            let kv = g.iconst(k);
                            g.set(found, kv);
                        });
                    });
                }
                let f = g.get(found);
                let next = g.b.ins().isub(e, f);
                g.set(at, next);
                let go = g.b.ins().icmp_imm_u(IntCC::NotEqual, f, 0);
                let go = g.b.ins().uextend(ptr, go);
                g.set(more, go);
            },
        );
        g.get(at)
    }
}
