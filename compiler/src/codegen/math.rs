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

pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 * 2^23: adding it rounds a float of magnitude < 2^22 to an integer (round to nearest
/// even) and leaves that integer in the low mantissa bits. Used instead of `nearest`, which
/// x86-64 below SSE4.1 lowers to a libcall.
pub(crate) const ROUND_MAGIC: f32 = 12_582_912.0;
pub(crate) const ROUND_MAGIC_BITS: i32 = 0x4B40_0000;
/// ln 2 split so that `n * LN2_HI` is exact for |n| <= 256 (Cody-Waite).
#[allow(clippy::excessive_precision)] // exactly representable (355/512); written in full on purpose
pub(crate) const LN2_HI: f32 = 0.693_359_375;
#[allow(clippy::excessive_precision)] // the published constant, rounded by the compiler
pub(crate) const LN2_LO: f32 = -2.121_944_40e-4;
/// Cephes `expf` minimax coefficients for `(exp(r) - 1 - r) / r^2` on [-ln2/2, ln2/2]
/// (relative error about 1 ulp before the final scaling).
#[allow(clippy::excessive_precision)] // the published constants, rounded by the compiler
pub(crate) const EXP_POLY: [f32; 6] = [
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

/// `ln(x)` for a finite `x: f64` above 0 (the confidence's per-step sums, in `[1, vocab]`);
/// callers handle NaN themselves (this gives a finite value for it).
///
/// `x = m 2^e` with `m` in `[sqrt(1/2), sqrt(2))`, then `ln m = 2 atanh(t)`, `t = (m-1)/(m+1)`,
/// `|t| <= 0.1716`, by its series to `t^19` (the next term is below `1e-16` relative), and
/// `ln x = e ln 2 + ln m`.
pub fn ln_f64(g: &mut Gen<'_>, x: Value) -> Value {
    const MANT: i64 = (1 << 52) - 1;
    const ONE_BITS: i64 = 1023 << 52;
    let bits = g.b.ins().bitcast(types::I64, MemFlagsData::new(), x);
    let e = g.b.ins().ushr_imm_s(bits, 52);
    let e = g.b.ins().band_imm_s(e, 0x7FF);
    let e = g.b.ins().iadd_imm_s(e, -1023);
    let m = g.b.ins().band_imm_s(bits, MANT);
    let m = g.b.ins().bor_imm_s(m, ONE_BITS);
    let m = g.b.ins().bitcast(types::F64, MemFlagsData::new(), m);
    // Into [sqrt(1/2), sqrt(2)).
    let sqrt2 = g.b.ins().f64const(std::f64::consts::SQRT_2);
    let big = g.b.ins().fcmp(
        cranelift_codegen::ir::condcodes::FloatCC::GreaterThanOrEqual,
        m,
        sqrt2,
    );
    let half = g.b.ins().f64const(0.5);
    let mh = g.b.ins().fmul(m, half);
    let m = g.b.ins().select(big, mh, m);
    let e1 = g.b.ins().iadd_imm_s(e, 1);
    let e = g.b.ins().select(big, e1, e);
    let one = g.b.ins().f64const(1.0);
    let num = g.b.ins().fsub(m, one);
    let den = g.b.ins().fadd(m, one);
    let t = g.b.ins().fdiv(num, den);
    let t2 = g.b.ins().fmul(t, t);
    // 1 + t2/3 + t2^2/5 + ... + t2^9/19, by Horner.
    let mut s = g.b.ins().f64const(1.0 / 19.0);
    for k in (0..9).rev() {
        let c = g.b.ins().f64const(1.0 / f64::from(2 * k + 1));
        let st = g.b.ins().fmul(s, t2);
        s = g.b.ins().fadd(st, c);
    }
    let two_t = g.b.ins().fadd(t, t);
    let ln_m = g.b.ins().fmul(two_t, s);
    let ef = g.b.ins().fcvt_from_sint(types::F64, e);
    let ln2 = g.b.ins().f64const(std::f64::consts::LN_2);
    let el = g.b.ins().fmul(ef, ln2);
    g.b.ins().fadd(el, ln_m)
}
