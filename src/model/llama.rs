//! The Llama family (Llama, Mistral with a sliding window, Qwen2 with q/k/v biases) as a
//! graph, mirroring `transformers`' `LlamaForCausalLM` so parameter names are the
//! checkpoint's names and loading is a lookup, not a translation.
//!
//! Shapes are static: `rows` sequences of `seq_len` tokens, flattened to `N = rows *
//! seq_len` token rows. Positions and segment ids are inputs, so packed rows restart
//! positions per document and documents never attend to each other.

use super::hf_config::ModelConfig;
use crate::graph::{Graph, TensorId};
use crate::ops::{attn_eager, AttnSpec, FlexMask, Op};
use crate::tensor::DType;
use crate::Result;

/// The seven linear projections of a decoder layer, by their Hugging Face names.
pub const LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// LoRA on some linear modules (PEFT semantics).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraOptions {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    /// Module short names (`q_proj`, ...) that get an adapter.
    pub targets: Vec<String>,
}

impl LoraOptions {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (Kalajdzievski 2023).
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// The modules a model trains fully for `lora_modules_to_save`: with tied embeddings
/// `lm_head` is the embedding matrix, so it is trained as `embed_tokens` (as PEFT does with
/// `ensure_weight_tying`); each module appears once.
pub fn modules_to_save_for(cfg: &ModelConfig, modules: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for m in modules {
        let m = if cfg.tie_word_embeddings && m == "lm_head" {
            "embed_tokens"
        } else {
            m.as_str()
        };
        if !out.iter().any(|o| o == m) {
            out.push(m.to_string());
        }
    }
    out
}

/// What to train and how to lay the graph out.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub rows: usize,
    pub seq_len: usize,
    /// Storage type of frozen weights.
    pub weight_dtype: DType,
    /// Compute/storage type of activations (f32; f64 for gradient checks).
    pub act_dtype: DType,
    pub lora: Option<LoraOptions>,
    /// Train every base weight (full fine-tuning).
    pub train_base: bool,
    /// Base weights trained fully beside LoRA (`lora_modules_to_save`): `embed_tokens`, `lm_head`
    /// (on a model with tied embeddings `lm_head` means `embed_tokens`, see [`modules_to_save_for`]).
    pub modules_to_save: Vec<String>,
    /// Compute logits only for this many gathered token rows (the label positions of a
    /// batch) instead of all `N`; `None` computes every row.
    pub loss_rows: Option<usize>,
}

/// How attention is computed (`attn_implementation`) and masked (`flex_attention_mask`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttnOptions {
    /// Materialise the scores as graph ops (`eager`) instead of the fused attention op.
    pub eager: bool,
    /// Prefix-LM or a user mask beyond the causal / window / document rules.
    pub flex: FlexMask,
}

/// A LoRA adapter pair on one module, with PEFT's tensor names.
#[derive(Clone, Debug)]
pub struct LoraPair {
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    pub a: TensorId,
    pub b: TensorId,
    pub in_features: usize,
    pub out_features: usize,
}

/// The built forward graph and the handles the trainer needs.
pub struct ModelGraph {
    pub graph: Graph,
    pub config: ModelConfig,
    pub opts: BuildOptions,
    /// `[N]` i32 token ids.
    pub input_ids: TensorId,
    /// `[N]` i32 positions (restart at 0 per packed document).
    pub positions: TensorId,
    /// `[N]` i32 segment ids (documents in a row; padding is its own segment).
    pub segments: TensorId,
    /// `[N]` i32 prompt-prefix flags, with prefix-LM masks (see [`prefix_flags`]).
    pub prefix: Option<TensorId>,
    pub attn: AttnOptions,
    /// `[K]` i32 rows of the hidden state to compute logits for (when `loss_rows` is set).
    pub loss_index: Option<TensorId>,
    /// `[K or N]` i32 next-token targets, -100 where no loss is taken.
    pub targets: TensorId,
    pub logits: TensorId,
    pub loss_sum: TensorId,
    pub label_count: TensorId,
    /// Dropout seed `[1]` u32 and probability `[1]` f32 (LoRA dropout), when used.
    pub dropout: Option<(TensorId, TensorId)>,
    pub inv_freq: TensorId,
    /// Base weights by checkpoint name (frozen or trainable).
    pub weights: Vec<(String, TensorId)>,
    pub lora: Vec<LoraPair>,
    /// Every trainable tensor, in creation order.
    pub trainable: Vec<TensorId>,
}

struct Builder<'a> {
    g: Graph,
    cfg: &'a ModelConfig,
    opts: &'a BuildOptions,
    /// Weights by name, so several passes (prefill and decode) share one tensor.
    by_name: std::collections::HashMap<String, TensorId>,
    attn: AttnOptions,
    weights: Vec<(String, TensorId)>,
    lora: Vec<LoraPair>,
    trainable: Vec<TensorId>,
    dropout: Option<(TensorId, TensorId)>,
}

impl Builder<'_> {
    fn weight(&mut self, name: &str, shape: &[usize], short: &str) -> TensorId {
        if let Some(&t) = self.by_name.get(name) {
            return t;
        }
        let train = self.opts.train_base || self.opts.modules_to_save.iter().any(|m| m == short);
        let t = if train {
            let t = self.g.parameter(name, shape, param_dtype(self.opts));
            self.trainable.push(t);
            t
        } else {
            self.g.frozen(name, shape, self.opts.weight_dtype)
        };
        self.weights.push((name.to_string(), t));
        self.by_name.insert(name.to_string(), t);
        t
    }

    /// `x W^T (+ b)`, with a LoRA side path when the module is targeted.
    fn linear(
        &mut self,
        x: TensorId,
        module: &str,
        short: &str,
        inp: usize,
        out: usize,
        bias: bool,
    ) -> Result<TensorId> {
        let w = self.weight(&format!("{module}.weight"), &[out, inp], short);
        let lora = self.opts.lora.clone().filter(|l| l.targets.iter().any(|t| t == short));
        let mut y = match lora {
            Some(l) => {
                let pd = param_dtype(self.opts);
                let a = self
                    .g
                    .parameter(&format!("base_model.model.{module}.lora_A.weight"), &[l.r, inp], pd);
                let b = self
                    .g
                    .parameter(&format!("base_model.model.{module}.lora_B.weight"), &[out, l.r], pd);
                self.trainable.extend([a, b]);
                self.lora.push(LoraPair {
                    module: module.to_string(),
                    a,
                    b,
                    in_features: inp,
                    out_features: out,
                });
                let drop = if l.dropout > 0.0 { self.dropout } else { None };
                let salt = self.lora.len() as u32;
                self.g
                    .lora_linear(x, w, a, b, l.scale(), drop.map(|(s, p)| (s, p, salt)))?
            }
            None => self.g.linear(x, w)?,
        };
        if bias {
            let b = self.weight(&format!("{module}.bias"), &[out], short);
            let b = self.g.cast(b, self.opts.act_dtype)?;
            y = self.g.add(y, b)?;
        }
        Ok(y)
    }

    fn norm(&mut self, x: TensorId, name: &str) -> Result<TensorId> {
        let w = self.weight(&format!("{name}.weight"), &[self.cfg.hidden_size], "norm");
        self.g.rms_norm(x, w, self.cfg.rms_norm_eps)
    }
    /// Embedding, decoder layers and the final norm: the hidden state of every token.
    fn forward(
        &mut self,
        ids: TensorId,
        positions: TensorId,
        inv_freq: TensorId,
        rope_scale: f64,
        attend: &Attend,
    ) -> Result<TensorId> {
        let cfg = self.cfg;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let seq_len = match attend {
            Attend::Packed { .. } => self.opts.seq_len,
            Attend::Cached { seq_len, .. } => *seq_len,
        };
        let embed = self.weight("model.embed_tokens.weight", &[cfg.vocab_size, h], "embed_tokens");
        let x = self.g.embedding(embed, ids)?;
        let mut x = self.g.cast(x, self.opts.act_dtype)?;
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let xn = self.norm(x, &format!("{p}.input_layernorm"))?;
            let att = format!("{p}.self_attn");
            let qb = cfg.attention_bias;
            let q = self.linear(xn, &format!("{att}.q_proj"), "q_proj", h, nh * hd, qb)?;
            let k = self.linear(xn, &format!("{att}.k_proj"), "k_proj", h, nkv * hd, qb)?;
            let v = self.linear(xn, &format!("{att}.v_proj"), "v_proj", h, nkv * hd, qb)?;
            let q = self.g.rope(q, positions, inv_freq, hd, rope_scale)?;
            let k = self.g.rope(k, positions, inv_freq, hd, rope_scale)?;
            let spec = AttnSpec {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                seq_len,
                causal: true,
                window: cfg.sliding_window.filter(|_| cfg.layer_uses_sliding_window(i)),
                scale: 1.0 / (hd as f64).sqrt(),
                flex: FlexMask::default(),
            };
            let o = match attend {
                Attend::Packed { segments, prefix } => {
                    let spec = AttnSpec {
                        flex: self.attn.flex.clone(),
                        ..spec
                    };
                    let mut inputs = vec![q, k, v, *segments];
                    inputs.extend(prefix);
                    if self.attn.eager {
                        attn_eager::build(&mut self.g, &spec, &inputs)?
                    } else {
                        self.g.apply(Op::Attention(spec), &inputs)?[0]
                    }
                }
                Attend::Cached { caches, slots, .. } => {
                    let (kc, vc) = caches[i];
                    let kc = self.g.apply1(Op::CacheWrite, &[kc, k, *slots])?;
                    let vc = self.g.apply1(Op::CacheWrite, &[vc, v, *slots])?;
                    self.g.apply1(Op::AttentionCached(spec), &[q, kc, vc, positions])?
                }
            };
            let o = self.linear(o, &format!("{att}.o_proj"), "o_proj", nh * hd, h, cfg.o_proj_bias)?;
            x = self.g.add(x, o)?;
            let xn = self.norm(x, &format!("{p}.post_attention_layernorm"))?;
            let mlp = format!("{p}.mlp");
            let f = cfg.intermediate_size;
            let gate = self.linear(xn, &format!("{mlp}.gate_proj"), "gate_proj", h, f, cfg.mlp_bias)?;
            let up = self.linear(xn, &format!("{mlp}.up_proj"), "up_proj", h, f, cfg.mlp_bias)?;
            let act = self.g.swiglu(gate, up)?;
            let down = self.linear(act, &format!("{mlp}.down_proj"), "down_proj", f, h, cfg.mlp_bias)?;
            x = self.g.add(x, down)?;
        }
        self.norm(x, "model.norm")
    }

    /// The language-model head (tied to the embedding when the config says so).
    fn head(&mut self, x: TensorId) -> Result<TensorId> {
        let (v, h) = (self.cfg.vocab_size, self.cfg.hidden_size);
        let head = if self.cfg.tie_word_embeddings {
            self.weight("model.embed_tokens.weight", &[v, h], "embed_tokens")
        } else {
            self.weight("lm_head.weight", &[v, h], "lm_head")
        };
        self.g.linear(x, head)
    }
}

/// How a pass attends: within packed segments (training), or over a KV cache (generation).
enum Attend {
    Packed {
        segments: TensorId,
        prefix: Option<TensorId>,
    },
    Cached {
        caches: Vec<(TensorId, TensorId)>,
        slots: TensorId,
        seq_len: usize,
    },
}

/// Trainable tensors are kept in f32 (f64 in gradient checks).
fn param_dtype(o: &BuildOptions) -> DType {
    if o.act_dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

fn new_builder<'a>(cfg: &'a ModelConfig, opts: &'a BuildOptions) -> Builder<'a> {
    Builder {
        g: Graph::new(),
        cfg,
        opts,
        by_name: Default::default(),
        attn: AttnOptions::default(),
        weights: Vec::new(),
        lora: Vec::new(),
        trainable: Vec::new(),
        dropout: None,
    }
}

/// Builds the forward graph and the summed cross-entropy loss (fused attention, no extra
/// mask terms).
pub fn build(cfg: &ModelConfig, opts: &BuildOptions) -> Result<ModelGraph> {
    build_with_attention(cfg, opts, &AttnOptions::default())
}

/// [`build`] with a choice of attention implementation and mask.
pub fn build_with_attention(cfg: &ModelConfig, opts: &BuildOptions, attn: &AttnOptions) -> Result<ModelGraph> {
    let opts = &BuildOptions {
        modules_to_save: modules_to_save_for(cfg, &opts.modules_to_save),
        ..opts.clone()
    };
    let mut b = new_builder(cfg, opts);
    b.attn = attn.clone();
    let n = opts.rows * opts.seq_len;
    let input_ids = b.g.input("input_ids", &[n], DType::I32);
    let positions = b.g.input("position_ids", &[n], DType::I32);
    let segments = b.g.input("segment_ids", &[n], DType::I32);
    let prefix = attn.flex.prefix_lm.then(|| b.g.input("prefix_flags", &[n], DType::I32));
    if opts.lora.as_ref().is_some_and(|l| l.dropout > 0.0) {
        let seed = b.g.input("dropout_seed", &[1], DType::U32);
        let p = b.g.input("dropout_p", &[1], DType::F32);
        b.dropout = Some((seed, p));
    }
    let rope = cfg.rope_init();
    let inv_freq = b.g.constant("rope.inv_freq", &[cfg.head_dim / 2], DType::F32);
    let mut x = b.forward(
        input_ids,
        positions,
        inv_freq,
        rope.attention_scaling as f64,
        &Attend::Packed { segments, prefix },
    )?;
    let (loss_index, k) = match opts.loss_rows {
        Some(k) => {
            let idx = b.g.input("loss_index", &[k], DType::I32);
            x = b.g.embedding(x, idx)?;
            (Some(idx), k)
        }
        None => (None, n),
    };
    let logits = b.head(x)?;
    b.g.set_name(logits, "logits");
    let targets = b.g.input("targets", &[k], DType::I32);
    let (loss_sum, label_count) = b.g.cross_entropy(logits, targets)?;
    b.g.set_name(loss_sum, "loss_sum");
    b.g.set_name(label_count, "label_count");
    Ok(ModelGraph {
        graph: b.g,
        config: cfg.clone(),
        opts: opts.clone(),
        input_ids,
        positions,
        segments,
        prefix,
        attn: attn.clone(),
        loss_index,
        targets,
        logits,
        loss_sum,
        label_count,
        dropout: b.dropout,
        inv_freq,
        weights: b.weights,
        lora: b.lora,
        trainable: b.trainable,
    })
}

/// Prefix-LM flags of a batch: a token is in its document's prompt prefix when it and every
/// earlier token of its segment carry no label (`labels` aligned with the tokens, -100 = none).
pub fn prefix_flags(labels: &[i32], segments: &[u32], seq_len: usize) -> Vec<i32> {
    let mut out = vec![0; labels.len()];
    let mut open = false;
    for i in 0..labels.len() {
        if i % seq_len == 0 || segments[i] != segments[i - 1] {
            open = true;
        }
        open &= labels[i] == crate::data::IGNORE_INDEX;
        out[i] = open as i32;
    }
    out
}

/// Inputs and outputs of one generation pass over `rows` sequences of `seq_len` new tokens.
#[derive(Clone, Copy, Debug)]
pub struct GenPass {
    pub seq_len: usize,
    /// `[rows * seq_len]` i32 token ids.
    pub input_ids: TensorId,
    /// `[rows * seq_len]` i32 positions (-1 for padding).
    pub positions: TensorId,
    /// `[rows * seq_len]` i32 cache slots `row * max_len + position` (-1 for padding).
    pub slots: TensorId,
    /// `[rows]` i32: the token row whose logits are wanted, per sequence.
    pub last: TensorId,
    /// `[rows, vocab]`
    pub logits: TensorId,
}

/// A generation graph: a prefill pass over the prompts and a one-token decode pass,
/// sharing the weights and the per-layer key/value caches.
pub struct GenGraph {
    pub graph: Graph,
    pub config: ModelConfig,
    pub rows: usize,
    pub max_len: usize,
    pub prefill: GenPass,
    pub decode: GenPass,
    pub inv_freq: TensorId,
    pub weights: Vec<(String, TensorId)>,
}

impl GenGraph {
    /// The ModelGraph-like view used to load weights.
    pub fn weight_list(&self) -> &[(String, TensorId)] {
        &self.weights
    }
}

/// Builds a generation graph for `rows` prompts of up to `prompt_len` tokens and a
/// cache of `max_len` positions.
pub fn build_generation(
    cfg: &ModelConfig,
    rows: usize,
    prompt_len: usize,
    max_len: usize,
    weight_dtype: DType,
    act_dtype: DType,
) -> Result<GenGraph> {
    let opts = BuildOptions {
        rows,
        seq_len: prompt_len,
        weight_dtype,
        act_dtype,
        lora: None,
        train_base: false,
        modules_to_save: vec![],
        loss_rows: None,
    };
    let mut b = new_builder(cfg, &opts);
    let kvw = cfg.num_key_value_heads * cfg.head_dim;
    let caches: Vec<(TensorId, TensorId)> = (0..cfg.num_hidden_layers)
        .map(|i| {
            let k = b.g.state(&format!("cache.{i}.k"), &[rows, max_len, kvw], act_dtype);
            let v = b.g.state(&format!("cache.{i}.v"), &[rows, max_len, kvw], act_dtype);
            (k, v)
        })
        .collect();
    let rope = cfg.rope_init();
    let inv_freq = b.g.constant("rope.inv_freq", &[cfg.head_dim / 2], DType::F32);
    let pass = |b: &mut Builder, name: &str, seq_len: usize| -> Result<GenPass> {
        let n = rows * seq_len;
        let input_ids = b.g.input(&format!("{name}.input_ids"), &[n], DType::I32);
        let positions = b.g.input(&format!("{name}.position_ids"), &[n], DType::I32);
        let slots = b.g.input(&format!("{name}.slots"), &[n], DType::I32);
        let last = b.g.input(&format!("{name}.last"), &[rows], DType::I32);
        let attend = Attend::Cached {
            caches: caches.clone(),
            slots,
            seq_len,
        };
        let x = b.forward(input_ids, positions, inv_freq, rope.attention_scaling as f64, &attend)?;
        let x = b.g.embedding(x, last)?;
        let logits = b.head(x)?;
        Ok(GenPass {
            seq_len,
            input_ids,
            positions,
            slots,
            last,
            logits,
        })
    };
    let prefill = pass(&mut b, "prefill", prompt_len)?;
    let decode = pass(&mut b, "decode", 1)?;
    Ok(GenGraph {
        graph: b.g,
        config: cfg.clone(),
        rows,
        max_len,
        prefill,
        decode,
        inv_freq,
        weights: b.weights,
    })
}

/// Next-token targets for packed rows: position `i` predicts token `i + 1` of the same
/// document; the last token of each document (and padding) predicts nothing (-100).
/// `labels` holds the per-token labels (-100 where the token is not trained).
pub fn shift_targets(labels: &[i32], segments: &[i32], seq_len: usize) -> Vec<i32> {
    let mut t = vec![-100; labels.len()];
    for row in 0..labels.len() / seq_len {
        for i in 0..seq_len - 1 {
            let (a, b) = (row * seq_len + i, row * seq_len + i + 1);
            if segments[a] == segments[b] {
                t[a] = labels[b];
            }
        }
    }
    t
}
