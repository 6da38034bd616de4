"""Smoke test of the decode profiler: it parses the JAX profiler's trace, whose format can change
between JAX versions, so it runs for real on a tiny config in a subprocess (it sets XLA_FLAGS before
JAX starts)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_decode_profile_attributes_the_step_to_its_parts():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "decode_profile.py"), "--config", "tiny",
         "--batch", "2", "--prompt-len", "8", "--new-tokens", "4", "--top", "3"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = dict(re.findall(r"^\| (\w+) \| ([0-9.]+) \|", out.stdout, re.M))
    assert set(rows) == {"qkv_proj", "kv_write", "cache_read", "attention", "mlp", "lm_head", "sample", "other"}
    # every named part of the step ran inside the decode loop and was timed
    for part in ("qkv_proj", "cache_read", "mlp", "lm_head", "sample"):
        assert float(rows[part]) > 0, (part, out.stdout)
    assert re.search(r"profiled thunks [0-9.]+ ms per token", out.stdout)
    assert re.search(r"\| mlp \| [0-9.]+ \| \d+% \| [0-9.]+ GFLOP/s \|", out.stdout)
