//! Collectives over NCCL through cudarc, one process per GPU. The host-buffer operations
//! copy to the device, run the collective on the rank's stream and copy back; a watchdog
//! polls for completion and aborts the communicator after the timeout, since a rank that
//! died leaves NCCL waiting forever.

use super::collective::{check_chunks, Collective};
use crate::{Error, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The NCCL unique id is this many bytes.
pub const ID_BYTES: usize = 128;

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::backend("nccl", format!("{what}: {e:?}"))
}

/// Checks that the CUDA driver and NCCL libraries can be loaded (before any call into them).
pub fn libraries_present() -> Result<()> {
    // SAFETY: these only try to open the shared libraries.
    let present = unsafe {
        [
            ("libcuda", cudarc::driver::sys::is_culib_present()),
            ("libnccl", cudarc::nccl::sys::is_culib_present()),
        ]
    };
    let missing: Vec<&str> = present.iter().filter(|(_, ok)| !ok).map(|(n, _)| *n).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::backend(
            "nccl",
            format!(
                "{} not found; install the NVIDIA driver and NCCL, or use the tcp collective (FERROTUNE_COLLECTIVE=tcp)",
                missing.join(" and ")
            ),
        ))
    }
}

/// A fresh NCCL unique id (rank 0 creates it and the rendezvous hands it to the others).
pub fn unique_id() -> Result<Vec<u8>> {
    libraries_present()?;
    let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

pub struct NcclCollective {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
}

// SAFETY: a communicator may move between threads; `&mut self` on every operation keeps
// calls from overlapping, which is what NCCL requires.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Joins the communicator on GPU `local_rank` with the id from the rendezvous.
    pub fn new(local_rank: usize, rank: usize, world: usize, id: &[u8], timeout: Duration) -> Result<Self> {
        libraries_present()?;
        if id.len() != ID_BYTES {
            return Err(crate::msg!(
                "nccl: the unique id has {} bytes, expected {ID_BYTES}",
                id.len()
            ));
        }
        let ctx = CudaContext::new(local_rank).map_err(|e| nccl_err(&format!("CUDA device {local_rank}"), e))?;
        let stream = ctx.new_stream().map_err(|e| nccl_err("stream", e))?;
        let mut raw = [0 as std::ffi::c_char; ID_BYTES];
        raw.iter_mut().zip(id).for_each(|(r, &b)| *r = b as std::ffi::c_char);
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(raw))
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(NcclCollective {
            comm,
            stream,
            rank,
            world,
            timeout,
        })
    }

    fn upload(&self, v: &[f32]) -> Result<CudaSlice<f32>> {
        // NCCL rejects zero-length buffers on some versions; keep one element.
        if v.is_empty() {
            return self
                .stream
                .clone_htod(&[0f32])
                .map_err(|e| nccl_err("copy to device", e));
        }
        self.stream.clone_htod(v).map_err(|e| nccl_err("copy to device", e))
    }

    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream
            .alloc_zeros::<f32>(n.max(1))
            .map_err(|e| nccl_err("device allocation", e))
    }

    /// Waits for the enqueued collective, naming the timeout when it does not finish.
    fn wait(&self, op: &str) -> Result<()> {
        let ev = self.stream.record_event(None).map_err(|e| nccl_err("event", e))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            if ev.try_is_complete().map_err(|e| nccl_err(op, e))? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::backend(
                    "nccl",
                    format!(
                        "rank {}: {op} did not complete within {:.0} s; another rank died or hangs \
                         (`ferrotune launch` names ranks that exited)",
                        self.rank,
                        self.timeout.as_secs_f64()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn download(&self, d: &CudaSlice<f32>, out: &mut [f32]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let v = self.stream.clone_dtoh(d).map_err(|e| nccl_err("copy to host", e))?;
        out.copy_from_slice(&v[..out.len()]);
        Ok(())
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn kind(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()> {
        let mut d = self.upload(buf)?;
        self.comm
            .all_reduce_in_place(&mut d, &ReduceOp::Sum)
            .map_err(|e| nccl_err("all_reduce", e))?;
        self.wait("all_reduce")?;
        self.download(&d, buf)
    }

    fn reduce_scatter(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_chunks("reduce_scatter", self.world, send.len(), recv.len())?;
        if recv.is_empty() {
            return self.barrier();
        }
        let s = self.upload(send)?;
        let mut r = self.alloc(recv.len())?;
        self.comm
            .reduce_scatter(&s, &mut r, &ReduceOp::Sum)
            .map_err(|e| nccl_err("reduce_scatter", e))?;
        self.wait("reduce_scatter")?;
        self.download(&r, recv)
    }

    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_chunks("all_gather", self.world, recv.len(), send.len())?;
        if send.is_empty() {
            return self.barrier();
        }
        let s = self.upload(send)?;
        let mut r = self.alloc(recv.len())?;
        self.comm
            .all_gather(&s, &mut r)
            .map_err(|e| nccl_err("all_gather", e))?;
        self.wait("all_gather")?;
        self.download(&r, recv)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(crate::msg!("broadcast: root {root} is not a rank of {}", self.world));
        }
        let mut d = self.upload(buf)?;
        self.comm
            .broadcast_in_place(&mut d, root as i32)
            .map_err(|e| nccl_err("broadcast", e))?;
        self.wait("broadcast")?;
        self.download(&d, buf)
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = [0f32];
        self.all_reduce(&mut one)
    }
}
