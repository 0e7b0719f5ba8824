//! `examples/train_lora.rs` as a library user runs it (a config built in code, the adapter
//! returned by `train`), on the tiny random model. CI only compiles the examples; this
//! runs the example's own functions.

mod common;
#[path = "../examples/train_lora.rs"]
mod example;

use common::{temp_dir, write_arithmetic, write_tiny_model, CHATML};
use ferrotune::adapters::lora::{self, AdapterConfig};
use ferrotune::data::ChatTemplateChoice;
use ferrotune::Config;
use std::path::Path;

#[test]
fn the_quickstart_built_in_code_is_configs_quickstart_yaml() {
    let yaml = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.yaml")).unwrap();
    let from_yaml = Config::from_yaml_without_files(&yaml).unwrap();
    let in_code = example::quickstart_config(
        "models/SmolLM2-135M-Instruct",
        "data/arithmetic/train.jsonl",
        "data/arithmetic/eval.jsonl",
        Path::new("outputs/quickstart"),
    );
    assert_eq!(in_code.to_json(), from_yaml.to_json());
}

/// The quickstart shape on the tiny model: its tokenizer has no chat template, so the
/// datasets name ChatML; shorter rows and a few steps keep it fast.
fn tiny_quickstart(dir: &Path, max_steps: u64) -> Config {
    let model = write_tiny_model(&dir.join("model"), 31);
    let (tr, ev) = write_arithmetic(&dir.join("data"), 24, 4);
    let mut cfg = example::quickstart_config(model.to_str().unwrap(), &tr, &ev, &dir.join("out"));
    for d in cfg.datasets.iter_mut().chain(cfg.test_datasets.iter_mut()) {
        d.chat_template = Some(ChatTemplateChoice::Jinja);
        d.chat_template_jinja = Some(CHATML.to_string());
    }
    cfg.data.sequence_len = 64;
    cfg.max_steps = Some(max_steps);
    cfg.warmup_steps = Some(1);
    cfg.lora_r = 4;
    cfg.device = ferrotune::config::DeviceChoice::Cpu;
    cfg
}

#[test]
fn train_returns_the_adapter_it_saved() {
    let dir = temp_dir("example");
    let cfg = tiny_quickstart(&dir, 3);
    let (summary, adapter) = example::train_lora(&cfg, 0.0).unwrap();
    assert_eq!(summary.steps, 3);
    assert!(!summary.interrupted);
    let (saved_config, saved) = lora::load(&cfg.output_dir).unwrap();
    assert_eq!(adapter.config, saved_config);
    assert_eq!(adapter.config.r, 4);
    assert_eq!(adapter.config.lora_alpha, 32.0);
    assert_eq!(adapter.tensors.len(), 2 * 7 * 2);
    assert_eq!(
        adapter.tensors.keys().collect::<Vec<_>>(),
        saved.keys().collect::<Vec<_>>()
    );
    for (k, t) in &adapter.tensors {
        assert_eq!(t.data, saved[k].data, "{k}");
    }
    // Trained: every B moved off zero.
    assert!(adapter
        .tensors
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .all(|(_, t)| t.to_f64().iter().any(|&x| x != 0.0)));
    // Saving the returned adapter writes what the run wrote.
    let again = dir.join("again");
    adapter.save(&again).unwrap();
    assert_eq!(AdapterConfig::read(&again).unwrap(), saved_config);
    assert_eq!(lora::load(&again).unwrap().1, saved);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stopped_early_the_adapter_is_the_last_checkpoint() {
    let dir = temp_dir("example-stop");
    let cfg = tiny_quickstart(&dir, 5);
    // A target no loss reaches from above: the callback stops after the first step.
    let (summary, adapter) = example::train_lora(&cfg, f64::INFINITY).unwrap();
    assert!(summary.interrupted);
    assert_eq!(summary.steps, 1);
    let ck = summary.last_checkpoint.clone().unwrap();
    assert_eq!(ck, cfg.output_dir.join("checkpoint-1"));
    assert_eq!(adapter.tensors, lora::load(&ck).unwrap().1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_config_built_in_code_is_validated_by_train() {
    let dir = temp_dir("example-bad");
    let mut cfg = tiny_quickstart(&dir, 1);
    cfg.learning_rate = f64::NAN;
    cfg.lora_r = 0;
    let err = example::train_lora(&cfg, 0.0).unwrap_err().to_string();
    assert!(
        err.contains("learning_rate: NaN must be a positive number") && err.contains("lora_r: must be at least 1"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
