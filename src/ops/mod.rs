//! The op set of a Llama-family training step. Each family lives in its own file with
//! three things: the shape/dtype rule, the CPU reference (generic over f32/f64, so the
//! gradient checks can run in f64), and the backward rule written in graph ops.
//!
//! Layout conventions: activations are row-major `[rows, features]`; a linear layer's
//! weight is `[out, in]` as in Hugging Face checkpoints, applied as `x @ W^T`.

pub mod attention;
pub mod attn_eager;
pub mod attn_mask;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod low_rank_grads;
pub mod mask_codegen;
pub mod mask_expr;
pub mod matmul;
pub mod matmul_fused;
pub mod optim;
pub mod par;
pub mod real;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
pub mod swiglu_low_rank;

use crate::graph::{Graph, Node, TensorId, TensorInfo};
use crate::tensor::DType;
use crate::Result;

pub use attention::AttnSpec;
pub use attn_eager::HeadLayout;
pub use attn_mask::FlexMask;
pub use mask_expr::{MaskError, MaskExpr};
pub use optim::AdamWSpec;
pub use real::Real;

/// Output shapes and dtypes, or a message saying what does not fit.
pub type Infer = std::result::Result<Vec<(Vec<usize>, DType)>, String>;

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `(table [V, H], ids [N] i32) -> [N, H]`
    Embedding,
    /// `(dy [N, H], ids [N] i32) -> dtable [vocab, H]` (scatter-add)
    EmbeddingBackward { vocab: usize },
    /// `op(a) @ op(b)`; a 2-D `b` is shared by every row of `a` (leading dims of `a` are
    /// flattened into M, `trans_a` must be false); otherwise both have the same batch dims.
    MatMul { trans_a: bool, trans_b: bool },
    /// `(a, b[, c]) -> alpha op(a) @ op(b) (+ c)`, one pass (see [`matmul_fused`]); built by
    /// the fusion pass, never by model code.
    MatMulFused {
        trans_a: bool,
        trans_b: bool,
        alpha: f64,
        add: bool,
    },
    /// In place: `(a, b, acc)`: `acc += alpha op(a) @ op(b)`; built by the fusion pass.
    MatMulAccumulate { trans_a: bool, trans_b: bool, alpha: f64 },
    /// `(dy [n, f], u [n, r], b [f, r], acc [f, r]) -> du = alpha dy b`, and in place
    /// `acc += alpha dy^T u`: both factor gradients of a rank-r product `alpha u b^T` (see
    /// [`low_rank_grads`]); built by the fusion pass.
    LowRankGrads { alpha: f64 },
    /// A node whose work the fusion pass moved into another node: runs nothing.
    Merged,
    /// `a + b`; `b` has `a`'s shape, a suffix of it (a bias), or one element.
    Add,
    /// `a * b` with the same broadcasting as `Add`.
    Mul,
    /// `x * factor`
    Scale { factor: f64 },
    /// Converts storage type; values round to nearest even.
    Cast { dtype: DType },
    /// Same data, another shape (no copy: the executor aliases the buffer).
    Reshape { shape: Vec<usize> },
    /// Sums leading dims away so the result has `shape` (a suffix of the input's shape,
    /// or `[1]` for a full sum).
    ReduceSum { shape: Vec<usize> },
    /// Repeats `x` (shape a suffix of `shape`, or one element) to `shape`.
    Broadcast { shape: Vec<usize> },
    /// `(x [.., H], w [H]) -> x / rms(x) * w`
    RmsNorm { eps: f64 },
    /// `(x, w, dy[, acc]) -> (dx[, dw])`: `dw` only when `weight_grad` (a frozen norm
    /// weight needs none); with `add`, `acc` (x's shape) is added to `dx` (the residual
    /// stream's other gradient, fused by `graph::fuse`).
    RmsNormBackward { eps: f64, weight_grad: bool, add: bool },
    /// Rotary embedding, rotate-half convention: `(x [N, heads*head_dim], pos [N] i32,
    /// inv_freq [head_dim/2] f32) -> y`; `inverse` rotates by the negative angle.
    Rope { head_dim: usize, inverse: bool, scale: f64 },
    /// `(gate, up) -> silu(gate) * up`
    Swiglu,
    /// `(gate, up, dy) -> (dgate, dup)`
    SwigluBackward,
    /// `(gate, up, ug [n, r], bg [f, r], uu, bu) -> silu(gate + alpha_gate ug bg^T) *
    /// (up + alpha_up uu bu^T)`: SwiGLU of two LoRA outputs whose rank-r terms are recomputed
    /// in place of being stored (see [`swiglu_low_rank`]); built by the fusion pass.
    SwigluLowRank { alpha_gate: f64, alpha_up: f64 },
    /// `(gate, up, dy, ug, bg, uu, bu) -> (dgate, dup)` of [`Op::SwigluLowRank`].
    SwigluLowRankBackward { alpha_gate: f64, alpha_up: f64 },
    /// `(x, seed [1] u32, p [1] f32) -> x * mask / (1 - p)`, mask from a counter-based hash
    /// of (seed, salt, element index); the salt makes each call site's mask independent.
    Dropout { salt: u32 },
    /// `(q, k, v, seg[, prefix]) -> (o, lse)`; see [`attention`] (`prefix` with prefix-LM masks).
    Attention(AttnSpec),
    /// `(q, k, v, seg, o, lse, do[, prefix]) -> (dq, dk, dv)`
    AttentionBackward(AttnSpec),
    /// `(q, k, v, seg, o, lse, do[, prefix], pos, inv_freq) -> (rope(dq), dk, dv)`:
    /// [`Op::AttentionBackward`] whose `dq` is rotated by the [`Op::Rope`] that read it
    /// (`inverse`, `scale` are that op's), so the backend may apply the rotation as it
    /// writes `dq`; built by the fusion pass (`graph::fuse`).
    AttentionBackwardRope { attn: AttnSpec, inverse: bool, scale: f64 },
    /// Eager attention's head split: `x [B*T, H*D] -> [B, H*repeat, T, D]`; see [`attn_eager`].
    SplitHeads(HeadLayout),
    /// The adjoint of `SplitHeads`: `[B, H*repeat, T, D] -> [B*T, H*D]`, summing the repeats.
    MergeHeads(HeadLayout),
    /// `(scores [B, H, T, T], seg [B*T] i32[, prefix]) -> p`: softmax over the visible keys.
    MaskedSoftmax(AttnSpec),
    /// `(p, dp) -> p * (dp - rowsum(p * dp))` over the last dim.
    SoftmaxBackward,
    /// `(logits [N, V], labels [N] i32) -> (loss_sum [1], label_count [1], lse [N])`
    CrossEntropy { ignore_index: i32 },
    /// `(logits, labels, lse, dloss [1]) -> dlogits`
    CrossEntropyBackward { ignore_index: i32 },
    /// `(logits, labels, dloss) -> (loss_sum, count, lse, dlogits)`: [`Op::CrossEntropy`] and
    /// its backward in one op, `dlogits` written over `logits` (its fourth output is `logits`'
    /// buffer); built by the fusion pass when nothing else reads the logits.
    CrossEntropyWithGrad { ignore_index: i32 },
    /// `(x_1, .., x_n) -> [1]`: the sum of squares of every element of every input.
    SumSquares,
    /// `(sumsq [1]) -> (norm [1], coef [1])`, `coef = min(1, max_norm / (norm + 1e-6))`.
    ClipCoef { max_norm: f64 },
    /// In place: `(param, grad, m, v, hyper [3], coef [1])`; writes param, m, v and zeroes grad
    /// (a non-finite `coef` leaves param, m and v unchanged).
    AdamW(AdamWSpec),
    /// In place: `(acc, g)`: `acc += g`.
    AccumulateGrad,
    /// `(cache [B, T, W], x [N, W], slot [N] i32) -> cache'`: writes row `i` of `x` to
    /// `cache[slot[i] / T, slot[i] % T]` (skipped when `slot[i] < 0`). The output aliases the
    /// cache, so readers of the written cache depend on this node.
    CacheWrite,
    /// Attention of new queries over a key/value cache: `(q [B*Tq, Hq*D], k_cache [B, T,
    /// Hkv*D], v_cache, pos [B*Tq] i32) -> o`; the query at position `p` sees cache
    /// positions `0..=p` (and its window); `pos < 0` gives zeros.
    AttentionCached(AttnSpec),
    /// `x -> y`: elements `[offset, offset + numel(shape))` of `x` as `shape`, without a copy
    /// (the executor aliases `x`'s buffer at that offset, which must be a multiple of the
    /// backend's alignment). The sharded optimizer updates its slice of a weight through it.
    View { offset: usize, shape: Vec<usize> },
    /// Computed on the host when the schedule reaches it: the executor reads the inputs back,
    /// passes them to the caller's [`crate::exec::HostCalls`] under `id`, and writes the values
    /// it returns into the outputs (whose shapes and dtypes are given here). Sharded training
    /// gathers parameters and reduce-scatters gradients through it.
    HostCall { id: u32, outputs: Vec<(Vec<usize>, DType)> },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Embedding => "embedding",
            Op::EmbeddingBackward { .. } => "embedding_backward",
            Op::MatMul { .. } => "matmul",
            Op::MatMulFused { .. } => "matmul_fused",
            Op::MatMulAccumulate { .. } => "matmul_accumulate",
            Op::LowRankGrads { .. } => "low_rank_grads",
            Op::Merged => "merged",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Scale { .. } => "scale",
            Op::Cast { .. } => "cast",
            Op::Reshape { .. } => "reshape",
            Op::ReduceSum { .. } => "reduce_sum",
            Op::Broadcast { .. } => "broadcast",
            Op::RmsNorm { .. } => "rms_norm",
            Op::RmsNormBackward { .. } => "rms_norm_backward",
            Op::Rope { .. } => "rope",
            Op::Swiglu => "swiglu",
            Op::SwigluBackward => "swiglu_backward",
            Op::SwigluLowRank { .. } => "swiglu_low_rank",
            Op::SwigluLowRankBackward { .. } => "swiglu_low_rank_backward",
            Op::Dropout { .. } => "dropout",
            Op::Attention(_) => "attention",
            Op::AttentionBackward(_) => "attention_backward",
            Op::AttentionBackwardRope { .. } => "attention_backward_rope",
            Op::SplitHeads(_) => "split_heads",
            Op::MergeHeads(_) => "merge_heads",
            Op::MaskedSoftmax(_) => "masked_softmax",
            Op::SoftmaxBackward => "softmax_backward",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::CrossEntropyBackward { .. } => "cross_entropy_backward",
            Op::CrossEntropyWithGrad { .. } => "cross_entropy_with_grad",
            Op::SumSquares => "sum_squares",
            Op::ClipCoef { .. } => "clip_coef",
            Op::AdamW(_) => "adamw",
            Op::AccumulateGrad => "accumulate_grad",
            Op::CacheWrite => "cache_write",
            Op::AttentionCached(_) => "attention_cached",
            Op::View { .. } => "view",
            Op::HostCall { .. } => "host_call",
        }
    }

    /// Indices of inputs this op writes in place (an output that is the written input's
    /// buffer says so through [`Op::is_alias`]).
    pub fn writes(&self) -> &'static [usize] {
        match self {
            Op::AdamW(_) => &[0, 1, 2, 3],
            Op::AccumulateGrad | Op::CacheWrite | Op::CrossEntropyWithGrad { .. } => &[0],
            Op::MatMulAccumulate { .. } => &[2],
            Op::LowRankGrads { .. } => &[3],
            _ => &[],
        }
    }

    /// True when output `k` is the op's first input's buffer (a reshape, a cache written in
    /// place, or the logits overwritten by their gradient).
    pub fn is_alias(&self, k: usize) -> bool {
        match self {
            Op::Reshape { .. } | Op::View { .. } | Op::CacheWrite => k == 0,
            Op::CrossEntropyWithGrad { .. } => k == 3,
            _ => false,
        }
    }

    /// True for ops that change nothing at run time (their output is a view, or their work
    /// was merged into another node).
    pub fn is_view(&self) -> bool {
        matches!(self, Op::Reshape { .. } | Op::View { .. } | Op::Merged)
    }

    /// Where an alias's output starts inside its input, in elements (a view's offset).
    pub fn alias_offset(&self) -> usize {
        match self {
            Op::View { offset, .. } => *offset,
            _ => 0,
        }
    }

    /// The shape rule.
    pub fn infer(&self, x: &[&TensorInfo]) -> Infer {
        let want = |n: usize| -> std::result::Result<(), String> {
            if x.len() == n {
                Ok(())
            } else {
                Err(format!("takes {n} inputs, got {}", x.len()))
            }
        };
        match self {
            Op::Embedding => {
                want(2)?;
                embedding::infer(x[0], x[1])
            }
            Op::EmbeddingBackward { vocab } => {
                want(2)?;
                embedding::infer_backward(x[0], x[1], *vocab)
            }
            Op::MatMul { trans_a, trans_b } => {
                want(2)?;
                matmul::infer(x[0], x[1], *trans_a, *trans_b)
            }
            Op::MatMulFused {
                trans_a, trans_b, add, ..
            } => matmul_fused::infer(x, *trans_a, *trans_b, *add),
            Op::MatMulAccumulate { trans_a, trans_b, .. } => matmul_fused::infer_accumulate(x, *trans_a, *trans_b),
            Op::LowRankGrads { .. } => low_rank_grads::infer(x),
            Op::Merged => Ok(vec![]),
            Op::Add | Op::Mul => {
                want(2)?;
                elementwise::infer_binary(x[0], x[1])
            }
            Op::Scale { .. } => {
                want(1)?;
                elementwise::float_like(x[0])
            }
            Op::Cast { dtype } => {
                want(1)?;
                elementwise::infer_cast(x[0], *dtype)
            }
            Op::Reshape { shape } => {
                want(1)?;
                elementwise::infer_reshape(x[0], shape)
            }
            Op::ReduceSum { shape } => {
                want(1)?;
                elementwise::infer_reduce_sum(x[0], shape)
            }
            Op::Broadcast { shape } => {
                want(1)?;
                elementwise::infer_broadcast(x[0], shape)
            }
            Op::RmsNorm { .. } => {
                want(2)?;
                rmsnorm::infer(x[0], x[1])
            }
            Op::RmsNormBackward { weight_grad, add, .. } => {
                want(3 + *add as usize)?;
                rmsnorm::infer_backward(x[0], x[1], x[2], add.then(|| x[3]), *weight_grad)
            }
            Op::Rope { head_dim, .. } => {
                want(3)?;
                rope::infer(x[0], x[1], x[2], *head_dim)
            }
            Op::Swiglu => {
                want(2)?;
                swiglu::infer(x[0], x[1])
            }
            Op::SwigluBackward => {
                want(3)?;
                swiglu::infer_backward(x[0], x[1], x[2])
            }
            Op::SwigluLowRank { .. } => swiglu_low_rank::infer(x),
            Op::SwigluLowRankBackward { .. } => swiglu_low_rank::infer_backward(x),
            Op::Dropout { .. } => {
                want(3)?;
                elementwise::infer_dropout(x[0], x[1], x[2])
            }
            Op::Attention(s) => s.infer(x),
            Op::AttentionBackward(s) => s.infer_backward(x),
            Op::AttentionBackwardRope { attn, .. } => {
                let Some((attn_in, rope_in)) = x.split_last_chunk::<2>() else {
                    return Err("takes the attention backward's inputs, then pos and inv_freq".into());
                };
                let out = attn.infer_backward(attn_in)?;
                rope::infer(attn_in[0], rope_in[0], rope_in[1], attn.head_dim)?;
                Ok(out)
            }
            Op::SplitHeads(l) => {
                want(1)?;
                l.infer_split(x[0])
            }
            Op::MergeHeads(l) => {
                want(1)?;
                l.infer_merge(x[0])
            }
            Op::MaskedSoftmax(s) => attn_eager::infer_masked_softmax(s, x),
            Op::SoftmaxBackward => {
                want(2)?;
                attn_eager::infer_softmax_backward(x[0], x[1])
            }
            Op::CrossEntropy { .. } => {
                want(2)?;
                cross_entropy::infer(x[0], x[1])
            }
            Op::CrossEntropyBackward { .. } => {
                want(4)?;
                cross_entropy::infer_backward(x[0], x[1], x[2], x[3])
            }
            Op::CrossEntropyWithGrad { .. } => {
                want(3)?;
                let mut out = cross_entropy::infer(x[0], x[1])?;
                if x[2].numel() != 1 {
                    return Err("dloss must be one element".into());
                }
                out.push((x[0].shape.clone(), x[0].dtype));
                Ok(out)
            }
            Op::SumSquares => optim::infer_sum_squares(x),
            Op::ClipCoef { .. } => {
                want(1)?;
                optim::infer_clip_coef(x[0])
            }
            Op::AdamW(_) => {
                want(6)?;
                optim::infer_adamw(x)
            }
            Op::AccumulateGrad => {
                want(2)?;
                optim::infer_accumulate(x[0], x[1])
            }
            Op::CacheWrite => {
                want(3)?;
                attention::infer_cache_write(x[0], x[1], x[2])
            }
            Op::AttentionCached(s) => {
                want(4)?;
                s.infer_cached(x[0], x[1], x[2], x[3])
            }
            Op::View { offset, shape } => {
                want(1)?;
                let n = crate::tensor::numel(shape);
                if offset + n > x[0].numel() {
                    return Err(format!(
                        "elements {offset}..{} are outside the {} of the input",
                        offset + n,
                        x[0].numel()
                    ));
                }
                Ok(vec![(shape.clone(), x[0].dtype)])
            }
            Op::HostCall { outputs, .. } => Ok(outputs.clone()),
        }
    }

    /// The backward rule: given the gradients of the node's outputs (None where an
    /// output does not influence the loss), appends graph ops that compute the
    /// gradient of each input for which `need[i]` is set.
    pub fn backward(
        &self,
        g: &mut Graph,
        node: &Node,
        dout: &[Option<TensorId>],
        need: &[bool],
    ) -> Result<Vec<Option<TensorId>>> {
        let (i, o) = (&node.inputs, &node.outputs);
        let none = || Ok(vec![None; i.len()]);
        let Some(dy) = dout[0] else {
            return none();
        };
        match self {
            Op::Embedding => embedding::backward(g, i, dy, need),
            Op::MatMul { trans_a, trans_b } => matmul::backward(g, i, dy, need, *trans_a, *trans_b),
            Op::MatMulFused {
                trans_a,
                trans_b,
                alpha,
                ..
            } => matmul_fused::backward(g, i, dy, need, (*trans_a, *trans_b, *alpha)),
            Op::Add => elementwise::backward_add(g, i, dy, need),
            Op::Mul => elementwise::backward_mul(g, i, dy, need),
            Op::Scale { factor } => Ok(vec![Some(g.apply1(Op::Scale { factor: *factor }, &[dy])?)]),
            Op::Cast { .. } => {
                let dt = g.dtype(i[0]);
                Ok(vec![Some(g.apply1(Op::Cast { dtype: dt }, &[dy])?)])
            }
            Op::Reshape { .. } => {
                let shape = g.shape(i[0]).to_vec();
                Ok(vec![Some(g.apply1(Op::Reshape { shape }, &[dy])?)])
            }
            Op::ReduceSum { .. } => {
                let shape = g.shape(i[0]).to_vec();
                Ok(vec![Some(g.apply1(Op::Broadcast { shape }, &[dy])?)])
            }
            Op::Broadcast { .. } => {
                let shape = g.shape(i[0]).to_vec();
                Ok(vec![Some(g.apply1(Op::ReduceSum { shape }, &[dy])?)])
            }
            Op::RmsNorm { eps } => rmsnorm::backward(g, i, dy, *eps, need),
            Op::Rope {
                head_dim,
                inverse,
                scale,
            } => {
                let op = Op::Rope {
                    head_dim: *head_dim,
                    inverse: !inverse,
                    scale: *scale,
                };
                Ok(vec![Some(g.apply1(op, &[dy, i[1], i[2]])?), None, None])
            }
            Op::Swiglu => swiglu::backward(g, i, dy),
            Op::Dropout { salt } => Ok(vec![
                Some(g.apply1(Op::Dropout { salt: *salt }, &[dy, i[1], i[2]])?),
                None,
                None,
            ]),
            Op::Attention(s) => attention::backward(g, s, i, o, dy),
            Op::SplitHeads(l) => Ok(vec![Some(g.apply1(Op::MergeHeads(*l), &[dy])?)]),
            Op::MergeHeads(l) => Ok(vec![Some(g.apply1(Op::SplitHeads(*l), &[dy])?)]),
            Op::MaskedSoftmax(_) => {
                let ds = g.apply1(Op::SoftmaxBackward, &[o[0], dy])?;
                let mut grads = vec![Some(ds)];
                grads.resize(i.len(), None);
                Ok(grads)
            }
            Op::CrossEntropy { ignore_index } => {
                let dl = g.apply1(
                    Op::CrossEntropyBackward {
                        ignore_index: *ignore_index,
                    },
                    &[i[0], i[1], o[2], dy],
                )?;
                Ok(vec![Some(dl), None])
            }
            Op::SumSquares => {
                // d/dx sum(x^2) = 2x * dy
                let mut out = Vec::new();
                for (k, &x) in i.iter().enumerate() {
                    if !need[k] {
                        out.push(None);
                        continue;
                    }
                    let shape = g.shape(x).to_vec();
                    let b = g.apply1(Op::Broadcast { shape }, &[dy])?;
                    let x2 = g.apply1(Op::Scale { factor: 2.0 }, &[x])?;
                    out.push(Some(g.apply1(Op::Mul, &[x2, b])?));
                }
                Ok(out)
            }
            Op::EmbeddingBackward { .. }
            | Op::RmsNormBackward { .. }
            | Op::SwigluBackward
            | Op::SwigluLowRankBackward { .. }
            | Op::AttentionBackward(_)
            | Op::AttentionBackwardRope { .. }
            | Op::SoftmaxBackward
            | Op::CrossEntropyBackward { .. }
            | Op::CrossEntropyWithGrad { .. }
            | Op::ClipCoef { .. }
            | Op::AdamW(_)
            | Op::AccumulateGrad
            | Op::MatMulAccumulate { .. }
            | Op::LowRankGrads { .. }
            | Op::Merged
            | Op::SwigluLowRank { .. }
            | Op::CacheWrite
            | Op::AttentionCached(_)
            | Op::View { .. }
            | Op::HostCall { .. } => Err(crate::Error::shape(
                self.name(),
                "has no backward rule (it is a backward, optimizer, host or fused op)",
            )),
        }
    }
}
