//! Launches of `Op::LowRankGrads` (kernels in cuda/low_rank.cu): `du = alpha dy b` and
//! `acc += alpha dy^T u` from one read of `dy`, or, for shapes and types the kernel does not
//! take, the two products.

use super::gpu::Args;
use super::kernels::Family;
use super::ops::Epilogue;
use super::CudaBackend;
use crate::backend::Arg;
use crate::graph::TensorInfo;
use crate::tensor::DType;
use crate::{Error, Result};

/// `struct LowRankGradsParams` of cuda/low_rank.cu.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    dy: u64,
    u: u64,
    b: u64,
    du: u64,
    acc: u64,
    n: i64,
    f: i64,
    alpha: f32,
    pad: i32,
}

/// Rows of dy per block and warps (LG_ROWS, and 4 CG with CG = 2, in cuda/low_rank.cu).
const ROWS: u64 = 64;
const WARPS: u32 = 8;

/// The kernel for these inputs `(dy, u, b, acc)`, if it takes them. (Every tensor starts at
/// a multiple of the backend's 256-byte alignment, so the 16-byte loads are aligned.)
fn kernel_name(i: &[&TensorInfo]) -> Option<&'static str> {
    let (dy, u, b, acc) = (i[0], i[1], i[2], i[3]);
    let same = u.dtype == dy.dtype && b.dtype == DType::F32 && acc.dtype == DType::F32;
    if !same || !dy.shape[1].is_multiple_of(8) {
        return None;
    }
    match (dy.dtype, u.shape[1]) {
        (DType::BF16, 16) => Some("low_rank_grads_bf16_r16"),
        (DType::BF16, 32) => Some("low_rank_grads_bf16_r32"),
        (DType::F16, 16) => Some("low_rank_grads_f16_r16"),
        (DType::F16, 32) => Some("low_rank_grads_f16_r32"),
        _ => None,
    }
}

/// Dynamic shared memory of the kernel for rank `r` (cuda/low_rank.cu's LgLayout: three
/// stages of 32 columns per warp of dy and b).
fn smem_bytes(r: u32) -> u32 {
    let cols = 32 * WARPS;
    3 * (ROWS as u32 * (cols + 8) * 2 + cols * (r + 4) * 4)
}

impl CudaBackend {
    /// Compiles the kernel, or plans the two products it stands for.
    pub(super) fn prepare_low_rank_grads(&mut self, i: &[&TensorInfo], o: &[&TensorInfo]) -> Result<()> {
        if let Some(name) = kernel_name(i) {
            self.mods
                .get_with_smem(Family::LowRank, &[], name, smem_bytes(i[1].shape[1] as u32))?;
            return Ok(());
        }
        self.prepare_gemm(&[i[0], i[2]], o[0], false, false, false)?;
        self.prepare_gemm(&[i[0], i[1]], i[3], true, false, true)
    }

    /// Scratch of the two products (none for the kernel).
    pub(super) fn low_rank_grads_scratch(&self, i: &[&TensorInfo], o: &[&TensorInfo]) -> Result<Vec<u64>> {
        if kernel_name(i).is_some() {
            return Ok(vec![]);
        }
        let mut s = self.gemm_scratch(i[0], i[2], o[0], false)?;
        s.extend(self.gemm_scratch(i[0], i[1], i[3], true)?);
        Ok(s)
    }

    /// Inputs `(dy, u, b, acc)`, output `du`.
    pub(super) fn low_rank_grads(&mut self, i: &[Arg], o: &[Arg], alpha: f64) -> Result<()> {
        let infos = [i[0].info, i[1].info, i[2].info, i[3].info];
        let Some(name) = kernel_name(&infos) else {
            self.gemm(&i[0], &i[2], Epilogue::Store(&o[0]), false, false, alpha)?;
            return self.gemm(&i[0], &i[1], Epilogue::Accumulate(&i[3]), true, false, alpha);
        };
        let (n, f) = (i[0].info.shape[0] as u64, i[0].info.shape[1] as u64);
        if n == 0 || f == 0 {
            return Ok(());
        }
        let blocks = n.div_ceil(ROWS);
        if blocks > i32::MAX as u64 {
            return Err(Error::backend("cuda", format!("low_rank_grads: {n} rows is too many")));
        }
        let smem = smem_bytes(i[1].info.shape[1] as u32);
        let k = self.mods.get_with_smem(Family::LowRank, &[], name, smem)?;
        let prm = Params {
            dy: self.ptr(i[0].loc),
            u: self.ptr(i[1].loc),
            b: self.ptr(i[2].loc),
            du: self.ptr(o[0].loc),
            acc: self.ptr(i[3].loc),
            n: n as i64,
            f: f as i64,
            alpha: alpha as f32,
            pad: 0,
        };
        self.run(&k, (blocks as u32, 1, 1), 32 * WARPS, smem, Args::new().blob(&prm))
    }
}
