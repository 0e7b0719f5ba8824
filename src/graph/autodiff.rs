//! Reverse-mode autodiff as a graph pass: walks the forward nodes backwards and appends
//! each op's backward rule (written in graph ops), summing gradients of tensors that feed
//! several consumers.

use super::{Graph, Role, TensorId};
use crate::ops::Op;
use crate::{Error, Result};
use std::collections::HashMap;

/// Appends the gradient of `loss` with respect to each tensor in `wrt`, seeded with
/// `seed` (d loss / d loss; pass a scale such as `1 / label_count` to differentiate a
/// scaled loss). Returns the gradient tensor of each `wrt` entry that influences `loss`.
pub fn backward(
    g: &mut Graph,
    loss: TensorId,
    seed: TensorId,
    wrt: &[TensorId],
) -> Result<HashMap<TensorId, TensorId>> {
    if g.shape(seed) != g.shape(loss) {
        return Err(Error::shape(
            "backward",
            format!(
                "seed {:?} must have the loss's shape {:?}",
                g.shape(seed),
                g.shape(loss)
            ),
        ));
    }
    let forward_nodes = g.nodes.len();
    let n_tensors = g.tensors.len();

    // Tensors that depend on something we differentiate with respect to.
    let mut requires = vec![false; n_tensors];
    for &t in wrt {
        requires[t.idx()] = true;
    }
    for node in &g.nodes[..forward_nodes] {
        if node.inputs.iter().any(|t| requires[t.idx()]) {
            for o in &node.outputs {
                requires[o.idx()] = g.dtype(*o).is_float();
            }
        }
    }
    // Tensors the loss depends on.
    let mut relevant = vec![false; n_tensors];
    relevant[loss.idx()] = true;
    for node in g.nodes[..forward_nodes].iter().rev() {
        if node.outputs.iter().any(|t| relevant[t.idx()]) {
            for i in &node.inputs {
                relevant[i.idx()] = true;
            }
        }
    }

    let saved_role = g.output_role.replace(Role::Gradient);
    let mut grads: HashMap<TensorId, TensorId> = HashMap::new();
    grads.insert(loss, seed);
    let result = (|| -> Result<()> {
        for ni in (0..forward_nodes).rev() {
            let node = g.nodes[ni].clone();
            let dout: Vec<Option<TensorId>> = node.outputs.iter().map(|o| grads.get(o).copied()).collect();
            if dout.iter().all(Option::is_none) {
                continue;
            }
            let need: Vec<bool> = node
                .inputs
                .iter()
                .map(|t| requires[t.idx()] && relevant[t.idx()])
                .collect();
            if !need.iter().any(|&b| b) {
                continue;
            }
            let din = node.op.backward(g, &node, &dout, &need)?;
            for ((&x, dx), &needed) in node.inputs.iter().zip(din).zip(&need) {
                let (Some(dx), true) = (dx, needed) else {
                    continue;
                };
                let dx = match_dtype(g, dx, x)?;
                let total = match grads.get(&x) {
                    Some(&prev) => g.apply1(Op::Add, &[prev, dx])?,
                    None => dx,
                };
                grads.insert(x, total);
            }
        }
        Ok(())
    })();
    g.output_role = saved_role;
    result?;
    Ok(wrt.iter().filter_map(|t| grads.get(t).map(|&d| (*t, d))).collect())
}

/// Gradients carry their tensor's dtype (a bf16 weight gets a bf16 gradient).
fn match_dtype(g: &mut Graph, dx: TensorId, x: TensorId) -> Result<TensorId> {
    let want = g.dtype(x);
    if g.dtype(dx) == want {
        Ok(dx)
    } else {
        g.apply1(Op::Cast { dtype: want }, &[dx])
    }
}
