//! RoPE inverse frequencies, computed as transformers' `ROPE_INIT_FUNCTIONS` do
//! (transformers/modeling_rope_utils.py: `_compute_default_rope_parameters`,
//! `_compute_linear_scaling_rope_parameters`, `_compute_dynamic_ntk_parameters`,
//! `_compute_yarn_parameters`, `_compute_llama3_parameters`).
//!
//! transformers evaluates these in f32 tensors with f64 Python scalars; the same order of
//! operations is kept here so the values agree to the last bit or two.

use super::hf_config::{ModelConfig, RopeScaling};

/// Inverse frequencies (`head_dim / 2` of them) and the factor that cos/sin are multiplied by.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeInit {
    pub inv_freq: Vec<f32>,
    /// 1.0 except for YaRN (`attention_factor`, the "mscale" of the paper).
    pub attention_scaling: f32,
}

/// `1 / base^(2i/dim)` for i in 0..dim/2, in f32 like `torch.arange(0, dim, 2).float() / dim`.
fn default_inv_freq(base: f64, dim: usize) -> Vec<f32> {
    (0..dim)
        .step_by(2)
        .map(|i| 1.0f32 / (base as f32).powf(i as f32 / dim as f32))
        .collect()
}

impl ModelConfig {
    /// Inverse frequencies and attention scaling at initialisation (sequence length =
    /// `max_position_embeddings`, so dynamic NTK equals the unscaled frequencies).
    pub fn rope_init(&self) -> RopeInit {
        let dim = self.head_dim;
        let base = self.rope_theta;
        match &self.rope_scaling {
            None => RopeInit {
                inv_freq: default_inv_freq(base, dim),
                attention_scaling: 1.0,
            },
            // Scaling positions by 1/factor equals scaling inv_freq by 1/factor (freqs = inv_freq * pos).
            Some(RopeScaling::Linear { factor }) => RopeInit {
                inv_freq: default_inv_freq(base, dim)
                    .into_iter()
                    .map(|f| f / *factor as f32)
                    .collect(),
                attention_scaling: 1.0,
            },
            Some(RopeScaling::Dynamic { factor }) => {
                // base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2)), seq_len = max_pos.
                let seq_len = self.max_position_embeddings as f64;
                let max_pos = self.max_position_embeddings as f64;
                let b = base * ((factor * seq_len / max_pos) - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0));
                RopeInit {
                    inv_freq: default_inv_freq(b, dim),
                    attention_scaling: 1.0,
                }
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => RopeInit {
                inv_freq: llama3(
                    default_inv_freq(base, dim),
                    *factor,
                    *low_freq_factor,
                    *high_freq_factor,
                    *original_max_position_embeddings as f64,
                ),
                attention_scaling: 1.0,
            },
            Some(y @ RopeScaling::Yarn { .. }) => self.yarn(y),
        }
    }

    /// `rope_init().inv_freq`.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        self.rope_init().inv_freq
    }

    /// `rope_init().attention_scaling`: the factor on cos and sin (YaRN; 1.0 otherwise).
    pub fn rope_attention_scaling(&self) -> f32 {
        self.rope_init().attention_scaling
    }

    fn yarn(&self, y: &RopeScaling) -> RopeInit {
        let RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            attention_factor,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            truncate,
        } = y
        else {
            unreachable!("yarn() is called with RopeScaling::Yarn only")
        };
        let dim = self.head_dim;
        let base = self.rope_theta;
        let factor = *factor;
        // transformers 5 fills a missing original_max_position_embeddings with max_position_embeddings.
        let orig_max = original_max_position_embeddings.unwrap_or(self.max_position_embeddings) as f64;

        let get_mscale = |scale: f64, m: f64| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * m * scale.ln() + 1.0
            }
        };
        let attention = match (attention_factor, mscale, mscale_all_dim) {
            (Some(a), _, _) => *a,
            (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => get_mscale(factor, *m) / get_mscale(factor, *ma),
            _ => get_mscale(factor, 1.0),
        };
        let beta_fast = beta_fast.filter(|b| *b != 0.0).unwrap_or(32.0);
        let beta_slow = beta_slow.filter(|b| *b != 0.0).unwrap_or(1.0);

        // Inverse of the rotation count: the dimension whose wavelength fits num_rotations times.
        let correction_dim =
            |num_rot: f64| (dim as f64 * (orig_max / (num_rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
        let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
        if truncate.unwrap_or(true) {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let high = high.min(dim as f64 - 1.0);
        let high = if low == high { high + 0.001 } else { high };

        let pos_freqs: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| (base as f32).powf(i as f32 / dim as f32))
            .collect();
        let inv_freq = pos_freqs
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let extrapolation = 1.0f32 / p;
                let interpolation = 1.0f32 / (factor as f32 * p);
                let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                let extrapolation_factor = 1.0f32 - ramp;
                interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
            })
            .collect();
        RopeInit {
            inv_freq,
            attention_scaling: attention as f32,
        }
    }
}

/// Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
fn llama3(
    inv_freq: Vec<f32>,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    old_context_len: f64,
) -> Vec<f32> {
    // Python scalars meet f32 tensors here, so comparisons happen in f32.
    let low_freq_wavelen = (old_context_len / low_freq_factor) as f32;
    let high_freq_wavelen = (old_context_len / high_freq_factor) as f32;
    inv_freq
        .into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            let scaled = if wavelen > low_freq_wavelen {
                f / factor as f32
            } else {
                f
            };
            // transformers: `~(wavelen < high) * ~(wavelen > low)`; no NaN here, so high <= w <= low.
            let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
            if is_medium {
                let smooth = (old_context_len as f32 / wavelen - low_freq_factor as f32)
                    / (high_freq_factor - low_freq_factor) as f32;
                (1.0 - smooth) * scaled / factor as f32 + smooth * scaled
            } else {
                scaled
            }
        })
        .collect()
}
