//! The library's C interface: the generated driver that ties the tokenizer, the model, the
//! grammar and the output code into one call from query text to tool-call JSON.
//!
//! Exported (every symbol carries the library prefix `NAME_`):
//! - `size_t NAME_workspace_size(void)`
//! - `int32_t NAME_call(void *ws, const uint8_t *query, size_t query_len, uint8_t *out,
//!   size_t out_cap, size_t *out_len)`
//! - `int32_t NAME_call_ex(void *ws, const uint8_t *query, size_t query_len, uint8_t *out,
//!   size_t out_cap, size_t *out_len, NAME_result *result)`: `NAME_call` (the same body, the same
//!   status and bytes) that also fills `*result` ([`RESULT_FIELDS`]): the confidence accumulated
//!   in the decode loop (see `Confidence` below), `escalate` against the threshold baked in
//!   ([`DriverLimits::escalate_below`]), and the first call's tool as `postprocess` reads it
//! - `int32_t NAME_call_tokens(void *ws, const int32_t *ids, size_t n_ids, int32_t *out_ids,
//!   size_t out_cap, size_t *out_len)`: the same decoding from query token ids to generated ids
//! - `void NAME_model_info(NAME_info *info)` and `const char *NAME_tool_name(uint32_t i)`
//!
//! The workspace is the only mutable memory: the model's region (the IR's workspace plan), the
//! grammar state, the token buffers, the scratch of the tokenizer and of the output code, the
//! output text, the forced steps' waiting tokens (see `ForcedRows`), and last the call's
//! decoder-step counts ([`STEP_COUNTS`]: forced, sparse, full, see [`super::model::StepKind`];
//! then the multi-row steps). Its layout is planned here, at build time, so its size is exact,
//! and by lifetime: a call tokenizes, then runs the model, then renders the answer, and regions
//! of phases that never meet share memory (the tokenizer's and the output's scratch lie over
//! the model's region; see [`Phase`]).

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, InstBuilder, Value};

use super::bytes::{copy_bytes, copy_i32s, i32_at, iconst32, to_ptr, u32_at};
use super::gen::{mem, Gen};
use super::grammar::GrammarCode;
use super::math;
use super::model::{emit_step_kind, ModelCode, StepKind};
use super::output::OutputCode;
use super::tokenizer::TokenizerCode;
use super::{CodegenError, KernelSet};
use crate::abi::CType;

/// Status codes of the C interface (`NAME_OK`, `NAME_ERR_*`).
pub const STATUSES: &[(&str, i32, &str)] = &[
    (
        "OK",
        0,
        "success: out holds the answer, *out_len its length; the answer is JSON unless the \
         model's text did not parse, which is passed through as generated (NAME_call_ex's \
         result.parsed says which)",
    ),
    (
        "ERR_WORKSPACE",
        1,
        "the workspace is NULL or not aligned to NAME_WORKSPACE_ALIGN",
    ),
    (
        "ERR_ARGUMENT",
        2,
        "a NULL pointer where data is required (query, out, out_len; name_call_ex's result)",
    ),
    ("ERR_UTF8", 3, "the query is not valid UTF-8"),
    (
        "ERR_QUERY_TOO_LONG",
        4,
        "the query is longer than NAME_MAX_QUERY_BYTES bytes, or (--fold none) than \
         NAME_MAX_QUERY_TOKENS tokens",
    ),
    (
        "ERR_OUT_TOO_SMALL",
        5,
        "out_cap is too small; *out_len holds the size needed",
    ),
    (
        "ERR_TOKEN",
        6,
        "a token id is outside the vocabulary (name_call_tokens only)",
    ),
    (
        "ERR_OUTPUT",
        7,
        "the answer cannot be rendered exactly as the reference would (see the README)",
    ),
    (
        "ERR_NUMERIC",
        8,
        "the model's logits are not finite (weights that overflow float32): no answer",
    ),
];

/// The value [`define_driver`]'s internal `generate` returns when a step's chosen logit is not
/// finite (`NAME_ERR_NUMERIC`): no count of generated ids is this large.
const GENERATE_NON_FINITE: i64 = -1;

/// Returns `NAME_ERR_NUMERIC`, with `*out_len = 0`, when `generate` returned
/// [`GENERATE_NON_FINITE`].
fn check_numeric(g: &mut Gen<'_>, n_gen: Value, out_len: Value) {
    let bad =
        g.b.ins()
            .icmp_imm_s(IntCC::Equal, n_gen, GENERATE_NON_FINITE);
    g.if_then(bad, |g| {
        let zero = g.iconst(0);
        g.b.ins().store(mem(), zero, out_len, 0);
        ret_status(g, "ERR_NUMERIC");
    });
}

pub(crate) fn status(name: &str) -> i64 {
    STATUSES
        .iter()
        .find(|s| s.0 == name)
        .map(|s| i64::from(s.1))
        .unwrap_or(-1)
}

/// Workspace alignment: what every region needs (vector loads), and what callers must give.
pub const WORKSPACE_ALIGN: usize = 64;

pub(crate) fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// The sizes the driver plans from.
#[derive(Clone, Debug)]
pub struct DriverLimits {
    pub max_query_bytes: usize,
    /// Refuse (rather than cut) queries of more than the model's query tokens. Exact mode sets
    /// it when the tool list bounds the query below the reference's 1022 tokens: there the
    /// reference would cut the tool list instead, so cutting the query would silently differ.
    pub refuse_long_queries: bool,
    pub max_gen_len: usize,
    pub vocab_size: usize,
    /// `NAME_call_ex` sets `escalate` when the confidence is below this (`--escalate-below`; 0,
    /// the default, never escalates).
    pub escalate_below: f32,
}

/// Where each region of the workspace starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkspaceLayout {
    pub grammar_state: usize,
    pub n_allowed: usize,
    pub query_ids: usize,
    pub gen_ids: usize,
    pub tokenizer_scratch: usize,
    pub text: usize,
    pub output_scratch: usize,
    pub output: usize,
    /// The forced tokens waiting for the multi-row step (`decoder_rows`): `max_rows` ids.
    pub forced_ids: usize,
    /// The last call's decoder steps ([`STEP_COUNTS`]). The last region, so it sits at
    /// `total - STEP_COUNTS_BYTES` (tests read it there).
    pub step_counts: usize,
    pub total: usize,
}

/// Bytes of the step-count region at the end of the workspace ([`STEP_COUNTS`], aligned).
pub const STEP_COUNTS_BYTES: usize = WORKSPACE_ALIGN;

/// The `uint32_t` counts a call leaves in the step-count region, in order: its decoder steps by
/// [`StepKind`] (forced, sparse, full: they add up to the steps), then how many steps ran their
/// rows in multi-row steps (`decoder_rows` calls, two rows or more: forced steps and the step
/// after them), and how many such calls there were (`ForcedRows`). Forced steps the call ends
/// on (EOS, or the last step) run no rows at all: nothing reads their K/V.
pub const STEP_COUNTS: &[&str] = &[
    "forced",
    "sparse",
    "full",
    "multi_row_steps",
    "multi_row_calls",
];

/// What the header and tests need to know of the generated interface.
#[derive(Clone, Debug)]
pub struct LibraryInfo {
    pub layout: WorkspaceLayout,
    /// Every region of the workspace around the model's: name, offset, bytes (for reports).
    pub regions: Vec<(&'static str, usize, usize)>,
    pub max_query_tokens: usize,
    pub max_query_bytes: usize,
    pub max_gen_len: usize,
    pub max_text_bytes: usize,
    pub max_output_bytes: usize,
    /// The most rows of the model's multi-row step (0: none; see `ForcedRows`).
    pub max_forced_rows: usize,
}

/// Model facts reported by `NAME_model_info`, in the struct's field order.
pub const INFO_FIELDS: &[&str] = &[
    "abi_version",
    "vocab_size",
    "d_model",
    "num_heads",
    "num_kv_heads",
    "num_encoder_layers",
    "num_decoder_layers",
    "fold_tools",
    "max_query_tokens",
    "max_query_bytes",
    "max_gen_len",
    "max_output_bytes",
    "n_tools",
    "escalate_below",
];

/// The `float` fields of `NAME_info` (stored as their bits); every other field is `uint32_t`.
pub const INFO_FLOAT_FIELDS: &[&str] = &["escalate_below"];

/// `NAME_result`, what `NAME_call_ex` fills: `(C type, field, comment)` in order, 4 bytes each.
pub const RESULT_FIELDS: &[(&str, &str, &str)] = &[
    (
        "float",
        "confidence",
        "in [0, 1]: the geometric mean of the chosen tokens' probabilities where the grammar left a choice",
    ),
    (
        "int32_t",
        "escalate",
        "1 when confidence < NAME_ESCALATE_BELOW (needlec build --escalate-below), else 0",
    ),
    (
        "int32_t",
        "tool",
        "the first call's tool (its index in the build's tool list, as NAME_tool_name takes), or -1",
    ),
    (
        "int32_t",
        "parsed",
        "1 when the model's text parsed as JSON (the answer is it, re-serialized compactly); 0 when \
         it did not and the answer is that text passed through byte for byte (tool names restored), \
         as the reference does: check it before parsing the answer as JSON",
    ),
    (
        "uint32_t",
        "choice_steps",
        "decoder steps at which the grammar left the model a choice (the ones the confidence counts)",
    ),
];

/// Byte offset of a `NAME_result` field.
fn result_field(name: &str) -> i32 {
    let i = RESULT_FIELDS
        .iter()
        .position(|f| f.1 == name)
        .expect("a NAME_result field");
    4 * i as i32
}

/// The pieces the driver calls.
pub struct Parts<'a> {
    pub model: &'a ModelCode,
    pub tokenizer: &'a TokenizerCode,
    pub grammar: &'a GrammarCode,
    pub output: &'a OutputCode,
}

/// The phases of one call, in order: each region is live over a span of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// The query text becomes token ids.
    Tokenize,
    /// `encode_query`, then the decoder steps with the grammar.
    Model,
    /// The generated ids become text and the answer.
    Render,
}

/// Regions placed by lifetime: each at the lowest offset that overlaps no region whose phases
/// meet its own.
pub(crate) struct LifetimePlan {
    pub(crate) placed: Vec<(std::ops::RangeInclusive<Phase>, usize, usize)>,
}

impl LifetimePlan {
    pub(crate) fn place(&mut self, live: std::ops::RangeInclusive<Phase>, bytes: usize) -> usize {
        let size = align_up(bytes.max(1), WORKSPACE_ALIGN);
        let mut clashes: Vec<(usize, usize)> = self
            .placed
            .iter()
            .filter(|(l, _, _)| l.start() <= live.end() && live.start() <= l.end())
            .map(|&(_, at, end)| (at, end))
            .collect();
        clashes.sort_unstable();
        let mut at = 0;
        for (start, end) in clashes {
            if start >= at + size {
                break;
            }
            at = at.max(end);
        }
        self.placed.push((live, at, at + size));
        at
    }

    pub(crate) fn end(&self) -> usize {
        self.placed.iter().map(|p| p.2).max().unwrap_or(0)
    }
}

/// Plans the workspace around the model's region, once per library: the library reports the
/// limits in it and [`define_driver`] generates code for it.
pub fn plan(parts: &Parts<'_>, limits: &DriverLimits) -> LibraryInfo {
    use Phase::{Model, Render, Tokenize};
    let max_steps = limits.max_gen_len - 1;
    let max_text_bytes = max_steps * parts.output.max_piece_bytes;
    let max_output_bytes = parts.output.max_output_bytes(max_text_bytes);
    let mut lp = LifetimePlan { placed: Vec::new() };
    let mut regions = Vec::new();
    let mut place = |name: &'static str, live: std::ops::RangeInclusive<Phase>, bytes: usize| {
        let at = lp.place(live, bytes);
        regions.push((name, at, bytes));
        at
    };
    // The model's region first, at offset 0 where its plan puts it.
    place("model", Model..=Model, parts.model.workspace_bytes);
    let tokenizer_scratch = place(
        "tokenizer scratch",
        Tokenize..=Tokenize,
        parts.tokenizer.scratch_bytes,
    );
    // One id more than the model reads: enough to tell a query that was cut.
    let query_ids = place(
        "query token ids",
        Tokenize..=Model,
        4 * (parts.model.max_query_tokens + 1),
    );
    let grammar_state = place("grammar state", Model..=Model, parts.grammar.state_bytes);
    let n_allowed = place("allowed-token count", Model..=Model, 8);
    let gen_ids = place("generated token ids", Model..=Render, 4 * max_steps);
    let forced_ids = match parts.model.decoder_rows {
        Some(_) => place("forced token ids", Model..=Model, 4 * parts.model.max_rows),
        None => 0,
    };
    let text = place("generated text", Render..=Render, max_text_bytes);
    let output_scratch = place(
        "output scratch",
        Render..=Render,
        parts.output.scratch_bytes(max_text_bytes),
    );
    let output = place("output JSON", Render..=Render, max_output_bytes);
    // Read after the call (tests): last, clear of everything.
    let step_counts = align_up(lp.end(), WORKSPACE_ALIGN);
    regions.push(("step counts", step_counts, STEP_COUNTS_BYTES));
    let layout = WorkspaceLayout {
        grammar_state,
        n_allowed,
        query_ids,
        gen_ids,
        tokenizer_scratch,
        text,
        output_scratch,
        output,
        forced_ids,
        step_counts,
        total: step_counts + STEP_COUNTS_BYTES,
    };
    LibraryInfo {
        layout,
        regions,
        max_query_tokens: parts.model.max_query_tokens,
        max_query_bytes: limits.max_query_bytes,
        max_gen_len: limits.max_gen_len,
        max_text_bytes,
        max_output_bytes,
        max_forced_rows: parts.model.max_rows,
    }
}

/// `base + offset` for a workspace region.
pub(crate) fn at(g: &mut Gen<'_>, base: Value, offset: usize) -> Value {
    let off = g.iconst(offset as i64);
    g.b.ins().iadd(base, off)
}

/// Generates the driver and the exported C interface for the workspace `info` (from [`plan`]).
pub fn define_driver(
    ks: &mut KernelSet,
    parts: &Parts<'_>,
    limits: &DriverLimits,
    info: &LibraryInfo,
    config_values: &[u32],
    tool_names: &[String],
) -> Result<(), CodegenError> {
    let layout = &info.layout;
    let max_steps = (limits.max_gen_len - 1) as i64;
    let vocab = limits.vocab_size as i64;

    // ---- NAME_workspace_size -----------------------------------------------------------------
    let total = layout.total as i64;
    let ws_size = ks.declare_function(
        "workspace_size",
        &["bytes of workspace one call needs: the WORKSPACE_SIZE macro"],
        &[],
        CType::SizeT,
        true,
    )?;
    ks.define_function(ws_size, &[], &[], |g, _, _, _| Some(g.iconst(total)))?;

    // ---- generate: query ids -> generated ids (internal) --------------------------------------
    // size_t generate(uint8_t *ws, const int32_t *ids, size_t n, NAME_result *result)
    // With a result, also the confidence (`docs/spec.md`, "Confidence") and the steps it
    // counted: see [`Confidence`].
    let generate = ks.declare_function(
        "generate",
        &[],
        &[
            (CType::VoidPtr, "ws"),
            (CType::ConstI32Ptr, "ids"),
            (CType::SizeT, "n"),
            (CType::VoidPtr, "result"),
        ],
        CType::SizeT,
        false,
    )?;
    let l = layout.clone();
    let skips_by_allowed = parts.model.skips_by_allowed;
    let logits_offset = parts.model.logits_offset;
    let budget = parts.grammar.budget;
    let mut callees = vec![
        parts.model.encode_query,
        parts.model.decoder_step,
        parts.grammar.reset,
        parts.grammar.allowed,
        parts.grammar.feed,
    ];
    callees.extend(parts.model.decoder_rows);
    let max_rows = parts.model.max_rows as i64;
    let max_positions = parts.model.max_positions as i64;
    ks.define_function(generate, &[], &callees, |g, a, _, f| {
        let (ws, ids, n, result) = (a[0], a[1], a[2], a[3]);
        let encode = f.get(parts.model.encode_query);
        let step = f.get(parts.model.decoder_step);
        let reset = f.get(parts.grammar.reset);
        let allowed = f.get(parts.grammar.allowed);
        let feed = f.get(parts.grammar.feed);
        g.call(encode, &[ws, ids, n]);
        let state = at(g, ws, l.grammar_state);
        g.call(reset, &[state]);
        let n_allowed_ptr = at(g, ws, l.n_allowed);
        let gen = at(g, ws, l.gen_ids);
        let counts = at(g, ws, l.step_counts);
        let zero32 = iconst32(g, 0);
        for k in 0..STEP_COUNTS.len() as i32 {
            g.b.ins().store(mem(), zero32, counts, 4 * k);
        }
        let eos = iconst32(g, 1);
        let token = g.var(types::I32, eos);
        let zero = g.iconst(0);
        let ptr = g.ptr;
        let count = g.var(ptr, zero);
        let not_done = g.b.ins().iconst(types::I8, 0);
        let done = g.var(types::I8, not_done);
        let conf = Confidence::new(g);
        let rows = match parts.model.decoder_rows {
            Some(rows_fn) if skips_by_allowed => {
                let z = iconst32(g, 0);
                Some(ForcedRows {
                    rows_fn: f.get(rows_fn),
                    step_fn: step,
                    ws,
                    ids: at(g, ws, l.forced_ids),
                    counts,
                    pending: g.var(types::I32, z),
                    max_rows,
                    vocab,
                    max_positions,
                })
            }
            _ => None,
        };
        let non_finite = g.var(types::I8, not_done);
        let limit = g.iconst(max_steps);
        g.for_range(zero, limit, 1, |g, pos| {
            let d = g.get(done);
            let cond = g.b.ins().icmp_imm_u(IntCC::Equal, d, 0);
            g.if_then(cond, |g| {
                let allowed_ptr = if budget {
                    // The strict grammar closes the list within the steps left after this
                    // one: `max_steps - pos - 1`, as the runtime's `allowed(remaining)`.
                    let left = g.iconst(max_steps - 1);
                    let remaining = g.b.ins().isub(left, pos);
                    g.call(allowed, &[state, n_allowed_ptr, remaining])
                } else {
                    g.call(allowed, &[state, n_allowed_ptr])
                }
                .expect("returns");
                let na = g.b.ins().load(ptr, mem(), n_allowed_ptr, 0);
                // Count the step as the model will run it: counts[2 - kind].
                let kind = if skips_by_allowed {
                    emit_step_kind(g, allowed_ptr, na, vocab as usize)
                } else {
                    g.iconst(StepKind::Full as i64)
                };
                let two = g.iconst(2);
                let slot = g.b.ins().isub(two, kind);
                let cp = g.addr(counts, slot, 4);
                let c = g.b.ins().load(types::I32, mem(), cp, 0);
                let c1 = g.b.ins().iadd_imm_s(c, 1);
                g.b.ins().store(mem(), c1, cp, 0);
                let tok = g.get(token);
                let next = match &rows {
                    Some(rows) => rows.step(g, kind, tok, pos, allowed_ptr, na),
                    None => g
                        .call(step, &[ws, tok, pos, allowed_ptr, na])
                        .expect("returns"),
                };
                let wanted = g.b.ins().icmp_imm_u(IntCC::NotEqual, result, 0);
                g.if_then(wanted, |g| {
                    let logits = at(g, ws, logits_offset);
                    conf.step(g, logits, allowed_ptr, na, next, vocab);
                });
                // A step with a choice (not exactly one allowed id) leaves the chosen id's
                // logit in the logits region; one that is not finite (exponent all ones)
                // ends the call with NAME_ERR_NUMERIC, as `needlec run` errs.
                let chose = g.b.ins().icmp_imm_u(IntCC::NotEqual, na, 1);
                g.if_then(chose, |g| {
                    let logits = at(g, ws, logits_offset);
                    let i = to_ptr(g, next);
                    let bits = u32_at(g, mem(), logits, i);
                    let exp = g.b.ins().band_imm_u(bits, 0x7f80_0000);
                    let bad = g.b.ins().icmp_imm_u(IntCC::Equal, exp, 0x7f80_0000);
                    g.if_then(bad, |g| {
                        let one = g.b.ins().iconst(types::I8, 1);
                        g.set(non_finite, one);
                    });
                });
                let is_eos = g.b.ins().icmp_imm_u(IntCC::Equal, next, 1);
                let nf = g.get(non_finite);
                let stop = g.b.ins().bor(is_eos, nf);
                g.if_else(
                    stop,
                    |g| {
                        let one = g.b.ins().iconst(types::I8, 1);
                        g.set(done, one);
                    },
                    |g| {
                        g.call(feed, &[state, next]);
                        let c = g.get(count);
                        let p = g.addr(gen, c, 4);
                        g.b.ins().store(mem(), next, p, 0);
                        let one = g.iconst(1);
                        let c1 = g.b.ins().iadd(c, one);
                        g.set(count, c1);
                        g.set(token, next);
                    },
                );
            });
        });
        let wanted = g.b.ins().icmp_imm_u(IntCC::NotEqual, result, 0);
        g.if_then(wanted, |g| conf.store(g, result));
        let nf = g.get(non_finite);
        let count = g.get(count);
        let flag = g.iconst(GENERATE_NON_FINITE);
        Some(g.b.ins().select(nf, flag, count))
    })?;

    // ---- NAME_call and NAME_call_ex ----------------------------------------------------------
    let text_params = [
        (CType::VoidPtr, "workspace"),
        (CType::ConstU8Ptr, "query"),
        (CType::SizeT, "query_len"),
        (CType::U8Ptr, "out"),
        (CType::SizeT, "out_cap"),
        (CType::SizePtr, "out_len"),
    ];
    let call = ks.declare_function(
        "call",
        &["query text -> tool-call JSON; see the status codes above"],
        &text_params,
        CType::I32,
        true,
    )?;
    let mut ex_params = text_params.to_vec();
    ex_params.push((CType::VoidPtr, "result"));
    let call_ex = ks.declare_function(
        "call_ex",
        &[
            "NAME_call, and *result (not NULL) gets the answer's confidence, escalate bit and",
            "tool index; see NAME_result",
        ],
        &ex_params,
        CType::I32,
        true,
    )?;
    let text_call = TextCall {
        layout: layout.clone(),
        max_query_tokens: parts.model.max_query_tokens as i64,
        refuse_long: limits.refuse_long_queries,
        max_query_bytes: limits.max_query_bytes as i64,
        max_output_bytes: info.max_output_bytes as i64,
        escalate_below: limits.escalate_below,
    };
    let callees = [
        parts.output.validate_utf8,
        parts.tokenizer.encode,
        generate,
        parts.output.detokenize,
        parts.output.postprocess,
    ];
    for (id, ex) in [(call, false), (call_ex, true)] {
        ks.define_function(id, &[], &callees, |g, a, _, f| {
            Some(text_call.body(g, a, f, parts, generate, ex))
        })?;
    }
    let max_query_tokens = text_call.max_query_tokens;
    let refuse_long = text_call.refuse_long;

    // ---- NAME_call_tokens -----------------------------------------------------------------------
    let call_tokens = ks.declare_function(
        "call_tokens",
        &[
            "token level: query token ids (cut to MAX_QUERY_TOKENS) -> generated ids,",
            "without the final EOS; *out_len = how many were generated",
        ],
        &[
            (CType::VoidPtr, "workspace"),
            (CType::ConstI32Ptr, "ids"),
            (CType::SizeT, "n_ids"),
            (CType::I32Ptr, "out_ids"),
            (CType::SizeT, "out_cap"),
            (CType::SizePtr, "out_len"),
        ],
        CType::I32,
        true,
    )?;
    let l = layout.clone();
    ks.define_function(call_tokens, &[], &[generate], |g, a, _, f| {
        let (ws, ids, n, out, cap, out_len) = (a[0], a[1], a[2], a[3], a[4], a[5]);
        check_arguments(g, ws, ids, n, out, cap, out_len);
        // Cut to the model's query limit, then check every id before anything reads it.
        let n = cut_query(g, n, max_query_tokens, refuse_long);
        g.for_n(n, |g, i| {
            let id = i32_at(g, mem(), ids, i);
            let bad =
                g.b.ins()
                    .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, id, vocab);
            g.if_then(bad, |g| ret_status(g, "ERR_TOKEN"));
        });
        let qids = at(g, ws, l.query_ids);
        copy_i32s(g, ids, qids, n);
        let null = g.iconst(0);
        let n_gen = g
            .call(f.get(generate), &[ws, qids, n, null])
            .expect("returns");
        check_numeric(g, n_gen, out_len);
        g.b.ins().store(mem(), n_gen, out_len, 0);
        let small = g.b.ins().icmp(IntCC::UnsignedGreaterThan, n_gen, cap);
        g.if_then(small, |g| ret_status(g, "ERR_OUT_TOO_SMALL"));
        let gen = at(g, ws, l.gen_ids);
        copy_i32s(g, gen, out, n_gen);
        Some(iconst32(g, status("OK")))
    })?;

    // ---- NAME_model_info / NAME_tool_name ------------------------------------------------------
    define_info_and_names(
        ks,
        config_values,
        tool_names,
        "the original name of tool i (NUL-terminated), or NULL past the last tool",
    )?;

    Ok(())
}

/// `void NAME_model_info(void *info)`, which stores `values` as consecutive `u32`s (NULL is
/// ignored), and `const char *NAME_tool_name(int32_t i)` over `tool_names` (NUL-terminated
/// strings after a table of u32 offsets; NULL past the last), documented as `name_doc`.
pub(crate) fn define_info_and_names(
    ks: &mut KernelSet,
    values: &[u32],
    tool_names: &[String],
    name_doc: &str,
) -> Result<(), CodegenError> {
    let info_fn = ks.declare_function(
        "model_info",
        &["fills *info with the model's facts (NULL is ignored)"],
        &[(CType::VoidPtr, "info")],
        CType::Void,
        true,
    )?;
    let values = values.to_vec();
    ks.define_function(info_fn, &[], &[], |g, a, _, _| {
        let p = a[0];
        let nonnull = g.b.ins().icmp_imm_u(IntCC::NotEqual, p, 0);
        g.if_then(nonnull, |g| {
            for (i, &v) in values.iter().enumerate() {
                let c = g.b.ins().iconst(types::I32, i64::from(v));
                g.b.ins().store(mem(), c, p, (4 * i) as i32);
            }
        });
        None
    })?;

    let mut blob = Vec::new();
    let mut offsets = Vec::new();
    for name in tool_names {
        offsets.push(blob.len() as u32);
        blob.extend_from_slice(name.as_bytes());
        blob.push(0);
    }
    let mut table = ks.target().u32_bytes(offsets);
    let names_at = table.len();
    table.extend_from_slice(&blob);
    table.push(0);
    let names = ks.declare_rodata("tool_names", table, 4)?;
    let n_tools = tool_names.len() as i64;
    let name_fn = ks.declare_function(
        "tool_name",
        &[name_doc],
        &[(CType::I32, "index")],
        CType::ConstCharPtr,
        true,
    )?;
    ks.define_function(name_fn, &[names], &[], |g, a, d, _| {
        let i = to_ptr(g, a[0]);
        let past =
            g.b.ins()
                .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, i, n_tools);
        g.if_then(past, |g| {
            let null = g.iconst(0);
            g.ret(&[null]);
        });
        let off = u32_at(g, mem(), d.get(names), i);
        let base = at(g, d.get(names), names_at);
        Some(g.b.ins().iadd(base, off))
    })?;
    Ok(())
}

/// The confidence accumulated over a decode (`docs/spec.md`, "Confidence"): per step with a
/// choice, `s = sum over the allowed ids a of exp(z[a] - z[chosen])` (every id when the step is
/// unconstrained), so that the chosen token's masked probability is `1 / s`. Each `exp` is the
/// library's float32 one and the sum is accumulated in float64, as the runtime does; `ln s` is
/// taken in float64 and summed, and at the end `confidence = exp(-(sum ln s) / steps)` (float32
/// `exp`), 1 with no step counted, 0 when a logit was NaN. Forced steps (one allowed id: the
/// library's jump-forward, which computes no logits) do not count, exactly as in the runtime.
#[derive(Clone, Copy)]
struct Confidence {
    /// `sum ln s` (f64).
    log_sum: cranelift_frontend::Variable,
    /// Steps counted (i32).
    steps: cranelift_frontend::Variable,
    /// Non-zero once a step's sum was NaN (i8).
    nan: cranelift_frontend::Variable,
}

impl Confidence {
    fn new(g: &mut Gen<'_>) -> Confidence {
        let z = g.b.ins().f64const(0.0);
        let log_sum = g.var(types::F64, z);
        let z = g.b.ins().iconst(types::I32, 0);
        let steps = g.var(types::I32, z);
        let z = g.b.ins().iconst(types::I8, 0);
        let nan = g.var(types::I8, z);
        Confidence {
            log_sum,
            steps,
            nan,
        }
    }

    /// Counts one decoder step: its logits at `logits`, its allowed list `(allowed, n)` (NULL or
    /// empty: every id), the token it chose.
    fn step(
        &self,
        g: &mut Gen<'_>,
        logits: Value,
        allowed: Value,
        n: Value,
        next: Value,
        vocab: i64,
    ) {
        let listed = g.b.ins().icmp_imm_u(IntCC::NotEqual, allowed, 0);
        let n = {
            let zero = g.iconst(0);
            g.b.ins().select(listed, n, zero)
        };
        let forced = g.b.ins().icmp_imm_u(IntCC::Equal, n, 1);
        // A token outside the vocabulary only comes with an error: nothing to count.
        let bad =
            g.b.ins()
                .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, next, vocab);
        let skip = g.b.ins().bor(forced, bad);
        let counted = g.b.ins().icmp_imm_u(IntCC::Equal, skip, 0);
        g.if_then(counted, |g| {
            let chosen = to_ptr(g, next);
            let zc = g.load_f32(logits, chosen);
            let z = g.b.ins().f64const(0.0);
            let sum = g.var(types::F64, z);
            let add = |g: &mut Gen<'_>, id: Value| {
                let v = g.load_f32(logits, id);
                let d = g.b.ins().fsub(v, zc);
                let e = math::exp(g, d);
                let e = g.b.ins().fpromote(types::F64, e);
                let cur = g.get(sum);
                let nxt = g.b.ins().fadd(cur, e);
                g.set(sum, nxt);
            };
            let some = g.b.ins().icmp_imm_u(IntCC::NotEqual, n, 0);
            g.if_else(
                some,
                |g| {
                    g.for_n(n, |g, i| {
                        let id = i32_at(g, mem(), allowed, i);
                        let ok = g.b.ins().icmp_imm_u(IntCC::UnsignedLessThan, id, vocab);
                        g.if_then(ok, |g| {
                            let id = to_ptr(g, id);
                            add(g, id);
                        });
                    });
                },
                |g| {
                    let v = g.iconst(vocab);
                    g.for_n(v, |g, id| add(g, id));
                },
            );
            let s = g.get(sum);
            let is_nan = g.b.ins().fcmp(FloatCC::Unordered, s, s);
            let was = g.get(self.nan);
            let now = g.b.ins().bor(was, is_nan);
            g.set(self.nan, now);
            let ln = math::ln_f64(g, s);
            let cur = g.get(self.log_sum);
            let nxt = g.b.ins().fadd(cur, ln);
            g.set(self.log_sum, nxt);
            let c = g.get(self.steps);
            let c1 = g.b.ins().iadd_imm_s(c, 1);
            g.set(self.steps, c1);
        });
    }

    /// Writes `confidence` and `choice_steps` of the `NAME_result` at `result`.
    fn store(&self, g: &mut Gen<'_>, result: Value) {
        let steps = g.get(self.steps);
        let log_sum = g.get(self.log_sum);
        let nf = g.b.ins().fcvt_from_sint(types::F64, steps);
        let one = g.b.ins().f64const(1.0);
        let none = g.b.ins().icmp_imm_u(IntCC::Equal, steps, 0);
        let nf = g.b.ins().select(none, one, nf);
        let mean = g.b.ins().fdiv(log_sum, nf);
        let mean = g.b.ins().fdemote(types::F32, mean);
        let neg = g.b.ins().fneg(mean);
        let c = math::exp(g, neg);
        // Clamped to [0, 1]; NaN (a NaN logit) is 0.
        let zero = g.f32(0.0);
        let onef = g.f32(1.0);
        let c = g.b.ins().fmin(c, onef);
        let ge0 = g.b.ins().fcmp(FloatCC::GreaterThanOrEqual, c, zero);
        let nan = g.get(self.nan);
        let clean = g.b.ins().icmp_imm_u(IntCC::Equal, nan, 0);
        let ok = g.b.ins().band(ge0, clean);
        let c = g.b.ins().select(ok, c, zero);
        g.b.ins()
            .store(mem(), c, result, result_field("confidence"));
        g.b.ins()
            .store(mem(), steps, result, result_field("choice_steps"));
    }
}

/// The multi-row step in the decode loop. A step's row (the token it feeds, at its position)
/// goes into a buffer. A forced step (one allowed id: its token is known without logits)
/// returns that id and leaves its row there; the next step that needs logits runs the buffered
/// rows and its own as one `model_decoder_rows` call (its head on the last row), or, alone, as
/// the one-row `model_decoder_step`. A buffer that reaches [`ModelCode::max_rows`] rows runs at
/// once (the forced step's head computes nothing). Rows still buffered when the decode ends
/// never run: nothing reads their K/V. The tokens, and with them the answer and the confidence
/// (forced steps count for neither), are those of one-row steps: each row is computed exactly
/// as the one-row step computes it.
///
/// [`ModelCode::max_rows`]: super::model::ModelCode::max_rows
struct ForcedRows {
    rows_fn: cranelift_codegen::ir::FuncRef,
    step_fn: cranelift_codegen::ir::FuncRef,
    ws: Value,
    /// The buffered tokens (`max_rows` i32 in the workspace).
    ids: Value,
    /// The step-count region ([`STEP_COUNTS`]).
    counts: Value,
    /// How many rows are buffered (i32).
    pending: cranelift_frontend::Variable,
    max_rows: i64,
    vocab: i64,
    max_positions: i64,
}

impl ForcedRows {
    /// The step at `pos` of kind `kind` feeding `tok` with the list `(allowed, n)`: its token,
    /// as the one-row step returns it.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        g: &mut Gen<'_>,
        kind: Value,
        tok: Value,
        pos: Value,
        allowed: Value,
        n: Value,
    ) -> Value {
        let m1 = iconst32(g, -1);
        let next = g.var(types::I32, m1);
        // What the one-row step refuses (a token outside the vocabulary, a position past the
        // cache) goes to it, to be refused as before (-1, and so every later step: the
        // buffered rows are never read).
        let tok_ok =
            g.b.ins()
                .icmp_imm_u(IntCC::UnsignedLessThan, tok, self.vocab);
        let pos_ok =
            g.b.ins()
                .icmp_imm_u(IntCC::UnsignedLessThan, pos, self.max_positions);
        let ok = g.b.ins().band(tok_ok, pos_ok);
        g.if_else(
            ok,
            |g| {
                let k = g.get(self.pending);
                let kp = to_ptr(g, k);
                let slot = g.addr(self.ids, kp, 4);
                g.b.ins().store(mem(), tok, slot, 0);
                let k1 = g.b.ins().iadd_imm_s(k, 1);
                let forced =
                    g.b.ins()
                        .icmp_imm_u(IntCC::Equal, kind, StepKind::Forced as i64);
                let full = g.b.ins().icmp_imm_u(IntCC::Equal, k1, self.max_rows);
                let not_forced = g.b.ins().icmp_imm_u(IntCC::Equal, forced, 0);
                let go = g.b.ins().bor(not_forced, full);
                g.if_else(
                    go,
                    |g| {
                        let alone = g.b.ins().icmp_imm_u(IntCC::Equal, k1, 1);
                        g.if_else(
                            alone,
                            |g| {
                                let t = g
                                    .call(self.step_fn, &[self.ws, tok, pos, allowed, n])
                                    .expect("returns");
                                g.set(next, t);
                            },
                            |g| {
                                let rows = to_ptr(g, k1);
                                let kp = to_ptr(g, k);
                                let first = g.b.ins().isub(pos, kp);
                                let t = g
                                    .call(
                                        self.rows_fn,
                                        &[self.ws, self.ids, first, allowed, n, rows],
                                    )
                                    .expect("returns");
                                g.set(next, t);
                                let one = iconst32(g, 1);
                                for (i, add) in [(3, k1), (4, one)] {
                                    let c = g.b.ins().load(types::I32, mem(), self.counts, 4 * i);
                                    let c = g.b.ins().iadd(c, add);
                                    g.b.ins().store(mem(), c, self.counts, 4 * i);
                                }
                            },
                        );
                        let z = iconst32(g, 0);
                        g.set(self.pending, z);
                    },
                    |g| {
                        g.set(self.pending, k1);
                        // The one allowed id, as the one-row step returns it (-1 out of range).
                        let id = g.b.ins().load(types::I32, mem(), allowed, 0);
                        let in_range =
                            g.b.ins()
                                .icmp_imm_u(IntCC::UnsignedLessThan, id, self.vocab);
                        let m1 = iconst32(g, -1);
                        let id = g.b.ins().select(in_range, id, m1);
                        g.set(next, id);
                    },
                );
            },
            |g| {
                let z = iconst32(g, 0);
                g.set(self.pending, z);
                let t = g
                    .call(self.step_fn, &[self.ws, tok, pos, allowed, n])
                    .expect("returns");
                g.set(next, t);
            },
        );
        g.get(next)
    }
}

/// What `NAME_call` and `NAME_call_ex` are generated from: one body, the second with a result.
struct TextCall {
    layout: WorkspaceLayout,
    max_query_tokens: i64,
    refuse_long: bool,
    max_query_bytes: i64,
    max_output_bytes: i64,
    escalate_below: f32,
}

impl TextCall {
    /// The body: `a` are `NAME_call`'s parameters, plus `result` when `ex`. `NAME_call_ex`
    /// writes the result's defaults first (confidence 0, tool -1, not parsed, no steps), so an error status
    /// leaves it defined, and `escalate = confidence < threshold` on every status.
    fn body(
        &self,
        g: &mut Gen<'_>,
        a: &[Value],
        f: &super::kernels::Callees,
        parts: &Parts<'_>,
        generate: cranelift_module::FuncId,
        ex: bool,
    ) -> Value {
        let l = &self.layout;
        let (ws, query, qlen, out, cap, out_len) = (a[0], a[1], a[2], a[3], a[4], a[5]);
        let validate = f.get(parts.output.validate_utf8);
        let tokenize = f.get(parts.tokenizer.encode);
        let gen_fn = f.get(generate);
        let detok = f.get(parts.output.detokenize);
        let post = f.get(parts.output.postprocess);
        let result = if ex {
            let result = a[6];
            let null = g.b.ins().icmp_imm_u(IntCC::Equal, result, 0);
            g.if_then(null, |g| ret_status(g, "ERR_ARGUMENT"));
            let zero = g.f32(0.0);
            g.b.ins()
                .store(mem(), zero, result, result_field("confidence"));
            let m1 = iconst32(g, -1);
            g.b.ins().store(mem(), m1, result, result_field("tool"));
            let z = iconst32(g, 0);
            g.b.ins().store(mem(), z, result, result_field("parsed"));
            g.b.ins()
                .store(mem(), z, result, result_field("choice_steps"));
            self.store_escalate(g, result);
            result
        } else {
            g.iconst(0)
        };
        check_arguments(g, ws, query, qlen, out, cap, out_len);
        let too_long =
            g.b.ins()
                .icmp_imm_u(IntCC::UnsignedGreaterThan, qlen, self.max_query_bytes);
        g.if_then(too_long, |g| ret_status(g, "ERR_QUERY_TOO_LONG"));
        let valid = g.call(validate, &[query, qlen]).expect("returns");
        let cond = g.b.ins().icmp_imm_u(IntCC::Equal, valid, 0);
        g.if_then(cond, |g| ret_status(g, "ERR_UTF8"));

        let ids = at(g, ws, l.query_ids);
        let scratch = at(g, ws, l.tokenizer_scratch);
        let max_ids = g.iconst(self.max_query_tokens + 1);
        let n = g
            .call(tokenize, &[query, qlen, ids, max_ids, scratch])
            .expect("returns");
        let n = cut_query(g, n, self.max_query_tokens, self.refuse_long);
        let n_gen = g.call(gen_fn, &[ws, ids, n, result]).expect("returns");
        if ex {
            self.store_escalate(g, result);
        }
        check_numeric(g, n_gen, out_len);
        let gen = at(g, ws, l.gen_ids);
        let text = at(g, ws, l.text);
        let text_len = g.call(detok, &[gen, n_gen, text]).expect("returns");
        let answer = at(g, ws, l.output);
        let pscratch = at(g, ws, l.output_scratch);
        let ocap = g.iconst(self.max_output_bytes);
        // postprocess writes `tool` and, right after it, `parsed`.
        debug_assert_eq!(result_field("parsed"), result_field("tool") + 4);
        let tool = if ex {
            g.b.ins()
                .iadd_imm_s(result, i64::from(result_field("tool")))
        } else {
            g.iconst(0)
        };
        let st = g
            .call(
                post,
                &[text, text_len, answer, ocap, out_len, pscratch, tool],
            )
            .expect("returns");
        let cond = g.b.ins().icmp_imm_u(IntCC::NotEqual, st, 0);
        g.if_then(cond, |g| {
            let zero = g.iconst(0);
            g.b.ins().store(mem(), zero, out_len, 0);
            ret_status(g, "ERR_OUTPUT");
        });
        let ptr = g.ptr;
        let len = g.b.ins().load(ptr, mem(), out_len, 0);
        let small = g.b.ins().icmp(IntCC::UnsignedGreaterThan, len, cap);
        g.if_then(small, |g| ret_status(g, "ERR_OUT_TOO_SMALL"));
        copy_bytes(g, mem(), types::I32, answer, out, len);
        iconst32(g, status("OK"))
    }

    /// `result->escalate = result->confidence < threshold`.
    fn store_escalate(&self, g: &mut Gen<'_>, result: Value) {
        let c =
            g.b.ins()
                .load(types::F32, mem(), result, result_field("confidence"));
        let t = g.f32(self.escalate_below);
        let below = g.b.ins().fcmp(FloatCC::LessThan, c, t);
        let below = g.b.ins().uextend(types::I32, below);
        g.b.ins()
            .store(mem(), below, result, result_field("escalate"));
    }
}

/// The checks both entry points start with: the workspace, a writable `*out_len` (zeroed, so
/// every later status leaves it defined), and input/output pointers that are NULL only where
/// their length is 0.
pub(crate) fn check_arguments(
    g: &mut Gen<'_>,
    ws: Value,
    input: Value,
    n: Value,
    out: Value,
    cap: Value,
    out_len: Value,
) {
    check_workspace(g, ws);
    let cond = g.b.ins().icmp_imm_u(IntCC::Equal, out_len, 0);
    g.if_then(cond, |g| ret_status(g, "ERR_ARGUMENT"));
    let zero = g.iconst(0);
    g.b.ins().store(mem(), zero, out_len, 0);
    for (ptr, len) in [(input, n), (out, cap)] {
        let null = g.b.ins().icmp_imm_u(IntCC::Equal, ptr, 0);
        let nonempty = g.b.ins().icmp_imm_u(IntCC::NotEqual, len, 0);
        let bad = g.b.ins().band(null, nonempty);
        g.if_then(bad, |g| ret_status(g, "ERR_ARGUMENT"));
    }
}

/// The query's token count after the model's limit: cut to `max` tokens, or, when `refuse`,
/// `ERR_QUERY_TOO_LONG` for more.
fn cut_query(g: &mut Gen<'_>, n: Value, max: i64, refuse: bool) -> Value {
    let over = g.b.ins().icmp_imm_u(IntCC::UnsignedGreaterThan, n, max);
    if refuse {
        g.if_then(over, |g| ret_status(g, "ERR_QUERY_TOO_LONG"));
        n
    } else {
        let maxv = g.iconst(max);
        g.b.ins().select(over, maxv, n)
    }
}

/// Returns `ERR_WORKSPACE` when `ws` is NULL or misaligned.
pub(crate) fn check_workspace(g: &mut Gen<'_>, ws: Value) {
    let null = g.b.ins().icmp_imm_u(IntCC::Equal, ws, 0);
    g.if_then(null, |g| ret_status(g, "ERR_WORKSPACE"));
    let mask = g.iconst(WORKSPACE_ALIGN as i64 - 1);
    let low = g.b.ins().band(ws, mask);
    let misaligned = g.b.ins().icmp_imm_u(IntCC::NotEqual, low, 0);
    g.if_then(misaligned, |g| ret_status(g, "ERR_WORKSPACE"));
}

pub(crate) fn ret_status(g: &mut Gen<'_>, name: &str) {
    let v = iconst32(g, status(name));
    g.ret(&[v]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_share_memory_only_across_phases_that_never_meet() {
        use Phase::{Model, Render, Tokenize};
        let mut lp = LifetimePlan { placed: Vec::new() };
        let model = lp.place(Model..=Model, 1000);
        // Tokenizing and rendering happen while the model is idle: over its memory.
        let scratch = lp.place(Tokenize..=Tokenize, 500);
        let ids = lp.place(Tokenize..=Model, 10);
        let gen = lp.place(Model..=Render, 10);
        let text = lp.place(Render..=Render, 2000);
        assert_eq!((model, scratch), (0, 0));
        // Live with the model: after it, and not over each other.
        assert_eq!((ids, gen), (1024, 1024 + 64));
        // Too large for the room under the model: past everything it meets.
        assert_eq!(text, 1024 + 128);
        assert_eq!(lp.end(), 1024 + 128 + 2048);
    }
}
