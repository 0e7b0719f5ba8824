//! Optimizer ops: global gradient norm, clipping coefficient, AdamW, gradient accumulation.
//!
//! AdamW (Loshchilov & Hutter 2019) exactly as `torch.optim.AdamW`:
//! `p -= lr * wd * p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;`
//! `p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)` with `bc_i = 1 - b_i^t`.
//! The per-step scalars arrive in `hyper = [lr, bc1, sqrt(bc2)]`, and the gradient is
//! first multiplied by the clipping coefficient; a non-finite coefficient (the gradient
//! overflowed) skips the update. The update zeroes the gradient buffer,
//! which is the accumulator the next optimizer step's micro-batches add into.

use super::par::*;
use super::{Infer, Real};
use crate::graph::TensorInfo;
use crate::tensor::DType;

#[derive(Clone, Debug, PartialEq)]
pub struct AdamWSpec {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

fn scalar_dtype(x: &[&TensorInfo]) -> DType {
    if x.iter().any(|t| t.dtype == DType::F64) {
        DType::F64
    } else {
        DType::F32
    }
}

pub fn infer_sum_squares(x: &[&TensorInfo]) -> Infer {
    if x.is_empty() || x.iter().any(|t| !t.dtype.is_float()) {
        return Err("needs one or more float tensors".into());
    }
    Ok(vec![(vec![1], scalar_dtype(x))])
}

pub fn infer_clip_coef(x: &TensorInfo) -> Infer {
    if x.numel() != 1 || !x.dtype.is_float() {
        return Err("takes the sum of squares, one float".into());
    }
    Ok(vec![(vec![1], x.dtype), (vec![1], x.dtype)])
}

pub fn infer_adamw(x: &[&TensorInfo]) -> Infer {
    let (p, g, m, v, hyper, coef) = (x[0], x[1], x[2], x[3], x[4], x[5]);
    for (name, t) in [("grad", g), ("m", m), ("v", v)] {
        if t.shape != p.shape {
            return Err(format!("{name} {:?} must match the parameter {:?}", t.shape, p.shape));
        }
    }
    if [p, g, m, v].iter().any(|t| !matches!(t.dtype, DType::F32 | DType::F64)) {
        return Err("parameter, gradient and moments must be f32 (or f64)".into());
    }
    if hyper.shape != [3] || hyper.dtype != DType::F32 || coef.shape != [1] {
        return Err("hyper must be [3] f32 and coef [1]".into());
    }
    Ok(vec![])
}

pub fn infer_accumulate(acc: &TensorInfo, g: &TensorInfo) -> Infer {
    if acc.shape != g.shape || !acc.dtype.is_float() || !g.dtype.is_float() {
        return Err(format!(
            "accumulator {:?} and gradient {:?} must match",
            acc.shape, g.shape
        ));
    }
    Ok(vec![])
}

// ---- CPU reference -------------------------------------------------------------------

/// Sum of squares in fixed-size chunks, so the result does not depend on thread timing.
pub fn sum_squares<T: Real>(x: &[T]) -> f64 {
    let parts: Vec<f64> = x
        .par_chunks(4096)
        .map(|c| c.iter().map(|v| v.f64() * v.f64()).sum())
        .collect();
    parts.iter().sum()
}

/// `(norm, coef)` for a total sum of squares.
pub fn clip_coef(sumsq: f64, max_norm: f64) -> (f64, f64) {
    let norm = sumsq.sqrt();
    // NaN marks an overflowed gradient (f64::min would silently return 1).
    let coef = if norm.is_finite() {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        f64::NAN
    };
    (norm, coef)
}

#[allow(clippy::too_many_arguments)]
pub fn adamw<T: Real>(s: &AdamWSpec, p: &mut [T], g: &mut [T], m: &mut [T], v: &mut [T], hyper: [f64; 3], coef: f64) {
    if !coef.is_finite() {
        // A non-finite gradient norm: leave the weights and moments as they are.
        g.iter_mut().for_each(|g| *g = T::zero());
        return;
    }
    let [lr, bc1, bc2_sqrt] = hyper;
    let (b1, b2) = (T::of(s.beta1), T::of(s.beta2));
    let (one, decay) = (T::one(), T::of(1.0 - lr * s.weight_decay));
    let (step, eps, coef) = (T::of(lr / bc1), T::of(s.eps), T::of(coef));
    let bc2_sqrt = T::of(bc2_sqrt);
    p.par_iter_mut()
        .zip(g.par_iter_mut())
        .zip(m.par_iter_mut())
        .zip(v.par_iter_mut())
        .for_each(|(((p, g), m), v)| {
            let gv = *g * coef;
            *p = *p * decay;
            *m = b1 * *m + (one - b1) * gv;
            *v = b2 * *v + (one - b2) * gv * gv;
            *p = *p - step * *m / (v.sqrt() / bc2_sqrt + eps);
            *g = T::zero();
        });
}
