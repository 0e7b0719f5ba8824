//! ferrotune in the browser: the demo page's logic ([`demo`], shared with the native
//! reference run) and, on wasm32, its JavaScript bindings.

pub mod demo;
#[cfg(target_arch = "wasm32")]
mod web;
#[cfg(target_arch = "wasm32")]
mod webgpu;
