//! Cross-entropy over the vocabulary with an ignore index (-100 in Hugging Face).
//! Returns the *sum* of token losses and the number of counted labels, so the trainer can
//! normalise by the label tokens of a whole optimizer step. Backward:
//! `dlogits = (softmax(logits) - onehot(label)) * dloss` on counted rows, 0 elsewhere.

use super::par::*;
use super::{Infer, Real};
use crate::graph::TensorInfo;
use crate::tensor::DType;

fn out_dtype(logits: &TensorInfo) -> DType {
    if logits.dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

pub fn infer(logits: &TensorInfo, labels: &TensorInfo) -> Infer {
    if logits.shape.len() != 2 || !logits.dtype.is_float() {
        return Err(format!(
            "logits must be a 2-D float tensor [N, V], got {:?}",
            logits.shape
        ));
    }
    if labels.shape != [logits.shape[0]] || labels.dtype != DType::I32 {
        return Err(format!(
            "labels must be [{}] i32, got {:?} {}",
            logits.shape[0], labels.shape, labels.dtype
        ));
    }
    let dt = out_dtype(logits);
    Ok(vec![(vec![1], dt), (vec![1], dt), (vec![logits.shape[0]], dt)])
}

pub fn infer_backward(logits: &TensorInfo, labels: &TensorInfo, lse: &TensorInfo, dloss: &TensorInfo) -> Infer {
    infer(logits, labels)?;
    if lse.shape != [logits.shape[0]] || dloss.numel() != 1 {
        return Err("lse must be [N] and dloss one element".into());
    }
    Ok(vec![(logits.shape.clone(), logits.dtype)])
}

fn counted(label: i32, ignore: i32, vocab: usize) -> Option<usize> {
    (label != ignore && label >= 0 && (label as usize) < vocab).then_some(label as usize)
}

/// Returns (loss sum, label count); writes each row's log-sum-exp.
pub fn cpu<T: Real>(logits: &[T], labels: &[i32], lse: &mut [T], ignore: i32) -> (f64, f64) {
    let v = logits.len() / labels.len().max(1);
    let per_row: Vec<(f64, f64)> = logits
        .par_chunks(v)
        .zip(lse.par_iter_mut())
        .zip(labels.par_iter())
        .map(|((row, lse), &y)| {
            let m = row.iter().fold(f64::NEG_INFINITY, |m, x| m.max(x.f64()));
            let l = m + row.iter().map(|x| (x.f64() - m).exp()).sum::<f64>().ln();
            *lse = T::of(l);
            match counted(y, ignore, v) {
                Some(c) => (l - row[c].f64(), 1.0),
                None => (0.0, 0.0),
            }
        })
        .collect();
    per_row.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y))
}

pub fn cpu_backward<T: Real>(logits: &[T], labels: &[i32], lse: &[T], dloss: f64, dlogits: &mut [T], ignore: i32) {
    let v = logits.len() / labels.len().max(1);
    dlogits
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .enumerate()
        .for_each(|(r, (d, row))| match counted(labels[r], ignore, v) {
            Some(c) => {
                let l = lse[r].f64();
                for j in 0..v {
                    let p = (row[j].f64() - l).exp();
                    d[j] = T::of((p - if j == c { 1.0 } else { 0.0 }) * dloss);
                }
            }
            None => d.fill(T::zero()),
        });
}
