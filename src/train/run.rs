//! A whole training run from a config: files, data, device, the loop, evaluation,
//! checkpoints, `metrics.jsonl`, and the outputs (a PEFT adapter or a full checkpoint).

use super::checkpoint::{self, Checkpoint};
use super::session::{resolve_model_dir_with, Precision};
use super::trainer::{save_dtype, stop_requested, EvalReport, RunInfo, RunPlan, StepReport, Trainer};
use crate::adapters::lora::{self, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::backend::select::{create_backend, precision_for};
use crate::config::Config;
use crate::data::{prepare, Tokenizer};
use crate::dist::DataParallel;
use crate::model::{ModelConfig, WeightStore};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Observes a run; every method has a default that does nothing.
pub trait Callback {
    fn on_start(&mut self, _info: &RunInfo) {}
    fn on_step(&mut self, _r: &StepReport) {}
    fn on_eval(&mut self, _r: &EvalReport) {}
    fn on_message(&mut self, _msg: &str) {}
    /// Return true to stop after the current step (a checkpoint is saved).
    fn should_stop(&mut self) -> bool {
        false
    }
}

/// Prints messages to stderr and nothing else.
pub struct Quiet;
impl Callback for Quiet {}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub final_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub peak_bytes: u64,
    pub output_dir: PathBuf,
    pub interrupted: bool,
    pub last_checkpoint: Option<PathBuf>,
    /// The trained LoRA adapter (config and tensors, as saved in `output_dir`, and in
    /// `last_checkpoint` too when interrupted); `None` for a full fine-tune, whose model is
    /// in `output_dir`, and on ranks other than 0.
    #[serde(skip)]
    pub adapter: Option<lora::Adapter>,
}

/// Tokenizer files copied next to every output so it loads on its own.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Everything a run loads before the first step.
pub struct Prepared {
    pub model_dir: PathBuf,
    /// Where the tokenizer files are (`tokenizer_config`, else the model folder).
    pub tokenizer_dir: PathBuf,
    pub model_config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub store: WeightStore,
}

/// Opens the base model: converted from GGUF if needed, config, tokenizer, weights.
pub fn open_model(cfg: &Config) -> Result<Prepared> {
    let model_dir = resolve_model_dir_with(
        &cfg.base_model,
        cfg.base_model_config.is_none(),
        cfg.tokenizer_config.is_none(),
    )?;
    let config_path = cfg
        .base_model_config
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(|| model_dir.join("config.json"));
    let model_config = ModelConfig::from_file(&config_path)?;
    let tok_dir = cfg
        .tokenizer_config
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(|| model_dir.clone());
    let mut tokenizer = Tokenizer::from_dir(&tok_dir)?;
    if let Some(s) = &cfg.special_tokens {
        tokenizer.set_special_tokens(&crate::data::SpecialTokens {
            bos_token: s.bos_token.clone(),
            eos_token: s.eos_token.clone(),
            pad_token: s.pad_token.clone(),
            unk_token: s.unk_token.clone(),
        })?;
    }
    let store = if model_dir.join("model.safetensors.index.json").is_file() {
        WeightStore::open_index(&model_dir.join("model.safetensors.index.json"))?
    } else {
        WeightStore::open(&model_dir.join("model.safetensors"))?
    };
    Ok(Prepared {
        model_dir,
        tokenizer_dir: tok_dir,
        model_config,
        tokenizer,
        store,
    })
}

pub fn pad_id(tok: &Tokenizer) -> Result<u32> {
    tok.pad_id()
        .or(tok.eos_id())
        .ok_or_else(|| crate::msg!("the tokenizer has neither a pad nor an eos token; set special_tokens.pad_token"))
}

/// Training and evaluation samples for the model in `p`: `test_datasets` when given, else
/// the `val_set_size` split. Every token id must index the model's embedding.
pub fn prepare_data(cfg: &Config, p: &Prepared) -> Result<crate::data::PreparedData> {
    let data = prepare_samples(cfg, &p.tokenizer)?;
    data.check_ids_fit(p.model_config.vocab_size, &|id| p.tokenizer.id_to_token(id))?;
    Ok(data)
}

/// [`prepare_data`] without the model check.
pub fn prepare_samples(cfg: &Config, tok: &Tokenizer) -> Result<crate::data::PreparedData> {
    let mut data = prepare(&cfg.datasets, &cfg.data, tok)?;
    if !cfg.test_datasets.is_empty() {
        let opts = crate::data::DataOptions {
            val_set_size: 0.0,
            shuffle: false,
            dataset_prepared_path: None,
            ..cfg.data.clone()
        };
        let test = prepare(&cfg.test_datasets, &opts, tok)?;
        data.stats.eval_samples = test.train.len();
        data.eval = test.train;
    }
    Ok(data)
}

/// Builds the trainer for a config, resuming when asked.
pub fn build_trainer(cfg: &Config, p: &Prepared, cb: &mut dyn Callback) -> Result<Trainer> {
    build_trainer_with(cfg, p, cb, None)
}

/// The same for one rank of a data-parallel run (`dist`), or a single process (`None`).
pub fn build_trainer_with(
    cfg: &Config,
    p: &Prepared,
    cb: &mut dyn Callback,
    dist: Option<DataParallel>,
) -> Result<Trainer> {
    let resume = resume_dir(cfg)?;
    let (backend, notices) = create_backend(cfg.device)?;
    for n in notices {
        cb.on_message(&n);
    }
    cb.on_message(&format!("device: {} ({})", backend.name(), backend.device_info()));
    let precision: Precision = precision_for(backend.as_ref(), cfg);
    let data = prepare_data(cfg, p)?;
    cb.on_message(&format!(
        "data: {} train / {} eval samples, {} tokens ({} trained), {} dropped, {} truncated{}",
        data.train.len(),
        data.eval.len(),
        data.stats.tokens,
        data.stats.label_tokens,
        data.stats.dropped,
        data.stats.truncated,
        if data.stats.from_cache {
            " (from dataset_prepared_path's cache)"
        } else {
            ""
        }
    ));
    let pad = pad_id(&p.tokenizer)?;
    let plan = RunPlan::new_distributed(
        cfg.clone(),
        &p.model_config,
        precision,
        data,
        pad,
        &cfg.base_model,
        dist,
    )?;
    let mut trainer = Trainer::new(plan, backend, &p.store)?;
    if let Some(dir) = resume {
        let state = checkpoint::read_state(&dir)?;
        let weights_file = if cfg.is_lora() {
            ADAPTER_WEIGHTS
        } else {
            "model.safetensors"
        };
        let trained = read_all(&dir.join(weights_file))?;
        let optimizer = crate::dist::checkpoint::read(&dir)?;
        let planned = state.max_steps;
        trainer.restore(&trained, &optimizer, state)?;
        cb.on_message(&format!(
            "resumed from {} at step {}",
            dir.display(),
            trainer.state.global_step
        ));
        // As in Hugging Face Trainer, the run's own length wins on resume.
        let total = trainer.info().total_steps;
        if planned != total {
            cb.on_message(&format!(
                "notice: the checkpoint was planned for {planned} steps, this run for {total} \
                 (max_steps / num_epochs): the learning-rate schedule continues over {total} steps"
            ));
        }
    }
    Ok(trainer)
}

/// The checkpoint a run continues from, if any. A fresh run refuses an `output_dir` that
/// already holds checkpoints: its own would mix with them, and `save_total_limit` could
/// then delete the newer run's checkpoints in favour of the older run's higher steps.
fn resume_dir(cfg: &Config) -> Result<Option<PathBuf>> {
    match (&cfg.resume_from_checkpoint, cfg.auto_resume_from_checkpoints) {
        (Some(d), _) => Ok(Some(d.clone())),
        (None, true) => Ok(checkpoint::latest(&cfg.output_dir)),
        (None, false) => match checkpoint::list(&cfg.output_dir).last() {
            None => Ok(None),
            Some((_, last)) => Err(Error::Config(format!(
                "output_dir {} already holds checkpoints of an earlier run (the latest is {}); \
                 continue it with `auto_resume_from_checkpoints: true` (or `resume_from_checkpoint: DIR`), \
                 or choose another output_dir, or delete its checkpoint-* folders",
                cfg.output_dir.display(),
                last.display()
            ))),
        },
    }
}

fn read_all(path: &Path) -> Result<BTreeMap<String, crate::HostTensor>> {
    let store = WeightStore::open(path)?;
    store
        .names()
        .iter()
        .map(|n| Ok((n.to_string(), store.get_raw(n)?)))
        .collect()
}

/// Appends one JSON object per line to `output_dir/metrics.jsonl`.
pub struct Metrics {
    file: std::fs::File,
}

impl Metrics {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let p = dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        Ok(Metrics { file })
    }
    pub fn write(&mut self, v: &impl serde::Serialize) {
        if let Ok(mut s) = serde_json::to_string(v) {
            s.push('\n');
            let _ = self.file.write_all(s.as_bytes());
        }
    }
}

/// Checkpoints kept when `save_total_limit` is unset, as in axolotl.
pub const DEFAULT_SAVE_TOTAL_LIMIT: usize = 4;

/// Saves `output_dir/checkpoint-<step>` and applies `save_total_limit`. With data
/// parallelism every rank takes part (the optimizer state may be sharded) and rank 0 writes.
pub fn save_checkpoint(t: &mut Trainer, p: &Prepared) -> Result<PathBuf> {
    let cfg = t.config().clone();
    let step = t.state.global_step;
    let no_optimizer = || crate::dist::checkpoint::OptimizerFiles {
        tensors: Vec::new(),
        files: Vec::new(),
        staging: None,
    };
    // `save_only_model`: the weights and the state, no optimizer state (smaller; such a
    // checkpoint cannot resume a run, as in Hugging Face Trainer), so none is read or
    // gathered. Every rank has the same config, so all of them skip it together.
    let opt = if cfg.save_only_model {
        (t.rank() == 0).then(no_optimizer)
    } else {
        let own = t.optimizer_tensors()?;
        let trainable = t.trainable_infos();
        match t.dist_mut() {
            Some(d) => crate::dist::checkpoint::collect(d, own, &trainable, &cfg.output_dir, step)?,
            None => Some(crate::dist::checkpoint::OptimizerFiles {
                tensors: own,
                ..no_optimizer()
            }),
        }
    };
    // Sharded parameters are gathered by every rank together.
    let trained = if opt.is_some() || t.params_sharded() {
        Some(t.trained_tensors()?)
    } else {
        None
    };
    let (Some(opt), Some(trained)) = (opt, trained) else {
        // Not rank 0: wait until rank 0 has written the checkpoint.
        if let Some(d) = t.dist_mut() {
            d.barrier()?;
        }
        return Ok(checkpoint::checkpoint_dir(&cfg.output_dir, step));
    };
    let mut files: Vec<(&str, Vec<u8>)> = vec![("config.yaml", cfg.to_yaml().into_bytes())];
    files.extend(opt.files.iter().map(|(n, b)| (n.as_str(), b.clone())));
    let weights_file = match t.adapter_config() {
        Some(a) => {
            files.push((ADAPTER_CONFIG, a.to_json().into_bytes()));
            ADAPTER_WEIGHTS
        }
        None => {
            files.push((
                "config.json",
                serde_json::to_vec_pretty(&p.model_config.to_json()).expect("json"),
            ));
            "model.safetensors"
        }
    };
    let state = t.state.clone();
    let ck = Checkpoint {
        weights: vec![(weights_file, trained)],
        optimizer: opt.tensors,
        state: &state,
        files,
    };
    let dir = checkpoint::write(&cfg.output_dir, &ck)?;
    // axolotl keeps 4 checkpoints unless told otherwise (0 counts as unset there too).
    let limit = cfg
        .save_total_limit
        .filter(|&l| l > 0)
        .unwrap_or(DEFAULT_SAVE_TOTAL_LIMIT);
    checkpoint::rotate(&cfg.output_dir, limit, &dir)?;
    if let Some(s) = &opt.staging {
        let _ = std::fs::remove_dir_all(s);
    }
    if let Some(d) = t.dist_mut() {
        d.barrier()?;
    }
    Ok(dir)
}

/// Writes the final outputs into `output_dir`: the adapter (PEFT) or the full model,
/// plus the tokenizer files. With data parallelism rank 0 writes; under ZeRO-3 every rank
/// must call this, since the weights are gathered from all of them.
pub fn save_outputs(t: &mut Trainer, p: &Prepared) -> Result<()> {
    let trained = t.trained_tensors()?;
    if t.rank() != 0 {
        return Ok(());
    }
    let out = t.config().output_dir.clone();
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    match t.adapter_config().cloned() {
        Some(a) => lora::save(&out, &a, &trained)?,
        None => {
            let dt = save_dtype(&p.model_config);
            let tensors: Vec<_> = trained.into_iter().map(|(n, v)| (n, v.cast(dt))).collect();
            write_model(&out, &p.model_config, &tensors)?;
        }
    }
    copy_tokenizer(&p.tokenizer_dir, &out)
}

/// A full Hugging Face checkpoint: config.json and safetensors (sharded above 5 GB, HF's
/// default); files of the other layout left by an earlier save are removed.
pub fn write_model(out: &Path, cfg: &ModelConfig, tensors: &[(String, crate::HostTensor)]) -> Result<()> {
    const MAX_SHARD: usize = 5_000_000_000;
    crate::model::write_safetensors_sharded(out, tensors, MAX_SHARD, None)?;
    cfg.write(&out.join("config.json"))
}

pub fn copy_tokenizer(from: &Path, to: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let src = from.join(f);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            crate::model::atomic::write_atomic(&to.join(f), &bytes)?;
        }
    }
    Ok(())
}

/// Runs training to the end (or to Ctrl-C), evaluating and saving as configured.
pub fn train(cfg: &Config, cb: &mut dyn Callback) -> Result<TrainSummary> {
    train_with(cfg, cb, None)
}

/// [`train`] as one rank of a data-parallel run: every rank steps, evaluates and saves
/// together; rank 0 alone writes metrics and the outputs.
pub fn train_with(cfg: &Config, cb: &mut dyn Callback, dist: Option<DataParallel>) -> Result<TrainSummary> {
    // Configs read from YAML are checked already; one built in code is checked here.
    cfg.validate()?;
    let p = open_model(cfg)?;
    let mut t = build_trainer_with(cfg, &p, cb, dist)?;
    let rank0 = t.rank() == 0;
    let mut metrics = if rank0 {
        Some(Metrics::open(&cfg.output_dir)?)
    } else {
        None
    };
    let mut metrics_write = |v: &dyn Fn() -> serde_json::Value| {
        if let Some(m) = metrics.as_mut() {
            m.write(&v());
        }
    };
    cb.on_start(t.info());
    metrics_write(&|| serde_json::json!({"event": "start", "info": t.info()}));
    let start = super::trainer::now();
    let mut last_loss = None;
    let mut last_eval = None;
    let mut last_checkpoint = None;
    let mut tokens = 0u64;
    let mut interrupted = false;
    while let Some(r) = t.step()? {
        tokens += r.tokens;
        if r.loss.is_finite() {
            last_loss = Some(r.loss);
        }
        cb.on_step(&r);
        metrics_write(&|| serde_json::json!(r));
        if t.eval_due() {
            if let Some(e) = t.evaluate()? {
                cb.on_eval(&e);
                metrics_write(&|| serde_json::json!(e));
                last_eval = Some(e.eval_loss);
            }
        }
        // Ranks stop together, whichever of them was asked.
        let stop = t.agree(stop_requested() || cb.should_stop())?;
        if stop || t.save_due() {
            let dir = save_checkpoint(&mut t, &p)?;
            cb.on_message(&format!("saved {}", dir.display()));
            last_checkpoint = Some(dir);
        }
        if stop {
            interrupted = true;
            break;
        }
    }
    // An interrupted run saves its weights too (axolotl does on Ctrl-C), besides the
    // checkpoint it resumes from.
    if rank0 || t.params_sharded() {
        save_outputs(&mut t, &p)?;
        if rank0 {
            cb.on_message(&format!(
                "saved the trained {} to {}{}",
                if cfg.is_lora() { "adapter" } else { "model" },
                cfg.output_dir.display(),
                if interrupted {
                    format!(
                        " (interrupted at step {} of {})",
                        t.state.global_step,
                        t.info().total_steps
                    )
                } else {
                    String::new()
                }
            ));
        }
    }
    let adapter = match t.adapter_config().cloned() {
        Some(config) if rank0 || t.params_sharded() => {
            let tensors = t.trained_tensors()?.into_iter().collect();
            rank0.then_some(lora::Adapter { config, tensors })
        }
        _ => None,
    };
    let seconds = super::trainer::now() - start;
    let summary = TrainSummary {
        steps: t.state.global_step,
        tokens,
        seconds,
        tokens_per_second: tokens as f64 / seconds.max(1e-9),
        final_loss: last_loss,
        final_eval_loss: last_eval,
        peak_bytes: t.info().plan.total_bytes,
        output_dir: cfg.output_dir.clone(),
        interrupted,
        last_checkpoint,
        adapter,
    };
    metrics_write(&|| serde_json::json!({"event": "end", "summary": &summary}));
    Ok(summary)
}
