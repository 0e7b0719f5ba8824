//! Model files: Hugging Face `config.json`, safetensors weights (single file or sharded),
//! GGUF reading and conversion to the HF layout, and fetching the SmolLM2 test model.
//! File access (memory maps, processes) exists only off the web; the config and RoPE
//! parts are available everywhere.

pub mod hf_config;
pub mod llama;
pub mod rope;
pub mod safetensors_mem;

#[cfg(not(target_arch = "wasm32"))]
pub mod atomic;
#[cfg(not(target_arch = "wasm32"))]
pub mod fetch;
#[cfg(not(target_arch = "wasm32"))]
pub mod gguf;
#[cfg(not(target_arch = "wasm32"))]
pub mod weights;
#[cfg(not(target_arch = "wasm32"))]
pub mod weights_write;

pub use hf_config::{Arch, ModelConfig, RopeScaling};
pub use rope::RopeInit;
pub use safetensors_mem::{read_safetensors_bytes, safetensors_bytes};

#[cfg(not(target_arch = "wasm32"))]
pub use fetch::fetch_smollm2_135m_instruct;
#[cfg(not(target_arch = "wasm32"))]
pub use gguf::convert::{convert_gguf, convert_gguf_with_progress};
#[cfg(not(target_arch = "wasm32"))]
pub use weights::WeightStore;
#[cfg(not(target_arch = "wasm32"))]
pub use weights_write::{write_safetensors, write_safetensors_sharded};
