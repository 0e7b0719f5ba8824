//! The WGSL backend on wgpu: Vulkan, Metal, DX12 natively and WebGPU in the browser.
//!
//! - [`context`]: adapter, device, queue and what they can do (f16, subgroups, tensor cores).
//! - [`pipelines`]: compute pipelines built once per (shader, specialization, entry point).
//! - [`buffers`]: storage buffers, uploads and read-backs that work natively and on wasm.
//! - [`matmul`]: batched, transposable matrix multiply with f32 accumulation.
//! - [`executor`]: [`WgslBackend`], the executor's `Backend`: arena buffers, one command
//!   encoder per step, and a kernel for every op (`kernels`, `shaders/*.wgsl`).
//! - [`bench`]: matmul throughput in GFLOP/s.

#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
pub mod buffers;
pub mod context;
pub mod executor;
mod kernels;
mod launch;
pub mod matmul;
pub mod pipelines;

pub use buffers::BufSlice;
#[cfg(not(target_arch = "wasm32"))]
pub use context::list_adapters_blocking;
pub use context::{list_adapters, AdapterSummary, WgslContext, WgslOptions};
pub use executor::WgslBackend;
#[cfg(not(target_arch = "wasm32"))]
pub use executor::{create, create_gpu_only};
pub use kernels::shader_files;
pub use matmul::{encode_matmul, MatmulArgs, MatmulKernel, MatmulPlan};
