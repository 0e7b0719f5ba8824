//! The WGSL backend on the browser's WebGPU.

use ferrotune::backend::wgsl::{WgslBackend, WgslContext, WgslOptions};
use ferrotune::backend::Backend;
use ferrotune::Result;

/// A WGSL backend on the adapter the browser offers; an error (not a panic) when the
/// browser has no WebGPU or gives no adapter.
pub async fn backend() -> Result<Box<dyn Backend>> {
    let ctx = WgslContext::new(WgslOptions::default()).await?;
    Ok(Box::new(WgslBackend::new(ctx)))
}
