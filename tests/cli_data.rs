//! The data and model-file subcommands run through the binary: `preprocess`, `convert gguf`,
//! `data arithmetic` and `data wordnet`, each checked against the library doing the same
//! work, and each given a file that is not there.

mod common;
use common::temp_dir;
use ferrotune::data::generate::arithmetic::{write_addition, AdditionOptions};
use ferrotune::data::generate::wordnet::{write_wordnet, WordnetOptions};
use ferrotune::data::{BatchSchedule, ScheduleOptions, Tokenizer, IGNORE_INDEX};
use ferrotune::model::{convert_gguf, ModelConfig, WeightStore};
use ferrotune::DType;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn cli(args: &[&str]) -> Out {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .output()
        .unwrap();
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(args: &[&str]) -> Out {
    let o = cli(args);
    assert_eq!(o.code, Some(0), "ferrotune {args:?} failed: {}", o.stderr);
    o
}

/// A run that must fail with the binary's error exit code (1) and a message naming `what`.
fn fails_naming(args: &[&str], what: &str) -> String {
    let o = cli(args);
    assert_eq!(o.code, Some(1), "ferrotune {args:?}: {}{}", o.stdout, o.stderr);
    assert!(
        o.stderr.starts_with("error: ") && o.stderr.contains(what),
        "ferrotune {args:?}: the message should name {what}: {}",
        o.stderr
    );
    o.stderr
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn convert_gguf_writes_the_library_conversion() {
    let dir = temp_dir("cli-convert");
    let gguf = fixture("model/tiny_llama.gguf");
    for (flag, dtype) in [("f32", DType::F32), ("bf16", DType::BF16)] {
        let by_cli = dir.join(format!("cli-{flag}"));
        let by_lib = dir.join(format!("lib-{flag}"));
        let o = ok(&["convert", "gguf", s(&gguf), s(&by_cli), "--dtype", flag]);
        assert!(
            o.stderr.contains(&format!("wrote {}", by_cli.display())),
            "{}",
            o.stderr
        );
        convert_gguf(&gguf, &by_lib, dtype).unwrap();
        let names = files_in(&by_cli);
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(names.contains(&f.to_string()), "{f} missing: {names:?}");
        }
        assert_eq!(names, files_in(&by_lib));
        // Everything loads back and equals the library's output.
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(json(&by_cli.join(f)), json(&by_lib.join(f)), "{f}");
        }
        let cfg = ModelConfig::from_file(&by_cli.join("config.json")).unwrap();
        assert_eq!(cfg, ModelConfig::from_file(&by_lib.join("config.json")).unwrap());
        assert_eq!((cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size), (64, 2, 267));
        let (a, b) = (WeightStore::open(&by_cli).unwrap(), WeightStore::open(&by_lib).unwrap());
        assert_eq!(a.names(), b.names());
        for n in b.names() {
            assert_eq!(a.dtype(n).unwrap(), dtype, "{n}");
            assert_eq!(a.shape(n).unwrap(), b.shape(n).unwrap(), "{n}");
            assert_eq!(a.get_raw(n).unwrap().data, b.get_raw(n).unwrap().data, "{n}");
        }
        let tok = Tokenizer::from_dir(&by_cli).unwrap();
        let ids = tok.encode("<|im_start|>user\nthe the<|im_end|>", false).unwrap();
        assert_eq!(
            ids,
            Tokenizer::from_dir(&by_lib)
                .unwrap()
                .encode("<|im_start|>user\nthe the<|im_end|>", false)
                .unwrap()
        );
        assert_eq!(ids[0], tok.token_to_id("<|im_start|>").unwrap());
    }

    let missing = dir.join("no-such.gguf");
    let out = dir.join("never");
    fails_naming(&["convert", "gguf", s(&missing), s(&out)], s(&missing));
    assert!(!out.exists());
    let err = fails_naming(&["convert", "gguf", s(&gguf), s(&out), "--dtype", "q8"], "--dtype q8");
    assert!(err.contains("expected f32, bf16 or f16"), "{err}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The (a, b) pairs of an addition jsonl file, checking each reference answer.
fn pairs(path: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let q = v["messages"][0]["content"].as_str().unwrap();
            let (a, b) = q
                .strip_prefix("What is ")
                .and_then(|q| q.strip_suffix('?'))
                .and_then(|q| q.split_once(" + "))
                .unwrap_or_else(|| panic!("{q}"));
            let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
            assert_eq!(v["messages"][1]["content"], (a + b).to_string());
            (a, b)
        })
        .collect()
}

#[test]
fn data_arithmetic_writes_disjoint_train_and_eval_files() {
    let dir = temp_dir("cli-arith");
    let out = dir.join("cli");
    let o = ok(&[
        "data",
        "arithmetic",
        "--digits",
        "2",
        "--train",
        "60",
        "--eval",
        "15",
        "--seed",
        "7",
        "--out",
        s(&out),
    ]);
    let (train, eval) = (out.join("train.jsonl"), out.join("eval.jsonl"));
    assert_eq!(o.stdout, format!("{}\n{}\n", train.display(), eval.display()));
    let (tr, ev) = (pairs(&train), pairs(&eval));
    assert_eq!((tr.len(), ev.len()), (60, 15));
    let trs: HashSet<_> = tr.iter().collect();
    let evs: HashSet<_> = ev.iter().collect();
    assert_eq!((trs.len(), evs.len()), (60, 15), "no pair repeats");
    assert!(trs.is_disjoint(&evs), "train and eval share a pair");
    assert!(tr
        .iter()
        .chain(&ev)
        .all(|&(a, b)| (10..100).contains(&a) && (10..100).contains(&b)));
    // Byte for byte what the library writes for the same options.
    let lib = write_addition(
        &dir.join("lib"),
        &AdditionOptions {
            digits: 2,
            n_train: 60,
            n_eval: 15,
            seed: 7,
        },
    )
    .unwrap();
    assert_eq!(std::fs::read(&train).unwrap(), std::fs::read(&lib.train).unwrap());
    assert_eq!(std::fs::read(&eval).unwrap(), std::fs::read(&lib.eval).unwrap());

    // The output folder cannot be made: a file stands where its parent should be.
    let file = dir.join("a-file");
    std::fs::write(&file, "").unwrap();
    let blocked = file.join("sub");
    fails_naming(&["data", "arithmetic", "--out", s(&blocked)], s(&blocked));
    let err = fails_naming(
        &[
            "data",
            "arithmetic",
            "--digits",
            "1",
            "--train",
            "80",
            "--eval",
            "5",
            "--out",
            s(&out),
        ],
        "only 81",
    );
    assert!(err.contains("80 train + 5 eval"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn data_wordnet_writes_the_library_split_and_licence() {
    let dir = temp_dir("cli-wordnet");
    let src = fixture("data/wordnet");
    for (args, max_train, max_eval, seed, counts) in [
        (vec![], 20000, 500, 42, (23, 12)),
        (vec!["--train", "5", "--eval", "2", "--seed", "4"], 5, 2, 4, (5, 2)),
    ] {
        let out = dir.join(format!("cli-{max_train}"));
        let mut a = vec!["data", "wordnet", "--wordnet-dir", s(&src), "--out", s(&out)];
        a.extend(args);
        let o = ok(&a);
        let lib = write_wordnet(
            &src,
            &dir.join(format!("lib-{max_train}")),
            &WordnetOptions {
                max_train: Some(max_train),
                max_eval: Some(max_eval),
                seed,
            },
        )
        .unwrap();
        assert_eq!((lib.n_train, lib.n_eval), counts);
        let (train, eval, licence) = (
            out.join("train.jsonl"),
            out.join("eval.jsonl"),
            out.join("LICENSE.wordnet"),
        );
        assert_eq!(
            o.stdout,
            format!(
                "{} ({} rows)\n{} ({} rows)\n{}\n",
                train.display(),
                counts.0,
                eval.display(),
                counts.1,
                licence.display()
            )
        );
        assert_eq!(std::fs::read(&train).unwrap(), std::fs::read(&lib.train).unwrap());
        assert_eq!(std::fs::read(&eval).unwrap(), std::fs::read(&lib.eval).unwrap());
        assert_eq!(std::fs::read(&licence).unwrap(), std::fs::read(&lib.licence).unwrap());
        let rows = std::fs::read_to_string(&train).unwrap().lines().count();
        assert_eq!(rows, counts.0);
        assert!(std::fs::read_to_string(&licence).unwrap().contains("WordNet 3.0"));
    }
    let missing = dir.join("no-wordnet");
    let err = fails_naming(
        &[
            "data",
            "wordnet",
            "--wordnet-dir",
            s(&missing),
            "--out",
            s(&dir.join("x")),
        ],
        s(&missing.join("data.noun")),
    );
    assert!(err.contains("wordnet-base"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Addition rows, one row too long for 64 tokens in its prompt, one too long in its answer,
/// and one with no assistant turn: `(config path, rows written)`.
fn preprocess_setup(dir: &Path) -> (PathBuf, usize) {
    let model = dir.join("model");
    convert_gguf(&fixture("model/tiny_llama.gguf"), &model, DType::F32).unwrap();
    let data = dir.join("data");
    let files = write_addition(
        &data,
        &AdditionOptions {
            digits: 2,
            n_train: 20,
            n_eval: 1,
            seed: 11,
        },
    )
    .unwrap();
    let mut text = std::fs::read_to_string(&files.train).unwrap();
    let row = |msgs: serde_json::Value| format!("{}\n", serde_json::json!({ "messages": msgs }));
    text += &row(
        serde_json::json!([{"role": "user", "content": "x".repeat(200)}, {"role": "assistant", "content": "long"}]),
    );
    text += &row(
        serde_json::json!([{"role": "user", "content": "Say z."}, {"role": "assistant", "content": "z".repeat(80)}]),
    );
    text += &row(serde_json::json!([{"role": "user", "content": "Only a question?"}]));
    let mix = data.join("mix.jsonl");
    std::fs::write(&mix, &text).unwrap();
    let cfg = dir.join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\ndatasets:\n  - path: {}\n    type: chat_template\nval_set_size: 0.2\n\
             sequence_len: 64\nmicro_batch_size: 2\nsample_packing: true\nlearning_rate: 0.01\noutput_dir: {}\n",
            model.display(),
            mix.display(),
            dir.join("out").display()
        ),
    )
    .unwrap();
    (cfg, text.lines().count())
}

/// The lines `preprocess` prints, computed with the library for the same config.
fn expected_counts(cfg_path: &Path, set: &[String]) -> (String, ferrotune::data::PreparedData, Tokenizer) {
    let cfg = ferrotune::Config::from_yaml(&std::fs::read_to_string(cfg_path).unwrap(), set).unwrap();
    let p = ferrotune::train::run::open_model(&cfg).unwrap();
    let data = ferrotune::train::run::prepare_data(&cfg, &p).unwrap();
    let st = &data.stats;
    let sched = BatchSchedule::new(
        &data.train,
        ScheduleOptions::new(&cfg.data, cfg.gradient_accumulation_steps),
    )
    .unwrap();
    let plan = sched.epoch(0);
    let text = format!(
        "rows read: {}\nsamples: {} ({} train, {} eval)\ndropped: {} ({} too long, {} without labels); truncated: {}\n\
         tokens: {} ({} trained), longest sample {}\nbatches: [{} x {}], {} optimizer steps per epoch, packing efficiency {:.1}%\n",
        st.rows,
        st.samples,
        data.train.len(),
        data.eval.len(),
        st.dropped,
        st.dropped_long,
        st.dropped_no_labels,
        st.truncated,
        st.tokens,
        st.label_tokens,
        st.max_len,
        sched.layout().rows,
        sched.layout().seq_len,
        plan.steps.len(),
        100.0 * plan.efficiency()
    );
    (text, data, p.tokenizer)
}

#[test]
fn preprocess_prints_the_library_counts_and_the_label_mask() {
    let dir = temp_dir("cli-preprocess");
    let (cfg, rows) = preprocess_setup(&dir);
    // Dropping: both long rows go. Truncating: both are cut, and the one whose prompt
    // fills the 64 tokens has nothing left to train on.
    for (set, dropped_long, truncated, no_labels) in [
        (vec![], 2, 0, 1),
        (vec!["excess_length_strategy=truncate".to_string()], 0, 2, 2),
    ] {
        let mut args = vec!["preprocess", s(&cfg)];
        for kv in &set {
            args.extend(["--set", kv.as_str()]);
        }
        let o = ok(&args);
        let (want, data, tok) = expected_counts(&cfg, &set);
        assert!(o.stdout.starts_with(&want), "printed:\n{}\nlibrary:\n{want}", o.stdout);
        // --json: the same counts and the same marked sample, as one object.
        args.push("--json");
        let j: serde_json::Value = serde_json::from_str(ok(&args).stdout.trim()).unwrap();
        assert_eq!(j["stats"], serde_json::to_value(&data.stats).unwrap());
        assert_eq!(j["train_samples"], data.train.len());
        assert_eq!(j["eval_samples"], data.eval.len());
        // (The printed example ends with println's newline.)
        let marked = o
            .stdout
            .split("taken on):\n")
            .nth(1)
            .unwrap()
            .strip_suffix('\n')
            .unwrap();
        assert_eq!(j["first_sample_marked"], marked);
        // The numbers, by hand: every row read; the row without an assistant turn has
        // nothing to train on.
        let st = &data.stats;
        assert_eq!(st.rows, rows);
        assert_eq!(
            (st.dropped_long, st.truncated, st.dropped_no_labels),
            (dropped_long, truncated, no_labels)
        );
        assert_eq!(st.samples, rows - st.dropped);
        assert_eq!(data.train.len() + data.eval.len(), st.samples);
        assert!(!data.eval.is_empty());
        let lens: usize = data.train.iter().chain(&data.eval).map(|x| x.len()).sum();
        assert_eq!(st.tokens, lens);
        assert!(st.max_len <= 64);
        // Packing: one row of micro_batch_size * sequence_len = 128 tokens per micro-batch
        // (one per step here), filled with the training tokens.
        let steps: usize = o
            .stdout
            .split("batches: [1 x 128], ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap()
            .parse()
            .unwrap();
        let train_tokens: usize = data.train.iter().map(|x| x.len()).sum();
        assert!(
            steps * 128 >= train_tokens,
            "{steps} rows cannot hold {train_tokens} tokens"
        );
        let efficiency = 100.0 * train_tokens as f64 / (steps * 128) as f64;
        assert!(
            o.stdout.contains(&format!("packing efficiency {efficiency:.1}%\n")),
            "{}",
            o.stdout
        );

        // The rendered example: the first training sample, with only its answer and
        // end-of-turn token marked as trained.
        let example = o
            .stdout
            .split("([[...]] marks the tokens the loss is taken on):\n")
            .nth(1)
            .expect("a rendered example");
        let first = &data.train[0];
        let plain = example.replace("[[", "").replace("]]", "");
        // (The last line of output, ended by println.)
        assert_eq!(plain, format!("{}\n", tok.decode(&first.input_ids, false).unwrap()));
        let trained: Vec<u32> = first
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .map(|&l| l as u32)
            .collect();
        let marked = example.split("[[").nth(1).unwrap().split("]]").next().unwrap();
        assert_eq!(marked, tok.decode(&trained, false).unwrap());
        assert_eq!(example.matches("[[").count(), 1, "{example}");
        if let Some(q) = plain.split("What is ").nth(1) {
            let (a, b) = q.split_once('?').unwrap().0.split_once(" + ").unwrap();
            let sum = a.parse::<u64>().unwrap() + b.parse::<u64>().unwrap();
            assert_eq!(marked, format!("{sum}<|im_end|>"), "{example}");
        } else {
            // The row answered with z's (cut before its end-of-turn token when truncated).
            assert!(plain.contains("Say z."), "{example}");
            let zs = marked.strip_suffix("<|im_end|>").unwrap_or(marked);
            assert!(!zs.is_empty() && zs.chars().all(|c| c == 'z'), "{example}");
        }
    }

    let missing = dir.join("no-config.yaml");
    fails_naming(&["preprocess", s(&missing)], s(&missing));
    let bad = dir.join("bad.yaml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("mix.jsonl", "gone.jsonl");
    std::fs::write(&bad, text).unwrap();
    let err = fails_naming(&["preprocess", s(&bad)], s(&dir.join("data/gone.jsonl")));
    assert!(err.contains("does not exist"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
