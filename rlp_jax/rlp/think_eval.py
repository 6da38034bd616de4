"""Does a thought help at given positions? The evaluation that cannot flatter (docs/method.md, evaluation).

At positions t chosen independently of the evaluated model (fixed answer positions, or a fixed key's
uniform draw), one jitted pass measures log p(x_t | ...) and whether the model's most likely token is
x_t, four ways, all through the same branch machinery the RLP step trains with:

    no thought      x_<t                              (one teacher-forced pass)
    empty thought   x_<t <think></think>              the format control: what the markers alone do
    sampled         x_<t <think> c </think>, c ~ pi   G thoughts at the rollout temperature
    greedy          x_<t <think> c* </think>          the most likely token at every slot

Information gain against no thought (`answer_info_gain`, RLP's reward with the policy as its own
teacher) and against the empty thought (`..._vs_empty`: what the thought's content adds beyond the
markers) follow on the host (`summarize`), with the NLL split by a caller-supplied judgement of each
sampled thought (e.g. a task's parser: was the stated answer right?).

Shapes: B documents, L tokens, K positions per document, G thoughts per position, T thought slots.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlp_jax.model import family
from rlp_jax.model.family import Config
from rlp_jax.model.scoring import shifted_token_logprobs
from rlp_jax.rlp import positions
from rlp_jax.rlp.losses import shifted_ntp_loss
from rlp_jax.rlp.objective import Objective
from rlp_jax.rlp.prompt import prompt_context
from rlp_jax.rlp.reward import gather_horizon
from rlp_jax.rlp.rollout import Thoughts, thought_forward, thought_rollout


@flax.struct.dataclass
class ThinkEval:
    """Per position [B, K] (per sampled thought [B, K, G]): log p of the true x_t (float32) and whether
    the argmax is x_t, with no thought, an empty thought, the sampled thoughts and the greedy thought.
    positions: [B, K] int32, the t evaluated. top_sampled: [B, K, G] int32, the argmax after each sampled thought."""

    positions: jax.Array
    top_sampled: jax.Array
    lp_none: jax.Array
    lp_empty: jax.Array
    lp_sampled: jax.Array
    lp_greedy: jax.Array
    hit_none: jax.Array
    hit_empty: jax.Array
    hit_sampled: jax.Array
    hit_greedy: jax.Array
    sampled: Thoughts
    greedy: Thoughts


def empty_thoughts(b: int, k: int) -> Thoughts:
    """One thought of no content per position: the branch reads `<think></think> x_t`."""
    zeros = jnp.zeros((b, k, 1, 1), jnp.int32)
    return Thoughts(tokens=zeros, action_mask=zeros.astype(bool), logprobs=zeros.astype(jnp.float32),
                    lengths=jnp.zeros((b, k, 1), jnp.int32), ended=jnp.zeros((b, k, 1), bool))


def evaluate_thoughts(params, cfg: Config, objective: Objective, batch, t_bk, rng) -> ThinkEval:
    """The four readings of x_t at positions `t_bk` [B, K] of `batch` (tokens, segment_ids, positions [B, L]).

    Sampled thoughts: G = rollout.group_size at rollout.temperature; greedy: top-k 1 (the first of its
    identical group). The thought sees x_<t without the prompt.
    """
    rollout, ids = objective.rlp.rollout, objective.ids
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    b, k = t_bk.shape
    logits, prefix = family.forward(params, cfg, tokens, segment_ids_bl=seg, positions_bl=pos, return_cache=True,
                                    branch_positions_bk=t_bk)
    before = jnp.take_along_axis(logits, jnp.maximum(t_bk - 1, 0)[..., None], axis=1).astype(jnp.float32)  # [B,K,V]
    targets = gather_horizon(tokens, t_bk, 1)                                           # [B, K, 1]
    x_t = targets[..., 0]
    lp_none = jnp.take_along_axis(jax.nn.log_softmax(before), x_t[..., None], axis=-1)[..., 0]
    hit_none = jnp.argmax(before, axis=-1) == x_t

    def read(thoughts):
        _, lp, top = thought_forward(params, cfg, prefix, t_bk, thoughts, targets, rollout, ids)
        return lp[..., 0], top[..., 0]                                                  # [B, K, G]

    k_sample, k_greedy = jax.random.split(rng)
    sampled = thought_rollout(params, cfg, prefix, t_bk, k_sample, rollout, ids)
    greedy_cfg = dataclasses.replace(rollout, group_size=2, top_k=1)
    greedy = jax.tree.map(lambda x: x[:, :, :1], thought_rollout(params, cfg, prefix, t_bk, k_greedy, greedy_cfg, ids))
    (lp_e, top_e), (lp_s, top_s), (lp_g, top_g) = read(empty_thoughts(b, k)), read(sampled), read(greedy)
    hit_e, hit_s, hit_g = (top == x_t[..., None] for top in (top_e, top_s, top_g))
    return ThinkEval(positions=jnp.asarray(t_bk, jnp.int32), top_sampled=top_s, lp_none=lp_none, lp_empty=lp_e[..., 0], lp_sampled=lp_s, lp_greedy=lp_g[..., 0],
                     hit_none=hit_none, hit_empty=hit_e[..., 0], hit_sampled=hit_s, hit_greedy=hit_g[..., 0],
                     sampled=sampled, greedy=greedy)


def heldout_metrics(params, batch, rng, *, cfg: Config, objective: Objective):
    """A run's held-out metrics (the training loop's eval; no update), means over valid positions drawn by
    `positions.eval_positions` (independent of the policy: the same for every model at the same key):

    eval/nll_no_think: -log p_theta(x_t | x_<t); eval/nll_think: -log p_theta(x_t | x_<t, thought), averaged over
    G sampled thoughts (after the prompt, in the prompted setting); eval/info_gain: their difference (positive:
    thinking helps); eval/nll_empty_think and eval/info_gain_vs_empty: the same with `<think></think>` (the
    format control: what a thought's content adds beyond the markers); eval/nll_tokens: next-token NLL of every
    token; eval/thought_len: mean thought length; eval/ended_fraction: the share of thoughts that sampled the
    end marker before the length limit.
    """
    rlp, ids = objective.rlp, objective.ids
    k_pos, k_roll = jax.random.split(rng)
    h = rlp.reward.horizon
    doc = dict(segment_ids_bl=batch["segment_ids"], positions_bl=batch["positions"])
    # The positions first (they depend on no model): a hybrid's prefix keeps its Mamba states at them.
    t_bk, t_mask = positions.eval_positions(k_pos, batch["segment_ids"], batch["positions"], rlp.rollout, h,
                                            positions.word_start_mask(batch["tokens"], ids.word_starts))
    ctx = prompt_context(params, cfg, ids.prompt)
    logits, prefix = family.forward(params, cfg, batch["tokens"], return_cache=ctx is None, branch_positions_bk=t_bk,
                                    **doc)
    lp = shifted_token_logprobs(logits, batch["tokens"])                   # [B, L] plain text
    no_think_lp = lp
    if ctx is not None:   # thoughts are sampled after the prompt; "no thought" reads it if the teacher does
        prompted, prefix = family.forward(params, cfg, batch["tokens"], return_cache=True,
                                          return_logits=rlp.prompt.teacher_sees, context=ctx, **doc)
        if rlp.prompt.teacher_sees:
            no_think_lp = shifted_token_logprobs(prompted, batch["tokens"])
    thoughts = thought_rollout(params, cfg, prefix, t_bk, k_roll, rlp.rollout, ids)
    targets = gather_horizon(batch["tokens"], t_bk, h)
    read = lambda th: thought_forward(params, cfg, prefix, t_bk, th, targets, rlp.rollout, ids)[1].sum(-1).mean(-1)  # noqa: E731
    think, empty = read(thoughts), read(empty_thoughts(*t_bk.shape))                        # [B, K]
    no_think = gather_horizon(no_think_lp, t_bk, h).sum(-1)                                  # [B, K]
    n = jnp.maximum(t_mask.sum(), 1)
    vmean = lambda x: jnp.sum(jnp.where(t_mask, x, 0.0)) / n                                # noqa: E731
    return {"eval/nll_no_think": -vmean(no_think), "eval/nll_think": -vmean(think),
            "eval/info_gain": vmean(think - no_think), "eval/nll_empty_think": -vmean(empty),
            "eval/info_gain_vs_empty": vmean(think - empty),
            "eval/nll_tokens": shifted_ntp_loss(logits, batch["tokens"], batch["segment_ids"]),
            "eval/thought_len": vmean(thoughts.lengths.mean(-1).astype(jnp.float32)),
            "eval/ended_fraction": vmean(thoughts.ended.mean(-1, dtype=jnp.float32))}


@functools.partial(jax.jit, static_argnames=("cfg", "objective"))
def evaluate_thoughts_jit(params, cfg: Config, objective: Objective, batch, t_bk, rng) -> ThinkEval:
    return evaluate_thoughts(params, cfg, objective, batch, t_bk, rng)


def per_position(ev: ThinkEval, mask_bk, thought_ok_bkg=None) -> dict[str, np.ndarray]:
    """Flat per-position numpy arrays [P] of the valid positions (mask_bk), for bootstrap CIs:
    info gain vs no thought / vs empty (sampled thoughts' mean log-prob), accuracies, lengths."""
    m = np.asarray(mask_bk, bool)
    g = lambda x: np.asarray(x, np.float64)[m]                                           # noqa: E731
    lp_s = np.asarray(ev.lp_sampled, np.float64)
    out = {
        "lp_none": g(ev.lp_none), "lp_empty": g(ev.lp_empty), "lp_think": lp_s.mean(-1)[m],
        "lp_greedy": g(ev.lp_greedy),
        "acc_no_think": g(ev.hit_none), "acc_empty": g(ev.hit_empty),
        "acc_think": np.asarray(ev.hit_sampled, np.float64).mean(-1)[m], "acc_greedy": g(ev.hit_greedy),
        "thought_len": np.asarray(ev.sampled.lengths, np.float64).mean(-1)[m],
        "ended": np.asarray(ev.sampled.ended, np.float64).mean(-1)[m],
        "position": np.asarray(ev.positions)[m],
    }
    out["info_gain"] = out["lp_think"] - out["lp_none"]
    out["info_gain_vs_empty"] = out["lp_think"] - out["lp_empty"]
    if thought_ok_bkg is not None:
        ok = np.asarray(thought_ok_bkg, bool)[m]                                        # [P, G]
        out["thought_ok"] = ok.mean(-1)
        out["_lp_sampled"], out["_ok"] = lp_s[m], ok
    return out


def summarize(rows: dict[str, np.ndarray]) -> dict[str, float]:
    """Means of `per_position` arrays, with the NLL after correct and after wrong thoughts (when judged)."""
    out = {k: float(np.mean(v)) for k, v in rows.items() if not k.startswith("_") and k != "position"}
    if "_ok" in rows:
        lp, ok = rows["_lp_sampled"], rows["_ok"]
        out["nll_correct_thought"] = float(-lp[ok].mean()) if ok.any() else float("nan")
        out["nll_wrong_thought"] = float(-lp[~ok].mean()) if (~ok).any() else float("nan")
    return out


def bootstrap_ci(x, *, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap CI of the mean of x [P] over its items."""
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(axis=1)
    a = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
