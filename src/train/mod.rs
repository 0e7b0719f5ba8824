//! Training: the step graph, the loop, schedules, checkpoints and metrics.

pub mod batches;
#[cfg(not(target_arch = "wasm32"))]
pub mod checkpoint;
#[cfg(not(target_arch = "wasm32"))]
pub mod run;
pub mod schedule;
pub mod session;
pub mod shard_graph;
pub mod state;
pub mod step_graph;
pub mod trainer;

pub use step_graph::{OptimizerOptions, TrainGraph};
