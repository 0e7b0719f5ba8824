//! Embedding gather `y[i] = table[ids[i]]` and its scatter-add backward.

use super::par::*;
use super::{Infer, Op, Real};
use crate::graph::{Graph, TensorId, TensorInfo};
use crate::tensor::DType;
use crate::Result;

pub fn infer(table: &TensorInfo, ids: &TensorInfo) -> Infer {
    if table.shape.len() != 2 || !table.dtype.is_float() {
        return Err(format!(
            "table must be a 2-D float tensor, got {:?} {}",
            table.shape, table.dtype
        ));
    }
    if ids.dtype != DType::I32 || ids.shape.len() != 1 {
        return Err(format!(
            "ids must be a 1-D i32 tensor, got {:?} {}",
            ids.shape, ids.dtype
        ));
    }
    // Gathered rows come out in f32 unless the table is f64 (gradient checks).
    let dt = if table.dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    Ok(vec![(vec![ids.shape[0], table.shape[1]], dt)])
}

pub fn infer_backward(dy: &TensorInfo, ids: &TensorInfo, vocab: usize) -> Infer {
    if dy.shape.len() != 2 || ids.shape.len() != 1 || ids.shape[0] != dy.shape[0] || ids.dtype != DType::I32 {
        return Err(format!(
            "expects dy [N, H] and ids [N] i32, got {:?} and {:?}",
            dy.shape, ids.shape
        ));
    }
    Ok(vec![(vec![vocab, dy.shape[1]], dy.dtype)])
}

pub fn backward(g: &mut Graph, i: &[TensorId], dy: TensorId, need: &[bool]) -> Result<Vec<Option<TensorId>>> {
    if !need[0] {
        return Ok(vec![None, None]);
    }
    let vocab = g.shape(i[0])[0];
    let d = g.apply1(Op::EmbeddingBackward { vocab }, &[dy, i[1]])?;
    let d = if g.dtype(d) != g.dtype(i[0]) {
        g.apply1(Op::Cast { dtype: g.dtype(i[0]) }, &[d])?
    } else {
        d
    };
    Ok(vec![Some(d), None])
}

/// Index of row `id` in a table of `vocab` rows, or None when out of range.
fn row(id: i32, vocab: usize) -> Option<usize> {
    (id >= 0 && (id as usize) < vocab).then_some(id as usize)
}

/// Out-of-range ids produce zero rows (training refuses data with such ids before this
/// point: `PreparedData::check_ids_fit`).
pub fn cpu<T: Real>(table: &[T], ids: &[i32], y: &mut [T], h: usize) {
    let vocab = table.len() / h.max(1);
    y.par_chunks_mut(h)
        .zip(ids.par_iter())
        .for_each(|(y, &id)| match row(id, vocab) {
            Some(r) => y.copy_from_slice(&table[r * h..(r + 1) * h]),
            None => y.fill(T::zero()),
        });
}

pub fn cpu_backward<T: Real>(dy: &[T], ids: &[i32], dtable: &mut [T], h: usize) {
    let vocab = dtable.len() / h.max(1);
    dtable.fill(T::zero());
    for (i, &id) in ids.iter().enumerate() {
        if let Some(r) = row(id, vocab) {
            for (d, &g) in dtable[r * h..(r + 1) * h].iter_mut().zip(&dy[i * h..(i + 1) * h]) {
                *d = *d + g;
            }
        }
    }
}
