"""Smoke tests of the decode benchmark and profiler, run for real on a tiny config in a subprocess (the
profiler sets XLA_FLAGS before JAX starts, and parses the JAX profiler's trace, whose format can change
between JAX versions)."""

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


def test_decode_bench_quick_run_reports_parity_and_interleaved_ratios():
    """The decode benchmark's smoke run: greedy decoding matches transformers token for token, and the
    table carries both sides' rates and the per-round ratios of the interleaved rounds."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "decode_bench.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "token match rate 1.000 (32/32), identical sequences 2/2" in out.stdout, out.stdout
    row = re.search(r"^\| tiny \| 4 \| ([0-9,]+) \([0-9,]+\) \| ([0-9,]+) \([0-9,]+\) \| ([0-9,]+) \([0-9,]+\) "
                    r"\| ([0-9.]+)x \| ([0-9.]+)x \(([0-9.]+)-([0-9.]+)\) \|", out.stdout, re.M)
    assert row, out.stdout
    ours, hf2, hf1, best, med, lo, hi = (float(g.replace(",", "")) for g in row.groups())
    assert abs(best - ours / max(hf2, hf1)) < 0.02 * best       # fastest over fastest
    assert lo <= med <= hi
    assert len(re.findall(r"round \d/2: ours", out.stderr)) == 2


def test_the_gpu_check_script_parses_and_its_flags_exist():
    """`benchmarks/gpu_check.sh` runs only where a GPU is lent: here, it parses as bash, the files it runs exist,
    and every flag it passes to a benchmark is one that benchmark's parser accepts (`--help`)."""
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    text = open(script).read().replace("\\\n", " ")
    calls = re.findall(r"python (benchmarks/\w+\.py)([^|\n]*)", text)
    assert {c[0] for c in calls} == {"benchmarks/train_bench.py", "benchmarks/decode_bench.py"}
    for path, args in calls:
        helptext = subprocess.run([sys.executable, os.path.join(ROOT, path), "--help"], capture_output=True,
                                  text=True, timeout=300, cwd=ROOT).stdout
        for flag in re.findall(r"(--[\w-]+)", args):
            assert flag in helptext, (path, flag)
    for test in re.findall(r"(tests/[\w/]+\.py)", text):
        assert os.path.exists(os.path.join(ROOT, test)), test
