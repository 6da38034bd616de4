"""The training system around the method: `python -m rlp_jax.train --experiment=NAME`.

loop        the host loop (`run`)
cli         `python -m rlp_jax.train` (`main`)
train_step  the train state and the jitted RLP / NTP steps
aot         a train step compiled ahead of time: saved by the planner, loaded by the trainer
optim       the optimizer and its schedule
lock        one training per run directory
metrics     JSONL, TensorBoard and W&B writers
preemption  SIGTERM / Ctrl-C handling

A run's configuration, its directory's layout, checkpoints and model loading are `rlp_jax.runs` (readers import
them without the training stack).
"""

from rlp_jax.train.cli import main
from rlp_jax.train.loop import (
    USER_ERRORS,
    build_model,
    evaluate_batches,
    objective_of,
    run,
    run_key,
)

__all__ = ["USER_ERRORS", "build_model", "evaluate_batches", "main", "objective_of", "run", "run_key"]
