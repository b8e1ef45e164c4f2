#!/usr/bin/env bash
# Re-run the experiment presets and store each sweep's results.md (command, date, machine, table) under
# docs/results/presets/, the files the docs' preset tables quote (tests/test_docs.py checks them verbatim).
# Usage: scripts/regenerate_presets.sh [PRESET ...]   (default: all, plus he2015 over seeds 0,1,2)
# All of them took 27 minutes on the shared 2-core box (he2015 alone: under 2 minutes). Afterwards
# `python scripts/quote_results.py` refreshes the quoted tables in README.md and docs/*.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-${TMPDIR:-/tmp}/gradstab-presets}
mkdir -p docs/results/presets
run() {  # NAME OVERRIDES...
  local name=$1; shift
  OMP_NUM_THREADS=1 python examples/train.py -m "$@" trainer.enable_progress_bar=false "hydra.sweep.dir=$out/$name"
  cp "$out/$name/results.md" "docs/results/presets/$name.md"
  echo "docs/results/presets/$name.md"
}
for name in "${@:-he2015 glorot2010 resnet2016 pascanu2013 lm_spike he2015-seeds}"; do
  for preset in $name; do
    if [ "$preset" = he2015-seeds ]; then run he2015-seeds experiment=he2015 seed=0,1,2
    else run "$preset" "experiment=$preset"; fi
  done
done
