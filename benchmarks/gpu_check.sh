#!/usr/bin/env bash
# The GPU check of the IC training path, in one command (at most about 8 minutes on one H100/H200):
#   1. the CUDA tests (pytest -m cuda: the Triton kernels against the reference BatchNorm + Dropout);
#   2. benchmarks/train_overhead.py for resnet50, efficientnet_b0 and vit_small_patch16_224 at batch 128,
#      224x224, bf16 autocast, channels-last: time and peak-memory ratios against the original of "IC"
#      (the Triton kernels; compiled, a custom operator) and "IC reference" (the BatchNorm and Dropout
#      modules, which torch.compile fuses itself), eager for all three models first, then compiled;
#   3. the table of those rows with the device and versions, for docs/performance.md.
# Each step gets at most what is left of the budget (BUDGET_S, default 470 s); a model whose run was cut
# short before its rows leaves a row saying so. Runs from the source tree (PYTHONPATH): it installs nothing, and stops at once if
# CUDA or one of the packages it needs is missing.
# Usage: benchmarks/gpu_check.sh [output folder, default: a new temporary folder]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
models=(resnet50 efficientnet_b0 vit_small_patch16_224)
deadline=$((SECONDS + ${BUDGET_S:-470}))

cd "$root"
"$python" - <<'PY'
import importlib.util, sys
import torch
needed = ("timm", "torchvision", "safetensors", "numpy", "tqdm", "triton", "pytest", "icrewrite")
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing or not torch.cuda.is_available():
    sys.exit(f"gpu_check: CUDA available: {torch.cuda.is_available()}; missing packages: {missing or 'none'}")
PY

# run LOG LIMIT_S COMMAND...: COMMAND with its output shown and kept in LOG, stopped after LIMIT_S seconds
# or at the deadline, whichever comes first; a row in LOG.failed says when it did not finish.
run() {
    local log="$1" limit="$2"
    shift 2
    local left=$((deadline - SECONDS))
    ((left < limit)) && limit=$left
    if ((limit <= 10)) || ! timeout "$limit" "$@" 2>&1 | tee "$log"; then
        echo "| $(basename "$log" .log) | did not finish within its ${limit} s (see $log) |" | tee "$log.failed"
    fi
}

echo "== CUDA tests"
run "$out/cuda-tests.log" 150 "$python" -m pytest -q -p no:cacheprovider -m cuda tests/test_triton_ic.py

common=(benchmarks/train_overhead.py --device cuda --batch 128 --size 224 --amp bf16 --channels-last
        --rounds 10 --warmup 3)
echo "== train step, batch 128 at 224x224, bf16 autocast, channels-last: eager"
for model in "${models[@]}"; do
    run "$out/$model-eager.log" 60 "$python" "${common[@]}" --models "$model"
done
echo "== compiled"
for model in "${models[@]}"; do
    run "$out/$model-compiled.log" 150 "$python" "${common[@]}" --models "$model" --compiled-only
done

echo
echo "== for docs/performance.md: $(date -u +%Y-%m-%d), commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
"$python" -c 'import torch, triton, timm; print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}, timm {timm.__version__}")'
grep -h " passed\| failed\| skipped" "$out/cuda-tests.log" | tail -n 1 || true
echo
echo "| model | mode | variant | original step (ms) | time ratio (wall) | time ratio (CPU) | saved-activation ratio | peak est. ratio | measured peak ratio | wall ratio q1-q3 |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for mode in eager compiled; do
    for model in "${models[@]}"; do
        grep -h "^| $model |" "$out/$model-$mode.log" 2>/dev/null || cat "$out/$model-$mode.log.failed" 2>/dev/null \
            || true
    done
done
