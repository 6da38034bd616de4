"""The training command: `python -m rlp_jax.train --experiment=NAME [--set key=value ...] [--workdir DIR]`,
or `--from-run RUN_DIR` to run again what a run ran (its config.json, with `--set` on top).

Loads a recipe (`experiments/NAME.py`: `config()`, optionally `prepare`, `stages`, `report`), applies the
`--set` overrides and runs each stage with `rlp_jax.train.loop.run`. User mistakes end with a one-line
`error: ...` and exit code 2; a run stopped by non-finite steps exits 3; a SIGTERM-preempted run saves,
says how to resume on stderr and exits 75 (EX_TEMPFAIL: requeue the same command); Ctrl-C saves the same
way and exits 130 (a second Ctrl-C stops at once).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import sys
from pathlib import Path

import jax
from etils import epath

from rlp_jax import sharding
from rlp_jax.runs.config import (
    ConfigError,
    apply_overrides,
    describe_fields,
    load_experiment,
    recipe_config,
)
from rlp_jax.runs.layout import read_run_record
from rlp_jax.train.loop import USER_ERRORS, TrainingStopped, check_workdir, run

EXIT_PREEMPTED = 75      # SIGTERM: saved, not finished (EX_TEMPFAIL: a scheduler should requeue the same command)
EXIT_INTERRUPTED = 130   # Ctrl-C (128 + SIGINT)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rlp_jax.train",
        description="Train with RLP (or the next-token CPT baseline) on a named experiment recipe.",
        epilog="Config fields (show a recipe's values with --experiment=NAME --show-config).")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--experiment", help="recipe name in experiments/ or a path to a .py recipe")
    what.add_argument("--from-run", metavar="RUN_DIR",
                      help="run again what an earlier run ran: its config.json (data paths, tokenizer and model as "
                           "resolved then), with --set overrides on top; a new --workdir starts a fresh run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set rlp.rollout.group_size=8 (repeatable)")
    p.add_argument("--workdir", help="run directory (default runs/<experiment>-<timestamp>); an existing one resumes")
    p.add_argument("--mesh", help="mesh axes, e.g. data=2,fsdp=4 (-1: the rest): the same syntax as evaluate and "
                   "plan; short for --set train.mesh.data=2 --set train.mesh.fsdp=4 ...")
    p.add_argument("--show-config", action="store_true", help="print every field with its value and exit")
    p.add_argument("--executable", metavar="FILE", help="the train step compiled ahead of time for this run "
                   "(python -m rlp_jax.plan ... --compile --save-executable FILE): loaded instead of compiled")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.from_run:
            record = read_run_record(args.from_run)
            module, name = None, record.experiment.replace("/", "-")
            cfg = apply_overrides(record.run, args.set)
        else:
            module, name = load_experiment(args.experiment), Path(args.experiment).stem
            cfg = apply_overrides(recipe_config(module), args.set)
        if args.mesh is not None:
            if any(o.startswith("train.mesh") for o in args.set):
                raise ConfigError("give the mesh once: --mesh or --set train.mesh.*, not both")
            try:
                mesh = sharding.MeshConfig.parse(args.mesh)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mesh=mesh))
        if args.show_config:
            print("\n".join(describe_fields(cfg)))
            return 0
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        workdir = args.workdir or f"runs/{name}-{stamp}"
        workdir = epath.Path(workdir) if "://" in workdir else Path(workdir)   # gs://... stays a URL
        if isinstance(workdir, Path):   # a local run directory: refuse an unwritable one before any work
            check_workdir(workdir)
        if module is not None and hasattr(module, "prepare"):
            cfg = module.prepare(cfg, workdir)
        sharding.maybe_initialize_distributed()
        print(f"experiment {name}: workdir {workdir}, devices {jax.devices()[0].platform} x {jax.device_count()}")
        # A recipe with stages (e.g. demo: next-token pretraining, then RLP from it) runs each in
        # WORKDIR/<stage>; a finished stage is a no-op on a rerun, so the whole recipe resumes.
        stages = module.stages(cfg, workdir) if module is not None and hasattr(module, "stages") else [(None, cfg)]
        if args.executable and len(stages) > 1:
            raise ConfigError(f"--executable holds one compiled step; {name} runs {len(stages)} stages (train each "
                              "stage's run without it, or give a one-stage recipe)")
        for stage, stage_cfg in stages:
            if stage is not None:
                print(f"== stage {stage}: objective={stage_cfg.train.objective}, steps={stage_cfg.train.steps}")
            final = run(stage_cfg, workdir if stage is None else workdir / stage,
                        experiment=name if stage is None else f"{name}/{stage}", executable=args.executable)
            if got := final.get("preempted"):
                print(f"preempted by {got} at step {final['step']}, checkpoint saved: rerun the same command to "
                      f"resume from {workdir}", file=sys.stderr)
                return EXIT_PREEMPTED if got == "SIGTERM" else EXIT_INTERRUPTED
        if module is not None and hasattr(module, "report") and jax.process_index() == 0:
            module.report(cfg, workdir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:   # before the first step (or a second Ctrl-C): nothing new to save
        print("interrupted: stopped without saving; the run directory holds its earlier checkpoints, if any",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    keys = [k for k in ("loss/total", "reward/mean", "reward/frac_positive", "thought/mean_len",
                        "eval/nll_no_think", "eval/nll_think", "eval/info_gain") if k in final]
    print("final: " + ", ".join(f"{k}={final[k]:.4f}" for k in keys))
    return 0
