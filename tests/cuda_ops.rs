//! Every op on the CUDA backend against the CPU backend (the reference) on fresh random
//! inputs: ||cuda - cpu|| / ||cpu|| under 1e-5 when every operand is f32, under 1e-2 when
//! bf16/f16 storage is involved. Outputs are filled with NaN before each launch, so an
//! element a kernel does not write fails the test. Needs a CUDA device: without one every
//! test fails and says why.
#![cfg(feature = "cuda")]

mod common;
use common::{rand_tensor, rel_err, rng};
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::backend::cuda::{CudaBackend, CudaOptions, FlashTiles};
use ferrotune::backend::{Arg, Backend, Loc};
use ferrotune::graph::{Role, TensorInfo};
use ferrotune::ops::{AdamWSpec, AttnSpec, Op};
use ferrotune::{DType, HostTensor};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

fn cuda() -> CudaBackend {
    CudaBackend::new().unwrap_or_else(|e| panic!("these tests need a CUDA device: {e}"))
}

fn info(k: usize, t: &HostTensor) -> TensorInfo {
    TensorInfo {
        name: format!("t{k}"),
        shape: t.shape.clone(),
        dtype: t.dtype,
        role: Role::Input,
    }
}

/// Runs one op on a backend: inputs uploaded, outputs poisoned with 0xFF bytes (NaN),
/// prepare, launch, flush, read back. In-place ops return the inputs they write.
fn run_op(be: &mut dyn Backend, op: &Op, inputs: &[HostTensor]) -> Vec<HostTensor> {
    let in_infos: Vec<TensorInfo> = inputs.iter().enumerate().map(|(k, t)| info(k, t)).collect();
    let refs: Vec<&TensorInfo> = in_infos.iter().collect();
    let outs = op.infer(&refs).unwrap_or_else(|e| panic!("{}: {e}", op.name()));
    let out_infos: Vec<TensorInfo> = outs
        .into_iter()
        .enumerate()
        .map(|(k, (shape, dtype))| TensorInfo {
            name: format!("o{k}"),
            shape,
            dtype,
            role: Role::Activation,
        })
        .collect();
    let place = |be: &mut dyn Backend, bytes: u64| -> Loc {
        Loc {
            buffer: be.alloc(bytes.max(1)).expect("alloc"),
            offset: 0,
            bytes,
        }
    };
    let in_locs: Vec<Loc> = inputs.iter().map(|t| place(be, t.data.len() as u64)).collect();
    // An output that is the first input's buffer (Op::is_alias) is placed there, as the
    // executor places it.
    let out_locs: Vec<Loc> = out_infos
        .iter()
        .enumerate()
        .map(|(k, t)| {
            if op.is_alias(k) {
                in_locs[0]
            } else {
                place(be, t.bytes() as u64)
            }
        })
        .collect();
    for (l, t) in in_locs.iter().zip(inputs) {
        be.write(*l, &t.data).unwrap();
    }
    for (k, (l, t)) in out_locs.iter().zip(&out_infos).enumerate() {
        if !op.is_alias(k) {
            be.write(*l, &vec![0xff; t.bytes()]).unwrap();
        }
    }
    let out_refs: Vec<&TensorInfo> = out_infos.iter().collect();
    be.prepare(op, &refs, &out_refs)
        .unwrap_or_else(|e| panic!("{}: {e}", op.name()));
    let ia: Vec<Arg> = in_locs
        .iter()
        .zip(&in_infos)
        .map(|(&loc, info)| Arg { loc, info })
        .collect();
    let oa: Vec<Arg> = out_locs
        .iter()
        .zip(&out_infos)
        .map(|(&loc, info)| Arg { loc, info })
        .collect();
    be.launch(op, &ia, &oa).unwrap_or_else(|e| panic!("{}: {e}", op.name()));
    be.flush().unwrap();
    // The outputs, then the inputs written in place.
    let (locs, infos): (Vec<Loc>, Vec<&TensorInfo>) = out_locs
        .iter()
        .copied()
        .zip(&out_infos)
        .chain(op.writes().iter().map(|&w| (in_locs[w], &in_infos[w])))
        .unzip();
    let data = be.read(&locs).unwrap();
    data.into_iter()
        .zip(infos)
        .map(|(d, i)| HostTensor {
            shape: i.shape.clone(),
            dtype: i.dtype,
            data: d,
        })
        .collect()
}

fn all_f32(inputs: &[HostTensor]) -> bool {
    inputs
        .iter()
        .all(|t| matches!(t.dtype, DType::F32 | DType::I32 | DType::U32))
}

/// Runs `op` on both backends and compares every result.
fn compare(gpu: &mut CudaBackend, what: &str, op: &Op, inputs: &[HostTensor]) -> Vec<HostTensor> {
    let tol = if all_f32(inputs) { 1e-5 } else { 1e-2 };
    let want = run_op(&mut CpuBackend::new(), op, inputs);
    let got = run_op(gpu, op, inputs);
    assert_eq!(want.len(), got.len());
    for (k, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w.dtype, g.dtype);
        let (w, g) = (w.to_f64(), g.to_f64());
        for (e, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!(
                a.is_finite() || !b.is_finite(),
                "{what}: output {k} element {e} is {a} (cpu {b}): unwritten or overflowed"
            );
        }
        let err = rel_err(&g, &w);
        eprintln!("{what}: output {k}: relative error {err:.2e} (tolerance {tol:e})");
        assert!(err <= tol, "{what}: output {k}: relative error {err:.3e} > {tol:e}");
    }
    got
}

fn t(r: &mut ChaCha8Rng, shape: &[usize], dtype: DType) -> HostTensor {
    rand_tensor(r, shape, dtype)
}

fn ids(r: &mut ChaCha8Rng, n: usize, hi: i32) -> HostTensor {
    HostTensor::from_i32(&[n], &(0..n).map(|_| r.random_range(0..hi)).collect::<Vec<_>>())
}

#[test]
fn add_mul_scale_with_broadcasting() {
    let mut g = cuda();
    let mut r = rng(1);
    for dt in [DType::F32, DType::BF16, DType::F16] {
        for (a, b) in [
            (&[37usize, 29][..], &[37usize, 29][..]),
            (&[37, 29], &[29]),
            (&[4, 64], &[1]),
            (&[1037], &[1037]),
        ] {
            for op in [Op::Add, Op::Mul] {
                let ins = [t(&mut r, a, dt), t(&mut r, b, dt)];
                compare(&mut g, &format!("{} {dt} {a:?} {b:?}", op.name()), &op, &ins);
            }
        }
        let x = t(&mut r, &[3, 333], dt);
        compare(&mut g, &format!("scale {dt}"), &Op::Scale { factor: -1.37 }, &[x]);
    }
}

#[test]
fn casts_between_every_float_type() {
    let mut g = cuda();
    let mut r = rng(2);
    for from in [DType::F32, DType::BF16, DType::F16] {
        for to in [DType::F32, DType::BF16, DType::F16] {
            let x = t(&mut r, &[1001], from);
            let got = compare(
                &mut g,
                &format!("cast {from} -> {to}"),
                &Op::Cast { dtype: to },
                std::slice::from_ref(&x),
            );
            // Rounding is to nearest even on both backends: bit-identical.
            assert_eq!(got[0], x.cast(to), "cast {from} -> {to} differs from the host cast");
        }
    }
}

#[test]
fn reduce_sum_and_broadcast() {
    let mut g = cuda();
    let mut r = rng(3);
    for dt in [DType::F32, DType::BF16] {
        let x = t(&mut r, &[37, 13], dt);
        compare(
            &mut g,
            &format!("reduce rows {dt}"),
            &Op::ReduceSum { shape: vec![13] },
            std::slice::from_ref(&x),
        );
        compare(
            &mut g,
            &format!("reduce all {dt}"),
            &Op::ReduceSum { shape: vec![1] },
            &[x],
        );
        let big = t(&mut r, &[3000, 300], dt);
        compare(
            &mut g,
            &format!("reduce 3000 rows {dt}"),
            &Op::ReduceSum { shape: vec![300] },
            std::slice::from_ref(&big),
        );
        compare(
            &mut g,
            &format!("reduce 900000 {dt}"),
            &Op::ReduceSum { shape: vec![1] },
            &[big],
        );
        let s = t(&mut r, &[13], dt);
        compare(
            &mut g,
            &format!("broadcast {dt}"),
            &Op::Broadcast { shape: vec![5, 13] },
            &[s],
        );
        let one = t(&mut r, &[1], dt);
        compare(
            &mut g,
            &format!("broadcast scalar {dt}"),
            &Op::Broadcast { shape: vec![7, 3] },
            &[one],
        );
    }
}

#[test]
fn dropout_mask_is_bit_identical() {
    let mut g = cuda();
    let mut r = rng(4);
    for dt in [DType::F32, DType::BF16] {
        for p in [0.0f32, 0.3, 1.0] {
            let x = t(&mut r, &[17, 301], dt);
            let seed = HostTensor::from_u32(&[1], &[r.random::<u32>()]);
            let pp = HostTensor::from_f32(&[1], &[p]);
            let ins = [x, seed, pp];
            let op = Op::Dropout { salt: 5 };
            let got = compare(&mut g, &format!("dropout {dt} p {p}"), &op, &ins);
            let want = run_op(&mut CpuBackend::new(), &op, &ins);
            assert_eq!(got[0], want[0], "dropout {dt} p {p}: not bit-identical");
        }
    }
}

#[test]
fn accumulate_grad_in_place() {
    let mut g = cuda();
    let mut r = rng(5);
    for gd in [DType::F32, DType::BF16] {
        let ins = [t(&mut r, &[70001], DType::F32), t(&mut r, &[70001], gd)];
        compare(&mut g, &format!("accumulate f32 += {gd}"), &Op::AccumulateGrad, &ins);
    }
}

#[test]
fn embedding_and_scatter_backward() {
    let mut g = cuda();
    let mut r = rng(6);
    for (dt, v, h, n) in [(DType::F32, 23, 13, 37), (DType::BF16, 1000, 64, 300)] {
        let mut idv = ids(&mut r, n, v as i32).to_i32();
        idv[3] = v as i32 + 5; // out of range: a zero row, no gradient
        idv[5] = idv[4]; // repeated ids add up
        let idt = HostTensor::from_i32(&[n], &idv);
        let table = t(&mut r, &[v, h], dt);
        compare(
            &mut g,
            &format!("embedding {dt}"),
            &Op::Embedding,
            &[table, idt.clone()],
        );
        for dy_t in [DType::F32, DType::BF16] {
            let dy = t(&mut r, &[n, h], dy_t);
            compare(
                &mut g,
                &format!("embedding backward {dy_t}"),
                &Op::EmbeddingBackward { vocab: v },
                &[dy, idt.clone()],
            );
        }
    }
}

#[test]
fn matmul_every_form_and_type() {
    let mut g = cuda();
    let mut r = rng(7);
    // Shared 2-D B (a linear layer), both layouts of B.
    for (a, b, tb) in [
        (&[2usize, 3, 5][..], &[7usize, 5][..], true),
        (&[37, 29], &[29, 19], false),
        (&[3, 41, 64], &[96, 64], true),
    ] {
        for (da, db) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::F16, DType::F16),
            (DType::BF16, DType::F32),
            (DType::F32, DType::BF16),
        ] {
            let op = Op::MatMul {
                trans_a: false,
                trans_b: tb,
            };
            let ins = [t(&mut r, a, da), t(&mut r, b, db)];
            compare(&mut g, &format!("matmul {a:?}{da} x {b:?}{db} tb {tb}"), &op, &ins);
        }
    }
    // 2-D with a transposed A (weight gradients: x^T dy).
    let op = Op::MatMul {
        trans_a: true,
        trans_b: false,
    };
    for dt in [DType::F32, DType::BF16] {
        let ins = [t(&mut r, &[53, 17], dt), t(&mut r, &[53, 11], dt)];
        compare(&mut g, &format!("matmul a^T b {dt}"), &op, &ins);
    }
    // Batched, every transpose.
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let (m, k, n) = (13, 21, 9);
        let a: Vec<usize> = if ta { vec![2, 3, k, m] } else { vec![2, 3, m, k] };
        let b: Vec<usize> = if tb { vec![2, 3, n, k] } else { vec![2, 3, k, n] };
        for dt in [DType::F32, DType::BF16] {
            let op = Op::MatMul {
                trans_a: ta,
                trans_b: tb,
            };
            let ins = [t(&mut r, &a, dt), t(&mut r, &b, dt)];
            compare(&mut g, &format!("batched matmul ta {ta} tb {tb} {dt}"), &op, &ins);
        }
    }
}

#[test]
fn fused_products_and_accumulation() {
    let mut g = cuda();
    let mut r = rng(17);
    // (a, b, trans_a, trans_b): a linear layer (shared 2-D B), a weight gradient (a^T b),
    // and a batched product.
    let forms: [(&[usize], &[usize], bool, bool); 3] = [
        (&[3, 41, 64], &[96, 64], false, true),
        (&[53, 17], &[53, 11], true, false),
        (&[2, 13, 21], &[2, 21, 9], false, false),
    ];
    for (a, b, ta, tb) in forms {
        let out = {
            let ia = ferrotune::graph::TensorInfo {
                name: "a".into(),
                shape: a.to_vec(),
                dtype: DType::F32,
                role: Role::Input,
            };
            let ib = ferrotune::graph::TensorInfo {
                name: "b".into(),
                shape: b.to_vec(),
                dtype: DType::F32,
                role: Role::Input,
            };
            let op = Op::MatMul {
                trans_a: ta,
                trans_b: tb,
            };
            op.infer(&[&ia, &ib]).unwrap()[0].0.clone()
        };
        // Operand types, then the type of C / the output / the accumulator.
        for (dt, dc) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::BF16, DType::F32),
            (DType::F16, DType::F32),
        ] {
            for add in [false, true] {
                if !add && dc != dt {
                    continue;
                }
                let op = Op::MatMulFused {
                    trans_a: ta,
                    trans_b: tb,
                    alpha: 1.75,
                    add,
                };
                let mut ins = vec![t(&mut r, a, dt), t(&mut r, b, dt)];
                if add {
                    ins.push(t(&mut r, &out, dc));
                }
                compare(
                    &mut g,
                    &format!("fused {a:?}{dt} x {b:?} ta {ta} tb {tb} add {add} -> {dc}"),
                    &op,
                    &ins,
                );
            }
            let op = Op::MatMulAccumulate {
                trans_a: ta,
                trans_b: tb,
                alpha: -0.5,
            };
            let ins = [t(&mut r, a, dt), t(&mut r, b, dt), t(&mut r, &out, dc)];
            compare(
                &mut g,
                &format!("accumulate {a:?}{dt} x {b:?} ta {ta} tb {tb} into {dc}"),
                &op,
                &ins,
            );
        }
    }
    // A 16-bit activation times an f32 LoRA weight, added to a 16-bit base output.
    let op = Op::MatMulFused {
        trans_a: false,
        trans_b: true,
        alpha: 2.0,
        add: true,
    };
    let ins = [
        t(&mut r, &[3, 41, 16], DType::BF16),
        t(&mut r, &[96, 16], DType::F32),
        t(&mut r, &[3, 41, 96], DType::BF16),
    ];
    compare(&mut g, "fused bf16 x f32 weight + bf16 c", &op, &ins);
}

#[test]
fn rms_norm_forward_and_backward() {
    let mut g = cuda();
    let mut r = rng(8);
    for (shape, dx, dw) in [
        (&[37usize, 13][..], DType::F32, DType::F32),
        (&[2, 32, 256], DType::BF16, DType::F32),
        (&[64, 256], DType::BF16, DType::BF16),
        (&[300, 4096], DType::F32, DType::F32),
        (&[5, 8192], DType::BF16, DType::F32),
        // One, two and four register chunks per thread in the backward; more rows than blocks.
        (&[1100, 2048], DType::BF16, DType::BF16),
        (&[3, 16384], DType::BF16, DType::F32),
    ] {
        let h = *shape.last().unwrap();
        let x = t(&mut r, shape, dx);
        let w = t(&mut r, &[h], dw);
        let dy = t(&mut r, shape, dx);
        let what = format!("rms_norm {shape:?} x {dx} w {dw}");
        compare(&mut g, &what, &Op::RmsNorm { eps: 1e-5 }, &[x.clone(), w.clone()]);
        let acc = t(&mut r, shape, dx);
        for (op, inputs) in common::rms_norm_backward_cases(&x, &w, &dy, &acc) {
            compare(&mut g, &format!("{what} backward {op:?}"), &op, &inputs);
        }
    }
}

#[test]
fn rope_forward_inverse_and_scaled() {
    let mut g = cuda();
    let mut r = rng(9);
    for (dt, n, heads, hd) in [(DType::F32, 37, 3, 16), (DType::BF16, 64, 4, 64), (DType::F32, 5, 2, 2)] {
        let x = t(&mut r, &[n, heads * hd], dt);
        let pos = HostTensor::from_i32(&[n], &(0..n).map(|_| r.random_range(0..4096)).collect::<Vec<_>>());
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 10000f32.powf(-((2 * i) as f32) / hd as f32))
            .collect();
        let inv = HostTensor::from_f32(&[hd / 2], &inv);
        for (inverse, scale) in [(false, 1.0), (true, 1.0), (false, 1.25)] {
            let op = Op::Rope {
                head_dim: hd,
                inverse,
                scale,
            };
            compare(
                &mut g,
                &format!("rope {dt} hd {hd} inverse {inverse} scale {scale}"),
                &op,
                &[x.clone(), pos.clone(), inv.clone()],
            );
        }
    }
}

#[test]
fn swiglu_forward_and_backward() {
    let mut g = cuda();
    let mut r = rng(10);
    for (dt, shape) in [
        (DType::F32, &[1001usize][..]),
        (DType::BF16, &[64, 352]),
        (DType::F16, &[3, 5]),
    ] {
        let (a, b, dy) = (t(&mut r, shape, dt), t(&mut r, shape, dt), t(&mut r, shape, dt));
        compare(&mut g, &format!("swiglu {dt}"), &Op::Swiglu, &[a.clone(), b.clone()]);
        compare(
            &mut g,
            &format!("swiglu backward {dt}"),
            &Op::SwigluBackward,
            &[a, b, dy],
        );
    }
}

#[test]
fn cross_entropy_with_ignored_labels() {
    let mut g = cuda();
    let mut r = rng(11);
    for (dt, n, v) in [(DType::F32, 37, 23), (DType::BF16, 64, 1000), (DType::F32, 9, 50257)] {
        let logits = t(&mut r, &[n, v], dt);
        let mut lab = ids(&mut r, n, v as i32).to_i32();
        lab[0] = -100;
        lab[2] = v as i32 + 3; // out of range counts as ignored
        let lab = HostTensor::from_i32(&[n], &lab);
        let op = Op::CrossEntropy { ignore_index: -100 };
        let out = compare(
            &mut g,
            &format!("cross_entropy {dt} V {v}"),
            &op,
            &[logits.clone(), lab.clone()],
        );
        let dloss = HostTensor::from_f32(&[1], &[0.37]);
        let op = Op::CrossEntropyBackward { ignore_index: -100 };
        let grad = compare(
            &mut g,
            &format!("cross_entropy backward {dt} V {v}"),
            &op,
            &[logits.clone(), lab.clone(), out[2].clone(), dloss.clone()],
        );
        // Both in one op, the gradient written over the logits: its outputs are the forward's,
        // the gradient (the logits' buffer) and the logits written in place.
        let op = Op::CrossEntropyWithGrad { ignore_index: -100 };
        let both = compare(
            &mut g,
            &format!("cross_entropy with its gradient {dt} V {v}"),
            &op,
            &[logits, lab, dloss],
        );
        assert_eq!(both.len(), 5);
        // The row sums run over other thread counts, so a 16-bit gradient may round a few
        // elements the other way.
        let tol = if dt == DType::F32 { 1e-6 } else { 1e-3 };
        for (k, want) in out.iter().chain(&grad).enumerate() {
            let err = rel_err(&both[k].to_f64(), &want.to_f64());
            assert!(
                err <= tol,
                "{dt} V {v}: output {k} differs from the two ops' by {err:.2e}"
            );
        }
        assert_eq!(both[3].data, both[4].data, "the gradient is the logits' buffer");
    }
}

#[test]
fn sum_squares_clip_and_adamw() {
    let mut g = cuda();
    let mut r = rng(12);
    let ins = [
        t(&mut r, &[1000], DType::F32),
        t(&mut r, &[70001], DType::F32),
        t(&mut r, &[37], DType::BF16),
    ];
    let s = compare(&mut g, "sum_squares", &Op::SumSquares, &ins);
    for max_norm in [1.0, f64::INFINITY] {
        compare(
            &mut g,
            &format!("clip_coef {max_norm}"),
            &Op::ClipCoef { max_norm },
            &[s[0].clone()],
        );
    }
    let spec = AdamWSpec {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    for n in [3usize, 1000, 70001] {
        let p = t(&mut r, &[n], DType::F32);
        let gr = t(&mut r, &[n], DType::F32);
        let m = t(&mut r, &[n], DType::F32);
        let v: Vec<f32> = t(&mut r, &[n], DType::F32).to_f32().iter().map(|x| x * x).collect();
        let v = HostTensor::from_f32(&[n], &v);
        let hyper = HostTensor::from_f32(&[3], &[1e-3, 0.19, 0.0447]);
        let coef = HostTensor::from_f32(&[1], &[0.75]);
        let got = compare(
            &mut g,
            &format!("adamw n {n}"),
            &Op::AdamW(spec.clone()),
            &[p, gr, m, v, hyper, coef],
        );
        assert!(
            got[1].to_f32().iter().all(|&x| x == 0.0),
            "adamw leaves the gradient zeroed"
        );
    }
}

/// An overflowed gradient: the clip coefficient is NaN and AdamW only clears the gradient.
#[test]
fn non_finite_norm_skips_adamw() {
    let mut g = cuda();
    let mut r = rng(16);
    for bad in [f32::INFINITY, f32::NAN] {
        let s = HostTensor::from_f32(&[1], &[bad]);
        let got = run_op(&mut g, &Op::ClipCoef { max_norm: 1.0 }, &[s]);
        assert!(
            got[1].to_f32()[0].is_nan(),
            "clip coef of a {bad} sum of squares is NaN"
        );
    }
    let spec = AdamWSpec {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let n = 1001;
    let p = t(&mut r, &[n], DType::F32);
    let gr = t(&mut r, &[n], DType::F32);
    let m = t(&mut r, &[n], DType::F32);
    let v: Vec<f32> = t(&mut r, &[n], DType::F32).to_f32().iter().map(|x| x * x).collect();
    let v = HostTensor::from_f32(&[n], &v);
    let hyper = HostTensor::from_f32(&[3], &[1e-3, 0.19, 0.0447]);
    let coef = HostTensor::from_f32(&[1], &[f32::NAN]);
    let ins = [p.clone(), gr, m.clone(), v.clone(), hyper, coef];
    let got = compare(&mut g, "adamw with a NaN coefficient", &Op::AdamW(spec), &ins);
    assert_eq!(got[0].data, p.data, "weights unchanged");
    assert_eq!(got[2].data, m.data, "first moment unchanged");
    assert_eq!(got[3].data, v.data, "second moment unchanged");
    assert!(got[1].to_f32().iter().all(|&x| x == 0.0), "gradient cleared");
}

/// KV-cache writes (negative and out-of-range slots skipped) and attention over the cache.
#[test]
fn kv_cache_write_and_cached_attention() {
    let mut g = cuda();
    let mut r = rng(17);
    for dt in [DType::F32, DType::BF16] {
        let (b, cache_len, w) = (2usize, 37usize, 3 * 64);
        let cache = t(&mut r, &[b, cache_len, w], dt);
        let x = t(&mut r, &[5, w], dt);
        let slots = HostTensor::from_i32(&[5], &[0, 40, -1, 73, 74]);
        compare(
            &mut g,
            &format!("cache_write {dt}"),
            &Op::CacheWrite,
            &[cache, x, slots],
        );
        for (hq, hkv, hd, tq, window) in [
            (4usize, 2usize, 64usize, 1usize, None),
            (6, 3, 40, 3, Some(5)),
            (2, 2, 128, 4, None),
        ] {
            let mut sp = spec(hq, hkv, hd, tq, true, window);
            sp.scale = 0.3;
            let q = t(&mut r, &[b * tq, hq * hd], dt);
            let kc = t(&mut r, &[b, cache_len, hkv * hd], dt);
            let vc = t(&mut r, &[b, cache_len, hkv * hd], dt);
            let pos: Vec<i32> = (0..b * tq)
                .map(|i| {
                    if i == 1 {
                        -1
                    } else {
                        r.random_range(0..cache_len as i32)
                    }
                })
                .collect();
            let pos = HostTensor::from_i32(&[b * tq], &pos);
            compare(
                &mut g,
                &format!("attention_cached {dt} {hq}/{hkv} hd {hd} tq {tq} window {window:?}"),
                &Op::AttentionCached(sp),
                &[q, kc, vc, pos],
            );
        }
    }
}

/// Several AdamW launches become one kernel; an op launched after them must see the update.
#[test]
fn adamw_launches_are_merged_in_order() {
    let mut g = cuda();
    let mut r = rng(13);
    let spec = AdamWSpec {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let sizes = [5usize, 100, 70000];
    let mut host: Vec<Vec<HostTensor>> = Vec::new();
    for &n in &sizes {
        host.push(vec![
            t(&mut r, &[n], DType::F32),
            t(&mut r, &[n], DType::F32),
            HostTensor::zeros(&[n], DType::F32),
            HostTensor::zeros(&[n], DType::F32),
        ]);
    }
    let hyper = HostTensor::from_f32(&[3], &[1e-2, 0.1, 0.05f32.sqrt()]);
    let coef = HostTensor::from_f32(&[1], &[1.0]);
    let run = |be: &mut dyn Backend| -> Vec<HostTensor> {
        let mut infos = Vec::new();
        let mut locs = Vec::new();
        for ts in &host {
            for tt in ts {
                let l = Loc {
                    buffer: be.alloc(tt.data.len() as u64).unwrap(),
                    offset: 0,
                    bytes: tt.data.len() as u64,
                };
                be.write(l, &tt.data).unwrap();
                infos.push(info(infos.len(), tt));
                locs.push(l);
            }
        }
        let mut extra = Vec::new();
        for tt in [&hyper, &coef] {
            let l = Loc {
                buffer: be.alloc(tt.data.len() as u64).unwrap(),
                offset: 0,
                bytes: tt.data.len() as u64,
            };
            be.write(l, &tt.data).unwrap();
            extra.push((l, info(100 + extra.len(), tt)));
        }
        let op = Op::AdamW(spec.clone());
        for k in 0..sizes.len() {
            let refs: Vec<&TensorInfo> = (0..4)
                .map(|j| &infos[4 * k + j])
                .chain([&extra[0].1, &extra[1].1])
                .collect();
            be.prepare(&op, &refs, &[]).unwrap();
            let args: Vec<Arg> = (0..4)
                .map(|j| Arg {
                    loc: locs[4 * k + j],
                    info: &infos[4 * k + j],
                })
                .chain(extra.iter().map(|(l, i)| Arg { loc: *l, info: i }))
                .collect();
            be.launch(&op, &args, &[]).unwrap();
        }
        // A cast of the last parameter, launched right after the queued updates.
        let last = 4 * (sizes.len() - 1);
        let out_info = TensorInfo {
            name: "cast".into(),
            shape: vec![sizes[sizes.len() - 1]],
            dtype: DType::BF16,
            role: Role::Activation,
        };
        let out = Loc {
            buffer: be.alloc(out_info.bytes() as u64).unwrap(),
            offset: 0,
            bytes: out_info.bytes() as u64,
        };
        let cast = Op::Cast { dtype: DType::BF16 };
        be.prepare(&cast, &[&infos[last]], &[&out_info]).unwrap();
        be.launch(
            &cast,
            &[Arg {
                loc: locs[last],
                info: &infos[last],
            }],
            &[Arg {
                loc: out,
                info: &out_info,
            }],
        )
        .unwrap();
        be.flush().unwrap();
        let mut want_locs = locs.clone();
        want_locs.push(out);
        be.read(&want_locs)
            .unwrap()
            .into_iter()
            .map(|d| HostTensor {
                shape: vec![d.len()],
                dtype: DType::U32,
                data: d,
            })
            .collect()
    };
    let want = run(&mut CpuBackend::new());
    let got = run(&mut g);
    for (k, (w, gg)) in want.iter().zip(&got).enumerate() {
        let dt = if k == want.len() - 1 { DType::BF16 } else { DType::F32 };
        let as_f = |h: &HostTensor| {
            HostTensor {
                shape: vec![h.data.len() / dt.size()],
                dtype: dt,
                data: h.data.clone(),
            }
            .to_f64()
        };
        let err = rel_err(&as_f(gg), &as_f(w));
        let tol = if dt == DType::BF16 { 1e-2 } else { 1e-5 };
        assert!(err <= tol, "tensor {k}: relative error {err:.3e}");
    }
}

fn segments(r: &mut ChaCha8Rng, rows: usize, t: usize) -> Vec<i32> {
    // Packed rows: documents of random lengths, then padding as its own segment.
    let mut seg = Vec::new();
    for _ in 0..rows {
        let mut id = 1;
        let mut left = t;
        while left > 0 {
            let len = r.random_range(1..=left.min(t / 2 + 1));
            seg.extend(std::iter::repeat_n(id, len));
            left -= len;
            id += 1;
        }
    }
    seg
}

fn attention_case(g: &mut CudaBackend, r: &mut ChaCha8Rng, dt: DType, spec: AttnSpec, rows: usize, packed: bool) {
    let n = rows * spec.seq_len;
    let q = t(r, &[n, spec.n_heads * spec.head_dim], dt);
    let k = t(r, &[n, spec.n_kv_heads * spec.head_dim], dt);
    let v = t(r, &[n, spec.n_kv_heads * spec.head_dim], dt);
    let seg = if packed {
        segments(r, rows, spec.seq_len)
    } else {
        vec![0; n]
    };
    let seg = HostTensor::from_i32(&[n], &seg);
    let what = format!(
        "attention {dt} hd {} heads {}/{} T {} rows {rows} causal {} window {:?} packed {packed}",
        spec.head_dim, spec.n_heads, spec.n_kv_heads, spec.seq_len, spec.causal, spec.window
    );
    let expect = if dt != DType::F32 && matches!(spec.head_dim, 64 | 96 | 128) {
        "tensor-core"
    } else {
        "general"
    };
    assert_eq!(g.attention_path(&spec, dt), expect, "{what}");
    let ins = [q.clone(), k.clone(), v.clone(), seg.clone()];
    let out = compare(g, &what, &Op::Attention(spec.clone()), &ins);
    // The backward from the CPU's forward outputs, so both backends see the same o and lse.
    let cpu_out = run_op(&mut CpuBackend::new(), &Op::Attention(spec.clone()), &ins);
    let _ = out;
    let d_o = t(r, &[n, spec.n_heads * spec.head_dim], dt);
    let bwd_in = vec![q, k, v, seg, cpu_out[0].clone(), cpu_out[1].clone(), d_o];
    compare(
        g,
        &format!("{what} backward"),
        &Op::AttentionBackward(spec.clone()),
        &bwd_in,
    );
    // The same with dq rotated by a RoPE backward as it is written.
    let hd = spec.head_dim;
    let pos = HostTensor::from_i32(&[n], &(0..n).map(|_| r.random_range(0..4096)).collect::<Vec<_>>());
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 10000f32.powf(-((2 * i) as f32) / hd as f32))
        .collect();
    let op = Op::AttentionBackwardRope {
        attn: spec,
        inverse: true,
        scale: 1.25,
    };
    let rope_in = [pos, HostTensor::from_f32(&[hd / 2], &inv)];
    compare(
        g,
        &format!("{what} backward, dq rotated"),
        &op,
        &[bwd_in, rope_in.to_vec()].concat(),
    );
}

fn spec(hq: usize, hkv: usize, hd: usize, t: usize, causal: bool, window: Option<usize>) -> AttnSpec {
    AttnSpec {
        n_heads: hq,
        n_kv_heads: hkv,
        head_dim: hd,
        seq_len: t,
        causal,
        window,
        scale: 1.0 / (hd as f64).sqrt(),
        flex: Default::default(),
    }
}

#[test]
fn attention_general_path() {
    let mut g = cuda();
    let mut r = rng(14);
    for dt in [DType::F32, DType::BF16] {
        for hd in [2usize, 8, 40] {
            attention_case(&mut g, &mut r, dt, spec(4, 2, hd, 6, true, None), 2, true);
            attention_case(&mut g, &mut r, dt, spec(4, 2, hd, 37, true, Some(5)), 2, true);
            attention_case(&mut g, &mut r, dt, spec(3, 3, hd, 19, false, None), 1, true);
            attention_case(&mut g, &mut r, dt, spec(2, 1, hd, 23, false, Some(4)), 1, false);
        }
    }
    // f32 head dims the tensor-core path also has go through the general kernels.
    attention_case(&mut g, &mut r, DType::F32, spec(4, 2, 128, 70, true, None), 2, true);
}

/// Eager attention's own ops (head split/merge with grouped-query repeats, masked softmax,
/// softmax backward) against the CPU, then the whole eager graph forward and backward
/// against the fused op on the CPU.
#[test]
fn eager_attention_ops() {
    use ferrotune::ops::HeadLayout;
    let mut g = cuda();
    let mut r = rng(16);
    for dt in [DType::F32, DType::BF16] {
        for (t_len, heads, d, repeat) in [(7usize, 3usize, 5usize, 1usize), (33, 2, 64, 4)] {
            let l = HeadLayout {
                seq_len: t_len,
                heads,
                head_dim: d,
                repeat,
            };
            let x = t(&mut r, &[2 * t_len, heads * d], dt);
            compare(&mut g, &format!("split_heads {dt} {l:?}"), &Op::SplitHeads(l), &[x]);
            let y = t(&mut r, &[2, heads * repeat, t_len, d], dt);
            compare(&mut g, &format!("merge_heads {dt} {l:?}"), &Op::MergeHeads(l), &[y]);
        }
        for (sp, rows, packed) in [
            (spec(4, 2, 8, 37, true, Some(5)), 2, true),
            (spec(3, 3, 8, 300, true, None), 1, true),
            (spec(2, 1, 8, 23, false, Some(4)), 1, false),
        ] {
            let n = rows * sp.seq_len;
            let scores = t(&mut r, &[rows, sp.n_heads, sp.seq_len, sp.seq_len], dt);
            let seg = if packed {
                segments(&mut r, rows, sp.seq_len)
            } else {
                vec![0; n]
            };
            let seg = HostTensor::from_i32(&[n], &seg);
            let what = format!("masked_softmax {dt} T {} window {:?}", sp.seq_len, sp.window);
            let p = compare(&mut g, &what, &Op::MaskedSoftmax(sp.clone()), &[scores.clone(), seg]);
            let dp = t(&mut r, &scores.shape, dt);
            compare(
                &mut g,
                &format!("softmax_backward {dt}"),
                &Op::SoftmaxBackward,
                &[p[0].clone(), dp],
            );
        }
    }
}

#[test]
fn prefix_lm_and_mask_expressions_are_refused_with_an_error() {
    let mut g = cuda();
    let mut sp = spec(2, 2, 8, 4, true, None);
    sp.flex.expr = Some(ferrotune::ops::MaskExpr::parse("q_idx >= kv_idx").unwrap());
    let info = |shape: &[usize], dtype| TensorInfo {
        name: "x".into(),
        shape: shape.to_vec(),
        dtype,
        role: Role::Input,
    };
    let (q, seg) = (info(&[4, 16], DType::F32), info(&[4], DType::I32));
    let op = Op::Attention(sp.clone());
    let outs: Vec<TensorInfo> = op
        .infer(&[&q, &q, &q, &seg])
        .unwrap()
        .into_iter()
        .map(|(shape, dtype)| info(&shape, dtype))
        .collect();
    let e = g
        .prepare(&op, &[&q, &q, &q, &seg], &outs.iter().collect::<Vec<_>>())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the custom mask `q_idx >= kv_idx`") && e.contains("device: cpu"),
        "{e}"
    );
}

#[test]
fn attention_tensor_core_path() {
    let mut g = cuda();
    let mut r = rng(15);
    for hd in [64usize, 96, 128] {
        attention_case(&mut g, &mut r, DType::BF16, spec(4, 2, hd, 200, true, None), 2, true);
        attention_case(&mut g, &mut r, DType::BF16, spec(4, 4, hd, 130, false, None), 1, false);
    }
    attention_case(&mut g, &mut r, DType::BF16, spec(8, 2, 64, 1024, true, None), 1, true);
    attention_case(
        &mut g,
        &mut r,
        DType::BF16,
        spec(4, 2, 64, 333, true, Some(70)),
        2,
        true,
    );
    attention_case(
        &mut g,
        &mut r,
        DType::BF16,
        spec(2, 1, 128, 300, false, Some(100)),
        1,
        true,
    );
    attention_case(&mut g, &mut r, DType::F16, spec(4, 2, 128, 150, true, None), 2, true);
    attention_case(&mut g, &mut r, DType::BF16, spec(4, 2, 64, 512, true, None), 2, false);
}

/// Tile shapes as `FERROTUNE_FLASH_TILES` and the attention bench spell them.
#[test]
fn flash_tile_shapes_parse() {
    let t = FlashTiles::parse("1, 64,4,64,p").unwrap();
    assert_eq!(
        t,
        FlashTiles {
            mw: 1,
            bn: 64,
            nw: 4,
            bm: 64,
            pairs: true
        }
    );
    assert!(!FlashTiles::parse("2,64,8,64").unwrap().pairs);
    for bad in ["2,64,8", "2,64,8,64,q", "2,64,x,64", "2,64,8,64,p,1"] {
        let e = FlashTiles::parse(bad).unwrap_err().to_string();
        assert!(e.contains(bad) && e.contains("mw,bn,nw,bm"), "{e}");
    }
}

/// Every tile shape the backend can be configured with computes the same attention.
#[test]
fn attention_tensor_core_tile_shapes() {
    let mut r = rng(17);
    for tiles in FlashTiles::known() {
        let mut g = CudaBackend::with_options(CudaOptions {
            flash_tiles: Some(tiles),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("these tests need a CUDA device: {e}"));
        for hd in [64usize, 96, 128] {
            if !tiles.valid(hd) {
                continue;
            }
            eprintln!("tiles {tiles:?} head dim {hd}");
            attention_case(&mut g, &mut r, DType::BF16, spec(4, 2, hd, 200, true, None), 2, true);
            attention_case(
                &mut g,
                &mut r,
                DType::BF16,
                spec(2, 2, hd, 150, false, Some(40)),
                1,
                true,
            );
        }
    }
}

#[test]
fn f64_is_refused_with_an_error() {
    let mut g = cuda();
    let x = HostTensor::from_f64(&[3], &[1.0, 2.0, 3.0]);
    let info = info(0, &x);
    let err = g
        .prepare(&Op::Scale { factor: 2.0 }, &[&info], &[&info])
        .expect_err("f64 must be refused");
    assert!(err.to_string().contains("f64"), "{err}");
}

/// A sequence of launches captured as a CUDA graph on its second run and replayed after:
/// every run, with new input values, matches the CPU.
#[test]
fn cuda_graph_capture_and_replay() {
    let mut g = cuda();
    g.set_graphs(true);
    let mut r = rng(16);
    let (n, h) = (64usize, 256usize);
    let x_info = TensorInfo {
        name: "x".into(),
        shape: vec![n, h],
        dtype: DType::BF16,
        role: Role::Input,
    };
    let w_info = TensorInfo {
        name: "w".into(),
        shape: vec![h],
        dtype: DType::F32,
        role: Role::Parameter,
    };
    let y_info = TensorInfo {
        name: "y".into(),
        shape: vec![n, h],
        dtype: DType::BF16,
        role: Role::Activation,
    };
    let s_info = TensorInfo {
        name: "s".into(),
        shape: vec![1],
        dtype: DType::F32,
        role: Role::Activation,
    };
    let loc = |be: &mut CudaBackend, i: &TensorInfo| Loc {
        buffer: be.alloc(i.bytes() as u64).unwrap(),
        offset: 0,
        bytes: i.bytes() as u64,
    };
    let (xl, wl, yl, sl) = (
        loc(&mut g, &x_info),
        loc(&mut g, &w_info),
        loc(&mut g, &y_info),
        loc(&mut g, &s_info),
    );
    let norm = Op::RmsNorm { eps: 1e-6 };
    g.prepare(&norm, &[&x_info, &w_info], &[&y_info]).unwrap();
    g.prepare(&Op::SumSquares, &[&y_info], &[&s_info]).unwrap();
    let w = t(&mut r, &[h], DType::F32);
    g.write(wl, &w.data).unwrap();
    for step in 0..4 {
        let x = t(&mut r, &[n, h], DType::BF16);
        g.write(xl, &x.data).unwrap();
        g.write(yl, &vec![0xff; y_info.bytes()]).unwrap();
        let replayed = g.begin_program(7).unwrap();
        assert_eq!(replayed, step >= 2, "step {step}: replay from the third run on");
        if !replayed {
            g.launch(
                &norm,
                &[Arg { loc: xl, info: &x_info }, Arg { loc: wl, info: &w_info }],
                &[Arg { loc: yl, info: &y_info }],
            )
            .unwrap();
            g.launch(
                &Op::SumSquares,
                &[Arg { loc: yl, info: &y_info }],
                &[Arg { loc: sl, info: &s_info }],
            )
            .unwrap();
        }
        g.end_program(7).unwrap();
        g.flush().unwrap();
        let got = g.read(&[yl, sl]).unwrap();
        let y = run_op(&mut CpuBackend::new(), &norm, &[x, w.clone()]).remove(0);
        let s = run_op(&mut CpuBackend::new(), &Op::SumSquares, std::slice::from_ref(&y)).remove(0);
        let gy = HostTensor {
            shape: y.shape.clone(),
            dtype: DType::BF16,
            data: got[0].clone(),
        };
        let gs = HostTensor {
            shape: vec![1],
            dtype: DType::F32,
            data: got[1].clone(),
        };
        let ey = rel_err(&gy.to_f64(), &y.to_f64());
        let es = rel_err(&gs.to_f64(), &s.to_f64());
        assert!(ey < 1e-2 && es < 1e-2, "step {step}: errors {ey:.2e} {es:.2e}");
    }
}

/// An f32 weight read by bf16 products (LoRA's A beside bf16 activations) is read through
/// its persistent bf16 copy: it must follow the weight when the host writes it and when an
/// op of another program writes it in place, eagerly and in replayed CUDA graphs.
#[test]
fn weight_copies_follow_their_weights() {
    use ferrotune::exec::{Executor, ProgramSpec};
    use ferrotune::graph::{Graph, NodeId};
    let (n, k, m) = (48usize, 96usize, 40usize);
    let mut gr = Graph::new();
    let x = gr.input("x", &[n, k], DType::BF16);
    let x2 = gr.input("x2", &[n, k], DType::BF16);
    let w = gr.parameter("w", &[m, k], DType::F32);
    let d = gr.input("d", &[m, k], DType::F32);
    let y = gr.linear(x, w).unwrap();
    let y2 = gr.linear(x2, w).unwrap();
    gr.apply(Op::AccumulateGrad, &[w, d]).unwrap();
    let bump = NodeId(gr.nodes.len() as u32 - 1);
    let specs = [
        ProgramSpec::new("fwd", &[y, y2], &[]),
        ProgramSpec::new("bump", &[], &[bump]),
    ];
    let mut gpu = Executor::new(gr.clone(), Box::new(cuda()), &specs).unwrap();
    let mut r = rng(31);
    let mut wv = t(&mut r, &[m, k], DType::F32);
    gpu.set_tensor(w, &wv).unwrap();
    for step in 0..6 {
        if step == 3 {
            wv = t(&mut r, &[m, k], DType::F32);
            gpu.set_tensor(w, &wv).unwrap();
        }
        let (xv, x2v) = (t(&mut r, &[n, k], DType::BF16), t(&mut r, &[n, k], DType::BF16));
        let out = gpu.run(0, &[(x, &xv), (x2, &x2v)]).unwrap();
        for (got, xin) in out.iter().zip([&xv, &x2v]) {
            let want = run_op(
                &mut CpuBackend::new(),
                &Op::MatMul {
                    trans_a: false,
                    trans_b: true,
                },
                &[xin.clone(), wv.cast(DType::BF16)],
            )
            .remove(0);
            let e = rel_err(&got.to_f64(), &want.to_f64());
            assert!(
                e < 1e-2,
                "step {step}: relative error {e:.2e} against the current weight"
            );
        }
        let dv = t(&mut r, &[m, k], DType::F32);
        gpu.run(1, &[(d, &dv)]).unwrap();
        let sum: Vec<f64> = wv.to_f64().iter().zip(dv.to_f64()).map(|(a, b)| a + b).collect();
        wv = HostTensor::from_f64(&[m, k], &sum).cast(DType::F32);
    }
}

/// The flash kernels' segment-range table is computed once per program run and shared by
/// every attention of the run: two forwards and a backward over the same segment ids, a new
/// packing at every run (eager, captured, then replayed), each against the CPU.
#[test]
fn segment_tables_follow_each_new_packing() {
    use ferrotune::exec::{Executor, ProgramSpec};
    use ferrotune::graph::Graph;
    let (rows, s) = (2usize, spec(4, 2, 64, 256, true, None));
    let n = rows * s.seq_len;
    let dt = DType::BF16;
    let mut gr = Graph::new();
    let q = gr.input("q", &[n, 4 * 64], dt);
    let q2 = gr.input("q2", &[n, 4 * 64], dt);
    let k = gr.input("k", &[n, 2 * 64], dt);
    let v = gr.input("v", &[n, 2 * 64], dt);
    let seg = gr.input("seg", &[n], DType::I32);
    let d_o = gr.input("d_o", &[n, 4 * 64], dt);
    let (o1, lse1) = gr.attention(s.clone(), q, k, v, seg).unwrap();
    let (o2, _) = gr.attention(s.clone(), q2, k, v, seg).unwrap();
    let grads = gr
        .apply(Op::AttentionBackward(s.clone()), &[q, k, v, seg, o1, lse1, d_o])
        .unwrap();
    let outs = [o1, o2, grads[0], grads[1], grads[2]];
    let specs = [ProgramSpec::new("attn", &outs, &[])];
    let gpu_be = cuda();
    assert_eq!(gpu_be.attention_path(&s, dt), "tensor-core");
    let mut gpu = Executor::new(gr.clone(), Box::new(gpu_be), &specs).unwrap();
    let mut cpu = Executor::new(gr, Box::new(CpuBackend::new()), &specs).unwrap();
    let mut r = rng(33);
    for run in 0..4 {
        let vals = [
            t(&mut r, &[n, 4 * 64], dt),
            t(&mut r, &[n, 4 * 64], dt),
            t(&mut r, &[n, 2 * 64], dt),
            t(&mut r, &[n, 2 * 64], dt),
            HostTensor::from_i32(&[n], &segments(&mut r, rows, s.seq_len)),
            t(&mut r, &[n, 4 * 64], dt),
        ];
        let feed: Vec<_> = [q, q2, k, v, seg, d_o].into_iter().zip(vals.iter()).collect();
        let got = gpu.run(0, &feed).unwrap();
        let want = cpu.run(0, &feed).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = rel_err(&g.to_f64(), &w.to_f64());
            assert!(e < 1e-2, "run {run}, output {i}: relative error {e:.2e}");
        }
    }
}

/// Both factor gradients of a rank-r product: the tensor-core kernel (16-bit dy and u, f32 b
/// and accumulator, r 16 or 32, f a multiple of 8; rows and features that do not fill its
/// tiles) and the two products it stands for elsewhere.
#[test]
fn low_rank_grads_equal_the_two_products() {
    let mut g = cuda();
    let mut r = rng(35);
    let cases = [
        (DType::BF16, DType::F32, 200, 264, 16),
        (DType::BF16, DType::F32, 64, 128, 32),
        (DType::BF16, DType::F32, 1000, 1032, 16),
        // More blocks than SMs (blocks adding into the same rows of acc).
        (DType::BF16, DType::F32, 17000, 136, 16),
        (DType::BF16, DType::F32, 17000, 72, 32),
        (DType::F16, DType::F32, 77, 136, 16),
        (DType::F16, DType::F32, 50, 64, 32),
        // The products: a rank the kernel does not take, features not a multiple of 8,
        // f32 activations, a 16-bit b.
        (DType::BF16, DType::F32, 40, 96, 8),
        (DType::BF16, DType::F32, 40, 100, 16),
        (DType::F32, DType::F32, 30, 48, 16),
        (DType::BF16, DType::BF16, 33, 64, 16),
        (DType::BF16, DType::F32, 2100, 2048, 32),
    ];
    for (dt, bt, n, f, rank) in cases {
        let ins = [
            t(&mut r, &[n, f], dt),
            t(&mut r, &[n, rank], dt),
            t(&mut r, &[f, rank], bt),
            t(&mut r, &[f, rank], DType::F32),
        ];
        let what = format!("low_rank_grads {dt} (b {bt}) n {n} f {f} r {rank}");
        compare(&mut g, &what, &Op::LowRankGrads { alpha: -1.5 }, &ins);
    }
}

/// SwiGLU over LoRA-corrected gate and up (tensor-core corrections) against the CPU: ranks
/// that are and are not multiples of 16, rows past a 16-row tile, features past a 64-column
/// warp block, an odd feature count (no paired loads), f32 and 16-bit B factors; the cases
/// with features in groups of 8 and r <= 32 (f 256, 64, 264, 136, 512) run on the swiglu_lr2
/// kernels, the others on the general ones (the unit test of `launch` in
/// `backend/cuda/swiglu_low_rank.rs` holds which is which).
#[test]
fn swiglu_low_rank_forward_and_backward() {
    let mut g = cuda();
    let mut r = rng(34);
    let cases = [
        (DType::BF16, DType::F32, 64, 256, 16),
        (DType::BF16, DType::F32, 37, 130, 8),
        (DType::BF16, DType::F32, 50, 129, 24),
        (DType::BF16, DType::BF16, 33, 300, 40),
        (DType::F16, DType::F32, 20, 70, 16),
        (DType::F16, DType::F16, 17, 64, 5),
        // Features in groups of 8 and r <= 32 run on the swiglu_lr2 kernels: rows and
        // features that do not fill their 128 x 128 blocks, one and two k-steps.
        (DType::BF16, DType::F32, 200, 264, 32),
        (DType::BF16, DType::BF16, 130, 136, 20),
        (DType::F16, DType::F32, 129, 512, 16),
    ];
    for (dt, bt, n, f, rank) in cases {
        let (alpha_gate, alpha_up) = (2.0, -0.5);
        let base = |r: &mut ChaCha8Rng| t(r, &[n, f], dt);
        let (gate, up, dy) = (base(&mut r), base(&mut r), base(&mut r));
        let factors = [
            t(&mut r, &[n, rank], dt),
            t(&mut r, &[f, rank], bt),
            t(&mut r, &[n, rank], dt),
            t(&mut r, &[f, rank], bt),
        ];
        let what = format!("swiglu_low_rank {dt} (B {bt}) n {n} f {f} r {rank}");
        let fwd = [&[gate.clone(), up.clone()][..], &factors].concat();
        compare(&mut g, &what, &Op::SwigluLowRank { alpha_gate, alpha_up }, &fwd);
        let bwd = [&[gate, up, dy][..], &factors].concat();
        compare(
            &mut g,
            &format!("{what} backward"),
            &Op::SwigluLowRankBackward { alpha_gate, alpha_up },
            &bwd,
        );
    }
}
