//! The product-epilogue fusion pass (`graph::fuse`): a fused training step gives the loss,
//! gradient norm and updated weights of the graph as built, and the rewrites it promises
//! happen (LoRA's scale and add, gradient sums, gradient casts and accumulation).

mod common;
use common::{rand_tensor, rel_err, rng};
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::exec::select_nodes;
use ferrotune::exec::{Executor, ProgramSpec};
use ferrotune::graph::fuse::{matmul_epilogues, FuseOptions};
use ferrotune::graph::{Graph, Role, TensorId};
use ferrotune::model::llama::{build, shift_targets, BuildOptions, LoraOptions, LINEAR_MODULES as ALL_LINEAR};
use ferrotune::model::ModelConfig;
use ferrotune::ops::Op;
use ferrotune::train::{OptimizerOptions, TrainGraph};
use ferrotune::{DType, HostTensor};
use rand::RngExt;
use std::collections::{BTreeMap, HashSet};

fn tiny() -> ModelConfig {
    let json = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 37,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": false}"#;
    ModelConfig::parse(json, "test").unwrap()
}

fn options(lora: bool, dropout: f64, dt: DType) -> BuildOptions {
    BuildOptions {
        rows: 2,
        seq_len: 8,
        weight_dtype: dt,
        act_dtype: dt,
        lora: lora.then(|| LoraOptions {
            r: 4,
            alpha: 8.0,
            dropout,
            use_rslora: false,
            targets: ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
        }),
        train_base: !lora,
        modules_to_save: vec![],
        loss_rows: None,
    }
}

/// Per step: (loss, grad norm); and every trainable tensor after the last step.
type Run = (Vec<(f64, f64)>, Vec<Vec<f64>>);

/// Three optimizer steps of two micro-batches each, from random weights (LoRA B nonzero so
/// that A has a gradient), on the CPU; `fuse` picks the graph as built or the fused one.
fn train(lora: bool, dropout: f64, fuse: bool) -> (Run, BTreeMap<&'static str, usize>) {
    train_in(DType::F32, lora, dropout, fuse.then(FuseOptions::default))
}

/// [`train`] with weights and activations stored in `dt`, fused with these options if given.
fn train_in(dt: DType, lora: bool, dropout: f64, fuse: Option<FuseOptions>) -> (Run, BTreeMap<&'static str, usize>) {
    let cfg = tiny();
    let opt = OptimizerOptions {
        weight_decay: 0.01,
        ..OptimizerOptions::default()
    };
    let tg = TrainGraph::new(build(&cfg, &options(lora, dropout, dt)).unwrap(), &opt).unwrap();
    let specs = tg.programs();
    let mut ex = Executor::with_fusion(tg.model.graph.clone(), Box::new(CpuBackend::new()), &specs, fuse).unwrap();
    let train_spec = &specs[0];
    let mut ops = BTreeMap::new();
    for n in select_nodes(ex.graph(), train_spec).unwrap() {
        let name = match ex.graph().node(n).op {
            Op::RmsNormBackward { add: true, .. } => "rms_norm_backward adding",
            Op::RmsNormBackward { weight_grad: true, .. } => "rms_norm_backward with dw",
            ref op => op.name(),
        };
        *ops.entry(name).or_insert(0) += 1;
    }
    let mut r = rng(3);
    let m = &tg.model;
    for (_, t) in &m.weights {
        let info = ex.graph().info(*t).clone();
        let v = if info.name.contains("norm") {
            HostTensor::from_f32(&info.shape, &vec![1.0; info.numel()])
        } else {
            rand_tensor(&mut r, &info.shape, DType::F32)
        };
        ex.set_tensor(*t, &v.cast(info.dtype)).unwrap();
    }
    for p in &m.lora {
        for t in [p.a, p.b] {
            let info = ex.graph().info(t).clone();
            let v: Vec<f64> = rand_tensor(&mut r, &info.shape, DType::F64)
                .to_f64()
                .iter()
                .map(|x| 0.3 * x)
                .collect();
            ex.set_tensor(t, &HostTensor::from_f64(&info.shape, &v).cast(info.dtype))
                .unwrap();
        }
    }
    ex.set_tensor(
        m.inv_freq,
        &HostTensor::from_f32(&[cfg.head_dim / 2], &cfg.rope_inv_freq()),
    )
    .unwrap();
    let (rows, seq) = (2, 8);
    let n = rows * seq;
    let (train_p, opt_p) = (
        ex.program_index("train").unwrap(),
        ex.program_index("optimizer").unwrap(),
    );
    let mut steps = Vec::new();
    for step in 1..=3u64 {
        let mut batches = Vec::new();
        for _ in 0..2 {
            let ids: Vec<i32> = (0..n).map(|_| r.random_range(0..37)).collect();
            let seg = vec![1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2];
            let pos = vec![0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1];
            let targets = shift_targets(&ids, &seg, seq);
            batches.push((ids, seg, pos, targets));
        }
        let labels: usize = batches.iter().map(|b| b.3.iter().filter(|&&t| t != -100).count()).sum();
        let scale = HostTensor::from_f64(&[1], &[1.0 / labels as f64]).cast(ex.graph().dtype(tg.loss_scale));
        let mut loss = 0.0;
        for (k, (ids, seg, pos, tgt)) in batches.iter().enumerate() {
            let t = [
                HostTensor::from_i32(&[n], ids),
                HostTensor::from_i32(&[n], pos),
                HostTensor::from_i32(&[n], seg),
                HostTensor::from_i32(&[n], tgt),
            ];
            let mut feed = vec![
                (m.input_ids, &t[0]),
                (m.positions, &t[1]),
                (m.segments, &t[2]),
                (m.targets, &t[3]),
                (tg.loss_scale, &scale),
            ];
            let drop_t;
            if let Some((seed, p)) = m.dropout {
                drop_t = [
                    HostTensor::from_u32(&[1], &[step as u32 * 7 + k as u32]),
                    HostTensor::from_f32(&[1], &[dropout as f32]),
                ];
                feed.push((seed, &drop_t[0]));
                feed.push((p, &drop_t[1]));
            }
            loss += ex.run(train_p, &feed).unwrap()[0].to_f64()[0];
        }
        let hyper = HostTensor::from_f32(&[3], &TrainGraph::hyper_values(&opt, 1e-2, step));
        let norm = ex.run(opt_p, &[(tg.hyper, &hyper)]).unwrap()[0].to_f64()[0];
        steps.push((loss / labels as f64, norm));
    }
    let weights = ex
        .get_tensors(&m.trainable)
        .unwrap()
        .iter()
        .map(|t| t.to_f64())
        .collect();
    ((steps, weights), ops)
}

fn assert_same(what: &str, fused: &Run, plain: &Run) {
    assert_close(what, fused, plain, 1e-5);
}

fn assert_close(what: &str, fused: &Run, plain: &Run, tol: f64) {
    for (k, (f, p)) in fused.0.iter().zip(&plain.0).enumerate() {
        let (el, en) = ((f.0 - p.0).abs() / p.0.abs(), (f.1 - p.1).abs() / p.1.abs());
        assert!(
            el < tol && en < tol,
            "{what} step {k}: loss {} vs {}, grad norm {} vs {}",
            f.0,
            p.0,
            f.1,
            p.1
        );
    }
    for (k, (f, p)) in fused.1.iter().zip(&plain.1).enumerate() {
        let err = rel_err(f, p);
        assert!(err < tol, "{what}: trainable tensor {k}: relative error {err:.3e}");
    }
}

fn count(ops: &BTreeMap<&'static str, usize>, name: &str) -> usize {
    ops.get(name).copied().unwrap_or(0)
}

#[test]
fn lora_step_fused_equals_the_graph_as_built() {
    for dropout in [0.0, 0.1] {
        let (plain, plain_ops) = train(true, dropout, false);
        let (fused, ops) = train(true, dropout, true);
        assert_same(&format!("LoRA, dropout {dropout}"), &fused, &plain);
        // 2 layers x 7 projections: each LoRA output is the base product reading the rank-r one
        // as C, every A gradient is accumulated by its product, and every B gradient by the
        // op that also computes the gradient of x A^T (its accumulation node left merged).
        let loras = 2 * ALL_LINEAR.len();
        assert_eq!(count(&ops, "scale"), 0, "fused train program: {ops:?}");
        // Without dropout no add is left: the forward residual adds are taken by the rank-r
        // products (read as C by the base products), the backward gradient sums by products
        // and norms. (With dropout, the sums of a product and a dropout's gradient stay.)
        if dropout == 0.0 {
            assert_eq!(count(&ops, "add"), 0, "{ops:?}");
        }
        assert_eq!(count(&ops, "accumulate_grad"), 0, "{ops:?}");
        assert_eq!(count(&ops, "matmul_accumulate"), loras, "{ops:?}");
        assert_eq!(count(&ops, "low_rank_grads"), loras, "{ops:?}");
        assert_eq!(count(&ops, "merged"), loras, "{ops:?}");
        // Without that rewrite, both factor gradients are accumulated by products.
        let separate = FuseOptions {
            low_rank_grads: false,
            ..FuseOptions::default()
        };
        let (apart, apart_ops) = train_in(DType::F32, true, dropout, Some(separate));
        assert_same(
            &format!("LoRA, dropout {dropout}, separate factor gradients"),
            &apart,
            &plain,
        );
        assert_eq!(count(&apart_ops, "matmul_accumulate"), 2 * loras, "{apart_ops:?}");
        assert_eq!(count(&apart_ops, "low_rank_grads"), 0, "{apart_ops:?}");
        assert!(count(&ops, "matmul_fused") >= 2 * loras, "{ops:?}");
        assert!(count(&plain_ops, "scale") >= 2 * loras, "{plain_ops:?}");
        assert!(
            count(&ops, "add") < count(&plain_ops, "add"),
            "{ops:?} vs {plain_ops:?}"
        );
        // Frozen norm weights: no weight gradients; the residual stream's gradient sums at
        // the norms are added by the norms' backward: both norms of layer 1, the second of
        // layer 0 (nothing needs the gradient of the embedding output the first one reads).
        assert_eq!(count(&plain_ops, "rms_norm_backward with dw"), 0, "{plain_ops:?}");
        assert_eq!(count(&plain_ops, "rms_norm_backward adding"), 0, "{plain_ops:?}");
        assert_eq!(count(&ops, "rms_norm_backward adding"), 3, "{ops:?}");
        assert_eq!(count(&ops, "rms_norm_backward"), 1, "the final norm: {ops:?}");
        let nodes = |o: &BTreeMap<&str, usize>| o.values().sum::<usize>();
        assert!(nodes(&ops) < nodes(&plain_ops));
    }
}

/// In 16-bit storage, the SwiGLU of the gate and up LoRA outputs recomputes their rank-r
/// terms (forward and backward) instead of reading them. bf16 rounding moves this tiny
/// model's losses and gradient norms by percents, so both bf16 runs are held against the f32
/// run: the fused one is no further from it than the graph as built (within 1%).
#[test]
fn bf16_lora_swiglu_recomputes_the_rank_r_terms() {
    // The rewrite is opt-in.
    let opts = FuseOptions {
        low_rank_swiglu: true,
        ..FuseOptions::default()
    };
    let (plain, plain_ops) = train_in(DType::BF16, true, 0.0, None);
    let (fused, ops) = train_in(DType::BF16, true, 0.0, Some(opts));
    let (reference, f32_ops) = train(true, 0.0, true);
    assert_eq!(count(&ops, "swiglu_low_rank"), 2, "{ops:?}");
    assert_eq!(count(&ops, "swiglu_low_rank_backward"), 2, "{ops:?}");
    assert_eq!(count(&ops, "swiglu") + count(&ops, "swiglu_backward"), 0, "{ops:?}");
    assert_eq!(count(&plain_ops, "swiglu"), 2, "{plain_ops:?}");
    // f32 is not fused this way: per layer, its two rank-r products (the gate and up
    // terms) are the difference.
    let products = |o: &BTreeMap<&'static str, usize>| count(o, "matmul") + count(o, "matmul_fused");
    assert_eq!(products(&f32_ops) - products(&ops), 4, "{ops:?} vs {f32_ops:?}");
    for (k, ((f, p), r)) in fused.0.iter().zip(&plain.0).zip(&reference.0).enumerate() {
        for (what, fv, pv, rv) in [("loss", f.0, p.0, r.0), ("grad norm", f.1, p.1, r.1)] {
            let (ef, ep) = ((fv - rv).abs(), (pv - rv).abs());
            assert!(
                ef <= 1.5 * ep + 1e-2 * rv.abs(),
                "step {k} {what}: fused {fv}, as built {pv}, f32 {rv}"
            );
        }
    }
}

/// The RoPE backward of each layer's `dq` joins its attention backward: the train program
/// loses one rope per layer and gives the same losses, gradient norms and weights (with and
/// without LoRA; full fine-tuning trains the q projection through the same `dq`).
#[test]
fn roped_dq_joins_the_attention_backward() {
    let opts = FuseOptions {
        roped_dq: true,
        ..FuseOptions::default()
    };
    for lora in [true, false] {
        let (plain, plain_ops) = train_in(DType::F32, lora, 0.0, Some(FuseOptions::default()));
        let (fused, ops) = train_in(DType::F32, lora, 0.0, Some(opts));
        assert_eq!(count(&plain_ops, "attention_backward_rope"), 0, "{plain_ops:?}");
        assert_eq!(count(&ops, "attention_backward_rope"), 2, "{ops:?}");
        assert_eq!(count(&ops, "attention_backward"), 0, "{ops:?}");
        // Per layer: q and k forward, dq and dk backward.
        assert_eq!(count(&plain_ops, "rope"), 8, "{plain_ops:?}");
        assert_eq!(count(&ops, "rope"), 6, "{ops:?}");
        assert_same(&format!("roped dq, lora {lora}"), &fused, &plain);
    }
}

/// The cross-entropy and its backward become one op that writes the logits' gradient over
/// them: the same losses, gradient norms and weights, and (with a vocabulary large enough
/// for the logits to dominate the step) a transient arena smaller by about one logits tensor.
#[test]
fn cross_entropy_with_grad_overwrites_the_logits() {
    let opts = FuseOptions {
        cross_entropy_with_grad: true,
        ..FuseOptions::default()
    };
    for lora in [true, false] {
        let (plain, plain_ops) = train_in(DType::F32, lora, 0.0, Some(FuseOptions::default()));
        let (fused, ops) = train_in(DType::F32, lora, 0.0, Some(opts));
        assert_eq!(count(&plain_ops, "cross_entropy_backward"), 1, "{plain_ops:?}");
        assert_eq!(count(&ops, "cross_entropy_with_grad"), 1, "{ops:?}");
        assert_eq!(
            count(&ops, "cross_entropy") + count(&ops, "cross_entropy_backward"),
            0,
            "{ops:?}"
        );
        assert_same(&format!("cross-entropy with its gradient, lora {lora}"), &fused, &plain);
    }
    let json = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": true}"#;
    let cfg = ModelConfig::parse(json, "test").unwrap();
    let tg = TrainGraph::new(
        build(&cfg, &options(true, 0.0, DType::F32)).unwrap(),
        &OptimizerOptions::default(),
    )
    .unwrap();
    let specs = tg.programs();
    let arena = |fuse| {
        let ex =
            Executor::with_fusion(tg.model.graph.clone(), Box::new(CpuBackend::new()), &specs, Some(fuse)).unwrap();
        // The eval program keeps a forward of its own: it neither runs the fused op nor
        // needs the backward's seed.
        let eval = specs.iter().find(|s| s.name == "eval").unwrap();
        let nodes = select_nodes(ex.graph(), eval).unwrap();
        let g = ex.graph();
        assert!(nodes.iter().any(|&k| g.node(k).op.name() == "cross_entropy"));
        assert!(nodes.iter().all(|&k| g.node(k).op.name() != "cross_entropy_with_grad"));
        assert!(nodes.iter().all(|&k| !g.node(k).inputs.contains(&tg.loss_scale)));
        ex.plan().transient_bytes
    };
    let logits = (2 * 8 * 4096 * 4) as u64;
    let (before, after) = (arena(FuseOptions::default()), arena(opts));
    assert!(
        before >= after + logits * 9 / 10,
        "transient arena {before} B as built, {after} B fused; one logits tensor is {logits} B"
    );
}

/// The CPU reference of the fused SwiGLU equals SwiGLU of the explicitly summed terms, in
/// f64, forward and backward (rank 3, odd sizes).
#[test]
fn low_rank_swiglu_equals_swiglu_of_the_sums() {
    let (n, f, r) = (5usize, 7usize, 3usize);
    let (ag, au) = (0.75, -1.25);
    let mut g = Graph::new();
    let t = |g: &mut Graph, name: &str, s: &[usize]| g.input(name, s, DType::F64);
    let (gate, up, dy) = (
        t(&mut g, "G", &[n, f]),
        t(&mut g, "U", &[n, f]),
        t(&mut g, "dy", &[n, f]),
    );
    let (ug, bg, uu, bu) = (
        t(&mut g, "ug", &[n, r]),
        t(&mut g, "bg", &[f, r]),
        t(&mut g, "uu", &[n, r]),
        t(&mut g, "bu", &[f, r]),
    );
    let sum = |g: &mut Graph, base, u, b, a| {
        let d = g.matmul(u, b, false, true).unwrap();
        let d = g.scale(d, a).unwrap();
        g.add(base, d).unwrap()
    };
    let (gs, us) = (sum(&mut g, gate, ug, bg, ag), sum(&mut g, up, uu, bu, au));
    let y_ref = g.swiglu(gs, us).unwrap();
    let d_ref = g.apply(Op::SwigluBackward, &[gs, us, dy]).unwrap();
    let factors = [ug, bg, uu, bu];
    let lr = Op::SwigluLowRank {
        alpha_gate: ag,
        alpha_up: au,
    };
    let y = g.apply1(lr, &[&[gate, up][..], &factors].concat()).unwrap();
    let lrb = Op::SwigluLowRankBackward {
        alpha_gate: ag,
        alpha_up: au,
    };
    let d = g.apply(lrb, &[&[gate, up, dy][..], &factors].concat()).unwrap();
    let outs = [y_ref, d_ref[0], d_ref[1], y, d[0], d[1]];
    let spec = [ProgramSpec::new("out", &outs, &[])];
    let mut ex = Executor::with_fusion(g.clone(), Box::new(CpuBackend::new()), &spec, None).unwrap();
    let mut rr = rng(12);
    let inputs = [gate, up, dy, ug, bg, uu, bu];
    let vals: Vec<HostTensor> = inputs
        .iter()
        .map(|&x| rand_tensor(&mut rr, g.shape(x), DType::F64))
        .collect();
    let feed: Vec<_> = inputs.iter().copied().zip(vals.iter()).collect();
    let out = ex.run(0, &feed).unwrap();
    for k in 0..3 {
        let e = rel_err(&out[k + 3].to_f64(), &out[k].to_f64());
        assert!(e < 1e-12, "output {k}: relative error {e:.2e}");
    }
}

#[test]
fn full_fine_tune_step_fused_equals_the_graph_as_built() {
    let (plain, _) = train(false, 0.0, false);
    let (fused, ops) = train(false, 0.0, true);
    assert_same("full fine-tune", &fused, &plain);
    // Every projection weight (2 layers x 7) and the untied lm_head: gradient products
    // accumulated in place, some (where the input is narrower than the output and its
    // gradient is a product of its own) together with the input's gradient.
    let weights = 2 * ALL_LINEAR.len() + 1;
    let merged = count(&ops, "low_rank_grads");
    assert!(merged > 0, "{ops:?}");
    assert_eq!(count(&ops, "matmul_accumulate") + merged, weights, "{ops:?}");
    // Trained norm weights (2 layers x 2 and the final norm) keep their weight gradients.
    assert_eq!(count(&ops, "rms_norm_backward with dw"), 5, "{ops:?}");
}

/// A product whose operand is written in place before the add that reads the product must
/// not be moved past that write.
#[test]
fn products_are_not_moved_past_in_place_writes() {
    let mut g = Graph::new();
    let x = g.input("x", &[3, 4], DType::F32);
    let w = g.leaf("w", &[4, 5], DType::F32, Role::OptimizerState);
    let c = g.input("c", &[3, 5], DType::F32);
    let dw = g.input("dw", &[4, 5], DType::F32);
    let p = g.matmul(x, w, false, false).unwrap();
    g.apply(Op::AccumulateGrad, &[w, dw]).unwrap();
    let y = g.add(c, p).unwrap();
    let keep: HashSet<_> = [y].into_iter().collect();
    let mut fused = g.clone();
    let stats = matmul_epilogues(&mut fused, &keep, FuseOptions::default());
    assert_eq!(
        stats.added_products, 0,
        "the add read a product of w before w was updated"
    );
    // Without the write in between, the same add is fused.
    let mut g2 = Graph::new();
    let x = g2.input("x", &[3, 4], DType::F32);
    let w = g2.input("w", &[4, 5], DType::F32);
    let c = g2.input("c", &[3, 5], DType::F32);
    let p = g2.matmul(x, w, false, false).unwrap();
    let y2 = g2.add(c, p).unwrap();
    let stats = matmul_epilogues(&mut g2, &[y2].into_iter().collect(), FuseOptions::default());
    assert_eq!(stats.added_products, 1);
}

/// A tensor a program reads back is never fused away.
#[test]
fn program_outputs_are_kept() {
    let mut g = Graph::new();
    let x = g.input("x", &[3, 4], DType::F32);
    let w = g.input("w", &[5, 4], DType::F32);
    let c = g.input("c", &[3, 5], DType::F32);
    let p = g.linear(x, w).unwrap();
    let s = g.scale(p, 0.5).unwrap();
    let y = g.add(c, s).unwrap();
    let mut r = rng(5);
    let vals = [
        rand_tensor(&mut r, &[3, 4], DType::F32),
        rand_tensor(&mut r, &[5, 4], DType::F32),
        rand_tensor(&mut r, &[3, 5], DType::F32),
    ];
    let spec = [ProgramSpec::new("out", &[s, y], &[])];
    let mut ex = Executor::with_fusion(g, Box::new(CpuBackend::new()), &spec, Some(FuseOptions::default())).unwrap();
    let out = ex.run(0, &[(x, &vals[0]), (w, &vals[1]), (c, &vals[2])]).unwrap();
    let (xv, wv, cv) = (vals[0].to_f64(), vals[1].to_f64(), vals[2].to_f64());
    for i in 0..3 {
        for j in 0..5 {
            let dot: f64 = (0..4).map(|k| xv[i * 4 + k] * wv[j * 4 + k]).sum();
            let (sv, yv) = (out[0].to_f64()[i * 5 + j], out[1].to_f64()[i * 5 + j]);
            assert!((sv - 0.5 * dot).abs() < 1e-5, "s[{i},{j}] = {sv}, want {}", 0.5 * dot);
            assert!((yv - (cv[i * 5 + j] + 0.5 * dot)).abs() < 1e-5);
        }
    }
}

/// `x W` (`x [4, 64]`) and `0.5 u B` (`u [4, 2]`), as a LoRA output's two terms: the inputs,
/// then both terms.
fn lora_terms(g: &mut Graph) -> (TensorId, TensorId, TensorId, TensorId, TensorId, TensorId) {
    let x = g.input("x", &[4, 64], DType::F32);
    let w = g.input("w", &[64, 8], DType::F32);
    let u = g.input("u", &[4, 2], DType::F32);
    let b = g.input("b", &[2, 8], DType::F32);
    let base = g.matmul(x, w, false, false).unwrap();
    let low = g.matmul(u, b, false, false).unwrap();
    let low = g.scale(low, 0.5).unwrap();
    (x, w, u, b, base, low)
}

/// Of two products summed, the one with the longer inner dimension reads the other as C
/// (LoRA: the base product takes the rank-r product, which then only writes its output).
#[test]
fn the_longer_product_reads_the_shorter_as_c() {
    for swap in [false, true] {
        let mut g = Graph::new();
        let (x, w, _, _, base, low) = lora_terms(&mut g);
        let y = if swap {
            g.add(low, base).unwrap()
        } else {
            g.add(base, low).unwrap()
        };
        let keep: HashSet<_> = [y].into_iter().collect();
        let stats = matmul_epilogues(&mut g, &keep, FuseOptions::default());
        assert_eq!(stats.added_products, 1);
        let node = g.node(g.producer[y.idx()].unwrap());
        assert!(matches!(node.op, Op::MatMulFused { add: true, .. }), "{:?}", node.op);
        assert_eq!(&node.inputs[..2], &[x, w], "swap {swap}: {:?}", node.inputs);
        let c = node.inputs[2];
        let cn = g.node(g.producer[c.idx()].unwrap());
        assert_eq!(
            cn.op,
            Op::MatMulFused {
                trans_a: false,
                trans_b: false,
                alpha: 0.5,
                add: false
            }
        );
    }
}

/// `h + (x W + s u B)`: the rank-r product reads `h` as C and the base product reads that,
/// so the residual add costs no pass of its own.
#[test]
fn a_residual_add_is_taken_by_the_rank_r_product() {
    let mut g = Graph::new();
    let h = g.input("h", &[4, 8], DType::F32);
    let (x, w, u, b, base, low) = lora_terms(&mut g);
    let sum = g.add(base, low).unwrap();
    let y = g.add(h, sum).unwrap();
    let keep: HashSet<_> = [y].into_iter().collect();
    let mut fused = g.clone();
    let stats = matmul_epilogues(&mut fused, &keep, FuseOptions::default());
    assert_eq!((stats.added_products, stats.added_product_sums), (1, 1), "{stats:?}");
    let node = fused.node(fused.producer[y.idx()].unwrap());
    assert!(matches!(node.op, Op::MatMulFused { add: true, .. }), "{:?}", node.op);
    assert_eq!(&node.inputs[..2], &[x, w]);
    let low_node = fused.node(fused.producer[node.inputs[2].idx()].unwrap());
    assert_eq!(&low_node.inputs, &[u, b, h], "{:?}", low_node.op);
    // Same values as the graph as built.
    let mut r = rng(9);
    let vals: Vec<_> = [h, x, w, u, b]
        .iter()
        .map(|&t| rand_tensor(&mut r, g.shape(t), DType::F32))
        .collect();
    let feed: Vec<_> = [h, x, w, u, b].iter().copied().zip(vals.iter()).collect();
    let spec = [ProgramSpec::new("out", &[y], &[])];
    let mut outs = Vec::new();
    for fuse in [false, true] {
        let mut ex = Executor::with_fusion(
            g.clone(),
            Box::new(CpuBackend::new()),
            &spec,
            fuse.then(FuseOptions::default),
        )
        .unwrap();
        outs.push(ex.run(0, &feed).unwrap()[0].to_f64());
    }
    let (hv, xv, wv, uv, bv) = (
        vals[0].to_f64(),
        vals[1].to_f64(),
        vals[2].to_f64(),
        vals[3].to_f64(),
        vals[4].to_f64(),
    );
    for i in 0..4 {
        for j in 0..8 {
            let base: f64 = (0..64).map(|k| xv[i * 64 + k] * wv[k * 8 + j]).sum();
            let low: f64 = (0..2).map(|k| uv[i * 2 + k] * bv[k * 8 + j]).sum();
            let want = hv[i * 8 + j] + base + 0.5 * low;
            for out in &outs {
                assert!(
                    (out[i * 8 + j] - want).abs() < 1e-5,
                    "y[{i},{j}] = {}, want {want}",
                    out[i * 8 + j]
                );
            }
        }
    }
}
