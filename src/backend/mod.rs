//! Backends: the devices a compiled graph runs on.

pub mod wgsl;
