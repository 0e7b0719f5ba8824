//! The WGSL backend on the browser's WebGPU, and the errors WebGPU reports on its own:
//! the browser delivers validation and out-of-memory errors as events, not as results of
//! the call that caused them, so they are collected here and checked after each call.

use ferrotune::backend::wgsl::{WgslBackend, WgslContext, WgslOptions};
use ferrotune::backend::Backend;
use ferrotune::Result;
use std::sync::{Arc, Mutex};

static FIRST_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// A WGSL backend on the adapter the browser offers; an error (not a panic) when the
/// browser has no WebGPU or gives no adapter.
pub async fn backend() -> Result<Box<dyn Backend>> {
    let ctx = WgslContext::new(WgslOptions::default()).await?;
    ctx.device.on_uncaptured_error(Arc::new(|e: wgpu::Error| {
        let mut first = FIRST_ERROR.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert_with(|| e.to_string());
    }));
    Ok(Box::new(WgslBackend::new(ctx)))
}

/// The first WebGPU error since the last call, if any.
pub fn take_error() -> Option<String> {
    FIRST_ERROR.lock().unwrap_or_else(|p| p.into_inner()).take()
}
