#!/usr/bin/env bash
# CUDA tests on a machine with an NVIDIA GPU, from prebuilt binaries (nothing is compiled
# there).
#
#   scripts/gpu-test.sh build DIR   (here) builds the CUDA test binaries, strips them and
#                                   copies them with this script into DIR (a git-ignored
#                                   folder, e.g. target/gpu-bundle)
#   DIR/gpu-test.sh run DIR         (on the GPU machine) runs every test in its own process
#                                   (a kernel fault poisons its whole CUDA context), reruns a
#                                   failure with FERROTUNE_CUDA_SYNC=1 and under
#                                   compute-sanitizer to name the kernel, times attention
#                                   against PyTorch's SDPA flash kernel when PyTorch is there,
#                                   and prints a pass/fail table last. Logs go to $OUT when set.
#                                   SKIP="cuda_nvrtc sdpa ..." leaves out binaries or the SDPA run.
set -uo pipefail

mode="${1:-}"
dir="${2:-target/gpu-bundle}"

if [ "$mode" = build ]; then
  set -e
  cd "$(dirname "$0")/.."
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
  mkdir -p "$dir"
  { cargo test --release --features cuda --no-run --message-format=json \
      --test cuda_ops --test cuda_train_step --test cuda_nvrtc --test cuda_dist
    cargo bench --features cuda --no-run --message-format=json --bench cuda_attention; } |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"].startswith("cuda_"):
        print(m["target"]["name"], m["executable"])' |
    while read -r name exe; do
      strip -o "$dir/$name" "$exe"
      echo "built $dir/$name ($(du -h "$dir/$name" | cut -f1))"
    done
  cp "$0" "$dir/gpu-test.sh"
  exit 0
fi

if [ "$mode" != run ]; then
  echo "usage: $0 build DIR | run DIR" >&2
  exit 2
fi

out="${OUT:-/tmp/gpu-test-out}"
mkdir -p "$out"
export RUST_BACKTRACE=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.txt"
results=()
failed=0

skip() { case " ${SKIP:-} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# One log for all tests (the device tool returns few files).
tlog="$out/tests.log"
: >"$tlog"
run_test() { # binary test-name
  local bin="$1" name="$2" log
  log="$(mktemp)"
  local t0=$SECONDS
  if timeout 240 "$bin" --exact "$name" --test-threads=1 --nocapture >"$log" 2>&1; then
    results+=("PASS $(basename "$bin")::$name ($((SECONDS - t0)) s)")
  else
    failed=1
    results+=("FAIL $(basename "$bin")::$name ($((SECONDS - t0)) s)")
    echo "---- FAIL $(basename "$bin")::$name"
    grep -E "panicked|relative error .* >|error|Error" "$log" | head -20
    echo "  with FERROTUNE_CUDA_SYNC=1:" | tee -a "$log"
    FERROTUNE_CUDA_SYNC=1 timeout 120 "$bin" --exact "$name" --test-threads=1 --nocapture 2>&1 | tee -a "$log" | grep -E "panicked|failed|error" | head -8
    if command -v compute-sanitizer >/dev/null; then
      echo "  memcheck:" | tee -a "$log"
      FERROTUNE_CUDA_GRAPHS=0 timeout 150 compute-sanitizer --tool memcheck --print-limit 5 "$bin" --exact "$name" --test-threads=1 2>&1 | tee -a "$log" | grep -E "Invalid|ERROR SUMMARY|at .*0x" | head -8
    fi
  fi
  { echo "==== $(basename "$bin")::$name"; cat "$log"; } >>"$tlog"
  rm -f "$log"
}

for bin in "$dir"/cuda_nvrtc "$dir"/cuda_ops "$dir"/cuda_train_step "$dir"/cuda_dist; do
  skip "$(basename "$bin")" && continue
  [ -x "$bin" ] || { results+=("MISSING $bin"); failed=1; continue; }
  for name in $("$bin" --list 2>/dev/null | sed -n 's/: test$//p'); do
    run_test "$bin" "$name"
  done
done

if [ -x "$dir/cuda_attention" ] && ! skip cuda_attention; then
  timeout 200 "$dir/cuda_attention" >"$out/bench.log" 2>&1 \
    && results+=("RAN cuda_attention benchmark (timings below)") || { results+=("FAIL cuda_attention benchmark"); failed=1; }
  grep "^|" "$out/bench.log"
fi

if ! skip sdpa && python3 -c 'import torch' 2>/dev/null; then
  echo "PyTorch SDPA (flash) reference, causal bf16, median of 10 after 3 warm-ups:"
  timeout 120 python3 - <<'EOF' 2>&1 | tee "$out/sdpa.log"
import torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
print("| T | batch | heads | head dim | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s |")
for hd, h in [(64, 32), (128, 16)]:
    for t, b in [(2048, 8), (8192, 2), (16384, 1)]:
        q, k, v = (torch.randn(b, h, t, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn(b, h, t, hd, device="cuda", dtype=torch.bfloat16)
        tf, tb = [], []
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            for it in range(13):
                e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                e[0].record()
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                e[1].record()
                o.backward(do)
                e[2].record()
                torch.cuda.synchronize()
                if it >= 3:
                    tf.append(e[0].elapsed_time(e[1])); tb.append(e[1].elapsed_time(e[2]))
                q.grad = k.grad = v.grad = None
        tf.sort(); tb.sort()
        f = 4 * t * t * h * hd * b * 0.5
        print(f"| {t} | {b} | {h} | {hd} | {tf[5]:.3f} | {f / tf[5] / 1e9:.1f} | {tb[5]:.3f} | {2.5 * f / tb[5] / 1e9:.1f} |")
EOF
fi

if [ -s "$out/sdpa.log" ] && [ -s "$out/bench.log" ]; then
  echo "Attention time, ferrotune (default tiles) over PyTorch SDPA flash (forward + backward):"
  python3 - "$out/bench.log" "$out/sdpa.log" <<'EOF' | tee "$out/attn_ratio.txt"
import sys
def rows(path, skip):
    r = {}
    for l in open(path):
        c = [x.strip() for x in l.strip().strip("|").split("|")]
        if len(c) < 8 or not c[skip].isdigit() or (skip and c[0] != "default"):
            continue
        c = c[skip:]
        r[(c[0], c[3])] = (float(c[4]), float(c[6]))
    return r
ours, ref = rows(sys.argv[1], 1), rows(sys.argv[2], 0)
print("| T | head dim | ours fwd+bwd ms | SDPA fwd+bwd ms | fwd ratio | bwd ratio | total ratio |")
for k in sorted(ours, key=lambda k: (int(k[1]), int(k[0]))):
    if k in ref:
        (of, ob), (rf, rb) = ours[k], ref[k]
        print(f"| {k[0]} | {k[1]} | {of + ob:.3f} | {rf + rb:.3f} | {of / rf:.2f} | {ob / rb:.2f} | {(of + ob) / (rf + rb):.2f} |")
EOF
fi

echo
echo "== CUDA test results"
printf '%s\n' "${results[@]}"
exit $failed
