//! ferrotune: fine-tune Hugging Face causal language models (LoRA, full) from an
//! axolotl-style YAML file, on the CPU, on any GPU through WGSL, and on NVIDIA through CUDA.
//!
//! The pieces, in the order a training run uses them: [`config`] parses the YAML,
//! [`data`] turns datasets into packed fixed-shape batches, [`model`] builds the forward
//! graph, [`graph`] appends the backward pass, [`exec`] plans memory and runs a step on a
//! [`backend`], and [`train`] drives the loop. [`infer`] generates text with a KV cache.
//! [`progress`] reports long work to the embedding program.

pub mod adapters;
pub mod backend;
pub mod config;
pub mod data;
pub mod dist;
pub mod error;
pub mod exec;
pub mod graph;
pub mod infer;
pub mod model;
pub mod ops;
pub mod progress;
pub mod tensor;
pub mod train;

pub use config::Config;
pub use error::{Error, Result};
pub use tensor::{DType, HostTensor};
