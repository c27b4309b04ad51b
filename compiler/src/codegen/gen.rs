//! A thin layer over `cranelift-frontend` for writing generated code with less ceremony.
//!
//! [`Gen`] wraps a [`FunctionBuilder`] (still reachable as `g.b` for anything not covered) and
//! adds: counted loops and if/else with closures, loads and stores at `base + index * stride`,
//! and 4-wide f32 arithmetic through [`V4`].
//!
//! [`V4`] is four f32 lanes: one native `f32x4` value where the target has 128-bit vectors, four
//! scalar `f32` values otherwise (RISC-V without V). Kernels are written once against `V4`; the
//! choice is made from [`needle_targets::Target::simd_f32x4`] when the `Gen` is created.
//! Most Cranelift instructions are polymorphic over `f32`/`f32x4`, so a `V4` operation is the same
//! instruction applied to the vector or to each lane.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, Block, FuncRef, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::{FunctionBuilder, Variable};

/// Memory flags for ordinary accesses: no trap (callers guarantee valid pointers), no alignment
/// promise (C callers pass `float*`, 4-byte aligned at best; Cranelift then avoids SSE memory
/// operands that require 16-byte alignment).
pub fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Memory flags for read-only data the compiler embedded (weights, tables).
pub fn mem_ro() -> MemFlagsData {
    MemFlagsData::new()
        .with_notrap()
        .with_readonly()
        .with_can_move()
}

/// Four f32 lanes.
#[derive(Clone, Copy, Debug)]
pub enum V4 {
    /// One `f32x4` value.
    Simd(Value),
    /// Four `f32` values, lane 0 first.
    Lanes([Value; 4]),
}

/// A mutable [`V4`] (loop accumulators): one variable per value.
#[derive(Clone, Copy, Debug)]
pub enum V4Var {
    Simd(Variable),
    Lanes([Variable; 4]),
}

/// Function-building context for one generated function.
pub struct Gen<'a> {
    pub b: FunctionBuilder<'a>,
    /// Pointer-sized integer type (`size_t`).
    pub ptr: Type,
    simd: bool,
    fma: bool,
}

impl<'a> Gen<'a> {
    /// Wraps `b`, which must already be positioned in the (sealed) entry block.
    pub fn new(b: FunctionBuilder<'a>, ptr: Type, simd: bool, fma: bool) -> Self {
        Gen { b, ptr, simd, fma }
    }

    pub fn simd(&self) -> bool {
        self.simd
    }

    // ---- scalars ------------------------------------------------------------------------------

    /// A pointer-sized integer constant.
    pub fn iconst(&mut self, v: i64) -> Value {
        self.b.ins().iconst(self.ptr, v)
    }

    pub fn f32(&mut self, c: f32) -> Value {
        self.b.ins().f32const(c)
    }

    /// A constant of type `ty` (`f32` or `f32x4`) with every lane `c`.
    pub fn fconst_like(&mut self, ty: Type, c: f32) -> Value {
        let s = self.f32(c);
        if ty == types::F32 {
            s
        } else {
            self.b.ins().splat(ty, s)
        }
    }

    /// An integer constant of type `ty` (`i32` or `i32x4`) with every lane `c`.
    pub fn iconst_like(&mut self, ty: Type, c: i32) -> Value {
        let s = self.b.ins().iconst(types::I32, i64::from(c));
        if ty == types::I32 {
            s
        } else {
            self.b.ins().splat(ty, s)
        }
    }

    /// `a * b + c`, fused only where the target has a native FMA. Elsewhere Cranelift would turn
    /// `fma` into a call to `fmaf`, which a standalone object cannot reference.
    pub fn mul_add(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.fma {
            self.b.ins().fma(a, b, c)
        } else {
            let m = self.b.ins().fmul(a, b);
            self.b.ins().fadd(m, c)
        }
    }

    /// `base + index * stride` in bytes.
    pub fn addr(&mut self, base: Value, index: Value, stride: i64) -> Value {
        let off = self.b.ins().imul_imm_s(index, stride);
        self.b.ins().iadd(base, off)
    }

    /// `base[index]` for an f32 array.
    pub fn load_f32(&mut self, base: Value, index: Value) -> Value {
        let p = self.addr(base, index, 4);
        self.b.ins().load(types::F32, mem(), p, 0)
    }

    pub fn store_f32(&mut self, v: Value, base: Value, index: Value) {
        let p = self.addr(base, index, 4);
        self.b.ins().store(mem(), v, p, 0);
    }

    /// Calls a function referenced in this one; returns its result, if it has one.
    pub fn call(&mut self, f: FuncRef, args: &[Value]) -> Option<Value> {
        let inst = self.b.ins().call(f, args);
        self.b.inst_results(inst).first().copied()
    }

    // ---- variables ----------------------------------------------------------------------------

    pub fn var(&mut self, ty: Type, init: Value) -> Variable {
        let v = self.b.declare_var(ty);
        self.b.def_var(v, init);
        v
    }

    pub fn get(&mut self, v: Variable) -> Value {
        self.b.use_var(v)
    }

    pub fn set(&mut self, v: Variable, x: Value) {
        self.b.def_var(v, x);
    }

    // ---- control flow -------------------------------------------------------------------------

    /// `for (i = start; i < end; i += step) body(i)`, unsigned compare. Values made inside the
    /// body are not visible after the loop: carry them in variables.
    pub fn for_range(
        &mut self,
        start: Value,
        end: Value,
        step: i64,
        mut body: impl FnMut(&mut Self, Value),
    ) {
        let header = self.b.create_block();
        let body_b = self.b.create_block();
        let exit = self.b.create_block();
        let i = self.b.append_block_param(header, self.ptr);
        self.b.ins().jump(header, &[start.into()]);

        self.b.switch_to_block(header);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, i, end);
        self.b.ins().brif(more, body_b, &[], exit, &[]);
        // Both have their only predecessor now.
        self.b.seal_block(body_b);
        self.b.seal_block(exit);

        self.b.switch_to_block(body_b);
        body(self, i);
        let next = self.b.ins().iadd_imm_s(i, step);
        self.b.ins().jump(header, &[next.into()]);
        self.b.seal_block(header);

        self.b.switch_to_block(exit);
    }

    /// `for (i = 0; i < n; i++) body(i)`.
    pub fn for_n(&mut self, n: Value, body: impl FnMut(&mut Self, Value)) {
        let zero = self.iconst(0);
        self.for_range(zero, n, 1, body);
    }

    /// Like [`Gen::for_range`] with compile-time bounds.
    pub fn for_const(
        &mut self,
        start: i64,
        end: i64,
        step: i64,
        body: impl FnMut(&mut Self, Value),
    ) {
        if start >= end {
            return; // nothing to emit: avoids a dead loop in the output
        }
        let s = self.iconst(start);
        let e = self.iconst(end);
        self.for_range(s, e, step, body);
    }

    /// `if cond { then } else { otherwise }`; `cond` is an integer (non-zero: true).
    pub fn if_else(
        &mut self,
        cond: Value,
        then: impl FnOnce(&mut Self),
        otherwise: impl FnOnce(&mut Self),
    ) {
        let then_b = self.b.create_block();
        let else_b = self.b.create_block();
        let merge = self.b.create_block();
        self.b.ins().brif(cond, then_b, &[], else_b, &[]);
        self.b.seal_block(then_b);
        self.b.seal_block(else_b);
        self.arm(then_b, merge, then);
        self.arm(else_b, merge, otherwise);
        self.b.seal_block(merge);
        self.b.switch_to_block(merge);
    }

    pub fn if_then(&mut self, cond: Value, then: impl FnOnce(&mut Self)) {
        self.if_else(cond, then, |_| {});
    }

    fn arm(&mut self, block: Block, merge: Block, f: impl FnOnce(&mut Self)) {
        self.b.switch_to_block(block);
        f(self);
        self.b.ins().jump(merge, &[]);
    }

    /// Returns from the function here; code after this is unreachable, so it switches to a fresh
    /// block that nothing jumps to (Cranelift removes it).
    pub fn ret(&mut self, vals: &[Value]) {
        self.b.ins().return_(vals);
        let dead = self.b.create_block();
        self.b.seal_block(dead);
        self.b.switch_to_block(dead);
    }

    // ---- four lanes ---------------------------------------------------------------------------

    /// Applies a polymorphic one-operand instruction to each value of `a`.
    pub fn map1(&mut self, a: V4, mut f: impl FnMut(&mut Self, Value) -> Value) -> V4 {
        match a {
            V4::Simd(x) => V4::Simd(f(self, x)),
            V4::Lanes(l) => V4::Lanes([f(self, l[0]), f(self, l[1]), f(self, l[2]), f(self, l[3])]),
        }
    }

    /// Applies a polymorphic two-operand instruction lane-wise.
    pub fn map2(
        &mut self,
        a: V4,
        b: V4,
        mut f: impl FnMut(&mut Self, Value, Value) -> Value,
    ) -> V4 {
        match (a, b) {
            (V4::Simd(x), V4::Simd(y)) => V4::Simd(f(self, x, y)),
            (a, b) => {
                let (x, y) = (self.lanes(a), self.lanes(b));
                V4::Lanes(std::array::from_fn(|i| f(self, x[i], y[i])))
            }
        }
    }

    fn lanes(&mut self, a: V4) -> [Value; 4] {
        match a {
            V4::Lanes(l) => l,
            V4::Simd(x) => std::array::from_fn(|i| self.b.ins().extractlane(x, i as u8)),
        }
    }

    pub fn vsplat(&mut self, s: Value) -> V4 {
        if self.simd {
            V4::Simd(self.b.ins().splat(types::F32X4, s))
        } else {
            V4::Lanes([s; 4])
        }
    }

    pub fn vconst(&mut self, c: f32) -> V4 {
        let s = self.f32(c);
        self.vsplat(s)
    }

    pub fn vadd(&mut self, a: V4, b: V4) -> V4 {
        self.map2(a, b, |g, x, y| g.b.ins().fadd(x, y))
    }
    pub fn vsub(&mut self, a: V4, b: V4) -> V4 {
        self.map2(a, b, |g, x, y| g.b.ins().fsub(x, y))
    }
    pub fn vmul(&mut self, a: V4, b: V4) -> V4 {
        self.map2(a, b, |g, x, y| g.b.ins().fmul(x, y))
    }
    pub fn vdiv(&mut self, a: V4, b: V4) -> V4 {
        self.map2(a, b, |g, x, y| g.b.ins().fdiv(x, y))
    }
    pub fn vmax(&mut self, a: V4, b: V4) -> V4 {
        self.map2(a, b, |g, x, y| g.b.ins().fmax(x, y))
    }

    /// `a * b + c` lane-wise, see [`Gen::mul_add`].
    pub fn vmul_add(&mut self, a: V4, b: V4, c: V4) -> V4 {
        match (a, b, c) {
            (V4::Simd(x), V4::Simd(y), V4::Simd(z)) => V4::Simd(self.mul_add(x, y, z)),
            _ => {
                let (x, y, z) = (self.lanes(a), self.lanes(b), self.lanes(c));
                V4::Lanes(std::array::from_fn(|i| self.mul_add(x[i], y[i], z[i])))
            }
        }
    }

    /// Four consecutive f32 at `base + index * 4` (bytes), with `flags`.
    pub fn vload_with(&mut self, base: Value, index: Value, flags: MemFlagsData) -> V4 {
        let p = self.addr(base, index, 4);
        if self.simd {
            V4::Simd(self.b.ins().load(types::F32X4, flags, p, 0))
        } else {
            V4::Lanes(std::array::from_fn(|i| {
                self.b.ins().load(types::F32, flags, p, 4 * i as i32)
            }))
        }
    }

    pub fn vload(&mut self, base: Value, index: Value) -> V4 {
        self.vload_with(base, index, mem())
    }

    pub fn vstore(&mut self, v: V4, base: Value, index: Value) {
        let p = self.addr(base, index, 4);
        match v {
            V4::Simd(x) => {
                self.b.ins().store(mem(), x, p, 0);
            }
            V4::Lanes(l) => {
                for (i, x) in l.into_iter().enumerate() {
                    self.b.ins().store(mem(), x, p, 4 * i as i32);
                }
            }
        }
    }

    /// Sum of the four lanes, as `(l0 + l1) + (l2 + l3)`.
    pub fn vsum(&mut self, a: V4) -> Value {
        let l = self.lanes(a);
        let s01 = self.b.ins().fadd(l[0], l[1]);
        let s23 = self.b.ins().fadd(l[2], l[3]);
        self.b.ins().fadd(s01, s23)
    }

    /// Maximum of the four lanes (NaN-propagating, as Cranelift's `fmax`).
    pub fn vmax_lanes(&mut self, a: V4) -> Value {
        let l = self.lanes(a);
        let m01 = self.b.ins().fmax(l[0], l[1]);
        let m23 = self.b.ins().fmax(l[2], l[3]);
        self.b.ins().fmax(m01, m23)
    }

    pub fn vvar(&mut self, init: V4) -> V4Var {
        match init {
            V4::Simd(x) => V4Var::Simd(self.var(types::F32X4, x)),
            V4::Lanes(l) => V4Var::Lanes(std::array::from_fn(|i| self.var(types::F32, l[i]))),
        }
    }

    pub fn vget(&mut self, v: V4Var) -> V4 {
        match v {
            V4Var::Simd(x) => V4::Simd(self.get(x)),
            V4Var::Lanes(l) => V4::Lanes(std::array::from_fn(|i| self.b.use_var(l[i]))),
        }
    }

    pub fn vset(&mut self, v: V4Var, x: V4) {
        match v {
            V4Var::Simd(var) => {
                let x = match x {
                    V4::Simd(x) => x,
                    // Unreachable by construction (one Gen uses one representation); rebuilt
                    // rather than panicking.
                    V4::Lanes(l) => {
                        let mut acc = self.b.ins().splat(types::F32X4, l[0]);
                        for (i, lane) in l.into_iter().enumerate().skip(1) {
                            acc = self.b.ins().insertlane(acc, lane, i as u8);
                        }
                        acc
                    }
                };
                self.set(var, x);
            }
            V4Var::Lanes(vars) => {
                let l = self.lanes(x);
                for (var, lane) in vars.into_iter().zip(l) {
                    self.b.def_var(var, lane);
                }
            }
        }
    }

    // ---- comparisons --------------------------------------------------------------------------

    pub fn fcmp(&mut self, cc: FloatCC, a: Value, b: Value) -> Value {
        self.b.ins().fcmp(cc, a, b)
    }

    pub fn icmp(&mut self, cc: IntCC, a: Value, b: Value) -> Value {
        self.b.ins().icmp(cc, a, b)
    }
}
