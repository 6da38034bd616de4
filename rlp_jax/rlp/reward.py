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

import chex
import jax.numpy as jnp


def info_gain(s_pred_bkg, s_ema_bk):
    """RLP's reward, the information gain of each thought (nats): S_pred - S_ema.

    s_pred_bkg: [B, K, G] log p_theta(x_t | x_<t, <think> c </think>) of each thought (summed over the horizon);
    s_ema_bk: [B, K] log p_ema(x_t | x_<t), the no-think teacher's, the same for the G thoughts of a position.
    Positive exactly when thinking made the true next token more likely than the teacher finds it. [B, K, G].
    """
    chex.assert_rank([s_pred_bkg, s_ema_bk], [3, 2])
    chex.assert_equal_shape_prefix([s_pred_bkg, s_ema_bk], 2)
    return s_pred_bkg - s_ema_bk[..., None]


def rpt(predicted_bkgh, targets_bkh):
    """RPT's verifiable reward (the paper's Table 3 baseline): 1.0 when the policy's prediction after the thought
    equals every true next token x_t .. x_{t+H-1}, else 0.0. predicted [B, K, G, H] int, targets [B, K, H] int
    -> [B, K, G] float32."""
    chex.assert_rank([predicted_bkgh, targets_bkh], [4, 3])
    chex.assert_equal_shape_prefix([predicted_bkgh, targets_bkh], 2)
    chex.assert_equal_shape_suffix([predicted_bkgh, targets_bkh], 1)
    return jnp.all(predicted_bkgh == targets_bkh[:, :, None, :], axis=-1).astype(jnp.float32)


def info_gain_reward(policy_logprobs_bkgh, policy_argmax_bkgh, targets_bkh, ema_logprobs_bkh):
    """`info_gain` in the registry's signature (horizon terms summed)."""
    del policy_argmax_bkgh, targets_bkh
    s_pred, s_ema = policy_logprobs_bkgh.sum(-1), ema_logprobs_bkh.sum(-1)
    return info_gain(s_pred, s_ema), {"s_pred": s_pred, "s_ema": jnp.broadcast_to(s_ema[..., None], s_pred.shape)}


def rpt_reward(policy_logprobs_bkgh, policy_argmax_bkgh, targets_bkh, ema_logprobs_bkh):
    """`rpt` in the registry's signature."""
    del ema_logprobs_bkh
    hit = rpt(policy_argmax_bkgh, targets_bkh)
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
