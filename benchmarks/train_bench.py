"""Benchmark: tokens/s and model FLOP utilisation (MFU) of the jitted RLP step and the next-token step.

Usage (from the repository root; defaults are CPU-sized):

    python benchmarks/train_bench.py                                   # small preset, ~1-2 min on CPU
    python benchmarks/train_bench.py --preset qwen3-0.6b --batch 8 --seq-len 1024 --group-size 8 \\
        --positions 1 --thought-len 128 --dtype bfloat16 --remat full --steps 5    # one 80 GB GPU
    python benchmarks/train_bench.py --checkpoint smollm2 --batch 1 --seq-len 2048 --group-size 8 \\
        --thought-len 128 --attention dense,blockwise    # a real checkpoint, both attentions side by side

What it does, on every visible device (mesh: all on fsdp unless --mesh):
  1. Measures the matmul peak of the devices in the compute dtype: a jitted loop of `--matmul-iters`
     [n, n] x [n, n] matmuls per device (2 n^3 FLOPs each), best of `--matmul-repeats` runs.
  2. Builds the model (the preset with random init, or `--checkpoint`'s architecture and weights: an HF
     folder, a .gguf file or a model name; float32 params, `--dtype` compute) and the train state exactly
     as `rlp_jax.train` does (same optimizer, shardings and jitted steps), on random documents of
     `--seq-len` tokens (one document per row; think markers are ids 1 and 2).
  3. For each `--attention` (dense, blockwise, auto: `ModelConfig.attention`), compiles the RLP step and
     the NTP step (`.lower().compile()`, timed apart), runs one warm-up step, then times `--steps` steps
     under `jax.block_until_ready`; reports the median, and the time and XLA memory of each attention
     relative to the first one listed (the same run, so the ratio is not the machine's noise).

Model FLOPs come from `rlp_jax.plan` (`rlp_step_flops`, `ntp_step_flops`: causal attention, thoughts of
the full T slots, positions at their mean), so the numbers agree with the planner. MFU = (model
FLOPs / step time) / (devices x measured matmul peak); also shown against the spec-sheet bf16 peak
when the device kind is in `plan.DEVICE_KINDS`. Tokens/s counts input document tokens (B x L) as
`rlp_jax.train` does; "effective" uses the paper's budget (plan.effective_tokens). The memory columns
compare XLA's compiled temporaries + arguments per device with the planner's per-device total.
A random-init model rarely samples `</think>`, so thoughts run the full T slots, as the FLOPs assume
(the mean sampled length is reported).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from rlp_jax import plan, sharding  # noqa: E402
from rlp_jax.data.config import DataConfig, SourceConfig  # noqa: E402
from rlp_jax.model.config import REMATS  # noqa: E402
from rlp_jax.rlp.config import RLPConfig, RolloutConfig  # noqa: E402
from rlp_jax.rlp.objective import Objective  # noqa: E402
from rlp_jax.rlp.think_ids import ThinkIds  # noqa: E402
from rlp_jax.runs.config import ModelSection, OptimConfig, RunConfig, TrainSection  # noqa: E402
from rlp_jax.runs.loading import load_pretrained, model_config, resolve_model_name  # noqa: E402
from rlp_jax.train import train_step  # noqa: E402
from rlp_jax.train.optim import make_optimizer  # noqa: E402

THINK_START, THINK_END = 1, 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def matmul_peak(devices, dtype, n: int, iters: int, repeats: int) -> float:
    """Best FLOP/s per device of a jitted loop of `iters` n x n x n matmuls run on every device at once."""
    mesh = jax.make_mesh((len(devices),), ("d",), devices=devices)
    sh = NamedSharding(mesh, P("d"))
    ka, kb = jax.random.split(jax.random.key(0))
    x = jax.device_put(jax.random.normal(ka, (len(devices), n, n), jnp.float32).astype(dtype), sh)
    w = jax.device_put((jax.random.normal(kb, (len(devices), n, n), jnp.float32) / math.sqrt(n)).astype(dtype), sh)

    @jax.jit
    def loop(x, w):
        return jax.lax.fori_loop(0, iters, lambda i, y: jnp.einsum("bij,bjk->bik", y, w), x)

    jax.block_until_ready(loop(x, w))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(x, w))
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * iters / best


def run_config(args, objective: str, attention: str = "auto") -> RunConfig:
    """The RunConfig these flags describe (data paths are unused: batches are generated)."""
    rollout = RolloutConfig(group_size=args.group_size, positions_per_doc=args.positions,
                            thought_len=args.thought_len, temperature=1.0, min_context=args.min_context)
    return RunConfig(
        model=ModelSection(preset=args.preset, init_from=args.checkpoint, param_dtype="float32",
                           compute_dtype=args.dtype, remat=args.remat, attention=attention,
                           attention_block=args.attention_block),
        data=DataConfig(sources=(SourceConfig(path="unused"),), seq_len=args.seq_len, batch_size=args.batch),
        rlp=RLPConfig(rollout=rollout), optim=OptimConfig(lr=1e-5),
        train=TrainSection(objective=objective, steps=args.steps + 1))


def random_batch(rng, mesh, batch: int, length: int, vocab: int) -> dict:
    tokens = jax.random.randint(rng, (batch, length), THINK_END + 1, vocab, jnp.int32)
    host = {"tokens": tokens, "segment_ids": jnp.ones((batch, length), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))}
    return jax.device_put(host, sharding.batch_sharding(mesh))


def xla_bytes(compiled) -> float | None:
    """Per-device temporaries + arguments of a compiled step (None where the backend does not say)."""
    try:
        ma = compiled.memory_analysis()
        return float(ma.temp_size_in_bytes + ma.argument_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def bench_step(objective: str, args, mesh, rng, attention: str = "auto", weights=None) -> dict:
    """Compile and time one objective's jitted step; returns timings, metrics and the plan of its config.
    weights: host params of --checkpoint (None: random init)."""
    cfg = run_config(args, objective, attention)
    mcfg = model_config(cfg.model)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    k_init, k_data, k_step = jax.random.split(rng, 3)
    layout = train_step.state_layout(mcfg, optimizer, mesh)
    st_sh = layout.shardings
    params = layout.init_params(k_init) if weights is None else jax.device_put(weights, layout.param_shardings)
    state = layout.init(params)
    batch = random_batch(k_data, mesh, args.batch, args.seq_len, mcfg.vocab_size)
    if objective == "rlp":
        objective = Objective(cfg.rlp, ThinkIds(start=THINK_START, end=THINK_END))
        step = train_step.make_rlp_train_step(mcfg, objective, optimizer, mesh=mesh, state_shardings=st_sh)
    else:
        step = train_step.make_ntp_train_step(mcfg, optimizer, mesh=mesh, state_shardings=st_sh)
    tag = f"{objective} {attention}"
    log(f"[{tag}] compiling ...")
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, k_step).compile()
    compile_s = time.perf_counter() - t0
    n = math.prod(mesh.shape.values())
    pl = plan.plan(cfg, plan.device_spec(f"{args.kind or 'cpu'}x{n}"), dict(mesh.shape))
    need = xla_bytes(compiled)
    if need is not None and need > args.max_mem_gb * plan.GIB:
        log(f"[{tag}] compiled in {compile_s:.1f}s; needs {need / plan.GIB:.1f} GiB > {args.max_mem_gb:.1f} GiB: skipped")
        return {"compile_s": compile_s, "step_s": None, "metrics": None, "xla_bytes": need, "plan": pl}
    log(f"[{tag}] compiled in {compile_s:.1f}s; warm-up step ...")
    state, metrics = compiled(state, batch, jax.random.fold_in(k_step, 0))
    jax.block_until_ready((state, metrics))
    times = []
    for i in range(1, args.steps + 1):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, jax.random.fold_in(k_step, i))
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        log(f"[{tag}] step {i}: {times[-1]:.3f}s")
    return {"compile_s": compile_s, "step_s": statistics.median(times), "metrics": jax.device_get(metrics),
            "xla_bytes": need, "plan": pl}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default="small", help="ModelConfig preset (default small)")
    p.add_argument("--checkpoint", default=None, help="a real model instead of the preset: HF folder, .gguf or name")
    p.add_argument("--attention", default="auto", help="comma-separated: auto, dense, blockwise, kernel (side by side)")
    p.add_argument("--attention-block", type=int, default=512, help="key block of blockwise attention")
    p.add_argument("--batch", type=int, default=4, help="B, documents per step (global)")
    p.add_argument("--seq-len", type=int, default=256, help="L, tokens per document")
    p.add_argument("--group-size", type=int, default=4, help="G, thoughts per position")
    p.add_argument("--positions", type=int, default=1, help="K, positions per document")
    p.add_argument("--thought-len", type=int, default=32, help="T_think")
    p.add_argument("--min-context", type=int, default=16, help="rollout.min_context")
    p.add_argument("--steps", type=int, default=3, help="timed steps per objective (median reported)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype (auto: float32 on CPU, bfloat16 on accelerators); params stay float32")
    p.add_argument("--remat", default="none", choices=REMATS)
    p.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1", help="mesh axis sizes over all devices")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the peak matmul (default 1024 CPU, 8192 else)")
    p.add_argument("--matmul-iters", type=int, default=10)
    p.add_argument("--matmul-repeats", type=int, default=5)
    p.add_argument("--output", default=None, help="also write the Markdown table to this file")
    p.add_argument("--max-mem-gb", type=float, default=None,
                   help="skip a step whose XLA memory (temporaries + arguments) exceeds this (default: 80%% of RAM "
                        "on CPU, no limit elsewhere)")
    args = p.parse_args(argv)

    devices = jax.devices()
    platform = devices[0].platform
    if args.max_mem_gb is None:
        args.max_mem_gb = (0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / plan.GIB
                           if platform == "cpu" else math.inf)
    if args.dtype == "auto":
        args.dtype = "float32" if platform == "cpu" else "bfloat16"
    args.kind = plan.kind_of_jax_device(devices[0].device_kind)
    spec_peak = None if args.kind is None else plan.DEVICE_KINDS[args.kind]["peak"]
    mesh_sizes = plan.parse_mesh(args.mesh, len(devices))
    mesh = sharding.make_mesh(sharding.MeshConfig(**mesh_sizes), devices)
    n_mm = args.matmul_size or (1024 if platform == "cpu" else 8192)
    t_wall = time.perf_counter()
    log(f"devices: {len(devices)} x {devices[0].device_kind} ({platform}); mesh {mesh_sizes}; "
        f"measuring {n_mm}^3 {args.dtype} matmul peak ...")
    peak = matmul_peak(devices, jnp.dtype(args.dtype), n_mm, args.matmul_iters, args.matmul_repeats)
    log(f"matmul peak: {peak / 1e12:.3f} TFLOP/s per device")

    rng = jax.random.key(0)
    attentions = [a for a in args.attention.split(",") if a]
    weights = None
    if args.checkpoint:
        weights = load_pretrained(resolve_model_name(args.checkpoint))[1]
        args.preset = f"{args.checkpoint} (weights)"
    results = {(obj, a): bench_step(obj, args, mesh, rng, a, weights) for obj in ("rlp", "ntp") for a in attentions}

    ndev = len(devices)
    header = ["step", "attention", "compile s", "step s (median)", f"time / {attentions[0]}", "input tokens/s",
              "effective tokens/s", "model TFLOP/step", "achieved TFLOP/s", "MFU (measured peak)", "MFU (spec peak)",
              "XLA GiB/device", f"XLA GiB / {attentions[0]}", "plan GiB/device"]
    rows = []
    for (obj, att), r in results.items():
        base = results[(obj, attentions[0])]
        pl = r["plan"]
        if r["step_s"] is None:
            rows.append([obj.upper(), att, f"{r['compile_s']:.1f}", "does not fit"] + ["-"] * 7
                        + [f"{r['xla_bytes'] / plan.GIB:.3f}", "-", f"{pl.total / plan.GIB:.3f}"])
            continue
        time_ratio = "-" if base["step_s"] is None else f"{r['step_s'] / base['step_s']:.2f}"
        flops = pl.step_flops
        achieved = flops / r["step_s"]
        spec_mfu = "-" if spec_peak is None else f"{100 * achieved / (ndev * spec_peak):.1f}%"
        eff = pl.effective_tokens if obj == "rlp" else pl.input_tokens
        xla = "-" if r["xla_bytes"] is None else f"{r['xla_bytes'] / plan.GIB:.3f}"
        mem_ratio = ("-" if r["xla_bytes"] is None or not base["xla_bytes"]
                     else f"{r['xla_bytes'] / base['xla_bytes']:.2f}")
        rows.append([obj.upper(), att, f"{r['compile_s']:.1f}", f"{r['step_s']:.3f}",
                     time_ratio, f"{pl.input_tokens / r['step_s']:.4g}",
                     f"{eff / r['step_s']:.4g}", f"{flops / 1e12:.4g}", f"{achieved / 1e12:.4g}",
                     f"{100 * achieved / (ndev * peak):.1f}%", spec_mfu, xla, mem_ratio, f"{pl.total / plan.GIB:.3f}"])
    m = results[("rlp", attentions[0])]["plan"].model
    met = next((r["metrics"] for (o, _), r in results.items() if o == "rlp" and r["metrics"] is not None),
               {"thought/mean_len": float("nan")})
    lines = [f"Preset `{args.preset}` ({m.num_params() / 1e6:.2f}M params, compute {args.dtype}, remat {args.remat}), "
             f"B={args.batch}, L={args.seq_len}, K={args.positions}, G={args.group_size}, T_think={args.thought_len}; "
             f"{ndev} x {devices[0].device_kind} ({platform}), mesh {mesh_sizes}; {args.steps} timed steps after "
             "a warm-up.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    spec_txt = "unknown kind" if spec_peak is None else f"{spec_peak / 1e12:.0f} TFLOP/s bf16 per device"
    lines += ["",
              f"- matmul peak measured: {peak / 1e12:.4g} TFLOP/s per device ({n_mm}^3 {args.dtype}, "
              f"{args.matmul_iters} per loop, best of {args.matmul_repeats}); spec sheet: {spec_txt}.",
              f"- RLP thoughts: mean length {float(met['thought/mean_len']):.1f} of T={args.thought_len} "
              f"(the FLOP model assumes T); RLP / NTP model FLOPs per step: "
              f"{results[('rlp', attentions[0])]['plan'].step_flops / results[('ntp', attentions[0])]['plan'].step_flops:.2f}x.",
              f"- wall time {time.perf_counter() - t_wall:.0f}s; 1-min load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} CPUs."]
    table = "\n".join(lines)
    print(table)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
