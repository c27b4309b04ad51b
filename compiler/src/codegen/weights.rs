//! Weight matrices embedded in read-only data, and the one place that loads them.
//!
//! Kernels never compute weight addresses themselves: they ask a [`WeightAccess`] for a row
//! ([`WeightAccess::row`]) and load lanes from it ([`WeightRow::load4`], [`WeightRow::load1`]).
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
            WeightFormat::F32 => vec![self.data],
        }
    }
}

/// Weight access inside one generated function.
pub struct WeightAccess {
    base: Value,
    n: i64,
    format: WeightFormat,
}

/// One row `W[k][..]`.
pub struct WeightRow {
    ptr: Value,
    format: WeightFormat,
}

impl WeightAccess {
    /// `addrs`: the addresses of [`WeightRef::data_ids`], in that order.
    pub fn new(w: &WeightRef, addrs: &[Value]) -> Self {
        WeightAccess {
            base: addrs[0],
            n: w.n as i64,
            format: w.format,
        }
    }

    pub fn row(&self, g: &mut Gen<'_>, k: Value) -> WeightRow {
        match self.format {
            WeightFormat::F32 => WeightRow {
                ptr: g.addr(self.base, k, self.n * 4),
                format: self.format,
            },
        }
    }
}

impl WeightRow {
    /// `W[k][col..col + 4]`.
    pub fn load4(&self, g: &mut Gen<'_>, col: Value) -> V4 {
        match self.format {
            WeightFormat::F32 => g.vload_with(self.ptr, col, mem_ro()),
        }
    }

    /// `W[k][col]`.
    pub fn load1(&self, g: &mut Gen<'_>, col: Value) -> Value {
        match self.format {
            WeightFormat::F32 => {
                let p = g.addr(self.ptr, col, 4);
                g.b.ins().load(types::F32, mem_ro(), p, 0)
            }
        }
    }
}
