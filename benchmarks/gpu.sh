#!/usr/bin/env bash
# The GPU suite in one command, on a machine with CUDA:
#
#     bash benchmarks/gpu.sh                       # every step; results under $OUT or benchmarks/results/gpu
#     bash benchmarks/gpu.sh tests stage_two       # only the named steps
#
# 1. installs what the machine lacks from wheels carried with the tree in .whl/
#    (../shared/tools/device-wheels.sh fetches zarr, numcodecs and datasets);
# 2. runs the test suite with CUDA as the device of every test that trains or extracts (the
#    fused Triton kernels' checks, tests/test_kernels.py, run on the GPU in-process);
# 3. runs the full-size benchmarks (ViT-B/16 shapes, random weights) and writes their JSON.
# It goes on after a failing step and exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sidetune-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/sidetune-site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
python3 -c "import zarr, numcodecs, datasets, timm, torch; assert torch.cuda.is_available(), 'no CUDA GPU'" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
wanted=" ${*:-step_profile tests stage_two sweep_amortisation extraction} "  # in order of need: the step first
failed=()
step() {  # step NAME COMMAND...: run when wanted, log to $out/NAME.log, remember a failure
    local name=$1; shift
    [[ $wanted == *" $name "* ]] || return 0
    echo "=== $name: $*"
    local started=$SECONDS
    "$@" 2>&1 | tee "$out/$name.log"
    local status=${PIPESTATUS[0]}
    echo "=== $name: exit $status in $((SECONDS - started)) s"
    [ "$status" -eq 0 ] || failed+=("$name")
}
step step_profile python3 benchmarks/step_profile.py --device cuda --width 768 --depth 12 --stacks 1,16,64 --out "$out/step_profile_gpu.json"
step tests python3 -m pytest -q --device cuda -p no:cacheprovider -m "not real_weights" ${SIDETUNE_GPU_TESTS:-}
step stage_two python3 benchmarks/stage_two.py --model vit_b16 --device cuda --batch-sizes 64 --configs 16,64 --images 1024 --repeats 1 --out "$out/stage_two_gpu.json"
step sweep_amortisation python3 benchmarks/sweep_amortisation.py --model vit_b16 --device cuda --images 1024 --stacks 1,4,16,64 --skip-compile --out "$out/sweep_amortisation_gpu.json"
step extraction python3 benchmarks/extraction.py --model vit_b16 --device cuda --images 1024 --batch-size 64 --out "$out/extraction_gpu.json"
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
echo "all steps passed"
