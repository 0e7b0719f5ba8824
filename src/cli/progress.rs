//! The training progress bar: a `Callback` that draws loss, learning rate, tokens/s and ETA.

use ferrotune::train::run::Callback;
use ferrotune::train::trainer::{EvalReport, RunInfo, StepReport};
use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    tokens: u64,
    seconds: f64,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            bar: None,
            tokens: 0,
            seconds: 0.0,
        }
    }

    fn say(&self, msg: &str) {
        match &self.bar {
            // A hidden bar (stderr is not a terminal: a log file, a pipe) prints nothing.
            Some(b) if !b.is_hidden() => b.println(msg),
            _ => eprintln!("{msg}"),
        }
    }
}

pub fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

impl Callback for Progress {
    fn on_start(&mut self, i: &RunInfo) {
        eprintln!(
            "device: {} | {} parameters, {} trainable ({:.2}%) | batch [{} x {}] | packing efficiency {:.1}%",
            i.device,
            i.parameters,
            i.trainable_parameters,
            100.0 * i.trainable_parameters as f64 / i.parameters.max(1) as f64,
            i.rows,
            i.seq_len,
            100.0 * i.packing_efficiency
        );
        eprintln!(
            "memory plan: {} total (weights {}, trainable {}, optimizer {}, activations {})",
            gib(i.plan.total_bytes),
            gib(i.plan.persistent.frozen_weights),
            gib(i.plan.persistent.trainable_parameters),
            gib(i.plan.persistent.optimizer_state),
            gib(i.plan.transient_bytes)
        );
        let bar = ProgressBar::new(i.total_steps);
        bar.set_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_position(i.resumed_from_step);
        self.bar = Some(bar);
    }

    fn on_step(&mut self, r: &StepReport) {
        self.tokens += r.tokens;
        self.seconds += r.step_seconds;
        if let Some(b) = &self.bar {
            b.set_position(r.step);
            b.set_message(format!(
                "loss {:.4} lr {:.2e} grad {:.3} {:.0} tok/s{}",
                r.loss,
                r.learning_rate,
                r.grad_norm,
                self.tokens as f64 / self.seconds.max(1e-9),
                if r.skipped { " (skipped)" } else { "" }
            ));
        }
    }

    fn on_eval(&mut self, r: &EvalReport) {
        self.say(&format!(
            "step {}: eval loss {:.4} over {} tokens",
            r.step, r.eval_loss, r.eval_label_tokens
        ));
    }

    fn on_message(&mut self, msg: &str) {
        self.say(msg);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
