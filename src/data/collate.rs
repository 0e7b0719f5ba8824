//! Build one static-shape batch from a micro-batch plan.
//!
//! Each row holds its samples back to back. `position_ids` restart at 0 for every sample;
//! `segment_ids` number the samples of a row 1, 2, 3, ... and the trailing padding is one more
//! segment (attention must not cross segments). The first label of every sample is set to
//! -100, so no sample is trained to predict the next sample's first token and a packed row
//! gives the same loss as its samples one at a time (transformers' DataCollatorWithFlattening
//! does the same).

use super::sample::{Sample, IGNORE_INDEX};
use super::schedule::{BatchLayout, MicroBatch};
use crate::{Error, Result};

/// A batch of shape [rows, seq_len], every array row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedBatch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// Aligned with `input_ids`; the loss at position t uses `labels[t + 1]`.
    pub labels: Vec<i32>,
    pub position_ids: Vec<u32>,
    pub segment_ids: Vec<u32>,
    /// Labels that take part in the loss (not -100).
    pub n_label_tokens: usize,
    /// Real (non-padding) tokens.
    pub n_tokens: usize,
}

impl PackedBatch {
    /// The target of the logits at each position (`labels[t + 1]` in the same row, -100 at a
    /// row's last position).
    pub fn shifted_targets(&self) -> Vec<i32> {
        let mut out = vec![IGNORE_INDEX; self.labels.len()];
        for r in 0..self.rows {
            let row = &self.labels[r * self.seq_len..(r + 1) * self.seq_len];
            out[r * self.seq_len..(r + 1) * self.seq_len - 1].copy_from_slice(&row[1..]);
        }
        out
    }
}

pub fn collate(samples: &[Sample], batch: &MicroBatch, layout: BatchLayout, pad_id: u32) -> Result<PackedBatch> {
    let BatchLayout { rows, seq_len } = layout;
    if batch.rows.len() > rows {
        return Err(Error::Data(format!(
            "micro-batch has {} rows, the layout {rows}",
            batch.rows.len()
        )));
    }
    let n = rows * seq_len;
    let mut out = PackedBatch {
        rows,
        seq_len,
        input_ids: vec![pad_id; n],
        labels: vec![IGNORE_INDEX; n],
        position_ids: vec![0; n],
        segment_ids: vec![0; n],
        n_label_tokens: 0,
        n_tokens: 0,
    };
    for r in 0..rows {
        let base = r * seq_len;
        let mut cursor = 0;
        let mut segment = 1;
        for &idx in batch.rows.get(r).map(Vec::as_slice).unwrap_or(&[]) {
            let s = samples
                .get(idx)
                .ok_or_else(|| Error::Data(format!("sample index {idx} out of range")))?;
            if cursor + s.len() > seq_len {
                return Err(Error::Data(format!(
                    "row {r} of the micro-batch needs {} tokens, more than seq_len {seq_len}",
                    cursor + s.len()
                )));
            }
            let at = base + cursor;
            out.input_ids[at..at + s.len()].copy_from_slice(&s.input_ids);
            out.labels[at..at + s.len()].copy_from_slice(&s.labels);
            if !s.is_empty() {
                out.labels[at] = IGNORE_INDEX;
            }
            for p in 0..s.len() {
                out.position_ids[at + p] = p as u32;
                out.segment_ids[at + p] = segment;
            }
            cursor += s.len();
            segment += 1;
        }
        out.n_tokens += cursor;
        for p in cursor..seq_len {
            out.position_ids[base + p] = (p - cursor) as u32;
            out.segment_ids[base + p] = segment;
        }
    }
    out.n_label_tokens = out.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_packed_row() {
        let samples = vec![
            Sample {
                input_ids: vec![10, 11, 12],
                labels: vec![10, -100, 12],
            },
            Sample {
                input_ids: vec![20, 21],
                labels: vec![20, 21],
            },
        ];
        let mb = MicroBatch {
            rows: vec![vec![1, 0], vec![]],
        };
        let b = collate(&samples, &mb, BatchLayout { rows: 2, seq_len: 7 }, 0).unwrap();
        assert_eq!(b.input_ids, vec![20, 21, 10, 11, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            b.labels,
            vec![-100, 21, -100, -100, 12, -100, -100, -100, -100, -100, -100, -100, -100, -100]
        );
        assert_eq!(b.position_ids, vec![0, 1, 0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(b.segment_ids, vec![1, 1, 2, 2, 2, 3, 3, 1, 1, 1, 1, 1, 1, 1]);
        assert_eq!(b.n_label_tokens, 2);
        assert_eq!(b.n_tokens, 5);
        assert_eq!(
            b.shifted_targets(),
            vec![21, -100, -100, 12, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100]
        );
    }

    #[test]
    fn overfull_rows_are_rejected() {
        let samples = vec![Sample::all_trained(vec![1; 5])];
        let mb = MicroBatch { rows: vec![vec![0, 0]] };
        assert!(collate(&samples, &mb, BatchLayout { rows: 1, seq_len: 8 }, 0).is_err());
    }
}
