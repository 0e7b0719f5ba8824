//! Matmul throughput: square `n x n x n` products per kernel and storage dtype, timed with GPU
//! timestamps where the device has them (else wall clock around submit and wait), after a
//! warm-up, reported as the median of several runs.

use std::time::{Duration, Instant};

use half::{bf16, f16};

use crate::error::Result;
use crate::tensor::DType;

use super::buffers::BufSlice;
use super::context::WgslContext;
use super::matmul::{plan_matmul, MatmulArgs, MatmulKernel, MatmulPlan};

/// One measured configuration.
#[derive(Clone, Debug)]
pub struct BenchRow {
    /// `simt`, `coop` or `cpu-gemm`.
    pub kernel: String,
    /// Storage dtype of A and B (C is f32).
    pub dtype: DType,
    /// B stored [n, k].
    pub trans_b: bool,
    pub size: usize,
    pub runs: usize,
    pub median_ms: f64,
    pub gflops: f64,
    /// `gpu-timestamps` or `wall-clock`.
    pub timing: &'static str,
}

impl std::fmt::Display for BenchRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<9} {:<5} {:<3} {:>6} {:>10.3} ms {:>12.1} GFLOP/s  ({} runs, {})",
            self.kernel,
            self.dtype.name(),
            if self.trans_b { "NT" } else { "NN" },
            self.size,
            self.median_ms,
            self.gflops,
            self.runs,
            self.timing
        )
    }
}

/// How long to spend per configuration (beyond the warm-up), run-count bounds, and the
/// layout of B (`trans_b`: stored [n, k], as a linear layer's weight is).
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    pub seconds: f64,
    pub min_runs: usize,
    pub max_runs: usize,
    pub trans_b: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            seconds: 2.0,
            min_runs: 3,
            max_runs: 50,
            trans_b: false,
        }
    }
}

/// Deterministic values in [-1, 1) (a 64-bit LCG; benchmarks need no statistics).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn encode_as(v: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F16 => v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
        DType::BF16 => v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
        _ => bytemuck::cast_slice(v).to_vec(),
    }
}

/// Time one plan: seconds per run.
fn time_plan(ctx: &WgslContext, plan: &MatmulPlan, opts: BenchOptions) -> Result<(Vec<f64>, &'static str)> {
    let query = ctx.has_timestamps.then(|| {
        let set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("matmul bench"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        (set, resolve)
    });
    let run_once = || -> Result<f64> {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("matmul bench"),
                timestamp_writes: query.as_ref().map(|(set, _)| wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                }),
            });
            plan.encode(&mut pass);
        }
        if let Some((set, resolve)) = &query {
            enc.resolve_query_set(set, 0..2, resolve, 0);
        }
        let t0 = Instant::now();
        ctx.queue.submit([enc.finish()]);
        ctx.wait_idle()?;
        let wall = t0.elapsed().as_secs_f64();
        match &query {
            Some((_, resolve)) => {
                let b = pollster::block_on(ctx.read(resolve, 0, 16))?;
                let ts: &[u64] = bytemuck::cast_slice(&b);
                let ns = ts[1].saturating_sub(ts[0]) as f64 * ctx.queue.get_timestamp_period() as f64;
                // A zero span means the driver wrote no timestamps; fall back to wall clock.
                Ok(if ns > 0.0 { ns * 1e-9 } else { wall })
            }
            None => Ok(wall),
        }
    };
    let warm = run_once()?;
    let runs = ((opts.seconds / warm.max(1e-6)) as usize).clamp(opts.min_runs, opts.max_runs);
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        times.push(run_once()?);
    }
    Ok((
        times,
        if query.is_some() {
            "gpu-timestamps"
        } else {
            "wall-clock"
        },
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Benchmark `C = A B` at each size, for each storage dtype of A and B, with the SIMT kernel
/// and (for f16, where the device has it) the cooperative-matrix kernel.
pub fn bench_matmul(ctx: &WgslContext, sizes: &[usize], dtypes: &[DType], opts: BenchOptions) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for &n in sizes {
        for &dtype in dtypes {
            let host_a = encode_as(&values(n * n, 1), dtype);
            let host_b = encode_as(&values(n * n, 2), dtype);
            let a = ctx.upload("bench A", &host_a)?;
            let b = ctx.upload("bench B", &host_b)?;
            let c = ctx.create_buffer("bench C", (n * n * 4) as u64)?;
            let mut kernels = vec![MatmulKernel::Simt];
            if ctx.has_coop_matrix && dtype == DType::F16 {
                kernels.push(MatmulKernel::Coop);
            }
            for kernel in kernels {
                let mut args = MatmulArgs::new(BufSlice::whole(&a), BufSlice::whole(&b), BufSlice::whole(&c), n, n, n);
                args.a_dtype = dtype;
                args.b_dtype = dtype;
                args.kernel = kernel;
                args.trans_b = opts.trans_b;
                let plan = plan_matmul(ctx, &args)?;
                let (times, timing) = time_plan(ctx, &plan, opts)?;
                let runs = times.len();
                let t = median(times);
                rows.push(BenchRow {
                    kernel: plan.kernel.name().to_string(),
                    dtype,
                    trans_b: opts.trans_b,
                    size: n,
                    runs,
                    median_ms: t * 1e3,
                    gflops: args.flops() / t * 1e-9,
                    timing,
                });
            }
        }
    }
    Ok(rows)
}

/// The same products in f32 on the CPU with the `gemm` crate (all cores), wall clock.
pub fn bench_cpu_gemm(sizes: &[usize], opts: BenchOptions) -> Vec<BenchRow> {
    let mut rows = Vec::new();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    for &n in sizes {
        let a = values(n * n, 1);
        let b = values(n * n, 2);
        let mut c = vec![0f32; n * n];
        let mut run = || {
            let t0 = Instant::now();
            // SAFETY: all three slices hold n*n elements in row-major order (row stride n,
            // column stride 1), matching the dimensions and strides passed.
            unsafe {
                gemm::gemm(
                    n,
                    n,
                    n,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    n as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                );
            }
            t0.elapsed()
        };
        let warm = run();
        let runs = ((opts.seconds / warm.as_secs_f64().max(1e-6)) as usize).clamp(opts.min_runs, opts.max_runs);
        let times: Vec<f64> = (0..runs).map(|_| run()).map(|d: Duration| d.as_secs_f64()).collect();
        let t = median(times);
        rows.push(BenchRow {
            kernel: "cpu-gemm".to_string(),
            dtype: DType::F32,
            trans_b: false,
            size: n,
            runs,
            median_ms: t * 1e3,
            gflops: 2.0 * (n as f64).powi(3) / t * 1e-9,
            timing: "wall-clock",
        });
    }
    rows
}
