//! The workspace plan: an analysis of a module that says where every run-time tensor lives in
//! the caller's workspace. Codegen lays the model out exactly as planned here, and `--emit ir`
//! prints the plan beside the IR ([`print_planned`]), so the layout can be read and checked
//! without generating code.
//!
//! The workspace holds, at offsets fixed at build time (each aligned to [`ALIGN`]):
//!
//! 1. a 16-byte state word (`q`, recorded by `encode_query` for the decoder steps);
//! 2. the `buffer`s more than one entry point uses (the cross-attention K/V that `encode_query`
//!    writes and the decoder steps read), at their static sizes;
//! 3. then, from one common offset, each entry point's own zone: the buffers only it uses
//!    (the decoder's self-attention K/V caches), for `decoder_step` the logits, and the arena
//!    for its SSA values.
//!
//! Zones overlap: memory is planned by lifetime. A call runs `encode_query` once and then the
//! decoder steps, one entry point at a time, and what a buffer only one entry point uses holds
//! is never read by another, so `encode_query`'s arena (the largest run-time data, every row
//! of the query) reuses the memory of the decoder's caches, logits and arena.
//!
//! Arena slots are planned per function by a linear scan over the straight-line body:
//!
//! - a value gets the space of its largest shape (every symbol at its upper bound);
//! - a value is live from its definition to its last reader; a `reshape` aliases its input, so
//!   the input lives as long as the reshaped value is read;
//! - ops that may write over their input (norms, `rope`, residuals) reuse the input's slot when
//!   the input dies there and the slot is large enough;
//! - `attention` gets a scratch slot for its scores (one row of every key), free right after it;
//! - each new slot takes the lowest offset that overlaps no live slot.
//!
//! Parameters of static shape (the step's `%token : i32[1]`, passed by value) get an arena
//! slot before the body; parameters of symbolic length (the query ids, the allowed ids) stay in
//! the caller's memory. `logits` writes the logits region; `argmax_masked`'s token is returned
//! in a register and takes no memory.

use std::collections::HashMap;

use crate::error::IrError;
use crate::module::{Function, Inst, Module, Op, Operand, Param, DECODER_STEP};
use crate::print::{print_with, Notes};
use crate::types::Type;

/// Alignment of the workspace and of every region and slot in it.
pub const ALIGN: usize = 16;

fn round_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// `bytes` of the workspace at `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub offset: usize,
    pub bytes: usize,
}

impl Region {
    pub fn end(&self) -> usize {
        self.offset + self.bytes
    }
}

/// A workspace buffer's region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferRegion {
    pub name: String,
    pub region: Region,
    /// Bytes from one row to the next (rows are written at `offset + at * row_bytes`).
    pub row_bytes: usize,
}

/// Where a value lives while its function runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// A slot of the arena (shared with the values an in-place op wrote over, and with a
    /// reshape's input).
    Arena(Region),
    /// The caller's memory: a parameter of symbolic length, passed by pointer.
    Caller,
    /// The logits region.
    Logits,
    /// No memory: the token `argmax_masked` picks, returned in a register.
    Returned,
}

/// The plan of one instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstPlan {
    /// Where its result lives (`None` for `store`, which defines no value).
    pub result: Option<Place>,
    /// Scratch space the op needs while it runs (`attention`'s scores).
    pub scratch: Option<Region>,
}

/// The plan of one function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuncPlan {
    pub name: String,
    /// One per parameter, in order.
    pub params: Vec<Place>,
    /// One per instruction of the body, in order.
    pub insts: Vec<InstPlan>,
    /// Index of the last instruction that reads each value (a reshape's readers count as
    /// readers of its input); a value never read is live only at its definition.
    pub last_use: HashMap<String, usize>,
    /// Start of this function's arena (its zone's buffers and the logits come before it).
    pub arena_start: usize,
    /// End of the arena this function uses.
    pub arena_end: usize,
}

/// The whole workspace (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkspacePlan {
    /// The state word (`q` as a `size_t`).
    pub state: Region,
    /// In declaration order.
    pub buffers: Vec<BufferRegion>,
    /// `f32` logits of one decoder step (`@decoder_step`'s `logits` result at its largest).
    pub logits: Region,
    /// The logits' type (its second dimension is the vocabulary).
    pub logits_ty: Type,
    /// Where the entry points' zones start (see the module docs): the end of what they share.
    pub zones_start: usize,
    /// In module order.
    pub funcs: Vec<FuncPlan>,
    /// Bytes of workspace a call needs: everything above, the largest arena included.
    pub total_bytes: usize,
}

impl WorkspacePlan {
    /// Plans `m`, which must verify.
    pub fn of(m: &Module) -> Result<WorkspacePlan, IrError> {
        let state = Region {
            offset: 0,
            bytes: 16,
        };
        // Which entry points use each buffer: one alone keeps it in its zone.
        let owner = |name: &str| -> Option<usize> {
            let users: Vec<usize> = (m.funcs.iter().enumerate())
                .filter(|(_, f)| f.body.iter().any(|i| uses_buffer(&i.op, name)))
                .map(|(k, _)| k)
                .collect();
            match users[..] {
                [k] => Some(k),
                _ => None,
            }
        };
        let mut regions = Vec::new();
        for b in &m.buffers {
            let what = format!("${}", b.name);
            let dims =
                b.ty.static_dims()
                    .filter(|d| !d.is_empty())
                    .ok_or_else(|| {
                        IrError::module(&what, format!("type {} must be static with rows", b.ty))
                    })?;
            let row_bytes = dims[1..].iter().product::<usize>() * b.ty.elem.size();
            let bytes = dims.iter().product::<usize>() * b.ty.elem.size();
            regions.push((owner(&b.name), bytes, row_bytes));
        }
        let logits_ty = m
            .func(DECODER_STEP)
            .and_then(|f| {
                f.body.iter().find_map(|i| match (&i.op, &i.result) {
                    (Op::Logits { .. }, Some(r)) => Some(r.ty.clone()),
                    _ => None,
                })
            })
            .ok_or_else(|| IrError::module(format!("@{DECODER_STEP}"), "computes no logits"))?;
        let logits_bytes = max_bytes(m, &logits_ty)
            .ok_or_else(|| IrError::module("logits", format!("{logits_ty} is too large")))?;
        let step = m.funcs.iter().position(|f| f.name == DECODER_STEP);
        // The shared buffers, then each entry point's zone from `zones_start`.
        let mut offsets = vec![0; regions.len()];
        let mut off = round_up(state.end());
        for (k, &(owner, bytes, _)) in regions.iter().enumerate() {
            if owner.is_none() {
                offsets[k] = off;
                off = round_up(off + bytes);
            }
        }
        let zones_start = off;
        let mut logits = Region {
            offset: zones_start,
            bytes: logits_bytes,
        };
        let mut arena_starts = Vec::new();
        for f in 0..m.funcs.len() {
            let mut off = zones_start;
            for (k, &(owner, bytes, _)) in regions.iter().enumerate() {
                if owner == Some(f) {
                    offsets[k] = off;
                    off = round_up(off + bytes);
                }
            }
            if step == Some(f) {
                logits.offset = off;
                off = round_up(logits.end());
            }
            arena_starts.push(off);
        }
        let buffers = m
            .buffers
            .iter()
            .zip(&regions)
            .zip(offsets)
            .map(|((b, &(_, bytes, row_bytes)), offset)| BufferRegion {
                name: b.name.clone(),
                region: Region { offset, bytes },
                row_bytes,
            })
            .collect();
        let mut plan = WorkspacePlan {
            state,
            buffers,
            logits,
            logits_ty,
            zones_start,
            funcs: Vec::new(),
            total_bytes: 0,
        };
        for (f, &arena_start) in m.funcs.iter().zip(&arena_starts) {
            let fp = FuncPlanner::new(m, &plan, f, arena_start).run()?;
            plan.funcs.push(fp);
        }
        let ends = plan.funcs.iter().map(|f| f.arena_end);
        plan.total_bytes = round_up(ends.fold(zones_start.max(logits.end()), usize::max));
        Ok(plan)
    }

    pub fn func(&self, name: &str) -> Option<&FuncPlan> {
        self.funcs.iter().find(|f| f.name == name)
    }

    pub fn buffer(&self, name: &str) -> Option<&BufferRegion> {
        self.buffers.iter().find(|b| b.name == name)
    }
}

/// Whether `op` reads or writes the workspace buffer `name`.
fn uses_buffer(op: &Op, name: &str) -> bool {
    match op {
        Op::Store { buffer, .. } => buffer == name,
        _ => op
            .operands()
            .iter()
            .any(|o| matches!(o, Operand::Buffer { name: b, .. } if b == name)),
    }
}

/// Bytes of a tensor of type `ty` at its largest (every symbol at its upper bound); `None` when
/// that does not fit a `usize`.
pub fn max_bytes(m: &Module, ty: &Type) -> Option<usize> {
    let mut n: i128 = ty.elem.size() as i128;
    for e in &ty.shape {
        n = n.checked_mul(e.range(|s| m.dim_bounds(s)).1.max(0))?;
    }
    usize::try_from(n).ok()
}

/// An arena slot and how long it is live.
struct Slot {
    region: Region,
    /// Index of the last instruction that reads it.
    last: usize,
    live: bool,
}

struct FuncPlanner<'a> {
    m: &'a Module,
    f: &'a Function,
    arena_start: usize,
    logits: Region,
    last_use: HashMap<String, usize>,
    slots: Vec<Slot>,
    /// Each value's place and, for arena values, its slot.
    values: HashMap<&'a str, (Place, Option<usize>)>,
    arena_end: usize,
}

impl<'a> FuncPlanner<'a> {
    fn new(
        m: &'a Module,
        plan: &WorkspacePlan,
        f: &'a Function,
        arena_start: usize,
    ) -> FuncPlanner<'a> {
        let mut last_use: HashMap<String, usize> = HashMap::new();
        for (i, inst) in f.body.iter().enumerate() {
            for o in inst.op.operands() {
                if let Operand::Value(n) = o {
                    last_use.insert(n, i);
                }
            }
        }
        // Backwards, so that a chain of reshapes passes the last use down to the first input.
        for inst in f.body.iter().rev() {
            if let (Op::Reshape { x }, Some(r)) = (&inst.op, &inst.result) {
                if let Some(&l) = last_use.get(&r.name) {
                    let e = last_use.entry(x.clone()).or_insert(l);
                    *e = (*e).max(l);
                }
            }
        }
        FuncPlanner {
            m,
            f,
            arena_start,
            logits: plan.logits,
            last_use,
            slots: Vec::new(),
            values: HashMap::new(),
            arena_end: arena_start,
        }
    }

    fn err(&self, inst: Option<&Inst>, message: impl Into<String>) -> IrError {
        IrError::in_func(&self.f.name, inst, message)
    }

    fn last_use(&self, name: &str, def: usize) -> usize {
        self.last_use.get(name).copied().unwrap_or(def).max(def)
    }

    /// A new slot of `bytes` at the lowest offset that overlaps no live slot.
    fn alloc(&mut self, bytes: usize, last: usize) -> usize {
        let size = round_up(bytes.max(1));
        let mut live: Vec<(usize, usize)> = self
            .slots
            .iter()
            .filter(|s| s.live)
            .map(|s| (s.region.offset, s.region.bytes))
            .collect();
        live.sort_unstable();
        let mut off = self.arena_start;
        for (o, s) in live {
            if o >= off + size {
                break;
            }
            off = off.max(o + s);
        }
        self.arena_end = self.arena_end.max(off + size);
        self.slots.push(Slot {
            region: Region {
                offset: off,
                bytes: size,
            },
            last,
            live: true,
        });
        self.slots.len() - 1
    }

    fn bytes(&self, inst: &Inst, ty: &Type) -> Result<usize, IrError> {
        max_bytes(self.m, ty).ok_or_else(|| self.err(Some(inst), format!("{ty} is too large")))
    }

    /// A new slot for the result of `inst` (at index `i`).
    fn fresh(&mut self, inst: &Inst, ty: &Type, name: &str, i: usize) -> Result<usize, IrError> {
        let bytes = self.bytes(inst, ty)?;
        let last = self.last_use(name, i);
        Ok(self.alloc(bytes, last))
    }

    /// `x`'s slot when `x` dies at `i` and the result fits, else a new one.
    fn in_place(
        &mut self,
        inst: &Inst,
        ty: &Type,
        name: &str,
        x: &str,
        i: usize,
    ) -> Result<usize, IrError> {
        let bytes = self.bytes(inst, ty)?;
        let last = self.last_use(name, i);
        if let (_, Some(s)) = self.value(inst, x)? {
            let slot = &mut self.slots[s];
            if slot.live && slot.last <= i && slot.region.bytes >= bytes {
                slot.last = last;
                return Ok(s);
            }
        }
        self.fresh(inst, ty, name, i)
    }

    fn value(&self, inst: &Inst, name: &str) -> Result<(Place, Option<usize>), IrError> {
        self.values
            .get(name)
            .copied()
            .ok_or_else(|| self.err(Some(inst), format!("%{name} is not defined")))
    }

    /// Rows of an `attention` K/V operand at their largest.
    fn rows_max(&self, inst: &Inst, o: &Operand) -> Result<usize, IrError> {
        let rows = match o {
            Operand::Value(v) => self
                .f
                .body
                .iter()
                .filter_map(|i| i.result.as_ref())
                .chain(&self.f.params)
                .find(|r| &r.name == v)
                .and_then(|r| r.ty.shape.first().copied()),
            Operand::Const(c) => self
                .m
                .const_decl(c)
                .and_then(|d| d.ty.shape.first().copied()),
            Operand::Buffer { len, .. } => Some(*len),
        };
        let rows = rows.ok_or_else(|| self.err(Some(inst), "a K/V block without rows"))?;
        usize::try_from(rows.range(|s| self.m.dim_bounds(s)).1.max(0))
            .map_err(|_| self.err(Some(inst), format!("{rows} rows are too many")))
    }

    /// Where the result `r` of `inst` (at index `i`) goes, its slot, and the op's scratch.
    fn place_result(
        &mut self,
        inst: &'a Inst,
        r: &Param,
        i: usize,
    ) -> Result<(Place, Option<usize>, Option<Region>), IrError> {
        let arena = |s: usize, this: &Self| Place::Arena(this.slots[s].region);
        Ok(match &inst.op {
            Op::Embed { .. } | Op::Concat { .. } | Op::MatMul { .. } => {
                let s = self.fresh(inst, &r.ty, &r.name, i)?;
                (arena(s, self), Some(s), None)
            }
            Op::Reshape { x } => {
                let (place, slot) = self.value(inst, x)?;
                if let Some(s) = slot {
                    let l = self.last_use(&r.name, i);
                    let slot = &mut self.slots[s];
                    slot.last = slot.last.max(l);
                }
                (place, slot, None)
            }
            Op::ZcRmsNorm { x, .. }
            | Op::RmsNorm { x, .. }
            | Op::Rope { x, .. }
            | Op::GatedResidual { x, .. }
            | Op::Residual { x, .. } => {
                let s = self.in_place(inst, &r.ty, &r.name, x, i)?;
                (arena(s, self), Some(s), None)
            }
            Op::Attention { kv, .. } => {
                let s = self.fresh(inst, &r.ty, &r.name, i)?;
                let mut keys = 0usize;
                for (k, _) in kv {
                    keys += self.rows_max(inst, k)?;
                }
                let scores = self.alloc(keys * 4, i);
                (arena(s, self), Some(s), Some(self.slots[scores].region))
            }
            Op::Logits { .. } => {
                if self.bytes(inst, &r.ty)? > self.logits.bytes {
                    return Err(self.err(
                        Some(inst),
                        "larger than the logits region: one logits result per module",
                    ));
                }
                (Place::Logits, None, None)
            }
            Op::ArgmaxMasked { .. } => (Place::Returned, None, None),
            Op::Store { .. } => return Err(self.err(Some(inst), "`store` defines no value")),
        })
    }

    fn run(mut self) -> Result<FuncPlan, IrError> {
        let f = self.f;
        let mut params = Vec::new();
        for p in &f.params {
            let place = if p.ty.static_dims().is_some() {
                let bytes = max_bytes(self.m, &p.ty)
                    .ok_or_else(|| self.err(None, format!("%{} is too large", p.name)))?;
                let last = self.last_use(&p.name, 0);
                let s = self.alloc(bytes, last);
                self.values
                    .insert(&p.name, (Place::Arena(self.slots[s].region), Some(s)));
                Place::Arena(self.slots[s].region)
            } else {
                self.values.insert(&p.name, (Place::Caller, None));
                Place::Caller
            };
            params.push(place);
        }
        let mut insts = Vec::new();
        for (i, inst) in f.body.iter().enumerate() {
            let (result, scratch) = match (&inst.op, &inst.result) {
                (Op::Store { .. }, None) => (None, None),
                (_, None) => return Err(self.err(Some(inst), "the op's result is not named")),
                (_, Some(r)) => {
                    let (place, slot, scratch) = self.place_result(inst, r, i)?;
                    self.values.insert(&r.name, (place, slot));
                    (Some(place), scratch)
                }
            };
            insts.push(InstPlan { result, scratch });
            // A slot whose value is read by nothing ahead is free again.
            for s in self.slots.iter_mut() {
                if s.live && s.last <= i {
                    s.live = false;
                }
            }
        }
        Ok(FuncPlan {
            name: f.name.clone(),
            params,
            insts,
            last_use: self.last_use,
            arena_start: self.arena_start,
            arena_end: self.arena_end,
        })
    }
}

/// The module's text with the plan as `#` comments (which the parser skips): the regions at
/// the top, each parameter's place at the top of its function, and each result's place at the
/// end of its line (`# ws[a..b]`: bytes `a..b` of the workspace).
pub fn print_planned(m: &Module, plan: &WorkspacePlan) -> String {
    print_with(m, &PlanNotes(plan))
}

struct PlanNotes<'a>(&'a WorkspacePlan);

fn region_text(r: Region) -> String {
    format!("ws[{}..{}]", r.offset, r.end())
}

fn place_text(p: Place) -> String {
    match p {
        Place::Arena(r) => region_text(r),
        Place::Caller => "the caller's memory".into(),
        Place::Logits => "the logits region".into(),
        Place::Returned => "returned, no memory".into(),
    }
}

impl Notes for PlanNotes<'_> {
    fn module(&self) -> Vec<String> {
        let p = self.0;
        let mut out = vec![
            format!(
                "workspace plan of the model: {} bytes, aligned to {ALIGN} (zones from {}: each \
                 entry point's own buffers and arena, sharing memory; a library plans its \
                 driver's regions around them)",
                p.total_bytes, p.zones_start
            ),
            format!("  state word (q)  {}", region_text(p.state)),
        ];
        for b in &p.buffers {
            out.push(format!("  ${}  {}", b.name, region_text(b.region)));
        }
        out.push(format!("  logits  {}", region_text(p.logits)));
        for f in &p.funcs {
            out.push(format!(
                "  arena of @{}  ws[{}..{}]",
                f.name, f.arena_start, f.arena_end
            ));
        }
        out
    }

    fn func(&self, f: &Function) -> Vec<String> {
        let Some(fp) = self.0.func(&f.name) else {
            return Vec::new();
        };
        f.params
            .iter()
            .zip(&fp.params)
            .map(|(p, &place)| format!("%{}: {}", p.name, place_text(place)))
            .collect()
    }

    fn inst(&self, f: &Function, i: usize) -> Option<String> {
        let ip = self.0.func(&f.name)?.insts.get(i)?;
        let mut text = ip.result.map(place_text)?;
        if let Some(s) = ip.scratch {
            text.push_str(&format!(", scratch {}", region_text(s)));
        }
        Some(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_sample::SAMPLE;
    use crate::{parse, print};

    fn sample_plan() -> (Module, WorkspacePlan) {
        let m = parse(SAMPLE).unwrap();
        let plan = WorkspacePlan::of(&m).unwrap();
        (m, plan)
    }

    fn result(plan: &WorkspacePlan, f: &str, i: usize) -> Place {
        plan.func(f).unwrap().insts[i].result.unwrap()
    }

    #[test]
    fn fixed_regions_follow_the_state_word_in_order() {
        let (_, plan) = sample_plan();
        assert_eq!(
            plan.state,
            Region {
                offset: 0,
                bytes: 16
            }
        );
        // $cross : f32[11,1,4] = 176 bytes, $cache : f32[4,1,4] = 64.
        let cross = plan.buffer("cross").unwrap();
        assert_eq!(
            (cross.region, cross.row_bytes),
            (
                Region {
                    offset: 16,
                    bytes: 176
                },
                16
            )
        );
        assert_eq!(
            plan.buffer("cache").unwrap().region,
            Region {
                offset: 192,
                bytes: 64
            }
        );
        assert_eq!(
            plan.logits,
            Region {
                offset: 256,
                bytes: 64
            }
        );
        // $cache and the logits are the step's own: its zone, over @encode_query's arena.
        assert_eq!(plan.zones_start, 192);
        assert_eq!(plan.func("encode_query").unwrap().arena_start, 192);
        assert_eq!(plan.func("decoder_step").unwrap().arena_start, 320);
        assert_eq!(plan.total_bytes % ALIGN, 0);
        let end = plan.funcs.iter().map(|f| f.arena_end).max().unwrap();
        assert_eq!(plan.total_bytes, end);
    }

    #[test]
    fn buffers_one_entry_point_uses_share_memory_with_the_others_arenas() {
        let (m, plan) = sample_plan();
        // The shared $cross stays clear of every zone; $cache and the logits lie under
        // @encode_query's arena, but clear of the step's own.
        let cross = plan.buffer("cross").unwrap().region;
        let cache = plan.buffer("cache").unwrap().region;
        let enc = plan.func("encode_query").unwrap();
        let step = plan.func("decoder_step").unwrap();
        assert!(cross.end() <= plan.zones_start);
        assert!(enc.arena_end > cache.offset, "{plan:?}");
        assert!(cache.end() <= plan.logits.offset && plan.logits.end() <= step.arena_start);
        // Smaller than the regions laid end to end.
        let laid_out = plan.zones_start
            + cache.bytes
            + plan.logits.bytes
            + (enc.arena_end - enc.arena_start)
            + (step.arena_end - step.arena_start);
        assert!(plan.total_bytes < laid_out);
        assert!(plan.total_bytes >= enc.arena_end.max(step.arena_end));
        assert!(print_planned(&m, &plan).contains(&format!(
            "  arena of @encode_query  ws[192..{}]",
            enc.arena_end
        )));
    }

    #[test]
    fn values_share_slots_only_when_lifetimes_allow() {
        let (m, plan) = sample_plan();
        let enc = m.func("encode_query").unwrap();
        let fp = plan.func("encode_query").unwrap();
        assert_eq!(fp.params, [Place::Caller]);
        let at = |name: &str| {
            enc.body
                .iter()
                .position(|i| i.result.as_ref().is_some_and(|r| r.name == name))
                .unwrap()
        };
        // %q's reshape aliases it; %qr = rope %qh writes over %qh, which dies there.
        assert_eq!(
            result(&plan, "encode_query", at("qh")),
            result(&plan, "encode_query", at("q"))
        );
        assert_eq!(
            result(&plan, "encode_query", at("qr")),
            result(&plan, "encode_query", at("qh"))
        );
        // %n = zcrmsnorm %x cannot write over %x, which the gated residual reads later.
        assert_ne!(
            result(&plan, "encode_query", at("n")),
            result(&plan, "encode_query", at("x"))
        );
        // The reshape's readers keep %q alive: %q's last use is %qr's rope, not %qh's reshape.
        assert_eq!(fp.last_use["q"], at("qr"));
        // No two live values overlap: check every pair defined while the other is live.
        let places: Vec<(usize, Region)> = fp
            .insts
            .iter()
            .enumerate()
            .filter_map(|(i, ip)| match ip.result {
                Some(Place::Arena(r)) => Some((i, r)),
                _ => None,
            })
            .collect();
        for &(i, a) in &places {
            for &(j, b) in &places {
                let (ni, nj) = (
                    &enc.body[i].result.as_ref().unwrap().name,
                    &enc.body[j].result.as_ref().unwrap().name,
                );
                let live_at_j = i < j && fp.last_use.get(ni).is_some_and(|&l| l > j);
                let overlap = a.offset < b.end() && b.offset < a.end();
                assert!(
                    !(live_at_j && overlap && a != b),
                    "%{ni} {a:?} and %{nj} {b:?}"
                );
            }
        }
        // Attention's scores: one f32 per key row at its largest (q+3 = 11, plus 3 tools rows).
        let scratch = fp.insts[at("a")].scratch.unwrap();
        assert_eq!(scratch.bytes, round_up((11 + 3) * 4));
    }

    #[test]
    fn the_step_keeps_its_token_in_the_arena_and_returns_the_argmax() {
        let (_, plan) = sample_plan();
        let fp = plan.func("decoder_step").unwrap();
        assert!(matches!(fp.params[0], Place::Arena(r) if r.offset == fp.arena_start));
        assert_eq!(fp.params[1], Place::Caller);
        let n = fp.insts.len();
        assert_eq!(fp.insts[n - 2].result, Some(Place::Logits));
        assert_eq!(fp.insts[n - 1].result, Some(Place::Returned));
    }

    #[test]
    fn the_planned_text_reads_back_as_the_same_module() {
        let (m, plan) = sample_plan();
        let text = print_planned(&m, &plan);
        assert!(text.contains("# workspace plan of the model: "), "{text}");
        assert!(text.contains("  # %query: the caller's memory\n"), "{text}");
        assert!(
            text.contains(
                "%next = argmax_masked %logits, %allowed : i32[1]  # returned, no memory\n"
            ),
            "{text}"
        );
        assert_eq!(parse(&text).unwrap(), m);
        assert_ne!(text, print(&m));
    }

    #[test]
    fn a_step_without_logits_cannot_be_planned() {
        let text = SAMPLE
            .replacen("%logits = logits %f, @emb", "%logits = matmul %f, @wq", 1)
            .replacen("%logits : f32[1,16]", "%logits : f32[1,8]", 1);
        let m = parse(&text).unwrap();
        let e = WorkspacePlan::of(&m).unwrap_err();
        assert_eq!(
            e.to_string(),
            "in the module, @decoder_step: computes no logits"
        );
    }
}
