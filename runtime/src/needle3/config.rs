//! The Needle 3 model config (`TransformerConfig` of cactus-needle 3.2.8, docs/needle3.md
//! section 1): the fields inference needs, the "off" values a saved config gets for keys it
//! lacks, the derived geometry, and the ladder order (section 7).

use serde::Deserialize;

use super::Error;

/// A Needle 3 config, as saved in a checkpoint's `config` metadata. Zero-valued "auto" fields
/// (`qk_head_dim`, `v_head_dim`, `engram_heads`, `engram_seed_heads`) are kept as stored; the
/// accessors resolve them.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct Config {
    pub vocab_size: usize,
    pub out_vocab: usize,
    pub d_model: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub num_layers: usize,
    pub qk_head_dim: usize,
    pub v_head_dim: usize,
    pub max_seq_len: usize,
    pub rope_theta: f64,
    pub engram_orders: Vec<usize>,
    pub engram_heads: usize,
    pub engram_slots: usize,
    pub engram_seed_heads: usize,
    pub engram_layers: Vec<usize>,
    pub global_layers: Vec<usize>,
    pub sliding_window: usize,
    pub mhc_lanes: usize,
    pub qkv_conv_taps: usize,
    pub embedding_dim: usize,
    pub embedding_probes: usize,
    pub embedding_queries: usize,
    pub confidence_probes: usize,
    pub confidence_queries: usize,
    pub router_probes: usize,
    pub router_queries: usize,
    pub ladder_order: Vec<usize>,
    pub ladder_widths: Vec<usize>,
    pub pad_token_id: u32,
}

/// What `TransformerConfig.from_saved` gives a key a saved config lacks: the class defaults,
/// except the newer features, which are off.
impl Default for Config {
    fn default() -> Self {
        Config {
            vocab_size: 16384,
            out_vocab: 0,
            d_model: 768,
            num_heads: 12,
            num_kv_heads: 2,
            num_layers: 20,
            qk_head_dim: 0,
            v_head_dim: 0,
            max_seq_len: 4096,
            rope_theta: 100000.0,
            engram_orders: vec![2, 3],
            engram_heads: 0,
            engram_slots: 18432,
            engram_seed_heads: 0,
            engram_layers: vec![3, 7, 11, 15, 19],
            global_layers: Vec::new(),
            sliding_window: 0,
            mhc_lanes: 4,
            qkv_conv_taps: 0,
            embedding_dim: 128,
            embedding_probes: 4,
            embedding_queries: 4,
            confidence_probes: 4,
            confidence_queries: 4,
            router_probes: 4,
            router_queries: 4,
            ladder_order: Vec::new(),
            ladder_widths: Vec::new(),
            pad_token_id: 0,
        }
    }
}

/// Whether a config JSON object is a Needle 3 one: it has the Needle 3 keys (`qk_head_dim` or
/// `mhc_lanes`) and not Needle 2's `attn_dim` alone.
pub fn looks_like_needle3(json: &serde_json::Value) -> bool {
    let Some(obj) = json.as_object() else {
        return false;
    };
    obj.contains_key("qk_head_dim") || obj.contains_key("mhc_lanes")
}

impl Config {
    /// Parses and checks a saved config (the checkpoint's `config` metadata).
    pub fn from_json(text: &str) -> Result<Config, Error> {
        let json: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("the config is not valid JSON: {e}")))?;
        let obj = json
            .as_object()
            .ok_or_else(|| Error::Config("the config is not a JSON object".into()))?;
        if obj.contains_key("attn_dim") && !obj.contains_key("qk_head_dim") {
            return Err(Error::Config(
                "the config has `attn_dim` but no `qk_head_dim`: a Needle 2 checkpoint, which \
                 needlec does not support; use a Needle 3 or Needle v1 checkpoint"
                    .into(),
            ));
        }
        let config: Config = serde_json::from_value(json)
            .map_err(|e| Error::Config(format!("a config field has the wrong type: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the geometry is consistent (every loader runs this).
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let bad = |what: String| Err(Error::Config(what));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("num_layers", self.num_layers),
            ("mhc_lanes", self.mhc_lanes),
        ] {
            if v == 0 {
                return bad(format!("`{name}` is 0; it must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.qk_head_dim() == 0
            || !self.qk_head_dim().is_multiple_of(2)
            || self.v_head_dim() == 0
        {
            return bad(format!(
                "head dims q/k {} and v {} must be positive, q/k even (RoPE halves it)",
                self.qk_head_dim(),
                self.v_head_dim()
            ));
        }
        if self.out_vocab > self.vocab_size {
            return bad(format!(
                "out_vocab {} exceeds vocab_size {}",
                self.out_vocab, self.vocab_size
            ));
        }
        if !self.engram_layers.is_empty() {
            if self.engram_orders.is_empty() || self.engram_orders.contains(&0) {
                return bad("engram_orders must be non-empty and positive".into());
            }
            let e = self.engram_tables();
            if !self.d_model.is_multiple_of(e) {
                return bad(format!(
                    "d_model {} is not divisible by the {e} engram tables",
                    self.d_model
                ));
            }
            if self.engram_slots == 0 {
                return bad("engram_slots is 0".into());
            }
        }
        for (name, list) in [
            ("engram_layers", &self.engram_layers),
            ("global_layers", &self.global_layers),
        ] {
            if let Some(l) = list.iter().find(|&&l| l >= self.num_layers) {
                return bad(format!(
                    "{name} names layer {l}, but the model has {} layers",
                    self.num_layers
                ));
            }
        }
        if self.engram_layers.windows(2).any(|w| w[0] >= w[1]) {
            return bad("engram_layers must be strictly ascending".into());
        }
        if !self.ladder_order.is_empty() {
            let mut sorted = self.ladder_order.clone();
            sorted.sort_unstable();
            if sorted != (0..self.num_layers).collect::<Vec<_>>() {
                return bad("ladder_order is not a permutation of the layers".into());
            }
        }
        Ok(())
    }

    pub fn qk_head_dim(&self) -> usize {
        if self.qk_head_dim == 0 {
            self.d_model / self.num_heads
        } else {
            self.qk_head_dim
        }
    }

    pub fn v_head_dim(&self) -> usize {
        if self.v_head_dim == 0 {
            self.d_model / self.num_heads
        } else {
            self.v_head_dim
        }
    }

    /// Rows of the logits: `out_vocab`, or every embedding row.
    pub fn logits_vocab(&self) -> usize {
        if self.out_vocab == 0 {
            self.vocab_size
        } else {
            self.out_vocab
        }
    }

    /// Hash heads per n-gram order: `engram_heads`, or `max(1, D / (orders * 128))`.
    pub fn engram_heads(&self) -> usize {
        if self.engram_heads == 0 {
            (self.d_model / (self.engram_orders.len().max(1) * 128)).max(1)
        } else {
            self.engram_heads
        }
    }

    /// The hash seed stride: `engram_seed_heads`, or the heads per order.
    pub fn engram_seed_stride(&self) -> usize {
        if self.engram_seed_heads == 0 {
            self.engram_heads()
        } else {
            self.engram_seed_heads
        }
    }

    /// Engram tables `E = orders * heads`.
    pub fn engram_tables(&self) -> usize {
        self.engram_orders.len() * self.engram_heads()
    }

    /// Row width of an engram table, `S = D / E`.
    pub fn engram_sub_dim(&self) -> usize {
        self.d_model / self.engram_tables()
    }

    /// The engram taps' dilation, the largest order.
    pub fn engram_dilation(&self) -> usize {
        self.engram_orders.iter().copied().max().unwrap_or(1)
    }

    /// The Hadamard width `N = 2^ceil(log2 D)`.
    pub fn hada_n(&self) -> usize {
        self.d_model.next_power_of_two()
    }

    /// The Monarch factor sizes `(a, b)`, `a = 2^(bitlen(N-1) / 2)`, `b = N / a`.
    pub fn hada_factors(&self) -> (usize, usize) {
        let n = self.hada_n();
        let bitlen = (usize::BITS - (n - 1).leading_zeros()) as usize;
        let a = 1usize << (bitlen / 2);
        (a, n / a)
    }

    /// Whether layer `l` attends to every earlier position (else the sliding band).
    pub fn is_global(&self, l: usize) -> bool {
        self.sliding_window == 0 || self.global_layers.contains(&l)
    }

    /// The order in which ladder depths add layers: `ladder_order`, or bisection (section 7).
    pub fn ladder_order(&self) -> Vec<usize> {
        if !self.ladder_order.is_empty() {
            return self.ladder_order.clone();
        }
        bisection_order(self.num_layers)
    }

    /// The layers (original indices, ascending) a ladder depth keeps.
    pub fn ladder_layers(&self, depth: usize) -> Result<Vec<usize>, Error> {
        let min = 2.min(self.num_layers);
        if depth < min || depth > self.num_layers {
            return Err(Error::Depth {
                depth,
                layers: self.num_layers,
            });
        }
        let mut keep = self.ladder_order()[..depth].to_vec();
        keep.sort_unstable();
        Ok(keep)
    }
}

/// The bisection order of `L` layers: `[0, L-1]`, then repeatedly the midpoint of the widest gap
/// (the leftmost on ties).
pub fn bisection_order(layers: usize) -> Vec<usize> {
    if layers <= 1 {
        return (0..layers).collect();
    }
    let mut order = vec![0, layers - 1];
    while order.len() < layers {
        let mut sel = order.clone();
        sel.sort_unstable();
        let (mut best_gap, mut best_left, mut best_right) = (0, 0, 0);
        for w in sel.windows(2) {
            let gap = w[1] - w[0];
            if gap > 1 && gap > best_gap {
                (best_gap, best_left, best_right) = (gap, w[0], w[1]);
            }
        }
        order.push((best_left + best_right) / 2);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bisection_order_of_twenty_layers() {
        assert_eq!(
            bisection_order(20),
            [0, 19, 9, 14, 4, 6, 11, 16, 2, 7, 12, 17, 1, 3, 5, 8, 10, 13, 15, 18]
        );
        let c = Config::default();
        assert_eq!(c.ladder_layers(8).unwrap(), [0, 4, 6, 9, 11, 14, 16, 19]);
        assert_eq!(
            c.ladder_layers(14).unwrap(),
            [0, 1, 2, 3, 4, 6, 7, 9, 11, 12, 14, 16, 17, 19]
        );
        assert!(c.ladder_layers(1).is_err());
        assert!(c.ladder_layers(21).is_err());
    }

    #[test]
    fn derived_geometry_of_the_default_config() {
        let c = Config::default();
        assert_eq!(
            (c.engram_heads(), c.engram_tables(), c.engram_sub_dim()),
            (3, 6, 128)
        );
        assert_eq!(c.hada_n(), 1024);
        assert_eq!(c.hada_factors(), (32, 32));
        let small = Config {
            d_model: 128,
            ..Config::default()
        };
        assert_eq!(small.hada_factors(), (8, 16));
    }

    #[test]
    fn needle2_and_bad_configs_are_refused() {
        let e = Config::from_json(r#"{"attn_dim": 64, "d_model": 128}"#).unwrap_err();
        assert!(e.to_string().contains("Needle 2"), "{e}");
        let e = Config::from_json(r#"{"qk_head_dim": 24, "num_heads": 4, "num_kv_heads": 3}"#)
            .unwrap_err();
        assert!(e.to_string().contains("num_kv_heads"), "{e}");
        let e = Config::from_json(r#"{"qk_head_dim": "x"}"#).unwrap_err();
        assert!(e.to_string().contains("wrong type"), "{e}");
    }
}
