//! The byte-level toolkit of the text generators (tokenizer, grammar, output, driver): what
//! integer code over caller memory and read-only tables needs beyond [`Gen`].
//!
//! * labels and jumps, for state machines written as straight-line code ([`label`], [`goto`],
//!   [`place`], [`bind`], [`branch`], [`br_if`]), and [`while_loop`] with [`flag`] variables;
//! * integer helpers: [`iconst32`], [`to_ptr`], [`cmp_imm`], [`masked_eq`], [`in_range`];
//! * loads and stores of bytes and 32-bit words, by address (`load_*` / `store_*`, Cranelift's
//!   argument order) or by element index (`*_at` / `set_*_at`);
//! * byte runs: [`copy_bytes`], [`bytes_equal`] (inline) and the bodies of the callable
//!   [`memeq_body`] and [`put_body`];
//! * u32 tables in the target's byte order (`Target::u32_bytes`): [`declare_u32_table`].
//!
//! Every helper emits a fixed instruction sequence: generators that share one emit the same code
//! they did with their own copies, so changing a helper changes every caller's output.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, Block, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::Variable;
use cranelift_module::DataId;

use super::gen::{mem, Gen};
use super::{CodegenError, KernelSet};

// ---- labels and jumps -------------------------------------------------------------------------

/// A new block to jump to; place it later with [`place`] or [`bind`].
pub fn label(g: &mut Gen<'_>) -> Block {
    g.b.create_block()
}

/// Unconditional jump; what follows is unreachable until the next [`place`].
pub fn goto(g: &mut Gen<'_>, to: Block) {
    g.b.ins().jump(to, &[]);
    let dead = g.b.create_block();
    g.b.switch_to_block(dead);
}

/// Places `l` right after a [`goto`], a [`branch`] or a return (the current block is empty and
/// unreachable).
pub fn place(g: &mut Gen<'_>, l: Block) {
    g.b.switch_to_block(l);
}

/// Conditional jump to `t` or `e`; what follows is unreachable until the next [`place`].
pub fn branch(g: &mut Gen<'_>, cond: Value, t: Block, e: Block) {
    g.b.ins().brif(cond, t, &[], e, &[]);
    let dead = g.b.create_block();
    g.b.switch_to_block(dead);
}

/// Places `l` here, falling through into it from the code before.
pub fn bind(g: &mut Gen<'_>, l: Block) {
    g.b.ins().jump(l, &[]);
    g.b.switch_to_block(l);
}

/// Jumps to `to` when `cond` is non-zero, else continues.
pub fn br_if(g: &mut Gen<'_>, cond: Value, to: Block) {
    let next = g.b.create_block();
    g.b.ins().brif(cond, to, &[], next, &[]);
    g.b.switch_to_block(next);
}

// ---- loops ------------------------------------------------------------------------------------

/// `while cond() { body() }`. `cond` runs in the loop header each time; like [`Gen::for_range`],
/// values made in `body` are not visible after the loop.
pub fn while_loop(
    g: &mut Gen<'_>,
    mut cond: impl FnMut(&mut Gen<'_>) -> Value,
    mut body: impl FnMut(&mut Gen<'_>),
) {
    let header = g.b.create_block();
    let body_b = g.b.create_block();
    let exit = g.b.create_block();
    g.b.ins().jump(header, &[]);
    g.b.switch_to_block(header);
    let c = cond(g);
    g.b.ins().brif(c, body_b, &[], exit, &[]);
    g.b.seal_block(body_b);
    g.b.seal_block(exit);
    g.b.switch_to_block(body_b);
    body(g);
    g.b.ins().jump(header, &[]);
    g.b.seal_block(header);
    g.b.switch_to_block(exit);
}

/// A boolean variable (pointer-sized 0 / 1) that loops use to stop early.
pub fn flag(g: &mut Gen<'_>, init: bool) -> Variable {
    let v = g.iconst(i64::from(init));
    g.var(g.ptr, v)
}

// ---- integers ---------------------------------------------------------------------------------

/// An `i32` constant.
pub fn iconst32(g: &mut Gen<'_>, v: i64) -> Value {
    g.b.ins().iconst(types::I32, v)
}

/// `v` zero-extended to the pointer type (as is when it already has it): an `icmp` flag becomes
/// 0 / 1, an `i32` an index.
pub fn to_ptr(g: &mut Gen<'_>, v: Value) -> Value {
    let ptr = g.ptr;
    if g.b.func.dfg.value_type(v) == ptr {
        v
    } else {
        g.b.ins().uextend(ptr, v)
    }
}

/// `a <cc> imm`, the immediate taken as unsigned.
pub fn cmp_imm(g: &mut Gen<'_>, cc: IntCC, a: Value, imm: i64) -> Value {
    g.b.ins().icmp_imm_u(cc, a, imm)
}

/// `(x & mask) == want` as a flag.
pub fn masked_eq(g: &mut Gen<'_>, x: Value, mask: i64, want: i64) -> Value {
    let m = g.b.ins().band_imm_s(x, mask);
    g.b.ins().icmp_imm_s(IntCC::Equal, m, want)
}

/// `lo <= x <= hi_incl` (unsigned) as a flag.
pub fn in_range(g: &mut Gen<'_>, x: Value, lo: i64, hi_incl: i64) -> Value {
    let d = g.b.ins().iadd_imm_s(x, -lo);
    g.b.ins()
        .icmp_imm_s(IntCC::UnsignedLessThanOrEqual, d, hi_incl - lo)
}

// ---- loads and stores -------------------------------------------------------------------------

/// The byte at `addr + off`, zero-extended to the pointer type.
pub fn load_u8(g: &mut Gen<'_>, flags: MemFlagsData, addr: Value, off: i32) -> Value {
    let ty = g.ptr;
    g.b.ins().uload8(ty, flags, addr, off)
}

/// Byte `p[i]`, zero-extended to the pointer type.
pub fn byte_at(g: &mut Gen<'_>, flags: MemFlagsData, p: Value, i: Value) -> Value {
    let a = g.b.ins().iadd(p, i);
    load_u8(g, flags, a, 0)
}

/// Stores the low byte of `v` at `addr + off`.
pub fn store_u8(g: &mut Gen<'_>, v: Value, addr: Value, off: i32) {
    g.b.ins().istore8(mem(), v, addr, off);
}

/// `p[i] = v` (the low byte of `v`).
pub fn set_byte_at(g: &mut Gen<'_>, p: Value, i: Value, v: Value) {
    let a = g.b.ins().iadd(p, i);
    store_u8(g, v, a, 0);
}

/// The u32 at `addr + off`, zero-extended to the pointer type.
pub fn load_u32(g: &mut Gen<'_>, flags: MemFlagsData, addr: Value, off: i32) -> Value {
    if g.ptr == types::I32 {
        g.b.ins().load(types::I32, flags, addr, off)
    } else {
        // Only 64-bit pointers remain, and uload32 always widens to i64.
        g.b.ins().uload32(flags, addr, off)
    }
}

/// Stores the low 32 bits of `v` (an `i32`, or pointer-sized) at `addr + off`.
pub fn store_u32(g: &mut Gen<'_>, v: Value, addr: Value, off: i32) {
    if g.b.func.dfg.value_type(v) == types::I32 {
        g.b.ins().store(mem(), v, addr, off);
    } else {
        g.b.ins().istore32(mem(), v, addr, off);
    }
}

/// u32 element `p[i]`, zero-extended to the pointer type.
pub fn u32_at(g: &mut Gen<'_>, flags: MemFlagsData, p: Value, i: Value) -> Value {
    let a = g.addr(p, i, 4);
    load_u32(g, flags, a, 0)
}

/// `p[i] = v` for a u32 array (the low 32 bits of `v`).
pub fn set_u32_at(g: &mut Gen<'_>, p: Value, i: Value, v: Value) {
    let a = g.addr(p, i, 4);
    store_u32(g, v, a, 0);
}

/// The 32-bit word at `addr + off` as an `i32`.
pub fn load_i32(g: &mut Gen<'_>, flags: MemFlagsData, addr: Value, off: i32) -> Value {
    g.b.ins().load(types::I32, flags, addr, off)
}

/// Element `p[i]` of a 32-bit array as an `i32`.
pub fn i32_at(g: &mut Gen<'_>, flags: MemFlagsData, p: Value, i: Value) -> Value {
    let a = g.addr(p, i, 4);
    load_i32(g, flags, a, 0)
}

// ---- byte runs --------------------------------------------------------------------------------

/// `to[0..n] = from[0..n]`, one byte at a time through a register of type `reg` (`g.ptr` or
/// `I32`: either is correct, but the choice shows in the machine code); `flags` are the source's.
pub fn copy_bytes(
    g: &mut Gen<'_>,
    flags: MemFlagsData,
    reg: Type,
    from: Value,
    to: Value,
    n: Value,
) {
    g.for_n(n, |g, i| {
        let s = g.b.ins().iadd(from, i);
        let b = g.b.ins().uload8(reg, flags, s, 0);
        let d = g.b.ins().iadd(to, i);
        store_u8(g, b, d, 0);
    });
}

/// `to[0..n] = from[0..n]` for 32-bit elements.
pub fn copy_i32s(g: &mut Gen<'_>, from: Value, to: Value, n: Value) {
    g.for_n(n, |g, i| {
        let v = i32_at(g, mem(), from, i);
        let d = g.addr(to, i, 4);
        g.b.ins().store(mem(), v, d, 0);
    });
}

/// Whether `a[0..n]` (`a_flags`) equals `b[0..n]` (ordinary memory) as a pointer-sized 0 / 1,
/// computed inline: a loop that runs until the first difference, without a call or an early
/// return (what the tokenizer's lookups want).
pub fn bytes_equal(g: &mut Gen<'_>, a_flags: MemFlagsData, a: Value, b: Value, n: Value) -> Value {
    let eq = flag(g, true);
    let i = g.iconst(0);
    let i = g.var(g.ptr, i);
    while_loop(
        g,
        |g| {
            let iv = g.get(i);
            let more = g.icmp(IntCC::UnsignedLessThan, iv, n);
            let e = g.get(eq);
            let e = cmp_imm(g, IntCC::NotEqual, e, 0);
            g.b.ins().band(more, e)
        },
        |g| {
            let iv = g.get(i);
            let pa = g.b.ins().iadd(a, iv);
            let pb = g.b.ins().iadd(b, iv);
            let x = load_u8(g, a_flags, pa, 0);
            let y = load_u8(g, mem(), pb, 0);
            let same = g.icmp(IntCC::Equal, x, y);
            let same = to_ptr(g, same);
            g.set(eq, same);
            let next = g.b.ins().iadd_imm_s(iv, 1);
            g.set(i, next);
        },
    );
    g.get(eq)
}

/// Body of `int32_t memeq(const uint8_t *p, const uint8_t *q, size_t n)`: 1 when the bytes are
/// equal, else 0 (returns at the first difference).
pub fn memeq_body(g: &mut Gen<'_>, p: Value, q: Value, n: Value) -> Value {
    let fail = label(g);
    g.for_n(n, |g, i| {
        let x = byte_at(g, mem(), p, i);
        let y = byte_at(g, mem(), q, i);
        let ne = g.b.ins().icmp(IntCC::NotEqual, x, y);
        br_if(g, ne, fail);
    });
    let r1 = g.b.ins().iconst(types::I32, 1);
    g.ret(&[r1]);
    place(g, fail);
    g.b.ins().iconst(types::I32, 0)
}

/// Body of `size_t put(uint8_t *dst, size_t cap, size_t w, const uint8_t *src, size_t n)`:
/// copies `src[0..n]` to `dst[w..w + n]` when that fits `cap`, and returns `w + n` either way
/// (the size needed, for "buffer too small" answers).
pub fn put_body(g: &mut Gen<'_>, dst: Value, cap: Value, w: Value, src: Value, n: Value) -> Value {
    let end = g.b.ins().iadd(w, n);
    let fits = g.b.ins().icmp(IntCC::UnsignedLessThanOrEqual, end, cap);
    g.if_then(fits, |g| {
        let base = g.b.ins().iadd(dst, w);
        let reg = g.ptr;
        copy_bytes(g, mem(), reg, src, base, n);
    });
    end
}

// ---- u32 tables -------------------------------------------------------------------------------

/// Declares read-only u32 `values` in the target's byte order. An empty table gets one zero
/// word (never read: its count is 0), so that no data object is zero-sized.
pub fn declare_u32_table(
    ks: &mut KernelSet,
    name: &str,
    values: impl IntoIterator<Item = u32>,
    align: u64,
) -> Result<DataId, CodegenError> {
    let mut bytes = ks.target().u32_bytes(values);
    if bytes.is_empty() {
        bytes.extend_from_slice(&[0; 4]);
    }
    ks.declare_rodata(name, bytes, align)
}

/// `v` as a u32 table entry, or an error naming `what` when it does not fit.
pub fn to_u32(v: usize, what: &str) -> Result<u32, CodegenError> {
    u32::try_from(v).map_err(|_| CodegenError::Invalid(format!("{what} exceeds 4 GiB")))
}
