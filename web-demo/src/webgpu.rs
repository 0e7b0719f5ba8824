//! The WGSL backend on the browser's WebGPU.

use ferrotune::backend::Backend;
use ferrotune::Result;

pub async fn backend() -> Result<Box<dyn Backend>> {
    Err(ferrotune::Error::backend(
        "wgsl",
        "this build has no WebGPU executor backend yet; choose the cpu device",
    ))
}
