//! Matrix multiply `C = op(A) @ op(B)` with `op` an optional transpose.
//!
//! Two forms: a 2-D `B` shared by every row of `A` (a linear layer: A's leading dims are
//! flattened into M), and a batched form where A and B carry the same batch dims.

use super::{Infer, Op, Real};
use crate::graph::{Graph, TensorId, TensorInfo};
use crate::Result;

/// Sizes of one matmul: `batch` independent `[m, k] @ [k, n]` products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// True when B is one 2-D matrix shared by every batch (then `batch == 1`).
    pub shared_b: bool,
}

pub fn dims(a: &[usize], b: &[usize], trans_a: bool, trans_b: bool) -> std::result::Result<MatmulDims, String> {
    if a.len() < 2 || b.len() < 2 {
        return Err(format!("needs at least 2-D operands, got {a:?} and {b:?}"));
    }
    let (bk, n) = if trans_b {
        (b[b.len() - 1], b[b.len() - 2])
    } else {
        (b[b.len() - 2], b[b.len() - 1])
    };
    if b.len() == 2 {
        if trans_a && a.len() > 2 {
            return Err("a 2-D B shared over batched rows needs an untransposed A".into());
        }
        let (m, k) = if trans_a {
            (a[1], a[0])
        } else {
            (a[..a.len() - 1].iter().product(), a[a.len() - 1])
        };
        if k != bk {
            return Err(format!("inner sizes differ: A {a:?} has K={k}, B {b:?} has K={bk}"));
        }
        return Ok(MatmulDims {
            batch: 1,
            m,
            n,
            k,
            shared_b: true,
        });
    }
    if a.len() != b.len() || a[..a.len() - 2] != b[..b.len() - 2] {
        return Err(format!("batch dims differ: {a:?} vs {b:?}"));
    }
    let (m, k) = if trans_a {
        (a[a.len() - 1], a[a.len() - 2])
    } else {
        (a[a.len() - 2], a[a.len() - 1])
    };
    if k != bk {
        return Err(format!("inner sizes differ: A {a:?} has K={k}, B {b:?} has K={bk}"));
    }
    let batch = a[..a.len() - 2].iter().product();
    Ok(MatmulDims {
        batch,
        m,
        n,
        k,
        shared_b: false,
    })
}

pub fn infer(a: &TensorInfo, b: &TensorInfo, trans_a: bool, trans_b: bool) -> Infer {
    if !a.dtype.is_float() || !b.dtype.is_float() {
        return Err(format!("needs float operands, got {} and {}", a.dtype, b.dtype));
    }
    let d = dims(&a.shape, &b.shape, trans_a, trans_b)?;
    let mut shape = if d.shared_b {
        if trans_a {
            vec![d.m]
        } else {
            a.shape[..a.shape.len() - 1].to_vec()
        }
    } else {
        let mut s = a.shape[..a.shape.len() - 2].to_vec();
        s.push(d.m);
        s
    };
    shape.push(d.n);
    Ok(vec![(shape, a.dtype)])
}

pub fn backward(
    g: &mut Graph,
    i: &[TensorId],
    dc: TensorId,
    need: &[bool],
    ta: bool,
    tb: bool,
) -> Result<Vec<Option<TensorId>>> {
    let (a, b) = (i[0], i[1]);
    let mm = |g: &mut Graph, x, y, trans_a, trans_b| g.apply1(Op::MatMul { trans_a, trans_b }, &[x, y]);
    let d = dims(g.shape(a), g.shape(b), ta, tb).map_err(|e| crate::Error::shape("matmul", e))?;
    let mut da = None;
    let mut db = None;
    if d.shared_b {
        if need[0] {
            da = Some(mm(g, dc, b, false, !tb)?);
        }
        if need[1] {
            let flat = |g: &mut Graph, t: TensorId, shape: Vec<usize>| {
                if g.shape(t) == shape.as_slice() {
                    Ok(t)
                } else {
                    g.apply1(Op::Reshape { shape }, &[t])
                }
            };
            let a2 = flat(g, a, vec![d.m, d.k])?;
            let dc2 = flat(g, dc, vec![d.m, d.n])?;
            db = Some(if tb {
                mm(g, dc2, a2, true, false)?
            } else {
                mm(g, a2, dc2, true, false)?
            });
        }
    } else {
        // C = op(A) op(B); each case's rule follows from dC/dA_ij by index bookkeeping.
        if need[0] {
            da = Some(match (ta, tb) {
                (false, false) => mm(g, dc, b, false, true)?,
                (false, true) => mm(g, dc, b, false, false)?,
                (true, false) => mm(g, b, dc, false, true)?,
                (true, true) => mm(g, b, dc, true, true)?,
            });
        }
        if need[1] {
            db = Some(match (ta, tb) {
                (false, false) => mm(g, a, dc, true, false)?,
                (false, true) => mm(g, dc, a, true, false)?,
                (true, false) => mm(g, a, dc, false, false)?,
                (true, true) => mm(g, dc, a, true, true)?,
            });
        }
    }
    Ok(vec![da, db])
}

// ---- CPU reference -------------------------------------------------------------------

/// All cores natively; the web's wasm32 has no threads.
#[cfg(not(target_arch = "wasm32"))]
const PARALLELISM: gemm::Parallelism = gemm::Parallelism::Rayon(0);
#[cfg(target_arch = "wasm32")]
const PARALLELISM: gemm::Parallelism = gemm::Parallelism::None;

/// `c = op(a) @ op(b)` (or `c += ...` when `accumulate`), row-major, through the `gemm` crate.
#[allow(clippy::too_many_arguments)]
pub fn cpu<T: Real>(a: &[T], b: &[T], c: &mut [T], d: MatmulDims, trans_a: bool, trans_b: bool, accumulate: bool) {
    cpu_scaled(a, b, c, d, trans_a, trans_b, accumulate, T::one());
}

/// `c = alpha op(a) @ op(b)` (or `c += ...` when `accumulate`).
#[allow(clippy::too_many_arguments)]
pub fn cpu_scaled<T: Real>(
    a: &[T],
    b: &[T],
    c: &mut [T],
    d: MatmulDims,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
    alpha: T,
) {
    let (m, n, k) = (d.m, d.n, d.k);
    // (row stride, column stride) of op(X) for X stored row-major.
    let (a_rs, a_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    for bi in 0..d.batch {
        let a = &a[bi * m * k..(bi + 1) * m * k];
        let b = if d.shared_b {
            b
        } else {
            &b[bi * k * n..(bi + 1) * k * n]
        };
        let c = &mut c[bi * m * n..(bi + 1) * m * n];
        if k == 0 {
            if !accumulate {
                c.fill(T::zero());
            }
            continue;
        }
        // SAFETY: the slices above hold exactly m*k, k*n and m*n elements, and the strides
        // describe row-major (or transposed row-major) layouts within them.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                accumulate,
                a.as_ptr(),
                a_cs,
                a_rs,
                b.as_ptr(),
                b_cs,
                b_rs,
                T::one(),
                alpha,
                false,
                false,
                false,
                PARALLELISM,
            );
        }
    }
}
