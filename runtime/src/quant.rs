//! Weight precisions (`--weights f32|f16|int8|int4`) and the reference's own weight quantization.
//!
//! The original implementation's `quantize.py` (used for its quantized evaluation and its
//! quantization-aware training) quantizes every Dense `kernel` `(in, out)` of one layer
//! symmetrically in groups of `min(32, in)` rows along the input axis (the last group padded
//! with zeros), with one scale per group and output column:
//!
//! - `scale = max(max |w| over the group / QMAX, 1e-8)` in float32 (`QMAX` = 7 for int4, 127
//!   for int8);
//! - `q = clip(round_half_to_even(w / scale), -QMAX - 1, QMAX)`;
//! - the model then computes in float32 with `q * scale`.
//!
//! Embedding, norms, gates and biases keep their stored precision. The runtime dequantizes at
//! load ([`Quantized::dequantize`]) and stays the float32 oracle; the generated library keeps
//! `q` and the scales and dequantizes in registers to exactly the same float32 values.

use std::fmt;

/// Rows per quantization group along a kernel's input axis (fewer when the kernel has fewer).
pub const GROUP: usize = 32;

/// How weights are stored and computed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Precision {
    /// float32.
    F32,
    /// IEEE half, widened to float32 (lossless for the original float16 checkpoints).
    F16,
    /// The reference's int8 quantization of every Dense kernel.
    Int8,
    /// The reference's int4 quantization of every Dense kernel.
    Int4,
}

impl Precision {
    pub const ALL: [Precision; 4] = [
        Precision::F32,
        Precision::F16,
        Precision::Int8,
        Precision::Int4,
    ];

    /// The command-line spelling: `f32`, `f16`, `int8`, `int4`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
        }
    }

    /// Parses [`Precision::name`]; `None` for anything else.
    pub fn parse(s: &str) -> Option<Precision> {
        Precision::ALL.into_iter().find(|p| p.name() == s)
    }

    /// Whether Dense kernels are quantized to integers.
    pub fn is_quantized(self) -> bool {
        matches!(self, Precision::Int8 | Precision::Int4)
    }

    /// The largest quantized value (`7` or `127`); the smallest is `-qmax - 1`.
    pub fn qmax(self) -> Option<i32> {
        match self {
            Precision::Int8 => Some(127),
            Precision::Int4 => Some(7),
            Precision::F32 | Precision::F16 => None,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The group size for a kernel with `k` input rows: `min(GROUP, k)`.
pub fn group_size(k: usize) -> usize {
    GROUP.min(k).max(1)
}

/// One quantized `(k, n)` kernel (`y = x @ W`).
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    pub k: usize,
    pub n: usize,
    /// Rows per group: [`group_size`]`(k)`.
    pub group: usize,
    /// `q[r * n + c]` for row `r < k` (the zero padding is not stored: it quantizes to 0).
    pub q: Vec<i8>,
    /// `scales[g * n + c]` for group `g < ceil(k / group)`.
    pub scales: Vec<f32>,
}

impl Quantized {
    /// Number of groups along the input axis.
    pub fn groups(&self) -> usize {
        self.k.div_ceil(self.group)
    }

    /// The float32 values the model computes with: `q * scale`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.k * self.n);
        for r in 0..self.k {
            let g = r / self.group;
            for c in 0..self.n {
                out.push(self.q[r * self.n + c] as f32 * self.scales[g * self.n + c]);
            }
        }
        out
    }
}

/// Quantizes the row-major `(k, n)` kernel `w` as the reference does (see the module docs).
///
/// # Panics
/// If `precision` is not an integer format or `w.len() != k * n`.
pub fn quantize(w: &[f32], k: usize, n: usize, precision: Precision) -> Quantized {
    let qmax = precision.qmax().expect("an integer precision") as f32;
    assert_eq!(w.len(), k * n, "kernel size");
    let group = group_size(k);
    let groups = k.div_ceil(group);
    let mut scales = vec![0f32; groups * n];
    for g in 0..groups {
        for c in 0..n {
            let rows = g * group..((g + 1) * group).min(k);
            let max_abs = rows.map(|r| w[r * n + c].abs()).fold(0f32, f32::max);
            scales[g * n + c] = (max_abs / qmax).max(1e-8);
        }
    }
    let q = (0..k * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            let v = (w[i] / scales[(r / group) * n + c]).round_ties_even();
            v.clamp(-qmax - 1.0, qmax) as i8
        })
        .collect();
    Quantized {
        k,
        n,
        group,
        q,
        scales,
    }
}

/// `w` after quantizing to `precision` and back (what the model computes with); `f32` and `f16`
/// return `w` unchanged here (f16 rounding is a matter of the stored tensor, not of this step).
pub fn fake_quantize(w: &[f32], k: usize, n: usize, precision: Precision) -> Vec<f32> {
    if precision.is_quantized() {
        quantize(w, k, n, precision).dequantize()
    } else {
        w.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Precision::ALL {
            assert_eq!(Precision::parse(p.name()), Some(p));
        }
        assert_eq!(Precision::parse("int2"), None);
    }

    #[test]
    fn int4_groups_scales_and_ties() {
        // k = 40: one group of 32 and a short one of 8; n = 2.
        let (k, n) = (40, 2);
        let mut w = vec![0f32; k * n];
        w[0] = 7.0;
        w[2] = 2.5;
        w[4] = 3.5;
        w[6] = -9.0; // the group's largest magnitude in column 0: scale 9/7, q = -7
        w[32 * n + 1] = -1.0; // group 1, column 1: scale 1/7
        let q = quantize(&w, k, n, Precision::Int4);
        assert_eq!(q.group, 32);
        assert_eq!(q.groups(), 2);
        assert_eq!(q.scales[0], 9.0 / 7.0);
        assert_eq!(q.scales[1], 1e-8, "an all-zero group keeps the 1e-8 floor");
        assert_eq!(q.scales[n + 1], 1.0 / 7.0);
        assert_eq!(q.q[6], -7);
        assert_eq!(q.q[32 * n + 1], -7);
        let d = q.dequantize();
        assert_eq!(d[6], -9.0);
        assert_eq!(d.len(), k * n);
    }

    #[test]
    fn round_half_to_even_and_clip() {
        // One column, k = 4: max 7 -> scale 1; values land exactly on .5.
        let w = [7.0, 2.5, -2.5, 0.5];
        let q = quantize(&w, 4, 1, Precision::Int4);
        assert_eq!(q.group, 4, "min(32, k)");
        assert_eq!(q.q, vec![7, 2, -2, 0]);
        // int8: -128 is reachable only by clipping, never from the symmetric scale.
        let w = [-127.0, 63.5, 64.5, 1.0];
        let q = quantize(&w, 4, 1, Precision::Int8);
        assert_eq!(q.q, vec![-127, 64, 64, 1]);
    }
}
