//! Our logits, loss and LoRA gradients against transformers + PEFT on tiny random models
//! (Llama, Mistral with a sliding window, Qwen2 with biases). The fixtures are made by
//! scripts/fixtures/hf_reference.py (transformers 5.17, PEFT 0.21, f32, eager attention).

mod common;
use ferrotune::adapters::lora;
use ferrotune::backend::Backend;
use ferrotune::exec::{Executor, ProgramSpec};
use ferrotune::graph;
use ferrotune::model::llama::{build, BuildOptions, LoraOptions, LINEAR_MODULES};
use ferrotune::model::{ModelConfig, WeightStore};
use ferrotune::train::session::load_base_weights;
use ferrotune::{DType, HostTensor};
use std::path::PathBuf;

fn fixture(arch: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(arch);
    assert!(
        d.join("expected.safetensors").is_file(),
        "missing fixture {}: run scripts/fixtures/hf_reference.py",
        d.display()
    );
    d
}

/// A backend to run the check on.
type MakeBackend = fn() -> Box<dyn Backend>;

fn cpu() -> Box<dyn Backend> {
    Box::new(ferrotune::backend::cpu::CpuBackend::new())
}

/// The WGSL backend on the default adapter (lavapipe in CI); no adapter fails the test.
fn wgsl() -> Box<dyn Backend> {
    use ferrotune::backend::wgsl::{WgslBackend, WgslContext, WgslOptions};
    match WgslContext::new_blocking(WgslOptions::default()) {
        Ok(c) => Box::new(WgslBackend::new(c)),
        Err(e) => panic!("the WGSL tests need a GPU adapter (lavapipe is enough): {e}"),
    }
}

fn check(arch: &str, backend: MakeBackend) {
    let d = fixture(arch);
    let cfg = ModelConfig::from_file(&d.join("model/config.json")).unwrap();
    let store = WeightStore::open(&d.join("model")).unwrap();
    let exp = WeightStore::open(&d.join("expected.safetensors")).unwrap();
    let ids = exp.get_raw("input_ids").unwrap().to_i32();
    let labels = exp.get_raw("labels").unwrap().to_i32();
    let (rows, seq) = (2, ids.len() / 2);
    let n = rows * seq;
    // transformers shifts labels inside each row: position t predicts labels[t + 1].
    let mut targets = vec![-100; n];
    for r in 0..rows {
        for t in 0..seq - 1 {
            targets[r * seq + t] = labels[r * seq + t + 1];
        }
    }
    let count = targets.iter().filter(|&&t| t != -100).count() as f64;
    let (adapter_cfg, adapter) = lora::load(&d.join("adapter")).unwrap();
    for with_lora in [false, true] {
        let opts = BuildOptions {
            rows,
            seq_len: seq,
            weight_dtype: DType::F32,
            act_dtype: DType::F32,
            lora: with_lora.then(|| LoraOptions {
                r: adapter_cfg.r,
                alpha: adapter_cfg.lora_alpha,
                dropout: 0.0,
                use_rslora: false,
                targets: LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
            }),
            train_base: false,
            modules_to_save: vec![],
            loss_rows: None,
        };
        let mut m = build(&cfg, &opts).unwrap();
        let seed = m.graph.input("seed", &[1], DType::F32);
        let trainable = m.trainable.clone();
        let mut outputs = vec![m.logits, m.loss_sum];
        if with_lora {
            let grads = graph::backward(&mut m.graph, m.loss_sum, seed, &trainable).unwrap();
            outputs.extend(trainable.iter().map(|t| grads[t]));
        }
        let mut ex = Executor::new(m.graph.clone(), backend(), &[ProgramSpec::new("f", &outputs, &[])]).unwrap();
        load_base_weights(&mut ex, &m, &store).unwrap();
        for p in &m.lora {
            ex.set_tensor(p.a, &adapter[&lora::lora_a_key(&p.module)]).unwrap();
            ex.set_tensor(p.b, &adapter[&lora::lora_b_key(&p.module)]).unwrap();
        }
        let t = |v: &[i32]| HostTensor::from_i32(&[n], v);
        let (a, b, c, tg) = (
            t(&ids),
            t(&(0..n).map(|i| (i % seq) as i32).collect::<Vec<_>>()),
            t(&vec![1; n]),
            t(&targets),
        );
        let s = HostTensor::from_f32(&[1], &[1.0 / count as f32]);
        let mut feed = vec![(m.input_ids, &a), (m.positions, &b), (m.segments, &c), (m.targets, &tg)];
        if with_lora {
            feed.push((seed, &s));
        }
        let out = ex.run(0, &feed).unwrap();
        let (lk, sk) = if with_lora {
            ("peft_logits", "peft_loss")
        } else {
            ("logits", "loss")
        };
        let want_logits = exp.get_raw(lk).unwrap().to_f64();
        let err = common::rel_err(&out[0].to_f64(), &want_logits);
        let on = ex.backend().name();
        assert!(
            err < 1e-4,
            "{arch} on {on} (lora {with_lora}): logits relative error {err:e}"
        );
        let loss = out[1].to_f64()[0] / count;
        let want = exp.get_raw(sk).unwrap().to_f64()[0];
        assert!(
            (loss - want).abs() < 1e-4 * want,
            "{arch} on {on} (lora {with_lora}): loss {loss} vs {want}"
        );
        if with_lora {
            for (k, &t) in trainable.iter().enumerate() {
                let name = &ex.graph().info(t).name;
                let want = exp.get_raw(&format!("grad.{name}")).unwrap().to_f64();
                let err = common::rel_err(&out[2 + k].to_f64(), &want);
                assert!(err < 1e-4, "{arch} on {on}: gradient of {name}: relative error {err:e}");
            }
        }
    }
}

#[test]
fn llama_matches_transformers_and_peft() {
    check("llama", cpu);
}

#[test]
fn mistral_with_sliding_window_matches_transformers_and_peft() {
    check("mistral", cpu);
}

#[test]
fn qwen2_with_biases_matches_transformers_and_peft() {
    check("qwen2", cpu);
}

#[test]
fn wgsl_matches_transformers_and_peft_for_llama_mistral_qwen2() {
    for arch in ["llama", "mistral", "qwen2"] {
        check(arch, wgsl);
    }
}
