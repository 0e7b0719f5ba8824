//! The prepared-dataset cache (`dataset_prepared_path`): tokenized samples stored under a
//! sha256 of everything that affects them, written atomically.
//!
//! File layout (little-endian): the magic `FTDATA\0\x01`; a u64 header length and a JSON
//! header `{key, stats, train, eval}`; then per sample a u32 length, the ids (u32) and the
//! labels (i32).

use super::atomic::write_atomic;
use super::dataset::{DataStats, PreparedData};
use super::sample::Sample;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FTDATA\0\x01";

#[derive(Serialize, Deserialize)]
struct Header {
    key: String,
    stats: DataStats,
    train: usize,
    eval: usize,
}

/// The cache file for `key` inside `dir`.
pub(crate) fn cache_file(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("ferrotune-data-{key}.bin"))
}

pub(crate) fn save(path: &Path, key: &str, data: &PreparedData) -> Result<()> {
    let header = Header {
        key: key.to_string(),
        stats: data.stats.clone(),
        train: data.train.len(),
        eval: data.eval.len(),
    };
    let header = serde_json::to_vec(&header).expect("header serializes");
    let n_tokens: usize = data.train.iter().chain(&data.eval).map(Sample::len).sum();
    let mut out = Vec::with_capacity(16 + header.len() + 4 * (data.train.len() + data.eval.len()) + 8 * n_tokens);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for s in data.train.iter().chain(&data.eval) {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        for &t in &s.input_ids {
            out.extend_from_slice(&t.to_le_bytes());
        }
        for &l in &s.labels {
            out.extend_from_slice(&l.to_le_bytes());
        }
    }
    write_atomic(path, &out)
}

/// Load a cache file; `Ok(None)` when there is none.
pub(crate) fn load(path: &Path, key: &str) -> Result<Option<PreparedData>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    let corrupt = |what: &str| {
        Error::format(
            path,
            format!("corrupt prepared-dataset cache ({what}); delete the file and run again"),
        )
    };
    let mut r = Reader { bytes: &bytes, pos: 0 };
    if r.take(8).ok_or_else(|| corrupt("too short"))? != MAGIC {
        return Err(corrupt("not a ferrotune dataset cache"));
    }
    let hlen = r.u64_len().ok_or_else(|| corrupt("truncated header"))?;
    let header: Header = r
        .take(hlen)
        .and_then(|h| serde_json::from_slice(h).ok())
        .ok_or_else(|| corrupt("unreadable header"))?;
    if header.key != key {
        return Err(corrupt("its key does not match its file name"));
    }
    let mut samples = Vec::with_capacity(header.train + header.eval);
    for _ in 0..header.train + header.eval {
        let len = r.u32().ok_or_else(|| corrupt("truncated sample"))? as usize;
        let ids = r.take(4 * len).ok_or_else(|| corrupt("truncated sample"))?;
        let labels = r.take(4 * len).ok_or_else(|| corrupt("truncated sample"))?;
        samples.push(Sample {
            input_ids: ids
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            labels: labels
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        });
    }
    if r.pos != bytes.len() {
        return Err(corrupt("trailing bytes"));
    }
    let eval = samples.split_off(header.train);
    let mut stats = header.stats;
    stats.from_cache = true;
    Ok(Some(PreparedData {
        train: samples,
        eval,
        stats,
    }))
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64_len(&mut self) -> Option<usize> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> PreparedData {
        PreparedData {
            train: vec![Sample {
                input_ids: vec![1, 2, 3],
                labels: vec![-100, 2, 3],
            }],
            eval: vec![Sample {
                input_ids: vec![7, u32::MAX],
                labels: vec![7, -100],
            }],
            stats: DataStats {
                rows: 2,
                samples: 2,
                train_samples: 1,
                eval_samples: 1,
                ..Default::default()
            },
        }
    }

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = cache_file(dir.path(), "abc");
        assert!(load(&path, "abc").unwrap().is_none());
        save(&path, "abc", &data()).unwrap();
        let back = load(&path, "abc").unwrap().unwrap();
        assert_eq!(back.train, data().train);
        assert_eq!(back.eval, data().eval);
        assert!(back.stats.from_cache);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        let err = load(&path, "abc").unwrap_err().to_string();
        assert!(
            err.contains("corrupt prepared-dataset cache") && err.contains("ferrotune-data-abc.bin"),
            "{err}"
        );
    }
}
