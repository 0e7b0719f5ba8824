//! The page's JavaScript API (wasm-bindgen), used from the page's worker (`www/worker.js`),
//! which awaits each call and returns to its event loop between steps so that Cancel
//! reaches it; errors come back as JavaScript `Error`s whose message says what is wrong
//! and what to do.

use crate::demo::{self, Adapter, Dataset, Model, Run, TrainOptions};
use ferrotune::backend::Backend;
use std::rc::Rc;
use wasm_bindgen::prelude::*;

fn js_err(e: ferrotune::Error) -> JsError {
    JsError::new(&e.to_string())
}

/// A device to compute on: `webgpu` (the WGSL backend on the browser's WebGPU) or `cpu`
/// (single-threaded WebAssembly).
#[wasm_bindgen]
pub struct Device {
    name: String,
    info: String,
}

#[wasm_bindgen]
impl Device {
    /// Checks that the device can be used (for WebGPU: an adapter and a device can be had).
    pub async fn open(name: String) -> Result<Device, JsError> {
        let b = backend(&name).await?;
        check_gpu()?;
        Ok(Device {
            info: b.device_info(),
            name,
        })
    }
    #[wasm_bindgen(getter)]
    pub fn name(&self) -> String {
        self.name.clone()
    }
    #[wasm_bindgen(getter)]
    pub fn info(&self) -> String {
        self.info.clone()
    }
}

/// Fails with WebGPU's first error since the last check (the results it came with are wrong).
fn check_gpu() -> Result<(), JsError> {
    match crate::webgpu::take_error() {
        Some(e) => Err(JsError::new(&format!(
            "WebGPU reported an error, so the results are not valid: {e}\nChoose the cpu device to continue."
        ))),
        None => Ok(()),
    }
}

async fn backend(name: &str) -> Result<Box<dyn Backend>, JsError> {
    match name {
        "cpu" => Ok(Box::new(ferrotune::backend::cpu::CpuBackend::new())),
        "webgpu" => crate::webgpu::backend().await.map_err(js_err),
        other => Err(JsError::new(&format!("unknown device {other:?}; use webgpu or cpu"))),
    }
}

/// A base model in memory.
#[wasm_bindgen]
pub struct WebModel {
    inner: Rc<Model>,
}

#[wasm_bindgen]
impl WebModel {
    /// The bundled tiny Llama (no files needed).
    pub fn bundled() -> Result<WebModel, JsError> {
        Ok(WebModel {
            inner: Rc::new(Model::bundled().map_err(js_err)?),
        })
    }

    /// A model from its files' bytes; a missing file is `undefined`.
    #[wasm_bindgen(js_name = fromFiles)]
    pub fn from_files(
        name: String,
        config_json: Option<Vec<u8>>,
        weights: Option<Vec<u8>>,
        tokenizer_json: Option<Vec<u8>>,
        tokenizer_config_json: Option<Vec<u8>>,
    ) -> Result<WebModel, JsError> {
        let files = demo::ModelFiles {
            config_json,
            weights,
            tokenizer_json,
            tokenizer_config_json,
        };
        Ok(WebModel {
            inner: Rc::new(Model::load(&name, files).map_err(js_err)?),
        })
    }

    pub fn describe(&self) -> String {
        self.inner.describe()
    }

    /// The base model's reply to `prompt`.
    pub async fn generate(&self, prompt: String, max_new_tokens: usize, device: String) -> Result<String, JsError> {
        let b = backend(&device).await?;
        let out = demo::generate(&self.inner, None, &prompt, max_new_tokens, b)
            .await
            .map_err(js_err)?;
        check_gpu()?;
        Ok(out)
    }
}

/// One training run.
#[wasm_bindgen]
pub struct WebRun {
    run: Run,
    model: Rc<Model>,
    device: String,
    adapter: Option<(u64, Adapter)>,
}

#[wasm_bindgen]
impl WebRun {
    /// Prepares a run. `options` is JSON: `{rank, learning_rate, steps, seed, sequence_len,
    /// micro_batch_size}`. Without `dataset_bytes` the built-in addition task is used
    /// (`addition_rows` problems of two 2-digit numbers).
    pub async fn create(
        model: &WebModel,
        dataset_name: Option<String>,
        dataset_bytes: Option<Vec<u8>>,
        addition_rows: usize,
        options: String,
        device: String,
    ) -> Result<WebRun, JsError> {
        let o: TrainOptions =
            serde_json::from_str(&options).map_err(|e| JsError::new(&format!("bad training options: {e}")))?;
        let data = match dataset_bytes {
            Some(bytes) => Dataset::File {
                name: dataset_name.unwrap_or_else(|| "dataset.jsonl".into()),
                bytes,
            },
            None => Dataset::Addition {
                digits: 2,
                rows: addition_rows,
                seed: o.seed,
            },
        };
        let model = model.inner.clone();
        let b = backend(&device).await?;
        let run = Run::new(&model, data, &o, b).map_err(js_err)?;
        check_gpu()?;
        Ok(WebRun {
            run,
            model,
            device,
            adapter: None,
        })
    }

    #[wasm_bindgen(getter, js_name = trainSamples)]
    pub fn train_samples(&self) -> usize {
        self.run.train_samples
    }

    #[wasm_bindgen(getter, js_name = totalSteps)]
    pub fn total_steps(&self) -> u64 {
        self.run.trainer.info().total_steps
    }

    #[wasm_bindgen(getter, js_name = trainableParameters)]
    pub fn trainable_parameters(&self) -> u64 {
        self.run.trainer.info().trainable_parameters
    }

    /// One optimizer step: its report as JSON (`step`, `loss`, `tokens`, ...), or `null`
    /// when the run is complete.
    pub async fn step(&mut self) -> Result<Option<String>, JsError> {
        let r = self.run.step().await.map_err(js_err)?;
        check_gpu()?;
        Ok(r.map(|r| serde_json::to_string(&r).expect("report serializes")))
    }

    /// All losses so far, as JSON.
    pub fn losses(&self) -> String {
        serde_json::to_string(&self.run.losses).expect("numbers serialize")
    }

    async fn current_adapter(&mut self) -> Result<&Adapter, JsError> {
        let step = self.run.trainer.state.global_step;
        if self.adapter.as_ref().map(|(s, _)| *s) != Some(step) {
            let a = self.run.adapter().await.map_err(js_err)?;
            self.adapter = Some((step, a));
        }
        Ok(&self.adapter.as_ref().expect("just set").1)
    }

    /// `adapter_model.safetensors`'s bytes.
    #[wasm_bindgen(js_name = adapterWeights)]
    pub async fn adapter_weights(&mut self) -> Result<Vec<u8>, JsError> {
        let a = self.current_adapter().await?;
        Ok(a.files().map_err(js_err)?.0)
    }

    /// `adapter_config.json`'s text.
    #[wasm_bindgen(js_name = adapterConfig)]
    pub async fn adapter_config(&mut self) -> Result<String, JsError> {
        let a = self.current_adapter().await?;
        Ok(a.files().map_err(js_err)?.1)
    }

    /// The reply to `prompt` with the adapter as trained so far.
    pub async fn generate(&mut self, prompt: String, max_new_tokens: usize) -> Result<String, JsError> {
        let b = backend(&self.device.clone()).await?;
        self.current_adapter().await?;
        let (model, adapter) = (self.model.clone(), &self.adapter.as_ref().expect("set").1);
        let out = demo::generate(&model, Some(adapter), &prompt, max_new_tokens, b)
            .await
            .map_err(js_err)?;
        check_gpu()?;
        Ok(out)
    }
}
