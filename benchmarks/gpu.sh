#!/usr/bin/env bash
# The paper-size benchmarks on one CUDA GPU, in about 8 minutes including start-up: SD 1.5 / CLIP
# ViT-L/14 / BLIP-2 OPT-6.7b / Mask2Former Swin-L architectures with random weights (nothing is
# downloaded), 512 px, 50 steps, bf16, the paper's batch per GPU (16). Writes
# benchmarks/results/<gpu-name>-<date>.json and prints the README table rows.
#
#   benchmarks/gpu.sh             # on a machine with one CUDA GPU
#   benchmarks/gpu.sh --dry-run   # every script's --dry-run (tiny sizes, CPU): checks that all of it runs
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
started=$SECONDS
failed=0

run() {  # run LIMIT_S SCRIPT ARGS...: a failing or overrunning script is reported, the others still run
    local limit=$1
    shift
    timeout "$limit" "$PYTHON" "$@" || {
        echo "gpu.sh: $1 failed or ran past $limit s" >&2
        failed=1
    }
}

if [[ "${1:-}" == "--dry-run" ]]; then
    out=${BENCHMARK_RESULTS:-$(mktemp -d)}/dry-run-$(date -u +%F).json
    rm -f "$out"
    run 600 benchmarks/inference.py --dry-run --json "$out"
    run 600 benchmarks/train_step.py --dry-run --json "$out"
    run 600 benchmarks/dataset_chain.py --dry-run --json "$out"
else
    gpu=$("$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "gpu.sh needs a CUDA GPU (or --dry-run)"
print(torch.cuda.get_device_name().lower().replace(" ", "-"))') || exit 1
    out=${BENCHMARK_RESULTS:-benchmarks/results}/$gpu-$(date -u +%F).json
    mkdir -p "$(dirname "$out")"
    rm -f "$out"
    paper=(--size paper --device cuda)
    # inference ratio + memory and speed options; compile runs last, alone: it is the slowest to start
    run 240 benchmarks/inference.py "${paper[@]}" --dtype bfloat16 --resolution 512 --steps 50 --repeats 3 \
        --variants channels-last,float16,offload --dreambooth derive --json "$out"
    run 90 benchmarks/train_step.py "${paper[@]}" --resolution 512 --batch-size 16 --mixed-precision bf16 \
        --repeats 5 --json "$out"
    run 120 benchmarks/dataset_chain.py "${paper[@]}" --dtype bfloat16 --batch-sizes 8,32 --repeats 2 \
        --loader-resolution 512 --loader-batch-size 16 --loader-workers 8 --json "$out"
    left=$((470 - (SECONDS - started)))
    if ((left > 60)); then
        run "$left" benchmarks/inference.py "${paper[@]}" --dtype bfloat16 --resolution 512 --steps 50 \
            --repeats 3 --variants compile --dreambooth off --json "$out"
    else
        echo "gpu.sh: no time left for the torch.compile variant" >&2
    fi
fi
echo "results: $out ($((SECONDS - started)) s)"
[[ -f "$out" ]] && "$PYTHON" benchmarks/rows.py "$out"
exit $failed
