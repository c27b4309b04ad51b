//! Weight matrices embedded in read-only data, and the one place that loads them.
//!
//! Kernels never compute weight addresses themselves: they ask a [`WeightAccess`] for a row
//! ([`WeightAccess::row`]) or a block of columns ([`WeightAccess::block`], then
//! [`WeightBlock::row`]) and load lanes from it ([`WeightRow::load4`], [`WeightRow::load1`]).
//! A quantized format (int8 in groups of 32 along `k`, one f32 scale per group and column) then
//! only changes this file: the row carries a scale pointer too, and loads widen and scale.

use cranelift_codegen::ir::{types, InstBuilder, Value};
use cranelift_module::DataId;

use super::gen::{mem_ro, Gen, V4};

/// Storage format of an embedded weight matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// Row-major `[k][n]` float32.
    F32,
    /// float32 in column panels for matrix products: the first `n / PANEL * PANEL` columns in
    /// panels of [`PANEL`] columns, each panel `k`-major (`W[0][c..c+PANEL]`, `W[1][c..]`, ...),
    /// so that a tile of the product streams its weights contiguously; the last `n % PANEL`
    /// columns follow as a row-major `[k][n % PANEL]` block.
    F32Panels,
}

/// Columns per panel of [`WeightFormat::F32Panels`]: two 4-lane vectors, the width of a
/// multi-row matmul tile.
pub const PANEL: usize = 8;

impl WeightFormat {
    /// Row-major `[k][n]` values laid out in this format.
    pub fn layout(self, k: usize, n: usize, values: &[f32]) -> Vec<f32> {
        match self {
            WeightFormat::F32 => values.to_vec(),
            WeightFormat::F32Panels => {
                let np = n / PANEL * PANEL;
                let mut out = Vec::with_capacity(values.len());
                for c in (0..np).step_by(PANEL) {
                    for kk in 0..k {
                        out.extend_from_slice(&values[kk * n + c..kk * n + c + PANEL]);
                    }
                }
                for kk in 0..k {
                    out.extend_from_slice(&values[kk * n + np..kk * n + n]);
                }
                out
            }
        }
    }
}

/// A `[k][n]` weight matrix (`y = x @ W`) stored in the object's read-only data.
#[derive(Clone, Copy, Debug)]
pub struct WeightRef {
    pub data: DataId,
    pub k: usize,
    pub n: usize,
    pub format: WeightFormat,
}

impl WeightRef {
    /// The data objects a function reading these weights must import, in the order
    /// [`WeightAccess::new`] expects their addresses.
    pub fn data_ids(&self) -> Vec<DataId> {
        match self.format {
            WeightFormat::F32 | WeightFormat::F32Panels => vec![self.data],
        }
    }
}

/// Weight access inside one generated function.
pub struct WeightAccess {
    base: Value,
    k: i64,
    n: i64,
    format: WeightFormat,
}

/// A range of columns of every row, from [`WeightAccess::block`].
pub struct WeightBlock {
    ptr: Value,
    /// Bytes from one row of the block to the next.
    stride: i64,
    /// Bytes from one panel to the next, where the block spans panels.
    panel: Option<i64>,
}

/// One row `W[k][..]` (of the matrix, or of a [`WeightBlock`]).
pub struct WeightRow {
    ptr: Value,
    format: WeightFormat,
    panel: Option<i64>,
}

/// Columns `lo..hi` of a matrix that [`WeightAccess::block`] serves alike.
#[derive(Clone, Copy, Debug)]
pub struct ColumnRange {
    pub lo: i64,
    pub hi: i64,
    /// Blocks must start at a multiple of [`PANEL`] (relative to `lo`) and cover whole
    /// panels; otherwise any start and width work.
    pub panels: bool,
}

impl WeightAccess {
    /// `addrs`: the addresses of [`WeightRef::data_ids`], in that order.
    pub fn new(w: &WeightRef, addrs: &[Value]) -> Self {
        WeightAccess {
            base: addrs[0],
            k: w.k as i64,
            n: w.n as i64,
            format: w.format,
        }
    }

    /// Row `k` of a row-major ([`WeightFormat::F32`]) matrix, for row lookups (embedding
    /// tables). Panelled weights are read through [`WeightAccess::block`] only.
    pub fn row(&self, g: &mut Gen<'_>, k: Value) -> WeightRow {
        debug_assert_eq!(self.format, WeightFormat::F32);
        WeightRow {
            ptr: g.addr(self.base, k, self.n * 4),
            format: self.format,
            panel: None,
        }
    }

    /// The column ranges of the matrix, in order, covering `0..n`.
    pub fn column_ranges(&self) -> Vec<ColumnRange> {
        match self.format {
            WeightFormat::F32 => vec![ColumnRange {
                lo: 0,
                hi: self.n,
                panels: false,
            }],
            WeightFormat::F32Panels => {
                let np = self.n / PANEL as i64 * PANEL as i64;
                [(0, np, true), (np, self.n, false)]
                    .into_iter()
                    .filter(|&(lo, hi, _)| lo < hi)
                    .map(|(lo, hi, panels)| ColumnRange { lo, hi, panels })
                    .collect()
            }
        }
    }

    /// Columns from `c` (run-time, inside `range`, see [`ColumnRange::panels`]) of every row.
    pub fn block(&self, g: &mut Gen<'_>, range: &ColumnRange, c: Value) -> WeightBlock {
        match (self.format, range.panels) {
            (WeightFormat::F32, _) => WeightBlock {
                ptr: g.addr(self.base, c, 4),
                stride: self.n * 4,
                panel: None,
            },
            // Panel `c / PANEL` starts at `c / PANEL * k * PANEL` floats.
            (WeightFormat::F32Panels, true) => WeightBlock {
                ptr: g.addr(self.base, c, self.k * 4),
                stride: PANEL as i64 * 4,
                panel: Some(self.k * PANEL as i64 * 4),
            },
            (WeightFormat::F32Panels, false) => {
                let tail = g.b.ins().iadd_imm_s(self.base, range.lo * self.k * 4);
                let c = g.b.ins().iadd_imm_s(c, -range.lo);
                WeightBlock {
                    ptr: g.addr(tail, c, 4),
                    stride: (range.hi - range.lo) * 4,
                    panel: None,
                }
            }
        }
    }
}

impl WeightBlock {
    /// Row `k` of the block; its columns are then relative to the block's first.
    pub fn row(&self, g: &mut Gen<'_>, k: Value) -> WeightRow {
        WeightRow {
            ptr: g.addr(self.ptr, k, self.stride),
            format: WeightFormat::F32,
            panel: self.panel,
        }
    }
}

impl WeightRow {
    /// `W[k][col..col + 4]`.
    pub fn load4(&self, g: &mut Gen<'_>, col: Value) -> V4 {
        debug_assert!(self.panel.is_none());
        match self.format {
            WeightFormat::F32 | WeightFormat::F32Panels => g.vload_with(self.ptr, col, mem_ro()),
        }
    }

    /// `W[k][col]`.
    pub fn load1(&self, g: &mut Gen<'_>, col: Value) -> Value {
        debug_assert!(self.panel.is_none());
        let p = g.addr(self.ptr, col, 4);
        g.b.ins().load(types::F32, mem_ro(), p, 0)
    }

    /// Byte offset of column `col` (known at build time) from the row's start.
    fn offset(&self, col: i64) -> i32 {
        let p = PANEL as i64;
        let off = match self.panel {
            Some(step) => col / p * step + col % p * 4,
            None => col * 4,
        };
        i32::try_from(off).expect("weight offset fits i32")
    }

    /// `W[k][col..col + 4]`, `col` known at build time (a multiple of 4 in a panelled block).
    pub fn load4_at(&self, g: &mut Gen<'_>, col: i64) -> V4 {
        let off = self.offset(col);
        let p = g.b.ins().iadd_imm_s(self.ptr, i64::from(off));
        let z = g.iconst(0);
        g.vload_with(p, z, mem_ro())
    }

    /// `W[k][col]`, `col` known at build time.
    pub fn load1_at(&self, g: &mut Gen<'_>, col: i64) -> Value {
        let off = self.offset(col);
        g.b.ins().load(types::F32, mem_ro(), self.ptr, off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panel_layout_is_k_major_panels_then_a_row_major_tail() {
        let (k, n) = (3, 19);
        let values: Vec<f32> = (0..k * n).map(|i| i as f32).collect();
        let packed = WeightFormat::F32Panels.layout(k, n, &values);
        assert_eq!(packed.len(), values.len());
        let np = n / PANEL * PANEL;
        for kk in 0..k {
            for c in 0..n {
                let at = if c < np {
                    c / PANEL * k * PANEL + kk * PANEL + c % PANEL
                } else {
                    np * k + kk * (n - np) + (c - np)
                };
                assert_eq!(packed[at], values[kk * n + c], "W[{kk}][{c}]");
            }
        }
        assert_eq!(WeightFormat::F32.layout(k, n, &values), values);
    }
}
