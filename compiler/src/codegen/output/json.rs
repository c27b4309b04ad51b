//! `postprocess`: the Python-exact JSON path. The text after `<tool_call>` is parsed by a state
//! machine over a node array in scratch (parent links instead of a call stack), tool names are
//! restored ([`super::names`]), and the tree is serialized compactly as `needle_runtime::pyjson`
//! does; text that is not JSON takes the text path (snake names replaced in place).

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, Block, FuncRef, InstBuilder, Value};
use cranelift_frontend::Variable;
use needle_runtime::pyjson;

use super::names::NameTables;
use super::{
    put1, utf8_seq, Helpers, Plan, NODE_BYTES, STATUS_INEXACT, STATUS_INVALID_UTF8, STATUS_OK,
    STATUS_TOO_SMALL, TOOL_CALL,
};
use crate::codegen::bytes::{
    bind, br_if, branch, byte_at, goto, in_range, label, load_u8, place, set_byte_at, set_u32_at,
    to_ptr, u32_at,
};
use crate::codegen::gen::{mem, Gen};
use crate::codegen::kernels::{Callees, DataAddrs};

/// Deepest nesting the JSON parser accepts (`pyjson::MAX_DEPTH`).
const MAX_DEPTH: i64 = pyjson::MAX_DEPTH as i64;

// ---- JSON nodes -------------------------------------------------------------------------------

/// Node layout in scratch: eight u32 fields ([`NODE_BYTES`]).
pub(super) const F_KIND: i64 = 0; // K_SCALAR, K_ARRAY, K_OBJECT
pub(super) const F_A: i64 = 1; // scalar: canonical offset; container: first child
pub(super) const F_B: i64 = 2; // scalar: canonical length; container: last child
pub(super) const F_KOFF: i64 = 3; // member key: canonical offset
pub(super) const F_KLEN: i64 = 4; // member key: canonical length, NONE for non-members
pub(super) const F_NEXT: i64 = 5; // next sibling
const F_PARENT: i64 = 6;
pub(super) const K_SCALAR: i64 = 0;
pub(super) const K_ARRAY: i64 = 1;
pub(super) const K_OBJECT: i64 = 2;
pub(super) const NONE: i64 = 0xFFFF_FFFF;

pub(super) fn nget(g: &mut Gen<'_>, nodes: Value, node: Value, field: i64) -> Value {
    let i = g.b.ins().imul_imm_s(node, (NODE_BYTES / 4) as i64);
    let i = g.b.ins().iadd_imm_s(i, field);
    u32_at(g, mem(), nodes, i)
}

pub(super) fn nset(g: &mut Gen<'_>, nodes: Value, node: Value, field: i64, v: Value) {
    let i = g.b.ins().imul_imm_s(node, (NODE_BYTES / 4) as i64);
    let i = g.b.ins().iadd_imm_s(i, field);
    set_u32_at(g, nodes, i, v);
}

// ---- postprocess ------------------------------------------------------------------------------

/// The postprocess function under construction: its arguments, layout and parser state.
pub(super) struct Post {
    out: Value,
    cap: Value,
    out_len: Value,
    names: Value,
    memeq: FuncRef,
    put: FuncRef,
    replace: FuncRef,
    restore: FuncRef,
    first_tool_json: FuncRef,
    first_tool_text: FuncRef,
    /// `int32_t tool[2]` (the first call's tool, then 1 when the text parsed as JSON), or NULL.
    tool: Value,
    body: Value,
    blen: Value,
    blen_m1: Value,
    nodes: Value,
    cbuf: Value,
    tmp: Value,
    buf_a: Value,
    buf_b: Value,
    huge: Value,
    passes: Vec<(i64, i64, i64, i64)>,
    restore_names: bool,
    /// `ensure_ascii`: non-ASCII characters as `\uXXXX` (else as their UTF-8 bytes).
    ascii: bool,
    // parser state
    pos: Variable,
    cur: Variable,
    nn: Variable,
    cl: Variable,
    depth: Variable,
    hard: Variable,
    koff: Variable,
    klen: Variable,
    node: Variable,
    vstart: Variable,
    // states
    value_l: Block,
    key_l: Block,
    after_l: Block,
    close_l: Block,
    number_l: Block,
    scalar_l: Block,
    success_l: Block,
    fail_l: Block,
}

impl Post {
    pub(super) fn new(
        g: &mut Gen<'_>,
        a: &[Value],
        d: &DataAddrs,
        tables: &NameTables,
        f: &Callees,
        helpers: &Helpers,
        plan: &Plan,
    ) -> Self {
        let (text, len, out, cap, out_len, scratch, tool) =
            (a[0], a[1], a[2], a[3], a[4], a[5], a[6]);
        let (consts, names) = (d.get(tables.consts), d.get(tables.names));
        let valid = f.get(helpers.valid);
        let memeq = f.get(helpers.memeq);
        let put = f.get(helpers.put);
        let replace = f.get(helpers.replace);
        let restore = f.get(helpers.restore);
        let first_tool_json = f.get(helpers.first_tool_json);
        let first_tool_text = f.get(helpers.first_tool_text);
        // No tool until one is found, and not parsed until the JSON parse succeeds (also what
        // an early return leaves).
        let has_tool = g.b.ins().icmp_imm_s(IntCC::NotEqual, tool, 0);
        g.if_then(has_tool, |g| {
            let m1 = g.b.ins().iconst(types::I32, -1);
            g.b.ins().store(mem(), m1, tool, 0);
            let z = g.b.ins().iconst(types::I32, 0);
            g.b.ins().store(mem(), z, tool, 4);
        });
        let passes = tables
            .passes
            .iter()
            .map(|&(so, sl, oo, ol)| (so as i64, sl as i64, oo as i64, ol as i64))
            .collect();
        let restore_names = tables.count > 0;
        let ok = g.call(valid, &[text, len]).expect("validate returns");
        let bad = g.b.ins().icmp_imm_s(IntCC::Equal, ok, 0);
        g.if_then(bad, |g| {
            let zero = g.iconst(0);
            g.b.ins().store(mem(), zero, out_len, 0);
            let st = g.b.ins().iconst(types::I32, i64::from(STATUS_INVALID_UTF8));
            g.ret(&[st]);
        });
        // `<tool_call>` prefix.
        let zero = g.iconst(0);
        let has = g.var(g.ptr, zero);
        let long = g.b.ins().icmp_imm_s(
            IntCC::UnsignedGreaterThanOrEqual,
            len,
            TOOL_CALL.len() as i64,
        );
        g.if_then(long, |g| {
            let n = g.iconst(TOOL_CALL.len() as i64);
            let eq = g.call(memeq, &[text, consts, n]).expect("memeq returns");
            let eq = to_ptr(g, eq);
            g.set(has, eq);
        });
        let hv = g.get(has);
        let skip = g.b.ins().imul_imm_s(hv, TOOL_CALL.len() as i64);
        let body = g.b.ins().iadd(text, skip);
        let blen = g.b.ins().isub(len, skip);
        let blen_m1 = g.b.ins().iadd_imm_s(blen, -1);
        // Layout from `len`, as Plan computes it.
        let nb = g.b.ins().iadd_imm_s(len, 2);
        let nb = g.b.ins().imul_imm_s(nb, NODE_BYTES as i64);
        let cbuf = g.b.ins().iadd(scratch, nb);
        let c6 = g.b.ins().imul_imm_s(len, 6);
        let c6 = g.b.ins().iadd_imm_s(c6, 16);
        let r = g.b.ins().udiv_imm_s(len, 11);
        let r = g.b.ins().iadd_imm_s(r, 1);
        let r = g.b.ins().imul_imm_s(r, plan.max_orig as i64);
        let csize = g.b.ins().iadd(c6, r);
        let tmp = g.b.ins().iadd(cbuf, csize);
        let mut x = len;
        for &(s, o) in &plan.passes {
            if o > s {
                let q = g.b.ins().udiv_imm_s(x, s as i64);
                let q = g.b.ins().imul_imm_s(q, (o - s) as i64);
                x = g.b.ins().iadd(x, q);
            }
        }
        let buf_b = g.b.ins().iadd(scratch, x);
        let huge = g.iconst(i64::MAX);
        let none = g.iconst(NONE);
        let var = |g: &mut Gen<'_>, init: Value| g.var(g.ptr, init);
        Post {
            out,
            cap,
            out_len,
            names,
            memeq,
            put,
            replace,
            restore,
            first_tool_json,
            first_tool_text,
            tool,
            body,
            blen,
            blen_m1,
            nodes: scratch,
            cbuf,
            tmp,
            buf_a: scratch,
            buf_b,
            huge,
            passes,
            restore_names,
            ascii: plan.ascii,
            pos: var(g, zero),
            cur: var(g, none),
            nn: var(g, zero),
            cl: var(g, zero),
            depth: var(g, zero),
            hard: var(g, zero),
            koff: var(g, zero),
            klen: var(g, zero),
            node: var(g, zero),
            vstart: var(g, zero),
            value_l: label(g),
            key_l: label(g),
            after_l: label(g),
            close_l: label(g),
            number_l: label(g),
            scalar_l: label(g),
            success_l: label(g),
            fail_l: label(g),
        }
    }

    // ---- small pieces ----

    /// The byte at `p`, or 256 past the end.
    fn peek_at(&self, g: &mut Gen<'_>, p: Value) -> Value {
        let inside = g.b.ins().icmp(IntCC::UnsignedLessThan, p, self.blen);
        let idx = g.b.ins().umin(p, self.blen_m1);
        let raw = byte_at(g, mem(), self.body, idx);
        let eof = g.iconst(256);
        g.b.ins().select(inside, raw, eof)
    }

    fn peek(&self, g: &mut Gen<'_>) -> Value {
        let p = g.get(self.pos);
        self.peek_at(g, p)
    }

    fn is_digit(g: &mut Gen<'_>, c: Value) -> Value {
        in_range(g, c, i64::from(b'0'), i64::from(b'9'))
    }

    fn eq(g: &mut Gen<'_>, c: Value, ch: u8) -> Value {
        g.b.ins().icmp_imm_s(IntCC::Equal, c, i64::from(ch))
    }

    fn ne(g: &mut Gen<'_>, c: Value, ch: u8) -> Value {
        g.b.ins().icmp_imm_s(IntCC::NotEqual, c, i64::from(ch))
    }

    fn advance(&self, g: &mut Gen<'_>, n: i64) {
        let p = g.get(self.pos);
        let p2 = g.b.ins().iadd_imm_s(p, n);
        g.set(self.pos, p2);
    }

    /// Python's JSON whitespace: space, tab, LF, CR.
    fn skip_ws(&self, g: &mut Gen<'_>) {
        let top = label(g);
        let done = label(g);
        bind(g, top);
        let c = self.peek(g);
        let mut is = Self::eq(g, c, b' ');
        for ch in [b'\t', b'\n', b'\r'] {
            let e = Self::eq(g, c, ch);
            is = g.b.ins().bor(is, e);
        }
        let not = g.b.ins().icmp_imm_s(IntCC::Equal, is, 0);
        br_if(g, not, done);
        self.advance(g, 1);
        goto(g, top);
        place(g, done);
    }

    /// Advances `var` over ASCII digits.
    fn digits(&self, g: &mut Gen<'_>, var: Variable) {
        let top = label(g);
        let done = label(g);
        bind(g, top);
        let v = g.get(var);
        let c = self.peek_at(g, v);
        let d = Self::is_digit(g, c);
        let not = g.b.ins().icmp_imm_s(IntCC::Equal, d, 0);
        br_if(g, not, done);
        let v2 = g.b.ins().iadd_imm_s(v, 1);
        g.set(var, v2);
        goto(g, top);
        place(g, done);
    }

    /// Appends byte `v` to the canonical buffer.
    fn wr(&self, g: &mut Gen<'_>, v: Value) {
        let c = g.get(self.cl);
        set_byte_at(g, self.cbuf, c, v);
        let c2 = g.b.ins().iadd_imm_s(c, 1);
        g.set(self.cl, c2);
    }

    fn wr_lit(&self, g: &mut Gen<'_>, s: &[u8]) {
        for &ch in s {
            let v = g.iconst(i64::from(ch));
            self.wr(g, v);
        }
    }

    /// Appends `n` bytes from `src` to the canonical buffer.
    fn cput(&self, g: &mut Gen<'_>, src: Value, n: Value) {
        let c = g.get(self.cl);
        let c2 = g
            .call(self.put, &[self.cbuf, self.huge, c, src, n])
            .expect("put returns");
        g.set(self.cl, c2);
    }

    /// `\uXXXX` with lowercase hex, as Python's `ensure_ascii`.
    fn wr_u(&self, g: &mut Gen<'_>, u: Value) {
        self.wr_lit(g, b"\\u");
        for shift in [12i64, 8, 4, 0] {
            let d = g.b.ins().ushr_imm_s(u, shift);
            let d = g.b.ins().band_imm_s(d, 15);
            let small = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, d, 10);
            let dig = g.b.ins().iadd_imm_s(d, 48);
            let hex = g.b.ins().iadd_imm_s(d, 87);
            let ch = g.b.ins().select(small, dig, hex);
            self.wr(g, ch);
        }
    }

    /// Code point `cp` (a scalar value: surrogates never reach here) as its UTF-8 bytes.
    fn wr_utf8(&self, g: &mut Gen<'_>, cp: Value) {
        let cont = |g: &mut Gen<'_>, shift: i64| {
            let c = g.b.ins().ushr_imm_s(cp, shift);
            let c = g.b.ins().band_imm_s(c, 0x3F);
            g.b.ins().bor_imm_s(c, 0x80)
        };
        let lead = |g: &mut Gen<'_>, shift: i64, mark: i64| {
            let c = g.b.ins().ushr_imm_s(cp, shift);
            g.b.ins().bor_imm_s(c, mark)
        };
        let one = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, cp, 0x80);
        g.if_else(
            one,
            |g| self.wr(g, cp),
            |g| {
                let two = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, cp, 0x800);
                g.if_else(
                    two,
                    |g| {
                        let b0 = lead(g, 6, 0xC0);
                        self.wr(g, b0);
                        let b1 = cont(g, 0);
                        self.wr(g, b1);
                    },
                    |g| {
                        let three = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, cp, 0x10000);
                        g.if_else(
                            three,
                            |g| {
                                let b0 = lead(g, 12, 0xE0);
                                self.wr(g, b0);
                            },
                            |g| {
                                let b0 = lead(g, 18, 0xF0);
                                self.wr(g, b0);
                                let b1 = cont(g, 12);
                                self.wr(g, b1);
                            },
                        );
                        let b = cont(g, 6);
                        self.wr(g, b);
                        let b = cont(g, 0);
                        self.wr(g, b);
                    },
                );
            },
        );
    }

    /// Writes code point `cp` as `json.dumps` does inside a string.
    fn emit_cp(&self, g: &mut Gen<'_>, cp: Value) {
        let mut esc = g.iconst(0);
        for (c, e) in [
            (b'"', b'"'),
            (b'\\', b'\\'),
            (b'\n', b'n'),
            (b'\r', b'r'),
            (b'\t', b't'),
            (8u8, b'b'),
            (12u8, b'f'),
        ] {
            let is = Self::eq(g, cp, c);
            let ev = g.iconst(i64::from(e));
            esc = g.b.ins().select(is, ev, esc);
        }
        let short = label(g);
        let print = label(g);
        let u4 = label(g);
        let done = label(g);
        let has_esc = g.b.ins().icmp_imm_s(IntCC::NotEqual, esc, 0);
        br_if(g, has_esc, short);
        if !self.ascii {
            // `ensure_ascii=False`: only the control characters left are escaped; everything
            // else (DEL and non-ASCII included) is written as its UTF-8 bytes.
            let control = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, cp, 0x20);
            br_if(g, control, u4);
            self.wr_utf8(g, cp);
            goto(g, done);
        }
        let printable = in_range(g, cp, 0x20, 0x7E);
        br_if(g, printable, print);
        let bmp = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, cp, 0x10000);
        br_if(g, bmp, u4);
        let c2 = g.b.ins().iadd_imm_s(cp, -0x10000);
        let hi = g.b.ins().ushr_imm_s(c2, 10);
        let hi = g.b.ins().iadd_imm_s(hi, 0xD800);
        let lo = g.b.ins().band_imm_s(c2, 0x3FF);
        let lo = g.b.ins().iadd_imm_s(lo, 0xDC00);
        self.wr_u(g, hi);
        self.wr_u(g, lo);
        goto(g, done);
        place(g, short);
        self.wr_lit(g, b"\\");
        self.wr(g, esc);
        goto(g, done);
        place(g, print);
        self.wr(g, cp);
        goto(g, done);
        place(g, u4);
        self.wr_u(g, cp);
        bind(g, done);
    }

    /// Four hex digits at `p` (all in range): (value, all-valid flag).
    fn hex4(&self, g: &mut Gen<'_>, p: Value) -> (Value, Value) {
        let mut v = g.iconst(0);
        let mut ok = g.b.ins().icmp_imm_s(IntCC::Equal, v, 0);
        for m in 0..4 {
            let at = g.b.ins().iadd_imm_s(p, m);
            let c = byte_at(g, mem(), self.body, at);
            let isd = in_range(g, c, i64::from(b'0'), i64::from(b'9'));
            let isl = in_range(g, c, i64::from(b'a'), i64::from(b'f'));
            let isu = in_range(g, c, i64::from(b'A'), i64::from(b'F'));
            let dd = g.b.ins().iadd_imm_s(c, -48);
            let dl = g.b.ins().iadd_imm_s(c, -87);
            let du = g.b.ins().iadd_imm_s(c, -55);
            let h = g.b.ins().select(isl, dl, du);
            let h = g.b.ins().select(isd, dd, h);
            let any = g.b.ins().bor(isd, isl);
            let any = g.b.ins().bor(any, isu);
            ok = g.b.ins().band(ok, any);
            let v16 = g.b.ins().ishl_imm_s(v, 4);
            v = g.b.ins().bor(v16, h);
        }
        (v, ok)
    }

    /// A string at `pos` (on its `"`): canonical form appended to the buffer; jumps to the
    /// failure state on anything `pyjson` rejects (including unpaired surrogate escapes).
    fn string(&self, g: &mut Gen<'_>) {
        let fail = self.fail_l;
        self.wr_lit(g, b"\"");
        self.advance(g, 1);
        let zero = g.iconst(0);
        let cpv = g.var(g.ptr, zero);
        let top = label(g);
        let close = label(g);
        let esc = label(g);
        let multi = label(g);
        let uesc = label(g);
        let emit = label(g);
        bind(g, top);
        let p = g.get(self.pos);
        let end =
            g.b.ins()
                .icmp(IntCC::UnsignedGreaterThanOrEqual, p, self.blen);
        br_if(g, end, fail);
        let b = byte_at(g, mem(), self.body, p);
        let q = Self::eq(g, b, b'"');
        br_if(g, q, close);
        let ctl = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, b, 0x20);
        br_if(g, ctl, fail);
        let bs = Self::eq(g, b, b'\\');
        br_if(g, bs, esc);
        let hi =
            g.b.ins()
                .icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, b, 0x80);
        br_if(g, hi, multi);
        g.set(cpv, b);
        self.advance(g, 1);
        goto(g, emit);

        // Raw non-ASCII: the text is valid UTF-8 (checked on entry).
        place(g, multi);
        let (len, cp) = utf8_seq(g, self.body, 1, p, self.blen);
        g.set(cpv, cp);
        let p2 = g.b.ins().iadd(p, len);
        g.set(self.pos, p2);
        goto(g, emit);

        place(g, esc);
        let p1 = g.b.ins().iadd_imm_s(p, 1);
        let end =
            g.b.ins()
                .icmp(IntCC::UnsignedGreaterThanOrEqual, p1, self.blen);
        br_if(g, end, fail);
        let e = byte_at(g, mem(), self.body, p1);
        let is_u = Self::eq(g, e, b'u');
        br_if(g, is_u, uesc);
        let mut cp = g.iconst(NONE);
        for (c, v) in [
            (b'"', b'"'),
            (b'\\', b'\\'),
            (b'/', b'/'),
            (b'b', 8u8),
            (b'f', 12),
            (b'n', b'\n'),
            (b'r', b'\r'),
            (b't', b'\t'),
        ] {
            let is = Self::eq(g, e, c);
            let vv = g.iconst(i64::from(v));
            cp = g.b.ins().select(is, vv, cp);
        }
        let bad = g.b.ins().icmp_imm_s(IntCC::Equal, cp, NONE);
        br_if(g, bad, fail);
        g.set(cpv, cp);
        self.advance(g, 2);
        goto(g, emit);

        place(g, uesc);
        let p6 = g.b.ins().iadd_imm_s(p, 6);
        let short = g.b.ins().icmp(IntCC::UnsignedGreaterThan, p6, self.blen);
        br_if(g, short, fail);
        let p2 = g.b.ins().iadd_imm_s(p, 2);
        let (h, ok) = self.hex4(g, p2);
        let not_ok = g.b.ins().icmp_imm_s(IntCC::Equal, ok, 0);
        br_if(g, not_ok, fail);
        g.set(self.pos, p6);
        let low = in_range(g, h, 0xDC00, 0xDFFF);
        br_if(g, low, fail);
        g.set(cpv, h);
        let high = in_range(g, h, 0xD800, 0xDBFF);
        let single = g.b.ins().icmp_imm_s(IntCC::Equal, high, 0);
        br_if(g, single, emit);
        // A high surrogate pairs only with an immediately following `\u` low surrogate.
        let p12 = g.b.ins().iadd_imm_s(p, 12);
        let short = g.b.ins().icmp(IntCC::UnsignedGreaterThan, p12, self.blen);
        br_if(g, short, fail);
        let c6 = byte_at(g, mem(), self.body, p6);
        let n6 = Self::ne(g, c6, b'\\');
        br_if(g, n6, fail);
        let p7 = g.b.ins().iadd_imm_s(p, 7);
        let c7 = byte_at(g, mem(), self.body, p7);
        let n7 = Self::ne(g, c7, b'u');
        br_if(g, n7, fail);
        let p8 = g.b.ins().iadd_imm_s(p, 8);
        let (lo, ok) = self.hex4(g, p8);
        let not_ok = g.b.ins().icmp_imm_s(IntCC::Equal, ok, 0);
        br_if(g, not_ok, fail);
        let is_low = in_range(g, lo, 0xDC00, 0xDFFF);
        let not_low = g.b.ins().icmp_imm_s(IntCC::Equal, is_low, 0);
        br_if(g, not_low, fail);
        let hh = g.b.ins().iadd_imm_s(h, -0xD800);
        let hh = g.b.ins().ishl_imm_s(hh, 10);
        let ll = g.b.ins().iadd_imm_s(lo, -0xDC00);
        let c = g.b.ins().iadd(hh, ll);
        let c = g.b.ins().iadd_imm_s(c, 0x10000);
        g.set(cpv, c);
        g.set(self.pos, p12);
        goto(g, emit);

        place(g, emit);
        let c = g.get(cpv);
        self.emit_cp(g, c);
        goto(g, top);

        place(g, close);
        self.wr_lit(g, b"\"");
        let p1 = g.b.ins().iadd_imm_s(p, 1);
        g.set(self.pos, p1);
    }

    /// Gets the node for the value about to be parsed: the root, a new element or member
    /// appended to the current container, or (a duplicate key) the earlier member with that
    /// key, emptied for the new value so it keeps its position (Python's dict update).
    fn alloc_slot(&self, g: &mut Gen<'_>) {
        let nodes = self.nodes;
        let root = label(g);
        let obj = label(g);
        let scan = label(g);
        let new_key = label(g);
        let new_elem = label(g);
        let link = label(g);
        let done = label(g);
        let cu = g.get(self.cur);
        let is_root = g.b.ins().icmp_imm_s(IntCC::Equal, cu, NONE);
        br_if(g, is_root, root);
        let kind = nget(g, nodes, cu, F_KIND);
        let is_obj = g.b.ins().icmp_imm_s(IntCC::Equal, kind, K_OBJECT);
        branch(g, is_obj, obj, new_elem);

        place(g, root);
        let n = g.get(self.nn);
        let none = g.iconst(NONE);
        nset(g, nodes, n, F_KLEN, none);
        nset(g, nodes, n, F_NEXT, none);
        nset(g, nodes, n, F_PARENT, none);
        g.set(self.node, n);
        let n1 = g.b.ins().iadd_imm_s(n, 1);
        g.set(self.nn, n1);
        goto(g, done);

        place(g, obj);
        let first = nget(g, nodes, cu, F_A);
        let m = g.var(g.ptr, first);
        bind(g, scan);
        let mv = g.get(m);
        let end = g.b.ins().icmp_imm_s(IntCC::Equal, mv, NONE);
        br_if(g, end, new_key);
        let kl = nget(g, nodes, mv, F_KLEN);
        let want = g.get(self.klen);
        let same_len = g.b.ins().icmp(IntCC::Equal, kl, want);
        let other = label(g);
        let zero_len = g.b.ins().icmp_imm_s(IntCC::Equal, same_len, 0);
        br_if(g, zero_len, other);
        let ko = nget(g, nodes, mv, F_KOFF);
        let kp = g.b.ins().iadd(self.cbuf, ko);
        let wo = g.get(self.koff);
        let wp = g.b.ins().iadd(self.cbuf, wo);
        let eq = g.call(self.memeq, &[kp, wp, want]).expect("memeq returns");
        let differ = g.b.ins().icmp_imm_s(IntCC::Equal, eq, 0);
        br_if(g, differ, other);
        g.set(self.node, mv);
        goto(g, done);
        place(g, other);
        let nx = nget(g, nodes, mv, F_NEXT);
        g.set(m, nx);
        goto(g, scan);

        place(g, new_key);
        let n = g.get(self.nn);
        let ko = g.get(self.koff);
        let kl = g.get(self.klen);
        nset(g, nodes, n, F_KOFF, ko);
        nset(g, nodes, n, F_KLEN, kl);
        goto(g, link);

        place(g, new_elem);
        let n = g.get(self.nn);
        let none = g.iconst(NONE);
        nset(g, nodes, n, F_KLEN, none);
        bind(g, link);
        let n = g.get(self.nn);
        let cu = g.get(self.cur);
        let none = g.iconst(NONE);
        nset(g, nodes, n, F_NEXT, none);
        nset(g, nodes, n, F_PARENT, cu);
        let first = nget(g, nodes, cu, F_A);
        let empty = g.b.ins().icmp_imm_s(IntCC::Equal, first, NONE);
        g.if_else(
            empty,
            |g| nset(g, nodes, cu, F_A, n),
            |g| {
                let last = nget(g, nodes, cu, F_B);
                nset(g, nodes, last, F_NEXT, n);
            },
        );
        nset(g, nodes, cu, F_B, n);
        g.set(self.node, n);
        let n1 = g.b.ins().iadd_imm_s(n, 1);
        g.set(self.nn, n1);
        bind(g, done);
    }

    // ---- states ----

    pub(super) fn body(&mut self, g: &mut Gen<'_>) -> Value {
        let fail = self.fail_l;
        let empty = g.b.ins().icmp_imm_s(IntCC::Equal, self.blen, 0);
        br_if(g, empty, fail);
        self.skip_ws(g);
        goto(g, self.value_l);
        self.state_value(g);
        self.state_key(g);
        self.state_after(g);
        self.state_number(g);
        self.state_success(g);
        self.state_fail(g);
        g.b.ins().iconst(types::I32, 0)
    }

    fn state_value(&self, g: &mut Gen<'_>) {
        let fail = self.fail_l;
        place(g, self.value_l);
        let c = self.peek(g);
        let cl = g.get(self.cl);
        g.set(self.vstart, cl);
        self.alloc_slot(g);
        let string = label(g);
        let open = label(g);
        let q = Self::eq(g, c, b'"');
        br_if(g, q, string);
        let ob = Self::eq(g, c, b'{');
        let ab = Self::eq(g, c, b'[');
        let o = g.b.ins().bor(ob, ab);
        br_if(g, o, open);
        let lits: [(&[u8], Block); 6] = [
            (b"null", fail),
            (b"true", fail),
            (b"false", fail),
            (b"NaN", fail),
            (b"Infinity", fail),
            (b"-Infinity", self.number_l),
        ];
        for (lit, miss) in lits {
            let try_l = label(g);
            let next = label(g);
            let first = Self::eq(g, c, lit[0]);
            branch(g, first, try_l, next);
            place(g, try_l);
            let p = g.get(self.pos);
            let end = g.b.ins().iadd_imm_s(p, lit.len() as i64);
            let over = g.b.ins().icmp(IntCC::UnsignedGreaterThan, end, self.blen);
            br_if(g, over, miss);
            let mut all = g.b.ins().iconst(types::I8, 1);
            for (m, &ch) in lit.iter().enumerate() {
                let at = g.b.ins().iadd_imm_s(p, m as i64);
                let b = byte_at(g, mem(), self.body, at);
                let e = Self::eq(g, b, ch);
                all = g.b.ins().band(all, e);
            }
            let not = g.b.ins().icmp_imm_s(IntCC::Equal, all, 0);
            br_if(g, not, miss);
            self.wr_lit(g, lit);
            g.set(self.pos, end);
            goto(g, self.scalar_l);
            place(g, next);
        }
        let d = Self::is_digit(g, c);
        br_if(g, d, self.number_l);
        goto(g, fail);

        place(g, string);
        self.string(g);
        goto(g, self.scalar_l);

        place(g, open);
        let depth = g.get(self.depth);
        let deep =
            g.b.ins()
                .icmp_imm_s(IntCC::SignedGreaterThanOrEqual, depth, MAX_DEPTH);
        br_if(g, deep, fail);
        let is_obj = Self::eq(g, c, b'{');
        let kobj = g.iconst(K_OBJECT);
        let karr = g.iconst(K_ARRAY);
        let kind = g.b.ins().select(is_obj, kobj, karr);
        let nd = g.get(self.node);
        let none = g.iconst(NONE);
        nset(g, self.nodes, nd, F_KIND, kind);
        nset(g, self.nodes, nd, F_A, none);
        nset(g, self.nodes, nd, F_B, none);
        let d1 = g.b.ins().iadd_imm_s(depth, 1);
        g.set(self.depth, d1);
        g.set(self.cur, nd);
        self.advance(g, 1);
        self.skip_ws(g);
        let c2 = self.peek(g);
        let cobj = g.iconst(i64::from(b'}'));
        let carr = g.iconst(i64::from(b']'));
        let closing = g.b.ins().select(is_obj, cobj, carr);
        let is_close = g.b.ins().icmp(IntCC::Equal, c2, closing);
        br_if(g, is_close, self.close_l);
        branch(g, is_obj, self.key_l, self.value_l);

        // A finished scalar: its canonical text is `vstart..cl`.
        place(g, self.scalar_l);
        let nd = g.get(self.node);
        let s = g.get(self.vstart);
        let e = g.get(self.cl);
        let len = g.b.ins().isub(e, s);
        let ks = g.iconst(K_SCALAR);
        nset(g, self.nodes, nd, F_KIND, ks);
        nset(g, self.nodes, nd, F_A, s);
        nset(g, self.nodes, nd, F_B, len);
        goto(g, self.after_l);
    }

    fn state_key(&self, g: &mut Gen<'_>) {
        let fail = self.fail_l;
        place(g, self.key_l);
        let c = self.peek(g);
        let nq = Self::ne(g, c, b'"');
        br_if(g, nq, fail);
        let s = g.get(self.cl);
        self.string(g);
        let e = g.get(self.cl);
        let len = g.b.ins().isub(e, s);
        g.set(self.koff, s);
        g.set(self.klen, len);
        self.skip_ws(g);
        let c = self.peek(g);
        let nc = Self::ne(g, c, b':');
        br_if(g, nc, fail);
        self.advance(g, 1);
        self.skip_ws(g);
        goto(g, self.value_l);
    }

    fn state_after(&self, g: &mut Gen<'_>) {
        let fail = self.fail_l;
        let top_end = label(g);
        place(g, self.after_l);
        self.skip_ws(g);
        let cu = g.get(self.cur);
        let at_top = g.b.ins().icmp_imm_s(IntCC::Equal, cu, NONE);
        br_if(g, at_top, top_end);
        let c = self.peek(g);
        let kind = nget(g, self.nodes, cu, F_KIND);
        let is_obj = g.b.ins().icmp_imm_s(IntCC::Equal, kind, K_OBJECT);
        let cobj = g.iconst(i64::from(b'}'));
        let carr = g.iconst(i64::from(b']'));
        let closing = g.b.ins().select(is_obj, cobj, carr);
        let is_close = g.b.ins().icmp(IntCC::Equal, c, closing);
        br_if(g, is_close, self.close_l);
        let nc = Self::ne(g, c, b',');
        br_if(g, nc, fail);
        self.advance(g, 1);
        self.skip_ws(g);
        branch(g, is_obj, self.key_l, self.value_l);

        place(g, top_end);
        let p = g.get(self.pos);
        let all = g.b.ins().icmp(IntCC::Equal, p, self.blen);
        branch(g, all, self.success_l, fail);

        place(g, self.close_l);
        self.advance(g, 1);
        let cu = g.get(self.cur);
        let parent = nget(g, self.nodes, cu, F_PARENT);
        g.set(self.cur, parent);
        let d = g.get(self.depth);
        let d1 = g.b.ins().iadd_imm_s(d, -1);
        g.set(self.depth, d1);
        goto(g, self.after_l);
    }

    /// `-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?`, optional parts taken only when complete. Ints are
    /// copied (`-0` -> `0`); floats are rewritten as Python's repr (module docs).
    fn state_number(&self, g: &mut Gen<'_>) {
        let fail = self.fail_l;
        let scalar = self.scalar_l;
        place(g, self.number_l);
        let start = g.get(self.pos);
        let c0 = self.peek_at(g, start);
        let neg = Self::eq(g, c0, b'-');
        let negp = to_ptr(g, neg);
        let ip = g.b.ins().iadd(start, negp);
        g.set(self.pos, ip);
        let c = self.peek_at(g, ip);
        let zero_l = label(g);
        let digits_l = label(g);
        let int_done = label(g);
        let z = Self::eq(g, c, b'0');
        br_if(g, z, zero_l);
        let d = Self::is_digit(g, c);
        branch(g, d, digits_l, fail);
        place(g, zero_l);
        let ip1 = g.b.ins().iadd_imm_s(ip, 1);
        g.set(self.pos, ip1);
        goto(g, int_done);
        place(g, digits_l);
        self.digits(g, self.pos);
        bind(g, int_done);
        let ie = g.get(self.pos);
        let fs = g.var(g.ptr, ie);
        let fe = g.var(g.ptr, ie);
        let zero = g.iconst(0);
        let isf = g.var(g.ptr, zero);
        let ev = g.var(g.ptr, zero);
        // Fraction.
        let c = self.peek_at(g, ie);
        let ie1 = g.b.ins().iadd_imm_s(ie, 1);
        let c1 = self.peek_at(g, ie1);
        let dot = Self::eq(g, c, b'.');
        let dig = Self::is_digit(g, c1);
        let frac = g.b.ins().band(dot, dig);
        g.if_then(frac, |g| {
            g.set(self.pos, ie1);
            self.digits(g, self.pos);
            g.set(fs, ie1);
            let e = g.get(self.pos);
            g.set(fe, e);
            let one = g.iconst(1);
            g.set(isf, one);
        });
        // Exponent.
        let p2 = g.get(self.pos);
        let c = self.peek_at(g, p2);
        let le = Self::eq(g, c, b'e');
        let ue = Self::eq(g, c, b'E');
        let is_e = g.b.ins().bor(le, ue);
        g.if_then(is_e, |g| {
            let e1 = g.b.ins().iadd_imm_s(p2, 1);
            let cs = self.peek_at(g, e1);
            let plus = Self::eq(g, cs, b'+');
            let minus = Self::eq(g, cs, b'-');
            let sg = g.b.ins().bor(plus, minus);
            let sgp = to_ptr(g, sg);
            let e2 = g.b.ins().iadd(e1, sgp);
            let cd = self.peek_at(g, e2);
            let has = Self::is_digit(g, cd);
            g.if_then(has, |g| {
                let cur = g.var(g.ptr, e2);
                let zero = g.iconst(0);
                let acc = g.var(g.ptr, zero);
                let top = label(g);
                let done = label(g);
                bind(g, top);
                let v = g.get(cur);
                let c = self.peek_at(g, v);
                let dv = g.b.ins().iadd_imm_s(c, -48);
                let isd = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, dv, 10);
                let not = g.b.ins().icmp_imm_s(IntCC::Equal, isd, 0);
                br_if(g, not, done);
                // Saturates: anything past 1e8 is out of every range that matters.
                let a = g.get(acc);
                let big =
                    g.b.ins()
                        .icmp_imm_s(IntCC::UnsignedGreaterThan, a, 100_000_000);
                let a10 = g.b.ins().imul_imm_s(a, 10);
                let a10 = g.b.ins().iadd(a10, dv);
                let a2 = g.b.ins().select(big, a, a10);
                g.set(acc, a2);
                let v1 = g.b.ins().iadd_imm_s(v, 1);
                g.set(cur, v1);
                goto(g, top);
                place(g, done);
                let a = g.get(acc);
                let na = g.b.ins().ineg(a);
                let sv = g.b.ins().select(minus, na, a);
                g.set(ev, sv);
                let v = g.get(cur);
                g.set(self.pos, v);
                let one = g.iconst(1);
                g.set(isf, one);
            });
        });
        let float_l = label(g);
        let f = g.get(isf);
        br_if(g, f, float_l);
        // Int: verbatim, except that Python's int("-0") is 0.
        let p = g.get(self.pos);
        let ln = g.b.ins().isub(p, start);
        let two = g.b.ins().icmp_imm_s(IntCC::Equal, ln, 2);
        let s1 = g.b.ins().iadd_imm_s(start, 1);
        let c1 = self.peek_at(g, s1);
        let z1 = Self::eq(g, c1, b'0');
        let m0 = g.b.ins().band(two, neg);
        let m0 = g.b.ins().band(m0, z1);
        g.if_else(
            m0,
            |g| self.wr_lit(g, b"0"),
            |g| {
                let src = g.b.ins().iadd(self.body, start);
                self.cput(g, src, ln);
            },
        );
        goto(g, scalar);

        // Float: significant digits D and the decimal exponent X of the first one.
        place(g, float_l);
        let hard_l = label(g);
        let inf_l = label(g);
        let zero_l = label(g);
        let exp_l = label(g);
        let small_l = label(g);
        let split_l = label(g);
        let nint = g.b.ins().isub(ie, ip);
        let fsv = g.get(fs);
        let fev = g.get(fe);
        let nfrac = g.b.ins().isub(fev, fsv);
        let tot = g.b.ins().iadd(nint, nfrac);
        let body = self.body;
        // Index of digit `t` of int digits ++ fraction digits.
        let digit_at = |g: &mut Gen<'_>, t: Value| {
            let in_int = g.b.ins().icmp(IntCC::UnsignedLessThan, t, nint);
            let a = g.b.ins().iadd(ip, t);
            let fb = g.b.ins().isub(fsv, nint);
            let b = g.b.ins().iadd(fb, t);
            let at = g.b.ins().select(in_int, a, b);
            byte_at(g, mem(), body, at)
        };
        let first = g.var(g.ptr, tot);
        let zero = g.iconst(0);
        let last = g.var(g.ptr, zero);
        g.for_n(tot, |g, t| {
            let dch = digit_at(g, t);
            let nz = Self::ne(g, dch, b'0');
            g.if_then(nz, |g| {
                let fv = g.get(first);
                let unset = g.b.ins().icmp(IntCC::Equal, fv, tot);
                let f2 = g.b.ins().select(unset, t, fv);
                g.set(first, f2);
                g.set(last, t);
            });
        });
        let fv = g.get(first);
        let lv = g.get(last);
        let all_zero = g.b.ins().icmp(IntCC::Equal, fv, tot);
        br_if(g, all_zero, zero_l);
        let n = g.b.ins().isub(lv, fv);
        let n = g.b.ins().iadd_imm_s(n, 1);
        let many = g.b.ins().icmp_imm_s(IntCC::UnsignedGreaterThan, n, 15);
        br_if(g, many, hard_l);
        let tmp = self.tmp;
        g.for_n(n, |g, t| {
            let tt = g.b.ins().iadd(fv, t);
            let dch = digit_at(g, tt);
            set_byte_at(g, tmp, t, dch);
        });
        let e = g.get(ev);
        let x = g.b.ins().iadd(e, nint);
        let x = g.b.ins().isub(x, fv);
        let x = g.b.ins().iadd_imm_s(x, -1);
        let z0 = g.iconst(0);
        let d0 = byte_at(g, mem(), tmp, z0);
        // Overflow: from X = 309 on, or at X = 308 above the largest 15-digit value below
        // DBL_MAX (1.79769313486231e308; the next one, ...232e308, is past DBL_MAX plus half an
        // ulp). D is compared digit by digit, padded with zeros to 15 digits.
        let over =
            g.b.ins()
                .icmp_imm_s(IntCC::SignedGreaterThanOrEqual, x, 309);
        let at308 = g.b.ins().icmp_imm_s(IntCC::Equal, x, 308);
        let mut lt = g.b.ins().iconst(types::I8, 0);
        let mut gt = g.b.ins().iconst(types::I8, 0);
        for (t, &limit) in b"179769313486231".iter().enumerate() {
            let ti = t as i64;
            let dt = g.b.ins().iadd_imm_s(tmp, ti);
            let dt = load_u8(g, mem(), dt, 0);
            let inside = g.b.ins().icmp_imm_s(IntCC::UnsignedGreaterThan, n, ti);
            let zc = g.iconst(i64::from(b'0'));
            let dt = g.b.ins().select(inside, dt, zc);
            let open = g.b.ins().bor(lt, gt);
            let less =
                g.b.ins()
                    .icmp_imm_s(IntCC::UnsignedLessThan, dt, i64::from(limit));
            let more =
                g.b.ins()
                    .icmp_imm_s(IntCC::UnsignedGreaterThan, dt, i64::from(limit));
            let less = g.b.ins().band_not(less, open);
            let more = g.b.ins().band_not(more, open);
            lt = g.b.ins().bor(lt, less);
            gt = g.b.ins().bor(gt, more);
        }
        let at308 = g.b.ins().band(at308, gt);
        let inf = g.b.ins().bor(over, at308);
        br_if(g, inf, inf_l);
        let under = g.b.ins().icmp_imm_s(IntCC::SignedLessThanOrEqual, x, -325);
        br_if(g, under, zero_l);
        let subn = g.b.ins().icmp_imm_s(IntCC::SignedLessThanOrEqual, x, -308);
        br_if(g, subn, hard_l);
        g.if_then(neg, |g| self.wr_lit(g, b"-"));
        let lo = g.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, x, -4);
        let hi = g.b.ins().icmp_imm_s(IntCC::SignedLessThan, x, 16);
        let positional = g.b.ins().band(lo, hi);
        let not_pos = g.b.ins().icmp_imm_s(IntCC::Equal, positional, 0);
        br_if(g, not_pos, exp_l);
        let below1 = g.b.ins().icmp_imm_s(IntCC::SignedLessThan, x, 0);
        br_if(g, below1, small_l);
        let ip1 = g.b.ins().iadd_imm_s(x, 1);
        let split = g.b.ins().icmp(IntCC::UnsignedGreaterThan, n, ip1);
        br_if(g, split, split_l);
        // All digits before the point: D, zeros, ".0".
        self.cput(g, tmp, n);
        let zeros = g.b.ins().isub(ip1, n);
        g.for_n(zeros, |g, _| self.wr_lit(g, b"0"));
        self.wr_lit(g, b".0");
        goto(g, scalar);

        place(g, split_l);
        self.cput(g, tmp, ip1);
        self.wr_lit(g, b".");
        let rest = g.b.ins().iadd(tmp, ip1);
        let rn = g.b.ins().isub(n, ip1);
        self.cput(g, rest, rn);
        goto(g, scalar);

        place(g, small_l);
        self.wr_lit(g, b"0.");
        let zeros = g.b.ins().ineg(x);
        let zeros = g.b.ins().iadd_imm_s(zeros, -1);
        g.for_n(zeros, |g, _| self.wr_lit(g, b"0"));
        self.cput(g, tmp, n);
        goto(g, scalar);

        place(g, exp_l);
        self.wr(g, d0);
        let more = g.b.ins().icmp_imm_s(IntCC::UnsignedGreaterThan, n, 1);
        g.if_then(more, |g| {
            self.wr_lit(g, b".");
            let rest = g.b.ins().iadd_imm_s(tmp, 1);
            let rn = g.b.ins().iadd_imm_s(n, -1);
            self.cput(g, rest, rn);
        });
        self.wr_lit(g, b"e");
        let xneg = g.b.ins().icmp_imm_s(IntCC::SignedLessThan, x, 0);
        let mc = g.iconst(i64::from(b'-'));
        let pc = g.iconst(i64::from(b'+'));
        let sc = g.b.ins().select(xneg, mc, pc);
        self.wr(g, sc);
        let nx = g.b.ins().ineg(x);
        let ax = g.b.ins().select(xneg, nx, x);
        let hundreds =
            g.b.ins()
                .icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, ax, 100);
        g.if_then(hundreds, |g| {
            let h = g.b.ins().udiv_imm_s(ax, 100);
            let ch = g.b.ins().iadd_imm_s(h, 48);
            self.wr(g, ch);
        });
        let tens = g.b.ins().udiv_imm_s(ax, 10);
        let t10 = g.b.ins().udiv_imm_s(tens, 10);
        let t10 = g.b.ins().imul_imm_s(t10, 10);
        let td = g.b.ins().isub(tens, t10);
        let ch = g.b.ins().iadd_imm_s(td, 48);
        self.wr(g, ch);
        let u10 = g.b.ins().imul_imm_s(tens, 10);
        let ud = g.b.ins().isub(ax, u10);
        let ch = g.b.ins().iadd_imm_s(ud, 48);
        self.wr(g, ch);
        goto(g, scalar);

        place(g, inf_l);
        g.if_then(neg, |g| self.wr_lit(g, b"-"));
        self.wr_lit(g, b"Infinity");
        goto(g, scalar);

        place(g, zero_l);
        g.if_then(neg, |g| self.wr_lit(g, b"-"));
        self.wr_lit(g, b"0.0");
        goto(g, scalar);

        place(g, hard_l);
        let one = g.iconst(1);
        g.set(self.hard, one);
        goto(g, scalar);
    }

    /// Stores `*out_len = w` and returns OK or TOO_SMALL.
    fn finish(&self, g: &mut Gen<'_>, w: Value) {
        g.b.ins().store(mem(), w, self.out_len, 0);
        let fits = g.b.ins().icmp(IntCC::UnsignedLessThanOrEqual, w, self.cap);
        let ok = g.b.ins().iconst(types::I32, i64::from(STATUS_OK));
        let small = g.b.ins().iconst(types::I32, i64::from(STATUS_TOO_SMALL));
        let st = g.b.ins().select(fits, ok, small);
        g.ret(&[st]);
    }

    fn put1(&self, g: &mut Gen<'_>, w: Variable, c: Value) {
        put1(g, self.out, self.cap, w, c);
    }

    fn put_span(&self, g: &mut Gen<'_>, w: Variable, off: Value, len: Value) {
        let wv = g.get(w);
        let src = g.b.ins().iadd(self.cbuf, off);
        let w2 = g
            .call(self.put, &[self.out, self.cap, wv, src, len])
            .expect("put returns");
        g.set(w, w2);
    }

    /// `*tool = t` when `tool` is not NULL.
    fn set_tool(&self, g: &mut Gen<'_>, f: FuncRef, args: &[Value]) {
        let has_tool = g.b.ins().icmp_imm_s(IntCC::NotEqual, self.tool, 0);
        g.if_then(has_tool, |g| {
            let t = g.call(f, args).expect("returns the tool");
            g.b.ins().store(mem(), t, self.tool, 0);
        });
    }

    fn state_success(&self, g: &mut Gen<'_>) {
        let nodes = self.nodes;
        place(g, self.success_l);
        // The text parsed as JSON: `tool[1] = 1`, whatever the tool.
        let has_tool = g.b.ins().icmp_imm_s(IntCC::NotEqual, self.tool, 0);
        g.if_then(has_tool, |g| {
            let one = g.b.ins().iconst(types::I32, 1);
            g.b.ins().store(mem(), one, self.tool, 4);
        });
        // The chosen tool, read before names are restored (and reported even for a float this
        // code does not convert: the runtime reads the same tree).
        if self.restore_names {
            self.set_tool(g, self.first_tool_json, &[nodes, self.cbuf]);
        }
        let h = g.get(self.hard);
        g.if_then(h, |g| {
            let zero = g.iconst(0);
            g.b.ins().store(mem(), zero, self.out_len, 0);
            let st = g.b.ins().iconst(types::I32, i64::from(STATUS_INEXACT));
            g.ret(&[st]);
        });
        let root = g.iconst(0);
        if self.restore_names {
            let rk = nget(g, nodes, root, F_KIND);
            let is_arr = g.b.ins().icmp_imm_s(IntCC::Equal, rk, K_ARRAY);
            let is_obj = g.b.ins().icmp_imm_s(IntCC::Equal, rk, K_OBJECT);
            g.if_then(is_arr, |g| {
                let first = nget(g, nodes, root, F_A);
                let m = g.var(g.ptr, first);
                let top = label(g);
                let done = label(g);
                bind(g, top);
                let mv = g.get(m);
                let end = g.b.ins().icmp_imm_s(IntCC::Equal, mv, NONE);
                br_if(g, end, done);
                let kind = nget(g, nodes, mv, F_KIND);
                let obj = g.b.ins().icmp_imm_s(IntCC::Equal, kind, K_OBJECT);
                g.if_then(obj, |g| {
                    let c = g.get(self.cl);
                    let c2 = g
                        .call(self.restore, &[nodes, self.cbuf, c, mv])
                        .expect("restore returns");
                    g.set(self.cl, c2);
                });
                let nx = nget(g, nodes, mv, F_NEXT);
                g.set(m, nx);
                goto(g, top);
                place(g, done);
            });
            g.if_then(is_obj, |g| {
                let c = g.get(self.cl);
                let c2 = g
                    .call(self.restore, &[nodes, self.cbuf, c, root])
                    .expect("restore returns");
                g.set(self.cl, c2);
            });
        }
        // Serialize: pre-order walk over the reachable nodes with parent links.
        let zero = g.iconst(0);
        let w = g.var(g.ptr, zero);
        let nd = g.var(g.ptr, zero);
        let visit = label(g);
        let next = label(g);
        let done = label(g);
        let cont = label(g);
        let down = label(g);
        let up = label(g);
        bind(g, visit);
        let n = g.get(nd);
        let kl = nget(g, nodes, n, F_KLEN);
        let member = g.b.ins().icmp_imm_s(IntCC::NotEqual, kl, NONE);
        g.if_then(member, |g| {
            let ko = nget(g, nodes, n, F_KOFF);
            self.put_span(g, w, ko, kl);
            let colon = g.iconst(i64::from(b':'));
            self.put1(g, w, colon);
        });
        let kind = nget(g, nodes, n, F_KIND);
        let container = g.b.ins().icmp_imm_s(IntCC::NotEqual, kind, K_SCALAR);
        br_if(g, container, cont);
        let a = nget(g, nodes, n, F_A);
        let b = nget(g, nodes, n, F_B);
        self.put_span(g, w, a, b);
        goto(g, next);

        place(g, cont);
        let is_obj = g.b.ins().icmp_imm_s(IntCC::Equal, kind, K_OBJECT);
        let ob = g.iconst(i64::from(b'{'));
        let ab = g.iconst(i64::from(b'['));
        let open = g.b.ins().select(is_obj, ob, ab);
        self.put1(g, w, open);
        let first = nget(g, nodes, n, F_A);
        let has = g.b.ins().icmp_imm_s(IntCC::NotEqual, first, NONE);
        br_if(g, has, down);
        let oc = g.iconst(i64::from(b'}'));
        let ac = g.iconst(i64::from(b']'));
        let close = g.b.ins().select(is_obj, oc, ac);
        self.put1(g, w, close);
        goto(g, next);
        place(g, down);
        g.set(nd, first);
        goto(g, visit);

        place(g, next);
        let n = g.get(nd);
        let is_root = g.b.ins().icmp_imm_s(IntCC::Equal, n, 0);
        br_if(g, is_root, done);
        let parent = nget(g, nodes, n, F_PARENT);
        let sib = nget(g, nodes, n, F_NEXT);
        let last = g.b.ins().icmp_imm_s(IntCC::Equal, sib, NONE);
        br_if(g, last, up);
        let comma = g.iconst(i64::from(b','));
        self.put1(g, w, comma);
        g.set(nd, sib);
        goto(g, visit);
        place(g, up);
        let pk = nget(g, nodes, parent, F_KIND);
        let pobj = g.b.ins().icmp_imm_s(IntCC::Equal, pk, K_OBJECT);
        let oc = g.iconst(i64::from(b'}'));
        let ac = g.iconst(i64::from(b']'));
        let close = g.b.ins().select(pobj, oc, ac);
        self.put1(g, w, close);
        g.set(nd, parent);
        goto(g, next);

        place(g, done);
        let wv = g.get(w);
        self.finish(g, wv);
    }

    /// Not JSON: the text with snake names replaced, longest first, one pass per name.
    fn state_fail(&self, g: &mut Gen<'_>) {
        place(g, self.fail_l);
        if self.restore_names {
            self.set_tool(g, self.first_tool_text, &[self.body, self.blen]);
        }
        let zero = g.iconst(0);
        if self.passes.is_empty() {
            let w = g
                .call(self.put, &[self.out, self.cap, zero, self.body, self.blen])
                .expect("put returns");
            self.finish(g, w);
            return;
        }
        let mut src = self.body;
        let mut n = self.blen;
        for (i, &(so, sl, oo, ol)) in self.passes.iter().enumerate() {
            let last = i + 1 == self.passes.len();
            let (dst, cap) = if last {
                (self.out, self.cap)
            } else if i % 2 == 0 {
                (self.buf_a, self.huge)
            } else {
                (self.buf_b, self.huge)
            };
            let pat = g.b.ins().iadd_imm_s(self.names, so);
            let rep = g.b.ins().iadd_imm_s(self.names, oo);
            let plen = g.iconst(sl);
            let rlen = g.iconst(ol);
            n = g
                .call(self.replace, &[src, n, dst, cap, pat, plen, rep, rlen])
                .expect("replace returns");
            src = dst;
        }
        self.finish(g, n);
    }
}
