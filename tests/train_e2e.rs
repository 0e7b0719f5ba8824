//! Training end to end on a tiny random model: gradient accumulation splits, bit-exact
//! resume, LoRA at step 0, and the CLI from train to generate.

mod common;
use common::train::{adapter, cli, max_rel, rel, yaml, Collect, LORA_KEYS};
use common::{temp_dir, write_arithmetic, write_tiny_model, TINY_CONFIG};
use ferrotune::train::run::train;
use ferrotune::{Config, HostTensor};
use std::collections::BTreeMap;

/// PEFT's initial A of every pair of the tiny model (lora_r 4, the default seed 42), by key.
fn initial_lora_a(trained: &BTreeMap<String, HostTensor>) -> BTreeMap<String, HostTensor> {
    use ferrotune::model::llama::{build, BuildOptions, LoraOptions, LINEAR_MODULES};
    let cfg = ferrotune::model::ModelConfig::parse(TINY_CONFIG, "tiny").unwrap();
    let opts = BuildOptions {
        rows: 1,
        seq_len: 8,
        weight_dtype: ferrotune::DType::F32,
        act_dtype: ferrotune::DType::F32,
        lora: Some(LoraOptions {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            targets: LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
        }),
        train_base: false,
        modules_to_save: vec![],
        loss_rows: None,
    };
    let m = build(&cfg, &opts).unwrap();
    let a: BTreeMap<String, HostTensor> = m
        .lora
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let key = ferrotune::adapters::lora::lora_a_key(&p.module);
            (key, ferrotune::adapters::lora::init_pair(p, 4, 42, i, ferrotune::DType::F32).0)
        })
        .collect();
    assert!(a.keys().all(|k| trained.contains_key(k)));
    a
}

/// Per-step loss and gradient norm of one micro-batch split, and the trained tensors.
struct SplitRun {
    losses: Vec<f64>,
    grad_norms: Vec<f64>,
    weights: BTreeMap<String, HostTensor>,
}

/// Three optimizer steps at 8x1, 4x2 and 1x8 rows x micro-batches. AdamW's update barely
/// depends on the gradient's scale, so the gradient norm (reported before clipping) is what
/// catches a mis-normalised micro-batch; the weights after three steps catch the rest (LoRA
/// A only moves once B is nonzero, from step 2).
fn split_runs(name: &str, lora: bool) -> Vec<SplitRun> {
    let dir = temp_dir(name);
    let model = write_tiny_model(&dir.join("model"), 1);
    let (tr, ev) = write_arithmetic(&dir.join("data"), 64, 8);
    let mut runs = Vec::new();
    for (mbs, ga) in [(8, 1), (4, 2), (1, 8)] {
        let out = dir.join(format!("out-{mbs}x{ga}"));
        let extra = format!(
            "micro_batch_size: {mbs}\ngradient_accumulation_steps: {ga}\nmax_steps: 3\nsample_packing: false\n\
             max_grad_norm: 0.5\n"
        );
        let mut text = yaml(&model, &tr, &ev, &out, &extra);
        if !lora {
            text = text.replace(LORA_KEYS, "");
        }
        let cfg = Config::from_yaml(&text, &[]).unwrap();
        assert_eq!(cfg.is_lora(), lora);
        let mut c = Collect::new();
        train(&cfg, &mut c).unwrap();
        assert_eq!(c.losses.len(), 3);
        let weights = if lora {
            adapter(&out)
        } else {
            let s = ferrotune::model::WeightStore::open(&out.join("model.safetensors")).unwrap();
            s.names().iter().map(|n| (n.to_string(), s.get_raw(n).unwrap())).collect()
        };
        runs.push(SplitRun {
            losses: c.losses,
            grad_norms: c.grad_norms,
            weights,
        });
    }
    std::fs::remove_dir_all(&dir).unwrap();
    runs
}

fn assert_same_steps(runs: &[SplitRun]) {
    let r0 = &runs[0];
    for r in &runs[1..] {
        for s in 0..3 {
            assert!(
                rel(r.losses[s], r0.losses[s]) < 1e-5,
                "step {}: loss {} vs {}",
                s + 1,
                r.losses[s],
                r0.losses[s]
            );
            assert!(
                rel(r.grad_norms[s], r0.grad_norms[s]) < 1e-5,
                "step {}: grad_norm {} vs {}",
                s + 1,
                r.grad_norms[s],
                r0.grad_norms[s]
            );
        }
        let rw = max_rel(&r.weights, &r0.weights);
        assert!(rw < 1e-5, "weights after 3 steps differ by {rw:e}");
    }
    // Clipping (max_grad_norm 0.5) takes part in every step.
    assert!(r0.grad_norms.iter().all(|g| g.is_finite() && *g > 0.5), "{:?}", r0.grad_norms);
}

#[test]
fn micro_batch_splits_give_the_same_lora_steps() {
    let runs = split_runs("ga-lora", true);
    assert_same_steps(&runs);
    // Both factors moved: B from zero, A from its initial values (checked against a
    // fresh initialisation of the same seed).
    let w = &runs[0].weights;
    let b_norm: f64 = w
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .map(|(_, t)| t.to_f64().iter().map(|x| x.abs()).sum::<f64>())
        .sum();
    assert!(b_norm > 0.0);
    let a_moved = initial_lora_a(w)
        .iter()
        .filter(|(k, a0)| w[*k].data != a0.data)
        .count();
    assert_eq!(a_moved, w.keys().filter(|k| k.contains("lora_A")).count());
}

#[test]
fn micro_batch_splits_give_the_same_full_fine_tuning_steps() {
    let runs = split_runs("ga-full", false);
    assert_same_steps(&runs);
}

#[test]
fn resume_reproduces_the_uninterrupted_run_bit_for_bit() {
    let dir = temp_dir("resume");
    let model = write_tiny_model(&dir.join("model"), 2);
    let (tr, ev) = write_arithmetic(&dir.join("data"), 80, 8);
    let extra = "micro_batch_size: 2\ngradient_accumulation_steps: 2\nmax_steps: 6\nsave_steps: 3\nsample_packing: true\nlora_dropout: 0.1\nwarmup_steps: 2\n";
    let full_out = dir.join("full");
    let cfg = Config::from_yaml(&yaml(&model, &tr, &ev, &full_out, extra), &[]).unwrap();
    let mut full = Collect::new();
    train(&cfg, &mut full).unwrap();

    let part_out = dir.join("part");
    let cfg = Config::from_yaml(&yaml(&model, &tr, &ev, &part_out, extra), &[]).unwrap();
    let mut first = Collect::stopping_at(3);
    let s = train(&cfg, &mut first).unwrap();
    assert!(s.interrupted);
    let ck = part_out.join("checkpoint-3");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
        "config.yaml",
    ] {
        assert!(ck.join(f).is_file(), "checkpoint-3 lacks {f}");
    }
    let resume = format!("resume_from_checkpoint={}", ck.display());
    let cfg = Config::from_yaml(&yaml(&model, &tr, &ev, &part_out, extra), &[resume]).unwrap();
    let mut second = Collect::new();
    train(&cfg, &mut second).unwrap();

    let resumed: Vec<f64> = first.losses.iter().chain(&second.losses).copied().collect();
    assert_eq!(resumed.len(), 6);
    for (a, b) in resumed.iter().zip(&full.losses) {
        assert_eq!(a.to_bits(), b.to_bits(), "losses {resumed:?} vs {:?}", full.losses);
    }
    let (a, b) = (adapter(&full_out), adapter(&part_out));
    for (k, t) in &a {
        assert_eq!(t.data, b[k].data, "{k} differs after resume");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lora_at_step_zero_is_the_base_model_and_counts_r_in_plus_out() {
    use ferrotune::exec::ProgramSpec;
    use ferrotune::model::llama::{build, BuildOptions, LoraOptions, LINEAR_MODULES};
    use ferrotune::train::session::load_base_weights;
    let dir = temp_dir("step0");
    let model = write_tiny_model(&dir.join("model"), 3);
    let cfg = ferrotune::model::ModelConfig::from_file(&model.join("config.json")).unwrap();
    let store = ferrotune::model::WeightStore::open(&model.join("model.safetensors")).unwrap();
    let r = 4;
    let logits_of = |lora: Option<LoraOptions>| {
        let opts = BuildOptions {
            rows: 1,
            seq_len: 12,
            weight_dtype: ferrotune::DType::F32,
            act_dtype: ferrotune::DType::F32,
            lora,
            train_base: false,
            modules_to_save: vec![],
            loss_rows: None,
        };
        let m = build(&cfg, &opts).unwrap();
        let expected: usize = m.lora.iter().map(|p| r * (p.in_features + p.out_features)).sum();
        let trainable: usize = m.trainable.iter().map(|&t| m.graph.info(t).numel()).sum();
        assert_eq!(trainable, expected);
        let mut ex = common::cpu_executor(m.graph.clone(), &[ProgramSpec::new("f", &[m.logits], &[])]);
        load_base_weights(&mut ex, &m, &store).unwrap();
        for (i, p) in m.lora.iter().enumerate() {
            let (a, b) = ferrotune::adapters::lora::init_pair(p, r, 7, i, ferrotune::DType::F32);
            assert!(a
                .to_f64()
                .iter()
                .all(|&x| x.abs() <= 1.0 / (p.in_features as f64).sqrt()));
            ex.set_tensor(p.a, &a).unwrap();
            ex.set_tensor(p.b, &b).unwrap();
        }
        let ids: Vec<i32> = (0..12).map(|i| 100 + 37 * i).collect();
        let pos: Vec<i32> = (0..12).collect();
        let n = 12;
        let feed_v = [
            HostTensor::from_i32(&[n], &ids),
            HostTensor::from_i32(&[n], &pos),
            HostTensor::from_i32(&[n], &[1; 12]),
        ];
        let out = ex
            .run(
                0,
                &[
                    (m.input_ids, &feed_v[0]),
                    (m.positions, &feed_v[1]),
                    (m.segments, &feed_v[2]),
                ],
            )
            .unwrap();
        out[0].to_f32()
    };
    let base = logits_of(None);
    let all = LINEAR_MODULES.iter().map(|s| s.to_string()).collect();
    let adapted = logits_of(Some(LoraOptions {
        r,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        targets: all,
    }));
    assert_eq!(base, adapted, "LoRA at initialisation changed the logits");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cli_train_checkpoint_resume_eval_merge_generate() {
    let dir = temp_dir("cli");
    let model = write_tiny_model(&dir.join("model"), 4);
    let (tr, ev) = write_arithmetic(&dir.join("data"), 40, 6);
    let out = dir.join("out");
    let cfg_path = dir.join("config.yaml");
    std::fs::write(
        &cfg_path,
        yaml(
            &model,
            &tr,
            &ev,
            &out,
            "micro_batch_size: 2\nmax_steps: 4\nsave_steps: 2\nsave_total_limit: 1\n",
        ),
    )
    .unwrap();
    let cfg = cfg_path.to_str().unwrap();

    let (ok, _, err) = cli(&["train", cfg]);
    assert!(ok, "train failed: {err}");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).is_file(), "output lacks {f}");
    }
    // save_total_limit: 1 keeps only the newest checkpoint; nothing half-written remains.
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.contains(&"checkpoint-4".to_string()) && !names.contains(&"checkpoint-2".to_string()),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.starts_with('.')), "{names:?}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps = metrics.lines().filter(|l| l.contains("\"learning_rate\"")).count();
    assert_eq!(steps, 4, "{metrics}");
    let ac: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(ac["peft_type"], "LORA");
    assert_eq!(ac["r"], 4);
    assert_eq!(ac["lora_alpha"], 8);
    assert_eq!(ac["task_type"], "CAUSAL_LM");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint-4/trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["global_step"], 4);

    let ck = format!("resume_from_checkpoint={}", out.join("checkpoint-4").display());
    let (ok, _, err) = cli(&["train", cfg, "--set", "max_steps=6", "--set", &ck]);
    assert!(ok, "resume failed: {err}");
    assert!(err.contains("resumed from"), "{err}");
    assert!(out.join("checkpoint-6/trainer_state.json").is_file());

    let (ok, stdout, err) = cli(&["eval", cfg, "--adapter", out.to_str().unwrap(), "--json"]);
    assert!(ok, "eval failed: {err}");
    let with_adapter: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(with_adapter["eval_loss"].as_f64().unwrap().is_finite());
    assert_eq!(with_adapter["exact_match_total"], 6);

    let merged = dir.join("merged");
    let (ok, _, err) = cli(&[
        "merge",
        cfg,
        "--adapter",
        out.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(ok, "merge failed: {err}");
    assert!(merged.join("model.safetensors").is_file() && merged.join("config.json").is_file());
    // The merged checkpoint gives the unmerged model's loss.
    let merged_cfg = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace(model.to_str().unwrap(), merged.to_str().unwrap());
    let merged_cfg_path = dir.join("merged.yaml");
    std::fs::write(&merged_cfg_path, merged_cfg).unwrap();
    let (ok, stdout, err) = cli(&["eval", merged_cfg_path.to_str().unwrap(), "--json"]);
    assert!(ok, "eval of the merged model failed: {err}");
    let merged_eval: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let (a, b) = (
        with_adapter["eval_loss"].as_f64().unwrap(),
        merged_eval["eval_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-5 * a, "adapter {a} vs merged {b}");

    let (ok, _stdout, err) = cli(&[
        "generate",
        "--model",
        merged.to_str().unwrap(),
        "--prompt",
        "What is 2 + 2?",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--raw",
    ]);
    assert!(ok, "generate failed: {err}");
    let (ok, stdout, err) = cli(&["plan", cfg, "--json"]);
    assert!(ok, "plan failed: {err}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(plan["plan"]["total_bytes"].as_u64().unwrap() > 0);
    assert!(plan["trainable_parameters"].as_u64().unwrap() > 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn full_fine_tuning_writes_a_hugging_face_checkpoint() {
    let dir = temp_dir("full");
    let model = write_tiny_model(&dir.join("model"), 5);
    let (tr, ev) = write_arithmetic(&dir.join("data"), 24, 4);
    let out = dir.join("out");
    let text = yaml(
        &model,
        &tr,
        &ev,
        &out,
        "micro_batch_size: 2\nmax_steps: 2\nweight_decay: 0.1\n",
    )
    .replace(LORA_KEYS, "");
    let cfg = Config::from_yaml(&text, &[]).unwrap();
    assert!(!cfg.is_lora());
    let mut c = Collect::new();
    train(&cfg, &mut c).unwrap();
    assert_eq!(c.losses.len(), 2);
    let trained = ferrotune::model::WeightStore::open(&out.join("model.safetensors")).unwrap();
    let base = ferrotune::model::WeightStore::open(&model.join("model.safetensors")).unwrap();
    assert_eq!(trained.names().len(), base.names().len());
    let changed = base
        .names()
        .iter()
        .filter(|n| trained.get_raw(n).unwrap().data != base.get_raw(n).unwrap().data)
        .count();
    assert_eq!(
        changed,
        base.names().len(),
        "every weight is trained in a full fine-tune"
    );
    let again = ferrotune::model::ModelConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(
        again,
        ferrotune::model::ModelConfig::from_file(&model.join("config.json")).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_non_finite_loss_stops_with_the_step_and_the_last_checkpoint() {
    let dir = temp_dir("nan");
    let model = write_tiny_model(&dir.join("model"), 6);
    // Poison one norm weight: every forward pass gives NaN.
    let mut tensors: Vec<(String, HostTensor)> = Vec::new();
    let store = ferrotune::model::WeightStore::open(&model.join("model.safetensors")).unwrap();
    for n in store.names() {
        let mut t = store.get_raw(n).unwrap();
        if n == "model.norm.weight" {
            let mut v = t.to_f32();
            v[0] = f32::NAN;
            t = HostTensor::from_f32(&t.shape, &v);
        }
        tensors.push((n.to_string(), t));
    }
    drop(store);
    ferrotune::model::write_safetensors(&model.join("model.safetensors"), &tensors, None).unwrap();
    let (tr, ev) = write_arithmetic(&dir.join("data"), 16, 4);
    let out = dir.join("out");
    let cfg = Config::from_yaml(
        &yaml(&model, &tr, &ev, &out, "micro_batch_size: 2\nmax_steps: 3\n"),
        &[],
    )
    .unwrap();
    let err = train(
        &cfg,
        &mut Collect::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("step 1: the loss is NaN") && err.contains("no checkpoint was saved yet"),
        "{err}"
    );
    // Asked to, the run skips such steps instead and leaves the adapter untouched.
    let cfg = Config::from_yaml(
        &yaml(
            &model,
            &tr,
            &ev,
            &out,
            "micro_batch_size: 2\nmax_steps: 3\nskip_nonfinite_steps: true\n",
        ),
        &[],
    )
    .unwrap();
    let mut c = Collect::new();
    train(&cfg, &mut c).unwrap();
    assert_eq!(c.losses.len(), 3);
    let b_sum: f64 = adapter(&out)
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .map(|(_, t)| t.to_f64().iter().map(|x| x.abs()).sum::<f64>())
        .sum();
    assert_eq!(b_sum, 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}
