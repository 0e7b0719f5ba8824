//! Shared by the WGSL op tests: runs one op on a backend with every operand in one buffer
//! (as the executor's arena does), outputs poisoned with NaN and guard bytes between the
//! operands, and compares the WGSL backend with the CPU reference backend.

#![allow(dead_code)]

use ferrotune::backend::cpu::CpuBackend;
use ferrotune::backend::wgsl::{WgslBackend, WgslContext, WgslOptions};
use ferrotune::backend::{Arg, Backend, Loc};
use ferrotune::graph::{Role, TensorInfo};
use ferrotune::ops::Op;
use ferrotune::{DType, HostTensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// f32 results: only rounding in another order may differ.
pub const TOL: f64 = 1e-5;
/// f16/bf16 storage of an operand or result.
pub const TOL_HALF: f64 = 1e-2;

/// A WGSL backend on the default adapter; a missing adapter fails the test (never skips).
pub fn wgsl() -> WgslBackend {
    match WgslContext::new_blocking(WgslOptions::default()) {
        Ok(c) => WgslBackend::new(c),
        Err(e) => panic!("the WGSL tests need a GPU adapter (lavapipe is enough): {e}"),
    }
}

/// A WGSL backend that binds at most `bytes` at once, so even small tensors are sliced.
pub fn wgsl_sliced(bytes: u64) -> WgslBackend {
    let mut b = wgsl();
    b.set_max_binding(bytes);
    b
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn randn(r: &mut ChaCha8Rng, shape: &[usize], dtype: DType) -> HostTensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (u, w): (f64, f64) = (r.random::<f64>().max(1e-12), r.random());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * w).cos()) as f32
        })
        .collect();
    HostTensor::from_f32(shape, &v).cast(dtype)
}

pub fn ints(shape: &[usize], v: Vec<i32>) -> HostTensor {
    HostTensor::from_i32(shape, &v)
}

/// ||a - b|| / ||b|| in f64 over the finite elements of `b`. Where `b` is not finite, `a`
/// must be the same (NaN, or infinity of the same sign); any other mismatch of finiteness
/// gives infinity.
pub fn rel_err(a: &HostTensor, b: &HostTensor) -> f64 {
    assert_eq!(a.shape, b.shape, "shapes differ");
    let (a, b) = (a.to_f64(), b.to_f64());
    let mut num = 0.0;
    let mut den = 0.0;
    for (x, y) in a.iter().zip(&b) {
        let same_class = if y.is_nan() {
            x.is_nan()
        } else {
            y.is_finite() == x.is_finite() && (y.is_finite() || x == y)
        };
        if !same_class {
            return f64::INFINITY;
        }
        if y.is_finite() {
            num += (x - y) * (x - y);
            den += y * y;
        }
    }
    num.sqrt() / den.sqrt().max(1e-30)
}

const GUARD: u8 = 0xA5;

fn poison(dtype: DType, n: usize) -> Vec<u8> {
    match dtype {
        DType::F32 => f32::NAN.to_le_bytes().repeat(n),
        DType::F16 => 0x7e00u16.to_le_bytes().repeat(n),
        DType::BF16 => 0x7fc0u16.to_le_bytes().repeat(n),
        DType::I32 | DType::U32 => 0x7fff_ffffu32.to_le_bytes().repeat(n),
        DType::F64 => f64::NAN.to_le_bytes().repeat(n),
    }
}

/// What one run of an op produced: its outputs and its inputs afterwards (in-place ops).
pub struct Run {
    pub outputs: Vec<HostTensor>,
    pub inputs: Vec<HostTensor>,
}

fn info(name: String, t: &HostTensor) -> TensorInfo {
    TensorInfo {
        name,
        shape: t.shape.clone(),
        dtype: t.dtype,
        role: Role::Input,
    }
}

/// Runs `op` on `be`: all operands in one buffer with guard bytes between them, outputs
/// filled with NaN first. Panics when a guard byte changed (an out-of-bounds write).
pub fn run(be: &mut dyn Backend, op: &Op, inputs: &[HostTensor]) -> ferrotune::Result<Run> {
    run_at(be, op, inputs, 0)
}

/// [`run`] with every operand `misalign` bytes past an alignment boundary (a multiple of
/// 8), so bindings start below the operand and kernels index from an element offset.
pub fn run_at(be: &mut dyn Backend, op: &Op, inputs: &[HostTensor], misalign: u64) -> ferrotune::Result<Run> {
    let ins: Vec<TensorInfo> = inputs
        .iter()
        .enumerate()
        .map(|(k, t)| info(format!("in{k}"), t))
        .collect();
    let in_refs: Vec<&TensorInfo> = ins.iter().collect();
    let outs: Vec<TensorInfo> = op
        .infer(&in_refs)
        .unwrap_or_else(|e| panic!("{}: {e}", op.name()))
        .into_iter()
        .enumerate()
        .map(|(k, (shape, dtype))| TensorInfo {
            name: format!("out{k}"),
            shape,
            dtype,
            role: Role::Activation,
        })
        .collect();
    let out_refs: Vec<&TensorInfo> = outs.iter().collect();
    let align = be.alignment();
    let mut at = align;
    let mut place = |bytes: usize| {
        let o = at + misalign;
        at = (o + bytes as u64).div_ceil(align) * align + align;
        o
    };
    let in_offs: Vec<u64> = ins.iter().map(|t| place(t.bytes())).collect();
    let out_offs: Vec<u64> = outs.iter().map(|t| place(t.bytes())).collect();
    let total = at;
    let buf = be.alloc(total)?;
    let loc = |offset: u64, bytes: usize| Loc {
        buffer: buf,
        offset,
        bytes: bytes as u64,
    };
    be.write(loc(0, total as usize), &vec![GUARD; total as usize])?;
    for ((t, &o), i) in inputs.iter().zip(&in_offs).zip(&ins) {
        be.write(loc(o, i.bytes()), &t.data)?;
    }
    for (t, &o) in outs.iter().zip(&out_offs) {
        be.write(loc(o, t.bytes()), &poison(t.dtype, t.numel()))?;
    }
    be.prepare(op, &in_refs, &out_refs)?;
    let in_args: Vec<Arg> = ins
        .iter()
        .zip(&in_offs)
        .map(|(t, &o)| Arg {
            loc: loc(o, t.bytes()),
            info: t,
        })
        .collect();
    // An output that is the first input's memory (Op::is_alias: a cache written in place)
    // is placed there.
    let placed: Vec<u64> = out_offs
        .iter()
        .enumerate()
        .map(|(k, &o)| if op.is_alias(k) { in_offs[0] } else { o })
        .collect();
    let out_args: Vec<Arg> = outs
        .iter()
        .zip(&placed)
        .map(|(t, &o)| Arg {
            loc: loc(o, t.bytes()),
            info: t,
        })
        .collect();
    be.launch(op, &in_args, &out_args)?;
    be.flush()?;
    let whole = be.read(&[loc(0, total as usize)])?.remove(0);
    // Every byte outside the operands is still a guard byte (but for the rest of an
    // operand's last 4-byte word: uploads and f16/bf16 stores write whole words).
    let mut ranges: Vec<(u64, usize)> = ins.iter().zip(&in_offs).map(|(t, &o)| (o, t.bytes())).collect();
    ranges.extend(outs.iter().zip(&out_offs).map(|(t, &o)| (o, t.bytes())));
    ranges.sort();
    let mut prev = 0u64;
    for &(o, n) in ranges.iter().chain(std::iter::once(&(total, 0))) {
        for (k, &b) in whole[prev as usize..o as usize].iter().enumerate() {
            assert_eq!(
                b,
                GUARD,
                "{}: byte {} outside every operand was written",
                op.name(),
                prev as usize + k
            );
        }
        prev = prev.max((o + n as u64).next_multiple_of(4));
    }
    let take = |t: &TensorInfo, o: u64| HostTensor {
        shape: t.shape.clone(),
        dtype: t.dtype,
        data: whole[o as usize..o as usize + t.bytes()].to_vec(),
    };
    Ok(Run {
        outputs: outs.iter().zip(&placed).map(|(t, &o)| take(t, o)).collect(),
        inputs: ins.iter().zip(&in_offs).map(|(t, &o)| take(t, o)).collect(),
    })
}

/// Runs `op` on the CPU and on `be`; returns (cpu, wgsl).
pub fn both(be: &mut WgslBackend, op: &Op, inputs: &[HostTensor]) -> (Run, Run) {
    both_at(be, op, inputs, 0)
}

pub fn both_at(be: &mut WgslBackend, op: &Op, inputs: &[HostTensor], misalign: u64) -> (Run, Run) {
    let cpu = run(&mut CpuBackend::new(), op, inputs).expect("cpu");
    let gpu = run_at(be, op, inputs, misalign).unwrap_or_else(|e| panic!("wgsl {}: {e}", op.name()));
    (cpu, gpu)
}

/// Asserts every output (and every input written in place) matches the f64 CPU reference
/// within `tol`.
pub fn check(be: &mut WgslBackend, op: &Op, inputs: &[HostTensor], tol: f64) -> (Run, Run) {
    check_at(be, op, inputs, tol, 0)
}

/// The CPU backend in f64 on the same inputs (floats widened exactly, but for the few
/// operands an op requires in f32); casts and rope run in the input dtype (see below).
pub fn reference(op: &Op, inputs: &[HostTensor]) -> Run {
    // A cast's result is defined by its source type; rope's angle is defined as an f32
    // product (as in Hugging Face), which f64 would compute more exactly at large positions.
    if matches!(op, Op::Cast { .. } | Op::Rope { .. }) {
        return run(&mut CpuBackend::new(), op, inputs).expect("cpu");
    }
    // Operands whose dtype the op fixes: dropout's p, rope's frequencies, AdamW's hyper-parameters.
    let fixed: &[usize] = match op {
        Op::Dropout { .. } => &[2],
        Op::AdamW(_) => &[4],
        _ => &[],
    };
    let wide: Vec<HostTensor> = inputs
        .iter()
        .enumerate()
        .map(|(k, t)| {
            if t.dtype.is_float() && !fixed.contains(&k) {
                t.cast(DType::F64)
            } else {
                t.clone()
            }
        })
        .collect();
    run(&mut CpuBackend::new(), op, &wide).expect("cpu f64")
}

/// Asserts every output (and every input written in place) matches the f64 CPU reference
/// within `tol`.
pub fn check_at(be: &mut WgslBackend, op: &Op, inputs: &[HostTensor], tol: f64, misalign: u64) -> (Run, Run) {
    let cpu = reference(op, inputs);
    let gpu = run_at(be, op, inputs, misalign).unwrap_or_else(|e| panic!("wgsl {}: {e}", op.name()));
    for (k, (a, b)) in gpu.outputs.iter().zip(&cpu.outputs).enumerate() {
        let e = rel_err(a, b);
        assert!(
            e < tol,
            "{:?}: output {k} relative error {e:.3e} (tolerance {tol:e})",
            op
        );
    }
    for &k in op.writes() {
        let e = rel_err(&gpu.inputs[k], &cpu.inputs[k]);
        assert!(
            e < tol,
            "{:?}: in-place input {k} relative error {e:.3e} (tolerance {tol:e})",
            op
        );
    }
    (cpu, gpu)
}
