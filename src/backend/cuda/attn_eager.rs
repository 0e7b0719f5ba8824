//! Launches of eager attention's own ops (cuda/attention.cu, end of the file): the head
//! layout change in both directions, the masked softmax and its backward. The score
//! products between them are ordinary cuBLASLt matmuls.

use super::attention::window;
use super::gpu::Args;
use super::kernels::Family;
use super::ops::{blocks, dt_code};
use super::CudaBackend;
use crate::backend::Arg;
use crate::ops::{AttnSpec, HeadLayout};
use crate::tensor::DType;
use crate::{Error, Result};

const BLOCK: u32 = 256;

impl CudaBackend {
    /// `SplitHeads` (`merge` false) or `MergeHeads` (`merge` true).
    pub(super) fn head_layout(&mut self, l: &HeadLayout, merge: bool, x: &Arg, y: &Arg) -> Result<()> {
        let n = y.info.numel() as u64;
        let args = Args::new()
            .ptr(self.ptr(x.loc))
            .i32(dt_code(x.info.dtype)?)
            .ptr(self.ptr(y.loc))
            .i32(dt_code(y.info.dtype)?)
            .i64(n as i64)
            .i64(l.seq_len as i64)
            .i32(l.heads as i32)
            .i32(l.repeat as i32)
            .i32(l.head_dim as i32);
        let name = if merge { "merge_heads" } else { "split_heads" };
        let k = self.kernel(Family::Attention, name)?;
        self.run(&k, (blocks(n, BLOCK as u64), 1, 1), BLOCK, 0, args)
    }

    /// `(scores [B, H, T, T], seg) -> p`, one block per score row.
    pub(super) fn masked_softmax(&mut self, s: &AttnSpec, i: &[Arg], o: &[Arg]) -> Result<()> {
        s.require_plain_mask("cuda")?;
        if i[1].info.dtype != DType::I32 {
            return Err(Error::backend("cuda", "segment ids must be i32"));
        }
        let rows = (i[0].info.numel() / s.seq_len.max(1)) as u64;
        let args = Args::new()
            .ptr(self.ptr(i[0].loc))
            .i32(dt_code(i[0].info.dtype)?)
            .ptr(self.ptr(i[1].loc))
            .ptr(self.ptr(o[0].loc))
            .i32(dt_code(o[0].info.dtype)?)
            .i64(s.seq_len as i64)
            .i32(s.n_heads as i32)
            .i32(s.causal as i32)
            .i32(window(s)?);
        let k = self.kernel(Family::Attention, "masked_softmax")?;
        self.run(&k, (blocks(rows, 1), 1, 1), BLOCK, 0, args)
    }

    /// `(p, dp) -> p * (dp - rowsum(p * dp))` over the last dim, one block per row.
    pub(super) fn softmax_backward(&mut self, i: &[Arg], o: &[Arg]) -> Result<()> {
        let cols = *i[0].info.shape.last().unwrap_or(&1) as u64;
        let rows = i[0].info.numel() as u64 / cols.max(1);
        let args = Args::new()
            .ptr(self.ptr(i[0].loc))
            .i32(dt_code(i[0].info.dtype)?)
            .ptr(self.ptr(i[1].loc))
            .i32(dt_code(i[1].info.dtype)?)
            .ptr(self.ptr(o[0].loc))
            .i32(dt_code(o[0].info.dtype)?)
            .i64(cols as i64);
        let k = self.kernel(Family::Attention, "softmax_backward")?;
        self.run(&k, (blocks(rows, 1), 1, 1), BLOCK, 0, args)
    }
}
