//! Training from Rust: read a config (or build one in code), watch each step through a
//! callback, and get the adapter back.
//!
//! cargo run --release --example train_lora -- configs/quickstart.yaml

use ferrotune::train::run::{train, Callback};
use ferrotune::train::trainer::StepReport;
use ferrotune::Config;

/// Prints every tenth step and stops early once the loss is low enough.
struct Watch {
    target_loss: f64,
    last: f64,
}

impl Callback for Watch {
    fn on_step(&mut self, r: &StepReport) {
        self.last = r.loss;
        if r.step.is_multiple_of(10) {
            println!(
                "step {}/{}: loss {:.4}, lr {:.2e}",
                r.step, r.total_steps, r.loss, r.learning_rate
            );
        }
    }
    fn should_stop(&mut self) -> bool {
        self.last < self.target_loss
    }
}

fn main() -> ferrotune::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "configs/quickstart.yaml".into());
    let text = std::fs::read_to_string(&path).map_err(|e| ferrotune::Error::io(&path, e))?;
    // Overrides work as on the command line.
    let config = Config::from_yaml(&text, &["output_dir=outputs/example".into()])?;
    let summary = train(
        &config,
        &mut Watch {
            target_loss: 0.05,
            last: f64::INFINITY,
        },
    )?;
    println!("{} steps, {:.0} tokens/s", summary.steps, summary.tokens_per_second);
    // The adapter, as PEFT would load it.
    let (adapter, tensors) = match summary.last_checkpoint {
        Some(dir) if summary.interrupted => ferrotune::adapters::lora::load(&dir)?,
        _ => ferrotune::adapters::lora::load(&config.output_dir)?,
    };
    println!(
        "adapter: r={} alpha={} on {:?}, {} tensors",
        adapter.r,
        adapter.lora_alpha,
        adapter.target_modules,
        tensors.len()
    );
    Ok(())
}
