//! Tool-name restoration: the model writes tools by their snake_case names, the user gets the
//! original ones. The JSON path rewrites a `name` member's string value
//! ([`restore_body`], `output_restore_name`); the text path replaces every snake name in the raw
//! text, longest first ([`replace_body`], `output_replace`), as `needle_runtime::output` does.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, Value};
use cranelift_frontend::Variable;
use cranelift_module::DataId;
use needle_runtime::pyjson;

use super::json::{
    nget, nset, F_A, F_B, F_KIND, F_KLEN, F_KOFF, F_NEXT, K_ARRAY, K_OBJECT, K_SCALAR, NONE,
};
use super::{put1, Helpers, NAME_KEY, TOOL_CALL};
use crate::codegen::bytes::{
    bind, br_if, byte_at, declare_u32_table, goto, label, place, to_u32, u32_at,
};
use crate::codegen::gen::{mem, mem_ro, Gen};
use crate::codegen::kernels::{Callees, DataAddrs};
use crate::codegen::{CodegenError, KernelSet};

/// The name map's tables, declared in the object.
pub(super) struct NameTables {
    /// Canonical (JSON string) snake and original names, then the text path's raw ones.
    pub names: DataId,
    /// Per tool: (snake offset, length, original offset, length) of the canonical names (u32).
    pub table: DataId,
    /// `<tool_call>` then the canonical key `"name"`.
    pub consts: DataId,
    /// Tools in the map.
    pub count: usize,
    /// Text-path replacements in order: (snake offset, length, original offset, length).
    pub passes: Vec<(usize, usize, usize, usize)>,
    /// Longest canonical original name.
    pub max_orig: usize,
    /// Largest growth of one restored name (canonical original minus canonical snake).
    pub max_delta: usize,
    /// Per tool: (offset in `names`, length) of the raw snake name (u32), for the text path's
    /// chosen-tool scan.
    pub snakes: DataId,
}

/// Builds and declares the tables for `name_map` (`(snake_name, original_name)` in tool order).
pub(super) fn declare_name_tables(
    ks: &mut KernelSet,
    name_map: &[(String, String)],
) -> Result<NameTables, CodegenError> {
    let canon = |s: &str| pyjson::to_compact_string(&pyjson::Value::Str(s.to_string()));
    let mut name_bytes: Vec<u8> = Vec::new();
    let mut name_tab: Vec<u32> = Vec::new();
    let (mut max_orig, mut max_delta) = (0usize, 0usize);
    for (snake, orig) in name_map {
        let (cs, co) = (canon(snake), canon(orig));
        max_orig = max_orig.max(co.len());
        max_delta = max_delta.max(co.len().saturating_sub(cs.len()));
        for c in [&cs, &co] {
            name_tab.push(to_u32(name_bytes.len(), "name table")?);
            name_tab.push(to_u32(c.len(), "name table")?);
            name_bytes.extend_from_slice(c.as_bytes());
        }
    }
    // Text path: longest snake name first by characters (stable: ties keep tool order), empty and
    // identity entries skipped, as `replace_names_in_text`.
    let mut order: Vec<&(String, String)> = name_map.iter().collect();
    order.sort_by_key(|(s, _)| std::cmp::Reverse(s.chars().count()));
    let mut passes = Vec::new();
    for (snake, orig) in order {
        if snake.is_empty() || snake == orig {
            continue;
        }
        let so = name_bytes.len();
        name_bytes.extend_from_slice(snake.as_bytes());
        let oo = name_bytes.len();
        name_bytes.extend_from_slice(orig.as_bytes());
        passes.push((so, snake.len(), oo, orig.len()));
    }
    let mut snake_tab: Vec<u32> = Vec::new();
    for (snake, _) in name_map {
        snake_tab.push(to_u32(name_bytes.len(), "name table")?);
        snake_tab.push(to_u32(snake.len(), "name table")?);
        name_bytes.extend_from_slice(snake.as_bytes());
    }
    let mut consts = TOOL_CALL.to_vec();
    consts.extend_from_slice(NAME_KEY);
    name_bytes.push(0);
    name_tab.push(0);
    Ok(NameTables {
        names: ks.declare_rodata("output_names", name_bytes, 1)?,
        table: declare_u32_table(ks, "output_name_table", name_tab, 4)?,
        consts: ks.declare_rodata("output_consts", consts, 1)?,
        count: name_map.len(),
        passes,
        max_orig,
        max_delta,
        snakes: declare_u32_table(ks, "output_snake_table", snake_tab, 4)?,
    })
}

/// `output_restore_name(nodes, canon, cl, obj) -> cl'`: if object `obj` has a member `name`
/// whose value is a string equal to a snake name (first in tool order), its value becomes the
/// original name, appended to the canonical buffer at `cl`.
pub(super) fn restore_body(
    g: &mut Gen<'_>,
    a: &[Value],
    d: &DataAddrs,
    tables: &NameTables,
    f: &Callees,
    helpers: &Helpers,
) -> Value {
    let count = tables.count as i64;
    let (nodes, canon, cl, obj) = (a[0], a[1], a[2], a[3]);
    let (names, tab, consts) = (
        d.get(tables.names),
        d.get(tables.table),
        d.get(tables.consts),
    );
    let (memeq, put) = (f.get(helpers.memeq), f.get(helpers.put));
    let first = nget(g, nodes, obj, F_A);
    let m = g.var(g.ptr, first);
    let top = label(g);
    let adv = label(g);
    let done = label(g);
    bind(g, top);
    let mv = g.get(m);
    let end = g.b.ins().icmp_imm_s(IntCC::Equal, mv, NONE);
    br_if(g, end, done);
    let kl = nget(g, nodes, mv, F_KLEN);
    let other =
        g.b.ins()
            .icmp_imm_s(IntCC::NotEqual, kl, NAME_KEY.len() as i64);
    br_if(g, other, adv);
    let koff = nget(g, nodes, mv, F_KOFF);
    let kp = g.b.ins().iadd(canon, koff);
    let np = g.b.ins().iadd_imm_s(consts, TOOL_CALL.len() as i64);
    let eq = g.call(memeq, &[kp, np, kl]).expect("memeq returns");
    let ne = g.b.ins().icmp_imm_s(IntCC::Equal, eq, 0);
    br_if(g, ne, adv);
    // Keys are unique after parsing, so this is the `name` member.
    let kind = nget(g, nodes, mv, F_KIND);
    let not_scalar = g.b.ins().icmp_imm_s(IntCC::NotEqual, kind, K_SCALAR);
    br_if(g, not_scalar, done);
    let off = nget(g, nodes, mv, F_A);
    let len = nget(g, nodes, mv, F_B);
    let short = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, len, 2);
    br_if(g, short, done);
    let c0 = byte_at(g, mem(), canon, off);
    let not_str = g.b.ins().icmp_imm_s(IntCC::NotEqual, c0, i64::from(b'"'));
    br_if(g, not_str, done);
    let vp = g.b.ins().iadd(canon, off);
    let cnt = g.iconst(count);
    g.for_n(cnt, |g, t| {
        let t4 = g.b.ins().imul_imm_s(t, 4);
        let so = u32_at(g, mem_ro(), tab, t4);
        let t1 = g.b.ins().iadd_imm_s(t4, 1);
        let sl = u32_at(g, mem_ro(), tab, t1);
        let t2 = g.b.ins().iadd_imm_s(t4, 2);
        let oo = u32_at(g, mem_ro(), tab, t2);
        let t3 = g.b.ins().iadd_imm_s(t4, 3);
        let ol = u32_at(g, mem_ro(), tab, t3);
        let same_len = g.b.ins().icmp(IntCC::Equal, sl, len);
        g.if_then(same_len, |g| {
            let sp = g.b.ins().iadd(names, so);
            let eq = g.call(memeq, &[vp, sp, len]).expect("memeq returns");
            g.if_then(eq, |g| {
                let op = g.b.ins().iadd(names, oo);
                let huge = g.iconst(i64::MAX);
                let cl2 = g
                    .call(put, &[canon, huge, cl, op, ol])
                    .expect("put returns");
                nset(g, nodes, mv, F_A, cl);
                nset(g, nodes, mv, F_B, ol);
                g.ret(&[cl2]);
            });
        });
    });
    goto(g, done);
    place(g, adv);
    let nx = nget(g, nodes, mv, F_NEXT);
    g.set(m, nx);
    goto(g, top);
    place(g, done);
    cl
}

/// `output_replace(src, n, dst, cap, pat, plen, rep, rlen) -> size`: `src[0..n]` with every
/// non-overlapping `pat` (left to right) replaced by `rep`, written to `dst` within `cap`;
/// returns the size needed.
pub(super) fn replace_body(g: &mut Gen<'_>, a: &[Value], f: &Callees, helpers: &Helpers) -> Value {
    let (src, n, dst, cap, pat, plen, rep, rlen) = (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
    let (memeq, put) = (f.get(helpers.memeq), f.get(helpers.put));
    let zero = g.iconst(0);
    let i = g.var(g.ptr, zero);
    let w = g.var(g.ptr, zero);
    let top = label(g);
    let done = label(g);
    let plain = label(g);
    bind(g, top);
    let iv = g.get(i);
    let end = g.b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, iv, n);
    br_if(g, end, done);
    // Candidate only when the pattern fits and its first byte matches (cheap filter).
    let rest = g.b.ins().isub(n, iv);
    let short = g.b.ins().icmp(IntCC::UnsignedLessThan, rest, plen);
    br_if(g, short, plain);
    let c = byte_at(g, mem(), src, iv);
    let z = g.iconst(0);
    let p0 = byte_at(g, mem(), pat, z);
    let ne = g.b.ins().icmp(IntCC::NotEqual, c, p0);
    br_if(g, ne, plain);
    let at = g.b.ins().iadd(src, iv);
    let eq = g.call(memeq, &[at, pat, plen]).expect("memeq returns");
    let no = g.b.ins().icmp_imm_s(IntCC::Equal, eq, 0);
    br_if(g, no, plain);
    let wv = g.get(w);
    let w2 = g
        .call(put, &[dst, cap, wv, rep, rlen])
        .expect("put returns");
    g.set(w, w2);
    let i2 = g.b.ins().iadd(iv, plen);
    g.set(i, i2);
    goto(g, top);
    place(g, plain);
    let iv = g.get(i);
    let c = byte_at(g, mem(), src, iv);
    put1(g, dst, cap, w, c);
    let i2 = g.b.ins().iadd_imm_s(iv, 1);
    g.set(i, i2);
    goto(g, top);
    place(g, done);
    g.get(w)
}

/// `output_first_tool_json(nodes, canon) -> int32_t`: on a parsed tree (root node 0), the index
/// of the first call's tool, as `needle_runtime::confidence::chosen_tool` reads JSON: the first
/// element of a top-level array (or a top-level object itself) must be an object whose `name`
/// member is a string equal to a snake name; else -1. Run before names are restored.
pub(super) fn first_tool_json_body(
    g: &mut Gen<'_>,
    a: &[Value],
    d: &DataAddrs,
    tables: &NameTables,
    f: &Callees,
    helpers: &Helpers,
) -> Value {
    let (nodes, canon) = (a[0], a[1]);
    let (names, tab, consts) = (
        d.get(tables.names),
        d.get(tables.table),
        d.get(tables.consts),
    );
    let memeq = f.get(helpers.memeq);
    let none = label(g);
    let root = g.iconst(0);
    let rk = nget(g, nodes, root, F_KIND);
    let is_arr = g.b.ins().icmp_imm_s(IntCC::Equal, rk, K_ARRAY);
    let is_obj = g.b.ins().icmp_imm_s(IntCC::Equal, rk, K_OBJECT);
    let container = g.b.ins().bor(is_arr, is_obj);
    let scalar = g.b.ins().icmp_imm_s(IntCC::Equal, container, 0);
    br_if(g, scalar, none);
    let first = nget(g, nodes, root, F_A);
    let no_first = g.b.ins().icmp_imm_s(IntCC::Equal, first, NONE);
    let empty = g.b.ins().band(is_arr, no_first);
    br_if(g, empty, none);
    let obj = g.b.ins().select(is_arr, first, root);
    let ok = nget(g, nodes, obj, F_KIND);
    let not_obj = g.b.ins().icmp_imm_s(IntCC::NotEqual, ok, K_OBJECT);
    br_if(g, not_obj, none);
    // The `name` member (keys are unique after parsing).
    let m0 = nget(g, nodes, obj, F_A);
    let m = g.var(g.ptr, m0);
    let top = label(g);
    let adv = label(g);
    let found = label(g);
    bind(g, top);
    let mv = g.get(m);
    let end = g.b.ins().icmp_imm_s(IntCC::Equal, mv, NONE);
    br_if(g, end, none);
    let kl = nget(g, nodes, mv, F_KLEN);
    let other =
        g.b.ins()
            .icmp_imm_s(IntCC::NotEqual, kl, NAME_KEY.len() as i64);
    br_if(g, other, adv);
    let koff = nget(g, nodes, mv, F_KOFF);
    let kp = g.b.ins().iadd(canon, koff);
    let np = g.b.ins().iadd_imm_s(consts, TOOL_CALL.len() as i64);
    let eq = g.call(memeq, &[kp, np, kl]).expect("memeq returns");
    let is_name = g.b.ins().icmp_imm_s(IntCC::NotEqual, eq, 0);
    br_if(g, is_name, found);
    goto(g, adv);
    place(g, adv);
    let nx = nget(g, nodes, mv, F_NEXT);
    g.set(m, nx);
    goto(g, top);
    place(g, found);
    let mv = g.get(m);
    let kind = nget(g, nodes, mv, F_KIND);
    let not_scalar = g.b.ins().icmp_imm_s(IntCC::NotEqual, kind, K_SCALAR);
    br_if(g, not_scalar, none);
    let off = nget(g, nodes, mv, F_A);
    let len = nget(g, nodes, mv, F_B);
    let vp = g.b.ins().iadd(canon, off);
    // Canonical strings (quotes included) against the canonical snake names, in tool order.
    let cnt = g.iconst(tables.count as i64);
    g.for_n(cnt, |g, t| {
        let t4 = g.b.ins().imul_imm_s(t, 4);
        let so = u32_at(g, mem_ro(), tab, t4);
        let t1 = g.b.ins().iadd_imm_s(t4, 1);
        let sl = u32_at(g, mem_ro(), tab, t1);
        let same_len = g.b.ins().icmp(IntCC::Equal, sl, len);
        g.if_then(same_len, |g| {
            let sp = g.b.ins().iadd(names, so);
            let eq = g.call(memeq, &[vp, sp, len]).expect("memeq returns");
            g.if_then(eq, |g| {
                let t32 = to_i32(g, t);
                g.ret(&[t32]);
            });
        });
    });
    goto(g, none);
    place(g, none);
    g.b.ins().iconst(types::I32, -1)
}

/// `output_first_tool_text(body, n) -> int32_t`: for text that is not JSON, the index of the
/// tool named by the first `"name"` in it followed by optional blanks, `:`, optional blanks and
/// a string (up to the next `"`), as `needle_runtime::confidence::chosen_tool` scans; -1 when
/// that is missing or names no tool.
pub(super) fn first_tool_text_body(
    g: &mut Gen<'_>,
    a: &[Value],
    d: &DataAddrs,
    tables: &NameTables,
    f: &Callees,
    helpers: &Helpers,
) -> Value {
    let (body, n) = (a[0], a[1]);
    let (names, snakes, consts) = (
        d.get(tables.names),
        d.get(tables.snakes),
        d.get(tables.consts),
    );
    let memeq = f.get(helpers.memeq);
    let none = label(g);
    let klen = NAME_KEY.len() as i64;
    let short = g.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, n, klen);
    br_if(g, short, none);
    // The first `"name"`.
    let zero = g.iconst(0);
    let i = g.var(g.ptr, zero);
    let last = g.b.ins().iadd_imm_s(n, -klen);
    let top = label(g);
    let found = label(g);
    bind(g, top);
    let iv = g.get(i);
    let past = g.b.ins().icmp(IntCC::UnsignedGreaterThan, iv, last);
    br_if(g, past, none);
    let at = g.b.ins().iadd(body, iv);
    let np = g.b.ins().iadd_imm_s(consts, TOOL_CALL.len() as i64);
    let kl = g.iconst(klen);
    let eq = g.call(memeq, &[at, np, kl]).expect("memeq returns");
    let hit = g.b.ins().icmp_imm_s(IntCC::NotEqual, eq, 0);
    br_if(g, hit, found);
    let i2 = g.b.ins().iadd_imm_s(iv, 1);
    g.set(i, i2);
    goto(g, top);
    place(g, found);
    let iv = g.get(i);
    let j0 = g.b.ins().iadd_imm_s(iv, klen);
    let j = g.var(g.ptr, j0);
    // The byte at j (256 at the end).
    let peek = |g: &mut Gen<'_>, j: Variable| -> Value {
        let jv = g.get(j);
        let inside = g.b.ins().icmp(IntCC::UnsignedLessThan, jv, n);
        let idx = g.b.ins().select(inside, jv, zero);
        let raw = byte_at(g, mem(), body, idx);
        let eof = g.iconst(256);
        g.b.ins().select(inside, raw, eof)
    };
    let skip_blanks = |g: &mut Gen<'_>, j: Variable| {
        let top = label(g);
        let done = label(g);
        bind(g, top);
        let c = peek(g, j);
        let mut is = g.b.ins().icmp_imm_s(IntCC::Equal, c, i64::from(b' '));
        for ch in [b'\t', b'\n', b'\r'] {
            let e = g.b.ins().icmp_imm_s(IntCC::Equal, c, i64::from(ch));
            is = g.b.ins().bor(is, e);
        }
        let not = g.b.ins().icmp_imm_s(IntCC::Equal, is, 0);
        br_if(g, not, done);
        let jv = g.get(j);
        let j2 = g.b.ins().iadd_imm_s(jv, 1);
        g.set(j, j2);
        goto(g, top);
        place(g, done);
    };
    let expect = |g: &mut Gen<'_>, j: Variable, ch: u8| {
        let c = peek(g, j);
        let ne = g.b.ins().icmp_imm_s(IntCC::NotEqual, c, i64::from(ch));
        br_if(g, ne, none);
        let jv = g.get(j);
        let j2 = g.b.ins().iadd_imm_s(jv, 1);
        g.set(j, j2);
    };
    skip_blanks(g, j);
    expect(g, j, b':');
    skip_blanks(g, j);
    expect(g, j, b'"');
    let start = g.get(j);
    // Up to the closing quote.
    let top = label(g);
    let closed = label(g);
    bind(g, top);
    let c = peek(g, j);
    let eof = g.b.ins().icmp_imm_s(IntCC::Equal, c, 256);
    br_if(g, eof, none);
    let q = g.b.ins().icmp_imm_s(IntCC::Equal, c, i64::from(b'"'));
    br_if(g, q, closed);
    let jv = g.get(j);
    let j2 = g.b.ins().iadd_imm_s(jv, 1);
    g.set(j, j2);
    goto(g, top);
    place(g, closed);
    let stop = g.get(j);
    let len = g.b.ins().isub(stop, start);
    let vp = g.b.ins().iadd(body, start);
    let cnt = g.iconst(tables.count as i64);
    g.for_n(cnt, |g, t| {
        let t2 = g.b.ins().imul_imm_s(t, 2);
        let so = u32_at(g, mem_ro(), snakes, t2);
        let t1 = g.b.ins().iadd_imm_s(t2, 1);
        let sl = u32_at(g, mem_ro(), snakes, t1);
        let same_len = g.b.ins().icmp(IntCC::Equal, sl, len);
        g.if_then(same_len, |g| {
            let sp = g.b.ins().iadd(names, so);
            let eq = g.call(memeq, &[vp, sp, len]).expect("memeq returns");
            g.if_then(eq, |g| {
                let t32 = to_i32(g, t);
                g.ret(&[t32]);
            });
        });
    });
    goto(g, none);
    place(g, none);
    g.b.ins().iconst(types::I32, -1)
}

/// A pointer-sized index as `int32_t`.
fn to_i32(g: &mut Gen<'_>, v: Value) -> Value {
    if g.ptr == types::I32 {
        v
    } else {
        g.b.ins().ireduce(types::I32, v)
    }
}
