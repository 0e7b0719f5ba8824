//! Timing of the attention kernels with device events (a benchmark helper, never a test
//! assertion): forward and backward of one causal bf16 attention on random inputs, median
//! over repetitions after warm-up.

use super::gpu::drv;
use super::CudaBackend;
use crate::backend::{Arg, Backend, Loc};
use crate::graph::{Role, TensorInfo};
use crate::ops::{AttnSpec, Op};
use crate::tensor::DType;
use crate::Result;
use cudarc::driver::sys;

/// One attention shape to time.
#[derive(Clone, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub seq_len: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub dtype: DType,
}

/// Median milliseconds of the forward and the backward pass, and the FLOP counts used for
/// rates (forward 4 T^2 H D per row, halved when causal; backward 2.5 times the forward,
/// the convention of the FlashAttention papers).
#[derive(Clone, Debug)]
pub struct AttnTiming {
    pub fwd_ms: f64,
    pub bwd_ms: f64,
    pub fwd_flops: f64,
    pub bwd_flops: f64,
}

fn info(name: &str, shape: &[usize], dtype: DType) -> TensorInfo {
    TensorInfo {
        name: name.into(),
        shape: shape.to_vec(),
        dtype,
        role: Role::Input,
    }
}

/// Pseudo-random values in [-1, 1) (a fixed LCG; no zeros), stored as `dtype`.
fn random_bytes(n: usize, dtype: DType, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    crate::HostTensor::from_f32(&[n], &v).cast(dtype).data
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite timings"));
    v[v.len() / 2]
}

pub fn time_attention(be: &mut CudaBackend, sh: &AttnShape, warmup: usize, reps: usize) -> Result<AttnTiming> {
    let n = sh.batch * sh.seq_len;
    let spec = AttnSpec {
        n_heads: sh.n_heads,
        n_kv_heads: sh.n_kv_heads,
        head_dim: sh.head_dim,
        seq_len: sh.seq_len,
        causal: sh.causal,
        window: None,
        scale: 1.0 / (sh.head_dim as f64).sqrt(),
        flex: Default::default(),
    };
    let (qd, kd) = (sh.n_heads * sh.head_dim, sh.n_kv_heads * sh.head_dim);
    let infos = [
        info("q", &[n, qd], sh.dtype),
        info("k", &[n, kd], sh.dtype),
        info("v", &[n, kd], sh.dtype),
        info("seg", &[n], DType::I32),
        info("o", &[n, qd], sh.dtype),
        info("lse", &[sh.batch, sh.n_heads, sh.seq_len], DType::F32),
        info("do", &[n, qd], sh.dtype),
        info("dq", &[n, qd], sh.dtype),
        info("dk", &[n, kd], sh.dtype),
        info("dv", &[n, kd], sh.dtype),
    ];
    let mut locs = Vec::new();
    for (k, t) in infos.iter().enumerate() {
        let bytes = t.bytes() as u64;
        let buf = be.alloc(bytes)?;
        let loc = Loc {
            buffer: buf,
            offset: 0,
            bytes,
        };
        let data = if t.dtype == DType::I32 {
            bytemuck::cast_slice(&vec![1i32; t.numel()]).to_vec()
        } else {
            random_bytes(t.numel(), t.dtype, k as u64)
        };
        be.write(loc, &data)?;
        locs.push(loc);
    }
    let arg = |k: usize| Arg {
        loc: locs[k],
        info: &infos[k],
    };
    let fwd = Op::Attention(spec.clone());
    let bwd = Op::AttentionBackward(spec);
    be.prepare(
        &fwd,
        &[&infos[0], &infos[1], &infos[2], &infos[3]],
        &[&infos[4], &infos[5]],
    )?;
    be.prepare(
        &bwd,
        &[
            &infos[0], &infos[1], &infos[2], &infos[3], &infos[4], &infos[5], &infos[6],
        ],
        &[&infos[7], &infos[8], &infos[9]],
    )?;
    let fwd_in = [arg(0), arg(1), arg(2), arg(3)];
    let fwd_out = [arg(4), arg(5)];
    let bwd_in = [arg(0), arg(1), arg(2), arg(3), arg(4), arg(5), arg(6)];
    let bwd_out = [arg(7), arg(8), arg(9)];
    let ev = || -> Result<sys::CUevent> {
        cudarc::driver::result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| drv("cuEventCreate", e))
    };
    let (mut tf, mut tb) = (Vec::new(), Vec::new());
    for it in 0..warmup + reps {
        let (e0, e1, e2) = (ev()?, ev()?, ev()?);
        // SAFETY: fresh events recorded on the backend's stream.
        unsafe {
            cudarc::driver::result::event::record(e0, be.gpu.stream).map_err(|e| drv("cuEventRecord", e))?;
            be.launch(&fwd, &fwd_in, &fwd_out)?;
            cudarc::driver::result::event::record(e1, be.gpu.stream).map_err(|e| drv("cuEventRecord", e))?;
            be.launch(&bwd, &bwd_in, &bwd_out)?;
            cudarc::driver::result::event::record(e2, be.gpu.stream).map_err(|e| drv("cuEventRecord", e))?;
        }
        be.gpu.sync()?;
        // SAFETY: completed events.
        unsafe {
            let f = cudarc::driver::result::event::elapsed(e0, e1).map_err(|e| drv("cuEventElapsedTime", e))?;
            let b = cudarc::driver::result::event::elapsed(e1, e2).map_err(|e| drv("cuEventElapsedTime", e))?;
            if it >= warmup {
                tf.push(f as f64);
                tb.push(b as f64);
            }
            for e in [e0, e1, e2] {
                let _ = cudarc::driver::result::event::destroy(e);
            }
        }
    }
    let per_row = 4.0 * (sh.seq_len as f64).powi(2) * (sh.n_heads * sh.head_dim) as f64;
    let fwd_flops = per_row * sh.batch as f64 * if sh.causal { 0.5 } else { 1.0 };
    Ok(AttnTiming {
        fwd_ms: median(tf),
        bwd_ms: median(tb),
        fwd_flops,
        bwd_flops: 2.5 * fwd_flops,
    })
}
