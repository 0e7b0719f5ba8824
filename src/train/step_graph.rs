//! Turns a model's forward graph into a training step: the backward pass (seeded with
//! `1 / label tokens of the optimizer step`, so the gradient is that of the mean loss
//! however the step is split into micro-batches), gradient accumulators, the global
//! gradient norm with clipping, and AdamW. Three programs share one executor:
//! `train` (forward, backward, accumulate), `optimizer` (clip and update), `eval`.

use super::shard_graph;
use crate::dist::{ShardCall, ShardLayout, ShardSpec, Stage};
use crate::exec::ProgramSpec;
use crate::graph::{self, Graph, NodeId, TensorId};
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

/// One trainable tensor (or this rank's slice of it) and its optimizer state.
#[derive(Clone, Debug)]
pub struct ParamState {
    /// The tensor's index in `model.trainable`.
    pub index: usize,
    /// What the update writes: the tensor, its slice (a view), or its persistent shard.
    pub param: TensorId,
    /// The accumulated gradient of `param` (a view of a full accumulator under ZeRO-1).
    pub grad_acc: TensorId,
    pub exp_avg: TensorId,
    pub exp_avg_sq: TensorId,
}

/// A frozen base weight held as this rank's slice (ZeRO-3).
#[derive(Clone, Debug)]
pub struct FrozenShard {
    /// The weight's name in the model's files.
    pub name: String,
    /// The full tensor (gathered before each use; not held between uses).
    pub tensor: TensorId,
    /// This rank's slice, `None` where it is empty.
    pub shard: Option<TensorId>,
    /// Its elements of the flattened weight.
    pub range: std::ops::Range<usize>,
}

pub struct TrainGraph {
    pub model: ModelGraph,
    /// `[1]`: the backward seed, `1 / label tokens in the optimizer step`.
    pub loss_scale: TensorId,
    /// `[3]` f32: `[lr, 1 - beta1^t, sqrt(1 - beta2^t)]`.
    pub hyper: TensorId,
    /// The tensors this rank updates (all trainable tensors unless the optimizer is sharded).
    pub params: Vec<ParamState>,
    /// The gradient accumulators this rank holds, in `model.trainable` order (full tensors,
    /// or under ZeRO-2 and 3 this rank's non-empty slices).
    pub grad_accs: Vec<TensorId>,
    pub grad_norm: TensorId,
    /// Sharded optimizer: `[1]` input, the sum of squared gradients over all ranks.
    pub global_sumsq: Option<TensorId>,
    /// Sharded optimizer: this rank's sum of squared gradients (`None` when it owns nothing).
    pub local_sumsq: Option<TensorId>,
    /// How the step is sharded (`None`: every rank holds everything).
    pub shard: Option<ShardSpec>,
    /// ZeRO-3: this rank's persistent slice of each trainable tensor (`None` where empty);
    /// empty otherwise.
    pub param_shards: Vec<Option<TensorId>>,
    /// ZeRO-3: this rank's slice of each floating-point frozen base weight; empty otherwise.
    pub frozen_shards: Vec<FrozenShard>,
    /// What the graph's host calls do (`Op::HostCall` ids index this).
    pub host_calls: Vec<ShardCall>,
    /// The eval program's loss sum and label count: the model's loss computed by a node of its
    /// own, so the training step's loss node may be fused with its backward
    /// (`graph::fuse`, `cross_entropy_with_grad`) without the eval program running it.
    pub eval_loss: (TensorId, TensorId),
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

    /// A step for one rank of a sharded run: its optimizer holds state for and updates only
    /// this rank's slices (the gradient norm's sum of squares comes in from the host, summed
    /// over ranks); under ZeRO-2 and 3 gradients are reduce-scattered into slice-sized
    /// accumulators after each micro-batch, and under ZeRO-3 parameters are sharded and
    /// gathered per layer (see [`super::shard_graph`]).
    pub fn new_sharded(model: ModelGraph, opt: &OptimizerOptions, spec: ShardSpec) -> Result<Self> {
        if spec.layout.tensors() != model.trainable.len() {
            return Err(crate::msg!(
                "sharded step: a layout of {} tensors for {} trainable tensors",
                spec.layout.tensors(),
                model.trainable.len()
            ));
        }
        if spec.stage == Stage::DataParallel {
            return Self::build(model, opt, None);
        }
        Self::build(model, opt, Some(spec))
    }

    fn build(mut model: ModelGraph, opt: &OptimizerOptions, shard: Option<ShardSpec>) -> Result<Self> {
        let g = &mut model.graph;
        let act = g.dtype(model.loss_sum);
        let loss_scale = g.input("loss_scale", &[1], act);
        let trainable = model.trainable.clone();
        let backward_start = g.nodes.len();
        let grads = graph::backward(g, model.loss_sum, loss_scale, &trainable)?;
        let grad_of: Vec<TensorId> = trainable
            .iter()
            .map(|p| {
                grads
                    .get(p)
                    .copied()
                    .ok_or_else(|| crate::msg!("{} does not influence the loss", g.info(*p).name))
            })
            .collect::<Result<_>>()?;
        let original = g.nodes.len();
        let stage = shard.as_ref().map_or(Stage::DataParallel, |s| s.stage);
        let mut micro_effects = Vec::new();
        let mut host = shard_graph::HostPlan::default();
        // Accumulators: full ones, or this rank's slices fed by gradient drains.
        let accs: Vec<Option<TensorId>> = match &shard {
            Some(s) if stage >= Stage::Zero2 => {
                shard_graph::drain_gradients(g, &trainable, &grad_of, &s.layout, &mut host, &mut micro_effects)?
            }
            _ => {
                let mut v = Vec::new();
                for (&p, &grad) in trainable.iter().zip(&grad_of) {
                    let (shape, dt, name) = (g.shape(p).to_vec(), g.dtype(p), g.info(p).name.clone());
                    let acc = g.state(&format!("{name}.grad"), &shape, dt);
                    g.apply(Op::AccumulateGrad, &[acc, grad])?;
                    micro_effects.push(NodeId(g.nodes.len() as u32 - 1));
                    v.push(Some(acc));
                }
                v
            }
        };
        let param_shards = match &shard {
            Some(s) if stage == Stage::Zero3 => shard_graph::gather_parameters(
                g,
                &trainable,
                backward_start..original,
                s.reshard_after_forward,
                &s.layout,
                shard_graph::Gathered::Trainable,
                &mut host,
            )?,
            _ => Vec::new(),
        };
        let frozen_shards = match &shard {
            Some(s) if stage == Stage::Zero3 => {
                // Floating-point frozen weights round-trip exactly through the f32 gathers.
                let frozen: Vec<(String, TensorId)> = model
                    .weights
                    .iter()
                    .filter(|(_, t)| {
                        g.info(*t).role == graph::Role::Frozen
                            && matches!(g.dtype(*t), DType::F32 | DType::F16 | DType::BF16)
                    })
                    .cloned()
                    .collect();
                let ids: Vec<TensorId> = frozen.iter().map(|(_, t)| *t).collect();
                let sizes: Vec<usize> = ids.iter().map(|&t| g.info(t).numel()).collect();
                let layout = ShardLayout::new(&sizes, s.layout.rank, s.layout.world);
                let shards = shard_graph::gather_parameters(
                    g,
                    &ids,
                    backward_start..original,
                    s.reshard_after_forward,
                    &layout,
                    shard_graph::Gathered::Frozen,
                    &mut host,
                )?;
                frozen
                    .into_iter()
                    .zip(shards)
                    .enumerate()
                    .map(|(i, ((name, tensor), shard))| FrozenShard {
                        name,
                        tensor,
                        shard,
                        range: layout.mine(i),
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        if !host.is_empty() {
            let moved = host.apply(g, original)?;
            micro_effects = micro_effects.iter().map(|n| moved[n.idx()]).collect();
        }

        // The optimizer: every tensor, or this rank's slices.
        let mut params = Vec::new();
        for (i, &p) in trainable.iter().enumerate() {
            let Some(acc) = accs[i] else { continue };
            let name = g.info(p).name.clone();
            let (param, grad_acc, shape) = match &shard {
                None => (p, acc, g.shape(p).to_vec()),
                Some(s) => {
                    let r = s.layout.mine(i);
                    if r.is_empty() {
                        continue;
                    }
                    let view = |g: &mut Graph, t: TensorId| {
                        g.apply1(
                            Op::View {
                                offset: r.start,
                                shape: vec![r.len()],
                            },
                            &[t],
                        )
                    };
                    let param = match param_shards.get(i) {
                        Some(&Some(sh)) => sh,
                        _ => view(g, p)?,
                    };
                    let grad_acc = if stage == Stage::Zero1 { view(g, acc)? } else { acc };
                    (param, grad_acc, vec![r.len()])
                }
            };
            let dt = g.dtype(p);
            let exp_avg = g.state(&format!("{name}.exp_avg"), &shape, dt);
            let exp_avg_sq = g.state(&format!("{name}.exp_avg_sq"), &shape, dt);
            params.push(ParamState {
                index: i,
                param,
                grad_acc,
                exp_avg,
                exp_avg_sq,
            });
        }
        let grad_accs: Vec<TensorId> = accs.iter().flatten().copied().collect();
        let owned: Vec<TensorId> = params.iter().map(|s| s.grad_acc).collect();
        let (sumsq, global_sumsq, local_sumsq) = if shard.is_some() {
            let dt = if grad_accs.iter().any(|&t| g.dtype(t) == DType::F64) {
                DType::F64
            } else {
                DType::F32
            };
            let local = if owned.is_empty() {
                None
            } else {
                Some(g.apply1(Op::SumSquares, &owned)?)
            };
            let global = g.input("global_grad_sumsq", &[1], dt);
            (global, Some(global), local)
        } else {
            let s = g.apply1(Op::SumSquares, &owned)?;
            (s, None, None)
        };
        let max_norm = opt.max_grad_norm.filter(|m| *m > 0.0).unwrap_or(f64::INFINITY);
        let nc = g.apply(Op::ClipCoef { max_norm }, &[sumsq])?;
        let hyper = g.input("optimizer_hyper", &[3], DType::F32);
        let mut opt_effects = Vec::new();
        for s in &params {
            let wd = if decays(&g.info(trainable[s.index]).name) {
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
        let loss_node = g
            .node(g.producer[model.loss_sum.idx()].expect("the loss is computed"))
            .clone();
        let eval = g.apply(loss_node.op, &loss_node.inputs)?;
        g.set_name(eval[0], "eval_loss_sum");
        g.set_name(eval[1], "eval_label_count");
        Ok(TrainGraph {
            eval_loss: (eval[0], eval[1]),
            model,
            loss_scale,
            hyper,
            params,
            grad_accs,
            grad_norm: nc[0],
            global_sumsq,
            local_sumsq,
            shard,
            param_shards,
            frozen_shards,
            host_calls: host.calls,
            micro_effects,
            opt_effects,
        })
    }

    /// Whether parameters are sharded (ZeRO-3): a rank holds only its slices.
    pub fn params_sharded(&self) -> bool {
        !self.param_shards.is_empty()
    }

    pub fn programs(&self) -> Vec<ProgramSpec> {
        let m = &self.model;
        let mut v = vec![
            ProgramSpec::new(TRAIN, &[m.loss_sum, m.label_count], &self.micro_effects),
            ProgramSpec::new(OPTIMIZER, &[self.grad_norm], &self.opt_effects),
            ProgramSpec::new(EVAL, &[self.eval_loss.0, self.eval_loss.1], &[]),
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
