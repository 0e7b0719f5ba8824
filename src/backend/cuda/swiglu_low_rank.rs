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

/// The kernel of a call and its block shape.
#[derive(Debug, PartialEq)]
struct Launch {
    name: &'static str,
    warps: u32,
    rows: u64,
    cols: u64,
}

/// Features in 16-byte groups and r <= 32: a `swiglu_lr2` kernel (every tensor starts 256-byte
/// aligned); otherwise the general one.
fn launch(backward: bool, f16: bool, f: i64, r: i64) -> Launch {
    if f % 8 == 0 && (1..=32).contains(&r) {
        let name = match (backward, f16, r > 16) {
            (false, false, false) => "swiglu_lr2_fwd_bf16_k1",
            (false, false, true) => "swiglu_lr2_fwd_bf16_k2",
            (true, false, false) => "swiglu_lr2_bwd_bf16_k1",
            (true, false, true) => "swiglu_lr2_bwd_bf16_k2",
            (false, true, false) => "swiglu_lr2_fwd_f16_k1",
            (false, true, true) => "swiglu_lr2_fwd_f16_k2",
            (true, true, false) => "swiglu_lr2_bwd_f16_k1",
            (true, true, true) => "swiglu_lr2_bwd_f16_k2",
        };
        return Launch {
            name,
            warps: 8,
            rows: S2_ROWS,
            cols: S2_COLS,
        };
    }
    let name = match (backward, f16) {
        (false, false) => "swiglu_lr_fwd_bf16",
        (true, false) => "swiglu_lr_bwd_bf16",
        (false, true) => "swiglu_lr_fwd_f16",
        (true, true) => "swiglu_lr_bwd_f16",
    };
    Launch {
        name,
        warps: WARPS,
        rows: ROWS,
        cols: WARP_COLS * WARPS as u64,
    }
}

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
        let Launch {
            name,
            warps,
            rows,
            cols,
        } = launch(backward, f16, f, prm.r);
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

#[cfg(test)]
mod tests {
    use super::launch;

    /// Which kernel the shapes of `tests/cuda_ops.rs::swiglu_low_rank_forward_and_backward`
    /// run on (that GPU test covers both kinds only if these hold).
    #[test]
    fn features_in_groups_of_8_and_rank_up_to_32_take_the_lr2_kernels() {
        for (f, r, name) in [
            (256, 16, "swiglu_lr2_bwd_bf16_k1"),
            (264, 32, "swiglu_lr2_bwd_bf16_k2"),
            (136, 20, "swiglu_lr2_bwd_bf16_k2"),
            (64, 5, "swiglu_lr2_bwd_bf16_k1"),
            (130, 8, "swiglu_lr_bwd_bf16"),
            (129, 24, "swiglu_lr_bwd_bf16"),
            (300, 40, "swiglu_lr_bwd_bf16"),
        ] {
            assert_eq!(launch(true, false, f, r).name, name, "f {f} r {r}");
        }
        assert_eq!(launch(false, true, 512, 16).name, "swiglu_lr2_fwd_f16_k1");
        assert_eq!(launch(false, true, 70, 16).name, "swiglu_lr_fwd_f16");
    }
}
