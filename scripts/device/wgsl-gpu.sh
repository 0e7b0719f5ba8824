#!/usr/bin/env bash
# The WGSL backend on a GPU machine over Vulkan, from binaries built elsewhere (stripped and
# gzipped into DIR as NAME.gz): the op and training tests, the transformers reference on
# wgsl, the matmul benchmark (NN and NT, f32 and f16, 4096) and `ferrotune bench train` on
# the SmolLM2-135M shape.
#
#   cargo test --release --no-run --test wgsl_ops --test wgsl_train --test hf_reference
#   cargo bench --bench matmul --no-run; cargo build --release --bin ferrotune
#   scripts/device/wgsl-gpu.sh DIR [OUT]
#
# The test binaries look for fixtures and for the ferrotune binary at the paths they were
# built with (CARGO_MANIFEST_DIR, CARGO_BIN_EXE_ferrotune): set SRC_DIR and BIN_PATH to them.
# VULKAN_DEBS: a folder of Debian packages (libvulkan1, libglvnd0, ...) unpacked into / when
# the machine has no Vulkan loader.
set -uo pipefail
dir=${1:?usage: wgsl-gpu.sh DIR [OUT]}
out=${2:-/tmp}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
if ! ldconfig -p | grep -q libvulkan.so; then
    for f in "${VULKAN_DEBS:?no Vulkan loader: set VULKAN_DEBS}"/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
bin=/tmp/wgsl-bin
mkdir -p "$bin"
for f in "$dir"/*.gz; do gunzip -c "$f" >"$bin/$(basename "$f" .gz)"; chmod +x "$bin/$(basename "$f" .gz)"; done
if [ -n "${BIN_PATH:-}" ]; then mkdir -p "$(dirname "$BIN_PATH")"; ln -sf "$bin/ferrotune" "$BIN_PATH"; fi
if [ -n "${SRC_DIR:-}" ] && [ ! -e "$SRC_DIR" ]; then mkdir -p "$(dirname "$SRC_DIR")"; ln -s "$PWD" "$SRC_DIR"; fi
run() { echo "== $*"; "$@" 2>&1 | grep -v XDG_RUNTIME_DIR | tee -a "$out/wgsl-gpu.log"; }
run "$bin/ferrotune" devices
run timeout 60 "$bin/wgsl_ops" --test-threads 4
run timeout 60 "$bin/wgsl_train" --test-threads 2
run timeout 40 "$bin/hf_reference" wgsl
run timeout 50 "$bin/matmul" 4096 --dtypes f32,f16 --seconds 1
run timeout 50 "$bin/matmul" 4096 --dtypes f32,f16 --seconds 1 --trans-b
run timeout 100 "$bin/ferrotune" bench train configs/bench/smollm2-135m.json --seq-len 2048 --batch 4 \
    --warmup 1 --steps 3 --device wgsl
