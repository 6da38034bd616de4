"""The training system around the method: `python -m rlp_jax.train --experiment=NAME`.

config      RunConfig and its sections, `--set` overrides, experiment recipes
loop        the host loop (`run`)
cli         `python -m rlp_jax.train` (`main`)
step        the train state and the jitted RLP / NTP steps
optim       the optimizer and its schedule
checkpoint  Orbax checkpoints (state, RNG, data-iterator state)
run_dir     a run directory's layout, and loading models from runs, HF folders and GGUF files
metrics     JSONL and TensorBoard writers
"""

from rlp_jax.train.cli import main
from rlp_jax.train.loop import USER_ERRORS, build_model, evaluate_batches, local_dirs, run, run_key, with_markers

__all__ = ["USER_ERRORS", "build_model", "evaluate_batches", "local_dirs", "main", "run", "run_key", "with_markers"]
