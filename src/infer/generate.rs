//! Text generation with a key/value cache: one prefill pass over the prompts, then one
//! decode pass per new token; greedy or temperature / top-p sampling.

use crate::backend::Backend;
use crate::exec::{Executor, ProgramSpec};
use crate::graph::NodeId;
use crate::model::llama::{build_generation, GenGraph, GenPass};
use crate::model::ModelConfig;
use crate::ops::Op;
use crate::tensor::HostTensor;
use crate::train::session::{load_weights, Precision, WeightSource};
use crate::Result;
use rand::{RngExt, SeedableRng};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Generation of a sequence ends at any of these tokens (not included in the output).
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_ids: Vec::new(),
        }
    }
}

pub struct Generator {
    ex: Executor,
    g: GenGraphHandles,
    pub rows: usize,
    pub prompt_len: usize,
    pub max_len: usize,
    vocab: usize,
}

struct GenGraphHandles {
    prefill: GenPass,
    decode: GenPass,
    prefill_prog: usize,
    decode_prog: usize,
}

/// The cache writes a pass needs (they are effects: nothing reads their outputs' values
/// except the attention of the same pass).
fn cache_writes(g: &crate::graph::Graph, from: usize, to: usize) -> Vec<NodeId> {
    (from..to)
        .filter(|&i| g.nodes[i].op == Op::CacheWrite)
        .map(|i| NodeId(i as u32))
        .collect()
}

impl Generator {
    /// Plans a generator for batches of `rows` prompts of at most `prompt_len` tokens and
    /// `max_len` tokens in all (prompt plus generated).
    pub fn new(
        cfg: &ModelConfig,
        weights: &dyn WeightSource,
        backend: Box<dyn Backend>,
        precision: Precision,
        rows: usize,
        prompt_len: usize,
        max_len: usize,
    ) -> Result<Self> {
        let gg: GenGraph = build_generation(cfg, rows, prompt_len, max_len, precision.weights, precision.activations)?;
        let g = &gg.graph;
        let split = g.producer[gg.prefill.logits.idx()].expect("produced").idx() + 1;
        let specs = [
            ProgramSpec::new("prefill", &[gg.prefill.logits], &cache_writes(g, 0, split)),
            ProgramSpec::new("decode", &[gg.decode.logits], &cache_writes(g, split, g.nodes.len())),
        ];
        let mut ex = Executor::new(gg.graph.clone(), backend, &specs)?;
        load_weights(&mut ex, &gg.weights, gg.inv_freq, cfg, weights)?;
        let handles = GenGraphHandles {
            prefill: gg.prefill,
            decode: gg.decode,
            prefill_prog: 0,
            decode_prog: 1,
        };
        Ok(Generator {
            ex,
            g: handles,
            rows,
            prompt_len,
            max_len,
            vocab: cfg.vocab_size,
        })
    }

    pub fn executor(&self) -> &Executor {
        &self.ex
    }

    async fn run_pass(
        &mut self,
        pass: GenPass,
        prog: usize,
        ids: &[i32],
        pos: &[i32],
        last: &[i32],
    ) -> Result<Vec<f32>> {
        let n = ids.len();
        let slots: Vec<i32> = pos
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                if p < 0 {
                    -1
                } else {
                    (i / pass.seq_len * self.max_len) as i32 + p
                }
            })
            .collect();
        let (a, b, c, d) = (
            HostTensor::from_i32(&[n], ids),
            HostTensor::from_i32(&[n], pos),
            HostTensor::from_i32(&[n], &slots),
            HostTensor::from_i32(&[last.len()], last),
        );
        let out = self
            .ex
            .run_async(
                prog,
                &[
                    (pass.input_ids, &a),
                    (pass.positions, &b),
                    (pass.slots, &c),
                    (pass.last, &d),
                ],
            )
            .await?;
        Ok(out[0].to_f32())
    }

    /// Generates a continuation for each prompt (any number of prompts; they run in
    /// batches of `rows`). Returns the new tokens of each, without the stop token.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn generate(&mut self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
        pollster::block_on(self.generate_async(prompts, opts))
    }

    /// [`Generator::generate`] without blocking.
    pub async fn generate_async(&mut self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
        let mut all = Vec::with_capacity(prompts.len());
        let task = (prompts.len() > self.rows).then(|| crate::progress::task("generating", prompts.len() as u64));
        for chunk in prompts.chunks(self.rows) {
            all.extend(self.generate_batch(chunk, opts, &mut rng).await?);
            if let Some(t) = &task {
                t.set_done(all.len() as u64);
            }
        }
        Ok(all)
    }

    async fn generate_batch(
        &mut self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        rng: &mut rand_chacha::ChaCha8Rng,
    ) -> Result<Vec<Vec<u32>>> {
        let (rows, t) = (self.rows, self.prompt_len);
        for p in prompts {
            if p.is_empty() || p.len() > t {
                return Err(crate::msg!(
                    "a prompt has {} tokens; this generator takes 1 to {t}",
                    p.len()
                ));
            }
        }
        let mut ids = vec![0i32; rows * t];
        let mut pos = vec![-1i32; rows * t];
        let mut last = vec![0i32; rows];
        for (r, p) in prompts.iter().enumerate() {
            for (j, &tok) in p.iter().enumerate() {
                ids[r * t + j] = tok as i32;
                pos[r * t + j] = j as i32;
            }
            last[r] = (r * t + p.len() - 1) as i32;
        }
        let logits = self
            .run_pass(self.g.prefill, self.g.prefill_prog, &ids, &pos, &last)
            .await?;
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        let mut done = vec![false; prompts.len()];
        let mut next: Vec<u32> = (0..prompts.len())
            .map(|r| pick(&logits[r * self.vocab..(r + 1) * self.vocab], opts, rng))
            .collect();
        let budget = opts
            .max_new_tokens
            .min(self.max_len - prompts.iter().map(|p| p.len()).max().unwrap_or(0));
        for step in 0..budget {
            for r in 0..prompts.len() {
                if !done[r] {
                    if opts.stop_ids.contains(&next[r]) {
                        done[r] = true;
                    } else {
                        out[r].push(next[r]);
                    }
                }
            }
            if done.iter().all(|&d| d) || step + 1 == budget {
                break;
            }
            let mut ids = vec![0i32; rows];
            let mut pos = vec![-1i32; rows];
            for r in 0..prompts.len() {
                if !done[r] {
                    ids[r] = next[r] as i32;
                    pos[r] = (prompts[r].len() + step) as i32;
                }
            }
            let last: Vec<i32> = (0..rows as i32).collect();
            let logits = self
                .run_pass(self.g.decode, self.g.decode_prog, &ids, &pos, &last)
                .await?;
            for r in 0..prompts.len() {
                next[r] = pick(&logits[r * self.vocab..(r + 1) * self.vocab], opts, rng);
            }
        }
        Ok(out)
    }
}

/// Greedy (temperature 0) or nucleus sampling (Holtzman et al. 2020).
fn pick(logits: &[f32], opts: &GenerateOptions, rng: &mut rand_chacha::ChaCha8Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0 as u32
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, ((v as f64 - m) / opts.temperature).exp()))
        .collect();
    let z: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= z);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1;
        if kept >= opts.top_p {
            cut = i + 1;
            break;
        }
    }
    let probs = &probs[..cut];
    let mut u = rng.random::<f64>() * probs.iter().map(|p| p.1).sum::<f64>();
    for p in probs {
        u -= p.1;
        if u <= 0.0 {
            return p.0 as u32;
        }
    }
    probs.last().map(|p| p.0 as u32).unwrap_or_else(argmax)
}
