//! The torchrun environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    /// The GPU index on this node.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl DistEnv {
    /// The distributed environment of this process, or `None` when `WORLD_SIZE` is unset.
    pub fn from_env() -> Result<Option<DistEnv>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        if get("WORLD_SIZE").is_none() {
            return Ok(None);
        }
        let num = |key: &str, default: Option<usize>| -> Result<usize> {
            match (get(key), default) {
                (Some(v), _) => v
                    .trim()
                    .parse()
                    .map_err(|_| Error::Config(format!("{key}={v:?}: expected a whole number"))),
                (None, Some(d)) => Ok(d),
                (None, None) => Err(Error::Config(format!(
                    "WORLD_SIZE is set but {key} is not; start the ranks with `ferrotune launch`"
                ))),
            }
        };
        let world_size = num("WORLD_SIZE", None)?;
        if world_size == 0 {
            return Err(Error::Config("WORLD_SIZE must be at least 1".into()));
        }
        let rank = num("RANK", if world_size == 1 { Some(0) } else { None })?;
        if rank >= world_size {
            return Err(Error::Config(format!(
                "RANK {rank} is not below WORLD_SIZE {world_size}"
            )));
        }
        let local_rank = num("LOCAL_RANK", Some(rank))?;
        let master_port = num("MASTER_PORT", Some(DEFAULT_MASTER_PORT as usize))?;
        let master_port = u16::try_from(master_port)
            .map_err(|_| Error::Config(format!("MASTER_PORT {master_port} is not a TCP port")))?;
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let m: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn reads_torchrun_variables_and_rejects_bad_ones() {
        assert_eq!(env(&[]).unwrap(), None);
        let e = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "10.0.0.1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.master_port), (2, 4, 0, 29500));
        assert_eq!(e.master_addr, "10.0.0.1");
        assert!(env(&[("WORLD_SIZE", "2")]).unwrap_err().to_string().contains("RANK"));
        assert!(env(&[("WORLD_SIZE", "2"), ("RANK", "2")])
            .unwrap_err()
            .to_string()
            .contains("below"));
        assert!(env(&[("WORLD_SIZE", "x")])
            .unwrap_err()
            .to_string()
            .contains("WORLD_SIZE"));
        assert!(env(&[("WORLD_SIZE", "1"), ("MASTER_PORT", "70000")]).is_err());
    }
}
