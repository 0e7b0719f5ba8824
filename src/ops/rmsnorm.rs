//! RMSNorm (Zhang & Sennrich 2019): `y = x / sqrt(mean(x^2) + eps) * w`.
//!
//! Backward, with `r = 1/sqrt(mean(x^2) + eps)`, `xh = x r`, `g = dy * w`:
//! `dx = r (g - xh * mean(g * xh))`, `dw = sum_rows(dy * xh)`. The backward op computes `dw`
//! only when the weight is trained, and can add another gradient of `x` into `dx` (in a
//! residual block, `x` is also read by the residual add).

use super::par::*;
use super::{Infer, Op, Real};
use crate::graph::{Graph, TensorId, TensorInfo};
use crate::tensor::DType;
use crate::Result;

pub fn infer(x: &TensorInfo, w: &TensorInfo) -> Infer {
    let h = *x.shape.last().ok_or("x must have at least one dim")?;
    if w.shape != [h] {
        return Err(format!("weight must be [{h}], got {:?}", w.shape));
    }
    if !x.dtype.is_float() || !w.dtype.is_float() {
        return Err("needs float tensors".into());
    }
    Ok(vec![(x.shape.clone(), x.dtype)])
}

pub fn infer_backward(
    x: &TensorInfo,
    w: &TensorInfo,
    dy: &TensorInfo,
    acc: Option<&TensorInfo>,
    weight_grad: bool,
) -> Infer {
    infer(x, w)?;
    if dy.shape != x.shape {
        return Err(format!("dy {:?} must match x {:?}", dy.shape, x.shape));
    }
    if let Some(a) = acc {
        if a.shape != x.shape || !a.dtype.is_float() {
            return Err(format!(
                "the added gradient must be a float tensor of x's shape {:?}, got {:?} {}",
                x.shape, a.shape, a.dtype
            ));
        }
    }
    let mut outs = vec![(x.shape.clone(), dy.dtype)];
    if weight_grad {
        let wdt = if w.dtype == DType::F64 { DType::F64 } else { DType::F32 };
        outs.push((w.shape.clone(), wdt));
    }
    Ok(outs)
}

pub fn backward(g: &mut Graph, i: &[TensorId], dy: TensorId, eps: f64, need: &[bool]) -> Result<Vec<Option<TensorId>>> {
    let op = Op::RmsNormBackward {
        eps,
        weight_grad: need[1],
        add: false,
    };
    let outs = g.apply(op, &[i[0], i[1], dy])?;
    Ok(vec![Some(outs[0]), outs.get(1).copied()])
}

fn inv_rms<T: Real>(x: &[T], eps: f64) -> f64 {
    let ss: f64 = x.iter().map(|v| v.f64() * v.f64()).sum();
    1.0 / (ss / x.len() as f64 + eps).sqrt()
}

pub fn cpu<T: Real>(x: &[T], w: &[T], y: &mut [T], eps: f64) {
    let h = w.len();
    y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(y, x)| {
        let r = inv_rms(x, eps);
        for j in 0..h {
            y[j] = T::of(x[j].f64() * r) * w[j];
        }
    });
}

/// `dx` (plus `acc` when given) and, when `dw` is given, the weight gradient.
pub fn cpu_backward<T: Real>(
    x: &[T],
    w: &[T],
    dy: &[T],
    acc: Option<&[T]>,
    dx: &mut [T],
    dw: Option<&mut [T]>,
    eps: f64,
) {
    let h = w.len();
    dx.par_chunks_mut(h).enumerate().for_each(|(row, dx)| {
        let span = row * h..(row + 1) * h;
        let (x, dy) = (&x[span.clone()], &dy[span.clone()]);
        let r = inv_rms(x, eps);
        let dot: f64 = (0..h).map(|j| dy[j].f64() * w[j].f64() * x[j].f64() * r).sum::<f64>() / h as f64;
        for j in 0..h {
            let xh = x[j].f64() * r;
            let extra = acc.map_or(0.0, |a| a[span.start + j].f64());
            dx[j] = T::of(r * (dy[j].f64() * w[j].f64() - xh * dot) + extra);
        }
    });
    let Some(dw) = dw else { return };
    // dw: a column sum over rows, split into row blocks summed in f64.
    let rows = x.len() / h.max(1);
    let block = super::real::rows_per_task(h);
    let partial: Vec<Vec<f64>> = (0..rows.div_ceil(block))
        .into_par_iter()
        .map(|bi| {
            let mut acc = vec![0f64; h];
            for r in bi * block..((bi + 1) * block).min(rows) {
                let (x, dy) = (&x[r * h..(r + 1) * h], &dy[r * h..(r + 1) * h]);
                let ir = inv_rms(x, eps);
                for j in 0..h {
                    acc[j] += dy[j].f64() * x[j].f64() * ir;
                }
            }
            acc
        })
        .collect();
    for j in 0..h {
        dw[j] = T::of(partial.iter().map(|p| p[j]).sum());
    }
}
