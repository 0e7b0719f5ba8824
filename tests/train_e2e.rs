//! Training end to end on a tiny random model: gradient accumulation splits, bit-exact
//! resume, LoRA at step 0, and the CLI from train to generate.

mod common;
use common::train::{adapter, cli, max_rel, rel, yaml, Collect, LORA_KEYS};
use common::{temp_dir, write_arithmetic, write_tiny_model, TINY_CONFIG};
use ferrotune::model::WeightStore;
use ferrotune::train::run::train;
use ferrotune::{Config, DType, HostTensor};
use std::collections::BTreeMap;
use std::path::Path;

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
            (
                key,
                ferrotune::adapters::lora::init_pair(p, 4, 42, i, ferrotune::DType::F32).0,
            )
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
            s.names()
                .iter()
                .map(|n| (n.to_string(), s.get_raw(n).unwrap()))
                .collect()
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
    assert!(
        r0.grad_norms.iter().all(|g| g.is_finite() && *g > 0.5),
        "{:?}",
        r0.grad_norms
    );
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
    let a_moved = initial_lora_a(w).iter().filter(|(k, a0)| w[*k].data != a0.data).count();
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
        "ferrotune_state.json",
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

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// metrics.jsonl as JSON values.
fn metric_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `checkpoint-4` after a run of 4 steps: the trained adapter as it was saved at the end,
/// AdamW's moments for every trainable tensor, the loop state, and the config.
fn check_checkpoint(ck: &Path, out: &Path, cfg_text: &str, metrics: &[serde_json::Value]) {
    let weights = adapter(ck);
    let saved = adapter(out);
    assert_eq!(weights.keys().collect::<Vec<_>>(), saved.keys().collect::<Vec<_>>());
    for (k, t) in &weights {
        assert_eq!(
            t.data, saved[k].data,
            "{k}: the checkpoint of the last step is the output"
        );
    }
    assert_eq!(
        std::fs::read(ck.join("adapter_config.json")).unwrap(),
        std::fs::read(out.join("adapter_config.json")).unwrap()
    );
    // One exp_avg and exp_avg_sq per trainable tensor, of its shape. After 4 steps with
    // beta1 0.9, beta2 0.999, Cauchy-Schwarz bounds m^2 <= (1-b1)^2/(1-b2) * sum_j (b1^2/b2)^j * v
    // (j < 4), about 30.01 v, for any gradients.
    let opt = WeightStore::open(&ck.join("optimizer.safetensors")).unwrap();
    let mut names: Vec<String> = opt.names().iter().map(|n| n.to_string()).collect();
    names.sort();
    let mut want: Vec<String> = weights
        .keys()
        .flat_map(|k| [format!("{k}.exp_avg"), format!("{k}.exp_avg_sq")])
        .collect();
    want.sort();
    assert_eq!(names, want);
    let bound = 0.01 / 0.001 * (0..4).map(|j| (0.81f64 / 0.999).powi(j)).sum::<f64>();
    for (k, t) in &weights {
        let m = opt.get(&format!("{k}.exp_avg"), DType::F32).unwrap();
        let v = opt.get(&format!("{k}.exp_avg_sq"), DType::F32).unwrap();
        assert_eq!((&m.shape, &v.shape), (&t.shape, &t.shape), "{k}");
        let (m, v) = (m.to_f64(), v.to_f64());
        assert!(v.iter().all(|&x| x.is_finite() && x >= 0.0), "{k}: exp_avg_sq");
        assert!(
            v.iter().any(|&x| x > 0.0) && m.iter().any(|&x| x != 0.0),
            "{k}: no moments"
        );
        for (a, b) in m.iter().zip(&v) {
            assert!(a * a <= bound * b * (1.0 + 1e-5) + 1e-30, "{k}: m {a} v {b}");
        }
    }
    // trainer_state.json: where the loop stands, and the log of every step and evaluation;
    // ferrotune_state.json: the data position, seeds and config hash of an exact resume.
    let state = read_json(&ck.join("trainer_state.json"));
    let ours = read_json(&ck.join("ferrotune_state.json"));
    let cfg = Config::from_yaml(cfg_text, &[]).unwrap();
    let steps: Vec<&serde_json::Value> = metrics.iter().filter(|m| m.get("learning_rate").is_some()).collect();
    assert_eq!(state["global_step"], 4);
    assert_eq!(state["max_steps"], 4);
    assert_eq!(state["train_batch_size"], 2);
    assert_eq!(ours["seed"], 42);
    assert_eq!(state["num_train_epochs"], 1.0);
    // 40 samples in rows of 2, no packing: 20 steps an epoch.
    assert_eq!(state["epoch"], 0.2);
    assert_eq!(ours["position"], serde_json::json!({"epoch": 0, "step_in_epoch": 4}));
    assert_eq!(ours["micro_step"], 4);
    let tokens: u64 = steps.iter().map(|s| s["tokens"].as_u64().unwrap()).sum();
    assert_eq!(state["num_input_tokens_seen"], tokens);
    assert_eq!(ours["config_hash"], ferrotune::train::trainer::run_hash(&cfg));
    let log = state["log_history"].as_array().unwrap();
    let logged: Vec<&serde_json::Value> = log.iter().filter(|e| e.get("loss").is_some()).collect();
    assert_eq!(logged.len(), 4);
    for (i, (l, m)) in logged.iter().zip(&steps).enumerate() {
        assert_eq!(l["step"], i as u64 + 1);
        for k in ["loss", "learning_rate", "grad_norm", "tokens", "epoch"] {
            assert_eq!(l[k], m[k], "step {}: {k}", i + 1);
        }
    }
    let evals: Vec<&serde_json::Value> = log.iter().filter(|e| e.get("eval_loss").is_some()).collect();
    let metric_evals: Vec<&serde_json::Value> = metrics.iter().filter(|m| m.get("eval_loss").is_some()).collect();
    assert_eq!(evals.len(), 1);
    assert_eq!(evals[0]["step"], 4);
    assert_eq!(evals[0]["eval_loss"], metric_evals[0]["eval_loss"]);
    // The config it was trained with, as YAML that reads back to the same settings.
    let saved_cfg = Config::from_yaml(&std::fs::read_to_string(ck.join("config.yaml")).unwrap(), &[]).unwrap();
    assert_eq!(saved_cfg.to_json(), cfg.to_json());
}

fn generate(model: &Path, adapter: Option<&Path>) -> String {
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--prompt".into(),
        "What is 2 + 2?".into(),
        "--max-new-tokens".into(),
        "4".into(),
        "--device".into(),
        "cpu".into(),
        "--raw".into(),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter".into(), a.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, stdout, err) = cli(&args);
    assert!(ok, "generate failed: {err}");
    stdout
}

#[test]
fn cli_train_checkpoint_resume_eval_merge_generate() {
    let dir = temp_dir("cli");
    let model = write_tiny_model(&dir.join("model"), 4);
    let (tr, ev) = write_arithmetic(&dir.join("data"), 40, 6);
    let out = dir.join("out");
    let cfg_path = dir.join("config.yaml");
    let cfg_text = yaml(
        &model,
        &tr,
        &ev,
        &out,
        "micro_batch_size: 2\nmax_steps: 4\nsave_steps: 2\nsave_total_limit: 1\n",
    );
    std::fs::write(&cfg_path, &cfg_text).unwrap();
    let cfg = cfg_path.to_str().unwrap();

    let (ok, _, err) = cli(&["train", cfg]);
    assert!(ok, "train failed: {err}");
    for f in ["adapter_model.safetensors", "adapter_config.json", "metrics.jsonl"] {
        assert!(out.join(f).is_file(), "output lacks {f}");
    }
    // The tokenizer files are the base model's, byte for byte.
    let same_tokenizer = |dir: &Path| {
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(
                std::fs::read(dir.join(f)).unwrap(),
                std::fs::read(model.join(f)).unwrap(),
                "{f} in {}",
                dir.display()
            );
        }
    };
    same_tokenizer(&out);
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
    let ck_files: std::collections::BTreeSet<String> = std::fs::read_dir(out.join("checkpoint-4"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let want: std::collections::BTreeSet<String> = [
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
        "ferrotune_state.json",
        "config.yaml",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(ck_files, want);
    // metrics.jsonl: a start line, one line per step, the evaluation at the last step, an end line.
    let metrics = metric_lines(&out);
    assert_eq!(metrics[0]["event"], "start");
    assert_eq!(metrics[0]["info"]["total_steps"], 4);
    let steps: Vec<&serde_json::Value> = metrics.iter().filter(|m| m.get("learning_rate").is_some()).collect();
    assert_eq!(steps.len(), 4);
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["step"], i as u64 + 1);
        assert!(s["loss"].as_f64().unwrap().is_finite() && s["grad_norm"].as_f64().unwrap() > 0.0);
    }
    let evals: Vec<&serde_json::Value> = metrics.iter().filter(|m| m.get("eval_loss").is_some()).collect();
    assert_eq!(evals.len(), 1, "{metrics:?}");
    assert_eq!(evals[0]["step"], 4);
    assert!(evals[0]["eval_label_tokens"].as_u64().unwrap() > 0);
    let last = metrics.last().unwrap();
    assert_eq!(last["event"], "end");
    assert_eq!(last["summary"]["steps"], 4);
    assert_eq!(last["summary"]["final_eval_loss"], evals[0]["eval_loss"]);
    check_checkpoint(&out.join("checkpoint-4"), &out, &cfg_text, &metrics);
    // The evaluation in the log is what `eval` computes through the saved adapter.
    let (ok, stdout, err) = cli(&[
        "eval",
        cfg,
        "--adapter",
        out.to_str().unwrap(),
        "--json",
        "--limit",
        "0",
    ]);
    assert!(ok, "eval failed: {err}");
    let at4: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let (a, b) = (
        at4["eval_loss"].as_f64().unwrap(),
        evals[0]["eval_loss"].as_f64().unwrap(),
    );
    assert!(rel(a, b) < 1e-5, "eval {a} vs logged {b}");
    let ac = read_json(&out.join("adapter_config.json"));
    assert_eq!(ac["peft_type"], "LORA");
    assert_eq!(ac["r"], 4);
    assert_eq!(ac["lora_alpha"], 8);
    assert_eq!(ac["task_type"], "CAUSAL_LM");
    assert_eq!(ac["use_rslora"], false);
    assert_eq!(ac["target_modules"].as_array().unwrap().len(), 7);

    let ck = format!("resume_from_checkpoint={}", out.join("checkpoint-4").display());
    let (ok, _, err) = cli(&["train", cfg, "--set", "max_steps=6", "--set", &ck]);
    assert!(ok, "resume failed: {err}");
    assert!(err.contains("resumed from"), "{err}");
    // Another max_steps is accepted on resume (as in Hugging Face Trainer), with a notice,
    // and the cosine schedule continues over the new total.
    assert!(
        err.contains("notice: the checkpoint was planned for 4 steps, this run for 6"),
        "{err}"
    );
    assert_eq!(read_json(&out.join("checkpoint-6/trainer_state.json"))["max_steps"], 6);
    // The resumed run appends steps 5 and 6 and its own evaluation.
    let metrics = metric_lines(&out);
    let steps: Vec<(u64, f64)> = metrics
        .iter()
        .filter(|m| m.get("learning_rate").is_some())
        .map(|m| (m["step"].as_u64().unwrap(), m["learning_rate"].as_f64().unwrap()))
        .collect();
    assert_eq!(steps.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    let cosine = |t: u64, total: u64| 0.01 * 0.5 * (1.0 + (std::f64::consts::PI * (t - 1) as f64 / total as f64).cos());
    for &(t, lr) in &steps {
        let want = cosine(t, if t <= 4 { 4 } else { 6 });
        assert!((lr - want).abs() < 1e-12, "step {t}: lr {lr}, want {want}");
    }
    let final_eval = metrics.iter().rev().find(|m| m.get("eval_loss").is_some()).unwrap();
    assert_eq!(final_eval["step"], 6);

    let (ok, stdout, err) = cli(&["eval", cfg, "--adapter", out.to_str().unwrap(), "--json"]);
    assert!(ok, "eval failed: {err}");
    let with_adapter: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let a = with_adapter["eval_loss"].as_f64().unwrap();
    assert!(rel(a, final_eval["eval_loss"].as_f64().unwrap()) < 1e-5);
    assert_eq!(with_adapter["exact_match_total"], 6);
    let correct = with_adapter["exact_match_correct"].as_u64().unwrap();
    assert_eq!(with_adapter["exact_match"], 100.0 * correct as f64 / 6.0);

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
    same_tokenizer(&merged);
    // The merged checkpoint gives the unmerged model's loss.
    let merged_cfg = cfg_text.replace(model.to_str().unwrap(), merged.to_str().unwrap());
    let merged_cfg_path = dir.join("merged.yaml");
    std::fs::write(&merged_cfg_path, merged_cfg).unwrap();
    let (ok, stdout, err) = cli(&["eval", merged_cfg_path.to_str().unwrap(), "--json"]);
    assert!(ok, "eval of the merged model failed: {err}");
    let merged_eval: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let b = merged_eval["eval_loss"].as_f64().unwrap();
    assert!(rel(a, b) < 1e-5, "adapter {a} vs merged {b}");

    // Greedy generation: some text, the same each time, and the same from the merged model
    // as from the base model seen through the adapter.
    let text = generate(&merged, None);
    assert!(!text.trim().is_empty(), "generate printed nothing");
    assert_eq!(generate(&merged, None), text);
    assert_eq!(generate(&model, Some(&out)), text);

    let (ok, stdout, err) = cli(&["plan", cfg, "--json"]);
    assert!(ok, "plan failed: {err}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(plan["plan"]["total_bytes"].as_u64().unwrap() > 0);
    // r * (in + out) per pair: q and o 16x16, k and v 16->8, gate and up 16->32, down 32->16.
    let per_layer = 4 * ((16 + 16) * 2 + (16 + 8) * 2 + (16 + 32) * 3);
    assert_eq!(plan["trainable_parameters"], 2 * per_layer);
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
    let err = train(&cfg, &mut Collect::new()).unwrap_err().to_string();
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
