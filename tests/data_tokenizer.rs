//! The tokenizer against Hugging Face `tokenizers`/transformers on a fixed corpus
//! (tests/fixtures/data/tokenize_reference.json, written by scripts/fixtures/data_reference.py).

use ferrotune::data::Tokenizer;
use serde_json::Value;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("data/tokenize_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn opt_id(v: &Value) -> Option<u32> {
    v.as_u64().map(|x| x as u32)
}

#[test]
fn corpus_ids_and_decodes_match_hugging_face() {
    let reference = reference();
    for name in ["smollm2", "mistral7b"] {
        let tok = Tokenizer::from_dir(&fixtures().join("tokenizers").join(name)).unwrap();
        let r = &reference[name];
        assert_eq!(tok.vocab_size() as u64, r["vocab_size"].as_u64().unwrap(), "{name}");
        assert_eq!(tok.bos_id(), opt_id(&r["bos_id"]), "{name} bos");
        assert_eq!(tok.eos_id(), opt_id(&r["eos_id"]), "{name} eos");
        assert_eq!(tok.pad_id(), opt_id(&r["pad_id"]), "{name} pad");
        assert_eq!(tok.unk_id(), opt_id(&r["unk_id"]), "{name} unk");
        let rows = r["rows"].as_array().unwrap();
        assert!(rows.len() >= 30);
        for row in rows {
            let text = row["text"].as_str().unwrap();
            let want = ids(&row["ids"]);
            assert_eq!(
                tok.encode(text, true).unwrap(),
                want,
                "{name} {text:?} with special tokens"
            );
            assert_eq!(
                tok.encode(text, false).unwrap(),
                ids(&row["ids_no_special"]),
                "{name} {text:?}"
            );
            assert_eq!(
                tok.decode(&want, false).unwrap(),
                row["decode"].as_str().unwrap(),
                "{name} {text:?}"
            );
            assert_eq!(
                tok.decode(&want, true).unwrap(),
                row["decode_skip_special"].as_str().unwrap(),
                "{name} {text:?}"
            );
        }
    }
}

#[test]
fn smollm2_golden_ids_and_tokens() {
    // Values from the SmolLM2 model card checks (the HF tokenizer on the same strings).
    let tok = Tokenizer::from_dir(&fixtures().join("tokenizers/smollm2")).unwrap();
    assert_eq!(
        tok.encode("The capital of France is", true).unwrap(),
        vec![504, 3575, 282, 4649, 314]
    );
    let digits = tok.encode("In 2024", false).unwrap();
    let pieces: Vec<String> = digits.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(pieces, ["In", "Ġ", "2", "0", "2", "4"]);
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert!(tok.is_special(2));
    assert!(!tok.adds_bos());
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
    // The Mistral vocabulary adds BOS (add_bos_token: true in its config).
    let m = Tokenizer::from_dir(&fixtures().join("tokenizers/mistral7b")).unwrap();
    assert!(m.adds_bos());
    assert_eq!(m.encode("Hello", true).unwrap(), vec![1, 22557]);
}

#[test]
fn from_bytes_equals_from_dir() {
    let dir = fixtures().join("tokenizers/smollm2");
    let json = std::fs::read(dir.join("tokenizer.json")).unwrap();
    let cfg = std::fs::read(dir.join("tokenizer_config.json")).unwrap();
    let a = Tokenizer::from_dir(&dir).unwrap();
    let b = Tokenizer::from_bytes(&json, Some(&cfg)).unwrap();
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.chat_template(), b.chat_template());
    let text = "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n";
    assert_eq!(a.encode(text, false).unwrap(), b.encode(text, false).unwrap());
    // Without tokenizer_config.json there are no named special tokens and no template.
    let bare = Tokenizer::from_bytes(&json, None).unwrap();
    assert_eq!(bare.eos_id(), None);
    assert!(bare.chat_template().is_none());
    assert!(bare.padding_id().unwrap_err().to_string().contains("pad_token"));
}

#[test]
fn a_truncated_tokenizer_file_is_a_clear_error() {
    let json = std::fs::read(fixtures().join("tokenizers/smollm2/tokenizer.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), &json[..json.len() / 2]).unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("not a Hugging Face tokenizer.json"),
        "{err}"
    );
}
