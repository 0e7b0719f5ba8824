//! One tokenized training example.

use serde::{Deserialize, Serialize};

/// Label value for positions that are not trained (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// Token ids and labels of one example, aligned position by position (Hugging Face
/// convention: the loss compares the logits at position `t` with `labels[t + 1]`).
/// `labels[t]` is `input_ids[t]` where trained and [`IGNORE_INDEX`] elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Sample {
    /// A sample whose every token is trained.
    pub fn all_trained(input_ids: Vec<u32>) -> Self {
        let labels = input_ids.iter().map(|&t| t as i32).collect();
        Sample { input_ids, labels }
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Labels that take part in the loss once shifted: the first position has no
    /// preceding logits, so it never counts.
    pub fn n_label_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
    }

    /// Keep the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.input_ids.truncate(len);
        self.labels.truncate(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_tokens_skip_the_first_position() {
        let s = Sample {
            input_ids: vec![5, 6, 7, 8],
            labels: vec![5, -100, 7, 8],
        };
        assert_eq!(s.n_label_tokens(), 2);
        assert_eq!(Sample::all_trained(vec![1, 2, 3]).labels, vec![1, 2, 3]);
    }
}
