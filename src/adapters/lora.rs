//! LoRA adapters in PEFT's format: initialisation, `adapter_model.safetensors` +
//! `adapter_config.json`, loading, and merging into base weights.
//!
//! PEFT (`src/peft/tuners/lora/layer.py`, `reset_lora_parameters`) initialises A with
//! `kaiming_uniform_(a=sqrt(5))`, i.e. U(-b, b) with `b = gain * sqrt(3 / fan_in)` and
//! `gain = sqrt(2 / (1 + a^2)) = sqrt(1/3)`, so `b = 1 / sqrt(in_features)`; B is zero, so
//! the adapted model equals the base model at step 0. Tensor keys are
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`;
//! fully trained modules (`modules_to_save`) are saved as `base_model.model.<module>.weight`
//! (`src/peft/utils/save_and_load.py` strips `modules_to_save.` and the adapter name). On a
//! model with tied embeddings that is the one shared matrix, `model.embed_tokens.weight`,
//! and the config says `ensure_weight_tying: true`.

use crate::model::llama::LoraPair;
use crate::tensor::{DType, HostTensor};
use crate::{Error, Result};
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// The serialized `LoraConfig` (the fields PEFT has read for many releases). Reading is
/// lenient where PEFT is: `task_type` may be null, `init_lora_weights` a string,
/// `layers_to_transform` a number or a list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(deserialize_with = "modules")]
    pub target_modules: Vec<String>,
    #[serde(default = "none_str")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default = "yes")]
    pub init_lora_weights: serde_json::Value,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    /// The model ties its LM head to the embedding and `modules_to_save` trains that one
    /// matrix (PEFT's `ensure_weight_tying`); written only when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ensure_weight_tying: bool,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    pub layers_pattern: Option<serde_json::Value>,
    #[serde(default)]
    pub revision: Option<String>,
}

/// `target_modules` as a list of module names (a single string is a regular expression
/// in PEFT, which is only accepted when it is a plain name).
fn modules<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    match Raw::deserialize(d)? {
        Raw::Many(v) => Ok(v),
        Raw::One(s) if s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => Ok(vec![s]),
        Raw::One(s) => Err(serde::de::Error::custom(format!(
            "target_modules {s:?} is a regular expression; list the module names instead"
        ))),
    }
}

fn none_str() -> String {
    "none".into()
}
fn yes() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

impl AdapterConfig {
    pub fn new(opts: &crate::model::llama::LoraOptions, base: &str, modules_to_save: &[String]) -> Self {
        AdapterConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(base.to_string()),
            r: opts.r,
            lora_alpha: opts.alpha,
            lora_dropout: opts.dropout,
            target_modules: opts.targets.clone(),
            bias: "none".into(),
            fan_in_fan_out: false,
            inference_mode: true,
            init_lora_weights: serde_json::Value::Bool(true),
            modules_to_save: (!modules_to_save.is_empty()).then(|| modules_to_save.to_vec()),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_rslora: opts.use_rslora,
            use_dora: false,
            ensure_weight_tying: false,
            layers_to_transform: None,
            layers_pattern: None,
            revision: None,
        }
    }

    /// The scale applied to `B A x`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// JSON as PEFT writes it (integral alphas as integers).
    pub fn to_json(&self) -> String {
        let mut v = serde_json::to_value(self).expect("serializable");
        if self.lora_alpha.fract() == 0.0 {
            v["lora_alpha"] = serde_json::json!(self.lora_alpha as i64);
        }
        serde_json::to_string_pretty(&v).expect("serializable")
    }

    pub fn read(dir: &Path) -> Result<AdapterConfig> {
        let p = dir.join(ADAPTER_CONFIG);
        if !p.is_file() {
            return Err(Error::format(
                dir,
                format!(
                    "not an adapter folder: it has no {ADAPTER_CONFIG} (an adapter is {ADAPTER_CONFIG} and \
                     {ADAPTER_WEIGHTS}); give a finished LoRA run's output_dir or one of its checkpoint-N folders"
                ),
            ));
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        Self::from_json(&text, &p)
    }

    /// Parses `adapter_config.json`'s text; `p` names it in errors.
    pub fn from_json(text: &str, p: &Path) -> Result<AdapterConfig> {
        let c: AdapterConfig =
            serde_json::from_str(text).map_err(|e| Error::format(p, format!("not a PEFT LoRA config: {e}")))?;
        if c.peft_type != "LORA" {
            return Err(Error::format(
                p,
                format!("peft_type is {:?}; only LORA adapters are supported", c.peft_type),
            ));
        }
        if c.use_dora {
            return Err(Error::format(p, "DoRA adapters are not supported yet"));
        }
        if c.bias != "none" {
            return Err(Error::format(
                p,
                format!("bias {:?}: only adapters without bias terms are supported", c.bias),
            ));
        }
        if !c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty() {
            return Err(Error::format(
                p,
                "per-module rank_pattern / alpha_pattern are not supported yet",
            ));
        }
        Ok(c)
    }
}

/// Whether an adapter read from disk (`found`) can continue as the one a config describes
/// (`want`): the same r, alpha, rsLoRA flag, target modules and modules to save. The error
/// lists every difference with the config key that sets it.
pub fn check_compatible(found: &AdapterConfig, want: &AdapterConfig) -> std::result::Result<(), String> {
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v.dedup();
        v
    };
    let mut diffs = Vec::new();
    if found.r != want.r {
        diffs.push(format!("r is {} there, lora_r is {} here", found.r, want.r));
    }
    if found.lora_alpha != want.lora_alpha {
        diffs.push(format!(
            "lora_alpha is {} there, {} here",
            found.lora_alpha, want.lora_alpha
        ));
    }
    if found.use_rslora != want.use_rslora {
        diffs.push(format!(
            "use_rslora is {} there, peft_use_rslora is {} here",
            found.use_rslora, want.use_rslora
        ));
    }
    let (ft, wt) = (sorted(&found.target_modules), sorted(&want.target_modules));
    if ft != wt {
        diffs.push(format!(
            "target_modules are {ft:?} there, {wt:?} here (lora_target_modules / lora_target_linear)"
        ));
    }
    let saved = |c: &AdapterConfig| sorted(c.modules_to_save.as_deref().unwrap_or_default());
    let (fs, ws) = (saved(found), saved(want));
    if fs != ws {
        diffs.push(format!(
            "modules_to_save are {fs:?} there, {ws:?} here (lora_modules_to_save)"
        ));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "does not match the config: {}; set the config to the adapter's values",
            diffs.join("; ")
        ))
    }
}

/// A trained adapter in memory: its `adapter_config.json` and tensors under PEFT's keys.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    pub config: AdapterConfig,
    pub tensors: BTreeMap<String, HostTensor>,
}

impl Adapter {
    /// Writes it as `adapter_model.safetensors` + `adapter_config.json` into `dir`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tensors: Vec<(String, HostTensor)> = self.tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        save(dir, &self.config, &tensors)
    }
}

pub fn lora_a_key(module: &str) -> String {
    format!("base_model.model.{module}.lora_A.weight")
}
pub fn lora_b_key(module: &str) -> String {
    format!("base_model.model.{module}.lora_B.weight")
}
/// PEFT's key for a fully trained module's weight (checkpoint name `model.x.weight`).
pub fn saved_module_key(weight_name: &str) -> String {
    format!("base_model.model.{weight_name}")
}

/// PEFT's initial values: A uniform in ±1/sqrt(in), B zero. Deterministic in `seed`.
pub fn init_pair(pair: &LoraPair, r: usize, seed: u64, index: usize, dtype: DType) -> (HostTensor, HostTensor) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let bound = 1.0 / (pair.in_features as f64).sqrt();
    let a: Vec<f64> = (0..r * pair.in_features)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    let a = HostTensor::from_f64(&[r, pair.in_features], &a).cast(dtype);
    let b = HostTensor::zeros(&[pair.out_features, r], dtype);
    (a, b)
}

/// The contents of `adapter_model.safetensors` and `adapter_config.json`, for places
/// without a file system (the browser offers them as downloads).
pub fn to_bytes(config: &AdapterConfig, tensors: &[(String, HostTensor)]) -> Result<(Vec<u8>, String)> {
    Ok((crate::model::safetensors_bytes(tensors, None)?, config.to_json()))
}

/// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir` (each file
/// written to a temporary name and renamed).
#[cfg(not(target_arch = "wasm32"))]
pub fn save(dir: &Path, config: &AdapterConfig, tensors: &[(String, HostTensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    crate::model::write_safetensors(&dir.join(ADAPTER_WEIGHTS), tensors, Some(meta))?;
    crate::model::atomic::write_atomic(&dir.join(ADAPTER_CONFIG), config.to_json().as_bytes())
}

/// Reads an adapter folder: its config and tensors (f32).
#[cfg(not(target_arch = "wasm32"))]
pub fn load(dir: &Path) -> Result<(AdapterConfig, BTreeMap<String, HostTensor>)> {
    let config = AdapterConfig::read(dir)?;
    let store = crate::model::WeightStore::open(&dir.join(ADAPTER_WEIGHTS))?;
    let mut tensors = BTreeMap::new();
    for name in store.names() {
        tensors.insert(name.to_string(), store.get(name, DType::F32)?);
    }
    Ok((config, tensors))
}

/// `W + scale * B @ A` for `W [out, in]`, `A [r, in]`, `B [out, r]`, computed in f64 and
/// returned in `W`'s dtype.
pub fn merge_weight(w: &HostTensor, a: &HostTensor, b: &HostTensor, scale: f64) -> Result<HostTensor> {
    let (&[out, inp], Some(&r)) = (w.shape.as_slice(), a.shape.first()) else {
        return Err(crate::msg!(
            "LoRA pairs apply to matrices; the weight has shape {:?} and A {:?}",
            w.shape,
            a.shape
        ));
    };
    if a.shape != [r, inp] || b.shape != [out, r] {
        return Err(crate::msg!(
            "LoRA shapes do not fit the weight {:?}: A {:?}, B {:?}",
            w.shape,
            a.shape,
            b.shape
        ));
    }
    let (wv, av, bv) = (w.to_f64(), a.to_f64(), b.to_f64());
    let mut m = wv;
    for o in 0..out {
        for k in 0..r {
            let s = scale * bv[o * r + k];
            if s == 0.0 {
                continue;
            }
            let arow = &av[k * inp..(k + 1) * inp];
            for (x, &aa) in m[o * inp..(o + 1) * inp].iter_mut().zip(arow) {
                *x += s * aa;
            }
        }
    }
    Ok(HostTensor::from_f64(&w.shape, &m).cast(w.dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_the_scaled_product_and_refuses_non_matrices() {
        // W + 0.5 * B A with B = [2, 0]^T, A = [1, 0]: only W[0][0] changes, by 1.
        let w = HostTensor::from_f32(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let a = HostTensor::from_f32(&[1, 2], &[1.0, 0.0]);
        let b = HostTensor::from_f32(&[2, 1], &[2.0, 0.0]);
        let m = merge_weight(&w, &a, &b, 0.5).unwrap();
        assert_eq!(m.to_f32(), vec![2.0, 2.0, 3.0, 4.0]);
        let norm = HostTensor::from_f32(&[2], &[1.0, 1.0]);
        let e = merge_weight(&norm, &a, &b, 0.5).unwrap_err().to_string();
        assert!(e.contains("apply to matrices"), "{e}");
        let e = merge_weight(&w, &HostTensor::from_f32(&[2], &[1.0, 0.0]), &b, 0.5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not fit"), "{e}");
    }
}
