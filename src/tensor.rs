//! Element types and host-side tensors: what crosses between files, the graph and backends.

use half::{bf16, f16};

/// Element type of a tensor. `F64` exists for the CPU reference (gradient checks);
/// integer types hold token ids, labels, positions and segment ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I32,
    U32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 => 8,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I32 => "i32",
            DType::U32 => "u32",
        }
    }
    /// Parse the names used by Hugging Face (`torch_dtype`) and safetensors.
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => DType::F32,
            "f16" | "float16" | "half" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            "f64" | "float64" | "double" => DType::F64,
            "i32" | "int32" => DType::I32,
            "u32" | "uint32" => DType::U32,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// A tensor in host memory: shape, dtype and little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub data: Vec<u8>,
}

impl HostTensor {
    pub fn zeros(shape: &[usize], dtype: DType) -> Self {
        HostTensor {
            shape: shape.to_vec(),
            dtype,
            data: vec![0; numel(shape) * dtype.size()],
        }
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn from_f32(shape: &[usize], v: &[f32]) -> Self {
        assert_eq!(
            numel(shape),
            v.len(),
            "HostTensor::from_f32: shape {shape:?} vs {} values",
            v.len()
        );
        HostTensor {
            shape: shape.to_vec(),
            dtype: DType::F32,
            data: bytemuck::cast_slice(v).to_vec(),
        }
    }
    pub fn from_f64(shape: &[usize], v: &[f64]) -> Self {
        assert_eq!(
            numel(shape),
            v.len(),
            "HostTensor::from_f64: shape {shape:?} vs {} values",
            v.len()
        );
        HostTensor {
            shape: shape.to_vec(),
            dtype: DType::F64,
            data: bytemuck::cast_slice(v).to_vec(),
        }
    }
    pub fn from_i32(shape: &[usize], v: &[i32]) -> Self {
        assert_eq!(
            numel(shape),
            v.len(),
            "HostTensor::from_i32: shape {shape:?} vs {} values",
            v.len()
        );
        HostTensor {
            shape: shape.to_vec(),
            dtype: DType::I32,
            data: bytemuck::cast_slice(v).to_vec(),
        }
    }
    pub fn from_u32(shape: &[usize], v: &[u32]) -> Self {
        assert_eq!(
            numel(shape),
            v.len(),
            "HostTensor::from_u32: shape {shape:?} vs {} values",
            v.len()
        );
        HostTensor {
            shape: shape.to_vec(),
            dtype: DType::U32,
            data: bytemuck::cast_slice(v).to_vec(),
        }
    }
    /// Values converted to f32 (floats widened or narrowed; integers cast).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(&self.data),
            DType::F64 => bytemuck::pod_collect_to_vec::<u8, f64>(&self.data)
                .iter()
                .map(|&x| x as f32)
                .collect(),
            DType::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(&self.data)
                .iter()
                .map(|x| x.to_f32())
                .collect(),
            DType::BF16 => bytemuck::pod_collect_to_vec::<u8, bf16>(&self.data)
                .iter()
                .map(|x| x.to_f32())
                .collect(),
            DType::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(&self.data)
                .iter()
                .map(|&x| x as f32)
                .collect(),
            DType::U32 => bytemuck::pod_collect_to_vec::<u8, u32>(&self.data)
                .iter()
                .map(|&x| x as f32)
                .collect(),
        }
    }
    /// Values converted to f64.
    pub fn to_f64(&self) -> Vec<f64> {
        match self.dtype {
            DType::F64 => bytemuck::pod_collect_to_vec(&self.data),
            _ => self.to_f32().into_iter().map(|x| x as f64).collect(),
        }
    }
    pub fn to_i32(&self) -> Vec<i32> {
        match self.dtype {
            DType::I32 => bytemuck::pod_collect_to_vec(&self.data),
            DType::U32 => bytemuck::pod_collect_to_vec::<u8, u32>(&self.data)
                .iter()
                .map(|&x| x as i32)
                .collect(),
            _ => self.to_f32().into_iter().map(|x| x as i32).collect(),
        }
    }
    /// The same values stored as `dtype` (round to nearest even for f16/bf16).
    pub fn cast(&self, dtype: DType) -> HostTensor {
        if dtype == self.dtype {
            return self.clone();
        }
        let data: Vec<u8> = match dtype {
            DType::F32 => bytemuck::cast_slice(&self.to_f32()).to_vec(),
            DType::F64 => bytemuck::cast_slice(&self.to_f64()).to_vec(),
            DType::F16 => {
                let v: Vec<f16> = self.to_f32().iter().map(|&x| f16::from_f32(x)).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
            DType::BF16 => {
                let v: Vec<bf16> = self.to_f32().iter().map(|&x| bf16::from_f32(x)).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
            DType::I32 => bytemuck::cast_slice(&self.to_i32()).to_vec(),
            DType::U32 => {
                let v: Vec<u32> = self.to_i32().iter().map(|&x| x as u32).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
        };
        HostTensor {
            shape: self.shape.clone(),
            dtype,
            data,
        }
    }
}
