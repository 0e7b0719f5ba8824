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
        assert!(g.with_role(Role::Gradient).len() > 0);
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
