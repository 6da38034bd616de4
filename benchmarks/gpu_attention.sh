#!/usr/bin/env bash
# Prepared device check for issue 17 (one GPU; ~6-8 min on an H100/H200): tokens/s and MFU of the NTP and
# RLP steps at Qwen3-0.6B shapes, the cuDNN kernel path (model.attention=kernel) beside the pure-JAX
# reference (blockwise) in the same run, after the kernel tests run on the GPU. The device machine has no
# network: download the CUDA jax wheels here first and carry them:
#   pip download "jax[cuda12]" -d .wheels      (then: device run with carry [".wheels"])
#   bash benchmarks/gpu_attention.sh           (writes $OUT/train_gpu.md and $OUT/log)
set -euo pipefail
OUT=${OUT:-/tmp/gpu_attention}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
pip install -q --no-index --find-links .wheels "jax[cuda12]" 2>&1 | tail -2
pip install -q --no-deps -e . 2>&1 | tail -2
python -c "import jax; print(jax.devices())" | tee "$OUT/log"
JAX_PLATFORMS=cuda,cpu python -m pytest -q tests/model/test_kernels.py 2>&1 | tee -a "$OUT/log"   # the suite defaults to cpu
python benchmarks/train_bench.py --preset qwen3-0.6b --batch 8 --seq-len 1024 --group-size 8 --positions 1 \
    --thought-len 128 --dtype bfloat16 --remat full --steps 5 --attention blockwise,kernel \
    --output "$OUT/train_gpu.md" 2>&1 | tee -a "$OUT/log"
