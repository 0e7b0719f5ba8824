//! Attention implementations on the CPU in f64: the eager graph (scores as ops) against a
//! direct loop reference and against finite differences, and the fused op's outputs and
//! gradients against eager (1e-10), for packed and unpacked rows, odd lengths, head dims
//! 64/96/128, grouped-query heads and every mask rule.

mod attn_cases;
mod common;
use attn_cases::{packed_segments, prompt_flags, spec, with_expr};
use common::{cpu_executor, rand_tensor, rng, GradCheck};
use ferrotune::exec::ProgramSpec;
use ferrotune::graph::{self, Graph, TensorId};
use ferrotune::ops::{attn_eager, AttnSpec, FlexMask, Op};
use ferrotune::{DType, HostTensor};

#[derive(Clone)]
struct Case {
    spec: AttnSpec,
    seg: Vec<i32>,
    prefix: Option<Vec<i32>>,
}

/// Independent statement of the mask: the documented rules, pair by pair.
fn reference_visible(c: &Case, b: usize, i: usize, j: usize) -> bool {
    let t = c.spec.seq_len;
    let seg = &c.seg[b * t..(b + 1) * t];
    let doc_pos = |x: usize| (0..=x).rev().take_while(|&y| seg[y] == seg[x]).count() as i32 - 1;
    if seg[i] != seg[j] || c.spec.window.is_some_and(|w| i.abs_diff(j) >= w) {
        return false;
    }
    if let Some(e) = &c.spec.flex.expr {
        return e.eval(doc_pos(i), doc_pos(j), seg[i]);
    }
    let pre = |x: usize| c.prefix.as_ref().is_some_and(|p| p[b * t + x] != 0);
    !c.spec.causal || j <= i || (c.spec.flex.prefix_lm && pre(i) && pre(j))
}

/// Softmax attention written out directly.
fn reference_forward(c: &Case, q: &[f64], k: &[f64], v: &[f64]) -> Vec<f64> {
    let s = &c.spec;
    let (t, d, hq, hk) = (s.seq_len, s.head_dim, s.n_heads, s.n_kv_heads);
    let mut o = vec![0.0; q.len()];
    for b in 0..c.seg.len() / t {
        for h in 0..hq {
            let kh = h * hk / hq;
            for i in 0..t {
                let qi = &q[(b * t + i) * hq * d + h * d..][..d];
                let sc: Vec<Option<f64>> = (0..t)
                    .map(|j| {
                        reference_visible(c, b, i, j).then(|| {
                            let kj = &k[(b * t + j) * hk * d + kh * d..][..d];
                            s.scale * qi.iter().zip(kj).map(|(x, y)| x * y).sum::<f64>()
                        })
                    })
                    .collect();
                let m = sc.iter().flatten().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let z: f64 = sc.iter().flatten().map(|x| (x - m).exp()).sum();
                for (j, x) in sc.iter().enumerate() {
                    if let Some(x) = x {
                        let p = (x - m).exp() / z;
                        for e in 0..d {
                            o[(b * t + i) * hq * d + h * d + e] += p * v[(b * t + j) * hk * d + kh * d + e];
                        }
                    }
                }
            }
        }
    }
    o
}

/// Output and the gradients of `sum(o * r)` for one implementation.
fn run(c: &Case, eager: bool, seed: u64) -> Vec<Vec<f64>> {
    let s = &c.spec;
    let n = c.seg.len();
    let (wq, wk) = (s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
    let mut g = Graph::new();
    let q = g.parameter("q", &[n, wq], DType::F64);
    let k = g.parameter("k", &[n, wk], DType::F64);
    let v = g.parameter("v", &[n, wk], DType::F64);
    let seg = g.input("seg", &[n], DType::I32);
    let mut inputs = vec![q, k, v, seg];
    let prefix = c.prefix.as_ref().map(|_| g.input("prefix", &[n], DType::I32));
    inputs.extend(prefix);
    let o = if eager {
        attn_eager::build(&mut g, s, &inputs).unwrap()
    } else {
        g.apply(Op::Attention(s.clone()), &inputs).unwrap()[0]
    };
    let r = g.constant("r", &[n, wq], DType::F64);
    let prod = g.mul(o, r).unwrap();
    let loss = g.sum(prod).unwrap();
    let one = g.input("one", &[1], DType::F64);
    let grads = graph::backward(&mut g, loss, one, &[q, k, v]).unwrap();
    let outs: Vec<TensorId> = vec![o, grads[&q], grads[&k], grads[&v]];
    let mut ex = cpu_executor(g, &[ProgramSpec::new("all", &outs, &[])]);
    let mut rg = rng(seed);
    for (t, shape) in [(q, [n, wq]), (k, [n, wk]), (v, [n, wk]), (r, [n, wq])] {
        ex.set_tensor(t, &rand_tensor(&mut rg, &shape, DType::F64)).unwrap();
    }
    let seg_t = HostTensor::from_i32(&[n], &c.seg);
    let one_t = HostTensor::from_f64(&[1], &[1.0]);
    let pre_t = c.prefix.as_ref().map(|p| HostTensor::from_i32(&[n], p));
    let mut feed = vec![(seg, &seg_t), (one, &one_t)];
    if let (Some(p), Some(pt)) = (prefix, &pre_t) {
        feed.push((p, pt));
    }
    ex.run(0, &feed).unwrap().iter().map(|h| h.to_f64()).collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// Eager equals the direct reference; fused equals eager in output and every gradient.
fn check(c: Case) {
    let eager = run(&c, true, 11);
    let fused = run(&c, false, 11);
    let s = &c.spec;
    let n = c.seg.len();
    let mut rg = rng(11);
    let q = rand_tensor(&mut rg, &[n, s.n_heads * s.head_dim], DType::F64).to_f64();
    let k = rand_tensor(&mut rg, &[n, s.n_kv_heads * s.head_dim], DType::F64).to_f64();
    let v = rand_tensor(&mut rg, &[n, s.n_kv_heads * s.head_dim], DType::F64).to_f64();
    let reference = reference_forward(&c, &q, &k, &v);
    let e = max_abs_diff(&eager[0], &reference);
    assert!(e < 1e-12, "eager vs reference: {e:e} ({:?})", c.spec);
    for (name, (f, e)) in ["output", "dq", "dk", "dv"].iter().zip(fused.iter().zip(&eager)) {
        let scale = e.iter().fold(1.0f64, |a, x| a.max(x.abs()));
        let err = max_abs_diff(f, e) / scale;
        assert!(err < 1e-10, "fused vs eager {name}: {err:e} ({:?})", c.spec);
        assert!(e.iter().any(|x| *x != 0.0), "{name} is all zeros");
    }
}

#[test]
fn causal_gqa_unpacked_odd_lengths_every_head_dim() {
    for (d, t) in [(64, 37), (96, 71), (128, 45)] {
        check(Case {
            spec: spec(4, 2, d, t, true, None),
            seg: vec![1; t * 2],
            prefix: None,
        });
    }
}

#[test]
fn causal_packed_rows_and_bidirectional() {
    let t = 83;
    for causal in [true, false] {
        check(Case {
            spec: spec(6, 2, 64, t, causal, None),
            seg: packed_segments(t),
            prefix: None,
        });
    }
}

#[test]
fn sliding_window_packed() {
    let t = 97;
    check(Case {
        spec: spec(4, 1, 64, t, true, Some(19)),
        seg: packed_segments(t),
        prefix: None,
    });
    check(Case {
        spec: spec(2, 2, 96, 41, false, Some(7)),
        seg: vec![1; 82],
        prefix: None,
    });
}

#[test]
fn prefix_lm_packed() {
    let t = 69;
    let seg = packed_segments(t);
    let mut s = spec(4, 2, 64, t, true, None);
    s.flex.prefix_lm = true;
    check(Case {
        spec: s.clone(),
        prefix: Some(prompt_flags(&seg, t, 5)),
        seg,
    });
    s.window = Some(6);
    check(Case {
        spec: s,
        prefix: Some(prompt_flags(&vec![1; t], t, 5)),
        seg: vec![1; t],
    });
}

#[test]
fn custom_expressions() {
    let t = 77;
    // Causal with a 9-token band, over document positions.
    check(Case {
        spec: with_expr(spec(4, 2, 64, t, true, None), "q_idx >= kv_idx && q_idx - kv_idx < 9"),
        seg: packed_segments(t),
        prefix: None,
    });
    // Strictly earlier keys plus an attention sink: the first token of each document sees
    // nothing (zero output, no gradient) on both paths.
    check(Case {
        spec: with_expr(
            spec(2, 1, 128, t, true, None),
            "kv_idx < q_idx || (kv_idx == 0 && q_idx > 0)",
        ),
        seg: packed_segments(t),
        prefix: None,
    });
    // Reads the segment id, with a window on top.
    check(Case {
        spec: with_expr(spec(3, 3, 96, 40, false, Some(11)), "seg % 2 == 0 || kv_idx <= q_idx"),
        seg: packed_segments(40),
        prefix: None,
    });
}

#[test]
fn fused_op_rejects_bad_prefix_inputs() {
    let mut s = spec(2, 1, 8, 5, true, None);
    s.flex.prefix_lm = true;
    let mut g = Graph::new();
    let q = g.input("q", &[10, 16], DType::F64);
    let k = g.input("k", &[10, 8], DType::F64);
    let seg = g.input("seg", &[10], DType::I32);
    let e = g
        .apply(Op::Attention(s.clone()), &[q, k, k, seg])
        .unwrap_err()
        .to_string();
    assert!(e.contains("takes 5 inputs, got 4"), "{e}");
    let bad = g.input("prefix", &[9], DType::I32);
    let e = g.apply(Op::Attention(s), &[q, k, k, seg, bad]).unwrap_err().to_string();
    assert!(e.contains("prefix flags must be [10] i32"), "{e}");
}

#[test]
fn eager_ops_pass_finite_differences() {
    let t = 6;
    let seg = vec![1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1];
    let prefix = vec![1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0];
    for (s, with_prefix) in [
        (spec(4, 2, 3, t, true, Some(4)), false),
        (with_expr(spec(2, 1, 5, t, true, None), "kv_idx + 1 != q_idx"), false),
        (
            AttnSpec {
                flex: FlexMask {
                    prefix_lm: true,
                    expr: None,
                },
                ..spec(2, 2, 4, t, true, None)
            },
            true,
        ),
    ] {
        let n = seg.len();
        let (wq, wk) = (s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
        let mut gc = GradCheck::new(&[("q", &[n, wq]), ("k", &[n, wk]), ("v", &[n, wk])])
            .input("seg", HostTensor::from_i32(&[n], &seg));
        if with_prefix {
            gc = gc.input("prefix", HostTensor::from_i32(&[n], &prefix));
        }
        let err = gc.run(|g, p, i| {
            let mut inputs = vec![p[0], p[1], p[2]];
            inputs.extend_from_slice(i);
            vec![attn_eager::build(g, &s, &inputs).unwrap()]
        });
        assert!(err < 1e-6, "finite differences: {err:e} for {s:?}");
    }
}
