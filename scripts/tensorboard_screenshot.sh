#!/usr/bin/env bash
# Screenshot TensorBoard tabs for a log directory with headless Chromium (Debian: apt-get install chromium).
# Usage: scripts/tensorboard_screenshot.sh LOGDIR OUT_PREFIX [TAB ...]  (tabs: custom_scalars, text,
# "images&tagFilter=REGEX", ...). Writes OUT_PREFIX_<tab>.png for each tab (default: custom_scalars text images). WIDTH/HEIGHT set the window.
# The docs' screenshots: scripts/docs_screenshots.sh.
set -euo pipefail
logdir=$1; out=$2; shift 2
tabs=("${@:-custom_scalars text images}"); tabs=(${tabs[*]})
port=${PORT:-6006}
tensorboard --logdir "$logdir" --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
server=$!
profile=$(mktemp -d)
trap 'kill $server; rm -rf "$profile"' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/data/runs" | grep -q . && break; sleep 1; done
for tab in "${tabs[@]}"; do
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
    --window-size="${WIDTH:-1600},${HEIGHT:-1200}" --virtual-time-budget=25000 \
    --screenshot="${out}_${tab%%&*}.png" "http://127.0.0.1:$port/?darkMode=false#$tab" 2>/dev/null
done
