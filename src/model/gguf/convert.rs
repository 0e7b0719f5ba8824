//! GGUF (llama, mistral, qwen2) to a Hugging Face checkpoint folder: config.json,
//! model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json.
//!
//! Hyper-parameters come from the `{arch}.*` keys that llama.cpp's convert_hf_to_gguf.py
//! writes; tensors are dequantized, renamed (names.rs) and, for the llama family, q/k rows
//! are un-permuted so that HF's `rotate_half` RoPE applies.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::names::{map_name, unpermute_rows};
use super::reader::{GgufFile, GgufValue};
use super::tokenizer::build_tokenizer;
use crate::model::atomic::{replace_dir, temp_sibling, write_atomic};
use crate::model::hf_config::{Arch, ModelConfig, RopeScaling};
use crate::model::weights_write::write_safetensors;
use crate::{DType, Error, HostTensor, Result};

/// Bumped whenever the converter's output changes, so cached conversions are redone.
pub const CONVERTER_VERSION: u32 = 2;

/// Progress: `(done, total)` in tensors.
pub type Progress<'a> = &'a dyn Fn(usize, usize);

/// The HF model family of a GGUF `general.architecture`, and whether q/k rows are permuted.
fn arch_of(g: &GgufFile) -> Result<(Arch, bool)> {
    let a = g.get_str("general.architecture")?;
    match a {
        "llama" => Ok((Arch::Llama, true)),
        "mistral" => Ok((Arch::Mistral, true)),
        "qwen2" => Ok((Arch::Qwen2, false)),
        other => Err(Error::format(
            &g.path,
            format!("GGUF architecture \"{other}\" is not supported; supported: llama, mistral, qwen2"),
        )),
    }
}

/// A number from the metadata; an f32 becomes the f64 of its shortest decimal form, so
/// `1e-5f32` is written to config.json as `1e-5` (as in the original config) and not as
/// `9.999999747378752e-6`.
fn as_decimal(g: &GgufFile, key: &str) -> Result<f64> {
    match g.get(key) {
        Some(GgufValue::F32(v)) => Ok(v.to_string().parse().expect("a formatted f32 parses as f64")),
        _ => g.get_f64(key),
    }
}

/// `config.json` values from the GGUF metadata.
pub fn config_from_gguf(g: &GgufFile, dtype: DType) -> Result<ModelConfig> {
    let (arch, _) = arch_of(g)?;
    let a = g.get_str("general.architecture")?;
    let key = |k: &str| format!("{a}.{k}");
    let usize_of = |k: &str| g.get_u64(&key(k)).map(|v| v as usize);
    let opt_usize = |k: &str| g.get(&key(k)).and_then(|v| v.as_u64()).map(|v| v as usize);

    let hidden_size = usize_of("embedding_length")?;
    let num_attention_heads = usize_of("attention.head_count")?;
    let num_key_value_heads = opt_usize("attention.head_count_kv").unwrap_or(num_attention_heads);
    let head_dim = opt_usize("attention.key_length").unwrap_or(hidden_size / num_attention_heads.max(1));
    let n_tokens = g.get_array("tokenizer.ggml.tokens").map(|t| t.len()).ok();
    let vocab_size = match (opt_usize("vocab_size"), n_tokens) {
        (Some(v), _) => v,
        (None, Some(n)) => n,
        (None, None) => {
            let embd = g.tensor_info("token_embd.weight")?;
            embd.shape()[0]
        }
    };
    let rope_scaling = match g.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
        None | Some("none") => None,
        Some(ty) => {
            let factor = as_decimal(g, &key("rope.scaling.factor"))?;
            match ty {
                "linear" => Some(RopeScaling::Linear { factor }),
                "yarn" => Some(RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: opt_usize("rope.scaling.original_context_length"),
                    attention_factor: None,
                    beta_fast: None,
                    beta_slow: None,
                    mscale: None,
                    mscale_all_dim: None,
                    truncate: None,
                }),
                other => {
                    return Err(Error::format(
                        &g.path,
                        format!("{a}.rope.scaling.type = \"{other}\" is not supported; supported: none, linear, yarn"),
                    ))
                }
            }
        }
    };
    let tied = g.tensor_info("output.weight").is_err();
    let id = |k: &str| g.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
    Ok(ModelConfig {
        arch,
        hidden_size,
        intermediate_size: usize_of("feed_forward_length")?,
        num_hidden_layers: usize_of("block_count")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        rms_norm_eps: as_decimal(g, &key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: match g.get(&key("rope.freq_base")) {
            Some(_) => as_decimal(g, &key("rope.freq_base"))?,
            None => 10000.0,
        },
        rope_scaling,
        max_position_embeddings: usize_of("context_length")?,
        tie_word_embeddings: tied,
        sliding_window: if arch == Arch::Mistral {
            opt_usize("attention.sliding_window")
        } else {
            None
        },
        max_window_layers: None,
        attention_bias: arch == Arch::Qwen2,
        o_proj_bias: false,
        mlp_bias: false,
        torch_dtype: Some(dtype),
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        pad_token_id: id("tokenizer.ggml.padding_token_id"),
    })
}

/// Dequantize, rename and un-permute every tensor; `(hf_name, tensor in dtype)` in file order.
pub fn convert_tensors(
    g: &GgufFile,
    cfg: &ModelConfig,
    dtype: DType,
    progress: Option<Progress>,
) -> Result<Vec<(String, HostTensor)>> {
    let (_, permute) = arch_of(g)?;
    let total = g.tensors().len();
    let mut out = Vec::with_capacity(total);
    for (i, info) in g.tensors().iter().enumerate() {
        if info.name == "rope_freqs.weight" {
            return Err(Error::format(
                &g.path,
                "tensor rope_freqs.weight (Llama 3.1 RoPE factors) is not supported by the converter",
            ));
        }
        let mapped =
            map_name(&info.name, cfg.num_attention_heads, cfg.num_key_value_heads, permute).ok_or_else(|| {
                Error::format(
                    &g.path,
                    format!(
                        "tensor `{}` has no Hugging Face name known to this converter",
                        info.name
                    ),
                )
            })?;
        let t = g.tensor_f32(&info.name)?;
        let t = match mapped.unpermute_heads {
            None => t,
            Some(n_head) => {
                let rows = t.shape[0];
                let cols = t.shape.get(1).copied().unwrap_or(1);
                if n_head == 0 || rows % (2 * n_head) != 0 {
                    return Err(Error::format(
                        &g.path,
                        format!(
                            "tensor `{}` has {rows} rows, which do not split into {n_head} heads of even size",
                            info.name
                        ),
                    ));
                }
                HostTensor::from_f32(&t.shape, &unpermute_rows(&t.to_f32(), rows, cols, n_head))
            }
        };
        out.push((mapped.hf_name, if dtype == DType::F32 { t } else { t.cast(dtype) }));
        if let Some(p) = progress {
            p(i + 1, total);
        }
    }
    check_shapes(g, cfg, &out)?;
    Ok(out)
}

/// The converted tensors have the shapes that config.json implies.
fn check_shapes(g: &GgufFile, cfg: &ModelConfig, tensors: &[(String, HostTensor)]) -> Result<()> {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let ff = cfg.intermediate_size;
    for (name, t) in tensors {
        let want: Option<Vec<usize>> = if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            Some(vec![cfg.vocab_size, h])
        } else if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
            Some(vec![h])
        } else if name.ends_with("q_proj.weight") {
            Some(vec![q, h])
        } else if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
            Some(vec![kv, h])
        } else if name.ends_with("q_proj.bias") {
            Some(vec![q])
        } else if name.ends_with("k_proj.bias") || name.ends_with("v_proj.bias") {
            Some(vec![kv])
        } else if name.ends_with("o_proj.weight") {
            Some(vec![h, q])
        } else if name.ends_with("gate_proj.weight") || name.ends_with("up_proj.weight") {
            Some(vec![ff, h])
        } else if name.ends_with("down_proj.weight") {
            Some(vec![h, ff])
        } else {
            None
        };
        if let Some(w) = want {
            if t.shape != w {
                return Err(Error::format(
                    &g.path,
                    format!("tensor {name} has shape {:?}, but the metadata implies {w:?}", t.shape),
                ));
            }
        }
    }
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value, pretty: bool) -> Result<()> {
    let text = if pretty {
        serde_json::to_string_pretty(v)
    } else {
        serde_json::to_string(v)
    };
    let text = text.expect("JSON values always serialize");
    write_atomic(path, format!("{text}\n").as_bytes())
}

/// Convert `input` (a .gguf file) into the HF checkpoint folder `out_dir` with weights in
/// `dtype` (f32, bf16 or f16). The folder is built under a temporary name and renamed at the end.
pub fn convert_gguf(input: &Path, out_dir: &Path, dtype: DType) -> Result<()> {
    convert_gguf_with_progress(input, out_dir, dtype, None)
}

/// [`convert_gguf`] with a callback told `(tensors done, tensors total)`.
pub fn convert_gguf_with_progress(
    input: &Path,
    out_dir: &Path,
    dtype: DType,
    progress: Option<Progress>,
) -> Result<()> {
    if ![DType::F32, DType::BF16, DType::F16].contains(&dtype) {
        return Err(crate::msg!("cannot convert to {dtype}: choose f32, bf16 or f16"));
    }
    let g = GgufFile::open(input)?;
    let cfg = config_from_gguf(&g, dtype)?;
    let tok = build_tokenizer(&g)?;
    if tok.vocab_size != cfg.vocab_size {
        return Err(Error::format(
            input,
            format!(
                "the tokenizer has {} tokens but the model a vocabulary of {}",
                tok.vocab_size, cfg.vocab_size
            ),
        ));
    }
    let tensors = convert_tensors(&g, &cfg, dtype, progress)?;

    let parent = out_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp: PathBuf = temp_sibling(out_dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = (|| {
        write_safetensors(&tmp.join("model.safetensors"), &tensors, None)?;
        cfg.write(&tmp.join("config.json"))?;
        write_json(&tmp.join("tokenizer.json"), &tok.tokenizer_json, false)?;
        write_json(&tmp.join("tokenizer_config.json"), &tok.tokenizer_config, true)?;
        let gen = json!({
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id.first(),
            "pad_token_id": cfg.pad_token_id,
        });
        write_json(&tmp.join("generation_config.json"), &gen, true)?;
        replace_dir(&tmp, out_dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
