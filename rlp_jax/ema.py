"""The no-think teacher: an exponential moving average of the policy weights (RLP_METHOD.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_ema(params):
    """EMA params initialised to theta (a copy, never aliasing it), in float32: (1 - tau) updates vanish in bf16."""
    return jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params)


def ema_update(ema_params, params, decay: float):
    """phi <- decay * phi + (1 - decay) * theta, leaf by leaf, in the EMA's dtype."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
                        ema_params, params)
