//! Shared by the WGSL matmul tests: random operands, a CPU reference in f64, poisoned
//! outputs and guard regions around every operand.

#![allow(dead_code)]

use ferrotune::backend::wgsl::matmul::{plan_matmul, KernelChoice};
use ferrotune::backend::wgsl::{BufSlice, MatmulArgs, MatmulKernel, WgslContext, WgslOptions};
use ferrotune::DType;
use half::{bf16, f16};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Open the default adapter; a missing adapter fails the test (it never skips).
pub fn context() -> WgslContext {
    match WgslContext::new_blocking(WgslOptions::default()) {
        Ok(c) => c,
        Err(e) => panic!("the WGSL matmul tests need a GPU adapter (lavapipe is enough): {e}"),
    }
}

#[derive(Clone, Debug)]
pub struct Case {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub a_dtype: DType,
    pub b_dtype: DType,
    pub alpha: f32,
    pub accumulate: bool,
    /// Batch strides in elements (`None`: packed).
    pub stride_a: Option<u64>,
    pub stride_b: Option<u64>,
    pub stride_c: Option<u64>,
    /// Byte offsets of A, B and C in their buffers.
    pub offsets: [u64; 3],
    pub kernel: MatmulKernel,
}

impl Case {
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Case {
            m,
            n,
            k,
            batch: 1,
            trans_a: false,
            trans_b: false,
            a_dtype: DType::F32,
            b_dtype: DType::F32,
            alpha: 1.0,
            accumulate: false,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            offsets: [0, 0, 0],
            kernel: MatmulKernel::Simt,
        }
    }
    pub fn trans(mut self, a: bool, b: bool) -> Self {
        self.trans_a = a;
        self.trans_b = b;
        self
    }
    pub fn dtypes(mut self, a: DType, b: DType) -> Self {
        self.a_dtype = a;
        self.b_dtype = b;
        self
    }
    pub fn kernel(mut self, k: MatmulKernel) -> Self {
        self.kernel = k;
        self
    }
}

/// What a run measured against the f64 reference.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// ||C - ref|| / ||ref|| over all outputs.
    pub rel_fro: f64,
    /// max |C - ref| / (|alpha| sum_k |a||b| + |C_before|) over all outputs.
    pub max_rel: f64,
    pub kernel: KernelChoice,
    pub dispatches: usize,
}

/// Random values in [-1, 1), rounded to `dtype`; returns (stored bytes, the stored values).
fn operand(count: usize, dtype: DType, rng: &mut ChaCha8Rng) -> (Vec<u8>, Vec<f64>) {
    let v: Vec<f32> = (0..count).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    match dtype {
        DType::F32 => (bytemuck::cast_slice(&v).to_vec(), v.iter().map(|x| *x as f64).collect()),
        DType::F16 => {
            let h: Vec<f16> = v.iter().map(|x| f16::from_f32(*x)).collect();
            (
                bytemuck::cast_slice(&h).to_vec(),
                h.iter().map(|x| x.to_f64()).collect(),
            )
        }
        DType::BF16 => {
            let h: Vec<bf16> = v.iter().map(|x| bf16::from_f32(*x)).collect();
            (
                bytemuck::cast_slice(&h).to_vec(),
                h.iter().map(|x| x.to_f64()).collect(),
            )
        }
        other => panic!("no test operands of dtype {other}"),
    }
}

const GUARD: usize = 512;
const NAN_BITS: u32 = 0x7fc0_0000;
const SENTINEL: f32 = 7777.0;

/// Bytes laid out as `offset` bytes of NaN words, the data, then a NaN tail: a kernel that
/// reads outside the operand produces NaN.
fn poisoned(offset: u64, data: &[u8]) -> Vec<u8> {
    let total = (offset as usize + data.len() + GUARD).next_multiple_of(16);
    let mut out: Vec<u8> = NAN_BITS.to_le_bytes().iter().copied().cycle().take(total).collect();
    out[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    out
}

/// Run `case` on `ctx` with inputs from `seed` and compare with the f64 reference.
pub fn run(ctx: &WgslContext, case: &Case, seed: u64) -> Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (m, n, k, batch) = (case.m, case.n, case.k, case.batch);
    let sa = case.stride_a.unwrap_or((m * k) as u64) as usize;
    let sb = case.stride_b.unwrap_or((k * n) as u64) as usize;
    let sc = case.stride_c.unwrap_or((m * n) as u64) as usize;
    let (a_bytes, a) = operand((batch - 1) * sa + m * k, case.a_dtype, &mut rng);
    let (b_bytes, b) = operand((batch - 1) * sb + k * n, case.b_dtype, &mut rng);
    let c_len = (batch - 1) * sc + m * n;

    // C: sentinel before and after the slice; inside, NaN (overwrite) or random (accumulate).
    let c_before: Vec<f32> = if case.accumulate {
        (0..c_len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    } else {
        vec![f32::from_bits(NAN_BITS); c_len]
    };
    let c_off = case.offsets[2] as usize / 4;
    let mut c_host = vec![SENTINEL; c_off + c_len + GUARD / 4];
    c_host[c_off..c_off + c_len].copy_from_slice(&c_before);

    let a_buf = ctx.upload("A", &poisoned(case.offsets[0], &a_bytes)).unwrap();
    let b_buf = ctx.upload("B", &poisoned(case.offsets[1], &b_bytes)).unwrap();
    let c_buf = ctx.upload("C", bytemuck::cast_slice(&c_host)).unwrap();
    let args = MatmulArgs {
        a: BufSlice {
            buffer: &a_buf,
            offset: case.offsets[0],
            size: a_bytes.len() as u64,
        },
        b: BufSlice {
            buffer: &b_buf,
            offset: case.offsets[1],
            size: b_bytes.len() as u64,
        },
        c: BufSlice {
            buffer: &c_buf,
            offset: case.offsets[2],
            size: c_len as u64 * 4,
        },
        m,
        n,
        k,
        batch,
        batch_stride_a: case.stride_a,
        batch_stride_b: case.stride_b,
        batch_stride_c: case.stride_c,
        trans_a: case.trans_a,
        trans_b: case.trans_b,
        a_dtype: case.a_dtype,
        b_dtype: case.b_dtype,
        alpha: case.alpha,
        accumulate: case.accumulate,
        kernel: case.kernel,
    };
    let plan = plan_matmul(ctx, &args).unwrap_or_else(|e| panic!("{case:?}: {e}"));
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        plan.encode(&mut pass);
    }
    ctx.queue.submit([enc.finish()]);
    let got = ctx.read_f32(&c_buf, 0, c_host.len()).unwrap();

    // Guards and gaps between strided batches keep their bits.
    let mut written = vec![false; c_len];
    for z in 0..batch {
        for i in 0..m {
            for j in 0..n {
                written[z * sc + i * n + j] = true;
            }
        }
    }
    for (idx, (g, h)) in got.iter().zip(&c_host).enumerate() {
        let inside = idx >= c_off && idx < c_off + c_len && written[idx - c_off];
        if !inside {
            assert_eq!(
                g.to_bits(),
                h.to_bits(),
                "{case:?}: element {idx} outside the product was modified"
            );
        }
    }

    let at = |z: usize, i: usize, p: usize| a[z * sa + if case.trans_a { p * m + i } else { i * k + p }];
    let bt = |z: usize, p: usize, j: usize| b[z * sb + if case.trans_b { j * k + p } else { p * n + j }];
    let alpha = case.alpha as f64;
    let (mut err2, mut ref2, mut max_rel) = (0f64, 0f64, 0f64);
    for z in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut s_abs) = (0f64, 0f64);
                for p in 0..k {
                    let t = at(z, i, p) * bt(z, p, j);
                    s += t;
                    s_abs += t.abs();
                }
                let ci = z * sc + i * n + j;
                let before = if case.accumulate { c_before[ci] as f64 } else { 0.0 };
                let want = alpha * s + before;
                let g = got[c_off + ci] as f64;
                assert!(g.is_finite(), "{case:?}: C[{z}][{i}][{j}] = {g} (want {want})");
                let e = (g - want).abs();
                err2 += e * e;
                ref2 += want * want;
                max_rel = max_rel.max(e / (alpha.abs() * s_abs + before.abs() + 1e-30));
            }
        }
    }
    Outcome {
        rel_fro: (err2 / ref2.max(1e-300)).sqrt(),
        max_rel,
        kernel: plan.kernel,
        dispatches: plan.dispatch_count(),
    }
}

/// Run and assert both error measures are under `tol`.
pub fn check(ctx: &WgslContext, case: &Case, seed: u64, tol: f64) -> Outcome {
    let o = run(ctx, case, seed);
    assert!(
        o.rel_fro < tol && o.max_rel < tol,
        "{case:?}: relative error {:.3e} (Frobenius), {:.3e} (max per element) exceeds {tol:e} with {:?}",
        o.rel_fro,
        o.max_rel,
        o.kernel
    );
    o
}
