//! The memory plan of a SmolLM2-135M LoRA step at 4k, 8k and 16k tokens: fused attention's
//! activations grow linearly with the sequence and hold no `[T, T]` tensor; eager
//! attention's grow quadratically (its scores and probabilities are `[B, H, T, T]`).

use ferrotune::backend::cpu::CpuBackend;
use ferrotune::backend::plan::PlanBackend;
use ferrotune::exec::Executor;
use ferrotune::model::llama::{build_with_attention, AttnOptions, BuildOptions, LoraOptions, LINEAR_MODULES};
use ferrotune::model::ModelConfig;
use ferrotune::train::step_graph::{OptimizerOptions, TrainGraph};
use ferrotune::DType;
use std::path::Path;

/// (transient peak of the training step in bytes, whether some tensor is `[.., T, T]`).
fn plan(seq_len: usize, eager: bool) -> (u64, bool) {
    let cfg = ModelConfig::from_file(Path::new("configs/bench/smollm2-135m.json")).unwrap();
    let opts = BuildOptions {
        rows: 1,
        seq_len,
        weight_dtype: DType::BF16,
        act_dtype: DType::F32,
        lora: Some(LoraOptions {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            use_rslora: false,
            targets: LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
        }),
        train_base: false,
        modules_to_save: vec![],
        loss_rows: Some(seq_len / 4),
    };
    let attn = AttnOptions {
        eager,
        ..Default::default()
    };
    let tg = TrainGraph::new(
        build_with_attention(&cfg, &opts, &attn).unwrap(),
        &OptimizerOptions::default(),
    )
    .unwrap();
    let g = tg.model.graph.clone();
    let square = g.tensors.iter().any(|t| t.shape.ends_with(&[seq_len, seq_len]));
    let ex = Executor::new(g, Box::new(PlanBackend::like(&CpuBackend::new())), &tg.programs()).unwrap();
    let train = ex.plan().programs.iter().find(|p| p.name == "train").unwrap();
    (train.transient_peak, square)
}

#[test]
fn fused_attention_memory_is_linear_and_eager_is_quadratic() {
    let fused: Vec<(u64, bool)> = [4096, 8192, 16384].iter().map(|&t| plan(t, false)).collect();
    let eager: Vec<(u64, bool)> = [4096, 8192, 16384].iter().map(|&t| plan(t, true)).collect();
    assert!(fused.iter().all(|(_, sq)| !sq), "the fused graph holds no score matrix");
    assert!(
        eager.iter().all(|(_, sq)| *sq),
        "the eager graph holds the score matrix"
    );
    // With P(T) = a T^2 + b T + c at T, 2T, 4T: D1 = P(2T) - P(T) = 3aT^2 + bT and
    // D2 = P(4T) - P(2T) = 12aT^2 + 2bT, so D2 - 2 D1 = 6aT^2.
    let t = 4096f64;
    let quad = |p: &[(u64, bool)]| {
        let (d1, d2) = ((p[1].0 - p[0].0) as f64, (p[2].0 - p[1].0) as f64);
        ((d2 - 2.0 * d1) / (6.0 * t * t), d1)
    };
    let (af, d1f) = quad(&fused);
    let (ae, _) = quad(&eager);
    assert!(
        (af * 6.0 * t * t).abs() < 1e-3 * d1f,
        "fused attention memory is not linear: {af} bytes per T^2 (peaks {fused:?})"
    );
    // Eager keeps each layer's f32 probabilities [1, 9, T, T] for the backward: at least
    // 30 layers x 9 heads x 4 bytes per T^2.
    assert!(ae >= 30.0 * 9.0 * 4.0, "eager: {ae} bytes per T^2 (peaks {eager:?})");
    // Fused at 16k needs less than the eager step at 4k.
    assert!(
        fused[2].0 < eager[0].0,
        "fused 16k {} vs eager 4k {}",
        fused[2].0,
        eager[0].0
    );
}
