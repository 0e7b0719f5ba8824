//! The batch schedule: for each epoch, the optimizer steps, each a list of micro-batches,
//! each a list of rows of sample indices. Every epoch is a pure function of (samples, options,
//! seed, epoch), so a saved [`SchedulePosition`] resumes exactly.
//!
//! Layouts (all micro-batches of a run have the same shape):
//! - packing: bins of `micro_batch_size * sequence_len` tokens, one row per micro-batch;
//! - packing with `multipack_real_batches`: bins of `sequence_len` tokens,
//!   `micro_batch_size` bins (rows) per micro-batch;
//! - no packing: one sample per row, `micro_batch_size` rows of `sequence_len`.
//!
//! A final micro-batch with fewer rows gets empty (all-padding) rows, and a final step may
//! have fewer than `gradient_accumulation_steps` micro-batches.

use super::config::DataOptions;
use super::packing;
use super::sample::Sample;
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleOptions {
    pub sequence_len: usize,
    pub micro_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub sample_packing: bool,
    pub sample_packing_group_size: usize,
    pub sample_packing_bin_size: usize,
    pub multipack_real_batches: bool,
    /// Shuffle each epoch (the training set); off for evaluation.
    pub shuffle: bool,
    pub seed: u64,
}

impl ScheduleOptions {
    pub fn new(opts: &DataOptions, gradient_accumulation_steps: usize) -> Self {
        ScheduleOptions {
            sequence_len: opts.sequence_len,
            micro_batch_size: opts.micro_batch_size,
            gradient_accumulation_steps,
            sample_packing: opts.sample_packing,
            sample_packing_group_size: opts.sample_packing_group_size,
            sample_packing_bin_size: opts.sample_packing_bin_size,
            multipack_real_batches: opts.multipack_real_batches,
            shuffle: opts.shuffle,
            seed: opts.seed,
        }
    }
}

/// The shape [rows, seq_len] of every micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchLayout {
    pub rows: usize,
    pub seq_len: usize,
}

/// Sample indices per row; `rows.len()` equals the layout's rows (empty rows are padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    pub rows: Vec<Vec<usize>>,
}

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub micro_batches: Vec<MicroBatch>,
}

impl Step {
    /// Labels that take part in the loss over all of the step's micro-batches (the sum of the
    /// collated batches' `n_label_tokens`): divide the summed token losses by this so the
    /// gradient does not depend on how the step is split into micro-batches.
    pub fn n_label_tokens(&self, samples: &[Sample]) -> usize {
        self.micro_batches
            .iter()
            .flat_map(|m| m.rows.iter().flatten())
            .map(|&i| samples[i].n_label_tokens())
            .sum()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EpochPlan {
    pub epoch: usize,
    pub steps: Vec<Step>,
    /// Real tokens in the epoch.
    pub used_tokens: usize,
    /// micro-batches x rows x seq_len.
    pub capacity_tokens: usize,
}

impl EpochPlan {
    /// Packing efficiency: used tokens over capacity.
    pub fn efficiency(&self) -> f64 {
        if self.capacity_tokens == 0 {
            0.0
        } else {
            self.used_tokens as f64 / self.capacity_tokens as f64
        }
    }

    pub fn micro_batches(&self) -> impl Iterator<Item = &MicroBatch> {
        self.steps.iter().flat_map(|s| &s.micro_batches)
    }
}

/// The step to run next: saved with a checkpoint, given back to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, PartialOrd, Ord)]
pub struct SchedulePosition {
    pub epoch: usize,
    pub step: usize,
}

#[derive(Debug, Clone)]
pub struct BatchSchedule {
    lengths: Vec<usize>,
    opts: ScheduleOptions,
}

impl BatchSchedule {
    pub fn new(samples: &[Sample], opts: ScheduleOptions) -> Result<Self> {
        let mut errs = Vec::new();
        if opts.micro_batch_size == 0 {
            errs.push("micro_batch_size: must be at least 1");
        }
        if opts.gradient_accumulation_steps == 0 {
            errs.push("gradient_accumulation_steps: must be at least 1");
        }
        if opts.sequence_len == 0 {
            errs.push("sequence_len: must be at least 1");
        }
        if opts.sample_packing_group_size == 0 || opts.sample_packing_bin_size == 0 {
            errs.push("sample_packing_group_size and sample_packing_bin_size: must be at least 1");
        }
        if !errs.is_empty() {
            return Err(Error::Config(errs.join("\n")));
        }
        if samples.is_empty() {
            return Err(Error::Data("no samples to schedule".into()));
        }
        let lengths: Vec<usize> = samples.iter().map(Sample::len).collect();
        if let Some((i, &len)) = lengths.iter().enumerate().find(|(_, &l)| l > opts.sequence_len) {
            return Err(Error::Data(format!(
                "sample {i} has {len} tokens, more than sequence_len {}",
                opts.sequence_len
            )));
        }
        Ok(BatchSchedule { lengths, opts })
    }

    pub fn options(&self) -> &ScheduleOptions {
        &self.opts
    }

    pub fn layout(&self) -> BatchLayout {
        let o = &self.opts;
        if o.sample_packing && !o.multipack_real_batches {
            BatchLayout {
                rows: 1,
                seq_len: o.micro_batch_size * o.sequence_len,
            }
        } else {
            BatchLayout {
                rows: o.micro_batch_size,
                seq_len: o.sequence_len,
            }
        }
    }

    /// The sample order of an epoch: a seeded shuffle per epoch, or dataset order.
    fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.lengths.len()).collect();
        if self.opts.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(self.opts.seed);
            // Streams 0-15 are left to other users of the seed.
            rng.set_stream(16 + epoch as u64);
            order.shuffle(&mut rng);
        }
        order
    }

    pub fn epoch(&self, epoch: usize) -> EpochPlan {
        let o = &self.opts;
        let layout = self.layout();
        let order = self.order(epoch);
        let rows: Vec<Vec<usize>> = if o.sample_packing {
            packing::pack(
                &order,
                &self.lengths,
                layout.seq_len,
                o.sample_packing_group_size,
                o.sample_packing_bin_size,
            )
            .expect("lengths were checked against the capacity in new()")
        } else {
            order.into_iter().map(|i| vec![i]).collect()
        };
        let micro_batches: Vec<MicroBatch> = rows
            .chunks(layout.rows)
            .map(|c| {
                let mut rows = c.to_vec();
                rows.resize(layout.rows, Vec::new());
                MicroBatch { rows }
            })
            .collect();
        let capacity_tokens = micro_batches.len() * layout.rows * layout.seq_len;
        let steps = micro_batches
            .chunks(o.gradient_accumulation_steps)
            .map(|c| Step {
                micro_batches: c.to_vec(),
            })
            .collect();
        EpochPlan {
            epoch,
            steps,
            used_tokens: self.lengths.iter().sum(),
            capacity_tokens,
        }
    }

    pub fn steps_in_epoch(&self, epoch: usize) -> usize {
        self.epoch(epoch).steps.len()
    }

    /// Optimizer steps in the first `num_epochs` epochs (exact: each epoch is planned).
    pub fn total_steps(&self, num_epochs: usize) -> usize {
        (0..num_epochs).map(|e| self.steps_in_epoch(e)).sum()
    }

    /// Every step from `start` on, epoch after epoch without end, each with its position.
    /// `start.step` may equal the epoch's step count (the epoch is done).
    pub fn steps_from(&self, start: SchedulePosition) -> Result<impl Iterator<Item = (SchedulePosition, Step)> + '_> {
        let n = self.steps_in_epoch(start.epoch);
        if start.step > n {
            return Err(Error::Data(format!(
                "resume position epoch {} step {} is past the end of that epoch ({n} steps); the data or \
                 batch settings differ from the run that saved it",
                start.epoch, start.step
            )));
        }
        Ok((start.epoch..).flat_map(move |epoch| {
            let skip = if epoch == start.epoch { start.step } else { 0 };
            self.epoch(epoch)
                .steps
                .into_iter()
                .enumerate()
                .skip(skip)
                .map(move |(step, s)| (SchedulePosition { epoch, step }, s))
        }))
    }
}
