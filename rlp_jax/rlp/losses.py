"""Loss functions over arrays (docs/method.md step 5). They take log-probs, not models, so they compose
with any model that can score tokens. Shapes: R thoughts, T thought slots, B rows, L tokens, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _clip_range(clip_eps):
    if isinstance(clip_eps, (tuple, list)):
        low, high = clip_eps
    else:
        low = high = clip_eps
    return float(low), float(high)


def rlp_loss(new_logprobs, old_logprobs, advantages, thought_mask, clip_eps=0.2, *, ref_logprobs=None,
             kl_beta: float = 0.0, rewards=None):
    """Clipped policy-gradient surrogate over thought tokens.

    L = -1/R' sum_thoughts (1/|c|) sum_k min(rho_k A, clip(rho_k, 1 - eps_low, 1 + eps_high) A)
        + kl_beta * (same averaging of the per-token KL estimate to the reference)
    with rho_k = exp(new - old), R' the thoughts with at least one action token.

    Args:
      new_logprobs: [R, T] float32, log pi_theta of the sampled thought tokens (differentiable).
      old_logprobs: [R, T] float32, behaviour log-probs log pi_old (constants).
      advantages: [R] float32 (constants). thought_mask: [R, T] bool, action tokens.
      clip_eps: float, or (eps_low, eps_high) for asymmetric clipping.
      ref_logprobs: [R, T] log-probs of a reference policy, needed when kl_beta > 0 (k3 estimator
        exp(ref - new) - (ref - new) - 1, non-negative, unbiased for KL(pi_theta || pi_ref)).
      rewards: optional [R] rewards, only for the metrics.
    Returns:
      (loss scalar float32, metrics dict of scalars).
    """
    eps_low, eps_high = _clip_range(clip_eps)
    mask = thought_mask.astype(jnp.float32)
    old = jax.lax.stop_gradient(old_logprobs)
    adv = jax.lax.stop_gradient(advantages)[:, None]
    log_ratio = jnp.where(thought_mask, new_logprobs - old, 0.0)
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    objective = jnp.minimum(unclipped, clipped)                              # [R, T]
    per_token = -objective
    kl = jnp.zeros_like(per_token)
    if kl_beta > 0:
        if ref_logprobs is None:
            raise ValueError("rlp_loss: kl_beta > 0 needs ref_logprobs")
        # Masked before exp: an off-mask overflow would turn the gradient into 0 * inf = NaN.
        diff = jnp.where(thought_mask, jax.lax.stop_gradient(ref_logprobs) - new_logprobs, 0.0)
        kl = jnp.where(thought_mask, jnp.exp(diff) - diff - 1.0, 0.0)
        per_token = per_token + kl_beta * kl
    lengths = mask.sum(-1)                                                   # [R]
    has = lengths > 0
    n_thoughts = jnp.maximum(has.sum(), 1)

    def thought_mean(x):
        return jnp.sum(jnp.where(has, (x * mask).sum(-1) / jnp.maximum(lengths, 1.0), 0.0)) / n_thoughts

    loss = thought_mean(per_token)
    n_tokens = jnp.maximum(mask.sum(), 1.0)
    is_clipped = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    metrics = {
        "loss/rlp": loss,
        "policy/clip_fraction": (is_clipped * mask).sum() / n_tokens,
        "policy/max_abs_ratio_minus_1": jnp.max(jnp.abs(ratio - 1.0) * mask),
        "policy/entropy_estimate": -(old * mask).sum() / n_tokens,
        "policy/kl_to_ref": thought_mean(kl),
        "thought/mean_action_tokens": jnp.sum(jnp.where(has, lengths, 0.0)) / n_thoughts,
        "advantage/mean_abs": jnp.sum(jnp.where(has, jnp.abs(adv[:, 0]), 0.0)) / n_thoughts,
    }
    if rewards is not None:
        metrics["reward/mean"] = jnp.sum(jnp.where(has, rewards, 0.0)) / n_thoughts
        metrics["reward/frac_positive"] = jnp.sum(has & (rewards > 0)) / n_thoughts
    return loss, metrics


def ntp_loss(logits, targets, mask):
    """Mean next-token cross-entropy.

    logits: [..., V] (any dtype; computed in float32), targets: [...] int32, mask: [...] bool/float.
    Returns the mean of -log softmax(logits)[target] over masked-in entries (0 if none).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return (nll * m).sum() / jnp.maximum(m.sum(), 1.0)


def next_token_mask(segment_ids_bl):
    """[B, L-1] bool: position j predicts a real x_{j+1} of its own segment (the next-token targets)."""
    return (segment_ids_bl[:, 1:] == segment_ids_bl[:, :-1]) & (segment_ids_bl[:, 1:] > 0)


def shifted_ntp_loss(logits_blv, tokens_bl, segment_ids_bl):
    """Next-token loss of a packed batch: predict x_{j+1} from position j within the same segment."""
    return ntp_loss(logits_blv[:, :-1], tokens_bl[:, 1:], next_token_mask(segment_ids_bl))


def combined_loss(rlp, ntp, ntp_weight: float):
    """lambda * ntp + rlp (lambda = 0: pure RLP, the paper)."""
    return rlp + ntp_weight * ntp
