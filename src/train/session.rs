//! Loading a model into an executor: where the files are, which dtypes a backend wants,
//! and filling the graph's weights from a checkpoint.

use crate::exec::Executor;
use crate::model::llama::ModelGraph;
use crate::model::ModelConfig;
use crate::tensor::{DType, HostTensor};
use crate::Result;

/// Anything that can hand out named weights (a safetensors store, an in-memory map).
pub trait WeightSource {
    fn contains(&self, name: &str) -> bool;
    /// The tensor `name` converted to `dtype`, checked against `shape`.
    fn get_shaped(&self, name: &str, shape: &[usize], dtype: DType) -> Result<HostTensor>;
}

#[cfg(not(target_arch = "wasm32"))]
impl WeightSource for crate::model::WeightStore {
    fn contains(&self, name: &str) -> bool {
        crate::model::WeightStore::contains(self, name)
    }
    fn get_shaped(&self, name: &str, shape: &[usize], dtype: DType) -> Result<HostTensor> {
        crate::model::WeightStore::get_shaped(self, name, shape, dtype)
    }
}

impl WeightSource for std::collections::BTreeMap<String, HostTensor> {
    fn contains(&self, name: &str) -> bool {
        self.contains_key(name)
    }
    fn get_shaped(&self, name: &str, shape: &[usize], dtype: DType) -> Result<HostTensor> {
        let t = self
            .get(name)
            .ok_or_else(|| crate::msg!("the weights have no tensor named {name}"))?;
        if t.shape != shape {
            return Err(crate::msg!("{name}: expected shape {shape:?}, found {:?}", t.shape));
        }
        Ok(t.cast(dtype))
    }
}

/// The dtypes a backend computes and stores in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precision {
    /// Frozen base weights.
    pub weights: DType,
    /// Activations and their gradients.
    pub activations: DType,
}

impl Precision {
    /// f32 everywhere: the CPU backend, and reference runs.
    pub const F32: Precision = Precision {
        weights: DType::F32,
        activations: DType::F32,
    };
}

/// Fills every base weight of a training graph from `src`, and the rotary frequencies.
pub fn load_base_weights(ex: &mut Executor, m: &ModelGraph, src: &dyn WeightSource) -> Result<()> {
    load_weights(ex, &m.weights, m.inv_freq, &m.config, src)
}

/// Fills the named weights (tied embeddings have no `lm_head.weight`) and the rotary
/// frequencies; each weight is converted to its tensor's dtype.
pub fn load_weights(
    ex: &mut Executor,
    weights: &[(String, crate::graph::TensorId)],
    inv_freq: crate::graph::TensorId,
    cfg: &ModelConfig,
    src: &dyn WeightSource,
) -> Result<()> {
    let task = crate::progress::task("loading weights", weights.len() as u64);
    for (i, (name, t)) in weights.iter().enumerate() {
        task.set_done(i as u64);
        if !ex.holds(*t) {
            continue;
        }
        let info = ex.graph().info(*t).clone();
        let v = src.get_shaped(name, &info.shape, info.dtype)?;
        ex.set_tensor(*t, &v)?;
    }
    let rope = cfg.rope_init();
    if ex.holds(inv_freq) {
        ex.set_tensor(inv_freq, &HostTensor::from_f32(&[rope.inv_freq.len()], &rope.inv_freq))?;
    }
    Ok(())
}

/// Checks that a model folder has what a run needs, naming what is missing.
#[cfg(not(target_arch = "wasm32"))]
pub fn check_model_dir(dir: &std::path::Path) -> Result<()> {
    check_model_files(dir, true, true)
}

/// [`check_model_dir`] without `config.json` or `tokenizer.json` where the config names
/// them elsewhere (`base_model_config`, `tokenizer_config`).
#[cfg(not(target_arch = "wasm32"))]
fn check_model_files(dir: &std::path::Path, need_config: bool, need_tokenizer: bool) -> Result<()> {
    if !dir.exists() {
        return Err(crate::Error::format(
            dir,
            "no such file or folder: name a Hugging Face model folder (config.json, model.safetensors, \
             tokenizer.json) or a .gguf file (`ferrotune fetch smollm2-135m-instruct` installs a small one)",
        ));
    }
    let has_weights = dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file();
    let mut missing = Vec::new();
    if need_config && !dir.join("config.json").is_file() {
        missing.push("config.json");
    }
    if !has_weights {
        missing.push("model.safetensors (or model.safetensors.index.json with its shards)");
    }
    if need_tokenizer && !dir.join("tokenizer.json").is_file() {
        missing.push("tokenizer.json");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(crate::Error::format(
            dir,
            format!("not a model folder: missing {}", missing.join(", ")),
        ))
    }
}

/// A model folder for `base_model`: the folder itself, or the HF-layout conversion of a
/// `.gguf` file (made once, next to it, as `<name>.hf/`).
#[cfg(not(target_arch = "wasm32"))]
pub fn resolve_model_dir(base_model: &str) -> Result<std::path::PathBuf> {
    resolve_model_dir_with(base_model, true, true)
}

/// [`resolve_model_dir`] for a folder whose `config.json` or `tokenizer.json` may be
/// elsewhere (`need_config`, `need_tokenizer` false).
#[cfg(not(target_arch = "wasm32"))]
pub fn resolve_model_dir_with(base_model: &str, need_config: bool, need_tokenizer: bool) -> Result<std::path::PathBuf> {
    let p = std::path::Path::new(base_model);
    if p.is_file() && base_model.ends_with(".gguf") {
        let out = p.with_extension("hf");
        if check_model_dir(&out).is_err() {
            eprintln!("converting {} to {} (once)", p.display(), out.display());
            let task = crate::progress::task("converting GGUF tensors", 0);
            crate::model::convert_gguf_with_progress(p, &out, DType::F32, Some(&task.callback()))?;
        }
        return Ok(out);
    }
    check_model_files(p, need_config, need_tokenizer)?;
    Ok(p.to_path_buf())
}
