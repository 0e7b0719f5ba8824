//! Typed helpers over [`Graph::apply`] that model code reads naturally.

use super::{Graph, Role, TensorId};
use crate::ops::{AttnSpec, Op};
use crate::tensor::DType;
use crate::Result;

impl Graph {
    pub fn input(&mut self, name: &str, shape: &[usize], dtype: DType) -> TensorId {
        self.leaf(name, shape, dtype, Role::Input)
    }
    pub fn parameter(&mut self, name: &str, shape: &[usize], dtype: DType) -> TensorId {
        self.leaf(name, shape, dtype, Role::Parameter)
    }
    pub fn frozen(&mut self, name: &str, shape: &[usize], dtype: DType) -> TensorId {
        self.leaf(name, shape, dtype, Role::Frozen)
    }
    pub fn constant(&mut self, name: &str, shape: &[usize], dtype: DType) -> TensorId {
        self.leaf(name, shape, dtype, Role::Constant)
    }
    pub fn state(&mut self, name: &str, shape: &[usize], dtype: DType) -> TensorId {
        self.leaf(name, shape, dtype, Role::OptimizerState)
    }

    pub fn matmul(&mut self, a: TensorId, b: TensorId, trans_a: bool, trans_b: bool) -> Result<TensorId> {
        self.apply1(Op::MatMul { trans_a, trans_b }, &[a, b])
    }
    /// `x @ W^T` for a weight stored `[out, in]`.
    pub fn linear(&mut self, x: TensorId, w: TensorId) -> Result<TensorId> {
        self.matmul(x, w, false, true)
    }
    /// LoRA (Hu et al. 2021) as PEFT computes it: `x W^T + s * (drop(x) A^T) B^T` with
    /// `A [r, in]`, `B [out, r]`.
    pub fn lora_linear(
        &mut self,
        x: TensorId,
        w: TensorId,
        a: TensorId,
        b: TensorId,
        scale: f64,
        dropout: Option<(TensorId, TensorId, u32)>,
    ) -> Result<TensorId> {
        let base = self.linear(x, w)?;
        let xd = match dropout {
            Some((seed, p, salt)) => self.apply1(Op::Dropout { salt }, &[x, seed, p])?,
            None => x,
        };
        let xa = self.linear(xd, a)?;
        let xab = self.linear(xa, b)?;
        let delta = self.scale(xab, scale)?;
        self.add(base, delta)
    }
    pub fn add(&mut self, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.apply1(Op::Add, &[a, b])
    }
    pub fn mul(&mut self, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.apply1(Op::Mul, &[a, b])
    }
    pub fn scale(&mut self, x: TensorId, factor: f64) -> Result<TensorId> {
        self.apply1(Op::Scale { factor }, &[x])
    }
    pub fn cast(&mut self, x: TensorId, dtype: DType) -> Result<TensorId> {
        if self.dtype(x) == dtype {
            return Ok(x);
        }
        self.apply1(Op::Cast { dtype }, &[x])
    }
    pub fn reshape(&mut self, x: TensorId, shape: &[usize]) -> Result<TensorId> {
        self.apply1(Op::Reshape { shape: shape.to_vec() }, &[x])
    }
    pub fn sum(&mut self, x: TensorId) -> Result<TensorId> {
        self.apply1(Op::ReduceSum { shape: vec![1] }, &[x])
    }
    pub fn embedding(&mut self, table: TensorId, ids: TensorId) -> Result<TensorId> {
        self.apply1(Op::Embedding, &[table, ids])
    }
    pub fn rms_norm(&mut self, x: TensorId, w: TensorId, eps: f64) -> Result<TensorId> {
        self.apply1(Op::RmsNorm { eps }, &[x, w])
    }
    pub fn rope(
        &mut self,
        x: TensorId,
        pos: TensorId,
        inv_freq: TensorId,
        head_dim: usize,
        scale: f64,
    ) -> Result<TensorId> {
        self.apply1(
            Op::Rope {
                head_dim,
                inverse: false,
                scale,
            },
            &[x, pos, inv_freq],
        )
    }
    pub fn swiglu(&mut self, gate: TensorId, up: TensorId) -> Result<TensorId> {
        self.apply1(Op::Swiglu, &[gate, up])
    }
    /// Returns `(output, lse)`.
    pub fn attention(
        &mut self,
        spec: AttnSpec,
        q: TensorId,
        k: TensorId,
        v: TensorId,
        seg: TensorId,
    ) -> Result<(TensorId, TensorId)> {
        let o = self.apply(Op::Attention(spec), &[q, k, v, seg])?;
        Ok((o[0], o[1]))
    }
    /// Returns `(loss_sum, label_count)`.
    pub fn cross_entropy(&mut self, logits: TensorId, labels: TensorId) -> Result<(TensorId, TensorId)> {
        let o = self.apply(Op::CrossEntropy { ignore_index: -100 }, &[logits, labels])?;
        Ok((o[0], o[1]))
    }
}
