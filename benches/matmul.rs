//! `cargo bench --bench matmul [-- SIZES...] [--cpu] [--trans-b] [--dtypes f32,f16,bf16] [--seconds S]`:
//! WGSL matmul throughput on the default adapter (GFLOP/s, median of several runs).

use ferrotune::backend::wgsl::bench::{bench_cpu_gemm, bench_matmul, BenchOptions};
use ferrotune::backend::wgsl::{WgslContext, WgslOptions};
use ferrotune::DType;

fn main() {
    let mut sizes = Vec::new();
    let mut dtypes = vec![DType::F32, DType::F16];
    let mut cpu = false;
    let mut opts = BenchOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cpu" => cpu = true,
            "--trans-b" => opts.trans_b = true,
            "--bench" => {}
            "--dtypes" => {
                let list = args.next().unwrap_or_default();
                dtypes = list
                    .split(',')
                    .map(|d| DType::parse(d).unwrap_or_else(|| panic!("unknown dtype {d:?}")))
                    .collect();
            }
            "--seconds" => {
                opts.seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds takes a number");
            }
            s => sizes.push(s.parse::<usize>().unwrap_or_else(|_| panic!("not a size: {s:?}"))),
        }
    }
    if sizes.is_empty() {
        sizes = vec![1024, 2048, 4096];
    }
    let ctx = match WgslContext::new_blocking(WgslOptions::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    println!("device: {}", ctx.describe());
    for c in &ctx.coop_configs {
        println!(
            "  coop config: {}x{}x{} {:?} -> {:?}",
            c.m_size, c.n_size, c.k_size, c.ab_type, c.cr_type
        );
    }
    for &n in &sizes {
        match bench_matmul(&ctx, &[n], &dtypes, opts) {
            Ok(rows) => rows.iter().for_each(|r| println!("{r}")),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        if cpu {
            bench_cpu_gemm(&[n], opts).iter().for_each(|r| println!("{r}"));
        }
    }
}
