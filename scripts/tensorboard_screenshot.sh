#!/usr/bin/env bash
# Screenshot TensorBoard's "Custom Scalars" and "Text" tabs for a run directory (headless Chromium).
# Usage: scripts/tensorboard_screenshot.sh RUN_DIR OUT_PREFIX   (needs Debian's chromium: apt-get install chromium)
set -euo pipefail
run_dir=$1; out=$2; port=${PORT:-6006}
tensorboard --logdir "$run_dir" --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 30); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 1; done
for tab in custom_scalars text images; do
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size=1600,1400 \
    --virtual-time-budget=20000 --screenshot="${out}_${tab}.png" "http://127.0.0.1:$port/?darkMode=false#$tab"
done
