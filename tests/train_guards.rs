//! What a training run refuses before it starts, and what its checkpoints hold: an output
//! folder with an earlier run's checkpoints, token ids past the model's embedding, and
//! `save_only_model` checkpoints (weights without optimizer state, which cannot resume).

mod common;
use common::train::{yaml, Collect};
use common::{temp_dir, write_arithmetic, write_tiny_model};
use ferrotune::train::run::train;
use ferrotune::Config;
use std::path::Path;

fn config(model: &Path, data: &(String, String), out: &Path, extra: &str) -> Config {
    Config::from_yaml(&yaml(model, &data.0, &data.1, out, extra), &[]).unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_fresh_run_refuses_an_output_dir_with_checkpoints_and_resuming_takes_it() {
    let dir = temp_dir("guard-out");
    let model = write_tiny_model(&dir.join("model"), 1);
    let data = write_arithmetic(&dir.join("data"), 16, 4);
    let out = dir.join("out");
    let keys = "micro_batch_size: 2\nmax_steps: 2\nsave_steps: 2\n";
    train(&config(&model, &data, &out, keys), &mut Collect::new()).unwrap();
    assert!(out.join("checkpoint-2/trainer_state.json").is_file());
    let before = std::fs::read(out.join("checkpoint-2/adapter_model.safetensors")).unwrap();
    let e = train(&config(&model, &data, &out, keys), &mut Collect::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("already holds checkpoints of an earlier run"), "{e}");
    assert!(
        e.contains("checkpoint-2") && e.contains("auto_resume_from_checkpoints"),
        "{e}"
    );
    // Nothing was touched.
    assert_eq!(
        std::fs::read(out.join("checkpoint-2/adapter_model.safetensors")).unwrap(),
        before
    );
    // Resuming continues it: two more steps, from step 2.
    let more = "micro_batch_size: 2\nmax_steps: 4\nsave_steps: 2\nauto_resume_from_checkpoints: true\n";
    let mut c = Collect::new();
    train(&config(&model, &data, &out, more), &mut c).unwrap();
    assert_eq!(c.losses.len(), 2);
    assert!(out.join("checkpoint-4/trainer_state.json").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_only_model_checkpoints_hold_weights_and_cannot_resume() {
    let dir = temp_dir("guard-only-model");
    let model = write_tiny_model(&dir.join("model"), 2);
    let data = write_arithmetic(&dir.join("data"), 16, 4);
    let out = dir.join("out");
    let keys = "micro_batch_size: 2\nmax_steps: 2\nsave_steps: 2\nsave_only_model: true\n";
    train(&config(&model, &data, &out, keys), &mut Collect::new()).unwrap();
    let ck = out.join("checkpoint-2");
    assert_eq!(
        files(&ck),
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "config.yaml",
            "ferrotune_state.json",
            "trainer_state.json"
        ]
    );
    // The checkpoint's adapter is the run's adapter at that step (the last one).
    assert_eq!(
        std::fs::read(ck.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(out.join("adapter_model.safetensors")).unwrap()
    );
    let resume = format!("{keys}max_steps: 4\nresume_from_checkpoint: {}\n", ck.display());
    let resume = resume.replacen("max_steps: 2\n", "", 1);
    let e = train(&config(&model, &data, &out, &resume), &mut Collect::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no optimizer state") && e.contains("save_only_model"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn token_ids_past_the_embedding_are_refused() {
    let dir = temp_dir("guard-vocab");
    let model = write_tiny_model(&dir.join("model"), 3);
    let data = write_arithmetic(&dir.join("data"), 8, 2);
    // The model's tokenizer_config.json names an eos token its 32000-token vocabulary
    // lacks: the tokenizer adds `<|im_end|>` as id 32000, and every rendered turn ends with it.
    let tc = model.join("tokenizer_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    v["eos_token"] = "<|im_end|>".into();
    std::fs::write(&tc, v.to_string()).unwrap();
    let e = train(
        &config(&model, &data, &dir.join("out"), "max_steps: 1\n"),
        &mut Collect::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("token id 32000 (`<|im_end|>`)"), "{e}");
    assert!(e.contains("vocabulary has 32000 ids"), "{e}");
    assert!(!dir.join("out").join("adapter_model.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn model_files_named_elsewhere_need_not_be_in_the_model_folder() {
    let dir = temp_dir("guard-model-files");
    let model = write_tiny_model(&dir.join("model"), 4);
    let data = write_arithmetic(&dir.join("data"), 8, 2);
    // The tokenizer lives in a folder of its own, named by `tokenizer_config`.
    let tok = dir.join("tokenizer");
    std::fs::create_dir_all(&tok).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::rename(model.join(f), tok.join(f)).unwrap();
    }
    let out = dir.join("out");
    let e = train(&config(&model, &data, &out, "max_steps: 1\n"), &mut Collect::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a model folder: missing tokenizer.json"), "{e}");
    let keys = format!("max_steps: 1\ntokenizer_config: {}\n", tok.display());
    let mut c = Collect::new();
    train(&config(&model, &data, &out, &keys), &mut c).unwrap();
    assert_eq!(c.losses.len(), 1);
    // The output carries the tokenizer the run used.
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(tok.join("tokenizer.json")).unwrap()
    );
    // A path that does not exist says what to give instead.
    let e = ferrotune::train::session::resolve_model_dir(&dir.join("no-such-model").display().to_string())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no such file or folder: name a Hugging Face model folder"),
        "{e}"
    );
    // A folder that is not an adapter says what one is.
    let e = ferrotune::adapters::lora::AdapterConfig::read(&tok)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an adapter folder") && e.contains("checkpoint-N"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_plan_checks_token_ids_against_the_vocabulary() {
    use ferrotune::data::{PreparedData, Sample};
    let data = PreparedData {
        train: vec![Sample::all_trained(vec![5, 40])],
        eval: vec![Sample::all_trained(vec![7])],
        stats: Default::default(),
    };
    let e = data.check_ids_fit(40, &|_| None).unwrap_err().to_string();
    assert!(e.contains("token id 40, but the model's vocabulary has 40 ids"), "{e}");
    assert!(data.check_ids_fit(41, &|_| None).is_ok());
}
