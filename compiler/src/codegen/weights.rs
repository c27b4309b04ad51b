//! Weight matrices embedded in read-only data, and the one place that loads them.
//!
//! Kernels never compute weight addresses themselves: they ask a [`WeightAccess`] for a row
//! ([`WeightAccess::row`], tables) or a block of columns ([`WeightAccess::block`]) and walk its
//! rows with [`WeightBlock::for_each_row`] / [`WeightBlock::for_each_row1`], which hand them
//! the float32 weights of the columns they asked for. Every storage format is decoded here, in
//! registers:
//!
//! - float32 as is;
//! - IEEE half widened exactly (integer moves and one multiply by 2^112);
//! - int8/int4 `q` with one float32 scale per group of rows and column: `q * scale` in
//!   float32, the very values the reference's quantization computes with
//!   ([`needle_runtime::quant::Quantized::dequantize`]); a kernel's sums then run over those
//!   values in its usual order, so quantization changes nothing downstream.
//!
//! Matrix products read column panels ([`PANEL`] columns, `k`-major), so a tile streams its
//! weights contiguously whatever the element size. Inside a panel, rows are packed: one 32-bit
//! word per column holds `Elem::pack` consecutive rows (float32 one, half two, int8 four, int4
//! eight; row `t` of the pack in bits `t * bits ..`), so one 16-byte load brings four columns of
//! a whole pack and each row comes out of it with a shift or two in registers: a sign-extending
//! shift pair and one conversion for int8/int4, a shift, a mask and one multiply for half
//! (instead of a widening load, unpacking and conversion per row).

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
    /// IEEE half, in the panels of [`WeightFormat::F32Panels`], two rows per column word (see
    /// the module docs; the row-major tail keeps one half per element).
    F16Panels,
    /// int8 `q` in those panels, four rows per column word, with float32 scales per `group`
    /// rows and column (a second data object laid out like float32 panels, a group where `q`
    /// has a row).
    I8Panels { group: usize },
    /// int4 `q`, eight rows per column word in the panels (the row-major tail keeps one per
    /// byte), scales as [`WeightFormat::I8Panels`].
    I4Panels { group: usize },
}

/// Columns per panel: two 4-lane vectors, the width of a multi-row matmul tile.
pub const PANEL: usize = 8;

/// Zero bytes after the `q` data: a 4-lane int8 load of the row-major tail reads 8 bytes.
const Q_PAD: usize = 8;

/// How one element is stored, and so loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Elem {
    F32,
    F16,
    I8,
    /// Four bits (panels only: the row-major tail of an int4 matrix stores [`Elem::I8`]).
    I4,
}

impl Elem {
    fn bits(self) -> i64 {
        match self {
            Elem::F32 => 32,
            Elem::F16 => 16,
            Elem::I8 => 8,
            Elem::I4 => 4,
        }
    }

    /// Rows per 32-bit column word in a panel.
    fn pack(self) -> i64 {
        32 / self.bits()
    }

    /// Bytes of a panel of `k` rows: whole packs, the last one zero-padded.
    fn panel_bytes(self, k: i64) -> i64 {
        (k + self.pack() - 1) / self.pack() * PACK_BYTES
    }

    /// Bytes per element outside panels.
    fn size(self) -> i64 {
        match self {
            Elem::F32 => 4,
            Elem::F16 => 2,
            Elem::I8 | Elem::I4 => 1,
        }
    }
}

/// Bytes of one pack of a panel: a 32-bit word per column.
const PACK_BYTES: i64 = 4 * PANEL as i64;

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
        !matches!(self, WeightFormat::F32 | WeightFormat::F16)
    }

    /// Element storage of the panels (`tail == false`) or of the row-major part.
    fn elem(self, tail: bool) -> Elem {
        match self {
            WeightFormat::F32 | WeightFormat::F32Panels => Elem::F32,
            WeightFormat::F16 | WeightFormat::F16Panels => Elem::F16,
            WeightFormat::I8Panels { .. } => Elem::I8,
            WeightFormat::I4Panels { .. } if tail => Elem::I8,
            WeightFormat::I4Panels { .. } => Elem::I4,
        }
    }

    fn group(self) -> Option<usize> {
        match self {
            WeightFormat::I8Panels { group } | WeightFormat::I4Panels { group } => Some(group),
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
                bytes: pack_panels(k, n, Elem::F32, |i| values[i].to_bits()),
                scales: None,
            },
            WeightFormat::F16Panels => WeightData {
                bytes: pack_panels(k, n, Elem::F16, |i| {
                    u32::from(half::f16::from_f32(values[i]).to_bits())
                }),
                scales: None,
            },
            WeightFormat::I8Panels { .. } | WeightFormat::I4Panels { .. } => {
                let (precision, elem) = match self {
                    WeightFormat::I8Panels { .. } => (Precision::Int8, Elem::I8),
                    _ => (Precision::Int4, Elem::I4),
                };
                let q = quantize(values, k, n, precision);
                debug_assert_eq!(Some(q.group), self.group());
                let scales = panel_order(q.groups(), n, &q.scales);
                let mut bytes = pack_panels(k, n, elem, |i| u32::from(q.q[i] as u8));
                bytes.extend([0u8; Q_PAD]);
                WeightData {
                    bytes,
                    scales: Some(scales),
                }
            }
        }
    }
}

/// The bytes of a panelled matrix: per panel, per pack of `elem.pack()` rows, one
/// little-endian 32-bit word per column with row `t` of the pack in bits `t * bits ..` (rows
/// past `k` zero); then the row-major tail, an element of `elem.size()` bytes each. `bits(i)`:
/// the bit pattern of the row-major element `i` (only its low `bits` bits are kept).
fn pack_panels(k: usize, n: usize, elem: Elem, bits: impl Fn(usize) -> u32) -> Vec<u8> {
    let (b, r) = (elem.bits() as usize, elem.pack() as usize);
    let mask = if b == 32 { u32::MAX } else { (1u32 << b) - 1 };
    let np = n / PANEL * PANEL;
    let mut out = Vec::with_capacity(k * n * b / 8 + PACK_BYTES as usize);
    for c in (0..np).step_by(PANEL) {
        for p in 0..k.div_ceil(r) {
            for j in 0..PANEL {
                let word = (0..r).filter(|t| p * r + t < k).fold(0u32, |w, t| {
                    w | (bits((p * r + t) * n + c + j) & mask) << (b * t)
                });
                out.extend(word.to_le_bytes());
            }
        }
    }
    let size = elem.size() as usize;
    for kk in 0..k {
        for c in np..n {
            out.extend(&bits(kk * n + c).to_le_bytes()[..size]);
        }
    }
    out
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
    /// Bytes from one pack of rows of the block to the next.
    stride: i64,
    /// Bytes from one panel to the next, where the block spans panels.
    panel: Option<i64>,
    elem: Elem,
    /// Rows per pack: [`Elem::pack`] in panels, else 1.
    pack: i64,
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
            // Panel `c / PANEL` starts after `c / PANEL` whole panels; a step is one pack.
            let pb = elem.panel_bytes(k);
            (panel_addr(g, self.base, c, pb), PACK_BYTES, Some(pb))
        } else {
            let tail = g.b.ins().iadd_imm_s(
                self.base,
                range.lo / p * self.format.elem(false).panel_bytes(k),
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
            pack: if range.panels { elem.pack() } else { 1 },
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
    /// `KernelFacts::matmul_unroll`, rounded up to whole packs): fewer loop branches and
    /// address updates per weight row.
    pub fn unrolled(mut self, rows: usize) -> Self {
        self.unroll = rows.max(1) as i64;
        self
    }

    /// The pack holding row `k`, a multiple of the pack.
    fn pack_at(&self, g: &mut Gen<'_>, k: Value) -> WeightRow {
        WeightRow {
            ptr: g.addr(self.ptr, k, self.stride / self.pack),
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
        self.packs(
            g,
            |g, srow| cols.iter().map(|&c| srow.scales4_at(g, c)).collect(),
            |g, k0, pack, rows, scales: Option<&Vec<V4>>| {
                // One load per column vector and pack; each row decoded from it.
                let raws: Vec<Raw> = cols.iter().map(|&c| pack.raw4_at(g, c)).collect();
                for t in 0..rows {
                    let kk = g.b.ins().iadd_imm_s(k0, t);
                    let ws: Vec<V4> = raws
                        .iter()
                        .enumerate()
                        .map(|(j, raw)| {
                            let q = pack.decode4(g, raw, t);
                            match scales {
                                None => q,
                                Some(sc) => g.vmul(q, sc[j]),
                            }
                        })
                        .collect();
                    body(g, kk, &ws)
                }
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
        self.packs(
            g,
            |g, srow| srow.scale1_at(g, col),
            |g, k0, pack, rows, scale: Option<&Value>| {
                let raw = pack.raw1_at(g, col);
                for t in 0..rows {
                    let kk = g.b.ins().iadd_imm_s(k0, t);
                    let q = pack.decode1(g, raw, t);
                    let w = match scale {
                        None => q,
                        Some(&s) => g.b.ins().fmul(q, s),
                    };
                    body(g, kk, w)
                }
            },
        )
    }

    /// Rows in order, a pack at a time: `body(g, k, pack, rows, scales)` for the pack whose
    /// first row is `k` and which holds `rows` rows (the pack size but at the very end). For
    /// an integer format group by group: `scales` loads what the rows of a group share from
    /// its scale row, once per group, and `body` gets it (decoded rows are then `q` as float32,
    /// to be scaled). Groups are whole packs (32 rows, or all of `k`). Unrolled by
    /// [`WeightBlock::unrolled`]: one loop step covers that many rows, in packs addressed by
    /// constant offsets from the step's first.
    fn packs<S>(
        &self,
        g: &mut Gen<'_>,
        mut scales: impl FnMut(&mut Gen<'_>, &WeightRow) -> S,
        mut body: impl FnMut(&mut Gen<'_>, Value, &WeightRow, i64, Option<&S>),
    ) {
        let r = self.pack;
        let step = (self.unroll.max(1) + r - 1) / r * r;
        let row = |ptr| WeightRow {
            ptr,
            elem: self.elem,
            panel: self.panel,
        };
        // Rows `k0 + lo .. k0 + hi` (`lo` a multiple of the pack, `lo`, `hi` known at build
        // time). The pack address is a loop-carried pointer bumped by the stride: computed from
        // the index, Cranelift rematerializes the block's base (symbol, panel offset) in every
        // iteration.
        let pt = g.ptr;
        let mut span = |g: &mut Gen<'_>, k0: Value, lo: i64, hi: i64, s: Option<&S>| {
            let mid = lo + (hi - lo) / step * step;
            let first = g.b.ins().iadd_imm_s(k0, lo);
            let start = self.pack_at(g, first).ptr;
            let cursor = g.var(pt, start);
            g.for_const(lo, mid, step, |g, rr| {
                let kk0 = g.b.ins().iadd(k0, rr);
                let p0 = g.get(cursor);
                for u in 0..step / r {
                    let kk = g.b.ins().iadd_imm_s(kk0, u * r);
                    let ptr = g.b.ins().iadd_imm_s(p0, u * self.stride);
                    body(g, kk, &row(ptr), r, s)
                }
                let next = g.b.ins().iadd_imm_s(p0, step / r * self.stride);
                g.set(cursor, next);
            });
            let whole = mid + (hi - mid) / r * r;
            if whole > mid {
                g.for_const(mid, whole, r, |g, rr| {
                    let kk = g.b.ins().iadd(k0, rr);
                    let p0 = g.get(cursor);
                    body(g, kk, &row(p0), r, s);
                    let next = g.b.ins().iadd_imm_s(p0, self.stride);
                    g.set(cursor, next);
                });
            }
            if whole < hi {
                let kk = g.b.ins().iadd_imm_s(k0, whole);
                let p0 = g.get(cursor);
                body(g, kk, &row(p0), hi - whole, s);
            }
        };
        let zero = g.iconst(0);
        let Some(sc) = self.scales else {
            span(g, zero, 0, self.k, None);
            return;
        };
        debug_assert!(
            sc.group % r == 0 || sc.group >= self.k,
            "groups are whole packs"
        );
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
        });
        if full * sc.group < self.k {
            let gi = g.iconst(full);
            let srow = scale_row(g, gi);
            let s = scales(g, &srow);
            span(g, zero, full * sc.group, self.k, Some(&s));
        }
    }
}

/// A pack's raw load: decoded float32 (row-major rows and float32 panels, one row a pack) or
/// the 32-bit words that [`WeightRow::decode4`] unpacks.
enum Raw {
    Floats(V4),
    Words(V4),
}

/// [`Raw`] for one column.
#[derive(Clone, Copy)]
enum Raw1 {
    Float(Value),
    Word(Value),
}

/// Flags for loading scales: read-only, but not movable, so that Cranelift keeps the loads
/// where they are written (once per group) instead of re-loading them next to each use in the
/// row loop.
fn mem_ro_pinned() -> MemFlagsData {
    MemFlagsData::new().with_notrap().with_readonly()
}

impl WeightRow {
    /// `W[k][col..col + 4]` of a row-major row.
    pub fn load4(&self, g: &mut Gen<'_>, col: Value) -> V4 {
        debug_assert!(self.panel.is_none());
        match self.elem {
            Elem::F32 => g.vload_with(self.ptr, col, mem_ro()),
            _ => {
                let p = g.addr(self.ptr, col, self.elem.size());
                self.load4_from(g, p, 0)
            }
        }
    }

    /// `W[k][col]` of a row-major row.
    pub fn load1(&self, g: &mut Gen<'_>, col: Value) -> Value {
        debug_assert!(self.panel.is_none());
        let p = g.addr(self.ptr, col, self.elem.size());
        self.load1_from(g, p, 0)
    }

    /// Byte offset of column `col` (known at build time) from the row's (pack's) start.
    fn offset(&self, col: i64) -> i32 {
        let p = PANEL as i64;
        let off = match self.panel {
            // A 32-bit word per column in a pack (float32 scales alike).
            Some(step) => col / p * step + col % p * 4,
            None => col * self.elem.size(),
        };
        i32::try_from(off).expect("weight offset fits i32")
    }

    /// Whether this row is a pack of column words to decode.
    fn packed(&self) -> bool {
        self.panel.is_some() && self.elem != Elem::F32
    }

    /// Scales `S[g][col..col + 4]` of a scale row (float32, laid out like panels).
    fn scales4_at(&self, g: &mut Gen<'_>, col: i64) -> V4 {
        let off = self.offset(col);
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
        let off = self.offset(col);
        g.b.ins().load(types::F32, mem_ro_pinned(), self.ptr, off)
    }

    /// The load behind columns `col..col + 4` (known at build time, a multiple of 4 in a
    /// panel) of every row of this pack.
    fn raw4_at(&self, g: &mut Gen<'_>, col: i64) -> Raw {
        let off = self.offset(col);
        if !self.packed() {
            return Raw::Floats(self.load4_from(g, self.ptr, off));
        }
        let ro = mem_ro();
        Raw::Words(if g.simd() {
            V4::Simd(g.b.ins().load(types::I32X4, ro, self.ptr, off))
        } else {
            V4::Lanes(std::array::from_fn(|i| {
                g.b.ins().load(types::I32, ro, self.ptr, off + 4 * i as i32)
            }))
        })
    }

    /// Row `t` of the pack from [`WeightRow::raw4_at`], as float32 (int8/int4: `q`).
    fn decode4(&self, g: &mut Gen<'_>, raw: &Raw, t: i64) -> V4 {
        match *raw {
            Raw::Floats(v) => v,
            Raw::Words(V4::Simd(w)) => {
                V4::Simd(decode_word(g, w, self.elem, t, types::I32X4, types::F32X4))
            }
            Raw::Words(V4::Lanes(l)) => V4::Lanes(std::array::from_fn(|i| {
                decode_word(g, l[i], self.elem, t, types::I32, types::F32)
            })),
        }
    }

    /// [`WeightRow::raw4_at`] for one column.
    fn raw1_at(&self, g: &mut Gen<'_>, col: i64) -> Raw1 {
        let off = self.offset(col);
        if self.packed() {
            Raw1::Word(g.b.ins().load(types::I32, mem_ro(), self.ptr, off))
        } else {
            Raw1::Float(self.load1_from(g, self.ptr, off))
        }
    }

    /// [`WeightRow::decode4`] for one column.
    fn decode1(&self, g: &mut Gen<'_>, raw: Raw1, t: i64) -> Value {
        match raw {
            Raw1::Float(v) => v,
            Raw1::Word(w) => decode_word(g, w, self.elem, t, types::I32, types::F32),
        }
    }

    /// Four row-major lanes at `p + off` of this row's element type, as float32 (int8: `q`).
    fn load4_from(&self, g: &mut Gen<'_>, p: Value, off: i32) -> V4 {
        let ro = mem_ro();
        if !g.simd() {
            let lanes: [Value; 4] = std::array::from_fn(|i| {
                let lane_off = off + (i as i64 * self.elem.size()) as i32;
                self.load1_from(g, p, lane_off)
            });
            return V4::Lanes(lanes);
        }
        let v = match self.elem {
            Elem::F32 => g.b.ins().load(types::F32X4, ro, p, off),
            Elem::F16 => {
                let bits = g.b.ins().uload16x4(ro, p, off);
                half_to_f32(g, bits, types::I32X4, types::F32X4)
            }
            Elem::I8 | Elem::I4 => {
                let w = g.b.ins().sload8x8(ro, p, off);
                let q = g.b.ins().swiden_low(w);
                g.b.ins().fcvt_from_sint(types::F32X4, q)
            }
        };
        V4::Simd(v)
    }

    /// One row-major element at `p + off`, as float32 (int8: `q`).
    fn load1_from(&self, g: &mut Gen<'_>, p: Value, off: i32) -> Value {
        let ro = mem_ro();
        match self.elem {
            Elem::F32 => g.b.ins().load(types::F32, ro, p, off),
            Elem::F16 => {
                let bits = g.b.ins().uload16(types::I32, ro, p, off);
                half_to_f32(g, bits, types::I32, types::F32)
            }
            Elem::I8 | Elem::I4 => {
                let q = g.b.ins().sload8(types::I32, ro, p, off);
                g.b.ins().fcvt_from_sint(types::F32, q)
            }
        }
    }
}

/// Row `t` of packed column words `w` (`i32` or `i32x4`, see the module docs) as the float32
/// it stores: int8/int4 `q` sign-extended by a left and an arithmetic right shift and
/// converted; a half moved to the top, then [`half_at_top_to_f32`].
fn decode_word(
    g: &mut Gen<'_>,
    w: Value,
    elem: Elem,
    t: i64,
    int_ty: Type,
    float_ty: Type,
) -> Value {
    let bits = elem.bits();
    let up = 32 - bits * (t + 1);
    let top = if up > 0 {
        g.b.ins().ishl_imm_u(w, up)
    } else {
        w
    };
    match elem {
        Elem::F32 => g.b.ins().bitcast(float_ty, MemFlagsData::new(), w),
        Elem::F16 => half_at_top_to_f32(g, top, int_ty, float_ty),
        Elem::I8 | Elem::I4 => {
            let q = g.b.ins().sshr_imm_u(top, 32 - bits);
            g.b.ins().fcvt_from_sint(float_ty, q)
        }
    }
}

/// A half in the top 16 bits of `w` as the float32 it denotes, exactly: an arithmetic shift by
/// 3 puts its exponent and mantissa where float32's low exponent bits and mantissa are (the
/// sign stays in bit 31, copies of it in bits 28 to 30 are masked off), and one multiply by
/// 2^112 rebases the exponent (and normalizes subnormal halves). Infinities and NaNs are not
/// decoded ([`f16_is_exact`]).
fn half_at_top_to_f32(g: &mut Gen<'_>, w: Value, int_ty: Type, float_ty: Type) -> Value {
    let shifted = g.b.ins().sshr_imm_u(w, 3);
    let mask = g.iconst_like(int_ty, 0x8fff_e000_u32 as i32);
    let bits = g.b.ins().band(shifted, mask);
    let f = g.b.ins().bitcast(float_ty, MemFlagsData::new(), bits);
    let k = g.fconst_like(float_ty, f32::from_bits(0x7780_0000)); // 2^112
    g.b.ins().fmul(f, k)
}

/// Half-precision bits (zero-extended in `int_ty` lanes) as the float32 they denote, exactly:
/// the exponent and mantissa moved into place and rebased by one multiply by 2^112 (which also
/// normalizes subnormal halves), then the sign. Infinities and NaNs are not decoded: weights
/// holding them are stored as float32 instead ([`f16_is_exact`]).
fn half_to_f32(g: &mut Gen<'_>, bits: Value, int_ty: Type, float_ty: Type) -> Value {
    let flags = MemFlagsData::new();
    let mask = g.iconst_like(int_ty, 0x7fff);
    let em = g.b.ins().band(bits, mask);
    let em = g.b.ins().ishl_imm_u(em, 13);
    let f = g.b.ins().bitcast(float_ty, flags, em);
    let k = g.fconst_like(float_ty, f32::from_bits(0x7780_0000)); // 2^112
    let f = g.b.ins().fmul(f, k);
    let sign_mask = g.iconst_like(int_ty, 0x8000);
    let sign = g.b.ins().band(bits, sign_mask);
    let sign = g.b.ins().ishl_imm_u(sign, 16);
    let fb = g.b.ins().bitcast(int_ty, flags, f);
    let out = g.b.ins().bor(fb, sign);
    g.b.ins().bitcast(float_ty, flags, out)
}

/// Whether `values` survive a round trip through half exactly and are finite: then storing
/// them as half loses nothing and [`half_to_f32`] decodes them.
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
    fn int4_panels_pack_eight_rows_into_each_column_word() {
        let (k, n) = (10, 9);
        // Column c of row r: q = (c + r) % 16 - 8 (the scale of each column is its max / 7).
        let values: Vec<f32> = (0..k * n)
            .map(|i| (((i % n) + (i / n)) % 16) as f32 - 8.0)
            .collect();
        let data = WeightFormat::I4Panels { group: 10 }.encode(k, n, &values);
        let q = quantize(&values, k, n, Precision::Int4);
        let b = &data.bytes;
        // One panel of two packs (rows 8, 9 and six zero rows in the second), then the
        // one-column tail, a byte per row, then the padding.
        assert_eq!(b.len(), 2 * 32 + k + Q_PAD);
        for r in 0..k {
            for j in 0..8 {
                let at = r / 8 * 32 + j * 4;
                let word = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
                let nib = ((word >> (4 * (r % 8))) & 0xf) as u8;
                assert_eq!(((nib << 4) as i8) >> 4, q.q[r * n + j], "W[{r}][{j}]");
            }
            assert_eq!(b[64 + r] as i8, q.q[r * n + 8], "tail byte of row {r}");
        }
        for j in 0..8 {
            let at = 32 + j * 4;
            let word = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
            assert_eq!(word >> 8, 0, "rows past k are zero in column {j}");
        }
        let scales = data.scales.unwrap();
        assert_eq!(scales.len(), n, "one group of 10 rows");
        assert_eq!(&scales[..8], &q.scales[..8]);
    }

    #[test]
    fn f16_panels_pack_two_rows_per_column_word() {
        let (k, n) = (3, 8);
        let values: Vec<f32> = (0..k * n).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b = WeightFormat::F16Panels.encode(k, n, &values).bytes;
        assert_eq!(b.len(), 2 * 32, "two packs, the second half empty");
        for r in 0..k {
            for j in 0..n {
                let at = r / 2 * 32 + j * 4 + r % 2 * 2;
                let h = half::f16::from_le_bytes([b[at], b[at + 1]]);
                assert_eq!(h.to_f32(), values[r * n + j], "W[{r}][{j}]");
            }
        }
    }

    #[test]
    fn f16_exactness() {
        assert!(f16_is_exact(&[0.5, -2.0, 6.1035156e-5, 0.0]));
        assert!(!f16_is_exact(&[0.1]));
        assert!(!f16_is_exact(&[f32::INFINITY]));
    }
}
