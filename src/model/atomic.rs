//! Atomic file and folder writes: write under a temporary name in the same folder, then rename.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Error, Result};

/// `dir/.name.tmp-PID-N`: a sibling name, unique within this process, that a crash leaves
/// behind visibly and never as `name`.
pub fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Write `bytes` to `path` through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Create a temporary sibling of `path`, let `fill` write it, flush it to disk, and rename it to `path`.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Make a folder's entries (files created or renamed in it) durable. A no-op where
/// folders cannot be opened as files (Windows).
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Replace the folder `dst` by the finished folder `tmp` (both in the same parent).
/// An existing `dst` is moved aside first and removed only after the rename succeeded.
pub fn replace_dir(tmp: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        let old = temp_sibling(dst).with_extension("old");
        std::fs::rename(dst, &old).map_err(|e| Error::io(dst, e))?;
        std::fs::rename(tmp, dst).map_err(|e| Error::io(dst, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(tmp, dst).map_err(|e| Error::io(dst, e))?;
    }
    Ok(())
}
