//! Scoring a token sequence: its logits, per-token negative log-likelihood and perplexity.

use crate::backend::Backend;
use crate::exec::{Executor, ProgramSpec};
use crate::model::llama::{build, BuildOptions};
use crate::model::ModelConfig;
use crate::tensor::{DType, HostTensor};
use crate::train::session::{load_base_weights, WeightSource};
use crate::Result;

pub struct Score {
    /// `[tokens, vocab]`, row `i` predicts token `i + 1`.
    pub logits: Vec<f32>,
    /// NLL of tokens `1..n` given their prefix.
    pub nll: Vec<f64>,
    pub mean_nll: f64,
}

/// Runs the model (f32) over `ids` as one sequence.
pub fn score(cfg: &ModelConfig, weights: &dyn WeightSource, backend: Box<dyn Backend>, ids: &[u32]) -> Result<Score> {
    let n = ids.len();
    if n < 2 {
        return Err(crate::msg!("scoring needs at least 2 tokens, got {n}"));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
        return Err(crate::msg!(
            "token id {bad} is outside the vocabulary of {}",
            cfg.vocab_size
        ));
    }
    let opts = BuildOptions {
        rows: 1,
        seq_len: n,
        weight_dtype: DType::F32,
        act_dtype: DType::F32,
        lora: None,
        train_base: false,
        modules_to_save: vec![],
        loss_rows: None,
    };
    let m = build(cfg, &opts)?;
    let mut ex = Executor::new(m.graph.clone(), backend, &[ProgramSpec::new("score", &[m.logits], &[])])?;
    load_base_weights(&mut ex, &m, weights)?;
    let ids_i: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let pos: Vec<i32> = (0..n as i32).collect();
    let (a, b, c) = (
        HostTensor::from_i32(&[n], &ids_i),
        HostTensor::from_i32(&[n], &pos),
        HostTensor::from_i32(&[n], &vec![1; n]),
    );
    let logits = ex.run(0, &[(m.input_ids, &a), (m.positions, &b), (m.segments, &c)])?[0].to_f32();
    let v = cfg.vocab_size;
    let nll: Vec<f64> = (0..n - 1)
        .map(|i| {
            let row = &logits[i * v..(i + 1) * v];
            let mx = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
            lse - row[ids[i + 1] as usize] as f64
        })
        .collect();
    let mean_nll = nll.iter().sum::<f64>() / nll.len() as f64;
    Ok(Score { logits, nll, mean_nll })
}
