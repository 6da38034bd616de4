"""Benchmark: shared-prefix RLP rollout / train step vs the naive one-sequence-per-thought path.

Usage (from the repository root):

    python benchmarks/rollout_bench.py --quick                       # smoke run, context 128
    python benchmarks/rollout_bench.py --contexts 512,2048 --repeats 3 --output table.md

What is timed, for each context length L (documents of exactly L random tokens, one segment per row,
segment ids 1, positions 0..L-1; K positions per document drawn uniformly by the step's own
`positions.select_positions` with a fixed rng, so both paths process the same positions):

  (a) rollout: shared = `transformer.forward(..., return_cache=True)` + `rollout.thought_rollout`;
      naive = `naive.naive_thought_rollout` (each branch `x_<t <think>` prefilled as its own row).
      Both use the same rng, so they sample the same thoughts (checked and reported).
  (b) RLP step: shared = `train_step.make_rlp_train_step`; naive = `naive_rlp_step` below, which
      mirrors `train_step.rlp_step` / `objective.loss_and_grad` (same EMA teacher forward, positions, rewards,
      advantages, rlp_loss, optax.adamw update, EMA update) with `naive.naive_thought_rollout` for
      sampling and `naive.naive_thought_forward` in place of `rollout.thought_forward`. Like
      `objective.score`, it still runs one document forward for the NTP term / metrics.

Each function is jit-compiled first (`.lower().compile()`, reported separately), then run `--repeats`
times under `jax.block_until_ready`; the median is reported. The device's matmul throughput is
measured in the same run (jitted fp32 n x n x n matmul, 2 n^3 FLOPs, median of a few runs) and used
as "peak" for the utilisation column.

FLOP model (analytic, forward pass, per query token):
    lin  = 2 * (non-embedding params)            # q/k/v/o projections + SwiGLU MLP (norms: noise)
    attn = 4 * Y * H * Dh per attended key        # QK^T (2 H Dh) + PV (2 H Dh), summed over layers
    head = 2 * D * V                              # output projection, only where logits are used
  fwd(tokens, key_pairs, head_tokens) = tokens * lin + key_pairs * attn + head_tokens * head
  backward = 2 x forward (of the loss forward only; sampling and the EMA pass have no backward).
  Elementwise work (softmax, norms, rotary, sampling, optimizer) is not counted.

Two counts are made (B docs, L tokens, N = K*G branches per doc, T = T_think slots, T_run = decode
steps actually run, S = T + 1 + H branch tokens in the loss, H = reward horizon, t_n = the position
of branch n):

  executed: what the dense, masked implementation actually computes (masked scores are computed;
    right-padded rows are computed in full):
      EMA teacher pass           fwd(BL, B L^2, BL)
      shared sampling prefix     fwd(BL, B L^2, 0)            (logits unused -> DCE'd by XLA)
      shared decode              fwd(BN T_run, BN T_run (L+T), BN T_run)
      shared loss prefix         fwd(BL, B L^2, BL)           (+ 2x backward)
      shared loss branches       fwd(BN S, BN S (L+S), BN S)  (+ 2x backward)
      naive prefill              fwd(BN(L+1), BN (L+1)^2, BN(L+1))   rows are x_<t <think>, padded to L+1
      naive decode               fwd(BN T, BN T (L+1+T), BN T)       fori_loop always runs T steps
      naive loss doc forward     fwd(BL, B L^2, BL)                  (+ 2x backward; NTP term/metrics)
      naive loss rows            fwd(BN(L+S), BN (L+S)^2, BN(L+S))   (+ 2x backward)
  useful: the minimal work of the shared-prefix algorithm (causal attention, no padding, no masked
    scores), identical for both paths:
      EMA pass fwd(BL, B L(L+1)/2, BL); sampling prefix fwd(BL, B L(L+1)/2, 0);
      decode fwd(BN T_run, sum_n sum_{s<T_run} (t_n+s+1), BN T_run);
      loss prefix fwd(BL, B L(L+1)/2, BL) and branches fwd(BN S, sum_n sum_{i<S} (t_n+i+1), BN S),
      each with a 2x backward.
  (The rollout-only rows count only the sampling parts.) "achieved FLOP/s" = executed FLOPs / median
  time; "useful ratio" = useful FLOPs / executed FLOPs of that path (how much of what the path
  computes the RLP algorithm needs). Thoughts are assumed to fill all T slots in the loss (true for
  random-init models, whose end-marker probability is ~1/V; T_run is read from the sampled thoughts).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from rlp_jax.model.dense import transformer  # noqa: E402
from rlp_jax.model.dense.config import ModelConfig  # noqa: E402
from rlp_jax.rlp import (
    naive,  # noqa: E402
    positions,  # noqa: E402
)
from rlp_jax.rlp.config import RLPConfig, RolloutConfig  # noqa: E402
from rlp_jax.rlp.objective import Objective  # noqa: E402
from rlp_jax.rlp.rollout import thought_rollout  # noqa: E402
from rlp_jax.rlp.think_ids import ThinkIds  # noqa: E402
from rlp_jax.train import train_step  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The two rollouts (the naive RLP step is train_step.make_rlp_train_step with Objective(..., path=naive.NAIVE))
# ----------------------------------------------------------------------------------------------

def shared_rollout(params, batch, t_bk, rng, *, cfg, rollout, ids):
    _, prefix = transformer.forward(params, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                              positions_bl=batch["positions"], return_cache=True)
    return thought_rollout(params, cfg, prefix, t_bk, rng, rollout, ids)


def naive_rollout(params, batch, t_bk, rng, *, cfg, rollout, ids):
    return naive.naive_thought_rollout(params, cfg, batch, t_bk, rng, rollout, ids)


# ----------------------------------------------------------------------------------------------
# FLOP model (see the module docstring)
# ----------------------------------------------------------------------------------------------

class Flops:
    def __init__(self, cfg: ModelConfig):
        emb = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
        self.lin = 2 * (cfg.num_params() - emb - cfg.hidden_size)   # per token
        self.attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim   # per (query, key) pair
        self.head = 2 * cfg.hidden_size * cfg.vocab_size              # per token with logits

    def fwd(self, tokens, pairs, head_tokens):
        return tokens * self.lin + pairs * self.attn + head_tokens * self.head


def flop_counts(cfg: ModelConfig, b: int, length: int, t_bn: np.ndarray, t_think: int, t_run: int,
                horizon: int) -> dict:
    """Executed and useful FLOPs of each path: {'shared'|'naive': {'rollout'|'step': (executed, useful)}}."""
    f = Flops(cfg)
    L, T = length, t_think
    n_total = t_bn.size                               # B * N branches
    s = T + 1 + horizon
    sum_t = float(t_bn.sum())
    causal = b * L * (L + 1) / 2
    # Useful (minimal shared-prefix algorithm, causal, unpadded).
    u_ema = f.fwd(b * L, causal, b * L)
    u_prefix = f.fwd(b * L, causal, 0)
    u_decode = f.fwd(n_total * t_run, t_run * sum_t + n_total * t_run * (t_run + 1) / 2, n_total * t_run)
    u_loss = f.fwd(b * L, causal, b * L) + f.fwd(n_total * s, s * sum_t + n_total * s * (s + 1) / 2, n_total * s)
    useful_roll = u_prefix + u_decode
    useful_step = u_ema + useful_roll + 3 * u_loss
    # Executed, shared path.
    ema = f.fwd(b * L, b * L * L, b * L)
    sh_roll = f.fwd(b * L, b * L * L, 0) + f.fwd(n_total * t_run, n_total * t_run * (L + T), n_total * t_run)
    sh_loss = f.fwd(b * L, b * L * L, b * L) + f.fwd(n_total * s, n_total * s * (L + s), n_total * s)
    # Executed, naive path.
    na_roll = (f.fwd(n_total * (L + 1), n_total * (L + 1) ** 2, n_total * (L + 1))
               + f.fwd(n_total * T, n_total * T * (L + 1 + T), n_total * T))
    na_loss = f.fwd(b * L, b * L * L, b * L) + f.fwd(n_total * (L + s), n_total * (L + s) ** 2, n_total * (L + s))
    return {
        "shared": {"rollout": (sh_roll, useful_roll), "step": (ema + sh_roll + 3 * sh_loss, useful_step)},
        "naive": {"rollout": (na_roll, useful_roll), "step": (ema + na_roll + 3 * na_loss, useful_step)},
    }


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def log(msg):
    print(msg, file=sys.stderr, flush=True)


def compile_fn(jitted, *args):
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def temp_bytes(compiled) -> float:
    try:
        ma = compiled.memory_analysis()
        return float(ma.temp_size_in_bytes + ma.output_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return 0.0


def matmul_flops_per_s(n: int, runs: int) -> float:
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    bm = jax.random.normal(kb, (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, bm))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a, bm))
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def time_rollout(compiled, args, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def time_step(compiled, state, batch, rng, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, rng)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), metrics


def make_batch(rng, b: int, length: int, vocab: int, first_id: int):
    tokens = jax.random.randint(rng, (b, length), first_id, vocab, jnp.int32)
    seg = jnp.ones((b, length), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="FLOP model and what is timed: see the module docstring.")
    p.add_argument("--preset", default="small", help="ModelConfig preset (default: small)")
    p.add_argument("--positions", type=int, default=4, help="K, positions per document")
    p.add_argument("--group", type=int, default=4, help="G, thoughts per position")
    p.add_argument("--thought-len", type=int, default=32, help="T_think")
    p.add_argument("--batch", type=int, default=1, help="B, documents per batch")
    p.add_argument("--contexts", default="512,2048", help="comma-separated document lengths L")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per function (median reported)")
    p.add_argument("--min-context", type=int, default=16, help="rollout.min_context")
    p.add_argument("--think-ids", default="1,2", help="<think>,</think> token ids (documents use ids above both)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n x n fp32 peak matmul")
    p.add_argument("--matmul-runs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-naive-step", action="store_true", help="time only the naive rollout, not its step")
    p.add_argument("--max-mem-gb", type=float, default=None,
                   help="skip a function whose compiled temp+output memory exceeds this (default: 85%% of RAM)")
    p.add_argument("--output", default=None, help="also write the Markdown table to this file")
    p.add_argument("--quick", action="store_true", help="smoke run: context 128, repeats 2, 1024^3 matmul")
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.repeats, args.matmul_size = "128", 2, 1024
    contexts = [int(c) for c in args.contexts.split(",") if c]
    start_id, end_id = (int(x) for x in args.think_ids.split(","))
    if args.max_mem_gb is None:
        try:
            args.max_mem_gb = 0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
        except (ValueError, OSError):
            args.max_mem_gb = float("inf")

    cfg = ModelConfig.preset(args.preset)
    rlp = RLPConfig(rollout=RolloutConfig(group_size=args.group, positions_per_doc=args.positions,
                                          thought_len=args.thought_len, min_context=args.min_context))
    ids = ThinkIds(start=start_id, end=end_id)
    optimizer = optax.adamw(1e-4)
    k_params, k_data, k_step = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    params = transformer.init_params(cfg, k_params)
    t_wall = time.perf_counter()
    load_start = os.getloadavg()[0]

    log(f"device: {jax.devices()[0]} ({os.cpu_count()} CPUs); measuring {args.matmul_size}^3 fp32 matmul ...")
    peak = matmul_flops_per_s(args.matmul_size, args.matmul_runs)
    log(f"matmul: {peak / 1e9:.1f} GFLOP/s")

    rows, notes = [], []

    def render(final: bool) -> str:
        header = ["context", "path", "compile s (rollout / step)", "rollout s", "step s", "naive/shared rollout",
                  "naive/shared step", "executed GFLOP (rollout / step)", "achieved GFLOP/s (rollout / step)",
                  "matmul GFLOP/s", "utilisation (rollout / step)", "useful FLOP ratio (rollout / step)"]
        lines = [f"Model `{args.preset}` ({cfg.num_params() / 1e6:.2f}M params), B={args.batch}, K={args.positions}, "
                 f"G={args.group}, T_think={args.thought_len}, repeats={args.repeats} (median), device "
                 f"{jax.devices()[0].platform} ({os.cpu_count()} CPUs), matmul {args.matmul_size}^3 fp32.", "",
                 "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += [""] + [f"- {n}" for n in notes]
        lines.append(f"- wall time {time.perf_counter() - t_wall:.0f}s; 1-min load average {load_start:.1f} at start, "
                     f"{os.getloadavg()[0]:.1f} at {'end' if final else 'last write'} "
                     f"(other processes share the CPUs when > {os.cpu_count()})"
                     + ("" if final else f"; PARTIAL: contexts done so far of {contexts}"))
        return "\n".join(lines)

    def write(final: bool):
        if args.output:
            with open(args.output, "w") as fh:
                fh.write(render(final) + "\n")

    for length in contexts:
        batch = make_batch(jax.random.fold_in(k_data, length), args.batch, length, cfg.vocab_size,
                           max(start_id, end_id) + 1)
        k_pos, k_roll = jax.random.split(k_step)       # the same split rlp_step makes of its rng
        t_bk, t_mask = positions.select_positions(k_pos, batch["segment_ids"], batch["positions"],
                                                  jnp.zeros((args.batch, length), jnp.float32), rlp.rollout,
                                                  rlp.reward.horizon)
        if not bool(t_mask.all()):
            raise SystemExit(f"context {length}: fewer than K={args.positions} valid positions "
                             f"(min_context={args.min_context})")
        res = {}
        for path, fn in (("shared", shared_rollout), ("naive", naive_rollout)):
            log(f"[L={length}] {path} rollout: compiling ...")
            jitted = jax.jit(functools.partial(fn, cfg=cfg, rollout=rlp.rollout, ids=ids))
            compiled, c_s = compile_fn(jitted, params, batch, t_bk, k_roll)
            log(f"[L={length}] {path} rollout: compiled in {c_s:.1f}s, timing ...")
            med, thoughts = time_rollout(compiled, (params, batch, t_bk, k_roll), args.repeats)
            res[path] = {"rc": c_s, "rt": med, "thoughts": thoughts}
            log(f"[L={length}] {path} rollout: {med:.3f}s")
        th_s, th_n = res["shared"]["thoughts"], res["naive"]["thoughts"]
        same = bool(jnp.array_equal(th_s.tokens, th_n.tokens))
        t_run = int(th_s.action_mask.sum(-1).max())
        notes.append(f"L={length}: positions {np.asarray(t_bk).tolist()}; same thoughts sampled by both paths: "
                     f"{same}; decode steps run T_run={t_run}; mean thought length "
                     f"{float(th_s.lengths.mean()):.1f}; ended fraction {float(th_s.ended.mean()):.2f}")

        makers = {"shared": lambda: train_step.make_rlp_train_step(cfg, Objective(rlp, ids), optimizer),
                  "naive": lambda: train_step.make_rlp_train_step(cfg, Objective(rlp, ids, naive.NAIVE), optimizer)}
        for path in ("shared", "naive"):
            if path == "naive" and args.skip_naive_step:
                res[path].update(sc=None, st=None)
                continue
            state = train_step.init_train_state(jax.tree.map(jnp.copy, params), optimizer)
            log(f"[L={length}] {path} step: compiling ...")
            compiled, c_s = compile_fn(makers[path](), state, batch, k_step)
            mem = temp_bytes(compiled) / 2 ** 30
            if mem > args.max_mem_gb:
                log(f"[L={length}] {path} step: needs ~{mem:.1f} GiB > {args.max_mem_gb:.1f} GiB, skipped")
                notes.append(f"L={length}: {path} step skipped, compiled memory ~{mem:.1f} GiB")
                res[path].update(sc=c_s, st=None)
                continue
            log(f"[L={length}] {path} step: compiled in {c_s:.1f}s (~{mem:.2f} GiB temp), timing ...")
            med, metrics = time_step(compiled, state, batch, k_step, args.repeats)
            res[path].update(sc=c_s, st=med)
            log(f"[L={length}] {path} step: {med:.3f}s (loss {float(metrics['loss/total']):.4g})")

        t_bn = np.repeat(np.asarray(t_bk), args.group, axis=1)
        fl = flop_counts(cfg, args.batch, length, t_bn, args.thought_len, t_run, rlp.reward.horizon)
        for path in ("shared", "naive"):
            r = res[path]
            ex_r, us_r = fl[path]["rollout"]
            ex_s, us_s = fl[path]["step"]
            ach_r = ex_r / r["rt"]
            ach_s = None if r["st"] is None else ex_s / r["st"]
            ratio_r = res["naive"]["rt"] / res["shared"]["rt"] if path == "naive" else None
            ratio_s = (res["naive"]["st"] / res["shared"]["st"] if path == "naive"
                       and res["naive"]["st"] is not None and res["shared"]["st"] is not None else None)
            pct = lambda x: "-" if x is None else f"{100 * x / peak:.0f}%"
            rows.append([
                str(length), path, f"{fmt(r['rc'], '.1f')} / {fmt(r['sc'], '.1f')}",
                fmt(r["rt"], ".3f"), fmt(r["st"], ".3f"), fmt(ratio_r, ".2f"), fmt(ratio_s, ".2f"),
                f"{ex_r / 1e9:.1f} / {ex_s / 1e9:.1f}",
                f"{ach_r / 1e9:.1f} / {fmt(None if ach_s is None else ach_s / 1e9, '.1f')}",
                f"{peak / 1e9:.1f}",
                f"{pct(ach_r)} / {pct(ach_s)}",
                f"{us_r / ex_r:.3f} / {us_s / ex_s:.3f}",
            ])
        write(False)

    print(render(True))
    write(True)


if __name__ == "__main__":
    main()
