//! Generation with the KV cache against the full forward pass (no cache) on the tiny
//! model: greedy tokens, seeded temperature / top-p sampling inside the nucleus; and the
//! exact-match scoring and references on hand-made cases.

mod common;
use common::{temp_dir, write_tiny_model, CHATML};
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::data::{DataOptions, DatasetSpec, DatasetType, Tokenizer};
use ferrotune::infer::exact_match::{is_exact_match, references, score_answers};
use ferrotune::infer::score::score;
use ferrotune::infer::{GenerateOptions, Generator};
use ferrotune::model::{ModelConfig, WeightStore};
use ferrotune::train::session::Precision;

struct Tiny {
    dir: std::path::PathBuf,
    cfg: ModelConfig,
    store: WeightStore,
}

impl Tiny {
    fn new(name: &str) -> Self {
        let dir = temp_dir(name);
        let model = write_tiny_model(&dir.join("model"), 21);
        Tiny {
            cfg: ModelConfig::from_file(&model.join("config.json")).unwrap(),
            store: WeightStore::open(&model.join("model.safetensors")).unwrap(),
            dir,
        }
    }

    fn generator(&self, rows: usize, prompt_len: usize, max_len: usize) -> Generator {
        Generator::new(
            &self.cfg,
            &self.store,
            Box::new(CpuBackend::new()),
            Precision::F32,
            rows,
            prompt_len,
            max_len,
        )
        .unwrap()
    }

    /// The next-token logits after `ids`, from one full forward pass over them (no cache).
    fn next_logits(&self, ids: &[u32]) -> Vec<f32> {
        let s = score(&self.cfg, &self.store, Box::new(CpuBackend::new()), ids).unwrap();
        let v = self.cfg.vocab_size;
        s.logits[(ids.len() - 1) * v..].to_vec()
    }
}

impl Drop for Tiny {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Two prompts of different lengths, so one row of the batch is padded.
fn prompts() -> Vec<Vec<u32>> {
    vec![vec![1, 415, 2936, 9060, 285, 1142], vec![1, 3195, 28705]]
}

#[test]
fn greedy_generation_with_the_cache_follows_the_full_forward_argmax() {
    let m = Tiny::new("greedy");
    let new_tokens = 8;
    let mut gen = m.generator(2, 6, 6 + new_tokens);
    let opts = GenerateOptions {
        max_new_tokens: new_tokens,
        ..Default::default()
    };
    let out = gen.generate(&prompts(), &opts).unwrap();
    for (p, o) in prompts().iter().zip(&out) {
        assert_eq!(o.len(), new_tokens);
        let mut seq = p.clone();
        for (k, &tok) in o.iter().enumerate() {
            let l = m.next_logits(&seq);
            let mut order: Vec<usize> = (0..l.len()).collect();
            order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
            // A clear winner, so the comparison does not hang on rounding.
            assert!(l[order[0]] - l[order[1]] > 1e-4, "near tie at step {k}");
            assert_eq!(tok as usize, order[0], "step {k} after {seq:?}");
            seq.push(tok);
        }
    }
    // One prompt alone (no padded neighbour) gives the same tokens.
    let mut one = m.generator(1, 3, 3 + new_tokens);
    assert_eq!(one.generate(&prompts()[1..], &opts).unwrap()[0], out[1]);
}

/// The tokens top-p keeps: the most probable ones until their probability reaches
/// `top_p` (the token that crosses it included), from softmax(logits / temperature) in f64.
fn nucleus(logits: &[f32], temperature: f64, top_p: f64) -> Vec<usize> {
    let m = logits.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
    let e: Vec<f64> = logits.iter().map(|&x| ((x as f64 - m) / temperature).exp()).collect();
    let z: f64 = e.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| e[b].total_cmp(&e[a]));
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for i in order {
        if mass >= top_p {
            break;
        }
        kept.push(i);
        mass += e[i] / z;
    }
    kept
}

#[test]
fn seeded_top_p_sampling_is_deterministic_and_stays_in_the_nucleus() {
    let m = Tiny::new("sample");
    let new_tokens = 6;
    let opts = |seed| GenerateOptions {
        max_new_tokens: new_tokens,
        temperature: 0.05,
        top_p: 0.8,
        seed,
        stop_ids: vec![],
    };
    let mut gen = m.generator(2, 6, 6 + new_tokens);
    let a = gen.generate(&prompts(), &opts(7)).unwrap();
    let b = gen.generate(&prompts(), &opts(7)).unwrap();
    let c = m
        .generator(2, 6, 6 + new_tokens)
        .generate(&prompts(), &opts(7))
        .unwrap();
    assert_eq!(a, b, "the same seed on the same generator");
    assert_eq!(a, c, "the same seed on a new generator");

    let mut off_argmax = 0;
    let mut widest = 0;
    for seed in 0..6 {
        let out = gen.generate(&prompts(), &opts(seed)).unwrap();
        for (p, o) in prompts().iter().zip(&out) {
            assert_eq!(o.len(), new_tokens);
            let mut seq = p.clone();
            for &tok in o {
                let l = m.next_logits(&seq);
                let keep = nucleus(&l, 0.05, 0.8);
                assert!(keep.contains(&(tok as usize)), "{tok} is outside the nucleus {keep:?}");
                widest = widest.max(keep.len());
                off_argmax += (tok as usize != keep[0]) as usize;
                seq.push(tok);
            }
        }
    }
    // The test means something: the nucleus has several tokens and sampling used them.
    eprintln!("widest nucleus {widest}, {off_argmax} picks off the argmax");
    assert!(widest > 1 && off_argmax > 0);
}

#[test]
fn exact_match_compares_trimmed_text_and_nothing_else() {
    assert!(is_exact_match(" 42\n", "42"));
    assert!(is_exact_match("42", "\t42 "));
    assert!(!is_exact_match("42.", "42"), "punctuation counts");
    assert!(!is_exact_match("Paris", "paris"), "case counts");
    assert!(!is_exact_match("4 2", "42"), "inner spaces count");
    assert!(!is_exact_match("", "42"));
    let pairs = [
        ("42", " 42\n"),
        ("7", "seven"),
        ("Paris", "Paris"),
        ("x", "x "),
        ("y", "z"),
    ];
    let m = score_answers(pairs);
    assert_eq!((m.correct, m.total), (3, 5));
    assert!((m.percent() - 60.0).abs() < 1e-12);
    assert_eq!(
        m.examples,
        vec![
            ("42".to_string(), "42".to_string()),
            ("7".to_string(), "seven".to_string()),
            ("Paris".to_string(), "Paris".to_string())
        ]
    );
    let none = score_answers([]);
    assert_eq!((none.correct, none.total, none.percent()), (0, 0, 0.0));
}

#[test]
fn references_are_the_prompt_before_the_last_assistant_turn() {
    let dir = temp_dir("refs");
    let tok = Tokenizer::from_dir(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers/mistral7b"),
    )
    .unwrap();
    let path = dir.join("eval.jsonl");
    let rows = [
        r#"{"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}"#,
        r#"{"messages": [{"role": "user", "content": "no answer here"}]}"#,
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": " d "}]}"#,
    ];
    std::fs::write(&path, rows.join("\n")).unwrap();
    let mut spec = DatasetSpec::new(path.display().to_string(), DatasetType::ChatTemplate);
    spec.chat_template_jinja = Some(CHATML.to_string());
    let refs = references(&spec, &DataOptions::default(), &tok, 10).unwrap();
    // The row without an assistant turn has no reference.
    assert_eq!(refs.len(), 2);
    let want = [
        (
            "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
            "4",
        ),
        (
            "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n\
             <|im_start|>assistant\n",
            " d ",
        ),
    ];
    for (r, (prompt, answer)) in refs.iter().zip(want) {
        assert_eq!(r.prompt, tok.encode(prompt, false).unwrap());
        assert_eq!(r.answer, answer);
    }
    assert_eq!(
        references(&spec, &DataOptions::default(), &tok, 1).unwrap().len(),
        1,
        "limit counts rows"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
