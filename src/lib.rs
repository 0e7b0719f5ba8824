//! ferrotune: fine-tune Hugging Face causal language models (LoRA, full) from an
//! axolotl-style YAML file, on the CPU, on any GPU through WGSL, and on NVIDIA through CUDA.
//!
//! The pieces, in the order a training run uses them: [`config`] parses the YAML,
//! [`data`] turns datasets into packed fixed-shape batches, [`model`] builds the forward
//! graph, [`graph`] appends the backward pass, [`exec`] plans memory and runs a step on a
//! [`backend`], and [`train`] drives the loop.

pub mod error;
pub mod model;

pub use error::{Error, Result};
pub mod tensor;
pub mod train;

pub use tensor::{DType, HostTensor};
pub mod backend;
pub mod exec;
pub mod graph;
pub mod ops;
