"""Choosing the positions t at which the policy thinks (docs/method.md step 1).

Shapes: B rows, L tokens, K positions per document (per row with `rollout.docs_per_row` = 0; D*K slots a row
with D documents), H reward horizon.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlp_jax.rlp.config import RolloutConfig


def valid_positions(segment_ids_bl, positions_bl, *, min_context: int, horizon: int = 1):
    """bool [B, L]: t is a valid thinking position.

    Valid when x_t is a real token with at least `min_context` tokens of its own document before it,
    and x_t .. x_{t+H-1} all lie in the same document.
    """
    ok = (segment_ids_bl > 0) & (positions_bl >= min_context)
    for h in range(1, horizon):
        same = jnp.pad(segment_ids_bl[:, h:] == segment_ids_bl[:, :-h], ((0, 0), (0, h)))
        ok &= same
    return ok


def choose_positions(rng, valid_bl, num_positions: int, *, score_bl=None):
    """K distinct positions per document, uniform over `valid_bl` (Gumbel top-k without replacement).

    Args:
      rng: PRNG key. valid_bl: bool [B, L]. num_positions: K.
      score_bl: optional extra bool mask [B, L] (e.g. an EMA-surprise band); used when a document has
        at least K such positions, else the plain valid set is used for that document.
    Returns:
      (t_bk int32 [B, K] sorted ascending, mask_bk bool [B, K]: False where a document had fewer than
      K valid positions; those slots hold an arbitrary index and must be ignored).
    """
    if score_bl is not None:
        preferred = valid_bl & score_bl
        enough = preferred.sum(axis=1, keepdims=True) >= num_positions
        valid_bl = jnp.where(enough, preferred, valid_bl)
    gumbel = jax.random.gumbel(rng, valid_bl.shape)
    scores = jnp.where(valid_bl, gumbel, -jnp.inf)
    top, t_bk = jax.lax.top_k(scores, num_positions)
    return _sorted(t_bk, jnp.isfinite(top), valid_bl.shape[1])


def choose_window(rng, valid_bl, num_positions: int):
    """K consecutive valid positions t0 .. t0+K-1 per document, t0 uniform over the starts that allow it.

    Returns (t_bk int32 [B, K], mask_bk bool [B, K]) as `choose_positions` (mask False for a document
    without K consecutive valid positions).
    """
    k = num_positions
    csum = jnp.pad(jnp.cumsum(valid_bl.astype(jnp.int32), axis=1), ((0, 0), (1, 0)))   # [B, L + 1]
    run = csum[:, k:] - csum[:, :-k]                                                     # [B, L - K + 1]
    starts = jnp.pad(run == k, ((0, 0), (0, k - 1)))                                     # [B, L]
    t0, ok = choose_positions(rng, starts, 1)                                            # [B, 1]
    mask_bk = jnp.broadcast_to(ok, (valid_bl.shape[0], k))
    return jnp.where(mask_bk, t0 + jnp.arange(k), 0).astype(jnp.int32), mask_bk


def _sorted(t_bk, mask_bk, length: int):
    """Valid slots in ascending order of position, masked ones last (at index 0)."""
    order = jnp.argsort(jnp.where(mask_bk, t_bk, length), axis=1)
    t_bk, mask_bk = jnp.take_along_axis(t_bk, order, axis=1), jnp.take_along_axis(mask_bk, order, axis=1)
    return jnp.where(mask_bk, t_bk, 0).astype(jnp.int32), mask_bk


def word_start_mask(tokens_bl, word_starts: tuple[int, ...]):
    """bool [B, L]: x_t is one of `word_starts` (`ThinkIds.word_starts`, `rollout.word_starts`), by a lookup in
    a table of the ids (not an isin against every id); None when the tuple is empty (every token allowed)."""
    if not word_starts:
        return None
    table = jnp.zeros(max(word_starts) + 1, bool).at[jnp.asarray(word_starts, jnp.int32)].set(True)
    return table[jnp.minimum(tokens_bl, table.shape[0] - 1)] & (tokens_bl < table.shape[0])


def select_positions(rng, segment_ids_bl, positions_bl, ema_logprobs_bl, rollout: RolloutConfig, horizon: int,
                     allowed_bl=None):
    """Apply the configured rule (`rollout.position_rule`) per row, or per document of a packed row with
    `rollout.docs_per_row` = D >= 1 (each of its first D documents drawn with its own key); returns (t_bk,
    mask_bk) as `choose_positions`, [B, K] or [B, D*K]. allowed_bl: optional bool [B, L] further restricting
    the valid positions (`word_start_mask`)."""
    valid = valid_positions(segment_ids_bl, positions_bl, min_context=rollout.min_context, horizon=horizon)
    if allowed_bl is not None:
        valid &= allowed_bl
    band = None
    if rollout.position_rule == "ema_band":
        surprise = -ema_logprobs_bl
        band = (surprise >= rollout.ema_band[0]) & (surprise <= rollout.ema_band[1])

    def draw(key, valid_bl):
        if rollout.position_rule == "window":
            return choose_window(key, valid_bl, rollout.positions_per_doc)
        return choose_positions(key, valid_bl, rollout.positions_per_doc, score_bl=band)

    if rollout.docs_per_row == 0:
        return draw(rng, valid)
    docs = range(1, rollout.docs_per_row + 1)
    parts = [draw(jax.random.fold_in(rng, d), valid & (segment_ids_bl == d)) for d in docs]
    return _sorted(jnp.concatenate([t for t, _ in parts], axis=1), jnp.concatenate([m for _, m in parts], axis=1),
                   valid.shape[1])


def eval_positions(rng, segment_ids_bl, positions_bl, rollout: RolloutConfig, horizon: int, allowed_bl=None):
    """Held-out evaluation's positions: the configured rule, except that `ema_band` (which would pick by the
    evaluated model's own surprise) becomes `uniform`. No model enters, so every model evaluated with the
    same key and batch is scored at the same positions. Returns (t_bk, mask_bk)."""
    if rollout.position_rule == "ema_band":
        rollout = dataclasses.replace(rollout, position_rule="uniform")
    return select_positions(rng, segment_ids_bl, positions_bl, None, rollout, horizon, allowed_bl)
