//! Inference: generation with a KV cache, and exact-match evaluation.

#[cfg(not(target_arch = "wasm32"))]
pub mod exact_match;
pub mod generate;
#[cfg(not(target_arch = "wasm32"))]
pub mod score;

pub use generate::{GenerateOptions, Generator};
