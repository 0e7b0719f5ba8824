//! Datasets to fixed-shape training batches.
//!
//! The order a training run uses the pieces in:
//! - [`tokenizer`] loads a Hugging Face `tokenizer.json` + `tokenizer_config.json`;
//!   [`chat_template`] renders its Jinja chat template in transformers' dialect.
//! - [`config`] holds the axolotl dataset keys ([`DatasetSpec`], [`DataOptions`]).
//! - [`formats`] turns one dataset row into [`Sample`]s (token ids + labels) for the
//!   `alpaca`, `completion`, `chat_template` and `input_output` types.
//! - [`dataset::prepare`] reads the files, tokenizes, filters, splits train/eval, shuffles
//!   and caches the result.
//! - [`schedule::BatchSchedule`] plans each epoch's optimizer steps (multipack bins or one
//!   sample per row) and [`collate::collate`] builds the static-shape [`PackedBatch`].
//! - [`generate`] writes the demo data sets (addition, WordNet definitions).

mod atomic;
mod cache;
pub mod chat_template;
pub mod collate;
pub mod config;
pub mod dataset;
pub mod formats;
pub mod generate;
pub mod packing;
mod pyjson;
pub(crate) mod reader;
pub mod sample;
pub mod schedule;
pub mod tokenizer;
mod tokenizer_config;

pub use chat_template::{ChatTemplate, Message, TemplateVars};
pub use collate::{collate, PackedBatch};
pub use config::{ChatTemplateChoice, DataOptions, DatasetSpec, DatasetType, ExcessLengthStrategy, TrainOnEos};
pub use dataset::{prepare, prepare_bytes, DataStats, PreparedData};
pub use sample::{Sample, IGNORE_INDEX};
pub use schedule::{BatchLayout, BatchSchedule, EpochPlan, MicroBatch, ScheduleOptions, SchedulePosition, Step};
pub use tokenizer::{SpecialTokens, Tokenizer};
