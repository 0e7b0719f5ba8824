//! GGUF v2/v3 reader over a memory map (little-endian files).
//!
//! Layout (ggml/docs/gguf.md): magic `GGUF`, u32 version, u64 tensor count, u64 metadata
//! count; metadata as (string key, u32 value type, value); tensor infos as (string name,
//! u32 n_dims, u64 dims[n_dims] innermost first, u32 ggml type, u64 offset); padding to
//! `general.alignment` (default 32); tensor data, each at its offset from the data start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant::dequantize;
use super::types::GgmlType;
use crate::{Error, HostTensor, Result};

/// A metadata value. Arrays keep their element type so writing them back is exact.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Integer value of any integer type (negative values are `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    /// Float value of a float or integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
    /// The GGUF type name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }
}

/// One tensor's description from the header.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions in ggml order (innermost first): GGUF `[in, out]` is HF `[out, in]`.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub n_bytes: usize,
}

impl GgufTensorInfo {
    /// Row-major shape (outermost first), as numpy and safetensors use.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// A memory-mapped GGUF file with its metadata and tensor directory parsed.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: usize,
    /// Byte offset of the tensor data section.
    pub data_offset: usize,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    mmap: Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Bounds-checked little-endian reading that says what was being read and where.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Error::format(
                self.path,
                format!(
                    "GGUF file is truncated: {} needs {n} bytes at byte offset {} but the file has {} bytes",
                    what(),
                    self.pos,
                    self.buf.len()
                ),
            )),
        }
    }
    fn arr<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("take returns N bytes"))
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    /// A count that must fit in what is left of the file (each item at least `min_item` bytes).
    fn count(&mut self, min_item: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return Err(Error::format(
                self.path,
                format!(
                    "GGUF file is truncated or corrupt: {} says {n} items at byte offset {at}, but only {left} bytes follow",
                    what()
                ),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.count(1, &|| format!("the length of {}", what()))?;
        let at = self.pos;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::format(self.path, format!("{} at byte offset {at} is not valid UTF-8", what())))
    }

    fn value(&mut self, ty: u32, what: &dyn Fn() -> String, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.arr::<1>(what)?[0]),
            1 => GgufValue::I8(self.arr::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.arr(what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => {
                let at = self.pos;
                match self.arr::<1>(what)?[0] {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    b => {
                        return Err(Error::format(
                            self.path,
                            format!("{} at byte offset {at}: bool byte must be 0 or 1, found {b}", what()),
                        ))
                    }
                }
            }
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth > 4 {
                    return Err(Error::format(
                        self.path,
                        format!("{}: arrays nested too deeply", what()),
                    ));
                }
                let elem = self.u32(&|| format!("the element type of {}", what()))?;
                let n = self.count(1, &|| format!("the length of {}", what()))?;
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    items.push(self.value(elem, &|| format!("element {i} of {}", what()), depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.arr(what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.arr(what)?)),
            other => {
                return Err(Error::format(
                    self.path,
                    format!(
                        "{} at byte offset {}: unknown GGUF value type {other} (known: 0..=12)",
                        what(),
                        self.pos - 4
                    ),
                ))
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map; files are replaced by rename, never rewritten in place.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, mmap)
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<GgufFile> {
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            path,
        };
        let magic = c.arr::<4>(&|| "the magic number".into())?;
        if &magic != b"GGUF" {
            return Err(Error::format(
                path,
                format!("not a GGUF file: it starts with {magic:?}, not \"GGUF\""),
            ));
        }
        let version = c.u32(&|| "the version".into())?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(Error::format(
                    path,
                    "GGUF version 1 is not supported; re-export the model with a current llama.cpp",
                ))
            }
            v if v.swap_bytes() <= 3 => {
                return Err(Error::format(
                    path,
                    "this is a big-endian GGUF file; only little-endian files are supported",
                ))
            }
            v => {
                return Err(Error::format(
                    path,
                    format!("unsupported GGUF version {v} (supported: 2, 3)"),
                ))
            }
        }
        // Each tensor info takes at least 8+4+4+8 bytes, each metadata entry at least 8+4+1.
        let n_tensors = c.count(24, &|| "the tensor count".into())?;
        let n_kv = c.count(13, &|| "the metadata count".into())?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut meta_index = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("the key of metadata entry {i}"))?;
            let ty = c.u32(&|| format!("the value type of metadata `{key}`"))?;
            let value = c.value(ty, &|| format!("metadata `{key}`"), 0)?;
            meta_index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a as usize,
                _ => {
                    return Err(Error::format(
                        path,
                        format!("general.alignment must be a positive power of two, found {v:?}"),
                    ))
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::new();
        for i in 0..n_tensors {
            let name = c.string(&|| format!("the name of tensor {i}"))?;
            let n_dims = c.u32(&|| format!("the dimension count of tensor `{name}`"))? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` has {n_dims} dimensions; GGUF tensors have 1 to 4"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for d in 0..n_dims {
                dims.push(c.u64(&|| format!("dimension {d} of tensor `{name}`"))?);
            }
            let type_at = c.pos;
            let type_id = c.u32(&|| format!("the type of tensor `{name}`"))?;
            let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "tensor `{name}` has unknown ggml type id {type_id} (tensor info at byte offset {type_at}); \
                         this reader knows the types of ggml.h and dequantizes {}",
                        GgmlType::dequantizable_list()
                    ),
                )
            })?;
            let offset = c.u64(&|| format!("the data offset of tensor `{name}`"))?;
            let numel = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let n_bytes = numel.and_then(|n| usize::try_from(n).ok()).and_then(|n| {
                // ggml requires the innermost dimension to be a whole number of blocks.
                let inner = *dims.first().unwrap_or(&1) as usize;
                if !inner.is_multiple_of(ggml_type.block_size) {
                    None
                } else {
                    ggml_type.bytes_for(n)
                }
            });
            let n_bytes = n_bytes.ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "tensor `{name}` with dims {dims:?} cannot be stored as {ggml_type} (blocks of {} elements along the first dimension)",
                        ggml_type.block_size
                    ),
                )
            })?;
            if offset % alignment as u64 != 0 {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` data offset {offset} is not a multiple of the alignment {alignment}"),
                ));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(Error::format(path, format!("tensor `{name}` appears twice")));
            }
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_bytes,
            });
        }
        let data_offset = c.pos.div_ceil(alignment) * alignment;
        for t in &tensors {
            let end = (data_offset as u64)
                .saturating_add(t.offset)
                .saturating_add(t.n_bytes as u64);
            if end > mmap.len() as u64 {
                return Err(Error::format(
                    path,
                    format!(
                        "GGUF file is truncated: tensor `{}` ({}, {} bytes) ends at byte offset {end} but the file has {} bytes",
                        t.name,
                        t.ggml_type,
                        t.n_bytes,
                        mmap.len()
                    ),
                ));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            alignment,
            data_offset,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            mmap,
        })
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn missing(&self, key: &str) -> Error {
        Error::format(&self.path, format!("GGUF metadata `{key}` is missing"))
    }

    fn wrong(&self, key: &str, want: &str, v: &GgufValue) -> Error {
        Error::format(
            &self.path,
            format!("GGUF metadata `{key}` should be {want}, found {}", v.type_name()),
        )
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_str().ok_or_else(|| self.wrong(key, "a string", v))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_u64().ok_or_else(|| self.wrong(key, "a non-negative integer", v))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_f64().ok_or_else(|| self.wrong(key, "a number", v))
    }

    pub fn get_array(&self, key: &str) -> Result<&[GgufValue]> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_array().ok_or_else(|| self.wrong(key, "an array", v))
    }

    /// An array of strings (token lists, merges).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key)?
            .iter()
            .map(|x| x.as_str().ok_or_else(|| self.wrong(key, "an array of strings", x)))
            .collect()
    }

    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i]).ok_or_else(|| {
            let hint = crate::model::weights::closest_name(name, self.tensors.iter().map(|t| t.name.as_str()))
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_default();
            Error::format(&self.path, format!("no tensor `{name}` in the GGUF file{hint}"))
        })
    }

    /// The raw (possibly quantized) bytes of a tensor.
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> &[u8] {
        let start = self.data_offset + info.offset as usize;
        &self.mmap[start..start + info.n_bytes]
    }

    /// A tensor dequantized to f32, with its row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<HostTensor> {
        let info = self.tensor_info(name)?;
        let mut out = vec![0f32; info.numel()];
        dequantize(info.ggml_type, self.tensor_data(info), &mut out)
            .map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {e}")))?;
        Ok(HostTensor::from_f32(&info.shape(), &out))
    }
}
