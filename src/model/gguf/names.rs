//! GGUF tensor names to Hugging Face names for Llama, Mistral and Qwen2
//! (the inverse of llama.cpp's gguf-py/gguf/tensor_mapping.py for these families), and the
//! undoing of llama.cpp's rotary row permutation of q/k.

/// What to do with one GGUF tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub hf_name: String,
    /// `Some(n)`: rows were permuted by convert_hf_to_gguf with `n` heads; undo it.
    pub unpermute_heads: Option<usize>,
}

/// The HF name of a GGUF tensor, or `None` for a name this converter does not know.
/// `permute` is true for llama-family files, whose q/k rows llama.cpp permuted.
pub fn map_name(gguf: &str, n_head: usize, n_kv_head: usize, permute: bool) -> Option<Mapped> {
    let plain = |s: &str| {
        Some(Mapped {
            hf_name: s.to_string(),
            unpermute_heads: None,
        })
    };
    match gguf {
        "token_embd.weight" => return plain("model.embed_tokens.weight"),
        "output_norm.weight" => return plain("model.norm.weight"),
        "output.weight" => return plain("lm_head.weight"),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (module, heads) = match part {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "attn_q" => ("self_attn.q_proj", Some(n_head)),
        "attn_k" => ("self_attn.k_proj", Some(n_kv_head)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return None,
    };
    Some(Mapped {
        hf_name: format!("model.layers.{layer}.{module}.{kind}"),
        unpermute_heads: if permute { heads } else { None },
    })
}

/// Undo convert_hf_to_gguf's `permute`: it stored
/// `W.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)`, so GGUF row `h*hd + 2j + s`
/// holds HF row `h*hd + s*hd/2 + j`. `data` is row-major `[rows, cols]` (cols = 1 for a bias).
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for j in 0..half {
            for s in 0..2 {
                let src = h * hd + 2 * j + s;
                let dst = h * hd + s * half + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}
