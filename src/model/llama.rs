//! The Llama family (Llama, Mistral with a sliding window, Qwen2 with q/k/v biases) as a
//! graph, mirroring `transformers`' `LlamaForCausalLM` so parameter names are the
//! checkpoint's names and loading is a lookup, not a translation.
//!
//! Shapes are static: `rows` sequences of `seq_len` tokens, flattened to `N = rows *
//! seq_len` token rows. Positions and segment ids are inputs, so packed rows restart
//! positions per document and documents never attend to each other.

use super::hf_config::ModelConfig;
use crate::graph::{Graph, TensorId};
use crate::ops::AttnSpec;
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
    /// Base weights trained fully beside LoRA (`lora_modules_to_save`): `embed_tokens`, `lm_head`.
    pub modules_to_save: Vec<String>,
    /// Compute logits only for this many gathered token rows (the label positions of a
    /// batch) instead of all `N`; `None` computes every row.
    pub loss_rows: Option<usize>,
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
    weights: Vec<(String, TensorId)>,
    lora: Vec<LoraPair>,
    trainable: Vec<TensorId>,
    dropout: Option<(TensorId, TensorId)>,
}

impl Builder<'_> {
    fn weight(&mut self, name: &str, shape: &[usize], short: &str) -> TensorId {
        let train = self.opts.train_base || self.opts.modules_to_save.iter().any(|m| m == short);
        let t = if train {
            let t = self.g.parameter(name, shape, param_dtype(self.opts));
            self.trainable.push(t);
            t
        } else {
            self.g.frozen(name, shape, self.opts.weight_dtype)
        };
        self.weights.push((name.to_string(), t));
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
}

/// Trainable tensors are kept in f32 (f64 in gradient checks).
fn param_dtype(o: &BuildOptions) -> DType {
    if o.act_dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Builds the forward graph and the summed cross-entropy loss.
pub fn build(cfg: &ModelConfig, opts: &BuildOptions) -> Result<ModelGraph> {
    let mut b = Builder {
        g: Graph::new(),
        cfg,
        opts,
        weights: Vec::new(),
        lora: Vec::new(),
        trainable: Vec::new(),
        dropout: None,
    };
    let n = opts.rows * opts.seq_len;
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let input_ids = b.g.input("input_ids", &[n], DType::I32);
    let positions = b.g.input("position_ids", &[n], DType::I32);
    let segments = b.g.input("segment_ids", &[n], DType::I32);
    if opts.lora.as_ref().is_some_and(|l| l.dropout > 0.0) {
        let seed = b.g.input("dropout_seed", &[1], DType::U32);
        let p = b.g.input("dropout_p", &[1], DType::F32);
        b.dropout = Some((seed, p));
    }
    let rope = cfg.rope_init();
    let inv_freq = b.g.constant("rope.inv_freq", &[hd / 2], DType::F32);

    let embed = b.weight("model.embed_tokens.weight", &[cfg.vocab_size, h], "embed_tokens");
    let mut x = b.g.embedding(embed, input_ids)?;
    x = b.g.cast(x, opts.act_dtype)?;
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let xn = b.norm(x, &format!("{p}.input_layernorm"))?;
        let att = format!("{p}.self_attn");
        let qb = cfg.attention_bias;
        let q = b.linear(xn, &format!("{att}.q_proj"), "q_proj", h, nh * hd, qb)?;
        let k = b.linear(xn, &format!("{att}.k_proj"), "k_proj", h, nkv * hd, qb)?;
        let v = b.linear(xn, &format!("{att}.v_proj"), "v_proj", h, nkv * hd, qb)?;
        let scaling = rope.attention_scaling as f64;
        let q = b.g.rope(q, positions, inv_freq, hd, scaling)?;
        let k = b.g.rope(k, positions, inv_freq, hd, scaling)?;
        let spec = AttnSpec {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            seq_len: opts.seq_len,
            causal: true,
            window: cfg.sliding_window.filter(|_| cfg.layer_uses_sliding_window(i)),
            scale: 1.0 / (hd as f64).sqrt(),
        };
        let (o, _lse) = b.g.attention(spec, q, k, v, segments)?;
        let o = b.linear(o, &format!("{att}.o_proj"), "o_proj", nh * hd, h, cfg.o_proj_bias)?;
        x = b.g.add(x, o)?;
        let xn = b.norm(x, &format!("{p}.post_attention_layernorm"))?;
        let mlp = format!("{p}.mlp");
        let f = cfg.intermediate_size;
        let gate = b.linear(xn, &format!("{mlp}.gate_proj"), "gate_proj", h, f, cfg.mlp_bias)?;
        let up = b.linear(xn, &format!("{mlp}.up_proj"), "up_proj", h, f, cfg.mlp_bias)?;
        let act = b.g.swiglu(gate, up)?;
        let down = b.linear(act, &format!("{mlp}.down_proj"), "down_proj", f, h, cfg.mlp_bias)?;
        x = b.g.add(x, down)?;
    }
    let mut x = b.norm(x, "model.norm")?;
    let (loss_index, k) = match opts.loss_rows {
        Some(k) => {
            let idx = b.g.input("loss_index", &[k], DType::I32);
            x = b.g.embedding(x, idx)?;
            (Some(idx), k)
        }
        None => (None, n),
    };
    let head = if cfg.tie_word_embeddings {
        embed
    } else {
        b.weight("lm_head.weight", &[cfg.vocab_size, h], "lm_head")
    };
    let logits = b.g.linear(x, head)?;
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
