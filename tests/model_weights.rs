//! safetensors checkpoints: single and sharded round trips, dtype conversion, clear errors.

use std::collections::HashMap;
use std::path::PathBuf;

use ferrotune::model::{write_safetensors, write_safetensors_sharded, WeightStore};
use ferrotune::{DType, HostTensor};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrotune-model-weights-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A few tensors of different dtypes with values that are not all representable in bf16.
fn sample() -> Vec<(String, HostTensor)> {
    let vals = |n: usize, s: f32| {
        (0..n)
            .map(|i| (i as f32 * 0.37 + s).sin() * 3.0 + 1e-3)
            .collect::<Vec<f32>>()
    };
    vec![
        (
            "model.embed_tokens.weight".into(),
            HostTensor::from_f32(&[10, 8], &vals(80, 0.0)),
        ),
        (
            "model.layers.0.self_attn.q_proj.weight".into(),
            HostTensor::from_f32(&[8, 8], &vals(64, 1.0)).cast(DType::BF16),
        ),
        (
            "model.layers.0.self_attn.k_proj.weight".into(),
            HostTensor::from_f32(&[4, 8], &vals(32, 2.0)).cast(DType::F16),
        ),
        (
            "model.layers.0.input_layernorm.weight".into(),
            HostTensor::from_f32(&[8], &vals(8, 3.0)),
        ),
        ("model.norm.weight".into(), HostTensor::from_f32(&[8], &vals(8, 4.0))),
    ]
}

#[test]
fn single_file_round_trip_and_conversions() {
    let dir = scratch("single");
    let ts = sample();
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("note".to_string(), "x".to_string()),
    ]);
    write_safetensors(&dir.join("model.safetensors"), &ts, Some(meta)).unwrap();
    assert_eq!(files_in(&dir), ["model.safetensors"]);
    let st = WeightStore::open(&dir).unwrap();
    assert_eq!(st.metadata().get("note").map(String::as_str), Some("x"));
    let mut names: Vec<&str> = ts.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(st.names(), names);
    for (name, t) in &ts {
        assert!(st.contains(name));
        assert_eq!(st.shape(name).unwrap(), t.shape.as_slice());
        assert_eq!(st.dtype(name).unwrap(), t.dtype);
        assert_eq!(&st.get_raw(name).unwrap(), t);
        for d in [DType::F32, DType::F16, DType::BF16] {
            // f32 -> f16/bf16 rounds to nearest even; widening is exact.
            assert_eq!(st.get(name, d).unwrap(), t.cast(d), "{name} as {d}");
        }
    }
    // bf16 -> f16 goes through f32 and is exact for these small values.
    let q = st.get("model.layers.0.self_attn.q_proj.weight", DType::F16).unwrap();
    assert_eq!(q.to_f32(), ts[1].1.to_f32());
    assert!(!st.contains("lm_head.weight"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sharded_round_trip_in_hf_format() {
    let dir = scratch("sharded");
    let ts = sample();
    // 80 f32 = 320 bytes: a 400-byte limit gives [embed], [q, k, ln, norm] -> 2 shards.
    let written = write_safetensors_sharded(&dir, &ts, 400, None).unwrap();
    assert_eq!(written.len(), 3);
    assert_eq!(
        files_in(&dir),
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"
        ]
    );
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    let total: usize = ts.iter().map(|(_, t)| t.data.len()).sum();
    assert_eq!(index["metadata"]["total_size"], total);
    assert_eq!(
        index["weight_map"]["model.embed_tokens.weight"],
        "model-00001-of-00002.safetensors"
    );
    assert_eq!(
        index["weight_map"]["model.norm.weight"],
        "model-00002-of-00002.safetensors"
    );
    assert_eq!(index["weight_map"].as_object().unwrap().len(), ts.len());

    for open in [dir.clone(), dir.join("model.safetensors.index.json")] {
        let st = WeightStore::open(&open).unwrap();
        assert_eq!(st.len(), ts.len());
        for (name, t) in &ts {
            assert_eq!(&st.get_raw(name).unwrap(), t);
        }
    }
    // Saving again under a large limit replaces the shards by one file.
    write_safetensors_sharded(&dir, &ts, 1 << 30, None).unwrap();
    assert_eq!(files_in(&dir), ["model.safetensors"]);
    assert_eq!(
        WeightStore::open(&dir).unwrap().get_raw("model.norm.weight").unwrap(),
        ts[4].1
    );
    // One shard per tensor, then two: the single file and the five shards are gone.
    write_safetensors_sharded(&dir, &ts, 1, None).unwrap();
    assert_eq!(files_in(&dir).len(), ts.len() + 1);
    assert!(!dir.join("model.safetensors").exists());
    write_safetensors_sharded(&dir, &ts, 400, None).unwrap();
    assert_eq!(
        files_in(&dir),
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"
        ]
    );
    let st = WeightStore::open(&dir).unwrap();
    for (name, t) in &ts {
        assert_eq!(&st.get_raw(name).unwrap(), t);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_tensor_names_it_and_suggests_a_close_name() {
    let dir = scratch("missing");
    write_safetensors(&dir.join("model.safetensors"), &sample(), None).unwrap();
    let st = WeightStore::open(&dir).unwrap();
    let err = st
        .get("model.layers.0.self_attn.q_proj.weigth", DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`model.layers.0.self_attn.q_proj.weigth` is not in the checkpoint"),
        "{err}"
    );
    assert!(
        err.contains("did you mean `model.layers.0.self_attn.q_proj.weight`?"),
        "{err}"
    );
    let err = st.shape("lm_head.weight").unwrap_err().to_string();
    assert!(err.contains("lm_head.weight") && !err.contains("did you mean"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn wrong_shape_says_expected_and_found() {
    let dir = scratch("shape");
    write_safetensors(&dir.join("model.safetensors"), &sample(), None).unwrap();
    let st = WeightStore::open(&dir).unwrap();
    let err = st
        .get_shaped("model.layers.0.self_attn.k_proj.weight", &[8, 8], DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("k_proj.weight") && err.contains("[4, 8]") && err.contains("expects [8, 8]"),
        "{err}"
    );
    assert!(st
        .get_shaped("model.layers.0.self_attn.k_proj.weight", &[4, 8], DType::F32)
        .is_ok());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = scratch("dtype");
    let p = dir.join("model.safetensors");
    let bytes: Vec<u8> = [1i64, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![3], &bytes).unwrap();
    safetensors::serialize_to_file([("position_ids", view)], None, &p).unwrap();
    let st = WeightStore::open(&p).unwrap();
    let err = st.get("position_ids", DType::F32).unwrap_err().to_string();
    assert!(
        err.contains("position_ids") && err.contains("I64") && err.contains("F32, F16, BF16"),
        "{err}"
    );
    // Integer tensors we can hold are not turned into weights either.
    write_safetensors(&p, &[("ids".into(), HostTensor::from_i32(&[2], &[1, 2]))], None).unwrap();
    let err = WeightStore::open(&p)
        .unwrap()
        .get("ids", DType::BF16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("stored as i32"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn broken_checkpoints_are_clear_errors() {
    let dir = scratch("broken");
    let err = WeightStore::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("model.safetensors.index.json"),
        "{err}"
    );
    write_safetensors_sharded(&dir, &sample(), 400, None).unwrap();
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = WeightStore::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("model-00002-of-00002.safetensors") && err.contains("incomplete"),
        "{err}"
    );
    // A truncated file.
    let p = dir.join("cut.safetensors");
    write_safetensors(&p, &sample(), None).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 8]).unwrap();
    let err = WeightStore::open(&p).unwrap_err().to_string();
    assert!(err.contains("cut.safetensors"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}
