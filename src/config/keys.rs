//! Which keys a config may hold: ours, axolotl's that we do not implement (named in the
//! error), and everything else (an error with the closest known key).

use crate::{Error, Result};
use serde_yaml::Value;

/// Every top-level key ferrotune reads.
pub const KNOWN_KEYS: &[&str] = &[
    // model and tokenizer
    "base_model",
    "base_model_config",
    "tokenizer_config",
    "special_tokens",
    // data
    "datasets",
    "test_datasets",
    "sequence_len",
    "train_on_inputs",
    "excess_length_strategy",
    "val_set_size",
    "shuffle",
    "seed",
    "dataset_prepared_path",
    "sample_packing",
    "sample_packing_group_size",
    "sample_packing_bin_size",
    "multipack_real_batches",
    "pad_to_sequence_len",
    "micro_batch_size",
    "chat_template",
    "chat_template_jinja",
    "eot_tokens",
    // optimisation
    "gradient_accumulation_steps",
    // multi-GPU
    "deepspeed",
    "fsdp_version",
    "fsdp_config",
    "ddp_timeout",
    "num_epochs",
    "max_steps",
    "learning_rate",
    "optimizer",
    "lr_scheduler",
    "cosine_min_lr_ratio",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "skip_nonfinite_steps",
    // evaluation, saving, logging
    "eval_steps",
    "evals_per_epoch",
    "save_steps",
    "saves_per_epoch",
    "save_total_limit",
    "save_only_model",
    "logging_steps",
    "output_dir",
    "resume_from_checkpoint",
    "auto_resume_from_checkpoints",
    "eval_max_new_tokens",
    // precision and device
    "bf16",
    "fp16",
    "tf32",
    "device",
    "gradient_checkpointing",
    "attn_implementation",
    "flex_attention_mask",
    // LoRA
    "adapter",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_linear",
    "peft_use_rslora",
    "lora_modules_to_save",
    "lora_model_dir",
];

/// The top-level keys read into [`crate::data::DataOptions`].
pub const DATA_OPTION_KEYS: &[&str] = &[
    "sequence_len",
    "train_on_inputs",
    "excess_length_strategy",
    "val_set_size",
    "shuffle",
    "seed",
    "dataset_prepared_path",
    "sample_packing",
    "sample_packing_group_size",
    "sample_packing_bin_size",
    "multipack_real_batches",
    "pad_to_sequence_len",
    "micro_batch_size",
    "chat_template",
    "chat_template_jinja",
    "eot_tokens",
];

/// Only the entries of a mapping whose keys are in `keep`.
pub fn subset(v: &Value, keep: &[&str]) -> Value {
    match v {
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .filter(|(k, _)| k.as_str().is_some_and(|k| keep.contains(&k)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Keys of a `datasets[]` entry.
pub const DATASET_KEYS: &[&str] = &[
    "path",
    "type",
    "ds_type",
    "field",
    "field_messages",
    "message_property_mappings",
    "roles_to_train",
    "train_on_eos",
    "chat_template",
    "chat_template_jinja",
    "split",
    "data_files",
];

/// axolotl keys that ferrotune does not implement yet, with what to do instead.
pub const UNSUPPORTED_KEYS: &[(&str, &str)] = &[
    (
        "load_in_4bit",
        "QLoRA (4-bit base weights) is not implemented yet; train LoRA over bf16/f32 weights",
    ),
    (
        "load_in_8bit",
        "8-bit base weights are not implemented yet; train LoRA over bf16/f32 weights",
    ),
    ("gptq", "GPTQ checkpoints are not supported yet"),
    ("bnb_config_kwargs", "bitsandbytes quantization is not implemented yet"),
    ("peft_use_dora", "DoRA is not implemented yet; use plain LoRA"),
    ("loraplus_lr_ratio", "LoRA+ is not implemented yet"),
    ("lora_rank_pattern", "per-module ranks are not implemented yet"),
    ("lora_alpha_pattern", "per-module alphas are not implemented yet"),
    (
        "peft_init_lora_weights",
        "only PEFT's default LoRA initialisation is implemented",
    ),
    (
        "lora_target_parameters",
        "LoRA on expert parameters is not implemented yet",
    ),
    (
        "lora_mlp_kernel",
        "fused LoRA kernels are chosen by the backend; remove the key",
    ),
    (
        "lora_qkv_kernel",
        "fused LoRA kernels are chosen by the backend; remove the key",
    ),
    (
        "lora_o_kernel",
        "fused LoRA kernels are chosen by the backend; remove the key",
    ),
    (
        "fsdp",
        "the FSDP1 list is not read; use fsdp_version: 2 with fsdp_config",
    ),
    ("context_parallel_size", "sequence parallelism is not implemented yet"),
    ("tensor_parallel_size", "tensor parallelism is not implemented yet"),
    (
        "plugins",
        "axolotl plugins do not apply; ferrotune's kernels are built in",
    ),
    ("liger_rms_norm", "fused kernels are built in; remove the key"),
    ("liger_glu_activation", "fused kernels are built in; remove the key"),
    ("liger_rope", "fused kernels are built in; remove the key"),
    ("liger_cross_entropy", "fused kernels are built in; remove the key"),
    (
        "liger_fused_linear_cross_entropy",
        "fused kernels are built in; remove the key",
    ),
    ("cut_cross_entropy", "not implemented yet"),
    ("chunked_cross_entropy", "not implemented yet"),
    ("activation_offloading", "not implemented yet"),
    ("layer_offloading", "not implemented yet"),
    ("tiled_mlp", "not implemented yet"),
    ("fp8", "FP8 training is not implemented yet"),
    ("qat", "quantization-aware training is not implemented yet"),
    (
        "torch_compile",
        "there is no torch here; kernels are compiled by ferrotune",
    ),
    ("rl", "preference and RL training are not implemented yet"),
    ("tokens", "adding new tokens is not implemented yet"),
    (
        "trust_remote_code",
        "only Llama, Mistral and Qwen2 architectures are built in",
    ),
    ("overrides_of_model_config", "not implemented yet"),
    (
        "rope_scaling",
        "deprecated in axolotl; RoPE scaling is read from the model's config.json",
    ),
    ("selective_checkpointing", "not implemented yet"),
    ("gradient_checkpointing_kwargs", "not implemented yet"),
    (
        "eval_sample_packing",
        "evaluation batches are packed like training batches",
    ),
    (
        "sample_packing_eff_est",
        "packing efficiency is computed, not estimated",
    ),
    ("save_strategy", "use save_steps or saves_per_epoch"),
    ("eval_strategy", "use eval_steps or evals_per_epoch"),
    (
        "wandb_project",
        "Weights & Biases logging is not implemented; metrics go to output_dir/metrics.jsonl",
    ),
    (
        "wandb_entity",
        "Weights & Biases logging is not implemented; metrics go to output_dir/metrics.jsonl",
    ),
    (
        "wandb_name",
        "Weights & Biases logging is not implemented; metrics go to output_dir/metrics.jsonl",
    ),
    (
        "wandb_watch",
        "Weights & Biases logging is not implemented; metrics go to output_dir/metrics.jsonl",
    ),
    (
        "wandb_log_model",
        "Weights & Biases logging is not implemented; metrics go to output_dir/metrics.jsonl",
    ),
    ("hub_model_id", "ferrotune works with local files only"),
    ("push_dataset_to_hub", "ferrotune works with local files only"),
    ("early_stopping_patience", "not implemented yet"),
    ("group_by_length", "not implemented yet"),
    ("neftune_noise_alpha", "not implemented yet"),
    ("model_type", "the architecture is read from the model's config.json"),
    ("tokenizer_type", "the tokenizer is read from tokenizer.json"),
];

/// The known key closest to `key` (Levenshtein distance at most a third of its length).
pub fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(key, k), *k))
        .filter(|(d, k)| *d <= k.len().max(key.len()) / 3 + 1)
        .min()
        .map(|(_, k)| k)
}

fn unknown(path: &str, key: &str, known: &[&str]) -> String {
    match closest(key, known) {
        Some(c) => format!("{path}{key}: unknown key; did you mean `{c}`?"),
        None => format!("{path}{key}: unknown key (see docs/config.md for the supported keys)"),
    }
}

/// Checks every key of the document; reports all problems at once.
pub fn check_keys(v: &Value) -> Result<()> {
    let Value::Mapping(map) = v else {
        return Err(Error::Config(
            "the config must be a YAML mapping of keys to values".into(),
        ));
    };
    let mut errs = Vec::new();
    for (k, val) in map {
        let Some(k) = k.as_str() else {
            errs.push(format!("{k:?}: keys must be strings"));
            continue;
        };
        if let Some((_, why)) = UNSUPPORTED_KEYS.iter().find(|(u, _)| *u == k) {
            errs.push(format!("{k}: this axolotl key is not supported by ferrotune: {why}"));
        } else if k.starts_with("liger_") || k.starts_with("wandb_") || k.starts_with("mlflow_") {
            errs.push(format!("{k}: this axolotl key is not supported by ferrotune"));
        } else if !KNOWN_KEYS.contains(&k) {
            errs.push(unknown("", k, KNOWN_KEYS));
        } else if k == "datasets" || k == "test_datasets" {
            if let Value::Sequence(items) = val {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Mapping(m) = item {
                        for dk in m.keys().filter_map(|x| x.as_str()) {
                            if !DATASET_KEYS.contains(&dk) {
                                errs.push(unknown(&format!("{k}[{i}]."), dk, DATASET_KEYS));
                            }
                        }
                    }
                }
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(errs.join("\n")))
    }
}

/// Applies `key=value` (value parsed as YAML; `a.b.0.c` paths into maps and lists).
pub fn apply_override(doc: &mut Value, kv: &str) -> Result<()> {
    let (path, raw) = kv.split_once('=').ok_or_else(|| {
        Error::Config(format!(
            "--set {kv:?}: expected key=value, e.g. --set learning_rate=1e-4"
        ))
    })?;
    let value: Value = serde_yaml::from_str(raw)
        .map_err(|e| Error::Config(format!("--set {path}: value {raw:?} is not YAML: {e}")))?;
    let mut cur = doc;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        cur = match cur {
            Value::Sequence(items) => {
                let idx: usize = part
                    .parse()
                    .map_err(|_| Error::Config(format!("--set {path}: {part:?} must be a list index")))?;
                let len = items.len();
                items.get_mut(idx).ok_or_else(|| {
                    Error::Config(format!("--set {path}: index {idx} is past the end of a list of {len}"))
                })?
            }
            Value::Mapping(m) => {
                let key = Value::String(part.to_string());
                if last {
                    m.insert(key, value);
                    return Ok(());
                }
                m.entry(key).or_insert(Value::Mapping(Default::default()))
            }
            _ => {
                return Err(Error::Config(format!(
                    "--set {path}: {part:?} is inside a value that is not a map"
                )))
            }
        };
        if last {
            *cur = value;
            return Ok(());
        }
    }
    Ok(())
}
