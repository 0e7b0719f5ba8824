//! `checkpoint-N/` folders: trainable weights, optimizer state, `trainer_state.json`, and the
//! config. A checkpoint is written into a temporary folder and renamed when complete, so a
//! crash, a full disk or Ctrl-C never leaves a half-written `checkpoint-N` behind.

use crate::tensor::HostTensor;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

pub const TRAINER_STATE: &str = "trainer_state.json";
pub const RESUME_STATE: &str = "ferrotune_state.json";
pub const OPTIMIZER_STATE: &str = "optimizer.safetensors";

pub use super::state::{DataPosition, TrainerState};

/// Everything a checkpoint holds.
pub struct Checkpoint<'a> {
    /// Weight files: (file name, tensors), e.g. the adapter or the model.
    pub weights: Vec<(&'a str, Vec<(String, HostTensor)>)>,
    pub optimizer: Vec<(String, HostTensor)>,
    pub state: &'a TrainerState,
    /// Small extra files (adapter_config.json, config.yaml, ...).
    pub files: Vec<(&'a str, Vec<u8>)>,
}

pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Writes `output_dir/checkpoint-<step>` atomically and returns its path.
pub fn write(output_dir: &Path, ck: &Checkpoint) -> Result<PathBuf> {
    std::fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
    let final_dir = checkpoint_dir(output_dir, ck.state.global_step);
    let tmp = output_dir.join(format!(
        ".checkpoint-{}.tmp-{}",
        ck.state.global_step,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        for (name, tensors) in &ck.weights {
            crate::model::write_safetensors(&tmp.join(name), tensors, None)?;
        }
        // Sharded optimizer state comes as per-rank files in `files` instead.
        if !ck.optimizer.is_empty() {
            crate::model::write_safetensors(&tmp.join(OPTIMIZER_STATE), &ck.optimizer, None)?;
        }
        for (name, bytes) in &ck.files {
            crate::model::atomic::write_atomic(&tmp.join(name), bytes)?;
        }
        // The state files go last, trainer_state.json after ours: a folder without it is
        // never taken as a checkpoint.
        let (hf, ours) = ck.state.to_json_files();
        crate::model::atomic::write_atomic(&tmp.join(RESUME_STATE), &ours)?;
        crate::model::atomic::write_atomic(&tmp.join(TRAINER_STATE), &hf)?;
        crate::model::atomic::sync_dir(&tmp)?;
        if final_dir.exists() {
            let old = output_dir.join(format!(
                ".checkpoint-{}.old-{}",
                ck.state.global_step,
                std::process::id()
            ));
            std::fs::rename(&final_dir, &old).map_err(|e| Error::io(&final_dir, e))?;
            std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        }
        // The rename itself is durable before rotation may delete older checkpoints.
        crate::model::atomic::sync_dir(output_dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|_| final_dir)
}

/// Complete checkpoints in `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join(TRAINER_STATE).is_file().then(|| (step, e.path()))
        })
        .collect();
    v.sort();
    v
}

pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    list(output_dir).pop().map(|(_, p)| p)
}

/// Deletes the oldest checkpoints beyond `limit` (Hugging Face's `save_total_limit`),
/// never `keep` (the one just written, which counts towards the limit).
pub fn rotate(output_dir: &Path, limit: usize, keep: &Path) -> Result<()> {
    let others: Vec<PathBuf> = list(output_dir)
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| p != keep)
        .collect();
    let excess = (others.len() + 1).saturating_sub(limit.max(1));
    for p in &others[..excess] {
        std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e))?;
    }
    Ok(())
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    // Checkpoints of earlier versions kept the resume keys in trainer_state.json.
    let hf_path = dir.join(TRAINER_STATE);
    let ours_path = Some(dir.join(RESUME_STATE))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| hf_path.clone());
    let paths = [hf_path, ours_path];
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Error::io(p, e));
    TrainerState::from_json_files(&read(&paths[0])?, &read(&paths[1])?)
        .map_err(|(i, e)| Error::format(&paths[i], format!("not a ferrotune checkpoint's state: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_is_atomic_and_rotation_keeps_the_newest() {
        let dir = std::env::temp_dir().join(format!("ft-ck-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for step in [2u64, 4, 6] {
            let state = TrainerState {
                global_step: step,
                ..Default::default()
            };
            let t = HostTensor::from_f32(&[2], &[1.0, step as f32]);
            let ck = Checkpoint {
                weights: vec![("adapter_model.safetensors", vec![("w".into(), t.clone())])],
                optimizer: vec![("w.exp_avg".into(), t)],
                state: &state,
                files: vec![("config.yaml", b"x: 1\n".to_vec())],
            };
            write(&dir, &ck).unwrap();
        }
        // A folder left by an interrupted write is never listed.
        std::fs::create_dir_all(dir.join("checkpoint-9")).unwrap();
        assert_eq!(list(&dir).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![2, 4, 6]);
        rotate(&dir, 2, &checkpoint_dir(&dir, 6)).unwrap();
        assert_eq!(list(&dir).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4, 6]);
        assert_eq!(read_state(&latest(&dir).unwrap()).unwrap().global_step, 6);
        // The checkpoint just written stays even when an older run left higher steps.
        rotate(&dir, 1, &checkpoint_dir(&dir, 4)).unwrap();
        assert_eq!(list(&dir).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4]);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_checkpoint_with_the_earlier_single_state_file_still_reads() {
        let dir = std::env::temp_dir().join(format!("ft-ck-old-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = r#"{"global_step": 3, "epoch": 0.5, "max_steps": 6, "num_train_epochs": 1.0,
            "train_batch_size": 2, "log_history": [], "position": {"epoch": 0, "step_in_epoch": 3},
            "micro_step": 6, "tokens_seen": 120, "seed": 42, "config_hash": "h"}"#;
        std::fs::write(dir.join(TRAINER_STATE), old).unwrap();
        let s = read_state(&dir).unwrap();
        assert_eq!((s.global_step, s.micro_step, s.tokens_seen, s.seed), (3, 6, 120, 42));
        assert_eq!(s.position.step_in_epoch, 3);
        assert_eq!(s.config_hash, "h");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_previous_checkpoint_intact() {
        let dir = std::env::temp_dir().join(format!("ft-ck-fail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t = HostTensor::from_f32(&[2], &[1.0, 2.0]);
        let state = TrainerState {
            global_step: 5,
            ..Default::default()
        };
        let ck = |state| Checkpoint {
            weights: vec![("adapter_model.safetensors", vec![("w".into(), t.clone())])],
            optimizer: vec![],
            state,
            files: vec![],
        };
        write(&dir, &ck(&state)).unwrap();
        let before = std::fs::read(dir.join("checkpoint-5/adapter_model.safetensors")).unwrap();
        // Re-saving step 5 fails part-way: a file sits where the temporary folder goes
        // (as a full disk or a crash would stop the write).
        let blocker = dir.join(format!(".checkpoint-5.tmp-{}", std::process::id()));
        std::fs::write(&blocker, b"").unwrap();
        let newer = TrainerState {
            global_step: 5,
            epoch: 9.0,
            ..Default::default()
        };
        assert!(write(&dir, &ck(&newer)).is_err());
        assert_eq!(
            std::fs::read(dir.join("checkpoint-5/adapter_model.safetensors")).unwrap(),
            before
        );
        assert_eq!(read_state(&dir.join("checkpoint-5")).unwrap().epoch, 0.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
