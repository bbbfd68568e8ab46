#!/usr/bin/env bash
# One script for a bare GPU machine: the GPU tests, then the throughput benchmark, in at most 8 minutes.
#
#     bash bench/gpu_check.sh                        # from a plain copy of the repository, on the GPU machine
#     bash bench/gpu_check.sh --smoke --out DIR      # on a CPU: what CI runs (every path that needs no GPU)
#
# Needs only torch, torchvision, numpy, Pillow and pytest (no mlflow, nbdev, ipywidgets, tqdm, matplotlib, sklearn) and
# the Food-101 sample at ../shared/data/food-101-mini beside the repository, or wherever NUTRILEARN_MINI says.
#   1. tests/test_cuda.py (at most 210 s): decode race and its negative control, sync-free pipeline, special and damaged
#      JPEGs, the augmentation's distribution against the CPU pipeline's, training with and without --compile, ...
#   2. bench/gpu_throughput.py with what is left of the budget: ceiling, CPU and GPU pipelines (all usable cores and 2
#      workers), the pipeline alone, the real train_epoch eager and compiled, three backbones; it writes
#      OUT/<device>-<date>.json after every measurement (the test outcome included) and prints a summary table.
# Exit status: 0 if the tests passed (or were all skipped, without CUDA) and the benchmark finished; else non-zero.
# NUTRILEARN_CHECK_BUDGET_S (default 480) is the total budget in seconds; PYTHON picks the interpreter (default python3).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
SMOKE=(); OUT=bench/results
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=(--smoke) ;;
    --out) [ $# -ge 2 ] || { echo "--out needs a folder" >&2; exit 2; }; OUT=$2; shift ;;
    *) echo "unknown option '$1': use --smoke and/or --out DIR" >&2; exit 2 ;;
  esac
  shift
done
MINI=${NUTRILEARN_MINI:-$REPO/../shared/data/food-101-mini}
if [ ! -d "$MINI/food-101/images" ]; then
  echo "the Food-101 sample is missing at $MINI: put food-101-mini there or set NUTRILEARN_MINI=/path/to/food-101-mini" >&2; exit 2
fi
TOTAL=${NUTRILEARN_CHECK_BUDGET_S:-480}
PY=${PYTHON:-python3}
# the tracking/notebook stack is not needed; pytest plugins of other packages are not loaded either
export NUTRILEARN_MINI="$MINI" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
START=$SECONDS
mkdir -p "$OUT"

"$PY" -c "import torch, torchvision, numpy, PIL, pytest
print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA available: {torch.cuda.is_available()}')" || exit 2

echo "== 1/2 tests/test_cuda.py"
LOG=$(mktemp); trap 'rm -f "$LOG"' EXIT
timeout --kill-after=10 210 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$LOG"
TESTS_RC=${PIPESTATUS[0]}
# without CUDA the module is collected (its imports checked) and skipped, which pytest reports as "no tests ran" (5)
if [ ${#SMOKE[@]} -gt 0 ] && [ "$TESTS_RC" = 5 ] && grep -q '1 skipped' "$LOG"; then TESTS_RC=0; fi
SUMMARY=$(grep -E '(passed|failed|skipped|error)' "$LOG" | tail -n 1)
[ "$TESTS_RC" = 124 ] || [ "$TESTS_RC" = 137 ] && SUMMARY="stopped after 210 s (timeout); $SUMMARY"
TESTS_S=$((SECONDS - START))

echo "== 2/2 bench/gpu_throughput.py ($((TOTAL - TESTS_S)) s left)"
LEFT=$((TOTAL - TESTS_S - 20))   # 20 s for the summary and shutting the workers down
if [ "$LEFT" -lt 30 ]; then echo "no time left for the benchmark" >&2; BENCH_RC=3
else
  timeout --kill-after=10 $((LEFT + 15)) "$PY" bench/gpu_throughput.py --src "$MINI" --out "$OUT" --budget-s "$LEFT" \
    --tests "tests/test_cuda.py: exit $TESTS_RC, ${SUMMARY:-no summary} (${TESTS_S} s)" "${SMOKE[@]}"
  BENCH_RC=$?
fi

echo "== done in $((SECONDS - START)) s: tests exit $TESTS_RC (${SUMMARY:-no summary}), benchmark exit $BENCH_RC; results in $OUT"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
