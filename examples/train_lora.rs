//! Training from Rust: build a config in code (or read one from YAML), watch each step
//! through a callback, and get the trained adapter back.
//!
//! cargo run --release --example train_lora                                # the quickstart, built in code
//! cargo run --release --example train_lora -- configs/quickstart.yaml     # the same from YAML
//!
//! (`tests/example_train_lora.rs` runs this file's functions on a tiny model.)

use ferrotune::adapters::lora::Adapter;
use ferrotune::data::{DatasetSpec, DatasetType};
use ferrotune::train::run::{train, Callback, TrainSummary};
use ferrotune::train::trainer::StepReport;
use ferrotune::{Config, Result};
use std::path::Path;

/// Prints every tenth step and stops early once the loss is low enough.
pub struct Watch {
    pub target_loss: f64,
    pub last: f64,
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

/// `configs/quickstart.yaml` built in code: LoRA r=16 on every linear layer of `model`,
/// chat-formatted addition problems, 60 steps.
pub fn quickstart_config(model: &str, train_file: &str, eval_file: &str, output_dir: &Path) -> Config {
    let mut c = Config::new(
        model,
        vec![DatasetSpec::new(train_file, DatasetType::ChatTemplate)],
        1e-3,
    );
    c.test_datasets = vec![DatasetSpec::new(eval_file, DatasetType::ChatTemplate)];
    c.data.sequence_len = 256;
    c.data.sample_packing = true;
    c.max_steps = Some(60);
    c.warmup_steps = Some(5);
    c.adapter = Some("lora".into());
    c.lora_r = 16;
    c.lora_alpha = 32.0;
    c.lora_target_linear = true;
    c.output_dir = output_dir.to_path_buf();
    c.eval_max_new_tokens = 8;
    c
}

/// Trains until done (or the loss falls below `target_loss`) and returns the adapter.
pub fn train_lora(config: &Config, target_loss: f64) -> Result<(TrainSummary, Adapter)> {
    let summary = train(
        config,
        &mut Watch {
            target_loss,
            last: f64::INFINITY,
        },
    )?;
    println!("{} steps, {:.0} tokens/s", summary.steps, summary.tokens_per_second);
    let adapter = summary
        .adapter
        .clone()
        .ok_or_else(|| ferrotune::msg!("the config trains no adapter; set `adapter: lora`"))?;
    // The same adapter is on disk, as PEFT loads it.
    let saved_in = match &summary.last_checkpoint {
        Some(dir) if summary.interrupted => dir.clone(),
        _ => config.output_dir.clone(),
    };
    println!(
        "adapter: r={} alpha={} on {:?}, {} tensors, saved in {}",
        adapter.config.r,
        adapter.config.lora_alpha,
        adapter.config.target_modules,
        adapter.tensors.len(),
        saved_in.display()
    );
    Ok((summary, adapter))
}

#[allow(dead_code)]
fn main() -> Result<()> {
    let config = match std::env::args().nth(1) {
        // Overrides work as on the command line.
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| ferrotune::Error::io(&path, e))?;
            Config::from_yaml(&text, &["output_dir=outputs/example".into()])?
        }
        None => quickstart_config(
            "models/SmolLM2-135M-Instruct",
            "data/arithmetic/train.jsonl",
            "data/arithmetic/eval.jsonl",
            Path::new("outputs/example"),
        ),
    };
    train_lora(&config, 0.05)?;
    Ok(())
}
