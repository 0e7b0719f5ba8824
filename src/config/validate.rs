//! Checks serde cannot express: ranges, conflicting keys, paths that must exist. Every
//! problem is reported at once, each with its key path and what is expected.

use super::{Config, Every};
use crate::model::llama::LINEAR_MODULES;
use crate::{Error, Result};
use std::path::Path;

/// Optimizer names accepted as our AdamW.
pub const ADAMW_NAMES: &[&str] = &["adamw_torch", "adamw_torch_fused", "adamw"];

impl Config {
    /// Every check, including that the files and folders the config names exist.
    pub fn validate(&self) -> Result<()> {
        self.check(true)
    }

    /// Every check except file existence, for a config whose model and data are given as
    /// bytes (in the browser).
    pub fn validate_without_files(&self) -> Result<()> {
        self.check(false)
    }

    fn check(&self, files: bool) -> Result<()> {
        let mut e: Vec<String> = Vec::new();
        need(
            &mut e,
            !self.base_model.trim().is_empty(),
            "base_model: must name a model folder or a .gguf file".into(),
        );
        need(
            &mut e,
            !self.datasets.is_empty(),
            "datasets: at least one dataset is required".into(),
        );
        need(
            &mut e,
            self.learning_rate.is_finite() && self.learning_rate > 0.0,
            format!("learning_rate: {} must be a positive number", self.learning_rate),
        );
        need(
            &mut e,
            self.gradient_accumulation_steps >= 1,
            "gradient_accumulation_steps: must be at least 1".into(),
        );
        need(
            &mut e,
            self.num_epochs > 0.0 && self.num_epochs.is_finite(),
            format!("num_epochs: {} must be a positive finite number", self.num_epochs),
        );
        if let Some(t) = self.ddp_timeout {
            let max = crate::dist::collective::MAX_TIMEOUT_SECS;
            need(
                &mut e,
                (1..=max).contains(&t),
                format!("ddp_timeout: {t} seconds must be between 1 and {max} (30 days)"),
            );
        }
        need(
            &mut e,
            self.max_steps != Some(0),
            "max_steps: must be at least 1 (or remove it)".into(),
        );
        need(
            &mut e,
            ADAMW_NAMES.contains(&self.optimizer.as_str()),
            format!(
                "optimizer: {:?} is not supported; supported: {}",
                self.optimizer,
                ADAMW_NAMES.join(", ")
            ),
        );
        need(
            &mut e,
            self.warmup_steps.is_none() || self.warmup_ratio.is_none(),
            "warmup_steps and warmup_ratio: set one of them, not both".into(),
        );
        if let Some(r) = self.warmup_ratio {
            need(
                &mut e,
                (0.0..1.0).contains(&r),
                format!("warmup_ratio: {r} must be in [0, 1)"),
            );
        }
        if let Some(r) = self.cosine_min_lr_ratio {
            need(
                &mut e,
                (0.0..=1.0).contains(&r),
                format!("cosine_min_lr_ratio: {r} must be in [0, 1]"),
            );
        }
        need(
            &mut e,
            self.weight_decay >= 0.0,
            format!("weight_decay: {} must be >= 0", self.weight_decay),
        );
        for (k, b) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            need(&mut e, (0.0..1.0).contains(&b), format!("{k}: {b} must be in [0, 1)"));
        }
        need(
            &mut e,
            self.adam_epsilon > 0.0,
            format!("adam_epsilon: {} must be positive", self.adam_epsilon),
        );
        need(
            &mut e,
            self.max_grad_norm >= 0.0,
            format!(
                "max_grad_norm: {} must be >= 0 (0 disables clipping)",
                self.max_grad_norm
            ),
        );
        need(
            &mut e,
            self.eval_steps.is_none() || self.evals_per_epoch.is_none(),
            "eval_steps and evals_per_epoch: set one of them, not both".into(),
        );
        need(
            &mut e,
            self.save_steps.is_none() || self.saves_per_epoch.is_none(),
            "save_steps and saves_per_epoch: set one of them, not both".into(),
        );
        for (k, v) in [("eval_steps", self.eval_steps), ("save_steps", self.save_steps)] {
            match v {
                Some(Every::Steps(0)) => e.push(format!("{k}: must be at least 1")),
                Some(Every::Fraction(f)) if !(f > 0.0 && f <= 1.0) => e.push(format!(
                    "{k}: {f} must be a step count or a fraction in (0, 1] of the total steps"
                )),
                _ => {}
            }
        }
        if self.fp16 == Some(super::Flag::On) {
            e.push("fp16: f16 training is not supported; use bf16 (the default, `auto`)".into());
        }
        if let Some(m) = &self.flex_attention_mask {
            use super::AttnImplementation as A;
            let imp = self.attn_implementation.unwrap_or_default();
            match super::flex_mask(Some(m)) {
                Err(err) => e.push(format!("flex_attention_mask: {err}")),
                Ok(f) if !f.is_plain() && !matches!(imp, A::FlexAttention | A::Eager) => e.push(format!(
                    "flex_attention_mask: needs `attn_implementation: flex_attention` (or `eager`, the reference), \
                     not `{}`",
                    imp.name()
                )),
                Ok(_) => {}
            }
        }
        if self.gradient_checkpointing {
            e.push(
                "gradient_checkpointing: not implemented yet; remove it (the memory plan is shown by `ferrotune plan`)"
                    .into(),
            );
        }

        match self.adapter.as_deref() {
            None => {
                for (k, set) in [
                    ("lora_target_modules", self.lora_target_modules.is_some()),
                    ("lora_model_dir", self.lora_model_dir.is_some()),
                    ("lora_modules_to_save", self.lora_modules_to_save.is_some()),
                ] {
                    need(&mut e, !set, format!("{k}: only used with `adapter: lora`"));
                }
            }
            Some("lora") => {
                need(&mut e, self.lora_r >= 1, "lora_r: must be at least 1".into());
                need(
                    &mut e,
                    self.lora_alpha > 0.0,
                    format!("lora_alpha: {} must be positive", self.lora_alpha),
                );
                need(
                    &mut e,
                    (0.0..1.0).contains(&self.lora_dropout),
                    format!("lora_dropout: {} must be in [0, 1)", self.lora_dropout),
                );
                need(
                    &mut e,
                    !(self.lora_target_linear && self.lora_target_modules.is_some()),
                    "lora_target_modules and lora_target_linear: set one of them, not both".into(),
                );
                for m in self.lora_target_modules.iter().flatten() {
                    need(
                        &mut e,
                        LINEAR_MODULES.contains(&m.as_str()),
                        format!(
                            "lora_target_modules: {m:?} is not a linear module; known: {}",
                            LINEAR_MODULES.join(", ")
                        ),
                    );
                }
                for m in self.lora_modules_to_save.iter().flatten() {
                    need(
                        &mut e,
                        m == "embed_tokens" || m == "lm_head",
                        format!("lora_modules_to_save: {m:?} is not supported; use embed_tokens or lm_head"),
                    );
                }
                if let Some(d) = &self.lora_model_dir {
                    need(
                        &mut e,
                        !files || d.join("adapter_model.safetensors").is_file(),
                        format!("lora_model_dir: {} has no adapter_model.safetensors", d.display()),
                    );
                }
            }
            Some("qlora") => e.push("adapter: qlora is not implemented yet; use `adapter: lora`".into()),
            Some(a) => e.push(format!(
                "adapter: {a:?} is not supported; use `lora`, or remove the key for full fine-tuning"
            )),
        }

        if let Err(err) = self.data.validate() {
            e.push(strip(err));
        }
        for (i, d) in self.datasets.iter().enumerate() {
            let at = format!("datasets[{i}]");
            if let Err(err) = d.validate(&at) {
                e.push(strip(err));
            }
            need(
                &mut e,
                !files || Path::new(&d.path).exists(),
                format!("{at}.path: {} does not exist", d.path),
            );
        }
        for (i, d) in self.test_datasets.iter().enumerate() {
            let at = format!("test_datasets[{i}]");
            if let Err(err) = d.validate(&at) {
                e.push(strip(err));
            }
            need(
                &mut e,
                !files || Path::new(&d.path).exists(),
                format!("{at}.path: {} does not exist", d.path),
            );
        }
        need(
            &mut e,
            self.test_datasets.is_empty() || self.data.val_set_size == 0.0,
            "test_datasets and val_set_size: use one source of evaluation data, not both".into(),
        );
        let base = Path::new(&self.base_model);
        need(
            &mut e,
            !files || base.is_dir() || (base.is_file() && self.base_model.ends_with(".gguf")),
            format!(
                "base_model: {} is neither a model folder nor a .gguf file (models come from local files; \
                 `ferrotune fetch smollm2-135m-instruct` installs one)",
                self.base_model
            ),
        );
        if let Some(r) = &self.resume_from_checkpoint {
            need(
                &mut e,
                !files || r.is_dir(),
                format!("resume_from_checkpoint: {} is not a checkpoint folder", r.display()),
            );
        }
        // `deepspeed` names a ZeRO json; read it now so a bad one fails before the model loads.
        if let Err(err) = crate::dist::ShardingConfig::from_config(self) {
            e.push(strip(err));
        }
        if e.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(e.join("\n")))
        }
    }
}

fn need(e: &mut Vec<String>, ok: bool, msg: String) {
    if !ok {
        e.push(msg);
    }
}

fn strip(e: Error) -> String {
    match e {
        Error::Config(m) => m,
        e => e.to_string(),
    }
}
