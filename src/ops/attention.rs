//! Scaled dot-product attention with grouped-query heads, a per-token segment id (packed
//! documents never see each other), causal masking and an optional sliding window.
//!
//! Layout: `q [B*T, Hq*D]`, `k, v [B*T, Hkv*D]`, `seg [B*T] i32`, output `o` like `q` and
//! the row log-sum-exp `lse [B, Hq, T]`, which the backward pass uses to recompute the
//! probabilities instead of storing them (FlashAttention-2, Dao 2023, Alg. 2):
//! `P = exp(s Q K^T - lse)`, `dV = P^T dO`, `dP = dO V^T`, `Di = rowsum(dO * O)`,
//! `dS = P * (dP - Di)`, `dQ = s dS K`, `dK = s dS^T Q`.
//! Query head `h` reads key/value head `h / (Hq / Hkv)`.

use super::par::*;
use super::{Infer, Op, Real};
use crate::graph::{Graph, TensorId, TensorInfo};
use crate::tensor::DType;
use crate::Result;

#[derive(Clone, Debug, PartialEq)]
pub struct AttnSpec {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Tokens per row (T); the batch is `rows = N / T`.
    pub seq_len: usize,
    pub causal: bool,
    /// Keys at distance `>= window` from the query are masked (Mistral's sliding window).
    pub window: Option<usize>,
    pub scale: f64,
}

impl AttnSpec {
    /// Whether query `i` sees key `j` (both indices within one row).
    pub fn visible(&self, seg: &[i32], i: usize, j: usize) -> bool {
        if seg[i] != seg[j] || (self.causal && j > i) {
            return false;
        }
        match self.window {
            Some(w) => i.abs_diff(j) < w,
            None => true,
        }
    }

    fn check(
        &self,
        q: &TensorInfo,
        k: &TensorInfo,
        v: &TensorInfo,
        seg: &TensorInfo,
    ) -> std::result::Result<usize, String> {
        let (hq, hk, d, t) = (self.n_heads, self.n_kv_heads, self.head_dim, self.seq_len);
        if hq == 0 || hk == 0 || hq % hk != 0 || d == 0 || t == 0 {
            return Err(format!("bad heads {hq}/{hk}, head dim {d} or seq len {t}"));
        }
        if q.shape.len() != 2 || q.shape[1] != hq * d || q.shape[0] % t != 0 {
            return Err(format!("q must be [rows*{t}, {}], got {:?}", hq * d, q.shape));
        }
        let n = q.shape[0];
        for (name, x) in [("k", k), ("v", v)] {
            if x.shape != [n, hk * d] {
                return Err(format!("{name} must be [{n}, {}], got {:?}", hk * d, x.shape));
            }
            if x.dtype != q.dtype {
                return Err(format!("{name} dtype {} differs from q's {}", x.dtype, q.dtype));
            }
        }
        if seg.shape != [n] || seg.dtype != DType::I32 {
            return Err(format!(
                "segment ids must be [{n}] i32, got {:?} {}",
                seg.shape, seg.dtype
            ));
        }
        Ok(n)
    }

    fn lse_dtype(q: &TensorInfo) -> DType {
        if q.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    pub fn infer(&self, q: &TensorInfo, k: &TensorInfo, v: &TensorInfo, seg: &TensorInfo) -> Infer {
        let n = self.check(q, k, v, seg)?;
        let lse = vec![n / self.seq_len, self.n_heads, self.seq_len];
        Ok(vec![(q.shape.clone(), q.dtype), (lse, Self::lse_dtype(q))])
    }

    pub fn infer_backward(&self, x: &[&TensorInfo]) -> Infer {
        let (q, k, v, seg, o, lse, d_o) = (x[0], x[1], x[2], x[3], x[4], x[5], x[6]);
        let n = self.check(q, k, v, seg)?;
        if o.shape != q.shape || d_o.shape != q.shape {
            return Err("o and do must have q's shape".into());
        }
        if lse.shape != [n / self.seq_len, self.n_heads, self.seq_len] {
            return Err(format!("lse has shape {:?}", lse.shape));
        }
        Ok(vec![
            (q.shape.clone(), d_o.dtype),
            (k.shape.clone(), d_o.dtype),
            (v.shape.clone(), d_o.dtype),
        ])
    }
}

pub fn backward(
    g: &mut Graph,
    s: &AttnSpec,
    i: &[TensorId],
    o: &[TensorId],
    d_o: TensorId,
) -> Result<Vec<Option<TensorId>>> {
    let outs = g.apply(
        Op::AttentionBackward(s.clone()),
        &[i[0], i[1], i[2], i[3], o[0], o[1], d_o],
    )?;
    Ok(vec![Some(outs[0]), Some(outs[1]), Some(outs[2]), None])
}

// ---- CPU reference -------------------------------------------------------------------

fn dot<T: Real>(a: &[T], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.f64() * y.f64()).sum()
}

/// One (row, query head) task's result: its output columns and its log-sum-exps.
type HeadOut = (Vec<f64>, Vec<f64>);

pub fn cpu<T: Real>(s: &AttnSpec, q: &[T], k: &[T], v: &[T], seg: &[i32], o: &mut [T], lse: &mut [T]) {
    let (hq, hk, d, t) = (s.n_heads, s.n_kv_heads, s.head_dim, s.seq_len);
    let rows = seg.len() / t;
    let group = hq / hk;
    let (qw, kw) = (hq * d, hk * d);
    let results: Vec<HeadOut> = (0..rows * hq)
        .into_par_iter()
        .map(|task| {
            let (b, h) = (task / hq, task % hq);
            let kh = h / group;
            let seg = &seg[b * t..(b + 1) * t];
            let mut out = vec![0f64; t * d];
            let mut lses = vec![0f64; t];
            let mut p = vec![0f64; t];
            for i in 0..t {
                let qi = &q[(b * t + i) * qw + h * d..][..d];
                let mut m = f64::NEG_INFINITY;
                for j in 0..t {
                    p[j] = if s.visible(seg, i, j) {
                        let sc = s.scale * dot(qi, &k[(b * t + j) * kw + kh * d..][..d]);
                        m = m.max(sc);
                        sc
                    } else {
                        f64::NEG_INFINITY
                    };
                }
                let mut l = 0.0;
                for pj in p.iter_mut() {
                    *pj = if pj.is_finite() { (*pj - m).exp() } else { 0.0 };
                    l += *pj;
                }
                let oi = &mut out[i * d..(i + 1) * d];
                for (j, &pj) in p.iter().enumerate() {
                    if pj > 0.0 {
                        let vj = &v[(b * t + j) * kw + kh * d..][..d];
                        for c in 0..d {
                            oi[c] += pj * vj[c].f64();
                        }
                    }
                }
                oi.iter_mut().for_each(|x| *x /= l);
                lses[i] = m + l.ln();
            }
            (out, lses)
        })
        .collect();
    for (task, (out, lses)) in results.into_iter().enumerate() {
        let (b, h) = (task / hq, task % hq);
        for i in 0..t {
            for c in 0..d {
                o[(b * t + i) * qw + h * d + c] = T::of(out[i * d + c]);
            }
            lse[(b * hq + h) * t + i] = T::of(lses[i]);
        }
    }
}

/// Gradients of one (row, kv head) task: dq for each query head of its group, dk, dv.
type KvGrads = (Vec<f64>, Vec<f64>, Vec<f64>);

#[allow(clippy::too_many_arguments)]
pub fn cpu_backward<T: Real>(
    s: &AttnSpec,
    q: &[T],
    k: &[T],
    v: &[T],
    seg: &[i32],
    o: &[T],
    lse: &[T],
    d_o: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let (hq, hk, d, t) = (s.n_heads, s.n_kv_heads, s.head_dim, s.seq_len);
    let rows = seg.len() / t;
    let group = hq / hk;
    let (qw, kw) = (hq * d, hk * d);
    // Parallel over (row, kv head): each task owns its dk/dv columns and the dq columns of
    // the query heads that read them.
    let results: Vec<KvGrads> = (0..rows * hk)
        .into_par_iter()
        .map(|task| {
            let (b, kh) = (task / hk, task % hk);
            let seg = &seg[b * t..(b + 1) * t];
            let mut gq = vec![0f64; group * t * d];
            let mut gk = vec![0f64; t * d];
            let mut gv = vec![0f64; t * d];
            for hg in 0..group {
                let h = kh * group + hg;
                for i in 0..t {
                    let row = (b * t + i) * qw + h * d;
                    let (qi, oi, doi) = (&q[row..row + d], &o[row..row + d], &d_o[row..row + d]);
                    let di = dot(doi, oi);
                    let l = lse[(b * hq + h) * t + i].f64();
                    for j in 0..t {
                        if !s.visible(seg, i, j) {
                            continue;
                        }
                        let (kj, vj) = (
                            &k[(b * t + j) * kw + kh * d..][..d],
                            &v[(b * t + j) * kw + kh * d..][..d],
                        );
                        let p = (s.scale * dot(qi, kj) - l).exp();
                        let ds = p * (dot(doi, vj) - di);
                        for c in 0..d {
                            gv[j * d + c] += p * doi[c].f64();
                            gq[(hg * t + i) * d + c] += s.scale * ds * kj[c].f64();
                            gk[j * d + c] += s.scale * ds * qi[c].f64();
                        }
                    }
                }
            }
            (gq, gk, gv)
        })
        .collect();
    for (task, (gq, gk, gv)) in results.into_iter().enumerate() {
        let (b, kh) = (task / hk, task % hk);
        for i in 0..t {
            for c in 0..d {
                dk[(b * t + i) * kw + kh * d + c] = T::of(gk[i * d + c]);
                dv[(b * t + i) * kw + kh * d + c] = T::of(gv[i * d + c]);
                for hg in 0..group {
                    let h = kh * group + hg;
                    dq[(b * t + i) * qw + h * d + c] = T::of(gq[(hg * t + i) * d + c]);
                }
            }
        }
    }
}

// ---- KV-cache attention (generation) -------------------------------------------------

pub fn infer_cache_write(cache: &TensorInfo, x: &TensorInfo, slot: &TensorInfo) -> Infer {
    if cache.shape.len() != 3 || x.shape.len() != 2 || x.shape[1] != cache.shape[2] {
        return Err(format!(
            "cache must be [B, T, W] and x [N, W]; got {:?} and {:?}",
            cache.shape, x.shape
        ));
    }
    if slot.shape != [x.shape[0]] || slot.dtype != DType::I32 {
        return Err(format!(
            "slots must be [{}] i32, got {:?} {}",
            x.shape[0], slot.shape, slot.dtype
        ));
    }
    if cache.dtype != x.dtype {
        return Err(format!("cache dtype {} differs from x's {}", cache.dtype, x.dtype));
    }
    Ok(vec![(cache.shape.clone(), cache.dtype)])
}

impl AttnSpec {
    pub fn infer_cached(&self, q: &TensorInfo, kc: &TensorInfo, vc: &TensorInfo, pos: &TensorInfo) -> Infer {
        let (hq, hk, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        if kc.shape.len() != 3 || kc.shape[2] != hk * d || vc.shape != kc.shape {
            return Err(format!(
                "caches must be [B, T, {}], got {:?} and {:?}",
                hk * d,
                kc.shape,
                vc.shape
            ));
        }
        let b = kc.shape[0];
        if q.shape.len() != 2 || q.shape[1] != hq * d || q.shape[0] != b * self.seq_len {
            return Err(format!(
                "q must be [{b}*{}, {}], got {:?}",
                self.seq_len,
                hq * d,
                q.shape
            ));
        }
        if pos.shape != [q.shape[0]] || pos.dtype != DType::I32 {
            return Err(format!("positions must be [{}] i32", q.shape[0]));
        }
        Ok(vec![(q.shape.clone(), q.dtype)])
    }
}

pub fn cpu_cache_write<T: Real>(cache: &mut [T], x: &[T], slot: &[i32]) {
    let w = x.len() / slot.len().max(1);
    let rows = cache.len() / w.max(1);
    for (i, &s) in slot.iter().enumerate() {
        if s >= 0 && (s as usize) < rows {
            cache[s as usize * w..(s as usize + 1) * w].copy_from_slice(&x[i * w..(i + 1) * w]);
        }
    }
}

pub fn cpu_cached<T: Real>(s: &AttnSpec, q: &[T], kc: &[T], vc: &[T], pos: &[i32], o: &mut [T], cache_len: usize) {
    let (hq, hk, d) = (s.n_heads, s.n_kv_heads, s.head_dim);
    let group = hq / hk;
    let (qw, kw) = (hq * d, hk * d);
    o.par_chunks_mut(qw).enumerate().for_each(|(row, out)| {
        let p = pos[row];
        out.fill(T::zero());
        if p < 0 {
            return;
        }
        let b = row / s.seq_len;
        let p = p as usize;
        let lo = match s.window {
            Some(w) => (p + 1).saturating_sub(w),
            None => 0,
        };
        let hi = p.min(cache_len - 1);
        let mut sc = vec![0f64; hi + 1];
        for h in 0..hq {
            let kh = h / group;
            let qi = &q[row * qw + h * d..][..d];
            let mut m = f64::NEG_INFINITY;
            for j in lo..=hi {
                sc[j] = s.scale * dot(qi, &kc[(b * cache_len + j) * kw + kh * d..][..d]);
                m = m.max(sc[j]);
            }
            let mut l = 0.0;
            let mut acc = vec![0f64; d];
            for j in lo..=hi {
                let pj = (sc[j] - m).exp();
                l += pj;
                let vj = &vc[(b * cache_len + j) * kw + kh * d..][..d];
                for c in 0..d {
                    acc[c] += pj * vj[c].f64();
                }
            }
            for c in 0..d {
                out[h * d + c] = T::of(acc[c] / l);
            }
        }
    });
}
