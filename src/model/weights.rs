//! Memory-mapped safetensors checkpoints: a single `model.safetensors` or a sharded one
//! (`model.safetensors.index.json` naming `model-0000K-of-0000N.safetensors` files).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors};

use crate::{DType, Error, HostTensor, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one tensor lives: which mapped file, its stored type, shape and byte range.
#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// Read-only access to the tensors of a checkpoint, without copying them into memory up front.
pub struct WeightStore {
    files: Vec<(PathBuf, Mmap)>,
    entries: BTreeMap<String, Entry>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field("files", &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

pub use super::safetensors_mem::{dtype_from_safetensors, dtype_to_safetensors};

fn map_file(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; a checkpoint being rewritten while a run reads it is
    // outside what we support (our own writers replace files by rename, never in place).
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

impl WeightStore {
    /// Open a checkpoint folder (sharded index first, then `model.safetensors`), a
    /// `.safetensors` file, or a `*.safetensors.index.json` file.
    pub fn open(path: &Path) -> Result<WeightStore> {
        if path.is_dir() {
            let index = path.join(INDEX_FILE);
            if index.is_file() {
                return Self::open_index(&index);
            }
            let single = path.join(SINGLE_FILE);
            if single.is_file() {
                return Self::open_files(&[single]);
            }
            return Err(Error::format(
                path,
                format!("no {SINGLE_FILE} or {INDEX_FILE} in this folder; is it a Hugging Face checkpoint?"),
            ));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".index.json") {
            Self::open_index(path)
        } else if path.is_file() {
            Self::open_files(&[path.to_path_buf()])
        } else {
            Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ))
        }
    }

    /// Open the shards named by a `model.safetensors.index.json` (HF format:
    /// `{"metadata": {"total_size": N}, "weight_map": {tensor: shard file}}`).
    pub fn open_index(index: &Path) -> Result<WeightStore> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(index, "no `weight_map` object"))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<String> = Vec::new();
        let mut wanted: Vec<(String, String)> = Vec::new();
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| Error::format(index, format!("weight_map[\"{tensor}\"] must be a file name")))?;
            if !shard_names.iter().any(|s| s == file) {
                shard_names.push(file.to_string());
            }
            wanted.push((tensor.clone(), file.to_string()));
        }
        shard_names.sort();
        let paths: Vec<PathBuf> = shard_names.iter().map(|s| dir.join(s)).collect();
        for p in &paths {
            if !p.is_file() {
                return Err(Error::format(
                    index,
                    format!(
                        "names shard {} which does not exist; the checkpoint is incomplete",
                        p.display()
                    ),
                ));
            }
        }
        let store = Self::open_files(&paths)?;
        for (tensor, file) in wanted {
            match store.entries.get(&tensor) {
                Some(e) if store.files[e.file].0 == dir.join(&file) => {}
                _ => {
                    return Err(Error::format(
                        index,
                        format!("weight_map says `{tensor}` is in {file}, but that shard does not hold it"),
                    ))
                }
            }
        }
        Ok(store)
    }

    /// Open one or more `.safetensors` files as one store; a tensor name may appear once.
    pub fn open_files(paths: &[PathBuf]) -> Result<WeightStore> {
        let mut files = Vec::new();
        let mut entries = BTreeMap::new();
        let mut metadata = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let mmap = map_file(path)?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if base + e > mmap.len() {
                    return Err(Error::format(
                        path,
                        format!(
                            "tensor `{name}` ends at byte {} but the file has {} bytes; truncated?",
                            base + e,
                            mmap.len()
                        ),
                    ));
                }
                let entry = Entry {
                    file: fi,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + s,
                    end: base + e,
                };
                if let Some(prev) = entries.insert(name.clone(), entry) {
                    return Err(Error::format(
                        path,
                        format!(
                            "tensor `{name}` is also in {}; each tensor must be stored once",
                            paths[prev.file].display()
                        ),
                    ));
                }
            }
            if let Some(m) = meta.metadata() {
                metadata.extend(m.clone());
            }
            files.push((path.clone(), mmap));
        }
        Ok(WeightStore {
            files,
            entries,
            metadata,
        })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.entries.keys().map(|s| s.as_str()).collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The `__metadata__` strings of the file(s).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| {
            let hint = match closest_name(name, self.entries.keys().map(|s| s.as_str())) {
                Some(c) => format!("; did you mean `{c}`?"),
                None => String::new(),
            };
            crate::msg!("tensor `{name}` is not in the checkpoint ({}){hint}", self.describe())
        })
    }

    fn describe(&self) -> String {
        match self.files.as_slice() {
            [(p, _)] => p.display().to_string(),
            fs => format!(
                "{} shards in {}",
                fs.len(),
                fs[0].0.parent().unwrap_or(Path::new(".")).display()
            ),
        }
    }

    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.entry(name)?.shape)
    }

    /// The stored element type; an error for types we cannot hold (e.g. I64, F8).
    pub fn dtype(&self, name: &str) -> Result<DType> {
        let e = self.entry(name)?;
        dtype_from_safetensors(e.dtype).ok_or_else(|| {
            crate::msg!(
                "tensor `{name}` in {} is stored as {:?}; supported: F32, F16, BF16 (and F64, I32, U32 as stored)",
                self.files[e.file].0.display(),
                e.dtype
            )
        })
    }

    /// The stored bytes of a tensor (little-endian), borrowed from the map.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        Ok(&self.files[e.file].1[e.start..e.end])
    }

    /// The tensor as stored.
    pub fn get_raw(&self, name: &str) -> Result<HostTensor> {
        let dtype = self.dtype(name)?;
        let e = self.entry(name)?;
        Ok(HostTensor {
            shape: e.shape.clone(),
            dtype,
            data: self.files[e.file].1[e.start..e.end].to_vec(),
        })
    }

    /// The tensor converted to `dtype` (f32, f16 or bf16; from any of f32, f16, bf16 stored),
    /// rounding to nearest even when narrowing.
    pub fn get(&self, name: &str, dtype: DType) -> Result<HostTensor> {
        let stored = self.dtype(name)?;
        let float16 = [DType::F32, DType::F16, DType::BF16];
        if !float16.contains(&dtype) {
            return Err(crate::msg!(
                "cannot load `{name}` as {dtype}: weights load as f32, f16 or bf16"
            ));
        }
        if !float16.contains(&stored) {
            return Err(crate::msg!(
                "tensor `{name}` is stored as {stored}; only f32, f16 and bf16 weights can be converted to {dtype}"
            ));
        }
        Ok(self.get_raw(name)?.cast(dtype))
    }

    /// `get`, after checking the shape is `expected`.
    pub fn get_shaped(&self, name: &str, expected: &[usize], dtype: DType) -> Result<HostTensor> {
        self.check_shape(name, expected)?;
        self.get(name, dtype)
    }

    /// An error naming the tensor, the expected and the found shape when they differ.
    pub fn check_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        let found = self.shape(name)?;
        if found != expected {
            return Err(crate::msg!(
                "tensor `{name}` has shape {found:?} but the model config expects {expected:?}; does config.json match the weights?"
            ));
        }
        Ok(())
    }
}

/// The known name closest to `name` by edit distance, if it is close enough to be a likely typo.
pub fn closest_name<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.len() / 4).max(3);
    known
        .map(|k| (levenshtein(name, k), k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
