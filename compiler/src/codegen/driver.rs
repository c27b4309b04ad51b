//! The library's C interface: the generated driver that ties the tokenizer, the model, the
//! grammar and the output code into one call from query text to tool-call JSON.
//!
//! Exported (every symbol carries the library prefix `NAME_`):
//! - `size_t NAME_workspace_size(void)`
//! - `int32_t NAME_call(void *ws, const uint8_t *query, size_t query_len, uint8_t *out,
//!   size_t out_cap, size_t *out_len)`
//! - `int32_t NAME_call_tokens(void *ws, const int32_t *ids, size_t n_ids, int32_t *out_ids,
//!   size_t out_cap, size_t *out_len)`: the same decoding from query token ids to generated ids
//! - `void NAME_model_info(NAME_info *info)` and `const char *NAME_tool_name(uint32_t i)`
//!
//! The workspace is the only mutable memory: the model's region (the IR's workspace plan), the
//! grammar state, the token buffers, the scratch of the tokenizer and of the output code, the
//! output text, and last the call's decoder-step counts (forced, sparse, full: see
//! [`super::model::StepKind`]). Its layout is planned here, at build time, so its size is exact,
//! and by lifetime: a call tokenizes, then runs the model, then renders the answer, and regions
//! of phases that never meet share memory (the tokenizer's and the output's scratch lie over
//! the model's region; see [`Phase`]).

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, Value};

use super::bytes::{copy_bytes, copy_i32s, i32_at, iconst32, to_ptr, u32_at};
use super::gen::{mem, Gen};
use super::grammar::GrammarCode;
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
        "success: out holds the answer, *out_len its length",
    ),
    (
        "ERR_WORKSPACE",
        1,
        "the workspace is NULL or not aligned to NAME_WORKSPACE_ALIGN",
    ),
    (
        "ERR_ARGUMENT",
        2,
        "a NULL pointer where data is required (query, out, out_len)",
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

fn status(name: &str) -> i64 {
    STATUSES
        .iter()
        .find(|s| s.0 == name)
        .map(|s| i64::from(s.1))
        .unwrap_or(-1)
}

/// Workspace alignment: what every region needs (vector loads), and what callers must give.
pub const WORKSPACE_ALIGN: usize = 64;

fn align_up(x: usize, a: usize) -> usize {
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
    /// The last call's decoder steps by [`StepKind`]: `uint32_t` forced, sparse, full. The last
    /// region, so it sits at `total - STEP_COUNTS_BYTES` (tests read it there).
    pub step_counts: usize,
    pub total: usize,
}

/// Bytes of the step-count region at the end of the workspace (three `uint32_t`, aligned).
pub const STEP_COUNTS_BYTES: usize = WORKSPACE_ALIGN;

/// What the header and tests need to know of the generated interface.
#[derive(Clone, Debug)]
pub struct LibraryInfo {
    pub layout: WorkspaceLayout,
    pub max_query_tokens: usize,
    pub max_query_bytes: usize,
    pub max_gen_len: usize,
    pub max_text_bytes: usize,
    pub max_output_bytes: usize,
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
];

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
struct LifetimePlan {
    placed: Vec<(std::ops::RangeInclusive<Phase>, usize, usize)>,
}

impl LifetimePlan {
    fn place(&mut self, live: std::ops::RangeInclusive<Phase>, bytes: usize) -> usize {
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

    fn end(&self) -> usize {
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
    // The model's region first, at offset 0 where its plan puts it.
    lp.place(Model..=Model, parts.model.workspace_bytes);
    let tokenizer_scratch = lp.place(Tokenize..=Tokenize, parts.tokenizer.scratch_bytes);
    // One id more than the model reads: enough to tell a query that was cut.
    let query_ids = lp.place(Tokenize..=Model, 4 * (parts.model.max_query_tokens + 1));
    let grammar_state = lp.place(Model..=Model, parts.grammar.state_bytes);
    let n_allowed = lp.place(Model..=Model, 8);
    let gen_ids = lp.place(Model..=Render, 4 * max_steps);
    let text = lp.place(Render..=Render, max_text_bytes);
    let output_scratch = lp.place(Render..=Render, parts.output.scratch_bytes(max_text_bytes));
    let output = lp.place(Render..=Render, max_output_bytes);
    // Read after the call (tests): last, clear of everything.
    let step_counts = align_up(lp.end(), WORKSPACE_ALIGN);
    let layout = WorkspaceLayout {
        grammar_state,
        n_allowed,
        query_ids,
        gen_ids,
        tokenizer_scratch,
        text,
        output_scratch,
        output,
        step_counts,
        total: step_counts + STEP_COUNTS_BYTES,
    };
    LibraryInfo {
        layout,
        max_query_tokens: parts.model.max_query_tokens,
        max_query_bytes: limits.max_query_bytes,
        max_gen_len: limits.max_gen_len,
        max_text_bytes,
        max_output_bytes,
    }
}

/// `base + offset` for a workspace region.
fn at(g: &mut Gen<'_>, base: Value, offset: usize) -> Value {
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
    // size_t generate(uint8_t *ws, const int32_t *ids, size_t n)
    let generate = ks.declare_function(
        "generate",
        &[],
        &[
            (CType::VoidPtr, "ws"),
            (CType::ConstI32Ptr, "ids"),
            (CType::SizeT, "n"),
        ],
        CType::SizeT,
        false,
    )?;
    let l = layout.clone();
    let skips_by_allowed = parts.model.skips_by_allowed;
    let logits_offset = parts.model.logits_offset;
    ks.define_function(
        generate,
        &[],
        &[
            parts.model.encode_query,
            parts.model.decoder_step,
            parts.grammar.reset,
            parts.grammar.allowed,
            parts.grammar.feed,
        ],
        |g, a, _, f| {
            let (ws, ids, n) = (a[0], a[1], a[2]);
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
            for k in 0..3 {
                g.b.ins().store(mem(), zero32, counts, 4 * k);
            }
            let eos = iconst32(g, 1);
            let token = g.var(types::I32, eos);
            let zero = g.iconst(0);
            let ptr = g.ptr;
            let count = g.var(ptr, zero);
            let not_done = g.b.ins().iconst(types::I8, 0);
            let done = g.var(types::I8, not_done);
            let non_finite = g.var(types::I8, not_done);
            let limit = g.iconst(max_steps);
            g.for_range(zero, limit, 1, |g, pos| {
                let d = g.get(done);
                let cond = g.b.ins().icmp_imm_u(IntCC::Equal, d, 0);
                g.if_then(cond, |g| {
                    let allowed_ptr = g.call(allowed, &[state, n_allowed_ptr]).expect("returns");
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
                    let next = g
                        .call(step, &[ws, tok, pos, allowed_ptr, na])
                        .expect("returns");
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
            let nf = g.get(non_finite);
            let count = g.get(count);
            let flag = g.iconst(GENERATE_NON_FINITE);
            Some(g.b.ins().select(nf, flag, count))
        },
    )?;

    // ---- NAME_call ------------------------------------------------------------------------------
    let call = ks.declare_function(
        "call",
        &["query text -> tool-call JSON; see the status codes above"],
        &[
            (CType::VoidPtr, "workspace"),
            (CType::ConstU8Ptr, "query"),
            (CType::SizeT, "query_len"),
            (CType::U8Ptr, "out"),
            (CType::SizeT, "out_cap"),
            (CType::SizePtr, "out_len"),
        ],
        CType::I32,
        true,
    )?;
    let l = layout.clone();
    let max_query_tokens = parts.model.max_query_tokens as i64;
    let refuse_long = limits.refuse_long_queries;
    let max_query_bytes = limits.max_query_bytes as i64;
    let max_output_bytes = info.max_output_bytes as i64;
    ks.define_function(
        call,
        &[],
        &[
            parts.output.validate_utf8,
            parts.tokenizer.encode,
            generate,
            parts.output.detokenize,
            parts.output.postprocess,
        ],
        |g, a, _, f| {
            let (ws, query, qlen, out, cap, out_len) = (a[0], a[1], a[2], a[3], a[4], a[5]);
            let validate = f.get(parts.output.validate_utf8);
            let tokenize = f.get(parts.tokenizer.encode);
            let gen_fn = f.get(generate);
            let detok = f.get(parts.output.detokenize);
            let post = f.get(parts.output.postprocess);
            check_arguments(g, ws, query, qlen, out, cap, out_len);
            let too_long =
                g.b.ins()
                    .icmp_imm_u(IntCC::UnsignedGreaterThan, qlen, max_query_bytes);
            g.if_then(too_long, |g| ret_status(g, "ERR_QUERY_TOO_LONG"));
            let valid = g.call(validate, &[query, qlen]).expect("returns");
            let cond = g.b.ins().icmp_imm_u(IntCC::Equal, valid, 0);
            g.if_then(cond, |g| ret_status(g, "ERR_UTF8"));

            let ids = at(g, ws, l.query_ids);
            let scratch = at(g, ws, l.tokenizer_scratch);
            let max_ids = g.iconst(max_query_tokens + 1);
            let n = g
                .call(tokenize, &[query, qlen, ids, max_ids, scratch])
                .expect("returns");
            let n = cut_query(g, n, max_query_tokens, refuse_long);
            let n_gen = g.call(gen_fn, &[ws, ids, n]).expect("returns");
            check_numeric(g, n_gen, out_len);
            let gen = at(g, ws, l.gen_ids);
            let text = at(g, ws, l.text);
            let text_len = g.call(detok, &[gen, n_gen, text]).expect("returns");
            let answer = at(g, ws, l.output);
            let pscratch = at(g, ws, l.output_scratch);
            let ocap = g.iconst(max_output_bytes);
            let st = g
                .call(post, &[text, text_len, answer, ocap, out_len, pscratch])
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
            Some(iconst32(g, status("OK")))
        },
    )?;

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
        let n_gen = g.call(f.get(generate), &[ws, qids, n]).expect("returns");
        check_numeric(g, n_gen, out_len);
        g.b.ins().store(mem(), n_gen, out_len, 0);
        let small = g.b.ins().icmp(IntCC::UnsignedGreaterThan, n_gen, cap);
        g.if_then(small, |g| ret_status(g, "ERR_OUT_TOO_SMALL"));
        let gen = at(g, ws, l.gen_ids);
        copy_i32s(g, gen, out, n_gen);
        Some(iconst32(g, status("OK")))
    })?;

    // ---- NAME_model_info / NAME_tool_name ------------------------------------------------------
    let info_fn = ks.declare_function(
        "model_info",
        &["fills *info with the model's facts (NULL is ignored)"],
        &[(CType::VoidPtr, "info")],
        CType::Void,
        true,
    )?;
    let values: Vec<u32> = config_values.to_vec();
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

    // Names: NUL-terminated strings after a table of u32 offsets.
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
        &["the original name of tool i (NUL-terminated), or NULL past the last tool"],
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

/// The checks both entry points start with: the workspace, a writable `*out_len` (zeroed, so
/// every later status leaves it defined), and input/output pointers that are NULL only where
/// their length is 0.
fn check_arguments(
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
fn check_workspace(g: &mut Gen<'_>, ws: Value) {
    let null = g.b.ins().icmp_imm_u(IntCC::Equal, ws, 0);
    g.if_then(null, |g| ret_status(g, "ERR_WORKSPACE"));
    let mask = g.iconst(WORKSPACE_ALIGN as i64 - 1);
    let low = g.b.ins().band(ws, mask);
    let misaligned = g.b.ins().icmp_imm_u(IntCC::NotEqual, low, 0);
    g.if_then(misaligned, |g| ret_status(g, "ERR_WORKSPACE"));
}

fn ret_status(g: &mut Gen<'_>, name: &str) {
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
