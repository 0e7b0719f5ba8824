//! alpaca, completion and input_output samples against axolotl's construction computed with
//! transformers (tests/fixtures/data/formats_reference.json, from scripts/fixtures/data_reference.py).

use ferrotune::data::formats::{alpaca, Formatter};
use ferrotune::data::{DataOptions, DatasetSpec, DatasetType, Tokenizer};
use serde_json::{json, Value};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("data/formats_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tokenizers() -> [(String, Tokenizer); 2] {
    ["smollm2", "mistral7b"].map(|n| {
        (
            n.to_string(),
            Tokenizer::from_dir(&fixtures().join("tokenizers").join(n)).unwrap(),
        )
    })
}

fn tok<'a>(toks: &'a [(String, Tokenizer); 2], name: &Value) -> &'a Tokenizer {
    &toks.iter().find(|(n, _)| n == name.as_str().unwrap()).unwrap().1
}

fn vec_of<T: serde::de::DeserializeOwned>(v: &Value) -> Vec<T> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn alpaca_prompts_are_axolotls() {
    // The two system sentences of axolotl's AlpacaPrompter (src/axolotl/prompters.py).
    assert_eq!(
        alpaca::prompt("Say hi", None),
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n\
         ### Instruction:\nSay hi\n\n### Response:\n"
    );
    assert_eq!(
        alpaca::prompt("Add", Some("1 and 2")),
        "Below is an instruction that describes a task, paired with an input that provides further context. \
         Write a response that appropriately completes the request.\n\n\
         ### Instruction:\nAdd\n\n### Input:\n1 and 2\n\n### Response:\n"
    );
    assert_eq!(alpaca::prompt("Add", Some("")), alpaca::prompt("Add", None));
}

#[test]
fn alpaca_samples_match_the_reference() {
    let r = reference();
    let toks = tokenizers();
    let seq = r["sequence_len"].as_u64().unwrap() as usize;
    let cases = r["alpaca"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let row = &case["row"];
        let input = row.get("input").and_then(Value::as_str);
        assert_eq!(
            alpaca::prompt(row["instruction"].as_str().unwrap(), input),
            case["prompt"].as_str().unwrap()
        );
        let opts = DataOptions {
            sequence_len: seq,
            train_on_inputs: case["train_on_inputs"].as_bool().unwrap(),
            ..Default::default()
        };
        let t = tok(&toks, &case["tokenizer"]);
        let fmt = Formatter::new(&DatasetSpec::new("x", DatasetType::Alpaca), &opts, t).unwrap();
        let s = fmt.format_row(t, row.as_object().unwrap()).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].input_ids, vec_of::<u32>(&case["input_ids"]), "{case}");
        assert_eq!(s[0].labels, vec_of::<i32>(&case["labels"]), "{case}");
        assert_eq!(
            *s[0].input_ids.last().unwrap(),
            t.eos_id().unwrap(),
            "EOS closes the response"
        );
    }
}

#[test]
fn completion_splits_long_text() {
    let r = reference();
    let toks = tokenizers();
    let seq = r["sequence_len"].as_u64().unwrap() as usize;
    for case in r["completion"].as_array().unwrap() {
        let t = tok(&toks, &case["tokenizer"]);
        let mut spec = DatasetSpec::new("x", DatasetType::Completion);
        spec.field = Some("body".into());
        let opts = DataOptions {
            sequence_len: seq,
            ..Default::default()
        };
        let fmt = Formatter::new(&spec, &opts, t).unwrap();
        let row = json!({"body": case["text"]});
        let samples = fmt.format_row(t, row.as_object().unwrap()).unwrap();
        let chunks: Vec<Vec<u32>> = vec_of(&case["chunks"]);
        assert_eq!(samples.len(), chunks.len());
        for (s, c) in samples.iter().zip(&chunks) {
            assert_eq!(&s.input_ids, c);
            assert!(s.len() <= seq);
            assert_eq!(
                s.labels,
                c.iter().map(|&x| x as i32).collect::<Vec<_>>(),
                "every token trained"
            );
        }
    }
    // The long text really was split.
    assert!(r["completion"][0]["chunks"].as_array().unwrap().len() > 1);
}

#[test]
fn input_output_masks_segments() {
    let r = reference();
    let toks = tokenizers();
    for case in r["input_output"].as_array().unwrap() {
        let t = tok(&toks, &case["tokenizer"]);
        let opts = DataOptions {
            train_on_inputs: case["train_on_inputs"].as_bool().unwrap(),
            ..Default::default()
        };
        let fmt = Formatter::new(&DatasetSpec::new("x", DatasetType::InputOutput), &opts, t).unwrap();
        let row = json!({"segments": case["segments"]});
        let s = &fmt.format_row(t, row.as_object().unwrap()).unwrap()[0];
        assert_eq!(s.input_ids, vec_of::<u32>(&case["input_ids"]));
        assert_eq!(s.labels, vec_of::<i32>(&case["labels"]));
    }
}

#[test]
fn missing_fields_name_field_type_and_existing_fields() {
    let toks = tokenizers();
    let t = &toks[0].1;
    let opts = DataOptions::default();
    let fmt = Formatter::new(&DatasetSpec::new("x", DatasetType::Alpaca), &opts, t).unwrap();
    let row = json!({"prompt": "a", "response": "b"});
    let err = fmt.format_row(t, row.as_object().unwrap()).unwrap_err().to_string();
    assert_eq!(
        err,
        "missing field `instruction`, which dataset type alpaca needs; the row has fields `prompt`, `response`"
    );
    let fmt = Formatter::new(&DatasetSpec::new("x", DatasetType::Completion), &opts, t).unwrap();
    let err = fmt
        .format_row(t, json!({"content": "a"}).as_object().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing field `text`, which dataset type completion needs") && err.contains("`content`"));
    assert!(err.contains("set `field:`"), "{err}");
    let err = fmt
        .format_row(t, json!({"text": 5}).as_object().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`text` must be a string") && err.contains("a number"),
        "{err}"
    );
    let fmt = Formatter::new(&DatasetSpec::new("x", DatasetType::InputOutput), &opts, t).unwrap();
    let row = json!({"segments": [{"text": "a"}]});
    let err = fmt.format_row(t, row.as_object().unwrap()).unwrap_err().to_string();
    assert!(err.contains("segments[0] has no `label`"), "{err}");
    let fmt = Formatter::new(&DatasetSpec::new("x", DatasetType::ChatTemplate), &opts, t).unwrap();
    let err = fmt
        .format_row(t, json!({"conversations": []}).as_object().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing field `messages`, which dataset type chat_template needs"),
        "{err}"
    );
    assert!(
        err.contains("`conversations`") && err.contains("field_messages"),
        "{err}"
    );
}
