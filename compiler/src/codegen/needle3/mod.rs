//! The Needle 3 model code: one generated function that runs one position through a Needle 3
//! model (`docs/needle3.md` sections 2-3), with every cache in the caller's workspace.
//!
//! # Interface
//!
//! `int32_t step(uint8_t *ws, int32_t token, size_t pos)`: feeds `token` at position `pos`:
//! records the id (the engram hashes read back `max(orders) - 1` ids), runs every layer (the
//! engram sites' gathered rows, the hyper-connection lanes, the block with its conv taps over
//! the layer's cached pre-conv rows and attention over its cached keys and values, the MLP),
//! writes the position's rows into the caches, leaves the tied logits at `ws + logits_offset`
//! and returns their argmax (the lowest id on ties). Positions must be fed in order from 0;
//! feeding `pos` again rewrites its rows, so a new prompt needs no reset. Returns -1,
//! computing nothing, when `pos >= max_positions` or `token` is outside the vocabulary.
//!
//! # Weights
//!
//! In read-only data. A float32 checkpoint's: the projections in the panels of the v1 matrix
//! product (q, k, v and the gate concatenated into one product of the normalized input), the
//! MLP's Monarch factors, diagonals and permutations as the checkpoint has them, the engram
//! tables row-major (gathered, never multiplied). A CQ checkpoint's (a `.cact` export) keep
//! their codes ([`cq`], `docs/needle3.md` 13.1): the embedding and engram tables dequantized a
//! gathered row at a time, the attention, lanes, engram, heads' output and logits products
//! over the codes; the MLP, norms, taps and the heads' probes and queries as float32.

pub mod answer;
pub mod cq;
pub mod kernels;
pub mod library;
pub mod mirror;

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, Value};
use cranelift_module::{DataId, FuncId};
use needle_runtime::needle3::cq::CqTensor;
use needle_runtime::needle3::forward::rope_tables;
use needle_runtime::needle3::model::Head;
use needle_runtime::needle3::Model;

use crate::abi::CType;
use crate::codegen::gen::Gen;
use crate::codegen::model::kernels as v1;
use crate::codegen::weights::{WeightFormat, WeightRef};
use crate::codegen::{CodegenError, KernelSet};
use kernels::{pool_stride, AttnShape, EngramShape, HeadData, MhcConsts, MlpData};

/// What a caller needs to drive the generated step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Needle3Code {
    /// `int32_t step(uint8_t *ws, int32_t token, size_t pos)`.
    pub step: FuncId,
    /// `int32_t rows(uint8_t *ws, const int32_t *tokens, size_t pos, size_t rows)`: positions
    /// `pos..pos+rows` (1 to [`MAX_ROWS`]) at once, the matrix products over all the rows (each
    /// row summed as a one-row step sums it); returns what `step` returns for the last one,
    /// bit for bit, and leaves every cache and the heads as the steps would.
    pub rows: FuncId,
    pub max_rows: usize,
    pub workspace_bytes: usize,
    pub workspace_align: usize,
    /// `f32[logits_vocab]` of the last step.
    pub logits_offset: usize,
    pub max_positions: usize,
    /// The first position the step takes: the folded prefix's length (0 unfolded). Feeding it
    /// starts a new sequence for the heads.
    pub first_position: usize,
    /// `void heads(uint8_t *ws, float *out)`: the heads over every position fed since the
    /// first, as [`Needle3Code::head_outputs`] lays them out in `out`.
    pub heads: FuncId,
    /// The heads the checkpoint has, in output order, with their widths: `confidence` (the
    /// logit), `router` (three logits), `embedding` (unit length).
    pub head_outputs: Vec<(&'static str, usize)>,
    pub vocab: usize,
    pub logits_vocab: usize,
}

/// The most positions one `rows` call takes (the workspace holds this many rows).
pub const MAX_ROWS: usize = 16;

/// The matrix products take rows in register tiles: with float32 weights each output is still
/// one sum over the inputs in order, so a row comes out as a one-row product computes it (the
/// tests check `rows` against one-row steps bit for bit).
const ROW_TILES: bool = true;

fn invalid(msg: impl Into<String>) -> CodegenError {
    CodegenError::Invalid(msg.into())
}

/// Byte offsets of the workspace's regions, allocated in order, each 16-byte aligned.
#[derive(Default)]
struct Layout {
    bytes: usize,
}

impl Layout {
    fn floats(&mut self, n: usize) -> usize {
        let at = self.bytes;
        self.bytes = (at + 4 * n.max(1)).div_ceil(16) * 16;
        at
    }
}

/// Per-layer regions.
struct LayerWs {
    /// Pre-conv q|k|v rows, `cw` floats a position.
    pre: usize,
    /// Keys after norm and RoPE, `K*dq` floats a position; values `K*dv`.
    k: usize,
    v: usize,
}

/// One layer's generated kernels and data.
struct LayerCode {
    z_norm: FuncId,
    mix: FuncId,
    mhc_pre: FuncId,
    mhc_post: FuncId,
    norm_in: FuncId,
    qkvg: FuncId,
    taps: FuncId,
    q_norm: FuncId,
    k_norm: FuncId,
    attention: FuncId,
    wout: FuncId,
    post_norm: FuncId,
    attn_gate: f32,
    pre_hada: FuncId,
    mlp: FuncId,
    /// Index into the sites, on a site layer.
    site: Option<usize>,
}

struct SiteCode {
    gather: FuncId,
    key: FuncId,
    value: FuncId,
    taps: FuncId,
    /// The values before their taps, `D` floats a position.
    w: usize,
}

/// Rows of the folded prefix in read-only data: the object, the first row it holds (only the
/// rows a later position can read back are kept) and the floats a row.
#[derive(Clone, Copy)]
struct FoldedRows {
    data: DataId,
    first: usize,
    width: usize,
}

/// The folded prefix's rows, where the step reads them for positions below `p0`.
struct Folded {
    ids: FoldedRows,
    /// Per layer: the pre-conv rows the taps reach back to, the keys and the values.
    pre: Vec<Option<FoldedRows>>,
    k: Vec<FoldedRows>,
    v: Vec<FoldedRows>,
    /// Per site: the values before their taps that the taps reach back to.
    w: Vec<Option<FoldedRows>>,
}

/// The last `keep` rows (of `width` floats, `rows` in all) of `values`, as read-only data.
fn tail(
    ks: &mut KernelSet,
    name: &str,
    values: &[f32],
    width: usize,
    keep: usize,
) -> Result<Option<FoldedRows>, CodegenError> {
    let rows = values.len() / width.max(1);
    let keep = keep.min(rows);
    if keep == 0 {
        return Ok(None);
    }
    let first = rows - keep;
    let data = ks.declare_f32_data(name, &values[first * width..])?;
    Ok(Some(FoldedRows { data, first, width }))
}

/// The read-only rows of the folded prefix, as the step's own arithmetic wrote them.
fn fold_prefix(
    ks: &mut KernelSet,
    model: &Model,
    rows: &mirror::Rows,
) -> Result<Folded, CodegenError> {
    let c = &model.config;
    let (h_n, k_n, dq, dv) = (c.num_heads, c.num_kv_heads, c.qk_head_dim(), c.v_head_dim());
    let (kw, vw) = (k_n * dq, k_n * dv);
    let cw = h_n * dq + kw + vw;
    let ids: Vec<usize> = rows.ids.iter().map(|&i| i as usize).collect();
    let ids = FoldedRows {
        data: u32_data(ks, "n3_folded_ids", &ids)?,
        first: 0,
        width: 1,
    };
    let mut folded = Folded {
        ids,
        pre: Vec::new(),
        k: Vec::new(),
        v: Vec::new(),
        w: Vec::new(),
    };
    for (l, w) in model.layers.iter().enumerate() {
        let keep = w.q_taps.nrows().saturating_sub(1);
        let name = format!("n3_l{l}_folded_pre");
        folded.pre.push(tail(ks, &name, &rows.pre[l], cw, keep)?);
        for (vals, width, what, out) in [
            (&rows.k[l], kw, "k", &mut folded.k),
            (&rows.v[l], vw, "v", &mut folded.v),
        ] {
            let data = ks.declare_f32_data(&format!("n3_l{l}_folded_{what}"), vals)?;
            out.push(FoldedRows {
                data,
                first: 0,
                width,
            });
        }
    }
    let dil = c.engram_dilation();
    for (s, site) in model.sites.iter().enumerate() {
        let keep = site.taps.nrows().saturating_sub(1) * dil;
        let name = format!("n3_s{s}_folded_w");
        folded.w.push(tail(ks, &name, &rows.w[s], c.d_model, keep)?);
    }
    Ok(folded)
}

/// `void NAME_mm(const float *x, float *y, size_t rows)`: `y = x @ W`, over `W`'s CQ codes
/// (stored `(n, k)`) where the checkpoint has them, else over the `(k, n)` row-major float32
/// `values()` (only made then).
fn product(
    ks: &mut KernelSet,
    name: &str,
    (k, n): (usize, usize),
    values: impl FnOnce() -> Vec<f32>,
    codes: Option<&CqTensor>,
) -> Result<FuncId, CodegenError> {
    match codes {
        Some(t) => {
            if (t.rows, t.cols) != (n, k) {
                return Err(invalid(format!(
                    "weights `{name}`: CQ codes of {}x{} for {k}x{n}",
                    t.cols, t.rows
                )));
            }
            let data = cq::CqData::declare(ks, name, t)?;
            cq::matmul(ks, &format!("{name}_mm"), &data, &t.code_levels)
        }
        None => {
            let w = weights(ks, name, k, n, &values())?;
            v1::matmul(ks, &format!("{name}_mm"), &w, ROW_TILES)
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `values` (row-major `[k][n]`) as matrix-product weights.
fn weights(
    ks: &mut KernelSet,
    name: &str,
    k: usize,
    n: usize,
    values: &[f32],
) -> Result<WeightRef, CodegenError> {
    if values.len() != k * n {
        return Err(invalid(format!(
            "weights `{name}`: {} values for {k}x{n}",
            values.len()
        )));
    }
    let format = WeightFormat::F32Panels;
    let data = ks.declare_f32_data(name, &format.layout(k, n, values))?;
    Ok(WeightRef {
        data,
        scales: None,
        k,
        n,
        format,
    })
}

/// `[k][a] ++ [k][b] ++ ...`: row-major matrices with the same rows, side by side.
fn side_by_side(parts: &[(&[f32], usize)], k: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for r in 0..k {
        for &(m, n) in parts {
            out.extend_from_slice(&m[r * n..(r + 1) * n]);
        }
    }
    out
}

/// An array's values in row-major order.
fn flat<'a>(values: impl IntoIterator<Item = &'a f32>) -> Vec<f32> {
    values.into_iter().copied().collect()
}

fn one_plus(g: &[f32]) -> Vec<f32> {
    g.iter().map(|v| 1.0 + v).collect()
}

fn u32_data(ks: &mut KernelSet, name: &str, v: &[usize]) -> Result<DataId, CodegenError> {
    let bits: Vec<f32> = v.iter().map(|&i| f32::from_bits(i as u32)).collect();
    ks.declare_f32_data(name, &bits)
}

/// Defines the step of `model` (any ladder depth; every dimension from its config) for
/// positions `0..max_positions` in `ks`. With `prefix` (the ids of the folded prompt prefix),
/// the rows the step would write for them and the heads' pooling over them are computed now,
/// with the step's own arithmetic for this target ([`mirror`]), and become read-only data; the
/// step then takes positions from `prefix.len()` on, and gives an unfolded step's logits bit
/// for bit. `export` makes the step and the heads part of the object's interface (tests).
pub fn define_needle3_model(
    ks: &mut KernelSet,
    model: &Model,
    max_positions: usize,
    prefix: Option<&[u32]>,
    export: bool,
) -> Result<Needle3Code, CodegenError> {
    let c = &model.config;
    let (d, n_lanes, l_n) = (c.d_model, c.mhc_lanes, model.layers.len());
    let (h_n, k_n, dq, dv) = (c.num_heads, c.num_kv_heads, c.qk_head_dim(), c.v_head_dim());
    let (qw, kw, vw, gw) = (h_n * dq, k_n * dq, k_n * dv, h_n * dv);
    let cw = qw + kw + vw;
    let vocab = c.vocab_size;
    let v_out = c.logits_vocab();
    if max_positions == 0 || max_positions > c.max_seq_len.max(1) {
        return Err(invalid(format!(
            "{max_positions} positions: the model takes 1 to {}",
            c.max_seq_len
        )));
    }
    if l_n == 0 || n_lanes == 0 || dq % 2 != 0 || k_n == 0 || h_n % k_n != 0 {
        return Err(invalid(
            "a Needle 3 config without layers, lanes or whole heads",
        ));
    }
    let nn = c.hada_n();
    let (fa, fb) = c.hada_factors();
    let p = max_positions;
    let p0 = prefix.map_or(0, <[u32]>::len);
    if p0 >= p {
        return Err(invalid(format!(
            "a folded prefix of {p0} positions leaves none of the {p} for the query"
        )));
    }

    // ---- workspace -------------------------------------------------------------------------
    let mut ws = Layout::default();
    let ids_at = ws.floats(p);
    let layer_ws: Vec<LayerWs> = (0..l_n)
        .map(|_| LayerWs {
            pre: ws.floats(p * cw),
            k: ws.floats(p * kw),
            v: ws.floats(p * vw),
        })
        .collect();
    let site_w: Vec<usize> = model.sites.iter().map(|_| ws.floats(p * d)).collect();
    let mr = MAX_ROWS;
    let x_at = [ws.floats(mr * n_lanes * d), ws.floats(mr * n_lanes * d)];
    let z_at = ws.floats(mr * n_lanes * d);
    let mix_w = 2 * n_lanes + n_lanes * n_lanes;
    let mix_at = ws.floats(mr * mix_w);
    let r_at = ws.floats(n_lanes * n_lanes);
    let x0_at = ws.floats(mr * d);
    let u_at = ws.floats(mr * d);
    let b_at = ws.floats(mr * d);
    let a_at = ws.floats(mr * d);
    let y_at = ws.floats(mr * d);
    let t_at = ws.floats(mr * d);
    let qkvg_at = ws.floats(mr * (cw + gw));
    let conv_at = ws.floats(mr * cw);
    let o_at = ws.floats(mr * gw);
    let scores_at = ws.floats(p);
    let e_n = c.engram_tables();
    let sub = if e_n == 0 { 0 } else { c.engram_sub_dim() };
    let m_at = ws.floats(mr * e_n * sub);
    let ek_at = ws.floats(mr * d);
    let ev_at = ws.floats(mr * d);
    let inj_at = ws.floats(2 * d);
    let rank = model.layers[0].mlp.cond_v.ncols();
    let mlp_at = ws.floats(kernels::mlp_scratch(nn, rank));
    let h_at = ws.floats(d);
    let cell_at = ws.floats(d);
    let heads: Vec<(&'static str, &Head)> = [
        ("confidence", &model.heads.confidence),
        ("router", &model.heads.router),
        ("embedding", &model.heads.embedding),
    ]
    .into_iter()
    .filter_map(|(n, h)| h.as_ref().map(|h| (n, h)))
    .collect();
    let head_state: Vec<usize> = heads
        .iter()
        .map(|(_, h)| ws.floats((l_n + 1) * h.probes_per_row * pool_stride(d)))
        .collect();
    let head_scratch = heads
        .iter()
        .map(|(_, h)| {
            let rows = (l_n + 1) * h.probes_per_row;
            rows * d + rows + h.queries * d
        })
        .max()
        .unwrap_or(0);
    let head_scratch_at = ws.floats(head_scratch);
    let logits_at = ws.floats(v_out);
    let workspace_bytes = ws.bytes;

    // ---- shared data and kernels -----------------------------------------------------------
    // The embedding: its CQ codes where the checkpoint has them (looked up a row at a time,
    // and the tied logits a CQ product), else float32.
    let (embed, logits) = match &model.embedding_cq {
        Some(t) => {
            let data = cq::CqData::declare(ks, "n3_embedding", t)?;
            let embed = cq::embed(ks, "n3_embed", &data, (d as f32).sqrt())?;
            let mut tied = data;
            tied.shape.rows = v_out;
            (embed, cq::matmul(ks, "n3_logits", &tied, &t.code_levels)?)
        }
        None => {
            let emb_vals: Vec<f32> = model.embedding.iter().copied().collect();
            let emb_data = ks.declare_f32_data("n3_embedding", &emb_vals)?;
            let table = WeightRef {
                data: emb_data,
                scales: None,
                k: vocab,
                n: d,
                format: WeightFormat::F32,
            };
            let embed = v1::embed(ks, "n3_embed", &table, (d as f32).sqrt())?;
            let tied = WeightRef { k: v_out, ..table };
            (embed, v1::logits(ks, "n3_logits", &tied)?)
        }
    };
    let argmax = v1::argmax(ks, "n3_argmax", v_out)?;
    let final_scale = ks.declare_f32_data("n3_final_norm", &one_plus(&model.final_norm))?;
    let final_norm = v1::rmsnorm(ks, "n3_final_norm_k", d, Some(final_scale))?;
    let (cos, sin) = rope_tables(c, 0, p);
    let half = dq / 2;
    let mut rope_vals = Vec::with_capacity(p * dq);
    for r in 0..p {
        rope_vals.extend((0..half).map(|i| cos[[r, i]]));
        rope_vals.extend((0..half).map(|i| sin[[r, i]]));
    }
    let rope_tab = ks.declare_f32_data("n3_rope", &rope_vals)?;
    let rope_q = v1::rope(ks, "n3_rope_q", rope_tab, h_n, dq)?;
    let rope_k = v1::rope(ks, "n3_rope_k", rope_tab, k_n, dq)?;
    let spread = kernels::spread_lanes(ks, "n3_spread", n_lanes, d)?;
    let lane_mean = kernels::lane_mean(ks, "n3_lane_mean", n_lanes, d)?;
    let residual = v1::residual(ks, "n3_residual")?;
    let copy = kernels::copy(ks, "n3_copy")?;
    let gate = kernels::gate(ks, "n3_gate", gw)?;
    let sub_k = kernels::sub(ks, "n3_sub", d)?;
    let inject = kernels::engram_inject(ks, "n3_inject", d)?;
    let p1 = u32_data(ks, "n3_p1", &model.p1)?;
    let p2 = u32_data(ks, "n3_p2", &model.p2)?;

    // ---- engram sites ----------------------------------------------------------------------
    let shape = EngramShape {
        orders: c.engram_orders.clone(),
        heads: c.engram_heads(),
        stride: c.engram_seed_stride(),
        slots: c.engram_slots,
        sub,
    };
    let mut sites = Vec::new();
    for (s, site) in model.sites.iter().enumerate() {
        let tables = match &site.tables_cq {
            Some(t) => kernels::Tables::Cq(cq::CqData::declare(ks, &format!("n3_s{s}_tables"), t)?),
            None => {
                kernels::Tables::F32(ks.declare_f32_data(&format!("n3_s{s}_tables"), &site.tables)?)
            }
        };
        let gather = kernels::engram_gather(ks, &format!("n3_s{s}_gather"), &tables, &shape, p0)?;
        let key = product(
            ks,
            &format!("n3_s{s}_key"),
            (e_n * sub, d),
            || flat(&site.key_proj),
            site.key_cq.as_ref(),
        )?;
        let value = product(
            ks,
            &format!("n3_s{s}_value"),
            (e_n * sub, d),
            || flat(&site.value_proj),
            site.value_cq.as_ref(),
        )?;
        let tv: Vec<f32> = site.taps.iter().copied().collect();
        let tt = ks.declare_f32_data(&format!("n3_s{s}_taps"), &tv)?;
        let taps = kernels::taps(
            ks,
            &format!("n3_s{s}_taps_k"),
            tt,
            site.taps.nrows(),
            d,
            c.engram_dilation(),
            None,
            p0,
        )?;
        sites.push(SiteCode {
            gather,
            key,
            value,
            taps,
            w: site_w[s],
        });
    }

    // ---- layers ----------------------------------------------------------------------------
    let mut layers = Vec::new();
    for (l, w) in model.layers.iter().enumerate() {
        let name = |what: &str| format!("n3_l{l}_{what}");
        let window = (!c.is_global(l)).then_some(c.sliding_window);
        let z_norm = v1::rmsnorm(ks, &name("z"), n_lanes * d, None)?;
        let mhc = &w.mhc;
        let phi = || {
            let (pre, post, res) = (flat(&mhc.phi_pre), flat(&mhc.phi_post), flat(&mhc.phi_res));
            side_by_side(
                &[(&pre, n_lanes), (&post, n_lanes), (&res, n_lanes * n_lanes)],
                n_lanes * d,
            )
        };
        let mix = product(
            ks,
            &name("phi"),
            (n_lanes * d, mix_w),
            phi,
            mhc.phi_cq.as_ref(),
        )?;
        let consts = MhcConsts {
            lanes: n_lanes,
            d,
            lane: l % n_lanes,
            a_pre: mhc.a_pre,
            a_post: mhc.a_post,
            a_res: mhc.a_res,
            b_pre: mhc.b_pre.clone(),
            b_post: mhc.b_post.clone(),
            b_res: mhc.b_res.clone(),
        };
        let mhc_pre = kernels::mhc_pre(ks, &name("mhc_pre"), &consts)?;
        let mhc_post = kernels::mhc_post(ks, &name("mhc_post"), &consts)?;
        let s_in = ks.declare_f32_data(&name("norm_in"), &one_plus(&w.norm_in))?;
        let norm_in = v1::rmsnorm(ks, &name("norm_in_k"), d, Some(s_in))?;
        let cat = || {
            let (wq, wk, wv, wg) = (flat(&w.wq), flat(&w.wk), flat(&w.wv), flat(&w.wgate));
            side_by_side(&[(&wq, qw), (&wk, kw), (&wv, vw), (&wg, gw)], d)
        };
        let cat_cq = w.cq.as_ref().map(|c| {
            CqTensor::concat_rows(&[&c.q, &c.k, &c.v, &c.gate]).ok_or_else(|| {
                invalid(format!(
                    "layer {l}: q, k, v and gate CQ codes of unlike formats"
                ))
            })
        });
        let cat_cq = cat_cq.transpose()?;
        let qkvg = product(ks, &name("qkvg"), (d, cw + gw), cat, cat_cq.as_ref())?;
        let n_taps = w.q_taps.nrows();
        let tap_vals = if n_taps == 0 {
            vec![1.0; cw]
        } else {
            let (qt, kt, vt) = (flat(&w.q_taps), flat(&w.k_taps), flat(&w.v_taps));
            side_by_side(&[(&qt, qw), (&kt, kw), (&vt, vw)], n_taps)
        };
        let tap_tab = ks.declare_f32_data(&name("taps"), &tap_vals)?;
        let taps = kernels::taps(
            ks,
            &name("taps_k"),
            tap_tab,
            n_taps.max(1),
            cw,
            1,
            window,
            p0,
        )?;
        let sq = ks.declare_f32_data(&name("q_norm"), &one_plus(&w.q_norm))?;
        let q_norm = v1::rmsnorm(ks, &name("q_norm_k"), dq, Some(sq))?;
        let sk = ks.declare_f32_data(&name("k_norm"), &one_plus(&w.k_norm))?;
        let k_norm = v1::rmsnorm(ks, &name("k_norm_k"), dq, Some(sk))?;
        let attention = kernels::attention(
            ks,
            &name("attention"),
            &AttnShape {
                heads: h_n,
                kv_heads: k_n,
                dq,
                dv,
                window,
                p0,
            },
        )?;
        let wout = product(
            ks,
            &name("wout"),
            (gw, d),
            || flat(&w.wout),
            w.cq.as_ref().map(|c| &c.out),
        )?;
        let sp = ks.declare_f32_data(&name("post_norm"), &one_plus(&w.post_norm))?;
        let post_norm = v1::rmsnorm(ks, &name("post_norm_k"), d, Some(sp))?;
        let sh = ks.declare_f32_data(&name("pre_hada"), &one_plus(&w.pre_hada))?;
        let pre_hada = v1::rmsnorm(ks, &name("pre_hada_k"), d, Some(sh))?;
        let m = &w.mlp;
        let mut f = |what: &str, v: &[f32]| ks.declare_f32_data(&name(what), v);
        let data = MlpData {
            d,
            n: nn,
            a: fa,
            b: fb,
            rank,
            w1a: f("w1a", &flat(&m.w1a))?,
            w1b: f("w1b", &flat(&m.w1b))?,
            w2a: f("w2a", &flat(&m.w2a))?,
            w2b: f("w2b", &flat(&m.w2b))?,
            w3a: f("w3a", &flat(&m.w3a))?,
            w3b: f("w3b", &flat(&m.w3b))?,
            d1: f("d1", &m.d1)?,
            d2: f("d2", &m.d2)?,
            b2: f("b2", &m.b2)?,
            d3: f("d3", &m.d3)?,
            d4: f("d4", &m.d4)?,
            cond_v: f("cond_v", &flat(&m.cond_v))?,
            cond_u: f("cond_u", &flat(&m.cond_u))?,
            p1,
            p2,
        };
        let mlp = kernels::mlp(ks, &name("mlp"), &data)?;
        layers.push(LayerCode {
            z_norm,
            mix,
            mhc_pre,
            mhc_post,
            norm_in,
            qkvg,
            taps,
            q_norm,
            k_norm,
            attention,
            wout,
            post_norm,
            attn_gate: sigmoid(w.attn_gate),
            pre_hada,
            mlp,
            site: c.engram_layers.iter().position(|&s| s == l),
        });
    }

    let fma = ks.target().native_fma();
    let prefix_rows = prefix.map(|ids| mirror::run(model, ids, fma));
    let folded = match &prefix_rows {
        Some(rows) => Some(fold_prefix(ks, model, rows)?),
        None => None,
    };
    let mut folded_data = Vec::new();
    if let Some(f) = &folded {
        let all = std::iter::once(Some(f.ids))
            .chain(f.pre.iter().copied())
            .chain(f.k.iter().copied().map(Some))
            .chain(f.v.iter().copied().map(Some))
            .chain(f.w.iter().copied());
        folded_data.extend(all.flatten().map(|r| r.data));
    }

    // ---- heads -----------------------------------------------------------------------------
    struct HeadCode {
        probes: DataId,
        k: usize,
        state: usize,
        init: FuncId,
        add: FuncId,
        finish: FuncId,
        out: usize,
    }
    let mut head_code = Vec::new();
    for ((hname, h), &state) in heads.iter().zip(&head_state) {
        let name = |what: &str| format!("n3_{hname}_{what}");
        let rows = (l_n + 1) * h.probes_per_row;
        let folded_state = match &prefix_rows {
            Some(rows) => {
                let st = mirror::pool_states(h, rows, c.pad_token_id, d, fma);
                Some(ks.declare_f32_data(&name("folded_state"), &st)?)
            }
            None => None,
        };
        let probes = ks.declare_f32_data(&name("probes"), &h.probes)?;
        let init = kernels::pool_init(ks, &name("init"), rows, d, folded_state)?;
        let add = kernels::pool_add(ks, &name("add"), h.probes_per_row, d)?;
        let out_n = h.proj.ncols();
        let data = HeadData {
            d,
            rows,
            queries: h.queries,
            out: out_n,
            gain: ks.declare_f32_data(&name("gain"), &h.gain)?,
            query: ks.declare_f32_data(&name("query"), &flat(&h.query))?,
            row_bias: ks.declare_f32_data(&name("row_bias"), &h.row_bias)?,
            proj: match &h.proj_cq {
                Some(t) => kernels::Proj::Cq(product(
                    ks,
                    &name("proj"),
                    (h.queries * d, out_n),
                    Vec::new,
                    Some(t),
                )?),
                None => kernels::Proj::F32(ks.declare_f32_data(&name("proj"), &flat(&h.proj))?),
            },
            bias: match &h.bias {
                Some(b) => Some(ks.declare_f32_data(&name("bias"), b)?),
                None => None,
            },
            normalize: *hname == "embedding",
        };
        let finish = kernels::head(ks, &name("finish"), &data)?;
        head_code.push(HeadCode {
            probes,
            k: h.probes_per_row,
            state,
            init,
            add,
            finish,
            out: out_n,
        });
    }
    let heads_fn = ks.declare_function(
        "n3_heads",
        &["The heads over every position fed since the first: confidence logit, router logits, unit embedding (those the model has)."],
        &[(CType::U8Ptr, "ws"), (CType::F32Ptr, "out")],
        CType::Void,
        export,
    )?;
    let finishes: Vec<FuncId> = head_code.iter().map(|h| h.finish).collect();
    ks.define_function(heads_fn, &[], &finishes, |g, a, _, f| {
        let (ws_p, out) = (a[0], a[1]);
        let scratch = g.b.ins().iadd_imm_s(ws_p, head_scratch_at as i64);
        let mut at = 0i64;
        for h in &head_code {
            let st = g.b.ins().iadd_imm_s(ws_p, h.state as i64);
            let o = g.b.ins().iadd_imm_s(out, at * 4);
            let r = f.get(h.finish);
            g.call(r, &[st, o, scratch]);
            at += h.out as i64;
        }
        None
    })?;
    let head_outputs: Vec<(&'static str, usize)> = heads
        .iter()
        .zip(&head_code)
        .map(|((n, _), h)| (*n, h.out))
        .collect();

    // ---- the step --------------------------------------------------------------------------
    let rows_fn = ks.declare_function(
        "n3_rows",
        &["Runs positions pos..pos+rows of the Needle 3 model; returns the argmax of the last one's logits."],
        &[
            (CType::U8Ptr, "ws"),
            (CType::ConstI32Ptr, "tokens"),
            (CType::SizeT, "pos"),
            (CType::SizeT, "rows"),
        ],
        CType::I32,
        export,
    )?;
    let mut callees = vec![
        embed, logits, argmax, final_norm, rope_q, rope_k, spread, lane_mean, residual, copy, gate,
        sub_k, inject,
    ];
    for s in &sites {
        callees.extend([s.gather, s.key, s.value, s.taps]);
    }
    for h in &head_code {
        callees.extend([h.init, h.add]);
        folded_data.push(h.probes);
    }
    for l in &layers {
        callees.extend([
            l.z_norm,
            l.mix,
            l.mhc_pre,
            l.mhc_post,
            l.norm_in,
            l.qkvg,
            l.taps,
            l.q_norm,
            l.k_norm,
            l.attention,
            l.wout,
            l.post_norm,
            l.pre_hada,
            l.mlp,
        ]);
    }
    let max_rows = MAX_ROWS as i64;
    ks.define_function(rows_fn, &folded_data, &callees, |g, a, data, f| {
        let (ws_p, tokens, pos, rows) = (a[0], a[1], a[2], a[3]);
        // Refused whole, before anything is written: no rows, too many, positions outside
        // `p0..p` (the folded prefix's are data, not steps), a token outside the vocabulary.
        let none = g.b.ins().icmp_imm_u(IntCC::Equal, rows, 0);
        let many =
            g.b.ins()
                .icmp_imm_u(IntCC::UnsignedGreaterThan, rows, max_rows);
        let late =
            g.b.ins()
                .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, pos, p as i64);
        let early =
            g.b.ins()
                .icmp_imm_u(IntCC::UnsignedLessThan, pos, p0 as i64);
        let pv = g.iconst(p as i64);
        let left = g.b.ins().isub(pv, pos);
        let past = g.icmp(IntCC::UnsignedGreaterThan, rows, left);
        let bad = g.b.ins().bor(none, many);
        let bad = g.b.ins().bor(bad, late);
        let bad = g.b.ins().bor(bad, early);
        g.if_then(bad, |g| {
            let m1 = g.b.ins().iconst(types::I32, -1);
            g.ret(&[m1]);
        });
        g.if_then(past, |g| {
            let m1 = g.b.ins().iconst(types::I32, -1);
            g.ret(&[m1]);
        });
        g.for_n(rows, |g, r| {
            let tp = g.addr(tokens, r, 4);
            let tok =
                g.b.ins()
                    .load(types::I32, crate::codegen::gen::mem(), tp, 0);
            let bad =
                g.b.ins()
                    .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, tok, vocab as i64);
            g.if_then(bad, |g| {
                let m1 = g.b.ins().iconst(types::I32, -1);
                g.ret(&[m1]);
            });
        });
        let at = |g: &mut Gen<'_>, off: usize| {
            let o = g.iconst(off as i64);
            g.b.ins().iadd(ws_p, o)
        };
        // Row `r` of a region of `width` floats a row.
        let nth = |g: &mut Gen<'_>, base: Value, r: Value, width: usize| {
            g.addr(base, r, (width * 4) as i64)
        };
        let call = |g: &mut Gen<'_>, id: FuncId, args: &[Value]| {
            let r = f.get(id);
            g.call(r, args)
        };
        // The folded rows' base for row indices (their object minus the rows it does not
        // hold), or `fallback` (the workspace's rows; then nothing below `p0` is read).
        let folded_base = |g: &mut Gen<'_>, r: Option<FoldedRows>, fallback: Value| match r {
            Some(r) => {
                let addr = data.get(r.data);
                g.b.ins()
                    .iadd_imm_s(addr, -((r.first * r.width * 4) as i64))
            }
            None => fallback,
        };
        let one = g.iconst(1);
        let ids = at(g, ids_at);
        let ids_ro = folded_base(g, folded.as_ref().map(|f| f.ids), ids);
        g.for_n(rows, |g, r| {
            let tp = g.addr(tokens, r, 4);
            let tok =
                g.b.ins()
                    .load(types::I32, crate::codegen::gen::mem(), tp, 0);
            let t = g.b.ins().iadd(pos, r);
            let idp = g.addr(ids, t, 4);
            g.b.ins().store(crate::codegen::gen::mem(), tok, idp, 0);
        });
        let idp = g.addr(ids, pos, 4);
        let x0 = at(g, x0_at);
        call(g, embed, &[idp, x0, rows]);
        let x_first = at(g, x_at[0]);
        g.for_n(rows, |g, r| {
            let x0r = nth(g, x0, r, d);
            let xr = nth(g, x_first, r, n_lanes * d);
            call(g, spread, &[x0r, xr]);
        });
        // The heads: a new sequence at the first position; pad tokens are not pooled. Each
        // probe's state takes the positions in order, whichever layer comes first.
        let first = g.b.ins().icmp_imm_u(IntCC::Equal, pos, p0 as i64);
        g.if_then(first, |g| {
            for h in &head_code {
                let st = at(g, h.state);
                call(g, h.init, &[st]);
            }
        });
        let pool = |g: &mut Gen<'_>, cell: Value, r: Value, row: usize| {
            let t = g.b.ins().iadd(pos, r);
            let idp = g.addr(ids, t, 4);
            let tok =
                g.b.ins()
                    .load(types::I32, crate::codegen::gen::mem(), idp, 0);
            let keep =
                g.b.ins()
                    .icmp_imm_u(IntCC::NotEqual, tok, i64::from(c.pad_token_id));
            g.if_then(keep, |g| {
                for h in &head_code {
                    let probes = data.get(h.probes);
                    let probes = g.b.ins().iadd_imm_s(probes, (row * h.k * d * 4) as i64);
                    let st = at(g, h.state + row * h.k * pool_stride(d) * 4);
                    call(g, h.add, &[cell, probes, st]);
                }
            });
        };
        if !head_code.is_empty() {
            g.for_n(rows, |g, r| {
                let x0r = nth(g, x0, r, d);
                pool(g, x0r, r, 0);
            });
        }
        let cell = at(g, cell_at);
        let (z, mix_p, r_p) = (at(g, z_at), at(g, mix_at), at(g, r_at));
        let (u, b, a_p, y, t) = (
            at(g, u_at),
            at(g, b_at),
            at(g, a_at),
            at(g, y_at),
            at(g, t_at),
        );
        let (qkvg_p, conv, o, scores) = (
            at(g, qkvg_at),
            at(g, conv_at),
            at(g, o_at),
            at(g, scores_at),
        );
        let (m_p, ek, ev, inj, mlp_s) = (
            at(g, m_at),
            at(g, ek_at),
            at(g, ev_at),
            at(g, inj_at),
            at(g, mlp_at),
        );
        let cw_v = g.iconst(cw as i64);
        let vw_v = g.iconst(vw as i64);
        let h_rows = g.iconst(h_n as i64);
        let k_rows = g.iconst(k_n as i64);
        let rows_d = g.b.ins().imul_imm_s(rows, d as i64);
        for (l, lc) in layers.iter().enumerate() {
            let x = at(g, x_at[l % 2]);
            let xn = at(g, x_at[(l + 1) % 2]);
            let lw = &layer_ws[l];
            call(g, lc.z_norm, &[x, z, rows]);
            call(g, lc.mix, &[z, mix_p, rows]);
            g.for_n(rows, |g, r| {
                let (xr, mr, ur) = (
                    nth(g, x, r, n_lanes * d),
                    nth(g, mix_p, r, mix_w),
                    nth(g, u, r, d),
                );
                call(g, lc.mhc_pre, &[xr, mr, ur]);
            });
            call(g, copy, &[u, b, rows_d]);
            if let Some(si) = lc.site {
                let sc = &sites[si];
                g.for_n(rows, |g, r| {
                    let tr = g.b.ins().iadd(pos, r);
                    let mr = nth(g, m_p, r, e_n * sub);
                    call(g, sc.gather, &[ids, ids_ro, mr, tr]);
                });
                call(g, sc.key, &[m_p, ek, rows]);
                let w_base = at(g, sc.w);
                let w_row = g.addr(w_base, pos, (d * 4) as i64);
                call(g, sc.value, &[m_p, w_row, rows]);
                let w_ro = folded_base(g, folded.as_ref().and_then(|f| f.w[si]), w_base);
                g.for_n(rows, |g, r| {
                    let tr = g.b.ins().iadd(pos, r);
                    let (er, vr, br) = (nth(g, ek, r, d), nth(g, ev, r, d), nth(g, b, r, d));
                    call(g, sc.taps, &[w_base, w_ro, vr, tr]);
                    call(g, inject, &[br, er, vr, inj]);
                });
            }
            call(g, lc.norm_in, &[b, a_p, rows]);
            call(g, lc.qkvg, &[a_p, qkvg_p, rows]);
            let pre_base = at(g, lw.pre);
            let (k_base, v_base) = (at(g, lw.k), at(g, lw.v));
            g.for_n(rows, |g, r| {
                let tr = g.b.ins().iadd(pos, r);
                let src = nth(g, qkvg_p, r, cw + gw);
                let pre_row = nth(g, pre_base, tr, cw);
                call(g, copy, &[src, pre_row, cw_v]);
            });
            let pre_ro = folded_base(g, folded.as_ref().and_then(|f| f.pre[l]), pre_base);
            g.for_n(rows, |g, r| {
                let tr = g.b.ins().iadd(pos, r);
                let cr = nth(g, conv, r, cw);
                call(g, lc.taps, &[pre_base, pre_ro, cr, tr]);
                // q: conv[..qw]; k: conv[qw..qw+kw]; v: conv[qw+kw..cw].
                call(g, lc.q_norm, &[cr, cr, h_rows]);
                call(g, rope_q, &[cr, cr, one, tr]);
                let kc = g.b.ins().iadd_imm_s(cr, (qw * 4) as i64);
                let k_row = nth(g, k_base, tr, kw);
                call(g, lc.k_norm, &[kc, k_row, k_rows]);
                call(g, rope_k, &[k_row, k_row, one, tr]);
                let vc = g.b.ins().iadd_imm_s(cr, ((qw + kw) * 4) as i64);
                let v_row = nth(g, v_base, tr, vw);
                call(g, copy, &[vc, v_row, vw_v]);
            });
            let k_ro = folded_base(g, folded.as_ref().map(|f| f.k[l]), k_base);
            let v_ro = folded_base(g, folded.as_ref().map(|f| f.v[l]), v_base);
            g.for_n(rows, |g, r| {
                let tr = g.b.ins().iadd(pos, r);
                let (cr, or) = (nth(g, conv, r, cw), nth(g, o, r, gw));
                call(
                    g,
                    lc.attention,
                    &[cr, k_base, v_base, k_ro, v_ro, or, tr, scores],
                );
                let qr = nth(g, qkvg_p, r, cw + gw);
                let gate_p = g.b.ins().iadd_imm_s(qr, (cw * 4) as i64);
                call(g, gate, &[or, gate_p]);
            });
            call(g, lc.wout, &[o, t, rows]);
            call(g, lc.post_norm, &[t, t, rows]);
            let s = g.f32(lc.attn_gate);
            call(g, residual, &[b, t, b, rows_d, s]);
            call(g, lc.pre_hada, &[b, a_p, rows]);
            g.for_n(rows, |g, r| {
                let (ar, tr) = (nth(g, a_p, r, d), nth(g, t, r, d));
                call(g, lc.mlp, &[ar, tr, mlp_s]);
            });
            let s1 = g.f32(1.0);
            call(g, residual, &[b, t, b, rows_d, s1]);
            g.for_n(rows, |g, r| {
                let (br, ur, yr) = (nth(g, b, r, d), nth(g, u, r, d), nth(g, y, r, d));
                call(g, sub_k, &[br, ur, yr]);
                let (xr, mr, xnr) = (
                    nth(g, x, r, n_lanes * d),
                    nth(g, mix_p, r, mix_w),
                    nth(g, xn, r, n_lanes * d),
                );
                call(g, lc.mhc_post, &[xr, mr, yr, xnr, r_p]);
                if !head_code.is_empty() {
                    call(g, lane_mean, &[xnr, cell]);
                    pool(g, cell, r, l + 1);
                }
            });
        }
        // The head on the last row only.
        let x = at(g, x_at[l_n % 2]);
        let last = g.b.ins().iadd_imm_s(rows, -1);
        let x_last = nth(g, x, last, n_lanes * d);
        let h = at(g, h_at);
        call(g, lane_mean, &[x_last, h]);
        call(g, final_norm, &[h, h, one]);
        let lg = at(g, logits_at);
        call(g, logits, &[h, lg, one]);
        let zero = g.iconst(0);
        call(g, argmax, &[lg, zero, zero])
    })?;
    // The one-row step: the token through a stack slot.
    let step = ks.declare_function(
        "n3_step",
        &["Runs one position of the Needle 3 model; returns the argmax of its logits."],
        &[
            (CType::U8Ptr, "ws"),
            (CType::I32, "token"),
            (CType::SizeT, "pos"),
        ],
        CType::I32,
        export,
    )?;
    ks.define_function(step, &[], &[rows_fn], |g, a, _, f| {
        let slot =
            g.b.create_sized_stack_slot(cranelift_codegen::ir::StackSlotData::new(
                cranelift_codegen::ir::StackSlotKind::ExplicitSlot,
                4,
                2,
            ));
        let pt = g.ptr;
        let p_tok = g.b.ins().stack_addr(pt, slot, 0);
        g.b.ins().store(crate::codegen::gen::mem(), a[1], p_tok, 0);
        let one = g.iconst(1);
        let r = f.get(rows_fn);
        g.call(r, &[a[0], p_tok, a[2], one])
    })?;
    Ok(Needle3Code {
        step,
        rows: rows_fn,
        max_rows: MAX_ROWS,
        workspace_bytes,
        workspace_align: 16,
        logits_offset: logits_at,
        max_positions: p,
        first_position: p0,
        heads: heads_fn,
        head_outputs,
        vocab,
        logits_vocab: v_out,
    })
}
