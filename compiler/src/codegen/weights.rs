//! Weight matrices embedded in read-only data, and the one place that loads them.
//!
//! Kernels never compute weight addresses themselves: they ask a [`WeightAccess`] for a row
//! ([`WeightAccess::row`], tables) or a block of columns ([`WeightAccess::block`]) and walk its
//! rows with [`WeightBlock::for_each_row`] / [`WeightBlock::for_each_row1`], which hand them
//! the float32 weights of the columns they asked for. Every storage format is decoded here, in
//! registers:
//!
//! - float32 as is;
//! - IEEE half widened exactly (a shift, a mask and one multiply by 2^112);
//! - int8/int4 `q` with one float32 scale per group of rows and column: `q * scale` in
//!   float32, the very values the reference's quantization computes with
//!   ([`needle_runtime::quant::Quantized::dequantize`]); a kernel's sums then run over those
//!   values in its usual order, so quantization changes nothing downstream.
//!
//! Matrix products read column panels ([`PANEL`] columns, `k`-major), so a tile streams its
//! weights contiguously whatever the element size; int4 packs a panel row into four bytes, byte
//! `j` holding column `j` in its low nibble and column `j + 4` in its high one, so one widening
//! load yields four lanes of either half with the same shifts.

use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Type, Value};
use cranelift_module::DataId;
use needle_runtime::quant::{quantize, Precision};

use super::gen::{mem_ro, Gen, V4};

/// Storage format of an embedded weight matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// Row-major `[k][n]` float32.
    F32,
    /// Row-major `[k][n]` IEEE half (tables of float16 checkpoints).
    F16,
    /// float32 in column panels for matrix products: the first `n / PANEL * PANEL` columns in
    /// panels of [`PANEL`] columns, each panel `k`-major (`W[0][c..c+PANEL]`, `W[1][c..]`, ...),
    /// so that a tile of the product streams its weights contiguously; the last `n % PANEL`
    /// columns follow as a row-major `[k][n % PANEL]` block.
    F32Panels,
    /// IEEE half, in the panels of [`WeightFormat::F32Panels`].
    F16Panels,
    /// int8 `q` in those panels, with float32 scales per `group` rows and column (a second
    /// data object laid out the same way, a group where `q` has a row).
    I8Panels { group: usize },
    /// int4 `q`, two per byte in the panels (see the module docs; the row-major tail keeps
    /// one per byte), scales as [`WeightFormat::I8Panels`].
    I4Panels { group: usize },
    /// int8 `q` for integer dot products with quantized activations
    /// (`--quantize-activations`): column by column, each column's groups of [`DOT_GROUP`]
    /// rows in order, 32 bytes a group (rows past `k` zero); float32 scales row-major
    /// `[groups][n]`, as the reference computes them.
    I8Dot { group: usize },
    /// int4 `q` for integer dot products: as [`WeightFormat::I8Dot`] with 16 bytes a group,
    /// byte `b` holding row `b` in its low nibble and row `b + 16` in its high one, so that one
    /// load yields the group as four 8-lane vectors with a widening and a shift each.
    I4Dot { group: usize },
}

/// Rows per block of an integer dot product (the reference's quantization group, or all of a
/// smaller `k`, zero-padded to this).
pub const DOT_GROUP: usize = 32;

/// Columns per panel: two 4-lane vectors, the width of a multi-row matmul tile.
pub const PANEL: usize = 8;

/// Zero bytes after the `q` data: a 4-lane int8/int4 load reads 8 bytes.
const Q_PAD: usize = 8;

/// How one element is stored, and so loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Elem {
    F32,
    F16,
    I8,
    /// Two per byte, paired as in the module docs (panels only).
    I4Pair,
}

impl Elem {
    /// Bytes of one row of a panel.
    fn panel_row_bytes(self) -> i64 {
        match self {
            Elem::F32 => 4 * PANEL as i64,
            Elem::F16 => 2 * PANEL as i64,
            Elem::I8 => PANEL as i64,
            Elem::I4Pair => PANEL as i64 / 2,
        }
    }

    /// Bytes per element outside panels.
    fn size(self) -> i64 {
        match self {
            Elem::F32 => 4,
            Elem::F16 => 2,
            Elem::I8 | Elem::I4Pair => 1,
        }
    }
}

/// The bytes of an embedded weight matrix: the values, and the scales of an integer format.
pub struct WeightData {
    pub bytes: Vec<u8>,
    pub scales: Option<Vec<f32>>,
}

impl WeightFormat {
    /// The format of a matrix-product weight stored as `precision`.
    pub fn panels(precision: Precision, group: usize) -> WeightFormat {
        match precision {
            Precision::F32 => WeightFormat::F32Panels,
            Precision::F16 => WeightFormat::F16Panels,
            Precision::Int8 => WeightFormat::I8Panels { group },
            Precision::Int4 => WeightFormat::I4Panels { group },
        }
    }

    fn panelled(self) -> bool {
        !matches!(
            self,
            WeightFormat::F32
                | WeightFormat::F16
                | WeightFormat::I8Dot { .. }
                | WeightFormat::I4Dot { .. }
        )
    }

    /// Whether the weights are laid out for [`WeightFormat::I8Dot`]-style integer dot products.
    pub fn is_dot(self) -> bool {
        matches!(
            self,
            WeightFormat::I8Dot { .. } | WeightFormat::I4Dot { .. }
        )
    }

    /// Element storage of the panels (`tail == false`) or of the row-major part.
    fn elem(self, tail: bool) -> Elem {
        match self {
            WeightFormat::F32 | WeightFormat::F32Panels => Elem::F32,
            WeightFormat::F16 | WeightFormat::F16Panels => Elem::F16,
            WeightFormat::I8Panels { .. }
            | WeightFormat::I8Dot { .. }
            | WeightFormat::I4Dot { .. } => Elem::I8,
            WeightFormat::I4Panels { .. } if tail => Elem::I8,
            WeightFormat::I4Panels { .. } => Elem::I4Pair,
        }
    }

    fn group(self) -> Option<usize> {
        match self {
            WeightFormat::I8Panels { group }
            | WeightFormat::I4Panels { group }
            | WeightFormat::I8Dot { group }
            | WeightFormat::I4Dot { group } => Some(group),
            _ => None,
        }
    }

    /// Row-major `[k][n]` float32 values laid out in this format (float32 formats only).
    pub fn layout(self, k: usize, n: usize, values: &[f32]) -> Vec<f32> {
        if self.panelled() {
            panel_order(k, n, values)
        } else {
            values.to_vec()
        }
    }

    /// Row-major `[k][n]` values encoded in this format, little-endian: half rounds (exact for
    /// values that are halves), the integer formats quantize as the reference does.
    pub fn encode(self, k: usize, n: usize, values: &[f32]) -> WeightData {
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let f16_bytes = |v: &[f32]| {
            v.iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect()
        };
        match self {
            WeightFormat::F32 => WeightData {
                bytes: f32_bytes(values),
                scales: None,
            },
            WeightFormat::F16 => WeightData {
                bytes: f16_bytes(values),
                scales: None,
            },
            WeightFormat::F32Panels => WeightData {
                bytes: f32_bytes(&panel_order(k, n, values)),
                scales: None,
            },
            WeightFormat::F16Panels => WeightData {
                bytes: f16_bytes(&panel_order(k, n, values)),
                scales: None,
            },
            WeightFormat::I8Dot { .. } | WeightFormat::I4Dot { .. } => {
                let int4 = matches!(self, WeightFormat::I4Dot { .. });
                let precision = if int4 {
                    Precision::Int4
                } else {
                    Precision::Int8
                };
                let q = quantize(values, k, n, precision);
                debug_assert_eq!(Some(q.group), self.group());
                let blocks = k.div_ceil(DOT_GROUP);
                let at = |r: usize, c: usize| if r < k { q.q[r * n + c] as u8 } else { 0 };
                let mut bytes = Vec::with_capacity(n * blocks * DOT_GROUP);
                for c in 0..n {
                    for b in 0..blocks {
                        let r0 = b * DOT_GROUP;
                        if int4 {
                            let half = DOT_GROUP / 2;
                            bytes.extend(
                                (0..half)
                                    .map(|t| (at(r0 + t, c) & 0x0f) | (at(r0 + t + half, c) << 4)),
                            );
                        } else {
                            bytes.extend((0..DOT_GROUP).map(|t| at(r0 + t, c)));
                        }
                    }
                }
                WeightData {
                    bytes,
                    scales: Some(q.scales),
                }
            }
            WeightFormat::I8Panels { .. } | WeightFormat::I4Panels { .. } => {
                let precision = match self {
                    WeightFormat::I8Panels { .. } => Precision::Int8,
                    _ => Precision::Int4,
                };
                let q = quantize(values, k, n, precision);
                debug_assert_eq!(Some(q.group), self.group());
                let scales = panel_order(q.groups(), n, &q.scales);
                let ordered = panel_order(k, n, &q.q);
                let np = n / PANEL * PANEL;
                let mut bytes: Vec<u8> = if precision == Precision::Int8 {
                    ordered.iter().map(|&v| v as u8).collect()
                } else {
                    let (panels, tail) = ordered.split_at(np * k);
                    let mut b: Vec<u8> = panels
                        .chunks(PANEL)
                        .flat_map(|row| {
                            (0..PANEL / 2).map(move |j| {
                                (row[j] as u8 & 0x0f) | ((row[j + PANEL / 2] as u8) << 4)
                            })
                        })
                        .collect();
                    b.extend(tail.iter().map(|&v| v as u8));
                    b
                };
                bytes.extend([0u8; Q_PAD]);
                WeightData {
                    bytes,
                    scales: Some(scales),
                }
            }
        }
    }
}

/// Row-major `[k][n]` values in panel order (see [`WeightFormat::F32Panels`]).
fn panel_order<T: Copy>(k: usize, n: usize, values: &[T]) -> Vec<T> {
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

/// A `[k][n]` weight matrix (`y = x @ W`) stored in the object's read-only data.
#[derive(Clone, Copy, Debug)]
pub struct WeightRef {
    pub data: DataId,
    /// The scales of an integer format.
    pub scales: Option<DataId>,
    pub k: usize,
    pub n: usize,
    pub format: WeightFormat,
}

impl WeightRef {
    /// The data objects a function reading these weights must import, in the order
    /// [`WeightAccess::new`] expects their addresses.
    pub fn data_ids(&self) -> Vec<DataId> {
        std::iter::once(self.data).chain(self.scales).collect()
    }
}

/// Weight access inside one generated function.
pub struct WeightAccess {
    base: Value,
    scales: Option<Value>,
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
    elem: Elem,
    k: i64,
    /// The scales of an integer format: the block's first group.
    scales: Option<GroupScales>,
    /// Rows per step of [`WeightBlock::for_each_row`]'s loop.
    unroll: i64,
}

/// Where a block's scales are: like its `q`, with a group where `q` has a row.
#[derive(Clone, Copy)]
struct GroupScales {
    ptr: Value,
    group: i64,
    /// Bytes from one group's scales to the next.
    stride: i64,
    panel: Option<i64>,
}

/// One row `W[k][..]` (of the matrix, or of a [`WeightBlock`]).
pub struct WeightRow {
    ptr: Value,
    elem: Elem,
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
            scales: w.scales.map(|_| addrs[1]),
            k: w.k as i64,
            n: w.n as i64,
            format: w.format,
        }
    }

    /// Row `k` of a row-major ([`WeightFormat::F32`] or [`WeightFormat::F16`]) matrix, for
    /// row lookups (embedding tables). Panelled weights are read through
    /// [`WeightAccess::block`] only.
    pub fn row(&self, g: &mut Gen<'_>, k: Value) -> WeightRow {
        debug_assert!(!self.format.panelled());
        let elem = self.format.elem(true);
        WeightRow {
            ptr: g.addr(self.base, k, self.n * elem.size()),
            elem,
            panel: None,
        }
    }

    /// The column ranges of the matrix, in order, covering `0..n`.
    pub fn column_ranges(&self) -> Vec<ColumnRange> {
        if !self.format.panelled() {
            return vec![ColumnRange {
                lo: 0,
                hi: self.n,
                panels: false,
            }];
        }
        let np = self.n / PANEL as i64 * PANEL as i64;
        [(0, np, true), (np, self.n, false)]
            .into_iter()
            .filter(|&(lo, hi, _)| lo < hi)
            .map(|(lo, hi, panels)| ColumnRange { lo, hi, panels })
            .collect()
    }

    /// Columns from `c` (run-time, inside `range`, see [`ColumnRange::panels`]) of every row.
    pub fn block(&self, g: &mut Gen<'_>, range: &ColumnRange, c: Value) -> WeightBlock {
        let (k, p) = (self.k, PANEL as i64);
        let elem = self.format.elem(!range.panels);
        let groups = self
            .format
            .group()
            .map(|gs| (gs as i64, (self.k + gs as i64 - 1) / gs as i64));
        let (ptr, stride, panel) = if !self.format.panelled() {
            (
                g.addr(self.base, c, elem.size()),
                self.n * elem.size(),
                None,
            )
        } else if range.panels {
            // Panel `c / PANEL` starts at `c / PANEL * k` panel rows.
            let prb = elem.panel_row_bytes();
            (panel_addr(g, self.base, c, k * prb), prb, Some(k * prb))
        } else {
            let tail = g.b.ins().iadd_imm_s(
                self.base,
                range.lo / p * k * self.format.elem(false).panel_row_bytes(),
            );
            let c = g.b.ins().iadd_imm_s(c, -range.lo);
            let w = range.hi - range.lo;
            (g.addr(tail, c, elem.size()), w * elem.size(), None)
        };
        let scales = match (self.scales, groups) {
            (Some(base), Some((group, ng))) => Some(if range.panels {
                GroupScales {
                    ptr: panel_addr(g, base, c, ng * p * 4),
                    group,
                    stride: p * 4,
                    panel: Some(ng * p * 4),
                }
            } else {
                let tail = g.b.ins().iadd_imm_s(base, range.lo * ng * 4);
                let c = g.b.ins().iadd_imm_s(c, -range.lo);
                let w = range.hi - range.lo;
                GroupScales {
                    ptr: g.addr(tail, c, 4),
                    group,
                    stride: w * 4,
                    panel: None,
                }
            }),
            _ => None,
        };
        WeightBlock {
            ptr,
            stride,
            panel,
            elem,
            k,
            scales,
            unroll: 1,
        }
    }
}

/// `base + c / PANEL * panel_bytes`, `c` a multiple of [`PANEL`].
fn panel_addr(g: &mut Gen<'_>, base: Value, c: Value, panel_bytes: i64) -> Value {
    let p = PANEL as i64;
    if panel_bytes % p == 0 {
        g.addr(base, c, panel_bytes / p)
    } else {
        let i = g.b.ins().ushr_imm_u(c, 3);
        g.addr(base, i, panel_bytes)
    }
}

impl WeightBlock {
    /// The block with its row loop unrolled `rows` times (the target's
    /// `KernelFacts::matmul_unroll`): fewer loop branches and address updates per weight row.
    pub fn unrolled(mut self, rows: usize) -> Self {
        self.unroll = rows.max(1) as i64;
        self
    }

    /// Row `k` of the block; its columns are then relative to the block's first.
    fn row(&self, g: &mut Gen<'_>, k: Value) -> WeightRow {
        WeightRow {
            ptr: g.addr(self.ptr, k, self.stride),
            elem: self.elem,
            panel: self.panel,
        }
    }

    /// Calls `body(g, k, w)` for every row `k` in order, `w[j]` = the float32 weights
    /// `W[k][col + 4 j .. col + 4 j + 4]` for `col` in `cols` (known at build time, relative
    /// to the block; multiples of 4 in a panelled block).
    pub fn for_each_row(
        &self,
        g: &mut Gen<'_>,
        cols: &[i64],
        mut body: impl FnMut(&mut Gen<'_>, Value, &[V4]),
    ) {
        self.rows(
            g,
            |g, srow| cols.iter().map(|&c| srow.scales4_at(g, c)).collect(),
            |g, kk, row, scales: Option<&Vec<V4>>| {
                let ws: Vec<V4> = match scales {
                    None => cols.iter().map(|&c| row.load4_at(g, c)).collect(),
                    Some(sc) => cols
                        .iter()
                        .zip(sc)
                        .map(|(&c, &s)| {
                            let q = row.load4_at(g, c);
                            g.vmul(q, s)
                        })
                        .collect(),
                };
                body(g, kk, &ws)
            },
            |_, _| {},
        )
    }

    /// Whether the block's rows are `q` with scales per group (int8, int4).
    pub fn grouped(&self) -> bool {
        self.scales.is_some()
    }

    /// [`WeightBlock::for_each_row`] with the scales left to the caller: for a
    /// [`WeightBlock::grouped`] block the rows come as `q` (float32) and `end(g, s)` runs after
    /// each group's rows with its scales (`s[j]` for `cols[j]`), so a kernel can sum `x * q` over
    /// a group and scale the sum once, a multiply per group instead of one per weight. Other
    /// blocks: the rows are the weights and `end` never runs.
    pub fn for_each_row_by_group(
        &self,
        g: &mut Gen<'_>,
        cols: &[i64],
        mut body: impl FnMut(&mut Gen<'_>, Value, &[V4]),
        mut end: impl FnMut(&mut Gen<'_>, &[V4]),
    ) {
        self.rows(
            g,
            |_, _| (),
            |g, kk, row, _| {
                let ws: Vec<V4> = cols.iter().map(|&c| row.load4_at(g, c)).collect();
                body(g, kk, &ws)
            },
            |g, srow| {
                let s: Vec<V4> = cols.iter().map(|&c| srow.scales4_at(g, c)).collect();
                end(g, &s)
            },
        )
    }

    /// [`WeightBlock::for_each_row`] for one column `col`: `body(g, k, W[k][col])`.
    pub fn for_each_row1(
        &self,
        g: &mut Gen<'_>,
        col: i64,
        mut body: impl FnMut(&mut Gen<'_>, Value, Value),
    ) {
        self.rows(
            g,
            |g, srow| srow.scale1_at(g, col),
            |g, kk, row, scale: Option<&Value>| {
                let w = match scale {
                    None => row.load1_at(g, col),
                    Some(&s) => {
                        let q = row.load1_at(g, col);
                        g.b.ins().fmul(q, s)
                    }
                };
                body(g, kk, w)
            },
            |_, _| {},
        )
    }

    /// Rows in order. For an integer format group by group: `scales` loads what the rows of a
    /// group share from its scale row, once per group, and `body` gets it (a row's raw loads
    /// are then `q` as float32, to be scaled); `end` runs after the group's rows, with its scale
    /// row. Unrolled by [`WeightBlock::unrolled`]: one loop step covers that many rows,
    /// addressed by constant offsets from the step's first.
    fn rows<S>(
        &self,
        g: &mut Gen<'_>,
        mut scales: impl FnMut(&mut Gen<'_>, &WeightRow) -> S,
        mut body: impl FnMut(&mut Gen<'_>, Value, &WeightRow, Option<&S>),
        mut end: impl FnMut(&mut Gen<'_>, &WeightRow),
    ) {
        let unroll = self.unroll.max(1);
        // Rows `k0 + lo .. k0 + hi` (`lo`, `hi` known at build time), `unroll` per step. The
        // row address is a loop-carried pointer bumped by the stride: computed from the index,
        // Cranelift rematerializes the block's base (symbol, panel offset) in every iteration.
        let pt = g.ptr;
        let mut span = |g: &mut Gen<'_>, k0: Value, lo: i64, hi: i64, s: Option<&S>| {
            let mid = lo + (hi - lo) / unroll * unroll;
            let first = g.b.ins().iadd_imm_s(k0, lo);
            let start = self.row(g, first).ptr;
            let cursor = g.var(pt, start);
            g.for_const(lo, mid, unroll, |g, r| {
                let kk0 = g.b.ins().iadd(k0, r);
                let p0 = g.get(cursor);
                for u in 0..unroll {
                    let kk = g.b.ins().iadd_imm_s(kk0, u);
                    let row = WeightRow {
                        ptr: g.b.ins().iadd_imm_s(p0, u * self.stride),
                        elem: self.elem,
                        panel: self.panel,
                    };
                    body(g, kk, &row, s)
                }
                let next = g.b.ins().iadd_imm_s(p0, unroll * self.stride);
                g.set(cursor, next);
            });
            g.for_const(mid, hi, 1, |g, r| {
                let kk = g.b.ins().iadd(k0, r);
                let p0 = g.get(cursor);
                let row = WeightRow {
                    ptr: p0,
                    elem: self.elem,
                    panel: self.panel,
                };
                body(g, kk, &row, s);
                let next = g.b.ins().iadd_imm_s(p0, self.stride);
                g.set(cursor, next);
            });
        };
        let zero = g.iconst(0);
        let Some(sc) = self.scales else {
            span(g, zero, 0, self.k, None);
            return;
        };
        let full = self.k / sc.group;
        let scale_row = |g: &mut Gen<'_>, gi: Value| WeightRow {
            ptr: g.addr(sc.ptr, gi, sc.stride),
            elem: Elem::F32,
            panel: sc.panel,
        };
        g.for_const(0, full, 1, |g, gi| {
            let srow = scale_row(g, gi);
            let s = scales(g, &srow);
            let k0 = g.b.ins().imul_imm_s(gi, sc.group);
            span(g, k0, 0, sc.group, Some(&s));
            end(g, &srow);
        });
        if full * sc.group < self.k {
            let gi = g.iconst(full);
            let srow = scale_row(g, gi);
            let s = scales(g, &srow);
            span(g, zero, full * sc.group, self.k, Some(&s));
            end(g, &srow);
        }
    }
}

/// Flags for loading scales: read-only, but not movable, so that Cranelift keeps the loads
/// where they are written (once per group) instead of re-loading them next to each use in the
/// row loop.
fn mem_ro_pinned() -> MemFlagsData {
    MemFlagsData::new().with_notrap().with_readonly()
}

impl WeightRow {
    /// Scales `S[g][col..col + 4]` of a scale row (float32, laid out like float32 panels).
    fn scales4_at(&self, g: &mut Gen<'_>, col: i64) -> V4 {
        let (off, _) = self.offset(col);
        let flags = mem_ro_pinned();
        if g.simd() {
            V4::Simd(g.b.ins().load(types::F32X4, flags, self.ptr, off))
        } else {
            V4::Lanes(std::array::from_fn(|i| {
                g.b.ins()
                    .load(types::F32, flags, self.ptr, off + 4 * i as i32)
            }))
        }
    }

    /// Scale `S[g][col]` of a scale row.
    fn scale1_at(&self, g: &mut Gen<'_>, col: i64) -> Value {
        let (off, _) = self.offset(col);
        g.b.ins().load(types::F32, mem_ro_pinned(), self.ptr, off)
    }

    /// `W[k][col..col + 4]` of a row-major row.
    pub fn load4(&self, g: &mut Gen<'_>, col: Value) -> V4 {
        debug_assert!(self.panel.is_none());
        match self.elem {
            Elem::F32 => g.vload_with(self.ptr, col, mem_ro()),
            _ => {
                let p = g.addr(self.ptr, col, self.elem.size());
                self.load4_from(g, p, 0, false)
            }
        }
    }

    /// For a row-major half row on a target with vectors: `W[k][col..col + 8]` (one 16-byte
    /// load) as the even columns `col, col + 2, ..` and the odd ones, each decoded with a shift
    /// or two, a mask and a multiply and no lane shuffles; `None` for other storage, which
    /// [`WeightRow::load4`] serves.
    pub fn load8_even_odd(&self, g: &mut Gen<'_>, col: Value) -> Option<(V4, V4)> {
        if self.elem != Elem::F16 || self.panel.is_some() || !g.simd() {
            return None;
        }
        let p = g.addr(self.ptr, col, 2);
        let words = g.b.ins().load(types::I32X4, mem_ro(), p, 0);
        // Little-endian: each 32-bit lane holds the even column's half low, the odd one's high.
        let odd = half_at_top_to_f32(g, words, types::I32X4, types::F32X4);
        let low = g.b.ins().ishl_imm_u(words, 16);
        let even = half_at_top_to_f32(g, low, types::I32X4, types::F32X4);
        Some((V4::Simd(even), V4::Simd(odd)))
    }

    /// `W[k][col]` of a row-major row.
    pub fn load1(&self, g: &mut Gen<'_>, col: Value) -> Value {
        debug_assert!(self.panel.is_none());
        let p = g.addr(self.ptr, col, self.elem.size());
        self.load1_from(g, p, 0, false)
    }

    /// Byte offset of column `col` (known at build time) from the row's start, and whether
    /// it is the high nibble of an int4 pair.
    fn offset(&self, col: i64) -> (i32, bool) {
        let p = PANEL as i64;
        let (off, high) = match (self.panel, self.elem) {
            (Some(step), Elem::I4Pair) => (col / p * step + col % (p / 2), col % p >= p / 2),
            (Some(step), e) => (col / p * step + col % p * e.size(), false),
            (None, e) => (col * e.size(), false),
        };
        (i32::try_from(off).expect("weight offset fits i32"), high)
    }

    /// `W[k][col..col + 4]`, `col` known at build time (a multiple of 4 in a panelled block).
    fn load4_at(&self, g: &mut Gen<'_>, col: i64) -> V4 {
        let (off, high) = self.offset(col);
        if self.elem == Elem::F32 {
            let p = g.b.ins().iadd_imm_s(self.ptr, i64::from(off));
            let z = g.iconst(0);
            return g.vload_with(p, z, mem_ro());
        }
        self.load4_from(g, self.ptr, off, high)
    }

    /// `W[k][col]`, `col` known at build time.
    fn load1_at(&self, g: &mut Gen<'_>, col: i64) -> Value {
        let (off, high) = self.offset(col);
        self.load1_from(g, self.ptr, off, high)
    }

    /// Four lanes at `p + off` of this row's element type, as float32 (int8/int4: `q`).
    fn load4_from(&self, g: &mut Gen<'_>, p: Value, off: i32, high: bool) -> V4 {
        let ro = mem_ro();
        if !g.simd() {
            let lanes: [Value; 4] = std::array::from_fn(|i| {
                let lane_off = match self.elem {
                    Elem::I4Pair => off + i as i32,
                    e => off + (i as i64 * e.size()) as i32,
                };
                self.load1_from(g, p, lane_off, high)
            });
            return V4::Lanes(lanes);
        }
        let v = match self.elem {
            Elem::F32 => g.b.ins().load(types::F32X4, ro, p, off),
            Elem::F16 => {
                let bits = g.b.ins().uload16x4(ro, p, off);
                let top = g.b.ins().ishl_imm_u(bits, 16);
                half_at_top_to_f32(g, top, types::I32X4, types::F32X4)
            }
            Elem::I8 => {
                let w = g.b.ins().sload8x8(ro, p, off);
                let q = g.b.ins().swiden_low(w);
                g.b.ins().fcvt_from_sint(types::F32X4, q)
            }
            Elem::I4Pair => {
                let w = g.b.ins().sload8x8(ro, p, off);
                let bytes = g.b.ins().swiden_low(w);
                let q = nibble(g, bytes, high);
                g.b.ins().fcvt_from_sint(types::F32X4, q)
            }
        };
        V4::Simd(v)
    }

    /// One element at `p + off`, as float32 (int8/int4: `q`).
    fn load1_from(&self, g: &mut Gen<'_>, p: Value, off: i32, high: bool) -> Value {
        let ro = mem_ro();
        match self.elem {
            Elem::F32 => g.b.ins().load(types::F32, ro, p, off),
            Elem::F16 => {
                let bits = g.b.ins().uload16(types::I32, ro, p, off);
                let top = g.b.ins().ishl_imm_u(bits, 16);
                half_at_top_to_f32(g, top, types::I32, types::F32)
            }
            Elem::I8 => {
                let q = g.b.ins().sload8(types::I32, ro, p, off);
                g.b.ins().fcvt_from_sint(types::F32, q)
            }
            Elem::I4Pair => {
                let byte = g.b.ins().sload8(types::I32, ro, p, off);
                let q = nibble(g, byte, high);
                g.b.ins().fcvt_from_sint(types::F32, q)
            }
        }
    }
}

/// The signed low (or high) nibble of sign-extended bytes (`i32` or `i32x4`).
fn nibble(g: &mut Gen<'_>, bytes: Value, high: bool) -> Value {
    if high {
        g.b.ins().sshr_imm_u(bytes, 4)
    } else {
        let up = g.b.ins().ishl_imm_u(bytes, 28);
        g.b.ins().sshr_imm_u(up, 28)
    }
}

/// A half in the top 16 bits of `w` (`i32` or `i32x4`, the low bits zero) as the float32 it
/// denotes, exactly: an arithmetic shift by 3 puts its exponent and mantissa where float32's low
/// exponent bits and mantissa are (the sign stays in bit 31; its copies in bits 28 to 30 are
/// masked off), and one multiply by 2^112 rebases the exponent (and normalizes subnormal
/// halves). Three operations where moving the fields and the sign separately takes six.
/// Infinities and NaNs are not decoded: weights holding them are stored as float32 instead
/// ([`f16_is_exact`]).
fn half_at_top_to_f32(g: &mut Gen<'_>, w: Value, int_ty: Type, float_ty: Type) -> Value {
    let shifted = g.b.ins().sshr_imm_u(w, 3);
    let mask = g.iconst_like(int_ty, 0x8fff_e000_u32 as i32);
    let bits = g.b.ins().band(shifted, mask);
    let f = g.b.ins().bitcast(float_ty, MemFlagsData::new(), bits);
    let k = g.fconst_like(float_ty, f32::from_bits(0x7780_0000)); // 2^112
    g.b.ins().fmul(f, k)
}

/// Whether `values` survive a round trip through half exactly and are finite: then storing
/// them as half loses nothing and [`half_at_top_to_f32`] decodes them.
pub fn f16_is_exact(values: &[f32]) -> bool {
    values.iter().all(|&v| {
        let h = half::f16::from_f32(v);
        h.is_finite() && h.to_f32().to_bits() == v.to_bits()
    })
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

    #[test]
    fn int4_panels_pair_columns_j_and_j_plus_4_in_byte_j() {
        let (k, n) = (2, 9);
        // Column c of row r: q = c - 4 + r (the scale of each column is its max / 7).
        let values: Vec<f32> = (0..k * n)
            .map(|i| ((i % n) as f32 - 4.0 + (i / n) as f32) / 7.0)
            .collect();
        let data = WeightFormat::I4Panels { group: 2 }.encode(k, n, &values);
        let q = quantize(&values, k, n, Precision::Int4);
        let b = &data.bytes;
        assert_eq!(
            b.len(),
            k * 4 + k + Q_PAD,
            "two packed panel rows, a 1-column tail"
        );
        for r in 0..k {
            for j in 0..4 {
                let byte = b[r * 4 + j];
                assert_eq!(((byte << 4) as i8) >> 4, q.q[r * n + j], "low nibble");
                assert_eq!((byte as i8) >> 4, q.q[r * n + j + 4], "high nibble");
            }
            assert_eq!(b[k * 4 + r] as i8, q.q[r * n + 8], "tail byte");
        }
        let scales = data.scales.unwrap();
        assert_eq!(scales.len(), n, "one group of 2 rows");
        assert_eq!(&scales[..8], &q.scales[..8]);
    }

    /// The arithmetic [`half_at_top_to_f32`] generates, on every finite half, against the
    /// `half` crate's conversion.
    #[test]
    fn half_at_top_decoding_is_exact_for_every_finite_half() {
        for bits in 0..=u16::MAX {
            let h = half::f16::from_bits(bits);
            if !h.is_finite() {
                continue;
            }
            let top = (u32::from(bits) << 16) as i32;
            let masked = (top >> 3) & (0x8fff_e000_u32 as i32);
            let got = f32::from_bits(masked as u32) * f32::from_bits(0x7780_0000);
            assert_eq!(got.to_bits(), h.to_f32().to_bits(), "half {bits:#06x}");
        }
    }

    #[test]
    fn f16_exactness() {
        assert!(f16_is_exact(&[0.5, -2.0, 6.1035156e-5, 0.0]));
        assert!(!f16_is_exact(&[0.1]));
        assert!(!f16_is_exact(&[f32::INFINITY]));
    }
}
