//! Adapters on top of a frozen base model.

pub mod lora;
pub mod merged;

pub use merged::MergedWeights;
