#!/usr/bin/env bash
# Regenerate the TensorBoard screenshots in docs/img: the default example run (Xavier) and the same run with
# model.init=he, then Custom Scalars and Text of the default run and the gradient-flow heat maps of both.
# Usage: scripts/docs_screenshots.sh   (about 3 minutes on 2 CPU cores; needs chromium: apt-get install chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${OUT:-${TMPDIR:-/tmp}/gradstab-screenshots}
rm -rf "$runs"
for init in xavier he; do
  OMP_NUM_THREADS=1 python examples/train.py "model.init=$init" trainer.enable_progress_bar=false \
    "hydra.run.dir=$runs/$init" >"$runs-$init.log" 2>&1
done
scripts/tensorboard_screenshot.sh "$runs/xavier" "$runs/default" custom_scalars text
cp "$runs/default_custom_scalars.png" docs/img/tensorboard_panels.png
cp "$runs/default_text.png" docs/img/tensorboard_findings.png
WIDTH=1500 HEIGHT=540 scripts/tensorboard_screenshot.sh "$runs" "$runs/both" "images&tagFilter=over_time"
cp "$runs/both_images.png" docs/img/gradient_flow_xavier_vs_he.png
echo "docs/img: tensorboard_panels.png tensorboard_findings.png gradient_flow_xavier_vs_he.png"
