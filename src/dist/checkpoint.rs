//! The optimizer state of a data-parallel checkpoint: one `optimizer.safetensors` (every
//! rank's slices gathered to rank 0) or one `optimizer-rank<r>-of-<w>.safetensors` per
//! rank, holding that rank's slices; its `__metadata__` entry `ferrotune.slices` records
//! where each slice starts and its tensor's full shape. Reading puts the full tensors
//! together again, so the shards of one world size load into any other (and into a single
//! process): every rank reads them all and keeps its own slices.

use super::data_parallel::DataParallel;
use super::sharding::StateDict;
use crate::graph::TensorInfo;
use crate::model::WeightStore;
use crate::tensor::HostTensor;
use crate::train::checkpoint::OPTIMIZER_STATE;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The metadata key of a shard file: `{name: [start, [full shape]]}` as JSON.
const SLICES_KEY: &str = "ferrotune.slices";

/// The slices of one tensor found in the shard files: its full shape and (start, values,
/// file) of each slice.
type Pieces = (Vec<usize>, Vec<(usize, HostTensor, PathBuf)>);

/// What rank 0 puts into the checkpoint folder for the optimizer.
pub struct OptimizerFiles {
    /// For `optimizer.safetensors` (empty when the state is sharded).
    pub tensors: Vec<(String, HostTensor)>,
    /// Per-rank shard files: (file name, bytes).
    pub files: Vec<(String, Vec<u8>)>,
    /// A staging folder to delete once the checkpoint is written.
    pub staging: Option<PathBuf>,
}

pub fn shard_file_name(rank: usize, world: usize) -> String {
    format!("optimizer-rank{rank:05}-of-{world:05}.safetensors")
}

fn parse_shard_name(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("optimizer-rank")?.strip_suffix(".safetensors")?;
    let (r, w) = rest.split_once("-of-")?;
    Some((r.parse().ok()?, w.parse().ok()?))
}

/// Collects the optimizer state for a checkpoint at `step`. `own` is this rank's
/// `<name>.exp_avg` / `.exp_avg_sq` tensors (its slices, flattened, when sharded),
/// `trainable` every trainable tensor in assignment order. Returns `Some` on rank 0 (which
/// writes the checkpoint), `None` elsewhere.
pub fn collect(
    dp: &mut DataParallel,
    own: Vec<(String, HostTensor)>,
    trainable: &[TensorInfo],
    output_dir: &Path,
    step: u64,
) -> Result<Option<OptimizerFiles>> {
    let (rank, world) = (dp.rank(), dp.world_size());
    if !dp.is_sharded() {
        // Every rank holds the same state.
        return Ok((rank == 0).then_some(OptimizerFiles {
            tensors: own,
            files: Vec::new(),
            staging: None,
        }));
    }
    match dp.sharding.state_dict {
        StateDict::Full => {
            let own: BTreeMap<String, HostTensor> = own.into_iter().collect();
            let mut gathered = Vec::new();
            for suffix in ["exp_avg", "exp_avg_sq"] {
                let mine: Vec<Vec<f32>> = trainable
                    .iter()
                    .map(|t| {
                        own.get(&format!("{}.{suffix}", t.name))
                            .map(|v| v.to_f32())
                            .unwrap_or_default()
                    })
                    .collect();
                gathered.push(dp.gather_all(&mine)?);
            }
            if rank != 0 {
                return Ok(None);
            }
            let mut tensors = Vec::new();
            for (i, t) in trainable.iter().enumerate() {
                for (k, suffix) in ["exp_avg", "exp_avg_sq"].iter().enumerate() {
                    let v = HostTensor::from_f32(&t.shape, &gathered[k][i]).cast(t.dtype);
                    tensors.push((format!("{}.{suffix}", t.name), v));
                }
            }
            Ok(Some(OptimizerFiles {
                tensors,
                files: Vec::new(),
                staging: None,
            }))
        }
        StateDict::Sharded => {
            // Every rank writes its shard beside the checkpoint; rank 0 then moves them into
            // the checkpoint folder before it is renamed into place, so a checkpoint is
            // complete or absent.
            let staging = output_dir.join(format!(".checkpoint-{step}.shards"));
            std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
            let path = staging.join(shard_file_name(rank, world));
            let layout = dp.layout()?.clone();
            let mut slices = serde_json::Map::new();
            for (i, t) in trainable.iter().enumerate() {
                for suffix in ["exp_avg", "exp_avg_sq"] {
                    let name = format!("{}.{suffix}", t.name);
                    if own.iter().any(|(n, _)| *n == name) {
                        slices.insert(name, serde_json::json!([layout.mine(i).start, t.shape]));
                    }
                }
            }
            let meta = HashMap::from([
                ("format".to_string(), "pt".to_string()),
                (SLICES_KEY.to_string(), serde_json::Value::Object(slices).to_string()),
            ]);
            crate::model::write_safetensors(&path, &own, Some(meta))?;
            dp.barrier()?;
            if rank != 0 {
                return Ok(None);
            }
            let mut files = Vec::new();
            for r in 0..world {
                let name = shard_file_name(r, world);
                let p = staging.join(&name);
                files.push((name, std::fs::read(&p).map_err(|e| Error::io(&p, e))?));
            }
            Ok(Some(OptimizerFiles {
                tensors: Vec::new(),
                files,
                staging: Some(staging),
            }))
        }
    }
}

/// The optimizer state of a checkpoint folder, whole or sharded, by tensor name.
pub fn read(dir: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let whole = dir.join(OPTIMIZER_STATE);
    if whole.is_file() {
        return read_all(&whole);
    }
    let mut shards: Vec<(usize, usize, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .filter_map(|e| {
            let (r, w) = parse_shard_name(&e.file_name().to_string_lossy())?;
            Some((r, w, e.path()))
        })
        .collect();
    shards.sort();
    let Some(&(_, world, _)) = shards.first() else {
        return Err(Error::format(
            dir,
            format!(
                "the checkpoint has no optimizer state ({OPTIMIZER_STATE} or optimizer-rank*-of-*.safetensors), so \
                 it cannot resume a run (a run with `save_only_model: true` writes such checkpoints); start a new \
                 run from its weights instead (`lora_model_dir` for an adapter, `base_model` for a full model)"
            ),
        ));
    };
    let ranks: Vec<usize> = shards.iter().filter(|s| s.1 == world).map(|s| s.0).collect();
    if shards.iter().any(|s| s.1 != world) || ranks != (0..world).collect::<Vec<_>>() {
        return Err(Error::format(
            dir,
            format!(
                "the optimizer shards are incomplete or mixed: expected ranks 0..{world} of {world}, found {ranks:?}"
            ),
        ));
    }
    let mut all = BTreeMap::new();
    let mut pieces: BTreeMap<String, Pieces> = BTreeMap::new();
    for (_, _, p) in &shards {
        let store = WeightStore::open(p)?;
        let slices: Option<serde_json::Map<String, serde_json::Value>> = match store.metadata().get(SLICES_KEY) {
            Some(text) => Some(
                serde_json::from_str(text)
                    .map_err(|e| Error::format(p, format!("{SLICES_KEY} is not a JSON object: {e}")))?,
            ),
            None => None,
        };
        for n in store.names() {
            let t = store.get_raw(n)?;
            let slice = slices.as_ref().and_then(|s| s.get(n));
            let Some(slice) = slice else {
                // A whole tensor (shards of one tensor per owner).
                if all.insert(n.to_string(), t).is_some() {
                    return Err(Error::format(p, format!("{n} appears in two optimizer shards")));
                }
                continue;
            };
            let (start, shape): (usize, Vec<usize>) = serde_json::from_value(slice.clone())
                .map_err(|e| Error::format(p, format!("{SLICES_KEY}: {n}: expected [start, shape]: {e}")))?;
            let e = pieces
                .entry(n.to_string())
                .or_insert_with(|| (shape.clone(), Vec::new()));
            if e.0 != shape {
                return Err(Error::format(
                    p,
                    format!("{n} has shape {shape:?} here and {:?} in another shard", e.0),
                ));
            }
            e.1.push((start, t, p.clone()));
        }
    }
    for (name, (shape, mut parts)) in pieces {
        parts.sort_by_key(|(s, _, _)| *s);
        let dtype = parts[0].1.dtype;
        let mut data = Vec::new();
        let mut next = 0;
        for (start, t, p) in &parts {
            if *start != next || t.dtype != dtype {
                return Err(Error::format(
                    p,
                    format!(
                        "{name}: the slice at element {start} does not continue the others (expected {next}, {dtype})"
                    ),
                ));
            }
            next += t.numel();
            data.extend_from_slice(&t.data);
        }
        if next != crate::tensor::numel(&shape) {
            return Err(Error::format(
                dir,
                format!(
                    "{name}: the shards hold {next} of its {} elements",
                    crate::tensor::numel(&shape)
                ),
            ));
        }
        if all.contains_key(&name) {
            return Err(Error::format(dir, format!("{name} appears in two optimizer shards")));
        }
        all.insert(name, HostTensor { shape, dtype, data });
    }
    Ok(all)
}

fn read_all(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let store = WeightStore::open(path)?;
    store
        .names()
        .iter()
        .map(|n| Ok((n.to_string(), store.get_raw(n)?)))
        .collect()
}
