"""rlp_jax: RLP (reinforcement learning pretraining, arXiv 2510.01265) in JAX.

The composable pieces (pure functions over arrays, jit-able) are re-exported here; the training
system is `python -m rlp_jax.train`. The package's layout: `model/` (the transformer and its
checkpoints), `generate/` (sampling), `rlp/` (the method), `data/` (text in), `train/` (the training
system), `evaluate/` (checkpoints' evaluation); `docs/method.md` gives the method and the shape letters.
"""

from rlp_jax.model.config import ModelConfig
from rlp_jax.model.transformer import (
                                       BranchCache,
                                       Branches,
                                       PrefixCache,
                                       branch_forward,
                                       branches_at,
                                       decode_step,
                                       forward,
                                       init_branch_cache,
                                       init_params,
                                       param_logical_axes,
                                       prefill,
)
from rlp_jax.rlp.advantages import batch_advantages, group_advantages
from rlp_jax.rlp.config import LossConfig, RewardConfig, RLPConfig, RolloutConfig
from rlp_jax.rlp.losses import combined_loss, ntp_loss, rlp_loss
from rlp_jax.rlp.objective import Rollout, loss_and_grad, rollout_phase
from rlp_jax.rlp.reward import REWARDS, info_gain_reward, rpt_reward
from rlp_jax.rlp.rollout import Thoughts, thought_forward, thought_rollout
from rlp_jax.rlp.teacher import ema_update, init_ema, teacher_logprobs
from rlp_jax.train.step import TrainState, init_train_state, make_ntp_train_step, make_rlp_train_step, rlp_step

__version__ = "0.1.0"
