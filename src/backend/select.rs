//! Device selection: `cuda` (when built in and present) > a GPU adapter through wgpu (not a
//! CPU adapter such as lavapipe, which is slower than the cpu backend) > `cpu`, overridable
//! by the config's `device` and by `FERROTUNE_DEVICE`. `device: wgsl` takes any adapter.

use super::Backend;
use crate::config::{Config, DeviceChoice, Flag};
use crate::train::session::Precision;
use crate::{Error, Result};

/// The device asked for: `FERROTUNE_DEVICE` wins over the config.
pub fn requested(choice: DeviceChoice) -> Result<DeviceChoice> {
    match std::env::var("FERROTUNE_DEVICE") {
        Ok(v) if !v.is_empty() => match v.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "wgsl" => Ok(DeviceChoice::Wgsl),
            "cuda" => Ok(DeviceChoice::Cuda),
            other => Err(Error::Config(format!(
                "FERROTUNE_DEVICE={other:?}: expected auto, cpu, wgsl or cuda"
            ))),
        },
        _ => Ok(choice),
    }
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Box<dyn Backend>> {
    Ok(Box::new(super::cuda::CudaBackend::new(0)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Box<dyn Backend>> {
    Err(Error::backend(
        "cuda",
        "this build has no CUDA support; rebuild with `cargo build --release --features cuda`",
    ))
}

/// Creates the backend for `choice`; `auto` falls back with a one-line notice per device
/// that could not be used.
pub fn create_backend(choice: DeviceChoice) -> Result<(Box<dyn Backend>, Vec<String>)> {
    let mut notices = Vec::new();
    match requested(choice)? {
        DeviceChoice::Cpu => Ok((Box::new(super::cpu::CpuBackend::new()), notices)),
        DeviceChoice::Cuda => Ok((cuda()?, notices)),
        DeviceChoice::Wgsl => Ok((super::wgsl::create()?, notices)),
        DeviceChoice::Auto => {
            if cfg!(feature = "cuda") {
                match cuda() {
                    Ok(b) => return Ok((b, notices)),
                    Err(e) => notices.push(format!("device auto: cuda not used ({e})")),
                }
            }
            match super::wgsl::create_gpu_only() {
                Ok(b) => return Ok((b, notices)),
                Err(e) => notices.push(format!("device auto: wgsl not used ({e})")),
            }
            notices.push("device auto: using the cpu".into());
            Ok((Box::new(super::cpu::CpuBackend::new()), notices))
        }
    }
}

/// Storage and compute types for a backend under the config's `bf16` setting.
pub fn precision_for(b: &dyn Backend, cfg: &Config) -> Precision {
    let half = cfg.bf16 != Flag::Off;
    match b.name() {
        "cuda" if half => Precision {
            weights: crate::DType::BF16,
            activations: crate::DType::BF16,
        },
        "wgsl" if half => Precision {
            weights: b.preferred_weight_dtype(),
            activations: crate::DType::F32,
        },
        _ => Precision::F32,
    }
}
