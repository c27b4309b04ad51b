//! The counter-based generator of the default-config test checkpoint
//! (`scripts/needle3/README.md`, "Weights"): every value a function of the tensor's name and the
//! element's flat index, so the golden vectors' default model is rebuilt without storing it.

use super::model::Source;
use super::Error;

/// FNV-1a, 64 bits, over the name's UTF-8 bytes.
fn fnv1a64(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64 of element `i` (flat row-major index) under hash `h`, as `v` in [-1, 1).
fn unit_value(h: u64, i: u64) -> f64 {
    let mut z = h.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f64 * 2f64.powi(-23) - 1.0
}

/// How the centre `c` of an element depends on its position.
enum Centre {
    Const(f64),
    /// 1 in the second-to-last axis' row 0 (conv and engram taps).
    FirstTapRow,
    /// `(-1)^popcount(r & s) / sqrt(b)` over the last two axes.
    Walsh,
    /// `v` on the diagonal of the last two axes.
    Diagonal(f64),
}

/// The (centre, half width) of a tensor by its path, or `None` for a path the table lacks.
fn rule(path: &str, num_layers: usize) -> Option<(Centre, f64)> {
    let leaf = path.rsplit('/').next().unwrap_or(path);
    let small = 3f64.sqrt() * 0.02;
    if path.ends_with("out_proj/kernel") || path.ends_with("value_proj/kernel") {
        return Some((Centre::Const(0.0), small / ((2 * num_layers) as f64).sqrt()));
    }
    if matches!(leaf, "kernel" | "embedding" | "cond_v" | "probes" | "query")
        || leaf.starts_with("mhc_phi")
    {
        return Some((Centre::Const(0.0), small));
    }
    Some(match leaf {
        "scale" => (Centre::Const(0.0), 0.1),
        "attn_gate" => (Centre::Const(0.0), 0.5),
        "b2" => (Centre::Const(0.0), 0.1),
        "d4" => (Centre::Const(0.02), 0.01),
        "cond_u" => (Centre::Const(0.0), 0.2),
        "mhc_b_pre" | "mhc_b_post" | "row_bias" => (Centre::Const(0.0), 0.5),
        "log_temp" => (Centre::Const(10f64.ln()), 0.0),
        "d1" | "d2" | "d3" | "gain" => (Centre::Const(1.0), 0.1),
        "mhc_a_pre" | "mhc_a_post" | "mhc_a_res" => (Centre::Const(0.1), 0.05),
        "q_taps" | "k_taps" | "v_taps" | "taps" => (Centre::FirstTapRow, 0.2),
        "w1a" | "w1b" | "w2a" | "w2b" | "w3a" | "w3b" => (Centre::Walsh, 0.05),
        "mhc_b_res" => (Centre::Diagonal(4.0), 0.5),
        "bias" if path.contains("/proj/") => (Centre::Const(0.0), 0.1),
        "bias" => (Centre::Const(-10.0), 0.0),
        _ => return None,
    })
}

/// The generated values of tensor `path` of `shape` (layer axis first), for a model of
/// `num_layers` layers: `f32(c + w * v)`, computed in float64.
pub fn tensor(path: &str, shape: &[usize], num_layers: usize) -> Option<Vec<f32>> {
    let (centre, w) = rule(path, num_layers)?;
    let h = fnv1a64(path);
    let count: usize = shape.iter().product();
    let last = shape.last().copied().unwrap_or(1);
    let second = if shape.len() >= 2 {
        shape[shape.len() - 2]
    } else {
        1
    };
    let inv_sqrt_b = 1.0 / (last as f64).sqrt();
    Some(
        (0..count)
            .map(|i| {
                let col = i % last;
                let row = (i / last) % second;
                let c = match centre {
                    Centre::Const(c) => c,
                    Centre::FirstTapRow => f64::from(u8::from(row == 0)),
                    Centre::Walsh => {
                        let sign = if (row & col).count_ones() % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        };
                        sign * inv_sqrt_b
                    }
                    Centre::Diagonal(v) => {
                        if row == col {
                            v
                        } else {
                            0.0
                        }
                    }
                };
                (c + w * unit_value(h, i as u64)) as f32
            })
            .collect(),
    )
}

/// The generator as a model [`Source`]: every tensor exists, with the shape asked for.
pub struct Generated {
    /// The layer count of the full model (it sets the output projections' width).
    pub num_layers: usize,
}

impl Source for Generated {
    fn has(&self, _name: &str) -> bool {
        true
    }

    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, Error> {
        tensor(name, shape, self.num_layers).ok_or_else(|| Error::Missing {
            name: name.to_string(),
        })
    }
}
