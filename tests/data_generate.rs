//! The demo data generators: addition problems and WordNet definitions.

use ferrotune::data::generate::arithmetic::{generate_addition, write_addition, AdditionOptions};
use ferrotune::data::generate::wordnet::{is_eval_lemma, read_wordnet, write_wordnet, WordnetOptions};
use ferrotune::data::{prepare, DataOptions, DatasetSpec, DatasetType, Tokenizer, IGNORE_INDEX};
use serde_json::Value;
use std::collections::HashSet;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn addition_sets_are_disjoint_distinct_and_seeded() {
    let opts = AdditionOptions {
        digits: 3,
        n_train: 3000,
        n_eval: 300,
        seed: 9,
    };
    let set = generate_addition(&opts).unwrap();
    assert_eq!((set.train.len(), set.eval.len()), (3000, 300));
    let train: HashSet<_> = set.train.iter().collect();
    let eval: HashSet<_> = set.eval.iter().collect();
    assert_eq!(train.len(), 3000, "no repeated training pair");
    assert_eq!(eval.len(), 300);
    assert!(train.is_disjoint(&eval), "no (a, b) pair in both sets");
    for p in set.train.iter().chain(&set.eval) {
        assert!((100..=999).contains(&p.a) && (100..=999).contains(&p.b));
        assert_eq!(p.answer().parse::<u64>().unwrap(), p.a + p.b);
        assert_eq!(p.prompt(), format!("What is {} + {}?", p.a, p.b));
    }
    // Roughly uniform: both halves of the range are well represented.
    let low = set.train.iter().filter(|p| p.a < 550).count();
    assert!((1300..1700).contains(&low), "{low}");
    assert_eq!(generate_addition(&opts).unwrap(), set);
    assert_ne!(
        generate_addition(&AdditionOptions {
            seed: 10,
            ..opts.clone()
        })
        .unwrap()
        .eval,
        set.eval
    );
}

#[test]
fn addition_dense_and_impossible_requests() {
    // All 81 one-digit pairs.
    let set = generate_addition(&AdditionOptions {
        digits: 1,
        n_train: 71,
        n_eval: 10,
        seed: 1,
    })
    .unwrap();
    let all: HashSet<_> = set.train.iter().chain(&set.eval).map(|p| (p.a, p.b)).collect();
    assert_eq!(all.len(), 81);
    let err = generate_addition(&AdditionOptions {
        digits: 1,
        n_train: 80,
        n_eval: 2,
        seed: 1,
    })
    .unwrap_err();
    assert!(err.to_string().contains("only 81"), "{err}");
    assert!(generate_addition(&AdditionOptions {
        digits: 0,
        n_train: 1,
        n_eval: 1,
        seed: 1
    })
    .is_err());
}

#[test]
fn addition_files_train_on_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_addition(
        dir.path(),
        &AdditionOptions {
            digits: 2,
            n_train: 50,
            n_eval: 20,
            seed: 3,
        },
    )
    .unwrap();
    let eval_text = std::fs::read_to_string(&files.eval).unwrap();
    let lines: Vec<Value> = eval_text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 20);
    for l in &lines {
        let m = l["messages"].as_array().unwrap();
        assert_eq!(
            (m[0]["role"].as_str(), m[1]["role"].as_str()),
            (Some("user"), Some("assistant"))
        );
        let q = m[0]["content"].as_str().unwrap();
        let (a, b) = q
            .strip_prefix("What is ")
            .unwrap()
            .strip_suffix('?')
            .unwrap()
            .split_once(" + ")
            .unwrap();
        let sum: u64 = a.parse::<u64>().unwrap() + b.parse::<u64>().unwrap();
        assert_eq!(
            m[1]["content"].as_str().unwrap(),
            sum.to_string(),
            "the reference answer"
        );
    }
    let tok = Tokenizer::from_dir(&fixtures().join("tokenizers/smollm2")).unwrap();
    let spec = DatasetSpec::new(files.train.to_str().unwrap(), DatasetType::ChatTemplate);
    let data = prepare(
        &[spec],
        &DataOptions {
            shuffle: false,
            ..Default::default()
        },
        &tok,
    )
    .unwrap();
    assert_eq!(data.train.len(), 50);
    let first = std::fs::read_to_string(&files.train).unwrap();
    let first: Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    let answer = first["messages"][1]["content"].as_str().unwrap();
    let trained: Vec<u32> = data.train[0]
        .labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    assert_eq!(tok.decode(&trained, false).unwrap(), format!("{answer}<|im_end|>"));
}

#[test]
fn wordnet_excerpt_parses_as_the_reference() {
    let dir = fixtures().join("data/wordnet");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let data = read_wordnet(&dir).unwrap();
    let want = expected["glosses"].as_array().unwrap();
    assert_eq!(data.glosses.len(), want.len());
    for (g, w) in data.glosses.iter().zip(want) {
        assert_eq!(g.word, w["word"].as_str().unwrap());
        assert_eq!(g.pos, w["pos"].as_str().unwrap());
        assert_eq!(g.definition, w["definition"].as_str().unwrap());
        assert_eq!(g.offset, w["offset"].as_u64().unwrap());
        assert_eq!(g.prompt(), w["prompt"].as_str().unwrap());
        assert_eq!(is_eval_lemma(&g.word), w["eval"].as_bool().unwrap(), "{}", g.word);
    }
    assert!(
        data.glosses.iter().any(|g| g.word.contains(' ')),
        "multi-word lemmas keep spaces"
    );
    assert!(
        data.glosses.iter().all(|g| !g.word.contains('(')),
        "adjective markers are removed"
    );
    assert_eq!(data.licence, expected["licence"].as_str().unwrap());
    assert!(data
        .licence
        .contains("WordNet 3.0 Copyright 2006 by Princeton University"));
}

#[test]
fn wordnet_files_split_by_lemma_and_carry_the_licence() {
    let src = fixtures().join("data/wordnet");
    let out = tempfile::tempdir().unwrap();
    let opts = WordnetOptions {
        max_train: None,
        max_eval: None,
        seed: 0,
    };
    let files = write_wordnet(&src, out.path(), &opts).unwrap();
    let read = |p: &PathBuf| -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (train, eval) = (read(&files.train), read(&files.eval));
    assert_eq!((train.len(), eval.len()), (files.n_train, files.n_eval));
    assert_eq!((train.len(), eval.len()), (23, 12));
    let word = |v: &Value| {
        let q = v["messages"][0]["content"].as_str().unwrap().to_string();
        q.split('"').nth(1).unwrap().to_string()
    };
    assert!(train.iter().all(|v| !is_eval_lemma(&word(v))));
    assert!(eval.iter().all(|v| is_eval_lemma(&word(v))));
    let licence = std::fs::read_to_string(&files.licence).unwrap();
    assert!(
        licence.contains("WordNet 3.0") && licence.contains("Permission to use, copy, modify"),
        "{licence}"
    );
    // Subsampling is seeded.
    let small = WordnetOptions {
        max_train: Some(5),
        max_eval: Some(2),
        seed: 4,
    };
    let a = write_wordnet(&src, out.path(), &small).unwrap();
    let first = std::fs::read_to_string(&a.train).unwrap();
    write_wordnet(&src, out.path(), &small).unwrap();
    assert_eq!(std::fs::read_to_string(&a.train).unwrap(), first);
    assert_eq!((a.n_train, a.n_eval), (5, 2));
}

#[test]
fn wordnet_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = read_wordnet(dir.path()).unwrap_err().to_string();
    assert!(err.contains("data.noun") && err.contains("wordnet-base"), "{err}");
    for (name, _) in ferrotune::data::generate::wordnet::DATA_FILES {
        std::fs::write(dir.path().join(name), "  1 licence\n00001740 03 n 01 entity 0 003\n").unwrap();
    }
    let err = read_wordnet(dir.path()).unwrap_err().to_string();
    assert!(err.contains("data.noun:2") && err.contains("gloss"), "{err}");
}
