//! Training: the step graph, the loop, schedules, checkpoints and metrics.

pub mod step_graph;

pub use step_graph::{OptimizerOptions, TrainGraph};
