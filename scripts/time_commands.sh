#!/usr/bin/env bash
# Time the README's commands on this machine and write docs/results/durations.md (command, wall time, machine,
# load). Usage: scripts/time_commands.sh [example] [tests]   (default: example; "tests" runs the whole test
# suite once, ~10 minutes on 2 CPU cores: run it when nobody else needs the cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
out=docs/results/durations.md
which=("${@:-example}")
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
machine="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $(uname -m); \
torch $(python -c 'import torch; print(torch.__version__)'), Python $(python -c 'import platform; print(platform.python_version())')"
row() {  # command, then the command line to run
  local label=$1; shift
  local load start end status=0
  load=$(cut -d' ' -f1 /proc/loadavg)
  start=$(date +%s.%N)
  "$@" >"$runs/log" 2>&1 || status=$?
  end=$(date +%s.%N)
  tail -3 "$runs/log"
  printf '| `%s` | %.0f s | %s | %s | %s |\n' "$label" "$(echo "$end - $start" | bc)" "$load" "$(date -u +%F)" \
    "$( ((status == 0)) && echo ok || echo "exit $status: $(grep -E '[0-9]+ (passed|failed)' "$runs/log" | tail -1)")" \
    >>"$runs/rows"
}
for what in "${which[@]}"; do
  case $what in
    example) row "python examples/train.py" python examples/train.py trainer.enable_progress_bar=false \
      "hydra.run.dir=$runs/example" ;;
    tests) row "python -m pytest" python -m pytest -q -p no:cacheprovider ;;
    *) echo "unknown command set: $what (example, tests)" >&2; exit 2 ;;
  esac
done
{
  echo "# Durations of the README's commands"
  echo
  echo "Written by \`scripts/time_commands.sh ${which[*]}\` (rows of other commands kept from earlier runs) on:"
  echo "$machine."
  echo "Wall-clock time of one run each; load: the 1-minute load average when it started (the cores are shared)."
  echo
  echo "| command | wall time | load | date | outcome |"
  echo "|---|---|---|---|---|"
  cat "$runs/rows"
} >"$out.new"
if [[ -f $out ]]; then  # keep rows of commands not re-timed this time
  grep '^| `' "$out" | while IFS= read -r line; do
    label=$(echo "$line" | cut -d'`' -f2)
    grep -qF "| \`$label\`" "$out.new" || echo "$line" >>"$out.new"
  done
fi
mv "$out.new" "$out"
cat "$out"
