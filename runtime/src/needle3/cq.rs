//! CQ, the package's codebook quantization (docs/needle3.md section 8), kept as codes: a
//! [`CqTensor`] is what a `.cact` file stores for one tensor, and what a compiled library embeds
//! so that its weights stay in CQ form (the codes are dequantized where they are read).
//!
//! A CQ tensor is `rows` runs of `cols` values, each zero-padded to whole groups of `group`.
//! Each group was rotated by the normalized Walsh-Hadamard matrix `H / sqrt(group)`, its L2
//! norm kept as float16, and every rotated value divided by the norm replaced by the nearest
//! codebook level; the code of that level is stored in `width` bits. A value comes back as
//! `H (level * norm) / sqrt(group)`, computed exactly as [`CqTensor::dequantize_row`] does.

/// The record `bits` value of the ternary code (two bits a value: crumb 3 is level 0, 0 is
/// level 1, 1 is level 2; crumb 2 is not a code).
pub const TERNARY: u32 = 5;

/// The levels, in code order, of the crumbs of the ternary code (crumb 2 reads as 0 and never
/// occurs in a checked tensor).
fn ternary_codes(levels: &[f32]) -> Vec<f32> {
    vec![levels[1], levels[2], 0.0, levels[0]]
}

/// One tensor in CQ form.
#[derive(Clone, Debug, PartialEq)]
pub struct CqTensor {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// The record's code width: 1 to 4 bits, or [`TERNARY`].
    pub bits: u32,
    /// The codes, `width` bits each, little-endian within and across bytes, row after row,
    /// each row `padded_cols * width / 8` bytes.
    pub packed: Vec<u8>,
    /// The float16 norm of every group, as float32 (exact), `rows * groups_per_row`.
    pub norms: Vec<f32>,
    /// The level of every code (`1 << width` entries; ternary: by crumb).
    pub code_levels: Vec<f32>,
}

/// The unnormalized fast Walsh-Hadamard transform (Sylvester order) in place, in the
/// precision of `T` (float32 where it dequantizes, float64 where it picks codes).
pub fn fwht<T: Copy + std::ops::Add<Output = T> + std::ops::Sub<Output = T>>(x: &mut [T]) {
    let mut h = 1;
    while h < x.len() {
        for i in (0..x.len()).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
}

impl CqTensor {
    /// The geometry and levels (in level order; ternary: its three) without codes or norms.
    fn empty(rows: usize, cols: usize, group: usize, bits: u32, levels: &[f32]) -> CqTensor {
        CqTensor {
            rows,
            cols,
            group,
            bits,
            packed: Vec::new(),
            norms: Vec::new(),
            code_levels: if bits == TERNARY {
                ternary_codes(levels)
            } else {
                levels.to_vec()
            },
        }
    }

    /// Bits a code takes.
    pub fn width(&self) -> usize {
        if self.bits == TERNARY {
            2
        } else {
            self.bits as usize
        }
    }

    /// `cols` rounded up to whole groups.
    pub fn padded_cols(&self) -> usize {
        self.cols.div_ceil(self.group) * self.group
    }

    pub fn groups_per_row(&self) -> usize {
        self.padded_cols() / self.group
    }

    /// Bytes of one row's codes.
    pub fn row_bytes(&self) -> usize {
        self.padded_cols() * self.width() / 8
    }

    /// The code of value `k` (padding included) of row `r`.
    pub fn code(&self, r: usize, k: usize) -> usize {
        let width = self.width();
        let bit = r * self.row_bytes() * 8 + k * width;
        let word = u32::from(self.packed[bit / 8])
            | self
                .packed
                .get(bit / 8 + 1)
                .map_or(0, |&v| u32::from(v) << 8);
        ((word >> (bit % 8)) & ((1 << width) - 1)) as usize
    }

    /// Reads a `.cact` blob (the codes of every row, then every group's float16 norm) of a
    /// `(rows, cols)` tensor; `levels` in level order (ternary: its three levels). Errors name
    /// the first bad code (ternary crumb 2); the caller adds which tensor.
    pub fn from_blob(
        blob: &[u8],
        rows: usize,
        cols: usize,
        group: usize,
        bits: u32,
        levels: &[f32],
    ) -> Result<CqTensor, String> {
        let mut t = CqTensor::empty(rows, cols, group, bits, levels);
        let n_idx = rows * t.row_bytes();
        let n_norms = rows * t.groups_per_row();
        if blob.len() != n_idx + 2 * n_norms {
            return Err(format!(
                "a CQ blob of {} bytes, but {rows} x {cols} in groups of {group} at {bits} bits \
                 take {}",
                blob.len(),
                n_idx + 2 * n_norms
            ));
        }
        t.packed = blob[..n_idx].to_vec();
        t.norms = blob[n_idx..]
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        if bits == TERNARY {
            for r in 0..rows {
                for k in 0..t.padded_cols() {
                    if t.code(r, k) == 2 {
                        return Err(format!(
                            "ternary crumb 2 at row {r}, column {k} is not a code (3, 0, 1 \
                             are); the file is corrupt"
                        ));
                    }
                }
            }
        }
        Ok(t)
    }

    /// Row `r`'s values into `out` (`cols` floats): per group `level * norm`, the transform,
    /// times `1 / sqrt(group)`, in float32, as the package dequantizes.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let scale = 1.0 / (self.group as f32).sqrt();
        let mut buf = vec![0f32; self.group];
        let gpr = self.groups_per_row();
        for g in 0..gpr {
            let norm = self.norms[r * gpr + g];
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.code_levels[self.code(r, g * self.group + i)] * norm;
            }
            fwht(&mut buf);
            let lo = g * self.group;
            let hi = (lo + self.group).min(self.cols);
            for (o, v) in out[lo..hi].iter_mut().zip(&buf) {
                *o = v * scale;
            }
        }
    }

    /// The rows of `parts` one after another: one tensor, where they share columns, group,
    /// code width and levels (`None` otherwise).
    pub fn concat_rows(parts: &[&CqTensor]) -> Option<CqTensor> {
        let first = parts.first()?;
        let same = |t: &&CqTensor| {
            (t.cols, t.group, t.bits) == (first.cols, first.group, first.bits)
                && t.code_levels == first.code_levels
        };
        if !parts.iter().all(same) {
            return None;
        }
        Some(CqTensor {
            rows: parts.iter().map(|t| t.rows).sum(),
            packed: parts
                .iter()
                .flat_map(|t| t.packed.iter().copied())
                .collect(),
            norms: parts.iter().flat_map(|t| t.norms.iter().copied()).collect(),
            ..(*first).clone()
        })
    }

    /// Rows `lo..hi` as a tensor of their own.
    pub fn rows(&self, lo: usize, hi: usize) -> CqTensor {
        let (rb, gpr) = (self.row_bytes(), self.groups_per_row());
        CqTensor {
            rows: hi - lo,
            packed: self.packed[lo * rb..hi * rb].to_vec(),
            norms: self.norms[lo * gpr..hi * gpr].to_vec(),
            ..self.clone()
        }
    }

    /// Every row's values, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
                self.dequantize_row(r, row);
            }
        }
        out
    }

    /// The package's CQ quantization (`quantize.cq_quantize`) of every `cols`-value run of
    /// `values`, in groups of `group` (zero-padded), to the nearest of `levels` (ascending; 2,
    /// 4, 8 or 16 of them, or 3 for the ternary code): rotate each group by the normalized
    /// Walsh-Hadamard matrix, keep its L2 norm as float16, pick the nearest level of `rotated /
    /// max(norm, 1e-12)` (ties to the lower level).
    pub fn encode(values: &[f32], cols: usize, group: usize, levels: &[f32]) -> CqTensor {
        let bits = match levels.len() {
            2 => 1,
            3 => TERNARY,
            4 => 2,
            8 => 3,
            _ => 4,
        };
        let rows = values.len().checked_div(cols).unwrap_or(0);
        let mut t = CqTensor::empty(rows, cols, group, bits, levels);
        let (pad, width) = (t.padded_cols(), t.width());
        t.packed = vec![0u8; rows * t.row_bytes()];
        let scale64 = 1.0 / (group as f64).sqrt();
        let mut buf = vec![0f32; pad];
        let mut rot = vec![0f64; group];
        let mut bit = 0usize;
        for row in values.chunks_exact(cols.max(1)).take(rows) {
            buf[..cols].copy_from_slice(row);
            buf[cols..].iter_mut().for_each(|v| *v = 0.0);
            for g in buf.chunks_exact(group) {
                // The rotation in float64, rounded once: the choice of code then only differs
                // from the package's where its own float32 rounding lands across a midpoint.
                for (r, &v) in rot.iter_mut().zip(g.iter()) {
                    *r = f64::from(v);
                }
                fwht(&mut rot);
                rot.iter_mut()
                    .for_each(|v| *v = f64::from((*v * scale64) as f32));
                let norm = rot.iter().map(|v| v * v).sum::<f64>().sqrt() as f32;
                t.norms.push(half::f16::from_f32(norm).to_f32());
                let inv = norm.max(1e-12);
                for &r in &rot {
                    let u = r as f32 / inv;
                    let pos = levels
                        .partition_point(|&l| l < u)
                        .clamp(1, levels.len() - 1);
                    let (lo, hi) = (levels[pos - 1], levels[pos]);
                    let level = if (u - lo).abs() <= (hi - u).abs() {
                        pos - 1
                    } else {
                        pos
                    };
                    let code = if bits == TERNARY {
                        [3, 0, 1][level]
                    } else {
                        level
                    };
                    let word = (code as u32) << (bit % 8);
                    t.packed[bit / 8] |= word as u8;
                    if bit % 8 + width > 8 {
                        t.packed[bit / 8 + 1] |= (word >> 8) as u8;
                    }
                    bit += width;
                }
            }
        }
        t
    }
}
