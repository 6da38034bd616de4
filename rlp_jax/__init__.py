"""rlp_jax: RLP (reinforcement learning pretraining, arXiv 2510.01265) in JAX.

The composable pieces (pure functions over arrays, jit-able) are re-exported here; the training
system is `python -m rlp_jax.train`. The package's layout: `model/` (the transformer and its
checkpoints), `generate/` (sampling), `rlp/` (the method), `data/` (text in), `train/` (the training
system), `evaluate/` (checkpoints' evaluation); `docs/method.md` gives the method and the shape letters.
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
