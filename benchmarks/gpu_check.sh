#!/usr/bin/env bash
# The prepared GPU check (issue 31, item 6): one H100 or H200, about 8 minutes, every step under its own timeout.
#   1. the devices jax sees;
#   2. the GPU-only tests: the cuDNN attention kernel against the dense reference (tests/model/test_kernels.py);
#   3. tokens/s and MFU of the NTP and RLP steps at Qwen3-0.6B shapes in bfloat16, the cuDNN kernel
#      (model.attention=kernel) beside the pure-JAX blockwise attention in the same run (benchmarks/train_bench.py);
#   4. decode tokens/s of `generate` (benchmarks/decode_bench.py, small preset, batch 64).
# The device machine has jax, flax, optax, orbax, torch and transformers but no network, and lacks some of our
# dependencies. Here first (with the device's Python version; 3.11 unless told):
#   bash benchmarks/gpu_check.sh --download [PYTHON_VERSION]      # wheels into .wheels/
# then, on the device: bash benchmarks/gpu_check.sh               (carry .wheels; writes $OUT/gpu_check.md, $OUT/log)
set -euo pipefail
NEEDED=(grain gguf tensorboardX chex import-linter)
if [[ "${1:-}" == "--download" ]]; then
    pip download -q --only-binary=:all: --python-version "${2:-3.11}" -d .wheels "${NEEDED[@]}"
    ls .wheels
    exit 0
fi
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/log"
section() { echo "== $1 ($(date +%T))" | tee -a "$LOG"; }

section "install"
if [[ -d .wheels ]]; then
    pip install -q --no-index --find-links .wheels "${NEEDED[@]}" 2>&1 | tail -2 | tee -a "$LOG"
fi
pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 | tee -a "$LOG"
python -c "import sys, jax; print(sys.version.split()[0], jax.__version__, jax.devices())" | tee -a "$LOG"

section "GPU-only tests"   # the suite pins the CPU unless JAX_PLATFORMS says otherwise
JAX_PLATFORMS=cuda,cpu timeout 150 python -m pytest -q tests/model/test_kernels.py 2>&1 | tail -5 | tee -a "$LOG" || true

section "NTP and RLP steps, Qwen3-0.6B shapes, bfloat16"
timeout 270 python benchmarks/train_bench.py --preset qwen3-0.6b --batch 8 --seq-len 1024 --group-size 8 \
    --positions 1 --thought-len 128 --dtype bfloat16 --remat full --steps 3 --attention blockwise,kernel \
    --output "$OUT/gpu_check.md" 2>&1 | tail -20 | tee -a "$LOG" || true

section "decode"
timeout 120 python benchmarks/decode_bench.py --config small --batches 64 --repeats 2 --torch-threads 16 \
    --output "$OUT/decode_gpu.md" 2>&1 | tail -12 | tee -a "$LOG" || true
[[ -f "$OUT/decode_gpu.md" ]] && cat "$OUT/decode_gpu.md" >> "$OUT/gpu_check.md"
section "done"
