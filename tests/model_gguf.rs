//! GGUF reader, dequantisation, conversion, and a GGUF named as `base_model`, against
//! fixtures made by scripts/fixtures/model_gguf_fixtures.py with the python `gguf` package.

use std::path::{Path, PathBuf};

use ferrotune::model::gguf::{GgmlType, GgufFile, GgufValue};
use ferrotune::model::{convert_gguf, convert_gguf_with_progress, Arch, ModelConfig, WeightStore};
use ferrotune::DType;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name)
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrotune-model-gguf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn open_expected(name: &str) -> WeightStore {
    WeightStore::open(&fixture(name)).unwrap()
}

#[test]
fn metadata_of_every_value_type_and_tensor_infos() {
    let g = GgufFile::open(&fixture("quant_types.gguf")).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 64);
    assert_eq!(g.data_offset % 64, 0);
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("quant_types.json")).unwrap()).unwrap();
    for (key, want) in spec["metadata"].as_object().unwrap() {
        let got = g.get(key).unwrap_or_else(|| panic!("metadata {key} missing"));
        let value = &want["value"];
        match want["type"].as_str().unwrap() {
            "uint8" => assert_eq!(got, &GgufValue::U8(value.as_u64().unwrap() as u8)),
            "int8" => assert_eq!(got, &GgufValue::I8(value.as_i64().unwrap() as i8)),
            "uint16" => assert_eq!(got, &GgufValue::U16(value.as_u64().unwrap() as u16)),
            "int16" => assert_eq!(got, &GgufValue::I16(value.as_i64().unwrap() as i16)),
            "uint32" => assert_eq!(got, &GgufValue::U32(value.as_u64().unwrap() as u32)),
            "int32" => assert_eq!(got, &GgufValue::I32(value.as_i64().unwrap() as i32)),
            "uint64" => assert_eq!(got, &GgufValue::U64(value.as_u64().unwrap())),
            "int64" => assert_eq!(got, &GgufValue::I64(value.as_i64().unwrap())),
            "float32" => assert_eq!(got, &GgufValue::F32(value.as_f64().unwrap() as f32)),
            "float64" => assert_eq!(got, &GgufValue::F64(value.as_f64().unwrap())),
            "bool" => assert_eq!(got, &GgufValue::Bool(value.as_bool().unwrap())),
            "string" => assert_eq!(got.as_str(), value.as_str()),
            "array" => {
                let arr = got.as_array().unwrap();
                let want = value.as_array().unwrap();
                assert_eq!(arr.len(), want.len(), "{key}");
                for (a, w) in arr.iter().zip(want) {
                    if let Some(s) = w.as_str() {
                        assert_eq!(a.as_str(), Some(s), "{key}");
                    } else {
                        assert_eq!(a.as_f64(), w.as_f64(), "{key}");
                    }
                }
            }
            other => panic!("fixture type {other}"),
        }
    }
    let infos = spec["tensors"].as_array().unwrap();
    assert_eq!(g.tensors().len(), infos.len());
    for want in infos {
        let t = g.tensor_info(want["name"].as_str().unwrap()).unwrap();
        assert_eq!(t.ggml_type.name, want["type"].as_str().unwrap());
        let dims: Vec<u64> = want["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(t.dims, dims);
        assert_eq!(t.offset % 64, 0);
    }
}

#[test]
fn dequantisation_of_every_supported_type_matches_gguf_python() {
    let g = GgufFile::open(&fixture("quant_types.gguf")).unwrap();
    let expected = open_expected("quant_types_expected.safetensors");
    let mut seen = Vec::new();
    for ty in GgmlType::DEQUANTIZABLE {
        let name = format!("t_{}", ty.name.to_lowercase());
        assert_eq!(g.tensor_info(&name).unwrap().ggml_type, ty);
        let got = g.tensor_f32(&name).unwrap();
        let want = expected.get(&name, DType::F32).unwrap();
        assert_eq!(got.shape, want.shape, "{name}");
        let (got, want) = (got.to_f32(), want.to_f32());
        // Same f32 operations as numpy (d * q [+ m]), so the values agree bit for bit.
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{name}[{i}]: {a} vs {b}");
        }
        // The fixture is not trivial: values differ and are not all zero.
        assert!(
            want.iter().any(|&v| v != 0.0) && want.iter().any(|&v| v < 0.0),
            "{name}"
        );
        seen.push(name);
    }
    assert_eq!(seen.len(), 8);
}

#[test]
fn unsupported_quant_type_is_named_with_the_supported_list() {
    let g = GgufFile::open(&fixture("quant_types.gguf")).unwrap();
    assert_eq!(g.tensor_info("t_q4_k").unwrap().ggml_type.name, "Q4_K");
    let err = g.tensor_f32("t_q4_k").unwrap_err().to_string();
    assert!(err.contains("t_q4_k") && err.contains("Q4_K"), "{err}");
    assert!(err.contains("F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1"), "{err}");
}

/// Byte position of the ggml type field of tensor `name` in a GGUF header.
fn type_field_of(bytes: &[u8], name: &str) -> usize {
    let key = name.as_bytes();
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("tensor name in header");
    let n_dims = u32::from_le_bytes(bytes[at + key.len()..at + key.len() + 4].try_into().unwrap()) as usize;
    at + key.len() + 4 + 8 * n_dims
}

#[test]
fn unknown_type_id_is_an_error_naming_tensor_and_offset() {
    let dir = scratch("unknown");
    let mut bytes = std::fs::read(fixture("quant_types.gguf")).unwrap();
    let at = type_field_of(&bytes, "t_q4_k");
    assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 12);
    bytes[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let p = dir.join("unknown.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert!(
        err.contains("t_q4_k") && err.contains("unknown ggml type id 99"),
        "{err}"
    );
    assert!(err.contains(&format!("byte offset {at}")), "{err}");
    assert!(err.contains("Q4_1"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn truncated_files_are_clear_errors() {
    let dir = scratch("trunc");
    let bytes = std::fs::read(fixture("quant_types.gguf")).unwrap();
    // Cut inside the tensor data: the last tensor no longer fits.
    let p = dir.join("short-data.gguf");
    // (The writer pads the last tensor's 144 bytes to the 64-byte alignment, so cut past that.)
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert!(err.contains("truncated") && err.contains("t_q4_k"), "{err}");
    assert!(err.contains(&format!("file has {} bytes", bytes.len() - 100)), "{err}");
    // Cut inside the metadata: in the value of `test.array_str`.
    let key = b"test.array_str";
    let cut = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 20;
    let p = dir.join("short-meta.gguf");
    std::fs::write(&p, &bytes[..cut]).unwrap();
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert!(
        err.contains("truncated") && err.contains("metadata `test.array_str`"),
        "{err}"
    );
    // Cut inside the fixed header.
    let p = dir.join("short-header.gguf");
    std::fs::write(&p, &bytes[..12]).unwrap();
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert!(err.contains("truncated") && err.contains("tensor count"), "{err}");
    // Not a GGUF at all.
    let p = dir.join("not.gguf");
    std::fs::write(&p, b"PK\x03\x04 a zip file").unwrap();
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert!(err.contains("not a GGUF file"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn version_2_files_read_like_version_3() {
    let dir = scratch("v2");
    let mut bytes = std::fs::read(fixture("quant_types.gguf")).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let p = dir.join("v2.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let g = GgufFile::open(&p).unwrap();
    assert_eq!(g.version, 2);
    let v3 = GgufFile::open(&fixture("quant_types.gguf")).unwrap();
    assert_eq!(g.tensor_f32("t_q5_1").unwrap(), v3.tensor_f32("t_q5_1").unwrap());
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert!(err.contains("version 1"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

fn check_converted(arch: &str, dtype: DType) -> (PathBuf, ModelConfig) {
    let dir = scratch(&format!("conv-{arch}-{dtype}"));
    let out = dir.join("hf");
    let calls = std::cell::RefCell::new(Vec::new());
    let progress = |done: usize, total: usize| calls.borrow_mut().push((done, total));
    convert_gguf_with_progress(&fixture(&format!("tiny_{arch}.gguf")), &out, dtype, Some(&progress)).unwrap();
    let calls = calls.into_inner();
    let n = GgufFile::open(&fixture(&format!("tiny_{arch}.gguf")))
        .unwrap()
        .tensors()
        .len();
    assert_eq!(calls.len(), n);
    assert_eq!(calls.last(), Some(&(n, n)));

    let got = WeightStore::open(&out).unwrap();
    let want = open_expected(&format!("tiny_{arch}_expected.safetensors"));
    assert_eq!(got.names(), want.names());
    for name in want.names() {
        let w = want.get(name, DType::F32).unwrap();
        assert_eq!(got.dtype(name).unwrap(), dtype, "{name}");
        assert_eq!(got.shape(name).unwrap(), w.shape.as_slice(), "{name}");
        // Stored in `dtype`: compare with the expected values rounded the same way.
        let g = got.get(name, DType::F32).unwrap().to_f32();
        let w = w.cast(dtype).to_f32();
        assert_eq!(g, w, "{name}");
    }
    let cfg = ModelConfig::from_file(&out.join("config.json")).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // No temporary folder is left beside the output.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("hf")]);
    (dir, cfg)
}

#[test]
fn tiny_llama_converts_to_the_original_hf_tensors() {
    let (dir, cfg) = check_converted("llama", DType::F32);
    assert_eq!(cfg.arch, Arch::Llama);
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim
        ),
        (64, 4, 2, 16)
    );
    assert_eq!(
        (
            cfg.intermediate_size,
            cfg.num_hidden_layers,
            cfg.max_position_embeddings
        ),
        (128, 2, 256)
    );
    assert_eq!(cfg.vocab_size, 3 + 256 + 8);
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.rope_theta, 10000.0);
    assert_eq!(cfg.rms_norm_eps, 1e-5);
    assert_eq!(
        (cfg.bos_token_id, cfg.eos_token_id.clone(), cfg.pad_token_id),
        (Some(1), vec![2], Some(2))
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn tiny_qwen2_converts_with_biases_and_untied_head_in_bf16() {
    let (dir, cfg) = check_converted("qwen2", DType::BF16);
    assert_eq!(cfg.arch, Arch::Qwen2);
    assert!(cfg.attention_bias && !cfg.o_proj_bias);
    assert!(!cfg.tie_word_embeddings);
    assert_eq!(cfg.rope_theta, 1e6);
    assert_eq!(cfg.torch_dtype, Some(DType::BF16));
    let tok = std::fs::read_to_string(dir.join("hf/tokenizer.json")).unwrap();
    let tok: tokenizers::Tokenizer = tok.parse().unwrap();
    // Control tokens stay whole; " the" uses all three merges "Ġ t", "h e", "Ġt he"; "the"
    // has no "t he" merge.
    let enc = tok.encode("<|im_start|> the the", false).unwrap();
    assert_eq!(enc.get_tokens(), ["<|im_start|>", "Ġthe", "Ġthe"]);
    let enc = tok.encode("the", false).unwrap();
    assert_eq!(enc.get_tokens(), ["t", "he"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn conversion_errors_leave_no_output() {
    let dir = scratch("conv-err");
    let out = dir.join("hf");
    let err = convert_gguf(&fixture("quant_types.gguf"), &out, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"test\"") && err.contains("llama, mistral, qwen2"),
        "{err}"
    );
    let err = convert_gguf(&fixture("tiny_llama.gguf"), &out, DType::I32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("f32, bf16 or f16"), "{err}");
    assert!(!out.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sentencepiece_vocabulary_encodes_like_sentencepiece() {
    let g = GgufFile::open(&fixture("spm_tokenizer.gguf")).unwrap();
    let files = ferrotune::model::gguf::tokenizer::build_tokenizer(&g).unwrap();
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("spm_expected.json")).unwrap()).unwrap();
    assert_eq!(files.vocab_size as u64, spec["vocab_size"].as_u64().unwrap());
    assert!(files.special.add_bos);
    assert_eq!(files.tokenizer_config["bos_token"], "<s>");
    assert_eq!(files.tokenizer_config["unk_token"], "<unk>");
    let tok: tokenizers::Tokenizer = serde_json::to_string(&files.tokenizer_json).unwrap().parse().unwrap();
    let cases = spec["cases"].as_array().unwrap();
    let mut byte_fallbacks = 0;
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(enc.get_ids(), want.as_slice(), "{text:?}: {:?}", enc.get_tokens());
        byte_fallbacks += enc.get_tokens().iter().filter(|t| t.starts_with("<0x")).count();
        let with_bos = tok.encode(text, true).unwrap();
        assert_eq!(with_bos.get_ids()[0], 1);
        assert_eq!(&with_bos.get_ids()[1..], want.as_slice());
        assert_eq!(tok.decode(&want, true).unwrap(), text);
    }
    assert!(byte_fallbacks > 0, "the cases exercise byte fallback");
}

/// Losses and evaluation losses of a run, as reported.
#[derive(Default)]
struct Losses {
    train: Vec<f64>,
    eval: Vec<f64>,
}

impl ferrotune::train::run::Callback for Losses {
    fn on_step(&mut self, r: &ferrotune::train::trainer::StepReport) {
        self.train.push(r.loss);
    }
    fn on_eval(&mut self, r: &ferrotune::train::trainer::EvalReport) {
        self.eval.push(r.eval_loss);
    }
}

/// Three LoRA steps with an evaluation at each, from `base_model`.
fn train_from(base_model: &Path, data: &Path, out: &Path) -> (Losses, ferrotune::train::run::TrainSummary) {
    let yaml = format!(
        "base_model: {}\ndatasets:\n  - path: {}\n    type: chat_template\n\
         test_datasets:\n  - path: {}\n    type: chat_template\n\
         sequence_len: 64\nmicro_batch_size: 2\nmax_steps: 3\neval_steps: 1\nlearning_rate: 0.01\n\
         adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\n\
         output_dir: {}\ndevice: cpu\neval_max_new_tokens: 4\n",
        base_model.display(),
        data.join("train.jsonl").display(),
        data.join("eval.jsonl").display(),
        out.display()
    );
    let cfg = ferrotune::Config::from_yaml(&yaml, &[]).unwrap();
    let mut losses = Losses::default();
    let summary = ferrotune::train::run::train(&cfg, &mut losses).unwrap();
    (losses, summary)
}

#[test]
fn a_gguf_named_as_base_model_trains_like_its_converted_folder() {
    use ferrotune::data::generate::arithmetic::{write_addition, AdditionOptions};
    let dir = scratch("base-model");
    let data = dir.join("data");
    let opts = AdditionOptions {
        digits: 2,
        n_train: 12,
        n_eval: 4,
        seed: 3,
    };
    write_addition(&data, &opts).unwrap();
    // A copy, because the conversion is written next to the file.
    let gguf = dir.join("tiny.gguf");
    std::fs::copy(fixture("tiny_llama.gguf"), &gguf).unwrap();
    let (from_gguf, s_gguf) = train_from(&gguf, &data, &dir.join("out-gguf"));

    let made = dir.join("tiny.hf");
    let config_time = std::fs::metadata(made.join("config.json")).unwrap().modified().unwrap();
    let by_hand = dir.join("by-hand");
    convert_gguf(&fixture("tiny_llama.gguf"), &by_hand, DType::F32).unwrap();
    let (from_dir, s_dir) = train_from(&by_hand, &data, &dir.join("out-dir"));

    // The folder made from the GGUF holds the library's conversion, tensor for tensor.
    let (a, b) = (WeightStore::open(&made).unwrap(), WeightStore::open(&by_hand).unwrap());
    assert_eq!(a.names(), b.names());
    for n in b.names() {
        assert_eq!(a.get_raw(n).unwrap().data, b.get_raw(n).unwrap().data, "{n}");
    }
    assert_eq!(from_gguf.train.len(), 3);
    assert_eq!(from_gguf.eval.len(), 3);
    assert!(from_gguf.train.iter().all(|l| l.is_finite() && *l > 0.0));
    // The runs are the same computation: every loss agrees bit for bit.
    for (x, y) in from_gguf.train.iter().zip(&from_dir.train) {
        assert_eq!(
            x.to_bits(),
            y.to_bits(),
            "{:?} vs {:?}",
            from_gguf.train,
            from_dir.train
        );
    }
    assert_eq!(from_gguf.train.len(), from_dir.train.len());
    assert_eq!(from_gguf.eval, from_dir.eval);
    assert_eq!(s_gguf.final_eval_loss, s_dir.final_eval_loss);
    assert_eq!(s_gguf.tokens, s_dir.tokens);
    // The adapter moved, identically.
    let read = |d: &Path| ferrotune::adapters::lora::load(d).unwrap().1;
    let (la, lb) = (read(&dir.join("out-gguf")), read(&dir.join("out-dir")));
    assert_eq!(la.keys().collect::<Vec<_>>(), lb.keys().collect::<Vec<_>>());
    let mut b_abs = 0.0;
    for (k, t) in &la {
        assert_eq!(t.data, lb[k].data, "{k}");
        if k.contains("lora_B") {
            b_abs += t.to_f64().iter().map(|x| x.abs()).sum::<f64>();
        }
    }
    assert!(b_abs > 0.0, "the steps changed the adapter");

    // A second run reuses the conversion instead of converting again.
    let (again, _) = train_from(&gguf, &data, &dir.join("out-again"));
    assert_eq!(again.train, from_gguf.train);
    let later = std::fs::metadata(made.join("config.json")).unwrap().modified().unwrap();
    assert_eq!(later, config_time);
    std::fs::remove_dir_all(dir).unwrap();
}
