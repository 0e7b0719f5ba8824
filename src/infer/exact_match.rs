//! Exact match on datasets with a reference answer: the prompt is everything before the
//! answer (rendered as the model will see it at inference), the model answers greedily,
//! and the answer must equal the reference after trimming whitespace.

use super::generate::{GenerateOptions, Generator};
use crate::data::{ChatTemplate, DataOptions, DatasetSpec, DatasetType, Message, TemplateVars, Tokenizer};
use crate::{Error, Result};

/// One evaluation item: prompt tokens and the expected answer text.
#[derive(Clone, Debug)]
pub struct Reference {
    pub prompt: Vec<u32>,
    pub answer: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ExactMatch {
    pub correct: usize,
    pub total: usize,
    /// Up to a few (expected, got) pairs, for the report.
    pub examples: Vec<(String, String)>,
}

impl ExactMatch {
    pub fn percent(&self) -> f64 {
        100.0 * self.correct as f64 / self.total.max(1) as f64
    }
}

/// The rows of a dataset's files, read as training reads them (JSON arrays or JSON Lines,
/// `data_files`, folders).
fn rows(spec: &DatasetSpec) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let mut out = Vec::new();
    for src in crate::data::reader::read_sources(spec)? {
        out.extend(crate::data::reader::parse_rows(&src)?.into_iter().map(|r| r.fields));
    }
    Ok(out)
}

/// Whether rows of this dataset type carry a reference answer for [`references`].
pub fn has_references(kind: DatasetType) -> bool {
    matches!(kind, DatasetType::ChatTemplate | DatasetType::Alpaca)
}

/// Prompts and reference answers of a dataset: the last assistant turn of a
/// `chat_template` row, or the `output` of an `alpaca` row.
/// The template is the one training renders the dataset with (`opts` holds the top-level
/// `chat_template` keys).
pub fn references(spec: &DatasetSpec, opts: &DataOptions, tok: &Tokenizer, limit: usize) -> Result<Vec<Reference>> {
    let mut out = Vec::new();
    match spec.kind {
        DatasetType::ChatTemplate => {
            let template = ChatTemplate::new(&crate::data::formats::chat::template_source(spec, opts, tok)?)?;
            let vars = TemplateVars::from_tokenizer(tok);
            let field = spec.field_messages.clone().unwrap_or_else(|| "messages".into());
            let map = spec.message_property_mappings.clone().unwrap_or_default();
            let (role_key, content_key) = (
                map.get("role").cloned().unwrap_or_else(|| "role".into()),
                map.get("content").cloned().unwrap_or_else(|| "content".into()),
            );
            for row in rows(spec)?.into_iter().take(limit) {
                let msgs: Vec<Message> = row
                    .get(&field)
                    .and_then(|v| v.as_array())
                    .ok_or_else(|| Error::Data(format!("{}: a row has no `{field}` list", spec.path)))?
                    .iter()
                    .map(|m| {
                        Message::new(
                            m[&role_key].as_str().unwrap_or(""),
                            m[&content_key].as_str().unwrap_or(""),
                        )
                    })
                    .collect();
                let Some(last) = msgs.iter().rposition(|m| m.role == "assistant") else {
                    continue;
                };
                let text = template.render(&msgs[..last], true, &vars)?;
                out.push(Reference {
                    prompt: tok.encode(&text, false)?,
                    answer: msgs[last].content.clone(),
                });
            }
        }
        DatasetType::Alpaca => {
            for row in rows(spec)?.into_iter().take(limit) {
                let s = |k: &str| row.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
                let text = crate::data::formats::alpaca::prompt(
                    &s("instruction"),
                    Some(s("input").as_str()).filter(|i| !i.is_empty()),
                );
                out.push(Reference {
                    prompt: tok.encode(&text, true)?,
                    answer: s("output"),
                });
            }
        }
        other => {
            return Err(Error::Data(format!(
                "exact match needs reference answers; dataset type {} has none (use chat_template or alpaca)",
                other.name()
            )))
        }
    }
    Ok(out)
}

/// Generates an answer for every reference and counts exact matches.
pub fn exact_match(
    gen: &mut Generator,
    tok: &Tokenizer,
    refs: &[Reference],
    max_new_tokens: usize,
) -> Result<ExactMatch> {
    let mut stop: Vec<u32> = tok.eos_id().into_iter().collect();
    for t in ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|endoftext|>"] {
        stop.extend(tok.token_to_id(t));
    }
    let opts = GenerateOptions {
        max_new_tokens,
        stop_ids: stop,
        ..Default::default()
    };
    let prompts: Vec<Vec<u32>> = refs.iter().map(|r| r.prompt.clone()).collect();
    let outs = gen.generate(&prompts, &opts)?;
    let got: Vec<String> = outs.iter().map(|o| tok.decode(o, true)).collect::<Result<_>>()?;
    Ok(score_answers(
        refs.iter()
            .map(|r| r.answer.as_str())
            .zip(got.iter().map(String::as_str)),
    ))
}

/// Whether a generated answer is the reference: equal after trimming whitespace at both
/// ends (nothing else is normalised: case and punctuation count).
pub fn is_exact_match(got: &str, expected: &str) -> bool {
    got.trim() == expected.trim()
}

/// Counts exact matches over `(expected, got)` pairs and keeps the first three as examples.
pub fn score_answers<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> ExactMatch {
    let mut m = ExactMatch {
        correct: 0,
        total: 0,
        examples: Vec::new(),
    };
    for (want, got) in pairs {
        m.total += 1;
        if is_exact_match(got, want) {
            m.correct += 1;
        }
        if m.examples.len() < 3 {
            m.examples.push((want.trim().to_string(), got.trim().to_string()));
        }
    }
    m
}
