//! Attention speed on the device (ignored by default: a measurement, not a check). Run with
//! `--ignored`; prints median milliseconds and TFLOP/s of the forward and backward passes of
//! causal bf16 attention at 16k tokens per step for head dims 64 and 128. Before timing, each
//! shape's backward is compared with the general kernels at a small size by `cuda_ops`.
#![cfg(feature = "cuda")]

use ferrotune::backend::cuda::bench::{time_attention, AttnShape};
use ferrotune::backend::cuda::CudaBackend;
use ferrotune::DType;

#[test]
#[ignore]
fn attention_speed() {
    let mut be = CudaBackend::new().unwrap_or_else(|e| panic!("this benchmark needs a CUDA device: {e}"));
    eprintln!("| T | batch | heads | head dim | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s |");
    for (hd, heads) in [(64usize, 32usize), (128, 16)] {
        for (t, b) in [(2048usize, 8usize), (4096, 4), (8192, 2), (16384, 1)] {
            let sh = AttnShape {
                batch: b,
                seq_len: t,
                n_heads: heads,
                n_kv_heads: heads,
                head_dim: hd,
                causal: true,
                dtype: DType::BF16,
            };
            let r = time_attention(&mut be, &sh, 3, 10).unwrap();
            eprintln!(
                "| {t} | {b} | {heads} | {hd} | {:.3} | {:.1} | {:.3} | {:.1} |",
                r.fwd_ms,
                r.fwd_flops / r.fwd_ms / 1e9,
                r.bwd_ms,
                r.bwd_flops / r.bwd_ms / 1e9
            );
        }
    }
}
