"""Rewards for thoughts (docs/method.md step 3). Every reward function has one signature:

    reward_fn(policy_logprobs_bkgh, policy_argmax_bkgh, targets_bkh, ema_logprobs_bkh)
        -> (rewards_bkg float32, terms: dict of [B, K, G] float32 arrays for metrics)

policy_logprobs: log p_theta(x_{t+h} | x_<t, <think> c </think>, x_t..x_{t+h-1}) of each thought
(S_pred terms, from `rollout.thought_forward`); policy_argmax: the policy's most likely token there;
targets: the true tokens x_{t+h}; ema_logprobs: log p_ema(x_{t+h} | x_<t+h) without thinking, gathered
from one teacher-forced pass of the EMA params (`ema_target_logprobs`). H is the horizon (1 = paper).
Rewards are constants for the policy gradient: callers pass stop-gradient inputs.
"""

from __future__ import annotations

import jax.numpy as jnp


def info_gain_reward(policy_logprobs_bkgh, policy_argmax_bkgh, targets_bkh, ema_logprobs_bkh):
    """RLP's information gain r(c) = S_pred(c) - S_ema, summed over the horizon (in nats).

    Positive exactly when thinking made the true continuation more likely than the no-think EMA
    teacher finds it. S_ema is the same for the G thoughts of a position.
    """
    del policy_argmax_bkgh, targets_bkh
    s_pred = policy_logprobs_bkgh.sum(-1)                                   # [B, K, G]
    s_ema = jnp.broadcast_to(ema_logprobs_bkh.sum(-1)[:, :, None], s_pred.shape)
    return s_pred - s_ema, {"s_pred": s_pred, "s_ema": s_ema}


def rpt_reward(policy_logprobs_bkgh, policy_argmax_bkgh, targets_bkh, ema_logprobs_bkh):
    """RPT-style verifiable reward: 1 if the policy's argmax after the thought equals every x_{t+h}, else 0."""
    del ema_logprobs_bkh
    hit = jnp.all(policy_argmax_bkgh == targets_bkh[:, :, None, :], axis=-1).astype(jnp.float32)
    return hit, {"s_pred": policy_logprobs_bkgh.sum(-1), "accuracy": hit}


REWARDS = {"info_gain": info_gain_reward, "rpt": rpt_reward}


def get_reward_fn(kind: str):
    if kind not in REWARDS:
        raise ValueError(f"unknown reward {kind!r}; valid rewards: {', '.join(REWARDS)}")
    return REWARDS[kind]


def gather_horizon(values_bl, positions_bk, horizon: int):
    """values[b, t + h] for each chosen t: [B, K, H] (indices past the end are clamped)."""
    idx = jnp.minimum(positions_bk[..., None] + jnp.arange(horizon), values_bl.shape[1] - 1)
    b, k, h = idx.shape
    return jnp.take_along_axis(values_bl, idx.reshape(b, k * h), axis=1).reshape(b, k, h)
