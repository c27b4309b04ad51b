//! A whole Needle 3 library: the model step ([`super::define_needle3_model`]), the query
//! tokenizer, the detokenizer and the answer code ([`super::answer`]) plus the driver, in one
//! object, with its C header. It answers as `needle_runtime::needle3::engine::Engine::generate`
//! does (unconstrained greedy decoding until EOS), the prompt's fixed part (`--fold tools`: up to
//! `</tools>`) precomputed at build time.
//!
//! Exported (every symbol carries the prefix `NAME_`):
//! - `size_t NAME_workspace_size(void)`
//! - `int32_t NAME_call(ws, query, query_len, out, out_cap, out_len)`: the calls JSON
//! - `int32_t NAME_call_ex(..., NAME_result *result)`: also the heads (confidence, escalate,
//!   router logits), the first call's tool, whether the calls parsed and the reasoning's length
//! - `const uint8_t *NAME_reasoning(const void *ws, size_t *len)`: the last call's `<think>` text
//! - `int32_t NAME_call_tokens(ws, ids, n_ids, out_ids, out_cap, out_len)`: query-part ids (what
//!   `needle_runtime::needle3::prompt::encode_query` gives) to generated ids
//! - `int32_t NAME_embed(ws, text, len, float *out)`: the embedding head over the prompt with
//!   `text` as its query
//! - `void NAME_model_info(NAME_info *info)` and `const char *NAME_tool_name(int32_t i)`
//!
//! Workspace: the model's region (its caches, for the query's and the answer's positions only
//! when folded) at offset 0; the tokenizer's scratch and the rendering's buffers lie over it,
//! since a call tokenizes before the model runs and renders after it (the heads are read out
//! first), as v1's driver plans it ([`crate::codegen::driver::Phase`]).

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, InstBuilder, Value};
use needle_runtime::needle3::grammar::EnvelopeTables;
use needle_runtime::needle3::prompt::{
    render_query, EOS, IM_END, THINK, THINK_END, TOOL_CALL, TOOL_CALL_END,
};
use needle_runtime::needle3::Model;
use needle_runtime::tokenizer::Tokenizer;
use needle_targets::Target;

use super::answer::{define_answer, AnswerCode};
use super::{define_needle3_model, Needle3Code};
use crate::abi::{write_header, CType};
use crate::codegen::bytes::{copy_bytes, copy_i32s, i32_at, iconst32, store_u8, to_ptr, u32_at};
use crate::codegen::driver::{
    align_up, at, check_arguments, check_workspace, define_info_and_names, LifetimePlan, Phase,
    WORKSPACE_ALIGN,
};
use crate::codegen::gen::{mem, Gen};
use crate::codegen::grammar::GrammarCode;
use crate::codegen::library::{header_types, MAX_QUERY_BYTES};
use crate::codegen::output::{define_output_with, OutputCode};
use crate::codegen::strict::define_strict_grammar;
use crate::codegen::tokenizer::{define_tokenizer, TokenizerCode};
use crate::codegen::{math, CodegenError, KernelSet};

/// The ABI version `NAME_model_info` reports for Needle 3 libraries.
pub const ABI_VERSION: u32 = 1;

/// Status codes: v1's ([`crate::codegen::driver::STATUSES`]), the same values, and one more.
pub fn statuses() -> Vec<(&'static str, i32, &'static str)> {
    let mut s: Vec<_> = crate::codegen::driver::STATUSES.to_vec();
    s.push((
        "ERR_NO_HEAD",
        9,
        "the model has no embedding head (NAME_embed only)",
    ));
    s
}

fn status(name: &str) -> i64 {
    statuses()
        .iter()
        .find(|s| s.0 == name)
        .map(|s| i64::from(s.1))
        .expect("a status")
}

fn ret(g: &mut Gen<'_>, name: &str) {
    let v = iconst32(g, status(name));
    g.ret(&[v]);
}

/// `NAME_result`: `(C type, field, comment)`, 4 bytes each (`router` three floats).
pub const RESULT_FIELDS: &[(&str, &str, &str)] = &[
    (
        "float",
        "confidence",
        "in [0, 1]: the sigmoid of the confidence head's logit (1 when the model has no confidence head)",
    ),
    (
        "int32_t",
        "escalate",
        "1 when confidence < NAME_ESCALATE_BELOW (needlec build --escalate-below), else 0",
    ),
    (
        "int32_t",
        "parsed",
        "1 when the calls parsed as JSON (out holds them re-serialized compactly); 0 when out holds \
         the model's text as generated",
    ),
    (
        "int32_t",
        "tool",
        "the first call's tool (its index in the tool list, as NAME_tool_name takes), or -1",
    ),
    (
        "uint32_t",
        "generated_tokens",
        "tokens generated, the final EOS included when it was reached",
    ),
    (
        "uint32_t",
        "reasoning_len",
        "bytes of the <think> block's text (0: none); NAME_reasoning(ws) gives them",
    ),
    (
        "float",
        "confidence_logit",
        "the confidence head's logit (0 when the model has none)",
    ),
    (
        "float",
        "router[3]",
        "the router head's three logits (0 when the model has none)",
    ),
];

fn result_field(name: &str) -> i32 {
    let i = RESULT_FIELDS
        .iter()
        .position(|f| f.1 == name || f.1.strip_suffix("[3]") == Some(name))
        .expect("a NAME_result field");
    4 * i as i32
}

/// `NAME_info` fields, all `uint32_t` but the last (`float`).
pub const INFO_FIELDS: &[&str] = &[
    "abi_version",
    "generation",
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "fold_tools",
    "max_query_tokens",
    "max_query_bytes",
    "max_gen_len",
    "max_output_bytes",
    "n_tools",
    "embedding_dim",
    "escalate_below",
];

/// Everything a Needle 3 library is generated from.
pub struct Needle3LibraryInput<'a> {
    pub model: &'a Model,
    /// The checkpoint's tokenizer (the library tokenizes the query part with its
    /// [`Tokenizer::continuing`] form).
    pub tokenizer: &'a Tokenizer,
    /// The prompt's ids up to `</tools>` (BOS first): what every call starts with.
    pub prefix_ids: &'a [u32],
    /// Precompute the prefix at build time (`--fold tools`); else every call runs it.
    pub fold: bool,
    /// The tools' names, in tool order (`NAME_tool_name`, `NAME_result.tool`).
    pub tool_names: &'a [String],
    pub name: &'a str,
    /// At most `max_gen_len - 1` generated tokens (the runtime's `max_new`).
    pub max_gen_len: usize,
    /// The most ids of the query part (`\nQUERY<|im_end|>\n<|im_start|>assistant\n`).
    pub max_query_tokens: usize,
    pub escalate_below: f32,
    /// `--grammar strict`: decode inside the envelope under the tool schemas, as the engine's
    /// `with_strict_grammar` does; `None`: unconstrained greedy decoding.
    pub strict: Option<&'a EnvelopeTables>,
}

/// Where each region of the workspace starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Needle3Layout {
    pub rendered: usize,
    pub tokenizer_scratch: usize,
    pub query_ids: usize,
    pub gen_ids: usize,
    /// The strict grammar's state (`--grammar strict`; 0 without).
    pub grammar_state: usize,
    pub heads: usize,
    pub text: usize,
    pub output_scratch: usize,
    pub output: usize,
    /// `size_t[3]`: the reasoning's span in `text` (start, length, present).
    pub reasoning: usize,
    pub total: usize,
}

/// What the header and tests need to know of a Needle 3 library.
#[derive(Clone, Debug)]
pub struct Needle3Info {
    pub layout: Needle3Layout,
    pub regions: Vec<(&'static str, usize, usize)>,
    pub max_query_tokens: usize,
    pub max_query_bytes: usize,
    pub max_gen_len: usize,
    pub max_text_bytes: usize,
    pub max_output_bytes: usize,
    pub max_positions: usize,
    pub first_position: usize,
    /// The heads' outputs in the order `n3_heads` writes them.
    pub head_outputs: Vec<(&'static str, usize)>,
    pub embedding_dim: usize,
    pub model_bytes: usize,
}

/// A generated Needle 3 library before archiving.
pub struct Needle3Library {
    pub object: Vec<u8>,
    pub header: String,
    pub info: Needle3Info,
}

/// Bytes the query part adds around the query text.
fn markup_bytes() -> usize {
    render_query("").len()
}

/// Generates the library for `target`.
pub fn generate_needle3(
    input: &Needle3LibraryInput<'_>,
    target: &Target,
) -> Result<Needle3Library, CodegenError> {
    let prefix = format!("{}_", input.name);
    let mut ks = KernelSet::new(target, &prefix)?;
    let max_new = input.max_gen_len - 1;
    let max_positions = input.prefix_ids.len() + input.max_query_tokens + max_new;
    let folded = input.fold.then_some(input.prefix_ids);
    let model = define_needle3_model(&mut ks, input.model, max_positions, folded, false)?;
    let max_rendered = MAX_QUERY_BYTES + markup_bytes();
    let tokenizer = define_tokenizer(&mut ks, &input.tokenizer.continuing(), max_rendered, false)?;
    let max_piece = (0..input.tokenizer.vocab_size() as u32)
        .filter_map(|id| input.tokenizer.piece(id))
        .map(str::len)
        .max()
        .unwrap_or(1)
        .max(1);
    let max_text = max_new * max_piece;
    let names: Vec<(String, String)> = input
        .tool_names
        .iter()
        .map(|n| (n.clone(), n.clone()))
        .collect();
    let output = define_output_with(&mut ks, input.tokenizer, &names, max_text, false, false)?;
    let answer = define_answer(&mut ks, &output, false)?;
    let grammar = match input.strict {
        Some(t) => Some(define_strict_grammar(&mut ks, &t.strict, false)?),
        None => None,
    };
    let embedding_dim = model
        .head_outputs
        .iter()
        .find(|h| h.0 == "embedding")
        .map_or(0, |h| h.1);
    let parts = Parts {
        model: &model,
        tokenizer: &tokenizer,
        output: &output,
        answer: &answer,
        grammar: grammar.as_ref(),
    };
    let info = plan(&parts, input, max_rendered, max_text, embedding_dim);
    let c = &input.model.config;
    let info_values: Vec<u32> = vec![
        ABI_VERSION,
        3,
        c.vocab_size as u32,
        c.d_model as u32,
        input.model.layers.len() as u32,
        c.num_heads as u32,
        c.num_kv_heads as u32,
        u32::from(input.fold),
        info.max_query_tokens as u32,
        info.max_query_bytes as u32,
        info.max_gen_len as u32,
        info.max_output_bytes as u32,
        input.tool_names.len() as u32,
        embedding_dim as u32,
        input.escalate_below.to_bits(),
    ];
    debug_assert_eq!(info_values.len(), INFO_FIELDS.len());
    define_driver(&mut ks, &parts, input, &info, &info_values)?;
    let header = header_text(input, &info, &ks);
    let object = ks.finish()?;
    Ok(Needle3Library {
        object,
        header,
        info,
    })
}

struct Parts<'a> {
    model: &'a Needle3Code,
    tokenizer: &'a TokenizerCode,
    output: &'a OutputCode,
    answer: &'a AnswerCode,
    grammar: Option<&'a GrammarCode>,
}

fn plan(
    parts: &Parts<'_>,
    input: &Needle3LibraryInput<'_>,
    max_rendered: usize,
    max_text: usize,
    embedding_dim: usize,
) -> Needle3Info {
    use Phase::{Model, Render, Tokenize};
    let (model, tokenizer, output, grammar) =
        (parts.model, parts.tokenizer, parts.output, parts.grammar);
    let max_new = input.max_gen_len - 1;
    let max_output_bytes = output.max_output_bytes(max_text);
    let mut lp = LifetimePlan { placed: Vec::new() };
    let mut regions = Vec::new();
    let mut place = |name: &'static str, live: std::ops::RangeInclusive<Phase>, bytes: usize| {
        let at = lp.place(live, bytes);
        regions.push((name, at, bytes));
        at
    };
    let model_at = place("model", Model..=Model, model.workspace_bytes);
    debug_assert_eq!(model_at, 0);
    let rendered = place("query text", Tokenize..=Tokenize, max_rendered);
    let tokenizer_scratch = place(
        "tokenizer scratch",
        Tokenize..=Tokenize,
        tokenizer.scratch_bytes,
    );
    let query_ids = place(
        "query token ids",
        Tokenize..=Model,
        4 * (input.max_query_tokens + 1),
    );
    let gen_ids = place("generated token ids", Model..=Render, 4 * max_new.max(1));
    let grammar_state = match grammar {
        Some(g) => place("grammar state", Model..=Model, STRICT_AT + g.state_bytes),
        None => 0,
    };
    let heads_floats: usize = model.head_outputs.iter().map(|h| h.1).sum();
    let heads = place("heads", Model..=Render, 4 * heads_floats.max(1));
    let text = place("generated text", Render..=Render, max_text.max(1));
    let output_scratch = place(
        "output scratch",
        Render..=Render,
        output.scratch_bytes(max_text),
    );
    let output_at = place("output JSON", Render..=Render, max_output_bytes);
    // Read after the call (NAME_reasoning), with the text it points into.
    let reasoning = place("reasoning span", Render..=Render, 24);
    let total = align_up(lp.end(), WORKSPACE_ALIGN);
    Needle3Info {
        layout: Needle3Layout {
            rendered,
            tokenizer_scratch,
            query_ids,
            gen_ids,
            grammar_state,
            heads,
            text,
            output_scratch,
            output: output_at,
            reasoning,
            total,
        },
        regions,
        max_query_tokens: input.max_query_tokens,
        max_query_bytes: MAX_QUERY_BYTES,
        max_gen_len: input.max_gen_len,
        max_text_bytes: max_text,
        max_output_bytes,
        max_positions: model.max_positions,
        first_position: model.first_position,
        head_outputs: model.head_outputs.clone(),
        embedding_dim,
        model_bytes: model.workspace_bytes,
    }
}

/// The value `generate` returns when a step's logits are not finite.
const NON_FINITE: i64 = -1;
/// The value `generate` returns when the strict grammar allows nothing (the runtime errs the
/// same way; it cannot happen with tables the runtime accepts).
const GRAMMAR_FAIL: i64 = -2;

fn define_driver(
    ks: &mut KernelSet,
    parts: &Parts<'_>,
    input: &Needle3LibraryInput<'_>,
    info: &Needle3Info,
    info_values: &[u32],
) -> Result<(), CodegenError> {
    let l = info.layout.clone();
    let m = parts.model;
    let max_new = (input.max_gen_len - 1) as i64;
    let max_rows = m.max_rows as i64;
    let logits_vocab = m.logits_vocab as i64;
    let logits_offset = m.logits_offset;
    let max_query_tokens = input.max_query_tokens as i64;
    let vocab = m.vocab as i64;

    // ---- NAME_workspace_size -----------------------------------------------------------------
    let total = l.total as i64;
    let ws_size = ks.declare_function(
        "workspace_size",
        &["bytes of workspace one call needs: the WORKSPACE_SIZE macro"],
        &[],
        CType::SizeT,
        true,
    )?;
    ks.define_function(ws_size, &[], &[], |g, _, _, _| Some(g.iconst(total)))?;

    // ---- prompt: the query part's ids through the model (internal) ---------------------------
    // int32_t prompt(uint8_t *ws, const int32_t *ids, size_t n): runs the prefix (unfolded)
    // and the ids, `max_rows` positions a call; returns the last row's argmax.
    let prefix_data = if input.fold {
        None
    } else {
        let words: Vec<u32> = input.prefix_ids.to_vec();
        Some(crate::codegen::bytes::declare_u32_table(
            ks,
            "prefix_ids",
            words,
            4,
        )?)
    };
    let prefix_len = input.prefix_ids.len() as i64;
    let first = m.first_position as i64;
    let prompt = ks.declare_function(
        "prompt",
        &[],
        &[
            (CType::VoidPtr, "ws"),
            (CType::ConstI32Ptr, "ids"),
            (CType::SizeT, "n"),
        ],
        CType::I32,
        false,
    )?;
    let data: Vec<_> = prefix_data.into_iter().collect();
    ks.define_function(prompt, &data, &[m.rows], |g, a, d, f| {
        let (ws, ids, n) = (a[0], a[1], a[2]);
        let rows = f.get(m.rows);
        let m1 = iconst32(g, -1);
        let last = g.var(types::I32, m1);
        let feed = |g: &mut Gen<'_>, src: Value, count: Value, pos0: i64| {
            let zero = g.iconst(0);
            let ptr = g.ptr;
            let k = g.var(ptr, zero);
            crate::codegen::bytes::while_loop(
                g,
                |g| {
                    let kv = g.get(k);
                    g.icmp(IntCC::UnsignedLessThan, kv, count)
                },
                |g| {
                    let kv = g.get(k);
                    let left = g.b.ins().isub(count, kv);
                    let cap = g.iconst(max_rows);
                    let big = g.icmp(IntCC::UnsignedGreaterThan, left, cap);
                    let r = g.b.ins().select(big, cap, left);
                    let p = g.addr(src, kv, 4);
                    let pos = g.b.ins().iadd_imm_s(kv, pos0);
                    let t = g.call(rows, &[ws, p, pos, r]).expect("returns");
                    g.set(last, t);
                    let next = g.b.ins().iadd(kv, r);
                    g.set(k, next);
                },
            );
        };
        if let Some(pd) = prefix_data {
            let src = d.get(pd);
            let count = g.iconst(prefix_len);
            feed(g, src, count, 0);
            feed(g, ids, n, prefix_len);
        } else {
            feed(g, ids, n, first);
        }
        Some(g.get(last))
    })?;

    // ---- generate: query ids -> generated ids (internal) --------------------------------------
    // size_t generate(uint8_t *ws, const int32_t *ids, size_t n): greedy decoding as the
    // runtime's `Engine::generate` (every chosen token runs, EOS too: the heads read it).
    // Returns the count (the EOS included), or NON_FINITE.
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
    let query_start = if input.fold { first } else { prefix_len };
    let envelope = match (input.strict, parts.grammar) {
        (Some(t), Some(code)) => Some(Envelope::declare(ks, t, code, l.grammar_state)?),
        _ => None,
    };
    let mut data = Vec::new();
    let mut callees = vec![prompt, m.step];
    if let Some(e) = &envelope {
        data.extend([e.fixed, e.think, e.after]);
        callees.extend([e.code.reset, e.code.allowed, e.code.feed]);
    }
    ks.define_function(generate, &data, &callees, |g, a, d, f| {
        let (ws, ids, n) = (a[0], a[1], a[2]);
        let step = f.get(m.step);
        let t0 = g.call(f.get(prompt), &[ws, ids, n]).expect("returns");
        let next = g.var(types::I32, t0);
        if let Some(e) = &envelope {
            e.reset(g, f, ws);
        }
        let zero = g.iconst(0);
        let ptr = g.ptr;
        let count = g.var(ptr, zero);
        let done = g.var(ptr, zero);
        let gen = at(g, ws, l.gen_ids);
        let logits = at(g, ws, logits_offset);
        let pos0 = g.b.ins().iadd_imm_s(n, query_start);
        let limit = g.iconst(max_new);
        g.for_range(zero, limit, 1, |g, s| {
            let dv = g.get(done);
            let go = g.b.ins().icmp_imm_u(IntCC::Equal, dv, 0);
            g.if_then(go, |g| {
                // The runtime refuses a row with any non-finite logit.
                let lv = g.iconst(logits_vocab);
                g.for_n(lv, |g, i| {
                    let bits = u32_at(g, mem(), logits, i);
                    let exp = g.b.ins().band_imm_u(bits, 0x7f80_0000);
                    let bad = g.b.ins().icmp_imm_u(IntCC::Equal, exp, 0x7f80_0000);
                    g.if_then(bad, |g| {
                        let r = g.iconst(NON_FINITE);
                        g.ret(&[r]);
                    });
                });
                let tok = match &envelope {
                    None => g.get(next),
                    Some(e) => {
                        let remaining = g.iconst(max_new - 1);
                        let remaining = g.b.ins().isub(remaining, s);
                        let picked = e.pick(g, d, f, ws, logits, remaining);
                        // Done: the envelope is complete; nothing more is generated.
                        let finished = g.b.ins().icmp_imm_s(IntCC::SignedLessThan, picked, 0);
                        g.if_then(finished, |g| {
                            let c = g.get(count);
                            g.ret(&[c]);
                        });
                        picked
                    }
                };
                // The step refuses (-1) only a position or token out of range, which the
                // planned positions and the checked ids rule out: kept as an error, never
                // decoded on.
                let refused = g.b.ins().icmp_imm_s(IntCC::SignedLessThan, tok, 0);
                g.if_then(refused, |g| {
                    let r = g.iconst(NON_FINITE);
                    g.ret(&[r]);
                });
                let p = g.addr(gen, s, 4);
                g.b.ins().store(mem(), tok, p, 0);
                let s1 = g.b.ins().iadd_imm_s(s, 1);
                g.set(count, s1);
                let pos = g.b.ins().iadd(pos0, s);
                let t = g.call(step, &[ws, tok, pos]).expect("returns");
                g.set(next, t);
                let eos = g.b.ins().icmp_imm_u(IntCC::Equal, tok, i64::from(EOS));
                let eos = to_ptr(g, eos);
                g.set(done, eos);
            });
        });
        Some(g.get(count))
    })?;

    // ---- tokenize: query text -> the query part's ids (internal) ------------------------------
    // size_t query_ids(uint8_t *ws, const uint8_t *query, size_t len): ids at l.query_ids, at
    // most max_query_tokens + 1 (one more tells a query that is too long).
    let markup = render_query("");
    let (head, tail) = markup.split_at(1); // "\n" | "<|im_end|>\n<|im_start|>assistant\n"
    let (head, tail) = (head.as_bytes().to_vec(), tail.as_bytes().to_vec());
    let query_ids = ks.declare_function(
        "query_ids",
        &[],
        &[
            (CType::VoidPtr, "ws"),
            (CType::ConstU8Ptr, "query"),
            (CType::SizeT, "len"),
        ],
        CType::SizeT,
        false,
    )?;
    let enc = parts.tokenizer.encode;
    ks.define_function(query_ids, &[], &[enc], |g, a, _, f| {
        let (ws, query, len) = (a[0], a[1], a[2]);
        let buf = at(g, ws, l.rendered);
        for (i, &b) in head.iter().enumerate() {
            let v = g.b.ins().iconst(types::I32, i64::from(b));
            store_u8(g, v, buf, i as i32);
        }
        let dst = g.b.ins().iadd_imm_s(buf, head.len() as i64);
        let ptr = g.ptr;
        copy_bytes(g, mem(), ptr, query, dst, len);
        let end = g.b.ins().iadd(dst, len);
        for (i, &b) in tail.iter().enumerate() {
            let v = g.b.ins().iconst(types::I32, i64::from(b));
            store_u8(g, v, end, i as i32);
        }
        let total = g.b.ins().iadd_imm_s(len, (head.len() + tail.len()) as i64);
        let ids = at(g, ws, l.query_ids);
        let scratch = at(g, ws, l.tokenizer_scratch);
        let max_ids = g.iconst(max_query_tokens + 1);
        g.call(f.get(enc), &[buf, total, ids, max_ids, scratch])
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
        &["query text -> the tool calls (JSON); see the status codes above"],
        &text_params,
        CType::I32,
        true,
    )?;
    let mut ex_params = text_params.to_vec();
    ex_params.push((CType::VoidPtr, "result"));
    let call_ex = ks.declare_function(
        "call_ex",
        &[
            "NAME_call, and *result (not NULL) gets the heads, the escalate bit, the tool and",
            "the reasoning's length; see NAME_result",
        ],
        &ex_params,
        CType::I32,
        true,
    )?;
    let validate = parts.output.validate_utf8;
    let detok = parts.output.detokenize;
    let answer = parts.answer.answer;
    let heads_fn = m.heads;
    let head_outputs = m.head_outputs.clone();
    let escalate_below = input.escalate_below;
    let max_output = info.max_output_bytes as i64;
    let max_query_bytes = info.max_query_bytes as i64;
    let callees = [validate, query_ids, generate, heads_fn, detok, answer];
    for (id, ex) in [(call, false), (call_ex, true)] {
        let head_outputs = head_outputs.clone();
        ks.define_function(id, &[], &callees, |g, a, _, f| {
            let (ws, query, qlen, out, cap, out_len) = (a[0], a[1], a[2], a[3], a[4], a[5]);
            let result = if ex {
                let result = a[6];
                let null = g.b.ins().icmp_imm_u(IntCC::Equal, result, 0);
                g.if_then(null, |g| ret(g, "ERR_ARGUMENT"));
                let z = iconst32(g, 0);
                for k in 0..(RESULT_FIELDS.len() + 2) as i32 {
                    g.b.ins().store(mem(), z, result, 4 * k);
                }
                let m1 = iconst32(g, -1);
                g.b.ins().store(mem(), m1, result, result_field("tool"));
                store_escalate(g, result, escalate_below);
                Some(result)
            } else {
                None
            };
            check_arguments(g, ws, query, qlen, out, cap, out_len);
            // Nothing from an earlier call.
            let rs = at(g, ws, l.reasoning);
            let zero = g.iconst(0);
            for k in 0..3 {
                g.b.ins().store(mem(), zero, rs, 8 * k);
            }
            let long =
                g.b.ins()
                    .icmp_imm_u(IntCC::UnsignedGreaterThan, qlen, max_query_bytes);
            g.if_then(long, |g| ret(g, "ERR_QUERY_TOO_LONG"));
            let ok = g.call(f.get(validate), &[query, qlen]).expect("returns");
            let bad = g.b.ins().icmp_imm_u(IntCC::Equal, ok, 0);
            g.if_then(bad, |g| ret(g, "ERR_UTF8"));
            let n = g
                .call(f.get(query_ids), &[ws, query, qlen])
                .expect("returns");
            let over =
                g.b.ins()
                    .icmp_imm_u(IntCC::UnsignedGreaterThan, n, max_query_tokens);
            g.if_then(over, |g| ret(g, "ERR_QUERY_TOO_LONG"));
            let ids = at(g, ws, l.query_ids);
            let n_gen = g.call(f.get(generate), &[ws, ids, n]).expect("returns");
            let nf = g.b.ins().icmp_imm_s(IntCC::Equal, n_gen, NON_FINITE);
            g.if_then(nf, |g| ret(g, "ERR_NUMERIC"));
            let gf = g.b.ins().icmp_imm_s(IntCC::Equal, n_gen, GRAMMAR_FAIL);
            g.if_then(gf, |g| ret(g, "ERR_OUTPUT"));
            let heads = at(g, ws, l.heads);
            g.call(f.get(heads_fn), &[ws, heads]);
            if let Some(result) = result {
                store_heads(g, result, heads, &head_outputs, escalate_below);
                let n32 = g.b.ins().ireduce(types::I32, n_gen);
                g.b.ins()
                    .store(mem(), n32, result, result_field("generated_tokens"));
            }
            // The text of the generated ids without the final EOS.
            let gen = at(g, ws, l.gen_ids);
            let text_n = without_eos(g, gen, n_gen);
            let text = at(g, ws, l.text);
            let text_len = g.call(f.get(detok), &[gen, text_n, text]).expect("returns");
            let answer_out = at(g, ws, l.output);
            let scratch = at(g, ws, l.output_scratch);
            let ocap = g.iconst(max_output);
            let tool = match result {
                Some(r) => g.b.ins().iadd_imm_s(r, i64::from(result_field("tool"))),
                None => g.iconst(0),
            };
            // `answer` writes the tool and `parsed` as a pair; in NAME_result `parsed` comes
            // first, so the pair goes through the stack.
            let slot =
                g.b.create_sized_stack_slot(cranelift_codegen::ir::StackSlotData::new(
                    cranelift_codegen::ir::StackSlotKind::ExplicitSlot,
                    8,
                    2,
                ));
            let pair = g.b.ins().stack_addr(g.ptr, slot, 0);
            let st = g
                .call(
                    f.get(answer),
                    &[text, text_len, answer_out, ocap, out_len, scratch, pair, rs],
                )
                .expect("returns");
            if let Some(r) = result {
                let t = g.b.ins().load(types::I32, mem(), pair, 0);
                g.b.ins().store(mem(), t, tool, 0);
                let p = g.b.ins().load(types::I32, mem(), pair, 4);
                g.b.ins().store(mem(), p, r, result_field("parsed"));
                let rl = g.b.ins().load(g.ptr, mem(), rs, 8);
                let rl = g.b.ins().ireduce(types::I32, rl);
                g.b.ins().store(mem(), rl, r, result_field("reasoning_len"));
            }
            let failed = g.b.ins().icmp_imm_u(IntCC::NotEqual, st, 0);
            g.if_then(failed, |g| {
                let zero = g.iconst(0);
                g.b.ins().store(mem(), zero, out_len, 0);
                ret(g, "ERR_OUTPUT");
            });
            let ptr = g.ptr;
            let len = g.b.ins().load(ptr, mem(), out_len, 0);
            let small = g.b.ins().icmp(IntCC::UnsignedGreaterThan, len, cap);
            g.if_then(small, |g| ret(g, "ERR_OUT_TOO_SMALL"));
            copy_bytes(g, mem(), types::I32, answer_out, out, len);
            Some(iconst32(g, status("OK")))
        })?;
    }

    // ---- NAME_reasoning -------------------------------------------------------------------------
    let reasoning_fn = ks.declare_function(
        "reasoning",
        &[
            "the last call's <think> text in the workspace (valid until the next call), *len its",
            "bytes (0 and NULL: none); ws must be the call's workspace",
        ],
        &[(CType::VoidPtr, "workspace"), (CType::SizePtr, "len")],
        CType::ConstU8Ptr,
        true,
    )?;
    ks.define_function(reasoning_fn, &[], &[], |g, a, _, _| {
        let (ws, len) = (a[0], a[1]);
        let zero = g.iconst(0);
        let has_len = g.b.ins().icmp_imm_u(IntCC::NotEqual, len, 0);
        g.if_then(has_len, |g| {
            g.b.ins().store(mem(), zero, len, 0);
        });
        let null = g.b.ins().icmp_imm_u(IntCC::Equal, ws, 0);
        g.if_then(null, |g| g.ret(&[zero]));
        let rs = at(g, ws, l.reasoning);
        let ptr = g.ptr;
        let present = g.b.ins().load(ptr, mem(), rs, 16);
        let none = g.b.ins().icmp_imm_u(IntCC::Equal, present, 0);
        g.if_then(none, |g| g.ret(&[zero]));
        let n = g.b.ins().load(ptr, mem(), rs, 8);
        g.if_then(has_len, |g| {
            g.b.ins().store(mem(), n, len, 0);
        });
        let start = g.b.ins().load(ptr, mem(), rs, 0);
        let text = at(g, ws, l.text);
        Some(g.b.ins().iadd(text, start))
    })?;

    // ---- NAME_call_tokens ---------------------------------------------------------------------
    let call_tokens = ks.declare_function(
        "call_tokens",
        &[
            "token level: the query part's ids (\\nQUERY<|im_end|>\\n<|im_start|>assistant\\n,",
            "tokenized after </tools>) -> generated ids without the final EOS",
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
    ks.define_function(call_tokens, &[], &[generate], |g, a, _, f| {
        let (ws, ids, n, out, cap, out_len) = (a[0], a[1], a[2], a[3], a[4], a[5]);
        check_arguments(g, ws, ids, n, out, cap, out_len);
        let empty = g.b.ins().icmp_imm_u(IntCC::Equal, n, 0);
        g.if_then(empty, |g| ret(g, "ERR_ARGUMENT"));
        let over =
            g.b.ins()
                .icmp_imm_u(IntCC::UnsignedGreaterThan, n, max_query_tokens);
        g.if_then(over, |g| ret(g, "ERR_QUERY_TOO_LONG"));
        g.for_n(n, |g, i| {
            let id = i32_at(g, mem(), ids, i);
            let bad =
                g.b.ins()
                    .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, id, vocab);
            g.if_then(bad, |g| ret(g, "ERR_TOKEN"));
        });
        let qids = at(g, ws, l.query_ids);
        copy_i32s(g, ids, qids, n);
        let n_gen = g.call(f.get(generate), &[ws, qids, n]).expect("returns");
        let nf = g.b.ins().icmp_imm_s(IntCC::Equal, n_gen, NON_FINITE);
        g.if_then(nf, |g| ret(g, "ERR_NUMERIC"));
        let gf = g.b.ins().icmp_imm_s(IntCC::Equal, n_gen, GRAMMAR_FAIL);
        g.if_then(gf, |g| ret(g, "ERR_OUTPUT"));
        let gen = at(g, ws, l.gen_ids);
        let k = without_eos(g, gen, n_gen);
        g.b.ins().store(mem(), k, out_len, 0);
        let small = g.b.ins().icmp(IntCC::UnsignedGreaterThan, k, cap);
        g.if_then(small, |g| ret(g, "ERR_OUT_TOO_SMALL"));
        copy_i32s(g, gen, out, k);
        Some(iconst32(g, status("OK")))
    })?;

    // ---- NAME_embed -----------------------------------------------------------------------------
    let embed = ks.declare_function(
        "embed",
        &[
            "the embedding head over the prompt with text as its query: EMBEDDING_DIM floats",
            "of unit length into out (ERR_NO_HEAD when the model has no embedding head)",
        ],
        &[
            (CType::VoidPtr, "workspace"),
            (CType::ConstU8Ptr, "text"),
            (CType::SizeT, "text_len"),
            (CType::F32Ptr, "out"),
        ],
        CType::I32,
        true,
    )?;
    let emb = {
        let mut off = 0;
        let mut found = None;
        for (name, w) in &m.head_outputs {
            if *name == "embedding" {
                found = Some((off, *w));
            }
            off += w;
        }
        found
    };
    ks.define_function(
        embed,
        &[],
        &[validate, query_ids, prompt, heads_fn],
        |g, a, _, f| {
            let (ws, text, len, out) = (a[0], a[1], a[2], a[3]);
            check_workspace(g, ws);
            let Some((off, dim)) = emb else {
                return Some(iconst32(g, status("ERR_NO_HEAD")));
            };
            let null_out = g.b.ins().icmp_imm_u(IntCC::Equal, out, 0);
            g.if_then(null_out, |g| ret(g, "ERR_ARGUMENT"));
            let null = g.b.ins().icmp_imm_u(IntCC::Equal, text, 0);
            let some = g.b.ins().icmp_imm_u(IntCC::NotEqual, len, 0);
            let bad = g.b.ins().band(null, some);
            g.if_then(bad, |g| ret(g, "ERR_ARGUMENT"));
            let long =
                g.b.ins()
                    .icmp_imm_u(IntCC::UnsignedGreaterThan, len, max_query_bytes);
            g.if_then(long, |g| ret(g, "ERR_QUERY_TOO_LONG"));
            let ok = g.call(f.get(validate), &[text, len]).expect("returns");
            let invalid = g.b.ins().icmp_imm_u(IntCC::Equal, ok, 0);
            g.if_then(invalid, |g| ret(g, "ERR_UTF8"));
            let n = g.call(f.get(query_ids), &[ws, text, len]).expect("returns");
            let over =
                g.b.ins()
                    .icmp_imm_u(IntCC::UnsignedGreaterThan, n, max_query_tokens);
            g.if_then(over, |g| ret(g, "ERR_QUERY_TOO_LONG"));
            let ids = at(g, ws, l.query_ids);
            g.call(f.get(prompt), &[ws, ids, n]);
            let heads = at(g, ws, l.heads);
            g.call(f.get(heads_fn), &[ws, heads]);
            let d = g.iconst(dim as i64);
            g.for_n(d, |g, i| {
                let j = g.b.ins().iadd_imm_s(i, off as i64);
                let v = g.load_f32(heads, j);
                g.store_f32(v, out, i);
            });
            Some(iconst32(g, status("OK")))
        },
    )?;

    // ---- NAME_model_info / NAME_tool_name ------------------------------------------------------
    define_info_and_names(
        ks,
        info_values,
        input.tool_names,
        "the name of tool i (NUL-terminated), or NULL past the last tool",
    )?;
    Ok(())
}

/// `n` without a final EOS at `gen[n - 1]`.
fn without_eos(g: &mut Gen<'_>, gen: Value, n: Value) -> Value {
    let ptr = g.ptr;
    let k = g.var(ptr, n);
    let some = g.b.ins().icmp_imm_u(IntCC::NotEqual, n, 0);
    g.if_then(some, |g| {
        let last = g.b.ins().iadd_imm_s(n, -1);
        let id = i32_at(g, mem(), gen, last);
        let eos = g.b.ins().icmp_imm_u(IntCC::Equal, id, i64::from(EOS));
        g.if_then(eos, |g| g.set(k, last));
    });
    g.get(k)
}

/// The heads into `*result`: confidence (sigmoid of the logit; 1 without the head), escalate,
/// the logit and the router's logits.
fn store_heads(
    g: &mut Gen<'_>,
    result: Value,
    heads: Value,
    outputs: &[(&'static str, usize)],
    escalate_below: f32,
) {
    let mut off = 0usize;
    let one = g.f32(1.0);
    let mut confidence = one;
    for (name, w) in outputs {
        match *name {
            "confidence" => {
                let i = g.iconst(off as i64);
                let z = g.load_f32(heads, i);
                g.b.ins()
                    .store(mem(), z, result, result_field("confidence_logit"));
                confidence = math::sigmoid(g, z);
            }
            "router" => {
                for k in 0..*w {
                    let i = g.iconst((off + k) as i64);
                    let z = g.load_f32(heads, i);
                    g.b.ins()
                        .store(mem(), z, result, result_field("router") + 4 * k as i32);
                }
            }
            _ => {}
        }
        off += w;
    }
    g.b.ins()
        .store(mem(), confidence, result, result_field("confidence"));
    store_escalate(g, result, escalate_below);
}

/// `result->escalate = result->confidence < threshold`.
fn store_escalate(g: &mut Gen<'_>, result: Value, threshold: f32) {
    let c =
        g.b.ins()
            .load(types::F32, mem(), result, result_field("confidence"));
    let t = g.f32(threshold);
    let below = g.b.ins().fcmp(FloatCC::LessThan, c, t);
    let below = g.b.ins().uextend(types::I32, below);
    g.b.ins()
        .store(mem(), below, result, result_field("escalate"));
}

fn header_text(input: &Needle3LibraryInput<'_>, info: &Needle3Info, ks: &KernelSet) -> String {
    let name = input.name;
    let up = name.to_ascii_uppercase();
    let c = &input.model.config;
    let mut extra = String::new();
    let mut define = |macro_name: &str, value: String, doc: &str| {
        extra.push_str(&format!("/* {doc} */\n#define {up}_{macro_name} {value}\n"));
    };
    define(
        "WORKSPACE_SIZE",
        format!("((size_t){})", info.layout.total),
        "bytes of workspace one call needs",
    );
    define(
        "WORKSPACE_ALIGN",
        WORKSPACE_ALIGN.to_string(),
        "the workspace's required alignment in bytes",
    );
    define(
        "MAX_QUERY_BYTES",
        format!("((size_t){})", info.max_query_bytes),
        "longest query accepted, in bytes",
    );
    define(
        "MAX_QUERY_TOKENS",
        format!("((size_t){})", info.max_query_tokens),
        "most ids of the query part (\\nQUERY<|im_end|>\\n<|im_start|>assistant\\n)",
    );
    define(
        "MAX_GEN_LEN",
        format!("((size_t){})", info.max_gen_len),
        "at most MAX_GEN_LEN - 1 generated tokens",
    );
    define(
        "MAX_OUTPUT_BYTES",
        format!("((size_t){})", info.max_output_bytes),
        "an out buffer of this size always suffices",
    );
    define(
        "VOCAB_SIZE",
        c.vocab_size.to_string(),
        "token ids are below this",
    );
    define(
        "EMBEDDING_DIM",
        info.embedding_dim.to_string(),
        "floats NAME_embed writes (0: no embedding head)"
            .replace("NAME", name)
            .as_str(),
    );
    define(
        "ESCALATE_BELOW",
        format!("{:?}f", input.escalate_below),
        "call_ex sets escalate when the confidence is below this (0: never)",
    );
    define(
        "FOLD_TOOLS",
        u32::from(input.fold).to_string(),
        "1: the prompt up to </tools> is precomputed",
    );
    extra.push_str(&header_types(
        name,
        &statuses(),
        INFO_FIELDS,
        &["escalate_below"],
        RESULT_FIELDS,
        "the calls",
    ));
    let preamble = [
        format!(
            "{name}: a Needle 3 tool-calling model compiled by needlec for {}.",
            ks.target().name
        ),
        format!("Link lib{name}.a; it needs nothing else (no libc, no allocator)."),
        format!("Each call needs its own workspace of {up}_WORKSPACE_SIZE bytes aligned to {up}_WORKSPACE_ALIGN;"),
        "threads with separate workspaces may call concurrently.".to_string(),
        format!("{name}_call(ws, query, query_len, out, out_cap, &out_len) writes the tool calls of a UTF-8"),
        "query into out (JSON, no NUL) and returns 0, or a status code below.".to_string(),
        format!("{name}_call_ex(..., &result) also fills *result: confidence, escalate, router logits."),
    ];
    let preamble: Vec<&str> = preamble.iter().map(String::as_str).collect();
    write_header(name, &preamble, &extra, ks.functions())
        .replace(
            &format!("void {name}_model_info(void *info);"),
            &format!("void {name}_model_info({name}_info *info);"),
        )
        .replace(
            "size_t *out_len, void *result);",
            &format!("size_t *out_len, {name}_result *result);"),
        )
        .replace("NAME_", &format!("{name}_"))
}

// ---- --grammar strict: the envelope around the strict machine ------------------------------------

// Envelope phases (`needle_runtime::needle3::grammar`'s `Phase`).
const P_START: i64 = 0;
const P_THINK: i64 = 1;
const P_AFTER: i64 = 2;
const P_CALLS: i64 = 3;
const P_IM_END: i64 = 4;
const P_EOS: i64 = 5;
const P_DONE: i64 = 6;

/// The fixed lists, one table: `[<think>, <tool_call>]` from 0, `[<tool_call>]` from 1,
/// `[</think>]` 2, `[<|im_end|>]` 3, `[EOS]` 4.
const FIXED: [u32; 5] = [THINK, TOOL_CALL, THINK_END, IM_END, EOS];

/// The envelope machine of `EnvelopeMachine` in generated code: its phase in the state word
/// before the strict grammar's state, its lists in read-only data.
struct Envelope {
    code: GrammarCode,
    fixed: cranelift_module::DataId,
    /// The think block's tokens (`think_text`), in id order.
    think: cranelift_module::DataId,
    n_think: i64,
    /// `<tool_call>` and the white-space tokens, in id order.
    after: cranelift_module::DataId,
    n_after: i64,
    calls_cost: i64,
    /// Workspace offset of the phase word, then the strict state.
    state: usize,
}

impl Envelope {
    fn declare(
        ks: &mut KernelSet,
        t: &EnvelopeTables,
        code: &GrammarCode,
        state: usize,
    ) -> Result<Envelope, CodegenError> {
        use crate::codegen::bytes::declare_u32_table;
        let think: Vec<u32> = (0..t.think_text.len() as u32)
            .filter(|&i| t.think_text[i as usize])
            .collect();
        let mut after = vec![TOOL_CALL];
        after.extend(&t.whitespace);
        after.sort_unstable();
        Ok(Envelope {
            code: *code,
            fixed: declare_u32_table(ks, "envelope_fixed", FIXED, 4)?,
            n_think: think.len() as i64,
            think: declare_u32_table(ks, "envelope_think", think, 4)?,
            n_after: after.len() as i64,
            after: declare_u32_table(ks, "envelope_after", after, 4)?,
            calls_cost: t.calls_cost() as i64,
            state,
        })
    }

    /// The phase word and the strict state's address.
    fn addrs(&self, g: &mut Gen<'_>, ws: Value) -> (Value, Value) {
        let phase = at(g, ws, self.state);
        let strict = g.b.ins().iadd_imm_s(phase, STRICT_AT as i64);
        (phase, strict)
    }

    fn reset(&self, g: &mut Gen<'_>, f: &crate::codegen::kernels::Callees, ws: Value) {
        let (phase, strict) = self.addrs(g, ws);
        let start = iconst32(g, P_START);
        g.b.ins().store(mem(), start, phase, 0);
        g.call(f.get(self.code.reset), &[strict]);
    }

    /// The step's token under the envelope (the first highest logit among the allowed ids),
    /// fed to the machine; -1 once the envelope is complete; returns GRAMMAR_FAIL from the
    /// enclosing function when nothing is allowed. `remaining`: the most tokens after it.
    fn pick(
        &self,
        g: &mut Gen<'_>,
        d: &crate::codegen::kernels::DataAddrs,
        f: &crate::codegen::kernels::Callees,
        ws: Value,
        logits: Value,
        remaining: Value,
    ) -> Value {
        let ptr = g.ptr;
        let (phase_p, strict) = self.addrs(g, ws);
        let phase = g.b.ins().load(types::I32, mem(), phase_p, 0);
        let zero = g.iconst(0);
        let list = g.var(ptr, zero);
        let n = g.var(ptr, zero);
        let fixed = d.get(self.fixed);
        let set = |g: &mut Gen<'_>, base: Value, idx: i64, count: i64| {
            let p = g.b.ins().iadd_imm_s(base, 4 * idx);
            g.set(list, p);
            let c = g.iconst(count);
            g.set(n, c);
        };
        let calls = self.calls_cost;
        let think_fits =
            g.b.ins()
                .icmp_imm_u(IntCC::UnsignedGreaterThan, remaining, calls);
        let is = |g: &mut Gen<'_>, p: i64| g.b.ins().icmp_imm_u(IntCC::Equal, phase, p);
        let c = is(g, P_START);
        g.if_then(c, |g| {
            g.if_else(think_fits, |g| set(g, fixed, 0, 2), |g| set(g, fixed, 1, 1));
        });
        let c = is(g, P_THINK);
        g.if_then(c, |g| {
            let think = d.get(self.think);
            g.if_else(
                think_fits,
                |g| set(g, think, 0, self.n_think),
                |g| set(g, fixed, 2, 1),
            );
        });
        let c = is(g, P_AFTER);
        g.if_then(c, |g| {
            let fits =
                g.b.ins()
                    .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, remaining, calls);
            let after = d.get(self.after);
            g.if_else(
                fits,
                |g| set(g, after, 0, self.n_after),
                |g| set(g, fixed, 1, 1),
            );
        });
        let c = is(g, P_CALLS);
        g.if_then(c, |g| {
            // `</tool_call>` and `<|im_end|>` follow the list.
            let two = g.iconst(2);
            let short = g.b.ins().icmp_imm_u(IntCC::UnsignedLessThan, remaining, 2);
            let r2 = g.b.ins().isub(remaining, two);
            let zero = g.iconst(0);
            let r2 = g.b.ins().select(short, zero, r2);
            let slot =
                g.b.create_sized_stack_slot(cranelift_codegen::ir::StackSlotData::new(
                    cranelift_codegen::ir::StackSlotKind::ExplicitSlot,
                    8,
                    3,
                ));
            let np = g.b.ins().stack_addr(g.ptr, slot, 0);
            g.b.ins().store(mem(), zero, np, 0);
            let p = g
                .call(f.get(self.code.allowed), &[strict, np, r2])
                .expect("returns");
            let k = g.b.ins().load(g.ptr, mem(), np, 0);
            // NULL: the machine left the language (unconstrained in v1): nothing allowed here,
            // as the runtime's `unwrap_or_default`.
            let null = g.b.ins().icmp_imm_u(IntCC::Equal, p, 0);
            let k = g.b.ins().select(null, zero, k);
            g.set(list, p);
            g.set(n, k);
        });
        let c = is(g, P_IM_END);
        g.if_then(c, |g| set(g, fixed, 3, 1));
        let c = is(g, P_EOS);
        g.if_then(c, |g| set(g, fixed, 4, 1));
        let m1 = iconst32(g, -1);
        let result = g.var(types::I32, m1);
        let not_done = g.b.ins().icmp_imm_u(IntCC::NotEqual, phase, P_DONE);
        g.if_then(not_done, |g| {
            let count = g.get(n);
            let none = g.b.ins().icmp_imm_u(IntCC::Equal, count, 0);
            g.if_then(none, |g| {
                let r = g.iconst(GRAMMAR_FAIL);
                g.ret(&[r]);
            });
            // The first maximum in list order (ids ascending), as the runtime's `pick`.
            let lp = g.get(list);
            let first = i32_at(g, mem(), lp, zero);
            let best = g.var(types::I32, first);
            let fi = to_ptr(g, first);
            let bv = g.load_f32(logits, fi);
            let best_v = g.var(types::F32, bv);
            g.for_n(count, |g, i| {
                let id = i32_at(g, mem(), lp, i);
                let ii = to_ptr(g, id);
                let v = g.load_f32(logits, ii);
                let cur = g.get(best_v);
                let better = g.b.ins().fcmp(FloatCC::GreaterThan, v, cur);
                g.if_then(better, |g| {
                    g.set(best, id);
                    g.set(best_v, v);
                });
            });
            let tok = g.get(best);
            g.set(result, tok);
            // Feed it (`EnvelopeMachine::feed`).
            let next = g.var(types::I32, phase);
            let set_phase = |g: &mut Gen<'_>, p: i64| {
                let v = iconst32(g, p);
                g.set(next, v);
            };
            let eq = |g: &mut Gen<'_>, x: Value, c: u32| {
                g.b.ins().icmp_imm_u(IntCC::Equal, x, i64::from(c))
            };
            let c = is(g, P_START);
            g.if_then(c, |g| {
                let think = eq(g, tok, THINK);
                let call = eq(g, tok, TOOL_CALL);
                g.if_else(
                    think,
                    |g| set_phase(g, P_THINK),
                    |g| {
                        g.if_else(
                            call,
                            |g| {
                                g.call(f.get(self.code.feed), &[strict, tok]);
                                set_phase(g, P_CALLS);
                            },
                            |g| set_phase(g, P_DONE),
                        );
                    },
                );
            });
            let c = is(g, P_THINK);
            g.if_then(c, |g| {
                let end = eq(g, tok, THINK_END);
                g.if_then(end, |g| set_phase(g, P_AFTER));
            });
            let c = is(g, P_AFTER);
            g.if_then(c, |g| {
                let call = eq(g, tok, TOOL_CALL);
                g.if_then(call, |g| {
                    g.call(f.get(self.code.feed), &[strict, tok]);
                    set_phase(g, P_CALLS);
                });
            });
            let c = is(g, P_CALLS);
            g.if_then(c, |g| {
                // The list allows `</tool_call>` only once it is complete.
                let end = eq(g, tok, TOOL_CALL_END);
                g.if_else(
                    end,
                    |g| set_phase(g, P_IM_END),
                    |g| {
                        g.call(f.get(self.code.feed), &[strict, tok]);
                    },
                );
            });
            let c = is(g, P_IM_END);
            g.if_then(c, |g| set_phase(g, P_EOS));
            let c = is(g, P_EOS);
            g.if_then(c, |g| set_phase(g, P_DONE));
            let p = g.get(next);
            g.b.ins().store(mem(), p, phase_p, 0);
        });
        g.get(result)
    }
}

/// Offset of the strict state after the phase word (the state's alignment).
const STRICT_AT: usize = 16;
