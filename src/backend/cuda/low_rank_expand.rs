//! Products of inner size 16 or 32 (`alpha u w (+ c)`, LoRA's rank-r expansions: `s u B^T`
//! in the forward pass, `s du A` in the input gradient) on a kernel of cuda/low_rank.cu
//! instead of cuBLASLt: the product is bound by writing its output, which the kernel does at
//! a larger share of DRAM's bandwidth. Every other product, and any call whose pointers are
//! not aligned for its 16-byte stores, goes to cuBLASLt (planned for every product anyway).

use super::gpu::Args;
use super::kernels::Family;
use super::ops::Epilogue;
use super::CudaBackend;
use crate::backend::Arg;
use crate::graph::TensorInfo;
use crate::ops::matmul as mm;
use crate::tensor::DType;
use crate::Result;

/// `struct LowRankExpandParams` of cuda/low_rank.cu.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    u: u64,
    w: u64,
    c: u64,
    out: u64,
    n: i64,
    f: i64,
    alpha: f32,
    w_t: i32,
    w_f32: i32,
    add: i32,
}

/// Rows and columns per block, and warps (LE_ROWS, LE_COLS in cuda/low_rank.cu).
const ROWS: u64 = 128;
const COLS: u64 = 256;
const WARPS: u32 = 8;

/// The kernel for `op(a) op(b)` written to `out` (a C term, when there is one, has `out`'s
/// type), if it takes the product: `a` 16-bit and not transposed, `b` one 2-D matrix in f32
/// or `a`'s type, inner size 16 or 32, `out` in `a`'s type with a multiple of 8 columns.
pub fn low_rank_expand_kernel(
    a: &TensorInfo,
    b: &TensorInfo,
    out: &TensorInfo,
    trans_a: bool,
    trans_b: bool,
) -> Option<&'static str> {
    let d = mm::dims(&a.shape, &b.shape, trans_a, trans_b).ok()?;
    let types = out.dtype == a.dtype && (b.dtype == DType::F32 || b.dtype == a.dtype);
    if trans_a || b.shape.len() != 2 || d.batch != 1 || !types || !d.n.is_multiple_of(8) {
        return None;
    }
    match (a.dtype, d.k) {
        (DType::BF16, 16) => Some("low_rank_expand_bf16_r16"),
        (DType::BF16, 32) => Some("low_rank_expand_bf16_r32"),
        (DType::F16, 16) => Some("low_rank_expand_f16_r16"),
        (DType::F16, 32) => Some("low_rank_expand_f16_r32"),
        _ => None,
    }
}

impl CudaBackend {
    /// The kernel's name when this product runs on it (see [`low_rank_expand_kernel`]).
    pub(super) fn expand_name(
        &self,
        a: &TensorInfo,
        b: &TensorInfo,
        out: &TensorInfo,
        trans_a: bool,
        trans_b: bool,
    ) -> Option<&'static str> {
        let on = self.opts.low_rank_expand && self.gpu.cc.0 >= 8;
        on.then(|| low_rank_expand_kernel(a, b, out, trans_a, trans_b))
            .flatten()
    }

    /// Runs `alpha a op(b)` with a Store or Add epilogue on the kernel; returns false (and
    /// launches nothing) when the product is not one it takes.
    pub(super) fn try_low_rank_expand(
        &mut self,
        a: &Arg,
        b: &Arg,
        epi: Epilogue,
        trans_a: bool,
        trans_b: bool,
        alpha: f64,
    ) -> Result<bool> {
        let (out, c) = match epi {
            Epilogue::Store(d) => (d, None),
            Epilogue::Add { c, d } => (d, Some(c)),
            Epilogue::Accumulate(_) => return Ok(false),
        };
        let Some(name) = self.expand_name(a.info, b.info, out.info, trans_a, trans_b) else {
            return Ok(false);
        };
        if c.is_some_and(|c| c.info.dtype != out.info.dtype) {
            return Ok(false);
        }
        let (up, wp, op) = (self.ptr(a.loc), self.ptr(b.loc), self.ptr(out.loc));
        let cp = c.map_or(0, |c| self.ptr(c.loc));
        if up % 4 != 0 || wp % 4 != 0 || op % 16 != 0 || cp % 16 != 0 {
            return Ok(false);
        }
        let f = out.info.shape[out.info.shape.len() - 1] as u64;
        let n = super::ops::numel(out.info) / f.max(1);
        if n == 0 || f == 0 {
            return Ok(true);
        }
        let k = self.kernel(Family::LowRank, name)?;
        let prm = Params {
            u: up,
            w: wp,
            c: cp,
            out: op,
            n: n as i64,
            f: f as i64,
            alpha: alpha as f32,
            w_t: trans_b as i32,
            w_f32: (b.info.dtype == DType::F32) as i32,
            add: c.is_some() as i32,
        };
        let grid = (n.div_ceil(ROWS) as u32, f.div_ceil(COLS) as u32, 1);
        self.run(&k, grid, 32 * WARPS, 0, Args::new().blob(&prm))?;
        Ok(true)
    }
}
