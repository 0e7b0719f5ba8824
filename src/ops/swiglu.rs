//! SwiGLU gate (Shazeer 2020): `y = silu(g) * u`, `silu(g) = g * sigmoid(g)`.
//! Backward: `dg = dy * u * sig * (1 + g (1 - sig))`, `du = dy * silu(g)`.

use super::par::*;
use super::{Infer, Op, Real};
use crate::graph::{Graph, TensorId, TensorInfo};
use crate::Result;

pub fn infer(g: &TensorInfo, u: &TensorInfo) -> Infer {
    if g.shape != u.shape || g.dtype != u.dtype || !g.dtype.is_float() {
        return Err(format!(
            "gate and up must match: {:?} {} vs {:?} {}",
            g.shape, g.dtype, u.shape, u.dtype
        ));
    }
    Ok(vec![(g.shape.clone(), g.dtype)])
}

pub fn infer_backward(g: &TensorInfo, u: &TensorInfo, dy: &TensorInfo) -> Infer {
    infer(g, u)?;
    if dy.shape != g.shape {
        return Err(format!("dy {:?} must match {:?}", dy.shape, g.shape));
    }
    Ok(vec![(g.shape.clone(), dy.dtype), (g.shape.clone(), dy.dtype)])
}

pub fn backward(gr: &mut Graph, i: &[TensorId], dy: TensorId) -> Result<Vec<Option<TensorId>>> {
    let o = gr.apply(Op::SwigluBackward, &[i[0], i[1], dy])?;
    Ok(vec![Some(o[0]), Some(o[1])])
}

pub(super) fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn cpu<T: Real>(g: &[T], u: &[T], y: &mut [T]) {
    y.par_iter_mut().enumerate().for_each(|(i, y)| {
        let gv = g[i].f64();
        *y = T::of(gv * sigmoid(gv)) * u[i];
    });
}

pub fn cpu_backward<T: Real>(g: &[T], u: &[T], dy: &[T], dg: &mut [T], du: &mut [T]) {
    dg.par_iter_mut()
        .zip(du.par_iter_mut())
        .enumerate()
        .for_each(|(i, (dg, du))| {
            let (gv, uv, d) = (g[i].f64(), u[i].f64(), dy[i].f64());
            let s = sigmoid(gv);
            *dg = T::of(d * uv * s * (1.0 + gv * (1.0 - s)));
            *du = T::of(d * gv * s);
        });
}
