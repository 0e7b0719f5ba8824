//! Helpers shared by integration tests: seeded random tensors, the CPU executor, and a
//! finite-difference gradient check.
#![allow(dead_code)]

use ferrotune::backend::cpu::CpuBackend;
use ferrotune::exec::{Executor, ProgramSpec};
use ferrotune::graph::{self, Graph, Role, TensorId};
use ferrotune::{DType, HostTensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn randn(r: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    // Box-Muller
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (r.random::<f64>().max(1e-12), r.random());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        })
        .collect()
}

pub fn rand_tensor(r: &mut ChaCha8Rng, shape: &[usize], dtype: DType) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::from_f64(shape, &randn(r, n)).cast(dtype)
}

pub fn cpu_executor(g: Graph, specs: &[ProgramSpec]) -> Executor {
    Executor::new(g, Box::new(CpuBackend::new()), specs).expect("compile")
}

pub mod train;

/// ||a - b|| / ||b||
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-300)
}

/// Gradient check in f64. `build` receives a graph holding the parameters (f64, random)
/// and returns the op output(s) to check; the loss is `sum_k sum(out_k * R_k)` with random
/// constant `R_k`, so every output element's gradient is exercised. `inputs` are extra
/// non-differentiable input tensors (ids, positions...) given with their values.
pub struct GradCheck {
    pub params: Vec<(String, Vec<usize>)>,
    pub inputs: Vec<(String, HostTensor)>,
    pub seed: u64,
    /// Finite-difference step (a power of two keeps perturbations exact).
    pub h: f64,
    /// Elements per parameter to check (all when the tensor is smaller).
    pub max_elems: usize,
}

impl GradCheck {
    pub fn new(params: &[(&str, &[usize])]) -> Self {
        GradCheck {
            params: params.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect(),
            inputs: Vec::new(),
            seed: 7,
            h: 1.0 / 65536.0,
            max_elems: 40,
        }
    }
    pub fn input(mut self, name: &str, v: HostTensor) -> Self {
        self.inputs.push((name.into(), v));
        self
    }

    /// Runs the check and returns the worst relative error over the parameters.
    pub fn run(&self, build: impl Fn(&mut Graph, &[TensorId], &[TensorId]) -> Vec<TensorId>) -> f64 {
        let mut r = rng(self.seed);
        let mut g = Graph::new();
        let params: Vec<TensorId> = self.params.iter().map(|(n, s)| g.parameter(n, s, DType::F64)).collect();
        let inputs: Vec<TensorId> = self.inputs.iter().map(|(n, v)| g.input(n, &v.shape, v.dtype)).collect();
        let outs = build(&mut g, &params, &inputs);
        let mut loss: Option<TensorId> = None;
        let mut consts = Vec::new();
        for (k, &o) in outs.iter().enumerate() {
            let shape = g.shape(o).to_vec();
            let rt = g.constant(&format!("R{k}"), &shape, DType::F64);
            consts.push((rt, rand_tensor(&mut r, &shape, DType::F64)));
            let prod = g.mul(o, rt).unwrap();
            let s = g.sum(prod).unwrap();
            loss = Some(match loss {
                Some(l) => g.add(l, s).unwrap(),
                None => s,
            });
        }
        let loss = loss.expect("at least one output");
        let seed = g.input("seed", &[1], DType::F64);
        let grads = graph::backward(&mut g, loss, seed, &params).expect("backward");
        let grad_ids: Vec<TensorId> = params.iter().map(|p| grads[p]).collect();
        assert!(!g.with_role(Role::Gradient).is_empty());
        let mut ex = cpu_executor(
            g,
            &[
                ProgramSpec::new("loss", &[loss], &[]),
                ProgramSpec::new("grads", &grad_ids, &[]),
            ],
        );
        let mut values: Vec<HostTensor> = Vec::new();
        for (&p, (_, s)) in params.iter().zip(&self.params) {
            let v = rand_tensor(&mut r, s, DType::F64);
            ex.set_tensor(p, &v).unwrap();
            values.push(v);
        }
        for (t, v) in &consts {
            ex.set_tensor(*t, v).unwrap();
        }
        let one = HostTensor::from_f64(&[1], &[1.0]);
        let mut feed: Vec<(TensorId, &HostTensor)> =
            inputs.iter().zip(&self.inputs).map(|(t, (_, v))| (*t, v)).collect();
        feed.push((seed, &one));
        let analytic = ex.run(1, &feed).unwrap();
        let mut worst: f64 = 0.0;
        for (pi, &p) in params.iter().enumerate() {
            let a = analytic[pi].to_f64();
            let n = a.len();
            let picks: Vec<usize> = if n <= self.max_elems {
                (0..n).collect()
            } else {
                (0..self.max_elems).map(|_| r.random_range(0..n)).collect()
            };
            let base = values[pi].to_f64();
            let mut fd = Vec::new();
            let mut an = Vec::new();
            for &e in &picks {
                let mut eval = |delta: f64| {
                    let mut v = base.clone();
                    v[e] += delta;
                    ex.set_tensor(p, &HostTensor::from_f64(&values[pi].shape, &v)).unwrap();
                    ex.run(0, &feed).unwrap()[0].to_f64()[0]
                };
                let d = (eval(self.h) - eval(-self.h)) / (2.0 * self.h);
                fd.push(d);
                an.push(a[e]);
            }
            ex.set_tensor(p, &values[pi]).unwrap();
            let err = rel_err(&an, &fd);
            eprintln!(
                "{}: relative error {err:.2e} over {} elements",
                self.params[pi].0,
                picks.len()
            );
            worst = worst.max(err);
        }
        worst
    }
}

/// The tiny Llama's config.json: 2 layers, hidden 16, grouped-query attention, tied embeddings.
pub const TINY_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
    "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
    "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}"#;

/// A tiny random Llama in Hugging Face layout (config.json, model.safetensors and the
/// Mistral tokenizer fixture, 32000 tokens) in `dir`.
pub fn write_tiny_model(dir: &std::path::Path, seed: u64) -> std::path::PathBuf {
    write_tiny_model_with(dir, seed, true)
}

/// [`write_tiny_model`] with its own `lm_head.weight` (`tie_word_embeddings: false`).
pub fn write_tiny_model_untied(dir: &std::path::Path, seed: u64) -> std::path::PathBuf {
    write_tiny_model_with(dir, seed, false)
}

fn write_tiny_model_with(dir: &std::path::Path, seed: u64, tied: bool) -> std::path::PathBuf {
    use std::collections::HashMap;
    std::fs::create_dir_all(dir).unwrap();
    let untied = TINY_CONFIG.replace("\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false");
    let config = if tied { TINY_CONFIG } else { untied.as_str() };
    std::fs::write(dir.join("config.json"), config).unwrap();
    let cfg = ferrotune::model::ModelConfig::parse(config, "tiny").unwrap();
    let mut r = rng(seed);
    let mut tensors: Vec<(String, HostTensor)> = Vec::new();
    let (h, f, kv) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let mut add = |name: String, shape: &[usize], std: f64| {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = if std == 0.0 {
            vec![1.0; n]
        } else {
            randn(&mut r, n).iter().map(|x| x * std).collect()
        };
        tensors.push((name, HostTensor::from_f64(shape, &v).cast(DType::F32)));
    };
    add("model.embed_tokens.weight".into(), &[cfg.vocab_size, h], 0.1);
    add("model.norm.weight".into(), &[h], 0.0);
    if !tied {
        add("lm_head.weight".into(), &[cfg.vocab_size, h], 0.1);
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), &[h], 0.0);
        add(format!("{p}.post_attention_layernorm.weight"), &[h], 0.0);
        add(format!("{p}.self_attn.q_proj.weight"), &[h, h], 0.2);
        add(format!("{p}.self_attn.k_proj.weight"), &[kv, h], 0.2);
        add(format!("{p}.self_attn.v_proj.weight"), &[kv, h], 0.2);
        add(format!("{p}.self_attn.o_proj.weight"), &[h, h], 0.2);
        add(format!("{p}.mlp.gate_proj.weight"), &[f, h], 0.2);
        add(format!("{p}.mlp.up_proj.weight"), &[f, h], 0.2);
        add(format!("{p}.mlp.down_proj.weight"), &[h, f], 0.2);
    }
    ferrotune::model::write_safetensors(
        &dir.join("model.safetensors"),
        &tensors,
        None::<HashMap<String, String>>,
    )
    .unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers/mistral7b");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures.join(f), dir.join(f)).unwrap();
    }
    dir.to_path_buf()
}

/// Addition problems as chat_template jsonl: `(train, eval)` paths in `dir`.
pub fn write_arithmetic(dir: &std::path::Path, n_train: usize, n_eval: usize) -> (String, String) {
    use ferrotune::data::generate::arithmetic::{write_addition, AdditionOptions};
    let f = write_addition(
        dir,
        &AdditionOptions {
            digits: 2,
            n_train,
            n_eval,
            seed: 5,
        },
    )
    .unwrap();
    (f.train.display().to_string(), f.eval.display().to_string())
}

/// ChatML as a Jinja template, for tokenizers that ship none.
pub const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A fresh, empty temporary folder unique to this test.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("ferrotune-test-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The RMSNorm backward variants with their inputs: with the weight gradient; without it (a
/// frozen weight), alone and adding `acc` (the residual stream's other gradient).
pub fn rms_norm_backward_cases(
    x: &HostTensor,
    w: &HostTensor,
    dy: &HostTensor,
    acc: &HostTensor,
) -> Vec<(ferrotune::ops::Op, Vec<HostTensor>)> {
    [(true, false), (false, false), (false, true)]
        .into_iter()
        .map(|(weight_grad, add)| {
            let op = ferrotune::ops::Op::RmsNormBackward {
                eps: 1e-5,
                weight_grad,
                add,
            };
            let mut inputs = vec![x.clone(), w.clone(), dy.clone()];
            if add {
                inputs.push(acc.clone());
            }
            (op, inputs)
        })
        .collect()
}
