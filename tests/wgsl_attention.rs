//! Attention on the WGSL backend against eager attention on the CPU in f64: the fused
//! (flash) kernels' outputs and gradients, eager attention run on the WGSL backend, and the
//! eager ops one by one, for packed and unpacked rows, odd lengths, head dims 64/96/128,
//! grouped-query heads and every mask (causal, sliding window, prefix-LM, a user
//! expression). Small shapes keep it fast on lavapipe; it fails when there is no adapter.

mod attn_cases;
mod wgsl_support;

use attn_cases::{packed_segments, prompt_flags, spec, with_expr};
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::backend::Backend;
use ferrotune::exec::{Executor, ProgramSpec};
use ferrotune::graph::{self, Graph, TensorId};
use ferrotune::ops::{attn_eager, AttnSpec, HeadLayout, Op};
use ferrotune::{DType, HostTensor};
use wgsl_support::*;

/// f32 results against the f64 reference (relative, over the whole tensor).
const TOL32: f64 = 1e-5;
/// f16 storage of q, k, v, dO and the results.
const TOL16: f64 = 2e-2;

#[derive(Clone, Debug)]
struct Case {
    spec: AttnSpec,
    seg: Vec<i32>,
    prefix: Option<Vec<i32>>,
}

fn cases() -> Vec<Case> {
    let plain = |s: AttnSpec, seg: Vec<i32>| Case {
        spec: s,
        seg,
        prefix: None,
    };
    let mut prefix_spec = spec(2, 1, 128, 23, true, None);
    prefix_spec.flex.prefix_lm = true;
    vec![
        plain(spec(4, 2, 64, 37, true, None), vec![1; 74]),
        plain(spec(4, 2, 64, 37, true, None), packed_segments(37)),
        plain(spec(3, 1, 96, 29, true, Some(7)), packed_segments(29)),
        plain(spec(2, 2, 96, 19, false, None), packed_segments(19)),
        Case {
            spec: prefix_spec,
            seg: packed_segments(23),
            prefix: Some(prompt_flags(&packed_segments(23), 23, 4)),
        },
        // Strictly earlier keys plus a sink: each document's first token sees nothing.
        plain(
            with_expr(
                spec(2, 1, 64, 41, true, None),
                "kv_idx < q_idx || (kv_idx == 0 && q_idx > 0)",
            ),
            packed_segments(41),
        ),
        plain(
            with_expr(spec(2, 2, 128, 21, false, Some(9)), "seg % 2 == 0 || kv_idx <= q_idx"),
            packed_segments(21),
        ),
    ]
}

/// Random `q, k, v` and the output weights `r`, rounded to `dtype`.
fn data(c: &Case, dtype: DType, seed: u64) -> Vec<HostTensor> {
    let s = &c.spec;
    let n = c.seg.len();
    let (wq, wk) = (s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
    let mut r = rng(seed);
    [[n, wq], [n, wk], [n, wk], [n, wq]]
        .iter()
        .map(|shape| randn(&mut r, shape, dtype))
        .collect()
}

/// Attention output and the gradients of `sum(o * r)` with respect to q, k, v, through
/// the fused op or the eager graph, on `backend` in `dtype`.
fn run_graph(backend: Box<dyn Backend>, c: &Case, eager: bool, dtype: DType, x: &[HostTensor]) -> Vec<HostTensor> {
    let s = &c.spec;
    let n = c.seg.len();
    let mut g = Graph::new();
    let q = g.parameter("q", &x[0].shape, dtype);
    let k = g.parameter("k", &x[1].shape, dtype);
    let v = g.parameter("v", &x[2].shape, dtype);
    let seg = g.input("seg", &[n], DType::I32);
    let mut inputs = vec![q, k, v, seg];
    let prefix = c.prefix.as_ref().map(|_| g.input("prefix", &[n], DType::I32));
    inputs.extend(prefix);
    let o = if eager {
        attn_eager::build(&mut g, s, &inputs).unwrap()
    } else {
        g.apply(Op::Attention(s.clone()), &inputs).unwrap()[0]
    };
    let r = g.constant("r", &x[3].shape, dtype);
    let prod = g.mul(o, r).unwrap();
    let loss = g.sum(prod).unwrap();
    let one = g.input("one", &[1], dtype);
    let grads = graph::backward(&mut g, loss, one, &[q, k, v]).unwrap();
    let outs: Vec<TensorId> = vec![o, grads[&q], grads[&k], grads[&v]];
    let mut ex = Executor::new(g, backend, &[ProgramSpec::new("all", &outs, &[])]).expect("compile");
    for (t, val) in [q, k, v, r].iter().zip(x) {
        ex.set_tensor(*t, &val.cast(dtype)).unwrap();
    }
    let seg_t = HostTensor::from_i32(&[n], &c.seg);
    let one_t = HostTensor::from_f64(&[1], &[1.0]).cast(dtype);
    let pre_t = c.prefix.as_ref().map(|p| HostTensor::from_i32(&[n], p));
    let mut feed = vec![(seg, &seg_t), (one, &one_t)];
    if let (Some(p), Some(pt)) = (prefix, &pre_t) {
        feed.push((p, pt));
    }
    ex.run(0, &feed).unwrap()
}

fn wgsl_box() -> Box<dyn Backend> {
    Box::new(wgsl())
}

/// Compares output, dq, dk, dv with the f64 eager reference.
fn compare(what: &str, c: &Case, got: &[HostTensor], want: &[HostTensor], tol: f64) {
    for (name, (a, b)) in ["output", "dq", "dk", "dv"].iter().zip(got.iter().zip(want)) {
        let e = rel_err(a, b);
        assert!(
            e < tol,
            "{what} {name}: relative error {e:.3e} (tolerance {tol:e}) for {:?}",
            c.spec
        );
        assert!(b.to_f64().iter().any(|x| *x != 0.0), "{what} {name} is all zeros");
    }
}

#[test]
fn fused_wgsl_equals_eager_cpu_every_mask_and_head_dim() {
    for (k, c) in cases().iter().enumerate() {
        let x = data(c, DType::F32, 100 + k as u64);
        let want = run_graph(Box::new(CpuBackend::new()), c, true, DType::F64, &x);
        let got = run_graph(wgsl_box(), c, false, DType::F32, &x);
        compare("fused wgsl vs eager cpu", c, &got, &want, TOL32);
        // A query that sees no key: zero output on both paths (no NaN from 0/0).
        if c.spec.flex.expr.as_ref().is_some_and(|e| !e.eval(0, 0, c.seg[0])) {
            let w = c.spec.n_heads * c.spec.head_dim;
            assert!(
                got[0].to_f64()[..w].iter().all(|x| *x == 0.0),
                "empty query row is not zero"
            );
        }
    }
}

#[test]
fn eager_wgsl_equals_eager_cpu() {
    let all = cases();
    for c in [&all[1], &all[2], &all[4], &all[5]] {
        let x = data(c, DType::F32, 7);
        let want = run_graph(Box::new(CpuBackend::new()), c, true, DType::F64, &x);
        let got = run_graph(wgsl_box(), c, true, DType::F32, &x);
        compare("eager wgsl vs eager cpu", c, &got, &want, TOL32);
    }
}

/// The op's inputs for `c` (prefix flags last, when the mask uses them).
fn forward_inputs(c: &Case, x: &[HostTensor]) -> Vec<HostTensor> {
    let n = c.seg.len();
    let mut v = vec![x[0].clone(), x[1].clone(), x[2].clone(), ints(&[n], c.seg.clone())];
    v.extend(c.prefix.as_ref().map(|p| ints(&[n], p.clone())));
    v
}

#[test]
fn fused_ops_with_half_and_f32_inputs() {
    let mut full = wgsl();
    for (k, c) in cases().iter().enumerate() {
        for dt in [DType::F16, DType::F32] {
            let tol = if dt == DType::F32 { TOL32 } else { TOL16 };
            let x = data(c, dt, 200 + k as u64);
            let fwd = forward_inputs(c, &x);
            let (cpu, _) = check(&mut full, &Op::Attention(c.spec.clone()), &fwd, tol);
            let mut bwd = vec![x[0].clone(), x[1].clone(), x[2].clone(), fwd[3].clone()];
            bwd.push(cpu.outputs[0].cast(dt));
            bwd.push(cpu.outputs[1].cast(DType::F32));
            bwd.push(x[3].clone());
            bwd.extend(fwd.get(4).cloned());
            check(&mut full, &Op::AttentionBackward(c.spec.clone()), &bwd, tol);
        }
    }
}

#[test]
fn fused_ops_sliced_by_rows_with_flex_masks() {
    // Narrow heads so each batch row fits a 4 KiB binding: every launch runs row by row
    // from misaligned windows, prefix flags and run starts included.
    let mut sliced = wgsl_sliced(4096);
    let t = 13;
    let seg = [packed_segments(t), packed_segments(t)].concat();
    let mut p = spec(4, 2, 8, t, true, None);
    p.flex.prefix_lm = true;
    for c in [
        Case {
            spec: p,
            prefix: Some(prompt_flags(&seg, t, 4)),
            seg: seg.clone(),
        },
        Case {
            spec: with_expr(spec(4, 2, 8, t, true, Some(5)), "kv_idx <= q_idx && kv_idx % 3 != 1"),
            seg: seg.clone(),
            prefix: None,
        },
    ] {
        for dt in [DType::F32, DType::F16] {
            let tol = if dt == DType::F32 { TOL32 } else { TOL16 };
            let x = data(&c, dt, 300);
            let fwd = forward_inputs(&c, &x);
            let (cpu, _) = check_at(&mut sliced, &Op::Attention(c.spec.clone()), &fwd, tol, 136);
            let mut bwd = vec![x[0].clone(), x[1].clone(), x[2].clone(), fwd[3].clone()];
            bwd.push(cpu.outputs[0].cast(dt));
            bwd.push(cpu.outputs[1].cast(DType::F32));
            bwd.push(x[3].clone());
            bwd.extend(fwd.get(4).cloned());
            check_at(&mut sliced, &Op::AttentionBackward(c.spec.clone()), &bwd, tol, 136);
        }
    }
}

#[test]
fn eager_ops_full_and_sliced() {
    let mut full = wgsl();
    let mut sliced = wgsl_sliced(4096);
    let mut r = rng(400);
    let t = 17;
    let n = 3 * t;
    for (heads, repeat, d) in [(2, 2, 6), (3, 1, 5), (1, 4, 64)] {
        let l = HeadLayout {
            seq_len: t,
            heads,
            head_dim: d,
            repeat,
        };
        for dt in [DType::F32, DType::F16] {
            let tol = if dt == DType::F32 { TOL32 } else { TOL16 };
            let x = randn(&mut r, &[n, heads * d], dt);
            check(&mut full, &Op::SplitHeads(l), std::slice::from_ref(&x), tol);
            let y = randn(&mut r, &[3, heads * repeat, t, d], dt);
            check(&mut full, &Op::MergeHeads(l), std::slice::from_ref(&y), tol);
            if t * heads * repeat * d * dt.size() <= 3000 {
                check_at(&mut sliced, &Op::SplitHeads(l), &[x], tol, 136);
                check_at(&mut sliced, &Op::MergeHeads(l), &[y], tol, 136);
            }
        }
    }
    // Score rows: every mask kind, including rows that see no key.
    let seg = ints(&[n], [packed_segments(t), vec![5; t]].concat());
    let pre = ints(&[n], prompt_flags(&seg.to_i32(), t, 4));
    let mut p = spec(2, 1, 4, t, true, None);
    p.flex.prefix_lm = true;
    for (s, with_prefix) in [
        (spec(2, 1, 4, t, true, None), false),
        (spec(2, 1, 4, t, false, Some(4)), false),
        (p, true),
        (with_expr(spec(2, 1, 4, t, true, None), "kv_idx < q_idx"), false),
    ] {
        let scores = randn(&mut r, &[3, 2, t, t], DType::F32);
        let mut ins = vec![scores, seg.clone()];
        if with_prefix {
            ins.push(pre.clone());
        }
        let op = Op::MaskedSoftmax(s);
        let (cpu, _) = check(&mut full, &op, &ins, TOL32);
        check_at(&mut sliced, &op, &ins, TOL32, 136);
        let dp = randn(&mut r, &[3, 2, t, t], DType::F32);
        let bwd = [cpu.outputs[0].cast(DType::F32), dp];
        check(&mut full, &Op::SoftmaxBackward, &bwd, TOL32);
        check_at(&mut sliced, &Op::SoftmaxBackward, &bwd, TOL32, 136);
    }
}
