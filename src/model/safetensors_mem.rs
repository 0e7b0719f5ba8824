//! safetensors held in memory: parsing a whole file's bytes into tensors and serializing
//! tensors into a file's bytes. Works on every target (the browser has files as bytes,
//! not paths); the memory-mapped [`super::weights::WeightStore`] is the native reader.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};

use crate::{DType, Error, HostTensor, Result};

/// Our element type for a stored safetensors type, if we can hold it.
pub fn dtype_from_safetensors(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::I32 => DType::I32,
        StDtype::U32 => DType::U32,
        _ => return None,
    })
}

pub fn dtype_to_safetensors(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::F64 => StDtype::F64,
        DType::I32 => StDtype::I32,
        DType::U32 => StDtype::U32,
    }
}

/// Every tensor of a safetensors file given as bytes, as stored. `what` names the file in
/// errors (a path or a file picked in the browser).
pub fn read_safetensors_bytes(bytes: &[u8], what: &str) -> Result<BTreeMap<String, HostTensor>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        Error::format(
            what,
            format!("not a safetensors file ({e}); export the model with save_pretrained(safe_serialization=True)"),
        )
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = dtype_from_safetensors(view.dtype()).ok_or_else(|| {
            Error::format(
                what,
                format!(
                    "tensor `{name}` is stored as {:?}, which ferrotune cannot hold",
                    view.dtype()
                ),
            )
        })?;
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                dtype,
                data: view.data().to_vec(),
            },
        );
    }
    Ok(out)
}

struct HostView<'a>(&'a HostTensor);

impl View for HostView<'_> {
    fn dtype(&self) -> StDtype {
        dtype_to_safetensors(self.0.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.0.data)
    }
    fn data_len(&self) -> usize {
        self.0.data.len()
    }
}

/// The bytes of a safetensors file holding `tensors` (metadata `{"format": "pt"}` unless given).
pub fn safetensors_bytes(
    tensors: &[(String, HostTensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut seen = std::collections::HashSet::new();
    for (name, t) in tensors {
        if t.data.len() != t.numel() * t.dtype.size() {
            return Err(crate::msg!(
                "tensor `{name}` has {} bytes but shape {:?} of {} needs {}",
                t.data.len(),
                t.shape,
                t.dtype,
                t.numel() * t.dtype.size()
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(crate::msg!("tensor `{name}` is given twice"));
        }
    }
    let metadata = metadata.or_else(|| Some(HashMap::from([("format".to_string(), "pt".to_string())])));
    let views = tensors.iter().map(|(n, t)| (n.as_str(), HostView(t)));
    safetensors::serialize(views, metadata).map_err(|e| crate::msg!("serializing safetensors failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_keeps_names_shapes_dtypes_and_values() {
        let a = HostTensor::from_f32(&[2, 3], &[1.0, -2.0, 3.5, 0.0, 1e-3, 7.0]);
        let b = HostTensor::from_f32(&[4], &[0.5, 0.25, -8.0, 9.0]).cast(DType::BF16);
        let bytes = safetensors_bytes(&[("a".into(), a.clone()), ("b.w".into(), b.clone())], None).unwrap();
        let back = read_safetensors_bytes(&bytes, "mem").unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back["a"].shape, vec![2, 3]);
        assert_eq!(back["a"].to_f32(), a.to_f32());
        assert_eq!(back["b.w"].dtype, DType::BF16);
        assert_eq!(back["b.w"].to_f32(), vec![0.5, 0.25, -8.0, 9.0]);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let e = read_safetensors_bytes(b"not safetensors at all", "dropped.safetensors").unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("dropped.safetensors") && m.contains("not a safetensors file"),
            "{m}"
        );
    }
}
