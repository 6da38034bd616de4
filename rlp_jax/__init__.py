"""rlp_jax: RLP (reinforcement learning pretraining, arXiv 2510.01265) in JAX.

The composable pieces (pure functions over arrays, jit-able) are re-exported here; the training
system is `python -m rlp_jax.train`.
"""

from rlp_jax.advantages import batch_advantages, group_advantages
from rlp_jax.ema import ema_update, init_ema
from rlp_jax.losses import combined_loss, ntp_loss, rlp_loss
from rlp_jax.model import (Branches, BranchCache, PrefixCache, branch_forward, branches_at, decode_step,
                           forward, init_branch_cache, init_params, param_logical_axes, prefill)
from rlp_jax.model_config import ModelConfig
from rlp_jax.reward import REWARDS, info_gain_reward, rpt_reward
from rlp_jax.rlp_config import LossConfig, RewardConfig, RLPConfig, RolloutConfig
from rlp_jax.rollout import Thoughts, thought_forward, thought_rollout
from rlp_jax.train_step import (TrainState, init_train_state, make_ntp_train_step, make_rlp_train_step,
                                rlp_objective, rlp_step)

__version__ = "0.1.0"
