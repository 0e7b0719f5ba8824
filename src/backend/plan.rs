//! A backend that only records allocations: the executor plans memory against it so
//! `ferrotune plan` can report the peak of another device without touching it.

use super::{Arg, Backend, BufferId, Loc};
use crate::ops::Op;
use crate::Result;

pub struct PlanBackend {
    name: &'static str,
    alignment: u64,
    max_buffer: u64,
    allocated: u64,
    buffers: u32,
    fuses: bool,
}

impl PlanBackend {
    /// A device with this name, offset alignment and largest buffer.
    pub fn new(name: &'static str, alignment: u64, max_buffer: u64) -> Self {
        PlanBackend {
            name,
            alignment,
            max_buffer,
            allocated: 0,
            buffers: 0,
            fuses: matches!(name, "cpu" | "cuda"),
        }
    }

    /// Mirrors a device's alignment and largest buffer.
    pub fn like(real: &dyn Backend) -> Self {
        PlanBackend {
            name: real.name(),
            alignment: real.alignment(),
            max_buffer: real.max_buffer_bytes(),
            allocated: 0,
            buffers: 0,
            fuses: real.fuses_matmul_epilogues(),
        }
    }
}

impl Backend for PlanBackend {
    fn name(&self) -> &'static str {
        self.name
    }
    fn device_info(&self) -> String {
        format!("plan for {}", self.name)
    }
    fn max_buffer_bytes(&self) -> u64 {
        self.max_buffer
    }
    fn alignment(&self) -> u64 {
        self.alignment
    }
    fn fuses_matmul_epilogues(&self) -> bool {
        self.fuses
    }
    fn alloc(&mut self, bytes: u64) -> Result<BufferId> {
        self.allocated += bytes;
        self.buffers += 1;
        Ok(BufferId(self.buffers - 1))
    }
    fn allocated_bytes(&self) -> u64 {
        self.allocated
    }
    fn write(&mut self, _dst: Loc, _data: &[u8]) -> Result<()> {
        Ok(())
    }
    fn read(&mut self, src: &[Loc]) -> Result<Vec<Vec<u8>>> {
        Ok(src.iter().map(|l| vec![0; l.bytes as usize]).collect())
    }
    fn launch(&mut self, _op: &Op, _inputs: &[Arg], _outputs: &[Arg]) -> Result<()> {
        Ok(())
    }
}
