#!/usr/bin/env bash
# Regenerate the TensorBoard screenshots in docs/img: the default example run (Xavier), the same run with
# model.init=he, and scripts/heatmap_demo.py (a dead layer and a NaN step). Then: Custom Scalars of the default
# run, its Text tab at 1280 px (the findings tables), the gradient-flow heat maps of Xavier vs He, and the heat
# map of the demo with its legend.
# Usage: scripts/docs_screenshots.sh   (about 3 minutes on 2 CPU cores; needs chromium: apt-get install chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"  # python and tensorboard of the project's environment, when it has one
runs=${OUT:-${TMPDIR:-/tmp}/gradstab-screenshots}
demo=$runs-demo  # its own log dir: the Xavier-vs-He screenshot shows every run under $runs
rm -rf "$runs" "$demo" && mkdir -p "$runs"
for init in xavier he; do
  OMP_NUM_THREADS=1 python examples/train.py "model.init=$init" trainer.enable_progress_bar=false \
    "hydra.run.dir=$runs/$init" >"$runs-$init.log" 2>&1
done
OMP_NUM_THREADS=1 PYTHONPATH="$PWD" python scripts/heatmap_demo.py "$demo" >"$demo.log" 2>&1
scripts/tensorboard_screenshot.sh "$runs/xavier" "$runs/default" custom_scalars
WIDTH=1280 HEIGHT=1400 scripts/tensorboard_screenshot.sh "$runs/xavier" "$runs/default" text
cp "$runs/default_custom_scalars.png" docs/img/tensorboard_panels.png
cp "$runs/default_text.png" docs/img/tensorboard_findings.png
WIDTH=1500 HEIGHT=540 scripts/tensorboard_screenshot.sh "$runs" "$runs/both" "images&tagFilter=over_time"
cp "$runs/both_images.png" docs/img/gradient_flow_xavier_vs_he.png
WIDTH=1280 HEIGHT=480 scripts/tensorboard_screenshot.sh "$demo" "$demo" "images&tagFilter=over_time"
cp "${demo}_images.png" docs/img/tensorboard_heatmap_nan_dead_layer.png
# TensorBoard shows images 350 px wide until "Show actual image size" is ticked (not settable from the URL): the
# heat map itself, as the event file holds it and that checkbox shows it, is taken from the event file
python - "$demo" docs/img/gradient_heatmap_nan_dead_layer.png <<'PY'
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

events = EventAccumulator(str(next(Path(sys.argv[1]).rglob("events.out.tfevents.*"))), size_guidance={"images": 0})
events.Reload()
Path(sys.argv[2]).write_bytes(events.Images("gradstab/gradient_flow_over_time")[-1].encoded_image_string)
PY
echo "docs/img: tensorboard_panels.png tensorboard_findings.png gradient_flow_xavier_vs_he.png" \
  "tensorboard_heatmap_nan_dead_layer.png gradient_heatmap_nan_dead_layer.png"
