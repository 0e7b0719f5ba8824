//! GGUF (llama.cpp's model file): reading, dequantising and converting to the HF layout.
//! Format reference: ggml/docs/gguf.md in the ggml repository.

pub mod convert;
pub mod dequant;
pub mod names;
pub mod reader;
pub mod tokenizer;
pub mod types;

pub use reader::{GgufFile, GgufTensorInfo, GgufValue};
pub use types::GgmlType;
