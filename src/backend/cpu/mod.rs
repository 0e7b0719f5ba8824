//! The CPU backend: the reference every kernel is checked against, and a real backend
//! (matmuls through the `gemm` crate, everything else parallel over rows with rayon natively, sequential on the web).
//!
//! Ops compute in f32, or in f64 when any operand is f64 (gradient checks). Operands
//! stored in another float type (f16, bf16) are widened into a temporary first.

use super::{Arg, Backend, BufferId, Loc};
use crate::ops::{
    attention, attn_eager, cross_entropy, elementwise, embedding, low_rank_grads, matmul, matmul_fused, optim, rmsnorm,
    rope, swiglu, swiglu_low_rank, AttnSpec, Op, Real,
};
use crate::tensor::{DType, HostTensor};
use crate::{Error, Result};
use std::borrow::Cow;

/// A float type the CPU computes in.
pub trait CpuFloat: Real + bytemuck::Pod {
    const DTYPE: DType;
}
impl CpuFloat for f32 {
    const DTYPE: DType = DType::F32;
}
impl CpuFloat for f64 {
    const DTYPE: DType = DType::F64;
}

pub struct CpuBackend {
    /// Arena buffers; `u64` elements keep every offset 8-byte aligned.
    buffers: Vec<Box<[u64]>>,
    /// Base pointers taken once at allocation, so views never borrow `buffers`.
    bases: Vec<*mut u8>,
    allocated: u64,
}

// SAFETY: the raw base pointers point into the boxed buffers this struct owns; the
// backend is used from one thread at a time (kernels parallelise internally).
unsafe impl Send for CpuBackend {}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// An output operand: written in place when its dtype is the compute type, otherwise
/// computed in a temporary and narrowed on `finish`.
struct Dst<'a, T> {
    direct: Option<&'a mut [T]>,
    temp: Vec<T>,
    target: (*mut u8, DType, usize),
}

impl<T: CpuFloat> Dst<'_, T> {
    fn get(&mut self) -> &mut [T] {
        match &mut self.direct {
            Some(s) => s,
            None => &mut self.temp,
        }
    }
    fn finish(self) {
        if self.direct.is_some() {
            return;
        }
        let (ptr, dtype, n) = self.target;
        let host = HostTensor {
            shape: vec![n],
            dtype: T::DTYPE,
            data: bytemuck::cast_slice(&self.temp).to_vec(),
        }
        .cast(dtype);
        // SAFETY: `ptr` addresses this operand's planned range of `n * dtype.size()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(host.data.as_ptr(), ptr, host.data.len()) };
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend {
            buffers: Vec::new(),
            bases: Vec::new(),
            allocated: 0,
        }
    }

    fn ptr(&self, loc: Loc) -> *mut u8 {
        // SAFETY: the executor only hands out locations inside allocated buffers.
        unsafe { self.bases[loc.buffer.0 as usize].add(loc.offset as usize) }
    }

    fn bytes(&self, a: &Arg) -> &[u8] {
        // SAFETY: the range was planned for this tensor and nothing writes it during the op
        // (outputs never overlap live inputs; in-place ops take their written inputs as Dst).
        unsafe { std::slice::from_raw_parts(self.ptr(a.loc), a.loc.bytes as usize) }
    }

    fn src<T: CpuFloat>(&self, a: &Arg) -> Cow<'_, [T]> {
        if a.info.dtype == T::DTYPE {
            Cow::Borrowed(bytemuck::cast_slice(self.bytes(a)))
        } else {
            let h = HostTensor {
                shape: a.info.shape.clone(),
                dtype: a.info.dtype,
                data: self.bytes(a).to_vec(),
            };
            Cow::Owned(bytemuck::cast_slice(&h.cast(T::DTYPE).data).to_vec())
        }
    }

    fn ints(&self, a: &Arg) -> &[i32] {
        bytemuck::cast_slice(self.bytes(a))
    }

    fn scalar(&self, a: &Arg) -> f64 {
        let h = HostTensor {
            shape: vec![1],
            dtype: a.info.dtype,
            data: self.bytes(a)[..a.info.dtype.size()].to_vec(),
        };
        h.to_f64()[0]
    }

    #[allow(clippy::mut_from_ref)]
    fn dst<T: CpuFloat>(&self, a: &Arg) -> Dst<'_, T> {
        let n = a.info.numel();
        let ptr = self.ptr(a.loc);
        if a.info.dtype == T::DTYPE {
            // SAFETY: as in `bytes`; outputs are exclusive to this launch.
            let s = unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, n) };
            Dst {
                direct: Some(s),
                temp: Vec::new(),
                target: (ptr, a.info.dtype, n),
            }
        } else {
            Dst {
                direct: None,
                temp: vec![T::zero(); n],
                target: (ptr, a.info.dtype, n),
            }
        }
    }

    /// An operand written in place: like `dst`, but a temporary starts from the current values.
    fn inplace<T: CpuFloat>(&self, a: &Arg) -> Dst<'_, T> {
        let mut d = self.dst::<T>(a);
        if d.direct.is_none() {
            d.temp = self.src::<T>(a).into_owned();
        }
        d
    }

    fn cast(&self, x: &Arg, y: &Arg) {
        let h = HostTensor {
            shape: x.info.shape.clone(),
            dtype: x.info.dtype,
            data: self.bytes(x).to_vec(),
        };
        let c = h.cast(y.info.dtype);
        // SAFETY: `y` is this op's planned output range of exactly `c.data.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(c.data.as_ptr(), self.ptr(y.loc), c.data.len()) };
    }

    /// `(logits, labels) -> (loss_sum, count, lse)` into `o[..3]`.
    fn cross_entropy<T: CpuFloat>(&self, logits: &[T], labels: &Arg, o: &[Arg], ignore_index: i32) {
        let (mut loss, mut count, mut lse) = (self.dst::<T>(&o[0]), self.dst::<T>(&o[1]), self.dst::<T>(&o[2]));
        let (l, c) = cross_entropy::cpu(logits, self.ints(labels), lse.get(), ignore_index);
        loss.get()[0] = T::of(l);
        count.get()[0] = T::of(c);
        loss.finish();
        count.finish();
        lse.finish();
    }

    /// `(q, k, v, seg, o, lse, do[, prefix]) -> (dq, dk, dv)`.
    fn attention_backward<T: CpuFloat>(&self, s: &AttnSpec, i: &[Arg], o: &[Arg]) {
        let (mut dq, mut dk, mut dv) = (self.dst::<T>(&o[0]), self.dst::<T>(&o[1]), self.dst::<T>(&o[2]));
        let (q, k, v) = (self.src::<T>(&i[0]), self.src::<T>(&i[1]), self.src::<T>(&i[2]));
        let (out, lse, d_o) = (self.src::<T>(&i[4]), self.src::<T>(&i[5]), self.src::<T>(&i[6]));
        attention::cpu_backward(
            s,
            &q,
            &k,
            &v,
            self.ints(&i[3]),
            i.get(7).map(|p| self.ints(p)),
            &out,
            &lse,
            &d_o,
            dq.get(),
            dk.get(),
            dv.get(),
        );
        dq.finish();
        dk.finish();
        dv.finish();
    }

    fn run<T: CpuFloat>(&self, op: &Op, i: &[Arg], o: &[Arg]) -> Result<()> {
        match op {
            Op::Embedding => {
                let h = i[0].info.shape[1];
                let mut y = self.dst::<T>(&o[0]);
                embedding::cpu(&self.src::<T>(&i[0]), self.ints(&i[1]), y.get(), h);
                y.finish();
            }
            Op::EmbeddingBackward { .. } => {
                let h = i[0].info.shape[1];
                let mut y = self.dst::<T>(&o[0]);
                embedding::cpu_backward(&self.src::<T>(&i[0]), self.ints(&i[1]), y.get(), h);
                y.finish();
            }
            Op::MatMul { trans_a, trans_b } => {
                let d = matmul::dims(&i[0].info.shape, &i[1].info.shape, *trans_a, *trans_b)
                    .map_err(|e| Error::backend("cpu", e))?;
                let mut y = self.dst::<T>(&o[0]);
                matmul::cpu(
                    &self.src::<T>(&i[0]),
                    &self.src::<T>(&i[1]),
                    y.get(),
                    d,
                    *trans_a,
                    *trans_b,
                    false,
                );
                y.finish();
            }
            Op::MatMulFused {
                trans_a,
                trans_b,
                alpha,
                add,
            } => {
                let d = matmul::dims(&i[0].info.shape, &i[1].info.shape, *trans_a, *trans_b)
                    .map_err(|e| Error::backend("cpu", e))?;
                let c = add.then(|| self.src::<T>(&i[2]));
                let mut y = self.dst::<T>(&o[0]);
                matmul_fused::cpu(
                    &self.src::<T>(&i[0]),
                    &self.src::<T>(&i[1]),
                    c.as_deref(),
                    y.get(),
                    d,
                    *trans_a,
                    *trans_b,
                    *alpha,
                );
                y.finish();
            }
            Op::MatMulAccumulate {
                trans_a,
                trans_b,
                alpha,
            } => {
                let d = matmul::dims(&i[0].info.shape, &i[1].info.shape, *trans_a, *trans_b)
                    .map_err(|e| Error::backend("cpu", e))?;
                let (a, b) = (self.src::<T>(&i[0]).into_owned(), self.src::<T>(&i[1]).into_owned());
                let mut acc = self.inplace::<T>(&i[2]);
                matmul_fused::cpu_accumulate(&a, &b, acc.get(), d, *trans_a, *trans_b, *alpha);
                acc.finish();
            }
            Op::LowRankGrads { alpha } => {
                let (n, f) = (i[0].info.shape[0], i[0].info.shape[1]);
                let r = i[1].info.shape[1];
                let (dy, u, b) = (self.src::<T>(&i[0]), self.src::<T>(&i[1]), self.src::<T>(&i[2]));
                let (dy, u, b) = (dy.into_owned(), u.into_owned(), b.into_owned());
                let mut acc = self.inplace::<T>(&i[3]);
                let mut du = self.dst::<T>(&o[0]);
                low_rank_grads::cpu(&dy, &u, &b, acc.get(), du.get(), n, f, r, *alpha);
                du.finish();
                acc.finish();
            }
            Op::Add | Op::Mul => {
                let mut y = self.dst::<T>(&o[0]);
                let (a, b) = (self.src::<T>(&i[0]), self.src::<T>(&i[1]));
                if *op == Op::Add {
                    elementwise::add(&a, &b, y.get());
                } else {
                    elementwise::mul(&a, &b, y.get());
                }
                y.finish();
            }
            Op::Scale { factor } => {
                let mut y = self.dst::<T>(&o[0]);
                elementwise::scale(&self.src::<T>(&i[0]), *factor, y.get());
                y.finish();
            }
            Op::ReduceSum { .. } => {
                let mut y = self.dst::<T>(&o[0]);
                elementwise::reduce_sum(&self.src::<T>(&i[0]), y.get());
                y.finish();
            }
            Op::Broadcast { .. } => {
                let mut y = self.dst::<T>(&o[0]);
                elementwise::broadcast(&self.src::<T>(&i[0]), y.get());
                y.finish();
            }
            Op::Dropout { salt } => {
                let seed = self.ints(&i[1])[0] as u32;
                let p = self.scalar(&i[2]) as f32;
                let mut y = self.dst::<T>(&o[0]);
                elementwise::dropout(&self.src::<T>(&i[0]), seed, *salt, p, y.get());
                y.finish();
            }
            Op::RmsNorm { eps } => {
                let mut y = self.dst::<T>(&o[0]);
                rmsnorm::cpu(&self.src::<T>(&i[0]), &self.src::<T>(&i[1]), y.get(), *eps);
                y.finish();
            }
            Op::RmsNormBackward { eps, add, .. } => {
                let mut dx = self.dst::<T>(&o[0]);
                let mut dw = o.get(1).map(|d| self.dst::<T>(d));
                let (x, w, dy) = (self.src::<T>(&i[0]), self.src::<T>(&i[1]), self.src::<T>(&i[2]));
                let acc = add.then(|| self.src::<T>(&i[3]));
                rmsnorm::cpu_backward(
                    &x,
                    &w,
                    &dy,
                    acc.as_deref(),
                    dx.get(),
                    dw.as_mut().map(|d| d.get()),
                    *eps,
                );
                dx.finish();
                if let Some(dw) = dw {
                    dw.finish();
                }
            }
            Op::Rope {
                head_dim,
                inverse,
                scale,
            } => {
                let inv: Vec<f32> = self.src::<f32>(&i[2]).into_owned();
                let mut y = self.dst::<T>(&o[0]);
                rope::cpu(
                    &self.src::<T>(&i[0]),
                    self.ints(&i[1]),
                    &inv,
                    y.get(),
                    *head_dim,
                    *inverse,
                    *scale,
                );
                y.finish();
            }
            Op::Swiglu => {
                let mut y = self.dst::<T>(&o[0]);
                swiglu::cpu(&self.src::<T>(&i[0]), &self.src::<T>(&i[1]), y.get());
                y.finish();
            }
            Op::SwigluBackward => {
                let (mut dg, mut du) = (self.dst::<T>(&o[0]), self.dst::<T>(&o[1]));
                let (g, u, dy) = (self.src::<T>(&i[0]), self.src::<T>(&i[1]), self.src::<T>(&i[2]));
                swiglu::cpu_backward(&g, &u, &dy, dg.get(), du.get());
                dg.finish();
                du.finish();
            }
            Op::SwigluLowRank { alpha_gate, alpha_up } => {
                let (n, f) = (i[0].info.shape[0], i[0].info.shape[1]);
                let r = i[2].info.shape[1];
                let src: Vec<_> = i.iter().map(|a| self.src::<T>(a)).collect();
                let [fg, fu] = swiglu_low_rank::Factors::pair(&src, 2, (*alpha_gate, *alpha_up));
                let mut y = self.dst::<T>(&o[0]);
                swiglu_low_rank::cpu(&src[0][..n * f], &src[1], &fg, &fu, f, r, y.get());
                y.finish();
            }
            Op::SwigluLowRankBackward { alpha_gate, alpha_up } => {
                let (n, f) = (i[0].info.shape[0], i[0].info.shape[1]);
                let r = i[3].info.shape[1];
                let src: Vec<_> = i.iter().map(|a| self.src::<T>(a)).collect();
                let [fg, fu] = swiglu_low_rank::Factors::pair(&src, 3, (*alpha_gate, *alpha_up));
                let (mut dg, mut dp) = (self.dst::<T>(&o[0]), self.dst::<T>(&o[1]));
                swiglu_low_rank::cpu_backward(&src[0][..n * f], &src[1], &src[2], &fg, &fu, f, r, dg.get(), dp.get());
                dg.finish();
                dp.finish();
            }
            Op::Attention(s) => {
                let (mut out, mut lse) = (self.dst::<T>(&o[0]), self.dst::<T>(&o[1]));
                let (q, k, v) = (self.src::<T>(&i[0]), self.src::<T>(&i[1]), self.src::<T>(&i[2]));
                let prefix = i.get(4).map(|p| self.ints(p));
                attention::cpu(s, &q, &k, &v, self.ints(&i[3]), prefix, out.get(), lse.get());
                out.finish();
                lse.finish();
            }
            Op::AttentionBackward(s) => self.attention_backward::<T>(s, i, o),
            Op::AttentionBackwardRope { attn, inverse, scale } => {
                let (ai, ri) = i.split_at(i.len() - 2);
                self.attention_backward::<T>(attn, ai, o);
                // The rotation of the dq just written (rounded to its type, as an Op::Rope
                // reading it would see it).
                let dq: Vec<T> = self.src::<T>(&o[0]).into_owned();
                let inv: Vec<f32> = self.src::<f32>(&ri[1]).into_owned();
                let mut y = self.dst::<T>(&o[0]);
                rope::cpu(&dq, self.ints(&ri[0]), &inv, y.get(), attn.head_dim, *inverse, *scale);
                y.finish();
            }
            Op::SplitHeads(l) | Op::MergeHeads(l) => {
                let mut y = self.dst::<T>(&o[0]);
                let x = self.src::<T>(&i[0]);
                if matches!(op, Op::SplitHeads(_)) {
                    l.cpu_split(&x, y.get());
                } else {
                    l.cpu_merge(&x, y.get());
                }
                y.finish();
            }
            Op::MaskedSoftmax(s) => {
                let mut y = self.dst::<T>(&o[0]);
                let prefix = i.get(2).map(|p| self.ints(p));
                attn_eager::cpu_masked_softmax(s, &self.src::<T>(&i[0]), self.ints(&i[1]), prefix, y.get());
                y.finish();
            }
            Op::SoftmaxBackward => {
                let cols = *i[0].info.shape.last().unwrap_or(&1);
                let mut y = self.dst::<T>(&o[0]);
                let (p, dp) = (self.src::<T>(&i[0]), self.src::<T>(&i[1]));
                attn_eager::cpu_softmax_backward(&p, &dp, y.get(), cols);
                y.finish();
            }
            Op::CrossEntropy { ignore_index } => {
                self.cross_entropy::<T>(&self.src::<T>(&i[0]), &i[1], o, *ignore_index);
            }
            Op::CrossEntropyBackward { ignore_index } => {
                let dloss = self.scalar(&i[3]);
                let mut d = self.dst::<T>(&o[0]);
                let (logits, lse) = (self.src::<T>(&i[0]), self.src::<T>(&i[2]));
                cross_entropy::cpu_backward(&logits, self.ints(&i[1]), &lse, dloss, d.get(), *ignore_index);
                d.finish();
            }
            Op::CrossEntropyWithGrad { ignore_index } => {
                // The forward, then the backward over the logits it read, as the two ops do.
                let logits: Vec<T> = self.src::<T>(&i[0]).into_owned();
                self.cross_entropy::<T>(&logits, &i[1], o, *ignore_index);
                let lse = self.src::<T>(&o[2]);
                let mut d = self.inplace::<T>(&i[0]);
                let dloss = self.scalar(&i[2]);
                cross_entropy::cpu_backward(&logits, self.ints(&i[1]), &lse, dloss, d.get(), *ignore_index);
                d.finish();
            }
            Op::SumSquares => {
                let total: f64 = i.iter().map(|a| optim::sum_squares(&self.src::<T>(a))).sum();
                let mut y = self.dst::<T>(&o[0]);
                y.get()[0] = T::of(total);
                y.finish();
            }
            Op::ClipCoef { max_norm } => {
                let (norm, coef) = optim::clip_coef(self.scalar(&i[0]), *max_norm);
                let (mut n, mut c) = (self.dst::<T>(&o[0]), self.dst::<T>(&o[1]));
                n.get()[0] = T::of(norm);
                c.get()[0] = T::of(coef);
                n.finish();
                c.finish();
            }
            Op::AdamW(spec) => {
                let h = self.src::<f32>(&i[4]);
                let hyper = [h[0] as f64, h[1] as f64, h[2] as f64];
                let coef = self.scalar(&i[5]);
                let (mut p, mut g, mut m, mut v) = (
                    self.inplace::<T>(&i[0]),
                    self.inplace::<T>(&i[1]),
                    self.inplace::<T>(&i[2]),
                    self.inplace::<T>(&i[3]),
                );
                optim::adamw(spec, p.get(), g.get(), m.get(), v.get(), hyper, coef);
                for d in [p, g, m, v] {
                    d.finish();
                }
            }
            Op::AccumulateGrad => {
                let g = self.src::<T>(&i[1]).into_owned();
                let mut acc = self.inplace::<T>(&i[0]);
                let a = acc.get();
                for (a, g) in a.iter_mut().zip(&g) {
                    *a = *a + *g;
                }
                acc.finish();
            }
            Op::CacheWrite => {
                let x = self.src::<T>(&i[1]).into_owned();
                let mut cache = self.inplace::<T>(&i[0]);
                attention::cpu_cache_write(cache.get(), &x, self.ints(&i[2]));
                cache.finish();
            }
            Op::AttentionCached(s) => {
                let cache_len = i[1].info.shape[1];
                let mut out = self.dst::<T>(&o[0]);
                let (q, k, v) = (self.src::<T>(&i[0]), self.src::<T>(&i[1]), self.src::<T>(&i[2]));
                attention::cpu_cached(s, &q, &k, &v, self.ints(&i[3]), out.get(), cache_len);
                out.finish();
            }
            Op::Cast { .. } | Op::Reshape { .. } | Op::View { .. } | Op::Merged | Op::HostCall { .. } => {
                unreachable!("handled before dispatch")
            }
        }
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn device_info(&self) -> String {
        format!("CPU, {} threads", crate::ops::par::threads())
    }
    fn max_buffer_bytes(&self) -> u64 {
        u64::MAX / 4
    }
    fn alignment(&self) -> u64 {
        64
    }
    fn fuses_matmul_epilogues(&self) -> bool {
        true
    }
    fn alloc(&mut self, bytes: u64) -> Result<BufferId> {
        let words = bytes.div_ceil(8) as usize;
        let mut v: Vec<u64> = Vec::new();
        v.try_reserve_exact(words)
            .map_err(|_| Error::backend("cpu", format!("cannot allocate {bytes} bytes of host memory")))?;
        v.resize(words, 0);
        let mut b = v.into_boxed_slice();
        self.bases.push(b.as_mut_ptr() as *mut u8);
        self.buffers.push(b);
        self.allocated += bytes;
        Ok(BufferId(self.buffers.len() as u32 - 1))
    }
    fn allocated_bytes(&self) -> u64 {
        self.allocated
    }
    fn write(&mut self, dst: Loc, data: &[u8]) -> Result<()> {
        if data.len() as u64 != dst.bytes {
            return Err(Error::backend(
                "cpu",
                format!("write of {} bytes into a {}-byte tensor", data.len(), dst.bytes),
            ));
        }
        // SAFETY: the destination range lies inside an allocated buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr(dst), data.len()) };
        Ok(())
    }
    fn read(&mut self, src: &[Loc]) -> Result<Vec<Vec<u8>>> {
        Ok(src
            .iter()
            // SAFETY: each range lies inside an allocated buffer.
            .map(|l| unsafe { std::slice::from_raw_parts(self.ptr(*l), l.bytes as usize) }.to_vec())
            .collect())
    }
    fn launch(&mut self, op: &Op, inputs: &[Arg], outputs: &[Arg]) -> Result<()> {
        match op {
            Op::Reshape { .. } | Op::View { .. } | Op::Merged => Ok(()),
            Op::HostCall { .. } => Err(crate::Error::backend("cpu", "host calls are computed by the executor")),
            Op::Cast { .. } => {
                self.cast(&inputs[0], &outputs[0]);
                Ok(())
            }
            _ => {
                let f64_mode = inputs.iter().chain(outputs).any(|a| a.info.dtype == DType::F64);
                if f64_mode {
                    self.run::<f64>(op, inputs, outputs)
                } else {
                    self.run::<f32>(op, inputs, outputs)
                }
            }
        }
    }
}

/// GFLOP/s of the CPU's f32 matmul at `n x n x n` (median of a few runs).
pub fn bench_gemm(n: usize) -> f64 {
    let a = vec![1.0f32; n * n];
    let b = vec![0.5f32; n * n];
    let mut c = vec![0f32; n * n];
    let d = crate::ops::matmul::MatmulDims {
        batch: 1,
        m: n,
        n,
        k: n,
        shared_b: true,
    };
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        crate::ops::matmul::cpu(&a, &b, &mut c, d, false, false, false);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    2.0 * (n as f64).powi(3) / times[1] / 1e9
}
