"""The math of one RLP step (docs/method.md steps 1-5), pure and un-jitted; `rlp_jax.train.train_step` jits it,
runs it per micro-batch and applies the update. Read top to bottom:

    rollout = rollout_phase(state, cfg, objective, batch, rng)      # S_ema, positions, G thoughts each
    out, grads = loss_and_grad(state.params, cfg, objective, batch, rollout)
        scores, pullback = vjp(score)     # the one differentiable forward: thought log-probs (and S_pred)
        graded = grade(...)               # reward S_pred - S_ema and group advantages: constants, computed once
        loss = surrogate(scores, graded)  # the clipped loss on thought tokens (+ the next-token term)
        grads = pullback(d loss / d scores)

Every function takes typed values (`Objective`, `Rollout`, `Scores`, `Graded`). An `Objective` is what the
math reads besides arrays: the settings (`RLPConfig`), the token ids of the run's tokenizer (`ThinkIds`)
and how thoughts are sampled and scored, a `ThoughtPath`: `SHARED_PREFIX` (branches of one prefix cache per
document) or `rlp_jax.rlp.naive.NAIVE` (every thought its own sequence, the reference the tests compare against).

Shapes: B rows, L tokens, K positions per row, G thoughts per position, T thought slots, H horizon.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from rlp_jax.model import family
from rlp_jax.model.family import Config
from rlp_jax.rlp import advantages, positions, reward
from rlp_jax.rlp.config import RLPConfig
from rlp_jax.rlp.losses import (
    next_token_count,
    rlp_loss,
    rlp_loss_metrics,
    shifted_ntp_loss,
)
from rlp_jax.rlp.prompt import prompt_context
from rlp_jax.rlp.rollout import Thoughts, thought_forward, thought_rollout
from rlp_jax.rlp.teacher import teacher_logprobs
from rlp_jax.rlp.think_ids import ThinkIds


@flax.struct.dataclass
class Rollout:
    """What the rollout phase hands the loss; nothing in it is differentiated.

    ema_logprobs: [B, L] float32 log p_ema(x_j | x_<j) (S_ema's source). positions: [B, K] int32 t.
    mask: [B, K] bool valid positions. thoughts: the sampled `Thoughts` [B, K, G, T].
    reference_logprobs: [B, K, G, T] float32 log-probs of the thought tokens under the frozen KL reference
      (None when loss.kl_beta = 0).
    """

    ema_logprobs: jax.Array
    positions: jax.Array
    mask: jax.Array
    thoughts: Thoughts
    reference_logprobs: jax.Array | None = None

    def targets(self, batch, horizon: int) -> jax.Array:
        """[B, K, H] int32: the true tokens x_t .. x_{t+H-1} each thought predicts."""
        return reward.gather_horizon(batch["tokens"], self.positions, horizon)


@flax.struct.dataclass
class Scores:
    """The differentiable outputs of the loss forward: thought_logprobs [B, K, G, T] float32 (log pi_theta of
    each sampled thought token, 0 off the action mask) and ntp_loss [] float32 (0 when the term is off)."""

    thought_logprobs: jax.Array
    ntp_loss: jax.Array


@flax.struct.dataclass
class Graded:
    """Rewards and advantages of the thoughts, [B, K, G] float32 (constants of the gradient), valid [B, K, G]
    bool, and the reward's terms for the metrics (s_pred, s_ema)."""

    rewards: jax.Array
    advantages: jax.Array
    valid: jax.Array
    terms: dict


@flax.struct.dataclass
class StepOut:
    """loss [] (as scaled for accumulation), metrics (each reduced as `METRIC_REDUCTIONS` says), rewards and
    advantages [B, K, G]."""

    loss: jax.Array
    metrics: dict
    rewards: jax.Array
    advantages: jax.Array


@dataclasses.dataclass(frozen=True)
class ThoughtPath:
    """How thoughts are sampled and scored.

    sample(params, cfg, objective, batch, t_bk, rng) -> Thoughts (no gradient).
    score(params, cfg, objective, batch, prefix, t_bk, thoughts, targets_bkh) -> (thought log-probs [B, K, G, T],
      target log-probs [B, K, G, H], target argmax [B, K, G, H]) as `rollout.thought_forward`; `prefix` is the
      documents' cache under `params` (a path may ignore it).
    """

    name: str
    sample: Callable
    score: Callable


def documents_forward(params, cfg: Config, objective: Objective, batch, *, t_bk=None, logits: bool = False):
    """The policy's forward over the documents (after the prompt, if any): (logits or None, prefix cache).
    t_bk [B, K]: the positions a hybrid's prefix keeps Mamba states at."""
    return family.forward(params, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                         positions_bl=batch["positions"], return_cache=True, return_logits=logits,
                         context=prompt_context(params, cfg, objective.ids.prompt), branch_positions_bk=t_bk)


def _sample_shared_prefix(params, cfg, objective, batch, t_bk, rng):
    policy = jax.lax.stop_gradient(params)
    _, prefix = documents_forward(policy, cfg, objective, batch, t_bk=t_bk)
    return thought_rollout(policy, cfg, prefix, t_bk, rng, objective.rlp.rollout, objective.ids)


def _score_shared_prefix(params, cfg, objective, batch, prefix, t_bk, thoughts, targets):
    del batch
    return thought_forward(params, cfg, prefix, t_bk, thoughts, targets, objective.rlp.rollout, objective.ids)


SHARED_PREFIX = ThoughtPath("shared_prefix", _sample_shared_prefix, _score_shared_prefix)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the math of a step reads besides arrays (hashable: a static argument of the jitted step).

    rlp: the settings (`RLPConfig`, from the run's config). ids: the ids of the run's tokenizer
    (`think_ids.think_ids(rlp, tokenizer)`: a runtime value, never in a config file). path: how thoughts
    are sampled and scored (`SHARED_PREFIX`, or `naive.NAIVE`, the reference).
    """

    rlp: RLPConfig
    ids: ThinkIds
    path: ThoughtPath = SHARED_PREFIX

    @property
    def teacher_prompt(self) -> tuple[int, ...]:
        """The prompt the EMA teacher reads before the documents: the policy's with `rlp.prompt.teacher_sees`."""
        return self.ids.prompt if self.rlp.prompt.teacher_sees else ()


def rollout_phase(state, cfg: Config, objective: Objective, batch, rng) -> Rollout:
    """Steps 1-2 of one (micro-)batch: the EMA teacher's no-think log-probs, the positions, G thoughts each
    (and their log-probs under the KL reference when it is on). `state` holds params, ema_params, ref_params."""
    rlp = objective.rlp
    k_pos, k_roll = jax.random.split(rng)
    ema_lp = teacher_logprobs(state.ema_params, cfg, batch, objective.teacher_prompt)      # [B, L]
    t_bk, t_mask = positions.select_positions(k_pos, batch["segment_ids"], batch["positions"], ema_lp,
                                              rlp.rollout, rlp.reward.horizon,
                                              positions.word_start_mask(batch["tokens"], objective.ids.word_starts))
    thoughts = objective.path.sample(state.params, cfg, objective, batch, t_bk, k_roll)
    out = Rollout(ema_logprobs=ema_lp, positions=t_bk, mask=t_mask, thoughts=thoughts)
    if rlp.loss.kl_beta > 0:
        out = with_reference(state.ref_params, cfg, objective, batch, out)
    return out


def with_reference(ref_params, cfg: Config, objective: Objective, batch, rollout: Rollout) -> Rollout:
    """`rollout` with the log-probs of its thought tokens under the frozen KL reference `ref_params`."""
    ref = jax.lax.stop_gradient(ref_params)
    _, prefix = documents_forward(ref, cfg, objective, batch, t_bk=rollout.positions)
    lp = objective.path.score(ref, cfg, objective, batch, prefix, rollout.positions, rollout.thoughts,
                              rollout.targets(batch, objective.rlp.reward.horizon))[0]
    return rollout.replace(reference_logprobs=lp)


def score(params, cfg: Config, objective: Objective, batch, rollout: Rollout):
    """The loss forward: one pass over the documents and one over the thoughts as branches of it.
    Returns (Scores, (target log-probs S_pred terms [B, K, G, H], target argmax [B, K, G, H])): the second
    part is read by `grade` only (constants of the gradient)."""
    rlp = objective.rlp
    need_ntp = rlp.loss.ntp_weight > 0
    plain = not objective.ids.prompt   # with a prompt, the next-token term reads the documents without it
    logits, prefix = documents_forward(params, cfg, objective, batch, t_bk=rollout.positions,
                                       logits=need_ntp and plain)
    ntp = jnp.zeros((), jnp.float32)
    if need_ntp:
        if not plain:
            logits, _ = family.forward(params, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                                      positions_bl=batch["positions"])
        ntp = shifted_ntp_loss(logits, batch["tokens"], batch["segment_ids"])
    targets = rollout.targets(batch, rlp.reward.horizon)
    new_lp, tgt_lp, tgt_argmax = objective.path.score(params, cfg, objective, batch, prefix, rollout.positions,
                                                      rollout.thoughts, targets)
    return Scores(thought_logprobs=new_lp, ntp_loss=ntp), jax.lax.stop_gradient((tgt_lp, tgt_argmax))


def grade(predicted, batch, rollout: Rollout, rlp: RLPConfig) -> Graded:
    """Step 3-4: the reward of each thought (`rlp.reward.kind`; RLP: S_pred - S_ema) and its advantage.
    predicted: (target log-probs, target argmax) from `score`."""
    tgt_lp, tgt_argmax = predicted
    h = rlp.reward.horizon
    ema_t = reward.gather_horizon(rollout.ema_logprobs, rollout.positions, h)               # [B, K, H]
    rewards, terms = reward.get_reward_fn(rlp.reward.kind)(tgt_lp, tgt_argmax, rollout.targets(batch, h), ema_t)
    valid = jnp.broadcast_to(rollout.mask[:, :, None], rewards.shape)
    advantage_fn = advantages.group_advantages if rlp.loss.baseline == "group" else advantages.batch_advantages
    adv = advantage_fn(rewards, valid, std_normalize=rlp.loss.std_normalize)
    return Graded(rewards=rewards, advantages=adv, valid=valid, terms=terms)


@flax.struct.dataclass
class Scale:
    """Factors of the RLP and next-token terms in a micro-batch's loss: its shares of the batch's thoughts
    and target tokens (1 and 1 for a whole batch)."""

    rlp: jax.Array = 1.0
    ntp: jax.Array = 1.0


def surrogate(scores: Scores, graded: Graded, rollout: Rollout, rlp: RLPConfig, scale: Scale = Scale()):
    """Step 5: the clipped policy-gradient loss on the thought tokens (+ ntp_weight x the next-token loss).
    Returns (loss, metrics). One update per rollout: the old policy is the current one (ratio exactly 1)."""
    lc, thoughts = rlp.loss, rollout.thoughts
    t_max = thoughts.tokens.shape[-1]
    new_flat = scores.thought_logprobs.reshape(-1, t_max)
    act = (thoughts.action_mask & graded.valid[..., None]).reshape(-1, t_max)
    old_flat = jax.lax.stop_gradient(new_flat)
    ref = None if rollout.reference_logprobs is None else rollout.reference_logprobs.reshape(-1, t_max)
    args = (new_flat, old_flat, graded.advantages.reshape(-1), act, (lc.eps_low, lc.eps_high))
    loss_rlp = rlp_loss(*args, ref_logprobs=ref, kl_beta=lc.kl_beta)
    metrics = {"loss/rlp": loss_rlp, **rlp_loss_metrics(*args, ref_logprobs=ref, rewards=graded.rewards.reshape(-1))}
    loss = scale.rlp * loss_rlp
    if lc.ntp_weight > 0:
        loss = loss + lc.ntp_weight * scale.ntp * scores.ntp_loss
        metrics["loss/ntp"] = scores.ntp_loss
    # The sampler's own log-probs differ from the recomputed ones by numerics alone (token by token vs whole
    # branches: up to ~2% under bfloat16); a diagnostic only.
    sampler_gap = jnp.abs(jnp.exp(old_flat - thoughts.logprobs.reshape(-1, t_max)) - 1.0)
    metrics["policy/max_abs_ratio_minus_1"] = jnp.max(jnp.where(act, sampler_gap, 0.0))
    valid, rewards, adv = graded.valid, graded.rewards, graded.advantages
    vmean = lambda x: jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(valid.sum(), 1)   # noqa: E731
    metrics.update({
        "loss/total": loss,
        "reward/s_pred": vmean(graded.terms["s_pred"]),
        "reward/s_ema": vmean(graded.terms.get("s_ema", jnp.zeros_like(rewards))),
        "reward/sq_mean": vmean(rewards ** 2),
        "advantage/sq_mean": vmean(adv ** 2),
        "advantage/zero_spread_groups": advantages.zero_spread_fraction(rewards, valid),
        "positions/valid_fraction": rollout.mask.mean(),
    })
    return loss, metrics


def loss_and_grad(params, cfg: Config, objective: Objective, batch, rollout: Rollout,
                  scale: Scale = Scale()) -> tuple[StepOut, dict]:
    """Steps 3-5 of one (micro-)batch: (StepOut, gradient of the loss in params). The forward runs once:
    its thought log-probs are differentiated, its S_pred terms give the rewards (outside the differentiation)."""
    scores, pullback, predicted = jax.vjp(lambda p: score(p, cfg, objective, batch, rollout), params, has_aux=True)
    graded = grade(predicted, batch, rollout, objective.rlp)
    (loss, metrics), d_scores = jax.value_and_grad(surrogate, has_aux=True)(scores, graded, rollout, objective.rlp,
                                                                            scale)
    (grads,) = pullback(d_scores)
    return StepOut(loss=loss, metrics=metrics, rewards=graded.rewards, advantages=graded.advantages), grads


# How each metric of a micro-batch combines over micro-batches (`train.train_step.combine_metrics`):
# "thoughts" / "tokens" / "ntp_tokens": weighted by the micro-batch's share of the batch's thoughts, action
# tokens or next-token targets; "rows": a plain mean (micro-batches have equal rows); "sum"; "max"; "min".
METRIC_REDUCTIONS = {
    "loss/total": "sum", "loss/rlp": "thoughts", "loss/ntp": "ntp_tokens",
    "policy/clip_fraction": "tokens", "policy/entropy_estimate": "tokens", "policy/max_abs_ratio_minus_1": "max",
    "policy/kl_to_ref": "thoughts", "thought/mean_action_tokens": "thoughts", "advantage/mean_abs": "thoughts",
    "reward/mean": "thoughts", "reward/frac_positive": "thoughts", "reward/s_pred": "thoughts",
    "reward/s_ema": "thoughts", "reward/sq_mean": "thoughts", "advantage/sq_mean": "thoughts",
    "advantage/zero_spread_groups": "thoughts", "positions/valid_fraction": "rows",
}


def finish_metrics(metrics: dict) -> dict:
    """The combined metrics with the moments turned into standard deviations over the batch's thoughts."""
    out = dict(metrics)
    sq, adv_sq = out.pop("reward/sq_mean"), out.pop("advantage/sq_mean")
    out["reward/std"] = jnp.sqrt(jnp.maximum(sq - out["reward/mean"] ** 2, 0.0))
    out["advantage/std"] = jnp.sqrt(adv_sq)
    return out


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


def accumulation_weights(rollout: Rollout, batch) -> dict:
    """[] float32 counts of one micro-batch that its metrics and loss terms are weighted by: thoughts with an
    action token, action tokens, next-token targets."""
    action = rollout.thoughts.action_mask & rollout.mask[:, :, None, None]
    return {"thoughts": (action.sum(-1) > 0).sum().astype(jnp.float32),
            "tokens": action.sum().astype(jnp.float32),
            "ntp_tokens": next_token_count(batch["segment_ids"])}
