"""Group-relative advantages (docs/method.md step 4). Groups are an explicit axis: [..., G]."""

from __future__ import annotations

import chex
import jax.numpy as jnp


def group_advantages(rewards, mask, *, std_normalize: bool = False, eps: float = 1e-6):
    """Leave-one-out advantages within each group of G thoughts.

    A_i = G'/(G'-1) * (r_i - mean_j r_j) = r_i - mean_{j != i} r_j, where G' counts the valid thoughts
    of the group. Masked thoughts get 0 and do not enter the mean; a group with fewer than 2 valid
    thoughts gets 0 everywhere. Sums to zero over each group; invariant to adding a constant to a group.

    Args:
      rewards: [..., G] float32. mask: [..., G] bool (valid thoughts).
      std_normalize: divide by the group's (population) std of valid rewards, plus eps.
    Returns: advantages [..., G] float32.
    """
    chex.assert_equal_shape([rewards, mask])
    if rewards.shape[-1] < 2:
        raise ValueError(f"group advantages need G >= 2 thoughts per group, got G = {rewards.shape[-1]}")
    m = mask.astype(jnp.float32)
    count = m.sum(-1, keepdims=True)
    mean = (rewards * m).sum(-1, keepdims=True) / jnp.maximum(count, 1.0)
    centred = (rewards - mean) * m
    adv = centred * count / jnp.maximum(count - 1.0, 1.0)
    if std_normalize:
        std = jnp.sqrt((centred ** 2).sum(-1, keepdims=True) / jnp.maximum(count, 1.0))
        adv = adv / (std + eps)
    return jnp.where(count >= 2, adv, 0.0) * m


def batch_advantages(rewards, mask, *, std_normalize: bool = False, eps: float = 1e-6):
    """Advantages centred over all valid thoughts of the batch (the `batch` baseline; any shape)."""
    chex.assert_equal_shape([rewards, mask])
    m = mask.astype(jnp.float32)
    count = jnp.maximum(m.sum(), 1.0)
    centred = (rewards - (rewards * m).sum() / count) * m
    if std_normalize:
        centred = centred / (jnp.sqrt((centred ** 2).sum() / count) + eps)
    return centred


def zero_spread_fraction(rewards, mask, tol: float = 1e-6):
    """Share of groups (with >= 2 valid thoughts) whose rewards are all equal: they teach nothing."""
    m = mask.astype(bool)
    hi = jnp.where(m, rewards, -jnp.inf).max(-1)
    lo = jnp.where(m, rewards, jnp.inf).min(-1)
    real = m.sum(-1) >= 2
    return jnp.sum(real & (hi - lo <= tol)) / jnp.maximum(real.sum(), 1)
