//! Writes the demo's bundled model into `web-demo/model/` (or the folder given): a
//! two-layer Llama with random weights and a byte-level BPE tokenizer (the 256 bytes plus
//! ChatML's special tokens, no merges). Deterministic: the same files on every run.
//!
//! cargo run --release -p ferrotune-web-demo --bin make-tiny-model [-- DIR]

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    if let Err(e) = native::run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use ferrotune::{Error, HostTensor, Result};
    use rand::{RngExt, SeedableRng};
    use serde_json::json;
    use std::path::{Path, PathBuf};
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};

    const HIDDEN: usize = 64;
    const INTERMEDIATE: usize = 128;
    const LAYERS: usize = 2;
    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const HEAD_DIM: usize = HIDDEN / HEADS;
    /// 256 bytes + 3 special tokens, rounded up to a multiple of 8.
    const VOCAB: usize = 264;
    const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    const SEED: u64 = 20_251_125;
    /// Standard deviation of the embeddings (tied with the output layer: large enough
    /// that logits can move far from uniform) and of the other matrices (HF's 0.02).
    const EMBED_STD: f64 = 0.25;
    const LINEAR_STD: f64 = 0.02;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
        let p = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| Error::io(&p, e))
    }

    /// Byte-level BPE without merges: every byte is one token, so any text encodes.
    fn tokenizer() -> Result<String> {
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        let vocab: Vocab = alphabet
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32))
            .collect();
        let mut tok = Tokenizer::new(BPE::new(vocab, vec![]));
        tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        tok.with_decoder(Some(ByteLevel::default()));
        tok.add_special_tokens(SPECIALS.map(|s| AddedToken::from(s, true)))
            .map_err(|e| ferrotune::msg!("tokenizer.json: {e}"))?;
        tok.to_string(true).map_err(|e| ferrotune::msg!("tokenizer.json: {e}"))
    }

    /// Uniform values with standard deviation `std` (deterministic in the generator).
    fn uniform(rng: &mut rand_chacha::ChaCha8Rng, shape: &[usize], std: f64) -> HostTensor {
        let a = std * 3f64.sqrt();
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-a..a) as f32).collect();
        HostTensor::from_f32(shape, &v)
    }

    fn weights() -> Vec<(String, HostTensor)> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(SEED);
        let mut w = vec![(
            "model.embed_tokens.weight".to_string(),
            uniform(&mut rng, &[VOCAB, HIDDEN], EMBED_STD),
        )];
        let ones = |n: usize| HostTensor::from_f32(&[n], &vec![1.0; n]);
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            let kv = KV_HEADS * HEAD_DIM;
            for (name, out, inp) in [
                ("self_attn.q_proj", HIDDEN, HIDDEN),
                ("self_attn.k_proj", kv, HIDDEN),
                ("self_attn.v_proj", kv, HIDDEN),
                ("self_attn.o_proj", HIDDEN, HIDDEN),
                ("mlp.gate_proj", INTERMEDIATE, HIDDEN),
                ("mlp.up_proj", INTERMEDIATE, HIDDEN),
                ("mlp.down_proj", HIDDEN, INTERMEDIATE),
            ] {
                w.push((format!("{p}.{name}.weight"), uniform(&mut rng, &[out, inp], LINEAR_STD)));
            }
            w.push((format!("{p}.input_layernorm.weight"), ones(HIDDEN)));
            w.push((format!("{p}.post_attention_layernorm.weight"), ones(HIDDEN)));
        }
        w.push(("model.norm.weight".to_string(), ones(HIDDEN)));
        w
    }

    pub fn run() -> Result<()> {
        let dir = std::env::args()
            .nth(1)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("model"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "hidden_act": "silu",
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": true,
            "vocab_size": VOCAB,
            "bos_token_id": null,
            "eos_token_id": 258,
            "pad_token_id": 256,
            "torch_dtype": "float32"
        });
        let tok_config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": null,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": null,
            "add_prefix_space": false,
            "model_max_length": 256,
            "chat_template": CHATML
        });
        write(
            &dir,
            "config.json",
            &serde_json::to_string_pretty(&config).expect("json"),
        )?;
        write(
            &dir,
            "tokenizer_config.json",
            &serde_json::to_string_pretty(&tok_config).expect("json"),
        )?;
        write(&dir, "tokenizer.json", &tokenizer()?)?;
        ferrotune::model::write_safetensors(&dir.join("model.safetensors"), &weights(), None)?;
        println!("wrote {}", dir.display());
        Ok(())
    }
}
