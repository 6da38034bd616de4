"""Loss functions over arrays (docs/method.md step 5). They take log-probs, not models, so they compose
with any model that can score tokens. Shapes: R thoughts, T thought slots, B rows, L tokens, V vocabulary.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def _clip_range(clip_eps):
    if isinstance(clip_eps, (tuple, list)):
        low, high = clip_eps
    else:
        low = high = clip_eps
    return float(low), float(high)


def _surrogate_terms(new_logprobs, old_logprobs, advantages, thought_mask, clip_eps, ref_logprobs, kl_beta):
    """Per-token pieces shared by `rlp_loss` and `rlp_loss_metrics` (shapes checked here: [R, T] and [R])."""
    chex.assert_rank(new_logprobs, 2)
    chex.assert_equal_shape([new_logprobs, old_logprobs, thought_mask]
                            + ([ref_logprobs] if ref_logprobs is not None else []))
    chex.assert_shape(advantages, new_logprobs.shape[:1])
    eps_low, eps_high = _clip_range(clip_eps)
    mask = thought_mask.astype(jnp.float32)
    old = jax.lax.stop_gradient(old_logprobs)
    adv = jax.lax.stop_gradient(advantages)[:, None]
    ratio = jnp.exp(jnp.where(thought_mask, new_logprobs - old, 0.0))
    objective = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)   # [R, T]
    kl = jnp.zeros_like(objective)
    if ref_logprobs is not None:
        # Masked before exp: an off-mask overflow would turn the gradient into 0 * inf = NaN.
        diff = jnp.where(thought_mask, jax.lax.stop_gradient(ref_logprobs) - new_logprobs, 0.0)
        kl = jnp.where(thought_mask, jnp.exp(diff) - diff - 1.0, 0.0)
    elif kl_beta > 0:
        raise ValueError("rlp_loss: kl_beta > 0 needs ref_logprobs")
    lengths = mask.sum(-1)                                                   # [R]
    return dict(mask=mask, old=old, adv=adv, ratio=ratio, objective=objective, kl=kl, lengths=lengths,
                has=lengths > 0, eps=(eps_low, eps_high))


def _per_thought(x, t):
    """[R, T] -> [R]: the token mean over each thought's action tokens (0 for a thought without any)."""
    return jnp.where(t["has"], (x * t["mask"]).sum(-1) / jnp.maximum(t["lengths"], 1.0), 0.0)


def _thought_mean(x_r, t):
    return jnp.sum(jnp.where(t["has"], x_r, 0.0)) / jnp.maximum(t["has"].sum(), 1)


def rlp_loss(new_logprobs, old_logprobs, advantages, thought_mask, clip_eps=0.2, *, ref_logprobs=None,
             kl_beta: float = 0.0, reduction: str = "mean"):
    """Clipped policy-gradient surrogate over thought tokens (docs/method.md step 5).

    Per thought: l = -(1/|c|) sum_k min(rho_k A, clip(rho_k, 1 - eps_low, 1 + eps_high) A)
                     + kl_beta * (1/|c|) sum_k KL_k,       rho_k = exp(new_k - old_k);
    reduction "mean": L = 1/R' sum over the R' thoughts with at least one action token; "none": [R] per-thought
    losses (0 for thoughts without action tokens), for your own weighting.

    Args:
      new_logprobs: [R, T] float32, log pi_theta of the sampled thought tokens (differentiable).
      old_logprobs: [R, T] float32, behaviour log-probs log pi_old (constants).
      advantages: [R] float32 (constants). thought_mask: [R, T] bool, action tokens.
      clip_eps: float, or (eps_low, eps_high) for asymmetric clipping.
      ref_logprobs: [R, T] log-probs of a reference policy, needed when kl_beta > 0 (k3 estimator
        exp(ref - new) - (ref - new) - 1, non-negative, unbiased for KL(pi_theta || pi_ref)).
    Returns: the loss, float32 [] or [R]. Metrics: `rlp_loss_metrics`.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"rlp_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    t = _surrogate_terms(new_logprobs, old_logprobs, advantages, thought_mask, clip_eps, ref_logprobs, kl_beta)
    per_token = -t["objective"] + (kl_beta * t["kl"] if kl_beta > 0 else 0.0)
    per_thought = _per_thought(per_token, t)
    return per_thought if reduction == "none" else _thought_mean(per_thought, t)


def rlp_loss_metrics(new_logprobs, old_logprobs, advantages, thought_mask, clip_eps=0.2, *, ref_logprobs=None,
                     rewards=None) -> dict:
    """Diagnostics of `rlp_loss`'s inputs, scalars: the clip fraction and entropy estimate (per action token),
    max |rho - 1|, the KL to the reference, action tokens, |A| and (given `rewards` [R]) the reward's mean and
    positive fraction per thought with an action token."""
    t = _surrogate_terms(new_logprobs, old_logprobs, advantages, thought_mask, clip_eps, ref_logprobs, 0.0)
    mask, adv, ratio = t["mask"], t["adv"], t["ratio"]
    eps_low, eps_high = t["eps"]
    n_tokens = jnp.maximum(mask.sum(), 1.0)
    is_clipped = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    metrics = {
        "policy/clip_fraction": (is_clipped * mask).sum() / n_tokens,
        "policy/max_abs_ratio_minus_1": jnp.max(jnp.abs(ratio - 1.0) * mask),
        "policy/entropy_estimate": -(t["old"] * mask).sum() / n_tokens,
        "policy/kl_to_ref": _thought_mean(_per_thought(t["kl"], t), t),
        "thought/mean_action_tokens": _thought_mean(t["lengths"], t),
        "advantage/mean_abs": _thought_mean(jnp.abs(adv[:, 0]), t),
    }
    if rewards is not None:
        metrics["reward/mean"] = _thought_mean(rewards, t)
        metrics["reward/frac_positive"] = _thought_mean((rewards > 0).astype(jnp.float32), t)
    return metrics


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


def next_token_count(segment_ids_bl):
    """[] float32: the next-token targets of a packed batch (`shifted_ntp_loss`'s denominator)."""
    return next_token_mask(segment_ids_bl).sum().astype(jnp.float32)


def shifted_ntp_loss(logits_blv, tokens_bl, segment_ids_bl):
    """Next-token loss of a packed batch: predict x_{j+1} from position j within the same segment."""
    return ntp_loss(logits_blv[:, :-1], tokens_bl[:, 1:], next_token_mask(segment_ids_bl))


def combined_loss(rlp, ntp, ntp_weight: float):
    """lambda * ntp + rlp (lambda = 0: pure RLP, the paper)."""
    return rlp + ntp_weight * ntp
