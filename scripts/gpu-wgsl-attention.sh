#!/usr/bin/env bash
# WGSL attention (fused flash kernel against eager graph ops), forward + backward, on a GPU
# machine over Vulkan, from a benchmark binary built elsewhere:
#
#   cargo bench --bench attention --no-run     # then copy target/release/deps/attention-<hash>
#   scripts/gpu-wgsl-attention.sh DIR          # DIR holds that copy, named `attention`
#
# TOKENS (default 2048,8192,16384), DIMS (default 64,128), HEADS (default 8), REPS (default 3);
# VULKAN_DEBS: a folder of Debian packages (libvulkan1, ...) unpacked into / when no Vulkan
# loader exists.
set -euo pipefail
dir=${1:?usage: gpu-wgsl-attention.sh DIR-WITH-BINARY}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
if ! ldconfig -p | grep -q libvulkan.so; then
    [ -n "${VULKAN_DEBS:-}" ] || { echo "error: no Vulkan loader (libvulkan.so.1); install libvulkan1 or set VULKAN_DEBS" >&2; exit 2; }
    for f in "$VULKAN_DEBS"/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] \
    && ! ls /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json >/dev/null 2>&1; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
"$dir/attention" --tokens "${TOKENS:-2048,8192,16384}" --dims "${DIMS:-64,128}" --heads "${HEADS:-8}" --reps "${REPS:-3}"
