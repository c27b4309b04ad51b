//! Checkpoint loaders: the reference's pickle and safetensors.
//!
//! [`load_checkpoint`] picks the format from the file's first bytes (never from its extension,
//! since checkpoints get renamed), then checks the result against its config: the config must
//! describe a SAN needlec can run ([`Config::validate`]), every tensor of
//! [`expected_tensors`] must be present with its shape, and every value must be finite.
//!
//! Tensors that the config does not call for are an error, not a warning: a Needle v1 SAN has
//! exactly the listed tensors, so an extra one means a different architecture (feed-forward
//! blocks, an extra head) or mangled paths, and silently ignoring weights would compile a
//! different model from the one that was trained.

pub mod pickle;
pub mod safetensors;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use needle_runtime::checkpoint::{expected_tensors, Checkpoint, DType, Tensor};
use needle_runtime::config::{Config, ConfigError};

pub use self::safetensors::save_safetensors;

/// Why a checkpoint could not be loaded. Messages say what is wrong, where, and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    // The I/O error is part of the message, not a `source()`: a chain printer would repeat it.
    #[error("cannot read {}: {cause}", .path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("cannot write {}: {cause}; check that its folder exists and is writable", .path.display())]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error(
        "{} is larger than the {} a checkpoint may take ({limit} bytes; the full 26M-parameter \
         Needle model is about 105 MB in float32): it is not a Needle checkpoint, or not a file \
         (an endless device or pipe?)",
        .path.display(), human_bytes(*limit)
    )]
    TooLarge { path: PathBuf, limit: u64 },

    #[error(
        "{} is not a checkpoint needlec can read ({found}); accepted formats: a Python pickle \
         (protocol 2 to 5, starts with byte 0x80) as written by the Needle reference, or a \
         safetensors file (8-byte little-endian header length, then a JSON header)",
        .path.display()
    )]
    UnknownFormat { path: PathBuf, found: String },

    #[error(
        "the pickle ends early at byte {offset}, while reading {what}: the file is truncated \
         (an interrupted copy or download?); fetch or save it again"
    )]
    Truncated { offset: usize, what: String },

    #[error("pickle byte {offset}: {problem}")]
    Pickle { offset: usize, problem: String },

    #[error(
        "pickle byte {offset}: refers to `{name}`, which a checkpoint never needs; needlec \
         executes nothing from a pickle and only accepts numpy array constructors, so this file \
         is either not a Needle checkpoint or was tampered with. Do not load it with Python's \
         pickle either"
    )]
    ForbiddenGlobal { offset: usize, name: String },

    #[error("tensor `{path}` (pickle byte {offset}): {problem}")]
    BadArray {
        path: String,
        offset: usize,
        problem: String,
    },

    #[error("checkpoint layout: {problem}")]
    Structure { problem: String },

    #[error("config{}: {problem}", key.as_ref().map(|k| format!(" key `{k}`")).unwrap_or_default())]
    Config {
        key: Option<String>,
        problem: String,
    },

    #[error("invalid config: {0}")]
    InvalidConfig(ConfigError),

    #[error(
        "tensor `{path}` is missing (expected shape {expected:?}); the checkpoint has {} tensors. \
         Check that the file is a Needle v1 checkpoint and that its config matches it",
        found_count
    )]
    MissingTensor {
        path: String,
        expected: Vec<usize>,
        found_count: usize,
    },

    #[error(
        "tensor `{path}` has shape {found:?} but the config implies {expected:?} ({dims}); {culprit}"
    )]
    WrongShape {
        path: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        dims: String,
        culprit: String,
    },

    #[error(
        "tensor `{path}` holds {count} non-finite value(s) (first: {first} at flat index {index}); \
         the checkpoint is corrupt or training diverged: use an earlier checkpoint"
    )]
    NonFinite {
        path: String,
        count: usize,
        index: usize,
        first: f32,
    },

    #[error(
        "unexpected tensor(s) that a Needle v1 SAN of this config does not have: {}; the file \
         is a different architecture or its paths are mangled",
        paths.join(", ")
    )]
    UnexpectedTensors { paths: Vec<String> },

    #[error("safetensors file {}: {problem}", .path.display())]
    Safetensors { path: PathBuf, problem: String },
}

// By hand rather than `#[from]`, which would also make the config error a `source()` that a
// chain printer repeats after the message that already holds it.
impl From<ConfigError> for LoadError {
    fn from(e: ConfigError) -> Self {
        LoadError::InvalidConfig(e)
    }
}

impl LoadError {
    /// Whether the message already names the file, so a caller adding the path would repeat it.
    pub fn names_path(&self) -> bool {
        matches!(
            self,
            LoadError::Io { .. }
                | LoadError::Write { .. }
                | LoadError::TooLarge { .. }
                | LoadError::UnknownFormat { .. }
                | LoadError::Safetensors { .. }
        )
    }
}

/// The most bytes a checkpoint file may have: far above any Needle v1 checkpoint (the full
/// model is 26M parameters), far below what an endless device would make us allocate.
pub const MAX_CHECKPOINT_BYTES: u64 = 4 << 30;

/// `n` bytes as `4 GiB`, `64 MiB`, `12 KiB` or `12 bytes` (the largest unit that divides it).
pub fn human_bytes(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} bytes")
}

/// What [`read_limited`] read.
pub enum Limited {
    /// The whole file, at most the limit.
    Read(Vec<u8>),
    /// The file holds more than the limit (nothing more was read).
    TooLarge,
}

/// Reads a whole file, but never more than `limit` bytes: a regular file over the limit is
/// refused from its size, anything else (a device, a pipe) after `limit + 1` bytes. Endless
/// inputs such as `/dev/zero` thus cost at most `limit` bytes of memory. `head` bytes are read
/// first and handed to `sniff`, which may refuse the input before the rest is read.
pub fn read_limited<E>(
    path: &Path,
    limit: u64,
    head: usize,
    io_err: impl Fn(std::io::Error) -> E,
    sniff: impl FnOnce(&[u8]) -> Result<(), E>,
) -> Result<Limited, E> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(&io_err)?;
    let meta = file.metadata().map_err(&io_err)?;
    if meta.is_file() && meta.len() > limit {
        return Ok(Limited::TooLarge);
    }
    let mut reader = file.take(limit + 1);
    let mut data = Vec::new();
    (&mut reader)
        .take(head as u64)
        .read_to_end(&mut data)
        .map_err(&io_err)?;
    sniff(&data)?;
    reader.read_to_end(&mut data).map_err(&io_err)?;
    if data.len() as u64 > limit {
        return Ok(Limited::TooLarge);
    }
    Ok(Limited::Read(data))
}

/// Loads a checkpoint (pickle or safetensors, told apart by content) and checks it against its
/// config.
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint, LoadError> {
    let read = read_limited(
        path,
        MAX_CHECKPOINT_BYTES,
        16,
        |cause| LoadError::Io {
            path: path.to_path_buf(),
            cause,
        },
        // A file that is neither format is refused from its first bytes, before the rest is read
        // (`/dev/zero` is refused at once).
        |head| match detect(head) {
            Format::Unknown(found) => Err(LoadError::UnknownFormat {
                path: path.to_path_buf(),
                found,
            }),
            _ => Ok(()),
        },
    )?;
    let Limited::Read(data) = read else {
        return Err(LoadError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_CHECKPOINT_BYTES,
        });
    };
    let ckpt = match detect(&data) {
        Format::Pickle => load_pickle_bytes(&data)?,
        Format::Safetensors => self::safetensors::load_safetensors_bytes(&data, path)?,
        Format::Unknown(found) => {
            return Err(LoadError::UnknownFormat {
                path: path.to_path_buf(),
                found,
            })
        }
    };
    check_checkpoint(&ckpt)?;
    Ok(ckpt)
}

enum Format {
    Pickle,
    Safetensors,
    Unknown(String),
}

/// Tells the formats apart by their first bytes. Safetensors is tried first: its 8-byte header
/// length may well start with byte 0x80 (a header of 128 + 256k bytes), which alone would look
/// like a pickle; byte 8 opening the JSON header (`{`, an opcode no pickle has) decides.
fn detect(data: &[u8]) -> Format {
    if data.len() >= 9 && data[8] == b'{' {
        let mut n = [0u8; 8];
        n.copy_from_slice(&data[..8]);
        let n = u64::from_le_bytes(n);
        // A plausible header length is enough: a truncated file should get safetensors' own error
        // rather than "unknown format".
        if (2..100_000_000).contains(&n) {
            return Format::Safetensors;
        }
    }
    if data.first() == Some(&0x80) {
        return Format::Pickle;
    }
    let found = if data.is_empty() {
        "the file is empty".to_string()
    } else {
        let head: String = data
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ");
        let likely = if data.starts_with(b"PK\x03\x04") {
            ": a zip archive, as PyTorch's torch.save writes; convert it to safetensors first"
        } else if data.starts_with(b"GGUF") {
            ": a GGUF file (llama.cpp), which needlec does not read"
        } else if data.first() == Some(&b'{') || data.first() == Some(&b'[') {
            ": JSON text (a config.json or tokenizer.json?), not weights"
        } else if data.len() >= 9 && data[8] == b'{' {
            ": a safetensors file whose header length is implausible (corrupt?)"
        } else if data.iter().all(|&b| b == 0) {
            ": all zero bytes"
        } else {
            ""
        };
        format!("it starts with bytes {head}{likely}")
    };
    Format::Unknown(found)
}

/// Parses a pickled checkpoint without checking it against its config.
pub fn load_pickle_bytes(data: &[u8]) -> Result<Checkpoint, LoadError> {
    let top = pickle::unpickle(data)?;
    let pickle::PyData::Dict(items) = top else {
        return Err(LoadError::Structure {
            problem: format!(
                "the pickle holds {}, not a dict with `params` and `config`",
                top.kind()
            ),
        });
    };
    let mut params = None;
    let mut config = None;
    // Other top-level keys (e.g. `pretrain_step`) are training bookkeeping.
    for (k, v) in items {
        match k.as_str() {
            "params" => params = Some(v),
            "config" => config = Some(v),
            _ => {}
        }
    }
    let (Some(params), Some(config)) = (params, config) else {
        return Err(LoadError::Structure {
            problem:
                "the top-level dict lacks `params` or `config`: this is not a Needle checkpoint"
                    .into(),
        });
    };
    let config = config_from_pydata(&config)?;
    let tensors = pickle::flatten_params(params)?;
    Ok(Checkpoint { config, tensors })
}

fn config_from_pydata(d: &pickle::PyData) -> Result<Config, LoadError> {
    let pickle::PyData::Dict(items) = d else {
        return Err(LoadError::Config {
            key: None,
            problem: format!("`config` is {}, not a dict", d.kind()),
        });
    };
    // Keys Config does not know are ignored whatever their type (training configs may hold
    // tuples or lists), so only known keys must convert to JSON.
    let known = match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let mut map = serde_json::Map::new();
    for (k, v) in items {
        match v.to_json() {
            Some(j) => {
                map.insert(k.clone(), j);
            }
            None if known.contains_key(k) => {
                return Err(LoadError::Config {
                    key: Some(k.clone()),
                    problem: format!(
                        "value is {}, but this key takes an int, float, string or bool; fix it in \
                         the checkpoint's config",
                        v.kind()
                    ),
                })
            }
            None => {}
        }
    }
    config_from_json(serde_json::Value::Object(map))
}

/// Builds a [`Config`] from a JSON object; missing keys take their defaults, unknown keys are
/// ignored, and a bad value is reported with its key.
pub fn config_from_json(v: serde_json::Value) -> Result<Config, LoadError> {
    let serde_json::Value::Object(map) = v else {
        return Err(LoadError::Config {
            key: None,
            problem: format!("expected a JSON object, found {v}"),
        });
    };
    match serde_json::from_value::<Config>(serde_json::Value::Object(map.clone())) {
        Ok(c) => Ok(c),
        Err(e) => {
            // serde's message lacks the key: find it by trying each key on its own.
            for (k, val) in &map {
                let mut one = serde_json::Map::new();
                one.insert(k.clone(), val.clone());
                if let Err(e) = serde_json::from_value::<Config>(serde_json::Value::Object(one)) {
                    return Err(LoadError::Config {
                        key: Some(k.clone()),
                        problem: format!(
                            "{e} (found {val}); fix the value in the checkpoint's config"
                        ),
                    });
                }
            }
            Err(LoadError::Config {
                key: None,
                problem: e.to_string(),
            })
        }
    }
}

/// The checks [`load_checkpoint`] runs after parsing: config validity, tensor set and shapes,
/// finite values.
pub fn check_checkpoint(ckpt: &Checkpoint) -> Result<(), LoadError> {
    let c = &ckpt.config;
    c.validate()?;
    let expected = expected_tensors(c);
    let mut wrong = Vec::new();
    for (path, shape) in &expected {
        match ckpt.tensors.get(path) {
            None => {
                return Err(LoadError::MissingTensor {
                    path: path.clone(),
                    expected: shape.clone(),
                    found_count: ckpt.tensors.len(),
                })
            }
            Some(t) if &t.shape != shape => wrong.push((path, shape, t)),
            Some(_) => {}
        }
    }
    if let Some(&(path, shape, t)) = wrong.first() {
        // One odd tensor among many right ones points at the tensor; a widespread mismatch points at
        // the config (or a config from another model).
        let culprit = if wrong.len() == 1 {
            "all other tensors agree with the config, so this tensor is likely corrupt or from another model".to_string()
        } else {
            format!(
                "{} of {} tensors disagree with the config, so the config is likely wrong (or belongs to \
                 another model): fix the config keys named above",
                wrong.len(),
                expected.len()
            )
        };
        return Err(LoadError::WrongShape {
            path: path.clone(),
            expected: shape.clone(),
            found: t.shape.clone(),
            dims: dim_names(c, shape, &t.shape),
            culprit,
        });
    }
    let extra: Vec<String> = ckpt
        .tensors
        .keys()
        .filter(|k| !expected.iter().any(|(p, _)| p == *k))
        .cloned()
        .collect();
    if !extra.is_empty() {
        return Err(LoadError::UnexpectedTensors { paths: extra });
    }
    for (path, _) in &expected {
        if let Some(t) = ckpt.tensors.get(path) {
            check_finite(path, t)?;
        }
    }
    Ok(())
}

/// Names the config keys behind the dimensions that differ.
fn dim_names(c: &Config, expected: &[usize], found: &[usize]) -> String {
    let named = [
        ("vocab_size", c.vocab_size),
        ("d_model", c.d_model),
        ("num_encoder_layers", c.num_encoder_layers),
        ("num_decoder_layers", c.num_decoder_layers),
        ("num_kv_heads * d_model / num_heads", c.kv_dim()),
        ("d_model / num_heads", c.head_dim()),
        ("d_model / 4", c.d_model / 4),
        ("contrastive_dim", c.contrastive_dim),
    ];
    if expected.len() != found.len() {
        return format!(
            "{} dimensions expected, {} found",
            expected.len(),
            found.len()
        );
    }
    let mut parts = Vec::new();
    for (i, (&e, &f)) in expected.iter().zip(found).enumerate() {
        if e != f {
            let keys: Vec<&str> = named
                .iter()
                .filter(|(_, v)| *v == e)
                .map(|(k, _)| *k)
                .collect();
            let from = if keys.is_empty() {
                String::new()
            } else {
                format!(" from {}", keys.join(" or "))
            };
            parts.push(format!("axis {i}: expected {e}{from}, found {f}"));
        }
    }
    parts.join("; ")
}

fn check_finite(path: &str, t: &Tensor) -> Result<(), LoadError> {
    let mut count = 0;
    let mut first = None;
    let mut note = |i: usize, v: f32| {
        if !v.is_finite() {
            count += 1;
            first.get_or_insert((i, v));
        }
    };
    // Decode in place rather than through to_f32 to avoid a second copy of large tensors.
    match t.dtype {
        DType::F32 => t
            .bytes
            .chunks_exact(4)
            .enumerate()
            .for_each(|(i, c)| note(i, f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        DType::F16 => t.bytes.chunks_exact(2).enumerate().for_each(|(i, c)| {
            // Exponent all ones: Inf or NaN.
            if c[1] & 0x7c == 0x7c {
                note(i, half::f16::from_le_bytes([c[0], c[1]]).to_f32());
            }
        }),
        DType::BF16 => t.bytes.chunks_exact(2).enumerate().for_each(|(i, c)| {
            note(i, half::bf16::from_le_bytes([c[0], c[1]]).to_f32());
        }),
    }
    match first {
        Some((index, first)) => Err(LoadError::NonFinite {
            path: path.to_string(),
            count,
            index,
            first,
        }),
        None => Ok(()),
    }
}

/// Human-readable summary for `needlec inspect`: every config key, the parameter count, and one
/// row per tensor.
pub fn inspect_report(ckpt: &Checkpoint) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "config:");
    match serde_json::to_value(&ckpt.config) {
        Ok(serde_json::Value::Object(map)) => {
            let w = map.keys().map(|k| k.len()).max().unwrap_or(0);
            for (k, v) in &map {
                let _ = writeln!(out, "  {k:<w$}  {v}");
            }
        }
        _ => {
            let _ = writeln!(out, "  {:?}", ckpt.config);
        }
    }
    let total: usize = ckpt.tensors.values().map(Tensor::numel).sum();
    let bytes: usize = ckpt.tensors.values().map(|t| t.bytes.len()).sum();
    let _ = writeln!(
        out,
        "parameters: {total} ({:.2}M) in {} tensors, {bytes} bytes",
        total as f64 / 1e6,
        ckpt.tensors.len()
    );
    let pw = ckpt
        .tensors
        .keys()
        .map(|k| k.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let shapes: Vec<String> = ckpt
        .tensors
        .values()
        .map(|t| format!("{:?}", t.shape))
        .collect();
    let sw = shapes.iter().map(String::len).max().unwrap_or(0).max(5);
    let _ = writeln!(
        out,
        "{:<pw$}  {:<8}  {:<sw$}  {:>10}",
        "path", "dtype", "shape", "numel"
    );
    for ((path, t), shape) in ckpt.tensors.iter().zip(&shapes) {
        let _ = writeln!(
            out,
            "{path:<pw$}  {:<8}  {shape:<sw$}  {:>10}",
            t.dtype.name(),
            t.numel()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors header of 128 + 256k bytes makes the file start with byte 0x80, as a pickle
    /// does: byte 8 opening the JSON header decides.
    #[test]
    fn a_header_length_starting_0x80_is_safetensors() {
        let mut data = 0x0280u64.to_le_bytes().to_vec();
        data.push(b'{');
        data.resize(8 + 0x280, b' ');
        assert!(matches!(detect(&data), Format::Safetensors));
        // A real pickle (protocol 4, a frame) is still a pickle.
        let pickle = [0x80, 4, 0x95, 0x10, 0, 0, 0, 0, 0, 0, 0, b'}'];
        assert!(matches!(detect(&pickle), Format::Pickle));
        // Neither: the likely format is named.
        let Format::Unknown(found) = detect(b"PK\x03\x04 rest of a zip") else {
            panic!("a zip is not a checkpoint")
        };
        assert!(found.contains("torch.save"), "{found}");
    }

    /// The I/O error is in the message once and not again as a `source()`, so `{:#}` (the
    /// message and its chain) holds it once.
    #[test]
    fn io_errors_hold_their_cause_once() {
        let e = load_checkpoint(Path::new("/nonexistent/needle.pkl")).unwrap_err();
        let shown = format!("{:#}", anyhow::Error::new(e));
        assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
        assert_eq!(
            shown.matches("/nonexistent/needle.pkl").count(),
            1,
            "{shown}"
        );
    }

    #[test]
    fn reads_are_bounded() {
        let io = |e: std::io::Error| e.to_string();
        let r = read_limited(Path::new("/dev/zero"), 1000, 0, io, |_| Ok(())).unwrap();
        assert!(matches!(r, Limited::TooLarge));
        // `sniff` refuses before the rest is read.
        let r = read_limited(Path::new("/dev/zero"), 1 << 40, 16, io, |head| {
            assert_eq!(head.len(), 16);
            Err("refused".to_string())
        });
        assert_eq!(r.err().as_deref(), Some("refused"));
        assert_eq!(human_bytes(4 << 30), "4 GiB");
        assert_eq!(human_bytes(1000), "1000 bytes");
    }
}
