//! Matrix products with their epilogue, as BLAS computes them in one pass:
//! `y = alpha op(a) op(b) + c` (with or without `c`) and the in-place
//! `acc += alpha op(a) op(b)`.
//!
//! Model code never builds these: the fusion pass (`graph/fuse.rs`) rewrites chains such as
//! LoRA's `base + s * (x A^T) B^T`, a gradient sum `dx_1 + dx_2`, or a gradient cast to f32
//! and accumulated, into them on backends whose products take alpha and beta (cuBLASLt, the
//! `gemm` crate). Each rewrite removes one or two elementwise passes over the product.
//!
//! Operand types: `a` and `b` as for [`Op::MatMul`]; `c`, `y` and `acc` have `a`'s type or
//! f32 (a 16-bit product accumulated in f32 is never rounded to 16 bits first).

use super::matmul::{self, MatmulDims};
use super::{Infer, Op, Real};
use crate::graph::{Graph, TensorId, TensorInfo};
use crate::tensor::DType;
use crate::Result;

fn check_c(a: &TensorInfo, product: &[usize], c: &TensorInfo, what: &str) -> std::result::Result<(), String> {
    if c.shape != product {
        return Err(format!(
            "{what} {:?} must have the product's shape {product:?}",
            c.shape
        ));
    }
    if c.dtype != a.dtype && c.dtype != DType::F32 {
        return Err(format!(
            "{what} is {} but must be the operands' type {} or f32",
            c.dtype, a.dtype
        ));
    }
    Ok(())
}

/// `(a, b[, c]) -> y`: `y` has `c`'s type when `c` is given, else `a`'s.
pub fn infer(x: &[&TensorInfo], trans_a: bool, trans_b: bool, add: bool) -> Infer {
    let want = if add { 3 } else { 2 };
    if x.len() != want {
        return Err(format!("takes {want} inputs, got {}", x.len()));
    }
    let mut out = matmul::infer(x[0], x[1], trans_a, trans_b)?;
    if add {
        check_c(x[0], &out[0].0, x[2], "c")?;
        out[0].1 = x[2].dtype;
    }
    Ok(out)
}

/// `(a, b, acc)`, in place: no outputs.
pub fn infer_accumulate(x: &[&TensorInfo], trans_a: bool, trans_b: bool) -> Infer {
    if x.len() != 3 {
        return Err(format!("takes 3 inputs, got {}", x.len()));
    }
    let out = matmul::infer(x[0], x[1], trans_a, trans_b)?;
    check_c(x[0], &out[0].0, x[2], "accumulator")?;
    Ok(vec![])
}

/// The gradient of `alpha op(a) op(b) + c`: the product's rule with `alpha dy`, and `dy`
/// for `c`.
pub fn backward(
    g: &mut Graph,
    i: &[TensorId],
    dy: TensorId,
    need: &[bool],
    (trans_a, trans_b, alpha): (bool, bool, f64),
) -> Result<Vec<Option<TensorId>>> {
    let dc = need.get(2).copied().unwrap_or(false).then_some(dy);
    let dp = if alpha == 1.0 {
        dy
    } else {
        g.apply1(Op::Scale { factor: alpha }, &[dy])?
    };
    let dp = g.cast(dp, g.dtype(i[0]))?;
    let mut grads = matmul::backward(g, &i[..2], dp, &need[..2], trans_a, trans_b)?;
    if i.len() == 3 {
        grads.push(dc);
    }
    Ok(grads)
}

// ---- CPU reference -------------------------------------------------------------------

/// `y = alpha op(a) op(b) + c` (no `c`: `y = alpha op(a) op(b)`).
#[allow(clippy::too_many_arguments)]
pub fn cpu<T: Real>(a: &[T], b: &[T], c: Option<&[T]>, y: &mut [T], d: MatmulDims, ta: bool, tb: bool, alpha: f64) {
    if let Some(c) = c {
        y.copy_from_slice(c);
    }
    matmul::cpu_scaled(a, b, y, d, ta, tb, c.is_some(), T::of(alpha));
}

/// `acc += alpha op(a) op(b)`.
pub fn cpu_accumulate<T: Real>(a: &[T], b: &[T], acc: &mut [T], d: MatmulDims, ta: bool, tb: bool, alpha: f64) {
    matmul::cpu_scaled(a, b, acc, d, ta, tb, true, T::of(alpha));
}
