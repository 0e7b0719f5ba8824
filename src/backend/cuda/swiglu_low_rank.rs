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
        let name = match (backward, f16) {
            (false, false) => "swiglu_lr_fwd_bf16",
            (true, false) => "swiglu_lr_bwd_bf16",
            (false, true) => "swiglu_lr_fwd_f16",
            (true, true) => "swiglu_lr_bwd_f16",
        };
        let k = self.kernel(Family::Swiglu, name)?;
        let cols = (f as u64).div_ceil(WARP_COLS * WARPS as u64);
        if cols > 65535 {
            return Err(Error::backend(
                "cuda",
                format!("swiglu_low_rank: {f} features is too many"),
            ));
        }
        let grid = ((n as u64).div_ceil(ROWS) as u32, cols as u32, 1);
        self.run(&k, grid, 32 * WARPS, 0, Args::new().blob(&prm))
    }
}
