//! The dataset keys of an axolotl config: one [`DatasetSpec`] per `datasets[]` entry and the
//! top-level [`DataOptions`]. Key names and defaults follow axolotl
//! (`src/axolotl/utils/schemas/{datasets,config,training}.py`).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// How a dataset's rows are turned into samples (`datasets[].type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetType {
    /// `{instruction, input?, output}` with axolotl's Alpaca prompt.
    Alpaca,
    /// Raw text in `field` (default `text`); every token is trained.
    Completion,
    /// OpenAI-style `messages` rendered with a chat template.
    ChatTemplate,
    /// `{"segments": [{"text", "label"}]}`; segments with `label: true` are trained.
    InputOutput,
}

impl DatasetType {
    pub fn name(self) -> &'static str {
        match self {
            DatasetType::Alpaca => "alpaca",
            DatasetType::Completion => "completion",
            DatasetType::ChatTemplate => "chat_template",
            DatasetType::InputOutput => "input_output",
        }
    }
}

/// Which end-of-turn tokens of a conversation are trained (`train_on_eos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOnEos {
    /// The end-of-turn token of every trained turn.
    #[default]
    Turn,
    /// The end-of-turn token of every turn.
    All,
    /// Only the last end-of-turn token of the conversation.
    Last,
    /// None.
    None,
}

/// Where a `chat_template` dataset's template comes from (`chat_template`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatTemplateChoice {
    /// The template in the tokenizer's `tokenizer_config.json`.
    #[default]
    TokenizerDefault,
    /// ChatML (`<|im_start|>role\ncontent<|im_end|>\n`).
    Chatml,
    /// The template text given in `chat_template_jinja`.
    Jinja,
    /// The tokenizer's template, or ChatML when it has none.
    TokenizerDefaultFallbackChatml,
}

/// What happens to a sample longer than `sequence_len` (`excess_length_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExcessLengthStrategy {
    #[default]
    Drop,
    Truncate,
    Raise,
}

/// One entry of `datasets:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// A `.json` / `.jsonl` file, or a folder of them.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: DatasetType,
    /// Loader type as axolotl spells it (`json`); local JSON is the only kind read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ds_type: Option<String>,
    /// `completion`: the column holding the text (default `text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// `chat_template`: the column holding the message list (default `messages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_messages: Option<String>,
    /// `chat_template`: message property -> key in the data, e.g. `{role: from, content: value}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_property_mappings: Option<BTreeMap<String, String>>,
    /// `chat_template`: roles whose content is trained (default `[assistant]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles_to_train: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_on_eos: Option<TrainOnEos>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<ChatTemplateChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_jinja: Option<String>,
    /// Local files have a single split, `train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Files to read, relative to `path` when it is a folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_files: Option<Vec<String>>,
}

impl DatasetSpec {
    /// A spec with only `path` and `type` set.
    pub fn new(path: impl Into<String>, kind: DatasetType) -> Self {
        DatasetSpec {
            path: path.into(),
            kind,
            ds_type: None,
            field: None,
            field_messages: None,
            message_property_mappings: None,
            roles_to_train: None,
            train_on_eos: None,
            chat_template: None,
            chat_template_jinja: None,
            split: None,
            data_files: None,
        }
    }

    pub fn field_or_default(&self) -> &str {
        self.field.as_deref().unwrap_or("text")
    }

    pub fn field_messages_or_default(&self) -> &str {
        self.field_messages.as_deref().unwrap_or("messages")
    }

    pub fn roles_to_train_or_default(&self) -> Vec<String> {
        self.roles_to_train
            .clone()
            .unwrap_or_else(|| vec!["assistant".to_string()])
    }

    /// Check the keys that serde cannot; `key_path` names this entry, e.g. `datasets[0]`.
    pub fn validate(&self, key_path: &str) -> Result<()> {
        let mut errs = Vec::new();
        if self.path.trim().is_empty() {
            errs.push(format!(
                "{key_path}.path: must name a .json/.jsonl file or a folder of them"
            ));
        }
        if let Some(t) = &self.ds_type {
            if t != "json" && t != "jsonl" {
                errs.push(format!(
                    "{key_path}.ds_type: `{t}` is not supported; only local json/jsonl files are read"
                ));
            }
        }
        if let Some(split) = &self.split {
            if split != "train" {
                errs.push(format!(
                    "{key_path}.split: `{split}` does not exist; local files have a single split, `train`"
                ));
            }
        }
        if let Some(files) = &self.data_files {
            if files.is_empty() {
                errs.push(format!(
                    "{key_path}.data_files: empty list; remove the key or name files"
                ));
            }
        }
        let ty = self.kind.name();
        let not_for = |key: &str, wanted: &str| format!("{key_path}.{key}: only used by type {wanted}, not {ty}");
        if self.field.is_some() && self.kind != DatasetType::Completion {
            errs.push(not_for("field", "completion"));
        }
        if self.kind != DatasetType::ChatTemplate {
            let chat_keys = [
                ("field_messages", self.field_messages.is_some()),
                ("message_property_mappings", self.message_property_mappings.is_some()),
                ("roles_to_train", self.roles_to_train.is_some()),
                ("train_on_eos", self.train_on_eos.is_some()),
                ("chat_template", self.chat_template.is_some()),
                ("chat_template_jinja", self.chat_template_jinja.is_some()),
            ];
            for (key, set) in chat_keys {
                if set {
                    errs.push(not_for(key, "chat_template"));
                }
            }
        }
        match (&self.chat_template, &self.chat_template_jinja) {
            (Some(ChatTemplateChoice::Jinja), None) => errs.push(format!(
                "{key_path}.chat_template_jinja: required when chat_template is `jinja`"
            )),
            (Some(c), Some(_)) if *c != ChatTemplateChoice::Jinja => errs.push(format!(
                "{key_path}.chat_template_jinja: only used with chat_template: jinja (it is {})",
                serde_json::to_string(c).unwrap_or_default().trim_matches('"')
            )),
            _ => {}
        }
        if let Some(m) = &self.message_property_mappings {
            for (prop, src) in m {
                if src.is_empty() {
                    errs.push(format!("{key_path}.message_property_mappings.{prop}: empty key name"));
                }
            }
        }
        if let Some(f) = &self.field_messages {
            if f.is_empty() {
                errs.push(format!("{key_path}.field_messages: empty"));
            }
        }
        if let Some(f) = &self.field {
            if f.is_empty() {
                errs.push(format!("{key_path}.field: empty"));
            }
        }
        join_errors(errs)
    }
}

fn d_sequence_len() -> usize {
    512
}
fn d_true() -> bool {
    true
}
fn d_seed() -> u64 {
    42
}
fn d_group_size() -> usize {
    100_000
}
fn d_bin_size() -> usize {
    200
}
fn d_micro_batch_size() -> usize {
    1
}

/// The top-level keys that shape data preparation and batching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataOptions {
    /// Maximum tokens per sample, and the width of a batch row.
    #[serde(default = "d_sequence_len")]
    pub sequence_len: usize,
    /// Train on the prompt too (alpaca, input_output) or on every turn (chat_template).
    #[serde(default)]
    pub train_on_inputs: bool,
    #[serde(default)]
    pub excess_length_strategy: ExcessLengthStrategy,
    /// Held-out fraction (`0 < v < 1`) or count (`v >= 1`, an integer) for evaluation.
    #[serde(default)]
    pub val_set_size: f64,
    /// Shuffle the training samples (and each epoch's order); axolotl's
    /// `shuffle_merged_datasets` is accepted as another name.
    #[serde(default = "d_true", alias = "shuffle_merged_datasets")]
    pub shuffle: bool,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Folder that caches the tokenized dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_prepared_path: Option<PathBuf>,
    /// Pack several samples into each row (axolotl multipack).
    #[serde(default)]
    pub sample_packing: bool,
    /// Samples per packing group (first-fit runs within a group).
    #[serde(default = "d_group_size")]
    pub sample_packing_group_size: usize,
    /// At most this many samples per bin.
    #[serde(default = "d_bin_size")]
    pub sample_packing_bin_size: usize,
    /// Pack into `micro_batch_size` rows of `sequence_len` instead of one long row.
    #[serde(default)]
    pub multipack_real_batches: bool,
    /// Batches always have the static shape [rows, sequence_len]; only `true` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_to_sequence_len: Option<bool>,
    #[serde(default = "d_micro_batch_size")]
    pub micro_batch_size: usize,
    /// Root-level template for `chat_template` datasets that do not name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<ChatTemplateChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_jinja: Option<String>,
    /// Tokens that end a turn besides the eos token (trained per `train_on_eos`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eot_tokens: Option<Vec<String>>,
}

impl Default for DataOptions {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every DataOptions key has a default")
    }
}

impl DataOptions {
    /// Check the values serde cannot; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let mut errs = Vec::new();
        if self.sequence_len < 2 {
            errs.push(format!(
                "sequence_len: {} is too small; it must be at least 2",
                self.sequence_len
            ));
        }
        if self.micro_batch_size == 0 {
            errs.push("micro_batch_size: must be at least 1".to_string());
        }
        let v = self.val_set_size;
        if !v.is_finite() || v < 0.0 {
            errs.push(format!(
                "val_set_size: {v} must be a fraction in [0, 1) or a whole count >= 1"
            ));
        } else if v >= 1.0 && v.fract() != 0.0 {
            errs.push(format!(
                "val_set_size: {v} is neither a fraction below 1 nor a whole number of samples"
            ));
        }
        if self.sample_packing_group_size == 0 {
            errs.push("sample_packing_group_size: must be at least 1".to_string());
        }
        if self.sample_packing_bin_size == 0 {
            errs.push("sample_packing_bin_size: must be at least 1".to_string());
        }
        if self.pad_to_sequence_len == Some(false) {
            errs.push(
                "pad_to_sequence_len: false is not supported; batches always have the static shape \
                 [rows, sequence_len]. Remove the key or set it to true"
                    .to_string(),
            );
        }
        match (&self.chat_template, &self.chat_template_jinja) {
            (Some(ChatTemplateChoice::Jinja), None) => {
                errs.push("chat_template_jinja: required when chat_template is `jinja`".to_string())
            }
            (Some(c), Some(_)) if *c != ChatTemplateChoice::Jinja => {
                errs.push("chat_template_jinja: only used with chat_template: jinja".to_string())
            }
            _ => {}
        }
        if let Some(p) = &self.dataset_prepared_path {
            if p.as_os_str().is_empty() {
                errs.push("dataset_prepared_path: empty; remove the key or name a folder".to_string());
            }
        }
        join_errors(errs)
    }
}

fn join_errors(errs: Vec<String>) -> Result<()> {
    if errs.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(errs.join("\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_axolotls() {
        let o = DataOptions::default();
        assert_eq!(o.sequence_len, 512);
        assert!(!o.train_on_inputs);
        assert_eq!(o.excess_length_strategy, ExcessLengthStrategy::Drop);
        assert_eq!(o.val_set_size, 0.0);
        assert!(o.shuffle);
        assert_eq!(o.seed, 42);
        assert_eq!(o.sample_packing_group_size, 100_000);
        assert_eq!(o.sample_packing_bin_size, 200);
        assert!(!o.sample_packing && !o.multipack_real_batches);
        assert_eq!(o.micro_batch_size, 1);
        o.validate().unwrap();
    }

    #[test]
    fn dataset_spec_parses_axolotl_yaml() {
        let yaml = "path: data/chat.jsonl\ntype: chat_template\nfield_messages: conversations\n\
                    message_property_mappings:\n  role: from\n  content: value\nroles_to_train: [gpt]\n\
                    train_on_eos: all\nchat_template: chatml\n";
        let spec: DatasetSpec = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(spec.kind, DatasetType::ChatTemplate);
        assert_eq!(spec.field_messages_or_default(), "conversations");
        assert_eq!(spec.message_property_mappings.as_ref().unwrap()["role"], "from");
        assert_eq!(spec.train_on_eos, Some(TrainOnEos::All));
        assert_eq!(spec.chat_template, Some(ChatTemplateChoice::Chatml));
        spec.validate("datasets[0]").unwrap();
    }

    #[test]
    fn unknown_keys_and_values_are_rejected() {
        let err = serde_yaml::from_str::<DatasetSpec>("path: x\ntype: alpaca\nfeild: text\n").unwrap_err();
        assert!(err.to_string().contains("feild"), "{err}");
        let err = serde_yaml::from_str::<DatasetSpec>("path: x\ntype: sharegpt\n").unwrap_err();
        assert!(err.to_string().contains("sharegpt"), "{err}");
        let o: DataOptions = serde_yaml::from_str("shuffle_merged_datasets: false\n").unwrap();
        assert!(!o.shuffle);
        let err = serde_yaml::from_str::<DataOptions>("excess_length_strategy: cut\n").unwrap_err();
        assert!(err.to_string().contains("cut"), "{err}");
    }

    #[test]
    fn validate_names_the_key_path() {
        let mut spec = DatasetSpec::new("x.jsonl", DatasetType::Alpaca);
        spec.roles_to_train = Some(vec!["assistant".into()]);
        spec.field = Some("text".into());
        let err = spec.validate("datasets[2]").unwrap_err().to_string();
        assert!(
            err.contains("datasets[2].roles_to_train: only used by type chat_template"),
            "{err}"
        );
        assert!(err.contains("datasets[2].field: only used by type completion"), "{err}");

        let mut spec = DatasetSpec::new("x.jsonl", DatasetType::ChatTemplate);
        spec.chat_template = Some(ChatTemplateChoice::Jinja);
        let err = spec.validate("datasets[0]").unwrap_err().to_string();
        assert!(err.contains("datasets[0].chat_template_jinja: required"), "{err}");

        let o = DataOptions {
            val_set_size: 2.5,
            micro_batch_size: 0,
            ..Default::default()
        };
        let err = o.validate().unwrap_err().to_string();
        assert!(
            err.contains("val_set_size") && err.contains("micro_batch_size"),
            "{err}"
        );
        let o = DataOptions {
            pad_to_sequence_len: Some(false),
            ..Default::default()
        };
        assert!(o.validate().unwrap_err().to_string().contains("pad_to_sequence_len"));
    }
}
