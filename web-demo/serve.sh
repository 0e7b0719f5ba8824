#!/usr/bin/env bash
# Serves the built page on http://127.0.0.1:PORT/ (default 8123). 127.0.0.1 is a secure
# context, so browsers expose WebGPU there. Python's server sends .wasm as application/wasm.
set -euo pipefail
cd "$(dirname "$0")/www"
[ -f pkg/ferrotune_web_demo.js ] || { echo "build the page first: web-demo/build.sh" >&2; exit 1; }
PORT="${1:-8123}"
echo "serving on http://127.0.0.1:$PORT/"
exec python3 -m http.server "$PORT" --bind 127.0.0.1
