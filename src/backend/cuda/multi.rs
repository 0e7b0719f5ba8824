//! Multi-tensor launches (as apex's multi_tensor_apply): one kernel walks a table of chunks,
//! each at most CHUNK elements of one tensor. sum_squares covers all its inputs in one launch;
//! AdamW nodes are queued as the executor launches them and issued as one kernel when another
//! op, `flush`, `read` or the end of a program comes, which keeps their order with every
//! other op. Tables are uploaded once and kept by content, so a replayed CUDA graph finds the
//! same device table.

use super::gpu::Args;
use super::kernels::Family;
use super::ops::dt_code;
use super::CudaBackend;
use crate::backend::Arg;
use crate::graph::TensorInfo;
use crate::ops::AdamWSpec;
use crate::tensor::DType;
use crate::{Error, Result};

/// Elements per chunk (a multiple of 4 for the float4 accesses of adamw_kernel).
const CHUNK: u64 = 1 << 16;

/// One AdamW tensor: p, g, m, v, hyper, coef pointers, element count, spec, coef dtype.
#[derive(Clone, Debug)]
pub struct AdamEntry {
    ptrs: [u64; 6],
    n: u64,
    spec: [f64; 4],
    coef_dt: i32,
}

pub fn sumsq_chunks(inputs: &[&TensorInfo]) -> u64 {
    inputs
        .iter()
        .map(|t| (t.numel() as u64).div_ceil(CHUNK))
        .sum::<u64>()
        .max(1)
}

impl CudaBackend {
    /// The device copy of a table, uploaded on first use.
    fn table(&mut self, words: Vec<u64>) -> Result<u64> {
        if let Some(&p) = self.tables.get(&words) {
            return Ok(p);
        }
        if self.graphs.capturing() {
            return Err(Error::backend(
                "cuda",
                "a multi-tensor table is new while a program is being captured",
            ));
        }
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        let p = self.gpu.alloc(bytes.len() as u64)?;
        self.gpu.htod(p, bytes)?;
        self.tables.insert(words, p);
        Ok(p)
    }

    pub(super) fn sum_squares(&mut self, inputs: &[Arg], out: &Arg) -> Result<()> {
        let mut words = Vec::new();
        for a in inputs {
            let dt = dt_code(a.info.dtype)? as u64;
            let n = a.info.numel() as u64;
            let base = self.ptr(a.loc);
            let mut start = 0;
            while start < n {
                let len = CHUNK.min(n - start);
                words.extend_from_slice(&[base, start, len, dt]);
                start += len;
            }
        }
        let infos: Vec<&TensorInfo> = inputs.iter().map(|a| a.info).collect();
        let chunks = (words.len() / 4) as u64;
        let partial = self.carve(&[sumsq_chunks(&infos) * 4])?[0];
        let outp = self.ptr(out.loc);
        let odt = dt_code(out.info.dtype)?;
        if chunks == 0 {
            self.gpu.memset32(partial, 0, 1)?;
        } else {
            let table = self.table(words)?;
            let k = self.kernel(Family::Optim, "sumsq_partial")?;
            self.run(&k, (chunks as u32, 1, 1), 256, 0, Args::new().ptr(table).ptr(partial))?;
        }
        let k = self.kernel(Family::Optim, "sumsq_final")?;
        self.run(
            &k,
            (1, 1, 1),
            256,
            0,
            Args::new().ptr(partial).i32(chunks.max(1) as i32).ptr(outp).i32(odt),
        )
    }

    pub(super) fn queue_adamw(&mut self, spec: &AdamWSpec, i: &[Arg]) -> Result<()> {
        for (a, what) in i[..4]
            .iter()
            .zip(["parameter", "gradient", "first moment", "second moment"])
        {
            if a.info.dtype != DType::F32 {
                return Err(Error::backend(
                    "cuda",
                    format!("AdamW takes an f32 {what}, got {} ({})", a.info.dtype, a.info.name),
                ));
            }
        }
        if i[4].info.dtype != DType::F32 || i[4].info.numel() != 3 {
            return Err(Error::backend("cuda", "AdamW hyperparameters must be [3] f32"));
        }
        let coef_dt = dt_code(i[5].info.dtype)?;
        let ptrs = [0, 1, 2, 3, 4, 5].map(|k| self.ptr(i[k].loc));
        self.pending_adamw.push(AdamEntry {
            ptrs,
            n: i[0].info.numel() as u64,
            spec: [spec.beta1, spec.beta2, spec.eps, spec.weight_decay],
            coef_dt,
        });
        Ok(())
    }

    pub(super) fn launch_adamw(&mut self, entries: &[AdamEntry]) -> Result<()> {
        // Layout of struct AdamChunk in cuda/optim.cu: 6 pointers, start, len, 4 doubles, coef dtype.
        let mut words = Vec::new();
        for e in entries {
            let mut start = 0;
            while start < e.n {
                let len = CHUNK.min(e.n - start);
                words.extend_from_slice(&e.ptrs);
                words.extend_from_slice(&[start, len]);
                words.extend(e.spec.iter().map(|f| f.to_bits()));
                words.push(e.coef_dt as u64);
                start += len;
            }
        }
        let chunks = words.len() / 13;
        if chunks == 0 {
            return Ok(());
        }
        let table = self.table(words)?;
        let k = self.kernel(Family::Optim, "adamw_kernel")?;
        self.run(&k, (chunks as u32, 1, 1), 256, 0, Args::new().ptr(table))
    }
}
