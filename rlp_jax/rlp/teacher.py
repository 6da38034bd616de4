"""The no-think teacher: an exponential moving average of the policy weights (docs/method.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlp_jax.model import family
from rlp_jax.model.family import Config
from rlp_jax.model.scoring import shifted_token_logprobs_chunked
from rlp_jax.rlp.prompt import prompt_context


def init_ema(params):
    """EMA params initialised to theta (a copy, never aliasing it), in float32: (1 - tau) updates vanish in bf16."""
    return jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params)


def ema_update(ema_params, params, decay: float):
    """phi <- decay * phi + (1 - decay) * theta, leaf by leaf, in the EMA's dtype."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
                        ema_params, params)


def _as_compute(params, cfg: Config):
    return jax.tree.map(lambda p: p.astype(cfg.jnp_param_dtype), params)


def teacher_logprobs(ema_params, cfg: Config, batch, prompt_ids: tuple[int, ...] = ()) -> jax.Array:
    """log p_ema(x_j | x_<j) for every token, from one teacher-forced pass: [B, L] float32, no gradient.
    prompt_ids: a prompt the teacher reads first (`Objective.teacher_prompt`; () = the plain text)."""
    ema = _as_compute(jax.lax.stop_gradient(ema_params), cfg)
    ctx = prompt_context(ema, cfg, prompt_ids)
    hidden, _ = family.forward(ema, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                              positions_bl=batch["positions"], return_hidden=True, context=ctx)
    return shifted_token_logprobs_chunked(ema, cfg, hidden, batch["tokens"])
