//! The `.cact` container of `export.py` (docs/needle3.md section 8): header, codebooks, the
//! tensor directory, 64-byte aligned FP16/FP32/CQ/RAW blobs, CQ dequantization (1 to 4 bits and
//! the ternary code), and the positional tensors mapped back to checkpoint names as a model
//! [`Source`], with the config rebuilt from the header.

use std::collections::HashMap;

use super::config::Config;
use super::cq::CqTensor;
use super::model::{Model, Source};
use super::Error;

/// The header's tag.
pub const TAG: u32 = 0x05E1_2A84;
/// Header bytes: 48 u32 and one f32.
pub const HEADER_BYTES: usize = 196;
/// Directory record bytes.
pub const RECORD_BYTES: usize = 44;
pub use super::cq::TERNARY;

fn err(what: impl Into<String>) -> Error {
    Error::Cact(what.into())
}

/// The header fields (`export.py` `_HDR_FMT`).
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub num_tensors: usize,
    pub codebook_len: usize,
    pub kv_window: u32,
    pub kv_bits: u32,
    pub vocab: usize,
    pub out_vocab: usize,
    pub d_model: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub num_layers: usize,
    pub qk_head_dim: usize,
    pub v_head_dim: usize,
    pub max_seq_len: usize,
    pub hada_n: usize,
    pub mhc_lanes: usize,
    pub sliding_window: usize,
    pub global_mask: u64,
    pub qkv_conv_taps: usize,
    pub engram_slots: usize,
    pub engram_sub_dim: usize,
    pub num_engram_tables: usize,
    pub engram_conv_taps: usize,
    pub engram_conv_dilation: usize,
    pub engram_seed_heads: usize,
    pub engram_orders: Vec<usize>,
    pub engram_sites: Vec<usize>,
    pub rope_theta: f32,
}

/// A tensor's storage in the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    F16,
    F32,
    /// Codebook-quantized, group size and record bits (1-4, or 5 = ternary).
    Cq {
        group: usize,
        bits: u32,
    },
    Raw,
}

/// One directory record with its data: float values (dequantized) or raw bytes.
#[derive(Clone, Debug)]
pub struct Entry {
    pub format: Format,
    pub shape: Vec<usize>,
    pub offset: u64,
    pub nbytes: u64,
    pub values: Vec<f32>,
    pub raw: Vec<u8>,
    /// A CQ tensor's codes (`values` holds them dequantized).
    pub cq: Option<CqTensor>,
}

/// A parsed `.cact` file.
#[derive(Clone, Debug)]
pub struct Cact {
    pub header: Header,
    /// The stored 2-, 3- and 4-bit codebooks, concatenated.
    pub codebook: Vec<f32>,
    pub entries: Vec<Entry>,
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    u64::from(u32_at(data, at)) | (u64::from(u32_at(data, at + 4)) << 32)
}

/// Whether the bytes start like a `.cact` file.
pub fn is_cact(data: &[u8]) -> bool {
    data.len() >= 4 && u32_at(data, 0) == TAG
}

/// The codebook levels of record `bits` for groups of `group` (stored ones are for 128).
fn levels(codebook: &[f32], bits: u32, group: usize) -> Result<Vec<f32>, Error> {
    let rescale = (128.0f32 / group as f32).sqrt();
    let g = (group as f32).sqrt();
    Ok(match bits {
        1 => {
            let c = (2.0f32 / std::f32::consts::PI).sqrt() / g;
            vec![-c, c]
        }
        2..=4 => {
            let (lo, len) = match bits {
                2 => (0, 4),
                3 => (4, 8),
                _ => (12, 16),
            };
            let book = codebook.get(lo..lo + len).ok_or_else(|| {
                err(format!(
                    "a {bits}-bit tensor, but the header stores only {} codebook values (28 needed)",
                    codebook.len()
                ))
            })?;
            if group == 128 {
                book.to_vec()
            } else {
                book.iter().map(|v| v * rescale).collect()
            }
        }
        TERNARY => {
            let c = 1.224_006_4f32 / g;
            vec![-c, 0.0, c]
        }
        other => {
            return Err(err(format!(
                "unknown CQ code width {other} (1-4 or 5 = ternary)"
            )))
        }
    })
}

impl Cact {
    /// Parses and checks a whole `.cact` file, dequantizing every CQ tensor.
    pub fn parse(data: &[u8]) -> Result<Cact, Error> {
        if data.len() < HEADER_BYTES {
            return Err(err(format!(
                "{} bytes is shorter than the {HEADER_BYTES}-byte header: truncated",
                data.len()
            )));
        }
        let u = |i: usize| u32_at(data, 4 * i);
        if u(0) != TAG {
            return Err(err(format!(
                "tag {:#010x} is not {TAG:#010x}: not a .cact file",
                u(0)
            )));
        }
        let z = |i: usize| u(i) as usize;
        let (n_orders, n_sites) = (z(26), z(31));
        if n_orders > 4 || n_sites > 16 {
            return Err(err(format!(
                "the header lists {n_orders} engram orders (at most 4) and {n_sites} sites (at most 16)"
            )));
        }
        let header = Header {
            num_tensors: z(1),
            codebook_len: z(2),
            kv_window: u(3),
            kv_bits: u(4),
            vocab: z(5),
            out_vocab: z(6),
            d_model: z(7),
            num_heads: z(8),
            num_kv_heads: z(9),
            num_layers: z(10),
            qk_head_dim: z(11),
            v_head_dim: z(12),
            max_seq_len: z(13),
            hada_n: z(14),
            mhc_lanes: z(15),
            sliding_window: z(16),
            global_mask: u64::from(u(17)) | (u64::from(u(18)) << 32),
            qkv_conv_taps: z(19),
            engram_slots: z(20),
            engram_sub_dim: z(21),
            num_engram_tables: z(22),
            engram_conv_taps: z(23),
            engram_conv_dilation: z(24),
            engram_seed_heads: z(25),
            engram_orders: (0..n_orders).map(|i| z(27 + i)).collect(),
            engram_sites: (0..n_sites).map(|i| z(32 + i)).collect(),
            rope_theta: f32::from_le_bytes(data[192..196].try_into().expect("4 bytes")),
        };
        let dir = HEADER_BYTES + 4 * header.codebook_len;
        let dir_end = header
            .num_tensors
            .checked_mul(RECORD_BYTES)
            .and_then(|n| n.checked_add(dir))
            .filter(|&e| e <= data.len())
            .ok_or_else(|| {
                err(format!(
                    "the header promises {} codebook values and {} directory records, more than \
                     the file's {} bytes: truncated",
                    header.codebook_len,
                    header.num_tensors,
                    data.len()
                ))
            })?;
        let codebook: Vec<f32> = data[HEADER_BYTES..dir]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut entries = Vec::with_capacity(header.num_tensors);
        let mut spans: Vec<(u64, u64, usize)> = Vec::new();
        for i in 0..header.num_tensors {
            let at = dir + i * RECORD_BYTES;
            let (dtype, ndim) = (data[at], data[at + 1] as usize);
            if ndim > 4 {
                return Err(err(format!("tensor {i}: {ndim} dimensions (at most 4)")));
            }
            let shape: Vec<usize> = (0..ndim)
                .map(|d| u32_at(data, at + 4 + 4 * d) as usize)
                .collect();
            let offset = u64_at(data, at + 20);
            let nbytes = u64_at(data, at + 28);
            let group = u32_at(data, at + 36) as usize;
            let bits = u32_at(data, at + 40);
            let numel: usize = shape.iter().product();
            let format = match dtype {
                1 => Format::F16,
                2 => Format::F32,
                3 => Format::Cq { group, bits },
                4 => Format::Raw,
                other => {
                    return Err(err(format!(
                        "tensor {i}: unknown dtype {other} (1 FP16, 2 FP32, 3 CQ, 4 RAW)"
                    )))
                }
            };
            let expected = match format {
                Format::F16 => Some(2 * numel as u64),
                Format::F32 => Some(4 * numel as u64),
                Format::Raw => None,
                Format::Cq { group, bits } => {
                    if ndim != 2 {
                        return Err(err(format!(
                            "tensor {i}: a CQ tensor must be 2-D, not {ndim}-D"
                        )));
                    }
                    if !group.is_power_of_two() || group < 8 {
                        return Err(err(format!(
                            "tensor {i}: CQ group {group} is not a power of two of at least 8"
                        )));
                    }
                    if !(1..=TERNARY).contains(&bits) {
                        return Err(err(format!(
                            "tensor {i}: unknown CQ code width {bits} (1-4, or 5 = ternary)"
                        )));
                    }
                    let width = if bits == TERNARY { 2 } else { bits as usize };
                    let in_pad = shape[1].div_ceil(group) * group;
                    Some((shape[0] * in_pad * width / 8 + shape[0] * in_pad / group * 2) as u64)
                }
            };
            if expected.is_some_and(|e| e != nbytes) {
                return Err(err(format!(
                    "tensor {i}: {nbytes} bytes, but its shape {shape:?} and format {format:?} \
                     take {}",
                    expected.unwrap_or(0)
                )));
            }
            if !offset.is_multiple_of(64) {
                return Err(err(format!(
                    "tensor {i}: offset {offset} is not 64-byte aligned"
                )));
            }
            let end = offset
                .checked_add(nbytes)
                .filter(|&e| e <= data.len() as u64);
            let Some(end) = end else {
                return Err(err(format!(
                    "tensor {i}: bytes {offset}..{offset}+{nbytes} run past the file's end ({}): \
                     truncated or corrupt",
                    data.len()
                )));
            };
            if offset < dir_end as u64 {
                return Err(err(format!(
                    "tensor {i}: offset {offset} lies inside the header and directory (which end \
                     at {dir_end})"
                )));
            }
            spans.push((offset, end, i));
            let blob = &data[offset as usize..end as usize];
            let (values, raw, cq) = match format {
                Format::F16 => (
                    blob.chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                    Vec::new(),
                    None,
                ),
                Format::F32 => (
                    blob.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                    Vec::new(),
                    None,
                ),
                Format::Cq { group, bits } => {
                    let levels = levels(&codebook, bits, group)?;
                    let t = CqTensor::from_blob(blob, shape[0], shape[1], group, bits, &levels)
                        .map_err(|e| err(format!("tensor {i}: {e}")))?;
                    (t.dequantize(), Vec::new(), Some(t))
                }
                Format::Raw => (Vec::new(), blob.to_vec(), None),
            };
            entries.push(Entry {
                format,
                shape,
                offset,
                nbytes,
                values,
                raw,
                cq,
            });
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(err(format!(
                    "tensors {} and {} overlap (bytes {}..{} and {}..{})",
                    w[0].2, w[1].2, w[0].0, w[0].1, w[1].0, w[1].1
                )));
            }
        }
        Ok(Cact {
            header,
            codebook,
            entries,
        })
    }

    /// The model config the header describes (heads' geometry from their tensors).
    /// The model config the header describes.
    pub fn config(&self) -> Result<Config, Error> {
        let h = &self.header;
        let orders = h.engram_orders.len().max(1);
        let c = Config {
            vocab_size: h.vocab,
            out_vocab: h.out_vocab,
            d_model: h.d_model,
            num_heads: h.num_heads,
            num_kv_heads: h.num_kv_heads,
            num_layers: h.num_layers,
            qk_head_dim: h.qk_head_dim,
            v_head_dim: h.v_head_dim,
            max_seq_len: h.max_seq_len,
            rope_theta: f64::from(h.rope_theta),
            engram_orders: h.engram_orders.clone(),
            engram_heads: h.num_engram_tables / orders,
            engram_slots: h.engram_slots,
            engram_seed_heads: h.engram_seed_heads,
            engram_layers: h.engram_sites.clone(),
            global_layers: (0..h.num_layers.min(64))
                .filter(|&l| h.global_mask >> l & 1 == 1)
                .collect(),
            sliding_window: h.sliding_window,
            mhc_lanes: h.mhc_lanes,
            qkv_conv_taps: h.qkv_conv_taps,
            ..Config::default()
        };
        if !h.num_engram_tables.is_multiple_of(orders) {
            return Err(err(format!(
                "{} engram tables for {orders} orders",
                h.num_engram_tables
            )));
        }
        c.validate()?;
        if !c.engram_layers.is_empty()
            && (c.engram_sub_dim() != h.engram_sub_dim
                || h.engram_conv_taps != 4
                || h.engram_conv_dilation != c.engram_dilation())
        {
            return Err(err(format!(
                "engram geometry: sub dim {}, {} taps, dilation {} (expected {}, 4, {})",
                h.engram_sub_dim,
                h.engram_conv_taps,
                h.engram_conv_dilation,
                c.engram_sub_dim(),
                c.engram_dilation()
            )));
        }
        if h.hada_n != c.hada_n() {
            return Err(err(format!(
                "hada_n {} is not the {} of width {}",
                h.hada_n,
                c.hada_n(),
                c.d_model
            )));
        }
        Ok(c)
    }

    /// The positional tensors under their checkpoint names and shapes, the MLP permutations,
    /// and the config.
    fn named(&self) -> Result<(Config, Named), Error> {
        let mut config = self.config()?;
        let c = config.clone();
        let (d, l_n, n) = (c.d_model, c.num_layers, c.mhc_lanes);
        let mut it = self.entries.iter().enumerate();
        let mut next = |what: &str| {
            it.next().ok_or_else(|| {
                err(format!(
                    "the directory ends before `{what}` ({} tensors)",
                    self.entries.len()
                ))
            })
        };
        let mut named = Named::default();
        let floats = |i: usize, e: &Entry, what: &str| -> Result<Vec<f32>, Error> {
            if e.format == Format::Raw {
                return Err(err(format!("tensor {i} (`{what}`) is RAW, not numbers")));
            }
            Ok(e.values.clone())
        };
        let transpose = |v: &[f32], rows: usize, cols: usize| -> Vec<f32> {
            let mut t = vec![0f32; v.len()];
            for r in 0..rows {
                for cc in 0..cols {
                    t[cc * rows + r] = v[r * cols + cc];
                }
            }
            t
        };
        // A stored `(out, in)` matrix back to `(in, out)`.
        let kernel = |i: usize, e: &Entry, what: &str| -> Result<(Vec<usize>, Vec<f32>), Error> {
            let v = floats(i, e, what)?;
            if e.shape.len() != 2 {
                return Err(err(format!(
                    "tensor {i} (`{what}`) is not a matrix: {:?}",
                    e.shape
                )));
            }
            Ok((
                vec![e.shape[1], e.shape[0]],
                transpose(&v, e.shape[0], e.shape[1]),
            ))
        };

        let (i, e) = next("embedding")?;
        named.put(
            "embedding/embedding",
            e.shape.clone(),
            floats(i, e, "embedding")?,
        );
        named.keep_codes("embedding/embedding".into(), e);
        let mut per_layer: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut names: Vec<String> = vec![
            "ZCRMSNorm_0/scale".into(),
            "self_attn/q_proj/kernel".into(),
            "self_attn/k_proj/kernel".into(),
            "self_attn/v_proj/kernel".into(),
        ];
        if c.qkv_conv_taps > 0 {
            for t in ["q", "k", "v"] {
                names.push(format!("self_attn/{t}_taps"));
            }
        }
        for name in [
            "self_attn/q_norm/scale",
            "self_attn/k_norm/scale",
            "self_attn/gate_proj/kernel",
            "self_attn/out_proj/kernel",
            "post_attn_norm/scale",
            "attn_gate",
            "pre_hada_norm/scale",
        ] {
            names.push(name.into());
        }
        for m in [
            "d1", "d2", "b2", "d3", "d4", "w1a", "w1b", "w2a", "w2b", "w3a", "w3b", "cond_v",
            "cond_u",
        ] {
            names.push(format!("hadamard_mlp/{m}"));
        }
        for l in 0..l_n {
            for (k, name) in names.iter().enumerate() {
                let name = name.as_str();
                let (i, e) = next(name)?;
                let (shape, v) = if name.ends_with("kernel") {
                    named.keep_codes(format!("stack/layers/block/{name}@{l}"), e);
                    kernel(i, e, name)?
                } else if name == "attn_gate" {
                    (Vec::new(), floats(i, e, name)?)
                } else {
                    (e.shape.clone(), floats(i, e, name)?)
                };
                if l == 0 {
                    per_layer.push((format!("stack/layers/block/{name}"), shape, v));
                } else {
                    let slot = &mut per_layer[k];
                    if slot.1 != shape {
                        return Err(err(format!(
                            "tensor {i} (`{name}` of layer {l}) has shape {shape:?}, layer 0's {:?}",
                            slot.1
                        )));
                    }
                    slot.2.extend(v);
                }
            }
        }
        for (name, shape, v) in per_layer {
            let mut full = vec![l_n];
            full.extend(shape);
            named.put(&name, full, v);
        }
        for name in [
            "mhc_a_pre",
            "mhc_a_post",
            "mhc_a_res",
            "mhc_b_pre",
            "mhc_b_post",
            "mhc_b_res",
        ] {
            let (i, e) = next(name)?;
            named.put(
                &format!("stack/{name}"),
                e.shape.clone(),
                floats(i, e, name)?,
            );
        }
        for (name, m) in [
            ("mhc_phi_pre", n),
            ("mhc_phi_post", n),
            ("mhc_phi_res", n * n),
        ] {
            let (i, e) = next(name)?;
            let v = floats(i, e, name)?;
            if e.shape != [l_n * m, n * d] {
                return Err(err(format!(
                    "tensor {i} (`{name}`) has shape {:?}, expected [{}, {}]",
                    e.shape,
                    l_n * m,
                    n * d
                )));
            }
            let mut out = Vec::with_capacity(v.len());
            for l in 0..l_n {
                out.extend(transpose(&v[l * m * n * d..(l + 1) * m * n * d], m, n * d));
                if let Some(t) = &e.cq {
                    named
                        .cq
                        .insert(format!("stack/{name}@{l}"), t.rows(l * m, (l + 1) * m));
                }
            }
            named.put(&format!("stack/{name}"), vec![l_n, n * d, m], out);
        }
        let mut perm = |what: &str| -> Result<Vec<usize>, Error> {
            let (i, e) = next(what)?;
            let v = floats(i, e, what)?;
            let p: Vec<usize> = v.iter().map(|&x| x as usize).collect();
            let mut seen = vec![false; c.hada_n()];
            for &x in &p {
                if x >= seen.len() || std::mem::replace(&mut seen[x], true) {
                    return Err(err(format!(
                        "tensor {i} (`{what}`) is not a permutation of 0..{}",
                        c.hada_n()
                    )));
                }
            }
            if p.len() != c.hada_n() {
                return Err(err(format!(
                    "tensor {i} (`{what}`) has {} entries, not {}",
                    p.len(),
                    c.hada_n()
                )));
            }
            Ok(p)
        };
        named.p1 = perm("hada_p1")?;
        named.p2 = perm("hada_p2")?;
        let (e_n, s_n, slots) = (c.engram_tables(), c.engram_sub_dim(), c.engram_slots);
        for s in 0..c.engram_layers.len() {
            let p = |x: &str| format!("engrams_{s}/{x}");
            let (i, e) = next("engram tables")?;
            named.put(
                &p("embedding"),
                vec![e_n, slots, s_n],
                floats(i, e, "engram tables")?,
            );
            named.keep_codes(p("embedding"), e);
            if e.shape != [e_n * slots, s_n] {
                return Err(err(format!(
                    "tensor {i} (engram tables) has shape {:?}",
                    e.shape
                )));
            }
            for proj in ["key_proj", "value_proj"] {
                let (i, e) = next(proj)?;
                let (shape, v) = kernel(i, e, proj)?;
                let name = p(&format!("{proj}/kernel"));
                named.keep_codes(format!("{name}@0"), e);
                named.put(&name, shape, v);
            }
            let (i, e) = next("engram taps")?;
            named.put(&p("taps"), e.shape.clone(), floats(i, e, "engram taps")?);
        }
        let (i, e) = next("final_norm")?;
        named.put(
            "stack/final_norm/scale",
            e.shape.clone(),
            floats(i, e, "final_norm")?,
        );
        let rest: Vec<(usize, &Entry)> = it.collect();
        if rest.len() > 1 {
            let (i, manifest) = rest[0];
            let codes = floats(i, manifest, "heads.manifest")?;
            let mut k = 1;
            for code in codes {
                let (key, has_bias) = match code as u32 {
                    1 => ("embedding_head", false),
                    2 => ("confidence_head", true),
                    3 => ("router_head", true),
                    _ => return Err(err(format!("heads.manifest code {code} is not 1, 2 or 3"))),
                };
                let take = |k: usize| {
                    rest.get(k)
                        .copied()
                        .ok_or_else(|| err(format!("`{key}` is cut short")))
                };
                let (ip, probes) = take(k)?;
                let (ig, gain) = take(k + 1)?;
                let (iq, query) = take(k + 2)?;
                let (ib, row_bias) = take(k + 3)?;
                let (ij, proj) = take(k + 4)?;
                let (ia, bias) = take(k + 5)?;
                k += if code as u32 == 3 { 7 } else { 6 };
                let rows = l_n + 1;
                let kp = probes.shape.first().copied().unwrap_or(0) / rows.max(1);
                let q = query.shape.first().copied().unwrap_or(0);
                let out = proj.shape.first().copied().unwrap_or(0);
                match code as u32 {
                    1 => {
                        config.embedding_probes = kp;
                        config.embedding_queries = q;
                        config.embedding_dim = out;
                    }
                    2 => {
                        config.confidence_probes = kp;
                        config.confidence_queries = q;
                    }
                    _ => {
                        config.router_probes = kp;
                        config.router_queries = q;
                    }
                }
                let p = |x: &str| format!("{key}/{x}");
                named.put(
                    &p("probes"),
                    vec![rows, kp, d],
                    floats(ip, probes, "probes")?,
                );
                named.put(&p("gain"), gain.shape.clone(), floats(ig, gain, "gain")?);
                named.put(
                    &p("query"),
                    query.shape.clone(),
                    floats(iq, query, "query")?,
                );
                named.put(
                    &p("row_bias"),
                    row_bias.shape.clone(),
                    floats(ib, row_bias, "row_bias")?,
                );
                let (shape, v) = kernel(ij, proj, "proj")?;
                named.keep_codes(format!("{}@0", p("proj/kernel")), proj);
                named.put(&p("proj/kernel"), shape, v);
                if has_bias {
                    named.put(
                        &p("proj/bias"),
                        bias.shape.clone(),
                        floats(ia, bias, "bias")?,
                    );
                }
            }
        }
        if let Some((_, tok)) = rest.last() {
            if tok.format == Format::Raw && tok.raw.len() >= 24 {
                config.pad_token_id = u32_at(&tok.raw, 4);
            }
        }
        Ok((config, named))
    }
}

/// The checkpoint-named tensors a `.cact` holds.
#[derive(Default)]
struct Named {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    /// The codes of the CQ tensors a library keeps as codes, by checkpoint name (`NAME@l`:
    /// the `l`-th matrix of a stack, stored `(out, in)`).
    cq: HashMap<String, CqTensor>,
    p1: Vec<usize>,
    p2: Vec<usize>,
}

impl Named {
    fn put(&mut self, name: &str, shape: Vec<usize>, values: Vec<f32>) {
        self.tensors.insert(name.to_string(), (shape, values));
    }

    /// Keeps `e`'s codes under `name`, where it is a CQ tensor.
    fn keep_codes(&mut self, name: String, e: &Entry) {
        if let Some(t) = &e.cq {
            self.cq.insert(name, t.clone());
        }
    }
}

impl Source for Named {
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn cq(&mut self, name: &str) -> Option<CqTensor> {
        self.cq.remove(name)
    }

    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, Error> {
        let (found, values) = self.tensors.remove(name).ok_or_else(|| Error::Missing {
            name: name.to_string(),
        })?;
        let numel: usize = found.iter().product();
        if found != shape || values.len() != numel {
            return Err(Error::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found,
            });
        }
        Ok(values)
    }
}

impl Model {
    /// Loads a `.cact` export: the CQ tensors dequantized to float32, the FP16 ones widened,
    /// the config from the header, the MLP permutations from the file (checked against the
    /// ones the config implies).
    pub fn from_cact_bytes(data: &[u8]) -> Result<Model, Error> {
        let cact = Cact::parse(data)?;
        let (config, mut named) = cact.named()?;
        let (p1, p2) = (std::mem::take(&mut named.p1), std::mem::take(&mut named.p2));
        let model = Model::load(config, &mut named)?;
        if model.p1 != p1 || model.p2 != p2 {
            return Err(err(
                "the stored MLP permutations are not numpy's RandomState(11/13) ones the config \
                 implies",
            ));
        }
        Ok(model)
    }
}

/// The package's CQ quantize-dequantize (`quantize.cq_quantize`) of every `len`-value run of
/// `values` (rows along the last axis), in groups of `group` (zero-padded): rotate each group
/// by the normalized Walsh-Hadamard matrix, keep its L2 norm as float16, pick the nearest
/// `levels` entry of `rotated / max(norm, 1e-12)` (ties to the lower level), rotate back.
pub fn cq_quantize(values: &[f32], len: usize, group: usize, levels: &[f32]) -> Vec<f32> {
    CqTensor::encode(values, len, group, levels).dequantize()
}

/// A [`Source`] with the package's CQ deployment weights (`scripts/needle3/README.md`, "CQ"):
/// every `kernel` and `mhc_phi_*` quantized along its input axis, every `embedding` table and
/// the heads' `probes` and `query` along their last axis, everything else rounded to float16.
pub struct CqWeights<S> {
    pub inner: S,
    pub group: usize,
    pub levels: Vec<f32>,
    /// The codes of the tensors quantized along their last axis, by name, until
    /// [`Source::cq`] takes them.
    codes: HashMap<String, CqTensor>,
}

impl<S> CqWeights<S> {
    /// `inner`'s tensors CQ-quantized in groups of `group` to `levels` (ascending).
    pub fn new(inner: S, group: usize, levels: Vec<f32>) -> Self {
        CqWeights {
            inner,
            group,
            levels,
            codes: HashMap::new(),
        }
    }
}

impl<S: Source> Source for CqWeights<S> {
    fn has(&self, name: &str) -> bool {
        self.inner.has(name)
    }

    fn cq(&mut self, name: &str) -> Option<CqTensor> {
        self.codes.remove(name)
    }

    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, Error> {
        let v = self.inner.get(name, shape)?;
        let leaf = name.rsplit('/').next().unwrap_or(name);
        let head = name.split('/').next().is_some_and(|p| p.ends_with("_head"));
        let last = shape.last().copied().unwrap_or(1);
        Ok(if leaf == "kernel" || leaf.starts_with("mhc_phi") {
            // Along the input axis (second to last): quantize the transposed matrices.
            let rows = shape[shape.len() - 2];
            let mut out = Vec::with_capacity(v.len());
            for (i, m) in v.chunks_exact(rows * last).enumerate() {
                let mut t = vec![0f32; m.len()];
                for r in 0..rows {
                    for c in 0..last {
                        t[c * rows + r] = m[r * last + c];
                    }
                }
                let codes = CqTensor::encode(&t, rows, self.group, &self.levels);
                let q = codes.dequantize();
                if leaf == "kernel" || leaf.starts_with("mhc_phi") {
                    // Stored `(out, in)`, as a `.cact` file stores it; `@i` the i-th matrix
                    // of a stack (the layer).
                    self.codes.insert(format!("{name}@{i}"), codes);
                }
                let start = out.len();
                out.resize(start + m.len(), 0.0);
                for r in 0..rows {
                    for c in 0..last {
                        out[start + r * last + c] = q[c * rows + r];
                    }
                }
            }
            out
        } else if (leaf == "embedding" && shape.len() >= 2)
            || (head && matches!(leaf, "probes" | "query"))
        {
            let t = CqTensor::encode(&v, last, self.group, &self.levels);
            let values = t.dequantize();
            self.codes.insert(name.to_string(), t);
            values
        } else {
            v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
        })
    }
}
