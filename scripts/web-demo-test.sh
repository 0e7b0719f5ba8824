#!/usr/bin/env bash
# The browser demo's end-to-end test: the native reference run, the page built to wasm,
# headless Chromium training on it (web-demo/test/browser.mjs), and the native CLI loading
# the adapter the page downloaded. Installs Chromium (apt), wasm-bindgen-cli (cargo) and
# playwright-core (npm, no browser download) when missing.
# Artifacts: outputs/web-demo/{reference.json,result.json,screenshot.png,adapter/}.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${WEB_DEMO_DEVICE:-webgpu}"
OUT=outputs/web-demo
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
STEPS=8 ROWS=64
OPTIONS="{\"rank\":8,\"learning_rate\":0.01,\"steps\":$STEPS,\"seed\":42,\"sequence_len\":128,\"micro_batch_size\":2}"

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
"$TARGET_DIR/release/web-demo-reference" --device "$REF_DEVICE" --rows "$ROWS" --options "$OPTIONS" > "$OUT/reference.json.tmp"
mv "$OUT/reference.json.tmp" "$OUT/reference.json"

web-demo/build.sh

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$PORT" --bind 127.0.0.1 --directory web-demo/www > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 0.1; done

node web-demo/test/browser.mjs "http://127.0.0.1:$PORT/" "$OUT/reference.json" "$OUT" "$DEVICE"

# The native CLI loads the downloaded adapter and generates greedily, as the page did.
PROMPT="What is 12 + 34?"
native=$("$TARGET_DIR/release/ferrotune" generate --model web-demo/model --adapter "$OUT/adapter" \
  --prompt "$PROMPT" --max-new-tokens 16 --device "$REF_DEVICE")
browser=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["generated"]["adapter"])' "$OUT/result.json")
if [ "$native" = "$browser" ]; then
  echo "ok   the native CLI loads the downloaded adapter and generates what the page did: ${native@Q}"
  echo "1 passed, 0 failed"
else
  echo "FAIL native generation with the downloaded adapter: ${native@Q}, the page: ${browser@Q}"
  echo "0 passed, 1 failed"
  exit 1
fi
