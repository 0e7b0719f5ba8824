//! From a collated batch to the input tensors of the step graph.

use crate::data::PackedBatch;
use crate::graph::TensorId;
use crate::model::llama::ModelGraph;
use crate::tensor::HostTensor;

/// The inputs of one micro-batch, owned, ready to pass to `Executor::run`.
pub struct StepInputs {
    pub tensors: Vec<(TensorId, HostTensor)>,
    /// Targets that take part in the loss.
    pub label_tokens: usize,
    /// Real (non-padding) tokens.
    pub tokens: usize,
}

impl StepInputs {
    pub fn feed(&self) -> Vec<(TensorId, &HostTensor)> {
        self.tensors.iter().map(|(t, v)| (*t, v)).collect()
    }
}

/// Number of positions that predict a label in a batch.
pub fn count_targets(b: &PackedBatch) -> usize {
    b.shifted_targets()
        .iter()
        .filter(|&&t| t != crate::data::IGNORE_INDEX)
        .count()
}

/// Builds ids, positions, segments and targets (gathered to the model's `loss_rows` when
/// it computes logits only at label positions).
pub fn model_inputs(m: &ModelGraph, b: &PackedBatch) -> crate::Result<StepInputs> {
    let n = b.rows * b.seq_len;
    let as_i32 = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
    let targets = b.shifted_targets();
    let label_tokens = targets.iter().filter(|&&t| t != crate::data::IGNORE_INDEX).count();
    let mut tensors = vec![
        (m.input_ids, HostTensor::from_i32(&[n], &as_i32(&b.input_ids))),
        (m.positions, HostTensor::from_i32(&[n], &as_i32(&b.position_ids))),
        (m.segments, HostTensor::from_i32(&[n], &as_i32(&b.segment_ids))),
    ];
    if let Some(p) = m.prefix {
        let flags = crate::model::llama::prefix_flags(&b.labels, &b.segment_ids, b.seq_len);
        tensors.push((p, HostTensor::from_i32(&[n], &flags)));
    }
    match (m.loss_index, m.opts.loss_rows) {
        (Some(index_t), Some(k)) => {
            let rows: Vec<usize> = (0..n).filter(|&i| targets[i] != crate::data::IGNORE_INDEX).collect();
            if rows.len() > k {
                return Err(crate::msg!(
                    "a batch has {} label tokens but the graph was planned for at most {k}",
                    rows.len()
                ));
            }
            let mut index = vec![0i32; k];
            let mut gathered = vec![crate::data::IGNORE_INDEX; k];
            for (j, &r) in rows.iter().enumerate() {
                index[j] = r as i32;
                gathered[j] = targets[r];
            }
            tensors.push((index_t, HostTensor::from_i32(&[k], &index)));
            tensors.push((m.targets, HostTensor::from_i32(&[k], &gathered)));
        }
        _ => tensors.push((m.targets, HostTensor::from_i32(&[n], &targets))),
    }
    Ok(StepInputs {
        tensors,
        label_tokens,
        tokens: b.n_tokens,
    })
}

/// A 32-bit dropout seed for micro-batch `micro_step` of a run seeded with `seed`.
pub fn dropout_seed(seed: u64, micro_step: u64) -> u32 {
    let x = seed ^ micro_step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    crate::ops::elementwise::hash32((x ^ (x >> 32)) as u32)
}
