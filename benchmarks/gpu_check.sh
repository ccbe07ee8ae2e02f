#!/usr/bin/env bash
# The GPU check: benchmarks/gpu_bench.py, then the test suite, on a GPU machine in under 6 minutes.
#
# Run from the repository root: `bash benchmarks/gpu_check.sh` (`--dry-run` prints the steps
# without running them). Results go to $OUT (default: ./gpu_check_out) as they are produced:
# gpu_bench.jsonl (one JSON line per measurement), gpu_bench.log, pytest.log, gpu_check.log.
#
# The GPU machines have PyTorch but not cityscapesscripts (the tests compare against it) nor its
# pyquaternion; they travel as wheels in .whl/, fetched once on a machine with network access:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl cityscapesscripts==2.3.0 pyquaternion==0.9.9
# and this script installs them into /tmp/site when .whl/ exists.
set -uo pipefail

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-$PWD/gpu_check_out}"
PYTHON="${PYTHON:-python3}"
BENCH_LIMIT_S=240   # the benchmark, compilation of both networks included
TESTS_LIMIT_S=100   # the suite takes about 30 s on 2 CPU cores
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"

# Print a step to the log; run it (limited to $1 seconds, its output in $OUT/$2.log) unless dry.
step() {
    local limit="$1" name="$2"
    shift 2
    echo "[$(date -u +%H:%M:%S)] $name (limit ${limit}s): $*" | tee -a "$LOG"
    if (( ! DRY )); then
        PYTHONUNBUFFERED=1 timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
        echo "[$(date -u +%H:%M:%S)] $name exit status ${PIPESTATUS[0]}" | tee -a "$LOG"
    fi
}

SITE=""
if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
    SITE=/tmp/site
    step 120 pip_install "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$PWD/src${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

if (( ! DRY )); then
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee -a "$LOG"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
fi

step "$BENCH_LIMIT_S" gpu_bench "$PYTHON" benchmarks/gpu_bench.py --out "$OUT/gpu_bench.jsonl"

PARALLEL=()
if (( ! DRY )) && "$PYTHON" -c "import xdist" 2>/dev/null; then
    PARALLEL=(-n 8)
fi
step "$TESTS_LIMIT_S" pytest "$PYTHON" -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" tests
exit 0
