//! Data-parallel training over several processes (one per GPU): collectives, the
//! torchrun-style rendezvous, ZeRO/FSDP-style sharding of optimizer state, gradients and
//! parameters, and the launcher.
//!
//! A rank is started with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and
//! `MASTER_PORT` (by `ferrotune launch` or torchrun); [`connect`] meets the other ranks
//! and returns the [`DataParallel`] handle the trainer uses. Collectives: NCCL on CUDA
//! (feature `nccl`), a TCP hub between processes otherwise, and threads in one process
//! for tests.

#[cfg(not(target_arch = "wasm32"))]
pub mod checkpoint;
pub mod collective;
pub mod data_parallel;
pub mod env;
#[cfg(not(target_arch = "wasm32"))]
pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod sharding;
#[cfg(not(target_arch = "wasm32"))]
pub mod store;
#[cfg(not(target_arch = "wasm32"))]
pub mod tcp;
pub mod threads;
#[cfg(not(target_arch = "wasm32"))]
mod wire;

pub use collective::{Collective, DEFAULT_COLLECTIVE_TIMEOUT, DEFAULT_RENDEZVOUS_TIMEOUT};
pub use data_parallel::{DataParallel, ShardCalls};
pub use env::DistEnv;
pub use sharding::{ShardCall, ShardLayout, ShardSpec, ShardingConfig, Stage, StateDict, SHARD_ALIGN};
pub use threads::ThreadCollective;

use crate::config::Config;
use crate::{Error, Result};
use std::time::Duration;

/// sha256 of the whole config as this rank read it (file and `--set` overrides).
pub fn config_hash(cfg: &Config) -> String {
    use sha2::{Digest, Sha256};
    let bytes = serde_json::to_vec(&cfg.to_json()).expect("serializable");
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The collective wait from `ddp_timeout` (seconds), 10 minutes by default.
pub fn collective_timeout(cfg: &Config) -> Duration {
    cfg.ddp_timeout
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_COLLECTIVE_TIMEOUT)
}

/// The start-up wait: `FERROTUNE_RENDEZVOUS_TIMEOUT` seconds, 2 minutes by default.
pub fn rendezvous_timeout() -> Result<Duration> {
    match std::env::var("FERROTUNE_RENDEZVOUS_TIMEOUT") {
        Ok(v) => parse_rendezvous_timeout(&v),
        Err(_) => Ok(DEFAULT_RENDEZVOUS_TIMEOUT),
    }
}

fn parse_rendezvous_timeout(v: &str) -> Result<Duration> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0 && *s <= collective::MAX_TIMEOUT_SECS as f64)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            Error::Config(format!(
                "FERROTUNE_RENDEZVOUS_TIMEOUT={v:?}: expected seconds, more than 0 and at most {}",
                collective::MAX_TIMEOUT_SECS
            ))
        })
}

/// Which collective a process group uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollectiveKind {
    Tcp,
    Nccl,
}

/// `FERROTUNE_COLLECTIVE` (`tcp` or `nccl`); otherwise NCCL when the run is on CUDA and
/// this build has it, TCP else.
pub fn collective_kind(cfg: &Config) -> Result<CollectiveKind> {
    match std::env::var("FERROTUNE_COLLECTIVE").ok().as_deref() {
        Some("tcp") => Ok(CollectiveKind::Tcp),
        Some("nccl") if cfg!(feature = "nccl") => Ok(CollectiveKind::Nccl),
        Some("nccl") => Err(Error::Config(
            "FERROTUNE_COLLECTIVE=nccl: this build has no NCCL; rebuild with `--features nccl`".into(),
        )),
        Some(other) => Err(Error::Config(format!(
            "FERROTUNE_COLLECTIVE={other:?}: expected tcp or nccl"
        ))),
        None => {
            let on_cuda = matches!(cfg.device, crate::config::DeviceChoice::Cuda);
            Ok(if on_cuda && cfg!(feature = "nccl") {
                CollectiveKind::Nccl
            } else {
                CollectiveKind::Tcp
            })
        }
    }
}

/// Joins the process group described by the environment, or `None` when `WORLD_SIZE` is unset.
#[cfg(not(target_arch = "wasm32"))]
pub fn connect(cfg: &Config) -> Result<Option<DataParallel>> {
    let Some(env) = DistEnv::from_env()? else {
        return Ok(None);
    };
    let sharding = ShardingConfig::from_config(cfg)?;
    let kind = collective_kind(cfg)?;
    let opts = store::RendezvousOptions {
        master_addr: env.master_addr.clone(),
        master_port: env.master_port,
        rank: env.rank,
        world_size: env.world_size,
        config_hash: config_hash(cfg),
        timeout: rendezvous_timeout()?,
    };
    let timeout = collective_timeout(cfg);
    let coll: Box<dyn Collective> = match kind {
        CollectiveKind::Tcp => {
            let (links, _) = store::rendezvous(&opts, &|| Ok(Vec::new()))?;
            Box::new(tcp::TcpCollective::new(env.rank, env.world_size, links, timeout))
        }
        #[cfg(feature = "nccl")]
        CollectiveKind::Nccl => {
            let (_links, id) = store::rendezvous(&opts, &nccl::unique_id)?;
            Box::new(nccl::NcclCollective::new(
                env.local_rank,
                env.rank,
                env.world_size,
                &id,
                timeout,
            )?)
        }
        #[cfg(not(feature = "nccl"))]
        CollectiveKind::Nccl => {
            return Err(Error::Config(
                "this build has no NCCL; rebuild with `--features nccl`".into(),
            ))
        }
    };
    Ok(Some(DataParallel::new(coll, sharding)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rendezvous_timeout_is_a_bounded_number_of_seconds() {
        assert_eq!(parse_rendezvous_timeout(" 2.5 ").unwrap(), Duration::from_millis(2500));
        for bad in ["inf", "1e30", "0", "-3", "NaN", "soon"] {
            let e = parse_rendezvous_timeout(bad).unwrap_err().to_string();
            assert!(
                e.contains("expected seconds, more than 0 and at most 2592000"),
                "{bad}: {e}"
            );
        }
    }
}
