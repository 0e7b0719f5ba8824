//! `type: input_output`: `{"segments": [{"text": ..., "label": true|false}]}`. Each segment is
//! tokenized on its own without special tokens and trained when `label` is true (or with
//! `train_on_inputs`); axolotl `src/axolotl/prompt_strategies/input_output.py`.

use crate::data::reader::kind;
use crate::data::sample::{Sample, IGNORE_INDEX};
use crate::data::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde_json::Value;

pub fn tokenize(tok: &Tokenizer, segments: &Value, train_on_inputs: bool) -> Result<Sample> {
    let list = segments.as_array().ok_or_else(|| {
        Error::Msg(format!(
            "field `segments` must be an array of {{text, label}} objects, found {}",
            kind(segments)
        ))
    })?;
    let mut sample = Sample {
        input_ids: Vec::new(),
        labels: Vec::new(),
    };
    for (i, seg) in list.iter().enumerate() {
        let text = match seg.get("text") {
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(Error::Msg(format!(
                    "segments[{i}].text must be a string, found {}",
                    kind(other)
                )))
            }
            None => return Err(Error::Msg(format!("segments[{i}] has no `text`"))),
        };
        let label = match seg.get("label") {
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(Error::Msg(format!(
                    "segments[{i}].label must be true or false, found {}",
                    kind(other)
                )))
            }
            None => {
                return Err(Error::Msg(format!(
                    "segments[{i}] has no `label` (true to train on it, false not to)"
                )))
            }
        };
        let ids = tok.encode(text, false)?;
        let train = label || train_on_inputs;
        sample
            .labels
            .extend(ids.iter().map(|&t| if train { t as i32 } else { IGNORE_INDEX }));
        sample.input_ids.extend(ids);
    }
    Ok(sample)
}
