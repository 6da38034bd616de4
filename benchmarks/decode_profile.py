"""Where a decode step's time goes: one `generation.generate` call under the JAX profiler, its XLA
thunks grouped by the named scopes of `transformer.decode_step` and `generation._pick`.

Usage (from the repository root; no checkpoint or torch needed, random params of a preset):

    python benchmarks/decode_profile.py                     # small, batch 16, prompt 128, 32 new tokens
    python benchmarks/decode_profile.py --batch 64 --top 20

Prints, per generated token, the summed thunk time of each part:
  qkv_proj (q/k/v matmuls, qk-norm, rope), kv_write (the cache slot writes), cache_read (scores,
  softmax and weighted values over the cache), attention (the rest of the block's attention half:
  pre-norm and o_proj), mlp, lm_head (final norm and logits), sample (bans, temperature, top-k/p and
  the draw), other (loop bookkeeping);
and the `--top` slowest thunks with their shapes. Thunk times are taken with
`--xla_cpu_enable_xprof_traceme`, which adds a little time per thunk: the per-step total is printed
next to the wall time of the same call without the profiler (thunks may also overlap on several cores,
so the sum can exceed the wall time). Only the decode loop (thunks that ran once per token or more)
is counted; the prefill is timed separately. Each matmul part also gets its achieved GFLOP/s and
cache_read its GB/s (every slot of the cache, prompt + new tokens, is read every step), next to
what this machine does on a large matmul and on a streaming sum, measured in the same run.

This is a diagnostic, not a benchmark: decode_bench.py measures throughput against transformers.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlp_jax.generate.generation import SamplingConfig, generate  # noqa: E402
from rlp_jax.model.dense import transformer  # noqa: E402
from rlp_jax.model.dense.config import ModelConfig  # noqa: E402

PARTS = ("qkv_proj", "kv_write", "cache_read", "attention", "mlp", "lm_head", "sample")


def part_of(op_name: str) -> str:
    """The innermost of PARTS in an HLO op_name scope path, else 'other'."""
    scopes = op_name.split("/")
    for scope in reversed(scopes):
        if scope in PARTS:
            return scope
    return "other"


def thunk_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (result shape, op_name metadata) for every instruction."""
    ops = {}
    for m in re.finditer(r"\n\s*(?:ROOT )?%([\w.\-]+) = (\S+) [\w\-]+\(([^\n]*)", hlo_text):
        meta = re.search(r'op_name="([^"]*)"', m.group(3))
        ops[m.group(1)] = (m.group(2), meta.group(1) if meta else "")
    return ops


def part_work(cfg: ModelConfig, batch: int, slots: int) -> dict[str, tuple[float, str]]:
    """Per generated token: the matmul FLOPs of each part (GFLOP/s when divided by microseconds / 1e3)
    and the bytes of keys and values that cache_read streams (all `slots` of every layer, float32)."""
    d, h, hk, dh, f, y = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.intermediate_size, cfg.num_layers)
    flops = lambda n_in, n_out: 2.0 * batch * n_in * n_out
    return {"qkv_proj": (y * flops(d, (h + 2 * hk) * dh), "GFLOP/s"),
            "attention": (y * flops(h * dh, d), "GFLOP/s"),
            "mlp": (y * 3 * flops(d, f), "GFLOP/s"),
            "lm_head": (flops(d, cfg.vocab_size), "GFLOP/s"),
            "cache_read": (y * 2.0 * batch * hk * slots * dh * 4, "GB/s")}


def machine_peaks(repeats: int = 8) -> tuple[float, float]:
    """(GFLOP/s of a [2048, 2048] float32 matmul, GB/s of a 256 MiB float32 sum) under jit: the
    best this machine does for the two kinds of work a decode step has."""
    a = jnp.ones((2048, 2048), jnp.float32)
    big = jnp.ones((64 * 2**20,), jnp.float32)
    matmul = jax.jit(lambda x: jax.lax.fori_loop(0, repeats, lambda i, c: c + (x + c[0, 0] * 1e-9) @ x, x))
    read = jax.jit(lambda x: jax.lax.fori_loop(0, repeats, lambda i, c: c + jnp.sum(x * (1 + c * 1e-9)), 0.0))
    rates = []
    for fn, arg, amount in ((matmul, a, 2.0 * 2048 ** 3 * repeats), (read, big, 4.0 * big.size * repeats)):
        jax.block_until_ready(fn(arg))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg))
        rates.append(amount / (time.perf_counter() - t0) / 1e9)
    return rates[0], rates[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small", help="model preset (default: small)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top", type=int, default=12, help="list this many slowest thunks")
    args = p.parse_args(argv)

    cfg = ModelConfig.preset(args.config)
    params = transformer.init_params(cfg, jax.random.key(0))
    b, length, j = args.batch, args.prompt_len, args.new_tokens
    prompts = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (b, length)), jnp.int32)
    lens = jnp.full((b,), length, jnp.int32)
    sc = SamplingConfig(max_new_tokens=j, temperature=args.temperature)
    compiled = jax.jit(lambda pr, x, n, k: generate(pr, cfg, x, n, k, sc)).lower(
        params, prompts, lens, jax.random.key(1)).compile()
    prefill = jax.jit(lambda pr, x, n: transformer.prefill(pr, cfg, x, n, j)).lower(params, prompts, lens).compile()
    run = lambda: jax.block_until_ready(compiled(params, prompts, lens, jax.random.key(1)))

    def best_wall(fn, repeats=3):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    wall = best_wall(run)
    wall_prefill = best_wall(lambda: jax.block_until_ready(prefill(params, prompts, lens)))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            run()
        trace_file = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))[0]
        with gzip.open(trace_file) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]

    ops = thunk_ops(compiled.as_text())
    total_us, count = collections.defaultdict(float), collections.Counter()
    for e in events:
        if e["name"] in ops:
            total_us[e["name"]] += e["dur"]
            count[e["name"]] += 1
    per_token = {name: us / j for name, us in total_us.items() if count[name] >= j}   # the decode loop
    by_part = collections.defaultdict(float)
    for name, us in per_token.items():
        by_part[part_of(ops[name][1])] += us
    loop_us = sum(by_part.values())

    print(f"{args.config}: batch {b}, prompt {length}, {j} new tokens, temperature {args.temperature}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    print(f"wall without profiler: generate {wall * 1e3:.1f} ms, prefill {wall_prefill * 1e3:.1f} ms, "
          f"so {(wall - wall_prefill) / j * 1e3:.2f} ms per token for the loop; "
          f"profiled thunks {loop_us / 1e3:.2f} ms per token\n")
    work = part_work(cfg, b, length + j)
    matmul_peak, read_peak = machine_peaks()
    print(f"machine, as XLA runs it here: {matmul_peak:.0f} GFLOP/s on a [2048, 2048] matmul, "
          f"{read_peak:.1f} GB/s summing a 256 MiB array\n")
    print("| part | ms per token | share | achieved |\n|---|---|---|---|")
    for part in PARTS + ("other",):
        rate = ""
        if part in work:
            amount, unit = work[part]
            rate = f"{amount / max(by_part[part], 1e-9) / 1e3:.1f} {unit}"
        print(f"| {part} | {by_part[part] / 1e3:.3f} | {100 * by_part[part] / max(loop_us, 1e-9):.0f}% | {rate} |")
    print(f"\nslowest {args.top} thunks (ms per token, thunk, result shape, part):")
    for name, us in sorted(per_token.items(), key=lambda kv: -kv[1])[:args.top]:
        shape, op_name = ops[name]
        print(f"  {us / 1e3:7.3f}  {name:34s} {shape:28s} {part_of(op_name)}")


if __name__ == "__main__":
    main()
