//! Whole training steps on the WGSL backend against the CPU backend: tiny Llama, Qwen2 (biases,
//! sliding window) and Mistral models with LoRA (dropout on, so both backends must draw the
//! same masks), several steps of forward, backward, gradient clipping and AdamW; the memory
//! plan against what the device allocated; and `ferrotune train` with `device: wgsl`.
//! Runs on any adapter (lavapipe in CI) and fails when there is none.

mod common;
use common::{rand_tensor, rel_err, rng, temp_dir, write_arithmetic, write_tiny_model, CHATML};
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::backend::wgsl::{WgslBackend, WgslContext, WgslOptions};
use ferrotune::backend::Backend;
use ferrotune::exec::Executor;
use ferrotune::model::llama::{
    build_with_attention, prefix_flags, shift_targets, AttnOptions, BuildOptions, LoraOptions,
};
use ferrotune::model::ModelConfig;
use ferrotune::train::session::load_base_weights;
use ferrotune::train::{OptimizerOptions, TrainGraph};
use ferrotune::{DType, HostTensor};
use rand::RngExt;
use std::collections::BTreeMap;

fn wgsl() -> Box<dyn Backend> {
    match WgslContext::new_blocking(WgslOptions::default()) {
        Ok(c) => Box::new(WgslBackend::new(c)),
        Err(e) => panic!("the WGSL tests need a GPU adapter (lavapipe is enough): {e}"),
    }
}

/// A WGSL backend that uses neither `enable f16;` nor subgroups nor cooperative matrices.
fn wgsl_fallback() -> Box<dyn Backend> {
    let opts = WgslOptions {
        without: wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP,
        cooperative_matrix: false,
        ..Default::default()
    };
    match WgslContext::new_blocking(opts) {
        Ok(c) => Box::new(WgslBackend::new(c)),
        Err(e) => panic!("the WGSL tests need a GPU adapter (lavapipe is enough): {e}"),
    }
}

fn tiny(arch: &str, extra: &str) -> ModelConfig {
    let json = format!(
        r#"{{"architectures": ["{arch}"], "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 37, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": false {extra}}}"#
    );
    ModelConfig::parse(&json, "test").unwrap()
}

/// Random base weights (norm gains near 1, Qwen2's biases included).
fn weights(tg: &TrainGraph, seed: u64) -> BTreeMap<String, HostTensor> {
    let g = &tg.model.graph;
    let mut r = rng(seed);
    let mut out = BTreeMap::new();
    for (name, t) in &tg.model.weights {
        let shape = g.shape(*t).to_vec();
        let mut v = rand_tensor(&mut r, &shape, DType::F64).to_f64();
        let norm = name.contains("norm");
        v.iter_mut()
            .for_each(|x| *x = if norm { 1.0 + 0.1 * *x } else { 0.3 * *x });
        out.insert(name.clone(), HostTensor::from_f64(&shape, &v));
    }
    out
}

struct Steps {
    losses: Vec<f64>,
    norms: Vec<f64>,
    /// Every trainable tensor after the last step.
    params: Vec<HostTensor>,
}

/// Runs `steps` training steps (train program, then optimizer program) on `backend`, on the
/// graph as built.
fn train_steps(backend: Box<dyn Backend>, cfg: &ModelConfig, opts: &BuildOptions, steps: u64) -> (Steps, u64, u64) {
    train_steps_with(backend, cfg, opts, &AttnOptions::default(), steps)
}

/// [`train_steps`] with an attention implementation and mask.
fn train_steps_with(
    backend: Box<dyn Backend>,
    cfg: &ModelConfig,
    opts: &BuildOptions,
    attn: &AttnOptions,
    steps: u64,
) -> (Steps, u64, u64) {
    let opt = OptimizerOptions {
        max_grad_norm: Some(0.5),
        ..OptimizerOptions::default()
    };
    let tg = TrainGraph::new(build_with_attention(cfg, opts, attn).unwrap(), &opt).unwrap();
    // The graph as built on every backend (the wgsl backend does not fuse product
    // epilogues; tests/fusion.rs checks the fused graph against this one on the CPU).
    let mut ex = Executor::with_fusion(tg.model.graph.clone(), backend, &tg.programs(), None).unwrap();
    load_base_weights(&mut ex, &tg.model, &weights(&tg, 3)).unwrap();
    let mut r = rng(5);
    for p in &tg.model.lora {
        for t in [p.a, p.b] {
            let info = ex.graph().info(t).clone();
            let v = rand_tensor(&mut r, &info.shape, DType::F64).to_f64();
            let v: Vec<f64> = v.iter().map(|x| 0.2 * x).collect();
            ex.set_tensor(t, &HostTensor::from_f64(&info.shape, &v).cast(info.dtype))
                .unwrap();
        }
    }
    for s in &tg.params {
        for t in [s.grad_acc, s.exp_avg, s.exp_avg_sq] {
            let info = ex.graph().info(t).clone();
            ex.set_tensor(t, &HostTensor::zeros(&info.shape, info.dtype)).unwrap();
        }
    }
    let (rows, seq) = (opts.rows, opts.seq_len);
    let n = rows * seq;
    // Row 0 packs two documents; row 1 is one document followed by padding.
    let ids: Vec<i32> = (0..n).map(|_| r.random_range(0..cfg.vocab_size as i32)).collect();
    let seg: Vec<i32> = (0..n)
        .map(|i| if (i % seq) < seq / 2 + (i / seq) * 3 { 1 } else { 2 })
        .collect();
    let mut pos = vec![0i32; n];
    for i in 0..n {
        if i % seq != 0 && seg[i - 1] == seg[i] {
            pos[i] = pos[i - 1] + 1;
        }
    }
    let labels: Vec<i32> = ids
        .iter()
        .enumerate()
        .map(|(i, &x)| if i >= n - 3 { -100 } else { x })
        .collect();
    let targets = shift_targets(&labels, &seg, seq);
    let count = targets.iter().filter(|&&t| t != -100).count();
    // The first few tokens of each document carry no label: the prompt of a prefix-LM.
    let prompt_labels: Vec<i32> = (0..n).map(|i| if pos[i] < 3 { -100 } else { labels[i] }).collect();
    let seg_u: Vec<u32> = seg.iter().map(|&x| x as u32).collect();
    let prefix = HostTensor::from_i32(&[n], &prefix_flags(&prompt_labels, &seg_u, seq));
    let scale = HostTensor::from_f64(&[1], &[1.0 / count as f64]).cast(ex.graph().dtype(tg.loss_scale));
    let inputs = [
        HostTensor::from_i32(&[n], &ids),
        HostTensor::from_i32(&[n], &pos),
        HostTensor::from_i32(&[n], &seg),
        HostTensor::from_i32(&[n], &targets),
    ];
    let (train, optim) = (
        ex.program_index("train").unwrap(),
        ex.program_index("optimizer").unwrap(),
    );
    let mut out = Steps {
        losses: vec![],
        norms: vec![],
        params: vec![],
    };
    for step in 1..=steps {
        let mut feed = vec![
            (tg.model.input_ids, &inputs[0]),
            (tg.model.positions, &inputs[1]),
            (tg.model.segments, &inputs[2]),
            (tg.model.targets, &inputs[3]),
            (tg.loss_scale, &scale),
        ];
        if let Some(p) = tg.model.prefix {
            feed.push((p, &prefix));
        }
        let drop = tg.model.dropout.map(|(s, p)| {
            (
                (
                    s,
                    HostTensor::from_u32(&[1], &[0x9e37_79b9u32.wrapping_mul(step as u32)]),
                ),
                (p, HostTensor::from_f32(&[1], &[0.25])),
            )
        });
        if let Some(((s, sv), (p, pv))) = &drop {
            feed.push((*s, sv));
            feed.push((*p, pv));
        }
        let o = ex.run(train, &feed).unwrap();
        out.losses.push(o[0].to_f64()[0] / count as f64);
        let hyper = HostTensor::from_f32(&[3], &TrainGraph::hyper_values(&opt, 1e-2, step));
        let o = ex.run(optim, &[(tg.hyper, &hyper)]).unwrap();
        out.norms.push(o[0].to_f64()[0]);
    }
    let trainable: Vec<_> = tg.params.iter().map(|s| s.param).collect();
    out.params = ex.get_tensors(&trainable).unwrap();
    (out, ex.plan().total_bytes, ex.allocated_bytes())
}

fn lora_opts(rows: usize, seq: usize, weight_dtype: DType, dropout: f64) -> BuildOptions {
    BuildOptions {
        rows,
        seq_len: seq,
        weight_dtype,
        act_dtype: DType::F32,
        lora: Some(LoraOptions {
            r: 4,
            alpha: 8.0,
            dropout,
            use_rslora: false,
            targets: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        }),
        train_base: false,
        modules_to_save: vec![],
        loss_rows: None,
    }
}

fn compare(what: &str, cpu: &Steps, gpu: &Steps) {
    for (k, (a, b)) in cpu.losses.iter().zip(&gpu.losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs(),
            "{what}: step {k} loss cpu {a} vs wgsl {b}"
        );
    }
    for (k, (a, b)) in cpu.norms.iter().zip(&gpu.norms).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs(),
            "{what}: step {k} grad norm cpu {a} vs wgsl {b}"
        );
    }
    assert_eq!(cpu.params.len(), gpu.params.len());
    for (k, (a, b)) in cpu.params.iter().zip(&gpu.params).enumerate() {
        let e = rel_err(&b.to_f64(), &a.to_f64());
        assert!(
            e < 1e-4,
            "{what}: trainable tensor {k} after the steps: relative error {e:e}"
        );
    }
    // The steps did something: the losses moved.
    assert!(
        cpu.losses[0] != cpu.losses[cpu.losses.len() - 1],
        "{what}: loss did not change"
    );
}

#[test]
fn lora_training_steps_match_the_cpu_for_llama_qwen2_mistral() {
    for (arch, extra) in [
        ("LlamaForCausalLM", ""),
        (
            "Qwen2ForCausalLM",
            r#", "use_sliding_window": true, "sliding_window": 3, "max_window_layers": 1"#,
        ),
        ("MistralForCausalLM", r#", "sliding_window": 4"#),
    ] {
        let cfg = tiny(arch, extra);
        let opts = lora_opts(2, 11, DType::F32, 0.25);
        let (cpu, _, _) = train_steps(Box::new(CpuBackend::new()), &cfg, &opts, 3);
        let (gpu, planned, allocated) = train_steps(wgsl(), &cfg, &opts, 3);
        compare(arch, &cpu, &gpu);
        assert_eq!(
            planned, allocated,
            "{arch}: memory plan vs bytes the WGSL backend allocated"
        );
    }
}

#[test]
fn half_precision_frozen_weights_match_the_cpu() {
    // Frozen weights stored as bf16 and f16 (widened in the shaders, as the CPU widens them),
    // with and without the device's f16 and subgroup features.
    let cfg = tiny("LlamaForCausalLM", "");
    for dt in [DType::BF16, DType::F16] {
        let opts = lora_opts(1, 9, dt, 0.0);
        let (cpu, _, _) = train_steps(Box::new(CpuBackend::new()), &cfg, &opts, 2);
        let (gpu, _, _) = train_steps(wgsl(), &cfg, &opts, 2);
        compare(&format!("llama {dt}"), &cpu, &gpu);
        let (gpu, _, _) = train_steps(wgsl_fallback(), &cfg, &opts, 2);
        compare(&format!("llama {dt} without f16 and subgroups"), &cpu, &gpu);
    }
}

#[test]
fn full_fine_tuning_steps_match_the_cpu() {
    let cfg = tiny("Qwen2ForCausalLM", "");
    let mut opts = lora_opts(2, 7, DType::F32, 0.0);
    opts.lora = None;
    opts.train_base = true;
    let (cpu, _, _) = train_steps(Box::new(CpuBackend::new()), &cfg, &opts, 2);
    let (gpu, planned, allocated) = train_steps(wgsl(), &cfg, &opts, 2);
    compare("qwen2 full", &cpu, &gpu);
    assert_eq!(planned, allocated, "memory plan vs bytes the WGSL backend allocated");
}

#[test]
fn eager_attention_training_steps_match_the_cpu() {
    // attn_implementation: eager (scores as graph ops) on the WGSL backend, with the plain
    // causal mask, a sliding window, a prefix-LM mask and a user mask expression.
    use ferrotune::ops::{FlexMask, MaskExpr};
    let expr = FlexMask {
        prefix_lm: false,
        expr: Some(MaskExpr::parse("kv_idx <= q_idx && q_idx - kv_idx < 4").unwrap()),
    };
    let prefix = FlexMask {
        prefix_lm: true,
        expr: None,
    };
    for (arch, extra, flex) in [
        ("LlamaForCausalLM", "", FlexMask::default()),
        ("MistralForCausalLM", r#", "sliding_window": 4"#, FlexMask::default()),
        ("LlamaForCausalLM", "", prefix),
        ("LlamaForCausalLM", "", expr),
    ] {
        let cfg = tiny(arch, extra);
        let opts = lora_opts(2, 11, DType::F32, 0.0);
        let attn = AttnOptions { eager: true, flex };
        let what = format!("{arch} eager {:?}", attn.flex);
        let (cpu, _, _) = train_steps_with(Box::new(CpuBackend::new()), &cfg, &opts, &attn, 2);
        let (gpu, planned, allocated) = train_steps_with(wgsl(), &cfg, &opts, &attn, 2);
        compare(&what, &cpu, &gpu);
        assert_eq!(
            planned, allocated,
            "{what}: memory plan vs bytes the WGSL backend allocated"
        );
        // The fused kernels give the same steps as eager on the CPU.
        let fused = AttnOptions {
            eager: false,
            ..attn.clone()
        };
        let (gpu, _, _) = train_steps_with(wgsl(), &cfg, &opts, &fused, 2);
        compare(&format!("{what} fused on wgsl vs eager on cpu"), &cpu, &gpu);
    }
}

fn train_yaml(model: &std::path::Path, tr: &str, ev: &str, out: &std::path::Path, device: &str) -> String {
    format!(
        "base_model: {}\ndatasets:\n  - path: {tr}\n    type: chat_template\n    chat_template: jinja\n    chat_template_jinja: \"{}\"\n\
         test_datasets:\n  - path: {ev}\n    type: chat_template\n    chat_template: jinja\n    chat_template_jinja: \"{}\"\n\
         sequence_len: 64\nlearning_rate: 0.01\nadapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\n\
         micro_batch_size: 4\nmax_steps: 3\noutput_dir: {}\ndevice: {device}\neval_max_new_tokens: 2\n",
        model.display(),
        CHATML.replace('"', "\\\""),
        CHATML.replace('"', "\\\""),
        out.display()
    )
}

/// Runs the CLI with `env` set (and `FERROTUNE_DEVICE` unset unless given): (ok, stdout + stderr).
fn cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    c.args(args).env_remove("FERROTUNE_DEVICE");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), text)
}

#[test]
fn cli_train_on_wgsl_writes_an_adapter() {
    let dir = temp_dir("wgsl-cli");
    let model = write_tiny_model(&dir.join("model"), 7);
    let (tr, ev) = write_arithmetic(&dir.join("data"), 16, 4);
    // `device: wgsl` in the config, and FERROTUNE_DEVICE=wgsl over a config saying cpu.
    for (device, env) in [("wgsl", &[][..]), ("cpu", &[("FERROTUNE_DEVICE", "wgsl")][..])] {
        let out = dir.join(format!("out-{device}"));
        let cfg_path = dir.join(format!("train-{device}.yaml"));
        std::fs::write(&cfg_path, train_yaml(&model, &tr, &ev, &out, device)).unwrap();
        let (ok, text) = cli(&["train", cfg_path.to_str().unwrap()], env);
        assert!(ok, "train on wgsl failed:\n{text}");
        assert!(
            text.contains("device: wgsl ("),
            "the run did not say it used wgsl:\n{text}"
        );
        let (acfg, tensors) = ferrotune::adapters::lora::load(&out).unwrap();
        assert_eq!(acfg.r, 4);
        assert!(!tensors.is_empty());
        let moved = tensors
            .iter()
            .filter(|(k, _)| k.contains("lora_B"))
            .any(|(_, t)| t.to_f64().iter().any(|x| *x != 0.0));
        assert!(moved, "the adapter's B matrices are still zero after training");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn without_a_vulkan_driver_wgsl_is_a_clear_error_and_auto_uses_the_cpu() {
    let dir = temp_dir("wgsl-nodriver");
    let model = write_tiny_model(&dir.join("model"), 8);
    let (tr, ev) = write_arithmetic(&dir.join("data"), 8, 2);
    let missing = dir.join("no-such-icd.json");
    let missing = missing.to_str().unwrap();
    let env = [("VK_DRIVER_FILES", missing), ("VK_ICD_FILENAMES", missing)];
    let (ok, text) = cli(&["devices"], &env);
    assert!(ok, "devices failed:\n{text}");
    assert!(text.contains("wgsl: not available"), "{text}");
    assert!(text.contains("default (device: auto): cpu"), "{text}");
    let cfg_path = dir.join("train.yaml");
    std::fs::write(&cfg_path, train_yaml(&model, &tr, &ev, &dir.join("out"), "wgsl")).unwrap();
    let (ok, text) = cli(&["train", cfg_path.to_str().unwrap()], &env);
    assert!(!ok, "training on wgsl without a driver succeeded:\n{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert!(
        text.contains("no GPU adapter found") && text.contains("Vulkan"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
