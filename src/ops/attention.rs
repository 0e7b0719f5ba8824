//! Scaled dot-product attention with grouped-query heads, a per-token segment id (packed
//! documents never see each other), causal masking and an optional sliding window.
//!
//! Layout: `q [B*T, Hq*D]`, `k, v [B*T, Hkv*D]`, `seg [B*T] i32`, output `o` like `q` and
//! the row log-sum-exp `lse [B, Hq, T]`, which the backward pass uses to recompute the
//! probabilities instead of storing them (FlashAttention-2, Dao 2023, Alg. 2):
//! `P = exp(s Q K^T - lse)`, `dV = P^T dO`, `dP = dO V^T`, `Di = rowsum(dO * O)`,
//! `dS = P * (dP - Di)`, `dQ = s dS K`, `dK = s dS^T Q`.
//! Query head `h` reads key/value head `h / (Hq / Hkv)`.

use super::attn_mask::{FlexMask, RowMask};
use super::{Infer, Op, Real};
use crate::graph::{Graph, TensorId, TensorInfo};
use crate::tensor::DType;
use crate::Result;
use rayon::prelude::*;
use std::ops::Range;

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
    /// Prefix-LM and user mask terms (see [`super::attn_mask`]); default: none.
    pub flex: FlexMask,
}

impl AttnSpec {
    fn check(&self, x: &[&TensorInfo]) -> std::result::Result<usize, String> {
        let (q, k, v, seg) = (x[0], x[1], x[2], x[3]);
        let (hq, hk, d, t) = (self.n_heads, self.n_kv_heads, self.head_dim, self.seq_len);
        if hq == 0 || hk == 0 || hq % hk != 0 || d == 0 || t == 0 {
            return Err(format!("bad heads {hq}/{hk}, head dim {d} or seq len {t}"));
        }
        if self.window == Some(0) {
            return Err("a sliding window of 0 hides every key".into());
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
        check_ids("segment ids", seg, n)?;
        Ok(n)
    }

    fn lse_dtype(q: &TensorInfo) -> DType {
        if q.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// `(q, k, v, seg[, prefix])`
    pub fn infer(&self, x: &[&TensorInfo]) -> Infer {
        want_inputs(x, self.forward_inputs())?;
        let n = self.check(x)?;
        if self.flex.prefix_lm {
            check_ids("prefix flags", x[4], n)?;
        }
        let lse = vec![n / self.seq_len, self.n_heads, self.seq_len];
        Ok(vec![(x[0].shape.clone(), x[0].dtype), (lse, Self::lse_dtype(x[0]))])
    }

    /// `(q, k, v, seg, o, lse, do[, prefix])`
    pub fn infer_backward(&self, x: &[&TensorInfo]) -> Infer {
        want_inputs(x, 3 + self.forward_inputs())?;
        let (q, k, v, o, lse, d_o) = (x[0], x[1], x[2], x[4], x[5], x[6]);
        let n = self.check(x)?;
        if self.flex.prefix_lm {
            check_ids("prefix flags", x[7], n)?;
        }
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

fn want_inputs(x: &[&TensorInfo], n: usize) -> std::result::Result<(), String> {
    if x.len() == n {
        Ok(())
    } else {
        Err(format!("takes {n} inputs, got {}", x.len()))
    }
}

fn check_ids(what: &str, x: &TensorInfo, n: usize) -> std::result::Result<(), String> {
    if x.shape != [n] || x.dtype != DType::I32 {
        return Err(format!("{what} must be [{n}] i32, got {:?} {}", x.shape, x.dtype));
    }
    Ok(())
}

pub fn backward(
    g: &mut Graph,
    s: &AttnSpec,
    i: &[TensorId],
    o: &[TensorId],
    d_o: TensorId,
) -> Result<Vec<Option<TensorId>>> {
    let mut inputs = vec![i[0], i[1], i[2], i[3], o[0], o[1], d_o];
    inputs.extend_from_slice(&i[4..]);
    let outs = g.apply(Op::AttentionBackward(s.clone()), &inputs)?;
    let mut grads = vec![Some(outs[0]), Some(outs[1]), Some(outs[2])];
    grads.resize(i.len(), None);
    Ok(grads)
}

// ---- CPU reference: tiled, online softmax (FlashAttention-2 on the CPU) -------------------
//
// Work is split over (row, head, block of BQ queries); each task walks the key blocks its
// queries can see (ranges from `RowMask`, so causal, windowed and packed rows skip the
// masked tiles) keeping a running max `m`, sum `l` and output accumulator per query.
// Scratch is O(BQ * (BK + D)) per task: no score matrix exists.

const BQ: usize = 32;
const BK: usize = 64;

fn dot<T: Real>(a: &[T], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.f64() * y.f64()).sum()
}

/// Shapes and row slices shared by the forward and backward kernels.
struct Layout<'a> {
    t: usize,
    d: usize,
    hq: usize,
    group: usize,
    qw: usize,
    kw: usize,
    masks: Vec<RowMask<'a>>,
}

impl<'a> Layout<'a> {
    fn new(s: &'a AttnSpec, seg: &'a [i32], prefix: Option<&'a [i32]>) -> Self {
        let t = s.seq_len;
        let masks = (0..seg.len() / t)
            .map(|b| RowMask::new(s, &seg[b * t..(b + 1) * t], prefix.map(|p| &p[b * t..(b + 1) * t])))
            .collect();
        Layout {
            t,
            d: s.head_dim,
            hq: s.n_heads,
            group: s.n_heads / s.n_kv_heads,
            qw: s.n_heads * s.head_dim,
            kw: s.n_kv_heads * s.head_dim,
            masks,
        }
    }
    /// Row `i` of row `b`, head `h`, in a `[N, heads * d]` tensor of width `w`.
    fn at<'x, T>(&self, x: &'x [T], w: usize, b: usize, i: usize, h: usize) -> &'x [T] {
        &x[(b * self.t + i) * w + h * self.d..][..self.d]
    }
    /// The union of `range(i)` over a block of tokens.
    fn span(&self, block: Range<usize>, range: impl Fn(usize) -> Range<usize>) -> Range<usize> {
        let (mut lo, mut hi) = (usize::MAX, 0);
        for i in block {
            let r = range(i);
            if !r.is_empty() {
                lo = lo.min(r.start);
                hi = hi.max(r.end);
            }
        }
        lo.min(hi)..hi
    }
}

/// Forward: `o` and the row log-sum-exp `lse` (`-inf` for a query that sees nothing).
#[allow(clippy::too_many_arguments)]
pub fn cpu<T: Real>(
    s: &AttnSpec,
    q: &[T],
    k: &[T],
    v: &[T],
    seg: &[i32],
    prefix: Option<&[i32]>,
    o: &mut [T],
    lse: &mut [T],
) {
    let l = Layout::new(s, seg, prefix);
    let (t, d, hq) = (l.t, l.d, l.hq);
    let nqb = t.div_ceil(BQ);
    let results: Vec<(Vec<f64>, Vec<f64>)> = (0..l.masks.len() * hq * nqb)
        .into_par_iter()
        .map(|task| {
            let (b, h, qb) = (task / (hq * nqb), task / nqb % hq, task % nqb);
            let kh = h / l.group;
            let m = &l.masks[b];
            let qs = qb * BQ..((qb + 1) * BQ).min(t);
            let nq = qs.len();
            let mut acc = vec![0f64; nq * d];
            let mut mx = vec![f64::NEG_INFINITY; nq];
            let mut sum = vec![0f64; nq];
            let mut sc = vec![0f64; BK];
            let keys = l.span(qs.clone(), |i| m.key_range(i));
            for k0 in keys.clone().step_by(BK) {
                let ks = k0..(k0 + BK).min(keys.end);
                for (r, i) in qs.clone().enumerate() {
                    let qi = l.at(q, l.qw, b, i, h);
                    let mut bmax = f64::NEG_INFINITY;
                    for (c, j) in ks.clone().enumerate() {
                        sc[c] = if m.visible(i, j) {
                            let x = s.scale * dot(qi, l.at(k, l.kw, b, j, kh));
                            bmax = bmax.max(x);
                            x
                        } else {
                            f64::NEG_INFINITY
                        };
                    }
                    if bmax == f64::NEG_INFINITY {
                        continue;
                    }
                    let new_max = mx[r].max(bmax);
                    let a = &mut acc[r * d..(r + 1) * d];
                    if mx[r] != f64::NEG_INFINITY && new_max > mx[r] {
                        let f = (mx[r] - new_max).exp();
                        sum[r] *= f;
                        a.iter_mut().for_each(|x| *x *= f);
                    }
                    mx[r] = new_max;
                    for (c, j) in ks.clone().enumerate() {
                        if sc[c] == f64::NEG_INFINITY {
                            continue;
                        }
                        let p = (sc[c] - new_max).exp();
                        sum[r] += p;
                        for (x, y) in a.iter_mut().zip(l.at(v, l.kw, b, j, kh)) {
                            *x += p * y.f64();
                        }
                    }
                }
            }
            let mut lses = vec![f64::NEG_INFINITY; nq];
            for r in 0..nq {
                if sum[r] > 0.0 {
                    acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x /= sum[r]);
                    lses[r] = mx[r] + sum[r].ln();
                }
            }
            (acc, lses)
        })
        .collect();
    for (task, (acc, lses)) in results.into_iter().enumerate() {
        let (b, h, qb) = (task / (hq * nqb), task / nqb % hq, task % nqb);
        for (r, i) in (qb * BQ..((qb + 1) * BQ).min(t)).enumerate() {
            let row = (b * t + i) * l.qw + h * d;
            for c in 0..d {
                o[row + c] = T::of(acc[r * d + c]);
            }
            lse[(b * hq + h) * t + i] = T::of(lses[r]);
        }
    }
}

/// Backward (FlashAttention-2, Alg. 2, split in two passes so no task shares an output):
/// `dK, dV` over (row, kv head, key block), then `dQ` over (row, head, query block). Both
/// recompute `P = exp(s Q K^T - lse)` for the visible pairs only.
#[allow(clippy::too_many_arguments)]
pub fn cpu_backward<T: Real>(
    s: &AttnSpec,
    q: &[T],
    k: &[T],
    v: &[T],
    seg: &[i32],
    prefix: Option<&[i32]>,
    o: &[T],
    lse: &[T],
    d_o: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let l = Layout::new(s, seg, prefix);
    let (t, d, hq) = (l.t, l.d, l.hq);
    let hk = hq / l.group;
    let rows = l.masks.len();
    // Di = rowsum(dO * O), per (row, head, query).
    let di: Vec<f64> = (0..rows * hq * t)
        .into_par_iter()
        .map(|x| {
            let (b, h, i) = (x / (hq * t), x / t % hq, x % t);
            dot(l.at(d_o, l.qw, b, i, h), l.at(o, l.qw, b, i, h))
        })
        .collect();
    // P and dS of one visible pair.
    let pair = |b: usize, h: usize, i: usize, j: usize| -> (f64, f64) {
        let kh = h / l.group;
        let x = (b * hq + h) * t + i;
        let p = (s.scale * dot(l.at(q, l.qw, b, i, h), l.at(k, l.kw, b, j, kh)) - lse[x].f64()).exp();
        let dp = dot(l.at(d_o, l.qw, b, i, h), l.at(v, l.kw, b, j, kh));
        (p, p * (dp - di[x]))
    };

    let nkb = t.div_ceil(BK);
    let kv: Vec<(Vec<f64>, Vec<f64>)> = (0..rows * hk * nkb)
        .into_par_iter()
        .map(|task| {
            let (b, kh, kb) = (task / (hk * nkb), task / nkb % hk, task % nkb);
            let m = &l.masks[b];
            let ks = kb * BK..((kb + 1) * BK).min(t);
            let mut gk = vec![0f64; ks.len() * d];
            let mut gv = vec![0f64; ks.len() * d];
            let queries = l.span(ks.clone(), |j| m.query_range(j));
            for h in kh * l.group..(kh + 1) * l.group {
                for i in queries.clone() {
                    let (qi, doi) = (l.at(q, l.qw, b, i, h), l.at(d_o, l.qw, b, i, h));
                    for (c, j) in ks.clone().enumerate() {
                        if !m.visible(i, j) {
                            continue;
                        }
                        let (p, ds) = pair(b, h, i, j);
                        for e in 0..d {
                            gv[c * d + e] += p * doi[e].f64();
                            gk[c * d + e] += s.scale * ds * qi[e].f64();
                        }
                    }
                }
            }
            (gk, gv)
        })
        .collect();
    for (task, (gk, gv)) in kv.into_iter().enumerate() {
        let (b, kh, kb) = (task / (hk * nkb), task / nkb % hk, task % nkb);
        for (c, j) in (kb * BK..((kb + 1) * BK).min(t)).enumerate() {
            let row = (b * t + j) * l.kw + kh * d;
            for e in 0..d {
                dk[row + e] = T::of(gk[c * d + e]);
                dv[row + e] = T::of(gv[c * d + e]);
            }
        }
    }

    let nqb = t.div_ceil(BQ);
    let gq: Vec<Vec<f64>> = (0..rows * hq * nqb)
        .into_par_iter()
        .map(|task| {
            let (b, h, qb) = (task / (hq * nqb), task / nqb % hq, task % nqb);
            let m = &l.masks[b];
            let qs = qb * BQ..((qb + 1) * BQ).min(t);
            let mut g = vec![0f64; qs.len() * d];
            for (r, i) in qs.enumerate() {
                for j in m.key_range(i) {
                    if !m.visible(i, j) {
                        continue;
                    }
                    let (_, ds) = pair(b, h, i, j);
                    for (x, y) in g[r * d..(r + 1) * d].iter_mut().zip(l.at(k, l.kw, b, j, h / l.group)) {
                        *x += s.scale * ds * y.f64();
                    }
                }
            }
            g
        })
        .collect();
    for (task, g) in gq.into_iter().enumerate() {
        let (b, h, qb) = (task / (hq * nqb), task / nqb % hq, task % nqb);
        for (r, i) in (qb * BQ..((qb + 1) * BQ).min(t)).enumerate() {
            let row = (b * t + i) * l.qw + h * d;
            for e in 0..d {
                dq[row + e] = T::of(g[r * d + e]);
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
        if !self.flex.is_plain() {
            return Err("generation over a KV cache supports causal and sliding-window masks only".into());
        }
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
