//! Inference: generation with a KV cache, and exact-match evaluation.

pub mod generate;

pub use generate::{GenerateOptions, Generator};
