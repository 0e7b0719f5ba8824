//! The training loop: micro-batches with gradient accumulation (loss normalised by the
//! label tokens of the whole optimizer step), AdamW with the learning-rate schedule,
//! clipping, evaluation, checkpoints and exact resume.

use super::batches::{dropout_seed, model_inputs, StepInputs};
use super::schedule::LrSchedule;
use super::session::{load_base_weights, Precision, WeightSource};
use super::state::{DataPosition, TrainerState};
use super::step_graph::{OptimizerOptions, TrainGraph, EVAL, GRAD_SUMSQ, OPTIMIZER, TRAIN};
use crate::adapters::lora::{self, AdapterConfig};
use crate::backend::Backend;
use crate::config::{Config, Every};
use crate::data::{collate, BatchSchedule, EpochPlan, PackedBatch, PreparedData, ScheduleOptions};
use crate::dist::sharding::slice_flat;
use crate::dist::{DataParallel, ShardCalls, ShardLayout, ShardSpec, ShardingConfig, Stage};
use crate::exec::{Executor, MemoryPlan};
use crate::model::llama::{self, BuildOptions, LoraOptions};
use crate::model::ModelConfig;
use crate::tensor::{DType, HostTensor};
use crate::{Error, Result};
#[cfg(not(target_arch = "wasm32"))]
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks a running training loop to stop after the current step and save a checkpoint
/// (the CLI calls this from its Ctrl-C handler).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// What one optimizer step did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepReport {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub label_tokens: u64,
    pub step_seconds: f64,
    /// The step was skipped because its loss or gradient was not finite.
    pub skipped: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalReport {
    pub step: u64,
    pub eval_loss: f64,
    pub eval_label_tokens: u64,
}

/// Facts about a run, known before the first step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunInfo {
    pub device: String,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    pub parameters: u64,
    pub trainable_parameters: u64,
    pub rows: usize,
    pub seq_len: usize,
    pub train_samples: usize,
    pub eval_samples: usize,
    pub packing_efficiency: f64,
    pub plan: MemoryPlan,
    pub resumed_from_step: u64,
}

pub struct Trainer {
    cfg: Config,
    tg: TrainGraph,
    ex: Executor,
    progs: [usize; 3],
    data: PreparedData,
    schedule: BatchSchedule,
    eval_schedule: Option<BatchSchedule>,
    lr: LrSchedule,
    opt: OptimizerOptions,
    pub state: TrainerState,
    total_steps: u64,
    steps_per_epoch: u64,
    epochs: usize,
    pad_id: u32,
    adapter: Option<AdapterConfig>,
    plan_cache: Option<EpochPlan>,
    info: RunInfo,
    /// Data-parallel training: this rank's collective and sharding.
    dist: Option<DataParallel>,
    /// The sharded optimizer's local sum of squares program.
    sumsq_prog: Option<usize>,
}

fn lora_options(cfg: &Config) -> Option<LoraOptions> {
    cfg.is_lora().then(|| LoraOptions {
        r: cfg.lora_r,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout,
        use_rslora: cfg.peft_use_rslora,
        targets: cfg.lora_targets(),
    })
}

/// The step interval of an evaluation or save cadence. `k` per epoch is, as in axolotl,
/// the fraction `1 / (k * num_epochs)` of the total steps (rounded up, as Hugging Face
/// rounds fractional intervals); a fraction of 1 or more means each epoch's end.
pub fn due_interval(
    every: Option<Every>,
    per_epoch: Option<u64>,
    num_epochs: f64,
    total: u64,
    steps_per_epoch: u64,
) -> u64 {
    let fraction = |f: f64| ((f * total as f64).ceil() as u64).max(1);
    let per_epoch = per_epoch.map(|k| 1.0 / (k.max(1) as f64 * num_epochs));
    match (every, per_epoch) {
        (Some(Every::Steps(n)), _) => n.max(1),
        (Some(Every::Fraction(f)), _) => fraction(f),
        (None, Some(f)) if f < 1.0 => fraction(f),
        _ => steps_per_epoch.max(1),
    }
}

/// Warmup steps as axolotl sets them (`HFCausalTrainerBuilder`): `warmup_steps`, else
/// `floor(warmup_ratio * total)`, else `min(floor(0.03 * total), 100)`; a warmup of 1 step
/// becomes 2.
pub fn warmup_steps(steps: Option<u64>, ratio: Option<f64>, total: u64) -> u64 {
    let w = match (steps, ratio) {
        (Some(w), _) => w,
        (None, Some(r)) => (r * total as f64).floor().max(0.0) as u64,
        (None, None) => ((0.03 * total as f64).floor() as u64).min(100),
    };
    if w == 1 {
        2
    } else {
        w
    }
}

/// Samples times epochs scanned for the label counts of every micro-batch (each epoch is
/// packed anew); a longer run sizes the logits for every position instead of scanning.
const MAX_SAMPLE_EPOCHS_SCANNED: usize = 20_000_000;

/// The most label positions of any micro-batch, to size the logits of the step graph.
fn max_label_rows(sched: &BatchSchedule, samples: &[crate::data::Sample], epochs: usize, pad: u32) -> Result<usize> {
    if epochs.saturating_mul(samples.len().max(1)) > MAX_SAMPLE_EPOCHS_SCANNED {
        let layout = sched.layout();
        return Ok(layout.rows * layout.seq_len);
    }
    let mut k = 0;
    for e in 0..epochs {
        for mb in sched.epoch(e).micro_batches() {
            k = k.max(super::batches::count_targets(&collate(
                samples,
                mb,
                sched.layout(),
                pad,
            )?));
        }
    }
    Ok(k)
}

/// Everything decided before memory is allocated: schedules, step counts, the graph.
pub struct RunPlan {
    pub cfg: Config,
    pub tg: TrainGraph,
    pub data: PreparedData,
    schedule: BatchSchedule,
    eval_schedule: Option<BatchSchedule>,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    epochs: usize,
    pad_id: u32,
    opt: OptimizerOptions,
    base_name: String,
    dist: Option<DataParallel>,
}

impl RunPlan {
    /// Schedules the data, sizes the step graph and builds it.
    pub fn new(
        cfg: Config,
        model: &ModelConfig,
        precision: Precision,
        data: PreparedData,
        pad_id: u32,
        base_name: &str,
    ) -> Result<Self> {
        Self::new_distributed(cfg, model, precision, data, pad_id, base_name, None)
    }

    /// The same for one rank of a data-parallel run: a step takes
    /// `micro_batch_size * gradient_accumulation_steps * world_size` rows, of which this
    /// rank runs its share; under ZeRO the optimizer holds state only for its tensors.
    pub fn new_distributed(
        cfg: Config,
        model: &ModelConfig,
        precision: Precision,
        data: PreparedData,
        pad_id: u32,
        base_name: &str,
        dist: Option<DataParallel>,
    ) -> Result<Self> {
        let world = dist.as_ref().map_or(1, |d| d.world_size());
        Self::build(cfg, model, precision, data, pad_id, base_name, world, None, dist)
    }

    /// The plan of rank `rank` of `world` with the config's sharding (none for one rank),
    /// without a process group (for `ferrotune plan --world-size`).
    #[allow(clippy::too_many_arguments)]
    pub fn for_rank(
        cfg: Config,
        model: &ModelConfig,
        precision: Precision,
        data: PreparedData,
        pad_id: u32,
        base_name: &str,
        world: usize,
        rank: usize,
    ) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::Config(format!(
                "rank {rank} of world size {world}: expected 0 <= rank < world size"
            )));
        }
        let sharding = ShardingConfig::from_config(&cfg)?;
        // One process runs unsharded, as `train` without a process group does.
        let rank_of = (world > 1).then_some((sharding, rank));
        Self::build(cfg, model, precision, data, pad_id, base_name, world, rank_of, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        cfg: Config,
        model: &ModelConfig,
        precision: Precision,
        data: PreparedData,
        pad_id: u32,
        base_name: &str,
        world: usize,
        rank_of: Option<(ShardingConfig, usize)>,
        mut dist: Option<DataParallel>,
    ) -> Result<Self> {
        data.check_ids_fit(model.vocab_size, &|_| None)?;
        let sched_opts = ScheduleOptions::new(&cfg.data, cfg.gradient_accumulation_steps * world);
        let schedule = BatchSchedule::new(&data.train, sched_opts.clone())?;
        let eval_schedule = if data.eval.is_empty() {
            None
        } else {
            let o = ScheduleOptions {
                shuffle: false,
                gradient_accumulation_steps: 1,
                ..sched_opts
            };
            Some(BatchSchedule::new(&data.eval, o)?)
        };
        let steps_per_epoch = schedule.steps_in_epoch(0).max(1) as u64;
        let total_steps = match cfg.max_steps {
            Some(m) => m,
            None => (cfg.num_epochs * steps_per_epoch as f64).ceil().max(1.0) as u64,
        };
        let epochs = match cfg.max_steps {
            Some(m) => usize::try_from(m.div_ceil(steps_per_epoch))
                .unwrap_or(usize::MAX)
                .saturating_add(1),
            None => cfg.num_epochs.ceil() as usize,
        };
        let layout = schedule.layout();
        let n = layout.rows * layout.seq_len;
        // Logits only at label positions when that saves at least a quarter of the rows.
        let mut k = max_label_rows(&schedule, &data.train, epochs, pad_id)?;
        if let Some(es) = &eval_schedule {
            k = k.max(max_label_rows(es, &data.eval, 1, pad_id)?);
        }
        let k = k.max(1).next_multiple_of(8);
        let loss_rows = (k * 4 <= n * 3).then_some(k);
        let opts = BuildOptions {
            rows: layout.rows,
            seq_len: layout.seq_len,
            weight_dtype: precision.weights,
            act_dtype: precision.activations,
            lora: lora_options(&cfg),
            train_base: !cfg.is_lora(),
            modules_to_save: cfg.lora_modules_to_save.clone().unwrap_or_default(),
            loss_rows,
        };
        let opt = OptimizerOptions {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
            max_grad_norm: Some(cfg.max_grad_norm),
        };
        let mg = llama::build_with_attention(model, &opts, &cfg.attn_options()?)?;
        let sizes: Vec<usize> = mg.trainable.iter().map(|&t| mg.graph.info(t).numel()).collect();
        let shard = match (dist.as_mut(), rank_of) {
            (Some(d), _) => Some((d.sharding.clone(), d.assign(&sizes))),
            (None, Some((sharding, rank))) => Some((sharding, ShardLayout::new(&sizes, rank, world))),
            (None, None) => None,
        };
        let tg = match shard {
            Some((sharding, layout)) if sharding.stage != Stage::DataParallel => TrainGraph::new_sharded(
                mg,
                &opt,
                ShardSpec {
                    stage: sharding.stage,
                    reshard_after_forward: sharding.reshard_after_forward,
                    layout,
                },
            )?,
            _ => TrainGraph::new(mg, &opt)?,
        };
        Ok(RunPlan {
            cfg,
            tg,
            data,
            schedule,
            eval_schedule,
            steps_per_epoch,
            total_steps,
            epochs,
            pad_id,
            opt,
            base_name: base_name.to_string(),
            dist,
        })
    }

    /// Parameter counts: (all, trainable).
    pub fn parameter_counts(&self) -> (u64, u64) {
        let g = &self.tg.model.graph;
        let count =
            |ts: &mut dyn Iterator<Item = &crate::graph::TensorId>| ts.map(|&t| g.info(t).numel() as u64).sum::<u64>();
        let trainable = count(&mut self.tg.model.trainable.iter());
        let base = count(&mut self.tg.model.weights.iter().map(|(_, t)| t));
        let lora = count(&mut self.tg.model.lora.iter().flat_map(|p| [&p.a, &p.b]));
        (base + lora, trainable)
    }

    pub fn layout(&self) -> crate::data::BatchLayout {
        self.schedule.layout()
    }
}

impl Trainer {
    /// Allocates the plan on a backend, loads the weights and initialises the adapters.
    pub fn new(plan: RunPlan, backend: Box<dyn Backend>, weights: &dyn WeightSource) -> Result<Self> {
        let RunPlan {
            cfg,
            tg,
            data,
            schedule,
            eval_schedule,
            steps_per_epoch,
            total_steps,
            epochs,
            pad_id,
            opt,
            base_name,
            dist,
        } = plan;
        let device = backend.device_info();
        let mut ex = Executor::new(tg.model.graph.clone(), backend, &tg.programs())?;
        let progs = [
            ex.program_index(TRAIN)?,
            ex.program_index(OPTIMIZER)?,
            ex.program_index(EVAL)?,
        ];
        let sumsq_prog = match tg.local_sumsq {
            Some(_) => Some(ex.program_index(GRAD_SUMSQ)?),
            None => None,
        };
        load_base_weights(&mut ex, &tg.model, weights)?;
        // ZeRO-3: frozen base weights are held as this rank's slices.
        for f in &tg.frozen_shards {
            let Some(shard) = f.shard.filter(|&s| ex.holds(s)) else {
                continue;
            };
            let info = ex.graph().info(f.tensor).clone();
            let v = weights.get_shaped(&f.name, &info.shape, info.dtype)?;
            ex.set_tensor(shard, &slice_flat(&v, f.range.clone()))?;
        }
        if tg.params_sharded() {
            // Trained base weights are held as this rank's slices.
            for (name, t) in &tg.model.weights {
                if tg.model.trainable.contains(t) {
                    let info = ex.graph().info(*t).clone();
                    let v = weights.get_shaped(name, &info.shape, info.dtype)?;
                    set_trainable(&mut ex, &tg, *t, &v)?;
                }
            }
        }
        let lora = lora_options(&cfg);
        let adapter = lora.as_ref().map(|l| {
            let saved = &tg.model.opts.modules_to_save;
            let mut a = AdapterConfig::new(l, &base_name, saved);
            a.ensure_weight_tying = tg.model.config.tie_word_embeddings && !saved.is_empty();
            a
        });
        let warmup = warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, total_steps);
        let lr = LrSchedule {
            kind: cfg.lr_scheduler,
            base_lr: cfg.learning_rate,
            warmup_steps: warmup,
            total_steps,
            min_lr_ratio: cfg.cosine_min_lr_ratio.unwrap_or(0.0),
        };
        let layout = schedule.layout();
        let first = schedule.epoch(0);
        let g = &tg.model.graph;
        let count =
            |ts: &mut dyn Iterator<Item = &crate::graph::TensorId>| ts.map(|&t| g.info(t).numel() as u64).sum::<u64>();
        let trainable_parameters = count(&mut tg.model.trainable.iter());
        let base = count(&mut tg.model.weights.iter().map(|(_, t)| t));
        let lora_params = count(&mut tg.model.lora.iter().flat_map(|p| [&p.a, &p.b]));
        let info = RunInfo {
            device,
            total_steps,
            steps_per_epoch,
            parameters: base + lora_params,
            trainable_parameters,
            rows: layout.rows,
            seq_len: layout.seq_len,
            train_samples: data.train.len(),
            eval_samples: data.eval.len(),
            packing_efficiency: first.efficiency(),
            plan: ex.plan().clone(),
            resumed_from_step: 0,
        };
        let state = TrainerState {
            max_steps: total_steps,
            num_train_epochs: cfg.num_epochs,
            train_batch_size: cfg.data.micro_batch_size,
            seed: cfg.data.seed,
            config_hash: run_hash_for(&cfg, dist.as_ref().map_or(1, |d| d.world_size())),
            ..Default::default()
        };
        let mut t = Trainer {
            cfg,
            tg,
            ex,
            progs,
            data,
            schedule,
            eval_schedule,
            lr,
            opt,
            state,
            total_steps,
            steps_per_epoch,
            epochs,
            pad_id,
            adapter,
            plan_cache: Some(first),
            info,
            dist,
            sumsq_prog,
        };
        t.init_adapters()?;
        Ok(t)
    }

    pub fn info(&self) -> &RunInfo {
        &self.info
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn executor(&mut self) -> &mut Executor {
        &mut self.ex
    }
    pub fn graph(&self) -> &TrainGraph {
        &self.tg
    }
    pub fn adapter_config(&self) -> Option<&AdapterConfig> {
        self.adapter.as_ref()
    }
    pub fn is_done(&self) -> bool {
        self.state.global_step >= self.total_steps
    }
    /// This process's rank (0 without data parallelism).
    pub fn rank(&self) -> usize {
        self.dist.as_ref().map_or(0, |d| d.rank())
    }
    pub fn dist_mut(&mut self) -> Option<&mut DataParallel> {
        self.dist.as_mut()
    }

    /// True on every rank when `flag` is true on any (a stop request seen by one rank).
    pub fn agree(&mut self, flag: bool) -> Result<bool> {
        match self.dist.as_mut() {
            Some(d) => d.any(flag),
            None => Ok(flag),
        }
    }

    /// Name, shape and dtype of every trainable tensor, in the order data parallelism assigns them.
    pub fn trainable_infos(&self) -> Vec<crate::graph::TensorInfo> {
        let g = self.ex.graph();
        self.tg.model.trainable.iter().map(|&t| g.info(t).clone()).collect()
    }

    /// PEFT initialisation, or the adapter in `lora_model_dir` (its pairs and fully trained
    /// modules), which must have this config's r, alpha, targets and modules to save.
    fn init_adapters(&mut self) -> Result<()> {
        let pairs = self.tg.model.lora.clone();
        let r = self.cfg.lora_r;
        #[cfg(not(target_arch = "wasm32"))]
        if let (Some(dir), Some(want)) = (self.cfg.lora_model_dir.clone(), self.adapter.clone()) {
            let (found, tensors) = lora::load(&dir)?;
            lora::check_compatible(&found, &want)
                .map_err(|m| Error::Config(format!("lora_model_dir: the adapter in {} {m}", dir.display())))?;
            let mut used = std::collections::BTreeSet::new();
            for p in &pairs {
                let dt = self.ex.graph().dtype(p.a);
                let (ka, kb) = (lora::lora_a_key(&p.module), lora::lora_b_key(&p.module));
                self.set_trainable(p.a, &tensors.get_shaped(&ka, &[r, p.in_features], dt)?)?;
                self.set_trainable(p.b, &tensors.get_shaped(&kb, &[p.out_features, r], dt)?)?;
                used.extend([ka, kb]);
            }
            let m = &self.tg.model;
            let saved: Vec<_> = m
                .weights
                .iter()
                .filter(|(_, t)| m.trainable.contains(t))
                .cloned()
                .collect();
            for (name, t) in saved {
                let key = lora::saved_module_key(&name);
                let info = self.ex.graph().info(t).clone();
                self.set_trainable(t, &tensors.get_shaped(&key, &info.shape, info.dtype)?)?;
                used.insert(key);
            }
            let unused: Vec<&String> = tensors.keys().filter(|k| !used.contains(*k)).collect();
            if !unused.is_empty() {
                return Err(Error::Config(format!(
                    "lora_model_dir: the adapter in {} has tensors this model has no place for (is it for \
                     another model?): {}",
                    dir.display(),
                    unused.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
                )));
            }
            return Ok(());
        }
        for (i, p) in pairs.iter().enumerate() {
            let dt = self.ex.graph().dtype(p.a);
            let (a, b) = lora::init_pair(p, r, self.cfg.data.seed, i, dt);
            self.set_trainable(p.a, &a)?;
            self.set_trainable(p.b, &b)?;
        }
        Ok(())
    }

    /// Sets a trainable tensor from its full value (under ZeRO-3: this rank's slice of it).
    fn set_trainable(&mut self, t: crate::graph::TensorId, v: &HostTensor) -> Result<()> {
        set_trainable(&mut self.ex, &self.tg, t, v)
    }

    /// Whether parameters are sharded (ZeRO-3): reading the trained weights is then a
    /// collective that every rank must call together.
    pub fn params_sharded(&self) -> bool {
        self.tg.params_sharded()
    }

    /// Full values of trainable tensors `ids`: read back, or under ZeRO-3 gathered from
    /// every rank's slices.
    async fn trainable_values(&mut self, ids: &[crate::graph::TensorId]) -> Result<Vec<HostTensor>> {
        if !self.tg.params_sharded() {
            return self.ex.get_tensors_async(ids).await;
        }
        let held: Vec<_> = self.tg.param_shards.iter().flatten().copied().collect();
        let mut vals = self.ex.get_tensors_async(&held).await?.into_iter();
        let own: Vec<Vec<f32>> = self
            .tg
            .param_shards
            .iter()
            .map(|s| match s {
                Some(_) => vals.next().map(|v| v.to_f32()).unwrap_or_default(),
                None => Vec::new(),
            })
            .collect();
        let dp = self
            .dist
            .as_mut()
            .ok_or_else(|| crate::msg!("sharded parameters without a data-parallel group"))?;
        let full = dp.gather_all(&own)?;
        let g = self.ex.graph();
        ids.iter()
            .map(|t| {
                let i = trainable_index(&self.tg, *t)?;
                let info = g.info(*t);
                Ok(HostTensor::from_f32(&info.shape, &full[i]).cast(info.dtype))
            })
            .collect()
    }

    /// Runs a program, with this rank's collectives for its host calls (sharded steps).
    async fn run_program(
        &mut self,
        prog: usize,
        feed: &[(crate::graph::TensorId, &HostTensor)],
    ) -> Result<Vec<HostTensor>> {
        if !self.ex.has_host_calls(prog) {
            return self.ex.run_async(prog, feed).await;
        }
        let dp = self
            .dist
            .as_mut()
            .ok_or_else(|| crate::msg!("a sharded step graph without a data-parallel group"))?;
        let mut calls = ShardCalls {
            dp,
            calls: &self.tg.host_calls,
        };
        self.ex.run_with_async(prog, feed, &mut calls).await
    }

    fn epoch_plan(&mut self, epoch: usize) -> &EpochPlan {
        if self.plan_cache.as_ref().map(|p| p.epoch) != Some(epoch) {
            self.plan_cache = Some(self.schedule.epoch(epoch));
        }
        self.plan_cache.as_ref().expect("just set")
    }

    /// The next step's micro-batches (this rank's share), the index of the first of them in
    /// the step, and the step's micro-batch count over all ranks; advances over epoch ends.
    fn next_step_batches(&mut self) -> Result<Option<(Vec<PackedBatch>, usize, usize)>> {
        loop {
            let DataPosition { epoch, step_in_epoch } = self.state.position;
            if epoch as usize >= self.epochs {
                return Ok(None);
            }
            let (layout, pad) = (self.schedule.layout(), self.pad_id);
            let plan = self.epoch_plan(epoch as usize);
            if let Some(step) = plan.steps.get(step_in_epoch as usize) {
                let mbs = step.micro_batches.clone();
                let (n, per_rank) = (mbs.len(), self.cfg.gradient_accumulation_steps);
                let (mine, first) = match &self.dist {
                    Some(d) => (d.my_share(mbs, per_rank), d.rank() * per_rank),
                    None => (mbs, 0),
                };
                return mine
                    .iter()
                    .map(|mb| collate(&self.data.train, mb, layout, pad))
                    .collect::<Result<Vec<_>>>()
                    .map(|b| Some((b, first, n)));
            }
            self.state.position = DataPosition {
                epoch: epoch + 1,
                step_in_epoch: 0,
            };
        }
    }

    async fn run_inputs(
        &mut self,
        prog: usize,
        inp: &StepInputs,
        extra: &[(crate::graph::TensorId, HostTensor)],
    ) -> Result<(f64, f64)> {
        let mut feed = inp.feed();
        feed.extend(extra.iter().map(|(t, v)| (*t, v)));
        let out = self.run_program(self.progs[prog], &feed).await?;
        Ok((out[0].to_f64()[0], out[1].to_f64()[0]))
    }

    fn scalar(&self, t: crate::graph::TensorId, v: f64) -> HostTensor {
        HostTensor::from_f64(&[1], &[v]).cast(self.ex.graph().dtype(t))
    }

    /// Runs one optimizer step. Returns None when training is complete.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn step(&mut self) -> Result<Option<StepReport>> {
        pollster::block_on(self.step_async())
    }

    /// Runs one optimizer step without blocking (see [`Trainer::step`]).
    pub async fn step_async(&mut self) -> Result<Option<StepReport>> {
        if self.is_done() {
            return Ok(None);
        }
        let t0 = now();
        let Some((batches, first_mb, step_mbs)) = self.next_step_batches()? else {
            self.total_steps = self.state.global_step;
            return Ok(None);
        };
        let inputs: Vec<StepInputs> = batches
            .iter()
            .map(|b| model_inputs(&self.tg.model, b))
            .collect::<Result<_>>()?;
        // The loss is normalised by the label tokens of the step on all ranks.
        let mut counts = [
            inputs.iter().map(|i| i.label_tokens).sum::<usize>() as f64,
            inputs.iter().map(|i| i.tokens).sum::<usize>() as f64,
        ];
        if let Some(d) = self.dist.as_mut() {
            d.sum(&mut counts)?;
        }
        let (labels, tokens) = (counts[0] as usize, counts[1] as usize);
        let step = self.state.global_step + 1;
        let lr = self.lr.lr(step);
        let mut loss_sum = 0.0;
        let mut skipped = labels == 0;
        if !skipped {
            let scale = self.scalar(self.tg.loss_scale, 1.0 / labels as f64);
            for (j, inp) in inputs.iter().enumerate() {
                let mut extra = vec![(self.tg.loss_scale, scale.clone())];
                if let Some((seed_t, p_t)) = self.tg.model.dropout {
                    let micro = self.state.micro_step + (first_mb + j) as u64;
                    let seed = dropout_seed(self.cfg.data.seed, micro);
                    extra.push((seed_t, HostTensor::from_u32(&[1], &[seed])));
                    extra.push((p_t, HostTensor::from_f32(&[1], &[self.cfg.lora_dropout as f32])));
                }
                let (l, _) = self.run_inputs(0, inp, &extra).await?;
                loss_sum += l;
            }
            self.state.micro_step += step_mbs as u64;
        }
        if let Some(d) = self.dist.as_mut() {
            let mut l = [loss_sum];
            d.sum(&mut l)?;
            loss_sum = l[0];
        }
        let loss = if labels > 0 { loss_sum / labels as f64 } else { f64::NAN };
        let mut grad_norm = f64::NAN;
        if !loss.is_finite() {
            skipped = true;
            self.on_nonfinite(step, "loss", loss)?;
            self.zero_grads()?;
        } else {
            let h = TrainGraph::hyper_values(&self.opt, lr, step);
            let hyper = HostTensor::from_f32(&[3], &h);
            grad_norm = self.optimizer_step(&hyper).await?;
            if !grad_norm.is_finite() {
                // The update kernels left the weights untouched.
                skipped = true;
                self.on_nonfinite(step, "gradient norm", grad_norm)?;
            }
        }
        self.state.global_step = step;
        self.state.position.step_in_epoch += 1;
        self.state.tokens_seen += tokens as u64;
        self.state.epoch = self.epoch_progress();
        let report = StepReport {
            step,
            total_steps: self.total_steps,
            epoch: self.state.epoch,
            loss,
            learning_rate: lr,
            grad_norm,
            tokens: tokens as u64,
            label_tokens: labels as u64,
            step_seconds: now() - t0,
            skipped,
        };
        self.state.log_history.push(serde_json::json!({
            "step": step, "epoch": report.epoch, "loss": finite_or_null(loss), "learning_rate": lr,
            "grad_norm": finite_or_null(grad_norm), "tokens": tokens,
        }));
        Ok(Some(report))
    }

    /// Clips and updates; with data parallelism the gradients are reduced first and the
    /// updated parameters gathered after. Returns the global gradient norm.
    async fn optimizer_step(&mut self, hyper: &HostTensor) -> Result<f64> {
        let Some(d) = self.dist.as_mut() else {
            let out = self.ex.run_async(self.progs[1], &[(self.tg.hyper, hyper)]).await?;
            return Ok(out[0].to_f64()[0]);
        };
        d.reduce_gradients(&mut self.ex, &self.tg.grad_accs).await?;
        let mut feed = vec![(self.tg.hyper, hyper)];
        let sumsq;
        if let Some(g) = self.tg.global_sumsq {
            let local = match self.sumsq_prog {
                Some(p) => self.ex.run_async(p, &[]).await?[0].to_f64()[0],
                None => 0.0,
            };
            let mut v = [local];
            d.sum(&mut v)?;
            sumsq = HostTensor::from_f64(&[1], &v).cast(self.ex.graph().dtype(g));
            feed.push((g, &sumsq));
        }
        let out = self.ex.run_async(self.progs[1], &feed).await?;
        d.gather_parameters(&mut self.ex, &self.tg.model.trainable).await?;
        Ok(out[0].to_f64()[0])
    }

    fn epoch_progress(&self) -> f64 {
        self.state.position.epoch as f64 + self.state.position.step_in_epoch as f64 / self.steps_per_epoch as f64
    }

    fn on_nonfinite(&self, step: u64, what: &str, v: f64) -> Result<()> {
        if self.cfg.skip_nonfinite_steps {
            return Ok(());
        }
        #[cfg(not(target_arch = "wasm32"))]
        let last = super::checkpoint::latest(&self.cfg.output_dir)
            .map(|p| format!("the last good checkpoint is {}", p.display()))
            .unwrap_or_else(|| "no checkpoint was saved yet".into());
        #[cfg(target_arch = "wasm32")]
        let last = String::from("no checkpoint is kept in the browser");
        Err(crate::msg!(
            "step {step}: the {what} is {v}; training stopped ({last}). Lower learning_rate, check the data, \
             or set skip_nonfinite_steps: true to skip such steps"
        ))
    }

    fn zero_grads(&mut self) -> Result<()> {
        for t in self.tg.grad_accs.clone() {
            let info = self.ex.graph().info(t).clone();
            self.ex.set_tensor(t, &HostTensor::zeros(&info.shape, info.dtype))?;
        }
        Ok(())
    }

    /// Mean loss over the held-out split (None when there is none).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn evaluate(&mut self) -> Result<Option<EvalReport>> {
        pollster::block_on(self.evaluate_async())
    }

    /// The held-out loss without blocking (see [`Trainer::evaluate`]).
    pub async fn evaluate_async(&mut self) -> Result<Option<EvalReport>> {
        let Some(es) = &self.eval_schedule else { return Ok(None) };
        let plan = es.epoch(0);
        let layout = es.layout();
        // Each rank evaluates every world_size-th batch; the sums are added over ranks.
        let (rank, world) = self.dist.as_ref().map_or((0, 1), |d| (d.rank(), d.world_size()));
        let all: Vec<&crate::data::MicroBatch> = plan.micro_batches().collect();
        let mut batches: Vec<(PackedBatch, bool)> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| i % world == rank)
            .map(|(_, mb)| collate(&self.data.eval, mb, layout, self.pad_id).map(|b| (b, true)))
            .collect::<Result<_>>()?;
        if self.tg.params_sharded() && !all.is_empty() {
            // Every rank gathers the parameters for each run, so all run equally often; the
            // extra runs repeat the first batch and are not counted.
            while batches.len() < all.len().div_ceil(world) {
                batches.push((collate(&self.data.eval, all[0], layout, self.pad_id)?, false));
            }
        }
        let (mut sum, mut count) = (0.0, 0.0);
        for (b, counted) in &batches {
            let inp = model_inputs(&self.tg.model, b)?;
            let mut extra = Vec::new();
            if let Some((seed_t, p_t)) = self.tg.model.dropout {
                extra.push((seed_t, HostTensor::from_u32(&[1], &[0])));
                extra.push((p_t, HostTensor::from_f32(&[1], &[0.0])));
            }
            let (l, c) = self.run_inputs(2, &inp, &extra).await?;
            if *counted {
                sum += l;
                count += c;
            }
        }
        if let Some(d) = self.dist.as_mut() {
            let mut v = [sum, count];
            d.sum(&mut v)?;
            (sum, count) = (v[0], v[1]);
        }
        let r = EvalReport {
            step: self.state.global_step,
            eval_loss: sum / count.max(1.0),
            eval_label_tokens: count as u64,
        };
        self.state
            .log_history
            .push(serde_json::json!({"step": r.step, "eval_loss": r.eval_loss}));
        Ok(Some(r))
    }

    /// Whether `every` falls on the step just finished (`None`: at each epoch's end).
    fn due(&self, every: Option<Every>, per_epoch: Option<u64>) -> bool {
        let s = self.state.global_step;
        let interval = due_interval(
            every,
            per_epoch,
            self.cfg.num_epochs,
            self.total_steps,
            self.steps_per_epoch,
        );
        s.is_multiple_of(interval) || s == self.total_steps
    }

    pub fn eval_due(&self) -> bool {
        self.eval_schedule.is_some() && self.due(self.cfg.eval_steps, self.cfg.evals_per_epoch)
    }

    pub fn save_due(&self) -> bool {
        self.due(self.cfg.save_steps, self.cfg.saves_per_epoch)
    }

    /// The trained tensors under their saved names: PEFT keys for adapters, checkpoint
    /// names for fully trained weights.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn trained_tensors(&mut self) -> Result<Vec<(String, HostTensor)>> {
        pollster::block_on(self.trained_tensors_async())
    }

    /// The trained tensors without blocking (see [`Trainer::trained_tensors`]).
    pub async fn trained_tensors_async(&mut self) -> Result<Vec<(String, HostTensor)>> {
        let names = self.trained_names();
        let ids: Vec<_> = names.iter().map(|(_, t)| *t).collect();
        let values = self.trainable_values(&ids).await?;
        Ok(names.into_iter().map(|(n, _)| n).zip(values).collect())
    }

    /// The trained tensors' saved names (see [`Trainer::trained_tensors`]).
    fn trained_names(&self) -> Vec<(String, crate::graph::TensorId)> {
        let m = &self.tg.model;
        let mut names: Vec<(String, crate::graph::TensorId)> = Vec::new();
        for p in &m.lora {
            names.push((lora::lora_a_key(&p.module), p.a));
            names.push((lora::lora_b_key(&p.module), p.b));
        }
        for (name, t) in &m.weights {
            if m.trainable.contains(t) {
                let key = if self.adapter.is_some() {
                    lora::saved_module_key(name)
                } else {
                    name.clone()
                };
                names.push((key, *t));
            }
        }
        names
    }

    /// Optimizer moments under `<param name>.exp_avg` / `.exp_avg_sq`: whole tensors, or
    /// under sharding this rank's slices, flattened.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn optimizer_tensors(&mut self) -> Result<Vec<(String, HostTensor)>> {
        let g = self.ex.graph();
        let mut ids = Vec::new();
        let mut names = Vec::new();
        for s in &self.tg.params {
            let n = &g.info(self.tg.model.trainable[s.index]).name;
            names.push(format!("{n}.exp_avg"));
            ids.push(s.exp_avg);
            names.push(format!("{n}.exp_avg_sq"));
            ids.push(s.exp_avg_sq);
        }
        let values = self.ex.get_tensors(&ids)?;
        Ok(names.into_iter().zip(values).collect())
    }

    /// Restores trained weights, optimizer moments and the loop position.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn restore(
        &mut self,
        trained: &BTreeMap<String, HostTensor>,
        optimizer: &BTreeMap<String, HostTensor>,
        state: TrainerState,
    ) -> Result<()> {
        if state.config_hash != self.state.config_hash {
            return Err(Error::Config(
                "resume_from_checkpoint: the checkpoint was made with other data, model or batch settings; \
                 resume with the config it was trained with"
                    .into(),
            ));
        }
        for (name, t) in self.trained_names() {
            let info = self.ex.graph().info(t).clone();
            self.set_trainable(t, &trained.get_shaped(&name, &info.shape, info.dtype)?)?;
        }
        for s in self.tg.params.clone() {
            let info = self.ex.graph().info(self.tg.model.trainable[s.index]).clone();
            for (suffix, t) in [("exp_avg", s.exp_avg), ("exp_avg_sq", s.exp_avg_sq)] {
                let full = optimizer.get_shaped(&format!("{}.{suffix}", info.name), &info.shape, info.dtype)?;
                let v = match &self.tg.shard {
                    Some(sh) => slice_flat(&full, sh.layout.mine(s.index)),
                    None => full,
                };
                self.ex.set_tensor(t, &v)?;
            }
        }
        self.info.resumed_from_step = state.global_step;
        // This run's length replaces the checkpoint's (see `run_hash_for`).
        let max_steps = self.state.max_steps;
        self.state = state;
        self.state.max_steps = max_steps;
        Ok(())
    }
}

/// The index of `t` in the trainable tensors.
fn trainable_index(tg: &TrainGraph, t: crate::graph::TensorId) -> Result<usize> {
    tg.model
        .trainable
        .iter()
        .position(|&x| x == t)
        .ok_or_else(|| crate::msg!("{} is not a trainable tensor", tg.model.graph.info(t).name))
}

/// Sets trainable tensor `t` from its full value `v`: the tensor itself, or under ZeRO-3
/// this rank's slice of it (nothing when the slice is empty).
fn set_trainable(ex: &mut Executor, tg: &TrainGraph, t: crate::graph::TensorId, v: &HostTensor) -> Result<()> {
    if !tg.params_sharded() {
        return ex.set_tensor(t, v);
    }
    let i = trainable_index(tg, t)?;
    ex.check_host(t, v)?;
    match (tg.param_shards[i], &tg.shard) {
        (Some(s), Some(sh)) => ex.set_tensor(s, &slice_flat(v, sh.layout.mine(i))),
        _ => Ok(()),
    }
}

/// A hash of everything that must not change across a resume (data, model, batch shape,
/// schedule, optimizer), so a checkpoint is only continued by the run that made it.
/// `max_steps` may change, as Hugging Face Trainer allows: the run is lengthened or cut and
/// the learning-rate schedule is computed for the new total (the resume prints a notice).
pub fn run_hash(cfg: &Config) -> String {
    run_hash_for(cfg, 1)
}

/// [`run_hash`] of a run on `world_size` data-parallel ranks: the global batch counts, not
/// how it is split over ranks, and the sharding settings may change on resume.
pub fn run_hash_for(cfg: &Config, world_size: usize) -> String {
    use sha2::{Digest, Sha256};
    let mut v = cfg.to_json();
    if let Some(m) = v.as_object_mut() {
        m.insert(
            "gradient_accumulation_steps".into(),
            serde_json::json!(cfg.gradient_accumulation_steps * world_size),
        );
        // Removed keeping the order of the others (`remove` would move the last key).
        for k in ["deepspeed", "fsdp_version", "fsdp_config", "ddp_timeout"] {
            m.shift_remove(k);
        }
        for k in [
            "output_dir",
            "resume_from_checkpoint",
            "auto_resume_from_checkpoints",
            "save_steps",
            "saves_per_epoch",
            "save_total_limit",
            "eval_steps",
            "evals_per_epoch",
            "logging_steps",
            "device",
            "dataset_prepared_path",
            "max_steps",
            "eval_max_new_tokens",
            "skip_nonfinite_steps",
        ] {
            m.remove(k);
        }
    }
    let bytes = serde_json::to_vec(&v).expect("serializable");
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::Value::Null
    }
}

/// Seconds on a monotonic clock (the browser has no `Instant`).
pub fn now() -> f64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::sync::OnceLock;
        static T0: OnceLock<std::time::Instant> = OnceLock::new();
        T0.get_or_init(std::time::Instant::now).elapsed().as_secs_f64()
    }
    #[cfg(target_arch = "wasm32")]
    {
        0.0
    }
}

/// Storage type for saving a full model: the base checkpoint's dtype, f32 otherwise.
pub fn save_dtype(cfg: &ModelConfig) -> DType {
    cfg.torch_dtype
        .filter(|d| matches!(d, DType::F32 | DType::BF16 | DType::F16))
        .unwrap_or(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_defaults_follow_axolotl() {
        // min(int(0.03 * total), 100) when neither key is set.
        assert_eq!(warmup_steps(None, None, 1000), 30);
        assert_eq!(warmup_steps(None, None, 10_000), 100);
        assert_eq!(warmup_steps(None, None, 20), 0);
        // int(ratio * total) rounds down; one step becomes two, whichever key gave it.
        assert_eq!(warmup_steps(None, Some(0.1), 95), 9);
        assert_eq!(warmup_steps(None, None, 50), 2);
        assert_eq!(warmup_steps(Some(1), None, 50), 2);
        assert_eq!(warmup_steps(Some(7), Some(0.5), 50), 7);
    }

    #[test]
    fn per_epoch_cadences_are_fractions_of_the_run() {
        // 10 steps, one epoch, 4 per epoch: every ceil(10 / 4) = 3 steps (3, 6, 9).
        assert_eq!(due_interval(None, Some(4), 1.0, 10, 10), 3);
        // 3 epochs of 10 steps, 2 per epoch: 1 / 6 of 30 steps.
        assert_eq!(due_interval(None, Some(2), 3.0, 30, 10), 5);
        // A fraction of 1 or more: each epoch's end.
        assert_eq!(due_interval(None, Some(1), 1.0, 10, 10), 10);
        assert_eq!(due_interval(None, Some(1), 0.5, 5, 10), 10);
        assert_eq!(due_interval(Some(Every::Steps(4)), Some(2), 1.0, 10, 10), 4);
        assert_eq!(due_interval(Some(Every::Fraction(0.25)), None, 1.0, 10, 10), 3);
        assert_eq!(due_interval(None, None, 2.0, 20, 10), 10);
    }
}
