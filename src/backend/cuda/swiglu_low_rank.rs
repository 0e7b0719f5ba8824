//! Launches of `Op::SwigluLowRank` and its backward (kernels in cuda/swiglu.cu).

use super::gpu::Args;
use super::kernels::Family;
use super::ops::dt_code;
use super::CudaBackend;
use crate::backend::Arg;
use crate::tensor::DType;
use crate::{Error, Result};

/// `struct SwigluLr` of cuda/swiglu.cu.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SwigluLr {
    gate: u64,
    up: u64,
    dy: u64,
    ug: u64,
    uu: u64,
    bg: u64,
    bu: u64,
    out0: u64,
    out1: u64,
    dtb: i32,
    _pad: i32,
    n: i64,
    f: i64,
    r: i64,
    ag: f32,
    au: f32,
}

/// Warps per block (LR_WARPS in cuda/swiglu.cu).
const WARPS: u32 = 4;
/// Rows and features per block of the `swiglu_lr2` kernels (S2_ROWS, S2_COLS; 8 warps).
const S2_ROWS: u64 = 128;
const S2_COLS: u64 = 128;
/// Features of one warp (LR_COLS in cuda/swiglu.cu).
const WARP_COLS: u64 = 32;
/// Rows per block (16 * LR_ROW_TILES in cuda/swiglu.cu).
const ROWS: u64 = 128;

impl CudaBackend {
    /// Forward (`dy` None, inputs `gate, up, ug, bg, uu, bu`) or backward (inputs `gate, up,
    /// dy, ug, bg, uu, bu`).
    pub(super) fn swiglu_low_rank(&mut self, i: &[Arg], o: &[Arg], alphas: (f64, f64), backward: bool) -> Result<()> {
        let dt = i[0].info.dtype;
        let f16 = match dt {
            DType::BF16 => false,
            DType::F16 => true,
            _ => {
                return Err(Error::backend(
                    "cuda",
                    format!("swiglu_low_rank takes bf16 or f16 activations, got {dt}"),
                ))
            }
        };
        let at = if backward { 3 } else { 2 };
        let (ug, bg, uu, bu) = (&i[at], &i[at + 1], &i[at + 2], &i[at + 3]);
        if bg.info.dtype != bu.info.dtype {
            return Err(Error::backend(
                "cuda",
                "swiglu_low_rank: both B factors must share a type",
            ));
        }
        let (n, f) = (i[0].info.shape[0] as i64, i[0].info.shape[1] as i64);
        let prm = SwigluLr {
            gate: self.ptr(i[0].loc),
            up: self.ptr(i[1].loc),
            dy: if backward { self.ptr(i[2].loc) } else { 0 },
            ug: self.ptr(ug.loc),
            uu: self.ptr(uu.loc),
            bg: self.ptr(bg.loc),
            bu: self.ptr(bu.loc),
            out0: self.ptr(o[0].loc),
            out1: if backward { self.ptr(o[1].loc) } else { 0 },
            dtb: dt_code(bg.info.dtype)?,
            _pad: 0,
            n,
            f,
            r: ug.info.shape[1] as i64,
            ag: alphas.0 as f32,
            au: alphas.1 as f32,
        };
        // Features in 16-byte groups and r <= 32: the swiglu_lr2 kernels (every tensor starts
        // 256-byte aligned); otherwise the general ones.
        let fast = f % 8 == 0 && (1..=32).contains(&prm.r);
        let (name, warps, rows, cols) = if fast {
            let name = match (backward, f16, prm.r > 16) {
                (false, false, false) => "swiglu_lr2_fwd_bf16_k1",
                (false, false, true) => "swiglu_lr2_fwd_bf16_k2",
                (true, false, false) => "swiglu_lr2_bwd_bf16_k1",
                (true, false, true) => "swiglu_lr2_bwd_bf16_k2",
                (false, true, false) => "swiglu_lr2_fwd_f16_k1",
                (false, true, true) => "swiglu_lr2_fwd_f16_k2",
                (true, true, false) => "swiglu_lr2_bwd_f16_k1",
                (true, true, true) => "swiglu_lr2_bwd_f16_k2",
            };
            (name, 8, S2_ROWS, S2_COLS)
        } else {
            let name = match (backward, f16) {
                (false, false) => "swiglu_lr_fwd_bf16",
                (true, false) => "swiglu_lr_bwd_bf16",
                (false, true) => "swiglu_lr_fwd_f16",
                (true, true) => "swiglu_lr_bwd_f16",
            };
            (name, WARPS, ROWS, WARP_COLS * WARPS as u64)
        };
        let k = self.kernel(Family::Swiglu, name)?;
        let col_blocks = (f as u64).div_ceil(cols);
        if col_blocks > 65535 {
            return Err(Error::backend(
                "cuda",
                format!("swiglu_low_rank: {f} features is too many"),
            ));
        }
        let grid = ((n as u64).div_ceil(rows) as u32, col_blocks as u32, 1);
        self.run(&k, grid, 32 * warps, 0, Args::new().blob(&prm))
    }
}
