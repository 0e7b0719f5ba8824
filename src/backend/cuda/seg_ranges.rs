//! The segment-range table of the flash kernels, computed once per program run.
//!
//! Every attention forward and backward of a step reads the same segment ids, so the table
//! of min and max segment id per GRAN tokens (cuda/flash_attn.cu) is the same for all of
//! them. The first flash launch of a program run writes it into a persistent buffer kept
//! per segment tensor; later launches of that run read it. Only program inputs are cached
//! (nothing but the host writes them, and every host write or program start forgets the
//! tables), so a captured CUDA graph computes the table exactly where the eager run did.

use super::CudaBackend;
use crate::backend::Arg;
use crate::graph::Role;
use crate::Result;
use std::collections::{HashMap, HashSet};

/// Key of a table: segment-id pointer, rows, tokens per row.
type Key = (u64, i64, i64);

#[derive(Default)]
pub struct SegRanges {
    buffers: HashMap<Key, u64>,
    /// Tables written in the current program run.
    current: HashSet<Key>,
}

impl SegRanges {
    /// Tables are stale: a program starts or the host wrote a tensor.
    pub fn invalidate(&mut self) {
        self.current.clear();
    }

    pub fn allocations(&self) -> impl Iterator<Item = u64> + '_ {
        self.buffers.values().copied()
    }
}

impl CudaBackend {
    /// The segment-range table for `seg` (`rows` rows of `t` tokens): the cached one when
    /// this program run computed it already, else computed now, into its persistent buffer
    /// or, for a tensor that is not a program input or during a capture that has no buffer
    /// for it, into `scratch`.
    pub(super) fn seg_range_table(
        &mut self,
        defs: &[&'static str],
        seg: &Arg,
        rows: i64,
        t: i64,
        bytes: u64,
        scratch: u64,
    ) -> Result<u64> {
        let key = (self.ptr(seg.loc), rows, t);
        if seg.info.role != Role::Input {
            self.seg_ranges(defs, key.0, rows, t, scratch)?;
            return Ok(scratch);
        }
        if self.seg_cache.current.contains(&key) {
            return Ok(self.seg_cache.buffers[&key]);
        }
        let out = match self.seg_cache.buffers.get(&key) {
            Some(&p) => p,
            // Allocating is not allowed while a graph is captured (the eager run before
            // every capture allocates).
            None if self.graphs.capturing() => {
                self.seg_ranges(defs, key.0, rows, t, scratch)?;
                return Ok(scratch);
            }
            None => {
                let p = self.gpu.alloc(bytes)?;
                self.seg_cache.buffers.insert(key, p);
                p
            }
        };
        self.seg_ranges(defs, key.0, rows, t, out)?;
        self.seg_cache.current.insert(key);
        Ok(out)
    }
}
