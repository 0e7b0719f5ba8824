//! The WGSL backend's device layer and kernels, on wgpu: Vulkan, Metal, DX12 natively and
//! WebGPU in the browser.
//!
//! - [`context`]: adapter, device, queue and what they can do (f16, subgroups, tensor cores).
//! - [`pipelines`]: compute pipelines built once per (shader, specialization, entry point).
//! - [`buffers`]: storage buffers, uploads and read-backs that work natively and on wasm.
//! - [`matmul`]: batched, transposable matrix multiply with f32 accumulation.
//! - [`bench`]: matmul throughput in GFLOP/s.

#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
pub mod buffers;
pub mod context;
pub mod matmul;
pub mod pipelines;

pub use buffers::BufSlice;
pub use context::{list_adapters, AdapterSummary, WgslContext, WgslOptions};
pub use matmul::{encode_matmul, MatmulArgs, MatmulKernel, MatmulPlan};
