//! Learning-rate schedules as Hugging Face defines them (`transformers/optimization.py`),
//! with axolotl's `cosine_min_lr_ratio`. Step `t` (1-based optimizer step) uses
//! `lr * lambda(t - 1)`, as HF's LambdaLR does, so with warmup the first step has lr 0.

use crate::config::Scheduler;

#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    pub kind: Scheduler,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    /// The multiplier `lambda(step)` for a 0-based step.
    pub fn lambda(&self, step: u64) -> f64 {
        let (s, w, n) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        if step < self.warmup_steps && self.kind != Scheduler::Constant {
            return s / w.max(1.0);
        }
        match self.kind {
            Scheduler::Constant | Scheduler::ConstantWithWarmup => 1.0,
            Scheduler::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
            Scheduler::Cosine => {
                let progress = (s - w) / (n - w).max(1.0);
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cos).max(0.0)
            }
        }
    }

    /// The learning rate of optimizer step `t` (1-based).
    pub fn lr(&self, t: u64) -> f64 {
        self.base_lr * self.lambda(t.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: Scheduler, warmup: u64) -> LrSchedule {
        LrSchedule {
            kind,
            base_lr: 1.0,
            warmup_steps: warmup,
            total_steps: 10,
            min_lr_ratio: 0.0,
        }
    }

    // Values of transformers' get_{linear,cosine,constant}_schedule_with_warmup at
    // steps 0..10 with 2 warmup steps of 10, computed from their lr_lambda definitions.
    #[test]
    fn matches_transformers_lambdas() {
        let lin: Vec<f64> = (0..10).map(|s| sched(Scheduler::Linear, 2).lambda(s)).collect();
        let want = [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125];
        for (a, b) in lin.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{lin:?}");
        }
        let cos = sched(Scheduler::Cosine, 2);
        assert_eq!(cos.lambda(1), 0.5);
        assert!((cos.lambda(2) - 1.0).abs() < 1e-12);
        assert!((cos.lambda(6) - 0.5).abs() < 1e-12);
        assert!((cos.lambda(10) - 0.0).abs() < 1e-12);
        let with_min = LrSchedule {
            min_lr_ratio: 0.1,
            ..cos.clone()
        };
        assert!((with_min.lambda(10) - 0.1).abs() < 1e-12);
        assert_eq!(sched(Scheduler::Constant, 2).lambda(0), 1.0);
        assert_eq!(sched(Scheduler::ConstantWithWarmup, 2).lambda(0), 0.0);
        assert_eq!(sched(Scheduler::ConstantWithWarmup, 2).lr(3), 1.0);
    }
}
