#!/usr/bin/env bash
# The GPU check of the analysis-pass overhead, in one script (about 2-3 minutes; no network).
#
#   bash bench/gpu_check.sh            # from the repository root of a copied checkout
#
# 1. environment: card, driver, python, torch, transformers (stops with a message if missing);
# 2. a tiny-config dry run of the same code path on the GPU (catches API drift in seconds);
# 3. the benchmark: Llama-2-7B-shaped random-init model in bf16, 8 x 2048 random tokens,
#    plain decoder forward vs the analysis pass (fast bf16 path; with the 2048-row reservoir the
#    pipeline uses; the old fp32 path for reference),
#    precision of the fast path against fp64 statistics, a per-layer cost breakdown, and a check
#    that PairStats.update never synchronises with the host.
# Everything goes to stdout; with $OUT set, the JSON results land in $OUT/overhead_gpu.json.
# GPU_CHECK_DRY=1 runs the script's logic on the CPU (tiny config only) to test it without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$(date +%s)

echo "== environment ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi not available"
echo "cpus: $(nproc)  load: $(cut -d' ' -f1-3 /proc/loadavg)"
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "ERROR: torch is not importable with $PY; set PYTHON=/path/to/python and rerun"
    exit 2
fi
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| available', torch.cuda.is_available())"
if ! "$PY" -c "import transformers; print('transformers', transformers.__version__)"; then
    echo "ERROR: transformers is missing for $PY: the benchmark builds its model with it."
    echo "       Install it (pip install transformers) or point PYTHON at an env that has it."
    exit 3
fi
DEVICE=cuda
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
    DEVICE=cpu
    echo "GPU_CHECK_DRY=1: CPU, tiny config only"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "ERROR: torch sees no CUDA device"
    exit 4
fi

JSON_ARGS=()
TINY_ARGS=()
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    JSON_ARGS=(--json "$OUT/overhead_gpu.json")
    TINY_ARGS=(--json "$OUT/overhead_gpu_tiny.json")
fi

echo
echo "== dry run: tiny config, same code path, on $DEVICE"
if ! timeout 120 "$PY" bench/overhead.py --device "$DEVICE" --tiny --repeats 2 --reservoir 64 ${TINY_ARGS[@]+"${TINY_ARGS[@]}"}; then
    echo "ERROR: the tiny dry run failed (see above); skipping the 7B-shaped run"
    exit 5
fi

[ "$DEVICE" = cpu ] && { echo "== dry run done in $(( $(date +%s) - START )) s"; exit 0; }

echo
echo "== benchmark: Llama-2-7B-shaped bf16, 8 x 2048 tokens"
timeout 240 "$PY" bench/overhead.py --device cuda --repeats 5 --reservoir 2048 ${JSON_ARGS[@]+"${JSON_ARGS[@]}"}
RC=$?
[ "$RC" -eq 124 ] && echo "ERROR: the benchmark ran past its 240 s limit"
echo
echo "== done in $(( $(date +%s) - START )) s, exit $RC"
exit "$RC"
