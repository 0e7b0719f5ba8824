//! Where a run stands (`trainer_state.json`'s contents), kept in memory on every target;
//! [`super::checkpoint`] reads and writes it.

use serde::{Deserialize, Serialize};

/// Where the data loader stands: the next optimizer step to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub step_in_epoch: u64,
}

/// `trainer_state.json`: Hugging Face's keys plus what exact resume needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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
