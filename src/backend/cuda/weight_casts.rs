//! Persistent 16-bit copies of f32 weights read by 16-bit products.
//!
//! A product of bf16 activations with an f32 trainable weight (LoRA's A and B) rounds the
//! weight to bf16 first (matmul.rs). Cast into scratch at every use, that is four small
//! cast launches per LoRA linear and step, each costing more in launch latency than in
//! work. Instead, each parameter or frozen weight a product casts gets a persistent copy:
//! the first program run that meets it registers it (and casts it alone); at the first
//! use in every later run, one multi-tensor launch recasts all registered weights, and
//! every use reads its copy. Copies are current from that launch until the program ends,
//! the host writes a tensor, or an op writes one of the weights in place (AdamW), so a
//! captured CUDA graph replays the recast exactly where the eager run did it.

use super::gpu::Args;
use super::kernels::Family;
use super::ops::dt_code;
use super::CudaBackend;
use crate::backend::Arg;
use crate::graph::Role;
use crate::tensor::DType;
use crate::Result;
use std::collections::HashMap;

/// Elements per chunk of the multi-tensor cast (one block each).
const CHUNK: u64 = 1 << 16;
/// Device memory the copies may take; weights beyond it are cast into scratch per use.
const BUDGET_BYTES: u64 = 256 << 20;

#[derive(Clone, Copy, Debug)]
struct Entry {
    src: u64,
    dst: u64,
    n: u64,
    src_dt: DType,
    dst_dt: DType,
}

#[derive(Default)]
pub struct WeightCasts {
    entries: Vec<Entry>,
    /// (source pointer, target type) to entry.
    index: HashMap<(u64, DType), usize>,
    /// The copies hold the weights' current values.
    current: bool,
    /// Device table of all entries (rebuilt outside capture when entries were added).
    table: Option<u64>,
    /// Earlier tables, kept while captured graphs may still read them.
    retired: Vec<u64>,
    bytes: u64,
}

impl WeightCasts {
    /// Copies are stale: a program starts, or the host or an op wrote a tensor.
    pub fn invalidate(&mut self) {
        self.current = false;
    }

    /// True when `ptr` is the source of a copy.
    pub fn holds(&self, ptr: u64) -> bool {
        self.entries.iter().any(|e| e.src == ptr)
    }

    /// The device allocations owned here.
    pub fn allocations(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries
            .iter()
            .map(|e| e.dst)
            .chain(self.table)
            .chain(self.retired.iter().copied())
    }
}

impl CudaBackend {
    /// The copy of weight `w` in type `dt`, cast as described above; `None` when `w` is not
    /// a weight, or a new copy cannot be made now (capturing, or over budget): the caller
    /// then casts into scratch.
    pub(super) fn weight_copy(&mut self, w: &Arg, dt: DType) -> Result<Option<u64>> {
        if !matches!(w.info.role, Role::Parameter | Role::Frozen) {
            return Ok(None);
        }
        let src = self.ptr(w.loc);
        if let Some(&k) = self.weight_casts.index.get(&(src, dt)) {
            if !self.weight_casts.current {
                self.recast_weights()?;
            }
            return Ok(Some(self.weight_casts.entries[k].dst));
        }
        let n = w.info.numel() as u64;
        let bytes = n * dt.size() as u64;
        if self.graphs.capturing() || self.weight_casts.bytes + bytes > BUDGET_BYTES {
            return Ok(None);
        }
        let dst = self.gpu.alloc(bytes.max(1))?;
        let wc = &mut self.weight_casts;
        wc.bytes += bytes;
        wc.index.insert((src, dt), wc.entries.len());
        wc.entries.push(Entry {
            src,
            dst,
            n,
            src_dt: w.info.dtype,
            dst_dt: dt,
        });
        if let Some(t) = wc.table.take() {
            wc.retired.push(t);
        }
        self.cast_raw(src, w.info.dtype, dst, dt, n)?;
        Ok(Some(dst))
    }

    /// Uploads the table of all copies when entries were added (called before a program
    /// starts, so a capture finds it).
    pub(super) fn weight_cast_table(&mut self) -> Result<()> {
        let wc = &self.weight_casts;
        if wc.table.is_some() || wc.entries.is_empty() {
            return Ok(());
        }
        // Layout of struct CastChunk in cuda/elementwise.cu: src, dst, start, len, types.
        let mut words = Vec::new();
        for e in &wc.entries {
            let (sd, dd) = (dt_code(e.src_dt)? as u64, dt_code(e.dst_dt)? as u64);
            let mut start = 0;
            while start < e.n {
                let len = CHUNK.min(e.n - start);
                words.extend_from_slice(&[e.src, e.dst, start, len, sd, dd]);
                start += len;
            }
        }
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        let p = self.gpu.alloc(bytes.len() as u64)?;
        self.gpu.htod(p, bytes)?;
        self.weight_casts.table = Some(p);
        Ok(())
    }

    /// Recasts every registered weight in one launch.
    fn recast_weights(&mut self) -> Result<()> {
        self.weight_cast_table()?;
        let chunks: u64 = self.weight_casts.entries.iter().map(|e| e.n.div_ceil(CHUNK)).sum();
        let Some(table) = self.weight_casts.table else {
            return Ok(());
        };
        let k = self.kernel(Family::Elementwise, "cast_multi")?;
        self.run(&k, (chunks as u32, 1, 1), 256, 0, Args::new().ptr(table))?;
        self.weight_casts.current = true;
        Ok(())
    }
}
