//! What each subcommand does.

use super::progress::{gib, Progress};
use super::{Command, ConvertCommand, DataCommand};
use ferrotune::adapters::{lora, MergedWeights};
use ferrotune::backend::plan::PlanBackend;
use ferrotune::backend::select::{create_backend, precision_for};
use ferrotune::config::{Config, DeviceChoice};
use ferrotune::data::{collate, BatchSchedule, ScheduleOptions, Tokenizer};
use ferrotune::exec::{Executor, ProgramSpec};
use ferrotune::infer::exact_match::{exact_match, has_references, references};
use ferrotune::infer::{GenerateOptions, Generator};
use ferrotune::model::llama::{build_with_attention, BuildOptions};
use ferrotune::train::batches::model_inputs;
use ferrotune::train::run::{self, open_model, pad_id, prepare_data};
use ferrotune::train::session::{load_base_weights, WeightSource};
use ferrotune::train::trainer::RunPlan;
use ferrotune::{DType, Error, Result};
use std::path::Path;

pub fn dispatch(cmd: Command) -> Result<()> {
    match cmd {
        Command::Train { config, set } => train(&config, &set),
        Command::Launch {
            nproc_per_node,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            grace_seconds,
            command,
        } => {
            if command.first().map(String::as_str) != Some("train") {
                return Err(Error::Config(format!(
                    "launch runs `train CONFIG [--set ...]`, not {:?}",
                    command.join(" ")
                )));
            }
            let program = std::env::current_exe().map_err(|e| ferrotune::msg!("launch: {e}"))?;
            ferrotune::dist::launch::launch(&ferrotune::dist::launch::LaunchOptions {
                nproc_per_node,
                nnodes,
                node_rank,
                master_addr,
                master_port,
                program,
                args: command,
                grace: std::time::Duration::from_secs(grace_seconds),
                forward_signals: true,
            })
            .map(|_| ())
        }
        Command::Eval {
            config,
            adapter,
            set,
            limit,
            json,
        } => eval(&config, adapter.as_deref(), &set, limit, json),
        Command::Generate {
            model,
            adapter,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            raw,
            device,
        } => {
            if temperature == 0.0 && (top_p.is_some() || seed.is_some()) {
                eprintln!("notice: --temperature 0 decodes greedily, so --top-p and --seed have no effect");
            }
            let opts = GenerateOptions {
                max_new_tokens,
                temperature,
                top_p: top_p.unwrap_or(1.0),
                seed: seed.unwrap_or(0),
                stop_ids: Vec::new(),
            };
            generate(&model, adapter.as_deref(), &prompt, opts, raw, &device)
        }
        Command::Merge {
            config,
            adapter,
            out,
            set,
        } => merge(&config, &adapter, &out, &set),
        Command::Score {
            model,
            adapter,
            text,
            ids,
            logits_out,
            top,
            device,
            json,
        } => score(
            &model,
            adapter.as_deref(),
            text.as_deref(),
            &ids,
            logits_out.as_deref(),
            top,
            &device,
            json,
        ),
        Command::Plan {
            config,
            set,
            json,
            world_size,
            rank,
        } => plan(&config, &set, json, world_size, rank),
        Command::Preprocess { config, set, json } => preprocess(&config, &set, json),
        Command::Convert {
            what: ConvertCommand::Gguf { input, out_dir, dtype },
        } => convert(&input, &out_dir, &dtype),
        Command::Fetch { name, dir } => fetch(&name, &dir),
        Command::Data { what } => data(what),
        Command::Devices => devices(),
        Command::Bench { what } => super::bench::run(what),
    }
}

pub fn load_config(path: &Path, set: &[String]) -> Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Config::from_yaml(&text, set).map_err(|e| match e {
        Error::Config(m) => Error::Config(format!("{}:\n{m}", path.display())),
        e => e,
    })
}

fn device_choice(s: &str) -> Result<DeviceChoice> {
    serde_yaml::from_str(s).map_err(|_| Error::Config(format!("--device {s}: expected auto, cpu, wgsl or cuda")))
}

fn train(path: &Path, set: &[String]) -> Result<()> {
    let cfg = load_config(path, set)?;
    // Ctrl-C finishes the step, saves a checkpoint and the weights, and exits 0; a second
    // Ctrl-C aborts.
    let _ = ctrlc::set_handler(|| {
        if ferrotune::train::trainer::stop_requested() {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)");
        ferrotune::train::trainer::request_stop();
    });
    // Under `ferrotune launch` (or torchrun) this process is one rank of several.
    let dist = ferrotune::dist::connect(&cfg)?;
    let rank = dist.as_ref().map_or(0, |d| d.rank());
    let s = if rank == 0 {
        let mut progress = Progress::new();
        run::train_with(&cfg, &mut progress, dist)?
    } else {
        run::train_with(&cfg, &mut run::Quiet, dist)?
    };
    if rank != 0 {
        return Ok(());
    }
    eprintln!(
        "{} steps, {} tokens in {:.1} s ({:.0} tokens/s); final loss {}; eval loss {}; planned peak memory {}",
        s.steps,
        s.tokens,
        s.seconds,
        s.tokens_per_second,
        s.final_loss.map(|l| format!("{l:.4}")).unwrap_or("-".into()),
        s.final_eval_loss.map(|l| format!("{l:.4}")).unwrap_or("-".into()),
        gib(s.peak_bytes)
    );
    if s.interrupted {
        eprintln!(
            "interrupted; resume with --set resume_from_checkpoint={}",
            s.last_checkpoint.map(|p| p.display().to_string()).unwrap_or_default()
        );
    }
    Ok(())
}

/// The base weights, or the base seen through an adapter.
struct Weights<'a> {
    merged: Option<MergedWeights<'a>>,
    base: &'a dyn WeightSource,
}

impl<'a> Weights<'a> {
    fn new(base: &'a dyn WeightSource, adapter: Option<&Path>) -> Result<Self> {
        let merged = match adapter {
            Some(dir) => {
                let (config, tensors) = lora::load(dir)?;
                Some(MergedWeights { base, config, tensors })
            }
            None => None,
        };
        Ok(Weights { merged, base })
    }
    fn source(&self) -> &dyn WeightSource {
        match &self.merged {
            Some(m) => m,
            None => self.base,
        }
    }
}

#[derive(serde::Serialize)]
struct EvalResult {
    eval_loss: Option<f64>,
    eval_label_tokens: u64,
    exact_match: Option<f64>,
    exact_match_correct: Option<usize>,
    exact_match_total: Option<usize>,
    examples: Vec<(String, String)>,
}

fn eval(path: &Path, adapter: Option<&Path>, set: &[String], limit: usize, json: bool) -> Result<()> {
    let cfg = load_config(path, set)?;
    let p = open_model(&cfg)?;
    let weights = Weights::new(&p.store, adapter)?;
    let (backend, notices) = create_backend(cfg.device)?;
    notices.iter().for_each(|n| eprintln!("{n}"));
    let precision = precision_for(backend.as_ref(), &cfg);
    let data = prepare_data(&cfg, &p)?;
    let mut result = EvalResult {
        eval_loss: None,
        eval_label_tokens: 0,
        exact_match: None,
        exact_match_correct: None,
        exact_match_total: None,
        examples: vec![],
    };
    let pad = pad_id(&p.tokenizer)?;
    let mut backend = Some(backend);
    if !data.eval.is_empty() {
        let o = ScheduleOptions {
            shuffle: false,
            gradient_accumulation_steps: 1,
            ..ScheduleOptions::new(&cfg.data, 1)
        };
        let sched = BatchSchedule::new(&data.eval, o)?;
        let layout = sched.layout();
        let opts = BuildOptions {
            rows: layout.rows,
            seq_len: layout.seq_len,
            weight_dtype: precision.weights,
            act_dtype: precision.activations,
            lora: None,
            train_base: false,
            modules_to_save: vec![],
            loss_rows: None,
        };
        let m = build_with_attention(&p.model_config, &opts, &cfg.attn_options()?)?;
        let spec = ProgramSpec::new("eval", &[m.loss_sum, m.label_count], &[]);
        let mut ex = Executor::new(m.graph.clone(), backend.take().expect("unused"), &[spec])?;
        load_base_weights(&mut ex, &m, weights.source())?;
        let (mut sum, mut count) = (0.0, 0.0);
        let epoch = sched.epoch(0);
        let task = ferrotune::progress::task("eval loss", epoch.micro_batches().count() as u64);
        for (i, mb) in epoch.micro_batches().enumerate() {
            task.set_done(i as u64);
            let b = collate(&data.eval, mb, layout, pad)?;
            let inp = model_inputs(&m, &b)?;
            let out = ex.run(0, &inp.feed())?;
            sum += out[0].to_f64()[0];
            count += out[1].to_f64()[0];
        }
        result.eval_loss = Some(sum / count.max(1.0));
        result.eval_label_tokens = count as u64;
    }
    let mut refs = Vec::new();
    for spec in cfg.test_datasets.iter().filter(|s| has_references(s.kind)) {
        refs.extend(references(
            spec,
            &cfg.data,
            &p.tokenizer,
            limit.saturating_sub(refs.len()),
        )?);
    }
    if !refs.is_empty() {
        let backend = match backend.take() {
            Some(b) => b,
            None => create_backend(cfg.device)?.0,
        };
        let prompt_len = refs.iter().map(|r| r.prompt.len()).max().unwrap_or(1);
        let max_new = cfg.eval_max_new_tokens;
        let mut gen = Generator::new(
            &p.model_config,
            weights.source(),
            backend,
            precision,
            16,
            prompt_len,
            prompt_len + max_new,
        )?;
        let em = exact_match(&mut gen, &p.tokenizer, &refs, max_new)?;
        result.exact_match = Some(em.percent());
        result.exact_match_correct = Some(em.correct);
        result.exact_match_total = Some(em.total);
        result.examples = em.examples;
    }
    if json {
        println!("{}", serde_json::to_string(&result).expect("json"));
    } else {
        if let Some(l) = result.eval_loss {
            println!("eval loss: {l:.4} over {} label tokens", result.eval_label_tokens);
        }
        if let (Some(pct), Some(c), Some(t)) =
            (result.exact_match, result.exact_match_correct, result.exact_match_total)
        {
            println!("exact match: {pct:.1}% ({c}/{t})");
            for (want, got) in &result.examples {
                println!("  expected {want:?}, got {got:?}");
            }
        }
        if result.eval_loss.is_none() && result.exact_match.is_none() {
            println!("nothing to evaluate: set val_set_size or test_datasets in the config");
        }
    }
    Ok(())
}

fn generate(
    model: &Path,
    adapter: Option<&Path>,
    prompt: &str,
    mut opts: GenerateOptions,
    raw: bool,
    device: &str,
) -> Result<()> {
    let dir = ferrotune::train::session::resolve_model_dir(&model.to_string_lossy())?;
    let cfg = ferrotune::model::ModelConfig::from_file(&dir.join("config.json"))?;
    let tok = Tokenizer::from_dir(&dir)?;
    let store = open_store(&dir)?;
    let weights = Weights::new(&store, adapter)?;
    let text = if raw {
        prompt.to_string()
    } else {
        let t = ferrotune::data::ChatTemplate::from_tokenizer(&tok)?;
        t.render(
            &[ferrotune::data::Message::new("user", prompt)],
            true,
            &ferrotune::data::TemplateVars::from_tokenizer(&tok),
        )?
    };
    let ids = tok.encode(&text, raw)?;
    let (backend, notices) = create_backend(device_choice(device)?)?;
    notices.iter().for_each(|n| eprintln!("{n}"));
    let precision = ferrotune::train::session::Precision::F32;
    opts.stop_ids.extend(tok.eos_id());
    for t in ["<|im_end|>", "<|eot_id|>"] {
        opts.stop_ids.extend(tok.token_to_id(t));
    }
    let mut gen = Generator::new(
        &cfg,
        weights.source(),
        backend,
        precision,
        1,
        ids.len(),
        ids.len() + opts.max_new_tokens,
    )?;
    let out = gen.generate(&[ids], &opts)?;
    println!("{}", tok.decode(&out[0], true)?);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn score(
    model: &Path,
    adapter: Option<&Path>,
    text: Option<&str>,
    ids: &[u32],
    logits_out: Option<&Path>,
    top: usize,
    device: &str,
    json: bool,
) -> Result<()> {
    let dir = ferrotune::train::session::resolve_model_dir(&model.to_string_lossy())?;
    let cfg = ferrotune::model::ModelConfig::from_file(&dir.join("config.json"))?;
    let store = open_store(&dir)?;
    let weights = Weights::new(&store, adapter)?;
    let tok = Tokenizer::from_dir(&dir).ok();
    let ids: Vec<u32> = match (text, &tok) {
        (Some(t), Some(tok)) => tok.encode(t, true)?,
        (Some(_), None) => {
            return Err(ferrotune::msg!(
                "{} has no tokenizer; pass --ids instead of --text",
                dir.display()
            ))
        }
        (None, _) if !ids.is_empty() => ids.to_vec(),
        _ => return Err(ferrotune::msg!("give --text or --ids")),
    };
    let s = ferrotune::infer::score::score(&cfg, weights.source(), create_backend(device_choice(device)?)?.0, &ids)?;
    let name = |id: u32| {
        tok.as_ref()
            .and_then(|t| t.id_to_token(id))
            .unwrap_or_else(|| id.to_string())
    };
    let last = &s.logits[(ids.len() - 1) * cfg.vocab_size..];
    let mut order: Vec<usize> = (0..cfg.vocab_size).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    let top: Vec<(String, u32, f32)> = order[..top.min(order.len())]
        .iter()
        .map(|&i| (name(i as u32), i as u32, last[i]))
        .collect();
    if let Some(p) = logits_out {
        let t = ferrotune::HostTensor::from_f32(&[ids.len(), cfg.vocab_size], &s.logits);
        ferrotune::model::write_safetensors(p, &[("logits".to_string(), t)], None)?;
    }
    if json {
        let v = serde_json::json!({"tokens": ids.len(), "mean_nll": s.mean_nll, "perplexity": s.mean_nll.exp(),
                                   "nll": s.nll, "top_next": top});
        println!("{v}");
    } else {
        println!(
            "{} tokens; mean NLL {:.4}; perplexity {:.3}",
            ids.len(),
            s.mean_nll,
            s.mean_nll.exp()
        );
        println!("most likely next tokens:");
        for (t, id, l) in top {
            println!("  {t:<16} (id {id:>6})  logit {l:.3}");
        }
    }
    Ok(())
}

fn open_store(dir: &Path) -> Result<ferrotune::model::WeightStore> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        ferrotune::model::WeightStore::open_index(&index)
    } else {
        ferrotune::model::WeightStore::open(&dir.join("model.safetensors"))
    }
}

fn merge(path: &Path, adapter: &Path, out: &Path, set: &[String]) -> Result<()> {
    let cfg = load_config(path, set)?;
    let p = open_model(&cfg)?;
    let (config, tensors) = lora::load(adapter)?;
    let merged = MergedWeights {
        base: &p.store,
        config,
        tensors,
    };
    let names: Vec<String> = p.store.names().iter().map(|s| s.to_string()).collect();
    let unused = merged.unused_keys(&names);
    if !unused.is_empty() {
        return Err(ferrotune::msg!(
            "the adapter has tensors that match no base weight (is it for another model?): {}",
            unused.join(", ")
        ));
    }
    let mut tensors = Vec::new();
    let task = ferrotune::progress::task("merging", names.len() as u64);
    for n in &names {
        task.set_done(tensors.len() as u64);
        let dt = p.store.dtype(n)?;
        let shape = p.store.shape(n)?.to_vec();
        tensors.push((n.clone(), merged.get_shaped(n, &shape, dt)?));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    run::write_model(out, &p.model_config, &tensors)?;
    run::copy_tokenizer(&p.tokenizer_dir, out)?;
    eprintln!(
        "wrote the merged model ({} tensors, base dtype) to {}",
        tensors.len(),
        out.display()
    );
    Ok(())
}

fn plan(path: &Path, set: &[String], json: bool, world: usize, rank: usize) -> Result<()> {
    let cfg = load_config(path, set)?;
    let p = open_model(&cfg)?;
    let (backend, notices) = create_backend(cfg.device)?;
    notices.iter().for_each(|n| eprintln!("{n}"));
    let precision = precision_for(backend.as_ref(), &cfg);
    let data = prepare_data(&cfg, &p)?;
    let rp = RunPlan::for_rank(
        cfg.clone(),
        &p.model_config,
        precision,
        data,
        pad_id(&p.tokenizer)?,
        &cfg.base_model,
        world,
        rank,
    )?;
    let (params, trainable) = rp.parameter_counts();
    let layout = rp.layout();
    let ex = Executor::new(
        rp.tg.model.graph.clone(),
        Box::new(PlanBackend::like(backend.as_ref())),
        &rp.tg.programs(),
    )?;
    let plan = ex.plan().clone();
    let attention_scores = rp.tg.model.graph.tensors.iter().any(|t| t.name.contains("scores"));
    if json {
        let v = serde_json::json!({
            "device": backend.device_info(),
            "parameters": params,
            "trainable_parameters": trainable,
            "rows": layout.rows,
            "seq_len": layout.seq_len,
            "total_steps": rp.total_steps,
            "world_size": world,
            "rank": rank,
            "attention_score_matrix": attention_scores,
            "plan": plan,
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(());
    }
    println!("device: {}", backend.device_info());
    println!(
        "parameters: {params} ({trainable} trainable, {:.3}%)",
        100.0 * trainable as f64 / params.max(1) as f64
    );
    println!(
        "batch: {} rows x {} tokens; {} optimizer steps",
        layout.rows, layout.seq_len, rp.total_steps
    );
    if world > 1 {
        println!(
            "rank {rank} of {world}, sharding: {:?}",
            ferrotune::dist::ShardingConfig::from_config(&cfg)?.stage
        );
    }
    println!("memory plan (exact, before allocation):");
    println!("  frozen weights     {:>12}", gib(plan.persistent.frozen_weights));
    println!("  trainable params   {:>12}", gib(plan.persistent.trainable_parameters));
    println!("  optimizer state    {:>12}", gib(plan.persistent.optimizer_state));
    println!("  constants          {:>12}", gib(plan.persistent.constants));
    println!(
        "  activations        {:>12}  (transient arena, reused by liveness)",
        gib(plan.transient_bytes)
    );
    for pp in &plan.programs {
        println!(
            "    {:<10} {} nodes, peak {} (without reuse {})",
            pp.name,
            pp.nodes,
            gib(pp.transient_peak),
            gib(pp.transient_sum)
        );
        if pp.host_output_peak > 0 {
            println!(
                "    {:<10} of which gathered parameters and reduced gradient slices in flight: {}",
                "",
                gib(pp.host_output_peak)
            );
        }
    }
    println!("  total              {:>12}", gib(plan.total_bytes));
    Ok(())
}

fn preprocess(path: &Path, set: &[String], json: bool) -> Result<()> {
    let cfg = load_config(path, set)?;
    let p = open_model(&cfg)?;
    let data = prepare_data(&cfg, &p)?;
    let s = &data.stats;
    let sched = BatchSchedule::new(
        &data.train,
        ScheduleOptions::new(&cfg.data, cfg.gradient_accumulation_steps),
    )?;
    let plan = sched.epoch(0);
    // The first training sample, with `[[...]]` around the tokens the loss is taken on.
    let example = match data.train.first() {
        None => None,
        Some(sample) => {
            let mut out = String::new();
            let mut trained = false;
            for (id, &label) in sample.input_ids.iter().zip(&sample.labels) {
                let now = label != ferrotune::data::IGNORE_INDEX;
                if now != trained {
                    out.push_str(if now { "[[" } else { "]]" });
                    trained = now;
                }
                out.push_str(&p.tokenizer.decode(&[*id], false)?);
            }
            if trained {
                out.push_str("]]");
            }
            Some(out)
        }
    };
    if json {
        let v = serde_json::json!({
            "stats": s,
            "train_samples": data.train.len(),
            "eval_samples": data.eval.len(),
            "batch": [sched.layout().rows, sched.layout().seq_len],
            "steps_per_epoch": plan.steps.len(),
            "packing_efficiency": plan.efficiency(),
            "first_sample_marked": example,
        });
        println!("{v}");
        return Ok(());
    }
    println!("rows read: {}", s.rows);
    println!(
        "samples: {} ({} train, {} eval)",
        s.samples,
        data.train.len(),
        data.eval.len()
    );
    println!(
        "dropped: {} ({} too long, {} without labels); truncated: {}",
        s.dropped, s.dropped_long, s.dropped_no_labels, s.truncated
    );
    println!(
        "tokens: {} ({} trained), longest sample {}",
        s.tokens, s.label_tokens, s.max_len
    );
    println!(
        "batches: [{} x {}], {} optimizer steps per epoch, packing efficiency {:.1}%",
        sched.layout().rows,
        sched.layout().seq_len,
        plan.steps.len(),
        100.0 * plan.efficiency()
    );
    if let Some(out) = example {
        println!("\nfirst training sample ([[...]] marks the tokens the loss is taken on):");
        println!("{out}");
    }
    Ok(())
}

fn convert(input: &Path, out: &Path, dtype: &str) -> Result<()> {
    let dt = match dtype {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => return Err(Error::Config(format!("--dtype {other}: expected f32, bf16 or f16"))),
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("converting {bar:30} {pos}/{len} tensors").expect("template"),
    );
    let cb = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    ferrotune::model::convert_gguf_with_progress(input, out, dt, Some(&cb))?;
    bar.finish_and_clear();
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn fetch(name: &str, dir: &Path) -> Result<()> {
    match name {
        "smollm2-135m-instruct" | "SmolLM2-135M-Instruct" => {
            let out = ferrotune::model::fetch_smollm2_135m_instruct(dir)?;
            println!("{}", out.display());
            Ok(())
        }
        other => Err(ferrotune::msg!(
            "unknown model {other:?}; available: smollm2-135m-instruct"
        )),
    }
}

fn data(what: DataCommand) -> Result<()> {
    use ferrotune::data::generate::{arithmetic, wordnet};
    match what {
        DataCommand::Arithmetic {
            digits,
            train,
            eval,
            seed,
            out,
        } => {
            let opts = arithmetic::AdditionOptions {
                digits,
                n_train: train,
                n_eval: eval,
                seed,
            };
            let f = arithmetic::write_addition(&out, &opts)?;
            println!("{}\n{}", f.train.display(), f.eval.display());
        }
        DataCommand::Wordnet {
            wordnet_dir,
            train,
            eval,
            seed,
            out,
        } => {
            let opts = wordnet::WordnetOptions {
                max_train: Some(train),
                max_eval: Some(eval),
                seed,
            };
            let f = wordnet::write_wordnet(&wordnet_dir, &out, &opts)?;
            println!(
                "{} ({} rows)\n{} ({} rows)\n{}",
                f.train.display(),
                f.n_train,
                f.eval.display(),
                f.n_eval,
                f.licence.display()
            );
        }
    }
    Ok(())
}

fn devices() -> Result<()> {
    println!("cpu: available ({} threads)", rayon::current_num_threads());
    let adapters = ferrotune::backend::wgsl::list_adapters_blocking(None);
    if adapters.is_empty() {
        // Opening the default adapter names the graphics APIs tried and how to get one.
        match ferrotune::backend::wgsl::WgslContext::new_blocking(Default::default()) {
            Ok(ctx) => println!("wgsl: {}", ctx.describe()),
            Err(e) => println!("wgsl: not available: {e}"),
        }
    }
    for a in adapters {
        let note = if a.info.device_type == wgpu::DeviceType::Cpu {
            "CPU adapter: device auto skips it (the cpu backend is faster); device: wgsl uses it"
        } else {
            "GPU adapter: usable by device auto and device: wgsl"
        };
        println!("wgsl: {a}\n      {note}");
    }
    if cfg!(feature = "cuda") {
        match create_backend(DeviceChoice::Cuda) {
            Ok((b, _)) => println!("cuda: available ({})", b.device_info()),
            Err(e) => println!("cuda: not available: {e}"),
        }
    } else {
        println!("cuda: not built in (build with --features cuda)");
    }
    match create_backend(DeviceChoice::Auto) {
        Ok((b, notices)) => {
            for n in notices {
                println!("{n}");
            }
            println!("default (device: auto): {} ({})", b.name(), b.device_info())
        }
        Err(e) => println!("default: {e}"),
    }
    Ok(())
}
