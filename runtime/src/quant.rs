//! Weight precisions (`--weights f32|f16|int8|int4`) and the reference's own weight quantization.
//!
//! The original implementation's `quantize.py` (used for its quantized evaluation and its
//! quantization-aware training) quantizes every Dense `kernel` `(in, out)` of one layer
//! symmetrically in groups of `min(32, in)` rows along the input axis (the last group padded
//! with zeros), with one scale per group and output column:
//!
//! - `scale = max(max |w| over the group * (1 / QMAX), 1e-8)` in float32 (`QMAX` = 7 for int4,
//!   127 for int8);
//! - `q = clip(round_half_to_even(w * (1 / scale)), -QMAX - 1, QMAX)`;
//! - the model then computes in float32 with `q * scale`.
//!
//! The source writes both steps as divisions (`/ QMAX`, `w / scale`), but the reference runs them
//! under XLA, which computes a division by a broadcast value as a multiplication by its float32
//! reciprocal; the golden vectors follow that (with true divisions, int4 logits miss them by ten
//! times their tolerance), so this is the arithmetic that reproduces the reference: each
//! reciprocal rounded to float32 once, then one float32 multiplication.
//!
//! Embedding, norms, gates and biases keep their stored precision. The runtime dequantizes at
//! load ([`Quantized::dequantize`]) and stays the float32 oracle; the generated library keeps
//! `q` and the scales and dequantizes in registers to exactly the same float32 values.

use std::fmt;
use std::str::FromStr;

use crate::checkpoint::{expected_tensors, Checkpoint, DType};

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

    /// Parses [`Precision::name`]; `None` for anything else (`str::parse` gives an error that
    /// lists the choices).
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

/// A `--weights` value that names no [`Precision`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown weight format `{0}`: use f32, f16, int8 or int4 (`--weights int4` is the smallest)"
)]
pub struct UnknownPrecision(pub String);

impl FromStr for Precision {
    type Err = UnknownPrecision;

    fn from_str(s: &str) -> Result<Precision, UnknownPrecision> {
        Precision::parse(s).ok_or_else(|| UnknownPrecision(s.to_string()))
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
            scales[g * n + c] = (max_abs * qmax.recip()).max(1e-8);
        }
    }
    let q = (0..k * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            let v = (w[i] * scales[(r / group) * n + c].recip()).round_ties_even();
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

/// Why a checkpoint's weights cannot be given a precision.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PrecisionError {
    #[error(
        "tensor `{path}` has shape {shape:?}, whose input axis (the rows `x @ W` sums over) is \
         empty: {precision} quantizes in groups of min({GROUP}, rows) rows with one scale per group, \
         and an empty axis has no group; use --weights f32 or f16, or a config that gives this \
         kernel at least one input row"
    )]
    EmptyInputAxis {
        path: String,
        shape: Vec<usize>,
        precision: Precision,
    },
    #[error(
        "tensor `{path}` has shape {shape:?}: a Dense kernel needs an input and an output axis \
         (`(in, out)`, stacked `(layers, in, out)`) to be quantized in groups; this is not a \
         Needle v1 kernel"
    )]
    NotAMatrix { path: String, shape: Vec<usize> },
    #[error(
        "tensor `{path}` holds {value}, beyond IEEE half's largest finite value 65504: \
         --weights f16 cannot store it; use --weights f32, int8 or int4"
    )]
    F16Overflow { path: String, value: f32 },
}

/// Whether the parameter at `path` is a Dense kernel: what int8 and int4 quantize (every
/// parameter the reference names `kernel`; nothing else).
pub fn is_dense_kernel(path: &str) -> bool {
    path == "kernel" || path.ends_with("/kernel")
}

/// The precision that stores this checkpoint's values exactly: `f16` when every tensor is
/// stored as float16 (the original checkpoints), else `f32`. It is the default of `--weights`,
/// so that a default build and `needlec run` compute exactly what they did before precisions
/// existed.
pub fn lossless(ckpt: &Checkpoint) -> Precision {
    if !ckpt.tensors.is_empty() && ckpt.tensors.values().all(|t| t.dtype == DType::F16) {
        Precision::F16
    } else {
        Precision::F32
    }
}

/// Whether `precision` rounds some stored value of `ckpt` (`f16` over a float32 or bfloat16
/// tensor); the integer precisions always change the kernels and are not asked about here.
pub fn f16_rounds(ckpt: &Checkpoint, precision: Precision) -> bool {
    precision == Precision::F16 && ckpt.tensors.values().any(|t| t.dtype != DType::F16)
}

/// `v` rounded to the nearest IEEE half (ties to even) and widened back.
pub fn round_to_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// Checks that `ckpt` (already validated against its config) can be given `precision`: for
/// int8 and int4 every Dense kernel has a non-empty input axis to group along; for f16 every
/// value fits in IEEE half. Run it before [`crate::model::Model::from_checkpoint_as`] does the
/// work, so that a bad checkpoint gets one clear error instead of a panic halfway.
pub fn check(ckpt: &Checkpoint, precision: Precision) -> Result<(), PrecisionError> {
    match precision {
        Precision::F32 => Ok(()),
        Precision::F16 => {
            for (path, t) in &ckpt.tensors {
                if t.dtype == DType::F16 {
                    continue;
                }
                if let Some(value) = t
                    .to_f32()
                    .into_iter()
                    .find(|v| v.is_finite() && half::f16::from_f32(*v).is_infinite())
                {
                    return Err(PrecisionError::F16Overflow {
                        path: path.clone(),
                        value,
                    });
                }
            }
            Ok(())
        }
        Precision::Int8 | Precision::Int4 => {
            // The kernels the config implies (a loader has refused any other tensor), with their
            // stored shapes.
            for (path, _) in expected_tensors(&ckpt.config) {
                let Some(t) = ckpt.tensors.get(&path).filter(|_| is_dense_kernel(&path)) else {
                    continue;
                };
                if t.shape.len() < 2 {
                    return Err(PrecisionError::NotAMatrix {
                        path,
                        shape: t.shape.clone(),
                    });
                }
                if t.shape[t.shape.len() - 2] == 0 {
                    return Err(PrecisionError::EmptyInputAxis {
                        path,
                        shape: t.shape.clone(),
                        precision,
                    });
                }
            }
            Ok(())
        }
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
        assert_eq!(q.scales[0], 9.0 * (1.0f32 / 7.0));
        assert_eq!(q.scales[1], 1e-8, "an all-zero group keeps the 1e-8 floor");
        assert_eq!(q.scales[n + 1], 1.0f32 / 7.0);
        assert_eq!(q.q[6], -7);
        assert_eq!(q.q[32 * n + 1], -7);
        let d = q.dequantize();
        // -7 * scale: not quite -9, since the scale went through 1/7 rounded to float32.
        assert_eq!(d[6], -7.0 * q.scales[0]);
        assert_eq!(d[6], -9.000001);
        assert_eq!(d.len(), k * n);
    }

    /// The reference's divisions are multiplications by float32 reciprocals (XLA's rewrite):
    /// here a true division would give a different scale and a different `q`.
    #[test]
    fn divisions_are_reciprocal_multiplications() {
        let (max, w) = (0.05f32, -0.039285716f32);
        let q = quantize(&[max, w], 2, 1, Precision::Int4);
        assert_eq!(q.scales[0], max * (1.0f32 / 7.0));
        assert_ne!(q.scales[0], max / 7.0);
        assert_eq!(q.q, vec![7, -5]);
        assert_eq!(
            (w / q.scales[0]).round_ties_even(),
            -6.0,
            "what a division would give"
        );
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
