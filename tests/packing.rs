//! Packing: a packed row gives each document's logits and loss as if it ran alone, and no
//! token attends across a document boundary.

mod common;
use common::{temp_dir, write_tiny_model};
use ferrotune::exec::ProgramSpec;
use ferrotune::model::llama::{build, BuildOptions};
use ferrotune::train::session::load_base_weights;
use ferrotune::{DType, HostTensor};

struct Run {
    logits: Vec<f32>,
    loss_sum: f64,
}

fn run(model: &std::path::Path, ids: &[i32], pos: &[i32], seg: &[i32], targets: &[i32]) -> Run {
    let cfg = ferrotune::model::ModelConfig::from_file(&model.join("config.json")).unwrap();
    let store = ferrotune::model::WeightStore::open(&model.join("model.safetensors")).unwrap();
    let n = ids.len();
    let opts = BuildOptions {
        rows: 1,
        seq_len: n,
        weight_dtype: DType::F32,
        act_dtype: DType::F32,
        lora: None,
        train_base: false,
        modules_to_save: vec![],
        loss_rows: None,
    };
    let m = build(&cfg, &opts).unwrap();
    let mut ex = common::cpu_executor(m.graph.clone(), &[ProgramSpec::new("f", &[m.logits, m.loss_sum], &[])]);
    load_base_weights(&mut ex, &m, &store).unwrap();
    let t = |v: &[i32]| HostTensor::from_i32(&[n], v);
    let (a, b, c, d) = (t(ids), t(pos), t(seg), t(targets));
    let out = ex
        .run(
            0,
            &[(m.input_ids, &a), (m.positions, &b), (m.segments, &c), (m.targets, &d)],
        )
        .unwrap();
    Run {
        logits: out[0].to_f32(),
        loss_sum: out[1].to_f64()[0],
    }
}

/// Next-token targets inside one document (the last token predicts nothing).
fn targets(doc: &[i32]) -> Vec<i32> {
    let mut t: Vec<i32> = doc[1..].to_vec();
    t.push(-100);
    t
}

#[test]
fn packed_rows_equal_documents_alone_and_never_cross_boundaries() {
    let dir = temp_dir("packing");
    let model = write_tiny_model(&dir.join("model"), 9);
    let v = 32000;
    let docs: Vec<Vec<i32>> = vec![
        (0..5).map(|i| 300 + 17 * i).collect(),
        (0..7).map(|i| 900 + 5 * i).collect(),
        (0..4).map(|i| 40 + 3 * i).collect(),
    ];
    let pack = |docs: &[Vec<i32>]| {
        let (mut ids, mut pos, mut seg, mut tg) = (vec![], vec![], vec![], vec![]);
        for (k, d) in docs.iter().enumerate() {
            ids.extend(d);
            pos.extend(0..d.len() as i32);
            seg.extend(std::iter::repeat_n(k as i32 + 1, d.len()));
            tg.extend(targets(d));
        }
        // Padding: its own segment, no loss.
        for _ in 0..3 {
            ids.push(0);
            pos.push(0);
            seg.push(docs.len() as i32 + 1);
            tg.push(-100);
        }
        (ids, pos, seg, tg)
    };
    let (ids, pos, seg, tg) = pack(&docs);
    let packed = run(&model, &ids, &pos, &seg, &tg);
    let mut offset = 0;
    let mut sum_alone = 0.0;
    for d in &docs {
        let n = d.len();
        let alone = run(&model, d, &(0..n as i32).collect::<Vec<_>>(), &vec![1; n], &targets(d));
        let got = &packed.logits[offset * v..(offset + n) * v];
        let a: Vec<f64> = got.iter().map(|&x| x as f64).collect();
        let b: Vec<f64> = alone.logits.iter().map(|&x| x as f64).collect();
        let err = common::rel_err(&a, &b);
        assert!(err < 1e-5, "document at {offset}: relative logit error {err:e}");
        sum_alone += alone.loss_sum;
        offset += n;
    }
    assert!(
        (packed.loss_sum - sum_alone).abs() < 1e-5 * sum_alone,
        "{} vs {sum_alone}",
        packed.loss_sum
    );

    // Changing the middle document leaves the others' logits bit-identical.
    let mut changed = docs.clone();
    changed[1] = (0..7).map(|i| 20000 + 11 * i).collect();
    let (ids2, pos2, seg2, tg2) = pack(&changed);
    let other = run(&model, &ids2, &pos2, &seg2, &tg2);
    let (a0, a2) = (5 * v, 12 * v);
    assert_eq!(packed.logits[..a0], other.logits[..a0], "document 1 saw document 2");
    assert_eq!(
        packed.logits[a2..a2 + 4 * v],
        other.logits[a2..a2 + 4 * v],
        "document 3 saw document 2"
    );
    assert_ne!(packed.logits[a0..a2], other.logits[a0..a2]);
    std::fs::remove_dir_all(&dir).unwrap();
}
