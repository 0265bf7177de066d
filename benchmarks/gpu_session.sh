#!/usr/bin/env bash
# The one prepared script for a lent GPU (issue 9's CUDA figures), ordered by what matters most, each step under
# its own time limit so that what finished still comes back. On the device machine (torch with CUDA already
# there, no internet, 64 MiB carried per call):
#
#   here:  .venv/bin/python benchmarks/gpu_recipe.py --write-subset gpu_data/cifar_subset.npz   # 46 MiB, ignored
#   run:   command="bash benchmarks/gpu_session.sh"  carry=["gpu_data"]  timeout_s=540
#
# Results land in $OUT (the device tool brings them back): JSON per benchmark and a log of everything printed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
exec > >(tee "$OUT/session.log") 2>&1
step() {  # step SECONDS NAME COMMAND...: run, time, keep going on failure
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%T)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
# 1. eager step cost: plain, SGS (hook), SGS scaling="step", per-use function, official multiply, ACB branches
step 80 overhead_eager python3 benchmarks/overhead.py --device cuda --json "$OUT/overhead_cuda_eager.json"
# 1b. where the eager cost goes per conv: the hook's callback and multiplication vs one multiply after backward
step 30 hook_cost python3 benchmarks/hook_cost.py --device cuda --samples 300 --json "$OUT/hook_cost_cuda.json"
# 2. the recipe with CUDA graphs (SGS with scaling="step") on the carried subset, projected to 200 epochs of
#    50,000 images (target <= 240 s)
if [ -f gpu_data/cifar_subset.npz ]; then
    step 190 recipe_graphs python3 benchmarks/gpu_recipe.py --data-npz gpu_data/cifar_subset.npz --epochs 8 \
        --compile-mode reduce-overhead --json "$OUT/gpu_recipe_reduce_overhead.json"
else
    echo "no gpu_data/cifar_subset.npz carried: the recipe step is skipped"
fi
# 3. compiled step cost (inductor; S updates never recompile), one model a step, three compiled models each
#    (plain, scaling="graph", scaling="step") beside the eager plain / step / official
step 80 overhead_compiled_vgg python3 benchmarks/overhead.py --device cuda --compile --models vgg11_bn \
    --rounds 11 --variants sgs_step official sgs_graph_compiled sgs_step_compiled \
    --json "$OUT/overhead_cuda_compiled_vgg11_bn.json"
step 90 overhead_compiled_resnet python3 benchmarks/overhead.py --device cuda --compile --models resnet18 \
    --rounds 11 --variants sgs_step official sgs_graph_compiled sgs_step_compiled \
    --json "$OUT/overhead_cuda_compiled_resnet18.json"
# 4. one MI calibration on the GPU (synthetic images: the binning cost does not depend on them)
step 60 mi_speed python3 benchmarks/mi_speed.py --device cuda --synthetic --quick --json "$OUT/mi_speed_cuda.json"
echo "=== done $(date -u +%T)"
