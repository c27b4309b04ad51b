//! safetensors checkpoints: the same tensors as the pickle under the same paths, with the config
//! as JSON in the header metadata (`needle_config`) or in a `config.json` beside the file.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use needle_runtime::checkpoint::{Checkpoint, DType, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, View};

use super::{config_from_json, LoadError};

/// Header metadata key holding the config as JSON.
pub const CONFIG_KEY: &str = "needle_config";

fn st_err(path: &Path, problem: impl Into<String>) -> LoadError {
    LoadError::Safetensors {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Parses a safetensors checkpoint without checking it against its config. `path` locates the
/// sidecar `config.json` and names the file in errors.
pub fn load_safetensors_bytes(data: &[u8], path: &Path) -> Result<Checkpoint, LoadError> {
    let st = SafeTensors::deserialize(data).map_err(|e| {
        st_err(
            path,
            format!("{e}; the file is corrupt or truncated: write it again"),
        )
    })?;
    let (_, meta) = SafeTensors::read_metadata(data).map_err(|e| st_err(path, e.to_string()))?;
    let config_json = match meta.metadata().as_ref().and_then(|m| m.get(CONFIG_KEY)) {
        Some(s) => s.clone(),
        None => {
            let sidecar = path.with_file_name("config.json");
            let no_config = |why: String| {
                st_err(
                    path,
                    format!(
                        "no config: the header metadata has no `{CONFIG_KEY}` key and {} {why}; \
                         put the model config as JSON in either place",
                        sidecar.display()
                    ),
                )
            };
            // A config is a few hundred bytes: 1 MiB bounds an endless or enormous file.
            let read = super::read_limited(
                &sidecar,
                1 << 20,
                0,
                |e| no_config(format!("cannot be read ({e})")),
                |_| Ok(()),
            )?;
            match read {
                super::Limited::Read(bytes) => {
                    String::from_utf8(bytes).map_err(|_| no_config("is not UTF-8 text".into()))?
                }
                super::Limited::TooLarge => {
                    return Err(no_config(
                        "is larger than the 1 MiB a config may take".into(),
                    ))
                }
            }
        }
    };
    let json: serde_json::Value = serde_json::from_str(&config_json)
        .map_err(|e| st_err(path, format!("the config is not valid JSON: {e}")))?;
    let config = config_from_json(json)?;

    let mut tensors = BTreeMap::new();
    for (name, view) in st.iter() {
        let dtype = match view.dtype() {
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F32 => DType::F32,
            other => {
                return Err(st_err(
                    path,
                    format!(
                    "tensor `{name}` has dtype {other:?}; only F16, BF16 and F32 are supported: \
                         convert it and save again"
                ),
                ))
            }
        };
        // Checkpoints exported from PyTorch-style tooling join paths with `.`.
        let key = name.replace('.', "/");
        let tensor = Tensor {
            dtype,
            shape: view.shape().to_vec(),
            bytes: view.data().to_vec(),
        };
        if tensors.insert(key.clone(), tensor).is_some() {
            return Err(st_err(
                path,
                format!("two tensors map to path `{key}` (once `.` is read as `/`)"),
            ));
        }
    }
    Ok(Checkpoint { config, tensors })
}

struct StView<'a>(&'a Tensor);

impl View for StView<'_> {
    fn dtype(&self) -> Dtype {
        match self.0.dtype {
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::F32 => Dtype::F32,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.0.bytes)
    }
    fn data_len(&self) -> usize {
        self.0.bytes.len()
    }
}

/// Serializes a checkpoint to safetensors bytes: `/`-joined names, stored dtypes, the config in
/// the `needle_config` metadata. The output depends only on the checkpoint.
pub fn safetensors_bytes(ckpt: &Checkpoint) -> Result<Vec<u8>, LoadError> {
    let here = Path::new("<memory>");
    for (name, t) in &ckpt.tensors {
        let want = t
            .shape
            .iter()
            .try_fold(t.dtype.size(), |a, &d| a.checked_mul(d));
        if want != Some(t.bytes.len()) {
            return Err(st_err(
                here,
                format!(
                    "tensor `{name}` has shape {:?} but {} bytes",
                    t.shape,
                    t.bytes.len()
                ),
            ));
        }
    }
    let config = serde_json::to_string(&ckpt.config)
        .map_err(|e| st_err(here, format!("cannot serialize the config: {e}")))?;
    let meta = HashMap::from([(CONFIG_KEY.to_string(), config)]);
    let views = ckpt.tensors.iter().map(|(k, t)| (k.as_str(), StView(t)));
    safetensors::serialize(views, Some(meta)).map_err(|e| st_err(here, e.to_string()))
}

/// Writes a checkpoint as safetensors (see [`safetensors_bytes`]).
pub fn save_safetensors(ckpt: &Checkpoint, path: &Path) -> Result<(), LoadError> {
    let bytes = safetensors_bytes(ckpt).map_err(|e| match e {
        LoadError::Safetensors { problem, .. } => st_err(path, problem),
        other => other,
    })?;
    std::fs::write(path, bytes).map_err(|cause| LoadError::Write {
        path: path.to_path_buf(),
        cause,
    })
}
