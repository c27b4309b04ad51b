//! Needle 3 weights in float32 (docs/needle3.md sections 2-4, 6, 7): loaded from a safetensors
//! checkpoint (flat `/`-joined names, the config JSON in the `config` metadata) or from any
//! [`Source`], split per layer, and sliced to a ladder depth.

use std::collections::HashMap;

use ndarray::Array2;
use safetensors::tensor::{Dtype, SafeTensors};

use super::config::{looks_like_needle3, Config};
use super::cq::CqTensor;
use super::Error;

/// The `format_version` metadata value the reference writes and accepts.
pub const FORMAT_VERSION: &str = "2";

/// One layer's weights. Matrices are stored `(in, out)` as in the checkpoint.
#[derive(Clone, Debug)]
pub struct Layer {
    /// `ZCRMSNorm_0/scale` (before attention), `post_attn_norm/scale`, `pre_hada_norm/scale`.
    pub norm_in: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub pre_hada: Vec<f32>,
    pub attn_gate: f32,
    pub wq: Array2<f32>,
    pub wk: Array2<f32>,
    pub wv: Array2<f32>,
    pub wgate: Array2<f32>,
    pub wout: Array2<f32>,
    /// Conv taps `(c, columns)`; `c` = 0 rows when the config has no taps.
    pub q_taps: Array2<f32>,
    pub k_taps: Array2<f32>,
    pub v_taps: Array2<f32>,
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
    pub mlp: Mlp,
    pub mhc: Mhc,
    /// The attention projections' CQ codes where the checkpoint is CQ-quantized (the
    /// matrices above are then their dequantization).
    pub cq: Option<LayerCq>,
}

/// One layer's CQ-quantized projections, each stored `(out, in)`: a row of codes per output,
/// quantized along the input axis.
#[derive(Clone, Debug)]
pub struct LayerCq {
    pub q: CqTensor,
    pub k: CqTensor,
    pub v: CqTensor,
    pub gate: CqTensor,
    pub out: CqTensor,
}

/// The Hadamard MLP's parameters (section 2.4).
#[derive(Clone, Debug)]
pub struct Mlp {
    pub w1a: Array2<f32>,
    pub w1b: Array2<f32>,
    pub w2a: Array2<f32>,
    pub w2b: Array2<f32>,
    pub w3a: Array2<f32>,
    pub w3b: Array2<f32>,
    pub d1: Vec<f32>,
    pub d2: Vec<f32>,
    pub b2: Vec<f32>,
    pub d3: Vec<f32>,
    pub d4: Vec<f32>,
    /// `(D, 8)` and `(8, N)`.
    pub cond_v: Array2<f32>,
    pub cond_u: Array2<f32>,
}

/// One layer's hyper-connection routing (section 2.1).
#[derive(Clone, Debug)]
pub struct Mhc {
    /// `(n*D, n)`, `(n*D, n)`, `(n*D, n*n)`.
    pub phi_pre: Array2<f32>,
    pub phi_post: Array2<f32>,
    pub phi_res: Array2<f32>,
    pub b_pre: Vec<f32>,
    pub b_post: Vec<f32>,
    /// `(n, n)` row-major.
    pub b_res: Vec<f32>,
    pub a_pre: f32,
    pub a_post: f32,
    pub a_res: f32,
    /// The three `phi` matrices' CQ codes one after another, `(n + n + n*n, n*D)` (each
    /// output a row), where the checkpoint is CQ-quantized.
    pub phi_cq: Option<CqTensor>,
}

/// One engram site (section 3).
#[derive(Clone, Debug)]
pub struct Site {
    /// `(E, slots, S)` row-major.
    pub tables: Vec<f32>,
    /// The tables' CQ codes (`E * slots` rows of `S`) where the checkpoint is CQ-quantized:
    /// `tables` is then their dequantization, and a library embeds these instead.
    pub tables_cq: Option<CqTensor>,
    /// `(E*S, D)`.
    pub key_proj: Array2<f32>,
    pub value_proj: Array2<f32>,
    /// `(4, D)`.
    pub taps: Array2<f32>,
    /// The projections' CQ codes, `(out, in)`, where the checkpoint is CQ-quantized.
    pub key_cq: Option<CqTensor>,
    pub value_cq: Option<CqTensor>,
}

/// A probe-pooling head (section 4).
#[derive(Clone, Debug)]
pub struct Head {
    /// Probes per row `k` and queries `q`.
    pub probes_per_row: usize,
    pub queries: usize,
    /// `(L+1, k, D)` row-major.
    pub probes: Vec<f32>,
    /// `(L+1, k)`.
    pub gain: Vec<f32>,
    /// `(q, D)`.
    pub query: Array2<f32>,
    /// `(q, L+1, k)` row-major.
    pub row_bias: Vec<f32>,
    /// `(q*D, out)`.
    pub proj: Array2<f32>,
    /// `proj`'s CQ codes, `(out, q*D)`, where the checkpoint is CQ-quantized.
    pub proj_cq: Option<CqTensor>,
    pub bias: Option<Vec<f32>>,
}

/// The three heads; a checkpoint may lack any of them.
#[derive(Clone, Debug, Default)]
pub struct Heads {
    pub embedding: Option<Head>,
    pub confidence: Option<Head>,
    pub router: Option<Head>,
}

/// A Needle 3 model in float32.
#[derive(Clone, Debug)]
pub struct Model {
    pub config: Config,
    /// `(V, D)`, also the tied output matrix.
    pub embedding: Array2<f32>,
    /// The embedding's CQ codes where the checkpoint is CQ-quantized (`embedding` is then
    /// their dequantization).
    pub embedding_cq: Option<CqTensor>,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    /// One per entry of `config.engram_layers`, in that order.
    pub sites: Vec<Site>,
    pub heads: Heads,
    /// The MLP permutations `p1`, `p2` of `0..N` (section 2.4).
    pub p1: Vec<usize>,
    pub p2: Vec<usize>,
}

/// Where a model's tensors come from: a checkpoint file or a generator.
pub trait Source {
    /// Whether the tensor exists (for the optional heads).
    fn has(&self, name: &str) -> bool;
    /// The tensor's values in row-major order, checked to have `shape`.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, Error>;
    /// The CQ codes of a tensor [`Source::get`] just returned, where the source has them (a
    /// `.cact` file, or CQ quantization applied on loading): the values were their
    /// dequantization.
    fn cq(&mut self, _name: &str) -> Option<CqTensor> {
        None
    }
}

/// A parsed safetensors checkpoint as a [`Source`].
pub struct SafetensorsSource<'a> {
    st: SafeTensors<'a>,
    metadata: HashMap<String, String>,
}

impl<'a> SafetensorsSource<'a> {
    /// Parses the file's header (not yet its tensors).
    pub fn new(data: &'a [u8]) -> Result<Self, Error> {
        let st = SafeTensors::deserialize(data)
            .map_err(|e| Error::Safetensors(format!("{e}; the file is corrupt or truncated")))?;
        let (_, meta) =
            SafeTensors::read_metadata(data).map_err(|e| Error::Safetensors(e.to_string()))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(SafetensorsSource { st, metadata })
    }

    /// The header metadata (`format_version`, `config`, `step`, `run`).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The config of a Needle 3 checkpoint, after checking its `format_version`.
    pub fn config(&self) -> Result<Config, Error> {
        match self.metadata.get("format_version").map(String::as_str) {
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(Error::Safetensors(format!(
                    "metadata `format_version` is {other:?}; the reference reads only \
                     {FORMAT_VERSION:?}: re-save it with cactus-needle 3.2"
                )))
            }
            None => {
                return Err(Error::Safetensors(
                    "no `format_version` in the header metadata: not a Needle 3 checkpoint \
                     (the reference writes \"2\")"
                        .into(),
                ))
            }
        }
        let text = self.metadata.get("config").ok_or_else(|| {
            Error::Safetensors(
                "no `config` in the header metadata; a Needle 3 checkpoint carries its config \
                 as JSON there"
                    .into(),
            )
        })?;
        Config::from_json(text)
    }
}

impl Source for SafetensorsSource<'_> {
    fn has(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }

    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, Error> {
        let view = self.st.tensor(name).map_err(|_| Error::Missing {
            name: name.to_string(),
        })?;
        if view.shape() != shape {
            return Err(Error::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let data = view.data();
        Ok(match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::Dtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }
}

/// Whether safetensors bytes hold a Needle 3 checkpoint (told by content: a `config` metadata
/// entry with Needle 3 keys, where a v1 file has `needle_config`).
pub fn is_needle3_safetensors(data: &[u8]) -> bool {
    let Ok((_, meta)) = SafeTensors::read_metadata(data) else {
        return false;
    };
    let Some(m) = meta.metadata() else {
        return false;
    };
    m.get("config")
        .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
        .is_some_and(|c| looks_like_needle3(&c))
}

const BLOCK: &str = "stack/layers/block/";

fn matrix(v: Vec<f32>, rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_vec((rows, cols), v).expect("the source checked the shape")
}

/// Splits a layer-stacked tensor into its `layers` per-layer pieces.
fn split(v: Vec<f32>, layers: usize) -> Vec<Vec<f32>> {
    let per = v.len() / layers.max(1);
    v.chunks_exact(per.max(1)).map(<[f32]>::to_vec).collect()
}

impl Model {
    /// Loads a Needle 3 safetensors checkpoint (told apart from v1 by [`is_needle3_safetensors`]).
    pub fn from_safetensors_bytes(data: &[u8]) -> Result<Model, Error> {
        let mut src = SafetensorsSource::new(data)?;
        let config = src.config()?;
        Model::load(config, &mut src)
    }

    /// Builds the model of `config` from `src`, checking every tensor's shape.
    pub fn load(config: Config, src: &mut dyn Source) -> Result<Model, Error> {
        let c = &config;
        let (d, l_n, n) = (c.d_model, c.num_layers, c.mhc_lanes);
        let (h, k, dq, dv) = (c.num_heads, c.num_kv_heads, c.qk_head_dim(), c.v_head_dim());
        let taps = c.qkv_conv_taps;
        let nn = c.hada_n();
        let (fa, fb) = c.hada_factors();
        let embedding = matrix(
            src.get("embedding/embedding", &[c.vocab_size, d])?,
            c.vocab_size,
            d,
        );
        let embedding_cq = src.cq("embedding/embedding");

        let mut stacked = |name: &str, shape: &[usize]| -> Result<Vec<Vec<f32>>, Error> {
            let mut full = vec![l_n];
            full.extend_from_slice(shape);
            Ok(split(src.get(name, &full)?, l_n))
        };
        let b = |s: &str| format!("{BLOCK}{s}");
        let mut norm_in = stacked(&b("ZCRMSNorm_0/scale"), &[d])?.into_iter();
        let mut post_norm = stacked(&b("post_attn_norm/scale"), &[d])?.into_iter();
        let mut pre_hada = stacked(&b("pre_hada_norm/scale"), &[d])?.into_iter();
        let attn_gate = stacked(&b("attn_gate"), &[])?;
        let mut wq = stacked(&b("self_attn/q_proj/kernel"), &[d, h * dq])?.into_iter();
        let mut wk = stacked(&b("self_attn/k_proj/kernel"), &[d, k * dq])?.into_iter();
        let mut wv = stacked(&b("self_attn/v_proj/kernel"), &[d, k * dv])?.into_iter();
        let mut wgate = stacked(&b("self_attn/gate_proj/kernel"), &[d, h * dv])?.into_iter();
        let mut wout = stacked(&b("self_attn/out_proj/kernel"), &[h * dv, d])?.into_iter();
        let mut tap_set = |name: &str, cols: usize| -> Result<Vec<Vec<f32>>, Error> {
            if taps == 0 {
                Ok(vec![Vec::new(); l_n])
            } else {
                stacked(name, &[taps, cols])
            }
        };
        let mut q_taps = tap_set(&b("self_attn/q_taps"), h * dq)?.into_iter();
        let mut k_taps = tap_set(&b("self_attn/k_taps"), k * dq)?.into_iter();
        let mut v_taps = tap_set(&b("self_attn/v_taps"), k * dv)?.into_iter();
        let mut q_norm = stacked(&b("self_attn/q_norm/scale"), &[dq])?.into_iter();
        let mut k_norm = stacked(&b("self_attn/k_norm/scale"), &[dq])?.into_iter();
        let hm = |s: &str| format!("{BLOCK}hadamard_mlp/{s}");
        let mut fac = |s: &str, size: usize| -> Result<std::vec::IntoIter<Vec<f32>>, Error> {
            Ok(stacked(&hm(s), &[size, size])?.into_iter())
        };
        let (mut w1a, mut w2a, mut w3a) = (fac("w1a", fa)?, fac("w2a", fa)?, fac("w3a", fa)?);
        let (mut w1b, mut w2b, mut w3b) = (fac("w1b", fb)?, fac("w2b", fb)?, fac("w3b", fb)?);
        let mut diag = |s: &str| -> Result<std::vec::IntoIter<Vec<f32>>, Error> {
            Ok(stacked(&hm(s), &[nn])?.into_iter())
        };
        let (mut d1, mut d2, mut b2, mut d3, mut d4) = (
            diag("d1")?,
            diag("d2")?,
            diag("b2")?,
            diag("d3")?,
            diag("d4")?,
        );
        let mut cond_v = stacked(&hm("cond_v"), &[d, 8])?.into_iter();
        let mut cond_u = stacked(&hm("cond_u"), &[8, nn])?.into_iter();
        let mut phi_pre = stacked("stack/mhc_phi_pre", &[n * d, n])?.into_iter();
        let mut phi_post = stacked("stack/mhc_phi_post", &[n * d, n])?.into_iter();
        let mut phi_res = stacked("stack/mhc_phi_res", &[n * d, n * n])?.into_iter();
        let mut b_pre = stacked("stack/mhc_b_pre", &[n])?.into_iter();
        let mut b_post = stacked("stack/mhc_b_post", &[n])?.into_iter();
        let mut b_res = stacked("stack/mhc_b_res", &[n, n])?.into_iter();
        let a_pre = stacked("stack/mhc_a_pre", &[])?;
        let a_post = stacked("stack/mhc_a_post", &[])?;
        let a_res = stacked("stack/mhc_a_res", &[])?;

        let mut layers = Vec::with_capacity(l_n);
        for l in 0..l_n {
            let next = |it: &mut std::vec::IntoIter<Vec<f32>>| it.next().unwrap_or_default();
            let mat = |it: &mut std::vec::IntoIter<Vec<f32>>, r: usize, cc: usize| {
                matrix(it.next().unwrap_or_default(), r, cc)
            };
            layers.push(Layer {
                norm_in: next(&mut norm_in),
                post_norm: next(&mut post_norm),
                pre_hada: next(&mut pre_hada),
                attn_gate: attn_gate[l][0],
                wq: mat(&mut wq, d, h * dq),
                wk: mat(&mut wk, d, k * dq),
                wv: mat(&mut wv, d, k * dv),
                wgate: mat(&mut wgate, d, h * dv),
                wout: mat(&mut wout, h * dv, d),
                q_taps: mat(&mut q_taps, taps, h * dq),
                k_taps: mat(&mut k_taps, taps, k * dq),
                v_taps: mat(&mut v_taps, taps, k * dv),
                q_norm: next(&mut q_norm),
                k_norm: next(&mut k_norm),
                mlp: Mlp {
                    w1a: mat(&mut w1a, fa, fa),
                    w1b: mat(&mut w1b, fb, fb),
                    w2a: mat(&mut w2a, fa, fa),
                    w2b: mat(&mut w2b, fb, fb),
                    w3a: mat(&mut w3a, fa, fa),
                    w3b: mat(&mut w3b, fb, fb),
                    d1: next(&mut d1),
                    d2: next(&mut d2),
                    b2: next(&mut b2),
                    d3: next(&mut d3),
                    d4: next(&mut d4),
                    cond_v: mat(&mut cond_v, d, 8),
                    cond_u: mat(&mut cond_u, 8, nn),
                },
                mhc: Mhc {
                    phi_pre: mat(&mut phi_pre, n * d, n),
                    phi_post: mat(&mut phi_post, n * d, n),
                    phi_res: mat(&mut phi_res, n * d, n * n),
                    b_pre: next(&mut b_pre),
                    b_post: next(&mut b_post),
                    b_res: next(&mut b_res),
                    a_pre: a_pre[l][0],
                    a_post: a_post[l][0],
                    a_res: a_res[l][0],
                    phi_cq: None,
                },
                cq: None,
            });
        }
        // The projections' codes, where the source has them (all or none).
        for (l, layer) in layers.iter_mut().enumerate() {
            let mut take = |s: &str| src.cq(&format!("{BLOCK}self_attn/{s}_proj/kernel@{l}"));
            if let (Some(q), Some(k), Some(v), Some(gate), Some(out)) =
                (take("q"), take("k"), take("v"), take("gate"), take("out"))
            {
                layer.cq = Some(LayerCq { q, k, v, gate, out });
            }
            let mut phi = |s: &str| src.cq(&format!("stack/mhc_phi_{s}@{l}"));
            if let (Some(pre), Some(post), Some(res)) = (phi("pre"), phi("post"), phi("res")) {
                layer.mhc.phi_cq = CqTensor::concat_rows(&[&pre, &post, &res]);
            }
        }
        let final_norm = src.get("stack/final_norm/scale", &[d])?;

        let mut sites = Vec::new();
        if !c.engram_layers.is_empty() {
            let (e, s, slots) = (c.engram_tables(), c.engram_sub_dim(), c.engram_slots);
            for i in 0..c.engram_layers.len() {
                let p = |x: &str| format!("engrams_{i}/{x}");
                sites.push(Site {
                    tables: src.get(&p("embedding"), &[e, slots, s])?,
                    tables_cq: src.cq(&p("embedding")),
                    key_proj: matrix(src.get(&p("key_proj/kernel"), &[e * s, d])?, e * s, d),
                    value_proj: matrix(src.get(&p("value_proj/kernel"), &[e * s, d])?, e * s, d),
                    taps: matrix(src.get(&p("taps"), &[4, d])?, 4, d),
                    key_cq: src.cq(&format!("{}@0", p("key_proj/kernel"))),
                    value_cq: src.cq(&format!("{}@0", p("value_proj/kernel"))),
                });
            }
        }

        let mut head = |key: &str, k: usize, q: usize, out: usize, bias: bool| {
            let p = |x: &str| format!("{key}/{x}");
            if !src.has(&p("probes")) {
                return Ok::<_, Error>(None);
            }
            let rows = l_n + 1;
            Ok(Some(Head {
                probes_per_row: k,
                queries: q,
                probes: src.get(&p("probes"), &[rows, k, d])?,
                gain: src.get(&p("gain"), &[rows, k])?,
                query: matrix(src.get(&p("query"), &[q, d])?, q, d),
                row_bias: src.get(&p("row_bias"), &[q, rows, k])?,
                proj: matrix(src.get(&p("proj/kernel"), &[q * d, out])?, q * d, out),
                proj_cq: src.cq(&format!("{}@0", p("proj/kernel"))),
                bias: if bias {
                    Some(src.get(&p("proj/bias"), &[out])?)
                } else {
                    None
                },
            }))
        };
        let heads = Heads {
            embedding: head(
                "embedding_head",
                c.embedding_probes,
                c.embedding_queries,
                c.embedding_dim,
                false,
            )?,
            confidence: head(
                "confidence_head",
                c.confidence_probes,
                c.confidence_queries,
                1,
                true,
            )?,
            router: head("router_head", c.router_probes, c.router_queries, 3, true)?,
        };
        let (p1, p2) = permutations(&config);
        Ok(Model {
            config,
            embedding,
            embedding_cq,
            layers,
            final_norm,
            sites,
            heads,
            p1,
            p2,
        })
    }

    /// The model at ladder depth `depth` (section 7): the selected layers in order, the global
    /// and engram layers renumbered, the sites of dropped layers dropped, the heads' rows of kept
    /// layers. Depth `num_layers` is the model itself.
    pub fn into_ladder(self, depth: usize) -> Result<Model, Error> {
        let keep = self.config.ladder_layers(depth)?;
        if depth == self.config.num_layers {
            return Ok(self);
        }
        let remap = |l: usize| keep.iter().position(|&k| k == l);
        let mut config = self.config.clone();
        config.num_layers = depth;
        config.global_layers = self
            .config
            .global_layers
            .iter()
            .filter_map(|&l| remap(l))
            .collect();
        config.engram_layers = self
            .config
            .engram_layers
            .iter()
            .filter_map(|&l| remap(l))
            .collect();
        config.ladder_order = Vec::new();
        let sites = self
            .config
            .engram_layers
            .iter()
            .zip(self.sites)
            .filter(|(l, _)| remap(**l).is_some())
            .map(|(_, s)| s)
            .collect();
        let mut layers: Vec<Option<Layer>> = self.layers.into_iter().map(Some).collect();
        let layers = keep
            .iter()
            .map(|&l| layers[l].take().expect("distinct layers"))
            .collect();
        let rows: Vec<usize> = std::iter::once(0)
            .chain(keep.iter().map(|l| l + 1))
            .collect();
        let old_rows = self.config.num_layers + 1;
        let d = self.config.d_model;
        let slice_head = |h: Option<Head>| {
            h.map(|h| {
                let k = h.probes_per_row;
                let pick = |v: &[f32], width: usize| -> Vec<f32> {
                    rows.iter()
                        .flat_map(|&r| v[r * width..(r + 1) * width].iter().copied())
                        .collect()
                };
                let row_bias = (0..h.queries)
                    .flat_map(|j| pick(&h.row_bias[j * old_rows * k..(j + 1) * old_rows * k], k))
                    .collect();
                Head {
                    probes: pick(&h.probes, k * d),
                    gain: pick(&h.gain, k),
                    row_bias,
                    ..h
                }
            })
        };
        let heads = Heads {
            embedding: slice_head(self.heads.embedding),
            confidence: slice_head(self.heads.confidence),
            router: slice_head(self.heads.router),
        };
        Ok(Model {
            config,
            embedding: self.embedding,
            embedding_cq: self.embedding_cq,
            layers,
            final_norm: self.final_norm,
            sites,
            heads,
            p1: self.p1,
            p2: self.p2,
        })
    }
}

/// The MLP permutations of a config: `RandomState(11)` and `RandomState(13)` permutations of
/// `0..N`, or with `ladder_widths` the split form (section 2.4).
pub fn permutations(config: &Config) -> (Vec<usize>, Vec<usize>) {
    let n = config.hada_n();
    let perm = |seed: u32| {
        if config.ladder_widths.is_empty() {
            mt_permutation(seed, n)
        } else {
            let half = n / 2;
            let mut p = mt_permutation(seed, half);
            p.extend(
                mt_permutation(seed + 977, n - half)
                    .into_iter()
                    .map(|i| i + half),
            );
            p
        }
    };
    (perm(11), perm(13))
}

/// numpy's legacy `RandomState(seed).permutation(n)`: MT19937 seeded by `init_genrand`, then
/// a Fisher-Yates shuffle drawing masked 32-bit outputs until one is in range.
pub fn mt_permutation(seed: u32, n: usize) -> Vec<usize> {
    let mut mt = [0u32; 624];
    mt[0] = seed;
    for i in 1..624 {
        mt[i] = 1812433253u32
            .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
            .wrapping_add(i as u32);
    }
    let mut idx = 624;
    let mut next = || {
        if idx >= 624 {
            for k in 0..624 {
                let y = (mt[k] & 0x8000_0000) | (mt[(k + 1) % 624] & 0x7fff_ffff);
                mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ if y & 1 == 1 { 0x9908_b0df } else { 0 };
            }
            idx = 0;
        }
        let mut y = mt[idx];
        idx += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    };
    let mut arr: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let mut mask = i as u64;
        for sh in [1, 2, 4, 8, 16, 32] {
            mask |= mask >> sh;
        }
        let j = loop {
            let r = u64::from(next()) & mask;
            if r <= i as u64 {
                break r as usize;
            }
        };
        arr.swap(i, j);
    }
    arr
}
