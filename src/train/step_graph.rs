//! Turns a model's forward graph into a training step: the backward pass (seeded with
//! `1 / label tokens of the optimizer step`, so the gradient is that of the mean loss
//! however the step is split into micro-batches), gradient accumulators, the global
//! gradient norm with clipping, and AdamW. Three programs share one executor:
//! `train` (forward, backward, accumulate), `optimizer` (clip and update), `eval`.

use crate::exec::ProgramSpec;
use crate::graph::{self, NodeId, TensorId};
use crate::model::llama::ModelGraph;
use crate::ops::{AdamWSpec, Op};
use crate::tensor::DType;
use crate::Result;

#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerOptions {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for OptimizerOptions {
    /// Hugging Face `TrainingArguments` defaults.
    fn default() -> Self {
        OptimizerOptions {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
        }
    }
}

/// One trainable tensor and its optimizer state.
#[derive(Clone, Debug)]
pub struct ParamState {
    pub param: TensorId,
    pub grad_acc: TensorId,
    pub exp_avg: TensorId,
    pub exp_avg_sq: TensorId,
}

pub struct TrainGraph {
    pub model: ModelGraph,
    /// `[1]`: the backward seed, `1 / label tokens in the optimizer step`.
    pub loss_scale: TensorId,
    /// `[3]` f32: `[lr, 1 - beta1^t, sqrt(1 - beta2^t)]`.
    pub hyper: TensorId,
    /// The tensors this rank updates (all trainable tensors unless the optimizer is sharded).
    pub params: Vec<ParamState>,
    /// The gradient accumulator of every trainable tensor, in `model.trainable` order.
    pub grad_accs: Vec<TensorId>,
    pub grad_norm: TensorId,
    /// Sharded optimizer: `[1]` input, the sum of squared gradients over all ranks.
    pub global_sumsq: Option<TensorId>,
    /// Sharded optimizer: this rank's sum of squared gradients (`None` when it owns nothing).
    pub local_sumsq: Option<TensorId>,
    micro_effects: Vec<NodeId>,
    opt_effects: Vec<NodeId>,
}

pub const TRAIN: &str = "train";
pub const OPTIMIZER: &str = "optimizer";
pub const EVAL: &str = "eval";
/// Sharded optimizer only: the local sum of squared gradients.
pub const GRAD_SUMSQ: &str = "grad_sumsq";

/// Hugging Face's Trainer does not decay biases and norm weights.
fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}

impl TrainGraph {
    pub fn new(model: ModelGraph, opt: &OptimizerOptions) -> Result<Self> {
        Self::build(model, opt, None)
    }

    /// A step whose optimizer updates only the trainable tensors marked in `owned` (in
    /// `model.trainable` order) and has state only for them; the gradient norm's sum of
    /// squares comes in from the host, summed over ranks (ZeRO).
    pub fn new_sharded(model: ModelGraph, opt: &OptimizerOptions, owned: &[bool]) -> Result<Self> {
        if owned.len() != model.trainable.len() {
            return Err(crate::msg!(
                "sharded optimizer: {} ownership flags for {} trainable tensors",
                owned.len(),
                model.trainable.len()
            ));
        }
        Self::build(model, opt, Some(owned))
    }

    fn build(mut model: ModelGraph, opt: &OptimizerOptions, owned: Option<&[bool]>) -> Result<Self> {
        let g = &mut model.graph;
        let act = g.dtype(model.loss_sum);
        let loss_scale = g.input("loss_scale", &[1], act);
        let trainable = model.trainable.clone();
        let grads = graph::backward(g, model.loss_sum, loss_scale, &trainable)?;
        let mut params = Vec::new();
        let mut grad_accs = Vec::new();
        let mut micro_effects = Vec::new();
        for (i, &p) in trainable.iter().enumerate() {
            let Some(&grad) = grads.get(&p) else {
                return Err(crate::msg!("{} does not influence the loss", g.info(p).name));
            };
            let (shape, dt, name) = (g.shape(p).to_vec(), g.dtype(p), g.info(p).name.clone());
            let grad_acc = g.state(&format!("{name}.grad"), &shape, dt);
            g.apply(Op::AccumulateGrad, &[grad_acc, grad])?;
            micro_effects.push(NodeId(g.nodes.len() as u32 - 1));
            grad_accs.push(grad_acc);
            if owned.is_some_and(|o| !o[i]) {
                continue;
            }
            let exp_avg = g.state(&format!("{name}.exp_avg"), &shape, dt);
            let exp_avg_sq = g.state(&format!("{name}.exp_avg_sq"), &shape, dt);
            params.push(ParamState {
                param: p,
                grad_acc,
                exp_avg,
                exp_avg_sq,
            });
        }
        let accs: Vec<TensorId> = params.iter().map(|s| s.grad_acc).collect();
        let (sumsq, global_sumsq, local_sumsq) = if owned.is_some() {
            let dt = if grad_accs.iter().any(|&t| g.dtype(t) == DType::F64) {
                DType::F64
            } else {
                DType::F32
            };
            let local = if accs.is_empty() {
                None
            } else {
                Some(g.apply1(Op::SumSquares, &accs)?)
            };
            let global = g.input("global_grad_sumsq", &[1], dt);
            (global, Some(global), local)
        } else {
            let s = g.apply1(Op::SumSquares, &accs)?;
            (s, None, None)
        };
        let max_norm = opt.max_grad_norm.filter(|m| *m > 0.0).unwrap_or(f64::INFINITY);
        let nc = g.apply(Op::ClipCoef { max_norm }, &[sumsq])?;
        let hyper = g.input("optimizer_hyper", &[3], DType::F32);
        let mut opt_effects = Vec::new();
        for s in &params {
            let wd = if decays(&g.info(s.param).name) {
                opt.weight_decay
            } else {
                0.0
            };
            let spec = AdamWSpec {
                beta1: opt.beta1,
                beta2: opt.beta2,
                eps: opt.eps,
                weight_decay: wd,
            };
            g.apply(
                Op::AdamW(spec),
                &[s.param, s.grad_acc, s.exp_avg, s.exp_avg_sq, hyper, nc[1]],
            )?;
            opt_effects.push(NodeId(g.nodes.len() as u32 - 1));
        }
        Ok(TrainGraph {
            model,
            loss_scale,
            hyper,
            params,
            grad_accs,
            grad_norm: nc[0],
            global_sumsq,
            local_sumsq,
            micro_effects,
            opt_effects,
        })
    }

    pub fn programs(&self) -> Vec<ProgramSpec> {
        let m = &self.model;
        let mut v = vec![
            ProgramSpec::new(TRAIN, &[m.loss_sum, m.label_count], &self.micro_effects),
            ProgramSpec::new(OPTIMIZER, &[self.grad_norm], &self.opt_effects),
            ProgramSpec::new(EVAL, &[m.loss_sum, m.label_count], &[]),
        ];
        if let Some(s) = self.local_sumsq {
            v.push(ProgramSpec::new(GRAD_SUMSQ, &[s], &[]));
        }
        v
    }

    /// The per-step scalars of AdamW at step `t` (1-based).
    pub fn hyper_values(opt: &OptimizerOptions, lr: f64, t: u64) -> [f32; 3] {
        let bc1 = 1.0 - opt.beta1.powi(t as i32);
        let bc2 = 1.0 - opt.beta2.powi(t as i32);
        [lr as f32, bc1 as f32, bc2.sqrt() as f32]
    }
}
