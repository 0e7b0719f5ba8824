//! What is sharded across ranks, chosen with axolotl's keys: `deepspeed: <zero json>`
//! (`zero_optimization.stage` 0-3) or `fsdp_version` + `fsdp_config` (FSDP full shard is
//! ZeRO-3; `reshard_after_forward: false` keeps gathered parameters, which is ZeRO-2).
//! Ownership is by whole tensor: each trainable tensor's gradient reduction, optimizer
//! state and update belong to one rank, balanced by size.

use crate::config::Config;
use crate::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The ZeRO stage (0: plain data parallel).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Stage {
    /// Replicated everything; gradients all-reduced.
    DataParallel,
    /// Optimizer state sharded.
    Zero1,
    /// Optimizer state and gradients sharded (gradients reduce-scattered to their owner).
    Zero2,
    /// Also parameters (see docs/design.md for what this executor does and does not free).
    Zero3,
}

/// How checkpoints hold the optimizer state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum StateDict {
    /// One `optimizer.safetensors` written by rank 0.
    Full,
    /// `optimizer-rank<r>-of-<w>.safetensors` per rank.
    Sharded,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ShardingConfig {
    pub stage: Stage,
    pub state_dict: StateDict,
}

impl Default for ShardingConfig {
    fn default() -> Self {
        ShardingConfig {
            stage: Stage::DataParallel,
            state_dict: StateDict::Full,
        }
    }
}

/// `fsdp_config` (FSDP2 names; the `fsdp_` prefixed FSDP1 spellings are accepted too).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FsdpConfig {
    #[serde(default, alias = "fsdp_offload_params")]
    offload_params: bool,
    #[serde(default, alias = "fsdp_state_dict_type")]
    state_dict_type: Option<String>,
    #[serde(default, alias = "fsdp_reshard_after_forward")]
    reshard_after_forward: Option<bool>,
    #[serde(default, alias = "fsdp_auto_wrap_policy")]
    auto_wrap_policy: Option<String>,
    #[serde(default, alias = "fsdp_transformer_layer_cls_to_wrap")]
    transformer_layer_cls_to_wrap: Option<String>,
    #[serde(default, alias = "fsdp_cpu_ram_efficient_loading")]
    cpu_ram_efficient_loading: Option<bool>,
    #[serde(default, alias = "fsdp_activation_checkpointing")]
    activation_checkpointing: Option<bool>,
    #[serde(default, alias = "fsdp_sync_module_states")]
    sync_module_states: Option<bool>,
    #[serde(default, alias = "fsdp_use_orig_params")]
    use_orig_params: Option<bool>,
    #[serde(default, alias = "fsdp_version")]
    version: Option<u32>,
}

impl ShardingConfig {
    pub fn from_config(cfg: &Config) -> Result<ShardingConfig> {
        match (&cfg.deepspeed, cfg.fsdp_version.is_some() || cfg.fsdp_config.is_some()) {
            (Some(_), true) => Err(Error::Config(
                "deepspeed and fsdp_version/fsdp_config are both set; choose one".into(),
            )),
            (Some(path), false) => Self::from_deepspeed_file(Path::new(path)),
            (None, true) => Self::from_fsdp(cfg.fsdp_version, cfg.fsdp_config.as_ref()),
            (None, false) => Ok(ShardingConfig::default()),
        }
    }

    pub fn from_deepspeed_file(path: &Path) -> Result<ShardingConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "deepspeed: cannot read {} ({e}); give the path of a DeepSpeed ZeRO json \
                 (relative paths are from the working directory)",
                path.display()
            ))
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(path, format!("deepspeed: not a JSON file: {e}")))?;
        Self::from_deepspeed(&v).map_err(|e| Error::format(path, format!("deepspeed: {e}")))
    }

    /// A DeepSpeed config: only `zero_optimization` matters; batch sizes come from the YAML.
    pub fn from_deepspeed(v: &serde_json::Value) -> std::result::Result<ShardingConfig, String> {
        let zero = v.get("zero_optimization");
        let stage = match zero.and_then(|z| z.get("stage")) {
            None => 0,
            Some(s) => s
                .as_u64()
                .ok_or_else(|| format!("zero_optimization.stage is {s}, expected 0, 1, 2 or 3"))?,
        };
        for key in ["offload_optimizer", "offload_param"] {
            let dev = zero
                .and_then(|z| z.get(key))
                .and_then(|o| o.get("device"))
                .and_then(|d| d.as_str());
            if matches!(dev, Some(d) if d != "none") {
                return Err(format!("zero_optimization.{key} is not implemented; remove it"));
            }
        }
        let stage = match stage {
            0 => Stage::DataParallel,
            1 => Stage::Zero1,
            2 => Stage::Zero2,
            3 => Stage::Zero3,
            s => return Err(format!("zero_optimization.stage {s}: expected 0, 1, 2 or 3")),
        };
        Ok(ShardingConfig {
            stage,
            // DeepSpeed writes one optimizer file per rank.
            state_dict: if stage == Stage::DataParallel {
                StateDict::Full
            } else {
                StateDict::Sharded
            },
        })
    }

    pub fn from_fsdp(version: Option<u32>, config: Option<&serde_json::Value>) -> Result<ShardingConfig> {
        if let Some(v) = version {
            if v != 1 && v != 2 {
                return Err(Error::Config(format!("fsdp_version: {v}; expected 1 or 2")));
            }
        }
        let fc: FsdpConfig = match config {
            Some(v) => serde_path_to_error::deserialize(v.clone())
                .map_err(|e| Error::Config(format!("fsdp_config.{}: {}", e.path(), e.inner())))?,
            None => FsdpConfig::default(),
        };
        if fc.offload_params {
            return Err(Error::Config(
                "fsdp_config.offload_params: parameter offloading is not implemented; set it to false".into(),
            ));
        }
        let _ = (
            &fc.auto_wrap_policy,
            &fc.transformer_layer_cls_to_wrap,
            fc.cpu_ram_efficient_loading,
            fc.activation_checkpointing,
            fc.sync_module_states,
            fc.use_orig_params,
            fc.version,
        );
        let state_dict = match fc.state_dict_type.as_deref() {
            None | Some("FULL_STATE_DICT") => StateDict::Full,
            Some("SHARDED_STATE_DICT") => StateDict::Sharded,
            Some(other) => {
                return Err(Error::Config(format!(
                    "fsdp_config.state_dict_type: {other}; expected FULL_STATE_DICT or SHARDED_STATE_DICT"
                )))
            }
        };
        let stage = if fc.reshard_after_forward == Some(false) {
            Stage::Zero2
        } else {
            Stage::Zero3
        };
        Ok(ShardingConfig { stage, state_dict })
    }
}

/// The owning rank of each tensor: largest first onto the least-loaded rank (ties: lower
/// index, lower rank), so every rank computes the same assignment.
pub fn assign_owners(sizes: &[usize], world: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; world];
    let mut owner = vec![0; sizes.len()];
    for i in order {
        let r = (0..world).min_by_key(|&r| (load[r], r)).expect("world >= 1");
        owner[i] = r;
        load[r] += sizes[i];
    }
    owner
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_zero_stages_and_fsdp_keys() {
        let s = |v| ShardingConfig::from_deepspeed(&v).unwrap().stage;
        assert_eq!(s(json!({"zero_optimization": {"stage": 1}})), Stage::Zero1);
        assert_eq!(
            s(json!({"zero_optimization": {"stage": 2}, "train_batch_size": "auto"})),
            Stage::Zero2
        );
        assert_eq!(s(json!({"zero_optimization": {"stage": 3}})), Stage::Zero3);
        assert_eq!(s(json!({})), Stage::DataParallel);
        assert!(ShardingConfig::from_deepspeed(&json!({"zero_optimization": {"stage": 4}})).is_err());
        let off = json!({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}});
        assert!(ShardingConfig::from_deepspeed(&off)
            .unwrap_err()
            .contains("offload_param"));
        let f = ShardingConfig::from_fsdp(Some(2), Some(&json!({"state_dict_type": "SHARDED_STATE_DICT"}))).unwrap();
        assert_eq!((f.stage, f.state_dict), (Stage::Zero3, StateDict::Sharded));
        let f = ShardingConfig::from_fsdp(Some(2), Some(&json!({"reshard_after_forward": false}))).unwrap();
        assert_eq!((f.stage, f.state_dict), (Stage::Zero2, StateDict::Full));
        let e = ShardingConfig::from_fsdp(Some(2), Some(&json!({"offload_params": true}))).unwrap_err();
        assert!(e.to_string().contains("offload_params"));
        let e = ShardingConfig::from_fsdp(Some(2), Some(&json!({"reshard": true}))).unwrap_err();
        assert!(e.to_string().contains("reshard"), "{e}");
    }

    #[test]
    fn owners_balance_sizes() {
        let owners = assign_owners(&[10, 1, 1, 8, 2], 2);
        let load = |r| {
            (0..5)
                .filter(|&i| owners[i] == r)
                .map(|i| [10, 1, 1, 8, 2][i])
                .sum::<usize>()
        };
        assert_eq!(owners[0], 0);
        assert_eq!(owners[3], 1);
        assert_eq!((load(0), load(1)), (11, 11));
        assert_eq!(assign_owners(&[3, 3], 4), vec![0, 1]);
    }
}
