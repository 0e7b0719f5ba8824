#!/usr/bin/env bash
# Measures the browser demo on a model folder (not part of the test suite: it needs a
# fetched model and takes minutes). Builds the page, serves it on a free port of
# 127.0.0.1, runs the same training natively (web-demo-reference on the native cpu
# backend) and for each device runs web-demo/test/bench.mjs in headless Chromium with
# --enable-unsafe-webgpu: the folder is picked in the page, then a short LoRA run on the
# built-in addition task whose losses must equal the native run's within 1e-3.
#
#   scripts/web-demo-bench.sh [MODEL_DIR]      (default models/SmolLM2-135M-Instruct,
#                                               from `ferrotune fetch smollm2-135m-instruct --dir models/`)
# Environment: DEVICES ("webgpu cpu"), STEPS (3), RANK (8), SEQ (64), BATCH (1), ROWS (16);
# SKIP_BUILD=1 uses the page already built in web-demo/www/pkg/.
# Artifacts: outputs/web-demo/bench-DEVICE.json and bench-DEVICE.png.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR="$(realpath "${1:-models/SmolLM2-135M-Instruct}")"
DEVICES="${DEVICES:-webgpu cpu}"
STEPS="${STEPS:-3}" RANK="${RANK:-8}" SEQ="${SEQ:-64}" BATCH="${BATCH:-1}" ROWS="${ROWS:-16}"
OUT=outputs/web-demo
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

for f in config.json model.safetensors tokenizer.json; do
  [ -f "$MODEL_DIR/$f" ] || { echo "$MODEL_DIR/$f is missing; fetch the model first: cargo run --release -- fetch smollm2-135m-instruct --dir models/" >&2; exit 1; }
done
command -v chromium >/dev/null || { echo "chromium is missing; run scripts/web-demo-test.sh once (it installs it)" >&2; exit 1; }
if [ ! -d web-demo/node_modules/playwright-core ]; then
  (cd web-demo && npm install --no-audit --no-fund --silent)
fi
[ "${SKIP_BUILD:-0}" = 1 ] || web-demo/build.sh
mkdir -p "$OUT"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cargo build --release --bin web-demo-reference -p ferrotune-web-demo
OPTIONS="{\"rank\":$RANK,\"learning_rate\":0.001,\"steps\":$STEPS,\"seed\":42,\"sequence_len\":$SEQ,\"micro_batch_size\":$BATCH}"
"$TARGET_DIR/release/web-demo-reference" --device cpu --model "$MODEL_DIR" --rows "$ROWS" --options "$OPTIONS" > "$OUT/bench-reference.json.tmp"
mv "$OUT/bench-reference.json.tmp" "$OUT/bench-reference.json"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$PORT" --bind 127.0.0.1 --directory web-demo/www > "$OUT/bench-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 0.1; done

for d in $DEVICES; do
  echo "== $d: $(basename "$MODEL_DIR"), $STEPS steps, rank $RANK, $BATCH x $SEQ tokens"
  node web-demo/test/bench.mjs "http://127.0.0.1:$PORT/" "$MODEL_DIR" "$OUT" "$d" "$OUT/bench-reference.json" || status=1
done
exit "${status:-0}"
