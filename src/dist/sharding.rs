//! What is sharded across ranks, chosen with axolotl's keys: `deepspeed: <zero json>`
//! (`zero_optimization.stage` 0-3) or `fsdp_version` + `fsdp_config` (FSDP shards
//! parameters, which is ZeRO-3; `reshard_after_forward: false` keeps a micro-batch's
//! gathered parameters from the forward to the backward pass instead of gathering them
//! again). Sharding is flat, as in FSDP and DeepSpeed: every trainable tensor is cut into
//! `world_size` equal slices ([`ShardLayout`]) and rank r owns slice r of each, so every
//! rank holds about `1/world_size` of each sharded kind of memory.

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
    /// Also parameters: gathered per layer before use and freed after it.
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
    /// ZeRO-3: gather the parameters again for the backward pass (FSDP's and DeepSpeed's
    /// default), or keep the forward's gathered copies until their backward use (`false`).
    pub reshard_after_forward: bool,
}

impl Default for ShardingConfig {
    fn default() -> Self {
        ShardingConfig {
            stage: Stage::DataParallel,
            state_dict: StateDict::Full,
            reshard_after_forward: true,
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
            reshard_after_forward: true,
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
        Ok(ShardingConfig {
            stage: Stage::Zero3,
            state_dict,
            reshard_after_forward: fc.reshard_after_forward.unwrap_or(true),
        })
    }
}

/// Slices start at multiples of this many elements (256 bytes of f32), so a slice of a
/// tensor is a view at an offset every backend can bind.
pub const SHARD_ALIGN: usize = 64;

/// Flat sharding of the trainable tensors over `world` ranks: tensor i (`numel` elements)
/// is cut into slices of `chunk(i)` elements (`numel / world` rounded up to [`SHARD_ALIGN`]);
/// rank r owns elements `[r * chunk, (r + 1) * chunk)` of it, clipped to the tensor, so the
/// last ranks' slices may be shorter or empty. Every rank computes the same layout.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardLayout {
    pub rank: usize,
    pub world: usize,
    numel: Vec<usize>,
    chunk: Vec<usize>,
}

impl ShardLayout {
    pub fn new(sizes: &[usize], rank: usize, world: usize) -> Self {
        let world = world.max(1);
        ShardLayout {
            rank,
            world,
            numel: sizes.to_vec(),
            chunk: sizes
                .iter()
                .map(|&n| n.div_ceil(world).next_multiple_of(SHARD_ALIGN).max(SHARD_ALIGN))
                .collect(),
        }
    }
    /// How many tensors the layout covers.
    pub fn tensors(&self) -> usize {
        self.numel.len()
    }
    pub fn numel(&self, i: usize) -> usize {
        self.numel[i]
    }
    /// Every rank's slot for tensor i in a packed collective buffer.
    pub fn chunk(&self, i: usize) -> usize {
        self.chunk[i]
    }
    /// The elements of tensor i that rank r owns.
    pub fn range(&self, i: usize, r: usize) -> std::ops::Range<usize> {
        let (n, c) = (self.numel[i], self.chunk[i]);
        (r * c).min(n)..((r + 1) * c).min(n)
    }
    /// The elements of tensor i that this rank owns.
    pub fn mine(&self, i: usize) -> std::ops::Range<usize> {
        self.range(i, self.rank)
    }
}

/// A sharded step graph's layout: the stage, the gathering policy and the slices.
#[derive(Clone, Debug)]
pub struct ShardSpec {
    pub stage: Stage,
    pub reshard_after_forward: bool,
    pub layout: ShardLayout,
}

/// What a host call of a sharded step graph does (`Op::HostCall`'s id indexes a list of these).
#[derive(Clone, Debug, PartialEq)]
pub enum ShardCall {
    /// All-gather of trainable tensors `.0` (layout indices): the inputs are this rank's
    /// non-empty slices of them, in order; the outputs are their full values.
    Gather(Vec<usize>),
    /// Reduce-scatter of the gradients of trainable tensors `.0`: the inputs are this rank's
    /// full gradients; the outputs are its slices of their sums over ranks, for the tensors
    /// whose slice is not empty.
    ReduceScatter(Vec<usize>),
    /// All-gather of frozen base weights (ZeRO-3) with these element counts, sliced as
    /// [`ShardLayout`] slices them: the inputs are this rank's non-empty slices, in order;
    /// the outputs are the full tensors.
    GatherFrozen(Vec<usize>),
}

/// Elements `r` of `t`, flattened, in `t`'s dtype.
pub fn slice_flat(t: &crate::tensor::HostTensor, r: std::ops::Range<usize>) -> crate::tensor::HostTensor {
    let size = t.dtype.size();
    crate::tensor::HostTensor {
        shape: vec![r.len()],
        dtype: t.dtype,
        data: t.data[r.start * size..r.end * size].to_vec(),
    }
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
        assert_eq!(
            (f.stage, f.state_dict, f.reshard_after_forward),
            (Stage::Zero3, StateDict::Full, false)
        );
        let e = ShardingConfig::from_fsdp(Some(2), Some(&json!({"offload_params": true}))).unwrap_err();
        assert!(e.to_string().contains("offload_params"));
        let e = ShardingConfig::from_fsdp(Some(2), Some(&json!({"reshard": true}))).unwrap_err();
        assert!(e.to_string().contains("reshard"), "{e}");
    }

    #[test]
    fn slices_cover_each_tensor_once_at_aligned_offsets() {
        let sizes = [1000, 16, 64 * 5, 0];
        for world in [1, 2, 3, 4] {
            for (i, &n) in sizes.iter().enumerate() {
                let l = ShardLayout::new(&sizes, 0, world);
                let mut next = 0;
                for r in 0..world {
                    let s = l.range(i, r);
                    assert_eq!(s.start, next, "tensor {i} world {world} rank {r}");
                    assert!(s.start.is_multiple_of(SHARD_ALIGN) || s.is_empty());
                    assert!(s.len() <= l.chunk(i));
                    next = s.end;
                }
                assert_eq!(next, n);
                // No rank holds more than its even share plus one alignment unit.
                let most = (0..world).map(|r| l.range(i, r).len()).max().unwrap();
                assert!(most <= n.div_ceil(world) + SHARD_ALIGN, "{most} of {n} on {world}");
            }
        }
        let l = ShardLayout::new(&[1000], 3, 4);
        assert_eq!((l.chunk(0), l.mine(0)), (256, 768..1000));
        let t = crate::tensor::HostTensor::from_f32(&[2, 3], &[0., 1., 2., 3., 4., 5.]);
        assert_eq!(slice_flat(&t, 2..5).to_f32(), vec![2., 3., 4.]);
    }
}
