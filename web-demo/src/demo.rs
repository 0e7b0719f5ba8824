//! The demo's logic, the same on the web and natively: a model from file bytes, a LoRA
//! run over a dataset given as bytes (or the built-in addition task), stepping, the PEFT
//! adapter's files, and generation with or without the adapter. The browser bindings
//! ([`crate::web`]) and the native reference run (`web-demo-reference`) both drive this.

use ferrotune::adapters::lora::{self, AdapterConfig};
use ferrotune::adapters::MergedWeights;
use ferrotune::backend::Backend;
use ferrotune::data::generate::arithmetic::{generate_addition, AdditionOptions};
use ferrotune::data::{ChatTemplate, DatasetSpec, DatasetType, Message, TemplateVars, Tokenizer};
use ferrotune::infer::{GenerateOptions, Generator};
use ferrotune::model::ModelConfig;
use ferrotune::train::session::{Precision, WeightSource};
use ferrotune::train::trainer::{RunPlan, StepReport, Trainer};
use ferrotune::{Config, Error, HostTensor, Result};
use std::collections::BTreeMap;

/// The files of a model folder, as bytes.
pub struct ModelFiles {
    pub config_json: Option<Vec<u8>>,
    pub weights: Option<Vec<u8>>,
    pub tokenizer_json: Option<Vec<u8>>,
    pub tokenizer_config_json: Option<Vec<u8>>,
}

/// A base model held in memory.
pub struct Model {
    pub name: String,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub weights: BTreeMap<String, HostTensor>,
}

/// The bundled two-layer Llama (`web-demo/model/`, written by `make-tiny-model`).
pub fn bundled_files() -> ModelFiles {
    ModelFiles {
        config_json: Some(include_bytes!("../model/config.json").to_vec()),
        weights: Some(include_bytes!("../model/model.safetensors").to_vec()),
        tokenizer_json: Some(include_bytes!("../model/tokenizer.json").to_vec()),
        tokenizer_config_json: Some(include_bytes!("../model/tokenizer_config.json").to_vec()),
    }
}

pub const BUNDLED_NAME: &str = "ferrotune-tiny-llama";

const CONFIG_HINT: &str = "pick the folder of a model of a supported architecture, with the config.json \
                           transformers saved for it";
const TOKENIZER_HINT: &str = "use the tokenizer.json saved with the model (a Hugging Face `tokenizers` \
                              file, as save_pretrained writes it)";

/// The error with what to do about it appended.
fn with_hint(e: Error, hint: &str) -> Error {
    match e {
        Error::Format { path, msg } => Error::Format {
            path,
            msg: format!("{msg}\nTo fix: {hint}."),
        },
        Error::Config(msg) => Error::Config(format!("{msg}\nTo fix: {hint}.")),
        other => ferrotune::msg!("{other}\nTo fix: {hint}."),
    }
}

impl Model {
    /// Checks that the needed files are there and readable; every error says which file
    /// and what to do.
    pub fn load(name: &str, files: ModelFiles) -> Result<Model> {
        let mut missing = Vec::new();
        if files.config_json.is_none() {
            missing.push("config.json");
        }
        if files.weights.is_none() {
            missing.push("model.safetensors");
        }
        if files.tokenizer_json.is_none() {
            missing.push("tokenizer.json");
        }
        if !missing.is_empty() {
            return Err(Error::Config(format!(
                "the model is missing {}; pick the folder of a Hugging Face Llama-family model \
                 (config.json, model.safetensors, tokenizer.json; sharded weights are not supported here)",
                missing.join(", ")
            )));
        }
        let config_text = String::from_utf8(files.config_json.unwrap_or_default())
            .map_err(|_| Error::format("config.json", "not UTF-8 text"))
            .map_err(|e| with_hint(e, CONFIG_HINT))?;
        let config = ModelConfig::parse(&config_text, "config.json").map_err(|e| with_hint(e, CONFIG_HINT))?;
        let tokenizer = Tokenizer::from_bytes(
            files.tokenizer_json.as_deref().unwrap_or_default(),
            files.tokenizer_config_json.as_deref(),
        )
        .map_err(|e| with_hint(e, TOKENIZER_HINT))?;
        let weights = ferrotune::model::read_safetensors_bytes(
            files.weights.as_deref().unwrap_or_default(),
            "model.safetensors",
        )?;
        Ok(Model {
            name: name.to_string(),
            config,
            tokenizer,
            weights,
        })
    }

    pub fn bundled() -> Result<Model> {
        Model::load(BUNDLED_NAME, bundled_files())
    }

    /// `hidden x layers, vocab` in words, for the page.
    pub fn describe(&self) -> String {
        let c = &self.config;
        let params: usize = self.weights.values().map(|t| t.numel()).sum();
        format!(
            "{}: {} layers, hidden {}, vocab {}, {:.2}M parameters",
            self.name,
            c.num_hidden_layers,
            c.hidden_size,
            c.vocab_size,
            params as f64 / 1e6
        )
    }
}

/// Where the training rows come from.
pub enum Dataset {
    /// `ferrotune generate arithmetic`'s task: `What is a + b?` -> the sum.
    Addition { digits: u32, rows: usize, seed: u64 },
    /// A `.jsonl` / `.json` file in one of the dataset formats, detected from its first row.
    File { name: String, bytes: Vec<u8> },
}

impl Dataset {
    /// The rows as a file: its name, its bytes and its format.
    pub fn into_file(self) -> Result<(String, Vec<u8>, DataFormat)> {
        match self {
            Dataset::Addition { digits, rows, seed } => {
                let set = generate_addition(&AdditionOptions {
                    digits,
                    n_train: rows,
                    n_eval: 0,
                    seed,
                })?;
                let mut text = String::new();
                for p in &set.train {
                    text.push_str(&p.chat_line());
                    text.push('\n');
                }
                Ok(("addition.jsonl".to_string(), text.into_bytes(), DataFormat::Chat))
            }
            Dataset::File { name, bytes } => {
                let format = detect_format(&name, &bytes)?;
                Ok((name, bytes, format))
            }
        }
    }
}

/// A dataset file's row format, as the page tells them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFormat {
    /// `messages: [{role, content}]`.
    Chat,
    /// ShareGPT: `conversations: [{from, value}]` with `human` / `gpt` / `system` turns.
    ShareGpt,
    /// `instruction`, optional `input`, `output`.
    Alpaca,
    /// `segments: [{text, label}]`.
    InputOutput,
    /// `text`.
    Completion,
}

/// Which of our dataset formats a file's rows are in, from the keys of its first row.
pub fn detect_format(name: &str, bytes: &[u8]) -> Result<DataFormat> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| Error::Data(format!("{name}: not UTF-8 text; save it as UTF-8")))?;
    // Editors on Windows write a byte order mark; the reader skips it too.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| Error::Data(format!("{name}: the file is empty; give one JSON object per line")))?;
    let row: serde_json::Value = if first.trim_start().starts_with('[') {
        let all: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Data(format!("{name}:{}: not valid JSON: {e}", e.line())))?;
        all.get(0).cloned().unwrap_or_default()
    } else {
        serde_json::from_str(first).map_err(|e| {
            Error::Data(format!(
                "{name}:1: malformed JSON at column {}: {e}; each line must be one JSON object",
                e.column()
            ))
        })?
    };
    let has = |k: &str| row.get(k).is_some();
    Ok(if has("messages") {
        DataFormat::Chat
    } else if has("conversations") {
        DataFormat::ShareGpt
    } else if has("instruction") {
        DataFormat::Alpaca
    } else if has("segments") {
        DataFormat::InputOutput
    } else if has("text") {
        DataFormat::Completion
    } else {
        let keys = match row.as_object() {
            Some(o) if !o.is_empty() => o.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
            Some(_) => "no keys".to_string(),
            None => format!("not an object but {}", json_kind(&row)),
        };
        return Err(Error::Data(format!(
            "{name}:1: no known dataset format (the first row has {keys}); rows need `messages` (chat), \
             `conversations` (ShareGPT), `instruction`/`output` (alpaca), `text` (completion) or `segments` \
             (input_output)"
        )));
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The `datasets[0]` entry for a file in `format`.
fn dataset_entry(data_name: &str, format: DataFormat) -> serde_json::Value {
    use serde_json::json;
    match format {
        DataFormat::Chat => json!({"path": data_name, "type": DatasetType::ChatTemplate}),
        // The ShareGPT keys, as axolotl's chat_template type reads them; the turns keep
        // their own role names, so `gpt` turns are the trained ones.
        DataFormat::ShareGpt => json!({
            "path": data_name,
            "type": DatasetType::ChatTemplate,
            "field_messages": "conversations",
            "message_property_mappings": {"role": "from", "content": "value"},
            "roles_to_train": ["gpt", "assistant"],
        }),
        DataFormat::Alpaca => json!({"path": data_name, "type": DatasetType::Alpaca}),
        DataFormat::InputOutput => json!({"path": data_name, "type": DatasetType::InputOutput}),
        DataFormat::Completion => json!({"path": data_name, "type": DatasetType::Completion}),
    }
}

/// The knobs on the page.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct TrainOptions {
    pub rank: usize,
    pub learning_rate: f64,
    pub steps: u64,
    pub seed: u64,
    pub sequence_len: usize,
    pub micro_batch_size: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            rank: 8,
            learning_rate: 1e-2,
            steps: 20,
            seed: 42,
            sequence_len: 128,
            micro_batch_size: 2,
        }
    }
}

/// The run's config, as a YAML file would give it (JSON is YAML).
pub fn config(model: &Model, data_name: &str, format: DataFormat, o: &TrainOptions) -> Result<Config> {
    let v = serde_json::json!({
        "base_model": model.name,
        "datasets": [dataset_entry(data_name, format)],
        "chat_template": "tokenizer_default_fallback_chatml",
        "sequence_len": o.sequence_len,
        "sample_packing": true,
        "micro_batch_size": o.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": o.steps,
        "learning_rate": o.learning_rate,
        "lr_scheduler": "constant",
        "adapter": "lora",
        "lora_r": o.rank,
        "lora_alpha": 2 * o.rank,
        "lora_dropout": 0.0,
        "lora_target_linear": true,
        "output_dir": "browser",
        "seed": o.seed,
    });
    Config::from_yaml_without_files(&v.to_string())
}

/// One LoRA fine-tuning run.
pub struct Run {
    pub trainer: Trainer,
    pub losses: Vec<f64>,
    pub train_samples: usize,
}

impl Run {
    pub fn new(model: &Model, data: Dataset, o: &TrainOptions, backend: Box<dyn Backend>) -> Result<Run> {
        if o.rank == 0 || o.steps == 0 {
            return Err(Error::Config("LoRA rank and steps must be at least 1".into()));
        }
        let (name, bytes, format) = data.into_file()?;
        let cfg = config(model, &name, format, o)?;
        let spec: &DatasetSpec = &cfg.datasets[0];
        let data = ferrotune::data::prepare_bytes(spec, &name, bytes, &cfg.data, &model.tokenizer)?;
        let train_samples = data.train.len();
        let pad = model
            .tokenizer
            .pad_id()
            .or(model.tokenizer.eos_id())
            .ok_or_else(|| Error::Config("the tokenizer has neither a pad nor an eos token".into()))?;
        let plan = RunPlan::new(cfg, &model.config, Precision::F32, data, pad, &model.name)?;
        let trainer = Trainer::new(plan, backend, &model.weights)?;
        Ok(Run {
            trainer,
            losses: Vec::new(),
            train_samples,
        })
    }

    /// One optimizer step; None when all steps are done.
    pub async fn step(&mut self) -> Result<Option<StepReport>> {
        let r = self.trainer.step_async().await?;
        if let Some(r) = &r {
            self.losses.push(r.loss);
        }
        Ok(r)
    }

    /// The adapter as PEFT saves it: (config, tensors).
    pub async fn adapter(&mut self) -> Result<Adapter> {
        let config = self
            .trainer
            .adapter_config()
            .cloned()
            .ok_or_else(|| ferrotune::msg!("this run trains no adapter"))?;
        let tensors = self.trainer.trained_tensors_async().await?;
        Ok(Adapter { config, tensors })
    }
}

/// A trained LoRA adapter.
pub struct Adapter {
    pub config: AdapterConfig,
    pub tensors: Vec<(String, HostTensor)>,
}

impl Adapter {
    /// `adapter_model.safetensors` and `adapter_config.json`.
    pub fn files(&self) -> Result<(Vec<u8>, String)> {
        lora::to_bytes(&self.config, &self.tensors)
    }
}

/// A reply to `prompt` (through the chat template), greedy, from the base model or the
/// base with `adapter` merged.
pub async fn generate(
    model: &Model,
    adapter: Option<&Adapter>,
    prompt: &str,
    max_new_tokens: usize,
    backend: Box<dyn Backend>,
) -> Result<String> {
    let tok = &model.tokenizer;
    let template = ChatTemplate::from_tokenizer(tok)?;
    let text = template.render(
        &[Message::new("user", prompt)],
        true,
        &TemplateVars::from_tokenizer(tok),
    )?;
    let ids = tok.encode(&text, false)?;
    let merged;
    let weights: &dyn WeightSource = match adapter {
        Some(a) => {
            merged = MergedWeights {
                base: &model.weights,
                config: a.config.clone(),
                tensors: a.tensors.iter().cloned().collect(),
            };
            &merged
        }
        None => &model.weights,
    };
    let mut opts = GenerateOptions {
        max_new_tokens,
        ..Default::default()
    };
    opts.stop_ids.extend(tok.eos_id());
    for t in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
        opts.stop_ids.extend(tok.token_to_id(t));
    }
    let n = ids.len();
    let mut gen = Generator::new(
        &model.config,
        weights,
        backend,
        Precision::F32,
        1,
        n,
        n + max_new_tokens,
    )?;
    let out = gen.generate_async(&[ids], &opts).await?;
    tok.decode(&out[0], true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune::data::IGNORE_INDEX;

    const SHAREGPT: &[u8] = include_bytes!("../test/data/sharegpt.jsonl");
    const ALPACA: &[u8] = include_bytes!("../test/data/alpaca.jsonl");

    fn prepared(name: &str, bytes: &[u8]) -> Vec<ferrotune::data::Sample> {
        let model = Model::bundled().unwrap();
        let format = detect_format(name, bytes).unwrap();
        // Alpaca's prompt alone is ~180 bytes, one token each for the bundled tokenizer.
        let o = TrainOptions {
            sequence_len: 256,
            ..TrainOptions::default()
        };
        let cfg = config(&model, name, format, &o).unwrap();
        ferrotune::data::prepare_bytes(&cfg.datasets[0], name, bytes.to_vec(), &cfg.data, &model.tokenizer)
            .unwrap()
            .train
    }

    /// The text of a sample's labelled tokens (the bundled tokenizer is byte-level).
    fn labelled_text(s: &ferrotune::data::Sample) -> String {
        let tok = Model::bundled().unwrap().tokenizer;
        let ids: Vec<u32> = s
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .map(|&l| l as u32)
            .collect();
        tok.decode(&ids, false).unwrap()
    }

    #[test]
    fn formats_are_told_apart_by_the_first_row() {
        let f = |text: &str| detect_format("d.jsonl", text.as_bytes());
        assert_eq!(f("{\"messages\": []}\n").unwrap(), DataFormat::Chat);
        assert_eq!(f("\u{feff}{\"messages\": []}\n").unwrap(), DataFormat::Chat);
        assert_eq!(detect_format("s.jsonl", SHAREGPT).unwrap(), DataFormat::ShareGpt);
        assert_eq!(detect_format("a.jsonl", ALPACA).unwrap(), DataFormat::Alpaca);
        assert_eq!(f("[{\"text\": \"x\"}]").unwrap(), DataFormat::Completion);
        assert_eq!(f("\n{\"segments\": []}").unwrap(), DataFormat::InputOutput);
        let e = f("{\"question\": \"q\", \"answer\": \"a\"}\n").unwrap_err().to_string();
        assert!(
            e.contains("d.jsonl:1: no known dataset format (the first row has `question`, `answer`)")
                && e.contains("`conversations` (ShareGPT)"),
            "{e}"
        );
        assert!(f("42\n")
            .unwrap_err()
            .to_string()
            .contains("not an object but a number"));
    }

    #[test]
    fn sharegpt_rows_train_on_the_gpt_turns() {
        // The file starts with a byte order mark; every `gpt` value is trained, followed
        // by the turn's end token, and nothing else.
        let samples = prepared("sharegpt.jsonl", SHAREGPT);
        let text = std::str::from_utf8(SHAREGPT).unwrap().trim_start_matches('\u{feff}');
        let mut want: Vec<String> = text
            .lines()
            .map(|l| {
                let row: serde_json::Value = serde_json::from_str(l).unwrap();
                row["conversations"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|m| m["from"] == "gpt")
                    .map(|m| format!("{}<|im_end|>", m["value"].as_str().unwrap()))
                    .collect()
            })
            .collect();
        let mut got: Vec<String> = samples.iter().map(labelled_text).collect();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        assert_eq!(want.len(), 6);
    }

    #[test]
    fn alpaca_rows_train_on_the_output() {
        let samples = prepared("alpaca.jsonl", ALPACA);
        let mut got: Vec<String> = samples.iter().map(labelled_text).collect();
        got.sort();
        let mut want: Vec<String> = ["enots", "mice", "Red", "chat", "late", "4"]
            .iter()
            .map(|o| format!("{o}<|im_end|>"))
            .collect();
        want.sort();
        assert_eq!(got, want);
    }

    fn files_with(config: &str, tokenizer: &[u8]) -> ModelFiles {
        let mut f = bundled_files();
        f.config_json = Some(config.as_bytes().to_vec());
        f.tokenizer_json = Some(tokenizer.to_vec());
        f
    }

    #[test]
    fn bad_model_files_say_what_to_do() {
        let good_config = std::str::from_utf8(include_bytes!("../model/config.json")).unwrap();
        let good_tok = include_bytes!("../model/tokenizer.json");
        let mamba = good_config.replace("LlamaForCausalLM", "MambaForCausalLM");
        let e = Model::load("m", files_with(&mamba, good_tok))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("config.json: unsupported architecture MambaForCausalLM; supported architectures: ")
                && e.contains("LlamaForCausalLM")
                && e.contains("\nTo fix: pick the folder of a model of a supported architecture"),
            "{e}"
        );
        let e = Model::load("m", files_with(good_config, b"{\"model\": 3"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("tokenizer.json: not a Hugging Face tokenizer.json")
                && e.contains("\nTo fix: use the tokenizer.json saved with the model"),
            "{e}"
        );
    }
}
