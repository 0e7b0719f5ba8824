//! Multipack packing, collation and the batch schedule.

use ferrotune::data::{collate, BatchLayout, BatchSchedule, Sample, ScheduleOptions, SchedulePosition, IGNORE_INDEX};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Samples of random lengths whose ids encode (sample, position), so collated rows can be
/// traced back; about a third of the labels are masked.
fn samples(n: usize, max_len: usize, seed: u64) -> Vec<Sample> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let len = rng.random_range(2..=max_len);
            let input_ids: Vec<u32> = (0..len).map(|p| (i * 1000 + p) as u32).collect();
            let labels = input_ids
                .iter()
                .map(|&t| {
                    if rng.random_range(0..3) == 0 {
                        IGNORE_INDEX
                    } else {
                        t as i32
                    }
                })
                .collect();
            Sample { input_ids, labels }
        })
        .collect()
}

fn opts(packing: bool, real_batches: bool, mbs: usize, ga: usize) -> ScheduleOptions {
    ScheduleOptions {
        sequence_len: 64,
        micro_batch_size: mbs,
        gradient_accumulation_steps: ga,
        sample_packing: packing,
        sample_packing_group_size: 100_000,
        sample_packing_bin_size: 200,
        multipack_real_batches: real_batches,
        shuffle: true,
        seed: 42,
    }
}

const PAD: u32 = 999_999;

/// Check every invariant of an epoch's collated batches.
fn check_epoch(samples: &[Sample], sched: &BatchSchedule, epoch: usize) {
    let layout = sched.layout();
    let plan = sched.epoch(epoch);
    let mut seen = vec![0usize; samples.len()];
    let mut label_tokens = 0;
    let mut used = 0;
    for step in &plan.steps {
        let collated: usize = step
            .micro_batches
            .iter()
            .map(|mb| collate(samples, mb, layout, PAD).unwrap().n_label_tokens)
            .sum();
        assert_eq!(step.n_label_tokens(samples), collated);
    }
    for mb in plan.micro_batches() {
        assert_eq!(mb.rows.len(), layout.rows);
        let b = collate(samples, mb, layout, PAD).unwrap();
        assert_eq!((b.rows, b.seq_len), (layout.rows, layout.seq_len), "static shape");
        assert_eq!(b.input_ids.len(), layout.rows * layout.seq_len);
        label_tokens += b.n_label_tokens;
        used += b.n_tokens;
        for (r, row) in mb.rows.iter().enumerate() {
            let base = r * layout.seq_len;
            let row_len: usize = row.iter().map(|&i| samples[i].len()).sum();
            assert!(row_len <= layout.seq_len, "bin over capacity");
            assert!(row.len() <= 200);
            let mut at = base;
            for (k, &i) in row.iter().enumerate() {
                seen[i] += 1;
                let s = &samples[i];
                for p in 0..s.len() {
                    assert_eq!(b.input_ids[at + p], s.input_ids[p]);
                    assert_eq!(b.position_ids[at + p], p as u32, "positions restart per sample");
                    assert_eq!(b.segment_ids[at + p], k as u32 + 1, "segments number the samples");
                    let want = if p == 0 { IGNORE_INDEX } else { s.labels[p] };
                    assert_eq!(b.labels[at + p], want);
                }
                at += s.len();
            }
            for q in at..base + layout.seq_len {
                assert_eq!(b.input_ids[q], PAD);
                assert_eq!(b.labels[q], IGNORE_INDEX);
                assert_eq!(b.segment_ids[q], row.len() as u32 + 1, "padding is its own segment");
                assert_eq!(b.position_ids[q], (q - at) as u32);
            }
        }
    }
    assert!(seen.iter().all(|&c| c == 1), "every sample exactly once per epoch");
    assert_eq!(label_tokens, samples.iter().map(Sample::n_label_tokens).sum::<usize>());
    assert_eq!(used, plan.used_tokens);
    let steps = &plan.steps;
    let ga = sched.options().gradient_accumulation_steps;
    assert!(steps[..steps.len() - 1].iter().all(|s| s.micro_batches.len() == ga));
    assert!(!steps.last().unwrap().micro_batches.is_empty());
}

#[test]
fn every_layout_keeps_all_invariants() {
    let s = samples(300, 60, 7);
    for (packing, real, mbs) in [(true, false, 2), (true, true, 3), (false, false, 4), (true, false, 1)] {
        let sched = BatchSchedule::new(&s, opts(packing, real, mbs, 3)).unwrap();
        let want = match (packing, real) {
            (true, false) => BatchLayout {
                rows: 1,
                seq_len: mbs * 64,
            },
            _ => BatchLayout { rows: mbs, seq_len: 64 },
        };
        assert_eq!(sched.layout(), want);
        for epoch in 0..2 {
            check_epoch(&s, &sched, epoch);
        }
        if packing {
            // Packing must beat one sample per row by a wide margin on these lengths.
            assert!(sched.epoch(0).efficiency() > 0.85, "{}", sched.epoch(0).efficiency());
        }
    }
}

#[test]
fn small_bins_and_groups() {
    let s = samples(100, 10, 3);
    let mut o = opts(true, false, 1, 1);
    o.sample_packing_bin_size = 3;
    o.sample_packing_group_size = 16;
    let sched = BatchSchedule::new(&s, o).unwrap();
    for mb in sched.epoch(0).micro_batches() {
        assert!(mb.rows[0].len() <= 3);
    }
    check_epoch(&s, &sched, 0);
}

#[test]
fn deterministic_per_seed_and_epoch() {
    let s = samples(200, 60, 11);
    let a = BatchSchedule::new(&s, opts(true, false, 2, 2)).unwrap();
    let b = BatchSchedule::new(&s, opts(true, false, 2, 2)).unwrap();
    assert_eq!(a.epoch(0), b.epoch(0));
    assert_eq!(a.epoch(3), b.epoch(3));
    assert_ne!(a.epoch(0).steps, a.epoch(1).steps, "each epoch is reshuffled");
    let mut o = opts(true, false, 2, 2);
    o.seed = 43;
    assert_ne!(BatchSchedule::new(&s, o).unwrap().epoch(0).steps, a.epoch(0).steps);
    // Without shuffling the order is the dataset order.
    let mut o = opts(false, false, 2, 1);
    o.shuffle = false;
    let plain = BatchSchedule::new(&s, o).unwrap().epoch(5);
    assert_eq!(plain.steps[0].micro_batches[0].rows, vec![vec![0], vec![1]]);
}

#[test]
fn hand_checked_efficiency() {
    // Lengths 6, 5, 4, 3, 2, 7 (27 tokens), sequence_len 10, dataset order.
    let s: Vec<Sample> = [6usize, 5, 4, 3, 2, 7]
        .iter()
        .map(|&n| Sample::all_trained(vec![1; n]))
        .collect();
    let mk = |packing, real, mbs| {
        let mut o = opts(packing, real, mbs, 1);
        o.sequence_len = 10;
        o.shuffle = false;
        BatchSchedule::new(&s, o).unwrap().epoch(0)
    };
    // First fit in a 10-token bin: [6, 4], [5, 3, 2], [7] -> 3 rows of 10: 27/30.
    let p = mk(true, false, 1);
    let rows: Vec<Vec<usize>> = p.micro_batches().map(|m| m.rows[0].clone()).collect();
    assert_eq!(rows, vec![vec![0, 2], vec![1, 3, 4], vec![5]]);
    assert_eq!((p.used_tokens, p.capacity_tokens), (27, 30));
    assert!((p.efficiency() - 0.9).abs() < 1e-12);
    // Real batches of 2 rows: the 3 bins fill 2 micro-batches of 2 x 10: 27/40.
    assert!((mk(true, true, 2).efficiency() - 27.0 / 40.0).abs() < 1e-12);
    // One 20-token row per micro-batch: [6, 5, 4, 3, 2], [7]: 27/40.
    let wide = mk(true, false, 2);
    assert_eq!(
        wide.micro_batches().map(|m| m.rows[0].len()).collect::<Vec<_>>(),
        vec![5, 1]
    );
    assert!((wide.efficiency() - 27.0 / 40.0).abs() < 1e-12);
    // No packing, 2 rows of 10: 3 micro-batches: 27/60.
    assert!((mk(false, false, 2).efficiency() - 0.45).abs() < 1e-12);
}

#[test]
fn resume_reproduces_the_remaining_schedule() {
    let s = samples(150, 60, 5);
    let sched = BatchSchedule::new(&s, opts(true, true, 2, 3)).unwrap();
    let epochs = 3;
    let total = sched.total_steps(epochs);
    let full: Vec<_> = sched
        .steps_from(SchedulePosition::default())
        .unwrap()
        .take(total)
        .collect();
    assert_eq!(full.len(), total);
    assert_eq!(full.last().unwrap().0.epoch, epochs - 1);
    for (i, (pos, _)) in full.iter().enumerate() {
        // A fresh schedule (as after a restart) from a saved position.
        let again = BatchSchedule::new(&s, opts(true, true, 2, 3)).unwrap();
        let rest: Vec<_> = again.steps_from(*pos).unwrap().take(total - i).collect();
        assert_eq!(rest, full[i..], "resume at {pos:?}");
    }
    // The position just past an epoch's last step starts the next epoch.
    let n0 = sched.steps_in_epoch(0);
    let (p, _) = sched
        .steps_from(SchedulePosition { epoch: 0, step: n0 })
        .unwrap()
        .next()
        .unwrap();
    assert_eq!(p, SchedulePosition { epoch: 1, step: 0 });
    let err = sched
        .steps_from(SchedulePosition { epoch: 0, step: n0 + 1 })
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("past the end"), "{err}");
}

#[test]
fn bad_schedules_are_errors() {
    let s = samples(10, 60, 1);
    let mut o = opts(true, false, 1, 1);
    o.gradient_accumulation_steps = 0;
    assert!(BatchSchedule::new(&s, o)
        .unwrap_err()
        .to_string()
        .contains("gradient_accumulation_steps"));
    let mut o = opts(false, false, 1, 1);
    o.sequence_len = 8;
    let err = BatchSchedule::new(&s, o).unwrap_err().to_string();
    assert!(err.contains("more than sequence_len 8"), "{err}");
    assert!(BatchSchedule::new(&[], opts(true, false, 1, 1)).is_err());
}
