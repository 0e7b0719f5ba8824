//! `attn_implementation` (axolotl's values, `src/axolotl/utils/schemas/enums.py` and
//! `docs/attention.qmd`), its legacy boolean aliases, and `flex_attention_mask`.
//!
//! Every implementation here takes segment ids, so packing works with all of them
//! (axolotl's `attn_supports_packing` is true for each value we accept).

use crate::ops::{FlexMask, MaskExpr};
use crate::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_yaml::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttnImplementation {
    /// The score matrix as graph ops (the reference; O(T^2) memory).
    Eager,
    /// The fused attention op (O(T) memory, log-sum-exp saved for the backward).
    #[default]
    Sdpa,
    FlashAttention2,
    FlexAttention,
    /// Accepted as another name of the fused op.
    Xformers,
}

/// The values we accept, in the order the error message lists them.
pub const SUPPORTED: [(&str, AttnImplementation); 5] = [
    ("eager", AttnImplementation::Eager),
    ("sdpa", AttnImplementation::Sdpa),
    ("flash_attention_2", AttnImplementation::FlashAttention2),
    ("flex_attention", AttnImplementation::FlexAttention),
    ("xformers", AttnImplementation::Xformers),
];

/// axolotl's legacy booleans and the value each stands for, highest priority first
/// (axolotl maps `s2_attention + flash_attention` to `s2`, and so on down this list).
pub const LEGACY_FLAGS: [(&str, &str); 7] = [
    ("s2_attention", "s2"),
    ("sage_attention", "sage"),
    ("xformers_attention", "xformers"),
    ("flex_attention", "flex_attention"),
    ("flash_attention", "flash_attention_2"),
    ("sdp_attention", "sdpa"),
    ("eager_attention", "eager"),
];

impl AttnImplementation {
    pub fn name(self) -> &'static str {
        SUPPORTED
            .iter()
            .find(|(_, v)| *v == self)
            .map(|(n, _)| *n)
            .unwrap_or("sdpa")
    }

    /// Parses a value; unsupported axolotl values and typos get an error naming the choices.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        if let Some((_, v)) = SUPPORTED.iter().find(|(n, _)| *n == s) {
            return Ok(*v);
        }
        let names: Vec<&str> = SUPPORTED.iter().map(|(n, _)| *n).collect();
        let why = match s {
            "flash_attention_3" => "FlashAttention-3 is not implemented; `flash_attention_2` runs the tiled kernel",
            "sage" => "SageAttention (quantized attention) is not implemented",
            "s2" => "shifted sparse attention (LongLoRA S2) is not implemented",
            "fp8" => "FP8 attention is not implemented",
            "flash" | "fa2" | "flash_attn" => "short names are not accepted (as in axolotl); write `flash_attention_2`",
            "sdp" => "short names are not accepted (as in axolotl); write `sdpa`",
            "flex" => "short names are not accepted (as in axolotl); write `flex_attention`",
            _ if s.contains('/') => "hub kernels are not supported",
            _ => "unknown value",
        };
        Err(format!("{s:?}: {why}; supported: {}", names.join(", ")))
    }

    /// The eager reference rather than the fused attention op.
    pub fn is_eager(self) -> bool {
        self == AttnImplementation::Eager
    }

    /// axolotl's derived `attn_supports_packing`: every backend here takes segment ids.
    pub fn supports_packing(self) -> bool {
        true
    }
}

impl<'de> Deserialize<'de> for AttnImplementation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for AttnImplementation {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Replaces the legacy booleans by `attn_implementation` (axolotl's normalizer): a flag
/// set to `true` maps to its value, the highest-priority flag wins, `false` flags are
/// dropped, and a flag beside `attn_implementation` is an error.
pub fn normalize_legacy_flags(doc: &mut Value) -> Result<()> {
    let Value::Mapping(map) = doc else {
        return Ok(());
    };
    let mut on = Vec::new();
    for (flag, value) in LEGACY_FLAGS {
        if let Some(v) = map.remove(flag) {
            match v {
                Value::Bool(true) => on.push((flag, value)),
                Value::Bool(false) | Value::Null => {}
                other => {
                    return Err(Error::Config(format!(
                        "{flag}: expected true or false, got {}",
                        serde_yaml::to_string(&other).unwrap_or_default().trim()
                    )))
                }
            }
        }
    }
    let Some(&(flag, value)) = on.first() else {
        return Ok(());
    };
    if map.contains_key("attn_implementation") {
        return Err(Error::Config(format!(
            "{flag}: the legacy flag conflicts with attn_implementation; keep only attn_implementation"
        )));
    }
    map.insert("attn_implementation".into(), value.into());
    Ok(())
}

/// The mask terms `flex_attention_mask` asks for: `causal` (the default, nothing extra),
/// `prefix_lm`, or an expression in the mask language.
pub fn flex_mask(value: Option<&str>) -> std::result::Result<FlexMask, String> {
    match value.map(str::trim) {
        None | Some("causal") => Ok(FlexMask::default()),
        Some("prefix_lm") => Ok(FlexMask {
            prefix_lm: true,
            expr: None,
        }),
        Some(src) => MaskExpr::parse(src)
            .map(|e| FlexMask {
                prefix_lm: false,
                expr: Some(e),
            })
            .map_err(|e| e.to_string()),
    }
}
