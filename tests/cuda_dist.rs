//! NCCL on one GPU: a data-parallel run of world size 1 through a real NCCL communicator
//! (plain data parallel, ZeRO-2, and ZeRO-3 with its host calls between launches) gives
//! the losses and adapter of the same run without distribution, on the CUDA backend.
//! Needs a CUDA device and NCCL; runs with scripts/gpu-test.sh.
#![cfg(feature = "cuda")]

mod common;
use common::{temp_dir, write_arithmetic, write_tiny_model, CHATML};
use ferrotune::dist::nccl::{unique_id, NcclCollective};
use ferrotune::dist::{DataParallel, ShardingConfig};
use ferrotune::train::run::{train, train_with, Callback};
use ferrotune::train::trainer::StepReport;
use ferrotune::Config;
use std::path::Path;
use std::time::Duration;

#[derive(Default)]
struct Losses(Vec<f64>, Vec<f64>);

impl Callback for Losses {
    fn on_step(&mut self, r: &StepReport) {
        self.0.push(r.loss);
        self.1.push(r.grad_norm);
    }
}

fn config(dir: &Path, out: &str, extra: &str) -> Config {
    let model = write_tiny_model(&dir.join("model"), 3);
    let (train, _) = write_arithmetic(&dir.join("data"), 48, 6);
    let yaml = format!(
        "base_model: {}\ndatasets:\n  - path: {train}\n    type: chat_template\n    chat_template: jinja\n    chat_template_jinja: \"{tpl}\"\n\
         sequence_len: 64\nlearning_rate: 0.01\nadapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\n\
         micro_batch_size: 2\ngradient_accumulation_steps: 2\nmax_steps: 3\nsample_packing: false\nwarmup_steps: 1\n\
         output_dir: {}\ndevice: cuda\nbf16: false\n{extra}",
        model.display(),
        dir.join(out).display(),
        tpl = CHATML.replace('"', "\\\""),
    );
    Config::from_yaml(&yaml, &[]).unwrap()
}

#[test]
fn nccl_world_size_one_equals_the_plain_run() {
    let dir = temp_dir("cuda-dist");
    let plain_cfg = config(&dir, "plain", "");
    let mut plain = Losses::default();
    train(&plain_cfg, &mut plain).unwrap();
    let want = ferrotune::adapters::lora::load(&dir.join("plain")).unwrap().1;
    let zero2 = dir.join("zero2.json");
    std::fs::write(&zero2, r#"{"zero_optimization": {"stage": 2}}"#).unwrap();
    let zero3 = dir.join("zero3.json");
    std::fs::write(&zero3, r#"{"zero_optimization": {"stage": 3}}"#).unwrap();
    for (name, extra) in [
        ("dp", String::new()),
        ("zero2", format!("deepspeed: {}\n", zero2.display())),
        ("zero3", format!("deepspeed: {}\n", zero3.display())),
    ] {
        let cfg = config(&dir, name, &extra);
        let id = unique_id().unwrap_or_else(|e| panic!("this test needs NCCL: {e}"));
        let nccl = NcclCollective::new(0, 0, 1, &id, Duration::from_secs(60)).unwrap();
        let dp = DataParallel::new(Box::new(nccl), ShardingConfig::from_config(&cfg).unwrap());
        let mut got = Losses::default();
        train_with(&cfg, &mut got, Some(dp)).unwrap();
        eprintln!("{name}: losses {:?} vs {:?}", got.0, plain.0);
        assert_eq!(got.0.len(), 3);
        for (a, b) in got.0.iter().zip(&plain.0).chain(got.1.iter().zip(&plain.1)) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1e-6),
                "{name}: {got:?} vs {plain:?}",
                got = (&got.0, &got.1),
                plain = (&plain.0, &plain.1)
            );
        }
        let adapter = ferrotune::adapters::lora::load(&dir.join(name)).unwrap().1;
        for (k, w) in &want {
            let err = common::rel_err(&adapter[k].to_f64(), &w.to_f64());
            assert!(err <= 1e-5, "{name}: {k}: relative error {err:.2e}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
