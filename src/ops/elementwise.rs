//! Elementwise and shape ops: add, mul (with suffix/scalar broadcasting), scale, cast,
//! reshape, reduce-sum, broadcast, dropout.

use super::par::*;
use super::{Infer, Op, Real};
use crate::graph::{Graph, TensorId, TensorInfo};
use crate::tensor::{numel, DType};
use crate::Result;

/// `b` broadcasts against `a` when it has `a`'s shape, a suffix of it, or one element;
/// element `i` of the result then reads `b[i % b.len()]`.
pub fn broadcasts(a: &[usize], b: &[usize]) -> bool {
    numel(b) == 1 || (b.len() <= a.len() && a[a.len() - b.len()..] == *b)
}

pub fn float_like(x: &TensorInfo) -> Infer {
    if !x.dtype.is_float() {
        return Err(format!("needs a float tensor, got {}", x.dtype));
    }
    Ok(vec![(x.shape.clone(), x.dtype)])
}

pub fn infer_binary(a: &TensorInfo, b: &TensorInfo) -> Infer {
    if a.dtype != b.dtype {
        return Err(format!("dtypes differ: {} vs {}", a.dtype, b.dtype));
    }
    if !broadcasts(&a.shape, &b.shape) {
        return Err(format!("shape {:?} does not broadcast to {:?}", b.shape, a.shape));
    }
    float_like(a)
}

pub fn infer_cast(x: &TensorInfo, dtype: DType) -> Infer {
    if !x.dtype.is_float() || !dtype.is_float() {
        return Err(format!("casts between float types only ({} -> {dtype})", x.dtype));
    }
    Ok(vec![(x.shape.clone(), dtype)])
}

pub fn infer_reshape(x: &TensorInfo, shape: &[usize]) -> Infer {
    if numel(shape) != x.numel() {
        return Err(format!(
            "cannot reshape {:?} ({} elements) to {shape:?}",
            x.shape,
            x.numel()
        ));
    }
    Ok(vec![(shape.to_vec(), x.dtype)])
}

pub fn infer_reduce_sum(x: &TensorInfo, shape: &[usize]) -> Infer {
    if !broadcasts(&x.shape, shape) {
        return Err(format!("{shape:?} is not a suffix of {:?} nor a scalar", x.shape));
    }
    float_like(x).map(|_| vec![(shape.to_vec(), x.dtype)])
}

pub fn infer_broadcast(x: &TensorInfo, shape: &[usize]) -> Infer {
    if !broadcasts(shape, &x.shape) {
        return Err(format!("{:?} does not broadcast to {shape:?}", x.shape));
    }
    float_like(x).map(|_| vec![(shape.to_vec(), x.dtype)])
}

pub fn infer_dropout(x: &TensorInfo, seed: &TensorInfo, p: &TensorInfo) -> Infer {
    if seed.dtype != DType::U32 || seed.numel() != 1 {
        return Err(format!("seed must be one u32, got {:?} {}", seed.shape, seed.dtype));
    }
    if p.dtype != DType::F32 || p.numel() != 1 {
        return Err(format!("p must be one f32, got {:?} {}", p.shape, p.dtype));
    }
    float_like(x)
}

pub fn backward_add(g: &mut Graph, i: &[TensorId], dy: TensorId, need: &[bool]) -> Result<Vec<Option<TensorId>>> {
    let da = need[0].then_some(dy);
    let db = if need[1] { Some(reduce_to(g, dy, i[1])?) } else { None };
    Ok(vec![da, db])
}

pub fn backward_mul(g: &mut Graph, i: &[TensorId], dy: TensorId, need: &[bool]) -> Result<Vec<Option<TensorId>>> {
    let da = if need[0] {
        Some(g.apply1(Op::Mul, &[dy, i[1]])?)
    } else {
        None
    };
    let db = if need[1] {
        let p = g.apply1(Op::Mul, &[dy, i[0]])?;
        Some(reduce_to(g, p, i[1])?)
    } else {
        None
    };
    Ok(vec![da, db])
}

/// Sums `x` down to the shape of `like` when `like` was broadcast.
fn reduce_to(g: &mut Graph, x: TensorId, like: TensorId) -> Result<TensorId> {
    let shape = g.shape(like).to_vec();
    if g.shape(x) == shape.as_slice() {
        Ok(x)
    } else {
        g.apply1(Op::ReduceSum { shape }, &[x])
    }
}

// ---- CPU reference -------------------------------------------------------------------

pub fn add<T: Real>(a: &[T], b: &[T], y: &mut [T]) {
    let n = b.len();
    y.par_iter_mut().enumerate().for_each(|(i, y)| *y = a[i] + b[i % n]);
}

pub fn mul<T: Real>(a: &[T], b: &[T], y: &mut [T]) {
    let n = b.len();
    y.par_iter_mut().enumerate().for_each(|(i, y)| *y = a[i] * b[i % n]);
}

pub fn scale<T: Real>(x: &[T], factor: f64, y: &mut [T]) {
    let f = T::of(factor);
    y.par_iter_mut().zip(x.par_iter()).for_each(|(y, &x)| *y = x * f);
}

pub fn reduce_sum<T: Real>(x: &[T], y: &mut [T]) {
    let n = y.len();
    // Sum in f64 so long reductions do not lose precision.
    let mut acc = vec![0f64; n];
    for (i, &v) in x.iter().enumerate() {
        acc[i % n] += v.f64();
    }
    for (y, a) in y.iter_mut().zip(acc) {
        *y = T::of(a);
    }
}

pub fn broadcast<T: Real>(x: &[T], y: &mut [T]) {
    let n = x.len();
    y.par_iter_mut().enumerate().for_each(|(i, y)| *y = x[i % n]);
}

/// Counter-based hash (Wellons' "lowbias32"): the same mask on every backend and in
/// the backward pass, with no random state to carry.
pub fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The per-call-site key that element indices are hashed with.
pub fn dropout_key(seed: u32, salt: u32) -> u32 {
    hash32(seed.wrapping_add(salt.wrapping_mul(0x9e37_79b9)))
}

/// Whether dropout keeps element `i`: a uniform 24-bit draw compared with `p`.
pub fn dropout_keep(key: u32, i: u32, p: f32) -> bool {
    let u = (hash32(key ^ i) >> 8) as f32 * (1.0 / 16_777_216.0);
    u >= p
}

pub fn dropout<T: Real>(x: &[T], seed: u32, salt: u32, p: f32, y: &mut [T]) {
    let key = dropout_key(seed, salt);
    let k = if p < 1.0 {
        T::of(1.0 / (1.0 - p as f64))
    } else {
        T::zero()
    };
    y.par_iter_mut().enumerate().for_each(|(i, y)| {
        *y = if dropout_keep(key, i as u32, p) {
            x[i] * k
        } else {
            T::zero()
        };
    });
}
