#!/usr/bin/env bash
# Training throughput on an NVIDIA GPU: `ferrotune bench train` on the cuda backend against
# transformers + PEFT (scripts/bench/hf_baseline.py) on the same model shapes, random
# weights, LoRA r 16 on every linear layer, bf16, in one run.
#
#   scripts/gpu-bench.sh build DIR   (here) builds the release binary with CUDA and copies it,
#                                    the bench configs, the baseline and this script into DIR
#   DIR/gpu-bench.sh run DIR         (on the GPU machine) runs both on each shape and prints
#                                    tokens/s, the ratio, peak device memory (nvidia-smi
#                                    samples, and PyTorch's peak allocation) and model TFLOP/s.
#                                    CASES="llama-3.2-1b:2048:4[:MODE[:gc]] ..." picks the shapes;
#                                    MODE lora (default) or full; gc turns on gradient
#                                    checkpointing in the transformers reference.
#   DIR/gpu-ab.sh DIR "label:VAR=V,..." ...   (on the GPU machine) alternates build switches
#                                    and prints the train program's device time of each
#                                    (scripts/gpu-ab.sh says how).
set -uo pipefail
mode="${1:-}"
dir="${2:-target/gpu-bundle}"

if [ "$mode" = build ]; then
  set -e
  cd "$(dirname "$0")/.."
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
  mkdir -p "$dir/configs"
  cargo build --release --features cuda --bin ferrotune
  strip -o "$dir/ferrotune" "$CARGO_TARGET_DIR/release/ferrotune"
  cp configs/bench/*.json "$dir/configs/"
  cp scripts/bench/hf_baseline.py scripts/gpu-ab.sh "$0" "$dir/"
  echo "built $dir/ferrotune ($(du -h "$dir/ferrotune" | cut -f1))"
  exit 0
fi
[ "$mode" = run ] || { echo "usage: $0 build DIR | run DIR" >&2; exit 2; }

out="${OUT:-/tmp/gpu-bench-out}"
mkdir -p "$out"
cases="${CASES:-llama-3.2-1b:2048:4 smollm2-135m:2048:8}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/bench_gpu.txt"

# Peak of nvidia-smi's memory.used while a command runs, minus the idle value before it (MiB).
with_peak() {
  local log base
  log="$(mktemp)"
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$log" &
  local smi=$!
  "$@"
  local rc=$?
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  echo "PEAK_MIB $(( $(sort -n "$log" | tail -1) - base ))"
  rm -f "$log"
  return $rc
}

summary=()
for c in $cases; do
  IFS=: read -r name seq batch mode gc <<<"$c"
  mode="${mode:-lora}"
  cfg="$dir/configs/$name.json"
  lora_args=(--full)
  [ "$mode" = lora ] && lora_args=(--lora-r 16)
  echo "== $name seq $seq batch $batch, $mode${gc:+ (reference with gradient checkpointing)}"
  ours=$(with_peak "$dir/ferrotune" bench train "$cfg" --seq-len "$seq" --batch "$batch" "${lora_args[@]}" \
    --device cuda --json 2>"$out/ferrotune_$name.err")
  echo "$ours" | tee -a "$out/bench_train.jsonl"
  tail -3 "$out/ferrotune_$name.err"
  ref=$(PYTHONUNBUFFERED=1 with_peak python3 "$dir/hf_baseline.py" "$cfg" "$mode" "$seq" "$batch" $gc 2>"$out/hf_$name.err")
  echo "$ref" | tee -a "$out/bench_train.jsonl"
  grep -E "Error|error" "$out/hf_$name.err" | tail -3
  summary+=("$(python3 - "$name" "$seq" "$batch" "$mode${gc:+ gc}" <<PY
import json, sys
def parse(text):
    d, peak = {}, None
    for l in text.splitlines():
        if l.startswith("PEAK_MIB"):
            peak = int(l.split()[1])
        elif l.startswith("{") and "tok_s" in l:
            d = json.loads(l)
    return d, peak
o, op = parse("""$ours""")
r, rp = parse("""$ref""")
name, seq, batch, mode = sys.argv[1:]
if o.get("tok_s") and r.get("tok_s"):
    mfu = o["model_tflops"] / 989.0 * 100
    print(f"| {name} {mode} | {seq} x {batch} | {o['tok_s']:.0f} | {r['tok_s']:.0f} | {o['tok_s'] / r['tok_s']:.2f} | "
          f"{op / 1024:.1f} / {o['peak_gib']:.1f} | {rp / 1024:.1f} / {r['peak_gib']:.1f} | {o['model_tflops']} | {mfu:.1f}% |")
else:
    print(f"| {name} {mode} | {seq} x {batch} | {o.get('tok_s')} | {r.get('tok_s')} | failed | | | | |")
PY
)")
done
echo
echo "tokens/s: ferrotune cuda vs transformers (+PEFT for LoRA) (peak GiB: nvidia-smi used / planned or torch-allocated;"
echo "MFU: model TFLOP/s over 989 dense bf16 TFLOP/s)"
echo "| shape | tokens | ferrotune tok/s | HF+PEFT tok/s | ratio | ferrotune peak GiB | HF peak GiB | ferrotune TFLOP/s | MFU |"
printf '%s\n' "${summary[@]}" | tee "$out/bench_summary.md"
