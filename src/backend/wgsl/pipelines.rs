//! Compute pipelines, built once and cached by (shader, specialization, entry point).
//!
//! A shader is a `shaders/*.wgsl` file (loaded with `include_str!`) specialized by text
//! prepended to it: `enable` directives first, then `const`/`alias`/binding lines chosen by
//! the host (tile sizes, transposes, storage dtypes). WGSL `override` constants are passed
//! through the pipeline's compilation options. There is no other preprocessing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::Result;

use super::context::WgslContext;

/// What to build: a shader file and its specialization.
#[derive(Clone, Debug)]
pub struct ShaderSpec {
    /// Name for labels and error messages, e.g. `matmul_simt`.
    pub name: &'static str,
    /// The WGSL file's text.
    pub source: &'static str,
    /// `enable` directives, e.g. `f16`, `wgpu_cooperative_matrix`.
    pub enables: Vec<&'static str>,
    /// WGSL declarations placed before `source`: `const X = 4u;`, aliases, bindings, helpers.
    pub prelude: String,
    pub entry: &'static str,
    /// Values for the shader's `override` constants.
    pub overrides: Vec<(&'static str, f64)>,
}

impl ShaderSpec {
    /// The full WGSL text handed to naga.
    pub fn full_source(&self) -> String {
        let mut s = String::new();
        for e in &self.enables {
            s.push_str("enable ");
            s.push_str(e);
            s.push_str(";\n");
        }
        s.push_str(&self.prelude);
        s.push('\n');
        s.push_str(self.source);
        s
    }

    fn key(&self) -> Key {
        Key {
            name: self.name,
            enables: self.enables.clone(),
            prelude: self.prelude.clone(),
            entry: self.entry,
            overrides: self.overrides.iter().map(|(k, v)| (*k, v.to_bits())).collect(),
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    name: &'static str,
    enables: Vec<&'static str>,
    prelude: String,
    entry: &'static str,
    overrides: Vec<(&'static str, u64)>,
}

/// A built pipeline and the layout of its bind group 0.
#[derive(Debug)]
pub struct CachedPipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// The per-device cache. Pipelines live as long as the context.
#[derive(Default)]
pub struct PipelineCache {
    map: Mutex<HashMap<Key, Arc<CachedPipeline>>>,
}

impl PipelineCache {
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl WgslContext {
    /// The pipeline for `spec`, built on first use.
    pub fn pipeline(&self, spec: &ShaderSpec) -> Result<Arc<CachedPipeline>> {
        let key = spec.key();
        if let Some(p) = self.pipelines.map.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(p);
        }
        let built = Arc::new(self.build_pipeline(spec)?);
        if let Ok(mut m) = self.pipelines.map.lock() {
            m.insert(key, built.clone());
        }
        Ok(built)
    }

    /// How many pipelines have been built.
    pub fn pipeline_count(&self) -> usize {
        self.pipelines.len()
    }

    fn build_pipeline(&self, spec: &ShaderSpec) -> Result<CachedPipeline> {
        let source = spec.full_source();
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(spec.name),
            source: wgpu::ShaderSource::Wgsl(source.as_str().into()),
        };
        #[cfg(not(target_arch = "wasm32"))]
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = if self.trusted && !cfg!(target_arch = "wasm32") {
            // SAFETY: our shaders guard every array index with explicit bounds checks
            // against the bound sizes, and the matmul tests exercise edges and odd shapes.
            unsafe {
                self.device
                    .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
            }
        } else {
            self.device.create_shader_module(desc)
        };
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(spec.name),
            layout: None,
            module: &module,
            entry_point: Some(spec.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &spec.overrides,
                // Every kernel writes its workgroup memory before reading it.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(crate::error::Error::backend(
                "wgsl",
                format!(
                    "building shader {} (entry {}) failed: {err}\n--- source ---\n{}",
                    spec.name,
                    spec.entry,
                    numbered(&source)
                ),
            ));
        }
        let layout = pipeline.get_bind_group_layout(0);
        Ok(CachedPipeline { pipeline, layout })
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn numbered(src: &str) -> String {
    src.lines()
        .enumerate()
        .map(|(i, l)| format!("{:4} {l}\n", i + 1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_puts_enables_first() {
        let s = ShaderSpec {
            name: "t",
            source: "fn main() {}",
            enables: vec!["f16"],
            prelude: "const X = 1u;".into(),
            entry: "main",
            overrides: vec![],
        };
        assert_eq!(s.full_source(), "enable f16;\nconst X = 1u;\nfn main() {}");
    }
}
