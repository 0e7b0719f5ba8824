//! Host side of each op: checks the storage types, sizes the grid, passes the arguments in
//! the order of the kernel's signature in cuda/*.cu.

use super::gpu::Args;
use super::kernels::Family;
use super::{matmul, CudaBackend};
use crate::backend::Arg;
use crate::graph::TensorInfo;
use crate::ops::{matmul as mm, Op};
use crate::tensor::DType;
use crate::{Error, Result};

const BLOCK: u32 = 256;

/// The kernels' storage-type code (cuda/common.cuh): 0 f32, 1 bf16, 2 f16.
pub fn dt_code(d: DType) -> Result<i32> {
    match d {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        DType::F64 => Err(Error::backend(
            "cuda",
            "f64 tensors are not supported: the cuda backend computes in f32 (f64 graphs, such as gradient \
             checks, run on the cpu backend)",
        )),
        d => Err(Error::backend("cuda", format!("expected a float tensor, got {d}"))),
    }
}

/// The rotation of an [`Op::Rope`]: positions and inverse frequencies (device pointers to
/// `[N]` i32 and `[head_dim / 2]` f32) and the op's parameters.
#[derive(Clone, Copy)]
pub(super) struct Rotation {
    pub pos: u64,
    pub inv_freq: u64,
    pub head_dim: usize,
    pub inverse: bool,
    pub scale: f64,
}

fn code(a: &Arg) -> Result<i32> {
    dt_code(a.info.dtype)
}

fn want(a: &Arg, d: DType, what: &str) -> Result<()> {
    if a.info.dtype != d {
        return Err(Error::backend(
            "cuda",
            format!("{what} must be {d}, got {}", a.info.dtype),
        ));
    }
    Ok(())
}

/// Heads each RoPE thread rotates (`ROPE_HPT` in cuda/rope.cu).
const ROPE_HEADS_PER_THREAD: u64 = 4;

pub fn blocks(n: u64, per: u64) -> u32 {
    n.div_ceil(per.max(1)).clamp(1, u32::MAX as u64) as u32
}

fn numel(i: &TensorInfo) -> u64 {
    i.numel() as u64
}

/// Threads per row for RMSNorm: one chunk of `v` features per thread up to 512 threads
/// (wide blocks keep enough loads in flight), then up to MAXC (cuda/rmsnorm.cu) chunks each.
const RMS_MAXC: u64 = 4;
fn rms_threads(h: u64, v: u64) -> Result<u32> {
    let t = (h.div_ceil(v).div_ceil(32) * 32).min(512);
    if t * v * RMS_MAXC < h {
        return Err(Error::backend(
            "cuda",
            format!(
                "rms_norm over {h} features is not supported (at most {} here)",
                512 * v * RMS_MAXC
            ),
        ));
    }
    Ok(t.max(32) as u32)
}

/// The RMSNorm backward's kernel for rows of `h` features and its grid (blocks that each walk
/// rows): the fewest register chunks that hold a row (cuda/rmsnorm.cu), and as many blocks as
/// fit on the SMs at once with that many registers (49, 76 and 128 per thread on sm_90).
fn rms_bwd_launch(h: u64, rows: u64, sms: u64) -> Result<(&'static str, u32, u64)> {
    let v = if h.is_multiple_of(8) { 8 } else { 1 };
    let threads = rms_threads(h, v)?;
    let chunks = h.div_ceil(threads as u64 * v);
    let (name, per_sm) = match (v, chunks) {
        (8, 1) => ("rmsnorm_bwd_v8_c1", 4),
        (8, 2) => ("rmsnorm_bwd_v8_c2", 3),
        (8, _) => ("rmsnorm_bwd_v8", 2),
        _ => ("rmsnorm_bwd_v1", 2),
    };
    Ok((name, threads, rows.clamp(1, per_sm * sms.max(1))))
}

impl CudaBackend {
    /// Scratch pieces an op needs, in the order its launch carves them.
    pub(super) fn scratch_sizes(&self, op: &Op, i: &[&TensorInfo], o: &[&TensorInfo]) -> Result<Vec<u64>> {
        let sms = self.gpu.sms.max(1) as u64;
        Ok(match op {
            Op::EmbeddingBackward { .. } if o[0].dtype != DType::F32 => vec![numel(o[0]) * 4],
            Op::MatMul { .. } => self.gemm_scratch(i[0], i[1], o[0], false)?,
            Op::MatMulFused { add, .. } => self.gemm_scratch(i[0], i[1], o[0], *add)?,
            Op::MatMulAccumulate { .. } => self.gemm_scratch(i[0], i[1], i[2], true)?,
            Op::LowRankGrads { .. } => self.low_rank_grads_scratch(i, o)?,
            Op::ReduceSum { .. } => {
                let (n, c) = (numel(i[0]), numel(o[0]));
                if c == 1 {
                    vec![1024 * 4]
                } else {
                    let (chunks, _) = colsum_chunks(n / c, c, sms);
                    vec![chunks * c * 4]
                }
            }
            Op::RmsNormBackward { weight_grad: true, .. } => {
                let h = *i[0].shape.last().unwrap_or(&1) as u64;
                let rows = numel(i[0]) / h.max(1);
                vec![rms_bwd_launch(h, rows, sms)?.2 * h * 4]
            }
            Op::CrossEntropy { .. } | Op::CrossEntropyWithGrad { .. } => vec![i[0].shape[0] as u64 * 4; 2],
            Op::SumSquares => vec![super::multi::sumsq_chunks(i) * 4],
            Op::Attention(s) if self.flash_ok_fwd(s, i, o) => vec![Self::seg_range_bytes(s, i[0].shape[0])],
            Op::AttentionBackwardRope { attn, .. } => {
                self.scratch_sizes(&Op::AttentionBackward(attn.clone()), &i[..i.len() - 2], o)?
            }
            Op::AttentionBackward(s) => {
                let n = i[0].shape[0] as u64;
                let di = n / s.seq_len as u64 * s.n_heads as u64 * s.seq_len as u64 * 4;
                if self.flash_ok_bwd(s, i, o) {
                    let rng = Self::seg_range_bytes(s, i[0].shape[0]);
                    vec![di, n * (s.n_heads * s.head_dim) as u64 * 4, rng]
                } else {
                    vec![di]
                }
            }
            _ => vec![],
        })
    }

    /// Compiles the kernels an op uses, plans matrix products, sizes the scratch space.
    pub(super) fn prepare_op(&mut self, op: &Op, i: &[&TensorInfo], o: &[&TensorInfo]) -> Result<()> {
        for t in i.iter().chain(o) {
            if t.dtype == DType::F64 {
                dt_code(t.dtype)?;
            }
        }
        match op {
            Op::Reshape { .. } | Op::View { .. } | Op::Merged | Op::HostCall { .. } => {}
            Op::MatMul { trans_a, trans_b } => self.prepare_gemm(i, o[0], *trans_a, *trans_b, false)?,
            Op::MatMulFused {
                trans_a, trans_b, add, ..
            } => self.prepare_gemm(i, o[0], *trans_a, *trans_b, *add)?,
            Op::MatMulAccumulate { trans_a, trans_b, .. } => self.prepare_gemm(i, i[2], *trans_a, *trans_b, true)?,
            Op::LowRankGrads { .. } => self.prepare_low_rank_grads(i, o)?,
            Op::RmsNorm { .. } | Op::RmsNormBackward { .. } => {
                self.mods.load(Family::RmsNorm)?;
            }
            Op::Rope { .. } => {
                self.mods.load(Family::Rope)?;
            }
            Op::Swiglu | Op::SwigluBackward | Op::SwigluLowRank { .. } | Op::SwigluLowRankBackward { .. } => {
                self.mods.load(Family::Swiglu)?;
            }
            Op::CrossEntropy { .. } | Op::CrossEntropyBackward { .. } | Op::CrossEntropyWithGrad { .. } => {
                self.mods.load(Family::CrossEntropy)?;
            }
            Op::SumSquares | Op::ClipCoef { .. } | Op::AdamW(_) => {
                self.mods.load(Family::Optim)?;
            }
            Op::Attention(s) => {
                s.require_plain_mask("cuda")?;
                self.prepare_attention(s, i, o, false)?
            }
            Op::AttentionBackward(s) => {
                s.require_plain_mask("cuda")?;
                self.prepare_attention(s, i, o, true)?
            }
            Op::AttentionBackwardRope { attn, .. } => {
                attn.require_plain_mask("cuda")?;
                self.prepare_attention(attn, &i[..i.len() - 2], o, true)?;
                self.mods.load(Family::Rope)?;
            }
            Op::MaskedSoftmax(s) => {
                s.require_plain_mask("cuda")?;
                self.mods.load(Family::Attention)?;
            }
            Op::AttentionCached(_) | Op::SplitHeads(_) | Op::MergeHeads(_) | Op::SoftmaxBackward => {
                self.mods.load(Family::Attention)?;
            }
            _ => {
                self.mods.load(Family::Elementwise)?;
            }
        }
        let sizes = self.scratch_sizes(op, i, o)?;
        let total: u64 = sizes.iter().map(|&s| super::align_up(s.max(1))).sum();
        self.ensure_scratch(total)
    }

    fn elementwise(&mut self, name: &'static str, n: u64, args: Args) -> Result<()> {
        let k = self.kernel(Family::Elementwise, name)?;
        self.run(&k, (blocks(n.div_ceil(8), BLOCK as u64), 1, 1), BLOCK, 0, args)
    }

    /// `y = x` converted (a cast kernel), on raw pointers.
    pub(super) fn cast_raw(&mut self, x: u64, dtx: DType, y: u64, dty: DType, n: u64) -> Result<()> {
        let args = Args::new()
            .ptr(x)
            .i32(dt_code(dtx)?)
            .ptr(y)
            .i32(dt_code(dty)?)
            .i64(n as i64);
        self.elementwise("cast_kernel", n, args)
    }

    /// `y = x * f` with f32 rounding, on raw pointers.
    pub(super) fn scale_raw(&mut self, x: u64, dtx: DType, y: u64, dty: DType, n: u64, f: f32) -> Result<()> {
        let args = Args::new()
            .ptr(x)
            .i32(dt_code(dtx)?)
            .ptr(y)
            .i32(dt_code(dty)?)
            .i64(n as i64)
            .f32(f);
        self.elementwise("scale_kernel", n, args)
    }

    /// The rotation of an [`Op::Rope`] with these positions and inverse frequencies, after
    /// checking their types.
    fn rotation(&self, (pos, inv_freq): (&Arg, &Arg), head_dim: usize, inverse: bool, scale: f64) -> Result<Rotation> {
        want(pos, DType::I32, "rope positions")?;
        want(inv_freq, DType::F32, "rope inverse frequencies")?;
        Ok(Rotation {
            pos: self.ptr(pos.loc),
            inv_freq: self.ptr(inv_freq.loc),
            head_dim,
            inverse,
            scale,
        })
    }

    /// `y = rope(x)` ([`Op::Rope`]) for raw pointers: `x` and `y` are `shape` =
    /// `[N, heads * head_dim]`, each in its own type (`x` may be `y`).
    pub(super) fn rope_raw(&mut self, r: &Rotation, shape: &[usize], x: (u64, DType), y: (u64, DType)) -> Result<()> {
        let n = shape[0] as u64;
        let heads = shape[1] / r.head_dim;
        let args = Args::new()
            .ptr(x.0)
            .i32(dt_code(x.1)?)
            .ptr(r.pos)
            .ptr(r.inv_freq)
            .ptr(y.0)
            .i32(dt_code(y.1)?)
            .i64(n as i64)
            .i32(heads as i32)
            .i32(r.head_dim as i32)
            .i32(r.inverse as i32)
            .f64(r.scale);
        // Threads as cuda/rope.cu lays them out: (token, pair group, head group).
        let half = r.head_dim as u64 / 2;
        let (name, per) = if half.is_multiple_of(8) {
            ("rope_v8", 8)
        } else {
            ("rope_v1", 1)
        };
        let threads = n * (half / per) * (heads as u64).div_ceil(ROPE_HEADS_PER_THREAD);
        let k = self.kernel(Family::Rope, name)?;
        self.run(&k, (blocks(threads, BLOCK as u64), 1, 1), BLOCK, 0, args)
    }

    /// `loss = sum(row_loss)`, `count = sum(row_count)` (f32 rows at `rows`), in f64 by one block.
    fn ce_sum(&mut self, rows: (u64, u64), n: u64, loss: &Arg, count: &Arg) -> Result<()> {
        let args = Args::new()
            .ptr(rows.0)
            .ptr(rows.1)
            .i64(n as i64)
            .ptr(self.ptr(loss.loc))
            .i32(dt_code(loss.info.dtype)?)
            .ptr(self.ptr(count.loc))
            .i32(dt_code(count.info.dtype)?);
        let k = self.kernel(Family::CrossEntropy, "ce_sum")?;
        self.run(&k, (1, 1, 1), 1024, 0, args)
    }

    pub(super) fn dispatch(&mut self, op: &Op, i: &[Arg], o: &[Arg]) -> Result<()> {
        let p = |b: &Self, a: &Arg| b.ptr(a.loc);
        match op {
            Op::Reshape { .. } | Op::View { .. } | Op::Merged => Ok(()),
            Op::HostCall { .. } => Err(Error::backend("cuda", "host calls are computed by the executor")),
            Op::Cast { .. } => {
                let n = numel(i[0].info);
                let (x, y) = (p(self, &i[0]), p(self, &o[0]));
                self.cast_raw(x, i[0].info.dtype, y, o[0].info.dtype, n)
            }
            Op::Add | Op::Mul => {
                let (n, nb) = (numel(i[0].info), numel(i[1].info));
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .ptr(p(self, &i[1]))
                    .i32(code(&i[1])?)
                    .ptr(p(self, &o[0]))
                    .i32(code(&o[0])?)
                    .i64(n as i64)
                    .i64(nb as i64)
                    .i32(if *op == Op::Add { 0 } else { 1 });
                self.elementwise("binary_kernel", n, args)
            }
            Op::Scale { factor } => {
                let (x, y) = (p(self, &i[0]), p(self, &o[0]));
                self.scale_raw(x, i[0].info.dtype, y, o[0].info.dtype, numel(i[0].info), *factor as f32)
            }
            Op::Broadcast { .. } => {
                let n = numel(o[0].info);
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .i64(numel(i[0].info) as i64)
                    .ptr(p(self, &o[0]))
                    .i32(code(&o[0])?)
                    .i64(n as i64);
                let k = self.kernel(Family::Elementwise, "broadcast_kernel")?;
                self.run(&k, (blocks(n, BLOCK as u64), 1, 1), BLOCK, 0, args)
            }
            Op::ReduceSum { .. } => self.reduce_sum(&i[0], &o[0]),
            Op::Dropout { salt } => {
                want(&i[1], DType::U32, "dropout seed")?;
                want(&i[2], DType::F32, "dropout probability")?;
                let n = numel(i[0].info);
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .ptr(p(self, &i[1]))
                    .ptr(p(self, &i[2]))
                    .u32(*salt)
                    .ptr(p(self, &o[0]))
                    .i32(code(&o[0])?)
                    .i64(n as i64);
                let k = self.kernel(Family::Elementwise, "dropout_kernel")?;
                self.run(&k, (blocks(n, BLOCK as u64), 1, 1), BLOCK, 0, args)
            }
            Op::AccumulateGrad => {
                let n = numel(i[0].info);
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .ptr(p(self, &i[1]))
                    .i32(code(&i[1])?)
                    .i64(n as i64);
                self.elementwise("accumulate_kernel", n, args)
            }
            Op::Embedding => {
                want(&i[1], DType::I32, "embedding ids")?;
                let (v, h) = (i[0].info.shape[0] as i64, i[0].info.shape[1] as i64);
                let n = i[1].info.shape[0] as i64;
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .ptr(p(self, &i[1]))
                    .ptr(p(self, &o[0]))
                    .i32(code(&o[0])?)
                    .i64(n)
                    .i64(h)
                    .i64(v);
                let k = self.kernel(Family::Elementwise, "embedding_kernel")?;
                self.run(&k, (blocks((n * h) as u64, BLOCK as u64), 1, 1), BLOCK, 0, args)
            }
            Op::EmbeddingBackward { vocab } => {
                want(&i[1], DType::I32, "embedding ids")?;
                let (n, h) = (i[0].info.shape[0] as i64, i[0].info.shape[1] as i64);
                let total = *vocab as u64 * h as u64;
                let direct = o[0].info.dtype == DType::F32;
                let acc = if direct {
                    p(self, &o[0])
                } else {
                    let sizes = self.scratch_sizes(op, &[i[0].info, i[1].info], &[o[0].info])?;
                    self.carve(&sizes)?[0]
                };
                self.gpu.memset32(acc, 0, total as usize)?;
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .ptr(p(self, &i[1]))
                    .ptr(acc)
                    .i64(n)
                    .i64(h)
                    .i64(*vocab as i64);
                let k = self.kernel(Family::Elementwise, "embedding_backward_kernel")?;
                self.run(&k, (blocks((n * h) as u64, BLOCK as u64), 1, 1), BLOCK, 0, args)?;
                if !direct {
                    let y = p(self, &o[0]);
                    self.cast_raw(acc, DType::F32, y, o[0].info.dtype, total)?;
                }
                Ok(())
            }
            Op::MatMul { trans_a, trans_b } => self.matmul(&i[0], &i[1], &o[0], *trans_a, *trans_b),
            Op::MatMulFused {
                trans_a,
                trans_b,
                alpha,
                add,
            } => {
                let epi = if *add {
                    Epilogue::Add { c: &i[2], d: &o[0] }
                } else {
                    Epilogue::Store(&o[0])
                };
                self.gemm(&i[0], &i[1], epi, *trans_a, *trans_b, *alpha)
            }
            Op::MatMulAccumulate {
                trans_a,
                trans_b,
                alpha,
            } => self.gemm(&i[0], &i[1], Epilogue::Accumulate(&i[2]), *trans_a, *trans_b, *alpha),
            Op::LowRankGrads { alpha } => self.low_rank_grads(i, o, *alpha),
            Op::RmsNorm { eps } => {
                let h = *i[0].info.shape.last().unwrap_or(&1) as u64;
                let rows = numel(i[0].info) / h.max(1);
                let v = if h.is_multiple_of(8) { 8 } else { 1 };
                let threads = rms_threads(h, v)?;
                let name = if v == 8 { "rmsnorm_fwd_v8" } else { "rmsnorm_fwd_v1" };
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .ptr(p(self, &i[1]))
                    .i32(code(&i[1])?)
                    .ptr(p(self, &o[0]))
                    .i32(code(&o[0])?)
                    .i32(h as i32)
                    .f32(*eps as f32);
                let k = self.kernel(Family::RmsNorm, name)?;
                self.run(&k, (blocks(rows, 1), 1, 1), threads, 0, args)
            }
            Op::RmsNormBackward { eps, weight_grad, add } => {
                let h = *i[0].info.shape.last().unwrap_or(&1) as u64;
                let rows = numel(i[0].info) / h.max(1);
                let (name, threads, grid) = rms_bwd_launch(h, rows, self.gpu.sms as u64)?;
                let infos: Vec<&TensorInfo> = i.iter().map(|a| a.info).collect();
                let out_infos: Vec<&TensorInfo> = o.iter().map(|a| a.info).collect();
                let sizes = self.scratch_sizes(op, &infos, &out_infos)?;
                // Null pointers: no added gradient, no weight gradient (cuda/rmsnorm.cu).
                let partial = if *weight_grad { self.carve(&sizes)?[0] } else { 0 };
                let (acc, acc_dt) = if *add { (p(self, &i[3]), code(&i[3])?) } else { (0, 0) };
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .ptr(p(self, &i[1]))
                    .i32(code(&i[1])?)
                    .ptr(p(self, &i[2]))
                    .i32(code(&i[2])?)
                    .ptr(acc)
                    .i32(acc_dt)
                    .ptr(p(self, &o[0]))
                    .i32(code(&o[0])?)
                    .ptr(partial)
                    .i64(rows as i64)
                    .i32(h as i32)
                    .f32(*eps as f32);
                let k = self.kernel(Family::RmsNorm, name)?;
                self.run(&k, (grid as u32, 1, 1), threads, 0, args)?;
                if !*weight_grad {
                    return Ok(());
                }
                let args = Args::new()
                    .ptr(partial)
                    .i32(grid as i32)
                    .i32(h as i32)
                    .ptr(p(self, &o[1]))
                    .i32(code(&o[1])?);
                let k = self.kernel(Family::RmsNorm, "rmsnorm_dw_final")?;
                self.run(&k, (blocks(h, BLOCK as u64), 1, 1), BLOCK, 0, args)
            }
            Op::Rope {
                head_dim,
                inverse,
                scale,
            } => {
                let rot = self.rotation((&i[1], &i[2]), *head_dim, *inverse, *scale)?;
                let (x, y) = ((p(self, &i[0]), i[0].info.dtype), (p(self, &o[0]), o[0].info.dtype));
                self.rope_raw(&rot, &i[0].info.shape, x, y)
            }
            Op::Swiglu => {
                let n = numel(i[0].info);
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .ptr(p(self, &i[1]))
                    .i32(code(&i[1])?)
                    .ptr(p(self, &o[0]))
                    .i32(code(&o[0])?)
                    .i64(n as i64);
                let k = self.kernel(Family::Swiglu, "swiglu_fwd")?;
                self.run(&k, (blocks(n.div_ceil(8), BLOCK as u64), 1, 1), BLOCK, 0, args)
            }
            Op::SwigluBackward => {
                let n = numel(i[0].info);
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .ptr(p(self, &i[1]))
                    .i32(code(&i[1])?)
                    .ptr(p(self, &i[2]))
                    .i32(code(&i[2])?)
                    .ptr(p(self, &o[0]))
                    .i32(code(&o[0])?)
                    .ptr(p(self, &o[1]))
                    .i32(code(&o[1])?)
                    .i64(n as i64);
                let k = self.kernel(Family::Swiglu, "swiglu_bwd")?;
                self.run(&k, (blocks(n.div_ceil(8), BLOCK as u64), 1, 1), BLOCK, 0, args)
            }
            Op::SwigluLowRank { alpha_gate, alpha_up } => self.swiglu_low_rank(i, o, (*alpha_gate, *alpha_up), false),
            Op::SwigluLowRankBackward { alpha_gate, alpha_up } => {
                self.swiglu_low_rank(i, o, (*alpha_gate, *alpha_up), true)
            }
            Op::CrossEntropy { ignore_index } => {
                want(&i[1], DType::I32, "labels")?;
                let (n, v) = (i[0].info.shape[0] as u64, i[0].info.shape[1] as u64);
                let sizes = self.scratch_sizes(op, &[i[0].info, i[1].info], &[o[0].info, o[1].info, o[2].info])?;
                let sc = self.carve(&sizes)?;
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .ptr(p(self, &i[1]))
                    .i64(v as i64)
                    .i32(*ignore_index)
                    .i32(v.is_multiple_of(8) as i32)
                    .ptr(p(self, &o[2]))
                    .i32(code(&o[2])?)
                    .ptr(sc[0])
                    .ptr(sc[1]);
                let k = self.kernel(Family::CrossEntropy, "ce_fwd")?;
                self.run(&k, (blocks(n, 1), 1, 1), ce_threads(v), 0, args)?;
                self.ce_sum((sc[0], sc[1]), n, &o[0], &o[1])
            }
            Op::CrossEntropyWithGrad { ignore_index } => {
                want(&i[1], DType::I32, "labels")?;
                let (n, v) = (i[0].info.shape[0] as u64, i[0].info.shape[1] as u64);
                let sizes = self.scratch_sizes(op, &[i[0].info, i[1].info], &[o[0].info, o[1].info, o[2].info])?;
                let sc = self.carve(&sizes)?;
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .ptr(p(self, &i[1]))
                    .i64(n as i64)
                    .i64(v as i64)
                    .i32(*ignore_index)
                    .i32(v.is_multiple_of(8) as i32)
                    .ptr(p(self, &o[2]))
                    .i32(code(&o[2])?)
                    .ptr(sc[0])
                    .ptr(sc[1])
                    .ptr(p(self, &i[2]))
                    .i32(code(&i[2])?);
                // One block of 1024 threads per SM walks the rows (cuda/cross_entropy.cu).
                let k = self.kernel(Family::CrossEntropy, "ce_with_grad")?;
                let grid = n.min(self.gpu.sms.max(1) as u64);
                self.run(&k, (grid as u32, 1, 1), 1024, 0, args)?;
                self.ce_sum((sc[0], sc[1]), n, &o[0], &o[1])
            }
            Op::CrossEntropyBackward { ignore_index } => {
                want(&i[1], DType::I32, "labels")?;
                let (n, v) = (i[0].info.shape[0] as u64, i[0].info.shape[1] as u64);
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .ptr(p(self, &i[1]))
                    .ptr(p(self, &i[2]))
                    .i32(code(&i[2])?)
                    .ptr(p(self, &i[3]))
                    .i32(code(&i[3])?)
                    .i64(v as i64)
                    .i32(*ignore_index)
                    .i32(v.is_multiple_of(8) as i32)
                    .ptr(p(self, &o[0]))
                    .i32(code(&o[0])?);
                let k = self.kernel(Family::CrossEntropy, "ce_bwd")?;
                self.run(&k, (blocks(n, 1), 1, 1), ce_threads(v), 0, args)
            }
            Op::SumSquares => self.sum_squares(i, &o[0]),
            Op::ClipCoef { max_norm } => {
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .f64(*max_norm)
                    .ptr(p(self, &o[0]))
                    .i32(code(&o[0])?)
                    .ptr(p(self, &o[1]))
                    .i32(code(&o[1])?);
                let k = self.kernel(Family::Optim, "clip_coef_kernel")?;
                self.run(&k, (1, 1, 1), 32, 0, args)
            }
            Op::AdamW(spec) => self.queue_adamw(spec, i),
            Op::Attention(s) => self.attention_fwd(s, i, o),
            Op::AttentionBackward(s) => self.attention_bwd(s, i, o, None),
            Op::AttentionBackwardRope { attn, inverse, scale } => {
                let (ai, ri) = i.split_at(i.len() - 2);
                let rot = self.rotation((&ri[0], &ri[1]), attn.head_dim, *inverse, *scale)?;
                self.attention_bwd(attn, ai, o, Some(rot))
            }
            Op::AttentionCached(s) => self.attention_cached(s, i, o),
            Op::SplitHeads(l) => self.head_layout(l, false, &i[0], &o[0]),
            Op::MergeHeads(l) => self.head_layout(l, true, &i[0], &o[0]),
            Op::MaskedSoftmax(s) => self.masked_softmax(s, i, o),
            Op::SoftmaxBackward => self.softmax_backward(i, o),
            Op::CacheWrite => {
                // The output is the cache itself (Op::is_alias): write the rows in place.
                want(&i[2], DType::I32, "cache slots")?;
                if i[0].info.dtype != i[1].info.dtype {
                    return Err(Error::backend("cuda", "cache and rows must share a storage type"));
                }
                let w = i[0].info.shape[2] as u64;
                let rows = numel(i[0].info) / w.max(1);
                let n = numel(i[1].info);
                let args = Args::new()
                    .ptr(p(self, &i[0]))
                    .i32(code(&i[0])?)
                    .i64(rows as i64)
                    .ptr(p(self, &i[1]))
                    .i32(code(&i[1])?)
                    .ptr(p(self, &i[2]))
                    .i64(i[1].info.shape[0] as i64)
                    .i64(w as i64);
                let k = self.kernel(Family::Elementwise, "cache_write_kernel")?;
                self.run(&k, (blocks(n, BLOCK as u64), 1, 1), BLOCK, 0, args)
            }
        }
    }

    fn reduce_sum(&mut self, x: &Arg, y: &Arg) -> Result<()> {
        let (n, c) = (numel(x.info), numel(y.info));
        let sizes = self.scratch_sizes(
            &Op::ReduceSum {
                shape: y.info.shape.clone(),
            },
            &[x.info],
            &[y.info],
        )?;
        let partial = self.carve(&sizes)?[0];
        let (xp, yp) = (self.ptr(x.loc), self.ptr(y.loc));
        let (dx, dy) = (code(x)?, code(y)?);
        if c == 1 {
            let grid = n.div_ceil(BLOCK as u64 * 8).clamp(1, 1024) as u32;
            let k = self.kernel(Family::Elementwise, "sum_partial")?;
            self.run(
                &k,
                (grid, 1, 1),
                BLOCK,
                0,
                Args::new().ptr(xp).i32(dx).i64(n as i64).ptr(partial),
            )?;
            let k = self.kernel(Family::Elementwise, "sum_final")?;
            self.run(
                &k,
                (1, 1, 1),
                BLOCK,
                0,
                Args::new().ptr(partial).i32(grid as i32).ptr(yp).i32(dy),
            )
        } else {
            let r = n / c;
            let (chunks, per) = colsum_chunks(r, c, self.gpu.sms.max(1) as u64);
            let k = self.kernel(Family::Elementwise, "colsum_partial")?;
            self.run(
                &k,
                (blocks(c, BLOCK as u64), chunks as u32, 1),
                BLOCK,
                0,
                Args::new()
                    .ptr(xp)
                    .i32(dx)
                    .i64(r as i64)
                    .i64(c as i64)
                    .i64(per as i64)
                    .ptr(partial),
            )?;
            let k = self.kernel(Family::Elementwise, "colsum_final")?;
            self.run(
                &k,
                (blocks(c, BLOCK as u64), 1, 1),
                BLOCK,
                0,
                Args::new()
                    .ptr(partial)
                    .i64(chunks as i64)
                    .i64(c as i64)
                    .ptr(yp)
                    .i32(dy),
            )
        }
    }

    fn matmul(&mut self, a: &Arg, b: &Arg, c: &Arg, trans_a: bool, trans_b: bool) -> Result<()> {
        self.gemm(a, b, Epilogue::Store(c), trans_a, trans_b, 1.0)
    }

    /// `alpha op(a) op(b)` with its epilogue, one cuBLASLt call (plus operand casts where
    /// the storage types need them; see matmul.rs).
    pub(super) fn gemm(
        &mut self,
        a: &Arg,
        b: &Arg,
        epi: Epilogue,
        trans_a: bool,
        trans_b: bool,
        alpha: f64,
    ) -> Result<()> {
        let d = mm::dims(&a.info.shape, &b.info.shape, trans_a, trans_b).map_err(|e| Error::backend("cuda", e))?;
        let out = epi.out();
        let prec = matmul::precision(a.info.dtype, b.info.dtype, out.info.dtype)?;
        let ct = prec.compute;
        let (ap, bp, dp) = (self.ptr(a.loc), self.ptr(b.loc), self.ptr(out.loc));
        let cp = match epi {
            Epilogue::Store(_) => dp,
            Epilogue::Add { c, .. } => self.ptr(c.loc),
            Epilogue::Accumulate(_) => dp,
        };
        if d.m == 0 || d.n == 0 || d.batch == 0 {
            return Ok(());
        }
        // A C term is read and written in its own type (the compute type or f32); a plain
        // product is written in the compute type and rounded to the output's type after.
        let direct_c = !matches!(epi, Epilogue::Store(_));
        if direct_c && out.info.dtype != ct && out.info.dtype != DType::F32 {
            return Err(Error::backend(
                "cuda",
                format!(
                    "a fused product of {} operands cannot write {} (only {ct} or f32)",
                    a.info.dtype, out.info.dtype
                ),
            ));
        }
        if d.k == 0 {
            return match epi {
                Epilogue::Store(_) => self.gpu.memset8(dp, 0, out.loc.bytes as usize),
                Epilogue::Add { c, .. } => self.cast_raw(cp, c.info.dtype, dp, out.info.dtype, numel(out.info)),
                Epilogue::Accumulate(_) => Ok(()),
            };
        }
        let sizes = self.gemm_scratch(a.info, b.info, out.info, direct_c)?;
        let sc = self.carve(&sizes)?;
        let a2 = if prec.cast_a {
            self.cast_operand(a, ct, sc[0])?
        } else {
            ap
        };
        let b2 = if prec.cast_b {
            self.cast_operand(b, ct, sc[1])?
        } else {
            bp
        };
        let cast_out = !direct_c && prec.cast_c;
        let (c2, d2, c_type) = if direct_c {
            (cp, dp, out.info.dtype)
        } else if cast_out {
            (sc[2], sc[2], ct)
        } else {
            (dp, dp, ct)
        };
        let key = matmul::key(d, trans_a, trans_b, ct, ct, c_type);
        let ops = matmul::Operands {
            a: a2,
            b: b2,
            c: c2,
            d: d2,
            alpha: alpha as f32,
            beta: if matches!(epi, Epilogue::Store(_)) { 0.0 } else { 1.0 },
        };
        let (handle, ws) = (self.lt, self.lt_workspace);
        self.plan(key)?;
        let plan = &self.plans[&key];
        plan.run(handle, &self.gpu, ops, ws).map_err(|e| {
            super::prefix(
                e,
                &format!("{ct} matmul m {} n {} k {} batch {}", d.m, d.n, d.k, d.batch),
            )
        })?;
        if self.opts.sync_each_launch {
            self.gpu.sync()?;
        }
        if cast_out {
            self.cast_raw(sc[2], ct, dp, out.info.dtype, numel(out.info))?;
        }
        Ok(())
    }

    /// A product operand in type `dt`: a weight's persistent copy (weight_casts.rs), or
    /// the operand cast into `scratch`.
    fn cast_operand(&mut self, x: &Arg, dt: DType, scratch: u64) -> Result<u64> {
        if let Some(p) = self.weight_copy(x, dt)? {
            return Ok(p);
        }
        self.cast_raw(self.ptr(x.loc), x.info.dtype, scratch, dt, numel(x.info))?;
        Ok(scratch)
    }

    /// Scratch for a product's operand casts: (a, b, the output in the compute type).
    pub(super) fn gemm_scratch(
        &self,
        a: &TensorInfo,
        b: &TensorInfo,
        out: &TensorInfo,
        direct_c: bool,
    ) -> Result<Vec<u64>> {
        let p = matmul::precision(a.dtype, b.dtype, out.dtype)?;
        let s = p.compute.size() as u64;
        Ok(vec![
            if p.cast_a { numel(a) * s } else { 0 },
            if p.cast_b { numel(b) * s } else { 0 },
            if p.cast_c && !direct_c { numel(out) * s } else { 0 },
        ])
    }

    /// The cuBLASLt plan a product will use, made (and its algorithm timed) before capture.
    pub(super) fn prepare_gemm(
        &mut self,
        i: &[&TensorInfo],
        out: &TensorInfo,
        trans_a: bool,
        trans_b: bool,
        direct_c: bool,
    ) -> Result<()> {
        let d = mm::dims(&i[0].shape, &i[1].shape, trans_a, trans_b).map_err(|e| Error::backend("cuda", e))?;
        let p = matmul::precision(i[0].dtype, i[1].dtype, out.dtype)?;
        if d.m > 0 && d.n > 0 && d.k > 0 {
            let c = if direct_c { out.dtype } else { p.compute };
            self.plan(matmul::key(d, trans_a, trans_b, p.compute, p.compute, c))?;
        }
        self.mods.load(Family::Elementwise)?;
        Ok(())
    }
}

/// What a product does with its result.
#[derive(Clone, Copy)]
pub(super) enum Epilogue<'a> {
    /// `d = alpha P`.
    Store(&'a Arg<'a>),
    /// `d = alpha P + c`.
    Add { c: &'a Arg<'a>, d: &'a Arg<'a> },
    /// `acc += alpha P`, in place.
    Accumulate(&'a Arg<'a>),
}

impl<'a> Epilogue<'a> {
    fn out(&self) -> &'a Arg<'a> {
        match *self {
            Epilogue::Store(d) | Epilogue::Add { d, .. } | Epilogue::Accumulate(d) => d,
        }
    }
}

/// Row chunks for a column sum of [r, c]: enough blocks to fill the device twice over.
fn colsum_chunks(r: u64, c: u64, sms: u64) -> (u64, u64) {
    let col_blocks = c.div_ceil(BLOCK as u64).max(1);
    let target = (2 * sms).div_ceil(col_blocks).clamp(1, r.max(1));
    let per = r.max(1).div_ceil(target);
    (r.max(1).div_ceil(per), per)
}

fn ce_threads(v: u64) -> u32 {
    (v.div_ceil(8).div_ceil(32) * 32).clamp(32, 256) as u32
}
