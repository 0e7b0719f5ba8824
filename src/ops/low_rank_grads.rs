//! The gradients of both factors of a rank-r product `P = alpha u b^T` (`u [n, r]`,
//! `b [f, r]`) from its output gradient `dy [n, f]`, in one op:
//!
//! `du = alpha dy b` (`[n, r]`, the type of `dy`) and, in place, `acc += alpha dy^T u`
//! (`acc [f, r]`, the accumulator of `b`'s gradient).
//!
//! Built by the fusion pass (`graph/fuse.rs`) from LoRA's two backward products, which both
//! read `dy`, the largest tensor either touches; a backend can then read it once (the CUDA
//! kernel in `cuda/low_rank.cu` does). The CPU computes the two products as
//! [`super::matmul_fused`] does.

use super::matmul::MatmulDims;
use super::{matmul_fused, Infer, Real};
use crate::graph::TensorInfo;
use crate::tensor::DType;

/// Shape rule of `(dy, u, b, acc)`: `du`.
pub fn infer(x: &[&TensorInfo]) -> Infer {
    if x.len() != 4 {
        return Err(format!("takes 4 inputs (dy, u, b, acc), got {}", x.len()));
    }
    let (dy, u, b, acc) = (x[0], x[1], x[2], x[3]);
    let (n, f, r) = match (&dy.shape[..], &u.shape[..]) {
        ([n, f], [un, r]) if un == n => (*n, *f, *r),
        _ => {
            return Err(format!(
                "dy {:?} and u {:?} must be [rows, features] and [rows, rank]",
                dy.shape, u.shape
            ))
        }
    };
    if b.shape != [f, r] || acc.shape != [f, r] {
        return Err(format!(
            "b {:?} and acc {:?} must be [{f}, {r}] (features of dy, rank of u)",
            b.shape, acc.shape
        ));
    }
    if u.dtype != dy.dtype || !b.dtype.is_float() || (acc.dtype != dy.dtype && acc.dtype != DType::F32) {
        return Err(format!(
            "types dy {}, u {}, b {}, acc {}: u must be dy's type, acc dy's type or f32",
            dy.dtype, u.dtype, b.dtype, acc.dtype
        ));
    }
    Ok(vec![(vec![n, r], dy.dtype)])
}

/// On the CPU: the two products (`dy`, `u` `[n, f]`, `[n, r]`; `b`, `acc` `[f, r]`).
#[allow(clippy::too_many_arguments)]
pub fn cpu<T: Real>(dy: &[T], u: &[T], b: &[T], acc: &mut [T], du: &mut [T], n: usize, f: usize, r: usize, alpha: f64) {
    let du_dims = MatmulDims {
        batch: 1,
        m: n,
        n: r,
        k: f,
        shared_b: true,
    };
    matmul_fused::cpu(dy, b, None, du, du_dims, false, false, alpha);
    let db_dims = MatmulDims {
        batch: 1,
        m: f,
        n: r,
        k: n,
        shared_b: true,
    };
    matmul_fused::cpu_accumulate(dy, u, acc, db_dims, true, false, alpha);
}
