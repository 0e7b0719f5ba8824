//! Where a run stands, kept in memory on every target; [`super::checkpoint`] writes it as
//! `trainer_state.json` (only the keys transformers' `TrainerState` knows, so Hugging Face
//! tools load it) and `ferrotune_state.json` (what an exact resume needs besides).

use serde::{Deserialize, Serialize};

/// Where the data loader stands: the next optimizer step to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub step_in_epoch: u64,
}

/// Hugging Face's trainer state plus what exact resume needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainerState {
    pub global_step: u64,
    pub epoch: f64,
    pub max_steps: u64,
    pub num_train_epochs: f64,
    pub train_batch_size: usize,
    pub log_history: Vec<serde_json::Value>,
    /// The next batch to train on.
    pub position: DataPosition,
    /// Micro-batches run so far (dropout masks are seeded from it).
    pub micro_step: u64,
    pub tokens_seen: u64,
    pub seed: u64,
    /// sha256 of the config's data and model keys; resuming with other data is refused.
    pub config_hash: String,
}

/// `trainer_state.json`: a subset of transformers' `TrainerState` fields under its names
/// (`TrainerState.load_from_json` refuses unknown keys).
#[derive(Serialize, Deserialize)]
struct HfTrainerState {
    global_step: u64,
    epoch: f64,
    max_steps: u64,
    num_train_epochs: f64,
    train_batch_size: usize,
    /// `tokens_seen` in checkpoints of earlier versions, which kept everything in one file.
    #[serde(alias = "tokens_seen")]
    num_input_tokens_seen: u64,
    log_history: Vec<serde_json::Value>,
}

/// `ferrotune_state.json`: the rest of [`TrainerState`].
#[derive(Serialize, Deserialize)]
struct ResumeState {
    position: DataPosition,
    micro_step: u64,
    seed: u64,
    config_hash: String,
}

impl TrainerState {
    /// The two files' contents: (`trainer_state.json`, `ferrotune_state.json`).
    pub fn to_json_files(&self) -> (Vec<u8>, Vec<u8>) {
        let hf = HfTrainerState {
            global_step: self.global_step,
            epoch: self.epoch,
            max_steps: self.max_steps,
            num_train_epochs: self.num_train_epochs,
            train_batch_size: self.train_batch_size,
            num_input_tokens_seen: self.tokens_seen,
            log_history: self.log_history.clone(),
        };
        let ours = ResumeState {
            position: self.position,
            micro_step: self.micro_step,
            seed: self.seed,
            config_hash: self.config_hash.clone(),
        };
        let json = |v: serde_json::Result<Vec<u8>>| v.expect("plain data serializes");
        (
            json(serde_json::to_vec_pretty(&hf)),
            json(serde_json::to_vec_pretty(&ours)),
        )
    }

    /// The state from the two files' contents; an error names the file that is not ours.
    pub fn from_json_files(hf: &str, ours: &str) -> std::result::Result<Self, (usize, serde_json::Error)> {
        let hf: HfTrainerState = serde_json::from_str(hf).map_err(|e| (0, e))?;
        let ours: ResumeState = serde_json::from_str(ours).map_err(|e| (1, e))?;
        Ok(TrainerState {
            global_step: hf.global_step,
            epoch: hf.epoch,
            max_steps: hf.max_steps,
            num_train_epochs: hf.num_train_epochs,
            train_batch_size: hf.train_batch_size,
            log_history: hf.log_history,
            position: ours.position,
            micro_step: ours.micro_step,
            tokens_seen: hf.num_input_tokens_seen,
            seed: ours.seed,
            config_hash: ours.config_hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_round_trips_and_trainer_state_json_has_only_hugging_face_keys() {
        let s = TrainerState {
            global_step: 7,
            epoch: 1.75,
            max_steps: 8,
            num_train_epochs: 2.0,
            train_batch_size: 4,
            log_history: vec![serde_json::json!({"step": 7, "loss": 0.5})],
            position: DataPosition {
                epoch: 1,
                step_in_epoch: 3,
            },
            micro_step: 14,
            tokens_seen: 900,
            seed: 42,
            config_hash: "abc".into(),
        };
        let (hf, ours) = s.to_json_files();
        let back =
            TrainerState::from_json_files(std::str::from_utf8(&hf).unwrap(), std::str::from_utf8(&ours).unwrap())
                .unwrap();
        assert_eq!(back, s);
        // The fields of transformers' `TrainerState` dataclass (trainer_callback.py, v4.40
        // to v5): `TrainerState.load_from_json` passes every key to its constructor.
        const HF_FIELDS: &[&str] = &[
            "epoch",
            "global_step",
            "max_steps",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "train_batch_size",
            "num_train_epochs",
            "num_input_tokens_seen",
            "total_flos",
            "log_history",
            "best_metric",
            "best_global_step",
            "best_model_checkpoint",
            "is_local_process_zero",
            "is_world_process_zero",
            "is_hyper_param_search",
            "trial_name",
            "trial_params",
            "stateful_callbacks",
        ];
        let v: serde_json::Value = serde_json::from_slice(&hf).unwrap();
        for k in v.as_object().unwrap().keys() {
            assert!(HF_FIELDS.contains(&k.as_str()), "{k} is not a TrainerState field");
        }
        assert_eq!(v["num_input_tokens_seen"], 900);
    }
}
