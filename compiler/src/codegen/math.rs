//! Elementary functions as inline instruction sequences (no libm: the object must be standalone).
//!
//! Everything here works on a `Value` of type `f32` or `f32x4` (same instructions), and on
//! [`V4`] through [`Gen::map1`].

use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Value};

use super::gen::{Gen, V4};

/// Inputs are clamped to `[EXP_LO, EXP_HI]` before range reduction. Below `EXP_LO`,
/// `exp(x) < 2^-150` rounds to 0 anyway; above `EXP_HI` the final scaling overflows to +inf.
/// Clamping keeps the exponent arithmetic in range for any input (f32::MIN gives 0, not NaN).
pub const EXP_LO: f32 = -104.0;
pub const EXP_HI: f32 = 89.0;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 * 2^23: adding it rounds a float of magnitude < 2^22 to an integer (round to nearest
/// even) and leaves that integer in the low mantissa bits. Used instead of `nearest`, which
/// x86-64 below SSE4.1 lowers to a libcall.
const ROUND_MAGIC: f32 = 12_582_912.0;
const ROUND_MAGIC_BITS: i32 = 0x4B40_0000;
/// ln 2 split so that `n * LN2_HI` is exact for |n| <= 256 (Cody-Waite).
#[allow(clippy::excessive_precision)] // exactly representable (355/512); written in full on purpose
const LN2_HI: f32 = 0.693_359_375;
#[allow(clippy::excessive_precision)] // the published constant, rounded by the compiler
const LN2_LO: f32 = -2.121_944_40e-4;
/// Cephes `expf` minimax coefficients for `(exp(r) - 1 - r) / r^2` on [-ln2/2, ln2/2]
/// (relative error about 1 ulp before the final scaling).
#[allow(clippy::excessive_precision)] // the published constants, rounded by the compiler
const EXP_POLY: [f32; 6] = [
    1.987_569_150_0e-4,
    1.398_199_950_7e-3,
    8.333_451_907_3e-3,
    4.166_579_589_4e-2,
    1.666_666_545_9e-1,
    5.000_000_120_1e-1,
];

/// `exp(x)` for `x: f32` or `f32x4`.
///
/// `x = n ln2 + r`, `|r| <= ln2/2`; `exp(r)` by polynomial; then `2^n` applied as
/// `2^(n >> 1) * 2^(n - (n >> 1))`, two normal powers of two: the first product is exact and the
/// second rounds once, so results in the subnormal range are correctly scaled (the single-step
/// bit trick would need an exponent field below 1 there). NaN in, NaN out.
pub fn exp(g: &mut Gen<'_>, x: Value) -> Value {
    let ty = g.b.func.dfg.value_type(x);
    let ity = if ty == types::F32 {
        types::I32
    } else {
        types::I32X4
    };
    let c = |g: &mut Gen<'_>, v: f32| g.fconst_like(ty, v);

    let lo = c(g, EXP_LO);
    let hi = c(g, EXP_HI);
    let x = g.b.ins().fmax(x, lo);
    let x = g.b.ins().fmin(x, hi);

    // n = round(x * log2(e)), as float (nf) and as integer (ni).
    let log2e = c(g, LOG2E);
    let magic = c(g, ROUND_MAGIC);
    let t = g.mul_add(x, log2e, magic);
    let nf = g.b.ins().fsub(t, magic);
    let tbits = g.b.ins().bitcast(ity, MemFlagsData::new(), t);
    let magic_bits = g.iconst_like(ity, ROUND_MAGIC_BITS);
    let ni = g.b.ins().isub(tbits, magic_bits);

    // r = x - n ln2, in two steps for precision.
    let ln2_hi = c(g, LN2_HI);
    let ln2_lo = c(g, LN2_LO);
    let m = g.b.ins().fmul(nf, ln2_hi);
    let r = g.b.ins().fsub(x, m);
    let m = g.b.ins().fmul(nf, ln2_lo);
    let r = g.b.ins().fsub(r, m);

    // p = 1 + r + r^2 * poly(r)
    let mut p = c(g, EXP_POLY[0]);
    for &k in &EXP_POLY[1..] {
        let kc = c(g, k);
        p = g.mul_add(p, r, kc);
    }
    let z = g.b.ins().fmul(r, r);
    let pr = g.mul_add(p, z, r);
    let one = c(g, 1.0);
    let p = g.b.ins().fadd(pr, one);

    // 2^n = 2^n1 * 2^n2 with n1 = n >> 1 (arithmetic), n2 = n - n1; both in [-75, 64].
    let n1 = g.b.ins().sshr_imm_s(ni, 1);
    let n2 = g.b.ins().isub(ni, n1);
    let s1 = pow2(g, n1, ity, ty);
    let s2 = pow2(g, n2, ity, ty);
    let y = g.b.ins().fmul(p, s1);
    g.b.ins().fmul(y, s2)
}

/// `2^n` for integer `n` in the normal exponent range, by building the float's bits.
fn pow2(
    g: &mut Gen<'_>,
    n: Value,
    ity: cranelift_codegen::ir::Type,
    fty: cranelift_codegen::ir::Type,
) -> Value {
    let bias = g.iconst_like(ity, 127);
    let e = g.b.ins().iadd(n, bias);
    let bits = g.b.ins().ishl_imm_s(e, 23);
    g.b.ins().bitcast(fty, MemFlagsData::new(), bits)
}

/// `exp` on four lanes.
pub fn vexp(g: &mut Gen<'_>, x: V4) -> V4 {
    g.map1(x, exp)
}

/// `1 / (1 + exp(-x))` for `f32` or `f32x4`: saturates to exactly 0 and 1, never NaN for finite x.
pub fn sigmoid(g: &mut Gen<'_>, x: Value) -> Value {
    let ty = g.b.func.dfg.value_type(x);
    let nx = g.b.ins().fneg(x);
    let e = exp(g, nx);
    let one = g.fconst_like(ty, 1.0);
    let d = g.b.ins().fadd(one, e);
    g.b.ins().fdiv(one, d)
}
