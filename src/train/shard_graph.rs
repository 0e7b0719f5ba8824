//! The sharded parts of a step graph (ZeRO-2 and ZeRO-3), as host calls placed in the
//! schedule so the memory plan sees them:
//!
//! - gradient drains: once the last gradient of a group of trainable tensors (one decoder
//!   layer, or one tensor outside the layers) is computed, a host call reduce-scatters the
//!   group's gradients and the rank adds its slices into its slice-sized accumulators, so
//!   full gradients are transient and only the rank's slices persist;
//! - parameter gathers (ZeRO-3): each rank keeps only its slice of each trainable tensor; a
//!   host call all-gathers a group's full tensors just before the group is used, one group
//!   ahead (prefetch), and they are transient tensors freed after their last reader. With
//!   `reshard_after_forward` the backward pass gathers them again instead of keeping the
//!   forward's copies. Frozen base weights (16- and 32-bit floats) are sliced and gathered
//!   the same way, so a LoRA run's base model is spread over the ranks too.
//!
//! Host calls are appended to the graph and then moved to their places in the node order
//! (the executor schedules in index order), so every rank runs them, and their collectives,
//! in the same order.

use crate::dist::{ShardCall, ShardLayout};
use crate::graph::{Graph, NodeId, TensorId};
use crate::ops::Op;
use crate::Result;
use std::collections::BTreeMap;

/// The host calls added to a graph and where they go in the node order: before or after a
/// node of the original graph.
#[derive(Default)]
pub struct HostPlan {
    /// What each call does (`Op::HostCall` ids index this).
    pub calls: Vec<ShardCall>,
    before: BTreeMap<usize, Vec<NodeId>>,
    after: BTreeMap<usize, Vec<NodeId>>,
}

impl HostPlan {
    pub fn is_empty(&self) -> bool {
        self.before.is_empty() && self.after.is_empty()
    }

    /// Moves the placed nodes, keeping every other node's relative order (nodes appended
    /// but not placed stay at the end). Returns the new id of each old node.
    pub fn apply(&self, g: &mut Graph, original: usize) -> Result<Vec<NodeId>> {
        let placed: std::collections::HashSet<NodeId> = self
            .before
            .values()
            .chain(self.after.values())
            .flatten()
            .copied()
            .collect();
        let mut order = Vec::with_capacity(g.nodes.len());
        for n in 0..original {
            order.extend(self.before.get(&n).into_iter().flatten());
            order.push(NodeId(n as u32));
            order.extend(self.after.get(&n).into_iter().flatten());
        }
        order.extend(
            (original..g.nodes.len())
                .map(|n| NodeId(n as u32))
                .filter(|n| !placed.contains(n)),
        );
        g.reorder(&order)
    }
}

/// The group a trainable tensor is gathered and reduced with: its decoder layer
/// (`...layers.<i>....`), or the tensor itself.
pub fn group_key(name: &str) -> String {
    if let Some(at) = name.find("layers.") {
        let rest = &name[at + "layers.".len()..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if !digits.is_empty() {
            return format!("layers.{digits}");
        }
    }
    name.to_string()
}

/// Trainable tensor indices by group, in order of first appearance.
fn groups(g: &Graph, tensors: &[TensorId], keep: impl Fn(usize) -> bool) -> Vec<Vec<usize>> {
    let mut keys: Vec<String> = Vec::new();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, &t) in tensors.iter().enumerate() {
        if !keep(i) {
            continue;
        }
        let k = group_key(&g.info(t).name);
        match keys.iter().position(|x| *x == k) {
            Some(p) => out[p].push(i),
            None => {
                keys.push(k);
                out.push(vec![i]);
            }
        }
    }
    out
}

/// Gradient drains for every trainable tensor (`grads[i]` is the gradient of
/// `trainable[i]`). Returns this rank's accumulator of each tensor (`[slice]`, `None` where
/// its slice is empty); the drains and accumulations go into `effects`.
pub fn drain_gradients(
    g: &mut Graph,
    trainable: &[TensorId],
    grads: &[TensorId],
    layout: &ShardLayout,
    plan: &mut HostPlan,
    effects: &mut Vec<NodeId>,
) -> Result<Vec<Option<TensorId>>> {
    let mut accs = vec![None; trainable.len()];
    for group in groups(g, trainable, |_| true) {
        let last = group
            .iter()
            .map(|&i| g.producer[grads[i].idx()].map(|n| n.idx()))
            .collect::<Option<Vec<usize>>>()
            .and_then(|v| v.into_iter().max())
            .ok_or_else(|| {
                crate::msg!(
                    "drain: a gradient of {} is not computed",
                    g.info(trainable[group[0]]).name
                )
            })?;
        let kept: Vec<usize> = group.iter().copied().filter(|&i| !layout.mine(i).is_empty()).collect();
        let outputs = kept
            .iter()
            .map(|&i| (vec![layout.mine(i).len()], g.dtype(grads[i])))
            .collect();
        let id = plan.calls.len() as u32;
        plan.calls.push(ShardCall::ReduceScatter(group.clone()));
        let inputs: Vec<TensorId> = group.iter().map(|&i| grads[i]).collect();
        let reduced = g.apply(Op::HostCall { id, outputs }, &inputs)?;
        let mut nodes = vec![NodeId(g.nodes.len() as u32 - 1)];
        for (&i, r) in kept.iter().zip(reduced) {
            let name = g.info(trainable[i]).name.clone();
            let acc = g.state(&format!("{name}.grad"), &[layout.mine(i).len()], g.dtype(grads[i]));
            g.apply(Op::AccumulateGrad, &[acc, r])?;
            nodes.push(NodeId(g.nodes.len() as u32 - 1));
            accs[i] = Some(acc);
        }
        effects.extend(&nodes);
        plan.after.entry(last).or_default().extend(nodes);
    }
    Ok(accs)
}

/// What a ZeRO-3 gather holds sliced.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Gathered {
    /// Trainable tensors: the slices are parameters the optimizer updates.
    Trainable,
    /// Frozen base weights: the slices are frozen too.
    Frozen,
}

/// Parameter gathers (ZeRO-3) for the nodes of `g` up to the end of the backward pass
/// (`backward`, the nodes autodiff appended). Each of `tensors` (the ones `layout` slices,
/// trainable or frozen as `kind` says) becomes a persistent slice (`<name>.shard`,
/// returned; `None` where this rank's slice is empty); its readers read gathered copies
/// instead.
pub fn gather_parameters(
    g: &mut Graph,
    tensors: &[TensorId],
    backward: std::ops::Range<usize>,
    reshard_after_forward: bool,
    layout: &ShardLayout,
    kind: Gathered,
    plan: &mut HostPlan,
) -> Result<Vec<Option<TensorId>>> {
    let (original, backward_start) = (backward.end, backward.start);
    let shards: Vec<Option<TensorId>> = tensors
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let n = layout.mine(i).len();
            (n > 0).then(|| {
                let (name, dt) = (format!("{}.shard", g.info(t).name), g.dtype(t));
                match kind {
                    Gathered::Trainable => g.parameter(&name, &[n], dt),
                    Gathered::Frozen => g.frozen(&name, &[n], dt),
                }
            })
        })
        .collect();
    // Readers of each tensor in each phase: (node, input slot).
    let phase_of = |n: usize| usize::from(reshard_after_forward && n >= backward_start);
    let mut readers: Vec<[Vec<(usize, usize)>; 2]> = vec![Default::default(); tensors.len()];
    let index: std::collections::HashMap<TensorId, usize> = tensors.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    for n in 0..original {
        for (slot, t) in g.nodes[n].inputs.iter().enumerate() {
            if let Some(&i) = index.get(t) {
                readers[i][phase_of(n)].push((n, slot));
            }
        }
    }
    for phase in 0..2 {
        let mut gs = groups(g, tensors, |i| !readers[i][phase].is_empty());
        let first = |grp: &Vec<usize>| grp.iter().map(|&i| readers[i][phase][0].0).min().unwrap_or(0);
        gs.sort_by_key(first);
        let firsts: Vec<usize> = gs.iter().map(first).collect();
        for (k, grp) in gs.iter().enumerate() {
            let outputs = grp
                .iter()
                .map(|&i| (g.shape(tensors[i]).to_vec(), g.dtype(tensors[i])))
                .collect();
            let inputs: Vec<TensorId> = grp.iter().filter_map(|&i| shards[i]).collect();
            let id = plan.calls.len() as u32;
            plan.calls.push(match kind {
                Gathered::Trainable => ShardCall::Gather(grp.clone()),
                Gathered::Frozen => ShardCall::GatherFrozen(grp.iter().map(|&i| layout.numel(i)).collect()),
            });
            let full = g.apply(Op::HostCall { id, outputs }, &inputs)?;
            let node = NodeId(g.nodes.len() as u32 - 1);
            for (&i, &f) in grp.iter().zip(&full) {
                let name = g.info(tensors[i]).name.clone();
                g.set_name(f, format!("{name}.gathered{}", ["", "_for_backward"][phase]));
                for &(n, slot) in &readers[i][phase] {
                    g.nodes[n].inputs[slot] = f;
                }
            }
            // Prefetch: gathered while the group before it runs.
            let at = firsts[k.saturating_sub(1)];
            plan.before.entry(at).or_default().push(node);
        }
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    #[test]
    fn groups_are_layers_and_placed_nodes_keep_a_valid_order() {
        assert_eq!(group_key("model.layers.12.mlp.up_proj.weight"), "layers.12");
        assert_eq!(
            group_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            "layers.3"
        );
        assert_eq!(group_key("model.embed_tokens.weight"), "model.embed_tokens.weight");
        // Node 0: y = x * 2; node 1: a host call filling w, appended after it; node 2: y + w.
        let mut g = Graph::new();
        let x = g.input("x", &[4], DType::F32);
        let y = g.scale(x, 2.0).unwrap();
        let w = g
            .apply1(
                Op::HostCall {
                    id: 0,
                    outputs: vec![(vec![4], DType::F32)],
                },
                &[],
            )
            .unwrap();
        g.add(y, w).unwrap();
        let mut plan = HostPlan::default();
        plan.before.entry(0).or_default().push(NodeId(1));
        // With node 0 the original graph, the call moves before it and the add stays last.
        let moved = plan.apply(&mut g, 1).unwrap();
        assert_eq!(moved, vec![NodeId(1), NodeId(0), NodeId(2)]);
        assert!(matches!(g.nodes[0].op, Op::HostCall { .. }));
        assert_eq!(g.producer[w.idx()], Some(NodeId(0)));
        assert_eq!(g.producer[y.idx()], Some(NodeId(1)));
        // A reader moved before its producer is refused.
        let e = g.reorder(&[NodeId(2), NodeId(0), NodeId(1)]).unwrap_err().to_string();
        assert!(e.contains("would run before"), "{e}");
    }
}
