//! The seam between the executor and devices: allocate arena buffers, copy bytes in and
//! out, and launch one op on planned locations. Backends know kernels, not models, and
//! never learn about gradients (autodiff happened in the graph).

pub mod cpu;
#[cfg(all(feature = "cuda", not(target_arch = "wasm32")))]
pub mod cuda;
pub mod plan;
#[cfg(not(target_arch = "wasm32"))]
pub mod select;
pub mod wgsl;

use crate::graph::TensorInfo;
use crate::ops::Op;
use crate::Result;

/// A future that borrows the backend (no `Send`: wgpu's browser types are not).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + 'a>>;

/// Index of a buffer a backend allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufferId(pub u32);

/// Where a tensor lives: a byte range of one buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub buffer: BufferId,
    pub offset: u64,
    pub bytes: u64,
}

/// One operand of a launch: its location and its shape/dtype.
#[derive(Clone, Copy, Debug)]
pub struct Arg<'a> {
    pub loc: Loc,
    pub info: &'a TensorInfo,
}

pub trait Backend {
    /// Short name used in messages (`cpu`, `wgsl`, `cuda`).
    fn name(&self) -> &'static str;
    /// A human description of the device (adapter name, thread count).
    fn device_info(&self) -> String;
    /// The largest single buffer this device allows.
    fn max_buffer_bytes(&self) -> u64;
    /// Offsets of tensors inside buffers are multiples of this.
    fn alignment(&self) -> u64;
    fn alloc(&mut self, bytes: u64) -> Result<BufferId>;
    /// Bytes held by all buffers allocated so far.
    fn allocated_bytes(&self) -> u64;
    fn write(&mut self, dst: Loc, data: &[u8]) -> Result<()>;
    /// Reads several ranges at once (one synchronisation on asynchronous devices).
    fn read(&mut self, src: &[Loc]) -> Result<Vec<Vec<u8>>>;
    /// The same, without blocking: the browser cannot wait for the GPU on its main thread.
    fn read_async<'a>(&'a mut self, src: &'a [Loc]) -> BoxFuture<'a, Result<Vec<Vec<u8>>>> {
        Box::pin(std::future::ready(self.read(src)))
    }
    /// Called once per distinct op and operand shapes when a program is compiled, so
    /// kernels are created before the first step.
    fn prepare(&mut self, _op: &Op, _inputs: &[&TensorInfo], _outputs: &[&TensorInfo]) -> Result<()> {
        Ok(())
    }
    /// Records or runs one op. In-place ops write the inputs listed by `Op::writes`.
    fn launch(&mut self, op: &Op, inputs: &[Arg], outputs: &[Arg]) -> Result<()>;
    /// Whether this device runs [`Op::MatMulFused`] and [`Op::MatMulAccumulate`], so the
    /// executor may rewrite product epilogues into them (`graph::fuse`).
    fn fuses_matmul_epilogues(&self) -> bool {
        false
    }
    /// The storage type this device prefers for frozen half-precision weights.
    fn preferred_weight_dtype(&self) -> crate::tensor::DType {
        crate::tensor::DType::F32
    }
    /// Submits recorded work (a no-op on synchronous backends).
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    /// Called before the launches of one run of program `id` (the executor's index). A
    /// backend that recorded an earlier run (a CUDA graph) may replay it and return true:
    /// the caller then skips the launches. Inputs are written before this call, to the same
    /// planned locations every run, so a replay reads the new values.
    fn begin_program(&mut self, _id: usize) -> Result<bool> {
        Ok(false)
    }
    /// Called after the last launch of a run of program `id` (or after a replay), before
    /// `flush`.
    fn end_program(&mut self, _id: usize) -> Result<()> {
        Ok(())
    }
}
