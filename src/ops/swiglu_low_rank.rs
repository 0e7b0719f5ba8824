//! SwiGLU over LoRA-corrected gate and up projections, built by the fusion pass
//! (`graph::fuse`): with `G`, `U` the base products `[n, f]`, `ug`, `uu` the rank-r
//! activations `x A^T` `[n, r]` and `bg`, `bu` the B factors `[f, r]`,
//!
//! `g = G + alpha_g ug bg^T`, `p = U + alpha_u uu bu^T`, `y = silu(g) p`.
//!
//! The corrections are recomputed where they are used (r multiply-adds per element, on the
//! tensor cores on CUDA) instead of being written out as `[n, f]` tensors and read back:
//! the backward recomputes `g` and `p` the same way and returns `dg`, `dp` as
//! [`super::swiglu`]'s backward does.

use super::par::*;
use super::swiglu::sigmoid;
use super::{Infer, Real};
use crate::graph::TensorInfo;

/// Shape rule of `(gate, up, ug, bg, uu, bu)`.
pub fn infer(x: &[&TensorInfo]) -> Infer {
    if x.len() != 6 {
        return Err(format!("takes 6 inputs (gate, up, ug, bg, uu, bu), got {}", x.len()));
    }
    let (g, u) = (x[0], x[1]);
    let y = super::swiglu::infer(g, u)?;
    check_factors(g, x[2], x[3], "gate")?;
    check_factors(g, x[4], x[5], "up")?;
    Ok(y)
}

/// Shape rule of `(gate, up, dy, ug, bg, uu, bu)`: `(dgate, dup)`.
pub fn infer_backward(x: &[&TensorInfo]) -> Infer {
    if x.len() != 7 {
        return Err(format!(
            "takes 7 inputs (gate, up, dy, ug, bg, uu, bu), got {}",
            x.len()
        ));
    }
    let out = super::swiglu::infer_backward(x[0], x[1], x[2])?;
    check_factors(x[0], x[3], x[4], "gate")?;
    check_factors(x[0], x[5], x[6], "up")?;
    Ok(out)
}

fn check_factors(base: &TensorInfo, u: &TensorInfo, b: &TensorInfo, what: &str) -> Result<(), String> {
    let (n, f) = match base.shape[..] {
        [n, f] => (n, f),
        _ => return Err(format!("{what} must be [rows, features], got {:?}", base.shape)),
    };
    let ok = u.shape.len() == 2
        && b.shape.len() == 2
        && u.shape[0] == n
        && b.shape[0] == f
        && u.shape[1] == b.shape[1]
        && u.dtype == base.dtype
        && b.dtype.is_float();
    if !ok {
        return Err(format!(
            "{what} correction: u {:?} {} and b {:?} {} do not fit {what} {:?} {} (want u [{n}, r], b [{f}, r])",
            u.shape, u.dtype, b.shape, b.dtype, base.shape, base.dtype
        ));
    }
    Ok(())
}

/// The rank-r factors of one projection: `u [n, r]`, `b [f, r]`, `alpha`.
pub struct Factors<'a, T> {
    pub u: &'a [T],
    pub b: &'a [T],
    pub alpha: f64,
}

impl<'a, T> Factors<'a, T> {
    /// The gate and up factors among an op's inputs, `(ug, bg, uu, bu)` from input `at` on.
    pub fn pair<S: std::ops::Deref<Target = [T]>>(inputs: &'a [S], at: usize, alphas: (f64, f64)) -> [Self; 2] {
        [(at, alphas.0), (at + 2, alphas.1)].map(|(k, alpha)| Factors {
            u: &inputs[k],
            b: &inputs[k + 1],
            alpha,
        })
    }
}

impl<T: Real> Factors<'_, T> {
    /// `alpha * u[row] . b[col]`
    fn at(&self, r: usize, row: usize, col: usize) -> f64 {
        let (u, b) = (&self.u[row * r..(row + 1) * r], &self.b[col * r..(col + 1) * r]);
        self.alpha * u.iter().zip(b).map(|(x, y)| x.f64() * y.f64()).sum::<f64>()
    }
}

/// Forward on the CPU: `y = silu(G + cg) (U + cu)`, `f` features per row, rank `r`.
pub fn cpu<T: Real>(gate: &[T], up: &[T], fg: &Factors<T>, fu: &Factors<T>, f: usize, r: usize, y: &mut [T]) {
    y.par_chunks_mut(f).enumerate().for_each(|(row, y)| {
        for (col, y) in y.iter_mut().enumerate() {
            let i = row * f + col;
            let g = gate[i].f64() + fg.at(r, row, col);
            let p = up[i].f64() + fu.at(r, row, col);
            *y = T::of(g * sigmoid(g) * p);
        }
    });
}

/// Backward on the CPU: `dg`, `dp` of the corrected gate and up (as `swiglu::cpu_backward`).
#[allow(clippy::too_many_arguments)]
pub fn cpu_backward<T: Real>(
    gate: &[T],
    up: &[T],
    dy: &[T],
    fg: &Factors<T>,
    fu: &Factors<T>,
    f: usize,
    r: usize,
    dg: &mut [T],
    dp: &mut [T],
) {
    dg.par_chunks_mut(f)
        .zip(dp.par_chunks_mut(f))
        .enumerate()
        .for_each(|(row, (dg, dp))| {
            for col in 0..f {
                let i = row * f + col;
                let g = gate[i].f64() + fg.at(r, row, col);
                let p = up[i].f64() + fu.at(r, row, col);
                let (d, s) = (dy[i].f64(), sigmoid(g));
                dg[col] = T::of(d * p * s * (1.0 + g * (1.0 - s)));
                dp[col] = T::of(d * g * s);
            }
        });
}
