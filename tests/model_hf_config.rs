//! config.json parsing and writing, and RoPE frequencies against transformers' own values
//! (tests/fixtures/model/rope_cases.json from scripts/fixtures/model_rope_fixtures.py,
//! transformers 5.17 / torch 2.11).

use std::path::Path;

use ferrotune::model::{Arch, ModelConfig, RopeScaling};
use ferrotune::DType;
use serde_json::{json, Value};

fn parse(v: Value) -> ferrotune::Result<ModelConfig> {
    ModelConfig::from_value(&v, "config.json")
}

fn llama_base() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 8, "vocab_size": 1000
    })
}

fn rope_cases() -> Vec<Value> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/rope_cases.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    doc["cases"].as_array().unwrap().clone()
}

#[test]
fn rope_inv_freq_equals_transformers() {
    let cases = rope_cases();
    assert_eq!(cases.len(), 10);
    let mut kinds = std::collections::HashSet::new();
    for c in &cases {
        let name = c["name"].as_str().unwrap();
        let want: Vec<f32> = c["inv_freq"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let want_scale = c["attention_scaling"].as_f64().unwrap() as f32;
        // The same config as transformers 4 wrote it and as transformers 5 serialises it.
        for key in ["config", "config_transformers"] {
            let cfg = parse(c[key].clone()).unwrap_or_else(|e| panic!("{name} {key}: {e}"));
            kinds.insert(cfg.rope_scaling.as_ref().map(|s| s.rope_type()).unwrap_or("default"));
            let got = cfg.rope_init();
            assert_eq!(got.inv_freq.len(), want.len(), "{name}");
            assert_eq!(got.inv_freq, cfg.rope_inv_freq());
            for (i, (a, b)) in got.inv_freq.iter().zip(&want).enumerate() {
                // f32 pow may differ from torch's by an ulp or two.
                assert!(
                    (a - b).abs() <= 4.0 * f32::EPSILON * b.abs(),
                    "{name} {key} inv_freq[{i}]: {a} vs {b}"
                );
            }
            assert!(
                (got.attention_scaling - want_scale).abs() <= 1e-6,
                "{name}: {} vs {want_scale}",
                got.attention_scaling
            );
            assert_eq!(cfg.rope_attention_scaling(), got.attention_scaling);
        }
    }
    for k in ["default", "linear", "dynamic", "yarn", "llama3"] {
        assert!(kinds.contains(k), "no case for {k}");
    }
    // llama3 really scales: the lowest frequencies are divided by the factor 8.
    let c = cases.iter().find(|c| c["name"] == "llama3").unwrap();
    let cfg = parse(c["config"].clone()).unwrap();
    let unscaled = ModelConfig {
        rope_scaling: None,
        ..cfg.clone()
    }
    .rope_inv_freq();
    let scaled = cfg.rope_inv_freq();
    assert_eq!(scaled[0], unscaled[0]);
    assert!((scaled[63] * 8.0 - unscaled[63]).abs() < 1e-6 * unscaled[63]);
}

#[test]
fn to_json_round_trips_every_case() {
    for c in rope_cases() {
        let cfg = parse(c["config"].clone()).unwrap();
        let back = parse(cfg.to_json()).unwrap();
        assert_eq!(back, cfg, "{}", c["name"]);
        assert_eq!(back.rope_init(), cfg.rope_init());
    }
}

#[test]
fn defaults_follow_transformers() {
    let cfg = parse(llama_base()).unwrap();
    assert_eq!(cfg.arch, Arch::Llama);
    assert_eq!(cfg.num_key_value_heads, 8);
    assert_eq!(cfg.head_dim, 32);
    assert_eq!(cfg.rope_theta, 10000.0);
    assert_eq!(cfg.rms_norm_eps, 1e-6);
    assert_eq!(cfg.max_position_embeddings, 2048);
    assert!(!cfg.tie_word_embeddings && !cfg.attention_bias && !cfg.o_proj_bias && !cfg.mlp_bias);
    assert_eq!(cfg.sliding_window, None);
    assert_eq!(cfg.torch_dtype, None);

    let mut v = llama_base();
    v["head_dim"] = json!(64);
    v["num_key_value_heads"] = json!(2);
    v["attention_bias"] = json!(true);
    v["torch_dtype"] = json!("bfloat16");
    v["eos_token_id"] = json!([128001, 128009]);
    v["bos_token_id"] = json!(128000);
    let cfg = parse(v).unwrap();
    assert_eq!((cfg.head_dim, cfg.num_key_value_heads), (64, 2));
    assert!(cfg.attention_bias && cfg.o_proj_bias);
    assert_eq!(cfg.torch_dtype, Some(DType::BF16));
    assert_eq!(cfg.eos_token_id, vec![128001, 128009]);
    assert_eq!(cfg.bos_token_id, Some(128000));
    // transformers 5 spells it `dtype`.
    let mut v = llama_base();
    v["dtype"] = json!("float16");
    assert_eq!(parse(v).unwrap().torch_dtype, Some(DType::F16));
}

#[test]
fn mistral_and_qwen2_options() {
    let mut m = llama_base();
    m["architectures"] = json!(["MistralForCausalLM"]);
    m["sliding_window"] = json!(4096);
    let cfg = parse(m.clone()).unwrap();
    assert_eq!(cfg.arch, Arch::Mistral);
    assert_eq!(cfg.sliding_window, Some(4096));
    assert!(cfg.layer_uses_sliding_window(0) && cfg.layer_uses_sliding_window(1));
    m["sliding_window"] = Value::Null;
    assert_eq!(parse(m).unwrap().sliding_window, None);

    let mut q = llama_base();
    q["architectures"] = json!(["Qwen2ForCausalLM"]);
    q["sliding_window"] = json!(4096);
    q["use_sliding_window"] = json!(false);
    let cfg = parse(q.clone()).unwrap();
    assert_eq!(cfg.arch, Arch::Qwen2);
    assert!(cfg.attention_bias && !cfg.o_proj_bias);
    assert_eq!(cfg.sliding_window, None);
    assert!(!cfg.layer_uses_sliding_window(1));
    q["use_sliding_window"] = json!(true);
    q["max_window_layers"] = json!(1);
    let cfg = parse(q).unwrap();
    assert_eq!(cfg.sliding_window, Some(4096));
    assert!(!cfg.layer_uses_sliding_window(0) && cfg.layer_uses_sliding_window(1));
    assert_eq!(parse(cfg.to_json()).unwrap(), cfg);
}

#[test]
fn errors_name_the_problem() {
    let mut v = llama_base();
    v["architectures"] = json!(["GPT2LMHeadModel"]);
    let err = parse(v).unwrap_err().to_string();
    assert!(err.contains("GPT2LMHeadModel"), "{err}");
    assert!(
        err.contains("LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
        "{err}"
    );

    let mut v = llama_base();
    v.as_object_mut().unwrap().remove("hidden_size");
    let err = parse(v).unwrap_err().to_string();
    assert!(err.contains("missing required key `hidden_size`"), "{err}");

    let mut v = llama_base();
    v["rope_scaling"] = json!({"rope_type": "longrope", "factor": 2.0});
    let err = parse(v).unwrap_err().to_string();
    assert!(
        err.contains("longrope") && err.contains(RopeScaling::SUPPORTED),
        "{err}"
    );

    let mut v = llama_base();
    v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
    let err = parse(v).unwrap_err().to_string();
    assert!(err.contains("low_freq_factor"), "{err}");

    let mut v = llama_base();
    v["num_key_value_heads"] = json!(3);
    let err = parse(v).unwrap_err().to_string();
    assert!(err.contains("multiple of `num_key_value_heads` (3)"), "{err}");

    let mut v = llama_base();
    v["hidden_act"] = json!("gelu");
    assert!(parse(v).unwrap_err().to_string().contains("gelu"));

    let err = ModelConfig::parse("{not json", "x/config.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("x/config.json") && err.contains("not valid JSON"), "{err}");
}

#[test]
fn write_is_atomic_and_loadable() {
    let dir = std::env::temp_dir().join(format!("ferrotune-model-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = parse(llama_base()).unwrap();
    let p = dir.join("config.json");
    cfg.write(&p).unwrap();
    assert_eq!(ModelConfig::from_file(&p).unwrap(), cfg);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("config.json")]);
    std::fs::remove_dir_all(dir).unwrap();
}
