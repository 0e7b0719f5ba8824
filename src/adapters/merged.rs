//! A base model seen through a LoRA adapter: every targeted weight is `W + s B A`, and
//! fully trained modules come from the adapter. Used to generate with an adapter and to
//! write merged checkpoints.

use super::lora::{lora_a_key, lora_b_key, merge_weight, saved_module_key, AdapterConfig};
use crate::tensor::{DType, HostTensor};
use crate::train::session::WeightSource;
use crate::Result;
use std::collections::BTreeMap;

pub struct MergedWeights<'a> {
    pub base: &'a dyn WeightSource,
    pub config: AdapterConfig,
    pub tensors: BTreeMap<String, HostTensor>,
}

impl MergedWeights<'_> {
    /// The module path of a weight name: `model.layers.0.self_attn.q_proj.weight` ->
    /// `model.layers.0.self_attn.q_proj`.
    fn module(name: &str) -> Option<&str> {
        name.strip_suffix(".weight")
    }

    /// Which adapter keys a merge consumes, to report ones that matched no weight.
    pub fn unused_keys(&self, weight_names: &[String]) -> Vec<String> {
        self.tensors
            .keys()
            .filter(|k| {
                !weight_names.iter().any(|w| {
                    Self::module(w).is_some_and(|m| **k == lora_a_key(m) || **k == lora_b_key(m))
                        || **k == saved_module_key(w)
                })
            })
            .cloned()
            .collect()
    }
}

impl WeightSource for MergedWeights<'_> {
    fn contains(&self, name: &str) -> bool {
        self.base.contains(name) || self.tensors.contains_key(&saved_module_key(name))
    }

    fn get_shaped(&self, name: &str, shape: &[usize], dtype: DType) -> Result<HostTensor> {
        if let Some(t) = self.tensors.get(&saved_module_key(name)) {
            if t.shape != shape {
                return Err(crate::msg!(
                    "adapter tensor {name}: expected {shape:?}, found {:?}",
                    t.shape
                ));
            }
            return Ok(t.cast(dtype));
        }
        let base = self.base.get_shaped(name, shape, DType::F32)?;
        match Self::module(name)
            .and_then(|m| Some((self.tensors.get(&lora_a_key(m))?, self.tensors.get(&lora_b_key(m))?)))
        {
            Some((a, b)) => Ok(merge_weight(&base, a, b, self.config.scale())
                .map_err(|e| crate::msg!("adapter pair for {name}: {e}"))?
                .cast(dtype)),
            None => Ok(base.cast(dtype)),
        }
    }
}
