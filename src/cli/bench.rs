//! `ferrotune bench`: GEMM throughput per backend, and training throughput of a model
//! shape with random weights (no files needed).

use super::progress::gib;
use super::BenchCommand;
use ferrotune::backend::plan::PlanBackend;
use ferrotune::backend::select::create_backend;
use ferrotune::backend::Backend;
use ferrotune::config::DeviceChoice;
use ferrotune::exec::Executor;
use ferrotune::graph::TensorId;
use ferrotune::model::llama::{build, BuildOptions, LoraOptions, LINEAR_MODULES};
use ferrotune::model::ModelConfig;
use ferrotune::tensor::{DType, HostTensor};
use ferrotune::train::session::{load_base_weights, Precision, WeightSource};
use ferrotune::train::trainer::now;
use ferrotune::train::{OptimizerOptions, TrainGraph};
use ferrotune::{Error, Result};
use rand::{RngExt, SeedableRng};

pub fn run(what: BenchCommand) -> Result<()> {
    match what {
        BenchCommand::Matmul { sizes } => matmul(&sizes),
        BenchCommand::Train {
            model_config,
            seq_len,
            batch,
            lora_r,
            full,
            warmup,
            steps,
            device,
            json,
            plan_only,
        } => {
            let cfg = ModelConfig::from_file(&model_config)?;
            let device: DeviceChoice = serde_yaml::from_str(&device)
                .map_err(|_| Error::Config(format!("--device {device}: expected auto, cpu, wgsl or cuda")))?;
            if plan_only {
                return plan(&cfg, seq_len, batch, (!full).then_some(lora_r), device, json);
            }
            train(
                &cfg,
                seq_len,
                batch,
                (!full).then_some(lora_r),
                warmup,
                steps,
                device,
                json,
            )
        }
    }
}

fn matmul(sizes: &[usize]) -> Result<()> {
    println!("{:<8} {:<28} {:>6} {:>12}", "backend", "kernel", "size", "GFLOP/s");
    for &n in sizes {
        let g = ferrotune::backend::cpu::bench_gemm(n);
        println!("{:<8} {:<28} {:>6} {:>12.1}", "cpu", "gemm crate f32", n, g);
    }
    use ferrotune::backend::wgsl::{bench, WgslContext, WgslOptions};
    match WgslContext::new_blocking(WgslOptions::default()) {
        Ok(ctx) => {
            let rows = bench::bench_matmul(&ctx, sizes, &[DType::F32, DType::F16], bench::BenchOptions::default())?;
            for r in rows {
                let name = format!("{} {} ({})", r.kernel, r.dtype, ctx.info.name);
                println!("{:<8} {:<28} {:>6} {:>12.1}", "wgsl", name, r.size, r.gflops);
            }
        }
        Err(e) => println!("wgsl: {e}"),
    }
    Ok(())
}

/// Weights drawn from N(0, 0.02^2) (norm gains 1), as a model's random initialisation.
struct RandomWeights {
    seed: u64,
}

impl WeightSource for RandomWeights {
    fn contains(&self, _name: &str) -> bool {
        true
    }
    fn get_shaped(&self, name: &str, shape: &[usize], dtype: DType) -> Result<HostTensor> {
        let n: usize = shape.iter().product();
        if name.contains("norm") {
            return Ok(HostTensor::from_f32(shape, &vec![1.0; n]).cast(dtype));
        }
        let h = name
            .bytes()
            .fold(self.seed, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(h);
        let v: Vec<f32> = (0..n).map(|_| (r.random::<f32>() - 0.5) * 0.0693).collect(); // std 0.02
        Ok(HostTensor::from_f32(shape, &v).cast(dtype))
    }
}

/// The training graph of the shape for `backend`: bf16 weights and activations on cuda, f32
/// activations on wgsl, f32 on cpu; LoRA of rank `lora_r` on every linear layer, or full.
fn train_graph(
    cfg: &ModelConfig,
    seq: usize,
    rows: usize,
    lora_r: Option<usize>,
    backend: &dyn Backend,
) -> Result<(TrainGraph, Option<LoraOptions>)> {
    let precision = match backend.name() {
        "cuda" => Precision {
            weights: DType::BF16,
            activations: DType::BF16,
        },
        "wgsl" => Precision {
            weights: backend.preferred_weight_dtype(),
            activations: DType::F32,
        },
        _ => Precision::F32,
    };
    let lora = lora_r.map(|r| LoraOptions {
        r,
        alpha: 2.0 * r as f64,
        dropout: 0.0,
        use_rslora: false,
        targets: LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
    });
    let opts = BuildOptions {
        rows,
        seq_len: seq,
        weight_dtype: precision.weights,
        act_dtype: precision.activations,
        lora: lora.clone(),
        train_base: lora.is_none(),
        modules_to_save: vec![],
        loss_rows: None,
    };
    Ok((TrainGraph::new(build(cfg, &opts)?, &OptimizerOptions::default())?, lora))
}

/// `bench train --plan-only`: the step's memory plan on `device`, planned against a backend
/// that allocates nothing (for cuda, without opening a GPU).
fn plan(
    cfg: &ModelConfig,
    seq: usize,
    rows: usize,
    lora_r: Option<usize>,
    device: DeviceChoice,
    json: bool,
) -> Result<()> {
    let (tg, planner) = match device {
        // The CUDA backend's arena alignment; its largest buffer is the device's memory.
        DeviceChoice::Cuda => {
            let planner = PlanBackend::new("cuda", 256, u64::MAX);
            (train_graph(cfg, seq, rows, lora_r, &planner)?.0, planner)
        }
        _ => {
            let (backend, notices) = create_backend(device)?;
            notices.iter().for_each(|n| eprintln!("{n}"));
            let tg = train_graph(cfg, seq, rows, lora_r, backend.as_ref())?.0;
            (tg, PlanBackend::like(backend.as_ref()))
        }
    };
    let name = planner.name();
    let ex = Executor::new(tg.model.graph.clone(), Box::new(planner), &tg.programs())?;
    let p = ex.plan();
    if json {
        let v = serde_json::json!({"device": name, "seq": seq, "batch": rows, "plan": p});
        println!("{v}");
        return Ok(());
    }
    let b = &p.persistent;
    println!(
        "{name} {} seq {seq} x {rows}: planned peak {} = frozen weights {} + trainable {} + optimizer state {} + constants {} + transient {} (the executor's plan; a backend's own buffers, such as cuda's scratch, its cuBLASLt workspace and bf16 weight copies, come on top)",
        if lora_r.is_some() { "LoRA" } else { "full" },
        gib(p.total_bytes),
        gib(b.frozen_weights),
        gib(b.trainable_parameters),
        gib(b.optimizer_state),
        gib(b.constants),
        gib(p.transient_bytes),
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn train(
    cfg: &ModelConfig,
    seq: usize,
    rows: usize,
    lora_r: Option<usize>,
    warmup: usize,
    steps: usize,
    device: DeviceChoice,
    json: bool,
) -> Result<()> {
    let (backend, notices) = create_backend(device)?;
    notices.iter().for_each(|n| eprintln!("{n}"));
    let (tg, lora) = train_graph(cfg, seq, rows, lora_r, backend.as_ref())?;
    let device_info = backend.device_info();
    let t0 = now();
    let mut ex = Executor::new(tg.model.graph.clone(), backend, &tg.programs())?;
    let weights = RandomWeights { seed: 0 };
    load_base_weights(&mut ex, &tg.model, &weights)?;
    for p in &tg.model.lora {
        let (a, b) = ferrotune::adapters::lora::init_pair(p, lora_r.unwrap_or(1), 0, 0, ex.graph().dtype(p.a));
        ex.set_tensor(p.a, &a)?;
        ex.set_tensor(p.b, &b)?;
    }
    let setup = now() - t0;
    let n = rows * seq;
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let ids: Vec<i32> = (0..n).map(|_| r.random_range(0..cfg.vocab_size as i32)).collect();
    let pos: Vec<i32> = (0..n).map(|i| (i % seq) as i32).collect();
    let seg = vec![1i32; n];
    let mut tgt: Vec<i32> = (0..n)
        .map(|i| if (i + 1) % seq == 0 { -100 } else { ids[i + 1] })
        .collect();
    tgt.truncate(n);
    let labels = tgt.iter().filter(|&&t| t != -100).count();
    let scale = HostTensor::from_f64(&[1], &[1.0 / labels as f64]).cast(ex.graph().dtype(tg.loss_scale));
    let feed_t: Vec<(TensorId, HostTensor)> = vec![
        (tg.model.input_ids, HostTensor::from_i32(&[n], &ids)),
        (tg.model.positions, HostTensor::from_i32(&[n], &pos)),
        (tg.model.segments, HostTensor::from_i32(&[n], &seg)),
        (tg.model.targets, HostTensor::from_i32(&[n], &tgt)),
        (tg.loss_scale, scale),
    ];
    let feed: Vec<(TensorId, &HostTensor)> = feed_t.iter().map(|(t, v)| (*t, v)).collect();
    let hyper = HostTensor::from_f32(&[3], &TrainGraph::hyper_values(&OptimizerOptions::default(), 1e-4, 1));
    let (train_p, opt_p) = (ex.program_index("train")?, ex.program_index("optimizer")?);
    let mut loss = 0.0;
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let s = now();
        let out = ex.run(train_p, &feed)?;
        ex.run(opt_p, &[(tg.hyper, &hyper)])?;
        loss = out[0].to_f64()[0] / labels as f64;
        if i >= warmup {
            times.push(now() - s);
        }
    }
    times.sort_by(f64::total_cmp);
    let step = times[times.len() / 2];
    let tok_s = n as f64 / step;
    let g = &tg.model.graph;
    let params: f64 = tg.model.weights.iter().map(|(_, t)| g.info(*t).numel() as f64).sum();
    // Training FLOPs per token: 6N for full training; LoRA skips the frozen weight gradients (4N).
    let per_token = if lora.is_some() { 4.0 } else { 6.0 } * params
        + 6.0 * 2.0 * cfg.num_hidden_layers as f64 * seq as f64 * (cfg.num_attention_heads * cfg.head_dim) as f64 / 2.0;
    let tflops = per_token * tok_s / 1e12;
    let peak = ex.plan().total_bytes;
    let v = serde_json::json!({
        "device": device_info, "mode": if lora.is_some() { "lora" } else { "full" }, "seq": seq, "batch": rows,
        "tok_s": tok_s.round(), "step_ms": (step * 1e4).round() / 10.0, "model_tflops": (tflops * 10.0).round() / 10.0,
        "peak_gib": ex.plan().total_bytes as f64 / (1u64 << 30) as f64, "loss": loss, "setup_s": setup,
        "params_m": params / 1e6,
    });
    if json {
        println!("{v}");
    } else {
        println!(
            "{device_info}: {} seq {seq} x {rows}: {:.0} tokens/s, step {:.1} ms, {:.1} model TFLOP/s, planned peak {}, loss {loss:.3}",
            if lora.is_some() { "LoRA" } else { "full" },
            tok_s,
            step * 1e3,
            tflops,
            gib(peak)
        );
    }
    Ok(())
}
