#!/usr/bin/env bash
# Run the WGSL matmul tests (cooperative-matrix kernel included) and the matmul benchmark on
# a GPU machine, from binaries built elsewhere:
#
#   cargo test --release --no-run --test wgsl_matmul --test wgsl_matmul_coop
#   cargo bench --bench matmul --no-run
#   scripts/gpu-wgsl-matmul.sh DIR        # DIR holds wgsl_matmul, wgsl_matmul_coop and matmul
#                                         # (copies of target/release/deps/<name>-<hash>)
#
# Options through the environment: SIZES (default "1024 2048 4096"), DTYPES (default
# "f32,f16"), SECONDS_PER_CASE per benchmark configuration (default 2), VULKAN_DEBS (a folder of
# Debian packages libvulkan1, libglvnd0, ... unpacked into / when no Vulkan loader exists).
set -euo pipefail

dir=${1:?usage: gpu-wgsl-matmul.sh DIR-WITH-BINARIES}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}

if ! ldconfig -p | grep -q libvulkan.so; then
    if [ -n "${VULKAN_DEBS:-}" ]; then
        for f in "$VULKAN_DEBS"/*.deb; do dpkg -x "$f" /; done
        ldconfig
    else
        echo "error: no Vulkan loader (libvulkan.so.1); install libvulkan1 or set VULKAN_DEBS" >&2
        exit 2
    fi
fi
# NVIDIA containers often keep the ICD outside the default search path.
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] \
    && ! ls /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json >/dev/null 2>&1; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi

echo "== tests: cooperative-matrix kernel"
"$dir/wgsl_matmul_coop" --test-threads 1 --nocapture
echo "== tests: SIMT kernel"
"$dir/wgsl_matmul" --test-threads 2
echo "== benchmark: C = A B (NN), then C = A Bt (NT, B stored [n, k] like a linear layer's weight)"
# shellcheck disable=SC2086
"$dir/matmul" ${SIZES:-1024 2048 4096} --dtypes "${DTYPES:-f32,f16}" --seconds "${SECONDS_PER_CASE:-2}"
# shellcheck disable=SC2086
"$dir/matmul" ${SIZES:-1024 2048 4096} --dtypes "${DTYPES:-f32,f16}" --seconds "${SECONDS_PER_CASE:-2}" --trans-b
