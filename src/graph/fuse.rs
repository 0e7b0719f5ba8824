//! Fusion of matrix-product epilogues: a graph pass for backends whose products take
//! `alpha` and `beta` (cuBLASLt, the `gemm` crate).
//!
//! Rewrites, where the intermediate tensors have no other reader:
//! - `scale(x, f)` read only as a product operand: the products take `alpha * f` and `x`;
//! - `scale(P, f)` of a product `P`: the product takes `alpha * f`;
//! - `add(c, P)` (either order) of a product `P` and a tensor of its shape: `alpha P + c`
//!   in one pass ([`Op::MatMulFused`] with `add`); when both terms are products, the one
//!   with the longer inner dimension takes the other as C: reading C costs little in a
//!   compute-bound product and doubles the memory traffic of a rank-r one;
//! - `add(c, Q)` (either order) where `Q` is already `alpha P + d` and `d` a private
//!   product: `d` takes `c` as its C term and `Q` takes the place of the add, so a residual
//!   stream's `h + (base + s (x A^T) B^T)` costs no pass of its own;
//! - `swiglu(G + cg, U + cu)` of two LoRA outputs in 16-bit types, whose rank-r terms
//!   `cg = a ug bg^T`, `cu` are read only there: [`Op::SwigluLowRank`] recomputes the terms
//!   from the rank-r factors, and its backward does too, so neither `[n, f]` term is written
//!   or read back (the base products lose their C);
//! - `accumulate_grad(acc, P)` or `accumulate_grad(acc, cast(P))`: `acc += alpha P` in place
//!   ([`Op::MatMulAccumulate`]; the 16-bit product is summed in f32 unrounded);
//! - `acc += alpha dy^T u` and an earlier `du = alpha dy b` (the two factor gradients of a
//!   rank-r product `alpha u b^T`): [`Op::LowRankGrads`] at the place of `du`, which reads
//!   `dy` once for both; the accumulation's node becomes [`Op::Merged`];
//! - `rope(dq)` of the `dq` of an attention backward: [`Op::AttentionBackwardRope`] rotates
//!   `dq` as it writes it (on CUDA the flash kernel's f32 accumulator goes through the
//!   rotation in place of a separate scale, and `dq` is written and read once less);
//! - `cross_entropy_backward` of a `cross_entropy` whose logits nothing else reads:
//!   [`Op::CrossEntropyWithGrad`] at the forward's place writes `dlogits` over the logits
//!   (their buffer is not doubled, and a GPU reads them while they are in cache);
//! - `add(c, dx)` (either order) of the `dx` of an RMSNorm backward without a weight
//!   gradient: the backward adds `c` as it writes `dx` ([`Op::RmsNormBackward`] with `add`),
//!   which in a residual block is the sum of the residual stream's two gradients.
//!
//! LoRA's `base + s * (x A^T) B^T` becomes the rank-r product `s (x A^T) B^T`, read as C by
//! the base product;
//! in the backward pass the scaled output gradient, the sums of a tensor's gradients over
//! its readers and the accumulation of weight gradients disappear the same way. A rewritten
//! node keeps its index and its output tensor, so tensor ids, program outputs and effects
//! stay valid; the nodes it no longer reads from are left unreachable, and the executor
//! schedules only reachable nodes.

use super::{Graph, Node, NodeId, TensorId};
use crate::ops::Op;
use crate::tensor::DType;
use std::collections::{HashMap, HashSet};

/// How many nodes each rewrite changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FuseStats {
    pub scaled_operands: usize,
    pub scaled_products: usize,
    pub added_products: usize,
    pub added_product_sums: usize,
    pub accumulated_products: usize,
    pub added_norm_gradients: usize,
    pub low_rank_swiglus: usize,
    pub low_rank_grads: usize,
    pub roped_dq: usize,
    pub cross_entropy_with_grad: usize,
}

impl FuseStats {
    pub fn total(&self) -> usize {
        self.scaled_operands
            + self.scaled_products
            + self.added_products
            + self.added_product_sums
            + self.accumulated_products
            + self.added_norm_gradients
            + self.low_rank_swiglus
            + self.low_rank_grads
            + self.roped_dq
            + self.cross_entropy_with_grad
    }
}

/// A product without a C term: `alpha op(a) op(b)`.
#[derive(Clone, Copy)]
struct Product {
    a: TensorId,
    b: TensorId,
    trans_a: bool,
    trans_b: bool,
    alpha: f64,
}

/// The rewrites that can be switched (the others always apply).
#[derive(Clone, Copy, Debug)]
pub struct FuseOptions {
    /// [`Op::SwigluLowRank`] for the SwiGLU of two LoRA outputs in 16-bit storage; off by
    /// default until its CUDA kernel is measured faster than the products it replaces.
    pub low_rank_swiglu: bool,
    /// [`Op::LowRankGrads`] for the two factor gradients of a rank-r product; on by default.
    pub low_rank_grads: bool,
    /// [`Op::AttentionBackwardRope`] for the RoPE backward of the attention's `dq`; off by
    /// default until it is measured faster than the two ops it replaces.
    pub roped_dq: bool,
    /// [`Op::CrossEntropyWithGrad`] for a cross-entropy and its backward (the gradient
    /// written over the logits); off by default until it is measured on a GPU.
    pub cross_entropy_with_grad: bool,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            low_rank_swiglu: false,
            low_rank_grads: true,
            roped_dq: false,
            cross_entropy_with_grad: false,
        }
    }
}

struct Pass<'g> {
    g: &'g mut Graph,
    opts: FuseOptions,
    /// Readers of each tensor (node inputs, with repeats).
    readers: Vec<usize>,
    keep: &'g HashSet<TensorId>,
    /// The nodes each program runs (empty: one program runs every node).
    programs: &'g [HashSet<usize>],
    /// The nodes that write each tensor in place.
    writers: HashMap<TensorId, Vec<usize>>,
}

impl Pass<'_> {
    fn read(&mut self, t: TensorId, by: isize) {
        let r = &mut self.readers[t.idx()];
        *r = (*r as isize + by) as usize;
    }

    /// True when `t` is an intermediate read once, by the node being rewritten.
    fn private(&self, t: TensorId) -> bool {
        self.readers[t.idx()] == 1 && !self.keep.contains(&t)
    }

    /// True when every program that runs node `a` or node `b` runs both, so one of them may
    /// take over the other's work.
    fn run_together(&self, a: usize, b: usize) -> bool {
        self.programs.iter().all(|p| p.contains(&a) == p.contains(&b))
    }

    /// True when nothing writes `t` in place between nodes `from` and `to`, so reading it at
    /// `to` instead of `from` reads the same values.
    fn unchanged(&self, t: TensorId, from: usize, to: usize) -> bool {
        self.writers
            .get(&t)
            .is_none_or(|w| w.iter().all(|&k| k <= from || k >= to))
    }

    /// The product that produces `t`, if its operands still hold the same values at node
    /// `at`.
    fn product(&self, t: TensorId, at: usize) -> Option<Product> {
        let pn = self.g.producer[t.idx()]?;
        let node = self.g.node(pn);
        let (trans_a, trans_b, alpha) = match node.op {
            Op::MatMul { trans_a, trans_b } => (trans_a, trans_b, 1.0),
            Op::MatMulFused {
                trans_a,
                trans_b,
                alpha,
                add: false,
            } => (trans_a, trans_b, alpha),
            _ => return None,
        };
        if !node.inputs[..2].iter().all(|&x| self.unchanged(x, pn.idx(), at)) {
            return None;
        }
        Some(Product {
            a: node.inputs[0],
            b: node.inputs[1],
            trans_a,
            trans_b,
            alpha,
        })
    }

    /// Whether the backends' products can write type `c` for operands `a`, `b`: the
    /// operands share a type (or `b` is f32, rounded to `a`'s) and `c` is `a`'s type or f32.
    fn types_ok(&self, p: &Product, c: DType) -> bool {
        let (a, b) = (self.g.dtype(p.a), self.g.dtype(p.b));
        (a == b || b == DType::F32) && (c == a || c == DType::F32)
    }

    /// Replaces node `n` (keeping its outputs) and updates the reader counts.
    fn rewrite(&mut self, n: usize, op: Op, inputs: Vec<TensorId>) {
        let old = std::mem::take(&mut self.g.nodes[n].inputs);
        for t in old {
            self.read(t, -1);
        }
        for &t in &inputs {
            self.read(t, 1);
        }
        let outputs = self.g.nodes[n].outputs.clone();
        self.g.nodes[n] = Node { op, inputs, outputs };
    }

    /// `scale(x, f)` read only as product operands: fold `f` into every reader.
    fn scaled_operand(&mut self, n: usize, stats: &mut FuseStats) {
        let Op::Scale { factor } = self.g.nodes[n].op else {
            return;
        };
        let (x, s) = (self.g.nodes[n].inputs[0], self.g.nodes[n].outputs[0]);
        if self.keep.contains(&s) || self.readers[s.idx()] == 0 {
            return;
        }
        let readers: Vec<usize> = (n + 1..self.g.nodes.len())
            .filter(|&k| self.g.nodes[k].inputs.contains(&s))
            .collect();
        let operand_only = readers.iter().all(|&k| {
            let node = &self.g.nodes[k];
            let slots = node.inputs.iter().filter(|&&t| t == s).count();
            let in_ab = node.inputs.iter().take(2).filter(|&&t| t == s).count();
            slots == in_ab
                && matches!(
                    node.op,
                    Op::MatMul { .. } | Op::MatMulFused { .. } | Op::MatMulAccumulate { .. }
                )
        });
        if !operand_only || !readers.iter().all(|&k| self.unchanged(x, n, k)) {
            return;
        }
        for k in readers {
            let node = self.g.nodes[k].clone();
            let times = node.inputs.iter().take(2).filter(|&&t| t == s).count() as i32;
            let f = factor.powi(times);
            let op = match node.op {
                Op::MatMul { trans_a, trans_b } => Op::MatMulFused {
                    trans_a,
                    trans_b,
                    alpha: f,
                    add: false,
                },
                Op::MatMulFused {
                    trans_a,
                    trans_b,
                    alpha,
                    add,
                } => Op::MatMulFused {
                    trans_a,
                    trans_b,
                    alpha: alpha * f,
                    add,
                },
                Op::MatMulAccumulate {
                    trans_a,
                    trans_b,
                    alpha,
                } => Op::MatMulAccumulate {
                    trans_a,
                    trans_b,
                    alpha: alpha * f,
                },
                _ => unreachable!("checked above"),
            };
            let inputs = node.inputs.iter().map(|&t| if t == s { x } else { t }).collect();
            self.rewrite(k, op, inputs);
            stats.scaled_operands += 1;
        }
    }

    /// `scale(P, f)` of a private product: one product with `alpha * f`.
    fn scaled_product(&mut self, n: usize, stats: &mut FuseStats) {
        let Op::Scale { factor } = self.g.nodes[n].op else {
            return;
        };
        let q = self.g.nodes[n].inputs[0];
        let Some(p) = self.product(q, n) else { return };
        if !self.private(q) || !self.types_ok(&p, self.g.dtype(q)) {
            return;
        }
        let op = Op::MatMulFused {
            trans_a: p.trans_a,
            trans_b: p.trans_b,
            alpha: p.alpha * factor,
            add: false,
        };
        self.rewrite(n, op, vec![p.a, p.b]);
        stats.scaled_products += 1;
    }

    /// The operands and output of node `n` when it adds two distinct tensors of its shape.
    fn same_shape_add(&self, n: usize) -> Option<(TensorId, TensorId, TensorId)> {
        let node = &self.g.nodes[n];
        if node.op != Op::Add {
            return None;
        }
        let (x0, x1, y) = (node.inputs[0], node.inputs[1], node.outputs[0]);
        let same = self.g.shape(x0) == self.g.shape(x1) && self.g.shape(x0) == self.g.shape(y);
        (x0 != x1 && same).then_some((x0, x1, y))
    }

    /// `add(c, P)` or `add(P, c)` with `c` of the product's shape: `alpha P + c`.
    fn added_product(&mut self, n: usize, stats: &mut FuseStats) {
        let Some((x0, x1, _)) = self.same_shape_add(n) else {
            return;
        };
        let fusable = |pass: &Self, q: TensorId, c: TensorId| {
            let p = pass.product(q, n)?;
            let ok = pass.private(q) && pass.types_ok(&p, pass.g.dtype(c)) && p.a != c && p.b != c;
            ok.then_some(p)
        };
        let inner = |pass: &Self, p: &Product| {
            crate::ops::matmul::dims(pass.g.shape(p.a), pass.g.shape(p.b), p.trans_a, p.trans_b).map_or(0, |d| d.k)
        };
        let mut order = [(x1, x0), (x0, x1)];
        if let (Some(p1), Some(p0)) = (fusable(self, x1, x0), fusable(self, x0, x1)) {
            if inner(self, &p0) > inner(self, &p1) {
                order.swap(0, 1);
            }
        }
        for (q, c) in order {
            let Some(p) = fusable(self, q, c) else { continue };
            let op = Op::MatMulFused {
                trans_a: p.trans_a,
                trans_b: p.trans_b,
                alpha: p.alpha,
                add: true,
            };
            self.rewrite(n, op, vec![p.a, p.b, c]);
            stats.added_products += 1;
            return;
        }
    }

    /// `add(c, Q)` or `add(Q, c)` with `Q = alpha P + d` and `d` a private product: the
    /// product of `d` adds `c`, and the add becomes `Q`.
    fn added_product_sum(&mut self, n: usize, stats: &mut FuseStats) {
        let Some((x0, x1, _)) = self.same_shape_add(n) else {
            return;
        };
        for (q, c) in [(x1, x0), (x0, x1)] {
            let Some(qn) = self.g.producer[q.idx()] else { continue };
            let Op::MatMulFused {
                trans_a,
                trans_b,
                alpha,
                add: true,
            } = self.g.node(qn).op
            else {
                continue;
            };
            let (a, b, d) = {
                let i = &self.g.node(qn).inputs;
                (i[0], i[1], i[2])
            };
            let Some(dn) = self.g.producer[d.idx()] else { continue };
            let Some(pd) = self.product(d, qn.idx()) else { continue };
            // `c` must exist, and hold its value at `n`, where `d` is computed.
            let c_ready = self.g.producer[c.idx()].is_none_or(|cn| cn.idx() < dn.idx());
            let fits = self.private(q)
                && self.private(d)
                && c_ready
                && self.unchanged(c, dn.idx(), n)
                && [a, b].iter().all(|&t| self.unchanged(t, qn.idx(), n))
                && self.unchanged(pd.a, dn.idx(), n)
                && self.unchanged(pd.b, dn.idx(), n)
                && self.g.dtype(c) == self.g.dtype(d)
                && self.g.dtype(q) == self.g.dtype(d)
                && ![pd.a, pd.b, a, b].contains(&c);
            if !fits {
                continue;
            }
            let inner = Op::MatMulFused {
                trans_a: pd.trans_a,
                trans_b: pd.trans_b,
                alpha: pd.alpha,
                add: true,
            };
            self.rewrite(dn.idx(), inner, vec![pd.a, pd.b, c]);
            let outer = Op::MatMulFused {
                trans_a,
                trans_b,
                alpha,
                add: true,
            };
            self.rewrite(n, outer, vec![a, b, d]);
            stats.added_product_sums += 1;
            return;
        }
    }

    /// `add(c, dx)` or `add(dx, c)` of a private RMSNorm input gradient: one backward that
    /// adds `c`.
    fn added_norm_gradient(&mut self, n: usize, stats: &mut FuseStats) {
        let Some((x0, x1, y)) = self.same_shape_add(n) else {
            return;
        };
        for (q, c) in [(x1, x0), (x0, x1)] {
            let Some(pn) = self.g.producer[q.idx()] else { continue };
            let node = self.g.node(pn);
            let Op::RmsNormBackward {
                eps,
                weight_grad: false,
                add: false,
            } = node.op
            else {
                continue;
            };
            let inputs = node.inputs.clone();
            let fits = self.private(q)
                && self.g.dtype(q) == self.g.dtype(y)
                && inputs.iter().all(|&t| self.unchanged(t, pn.idx(), n));
            if !fits {
                continue;
            }
            let op = Op::RmsNormBackward {
                eps,
                weight_grad: false,
                add: true,
            };
            self.rewrite(n, op, inputs.into_iter().chain([c]).collect());
            stats.added_norm_gradients += 1;
            return;
        }
    }

    /// `rope(dq)` of a private `dq` from an [`Op::AttentionBackward`]: that node becomes
    /// [`Op::AttentionBackwardRope`] (its `dq` output now holds the rotated gradient) and the
    /// RoPE node a reshape of it, so the rotation's output keeps its id.
    fn roped_dq(&mut self, n: usize, stats: &mut FuseStats) {
        let Op::Rope {
            head_dim,
            inverse,
            scale,
        } = self.g.nodes[n].op
        else {
            return;
        };
        if !self.opts.roped_dq {
            return;
        }
        let (dq, pos, inv_freq) = {
            let i = &self.g.nodes[n].inputs;
            (i[0], i[1], i[2])
        };
        let Some(m) = self.g.producer[dq.idx()].map(|m| m.idx()) else {
            return;
        };
        let node = &self.g.nodes[m];
        let Op::AttentionBackward(attn) = &node.op else {
            return;
        };
        let ready = |t: TensorId| self.g.producer[t.idx()].is_none_or(|p| p.idx() < m) && self.unchanged(t, m, n);
        let fits = node.outputs[0] == dq && attn.head_dim == head_dim && self.private(dq);
        if !(fits && ready(pos) && ready(inv_freq) && self.run_together(m, n)) {
            return;
        }
        let op = Op::AttentionBackwardRope {
            attn: attn.clone(),
            inverse,
            scale,
        };
        let inputs = node.inputs.iter().copied().chain([pos, inv_freq]).collect();
        self.rewrite(m, op, inputs);
        let shape = self.g.shape(dq).to_vec();
        self.rewrite(n, Op::Reshape { shape }, vec![dq]);
        stats.roped_dq += 1;
    }

    /// `cross_entropy_backward(logits, labels, lse, dloss)` of a `cross_entropy(logits,
    /// labels)` whose logits nothing else reads, with `dloss` ready before it: the forward
    /// node becomes [`Op::CrossEntropyWithGrad`], which also produces `dlogits` (over the
    /// logits' buffer), and the backward node is left merged.
    fn cross_entropy_with_grad(&mut self, n: usize, stats: &mut FuseStats) {
        let Op::CrossEntropyBackward { ignore_index } = self.g.nodes[n].op else {
            return;
        };
        if !self.opts.cross_entropy_with_grad {
            return;
        }
        let (logits, labels, lse, dloss) = {
            let i = &self.g.nodes[n].inputs;
            (i[0], i[1], i[2], i[3])
        };
        let dlogits = self.g.nodes[n].outputs[0];
        let Some(m) = self.g.producer[lse.idx()].map(|m| m.idx()) else {
            return;
        };
        let fwd = &self.g.nodes[m];
        let same =
            fwd.op == (Op::CrossEntropy { ignore_index }) && fwd.inputs == [logits, labels] && fwd.outputs[2] == lse;
        // The logits own their buffer (a computed tensor, not a view of another's), nothing
        // writes them in place, and no other reader runs in a program with the two (an eval
        // program that needs only the loss has a forward of its own).
        let owned = self.g.producer[logits.idx()].is_some() && self.g.alias_producer(logits).is_none();
        let others_apart = (0..self.g.nodes.len())
            .filter(|&r| r != m && r != n && self.g.nodes[r].inputs.contains(&logits))
            .all(|r| !self.programs.is_empty() && self.programs.iter().all(|p| !(p.contains(&r) && p.contains(&m))));
        let logits_free = owned && others_apart && !self.keep.contains(&logits) && !self.writers.contains_key(&logits);
        let dloss_ready = self.g.producer[dloss.idx()].is_none_or(|p| p.idx() < m) && self.unchanged(dloss, m, n);
        if !(same && self.run_together(m, n) && logits_free && dloss_ready && self.unchanged(labels, m, n)) {
            return;
        }
        self.rewrite(
            m,
            Op::CrossEntropyWithGrad { ignore_index },
            vec![logits, labels, dloss],
        );
        self.g.nodes[m].outputs.push(dlogits);
        self.g.producer[dlogits.idx()] = Some(NodeId(m as u32));
        self.rewrite(n, Op::Merged, vec![]);
        self.g.nodes[n].outputs.clear();
        self.writers.entry(logits).or_default().push(m);
        stats.cross_entropy_with_grad += 1;
    }

    /// For a SwiGLU input `t = alpha P + d` with `d = a u b^T` a private rank-r product in
    /// `t`'s 16-bit type: the base product's node, its operands, and `(u, b, a)`.
    fn low_rank_input(&self, t: TensorId, at: usize) -> Option<(usize, Product, (TensorId, TensorId, f64))> {
        let tn = self.g.producer[t.idx()]?;
        let node = self.g.node(tn);
        let Op::MatMulFused {
            trans_a,
            trans_b,
            alpha,
            add: true,
        } = node.op
        else {
            return None;
        };
        let (x, w, d) = (node.inputs[0], node.inputs[1], node.inputs[2]);
        let dn = self.g.producer[d.idx()]?;
        let pd = self.product(d, tn.idx())?;
        let dt = self.g.dtype(t);
        let (ts, us, bs) = (self.g.shape(t), self.g.shape(pd.a), self.g.shape(pd.b));
        let shapes =
            ts.len() == 2 && us.len() == 2 && bs.len() == 2 && us[0] == ts[0] && bs[0] == ts[1] && us[1] == bs[1];
        let fits = matches!(dt, DType::BF16 | DType::F16)
            && self.private(d)
            && !pd.trans_a
            && pd.trans_b
            && shapes
            && self.g.dtype(pd.a) == dt
            && (self.g.dtype(pd.b) == DType::F32 || self.g.dtype(pd.b) == dt);
        let stable = [x, w].iter().all(|&v| self.unchanged(v, tn.idx(), at))
            && [pd.a, pd.b].iter().all(|&v| self.unchanged(v, dn.idx(), at));
        let base = Product {
            a: x,
            b: w,
            trans_a,
            trans_b,
            alpha,
        };
        (fits && stable).then_some((tn.idx(), base, (pd.a, pd.b, pd.alpha)))
    }

    /// `swiglu(G + cg, U + cu)` and its backwards: [`Op::SwigluLowRank`] and
    /// [`Op::SwigluLowRankBackward`] over the base products and the rank-r factors.
    fn low_rank_swiglu(&mut self, n: usize, stats: &mut FuseStats) {
        if self.g.nodes[n].op != Op::Swiglu || !self.opts.low_rank_swiglu {
            return;
        }
        let (gate, up) = (self.g.nodes[n].inputs[0], self.g.nodes[n].inputs[1]);
        if gate == up || self.keep.contains(&gate) || self.keep.contains(&up) {
            return;
        }
        // Every other reader must be a backward of this SwiGLU.
        let backwards: Vec<usize> = (n + 1..self.g.nodes.len())
            .filter(|&k| self.g.nodes[k].inputs.iter().any(|&t| t == gate || t == up))
            .collect();
        let only_backwards = backwards.iter().all(|&k| {
            let node = &self.g.nodes[k];
            node.op == Op::SwigluBackward && node.inputs[..2] == [gate, up]
        });
        let reads = 1 + backwards.len();
        if !only_backwards || self.readers[gate.idx()] != reads || self.readers[up.idx()] != reads {
            return;
        }
        let last = backwards.last().copied().unwrap_or(n);
        let (Some((gn, gb, fg)), Some((un, ub, fu))) = (self.low_rank_input(gate, last), self.low_rank_input(up, last))
        else {
            return;
        };
        if self.g.shape(fg.0)[1] != self.g.shape(fu.0)[1] {
            return;
        }
        for (node, base) in [(gn, gb), (un, ub)] {
            let op = Op::MatMulFused {
                trans_a: base.trans_a,
                trans_b: base.trans_b,
                alpha: base.alpha,
                add: false,
            };
            self.rewrite(node, op, vec![base.a, base.b]);
        }
        let factors = [fg.0, fg.1, fu.0, fu.1];
        let (alpha_gate, alpha_up) = (fg.2, fu.2);
        self.rewrite(
            n,
            Op::SwigluLowRank { alpha_gate, alpha_up },
            [gate, up].into_iter().chain(factors).collect(),
        );
        for k in backwards {
            let dy = self.g.nodes[k].inputs[2];
            self.rewrite(
                k,
                Op::SwigluLowRankBackward { alpha_gate, alpha_up },
                [gate, up, dy].into_iter().chain(factors).collect(),
            );
        }
        stats.low_rank_swiglus += 1;
    }

    /// `accumulate_grad(acc, P)` or `accumulate_grad(acc, cast(P))`: `acc += alpha P`.
    fn accumulated_product(&mut self, n: usize, stats: &mut FuseStats) {
        if self.g.nodes[n].op != Op::AccumulateGrad {
            return;
        }
        let (acc, grad) = (self.g.nodes[n].inputs[0], self.g.nodes[n].inputs[1]);
        let mut q = grad;
        if let Some(pn) = self.g.producer[grad.idx()] {
            if matches!(self.g.node(pn).op, Op::Cast { .. }) && self.private(grad) {
                q = self.g.node(pn).inputs[0];
            }
        }
        let Some(p) = self.product(q, n) else { return };
        if !self.private(q) || !self.private(grad) || !self.types_ok(&p, self.g.dtype(acc)) {
            return;
        }
        if self.g.shape(q) != self.g.shape(acc) {
            return;
        }
        let op = Op::MatMulAccumulate {
            trans_a: p.trans_a,
            trans_b: p.trans_b,
            alpha: p.alpha,
        };
        self.rewrite(n, op, vec![p.a, p.b, acc]);
        stats.accumulated_products += 1;
    }

    /// `acc += alpha dy^T u` (`acc [f, r]`, `r < f`) with an earlier `du = alpha dy b` (`b [f, r]`):
    /// one [`Op::LowRankGrads`] where `du` was, when nothing reads or writes `acc` in between
    /// and `u` already holds its value there.
    fn low_rank_grads(&mut self, n: usize, stats: &mut FuseStats) {
        let Op::MatMulAccumulate {
            trans_a: true,
            trans_b: false,
            alpha,
        } = self.g.nodes[n].op
        else {
            return;
        };
        if !self.opts.low_rank_grads {
            return;
        }
        let (dy, u, acc) = {
            let i = &self.g.nodes[n].inputs;
            (i[0], i[1], i[2])
        };
        let (ds, us) = (self.g.shape(dy), self.g.shape(u));
        // Rank r below the features of dy: `u` is the narrow factor.
        if ds.len() != 2 || us.len() != 2 || us[1] >= ds[1] || self.g.dtype(u) != self.g.dtype(dy) {
            return;
        }
        let fr = [ds[1], us[1]];
        // The latest live product `alpha dy b` with `b [f, r]` (a product taken into a later
        // node by another rewrite is no longer read).
        let du_product = |k: usize| {
            let t = *self.g.nodes[k].outputs.first()?;
            let p = self.product(t, n)?;
            let live = self.readers[t.idx()] > 0 || self.keep.contains(&t);
            let fits = p.a == dy && !p.trans_a && !p.trans_b && p.alpha == alpha && self.g.shape(p.b) == fr;
            (live && fits && self.g.producer[t.idx()]?.idx() == k).then_some(p.b)
        };
        let Some((m, b)) = (0..n).rev().find_map(|k| du_product(k).map(|b| (k, b))) else {
            return;
        };
        let untouched = (m + 1..n).all(|k| !self.g.nodes[k].inputs.contains(&acc));
        let u_ready = self.g.producer[u.idx()].is_none_or(|un| un.idx() < m) && self.unchanged(u, m, n);
        let acc_ready = self.g.producer[acc.idx()].is_none_or(|an| an.idx() < m);
        if !(untouched && u_ready && acc_ready) {
            return;
        }
        self.rewrite(m, Op::LowRankGrads { alpha }, vec![dy, u, b, acc]);
        self.rewrite(n, Op::Merged, vec![]);
        let w = self.writers.entry(acc).or_default();
        w.retain(|&k| k != n);
        w.push(m);
        stats.low_rank_grads += 1;
    }
}

/// Applies the rewrites above to every node of `g`, in order. `keep` holds the tensors
/// that must stay computed (the outputs programs read back).
pub fn matmul_epilogues(g: &mut Graph, keep: &HashSet<TensorId>, opts: FuseOptions) -> FuseStats {
    matmul_epilogues_in(g, keep, &[], opts)
}

/// [`matmul_epilogues`] for a graph whose programs run the given node sets (indices into
/// `g.nodes`): a rewrite that makes one node do another's work applies only where every
/// program that runs one runs both.
pub fn matmul_epilogues_in(
    g: &mut Graph,
    keep: &HashSet<TensorId>,
    programs: &[HashSet<usize>],
    opts: FuseOptions,
) -> FuseStats {
    let mut readers = vec![0usize; g.tensors.len()];
    for node in &g.nodes {
        for &t in &node.inputs {
            readers[t.idx()] += 1;
        }
    }
    let mut writers: HashMap<TensorId, Vec<usize>> = HashMap::new();
    for (k, node) in g.nodes.iter().enumerate() {
        for &w in node.op.writes() {
            writers.entry(node.inputs[w]).or_default().push(k);
        }
    }
    let mut pass = Pass {
        g,
        opts,
        readers,
        keep,
        programs,
        writers,
    };
    let mut stats = FuseStats::default();
    for n in 0..pass.g.nodes.len() {
        pass.scaled_product(n, &mut stats);
        pass.scaled_operand(n, &mut stats);
        pass.added_product(n, &mut stats);
        pass.added_product_sum(n, &mut stats);
        pass.accumulated_product(n, &mut stats);
        pass.low_rank_grads(n, &mut stats);
        pass.added_norm_gradient(n, &mut stats);
        pass.low_rank_swiglu(n, &mut stats);
        pass.roped_dq(n, &mut stats);
        pass.cross_entropy_with_grad(n, &mut stats);
    }
    stats
}
