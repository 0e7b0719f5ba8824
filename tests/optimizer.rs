//! Optimizer ops against an independent f64 transcription of torch.optim.AdamW and
//! torch.nn.utils.clip_grad_norm_.

mod common;
use common::{cpu_executor, rand_tensor, rng};
use ferrotune::exec::ProgramSpec;
use ferrotune::graph::{Graph, NodeId};
use ferrotune::ops::{AdamWSpec, Op};
use ferrotune::{DType, HostTensor};

/// torch.optim.AdamW's single-tensor update, written out in f64.
fn torch_adamw(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], t: i32, lr: f64, s: &AdamWSpec) {
    let bc1 = 1.0 - s.beta1.powi(t);
    let bc2 = 1.0 - s.beta2.powi(t);
    for i in 0..p.len() {
        p[i] *= 1.0 - lr * s.weight_decay;
        m[i] = s.beta1 * m[i] + (1.0 - s.beta1) * g[i];
        v[i] = s.beta2 * v[i] + (1.0 - s.beta2) * g[i] * g[i];
        let denom = v[i].sqrt() / bc2.sqrt() + s.eps;
        p[i] -= lr / bc1 * m[i] / denom;
    }
}

#[test]
fn accumulate_clip_and_adamw_match_torch() {
    let spec = AdamWSpec {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let max_norm = 0.5;
    let shapes: [&[usize]; 2] = [&[4, 3], &[7]];
    let mut g = Graph::new();
    let mut params = Vec::new();
    let mut states = Vec::new();
    let mut grads_in = Vec::new();
    let mut acc_nodes = Vec::new();
    for (k, s) in shapes.iter().enumerate() {
        let p = g.parameter(&format!("p{k}"), s, DType::F64);
        let acc = g.state(&format!("acc{k}"), s, DType::F64);
        let m = g.state(&format!("m{k}"), s, DType::F64);
        let v = g.state(&format!("v{k}"), s, DType::F64);
        let gi = g.input(&format!("g{k}"), s, DType::F64);
        g.apply(Op::AccumulateGrad, &[acc, gi]).unwrap();
        acc_nodes.push(NodeId(g.nodes.len() as u32 - 1));
        params.push(p);
        states.push((acc, m, v));
        grads_in.push(gi);
    }
    let accs: Vec<_> = states.iter().map(|s| s.0).collect();
    let sumsq = g.apply1(Op::SumSquares, &accs).unwrap();
    let nc = g.apply(Op::ClipCoef { max_norm }, &[sumsq]).unwrap();
    let hyper = g.input("hyper", &[3], DType::F32);
    let mut upd = Vec::new();
    for (k, &p) in params.iter().enumerate() {
        let (acc, m, v) = states[k];
        g.apply(Op::AdamW(spec.clone()), &[p, acc, m, v, hyper, nc[1]]).unwrap();
        upd.push(NodeId(g.nodes.len() as u32 - 1));
    }
    let mut ex = cpu_executor(
        g,
        &[
            ProgramSpec::new("micro", &[], &acc_nodes),
            ProgramSpec::new("opt", &[nc[0]], &upd),
        ],
    );
    let mut r = rng(3);
    let mut p_ref: Vec<Vec<f64>> = Vec::new();
    for (k, s) in shapes.iter().enumerate() {
        let v = rand_tensor(&mut r, s, DType::F64);
        ex.set_tensor(params[k], &v).unwrap();
        p_ref.push(v.to_f64());
    }
    let mut m_ref: Vec<Vec<f64>> = p_ref.iter().map(|p| vec![0.0; p.len()]).collect();
    let mut v_ref = m_ref.clone();
    let lr = 1e-2;
    for t in 1..=3 {
        // Two micro-batches per step.
        let mut total: Vec<Vec<f64>> = p_ref.iter().map(|p| vec![0.0; p.len()]).collect();
        for _ in 0..2 {
            let gs: Vec<HostTensor> = shapes.iter().map(|s| rand_tensor(&mut r, s, DType::F64)).collect();
            for (k, gk) in gs.iter().enumerate() {
                for (a, b) in total[k].iter_mut().zip(gk.to_f64()) {
                    *a += b;
                }
            }
            let feed: Vec<_> = grads_in.iter().copied().zip(gs.iter()).collect();
            ex.run(0, &feed).unwrap();
        }
        let norm = total.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        let (bc1, bc2) = (1.0 - spec.beta1.powi(t), 1.0 - spec.beta2.powi(t));
        let h = HostTensor::from_f32(&[3], &[lr as f32, bc1 as f32, bc2.sqrt() as f32]);
        let out = ex.run(1, &[(hyper, &h)]).unwrap();
        assert!((out[0].to_f64()[0] - norm).abs() < 1e-12 * norm, "grad norm");
        for k in 0..shapes.len() {
            let clipped: Vec<f64> = total[k].iter().map(|x| x * coef).collect();
            torch_adamw(
                &mut p_ref[k],
                &clipped,
                &mut m_ref[k],
                &mut v_ref[k],
                t,
                lr as f32 as f64,
                &spec,
            );
        }
        let got = ex.get_tensors(&params).unwrap();
        for k in 0..shapes.len() {
            let err = common::rel_err(&got[k].to_f64(), &p_ref[k]);
            // The per-step scalars travel as f32 (as on GPUs), hence 1e-7 rather than 1e-15.
            assert!(err < 1e-7, "step {t} param {k}: relative error {err:e}");
        }
        // The update consumed the accumulated gradient.
        let accs_now = ex.get_tensors(&accs).unwrap();
        assert!(accs_now.iter().all(|a| a.to_f64().iter().all(|&x| x == 0.0)));
    }
}
