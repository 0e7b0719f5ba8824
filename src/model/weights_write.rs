//! Writing safetensors checkpoints: one file, or HF-style shards with an index above a size limit.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype as StDtype, View};

use super::weights::{dtype_to_safetensors, INDEX_FILE, SINGLE_FILE};
use crate::{Error, HostTensor, Result};

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

fn check_tensor(path: &Path, name: &str, t: &HostTensor) -> Result<()> {
    if t.data.len() != t.numel() * t.dtype.size() {
        return Err(Error::format(
            path,
            format!(
                "tensor `{name}` has {} bytes but shape {:?} of {} needs {}",
                t.data.len(),
                t.shape,
                t.dtype,
                t.numel() * t.dtype.size()
            ),
        ));
    }
    Ok(())
}

/// Write `tensors` to one safetensors file. Without `metadata`, `{"format": "pt"}` is written,
/// which transformers expects. The file appears under its name only when complete and on
/// disk: it is written and synced under a temporary sibling name, then renamed.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, HostTensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for (name, t) in tensors {
        check_tensor(path, name, t)?;
        if !seen.insert(name.as_str()) {
            return Err(Error::format(path, format!("tensor `{name}` is given twice")));
        }
    }
    let metadata = metadata.or_else(|| Some(HashMap::from([("format".to_string(), "pt".to_string())])));
    let views = tensors.iter().map(|(n, t)| (n.as_str(), HostView(t)));
    // Our own temporary name, synced before the rename: a crash leaves the old file or the
    // complete new one, never a file whose data had not reached the disk.
    let tmp = super::atomic::temp_sibling(path);
    let result = (|| {
        safetensors::serialize_to_file(views, metadata, &tmp)
            .map_err(|e| Error::format(path, format!("writing safetensors failed: {e}")))?;
        let f = std::fs::File::open(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        // The crate's file is private (0600); give the result the usual mode.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    super::atomic::sync_dir(
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
}

/// Write a checkpoint into `dir` the way transformers' `save_pretrained` does: one
/// `model.safetensors` when the tensors fit in `max_shard_bytes`, otherwise
/// `model-0000K-of-0000N.safetensors` shards (filled in the given order, a new shard started
/// when the next tensor would pass the limit) plus `model.safetensors.index.json`.
/// Returns the files written. Stale files of the other layout are removed.
pub fn write_safetensors_sharded(
    dir: &Path,
    tensors: &[(String, HostTensor)],
    max_shard_bytes: usize,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut cur = 0usize;
    for (i, (_, t)) in tensors.iter().enumerate() {
        let n = t.data.len();
        if cur > 0 && cur + n > max_shard_bytes {
            shards.push(vec![]);
            cur = 0;
        }
        shards.last_mut().expect("never empty").push(i);
        cur += n;
    }
    // New files first, then the stale ones of the old layout: a crash in between leaves
    // either the old model or the new one complete (a loader prefers the index when both
    // a single file and an index are present, and the index is written last, or removed
    // before the old shards).
    if shards.len() == 1 {
        let path = dir.join(SINGLE_FILE);
        write_safetensors(&path, tensors, metadata)?;
        remove_if_exists(&dir.join(INDEX_FILE))?;
        remove_old_shards(dir, &[])?;
        return Ok(vec![path]);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut written = Vec::new();
    let mut files = Vec::new();
    for (k, idx) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        let part: Vec<(String, HostTensor)> = idx.iter().map(|&i| tensors[i].clone()).collect();
        let path = dir.join(&file);
        write_safetensors(&path, &part, metadata.clone())?;
        for (name, _) in &part {
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
        written.push(path);
        files.push(file);
    }
    let total: usize = tensors.iter().map(|(_, t)| t.data.len()).sum();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let index_path = dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index).expect("JSON values always serialize");
    super::atomic::write_atomic(&index_path, format!("{text}\n").as_bytes())?;
    written.push(index_path);
    remove_if_exists(&dir.join(SINGLE_FILE))?;
    remove_old_shards(dir, &files)?;
    Ok(written)
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Remove `model-*-of-*.safetensors` left by an earlier sharded save, except `keep`.
fn remove_old_shards(dir: &Path, keep: &[String]) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(dir, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name.starts_with("model-")
            && name.contains("-of-")
            && name.ends_with(".safetensors")
            && !keep.contains(&name)
        {
            remove_if_exists(&ent.path())?;
        }
    }
    Ok(())
}
