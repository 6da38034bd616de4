"""Shared cases of the training tests: the smoke run as a subprocess (`train_smoke`) and its settings."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Small and quick: 8 steps, checkpoints every 2, no plots. Overrides given to train_smoke replace these.
FAST = {"train.steps": "8", "train.save_every": "2", "train.plot": "false", "rlp.rollout.thought_len": "4",
        "rlp.rollout.group_size": "2"}
# A learning rate that does not depend on train.steps (cosine decays over them): the runs whose length is not
# what they test share one compiled train step through the compilation cache, whatever their length.
ANY_LENGTH = "optim.schedule=constant"


def train_smoke(workdir, *overrides, wait=True, env=None, args=()):
    """`python -m rlp_jax.train --experiment=smoke` in WORKDIR with FAST and `overrides` (key=value) and further
    command-line `args`; `env`: extra environment variables. wait=False: a Popen writing WORKDIR/stdout.log."""
    sets = dict(FAST, **dict(o.split("=", 1) for o in overrides))
    cmd = [sys.executable, "-m", "rlp_jax.train", "--experiment=smoke", f"--workdir={workdir}", *args]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    if not wait:  # output to a file: a full pipe would block the run
        log = open(Path(workdir) / "stdout.log", "w")
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
