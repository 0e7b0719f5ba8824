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
use super::matmul::{self, MatmulDims};
use super::par::*;
use super::{Infer, Op, Real};
use crate::graph::{Graph, TensorId, TensorInfo};
use crate::tensor::DType;
use crate::Result;
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
// masked tiles), computes each score tile with a small matmul and keeps a running max,
// sum and output accumulator per query. Scratch is O(BQ * BK + (BQ + BK) * D) per task:
// no score matrix exists.

const BQ: usize = 64;
const BK: usize = 64;

fn dot<T: Real>(a: &[T], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.f64() * y.f64()).sum()
}

/// `c (+)= op(a) @ op(b)` for one small row-major tile.
#[allow(clippy::too_many_arguments)]
fn mm<T: Real>(a: &[T], b: &[T], c: &mut [T], m: usize, n: usize, k: usize, ta: bool, tb: bool, acc: bool) {
    let d = MatmulDims {
        batch: 1,
        m,
        n,
        k,
        shared_b: false,
    };
    matmul::cpu(&a[..m * k], &b[..k * n], &mut c[..m * n], d, ta, tb, acc);
}

/// Shapes and row masks shared by the forward and backward kernels.
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
    /// Copies tokens `rows` of head `h` of row `b` (a `[N, heads * d]` tensor of width `w`)
    /// into a contiguous `[rows, d]` tile.
    fn gather<T: Real>(&self, x: &[T], w: usize, b: usize, h: usize, rows: Range<usize>, tile: &mut [T]) {
        for (r, i) in rows.enumerate() {
            tile[r * self.d..(r + 1) * self.d].copy_from_slice(&x[(b * self.t + i) * w + h * self.d..][..self.d]);
        }
    }
    /// Writes a `[rows, d]` tile back to head `h` of row `b`.
    fn scatter<T: Real>(&self, tile: &[f64], w: usize, b: usize, h: usize, rows: Range<usize>, x: &mut [T]) {
        for (r, i) in rows.enumerate() {
            let dst = &mut x[(b * self.t + i) * w + h * self.d..][..self.d];
            for (y, v) in dst.iter_mut().zip(&tile[r * self.d..]) {
                *y = T::of(*v);
            }
        }
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
    fn blocks(r: Range<usize>, size: usize) -> impl Iterator<Item = Range<usize>> {
        r.clone().step_by(size).map(move |s| s..(s + size).min(r.end))
    }
}

/// Visibility of the keys `ks` for query `i`, through the exact range when the mask has one.
fn visible_fn<'m>(m: &'m RowMask, i: usize) -> impl Fn(usize) -> bool + 'm {
    let exact = m.ranges_exact().then(|| m.key_range(i));
    move |j| match &exact {
        Some(r) => r.contains(&j),
        None => m.visible(i, j),
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
            let (mut qt, mut kt, mut vt) = (
                vec![T::zero(); nq * d],
                vec![T::zero(); BK * d],
                vec![T::zero(); BK * d],
            );
            let (mut st, mut pt, mut pv) = (
                vec![T::zero(); nq * BK],
                vec![T::zero(); nq * BK],
                vec![T::zero(); nq * d],
            );
            let mut acc = vec![0f64; nq * d];
            let mut mx = vec![f64::NEG_INFINITY; nq];
            let mut sum = vec![0f64; nq];
            l.gather(q, l.qw, b, h, qs.clone(), &mut qt);
            for ks in Layout::blocks(l.span(qs.clone(), |i| m.key_range(i)), BK) {
                let nk = ks.len();
                l.gather(k, l.kw, b, kh, ks.clone(), &mut kt);
                l.gather(v, l.kw, b, kh, ks.clone(), &mut vt);
                mm(&qt, &kt, &mut st, nq, nk, d, false, true, false);
                for (r, i) in qs.clone().enumerate() {
                    let vis = visible_fn(m, i);
                    let (srow, prow) = (&st[r * nk..(r + 1) * nk], &mut pt[r * nk..(r + 1) * nk]);
                    let bmax = ks
                        .clone()
                        .zip(srow)
                        .filter(|(j, _)| vis(*j))
                        .map(|(_, x)| s.scale * x.f64())
                        .fold(f64::NEG_INFINITY, f64::max);
                    if bmax == f64::NEG_INFINITY {
                        prow.fill(T::zero());
                        continue;
                    }
                    let new_max = mx[r].max(bmax);
                    if new_max > mx[r] && mx[r] != f64::NEG_INFINITY {
                        let f = (mx[r] - new_max).exp();
                        sum[r] *= f;
                        acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= f);
                    }
                    mx[r] = new_max;
                    for ((j, x), p) in ks.clone().zip(srow).zip(prow.iter_mut()) {
                        let e = if vis(j) {
                            (s.scale * x.f64() - new_max).exp()
                        } else {
                            0.0
                        };
                        sum[r] += e;
                        *p = T::of(e);
                    }
                }
                mm(&pt, &vt, &mut pv, nq, d, nk, false, false, false);
                for (a, x) in acc.iter_mut().zip(&pv) {
                    *a += x.f64();
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
        let qs = qb * BQ..((qb + 1) * BQ).min(t);
        l.scatter(&acc, l.qw, b, h, qs.clone(), o);
        for (r, i) in qs.enumerate() {
            lse[(b * hq + h) * t + i] = T::of(lses[r]);
        }
    }
}

/// `P` and `dS = P * (dP - Di)` (times `scale`) of a tile of queries `qs` (head `h`) and
/// keys `ks`, from gathered tiles; `P` is 0 where the mask hides the key.
struct TileGrad<T> {
    p: Vec<T>,
    ds: Vec<T>,
    dp: Vec<T>,
}

impl<T: Real> TileGrad<T> {
    fn new() -> Self {
        TileGrad {
            p: vec![T::zero(); BQ * BK],
            ds: vec![T::zero(); BQ * BK],
            dp: vec![T::zero(); BQ * BK],
        }
    }
    #[allow(clippy::too_many_arguments)]
    fn compute(
        &mut self,
        s: &AttnSpec,
        m: &RowMask,
        qs: Range<usize>,
        ks: Range<usize>,
        tiles: [&[T]; 4],
        lse: &[T],
        di: &[f64],
    ) {
        let [qt, dot, kt, vt] = tiles;
        let (nq, nk, d) = (qs.len(), ks.len(), s.head_dim);
        mm(qt, kt, &mut self.p, nq, nk, d, false, true, false);
        mm(dot, vt, &mut self.dp, nq, nk, d, false, true, false);
        for (r, i) in qs.enumerate() {
            let vis = visible_fn(m, i);
            let l = lse[i].f64();
            for (c, j) in ks.clone().enumerate() {
                let x = r * nk + c;
                let p = if vis(j) {
                    (s.scale * self.p[x].f64() - l).exp()
                } else {
                    0.0
                };
                self.p[x] = T::of(p);
                self.ds[x] = T::of(s.scale * p * (self.dp[x].f64() - di[i]));
            }
        }
    }
}

/// Backward (FlashAttention-2, Alg. 2, split in two passes so no task shares an output):
/// `dK, dV` over (row, kv head, key block), then `dQ` over (row, head, query block). Both
/// recompute `P = exp(s Q K^T - lse)` tile by tile for the visible pairs.
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
            let x = (b * t + i) * l.qw + h * d;
            dot(&d_o[x..x + d], &o[x..x + d])
        })
        .collect();
    let row_stats = |b: usize, h: usize| {
        let x = (b * hq + h) * t;
        (&lse[x..x + t], &di[x..x + t])
    };

    let nkb = t.div_ceil(BK);
    let kv: Vec<(Vec<f64>, Vec<f64>)> = (0..rows * hk * nkb)
        .into_par_iter()
        .map(|task| {
            let (b, kh, kb) = (task / (hk * nkb), task / nkb % hk, task % nkb);
            let m = &l.masks[b];
            let ks = kb * BK..((kb + 1) * BK).min(t);
            let nk = ks.len();
            let (mut kt, mut vt) = (vec![T::zero(); nk * d], vec![T::zero(); nk * d]);
            l.gather(k, l.kw, b, kh, ks.clone(), &mut kt);
            l.gather(v, l.kw, b, kh, ks.clone(), &mut vt);
            let (mut qt, mut dot) = (vec![T::zero(); BQ * d], vec![T::zero(); BQ * d]);
            let (mut gk, mut gv) = (vec![T::zero(); nk * d], vec![T::zero(); nk * d]);
            let mut tg = TileGrad::new();
            let queries = l.span(ks.clone(), |j| m.query_range(j));
            for h in kh * l.group..(kh + 1) * l.group {
                let (lse_r, di_r) = row_stats(b, h);
                for qs in Layout::blocks(queries.clone(), BQ) {
                    let nq = qs.len();
                    l.gather(q, l.qw, b, h, qs.clone(), &mut qt);
                    l.gather(d_o, l.qw, b, h, qs.clone(), &mut dot);
                    tg.compute(s, m, qs, ks.clone(), [&qt, &dot, &kt, &vt], lse_r, di_r);
                    mm(&tg.p, &dot, &mut gv, nk, d, nq, true, false, true);
                    mm(&tg.ds, &qt, &mut gk, nk, d, nq, true, false, true);
                }
            }
            let f = |x: Vec<T>| x.into_iter().map(|y| y.f64()).collect::<Vec<f64>>();
            (f(gk), f(gv))
        })
        .collect();
    for (task, (gk, gv)) in kv.into_iter().enumerate() {
        let (b, kh, kb) = (task / (hk * nkb), task / nkb % hk, task % nkb);
        let ks = kb * BK..((kb + 1) * BK).min(t);
        l.scatter(&gk, l.kw, b, kh, ks.clone(), dk);
        l.scatter(&gv, l.kw, b, kh, ks, dv);
    }

    let nqb = t.div_ceil(BQ);
    let gq: Vec<Vec<f64>> = (0..rows * hq * nqb)
        .into_par_iter()
        .map(|task| {
            let (b, h, qb) = (task / (hq * nqb), task / nqb % hq, task % nqb);
            let (m, kh) = (&l.masks[b], h / l.group);
            let qs = qb * BQ..((qb + 1) * BQ).min(t);
            let nq = qs.len();
            let (mut qt, mut dot) = (vec![T::zero(); nq * d], vec![T::zero(); nq * d]);
            l.gather(q, l.qw, b, h, qs.clone(), &mut qt);
            l.gather(d_o, l.qw, b, h, qs.clone(), &mut dot);
            let (mut kt, mut vt) = (vec![T::zero(); BK * d], vec![T::zero(); BK * d]);
            let mut g = vec![T::zero(); nq * d];
            let mut tg = TileGrad::new();
            let (lse_r, di_r) = row_stats(b, h);
            for ks in Layout::blocks(l.span(qs.clone(), |i| m.key_range(i)), BK) {
                let nk = ks.len();
                l.gather(k, l.kw, b, kh, ks.clone(), &mut kt);
                l.gather(v, l.kw, b, kh, ks.clone(), &mut vt);
                tg.compute(s, m, qs.clone(), ks, [&qt, &dot, &kt, &vt], lse_r, di_r);
                mm(&tg.ds, &kt, &mut g, nq, d, nk, false, false, true);
            }
            g.into_iter().map(|y| y.f64()).collect()
        })
        .collect();
    for (task, g) in gq.into_iter().enumerate() {
        let (b, h, qb) = (task / (hq * nqb), task / nqb % hq, task % nqb);
        l.scatter(&g, l.qw, b, h, qb * BQ..((qb + 1) * BQ).min(t), dq);
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
