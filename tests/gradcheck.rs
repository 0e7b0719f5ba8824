//! Every op's backward rule against central finite differences in f64 on the CPU
//! (relative error under 1e-6), on random shapes including odd sizes.

mod common;
use common::GradCheck;
use ferrotune::ops::{AttnSpec, Op};
use ferrotune::{DType, HostTensor};

const TOL: f64 = 1e-6;

fn check(err: f64) {
    assert!(err < TOL, "relative error {err:.3e} exceeds {TOL:e}");
}

#[test]
fn matmul_shared_weight_every_transpose() {
    // x [2, 3, 5] @ W^T with W [7, 5]; and x @ W with W [5, 7].
    for trans_b in [false, true] {
        let w: &[usize] = if trans_b { &[7, 5] } else { &[5, 7] };
        let err = GradCheck::new(&[("x", &[2, 3, 5]), ("w", w)])
            .run(|g, p, _| vec![g.matmul(p[0], p[1], false, trans_b).unwrap()]);
        check(err);
    }
}

#[test]
fn matmul_batched_every_transpose() {
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let (m, k, n) = (3, 4, 5);
        let a: Vec<usize> = if ta { vec![2, k, m] } else { vec![2, m, k] };
        let b: Vec<usize> = if tb { vec![2, n, k] } else { vec![2, k, n] };
        let err = GradCheck::new(&[("a", &a), ("b", &b)]).run(|g, p, _| vec![g.matmul(p[0], p[1], ta, tb).unwrap()]);
        check(err);
    }
}

#[test]
fn add_and_mul_with_broadcasting() {
    for bshape in [&[3usize, 5][..], &[5], &[1]] {
        let err = GradCheck::new(&[("a", &[3, 5]), ("b", bshape)]).run(|g, p, _| {
            let s = g.add(p[0], p[1]).unwrap();
            let m = g.mul(p[0], p[1]).unwrap();
            vec![s, m]
        });
        check(err);
    }
}

#[test]
fn scale_reshape_reduce_broadcast() {
    let err = GradCheck::new(&[("x", &[4, 3])]).run(|g, p, _| {
        let s = g.scale(p[0], -1.75).unwrap();
        let r = g.reshape(s, &[3, 4]).unwrap();
        let red = g.apply1(Op::ReduceSum { shape: vec![4] }, &[r]).unwrap();
        let b = g.apply1(Op::Broadcast { shape: vec![2, 4] }, &[red]).unwrap();
        let sq = g.mul(b, b).unwrap();
        vec![sq, g.sum(p[0]).unwrap()]
    });
    check(err);
}

#[test]
fn cast_round_trip_is_exact_on_representable_values() {
    // A linear loss and a power-of-two step: the difference quotient differs from the true
    // gradient (cast back, so exactly R) only by f32 rounding of the perturbed values.
    let mut gc = GradCheck::new(&[("x", &[5, 3])]);
    gc.h = 1.0 / 1024.0;
    let err = gc.run(|g, p, _| {
        let c = g.apply1(Op::Cast { dtype: DType::F32 }, &[p[0]]).unwrap();
        vec![g.apply1(Op::Cast { dtype: DType::F64 }, &[c]).unwrap()]
    });
    check(err);
}

#[test]
fn embedding_with_repeated_ids() {
    let ids = HostTensor::from_i32(&[6], &[3, 0, 3, 4, 1, 3]);
    let err = GradCheck::new(&[("table", &[5, 7])])
        .input("ids", ids)
        .run(|g, p, i| vec![g.embedding(p[0], i[0]).unwrap()]);
    check(err);
}

#[test]
fn rms_norm() {
    let err =
        GradCheck::new(&[("x", &[3, 2, 9]), ("w", &[9])]).run(|g, p, _| vec![g.rms_norm(p[0], p[1], 1e-5).unwrap()]);
    check(err);
}

/// A frozen norm weight (no weight gradient) in a residual block: the executor fuses the sum
/// of the residual stream's two gradients into the norm's backward.
#[test]
fn rms_norm_with_frozen_weight_in_a_residual_block() {
    let mut r = common::rng(12);
    let w = common::rand_tensor(&mut r, &[9], DType::F64);
    let err = GradCheck::new(&[("x", &[4, 9])]).input("w", w).run(|g, p, i| {
        let y = g.rms_norm(p[0], i[0], 1e-5).unwrap();
        vec![g.add(p[0], y).unwrap()]
    });
    check(err);
}

#[test]
fn rope_with_restarting_positions() {
    let pos = HostTensor::from_i32(&[5], &[0, 1, 2, 0, 1]);
    let inv: Vec<f32> = (0..3).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 6.0)).collect();
    let inv = HostTensor::from_f32(&[3], &inv);
    let err = GradCheck::new(&[("x", &[5, 12])])
        .input("pos", pos)
        .input("inv", inv)
        .run(|g, p, i| vec![g.rope(p[0], i[0], i[1], 6, 1.0).unwrap()]);
    check(err);
}

#[test]
fn swiglu() {
    let err = GradCheck::new(&[("gate", &[4, 7]), ("up", &[4, 7])]).run(|g, p, _| vec![g.swiglu(p[0], p[1]).unwrap()]);
    check(err);
}

#[test]
fn dropout_is_linear_in_x_for_a_fixed_mask() {
    let err = GradCheck::new(&[("x", &[6, 9])])
        .input("seed", HostTensor::from_u32(&[1], &[1234]))
        .input("p", HostTensor::from_f32(&[1], &[0.3]))
        .run(|g, p, i| vec![g.apply1(Op::Dropout { salt: 5 }, &[p[0], i[0], i[1]]).unwrap()]);
    check(err);
}

fn attn_case(spec: AttnSpec, seg: Vec<i32>) {
    let n = seg.len();
    let (hq, hk, d) = (spec.n_heads, spec.n_kv_heads, spec.head_dim);
    let err = GradCheck::new(&[("q", &[n, hq * d]), ("k", &[n, hk * d]), ("v", &[n, hk * d])])
        .input("seg", HostTensor::from_i32(&[n], &seg))
        .run(|g, p, i| {
            let (o, _lse) = g.attention(spec.clone(), p[0], p[1], p[2], i[0]).unwrap();
            vec![o]
        });
    check(err);
}

#[test]
fn attention_causal_gqa_packed() {
    // Two rows of 5 tokens; the first row packs two documents.
    let spec = AttnSpec {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 3,
        seq_len: 5,
        causal: true,
        window: None,
        scale: 0.7,
        flex: Default::default(),
    };
    attn_case(spec, vec![1, 1, 2, 2, 2, 1, 1, 1, 1, 1]);
}

#[test]
fn attention_sliding_window_and_bidirectional() {
    let spec = AttnSpec {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        seq_len: 7,
        causal: true,
        window: Some(3),
        scale: 0.5,
        flex: Default::default(),
    };
    attn_case(spec, vec![1; 7]);
    let spec = AttnSpec {
        n_heads: 3,
        n_kv_heads: 3,
        head_dim: 2,
        seq_len: 6,
        causal: false,
        window: None,
        scale: 0.9,
        flex: Default::default(),
    };
    attn_case(spec, vec![1, 1, 1, 2, 2, 2]);
}

#[test]
fn cross_entropy_with_ignored_labels() {
    let labels = HostTensor::from_i32(&[5], &[2, -100, 0, 6, -100]);
    let err = GradCheck::new(&[("logits", &[5, 7])])
        .input("labels", labels)
        .run(|g, p, i| {
            let (loss, _count) = g.cross_entropy(p[0], i[0]).unwrap();
            vec![loss]
        });
    check(err);
}

#[test]
fn sum_squares_of_several_tensors() {
    let err = GradCheck::new(&[("a", &[3, 4]), ("b", &[5])])
        .run(|g, p, _| vec![g.apply1(Op::SumSquares, &[p[0], p[1]]).unwrap()]);
    check(err);
}

#[test]
fn lora_linear_with_dropout() {
    let err = GradCheck::new(&[("x", &[2, 3, 6]), ("w", &[5, 6]), ("a", &[2, 6]), ("b", &[5, 2])])
        .input("seed", HostTensor::from_u32(&[1], &[99]))
        .input("p", HostTensor::from_f32(&[1], &[0.25]))
        .run(|g, p, i| {
            vec![g
                .lora_linear(p[0], p[1], p[2], p[3], 1.5, Some((i[0], i[1], 3)))
                .unwrap()]
        });
    check(err);
}

#[test]
fn fused_product_with_c_every_transpose() {
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let (m, k, n) = (3, 4, 5);
        let a: Vec<usize> = if ta { vec![2, k, m] } else { vec![2, m, k] };
        let b: Vec<usize> = if tb { vec![2, n, k] } else { vec![2, k, n] };
        for add in [false, true] {
            let mut params: Vec<(&str, &[usize])> = vec![("a", &a), ("b", &b)];
            if add {
                params.push(("c", &[2, 3, 5]));
            }
            let op = Op::MatMulFused {
                trans_a: ta,
                trans_b: tb,
                alpha: -0.625,
                add,
            };
            let err = GradCheck::new(&params).run(|g, p, _| vec![g.apply1(op.clone(), p).unwrap()]);
            check(err);
        }
    }
}
