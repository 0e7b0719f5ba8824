//! `tokenizer.json` and `tokenizer_config.json` rebuilt from a GGUF's `tokenizer.ggml.*` metadata.
//!
//! - `gpt2` (byte-level BPE): vocab and merges as stored; the pre-tokenizer follows
//!   `tokenizer.ggml.pre` as llama.cpp's llama-vocab.cpp does (its regexes are those of the
//!   models' own tokenizer.json files).
//! - `llama` (SentencePiece BPE): merges derived from the piece scores the way transformers'
//!   `SentencePieceExtractor` (convert_slow_tokenizer.py) does, with byte fallback.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::reader::GgufFile;
use crate::{Error, Result};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// Pre-tokenizer names of `tokenizer.ggml.pre` that we can reproduce.
pub const SUPPORTED_PRE: &str = "default, gpt2, smollm, llama-bpe (llama3), qwen2";

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Special tokens found in the metadata (ids and their text).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    pub pad: Option<(u32, String)>,
    pub unk: Option<(u32, String)>,
    pub add_bos: bool,
    pub add_eos: bool,
}

/// The files to write next to the weights.
#[derive(Clone, Debug)]
pub struct TokenizerFiles {
    pub tokenizer_json: Value,
    pub tokenizer_config: Value,
    pub special: SpecialTokens,
    pub vocab_size: usize,
}

fn byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets, "use_regex": use_regex})
}

fn split_isolated(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// (normalizer, pre_tokenizer, ignore_merges) for a byte-level BPE `tokenizer.ggml.pre`.
fn gpt2_pipeline(g: &GgufFile, pre: &str) -> Result<(Value, Value, bool)> {
    Ok(match pre {
        "default" | "gpt2" => (Value::Null, byte_level(false, true, true), false),
        // GPT-2 regex after splitting every digit on its own (HF SmolLM2 tokenizer.json).
        "smollm" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(false, true, true)
            ]}),
            false,
        ),
        "llama-bpe" | "llama3" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [split_isolated(LLAMA3_REGEX), byte_level(false, true, false)]}),
            true,
        ),
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split_isolated(QWEN2_REGEX), byte_level(false, false, false)]}),
            false,
        ),
        other => {
            return Err(Error::format(
                &g.path,
                format!("tokenizer.ggml.pre = \"{other}\" is not supported; supported: {SUPPORTED_PRE}"),
            ))
        }
    })
}

/// transformers' SentencePieceExtractor: every split of a piece into two known pieces is a
/// merge, ordered by the merged piece's score (highest first), ties by the pieces' ids.
fn spm_merges(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    let vocab: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(usize, usize, f32)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        let mut local = Vec::new();
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((li, ri, scores[i]));
            }
        }
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local);
    }
    // Stable sort, descending score, as Python's sorted(..., reverse=True) on the score key.
    merges.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
    merges
        .into_iter()
        .map(|(l, r, _)| (tokens[l].to_string(), tokens[r].to_string()))
        .collect()
}

fn token_at(tokens: &[&str], id: Option<u64>) -> Option<(u32, String)> {
    let id = id? as usize;
    tokens.get(id).map(|t| (id as u32, t.to_string()))
}

/// Build `tokenizer.json` and `tokenizer_config.json` from the GGUF metadata.
pub fn build_tokenizer(g: &GgufFile) -> Result<TokenizerFiles> {
    let model = g.get_str("tokenizer.ggml.model")?;
    let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        Some(_) => g
            .get_array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| v.as_i64().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(Error::format(
            &g.path,
            format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            ),
        ));
    }
    let opt_id = |k: &str| g.get(k).and_then(|v| v.as_u64());
    let opt_bool = |k: &str| g.get(k).and_then(|v| v.as_bool());
    let mut special = SpecialTokens {
        bos: token_at(&tokens, opt_id("tokenizer.ggml.bos_token_id")),
        eos: token_at(&tokens, opt_id("tokenizer.ggml.eos_token_id")),
        pad: token_at(&tokens, opt_id("tokenizer.ggml.padding_token_id")),
        unk: token_at(&tokens, opt_id("tokenizer.ggml.unknown_token_id")),
        add_bos: false,
        add_eos: opt_bool("tokenizer.ggml.add_eos_token").unwrap_or(false),
    };

    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    if vocab.len() != tokens.len() {
        return Err(Error::format(
            &g.path,
            "tokenizer.ggml.tokens contains the same token twice",
        ));
    }

    let (normalizer, pre_tokenizer, bpe_model, decoder) = match model {
        "gpt2" => {
            special.add_bos = opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
            let pre = match g.get("tokenizer.ggml.pre") {
                Some(v) => v.as_str().unwrap_or("default").to_string(),
                None => "default".to_string(),
            };
            let (normalizer, pre_tokenizer, ignore_merges) = gpt2_pipeline(g, &pre)?;
            let merges = g.get_str_array("tokenizer.ggml.merges")?;
            let merges: Vec<Value> = merges
                .iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| json!([a, b]))
                        .ok_or_else(|| Error::format(&g.path, format!("merge \"{m}\" is not two tokens separated by a space")))
                })
                .collect::<Result<_>>()?;
            let bpe = json!({
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges
            });
            (normalizer, pre_tokenizer, bpe, byte_level(true, true, true))
        }
        "llama" => {
            special.add_bos = opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(true);
            let scores: Vec<f32> = g
                .get_array("tokenizer.ggml.scores")?
                .iter()
                .map(|v| v.as_f64().map(|x| x as f32))
                .collect::<Option<_>>()
                .ok_or_else(|| Error::format(&g.path, "tokenizer.ggml.scores must hold numbers"))?;
            if scores.len() != tokens.len() {
                return Err(Error::format(&g.path, "tokenizer.ggml.scores and tokenizer.ggml.tokens differ in length"));
            }
            let merges: Vec<Value> = spm_merges(&tokens, &scores).into_iter().map(|(a, b)| json!([a, b])).collect();
            let unk = special.unk.clone().or_else(|| token_at(&tokens, types.iter().position(|&t| t == TOKEN_UNKNOWN).map(|p| p as u64)));
            special.unk = unk.clone();
            let bpe = json!({
                "type": "BPE", "dropout": null, "unk_token": unk.map(|u| u.1), "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges
            });
            let normalizer = json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}
            ]});
            let decoder = json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]});
            (normalizer, Value::Null, bpe, decoder)
        }
        other => {
            return Err(Error::format(
                &g.path,
                format!("tokenizer.ggml.model = \"{other}\" is not supported; supported: gpt2 (byte-level BPE), llama (SentencePiece)"),
            ))
        }
    };

    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED || (t == TOKEN_UNKNOWN && model == "llama"))
        .map(|(i, &t)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": t != TOKEN_USER_DEFINED})
        })
        .collect();

    let post_processor = post_processor(&special, model);

    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": bpe_model,
    });
    // Our own output must load; a failure here is a bug in this file, reported as such.
    let text = serde_json::to_string(&tokenizer_json).expect("JSON values always serialize");
    text.parse::<tokenizers::Tokenizer>().map_err(|e| {
        Error::format(
            &g.path,
            format!("the tokenizer.json rebuilt from this file does not load: {e}"),
        )
    })?;

    let arch = g.get_str("general.architecture").unwrap_or("llama");
    let max_len = g.get(&format!("{arch}.context_length")).and_then(|v| v.as_u64());
    let tok_text = |t: &Option<(u32, String)>| t.as_ref().map(|(_, s)| json!(s)).unwrap_or(Value::Null);
    let mut cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": special.add_bos,
        "add_eos_token": special.add_eos,
        "bos_token": tok_text(&special.bos),
        "eos_token": tok_text(&special.eos),
        "pad_token": tok_text(&special.pad),
        "unk_token": tok_text(&special.unk),
        "clean_up_tokenization_spaces": false,
        "model_max_length": max_len,
    });
    if let Some(t) = g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        cfg["chat_template"] = json!(t);
    }
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config: cfg,
        special,
        vocab_size: tokens.len(),
    })
}

/// BOS/EOS insertion when the model asks for it; otherwise the byte-level (or no) processor.
fn post_processor(special: &SpecialTokens, model: &str) -> Value {
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = serde_json::Map::new();
    let mut add = |tok: &Option<(u32, String)>, seq: &mut Vec<Value>, type_id: u32| {
        if let Some((id, text)) = tok {
            seq.push(json!({"SpecialToken": {"id": text, "type_id": type_id}}));
            specials.insert(text.clone(), json!({"id": text, "ids": [id], "tokens": [text]}));
        }
    };
    if special.add_bos {
        add(&special.bos, &mut single, 0);
        add(&special.bos, &mut pair, 0);
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if special.add_eos {
        add(&special.eos, &mut single, 0);
        add(&special.eos, &mut pair, 0);
    }
    if special.add_bos {
        add(&special.bos, &mut pair, 1);
    }
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
    if special.add_eos {
        add(&special.eos, &mut pair, 1);
    }
    if specials.is_empty() {
        return if model == "gpt2" {
            byte_level(true, false, true)
        } else {
            Value::Null
        };
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}
