#!/usr/bin/env bash
# GPU validation of lightning_gradstab in one go (about 5 minutes on one modern GPU, 8.5 at most: each step
# has a time limit).
#
# Runs, on the CUDA devices present:
#   1. the GPU-only tests (python -m pytest -m gpu), with each test's outcome in junit XML;
#   2. benchmarks/overhead.py and benchmarks/guard_overhead.py --device cuda on the deep MLP and GPT-small
#      (~110M parameters, so a pass over the gradients is bandwidth-bound), with peak accelerator memory;
#   3. fp16-mixed and bf16-mixed trainings with GradNormMonitor + ExplosionGuard, an injected gradient
#      spike and a NaN loss (scripts/gpu_precision_check.py);
#   4. the sharded-gradient tests: FSDP2 (DTensor) on 2 CPU processes and Lightning's FSDPStrategy on the GPU.
#      On a single GPU FSDP runs with world size 1: its code path (flat-parameter shards, the all-reduce of
#      the squared norms) is exercised, but a shard is the whole parameter.
# Every result goes under one folder: $OUT when set, else gpu_results/ (or --out DIR).
# Without CUDA it stops within seconds with a message and exit code 2.
#
# Usage: scripts/gpu_check.sh [--out DIR] [--quick] [--dry-run] [--help]
#   --quick: one repetition of 20 steps per benchmark (about 3 minutes); --dry-run: print the commands only.
set -uo pipefail

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
}

out_dir="${OUT:-gpu_results}"
quick=0
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        "--out") [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 64; }; out_dir="$2"; shift 2 ;;
        "--quick") quick=1; shift ;;
        "--dry-run") dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (try --help)" >&2; exit 64 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 1
python="${PYTHON:-python}"

# one interpreter start (importing torch takes seconds): "<torch version> <cuda available>"
if [ "$dry_run" = 1 ]; then
    probe="dry-run True"
elif ! probe="$("$python" -c "import torch; print(torch.__version__, torch.cuda.is_available())" 2>/dev/null)"; then
    echo "gpu_check.sh: '$python' cannot import torch: activate the project's environment (or set PYTHON)." >&2
    exit 2
fi
if [ "${probe##* }" != "True" ]; then
    echo "gpu_check.sh: no CUDA device: torch.cuda.is_available() is False (torch ${probe% *})." >&2
    echo "gpu_check.sh: run this on a machine with an NVIDIA GPU and a CUDA build of torch; nothing was run." >&2
    exit 2
fi

mkdir -p "$out_dir" || exit 1
out_dir="$(cd "$out_dir" && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
repetitions=3 steps=40
[ "$quick" = 1 ] && repetitions=1 steps=20
status_file="$out_dir/status.tsv"
printf 'step\texit\tseconds\tlog\n' > "$status_file"

# run NAME SECONDS LOG COMMAND...: run with a time limit, log stdout+stderr, record the exit code; go on
run() {
    local name="$1" limit="$2" log="$out_dir/$3"
    shift 3
    local start=$SECONDS
    echo "== $name (limit ${limit}s) -> $log"
    if [ "$dry_run" = 1 ]; then
        echo "   $*"
        return 0
    fi
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    local code=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - start))" "$(basename "$log")" >> "$status_file"
    [ "$code" = 0 ] || echo "   FAILED (exit $code): see $log"
    return 0
}

[ "$dry_run" = 1 ] || {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    "$python" -c "import torch, lightning; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, lightning {lightning.__version__}'); print('devices:', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
} > "$out_dir/environment.txt" 2>&1
[ "$dry_run" = 1 ] || cat "$out_dir/environment.txt"

run "gpu tests" 100 gpu-tests.log \
    "$python" -m pytest -m gpu -rA -q -p no:cacheprovider --junitxml="$out_dir/gpu-tests.xml"
run "overhead (cuda)" 130 overhead-cuda.md \
    "$python" benchmarks/overhead.py --device cuda --workloads mlp gpt-small --repetitions "$repetitions" --steps "$steps"
run "guard overhead (cuda)" 110 guard-overhead-cuda.md \
    "$python" benchmarks/guard_overhead.py --device cuda --workloads mlp gpt-small --repetitions "$repetitions" \
    --steps "$steps"
run "fp16/bf16 guard runs" 60 precision.log \
    "$python" scripts/gpu_precision_check.py --device cuda --out "$out_dir"
run "sharded (FSDP) tests" 100 fsdp-tests.log \
    "$python" -m pytest tests/test_sharded_stats.py -rA -q -p no:cacheprovider --junitxml="$out_dir/fsdp-tests.xml"

echo
column -t -s $'\t' "$status_file" 2>/dev/null || cat "$status_file"
echo "results: $out_dir"
awk -F'\t' 'NR > 1 && $2 != 0 { failed = 1 } END { exit failed }' "$status_file"
