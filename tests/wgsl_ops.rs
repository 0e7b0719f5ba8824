//! Every op of the WGSL backend against the CPU reference backend on fresh random inputs:
//! odd shapes that are multiples of no tile size, packed segments, f16/bf16 storage,
//! outputs poisoned with NaN before each launch and guard bytes around every operand.
//! Each case also runs with a 4 KiB binding limit, so every op is processed in slices,
//! with operands placed off the 256-byte binding alignment, so kernels index from the
//! element offsets of their windows.
//! Runs on any adapter (lavapipe in CI) and fails when there is none.

mod common;
mod wgsl_support;

use ferrotune::backend::wgsl::WgslBackend;
use ferrotune::ops::{AdamWSpec, AttnSpec, Op};
use ferrotune::{DType, HostTensor};
use rand::RngExt;
use wgsl_support::*;

/// The binding limit of the sliced runs.
const SLICE: u64 = 4096;
/// Bytes past the alignment at which the sliced runs place operands.
const MISALIGN: u64 = 136;

/// Checks `op` on a normal backend and on one that slices everything.
fn check_both(full: &mut WgslBackend, sliced: &mut WgslBackend, op: &Op, inputs: &[HostTensor], tol: f64) {
    check(full, op, inputs, tol);
    check_at(sliced, op, inputs, tol, MISALIGN);
}

fn backends() -> (WgslBackend, WgslBackend) {
    (wgsl(), wgsl_sliced(SLICE))
}

#[test]
fn add_and_mul_broadcast_and_dtypes() {
    let (mut f, mut s) = backends();
    let mut r = rng(1);
    let a_shape = [37, 53];
    for b_shape in [&[37usize, 53][..], &[53], &[1]] {
        for op in [Op::Add, Op::Mul] {
            for (dt, tol) in [(DType::F32, TOL), (DType::F16, TOL_HALF), (DType::BF16, TOL_HALF)] {
                let a = randn(&mut r, &a_shape, dt);
                let b = randn(&mut r, b_shape, dt);
                check_both(&mut f, &mut s, &op, &[a, b], tol);
            }
        }
    }
}

#[test]
fn half_outputs_are_exact_roundings() {
    // Same inputs, same f32 arithmetic, the same rounding to f16/bf16: bit-identical.
    let (mut f, mut s) = backends();
    let mut r = rng(2);
    for dt in [DType::F16, DType::BF16] {
        let a = randn(&mut r, &[3, 333], dt);
        let b = randn(&mut r, &[333], dt);
        for (be, mis) in [(&mut f, 0), (&mut s, MISALIGN)] {
            let (cpu, gpu) = both_at(be, &Op::Add, &[a.clone(), b.clone()], mis);
            assert_eq!(cpu.outputs[0].data, gpu.outputs[0].data, "{dt} add");
        }
    }
}

#[test]
fn scale_cast_broadcast() {
    let (mut f, mut s) = backends();
    let mut r = rng(3);
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let tol = if dt == DType::F32 { TOL } else { TOL_HALF };
        let x = randn(&mut r, &[1001], dt);
        check_both(&mut f, &mut s, &Op::Scale { factor: -1.75 }, &[x], tol);
        let x = randn(&mut r, &[7], dt);
        check_both(&mut f, &mut s, &Op::Broadcast { shape: vec![31, 7] }, &[x], tol);
        let x = randn(&mut r, &[1], dt);
        check_both(&mut f, &mut s, &Op::Broadcast { shape: vec![5, 9] }, &[x], tol);
    }
}

#[test]
#[allow(clippy::excessive_precision)] // the constants are exact f32 halfway cases
fn casts_round_like_the_cpu_bit_for_bit() {
    let (mut f, mut s) = backends();
    let mut r = rng(4);
    let mut v: Vec<f32> = randn(&mut r, &[997], DType::F32).to_f32();
    // Overflow, subnormals, underflow, ties, infinities and NaN.
    v.extend([
        70000.0,
        -65520.0,
        65519.0,
        1e-6,
        -3e-7,
        1e-9,
        6.1035156e-5,
        1.00048828125,
        1.000732421875,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        0.0,
        -0.0,
        3.3895314e38,
        1.0e-40,
    ]);
    let x = HostTensor::from_f32(&[v.len()], &v);
    for (from, to) in [
        (DType::F32, DType::F16),
        (DType::F32, DType::BF16),
        (DType::F16, DType::F32),
        (DType::BF16, DType::F32),
        (DType::BF16, DType::F16),
        (DType::F16, DType::BF16),
        (DType::F32, DType::F32),
    ] {
        let xin = x.cast(from);
        for (be, mis) in [(&mut f, 0), (&mut s, MISALIGN)] {
            let (cpu, gpu) = both_at(be, &Op::Cast { dtype: to }, std::slice::from_ref(&xin), mis);
            assert_eq!(cpu.outputs[0].data, gpu.outputs[0].data, "cast {from} -> {to}");
        }
    }
}

#[test]
fn reduce_sum_every_path() {
    let (mut f, mut s) = backends();
    let mut r = rng(5);
    for (x_shape, y_shape) in [
        (&[300usize, 7][..], &[7usize][..]),
        (&[5, 901], &[901]),
        (&[3000, 3], &[3]),
        (&[3, 4, 5], &[1]),
        (&[2, 3, 5], &[3, 5]),
        (&[9, 4133], &[1]),
    ] {
        let x = randn(&mut r, x_shape, DType::F32);
        check_both(
            &mut f,
            &mut s,
            &Op::ReduceSum {
                shape: y_shape.to_vec(),
            },
            &[x],
            TOL,
        );
    }
    // Rows wider than the sliced backend binds take the thread-per-column kernel.
    let x = randn(&mut r, &[5, 2051], DType::F32);
    check(&mut f, &Op::ReduceSum { shape: vec![2051] }, &[x], TOL);
}

#[test]
fn rms_norm_and_backward_with_half_weights() {
    let (mut f, mut s) = backends();
    let mut r = rng(6);
    for (rows, h) in [(37usize, 129usize), (3, 700), (1, 5)] {
        for wdt in [DType::F32, DType::BF16, DType::F16] {
            let x = randn(&mut r, &[rows, h], DType::F32);
            let w = randn(&mut r, &[h], wdt);
            let dy = randn(&mut r, &[rows, h], DType::F32);
            check_both(&mut f, &mut s, &Op::RmsNorm { eps: 1e-5 }, &[x.clone(), w.clone()], TOL);
            let acc = randn(&mut r, &[rows, h], DType::F32);
            for (op, inputs) in common::rms_norm_backward_cases(&x, &w, &dy, &acc) {
                check_both(&mut f, &mut s, &op, &inputs, TOL);
            }
        }
    }
}

/// Hugging Face's default rotary inverse frequencies.
fn inv_freq(head_dim: usize, theta: f64) -> HostTensor {
    let v: Vec<f32> = (0..head_dim / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        .collect();
    HostTensor::from_f32(&[head_dim / 2], &v)
}

#[test]
fn rope_forward_inverse_scaled_large_positions() {
    let (mut f, mut s) = backends();
    let mut r = rng(7);
    for (rows, heads, hd) in [(13usize, 3usize, 10usize), (40, 2, 64)] {
        let x = randn(&mut r, &[rows, heads * hd], DType::F32);
        let pos: Vec<i32> = (0..rows).map(|_| r.random_range(0..20000)).collect();
        let pos = ints(&[rows], pos);
        for (inverse, scale) in [(false, 1.0), (true, 1.0), (false, 1.3), (true, 0.7)] {
            let op = Op::Rope {
                head_dim: hd,
                inverse,
                scale,
            };
            check_both(
                &mut f,
                &mut s,
                &op,
                &[x.clone(), pos.clone(), inv_freq(hd, 10000.0)],
                TOL,
            );
        }
    }
}

#[test]
fn swiglu_and_backward() {
    let (mut f, mut s) = backends();
    let mut r = rng(8);
    for dt in [DType::F32, DType::BF16] {
        let tol = if dt == DType::F32 { TOL } else { TOL_HALF };
        let g = randn(&mut r, &[17, 61], dt);
        let u = randn(&mut r, &[17, 61], dt);
        let dy = randn(&mut r, &[17, 61], dt);
        check_both(&mut f, &mut s, &Op::Swiglu, &[g.clone(), u.clone()], tol);
        check_both(&mut f, &mut s, &Op::SwigluBackward, &[g, u, dy], tol);
    }
}

#[test]
fn dropout_mask_is_bit_identical() {
    let (mut f, mut s) = backends();
    let mut r = rng(9);
    let x = randn(&mut r, &[23, 45], DType::F32);
    for (seed, salt, p) in [(12345u32, 3u32, 0.3f32), (7, 0, 0.05), (1, 9, 1.0), (99, 2, 0.0)] {
        let inputs = [
            x.clone(),
            HostTensor::from_u32(&[1], &[seed]),
            HostTensor::from_f32(&[1], &[p]),
        ];
        for (be, mis) in [(&mut f, 0), (&mut s, MISALIGN)] {
            let (cpu, gpu) = check_at(be, &Op::Dropout { salt }, &inputs, TOL, mis);
            let (a, b) = (cpu.outputs[0].to_f32(), gpu.outputs[0].to_f32());
            for (k, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_eq!(*x == 0.0, *y == 0.0, "element {k}: mask differs (p {p})");
            }
        }
    }
}

fn spec(hq: usize, hkv: usize, d: usize, t: usize, causal: bool, window: Option<usize>) -> AttnSpec {
    AttnSpec {
        n_heads: hq,
        n_kv_heads: hkv,
        head_dim: d,
        seq_len: t,
        causal,
        window,
        scale: 1.0 / (d as f64).sqrt(),
        flex: Default::default(),
    }
}

/// Segment ids of `rows` rows of `t` tokens, each row packing a few documents.
fn segments(r: &mut impl rand::Rng, rows: usize, t: usize) -> HostTensor {
    let mut v = Vec::new();
    for _ in 0..rows {
        let mut seg = 1;
        for i in 0..t {
            if i > 0 && r.random_range(0..5) == 0 {
                seg += 1;
            }
            v.push(seg);
        }
    }
    ints(&[rows * t], v)
}

#[test]
fn attention_forward_and_backward() {
    let (mut f, mut s) = backends();
    let mut r = rng(10);
    for (hq, hkv, d, t, rows, causal, window) in [
        (4, 2, 8, 13, 3, true, None),
        (4, 2, 8, 13, 3, true, Some(4)),
        (3, 3, 6, 9, 2, false, None),
        (2, 1, 16, 7, 2, false, Some(3)),
        (2, 1, 64, 70, 1, true, None),
    ] {
        let sp = spec(hq, hkv, d, t, causal, window);
        let n = rows * t;
        let q = randn(&mut r, &[n, hq * d], DType::F32);
        let k = randn(&mut r, &[n, hkv * d], DType::F32);
        let v = randn(&mut r, &[n, hkv * d], DType::F32);
        let seg = segments(&mut r, rows, t);
        let fwd = [q.clone(), k.clone(), v.clone(), seg.clone()];
        let d_o = randn(&mut r, &[n, hq * d], DType::F32);
        // A sequence of the largest case does not fit the sliced backend's bindings.
        let sliced = t * hq * d * 4 < SLICE as usize;
        let (cpu, _) = check(&mut f, &Op::Attention(sp.clone()), &fwd, TOL);
        let bwd = [
            q,
            k,
            v,
            seg,
            cpu.outputs[0].cast(DType::F32),
            cpu.outputs[1].cast(DType::F32),
            d_o,
        ];
        check(&mut f, &Op::AttentionBackward(sp.clone()), &bwd, TOL);
        if sliced {
            check_at(&mut s, &Op::Attention(sp.clone()), &fwd, TOL, MISALIGN);
            check_at(&mut s, &Op::AttentionBackward(sp), &bwd, TOL, MISALIGN);
        }
    }
}

#[test]
fn cross_entropy_and_backward() {
    let (mut f, mut s) = backends();
    let mut r = rng(12);
    for (n, vocab) in [(37usize, 301usize), (5, 3), (2, 1000)] {
        let logits = randn(&mut r, &[n, vocab], DType::F32);
        let labels: Vec<i32> = (0..n)
            .map(|i| match i % 7 {
                3 => -100,
                5 => vocab as i32 + 2,
                _ => r.random_range(0..vocab as i32),
            })
            .collect();
        let labels = ints(&[n], labels);
        let op = Op::CrossEntropy { ignore_index: -100 };
        let (cpu, _) = check(&mut f, &op, &[logits.clone(), labels.clone()], TOL);
        check_at(&mut s, &op, &[logits.clone(), labels.clone()], TOL, MISALIGN);
        let dloss = HostTensor::from_f32(&[1], &[0.37]);
        let bwd = [logits, labels, cpu.outputs[2].cast(DType::F32), dloss];
        check_both(
            &mut f,
            &mut s,
            &Op::CrossEntropyBackward { ignore_index: -100 },
            &bwd,
            TOL,
        );
    }
}

#[test]
fn embedding_and_deterministic_scatter_add() {
    let (mut f, mut s) = backends();
    let mut r = rng(13);
    let (vocab, h, n) = (50usize, 19usize, 300usize);
    let ids: Vec<i32> = (0..n)
        .map(|i| match i % 50 {
            7 => -1,
            11 => vocab as i32,
            _ => r.random_range(0..12),
        })
        .collect();
    let ids = ints(&[n], ids);
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let table = randn(&mut r, &[vocab, h], dt);
        check_both(&mut f, &mut s, &Op::Embedding, &[table, ids.clone()], TOL);
    }
    let dy = randn(&mut r, &[n, h], DType::F32);
    check_both(
        &mut f,
        &mut s,
        &Op::EmbeddingBackward { vocab },
        &[dy.clone(), ids.clone()],
        TOL,
    );
    // Wide rows: each invocation owns several columns.
    let dy = randn(&mut r, &[40, 600], DType::F32);
    let ids = ints(&[40], (0..40).map(|i| (i * 7) % 9).collect());
    check_both(&mut f, &mut s, &Op::EmbeddingBackward { vocab: 10 }, &[dy, ids], TOL);
}

#[test]
fn optimizer_ops() {
    let (mut f, mut s) = backends();
    let mut r = rng(14);
    let xs = [
        randn(&mut r, &[37, 5], DType::F32),
        randn(&mut r, &[1], DType::F32),
        randn(&mut r, &[3001], DType::F32),
    ];
    check_both(&mut f, &mut s, &Op::SumSquares, &xs, TOL);
    for (sumsq, max_norm) in [(7.3f32, 1.0), (0.01, 1.0), (4.0, f64::INFINITY), (f32::INFINITY, 1.0)] {
        let x = HostTensor::from_f32(&[1], &[sumsq]);
        let (cpu, gpu) = check(&mut f, &Op::ClipCoef { max_norm }, &[x], TOL);
        assert_eq!(cpu.outputs[1].to_f32()[0].is_nan(), gpu.outputs[1].to_f32()[0].is_nan());
    }
    let spec = AdamWSpec {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let n = [13, 77];
    let hyper = HostTensor::from_f32(&[3], &[1e-3, 1.0 - 0.9f32.powi(3), (1.0 - 0.999f32.powi(3)).sqrt()]);
    for coef in [0.73f32, f32::NAN] {
        let v = randn(&mut r, &n, DType::F32)
            .to_f32()
            .iter()
            .map(|x| x.abs())
            .collect::<Vec<_>>();
        let inputs = [
            randn(&mut r, &n, DType::F32),
            randn(&mut r, &n, DType::F32),
            randn(&mut r, &n, DType::F32),
            HostTensor::from_f32(&n, &v),
            hyper.clone(),
            HostTensor::from_f32(&[1], &[coef]),
        ];
        check_both(&mut f, &mut s, &Op::AdamW(spec.clone()), &inputs, TOL);
    }
    let acc = [
        randn(&mut r, &[3, 999], DType::F32),
        randn(&mut r, &[3, 999], DType::F32),
    ];
    check_both(&mut f, &mut s, &Op::AccumulateGrad, &acc, TOL);
}

#[test]
fn kv_cache_write_and_cached_attention() {
    let (mut f, mut s) = backends();
    let mut r = rng(15);
    let (b, tc, hq, hkv, d) = (3usize, 17usize, 4usize, 2usize, 8usize);
    let w = hkv * d;
    let cache = randn(&mut r, &[b, tc, w], DType::F32);
    // Duplicate slots (the later row wins) and skipped rows.
    let slots = ints(&[6], vec![5, 40, -1, 5, 50, 0]);
    let x = randn(&mut r, &[6, w], DType::F32);
    check_both(&mut f, &mut s, &Op::CacheWrite, &[cache, x, slots], TOL);
    for (tq, window) in [(1usize, None), (4, Some(3)), (4, None)] {
        let sp = spec(hq, hkv, d, tq, true, window);
        let q = randn(&mut r, &[b * tq, hq * d], DType::F32);
        let kc = randn(&mut r, &[b, tc, w], DType::F32);
        let vc = randn(&mut r, &[b, tc, w], DType::F32);
        let pos: Vec<i32> = (0..b * tq)
            .map(|i| {
                if i % 5 == 4 {
                    -1
                } else {
                    r.random_range(0..tc as i32 + 3)
                }
            })
            .collect();
        let inputs = [q, kc, vc, ints(&[b * tq], pos)];
        check_both(&mut f, &mut s, &Op::AttentionCached(sp), &inputs, TOL);
    }
}

#[test]
fn matmul_shapes_transposes_and_weight_dtypes() {
    let (mut f, mut s) = backends();
    let mut r = rng(16);
    // Linear layers: x [2, 3, 37] @ W^T (W [29, 37]) in every weight dtype.
    for wdt in [DType::F32, DType::BF16, DType::F16] {
        let x = randn(&mut r, &[2, 3, 37], DType::F32);
        let w = randn(&mut r, &[29, 37], wdt);
        let op = Op::MatMul {
            trans_a: false,
            trans_b: true,
        };
        check_both(&mut f, &mut s, &op, &[x, w], TOL);
    }
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let (m, k, n) = (19, 23, 17);
        let a_shape = if ta { [3, k, m] } else { [3, m, k] };
        let b_shape = if tb { [3, n, k] } else { [3, k, n] };
        let a = randn(&mut r, &a_shape, DType::F32);
        let b = randn(&mut r, &b_shape, DType::F32);
        let op = Op::MatMul {
            trans_a: ta,
            trans_b: tb,
        };
        check_both(&mut f, &mut s, &op, &[a, b], TOL);
        // A 2-D product, e.g. a weight gradient dy^T x.
        let a2 = randn(&mut r, &a_shape[1..], DType::F32);
        let b2 = randn(&mut r, &b_shape[1..], DType::F32);
        check_both(&mut f, &mut s, &op, &[a2, b2], TOL);
    }
}

#[test]
fn unsupported_storage_is_an_error_not_a_wrong_answer() {
    let mut f = wgsl();
    let mut r = rng(17);
    let x = randn(&mut r, &[4, 5], DType::F64);
    let err = run(&mut f, &Op::Scale { factor: 2.0 }, &[x])
        .err()
        .expect("f64 must be refused");
    assert!(err.to_string().contains("f64"), "{err}");
    let x = randn(&mut r, &[4, 6], DType::F16);
    let w = randn(&mut r, &[6], DType::F16);
    let err = run(&mut f, &Op::RmsNorm { eps: 1e-5 }, &[x, w])
        .err()
        .expect("an f16 output must be refused");
    assert!(err.to_string().contains("f32"), "{err}");
    // Attention writes bf16 outputs in pairs: an odd head dim is refused, naming the limit.
    let sp = spec(4, 2, 7, 11, true, None);
    let q = randn(&mut r, &[22, 28], DType::BF16);
    let k = randn(&mut r, &[22, 14], DType::BF16);
    let v = randn(&mut r, &[22, 14], DType::BF16);
    let seg = segments(&mut r, 2, 11);
    let err = run(&mut f, &Op::Attention(sp), &[q, k, v, seg])
        .err()
        .expect("bf16 attention output with an odd head dim");
    assert!(err.to_string().contains("even head dim"), "{err}");
}

#[test]
fn fallbacks_without_shader_f16_and_subgroups() {
    // A device without `enable f16;` and subgroups: f16 operands are unpacked from u32 words.
    use ferrotune::backend::wgsl::{WgslContext, WgslOptions};
    let ctx = WgslContext::new_blocking(WgslOptions {
        without: wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP,
        cooperative_matrix: false,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("the WGSL tests need a GPU adapter (lavapipe is enough): {e}"));
    assert!(!ctx.has_f16 && !ctx.has_subgroups);
    let mut f = WgslBackend::new(ctx);
    let mut r = rng(18);
    for wdt in [DType::F16, DType::BF16, DType::F32] {
        let x = randn(&mut r, &[2, 70, 37], DType::F32);
        let w = randn(&mut r, &[65, 37], wdt);
        let op = Op::MatMul {
            trans_a: false,
            trans_b: true,
        };
        // f32 outputs of exactly widened half operands: the f32 bound, as on the normal path.
        check(&mut f, &op, &[x, w], TOL);
        let x = randn(&mut r, &[5, 37], wdt);
        let w = randn(&mut r, &[37], wdt);
        check(&mut f, &Op::RmsNorm { eps: 1e-5 }, &[x.cast(DType::F32), w], TOL);
        check(&mut f, &Op::Add, &[x.clone(), x], TOL_HALF);
    }
    let sp = spec(4, 2, 8, 13, true, None);
    let q = randn(&mut r, &[26, 32], DType::F32);
    let k = randn(&mut r, &[26, 16], DType::F32);
    let v = randn(&mut r, &[26, 16], DType::F32);
    let seg = segments(&mut r, 2, 13);
    check(&mut f, &Op::Attention(sp), &[q, k, v, seg], TOL);
}
