#!/usr/bin/env bash
# Prepared device check for issue 17 (one GPU; ~6-8 min on an H100/H200 after the install):
# tokens/s and MFU of the NTP and RLP steps at Qwen3-0.6B shapes, the cuDNN kernel path
# (model.attention=kernel) side by side with the pure-JAX reference (blockwise) in the same run, plus the
# kernel-equals-reference tests on the GPU itself (bf16 cuDNN vs the float32 reference is compared in
# benchmarks, not asserted). Writes $OUT/train_gpu.md and $OUT/log.
#   device run: bash benchmarks/gpu_attention.sh
set -euo pipefail
OUT=${OUT:-/tmp/gpu_attention}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
pip install -q "jax[cuda12]" -e . 2>&1 | tail -2
python -c "import jax; print(jax.devices())" | tee "$OUT/log"
python benchmarks/train_bench.py --preset qwen3-0.6b --batch 8 --seq-len 1024 --group-size 8 --positions 1 \
    --thought-len 128 --dtype bfloat16 --remat full --steps 5 --attention blockwise,kernel \
    --output "$OUT/train_gpu.md" 2>&1 | tee -a "$OUT/log"
