"""The categorical sampler every path uses: training's thought rollout, its naive reference, evaluation's
decoder and the generate CLI (`rlp_jax.generate.generation`).

`filter_logits` restricts a distribution to its top-k tokens and then to its nucleus; `sample_categorical`
draws from softmax(logits) by inverting the CDF with one uniform per row; `argmax` is greedy decoding.

Shapes: [..., V] logits (V vocabulary), any leading axes (rows).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG = -1e30   # the logit of a banned or filtered token


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Restrict sampling to the top-k tokens and then to the nucleus of mass top_p ([..., V]).

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (the most
    likely token is always kept). Removed tokens get a logit of -1e30.
    """
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        keep = jnp.zeros_like(keep_sorted).at[
            tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
        logits = jnp.where(keep, logits, NEG)
    return logits


def argmax(x):
    """jnp.argmax over the last axis (the first index of the maximum) as two plain reductions.

    XLA:CPU runs jnp.argmax's (value, index) variadic reduce several times slower than a max and a
    min: for [64, 4096] logits `jax.random.categorical` (Gumbel noise, then jnp.argmax) took ~8 ms per
    token, the same Gumbel draw with this argmax ~3 ms. Used for greedy decoding."""
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jnp.where(x == top, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1])
    return jnp.minimum(jnp.min(index, axis=-1), x.shape[-1] - 1)


def first_above(cum, target, mass):
    """[..., N] inclusive running sums `cum`, targets [...] -> the first index whose running sum exceeds
    the target, clamped to the last index with positive `mass` (so rounding never picks a zero-mass
    entry) [...] int32."""
    n = cum.shape[-1]
    first = jnp.sum((cum <= target[..., None]).astype(jnp.int32), axis=-1)
    last = jnp.max(jnp.where(mass > 0, jnp.arange(n, dtype=jnp.int32), 0), axis=-1)
    return jnp.minimum(first, last)


def sample_categorical(rng, logits):
    """Draw one token per row from softmax(logits) [..., V] float32 by inverting the CDF with one uniform
    per row; returns (tokens [...] int32, their log-probs [...] float32 under `logits`). Entries at -inf
    (or -1e30) have probability 0.

    Exactly the distribution of `jax.random.categorical` (not its draws: that takes a Gumbel per
    vocabulary entry). The CDF is searched in two levels, blocks of ~sqrt(V) entries and then the chosen
    block, so no cumulative sum runs over V: per token the cost is one exp and a few reductions over
    [B, V] where the Gumbel-max draw hashes B x V random words (at [64, 4096] on the 2-core CPU of
    benchmarks/decode_bench.py: 0.27 ms per draw against 1.9 ms for the Gumbel draw and log-softmax)."""
    lead, v = logits.shape[:-1], logits.shape[-1]
    logits_bv = logits.reshape(-1, v)
    b = logits_bv.shape[0]
    block = 1 << max(4, math.ceil(math.log2(math.sqrt(v))))
    blocks = -(-v // block)
    top = jnp.max(logits_bv, axis=-1)                                                  # [B]
    e = jnp.exp(logits_bv - top[:, None])                                              # [B, V]
    e = jnp.pad(e, ((0, 0), (0, blocks * block - v))).reshape(b, blocks, block)        # [B, nb, block]
    block_mass = jnp.sum(e, axis=-1)                                                   # [B, nb]
    block_cum = jnp.cumsum(block_mass, axis=-1)
    total = block_cum[:, -1]                                                           # [B]
    target = jax.random.uniform(rng, (b,), jnp.float32) * total
    blk = first_above(block_cum, target, block_mass)                                  # [B]
    at = lambda x, i: jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]
    inner = jnp.take_along_axis(e, blk[:, None, None], axis=1)[:, 0]                  # [B, block]
    rest = target - (at(block_cum, blk) - at(block_mass, blk))
    token = blk * block + first_above(jnp.cumsum(inner, axis=-1), rest, inner)
    logp = at(logits_bv, token) - top - jnp.log(total)
    return token.reshape(lead).astype(jnp.int32), logp.reshape(lead)
