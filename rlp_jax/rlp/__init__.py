"""The method: RLP's pure functions over arrays (docs/method.md).

config      RolloutConfig, RewardConfig, LossConfig, PromptConfig, RLPConfig (one declaration per setting)
prompt      the prompted setting: the context the policy thinks after
think_ids   ThinkIds: the ids taken from the tokenizer (markers, banned ids, the rendered prompt)
positions   which positions of a row think
rollout     sampling G thoughts per position off the shared prefix, and scoring them differentiably
teacher     the EMA teacher: its update and its no-think log-probs (S_ema)
reward      information gain and the other rewards
advantages  group-relative (and batch) advantages
losses      the clipped policy-gradient loss on thought tokens, NTP losses
objective   one RLP step's math (Objective = settings + token ids + thought path): rollout phase, rewards and
            advantages, the differentiable objective
naive       the naive path (every thought its own sequence), the shared-prefix path's reference
think_eval  does a thought help? x_t read with no, an empty, a sampled and a greedy thought; held-out metrics

Depends on `rlp_jax.model` and `rlp_jax.generate`; never on `train` or `evaluate`.
"""

from rlp_jax.rlp.advantages import batch_advantages, group_advantages
from rlp_jax.rlp.config import (
    LossConfig,
    PromptConfig,
    RewardConfig,
    RLPConfig,
    RolloutConfig,
)
from rlp_jax.rlp.losses import (
    combined_loss,
    ntp_loss,
    rlp_loss,
    rlp_loss_metrics,
    shifted_ntp_loss,
)
from rlp_jax.rlp.objective import Objective, Rollout, loss_and_grad, rollout_phase
from rlp_jax.rlp.reward import REWARDS, info_gain, info_gain_reward, rpt, rpt_reward
from rlp_jax.rlp.rollout import Thoughts, thought_forward, thought_rollout
from rlp_jax.rlp.teacher import ema_update, init_ema, teacher_logprobs
from rlp_jax.rlp.think_eval import ThinkEval, evaluate_thoughts
from rlp_jax.rlp.think_ids import ThinkIds, think_ids

__all__ = [
    # rewards, advantages and losses over arrays
    "info_gain", "rpt", "group_advantages", "batch_advantages", "rlp_loss", "rlp_loss_metrics", "ntp_loss",
    "shifted_ntp_loss", "combined_loss", "REWARDS", "info_gain_reward", "rpt_reward",
    # thoughts over a model
    "Thoughts", "thought_rollout", "thought_forward", "ThinkEval", "evaluate_thoughts",
    # the teacher and one step's math
    "init_ema", "ema_update", "teacher_logprobs", "Objective", "Rollout", "rollout_phase", "loss_and_grad",
    # configuration, and the ids the tokenizer gives
    "RLPConfig", "RolloutConfig", "RewardConfig", "LossConfig", "PromptConfig", "ThinkIds", "think_ids",
]
