//! Dataset formats: one row of a dataset to one or more [`Sample`]s.
//!
//! Errors returned here describe the row's problem; the caller adds the file and line.

pub mod alpaca;
pub mod chat;
pub mod completion;
pub mod input_output;

use super::config::{DataOptions, DatasetSpec, DatasetType};
use super::reader::kind;
use super::sample::Sample;
use super::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde_json::{Map, Value};

/// Turns rows of one dataset into samples.
#[derive(Debug)]
pub enum Formatter {
    Alpaca { sequence_len: usize, train_on_inputs: bool },
    Completion { field: String, sequence_len: usize },
    Chat(Box<chat::ChatFormat>),
    InputOutput { train_on_inputs: bool },
}

impl Formatter {
    pub fn new(spec: &DatasetSpec, opts: &DataOptions, tok: &Tokenizer) -> Result<Self> {
        Ok(match spec.kind {
            DatasetType::Alpaca => Formatter::Alpaca {
                sequence_len: opts.sequence_len,
                train_on_inputs: opts.train_on_inputs,
            },
            DatasetType::Completion => Formatter::Completion {
                field: spec.field_or_default().to_string(),
                sequence_len: opts.sequence_len,
            },
            DatasetType::ChatTemplate => Formatter::Chat(Box::new(chat::ChatFormat::new(spec, opts, tok)?)),
            DatasetType::InputOutput => Formatter::InputOutput {
                train_on_inputs: opts.train_on_inputs,
            },
        })
    }

    /// The samples of one row (several for long `completion` text).
    pub fn format_row(&self, tok: &Tokenizer, row: &Map<String, Value>) -> Result<Vec<Sample>> {
        match self {
            Formatter::Alpaca {
                sequence_len,
                train_on_inputs,
            } => {
                let ty = DatasetType::Alpaca;
                let instruction = string_field(row, "instruction", ty, "")?;
                let input = optional_string(row, "input", ty)?;
                let output = string_field(row, "output", ty, "")?;
                Ok(vec![alpaca::tokenize(
                    tok,
                    instruction,
                    input,
                    output,
                    *sequence_len,
                    *train_on_inputs,
                )?])
            }
            Formatter::Completion { field, sequence_len } => {
                let hint = if field == "text" {
                    "; set `field:` to the column that holds the text"
                } else {
                    ""
                };
                let text = string_field(row, field, DatasetType::Completion, hint)?;
                completion::tokenize(tok, text, *sequence_len)
            }
            Formatter::Chat(chat) => Ok(vec![chat.tokenize(tok, row)?]),
            Formatter::InputOutput { train_on_inputs } => {
                let segments = field(row, "segments", DatasetType::InputOutput, "")?;
                Ok(vec![input_output::tokenize(tok, segments, *train_on_inputs)?])
            }
        }
    }
}

/// The fields a row has, for error messages.
pub(crate) fn keys(row: &Map<String, Value>) -> String {
    if row.is_empty() {
        "none".to_string()
    } else {
        row.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
    }
}

pub(crate) fn field<'a>(row: &'a Map<String, Value>, name: &str, ty: DatasetType, hint: &str) -> Result<&'a Value> {
    row.get(name).ok_or_else(|| {
        Error::Msg(format!(
            "missing field `{name}`, which dataset type {} needs; the row has fields {}{hint}",
            ty.name(),
            keys(row)
        ))
    })
}

pub(crate) fn string_field<'a>(
    row: &'a Map<String, Value>,
    name: &str,
    ty: DatasetType,
    hint: &str,
) -> Result<&'a str> {
    match field(row, name, ty, hint)? {
        Value::String(s) => Ok(s),
        other => Err(Error::Msg(format!(
            "field `{name}` must be a string for dataset type {}, found {}",
            ty.name(),
            kind(other)
        ))),
    }
}

/// A field that may be missing or null.
pub(crate) fn optional_string<'a>(row: &'a Map<String, Value>, name: &str, ty: DatasetType) -> Result<Option<&'a str>> {
    match row.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Error::Msg(format!(
            "field `{name}` must be a string for dataset type {}, found {}",
            ty.name(),
            kind(other)
        ))),
    }
}
