#!/usr/bin/env bash
# A/B of build switches on an NVIDIA GPU: the LoRA training step of `ferrotune bench train`
# under each set of environment variables, alternated over rounds in one run, with the train
# program's median device time (FERROTUNE_CUDA_RUN_TIMES=1). Differences smaller than the
# spread between rounds of one variant are noise.
#
#   DIR/gpu-ab.sh DIR "label:VAR=V,VAR=V" "label:..."   (on the GPU machine; DIR holds the
#                                                       binary and configs, as gpu-bench.sh
#                                                       build leaves them)
#   ROUNDS (default 2), STEPS (8), WARMUP (2), MODEL (llama-3.2-1b), SEQ (2048), BATCH (4) and
#   ARGS (--lora-r 16) set the run; logs go to $OUT when set.
set -uo pipefail
dir="${1:?usage: $0 DIR label:VAR=V,... ...}"
shift
[ $# -gt 0 ] || { echo "usage: $0 DIR label:VAR=V,... ..." >&2; exit 2; }
out="${OUT:-/tmp/gpu-ab-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
rows=()
for round in $(seq "${ROUNDS:-2}"); do
  for v in "$@"; do
    label="${v%%:*}"
    vars="${v#*:}"
    [ "$vars" = "$v" ] && vars=""
    log="$out/ab_${label}_$round.log"
    # shellcheck disable=SC2086
    env ${vars//,/ } FERROTUNE_CUDA_RUN_TIMES=1 timeout 150 "$dir/ferrotune" bench train \
      "$dir/configs/${MODEL:-llama-3.2-1b}.json" --seq-len "${SEQ:-2048}" --batch "${BATCH:-4}" \
      ${ARGS:---lora-r 16} --device cuda --warmup "${WARMUP:-2}" --steps "${STEPS:-8}" >"$log" 2>&1
    # The train program is the longest one of the step.
    med=$(sed -n 's/^program .*median \([0-9.]*\) ms.*/\1/p' "$log" | sort -n | tail -1)
    tok=$(sed -n 's/.*: \([0-9]*\) tokens\/s.*/\1/p' "$log" | tail -1)
    rows+=("| $label | $round | ${med:-failed} | ${tok:-} | ${vars:-default} |")
    echo "${rows[-1]}"
  done
done
echo
echo "| variant | round | train program ms (median) | tokens/s | environment |"
echo "| --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}" | sort -t'|' -k2,2 -k3,3n
