#!/usr/bin/env bash
# The browser demo's end-to-end test: the native reference runs, the page built to wasm,
# headless Chromium training on it (web-demo/test/browser.mjs), and the native CLI loading
# the adapter the page downloaded (generate, and eval against the base model and the
# native run's adapter). Installs Chromium (apt), wasm-bindgen-cli (cargo) and
# playwright-core (npm, no browser download) when missing.
# Artifacts: outputs/web-demo/{reference*.json,result.json,screenshot*.png,adapter/,eval-*.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${WEB_DEMO_DEVICE:-webgpu}"
OUT=outputs/web-demo
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
STEPS=8 ROWS=64
OPTIONS="{\"rank\":8,\"learning_rate\":0.01,\"steps\":$STEPS,\"seed\":42,\"sequence_len\":128,\"micro_batch_size\":2}"
# The CPU page's runs: 8 rows of 256 tokens a step (steps long enough to see the page's
# timer tick during them); the dataset files train two steps.
FILE_OPTIONS='{"rank":8,"learning_rate":0.01,"steps":2,"seed":42,"sequence_len":256,"micro_batch_size":8}'

if ! command -v chromium >/dev/null; then
  echo "installing chromium"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi
if [ ! -d web-demo/node_modules/playwright-core ]; then
  (cd web-demo && npm install --no-audit --no-fund --silent)
fi

mkdir -p "$OUT"
# The native side: the reference losses (the same demo code on a native backend) and the CLI.
REF_DEVICE=cpu
[ "$DEVICE" = webgpu ] && REF_DEVICE=wgsl
cargo build --release --bin ferrotune -p ferrotune
cargo build --release --bin web-demo-reference -p ferrotune-web-demo
rm -rf "$OUT/reference-adapter"
"$TARGET_DIR/release/web-demo-reference" --device "$REF_DEVICE" --rows "$ROWS" --options "$OPTIONS" \
  --write-data "$OUT/addition.jsonl" --adapter-out "$OUT/reference-adapter" > "$OUT/reference.json.tmp"
mv "$OUT/reference.json.tmp" "$OUT/reference.json"
for f in sharegpt alpaca; do
  "$TARGET_DIR/release/web-demo-reference" --device cpu --data "web-demo/test/data/$f.jsonl" \
    --options "$FILE_OPTIONS" > "$OUT/reference-$f.json.tmp"
  mv "$OUT/reference-$f.json.tmp" "$OUT/reference-$f.json"
done

web-demo/build.sh

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$PORT" --bind 127.0.0.1 --directory web-demo/www > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 0.1; done

node web-demo/test/browser.mjs "http://127.0.0.1:$PORT/" "$OUT" "$DEVICE"

passed=0 failed=0
ok() { echo "ok   $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }

# The native CLI loads the downloaded adapter and generates greedily, as the page did.
PROMPT="What is 12 + 34?"
native=$("$TARGET_DIR/release/ferrotune" generate --model web-demo/model --adapter "$OUT/adapter" \
  --prompt "$PROMPT" --max-new-tokens 16 --device "$REF_DEVICE")
browser=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["generated"]["adapter"])' "$OUT/result.json")
if [ "$native" = "$browser" ]; then
  ok "the native CLI loads the downloaded adapter and generates what the page did: ${native@Q}"
else
  fail "native generation with the downloaded adapter: ${native@Q}, the page: ${browser@Q}"
fi

# The eval loss on the rows trained on: the base model, the downloaded adapter and the
# native run's adapter (same options, same rows). The adapter must lower it, and the two
# adapters must agree within 1e-3.
ROOT=$(pwd)
cat > "$OUT/eval.yaml" <<EOF
base_model: $ROOT/web-demo/model
datasets:
  - path: $ROOT/$OUT/addition.jsonl
    type: chat_template
test_datasets:
  - path: $ROOT/$OUT/addition.jsonl
    type: chat_template
chat_template: tokenizer_default_fallback_chatml
sequence_len: 128
sample_packing: true
micro_batch_size: 2
learning_rate: 0.01
adapter: lora
lora_r: 8
lora_alpha: 16
lora_target_linear: true
output_dir: $ROOT/$OUT/eval-out
device: cpu
EOF
for a in base browser native; do
  case $a in base) adapter=() ;; browser) adapter=(--adapter "$OUT/adapter") ;; native) adapter=(--adapter "$OUT/reference-adapter") ;; esac
  "$TARGET_DIR/release/ferrotune" eval "$OUT/eval.yaml" --limit 0 --json "${adapter[@]}" > "$OUT/eval-$a.json"
done
if verdict=$(python3 -c '
import json, sys
out = sys.argv[1]
loss = {k: json.load(open(f"{out}/eval-{k}.json"))["eval_loss"] for k in ("base", "browser", "native")}
diff = abs(loss["browser"] - loss["native"])
print(", ".join(f"{k} {v:.6f}" for k, v in loss.items()) + f"; |browser - native| {diff:.2e}")
sys.exit(0 if loss["browser"] < loss["base"] and diff <= 1e-3 else 1)
' "$OUT"); then
  ok "ferrotune eval: the downloaded adapter lowers the loss below the base model's and equals the native adapter's within 1e-3: $verdict"
else
  fail "ferrotune eval with the downloaded adapter (loss must fall below the base's and equal the native adapter's within 1e-3): $verdict"
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
