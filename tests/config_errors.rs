//! Config mistakes are reported before anything is loaded, with the key and what is expected.

mod common;
use ferrotune::Config;

fn base(extra: &str) -> String {
    let dir = common::temp_dir("cfg");
    std::fs::write(dir.join("d.jsonl"), "{\"text\": \"hi\"}\n").unwrap();
    format!(
        "base_model: {0}\ndatasets:\n  - path: {0}/d.jsonl\n    type: completion\nlearning_rate: 1e-4\n{extra}",
        dir.display()
    )
}

fn err(yaml: &str) -> String {
    Config::from_yaml(yaml, &[]).unwrap_err().to_string()
}

#[test]
fn a_good_config_parses_with_axolotl_defaults() {
    let c = Config::from_yaml(&base(""), &[]).unwrap();
    assert_eq!(c.data.sequence_len, 512);
    assert_eq!(c.data.micro_batch_size, 1);
    assert_eq!(c.gradient_accumulation_steps, 1);
    assert_eq!(c.optimizer, "adamw_torch_fused");
    assert_eq!(c.max_grad_norm, 1.0);
    assert_eq!(c.output_dir, std::path::PathBuf::from("./model-out"));
    assert_eq!(c.learning_rate, 1e-4);
    let c = Config::from_yaml(
        &base("learning_rate_ignored: 1\n").replace("learning_rate_ignored: 1\n", ""),
        &["learning_rate=\"3e-4\"".into()],
    )
    .unwrap();
    assert_eq!(c.learning_rate, 3e-4);
}

#[test]
fn unknown_keys_suggest_the_closest() {
    let e = err(&base("lerning_rate: 1\n"));
    assert!(
        e.contains("lerning_rate: unknown key; did you mean `learning_rate`?"),
        "{e}"
    );
    let e = err(&base("micro_batchsize: 2\n"));
    assert!(e.contains("did you mean `micro_batch_size`"), "{e}");
    let e = err(&base("").replace("type: completion", "type: completion\n    feild: text"));
    assert!(
        e.contains("datasets[0].feild: unknown key; did you mean `field`?"),
        "{e}"
    );
}

#[test]
fn unsupported_axolotl_keys_are_named() {
    let e = err(&base("load_in_4bit: true\n"));
    assert!(
        e.contains("load_in_4bit: this axolotl key is not supported by ferrotune"),
        "{e}"
    );
    let e = err(&base("deepspeed: no-such-zero3.json\n"));
    assert!(e.contains("no-such-zero3.json") && e.contains("deepspeed"), "{e}");
}

#[test]
fn wrong_types_and_ranges_name_the_key() {
    let e = err(&base("micro_batch_size: two\n"));
    assert!(e.contains("micro_batch_size"), "{e}");
    let e = err(&base("lora_dropout: 1.5\nadapter: lora\n"));
    assert!(e.contains("lora_dropout: 1.5 must be in [0, 1)"), "{e}");
    let e = err(&base("optimizer: lion_8bit\n"));
    assert!(
        e.contains("optimizer: \"lion_8bit\" is not supported; supported: adamw_torch, adamw_torch_fused, adamw"),
        "{e}"
    );
    let e = err(&base("").replace("learning_rate: 1e-4\n", ""));
    assert!(e.contains("learning_rate"), "{e}");
}

#[test]
fn contradictions_and_missing_paths_are_reported_together() {
    let e = err(&base("warmup_steps: 10\nwarmup_ratio: 0.1\n").replace("/d.jsonl", "/missing.jsonl"));
    assert!(
        e.contains("warmup_steps and warmup_ratio: set one of them, not both"),
        "{e}"
    );
    assert!(e.contains("datasets[0].path:") && e.contains("does not exist"), "{e}");
    let e = err(&base("").replace("base_model: ", "base_model: /no/such/model"));
    assert!(e.contains("base_model: /no/such/model"), "{e}");
    let e = err(&base("lora_r: 8\nlora_target_modules: [q_proj, qkv]\nadapter: lora\n"));
    assert!(e.contains("lora_target_modules: \"qkv\" is not a linear module"), "{e}");
    let e = err(&base("lora_target_modules: [q_proj]\n"));
    assert!(e.contains("lora_target_modules: only used with `adapter: lora`"), "{e}");
}

#[test]
fn the_config_a_checkpoint_saves_reads_back_the_same() {
    for extra in ["", "bf16: true\nfp16: false\n", "bf16: false\ntf32: auto\n"] {
        let c = Config::from_yaml(&base(extra), &[]).unwrap();
        let again = Config::from_yaml(&c.to_yaml(), &[])
            .unwrap_or_else(|e| panic!("to_yaml output does not parse ({e}):\n{}", c.to_yaml()));
        assert_eq!(again.to_json(), c.to_json());
        assert_eq!((again.bf16, again.fp16, again.tf32), (c.bf16, c.fp16, c.tf32));
    }
}

#[test]
fn attn_implementation_values_and_legacy_flags() {
    use ferrotune::config::AttnImplementation as A;
    let c = Config::from_yaml(&base(""), &[]).unwrap();
    assert_eq!(c.attn_implementation, None);
    assert!(!c.attn_options().unwrap().eager, "the default is the fused op (sdpa)");
    for (v, want) in [
        ("eager", A::Eager),
        ("sdpa", A::Sdpa),
        ("flash_attention_2", A::FlashAttention2),
        ("flex_attention", A::FlexAttention),
        ("xformers", A::Xformers),
    ] {
        let c = Config::from_yaml(&base(&format!("attn_implementation: {v}\n")), &[]).unwrap();
        assert_eq!(c.attn_implementation, Some(want));
        assert_eq!(c.attn_options().unwrap().eager, v == "eager");
        assert!(c.to_yaml().contains(&format!("attn_implementation: {v}")));
    }
    for v in [
        "flash_attention_3",
        "sage",
        "s2",
        "fp8",
        "flash",
        "kernels-community/flash-attn3",
        "fast",
    ] {
        let e = err(&base(&format!("attn_implementation: {v}\n")));
        assert!(e.contains("attn_implementation"), "{e}");
        assert!(
            e.contains("supported: eager, sdpa, flash_attention_2, flex_attention, xformers"),
            "{v}: {e}"
        );
    }
    assert!(err(&base("attn_implementation: flash_attention_3\n")).contains("not implemented"));
    // Legacy booleans map to the value (the highest-priority flag wins) and conflict with
    // an explicit attn_implementation.
    for (flag, want) in [
        ("flash_attention", A::FlashAttention2),
        ("sdp_attention", A::Sdpa),
        ("xformers_attention", A::Xformers),
        ("flex_attention", A::FlexAttention),
        ("eager_attention", A::Eager),
    ] {
        let c = Config::from_yaml(&base(&format!("{flag}: true\n")), &[]).unwrap();
        assert_eq!(c.attn_implementation, Some(want), "{flag}");
    }
    let c = Config::from_yaml(
        &base("flash_attention: true\nsdp_attention: true\neager_attention: false\n"),
        &[],
    )
    .unwrap();
    assert_eq!(c.attn_implementation, Some(A::FlashAttention2));
    let c = Config::from_yaml(&base("flash_attention: false\n"), &[]).unwrap();
    assert_eq!(c.attn_implementation, None);
    let e = err(&base("s2_attention: true\nflash_attention: true\n"));
    assert!(e.contains("\"s2\"") && e.contains("supported:"), "{e}");
    let e = err(&base("flash_attention: true\nattn_implementation: sdpa\n"));
    assert!(
        e.contains("flash_attention: the legacy flag conflicts with attn_implementation"),
        "{e}"
    );
    let e = err(&base("flash_attention: yes please\n"));
    assert!(e.contains("flash_attention: expected true or false"), "{e}");
}

#[test]
fn flex_attention_mask_is_parsed_and_checked() {
    let c = Config::from_yaml(
        &base(
            "attn_implementation: flex_attention\nflex_attention_mask: \"q_idx >= kv_idx && q_idx - kv_idx < 256\"\n",
        ),
        &[],
    )
    .unwrap();
    let m = c.attn_options().unwrap().flex;
    let e = m.expr.expect("an expression");
    assert!(e.eval(300, 100, 1) && !e.eval(300, 44, 1) && !e.eval(3, 4, 1));
    let c = Config::from_yaml(
        &base("attn_implementation: eager\nflex_attention_mask: prefix_lm\n"),
        &[],
    )
    .unwrap();
    assert!(c.attn_options().unwrap().flex.prefix_lm);
    // `causal` is the default and needs no particular implementation.
    Config::from_yaml(&base("flex_attention_mask: causal\n"), &[]).unwrap();
    let e = err(&base(
        "attn_implementation: flex_attention\nflex_attention_mask: \"q_idx >= kv_idx &&\"\n",
    ));
    assert!(
        e.contains("flex_attention_mask: column 19: the expression ends early"),
        "{e}"
    );
    assert!(e.contains("q_idx >= kv_idx &&\n"), "the source is shown: {e}");
    let e = err(&base(
        "attn_implementation: flex_attention\nflex_attention_mask: \"q_idx >= kv\"\n",
    ));
    assert!(e.contains("column 10: unknown name `kv`"), "{e}");
    let e = err(&base("flex_attention_mask: prefix_lm\n"));
    assert!(
        e.contains("flex_attention_mask: needs `attn_implementation: flex_attention` (or `eager`"),
        "{e}"
    );
}

#[test]
fn run_lengths_and_waits_must_be_finite_and_bounded() {
    let e = err(&base("num_epochs: .inf\n"));
    assert!(e.contains("num_epochs: inf must be a positive finite number"), "{e}");
    let e = err(&base("num_epochs: -1\n"));
    assert!(e.contains("num_epochs: -1 must be a positive finite number"), "{e}");
    let e = err(&base("ddp_timeout: 18446744073709551615\n"));
    assert!(
        e.contains("ddp_timeout: 18446744073709551615 seconds must be between 1 and 2592000"),
        "{e}"
    );
    let e = err(&base("ddp_timeout: 0\n"));
    assert!(e.contains("ddp_timeout: 0 seconds must be between 1"), "{e}");
    assert!(Config::from_yaml(&base("ddp_timeout: 1800\nnum_epochs: 3.5\n"), &[]).is_ok());
}
