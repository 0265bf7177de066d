#!/usr/bin/env bash
# The one prepared script for a lent GPU (issue 21): is the captured step right on this device, what does it cost,
# then as many seeds of the study as the time allows. Each step runs under its own time limit and writes its JSON
# as results arrive, so what finished comes back even if the call is cut. On the device machine (torch with CUDA
# already there, no internet, 64 MiB carried per call):
#
#   here:  .venv/bin/python benchmarks/gpu_data.py            # gpu_data/part1..3, ~44 MiB each (ignored by git)
#   run:   command="bash benchmarks/gpu_session.sh 330"  carry=["gpu_data/part1"]  timeout_s=360
#
# part1 holds 10,000 training images and the test set: a complete, smaller study. For the full 50,000 images carry
# part2 and part3 first in quick successive calls to the warm machine (command="ls gpu_data"): ignored folders that
# earlier calls brought stay there while it is warm, and the study uses every sprite under gpu_data/.
#
# The study's results file starts from benchmarks/results/study_gpu.jsonl (committed; runs already in it are
# skipped) and comes back as $OUT/study_gpu.jsonl: copy it over the committed one, so slots add up.
# Argument: the seconds this call may take in all (default 540; give the device tool's timeout_s a little more).
# The check, the timing and the eager overhead have fixed limits, the study gets what is left but 60 s (its last INT8 score, the
# report), and the compiled timing runs only if 170 s remain. SMOKE=1 runs every step at smoke size (CPU; the
# test suite does).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
TOTAL=${1:-540}
SMOKE_FLAG=""
[ "${SMOKE:-0}" != "0" ] && SMOKE_FLAG="--smoke"
PY=${PYTHON:-python3}
EPOCHS=200
[ -n "$SMOKE_FLAG" ] && EPOCHS=2
mkdir -p "$OUT"
export PYTHONPATH=$PWD
exec > >(tee "$OUT/session.log") 2>&1
left() { echo $((TOTAL - SECONDS)); }
step() {  # step SECONDS NAME COMMAND...: run, time, keep going on failure
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit}s, $(left) s left of $TOTAL) $(date -u +%T)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    return $rc
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
$PY -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
ls -R gpu_data 2>/dev/null | head -20
# 1. one replayed step applies the S and lr written in place (see fast_step.py); if not, the study runs eagerly
CAPTURE=""
if ! step 90 check $PY benchmarks/fast_step.py --check $SMOKE_FLAG --json "$OUT/fast_check.json"; then
    echo "!!! the captured step did not apply S and lr as the eager one does (or the check did not finish): the study runs eagerly"
    CAPTURE="--no-capture"
fi
# 2. the default scaling's eager cost on this GPU (its fused multiply: an index gather of S, one foreach multiply)
if [ -z "$SMOKE_FLAG" ]; then
    step 40 overhead $PY benchmarks/overhead.py --device cuda --rounds 9 \
        --variants sgs sgs_hook official multiply_floor plain_again --json "$OUT/overhead_cuda.json" || true
fi
# 3. the captured step's cost per arm, epochs interleaved, both models (synthetic images of CIFAR's shape)
TIMING_LIMIT=90
[ -n "$SMOKE_FLAG" ] && TIMING_LIMIT=180  # (a CPU at smoke size is slower than a GPU at full size)
step $TIMING_LIMIT timing $PY benchmarks/fast_step.py --models vgg11_bn resnet18 --arms baseline sgs acb_fixed \
    --rounds 4 $CAPTURE $SMOKE_FLAG --json "$OUT/fast_step.json" || true
# 4. the study: interleaved by seed, one JSON line per finished run (and one per INT8 score)
cp benchmarks/results/study_gpu.jsonl "$OUT/study_gpu.jsonl" 2>/dev/null || touch "$OUT/study_gpu.jsonl"
if [ -d gpu_data ] || [ -n "$SMOKE_FLAG" ]; then
    DATA="--data gpu_data"
    [ -n "$SMOKE_FLAG" ] && DATA="$SMOKE_FLAG"
    BUDGET=$(( $(left) - 60 ))
    if [ "$BUDGET" -gt 0 ]; then
        step $((BUDGET + 50)) study $PY benchmarks/study.py $DATA --arms baseline sgs acb_fixed \
            --seeds 0 1 2 3 4 5 6 7 --epochs $EPOCHS --model vgg11_bn --budget-s "$BUDGET" $CAPTURE \
            --out "$OUT/study_gpu.jsonl" || true
    fi
    timeout 30 $PY benchmarks/study.py --report "$OUT/study_gpu.jsonl" --plot "$OUT/study_gpu.png" || true
else
    echo "no gpu_data/ carried: the study is skipped (see the header of this script)"
fi
# 5. is torch.compile (fused kernels) inside the captured step worth its compile time? (only if time is left)
if [ -z "$SMOKE_FLAG" ] && [ "$(left)" -gt 170 ]; then
    step $(( $(left) - 20 )) timing_compiled $PY benchmarks/fast_step.py --models vgg11_bn --arms baseline sgs \
        --rounds 4 --compile $CAPTURE --json "$OUT/fast_step_compiled.json" || true
fi
echo "=== done $(date -u +%T), $SECONDS s"
