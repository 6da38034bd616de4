"""The math of one RLP step, pure and un-jitted (`rlp_jax.train.step` jits it and applies the update):

rollout_phase   the EMA teacher's no-think log-probs (S_ema's source), the positions that think, and
                G thoughts per position sampled off the shared prefix; nothing here is differentiated
rlp_objective   the differentiable loss of given thoughts: one policy forward of the documents, one
                branch forward of the thoughts that gives both the thought tokens' log-probs and S_pred,
                the reward (S_pred - S_ema, `reward`), group-relative advantages, the clipped loss

Shapes: B rows, L tokens, K positions per row, G thoughts per position, T thought slots, H horizon.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlp_jax.model import family as model
from rlp_jax.model.family import Config
from rlp_jax.rlp import advantages as adv_lib
from rlp_jax.rlp import positions, reward
from rlp_jax.rlp import reference as naive
from rlp_jax.rlp.config import RLPConfig
from rlp_jax.rlp.losses import combined_loss, rlp_loss, shifted_ntp_loss
from rlp_jax.rlp.prompt import prompt_context
from rlp_jax.rlp.rollout import Thoughts, thought_forward, thought_rollout
from rlp_jax.rlp.teacher import teacher_logprobs


def _branch_forward_fn(naive_path: bool, batch, prompt_ids=()):
    """The thought forward of the fast shared-prefix path, or of the naive reference path."""
    if not naive_path:
        return thought_forward
    return lambda p, c, _prefix, t, th, tg, ro: naive.naive_thought_forward(p, c, batch, t, th, tg, ro,
                                                                             prompt_ids=prompt_ids)


def rlp_objective(params, cfg: Config, rlp: RLPConfig, batch, thoughts: Thoughts, t_bk, t_mask_bk,
                  ema_lp_bl, ref_params=None, *, naive_path: bool = False, rlp_scale=1.0, ntp_scale=1.0):
    """The RLP loss of given thoughts, differentiable in params (the loss forward of docs/method.md).

    Args:
      params: policy params. batch: dict of [B, L] arrays. thoughts: sampled `Thoughts` [B, K, G, T].
      t_bk: [B, K] positions; t_mask_bk: [B, K] bool (valid positions).
      ema_lp_bl: [B, L] float32 no-think teacher log-probs (`teacher_logprobs`).
      ref_params: reference params for the KL term (needed when rlp.loss.kl_beta > 0).
      naive_path: score every thought as its own sequence (`rlp_jax.rlp.reference`, the reference and the
        benchmark baseline) instead of as a branch of the shared prefix.
      rlp_scale, ntp_scale: [] float32 factors of the RLP and next-token terms in the returned loss
        (micro-batching weighs each micro-batch by its share of the batch's thoughts and tokens);
        the metrics stay unscaled.
    Returns:
      (loss, (metrics dict, rewards [B, K, G], advantages [B, K, G])).
    """
    h = rlp.reward.horizon
    lc = rlp.loss
    # The documents' full-vocab logits are only needed by the next-token term.
    # With a prompt, the policy reads the documents after it; the next-token term reads them plain.
    ctx = prompt_context(params, cfg, rlp)
    logits_doc, prefix = model.forward(params, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                                       positions_bl=batch["positions"], return_cache=True,
                                       return_logits=lc.ntp_weight > 0 and ctx is None, context=ctx,
                                       branch_positions_bk=t_bk)
    if lc.ntp_weight > 0 and ctx is not None:
        logits_doc, _ = model.forward(params, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                                      positions_bl=batch["positions"])
    targets = reward.gather_horizon(batch["tokens"], t_bk, h)                    # [B, K, H]
    ema_t = reward.gather_horizon(ema_lp_bl, t_bk, h)                            # [B, K, H]
    forward_fn = _branch_forward_fn(naive_path, batch, rlp.prompt.ids)
    new_lp, tgt_lp, tgt_argmax = forward_fn(params, cfg, prefix, t_bk, thoughts, targets, rlp.rollout)
    rewards, terms = reward.get_reward_fn(rlp.reward.kind)(
        jax.lax.stop_gradient(tgt_lp), tgt_argmax, targets, jax.lax.stop_gradient(ema_t))
    valid = jnp.broadcast_to(t_mask_bk[:, :, None], rewards.shape)               # [B, K, G]
    if lc.baseline == "group":
        adv = adv_lib.group_advantages(rewards, valid, std_normalize=lc.std_normalize)
    else:
        adv = adv_lib.batch_advantages(rewards, valid, std_normalize=lc.std_normalize)
    t_max = thoughts.tokens.shape[-1]
    action = thoughts.action_mask & valid[..., None]
    ref_lp = None
    if lc.kl_beta > 0:
        ref = jax.lax.stop_gradient(ref_params)
        _, ref_prefix = model.forward(ref, cfg, batch["tokens"],
                                      segment_ids_bl=batch["segment_ids"], positions_bl=batch["positions"],
                                      return_cache=True, return_logits=False, context=prompt_context(ref, cfg, rlp),
                                      branch_positions_bk=t_bk)
        ref_lp = forward_fn(ref, cfg, ref_prefix, t_bk, thoughts, targets, rlp.rollout)[0].reshape(-1, t_max)
    new_flat, act = new_lp.reshape(-1, t_max), action.reshape(-1, t_max)
    # One update per rollout: the surrogate's old policy is the current one, so the importance ratio is
    # exactly 1 in value and its gradient is the policy gradient. The sampler's own log-probs differ from
    # these recomputed ones by numerics alone (token-by-token decoding vs whole branches: up to ~2% under
    # bfloat16); they serve only the policy/max_abs_ratio_minus_1 diagnostic.
    old_flat = jax.lax.stop_gradient(new_flat)
    loss_rlp, metrics = rlp_loss(new_flat, old_flat, adv.reshape(-1), act, (lc.eps_low, lc.eps_high),
                                 ref_logprobs=ref_lp, kl_beta=lc.kl_beta, rewards=rewards.reshape(-1))
    sampler_gap = jnp.abs(jnp.exp(old_flat - thoughts.logprobs.reshape(-1, t_max)) - 1.0)
    metrics["policy/max_abs_ratio_minus_1"] = jnp.max(jnp.where(act, sampler_gap, 0.0))
    if lc.ntp_weight > 0:
        ntp = shifted_ntp_loss(logits_doc, batch["tokens"], batch["segment_ids"])
        loss = combined_loss(rlp_scale * loss_rlp, ntp_scale * ntp, lc.ntp_weight)
        metrics["loss/ntp"] = ntp
    else:
        loss = rlp_scale * loss_rlp
    n_valid = jnp.maximum(valid.sum(), 1)
    vmean = lambda x: jnp.sum(jnp.where(valid, x, 0.0)) / n_valid
    metrics.update({
        "loss/total": loss,
        "reward/s_pred": vmean(terms["s_pred"]),
        "reward/s_ema": vmean(terms.get("s_ema", jnp.zeros_like(rewards))),
        "reward/std": jnp.sqrt(vmean((rewards - vmean(rewards)) ** 2)),
        "advantage/std": jnp.sqrt(vmean(adv ** 2)),
        "advantage/zero_spread_groups": adv_lib.zero_spread_fraction(rewards, valid),
        "positions/valid_fraction": t_mask_bk.mean(),
    })
    return loss, (metrics, rewards, adv)


def rollout_metrics(thoughts: Thoughts, t_mask_bk):
    valid = jnp.broadcast_to(t_mask_bk[:, :, None], thoughts.lengths.shape)
    n = jnp.maximum(valid.sum(), 1)
    lengths = thoughts.lengths.astype(jnp.float32)
    return {
        "thought/mean_len": jnp.sum(jnp.where(valid, lengths, 0.0)) / n,
        "thought/min_len": jnp.where(valid.any(), jnp.min(jnp.where(valid, lengths, jnp.inf)), 0.0),
        "thought/max_len": jnp.max(jnp.where(valid, lengths, 0.0)),
        "thought/ended_fraction": jnp.sum(valid & thoughts.ended) / n,
    }


def rollout_phase(state, batch, rng, *, cfg: Config, rlp: RLPConfig, naive_path: bool):
    """Teacher log-probs [B, L], positions [B, K] (+ mask) and sampled thoughts [B, K, G, T] of one
    (micro-)batch; nothing here is differentiated."""
    k_pos, k_roll = jax.random.split(rng)
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    ema_lp = teacher_logprobs(state.ema_params, cfg, batch, rlp)                 # [B, L]
    t_bk, t_mask = positions.select_positions(k_pos, seg, pos, ema_lp, rlp.rollout, rlp.reward.horizon)
    if naive_path:
        thoughts = naive.naive_thought_rollout(state.params, cfg, batch, t_bk, k_roll, rlp.rollout,
                                               prompt_ids=rlp.prompt.ids)
    else:
        policy = jax.lax.stop_gradient(state.params)
        _, prefix = model.forward(policy, cfg, tokens, segment_ids_bl=seg, positions_bl=pos, return_cache=True,
                                  return_logits=False, context=prompt_context(policy, cfg, rlp), branch_positions_bk=t_bk)
        thoughts = thought_rollout(state.params, cfg, prefix, t_bk, k_roll, rlp.rollout)
    return ema_lp, t_bk, t_mask, thoughts


def thoughts_with_actions(thoughts: Thoughts, t_mask_bk) -> jax.Array:
    """[] float32: thoughts at valid positions with at least one action token (rlp_loss's R')."""
    action = thoughts.action_mask & t_mask_bk[:, :, None, None]
    return (action.sum(-1) > 0).sum().astype(jnp.float32)
