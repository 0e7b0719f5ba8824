//! Helpers for training tests: a config around the tiny model, a callback that records
//! every step, the CLI, and comparisons of trained tensors.

use super::CHATML;
use ferrotune::train::run::Callback;
use ferrotune::train::trainer::StepReport;
use ferrotune::HostTensor;
use std::collections::BTreeMap;
use std::path::Path;

/// The LoRA keys of [`yaml`], removed for a full fine-tune.
pub const LORA_KEYS: &str = "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\n";

/// Records every step's loss and gradient norm; stops after `stop_at` steps when set.
pub struct Collect {
    pub losses: Vec<f64>,
    pub grad_norms: Vec<f64>,
    pub stop_at: Option<u64>,
}

impl Collect {
    pub fn new() -> Self {
        Collect {
            losses: vec![],
            grad_norms: vec![],
            stop_at: None,
        }
    }
    pub fn stopping_at(step: u64) -> Self {
        Collect {
            stop_at: Some(step),
            ..Collect::new()
        }
    }
}

impl Callback for Collect {
    fn on_step(&mut self, r: &StepReport) {
        self.losses.push(r.loss);
        self.grad_norms.push(r.grad_norm);
    }
    fn should_stop(&mut self) -> bool {
        self.stop_at.is_some_and(|s| self.losses.len() as u64 >= s)
    }
}

/// A LoRA run of the tiny model on chat_template arithmetic (CPU), with `extra` keys appended.
pub fn yaml(model: &Path, train_file: &str, eval_file: &str, out: &Path, extra: &str) -> String {
    format!(
        "base_model: {}\ndatasets:\n  - path: {train_file}\n    type: chat_template\n    chat_template: jinja\n    chat_template_jinja: \"{}\"\n\
         test_datasets:\n  - path: {eval_file}\n    type: chat_template\n    chat_template: jinja\n    chat_template_jinja: \"{}\"\n\
         sequence_len: 64\nlearning_rate: 0.01\nadapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\n\
         output_dir: {}\ndevice: cpu\neval_max_new_tokens: 4\n{extra}",
        model.display(),
        CHATML.replace('"', "\\\""),
        CHATML.replace('"', "\\\""),
        out.display()
    )
}

/// The tensors of the adapter in `dir`.
pub fn adapter(dir: &Path) -> BTreeMap<String, HostTensor> {
    ferrotune::adapters::lora::load(dir).unwrap().1
}

/// The largest relative error over tensors of the same names; every value must be finite
/// (a NaN or infinity in either set fails the test, it never counts as a match).
pub fn max_rel(a: &BTreeMap<String, HostTensor>, b: &BTreeMap<String, HostTensor>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(k, x)| {
            let (x, y) = (x.to_f64(), b[k].to_f64());
            assert!(x.iter().chain(&y).all(|v| v.is_finite()), "{k}: a non-finite value");
            super::rel_err(&x, &y)
        })
        .fold(0.0, f64::max)
}

pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

/// Runs the ferrotune binary: (success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
