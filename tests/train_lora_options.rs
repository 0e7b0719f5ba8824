//! The LoRA keys beyond r and alpha: `peft_use_rslora` (the scale), `lora_modules_to_save`
//! (fully trained modules, saved under PEFT's keys) and `lora_model_dir` (start from an
//! adapter), on the tiny random model.

mod common;
use common::train::{adapter, cli, rel, yaml, Collect};
use common::{temp_dir, write_arithmetic, write_tiny_model, write_tiny_model_untied};
use ferrotune::adapters::lora::{self, AdapterConfig};
use ferrotune::exec::ProgramSpec;
use ferrotune::model::llama::{build, BuildOptions, LoraOptions, LINEAR_MODULES};
use ferrotune::model::{ModelConfig, WeightStore};
use ferrotune::train::run::{build_trainer, open_model, prepare_data, train, Quiet, TrainSummary};
use ferrotune::train::session::{load_base_weights, WeightSource};
use ferrotune::{Config, DType, HostTensor};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const EMBED: &str = "base_model.model.model.embed_tokens.weight";
const HEAD: &str = "base_model.model.lm_head.weight";

/// A model, arithmetic data and a place for outputs.
struct Setup {
    dir: PathBuf,
    model: PathBuf,
    train: String,
    eval: String,
}

impl Setup {
    fn new(name: &str, tied: bool) -> Self {
        let dir = temp_dir(name);
        let model = if tied {
            write_tiny_model(&dir.join("model"), 11)
        } else {
            write_tiny_model_untied(&dir.join("model"), 11)
        };
        let (train, eval) = write_arithmetic(&dir.join("data"), 16, 4);
        Setup {
            dir,
            model,
            train,
            eval,
        }
    }

    /// Writes the config of a run into `<dir>/<name>.yaml` and reads it.
    fn config(&self, name: &str, extra: &str, set: &[&str]) -> (Config, PathBuf) {
        self.config_with(name, extra, set, |t| t)
    }

    /// [`Setup::config`] with the YAML text rewritten by `edit` first.
    fn config_with(&self, name: &str, extra: &str, set: &[&str], edit: impl Fn(String) -> String) -> (Config, PathBuf) {
        let text = edit(yaml(
            &self.model,
            &self.train,
            &self.eval,
            &self.dir.join(name),
            &format!("micro_batch_size: 4\n{extra}"),
        ));
        let path = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&path, &text).unwrap();
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        (Config::from_yaml(&text, &set).unwrap(), path)
    }

    fn base(&self) -> WeightStore {
        WeightStore::open(&self.model.join("model.safetensors")).unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cfg: &Config) -> TrainSummary {
    let s = train(cfg, &mut Collect::new()).unwrap();
    assert!(!s.interrupted && s.final_eval_loss.is_some());
    s
}

/// `ferrotune eval CONFIG --adapter DIR`: the held-out loss of the base model seen through
/// the saved adapter (merged on load), computed apart from the trainer.
fn eval_through_adapter(cfg_path: &Path, adapter_dir: &Path) -> f64 {
    let (ok, stdout, err) = cli(&[
        "eval",
        cfg_path.to_str().unwrap(),
        "--adapter",
        adapter_dir.to_str().unwrap(),
        "--limit",
        "0",
        "--json",
    ]);
    assert!(ok, "eval failed: {err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    v["eval_loss"].as_f64().unwrap()
}

fn rows_changed(a: &HostTensor, b: &HostTensor) -> Vec<usize> {
    assert_eq!(a.shape, b.shape);
    let (x, y) = (a.to_f32(), b.to_f32());
    let w = a.shape[1];
    (0..a.shape[0])
        .filter(|&r| x[r * w..(r + 1) * w] != y[r * w..(r + 1) * w])
        .collect()
}

/// Logits of the tiny model over a fixed sequence: the base weights in `weights`, with LoRA
/// pairs (`lora`: options and (A, B) per pair in build order) when given.
fn logits(
    cfg: &ModelConfig,
    weights: &dyn WeightSource,
    lora: Option<(LoraOptions, &[(HostTensor, HostTensor)])>,
) -> Vec<f64> {
    let n = 10;
    let opts = BuildOptions {
        rows: 1,
        seq_len: n,
        weight_dtype: DType::F32,
        act_dtype: DType::F32,
        lora: lora.as_ref().map(|l| l.0.clone()),
        train_base: false,
        modules_to_save: vec![],
        loss_rows: None,
    };
    let m = build(cfg, &opts).unwrap();
    let mut ex = common::cpu_executor(m.graph.clone(), &[ProgramSpec::new("f", &[m.logits], &[])]);
    load_base_weights(&mut ex, &m, weights).unwrap();
    if let Some((_, pairs)) = lora {
        assert_eq!(pairs.len(), m.lora.len());
        for (p, (a, b)) in m.lora.iter().zip(pairs) {
            ex.set_tensor(p.a, a).unwrap();
            ex.set_tensor(p.b, b).unwrap();
        }
    }
    let ids: Vec<i32> = (0..n as i32).map(|i| 300 + 71 * i).collect();
    let pos: Vec<i32> = (0..n as i32).collect();
    let feed = [
        HostTensor::from_i32(&[n], &ids),
        HostTensor::from_i32(&[n], &pos),
        HostTensor::from_i32(&[n], &vec![1; n]),
    ];
    let out = ex
        .run(
            0,
            &[(m.input_ids, &feed[0]), (m.positions, &feed[1]), (m.segments, &feed[2])],
        )
        .unwrap();
    out[0].to_f64()
}

#[test]
fn rslora_scales_the_update_by_alpha_over_sqrt_r() {
    let s = Setup::new("rslora", true);
    let cfg = ModelConfig::from_file(&s.model.join("config.json")).unwrap();
    let store = s.base();
    let (r, alpha) = (4usize, 8.0);
    let opts = LoraOptions {
        r,
        alpha,
        dropout: 0.0,
        use_rslora: true,
        targets: LINEAR_MODULES.iter().map(|m| m.to_string()).collect(),
    };
    // Random A and nonzero B on every linear module.
    let probe = build(
        &cfg,
        &BuildOptions {
            rows: 1,
            seq_len: 10,
            weight_dtype: DType::F32,
            act_dtype: DType::F32,
            lora: Some(opts.clone()),
            train_base: false,
            modules_to_save: vec![],
            loss_rows: None,
        },
    )
    .unwrap();
    let mut rng = common::rng(3);
    let pairs: Vec<(HostTensor, HostTensor)> = probe
        .lora
        .iter()
        .map(|p| {
            (
                common::rand_tensor(&mut rng, &[r, p.in_features], DType::F32),
                HostTensor::from_f64(
                    &[p.out_features, r],
                    &common::randn(&mut rng, p.out_features * r)
                        .iter()
                        .map(|x| 0.05 * x)
                        .collect::<Vec<_>>(),
                )
                .cast(DType::F32),
            )
        })
        .collect();
    let adapted = logits(&cfg, &store, Some((opts, &pairs)));
    // The same model with W + s B A written out in f64, for a given scale s.
    let merged_with = |scale: f64| {
        let mut w: BTreeMap<String, HostTensor> = store
            .names()
            .iter()
            .map(|n| (n.to_string(), store.get(n, DType::F32).unwrap()))
            .collect();
        for (p, (a, b)) in probe.lora.iter().zip(&pairs) {
            let name = format!("{}.weight", p.module);
            let (wv, av, bv) = (w[&name].to_f64(), a.to_f64(), b.to_f64());
            let (o, i) = (p.out_features, p.in_features);
            let mut m = wv.clone();
            for oo in 0..o {
                for ii in 0..i {
                    let ba: f64 = (0..r).map(|k| bv[oo * r + k] * av[k * i + ii]).sum();
                    m[oo * i + ii] += scale * ba;
                }
            }
            w.insert(name, HostTensor::from_f64(&[o, i], &m).cast(DType::F32));
        }
        logits(&cfg, &w, None)
    };
    let rs = merged_with(alpha / (r as f64).sqrt());
    let plain = merged_with(alpha / r as f64);
    let base = logits(&cfg, &store, None);
    let err = common::rel_err(&adapted, &rs);
    assert!(err < 1e-5, "rsLoRA logits vs W + alpha/sqrt(r) B A: {err:e}");
    // The scales are told apart: alpha/r gives other logits, and the adapter matters.
    assert!(common::rel_err(&adapted, &plain) > 1e-3);
    assert!(common::rel_err(&adapted, &base) > 1e-3);

    // Trained with peft_use_rslora, the adapter says so, and evaluating through it (merged
    // with the scale its config implies) gives the trainer's own final eval loss.
    let (c, path) = s.config("out", "max_steps: 2\npeft_use_rslora: true\n", &[]);
    let summary = run(&c);
    let saved = AdapterConfig::read(&c.output_dir).unwrap();
    assert!(saved.use_rslora);
    assert_eq!(saved.scale(), alpha / (r as f64).sqrt());
    let trained = summary.final_eval_loss.unwrap();
    let through = eval_through_adapter(&path, &c.output_dir);
    assert!(rel(through, trained) < 1e-5, "{through} vs {trained}");
    // Read as plain LoRA, the same tensors give another loss.
    let plain_dir = s.dir.join("as-plain");
    let mut as_plain = saved.clone();
    as_plain.use_rslora = false;
    let tensors: Vec<(String, HostTensor)> = adapter(&c.output_dir).into_iter().collect();
    lora::save(&plain_dir, &as_plain, &tensors).unwrap();
    assert!(rel(eval_through_adapter(&path, &plain_dir), trained) > 1e-5);
}

#[test]
fn modules_to_save_trains_embed_tokens_and_lm_head_under_peft_keys() {
    let s = Setup::new("mts-untied", false);
    let (c, path) = s.config("out", "lora_modules_to_save: [embed_tokens, lm_head]\n", &[]);
    let summary = run(&c);
    assert_eq!(summary.steps, 4, "one epoch of 16 samples in micro-batches of 4");
    let saved = AdapterConfig::read(&c.output_dir).unwrap();
    assert_eq!(
        saved.modules_to_save,
        Some(vec!["embed_tokens".to_string(), "lm_head".to_string()])
    );
    assert!(!saved.ensure_weight_tying);
    let t = adapter(&c.output_dir);
    let pairs = t.keys().filter(|k| k.contains(".lora_")).count();
    assert_eq!(pairs, 2 * 7 * 2, "A and B on 7 modules of 2 layers");
    assert_eq!(t.len(), pairs + 2, "{:?}", t.keys().collect::<Vec<_>>());
    let base = s.base();
    let (embed0, head0) = (
        base.get("model.embed_tokens.weight", DType::F32).unwrap(),
        base.get("lm_head.weight", DType::F32).unwrap(),
    );
    // The LM head gets a gradient in every row (the softmax covers the vocabulary).
    assert_eq!(rows_changed(&t[HEAD], &head0).len(), 32000);
    // An embedding row gets one only from a token some label position attends to: a token
    // before the last label of its sample (with no weight decay, Adam leaves the others).
    let p = open_model(&c).unwrap();
    let data = prepare_data(&c, &p).unwrap();
    let mut expected = BTreeSet::new();
    for smp in &data.train {
        let last = smp.labels.iter().rposition(|&l| l != -100).unwrap();
        expected.extend(smp.input_ids[..last].iter().map(|&t| t as usize));
    }
    let changed: BTreeSet<usize> = rows_changed(&t[EMBED], &embed0).into_iter().collect();
    assert_eq!(changed, expected);
    // The saved modules are what an evaluation through the adapter uses.
    let trained = summary.final_eval_loss.unwrap();
    let through = eval_through_adapter(&path, &c.output_dir);
    assert!(rel(through, trained) < 1e-5, "{through} vs {trained}");
}

#[test]
fn modules_to_save_lm_head_with_tied_embeddings_trains_the_shared_matrix() {
    let s = Setup::new("mts-tied", true);
    let (c, path) = s.config("out", "max_steps: 2\nlora_modules_to_save: [lm_head]\n", &[]);
    let summary = run(&c);
    let saved = AdapterConfig::read(&c.output_dir).unwrap();
    assert_eq!(saved.modules_to_save, Some(vec!["embed_tokens".to_string()]));
    assert!(saved.ensure_weight_tying);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.output_dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(json["ensure_weight_tying"], true);
    let t = adapter(&c.output_dir);
    assert!(!t.contains_key(HEAD));
    // As the LM head, every row of the shared matrix is trained.
    let embed0 = s.base().get("model.embed_tokens.weight", DType::F32).unwrap();
    assert_eq!(rows_changed(&t[EMBED], &embed0).len(), 32000);
    let trained = summary.final_eval_loss.unwrap();
    let through = eval_through_adapter(&path, &c.output_dir);
    assert!(rel(through, trained) < 1e-5, "{through} vs {trained}");
    // Plain LoRA configs still write no ensure_weight_tying key.
    let (plain, _) = s.config("plain", "max_steps: 1\n", &[]);
    run(&plain);
    let text = std::fs::read_to_string(plain.output_dir.join("adapter_config.json")).unwrap();
    assert!(!text.contains("ensure_weight_tying"), "{text}");
}

#[test]
fn lora_model_dir_starts_from_the_adapter_and_refuses_a_different_one() {
    let s = Setup::new("from-adapter", false);
    let saved_modules = "lora_modules_to_save: [embed_tokens, lm_head]\n";
    let (first, _) = s.config("first", &format!("max_steps: 2\n{saved_modules}"), &[]);
    let first_eval = run(&first).final_eval_loss.unwrap();
    let first_dir = first.output_dir.display().to_string();

    // Step 0 of a run from that adapter: the same tensors, so the same held-out loss.
    let from = format!("max_steps: 2\n{saved_modules}lora_model_dir: {first_dir}\n");
    let (second, _) = s.config("second", &from, &[]);
    let p = open_model(&second).unwrap();
    let mut t = build_trainer(&second, &p, &mut Quiet).unwrap();
    let start: BTreeMap<String, HostTensor> = t.trained_tensors().unwrap().into_iter().collect();
    let saved = adapter(&first.output_dir);
    assert_eq!(start.keys().collect::<Vec<_>>(), saved.keys().collect::<Vec<_>>());
    for (k, v) in &start {
        assert_eq!(v.data, saved[k].data, "{k} is not the adapter's");
    }
    let step0 = t.evaluate().unwrap().unwrap().eval_loss;
    assert!(rel(step0, first_eval) < 1e-6, "{step0} vs {first_eval}");
    // A fresh adapter starts elsewhere.
    let (fresh, _) = s.config("fresh", &format!("max_steps: 2\n{saved_modules}"), &[]);
    let mut t = build_trainer(&fresh, &p, &mut Quiet).unwrap();
    assert!((t.evaluate().unwrap().unwrap().eval_loss - first_eval).abs() > 1e-3);

    // Every setting the adapter fixes is compared, and the error names the one that differs.
    let only_q_v = |t: String| t.replace("lora_target_linear: true\n", "lora_target_modules: [q_proj, v_proj]\n");
    let same = |t: String| t;
    let all = "[\"down_proj\", \"gate_proj\", \"k_proj\", \"o_proj\", \"q_proj\", \"up_proj\", \"v_proj\"]";
    type Edit<'a> = &'a dyn Fn(String) -> String;
    let cases: [(&str, &[&str], Edit, String); 5] = [
        (
            saved_modules,
            &["lora_r=8"],
            &same,
            "r is 4 there, lora_r is 8 here".into(),
        ),
        (
            saved_modules,
            &["lora_alpha=16"],
            &same,
            "lora_alpha is 8 there, 16 here".into(),
        ),
        (
            saved_modules,
            &["peft_use_rslora=true"],
            &same,
            "use_rslora is false there, peft_use_rslora is true here".into(),
        ),
        (
            saved_modules,
            &[],
            &only_q_v,
            format!("target_modules are {all} there, [\"q_proj\", \"v_proj\"] here"),
        ),
        (
            "",
            &[],
            &same,
            "modules_to_save are [\"embed_tokens\", \"lm_head\"] there, [] here".into(),
        ),
    ];
    let keys = [
        "lora_r",
        "lora_alpha",
        "use_rslora",
        "target_modules",
        "modules_to_save",
    ];
    for (i, (extra, set, edit, want)) in cases.iter().enumerate() {
        let text = format!("max_steps: 1\n{extra}lora_model_dir: {first_dir}\n");
        let (cfg, _) = s.config_with(&format!("bad{i}"), &text, set, edit);
        let err = match build_trainer(&cfg, &p, &mut Quiet) {
            Ok(_) => panic!("case {i}: a different adapter was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("lora_model_dir") && err.contains(&first_dir) && err.contains(want.as_str()),
            "case {i}: {err}"
        );
        let others = keys
            .iter()
            .filter(|k| k != &&keys[i])
            .filter(|k| err.contains(*k))
            .count();
        assert_eq!(others, 0, "case {i} names other keys: {err}");
    }
}
