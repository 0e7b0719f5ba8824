//! The whole Llama-family graph: gradients of a tiny model against finite differences in
//! f64, and the memory plan of a training step.

mod common;
use common::{cpu_executor, rand_tensor, rel_err, rng};
use ferrotune::exec::ProgramSpec;
use ferrotune::graph::{self, Role};
use ferrotune::model::llama::{build, shift_targets, BuildOptions, LoraOptions};
use ferrotune::model::ModelConfig;
use ferrotune::train::{OptimizerOptions, TrainGraph};
use ferrotune::{DType, HostTensor};
use rand::RngExt;

fn tiny(arch: &str, layers: usize, extra: &str) -> ModelConfig {
    let json = format!(
        r#"{{"architectures": ["{arch}"], "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": {layers},
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 23, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": true {extra}}}"#
    );
    ModelConfig::parse(&json, "test").unwrap()
}

fn lora(targets: &[&str], dropout: f64) -> LoraOptions {
    LoraOptions {
        r: 2,
        alpha: 4.0,
        dropout,
        use_rslora: false,
        targets: targets.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn whole_model_gradients_match_finite_differences() {
    for (arch, extra) in [
        ("LlamaForCausalLM", ""),
        (
            "Qwen2ForCausalLM",
            r#", "use_sliding_window": true, "sliding_window": 3, "max_window_layers": 1"#,
        ),
        ("MistralForCausalLM", r#", "sliding_window": 4"#),
    ] {
        let cfg = tiny(arch, 2, extra);
        let (rows, seq) = (2, 6);
        let opts = BuildOptions {
            rows,
            seq_len: seq,
            weight_dtype: DType::F64,
            act_dtype: DType::F64,
            lora: Some(lora(&["q_proj", "v_proj", "down_proj"], 0.0)),
            train_base: true,
            modules_to_save: vec![],
            loss_rows: None,
        };
        let mut m = build(&cfg, &opts).unwrap();
        let seed = m.graph.input("seed", &[1], DType::F64);
        let trainable = m.trainable.clone();
        let grads = graph::backward(&mut m.graph, m.loss_sum, seed, &trainable).unwrap();
        let gids: Vec<_> = trainable.iter().map(|t| grads[t]).collect();
        let (loss, lora_pairs) = (m.loss_sum, m.lora.clone());
        let (ids_t, pos_t, seg_t, tgt_t, inv_t) = (m.input_ids, m.positions, m.segments, m.targets, m.inv_freq);
        let names: Vec<String> = trainable.iter().map(|&t| m.graph.info(t).name.clone()).collect();
        let mut ex = cpu_executor(
            m.graph,
            &[
                ProgramSpec::new("loss", &[loss], &[]),
                ProgramSpec::new("grads", &gids, &[]),
            ],
        );
        let mut r = rng(11);
        let mut values = Vec::new();
        for &t in &trainable {
            let info = ex.graph().info(t).clone();
            let mut v = rand_tensor(&mut r, &info.shape, DType::F64).to_f64();
            v.iter_mut().for_each(|x| *x *= 0.5);
            let v = HostTensor::from_f64(&info.shape, &v);
            ex.set_tensor(t, &v).unwrap();
            values.push(v);
        }
        ex.set_tensor(inv_t, &HostTensor::from_f32(&[cfg.head_dim / 2], &cfg.rope_inv_freq()))
            .unwrap();
        // Row 0 packs two documents; row 1 is one document followed by padding.
        let ids: Vec<i32> = (0..rows * seq).map(|_| r.random_range(0..23)).collect();
        let seg = vec![1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 2, 2];
        let pos = vec![0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1];
        let labels: Vec<i32> = ids
            .iter()
            .enumerate()
            .map(|(i, &x)| if i >= 10 { -100 } else { x })
            .collect();
        let targets = shift_targets(&labels, &seg, seq);
        let n = rows * seq;
        let (ids, pos, segs, tg) = (
            HostTensor::from_i32(&[n], &ids),
            HostTensor::from_i32(&[n], &pos),
            HostTensor::from_i32(&[n], &seg),
            HostTensor::from_i32(&[n], &targets),
        );
        let one = HostTensor::from_f64(&[1], &[1.0]);
        let feed = [(ids_t, &ids), (pos_t, &pos), (seg_t, &segs), (tgt_t, &tg), (seed, &one)];
        let analytic = ex.run(1, &feed).unwrap();
        assert_eq!(lora_pairs.len(), 6);
        let h = 1.0 / 65536.0;
        for (k, &t) in trainable.iter().enumerate() {
            let base = values[k].to_f64();
            let a = analytic[k].to_f64();
            let picks: Vec<usize> = (0..6.min(base.len())).map(|_| r.random_range(0..base.len())).collect();
            let (mut an, mut fd) = (Vec::new(), Vec::new());
            for &e in &picks {
                let mut at = |d: f64| {
                    let mut v = base.clone();
                    v[e] += d;
                    ex.set_tensor(t, &HostTensor::from_f64(&values[k].shape, &v)).unwrap();
                    ex.run(0, &feed).unwrap()[0].to_f64()[0]
                };
                fd.push((at(h) - at(-h)) / (2.0 * h));
                an.push(a[e]);
            }
            ex.set_tensor(t, &values[k]).unwrap();
            let err = rel_err(&an, &fd);
            assert!(err < 1e-6, "{arch} {}: relative error {err:.3e}", names[k]);
        }
    }
}

#[test]
fn memory_plan_is_exact_and_liveness_reuses_memory() {
    let cfg = tiny("LlamaForCausalLM", 4, "");
    let opts = BuildOptions {
        rows: 2,
        seq_len: 16,
        weight_dtype: DType::F32,
        act_dtype: DType::F32,
        lora: Some(lora(
            &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            0.05,
        )),
        train_base: false,
        modules_to_save: vec![],
        loss_rows: None,
    };
    let tg = TrainGraph::new(build(&cfg, &opts).unwrap(), &OptimizerOptions::default()).unwrap();
    let specs = tg.programs();
    let g = &tg.model.graph;
    let all_transient: u64 = g
        .tensors
        .iter()
        .filter(|t| !t.role.is_persistent())
        .map(|t| t.bytes() as u64)
        .sum();
    let ex = cpu_executor(tg.model.graph.clone(), &specs);
    let plan = ex.plan();
    assert_eq!(plan.total_bytes, ex.allocated_bytes(), "plan vs allocation");
    let train = &plan.programs[0];
    assert!(
        (train.transient_peak as f64) < 0.5 * train.transient_sum as f64,
        "peak {} vs sum {}",
        train.transient_peak,
        train.transient_sum
    );
    assert!(plan.transient_bytes < all_transient);
    // The persistent breakdown counts every tensor of each role once, byte for byte, and
    // the persistent arena holds them with at most one alignment gap (< 256 B) each.
    let bytes_of = |role: Role| -> (u64, u64) {
        let ts = g.with_role(role);
        (ts.iter().map(|&t| g.info(t).bytes() as u64).sum(), ts.len() as u64)
    };
    let (frozen, n_frozen) = bytes_of(Role::Frozen);
    let (params, n_params) = bytes_of(Role::Parameter);
    let (state, n_state) = bytes_of(Role::OptimizerState);
    assert_eq!(plan.persistent.frozen_weights, frozen);
    assert_eq!(plan.persistent.trainable_parameters, params);
    assert_eq!(plan.persistent.optimizer_state, state);
    let p = &plan.persistent;
    let sum = p.frozen_weights + p.trainable_parameters + p.optimizer_state + p.constants;
    let n = n_frozen + n_params + n_state;
    assert!(
        plan.persistent_bytes >= sum && plan.persistent_bytes < sum + 256 * (n + 64),
        "{plan:#?}"
    );
    assert_eq!(plan.total_bytes, plan.persistent_bytes + plan.transient_bytes);
    eprintln!("plan: {plan:#?}");
}
