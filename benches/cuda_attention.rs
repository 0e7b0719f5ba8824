//! `cargo bench --features cuda --bench cuda_attention`: attention speed on the device.
//! Prints median milliseconds and TFLOP/s of the forward and backward passes of
//! causal bf16 attention at 2k, 8k and 16k tokens per row (16k tokens per step) for head dims
//! 64 and 128 with the default tile shapes of the tensor-core kernels (whose results
//! `cuda_ops` checks against the CPU). `FERROTUNE_BENCH_TILES=all` adds every other tile
//! shape; `FERROTUNE_BENCH_TILES="mw,bn,nw,bm[,p];..."` times the listed ones instead (`p`: the
//! backward's warps in pairs);
//! `FERROTUNE_BENCH_HEAD_DIMS=64` (or `128`, or a list such as `96,128`) times those head dims only.
use ferrotune::backend::cuda::bench::{time_attention, AttnShape};
use ferrotune::backend::cuda::{CudaBackend, CudaOptions, FlashTiles};
use ferrotune::DType;

fn tile_sets() -> Vec<Option<FlashTiles>> {
    let mut v = vec![None];
    let env = std::env::var("FERROTUNE_BENCH_TILES").unwrap_or_default();
    if env.is_empty() {
        return v;
    }
    if env != "all" {
        let s = env;
        // "mw,bn,nw,bm[,p];..." replaces the list below.
        return s
            .split(';')
            .map(|t| Some(FlashTiles::parse(t).unwrap_or_else(|e| panic!("FERROTUNE_BENCH_TILES: {e}"))))
            .collect();
    }
    v.extend(FlashTiles::known().into_iter().map(Some));
    v
}

fn main() {
    println!("| tiles | T | batch | heads | head dim | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s |");
    let dims = std::env::var("FERROTUNE_BENCH_HEAD_DIMS").unwrap_or_default();
    // Head dim 96 only when asked for (the SDPA reference of gpu-test.sh times 64 and 128).
    for (hd, heads) in [(64usize, 32usize), (96, 16), (128, 16)] {
        let asked = dims.split(',').any(|d| d.trim() == hd.to_string());
        if !asked && (!dims.is_empty() || hd == 96) {
            continue;
        }
        for tiles in tile_sets() {
            if tiles.is_some_and(|t| !t.valid(hd)) {
                continue;
            }
            let mut be = CudaBackend::with_options(CudaOptions {
                flash_tiles: tiles,
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("this benchmark needs a CUDA device: {e}"));
            let label = match tiles {
                Some(t) => format!(
                    "m{}n{} w{}m{}{}",
                    t.mw,
                    t.bn,
                    t.nw,
                    t.bm,
                    if t.pairs { "p" } else { "" }
                ),
                None => "default".to_string(),
            };
            for (t, b) in [(2048usize, 8usize), (8192, 2), (16384, 1)] {
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
                println!(
                    "| {label} | {t} | {b} | {heads} | {hd} | {:.3} | {:.1} | {:.3} | {:.1} |",
                    r.fwd_ms,
                    r.fwd_flops / r.fwd_ms / 1e9,
                    r.bwd_ms,
                    r.bwd_flops / r.bwd_ms / 1e9
                );
            }
        }
    }
}
