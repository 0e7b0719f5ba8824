#!/usr/bin/env bash
# Builds the demo page: the wasm crate for wasm32-unknown-unknown, then its JavaScript
# bindings into web-demo/www/pkg/. Installs the wasm32 target and wasm-bindgen-cli
# (pinned to the wasm-bindgen version in Cargo.lock) when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
WB_VERSION=0.2.130

if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$WB_VERSION" ]; then
  echo "installing wasm-bindgen-cli $WB_VERSION"
  cargo install wasm-bindgen-cli --version "$WB_VERSION"
fi

TARGET_DIR="${CARGO_TARGET_DIR:-target}"
# No debug info in the shipped module (native builds keep theirs).
CARGO_PROFILE_RELEASE_DEBUG=0 \
  cargo build --release --lib -p ferrotune-web-demo --target wasm32-unknown-unknown
rm -rf web-demo/www/pkg.tmp
wasm-bindgen --target web --no-typescript --out-dir web-demo/www/pkg.tmp \
  "$TARGET_DIR/wasm32-unknown-unknown/release/ferrotune_web_demo.wasm"
rm -rf web-demo/www/pkg
mv web-demo/www/pkg.tmp web-demo/www/pkg
ls -l web-demo/www/pkg/*.wasm
