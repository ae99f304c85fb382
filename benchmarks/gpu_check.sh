#!/usr/bin/env bash
# The GPU check of the IC training path: one command for one short run on one H100/H200 (the GPU machine: Python
# 3.12, torch 2.11, triton 3.6 and timm preinstalled, no package index). It installs nothing and runs from the
# source tree (PYTHONPATH). The whole run stays within BUDGET_S (default 470 s, under 8 minutes); each step gets its
# own budget, and each command within a step a limit, both cut to what is left:
#
#   step         budget  what
#   preflight      20 s  device and versions; the Triton self-check ("auto") per dtype and memory format
#   smoke          80 s  the CUDA tests without torch.compile; `icrewrite finetune` of a small model on digits for
#                        one epoch (bf16 autocast, channels-last, ICREWRITE_CUDA_IC=auto); `export` of the
#                        fine-tuned model; a one-seed, one-epoch `compare`
#   eager         130 s  benchmarks/train_overhead.py at batch 128, 224x224, bf16 autocast, channels-last for
#                        resnet50, efficientnet_b0 and vit_small_patch16_224: one process per model and IC
#                        variant (the original against "IC reference", the BatchNorm and Dropout modules, or
#                        against "IC (triton)", the Triton kernels), so that a crash is a row with its exit code
#                        and last line
#   compiled      240 s  the CUDA tests with torch.compile and CUDA graphs; resnet50's rows under torch.compile
#                        (reference, then Triton: Inductor's FX graph cache lets the second process reuse the
#                        original's graph); `finetune --compile` (ICREWRITE_CUDA_IC=triton); then the compiled
#                        rows of the other models while the budget lasts
#
# STEPS (default "smoke eager compiled") runs some of the steps, for a second, shorter run; preflight always runs.
# Results: OUT/summary.md (the table for docs/performance.md with device, versions and the commit, then one line
# per command, in the order they ran) and OUT/gpu-check-logs.tar.gz (every command's log); two files, within the
# machine's 8.
# Usage: benchmarks/gpu_check.sh [OUT, default: a new temporary folder]
#        STEPS="eager" benchmarks/gpu_check.sh OUT
#        DRY_RUN=1 benchmarks/gpu_check.sh OUT   # on CPU, tiny sizes: checks the script itself, measures nothing
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d)"
logs="$work/logs"
mkdir -p "$logs"
python="${PYTHON:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_FX_GRAPH_CACHE=1  # the original model's compiled graph is reused by the second process
summary="$out/summary.md"
: >"$summary"

models=(resnet50 efficientnet_b0 vit_small_patch16_224)
device=cuda
bench=(--batch 128 --size 224 --amp bf16 --channels-last --rounds 10 --warmup 3)
small=(resnet18 --epochs 1 --no-progress)  # on the embedded digits, 32x32
scale=1
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    models=(resnet18)
    device=cpu
    bench=(--batch 2 --size 32 --rounds 2 --warmup 1 --threads 2)
    small+=(--img-size 16 --batch-size 256)
    scale=4  # CPU is slower: every budget four times as long
fi
small+=(--device "$device")
finetune=("${small[@]}" --convert --num-classes 10)
deadline=$((SECONDS + ${BUDGET_S:-470} * scale))

cd "$root" || exit 2

# step NAME BUDGET_S: start a step if STEPS names it (else fail); it ends at its budget or the overall deadline,
# whichever comes first.
steps=" ${STEPS:-smoke eager compiled} preflight "
step_deadline=0
step() {
    [[ "$steps" == *" $1 "* ]] || return 1
    local budget=$(($2 * scale))
    step_deadline=$((SECONDS + budget))
    ((step_deadline > deadline)) && step_deadline=$deadline
    echo "== $1 (budget ${budget} s, $((deadline - SECONDS)) s left in all)"
}

# run NAME LIMIT_S COMMAND...: COMMAND with its output kept in logs/NAME.log, stopped after LIMIT_S seconds or at
# the end of the step. Writes the outcome to logs/NAME.status ("ok", "exit N: LAST LINE",
# "timed out after N s: LAST LINE" or "not run: no time left") and returns the command's exit status.
run() {
    local name="$1" limit=$(($2 * scale))
    shift 2
    local log="$logs/$name.log" left=$((step_deadline - SECONDS))
    echo "$name" >>"$logs/order"
    ((left < limit)) && limit=$left
    if ((limit < 5)); then
        echo "not run: no time left" >"$logs/$name.status"
        echo "-- $name: not run, no time left"
        return 125
    fi
    echo "-- $name (at most ${limit} s): $*"
    timeout -k 5 "$limit" "$@" >"$log" 2>&1
    local status=$?
    local last
    last="$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-300)"
    if ((status == 0)); then
        echo ok >"$logs/$name.status"
    elif ((status == 124 || status == 137)); then
        echo "timed out after ${limit} s: $last" >"$logs/$name.status"
    else
        echo "exit $status: $last" >"$logs/$name.status"
    fi
    echo "   $(cat "$logs/$name.status")"
    return "$status"
}

# row MODEL MODE VARIANT NAME: the benchmark's table row from logs/NAME.log (its one IC variant), or a row saying
# what happened to the command.
row() {
    local model="$1" mode="$2" variant="$3" name="$4" found
    found="$(grep -h "^| $model | $mode | " "$logs/$name.log" 2>/dev/null)"
    if [[ -n "$found" ]]; then
        echo "$found"
    else
        echo "| $model | $mode | IC ($variant) | $(cat "$logs/$name.status" 2>/dev/null || echo 'not run') | | | | | | |"
    fi
}

finish() {
    {
        echo
        echo "| step | outcome |"
        echo "|---|---|"
        while read -r name; do
            echo "| $name | $(cat "$logs/$name.status") |"
        done <"$logs/order"
    } >>"$summary"
    tar -czf "$out/gpu-check-logs.tar.gz" -C "$work" logs
    rm -rf "$work"
    echo
    cat "$summary"
    echo
    echo "results: $summary, $out/gpu-check-logs.tar.gz ($((SECONDS)) s)"
}
trap finish EXIT

step preflight 20
run preflight 20 "$python" - "$device" <<'PY'
import importlib.util, platform, sys
import torch
device = sys.argv[1]
needed = ("timm", "torchvision", "safetensors", "numpy", "tqdm", "pytest", "sklearn", "onnx", "onnxruntime", "icrewrite")
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing or (device == "cuda" and not torch.cuda.is_available()):
    sys.exit(f"gpu_check: CUDA available: {torch.cuda.is_available()}; missing packages: {missing or 'none'}")
import timm
from icrewrite.layers import fast
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
print(f"{name}, python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"triton {triton_version}, timm {timm.__version__}")
if device == "cuda":
    for dtype in (torch.float32, torch.bfloat16):
        for memory_format in (torch.contiguous_format, torch.channels_last):
            print(f"self-check {dtype} {memory_format}: {fast.check_triton(device, dtype, memory_format) or 'passed'}")
PY
{
    echo "## GPU check, $(date -u +%Y-%m-%d), commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    head -n 1 "$logs/preflight.log"
    grep "^self-check" "$logs/preflight.log" || true
} >>"$summary"
if [[ "$(cat "$logs/preflight.status")" != ok ]]; then
    echo "gpu_check: preflight failed; see the log" >&2
    exit 1
fi

if step smoke 80; then
    run cuda-tests 30 "$python" -m pytest -q -p no:cacheprovider -m cuda -k "not compiled" tests/test_triton_ic.py
    run finetune 30 env ICREWRITE_CUDA_IC=auto "$python" -m icrewrite.cli finetune "${finetune[@]}" \
        -o "$work/finetune"
    run export 20 "$python" -m icrewrite.cli export "$work/finetune/last.safetensors" -o "$work/model.onnx"
    run compare 30 "$python" -m icrewrite.cli compare "${small[@]}" --variants baseline,ic --seeds 1 \
        --timing-rounds 2 -o "$work/compare"
fi

# rows MODE LIMIT_S MODEL...: per model, the original against the reference modules, then against the Triton
# kernels, each pair in its own process.
rows() {
    local mode="$1" limit="$2" model
    shift 2
    local flags=()
    [[ "$mode" == compiled ]] && flags=(--compiled-only)
    for model in "$@"; do
        run "$model-$mode-reference" "$limit" "$python" benchmarks/train_overhead.py --device "$device" \
            "${bench[@]}" "${flags[@]}" --models "$model" --variants reference
        run "$model-$mode-triton" "$limit" "$python" benchmarks/train_overhead.py --device "$device" \
            "${bench[@]}" "${flags[@]}" --models "$model" --variants fast --cuda-path triton
    done
}

if step eager 130; then
    rows eager 40 "${models[@]}"
fi

if step compiled 240; then
    run cuda-tests-compiled 60 "$python" -m pytest -q -p no:cacheprovider -m cuda -k compiled tests/test_triton_ic.py
    rows compiled 110 "${models[0]}"
    run finetune-compiled 60 env ICREWRITE_CUDA_IC=triton "$python" -m icrewrite.cli finetune "${finetune[@]}" \
        --compile -o "$work/finetune-compiled"
    rows compiled 90 "${models[@]:1}"
fi

{
    echo
    grep -h " passed\| failed\| skipped\| error" "$logs/cuda-tests.log" "$logs/cuda-tests-compiled.log" 2>/dev/null \
        | sed 's/^/CUDA tests: /' || true
    echo
    echo "| model | mode | variant | original step (ms) | time ratio (wall) | time ratio (CPU) | saved-activation ratio |" \
        "peak est. ratio | measured peak ratio | wall ratio q1-q3 |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    for mode in eager compiled; do
        for model in "${models[@]}"; do
            row "$model" "$mode" reference "$model-$mode-reference"
            row "$model" "$mode" triton "$model-$mode-triton"
        done
    done
} >>"$summary"
