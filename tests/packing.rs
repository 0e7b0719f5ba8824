//! Packing: a packed row (built by hand, and by the schedule and collate) gives each
//! document's logits and loss as if it ran alone, and no token attends across a document
//! boundary.

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

/// Logits and summed token loss of a collated batch, through the inputs a training step gets.
fn run_batch(model: &std::path::Path, b: &ferrotune::data::PackedBatch) -> (Run, usize) {
    let cfg = ferrotune::model::ModelConfig::from_file(&model.join("config.json")).unwrap();
    let store = ferrotune::model::WeightStore::open(&model.join("model.safetensors")).unwrap();
    let opts = BuildOptions {
        rows: b.rows,
        seq_len: b.seq_len,
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
    let inputs = ferrotune::train::batches::model_inputs(&m, b).unwrap();
    let out = ex.run(0, &inputs.feed()).unwrap();
    let run = Run {
        logits: out[0].to_f32(),
        loss_sum: out[1].to_f64()[0],
    };
    (run, inputs.label_tokens)
}

#[test]
fn a_collated_packed_row_gives_each_sample_its_own_logits_and_loss() {
    use ferrotune::data::{collate, BatchLayout, BatchSchedule, MicroBatch, ScheduleOptions};
    let dir = temp_dir("collate-packing");
    let model = write_tiny_model(&dir.join("model"), 10);
    let rows = [
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#,
        r#"{"messages": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris is the capital of France and its largest city."}]}"#,
        r#"{"messages": [{"role": "user", "content": "Count to four."}, {"role": "assistant", "content": "one two three four"}, {"role": "user", "content": "And back?"}, {"role": "assistant", "content": "four three two one"}]}"#,
        r#"{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]}"#,
    ];
    let data = dir.join("chat.jsonl");
    std::fs::write(&data, rows.join("\n")).unwrap();
    let yaml = format!(
        "base_model: {}\ndatasets:\n  - path: {}\n    type: chat_template\n    chat_template: jinja\n    chat_template_jinja: \"{}\"\n\
         sequence_len: 256\nmicro_batch_size: 1\nsample_packing: true\nlearning_rate: 0.01\noutput_dir: {}\n",
        model.display(),
        data.display(),
        common::CHATML.replace('"', "\\\""),
        dir.join("out").display()
    );
    let cfg = ferrotune::Config::from_yaml(&yaml, &[]).unwrap();
    let tok = ferrotune::data::Tokenizer::from_dir(&model).unwrap();
    let samples = ferrotune::train::run::prepare_samples(&cfg, &tok).unwrap().train;
    assert_eq!(samples.len(), 4);
    let lengths: Vec<usize> = samples.iter().map(|s| s.len()).collect();
    let mut distinct = lengths.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "samples of different lengths: {lengths:?}");

    // The schedule packs all four into one row of 256 tokens, with padding after them.
    let sched = BatchSchedule::new(&samples, ScheduleOptions::new(&cfg.data, 1)).unwrap();
    let plan = sched.epoch(0);
    assert_eq!(plan.steps.len(), 1);
    assert_eq!(plan.steps[0].micro_batches.len(), 1);
    let mb = &plan.steps[0].micro_batches[0];
    assert_eq!(mb.rows.len(), 1);
    let mut members = mb.rows[0].clone();
    members.sort();
    assert_eq!(members, vec![0, 1, 2, 3]);
    let pad = ferrotune::train::run::pad_id(&tok).unwrap();
    let packed_batch = collate(&samples, mb, sched.layout(), pad).unwrap();
    assert_eq!((packed_batch.rows, packed_batch.seq_len), (1, 256));
    let used: usize = lengths.iter().sum();
    assert_eq!(packed_batch.n_tokens, used);
    assert!(used < 256, "the row ends in padding");
    let (packed, packed_labels) = run_batch(&model, &packed_batch);

    let v = 32000;
    let mut offset = 0;
    let (mut sum_alone, mut labels_alone) = (0.0, 0);
    for &i in &mb.rows[0] {
        let n = samples[i].len();
        // The sample alone: a row of exactly its length, no padding.
        let alone_mb = MicroBatch { rows: vec![vec![i]] };
        let b = collate(&samples, &alone_mb, BatchLayout { rows: 1, seq_len: n }, pad).unwrap();
        let (alone, labels) = run_batch(&model, &b);
        assert_eq!(labels, samples[i].n_label_tokens());
        let got: Vec<f64> = packed.logits[offset * v..(offset + n) * v]
            .iter()
            .map(|&x| x as f64)
            .collect();
        let want: Vec<f64> = alone.logits.iter().map(|&x| x as f64).collect();
        let err = common::rel_err(&got, &want);
        assert!(err < 1e-5, "sample {i} at {offset}: relative logit error {err:e}");
        assert!(alone.loss_sum > 0.0);
        sum_alone += alone.loss_sum;
        labels_alone += labels;
        offset += n;
    }
    assert_eq!(packed_labels, labels_alone);
    assert!(
        (packed.loss_sum - sum_alone).abs() < 1e-5 * sum_alone,
        "packed {} vs alone {sum_alone}",
        packed.loss_sum
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
