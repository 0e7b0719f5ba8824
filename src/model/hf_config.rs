//! Hugging Face `config.json` for the supported causal LMs (Llama, Mistral, Qwen2).
//!
//! Defaults for absent keys follow the transformers config classes (`LlamaConfig`,
//! `MistralConfig`, `Qwen2Config`). RoPE settings are read from both the transformers 4 keys
//! (`rope_theta`, `rope_scaling`) and the transformers 5 key (`rope_parameters`).

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::{DType, Error, Result};

/// Model family, named in `config.json` by `architectures`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::Llama, Arch::Mistral, Arch::Qwen2];

    /// The transformers class named in `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }
    /// The `model_type` key.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }
    pub fn from_hf_class(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.hf_class() == name)
    }
    pub fn from_model_type(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.model_type() == name)
    }
    /// "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM", for error messages.
    pub fn supported_list() -> String {
        Arch::ALL.iter().map(|a| a.hf_class()).collect::<Vec<_>>().join(", ")
    }
}

/// RoPE scaling, as in transformers' `ROPE_INIT_FUNCTIONS` (modeling_rope_utils.py).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Position interpolation: positions divided by `factor`.
    Linear { factor: f64 },
    /// Dynamic NTK: the base grows once the sequence exceeds `max_position_embeddings`.
    Dynamic { factor: f64 },
    /// YaRN (arXiv 2309.00071). `None` fields take transformers' defaults.
    Yarn {
        factor: f64,
        original_max_position_embeddings: Option<usize>,
        attention_factor: Option<f64>,
        beta_fast: Option<f64>,
        beta_slow: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: Option<bool>,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    pub const SUPPORTED: &'static str = "default, linear, dynamic, yarn, llama3";

    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Yarn { .. } => "yarn",
            RopeScaling::Llama3 { .. } => "llama3",
        }
    }

    /// The `rope_scaling` object as transformers writes it (without `rope_theta`).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("rope_type".into(), json!(self.rope_type()));
        match self {
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => {
                m.insert("factor".into(), json!(factor));
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                m.insert("factor".into(), json!(factor));
                let opt = [
                    (
                        "original_max_position_embeddings",
                        original_max_position_embeddings.map(|v| json!(v)),
                    ),
                    ("attention_factor", attention_factor.map(|v| json!(v))),
                    ("beta_fast", beta_fast.map(|v| json!(v))),
                    ("beta_slow", beta_slow.map(|v| json!(v))),
                    ("mscale", mscale.map(|v| json!(v))),
                    ("mscale_all_dim", mscale_all_dim.map(|v| json!(v))),
                    ("truncate", truncate.map(|v| json!(v))),
                ];
                for (k, v) in opt {
                    if let Some(v) = v {
                        m.insert(k.into(), v);
                    }
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                m.insert("factor".into(), json!(factor));
                m.insert("low_freq_factor".into(), json!(low_freq_factor));
                m.insert("high_freq_factor".into(), json!(high_freq_factor));
                m.insert(
                    "original_max_position_embeddings".into(),
                    json!(original_max_position_embeddings),
                );
            }
        }
        Value::Object(m)
    }
}

/// The parts of `config.json` that the runtime uses.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Explicit `head_dim`, or `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Attention window (Mistral; Qwen2 only with `use_sliding_window: true`).
    pub sliding_window: Option<usize>,
    /// Qwen2: layers with index `>= max_window_layers` use the sliding window.
    pub max_window_layers: Option<usize>,
    /// q/k/v projections carry a bias (Qwen2 always; Llama with `attention_bias`).
    pub attention_bias: bool,
    /// o_proj carries a bias (Llama with `attention_bias`; never Qwen2 or Mistral).
    pub o_proj_bias: bool,
    /// gate/up/down projections carry a bias (Llama `mlp_bias`).
    pub mlp_bias: bool,
    pub torch_dtype: Option<DType>,
    pub bos_token_id: Option<u32>,
    /// One or more end-of-sequence ids (Llama 3 lists several).
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

fn cfg_err(path: &str, msg: impl Into<String>) -> Error {
    Error::format(path, msg.into())
}

/// Typed access to a JSON object with messages that name the key and the file.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    src: &'a str,
}

impl Obj<'_> {
    fn present(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| cfg_err(self.src, format!("`{key}` must be a non-negative integer, found {v}"))),
        }
    }
    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| cfg_err(self.src, format!("missing required key `{key}`")))
    }
    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| cfg_err(self.src, format!("`{key}` must be a number, found {v}"))),
        }
    }
    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| cfg_err(self.src, format!("`{key}` must be true or false, found {v}"))),
        }
    }
    fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| cfg_err(self.src, format!("`{key}` must be a string, found {v}"))),
        }
    }
    fn ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = |v: &Value| {
            cfg_err(
                self.src,
                format!("`{key}` must be a token id or a list of ids, found {v}"),
            )
        };
        match self.present(key) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|i| i as u32).ok_or_else(|| bad(x)))
                .collect(),
            Some(v) => Ok(vec![v.as_u64().ok_or_else(|| bad(v))? as u32]),
        }
    }
}

impl ModelConfig {
    /// Read and parse `config.json`.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parse the text of a `config.json`; `src` names it in error messages.
    pub fn parse(text: &str, src: &str) -> Result<ModelConfig> {
        let v: Value = serde_json::from_str(text).map_err(|e| cfg_err(src, format!("not valid JSON: {e}")))?;
        Self::from_value(&v, src)
    }

    pub fn from_value(v: &Value, src: &str) -> Result<ModelConfig> {
        let map = v
            .as_object()
            .ok_or_else(|| cfg_err(src, "config.json must be a JSON object"))?;
        let o = Obj { map, src };
        let arch = parse_arch(&o)?;

        let hidden_size = o.usize_req("hidden_size")?;
        let num_attention_heads = o.usize_req("num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err(cfg_err(src, "`num_attention_heads` must be at least 1"));
        }
        let num_key_value_heads = o.usize_opt("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(cfg_err(
                src,
                format!(
                    "`num_attention_heads` ({num_attention_heads}) must be a multiple of `num_key_value_heads` ({num_key_value_heads})"
                ),
            ));
        }
        let head_dim = match o.usize_opt("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(cfg_err(
                    src,
                    format!(
                        "no `head_dim` and `hidden_size` ({hidden_size}) is not a multiple of `num_attention_heads` ({num_attention_heads}); add `head_dim`"
                    ),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(cfg_err(
                src,
                format!("`head_dim` must be even for rotary embeddings, found {head_dim}"),
            ));
        }

        if let Some(act) = o.str_opt("hidden_act")? {
            if act != "silu" && act != "swish" {
                return Err(cfg_err(
                    src,
                    format!("`hidden_act` is \"{act}\"; only \"silu\" is supported"),
                ));
            }
        }

        let (rope_theta, rope_scaling) = parse_rope(&o)?;

        let (default_max_pos, default_eps) = match arch {
            Arch::Llama => (2048, 1e-6),
            Arch::Mistral => (4096 * 32, 1e-6),
            Arch::Qwen2 => (32768, 1e-6),
        };

        let (sliding_window, max_window_layers) = match arch {
            Arch::Llama => (None, None),
            Arch::Mistral => (o.usize_opt("sliding_window")?, None),
            Arch::Qwen2 => {
                if o.bool_opt("use_sliding_window")?.unwrap_or(false) {
                    let w = o.usize_opt("sliding_window")?.ok_or_else(|| {
                        cfg_err(
                            src,
                            "`use_sliding_window` is true but `sliding_window` is missing or null",
                        )
                    })?;
                    (Some(w), Some(o.usize_opt("max_window_layers")?.unwrap_or(28)))
                } else {
                    (None, None)
                }
            }
        };

        let (attention_bias, o_proj_bias, mlp_bias) = match arch {
            Arch::Llama => {
                let b = o.bool_opt("attention_bias")?.unwrap_or(false);
                (b, b, o.bool_opt("mlp_bias")?.unwrap_or(false))
            }
            Arch::Mistral => (false, false, false),
            Arch::Qwen2 => (true, false, false),
        };

        let dtype_key = if o.present("dtype").is_some() {
            "dtype"
        } else {
            "torch_dtype"
        };
        let torch_dtype = match o.str_opt(dtype_key)? {
            None | Some("auto") => None,
            Some(s) => Some(DType::parse(s).filter(|d| d.is_float()).ok_or_else(|| {
                cfg_err(
                    src,
                    format!("`{dtype_key}` \"{s}\" is not one of float32, float16, bfloat16"),
                )
            })?),
        };

        let one_id = |key: &str| -> Result<Option<u32>> {
            let ids = o.ids(key)?;
            Ok(ids.first().copied())
        };

        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size: o.usize_req("intermediate_size")?,
            num_hidden_layers: o.usize_req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: o.usize_req("vocab_size")?,
            rms_norm_eps: o.f64_opt("rms_norm_eps")?.unwrap_or(default_eps),
            rope_theta,
            rope_scaling,
            max_position_embeddings: o.usize_opt("max_position_embeddings")?.unwrap_or(default_max_pos),
            tie_word_embeddings: o.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            sliding_window,
            max_window_layers,
            attention_bias,
            o_proj_bias,
            mlp_bias,
            torch_dtype,
            bos_token_id: one_id("bos_token_id")?,
            eos_token_id: o.ids("eos_token_id")?,
            pad_token_id: one_id("pad_token_id")?,
        })
    }

    /// Whether layer `i` attends only within `sliding_window` tokens.
    pub fn layer_uses_sliding_window(&self, i: usize) -> bool {
        match (self.sliding_window, self.arch) {
            (None, _) => false,
            (Some(_), Arch::Qwen2) => i >= self.max_window_layers.unwrap_or(0),
            (Some(_), _) => true,
        }
    }

    /// A `config.json` that transformers (4.x and 5.x) loads with the same values.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("architectures".into(), json!([self.arch.hf_class()]));
        m.insert("model_type".into(), json!(self.arch.model_type()));
        m.insert("hidden_act".into(), json!("silu"));
        m.insert("hidden_size".into(), json!(self.hidden_size));
        m.insert("intermediate_size".into(), json!(self.intermediate_size));
        m.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
        m.insert("num_attention_heads".into(), json!(self.num_attention_heads));
        m.insert("num_key_value_heads".into(), json!(self.num_key_value_heads));
        m.insert("head_dim".into(), json!(self.head_dim));
        m.insert("vocab_size".into(), json!(self.vocab_size));
        m.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        m.insert("max_position_embeddings".into(), json!(self.max_position_embeddings));
        m.insert("tie_word_embeddings".into(), json!(self.tie_word_embeddings));
        m.insert("initializer_range".into(), json!(0.02));
        m.insert("use_cache".into(), json!(true));
        m.insert("attention_dropout".into(), json!(0.0));
        // transformers 5 reads `rope_parameters`; 4.x reads `rope_theta` and `rope_scaling`.
        m.insert("rope_theta".into(), json!(self.rope_theta));
        let mut params = match &self.rope_scaling {
            Some(s) => {
                m.insert("rope_scaling".into(), s.to_json());
                s.to_json()
            }
            None => json!({"rope_type": "default"}),
        };
        params["rope_theta"] = json!(self.rope_theta);
        m.insert("rope_parameters".into(), params);
        match self.arch {
            Arch::Llama => {
                m.insert("attention_bias".into(), json!(self.attention_bias));
                m.insert("mlp_bias".into(), json!(self.mlp_bias));
                m.insert("pretraining_tp".into(), json!(1));
            }
            Arch::Mistral => {
                m.insert("sliding_window".into(), json!(self.sliding_window));
            }
            Arch::Qwen2 => {
                m.insert("use_sliding_window".into(), json!(self.sliding_window.is_some()));
                m.insert("sliding_window".into(), json!(self.sliding_window));
                m.insert(
                    "max_window_layers".into(),
                    json!(self.max_window_layers.unwrap_or(self.num_hidden_layers)),
                );
            }
        }
        if let Some(d) = self.torch_dtype {
            let name = match d {
                DType::F16 => "float16",
                DType::BF16 => "bfloat16",
                _ => "float32",
            };
            m.insert("torch_dtype".into(), json!(name));
        }
        m.insert("bos_token_id".into(), json!(self.bos_token_id));
        m.insert(
            "eos_token_id".into(),
            match self.eos_token_id.as_slice() {
                [] => Value::Null,
                [one] => json!(one),
                many => json!(many),
            },
        );
        m.insert("pad_token_id".into(), json!(self.pad_token_id));
        Value::Object(m)
    }

    /// Write `config.json` atomically.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.to_json()).expect("JSON values always serialize");
        crate::model::atomic::write_atomic(path, format!("{text}\n").as_bytes())
    }
}

fn parse_arch(o: &Obj) -> Result<Arch> {
    let supported = Arch::supported_list();
    if let Some(list) = o.present("architectures") {
        let names: Vec<&str> = list
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        if names.is_empty() {
            return Err(cfg_err(
                o.src,
                format!("`architectures` must be a list of class names, found {list}"),
            ));
        }
        return names.iter().find_map(|n| Arch::from_hf_class(n)).ok_or_else(|| {
            cfg_err(
                o.src,
                format!(
                    "unsupported architecture {}; supported architectures: {supported}",
                    names.join(", ")
                ),
            )
        });
    }
    match o.str_opt("model_type")? {
        Some(t) => Arch::from_model_type(t).ok_or_else(|| {
            cfg_err(
                o.src,
                format!("unsupported model_type \"{t}\"; supported architectures: {supported}"),
            )
        }),
        None => Err(cfg_err(
            o.src,
            format!("no `architectures` key; expected one of {supported}"),
        )),
    }
}

/// `rope_theta` and scaling from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4.x).
fn parse_rope(o: &Obj) -> Result<(f64, Option<RopeScaling>)> {
    let src = o.src;
    let params = match (o.present("rope_parameters"), o.present("rope_scaling")) {
        (Some(p), _) => Some(("rope_parameters", p)),
        (None, Some(s)) => Some(("rope_scaling", s)),
        (None, None) => None,
    };
    let mut theta = o.f64_opt("rope_theta")?;
    let scaling = match params {
        None => None,
        Some((key, p)) => {
            let map = p
                .as_object()
                .ok_or_else(|| cfg_err(src, format!("`{key}` must be an object, found {p}")))?;
            let po = Obj { map, src };
            if let Some(t) = po.f64_opt("rope_theta")? {
                theta = Some(t);
            }
            let ty = match po.str_opt("rope_type")? {
                Some(t) => Some(t),
                None => po.str_opt("type")?,
            };
            let factor = || {
                po.f64_opt("factor")?
                    .ok_or_else(|| cfg_err(src, format!("`{key}.factor` is required for this rope_type")))
            };
            match ty.unwrap_or("default") {
                "default" => None,
                "linear" => Some(RopeScaling::Linear { factor: factor()? }),
                "dynamic" => Some(RopeScaling::Dynamic { factor: factor()? }),
                "yarn" => Some(RopeScaling::Yarn {
                    factor: factor()?,
                    original_max_position_embeddings: po.usize_opt("original_max_position_embeddings")?,
                    attention_factor: po.f64_opt("attention_factor")?,
                    beta_fast: po.f64_opt("beta_fast")?,
                    beta_slow: po.f64_opt("beta_slow")?,
                    mscale: po.f64_opt("mscale")?,
                    mscale_all_dim: po.f64_opt("mscale_all_dim")?,
                    truncate: po.bool_opt("truncate")?,
                }),
                "llama3" => {
                    let need = |k: &str| -> Result<f64> {
                        po.f64_opt(k)?
                            .ok_or_else(|| cfg_err(src, format!("`{key}.{k}` is required for rope_type llama3")))
                    };
                    Some(RopeScaling::Llama3 {
                        factor: factor()?,
                        low_freq_factor: need("low_freq_factor")?,
                        high_freq_factor: need("high_freq_factor")?,
                        original_max_position_embeddings: po
                            .usize_opt("original_max_position_embeddings")?
                            .ok_or_else(|| {
                                cfg_err(
                                    src,
                                    format!(
                                        "`{key}.original_max_position_embeddings` is required for rope_type llama3"
                                    ),
                                )
                            })?,
                    })
                }
                other => {
                    return Err(cfg_err(
                        src,
                        format!(
                            "unsupported rope_type \"{other}\" in `{key}`; supported: {}",
                            RopeScaling::SUPPORTED
                        ),
                    ))
                }
            }
        }
    };
    Ok((theta.unwrap_or(10000.0), scaling))
}
