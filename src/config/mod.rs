//! The training config: axolotl's key names and defaults
//! (`src/axolotl/utils/schemas/{model,config,training,peft,datasets}.py`), read from
//! YAML and checked before anything is loaded. Unknown keys are errors that suggest the
//! closest known key; axolotl keys we do not implement are errors that say so by name.

mod attention;
mod keys;
mod validate;

use crate::data::{DataOptions, DatasetSpec};
use crate::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};

pub use attention::{flex_mask, AttnImplementation, LEGACY_FLAGS};
pub use keys::{KNOWN_KEYS, UNSUPPORTED_KEYS};

fn path_error(e: serde_path_to_error::Error<serde_yaml::Error>) -> Error {
    let path = e.path().to_string();
    let inner = e.into_inner().to_string();
    if path == "." {
        Error::Config(inner)
    } else {
        Error::Config(format!("{path}: {inner}"))
    }
}

/// `bf16` / `fp16` / `tf32`: `auto` or a boolean.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Flag {
    #[default]
    Auto,
    On,
    Off,
}

/// Written the way it is read: `auto`, `true` or `false`.
impl Serialize for Flag {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Flag::Auto => s.serialize_str("auto"),
            Flag::On => s.serialize_bool(true),
            Flag::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            B(bool),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::B(true) => Ok(Flag::On),
            Raw::B(false) => Ok(Flag::Off),
            Raw::S(s) if s == "auto" => Ok(Flag::Auto),
            Raw::S(s) => Err(serde::de::Error::custom(format!(
                "expected true, false or auto, got {s:?}"
            ))),
        }
    }
}

/// A learning rate given as a number or a string such as `"2e-4"` (axolotl accepts both).
fn number_or_string<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        F(f64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::F(f) => Ok(f),
        Raw::S(s) => s
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a number"))),
    }
}

/// An interval given as a step count (integer) or a fraction of the total steps (float).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Every {
    Steps(u64),
    Fraction(f64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Wgsl,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    Cosine,
    Linear,
    Constant,
    ConstantWithWarmup,
}

/// Overrides of the tokenizer's special tokens.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecialTokens {
    pub pad_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_token: Option<String>,
    pub unk_token: Option<String>,
}

fn d_output_dir() -> PathBuf {
    PathBuf::from("./model-out")
}
fn d_one() -> usize {
    1
}
fn d_epochs() -> f64 {
    1.0
}
fn d_optimizer() -> String {
    "adamw_torch_fused".into()
}
fn d_scheduler() -> Scheduler {
    Scheduler::Cosine
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_max_grad_norm() -> f64 {
    1.0
}
fn d_lora_r() -> usize {
    8
}
fn d_lora_alpha() -> f64 {
    8.0
}
fn d_eval_max_new_tokens() -> usize {
    32
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    /// A model folder (`config.json` + safetensors + tokenizer) or a `.gguf` file.
    pub base_model: String,
    #[serde(default)]
    pub base_model_config: Option<String>,
    #[serde(default)]
    pub tokenizer_config: Option<String>,
    #[serde(default)]
    pub datasets: Vec<DatasetSpec>,
    /// Held-out evaluation data in separate files (instead of `val_set_size`).
    #[serde(default)]
    pub test_datasets: Vec<DatasetSpec>,
    #[serde(flatten)]
    pub data: DataOptions,
    #[serde(default)]
    pub special_tokens: Option<SpecialTokens>,

    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "d_epochs")]
    pub num_epochs: f64,
    #[serde(default)]
    pub max_steps: Option<u64>,
    #[serde(deserialize_with = "number_or_string")]
    pub learning_rate: f64,
    #[serde(default = "d_optimizer")]
    pub optimizer: String,
    #[serde(default = "d_scheduler")]
    pub lr_scheduler: Scheduler,
    #[serde(default)]
    pub cosine_min_lr_ratio: Option<f64>,
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    #[serde(default)]
    pub warmup_ratio: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    #[serde(default = "d_max_grad_norm")]
    pub max_grad_norm: f64,

    #[serde(default)]
    pub eval_steps: Option<Every>,
    #[serde(default)]
    pub evals_per_epoch: Option<u64>,
    #[serde(default)]
    pub save_steps: Option<Every>,
    #[serde(default)]
    pub saves_per_epoch: Option<u64>,
    #[serde(default)]
    pub save_total_limit: Option<usize>,
    #[serde(default)]
    pub save_only_model: bool,
    #[serde(default)]
    pub logging_steps: Option<u64>,
    #[serde(default = "d_output_dir")]
    pub output_dir: PathBuf,
    #[serde(default)]
    pub resume_from_checkpoint: Option<PathBuf>,
    #[serde(default)]
    pub auto_resume_from_checkpoints: bool,
    /// Skip optimizer steps whose loss or gradient is NaN or infinite instead of stopping.
    #[serde(default)]
    pub skip_nonfinite_steps: bool,
    /// Tokens generated per answer when `eval` measures exact match.
    #[serde(default = "d_eval_max_new_tokens")]
    pub eval_max_new_tokens: usize,

    #[serde(default)]
    pub bf16: Flag,
    #[serde(default)]
    pub fp16: Option<Flag>,
    #[serde(default)]
    pub tf32: Flag,
    #[serde(default)]
    pub device: DeviceChoice,
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// `sdpa` when unset; see [`AttnImplementation`].
    #[serde(default)]
    pub attn_implementation: Option<AttnImplementation>,
    /// `causal` (default), `prefix_lm`, or a mask expression (`q_idx >= kv_idx && ...`).
    #[serde(default)]
    pub flex_attention_mask: Option<String>,

    #[serde(default)]
    pub adapter: Option<String>,
    #[serde(default = "d_lora_r")]
    pub lora_r: usize,
    #[serde(default = "d_lora_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub lora_target_modules: Option<Vec<String>>,
    #[serde(default)]
    pub lora_target_linear: bool,
    #[serde(default)]
    pub peft_use_rslora: bool,
    #[serde(default)]
    pub lora_modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub lora_model_dir: Option<PathBuf>,

    /// A DeepSpeed json whose `zero_optimization.stage` selects ZeRO-1/2/3 (multi-GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deepspeed: Option<String>,
    /// FSDP (parameters sharded) with `fsdp_config` (multi-GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsdp_version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsdp_config: Option<serde_json::Value>,
    /// Seconds a rank waits in a collective before naming the ranks that did not arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ddp_timeout: Option<u64>,
}

impl Config {
    /// A config built in code: the model, the datasets and the learning rate (which axolotl
    /// requires), every other key at its default, as if the YAML named only these three.
    /// Set other fields directly, then call [`Config::validate`] (`train` validates too):
    ///
    /// ```no_run
    /// use ferrotune::data::{DatasetSpec, DatasetType};
    /// let mut cfg = ferrotune::Config::new(
    ///     "models/SmolLM2-135M-Instruct",
    ///     vec![DatasetSpec::new("data/train.jsonl", DatasetType::ChatTemplate)],
    ///     2e-4,
    /// );
    /// cfg.adapter = Some("lora".into());
    /// cfg.lora_r = 16;
    /// cfg.data.sequence_len = 1024;
    /// cfg.validate()?;
    /// # Ok::<(), ferrotune::Error>(())
    /// ```
    pub fn new(base_model: impl Into<String>, datasets: Vec<DatasetSpec>, learning_rate: f64) -> Config {
        // The serde defaults are the single source of axolotl's defaults.
        let mut cfg: Config = serde_json::from_value(serde_json::json!({"base_model": "", "learning_rate": 1.0}))
            .expect("every key but base_model and learning_rate has a default");
        cfg.base_model = base_model.into();
        cfg.datasets = datasets;
        cfg.learning_rate = learning_rate;
        cfg
    }

    /// Reads and checks a YAML config. Relative paths in it stay relative to the current
    /// directory, as in axolotl.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_yaml(&text, &[])
    }

    /// Parses YAML text, applies `key=value` overrides (`--set`), then checks keys and types.
    pub fn from_yaml(text: &str, overrides: &[String]) -> Result<Config> {
        let cfg = Self::parse_yaml(text, overrides)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`Config::from_yaml`] for a run whose model and datasets are given as bytes rather
    /// than paths (in the browser): the paths it names are not checked.
    pub fn from_yaml_without_files(text: &str) -> Result<Config> {
        let cfg = Self::parse_yaml(text, &[])?;
        cfg.validate_without_files()?;
        Ok(cfg)
    }

    fn parse_yaml(text: &str, overrides: &[String]) -> Result<Config> {
        let mut value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| Error::Config(format!("the file is not valid YAML: {e}")))?;
        if value.is_null() {
            return Err(Error::Config(
                "the config is empty; `base_model`, `datasets` and `learning_rate` are required".into(),
            ));
        }
        for o in overrides {
            keys::apply_override(&mut value, o)?;
        }
        attention::normalize_legacy_flags(&mut value)?;
        keys::check_keys(&value)?;
        // The data keys are flattened into Config, where serde loses their names: read them
        // on their own first so a type error names its key.
        serde_path_to_error::deserialize::<_, DataOptions>(keys::subset(&value, keys::DATA_OPTION_KEYS))
            .map_err(path_error)?;
        serde_path_to_error::deserialize(value).map_err(path_error)
    }

    /// True when training LoRA adapters rather than every weight.
    pub fn is_lora(&self) -> bool {
        self.adapter.is_some()
    }

    /// The LoRA target modules after `lora_target_linear` and PEFT's Llama default.
    pub fn lora_targets(&self) -> Vec<String> {
        if self.lora_target_linear {
            return crate::model::llama::LINEAR_MODULES
                .iter()
                .map(|s| s.to_string())
                .collect();
        }
        match &self.lora_target_modules {
            Some(t) => t.clone(),
            // PEFT's default for the Llama family.
            None => vec!["q_proj".into(), "v_proj".into()],
        }
    }

    /// The attention implementation and mask terms the model graph is built with.
    pub fn attn_options(&self) -> Result<crate::model::llama::AttnOptions> {
        let flex = flex_mask(self.flex_attention_mask.as_deref())
            .map_err(|e| Error::Config(format!("flex_attention_mask: {e}")))?;
        Ok(crate::model::llama::AttnOptions {
            eager: self.attn_implementation.unwrap_or_default().is_eager(),
            flex,
        })
    }

    /// The same config as YAML (saved beside checkpoints).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }

    /// Map of every key to its value, for `trainer_state.json` and the config hash.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}
