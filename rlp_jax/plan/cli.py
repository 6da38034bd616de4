"""`python -m rlp_jax.plan`: print the plan of a recipe on given devices (the model as the recipe's model section
names it: `--set model.preset=qwen3-8b`, `--set model.preset=nemotron-nano-12b-v2`, `--set model.init_from=DIR`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax

from rlp_jax.plan.devices import GIB, default_mesh, device_spec, parse_mesh
from rlp_jax.plan.estimate import Plan, cost_model, plan
from rlp_jax.runs.config import (
    ConfigError,
    apply_overrides,
    load_experiment,
    recipe_config,
)


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_plan(p: Plan, *, name: str = "", mfu: float = 0.4) -> str:
    m, d = p.model, p.devices
    lines = []
    peak = "no spec peak" if d.peak_flops is None else f"{d.peak_flops / 1e12:.0f} TFLOP/s bf16"
    lines.append(f"plan {name}: {_si(p.num_params)} params ({p.num_params:,}), {d.chips} x {d.name} "
                 f"({d.hbm_bytes / GIB:.0f} GiB, {peak} each)")
    lines.append(f"mesh data={p.mesh['data']} fsdp={p.mesh['fsdp']} tensor={p.mesh['tensor']}; objective "
                 f"{p.objective}; batch {p.batch} rows x {p.seq_len} tokens, {p.rows_per_device} per device"
                 + (f" in {p.micro_batches} micro-batches" if p.micro_batches > 1 else ""))
    model_costs = cost_model(m)
    lines.append(model_costs.describe(m))
    row = lambda label, b: f"  {label:<44s}{b / GIB:>10.3f}"   # noqa: E731
    lines += ["", f"  {'memory per device':<44s}{'GiB':>10s}"]
    lines.append(row(f"params ({m.param_dtype})", p.state["params"]))
    lines.append(row("optimizer (AdamW mu, nu; param dtype)", p.state["optimizer"]))
    lines.append(row("EMA teacher (float32)", p.state["ema"]))
    if p.state["reference"]:
        lines.append(row("KL reference params", p.state["reference"]))
    lines.append(row("gradients", p.state["gradients"]))
    caches = model_costs.CACHES
    labels = {"teacher": "activations: EMA teacher forward", "rollout": f"activations: rollout ({caches})",
              "loss": f"activations: loss fwd+bwd (remat {m.remat})"}
    for k, v in p.activations.items():
        lines.append(row(labels[k], v))
    for r, v in p.loss_by_remat.items():
        if r != m.remat:
            lines.append(row(f"  (loss fwd+bwd with remat {r})", v))
    lines.append(row("TOTAL (state + largest phase)", p.total))
    lines.append(row("HBM per device", d.hbm_bytes))
    lines += ["", f"  {'FLOPs per step (global)':<44s}{'FLOP':>10s}{'share':>8s}"]
    if p.objective == "rlp":
        total = p.step_flops
        names = {"rollout": "rollout (prefix fwd + sampling)", "reward": "reward (EMA no-think fwd)",
                 "update": "update (loss fwd [S_pred] + bwd)", "reference": "KL reference fwd"}
        for k, v in p.rlp_flops.items():
            if v or k != "reference":
                lines.append(f"  {names[k]:<44s}{_si(v):>10s}{100 * v / total:>7.1f}%")
        lines.append(f"  {'RLP step':<44s}{_si(total):>10s}")
    lines.append(f"  {'NTP step, same batch':<44s}{_si(p.ntp_flops):>10s}")
    ntp_per_token = p.ntp_flops / p.input_tokens
    lines.append("")
    if p.objective == "rlp":
        lines.append(f"tokens per step: input {_si(p.input_tokens)}; paper's effective (K*G*(L+T)*B + B*L) "
                     f"{_si(p.effective_tokens)}; NTP tokens of equal FLOPs {_si(p.step_flops / ntp_per_token)}")
    else:
        lines.append(f"tokens per step: {_si(p.input_tokens)}")
    t = p.step_time(mfu)
    if t is None:
        lines.append("step time: no spec peak for this device; measure with benchmarks/train_bench.py")
    else:
        extra = ""
        if p.decode_floor_s is not None:
            extra = f" (sampling no faster than its memory-bound floor {p.decode_floor_s:.2f} s)"
        lines.append(f"step time at {100 * mfu:.0f}% MFU: {t:.2f} s{extra}")
        if m.compute_dtype == "float32":
            lines.append("note: compute_dtype=float32 runs below the bf16 peak used here")
    for w in p.warnings:
        lines.append(f"WARNING: {w}")
    if not p.fits:
        lines.append(f"WARNING: does not fit: {p.total / GIB:.1f} GiB per device > {d.hbm_bytes / GIB:.0f} GiB HBM")
        lines += [f"hint: {h}" for h in p.hints]
    elif p.total > 0.85 * d.hbm_bytes:
        lines.append("note: above 85% of HBM; the runtime and XLA's buffers need some headroom")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    p = _Parser(prog="python -m rlp_jax.plan", description="Memory and FLOPs of an RLP run on given devices.",
                epilog="Devices: v4-N / v5p-N (N TensorCores, 2 per chip), v5litepod-N / v6e-N (N chips), "
                       "h100xN, h200xN, a100-40gbxN, a100-80gbxN, cpu.")
    p.add_argument("--experiment", required=True, help="recipe name in experiments/ or a path to a .py recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--devices", required=True, help="e.g. v5p-64, v5litepod-16, h100x8, cpu")
    p.add_argument("--mesh", default=None, help="data=..,fsdp=..,tensor=.. (default: train.mesh if it fits, "
                                                "else all chips on fsdp)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation for the step time (default 0.4)")
    p.add_argument("--compile", action="store_true",
                   help="also AOT-compile the run's train step for compile-only TPU devices of --devices (needs "
                        "libtpu: pip install -e '.[tpu]') and print XLA's memory per device beside the plan's")
    p.add_argument("--save-executable", metavar="FILE", help="with --compile: write the compiled step to FILE for "
                   "the trainer (python -m rlp_jax.train ... --executable FILE starts without compiling)")
    args = p.parse_args(argv)
    if "JAX_PLATFORMS" not in os.environ:   # the planner needs no local accelerator (compile-only devices are
        jax.config.update("jax_platforms", "cpu")   # opened apart): no TPU or GPU runtime is brought up and logs
    try:
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
        if args.save_executable and not args.compile:
            raise ConfigError("--save-executable writes the compiled step: add --compile")
        cfg = apply_overrides(recipe_config(load_experiment(args.experiment)), args.set)
        devices = device_spec(args.devices)
        if args.compile and (devices.kind != "cpu" or args.save_executable):
            # JAX decides at a process's first compile (the plan below makes some) whether it reads its persistent
            # cache: a compile-only executable cannot be read back from it, and a CPU executable the cache served
            # serializes without its kernels
            jax.config.update("jax_enable_compilation_cache", False)
        mesh = default_mesh(cfg, devices.chips) if args.mesh is None else parse_mesh(args.mesh, devices.chips)
        result = plan(cfg, devices, mesh)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(result, name=Path(args.experiment).stem, mfu=args.mfu))
    if args.compile:
        from rlp_jax.plan.compile import OutOfMemory, compile_step, format_refusal, format_verdict

        print(f"compiling the train step for {args.devices} (compile-only devices; minutes for a large model) ...",
              flush=True)
        try:
            compiled, report = compile_step(cfg, devices, mesh)
            if args.save_executable:
                from rlp_jax.train import aot

                aot.save(compiled, args.save_executable, report.fingerprint)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OutOfMemory as e:
            print(format_refusal(str(e), result.total, args.devices))
            return 0
        if args.save_executable:
            print(f"saved the compiled step to {args.save_executable} (python -m rlp_jax.train ... --executable "
                  f"{args.save_executable})")
            if not report.tokenizer_read:
                print("note: the run's tokenizer could not be read here, so the step has stand-in marker ids and the "
                      "trainer will refuse it: give the tokenizer with --set train.tokenizer=PATH")
        print(format_verdict(report, result.total, args.devices, model_flops=result.step_flops / devices.chips))
    return 0

