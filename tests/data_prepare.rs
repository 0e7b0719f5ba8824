//! Dataset preparation end to end: reading files and folders, filtering, splitting,
//! shuffling, caching, and the errors for bad input.

use ferrotune::data::{
    prepare, DataOptions, DatasetSpec, DatasetType, ExcessLengthStrategy, Sample, Tokenizer, IGNORE_INDEX,
};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        Tokenizer::from_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers/smollm2"))
            .unwrap()
    })
}

fn chat_line(q: &str, a: &str) -> String {
    json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn chat_spec(path: &Path) -> DatasetSpec {
    DatasetSpec::new(path.to_str().unwrap(), DatasetType::ChatTemplate)
}

fn addition_lines(n: usize) -> String {
    (0..n)
        .map(|i| chat_line(&format!("What is {i} + {}?", 2 * i), &(3 * i).to_string()) + "\n")
        .collect()
}

#[test]
fn reads_tokenizes_splits_and_shuffles() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "train.jsonl", &addition_lines(40));
    let opts = DataOptions {
        val_set_size: 0.25,
        sequence_len: 64,
        ..Default::default()
    };
    let data = prepare(&[chat_spec(&path)], &opts, tokenizer()).unwrap();
    assert_eq!((data.train.len(), data.eval.len()), (30, 10));
    let s = &data.stats;
    assert_eq!(
        (s.rows, s.samples, s.train_samples, s.eval_samples, s.dropped),
        (40, 40, 30, 10, 0)
    );
    let all: Vec<&Sample> = data.train.iter().chain(&data.eval).collect();
    assert_eq!(s.tokens, all.iter().map(|x| x.len()).sum::<usize>());
    assert_eq!(s.label_tokens, all.iter().map(|x| x.n_label_tokens()).sum::<usize>());
    assert!(!s.from_cache);
    // Deterministic for a seed; another seed gives another split and order.
    assert_eq!(prepare(&[chat_spec(&path)], &opts, tokenizer()).unwrap(), data);
    let other = prepare(
        &[chat_spec(&path)],
        &DataOptions {
            seed: 1,
            ..opts.clone()
        },
        tokenizer(),
    )
    .unwrap();
    assert_ne!(other.eval, data.eval);
    // Without shuffling and eval the samples stay in file order.
    let plain = prepare(
        &[chat_spec(&path)],
        &DataOptions {
            shuffle: false,
            ..Default::default()
        },
        tokenizer(),
    )
    .unwrap();
    let first = tokenizer().decode(&plain.train[0].input_ids, false).unwrap();
    assert!(first.contains("What is 0 + 0?"), "{first}");
    let last = tokenizer().decode(&plain.train[39].input_ids, false).unwrap();
    assert!(last.contains("What is 39 + 78?"), "{last}");
}

#[test]
fn folders_json_arrays_and_several_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("chats");
    std::fs::create_dir(&folder).unwrap();
    write(&folder, "a.jsonl", &addition_lines(3));
    let array: Vec<serde_json::Value> = (0..2)
        .map(|i| serde_json::from_str(&chat_line(&format!("q{i}"), "a")).unwrap())
        .collect();
    write(&folder, "b.json", &serde_json::to_string(&array).unwrap());
    write(&folder, "notes.txt", "ignored");
    let alpaca = write(
        dir.path(),
        "alpaca.json",
        r#"[{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Add", "input": "1 2", "output": "3"}]"#,
    );
    let specs = [
        chat_spec(&folder),
        DatasetSpec::new(alpaca.to_str().unwrap(), DatasetType::Alpaca),
    ];
    let data = prepare(
        &specs,
        &DataOptions {
            shuffle: false,
            ..Default::default()
        },
        tokenizer(),
    )
    .unwrap();
    assert_eq!(data.stats.rows, 7);
    assert_eq!(data.train.len(), 7);
    let text = tokenizer().decode(&data.train[6].input_ids, false).unwrap();
    assert!(
        text.starts_with("Below is an instruction") && text.ends_with("3<|im_end|>"),
        "{text}"
    );
}

#[test]
fn excess_length_strategies() {
    let dir = tempfile::tempdir().unwrap();
    let long = "word ".repeat(100);
    let text = format!("{}\n{}\n", chat_line("short", "ok"), chat_line(&long, "ok"));
    let path = write(dir.path(), "d.jsonl", &text);
    let base = DataOptions {
        sequence_len: 48,
        shuffle: false,
        ..Default::default()
    };

    let dropped = prepare(&[chat_spec(&path)], &base, tokenizer()).unwrap();
    assert_eq!(
        (dropped.train.len(), dropped.stats.dropped_long, dropped.stats.dropped),
        (1, 1, 1)
    );

    let opts = DataOptions {
        excess_length_strategy: ExcessLengthStrategy::Truncate,
        ..base.clone()
    };
    let truncated = prepare(&[chat_spec(&path)], &opts, tokenizer());
    // Truncating the long row cuts off its answer, so it has nothing left to train on.
    let truncated = truncated.unwrap();
    assert_eq!(truncated.stats.truncated, 1);
    assert_eq!(truncated.stats.dropped_no_labels, 1);
    assert_eq!(truncated.train.len(), 1);

    let opts = DataOptions {
        excess_length_strategy: ExcessLengthStrategy::Raise,
        ..base
    };
    let err = prepare(&[chat_spec(&path)], &opts, tokenizer())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("d.jsonl:2") && err.contains("more than sequence_len 48"),
        "{err}"
    );
}

#[test]
fn completion_text_is_split_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let text = "one two three four five six seven eight nine ten ".repeat(20);
    let path = write(dir.path(), "c.jsonl", &(json!({"text": text}).to_string() + "\n"));
    let opts = DataOptions {
        sequence_len: 32,
        shuffle: false,
        ..Default::default()
    };
    let data = prepare(
        &[DatasetSpec::new(path.to_str().unwrap(), DatasetType::Completion)],
        &opts,
        tokenizer(),
    )
    .unwrap();
    let n_ids = tokenizer().encode(&text, true).unwrap().len() + 1; // + EOS
    assert_eq!(data.train.len(), n_ids.div_ceil(32));
    assert_eq!(data.stats.split_extra, data.train.len() - 1);
    let joined: Vec<u32> = data.train.iter().flat_map(|s| s.input_ids.clone()).collect();
    assert_eq!(&joined[..n_ids - 1], &tokenizer().encode(&text, true).unwrap()[..]);
    assert!(data.train.iter().all(|s| s.len() <= 32));
}

#[test]
fn malformed_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n{}\n{{\"messages\": [}}\n",
        chat_line("a", "b"),
        chat_line("c", "d")
    );
    let path = write(dir.path(), "broken.jsonl", &text);
    let err = prepare(&[chat_spec(&path)], &DataOptions::default(), tokenizer())
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.jsonl:3: malformed JSON"), "{err}");
}

#[test]
fn missing_field_names_file_line_field_type_and_fields() {
    let dir = tempfile::tempdir().unwrap();
    let text = "{\"instruction\": \"x\", \"output\": \"y\"}\n{\"question\": \"x\", \"answer\": \"y\"}\n";
    let path = write(dir.path(), "alpaca.jsonl", text);
    let spec = DatasetSpec::new(path.to_str().unwrap(), DatasetType::Alpaca);
    let err = prepare(&[spec], &DataOptions::default(), tokenizer())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("alpaca.jsonl:2: missing field `instruction`, which dataset type alpaca needs"),
        "{err}"
    );
    assert!(err.contains("`question`, `answer`"), "{err}");
}

#[test]
fn empty_results_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Only user turns: nothing to train on.
    let line = json!({"messages": [{"role": "user", "content": "hello"}]}).to_string();
    let path = write(dir.path(), "users.jsonl", &format!("{line}\n{line}\n"));
    let err = prepare(&[chat_spec(&path)], &DataOptions::default(), tokenizer())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no samples left to train on: 2 rows read"), "{err}");
    assert!(err.contains("2 with no trained tokens"), "{err}");
    let empty = write(dir.path(), "empty.jsonl", "\n\n");
    let err = prepare(&[chat_spec(&empty)], &DataOptions::default(), tokenizer())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no samples left to train on: 0 rows read"), "{err}");
    let err = prepare(
        &[chat_spec(&dir.path().join("nope.jsonl"))],
        &DataOptions::default(),
        tokenizer(),
    );
    assert!(err
        .unwrap_err()
        .to_string()
        .contains("nope.jsonl: no such file or folder"));
    let err = prepare(&[], &DataOptions::default(), tokenizer())
        .unwrap_err()
        .to_string();
    assert!(err.contains("datasets: empty"), "{err}");
}

#[test]
fn a_raising_template_names_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n{}\n",
        chat_line("a", "b"),
        json!({"messages": [{"role": "tool", "content": "x"}]})
    );
    let path = write(dir.path(), "t.jsonl", &text);
    let mut spec = chat_spec(&path);
    spec.chat_template = Some(ferrotune::data::ChatTemplateChoice::Jinja);
    spec.chat_template_jinja = Some(
        "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
         {{ raise_exception('unsupported role ' + m.role) }}{% endif %}{{ m.content }}{% endfor %}"
            .into(),
    );
    let err = prepare(&[spec], &DataOptions::default(), tokenizer())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("t.jsonl:2: chat template raised an exception: unsupported role tool"),
        "{err}"
    );
}

#[test]
fn invalid_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.jsonl", &addition_lines(2));
    let mut spec = chat_spec(&path);
    spec.field = Some("text".into());
    let err = prepare(&[chat_spec(&path), spec], &DataOptions::default(), tokenizer())
        .unwrap_err()
        .to_string();
    assert!(err.contains("datasets[1].field: only used by type completion"), "{err}");
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn prepared_dataset_cache_is_keyed_and_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("prepared");
    let path = write(dir.path(), "d.jsonl", &addition_lines(12));
    let opts = DataOptions {
        val_set_size: 0.25,
        dataset_prepared_path: Some(cache.clone()),
        ..Default::default()
    };
    let first = prepare(&[chat_spec(&path)], &opts, tokenizer()).unwrap();
    assert!(!first.stats.from_cache);
    let names = dir_names(&cache);
    assert_eq!(names.len(), 1, "one file, no temporary left behind: {names:?}");
    assert!(names[0].starts_with("ferrotune-data-") && names[0].ends_with(".bin"));

    let second = prepare(&[chat_spec(&path)], &opts, tokenizer()).unwrap();
    assert!(second.stats.from_cache);
    assert_eq!(
        (second.train.clone(), second.eval.clone()),
        (first.train.clone(), first.eval.clone())
    );
    assert_eq!(StatsBesidesCacheFlag::of(&second), StatsBesidesCacheFlag::of(&first));

    // Anything that changes the samples changes the key: options, file bytes, tokenizer.
    let opts2 = DataOptions {
        sequence_len: 100,
        ..opts.clone()
    };
    assert!(
        !prepare(&[chat_spec(&path)], &opts2, tokenizer())
            .unwrap()
            .stats
            .from_cache
    );
    write(dir.path(), "d.jsonl", &addition_lines(13));
    assert!(
        !prepare(&[chat_spec(&path)], &opts, tokenizer())
            .unwrap()
            .stats
            .from_cache
    );
    let mut tok = tokenizer().clone();
    tok.set_special_tokens(&ferrotune::data::SpecialTokens {
        pad_token: Some("<|endoftext|>".into()),
        ..Default::default()
    })
    .unwrap();
    assert!(!prepare(&[chat_spec(&path)], &opts, &tok).unwrap().stats.from_cache);
    assert_eq!(dir_names(&cache).len(), 4);
    // Micro-batch and packing keys do not affect the prepared samples.
    let opts3 = DataOptions {
        micro_batch_size: 4,
        sample_packing: true,
        ..opts.clone()
    };
    assert!(
        prepare(&[chat_spec(&path)], &opts3, tokenizer())
            .unwrap()
            .stats
            .from_cache
    );

    // A damaged cache file is reported, not silently used.
    for name in dir_names(&cache) {
        let p = cache.join(&name);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&p, bytes).unwrap();
    }
    let err = prepare(&[chat_spec(&path)], &opts, tokenizer())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("corrupt prepared-dataset cache") && err.contains("delete the file"),
        "{err}"
    );
}

/// The stats that must survive the cache (everything but `from_cache`).
#[derive(Debug, PartialEq)]
struct StatsBesidesCacheFlag(ferrotune::data::DataStats);
impl StatsBesidesCacheFlag {
    fn of(d: &ferrotune::data::PreparedData) -> Self {
        let mut s = d.stats.clone();
        s.from_cache = false;
        StatsBesidesCacheFlag(s)
    }
}

#[test]
fn labels_only_on_assistant_answers() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.jsonl", &(chat_line("What is 2 + 3?", "5") + "\n"));
    let data = prepare(&[chat_spec(&path)], &DataOptions::default(), tokenizer()).unwrap();
    let s = &data.train[0];
    let trained: Vec<u32> = s
        .labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    assert_eq!(tokenizer().decode(&trained, false).unwrap(), "5<|im_end|>");
}
