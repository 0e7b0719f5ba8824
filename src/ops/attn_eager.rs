//! Eager attention: the score matrix as ordinary graph ops, the reference every fused
//! attention is checked against (transformers' `eager_attention_forward`):
//! `S = Q K^T` (batched matmul over `[B, H, T, D]` heads), `S * scale`, masked softmax,
//! `O = P V`. Autodiff differentiates through each op, and the memory plan holds the
//! `[B, H, T, T]` scores and probabilities, O(T^2) per layer.
//!
//! Ops defined here: the head layout change in both directions (grouped-query K/V heads are
//! repeated on the way in and summed on the way back), the masked softmax and its backward.

use super::attn_mask::RowMask;
use super::par::*;
use super::{AttnSpec, Infer, Op, Real};
use crate::graph::{Graph, TensorId, TensorInfo};
use crate::tensor::DType;
use crate::Result;

/// `[B*T, H*D]` token rows versus `[B, H*repeat, T, D]` head-major blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadLayout {
    pub seq_len: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Copies of each head on the head-major side (grouped-query K/V: `Hq / Hkv`).
    pub repeat: usize,
}

impl HeadLayout {
    fn rows_shape(&self, x: &TensorInfo) -> std::result::Result<usize, String> {
        let (t, w) = (self.seq_len, self.heads * self.head_dim);
        if t == 0 || self.repeat == 0 || x.shape.len() != 2 || x.shape[1] != w || !x.shape[0].is_multiple_of(t) {
            return Err(format!("expects [rows*{t}, {w}], got {:?}", x.shape));
        }
        Ok(x.shape[0] / t)
    }

    fn heads_shape(&self, b: usize) -> Vec<usize> {
        vec![b, self.heads * self.repeat, self.seq_len, self.head_dim]
    }

    pub fn infer_split(&self, x: &TensorInfo) -> Infer {
        let b = self.rows_shape(x)?;
        Ok(vec![(self.heads_shape(b), x.dtype)])
    }

    pub fn infer_merge(&self, x: &TensorInfo) -> Infer {
        let s = &x.shape;
        if s.len() != 4 || s[1..] != self.heads_shape(1)[1..] {
            return Err(format!("expects {:?}, got {s:?}", self.heads_shape(0)));
        }
        Ok(vec![(vec![s[0] * self.seq_len, self.heads * self.head_dim], x.dtype)])
    }

    /// `y[b, h*r + c, i, :] = x[b*T + i, h*D..]`
    pub fn cpu_split<T: Real>(&self, x: &[T], y: &mut [T]) {
        let (t, d, hr) = (self.seq_len, self.head_dim, self.heads * self.repeat);
        y.par_chunks_mut(t * d).enumerate().for_each(|(bh, out)| {
            let (b, h) = (bh / hr, bh % hr / self.repeat);
            for i in 0..t {
                let src = (b * t + i) * self.heads * d + h * d;
                out[i * d..(i + 1) * d].copy_from_slice(&x[src..src + d]);
            }
        });
    }

    /// `y[b*T + i, h*D..] = sum_c x[b, h*r + c, i, :]`
    pub fn cpu_merge<T: Real>(&self, x: &[T], y: &mut [T]) {
        let (t, d, r) = (self.seq_len, self.head_dim, self.repeat);
        let w = self.heads * d;
        y.par_chunks_mut(w).enumerate().for_each(|(row, out)| {
            let (b, i) = (row / t, row % t);
            for h in 0..self.heads {
                for e in 0..d {
                    let mut acc = 0f64;
                    for c in 0..r {
                        acc += x[((b * self.heads * r + h * r + c) * t + i) * d + e].f64();
                    }
                    out[h * d + e] = T::of(acc);
                }
            }
        });
    }
}

/// `(scores [B, H, T, T], seg [B*T] i32[, prefix])`
pub fn infer_masked_softmax(s: &AttnSpec, x: &[&TensorInfo]) -> Infer {
    if x.len() != s.forward_inputs() - 2 {
        return Err(format!("takes {} inputs, got {}", s.forward_inputs() - 2, x.len()));
    }
    let t = s.seq_len;
    let sc = x[0];
    if !sc.dtype.is_float() || sc.shape.len() != 4 || sc.shape[1] != s.n_heads || sc.shape[2..] != [t, t] {
        return Err(format!(
            "scores must be float [rows, {}, {t}, {t}], got {:?} {}",
            s.n_heads, sc.shape, sc.dtype
        ));
    }
    for ids in &x[1..] {
        if ids.shape != [sc.shape[0] * t] || ids.dtype != DType::I32 {
            return Err(format!("ids must be [{}] i32, got {:?}", sc.shape[0] * t, ids.shape));
        }
    }
    Ok(vec![(sc.shape.clone(), sc.dtype)])
}

pub fn infer_softmax_backward(p: &TensorInfo, dp: &TensorInfo) -> Infer {
    if p.shape != dp.shape || !p.dtype.is_float() {
        return Err(format!("p {:?} and dp {:?} must match", p.shape, dp.shape));
    }
    Ok(vec![(p.shape.clone(), dp.dtype)])
}

/// Softmax of each score row over the keys its query sees; 0 for the others (and for a
/// query that sees no key).
pub fn cpu_masked_softmax<T: Real>(s: &AttnSpec, x: &[T], seg: &[i32], prefix: Option<&[i32]>, y: &mut [T]) {
    let t = s.seq_len;
    let masks: Vec<RowMask> = (0..seg.len() / t)
        .map(|b| RowMask::new(s, &seg[b * t..(b + 1) * t], prefix.map(|p| &p[b * t..(b + 1) * t])))
        .collect();
    y.par_chunks_mut(t).enumerate().for_each(|(row, out)| {
        let (b, i) = (row / (s.n_heads * t), row % t);
        let xs = &x[row * t..(row + 1) * t];
        let m = &masks[b];
        let max = (0..t)
            .filter(|&j| m.visible(i, j))
            .map(|j| xs[j].f64())
            .fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        let e: Vec<f64> = (0..t)
            .map(|j| {
                let p = if m.visible(i, j) {
                    (xs[j].f64() - max).exp()
                } else {
                    0.0
                };
                sum += p;
                p
            })
            .collect();
        for (o, p) in out.iter_mut().zip(e) {
            *o = T::of(if sum > 0.0 { p / sum } else { 0.0 });
        }
    });
}

/// `ds = p * (dp - rowsum(p * dp))` over the last dim.
pub fn cpu_softmax_backward<T: Real>(p: &[T], dp: &[T], ds: &mut [T], cols: usize) {
    ds.par_chunks_mut(cols).enumerate().for_each(|(row, out)| {
        let (p, dp) = (&p[row * cols..][..cols], &dp[row * cols..][..cols]);
        let dot: f64 = p.iter().zip(dp).map(|(a, b)| a.f64() * b.f64()).sum();
        for ((o, a), b) in out.iter_mut().zip(p).zip(dp) {
            *o = T::of(a.f64() * (b.f64() - dot));
        }
    });
}

/// Builds eager attention for `(q, k, v, seg[, prefix])`; returns `o [N, Hq*D]`. The score
/// and probability tensors are named `attn_scores.*` and `attn_probs.*`.
pub fn build(g: &mut Graph, spec: &AttnSpec, inputs: &[TensorId]) -> Result<TensorId> {
    let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
    let layout = |heads, repeat| HeadLayout {
        seq_len: spec.seq_len,
        heads,
        head_dim: spec.head_dim,
        repeat,
    };
    let group = spec.n_heads / spec.n_kv_heads.max(1);
    let qh = g.apply1(Op::SplitHeads(layout(spec.n_heads, 1)), &[q])?;
    let kh = g.apply1(Op::SplitHeads(layout(spec.n_kv_heads, group)), &[k])?;
    let vh = g.apply1(Op::SplitHeads(layout(spec.n_kv_heads, group)), &[v])?;
    let scores = g.matmul(qh, kh, false, true)?;
    g.set_name(scores, format!("attn_scores.{}", scores.0));
    let scaled = g.scale(scores, spec.scale)?;
    g.set_name(scaled, format!("attn_scores_scaled.{}", scaled.0));
    let mut ids = vec![scaled];
    ids.extend_from_slice(&inputs[3..]);
    let probs = g.apply1(Op::MaskedSoftmax(spec.clone()), &ids)?;
    g.set_name(probs, format!("attn_probs.{}", probs.0));
    let oh = g.matmul(probs, vh, false, false)?;
    g.apply1(Op::MergeHeads(layout(spec.n_heads, 1)), &[oh])
}
