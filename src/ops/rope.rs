//! Rotary position embedding (Su et al. 2021, RoFormer), in the rotate-half layout that
//! Hugging Face Llama uses: with `x = [x1, x2]` split at head_dim/2 and
//! `a = pos * inv_freq[i]`, `y = [x1 cos a - x2 sin a, x2 cos a + x1 sin a] * scale`.
//!
//! Positions come from a per-token tensor, so packed rows restart at 0 per document.
//! Inverse frequencies are an input, which is how RoPE scaling (linear, llama3, yarn)
//! enters: the model computes them once. The rotation is orthogonal, so the backward pass
//! is the same op with the angle negated.

use super::par::*;
use super::{Infer, Real};
use crate::graph::TensorInfo;
use crate::tensor::DType;

pub fn infer(x: &TensorInfo, pos: &TensorInfo, inv_freq: &TensorInfo, head_dim: usize) -> Infer {
    if x.shape.len() != 2 || head_dim == 0 || !head_dim.is_multiple_of(2) || !x.shape[1].is_multiple_of(head_dim) {
        return Err(format!(
            "x must be [N, heads*{head_dim}] with an even head dim, got {:?}",
            x.shape
        ));
    }
    if pos.dtype != DType::I32 || pos.shape != [x.shape[0]] {
        return Err(format!(
            "positions must be [{}] i32, got {:?} {}",
            x.shape[0], pos.shape, pos.dtype
        ));
    }
    if inv_freq.dtype != DType::F32 || inv_freq.shape != [head_dim / 2] {
        return Err(format!(
            "inv_freq must be [{}] f32, got {:?} {}",
            head_dim / 2,
            inv_freq.shape,
            inv_freq.dtype
        ));
    }
    if !x.dtype.is_float() {
        return Err("x must be float".into());
    }
    Ok(vec![(x.shape.clone(), x.dtype)])
}

pub fn cpu<T: Real>(x: &[T], pos: &[i32], inv_freq: &[f32], y: &mut [T], head_dim: usize, inverse: bool, scale: f64) {
    let d = x.len() / pos.len().max(1);
    let half = head_dim / 2;
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(pos.par_iter())
        .for_each(|((y, x), &p)| {
            for i in 0..half {
                // The angle is formed in T (f32 in training, as Hugging Face does).
                let a = (T::of(p as f64) * T::of(inv_freq[i] as f64)).f64();
                let (s, c) = a.sin_cos();
                let (s, c) = (if inverse { -s } else { s } * scale, c * scale);
                let (s, c) = (T::of(s), T::of(c));
                for h in (0..d).step_by(head_dim) {
                    let (x1, x2) = (x[h + i], x[h + i + half]);
                    y[h + i] = x1 * c - x2 * s;
                    y[h + i + half] = x2 * c + x1 * s;
                }
            }
        });
}
