"""The planner's memory per device against XLA:TPU's, on small steps compiled for a TPU slice on this CPU host.

    python benchmarks/planner_vs_xla.py                      # every case below, v5p-8, fsdp over all chips
    python benchmarks/planner_vs_xla.py --case hybrid-aligned-none --case tiny-hybrid-none
    python benchmarks/planner_vs_xla.py --case hybrid-aligned-none --pattern MM-*M-   # one Mamba block more

Each case is the smoke experiment with some `--set`s; it is compiled by `rlp_jax.plan.compile.compile_step` (libtpu,
the `tpu` extra) and planned by `rlp_jax.plan.estimate.plan`, and one line prints XLA's total, its code, its HBM
buffers (the total without code), the temporaries XLA placed in the TensorCore's on-chip
memories (VMEM: up to ~48 MiB on v5p, which small steps' HBM buffers do not hold) and the planner's ratio to the
total, to the HBM buffers and to all buffers (HBM + on-chip). "hybrid-aligned" is the `nemotron-h-tiny-aligned`
preset (hidden 256, head_dim 128, Mamba state 128, chunks of 128) with the blocks `--pattern` names, written as a
config.json for `model.init_from`; "tiny-hybrid" is the `nemotron-h-tiny` preset (hidden 64, chunks of 16),
whose arrays XLA:TPU pads to 128 lanes. 30-70 s per case on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

STEP = ["data.seq_len=256", "rlp.rollout.thought_len=64"]
CASES = {
    "dense-splash": ["model.attention=kernel", "data.seq_len=128", "model.compute_dtype=bfloat16",
                     "rlp.rollout.thought_len=160", "data.batch_size=8"],
    "tiny-hybrid-none": ["model.preset=nemotron-h-tiny", *STEP, "data.batch_size=4", "model.remat=none"],
    "tiny-hybrid-full": ["model.preset=nemotron-h-tiny", *STEP, "data.batch_size=4", "model.remat=full"],
    "hybrid-aligned-none": ["model.init_from={aligned}", *STEP, "data.batch_size=4", "model.remat=none"],
    "hybrid-aligned-full": ["model.init_from={aligned}", *STEP, "data.batch_size=4", "model.remat=full"],
    "hybrid-aligned-none-b16": ["model.init_from={aligned}", *STEP, "data.batch_size=16", "model.remat=none"],
    "hybrid-aligned-full-b16": ["model.init_from={aligned}", *STEP, "data.batch_size=16", "model.remat=full"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="a case to run (default: all)")
    ap.add_argument("--devices", default="v5p-8", help="a TPU slice (rlp_jax.plan.devices)")
    ap.add_argument("--pattern", default="M-*M-",
                    help="the aligned hybrid's blocks (M Mamba-2, * attention, - MLP), e.g. MM-*M- to see what "
                         "one more Mamba block costs")
    args = ap.parse_args(argv)
    if not args.pattern or set(args.pattern) - set("M*-"):
        print(f"--pattern {args.pattern!r}: use the letters M (Mamba-2), * (attention) and - (MLP)",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", args.devices)

    from rlp_jax.model.nemotron_h.hybrid import PRESETS
    from rlp_jax.plan.compile import compile_step
    from rlp_jax.plan.devices import device_spec, parse_mesh
    from rlp_jax.plan.estimate import plan
    from rlp_jax.runs.config import ConfigError, apply_overrides, load_experiment, recipe_config

    devices = device_spec(args.devices)
    mesh = parse_mesh(f"fsdp={devices.chips}", devices.chips)
    mib = 2**20
    with tempfile.TemporaryDirectory(prefix="aligned_hybrid_") as aligned:
        hybrid = {"model_type": "nemotron_h", **PRESETS["nemotron-h-tiny-aligned"],
                  "hybrid_override_pattern": args.pattern}
        (Path(aligned) / "config.json").write_text(json.dumps(hybrid))
        print(f"{'case':26s} {'XLA MiB':>9s} {'code':>7s} {'buffers':>8s} {'on-chip':>8s} {'planner':>8s} "
              f"{'/total':>7s} {'/buffers':>8s} {'/all':>6s}")
        for name in args.case or list(CASES):
            sets = [s.format(aligned=aligned) for s in CASES[name]]
            try:
                cfg = apply_overrides(recipe_config(load_experiment("smoke")), sets)
                _, report = compile_step(cfg, devices, mesh)
            except ConfigError as e:
                print(f"{name}: {e}", file=sys.stderr)
                return 2
            planned = plan(cfg, devices, mesh).total
            every = report.buffers + report.onchip_bytes
            print(f"{name:26s} {report.total / mib:9.1f} {report.code_bytes / mib:7.1f} {report.buffers / mib:8.1f} "
                  f"{report.onchip_bytes / mib:8.1f} {planned / mib:8.1f} {planned / report.total:7.2f} "
                  f"{planned / report.buffers:8.2f} {planned / every:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
