"""Thoughts branched off a Nemotron-H prefix: one teacher-forced pass over the documents, then short continuations
("thoughts") at chosen positions t, each computed as if it followed its document's tokens x_<t, with nothing of
the prefix copied per thought.

  `prefix_forward`     the pass over the documents [B, L]; keeps what branches at positions t [B, K] start from:
                       each attention block's keys/values of the whole documents [B, L, E, W] (shared by all
                       branches of a row; a branch sees the indices < t) and each Mamba block's state after x_<t
                       per (row, position) [B, K, ...] (read from the chunk-start states, `mamba2.mamba2_forward`).
  `branch_forward`     whole thoughts [B, K, S, T] at once -> logits [B, K, S, T, V]: Mamba blocks run the chunked
                       scan over the thought from its position's state, attention blocks attend to the prefix keys
                       < t plus the thought's own earlier tokens. Differentiable end to end, prefix pass included.
  `init_branch_cache` + `decode_step`
                       the same one token at a time for sampling: per-branch Mamba states (`mamba2.mamba2_step`) and
                       per-branch key/value slots after the shared prefix keys.
Equal to running each thought as its own sequence x_<t + thought through `hybrid.forward`
(tests/model/test_hybrid_branch.py). Documents may be right-padded (t <= a row's real length) or packed several to
a row (segment ids): a branch at t continues t's own document. Dtypes as `hybrid`'s.

Shapes: B rows, L document tokens, K branch positions per row, S thoughts per position, N = K S branches per
row (branch n = k S + s), T thought tokens, C slots of a decode cache, V vocabulary, D width, Q / E query /
key-value heads, W head width. (`mamba2` uses K, T and N for other things; its states appear here only as
`Mamba2State`s with their leading axes named.)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlp_jax.model import layers, mamba2
from rlp_jax.model.nemotron_h import hybrid
from rlp_jax.model.nemotron_h.hybrid import ATTENTION, MAMBA, HybridConfig, Params


class HybridPrefix(NamedTuple):
    """What branches at positions t start from, per block: attention (k, v) [B, L, E, W] of the documents;
    Mamba a `Mamba2State` [B, K, ...] after the tokens < t; MLP None."""

    blocks: tuple
    segment_ids: jax.Array   # [B, L] int32, 0 = padding
    t: jax.Array             # [B, K] int32 branch positions: a branch sees the tokens < t of t's segment


class BranchCache(NamedTuple):
    """Decoding state of N = K S branches per row, per block: attention (k, v) [B, N, C, E, W] of the tokens fed
    so far (slots >= step unused); Mamba a `Mamba2State` [B, N, ...] after them; MLP None."""

    blocks: tuple
    step: jax.Array     # [] int32 tokens fed so far


def prefix_forward(params: Params, cfg: HybridConfig, tokens_bl, t_bk, attention_mask_bl=None, *,
                   return_logits: bool = False):
    """The teacher-forced pass over documents [B, L] (attention_mask [B, L]: 1/0 real/padding, or segment ids with
    0 = padding; None = all real) keeping what branches at positions t [B, K] (0 <= t <= the row's real length)
    need.

    Returns (logits [B, L, V] float32 of the documents if return_logits else None, `HybridPrefix`).
    Differentiable in params; jit with cfg static."""
    tokens_bl, t_bk = jnp.asarray(tokens_bl), jnp.asarray(t_bk, jnp.int32)
    if tokens_bl.ndim != 2 or t_bk.ndim != 2 or t_bk.shape[0] != tokens_bl.shape[0]:
        raise ValueError(f"tokens must be [B, L] and t [B, K] with the same B; got {tokens_bl.shape} and "
                         f"{t_bk.shape}")
    if attention_mask_bl is None:
        seg_bl = jnp.ones(tokens_bl.shape, jnp.int32)
    elif jnp.shape(attention_mask_bl) != tokens_bl.shape:
        raise ValueError(f"attention_mask has shape {jnp.shape(attention_mask_bl)}, tokens {tokens_bl.shape}")
    else:
        seg_bl = jnp.asarray(attention_mask_bl).astype(jnp.int32)
    x, caches = hybrid.run_blocks(params, cfg, tokens_bl, seg_bl, positions_bm=t_bk)
    logits = hybrid.logits_from_hidden(params, cfg, x) if return_logits else None
    return logits, HybridPrefix(caches, seg_bl, t_bk)


def _per_branch(state_bk: mamba2.Mamba2State, s: int) -> mamba2.Mamba2State:
    """A state per (row, position) [B, K, ...] -> one per branch [B, N, ...] (each position's to its S thoughts)."""
    def spread(a):
        b, k = a.shape[:2]
        return jnp.broadcast_to(a[:, :, None], (b, k, s, *a.shape[2:])).reshape(b, k * s, *a.shape[2:])
    return jax.tree.map(spread, state_bk)


def _flat(tree, b: int, n: int):
    """[B, N, ...] leaves -> [B N, ...]."""
    return jax.tree.map(lambda a: a.reshape(b * n, *a.shape[2:]), tree)


def _unflat(tree, b: int, n: int):
    """[B N, ...] leaves -> [B, N, ...]."""
    return jax.tree.map(lambda a: a.reshape(b, n, *a.shape[1:]), tree)


def _branches(prefix: HybridPrefix, s: int):
    """Where the S branches of each position hang: positions t [B, N] and segments [B, N] (`mamba2.branch_segments`)."""
    return (jnp.repeat(prefix.t, s, axis=1),
            jnp.repeat(mamba2.branch_segments(prefix.segment_ids, prefix.t), s, axis=1))


def _prefix_mask(seg_bl, t_bn, seg_bn):
    """[B, N, L] bool: branch n sees the tokens of its segment before its position."""
    idx = jnp.arange(seg_bl.shape[1])
    return (idx[None, None, :] < t_bn[:, :, None]) & (seg_bl[:, None, :] == seg_bn[:, :, None]) & (seg_bl[:, None, :] > 0)


def _attend(p: Params, cfg: HybridConfig, q, prefix: HybridPrefix, prefix_kv, s: int, self_k, self_v, self_lim):
    """Branch queries q [B, N, S', Q, W] (S branches per position) over the prefix keys of their segment before
    their position and their own keys [B, N, C, E, W] at slots <= self_lim [S'] -> [B, N, S', D]. Key block by
    key block where cfg.attention says so (`blockwise_for`), else dense masks."""
    pk, pv = prefix_kv
    (b, n, sq), length, slots = q.shape[:3], pk.shape[1], self_k.shape[2]
    q_per_kv = cfg.num_heads // cfg.num_kv_heads
    t_bn, seg_bn = _branches(prefix, s)
    if cfg.blockwise_for(length) or cfg.blockwise_for(slots):
        out = layers.branch_attention_blockwise(
            q, pk, pv, prefix.segment_ids, seg_bn, t_bn, self_k, self_v, self_lim, q_per_kv,
            block=cfg.attention_block, prefix_blocks=cfg.blockwise_for(length), own_blocks=cfg.blockwise_for(slots))
    else:
        self_mask = jnp.broadcast_to(jnp.arange(slots)[None, :] <= self_lim[:, None], (b, n, sq, slots))
        out = layers.branch_attention(q, pk, pv, _prefix_mask(prefix.segment_ids, t_bn, seg_bn), self_k, self_v,
                                      self_mask, q_per_kv)
    return hybrid.attention_out(p, out)


def _attend_filled(p: Params, cfg: HybridConfig, q, prefix: HybridPrefix, prefix_kv, s: int, cache_kv, step,
                   new_k, new_v):
    """A decode step's attention (`layers.branch_decode_attention`): the branch's cache read only up to its last
    filled block (`step` slots), the new token's key apart -> [B, N, 1, D]."""
    pk, pv = prefix_kv
    t_bn, seg_bn = _branches(prefix, s)
    out = layers.branch_decode_attention(
        q, pk, pv, prefix.segment_ids, seg_bn, t_bn, *cache_kv, step, new_k, new_v, cfg.num_heads // cfg.num_kv_heads,
        prefix_block=cfg.attention_block if cfg.blockwise_for(pk.shape[1]) else None,
        cache_block=cfg.decode_block)
    return hybrid.attention_out(p, out)


def _check_prefix(cfg: HybridConfig, prefix: HybridPrefix):
    if len(prefix.blocks) != len(cfg.block_types):
        raise ValueError(f"prefix has {len(prefix.blocks)} blocks, the config {len(cfg.block_types)}: it was made "
                         "with another model")


def branch_forward(params: Params, cfg: HybridConfig, prefix: HybridPrefix, thought_tokens_bkst, *,
                   return_hidden: bool = False):
    """Logits [B, K, S, T, V] float32 of S thoughts [B, K, S, T] at each of the prefix's positions t [B, K]: slot i
    of a thought predicts its token i+1 (the last slot: the token after the thought), each thought continuing its
    own document after x_<t. return_hidden: the final hidden states [B, K, S, T, D] (before the final norm)
    instead. Differentiable in params through the prefix too; jit with cfg static."""
    _check_prefix(cfg, prefix)
    thoughts = jnp.asarray(thought_tokens_bkst)
    if thoughts.ndim != 4 or thoughts.shape[:2] != prefix.t.shape:
        raise ValueError(f"thought tokens must be [B, K, S, T] with [B, K] = {tuple(prefix.t.shape)} (the prefix's "
                         f"positions); got {thoughts.shape}")
    b, k, s, t = thoughts.shape
    n = k * s
    def block_fn(kind, block, cache, x):
        p = block["mixer"]
        h = layers.rms_norm(x, block["norm"], cfg.eps)
        if kind == MAMBA:
            start = _flat(_per_branch(cache, s), b, n)
            out, _ = mamba2.mamba2_forward(p, cfg.mamba, h.reshape(b * n, t, -1), state=start)
            out = out.reshape(b, n, t, -1)
        elif kind == ATTENTION:
            q, kk, v = hybrid.attention_qkv(p, cfg, h)
            out = _attend(p, cfg, q, prefix, cache, s, kk, v, jnp.arange(t))   # causal within the thought
        else:
            out = hybrid.mlp_mixer(p, h)
        return x + out

    x = layers.constrain_residual(hybrid.embed(params, cfg, thoughts.reshape(b, n, t)))   # [B, N, T, D]
    for kind, block, cache in zip(cfg.block_types, params["blocks"], prefix.blocks):
        x = layers.constrain_residual(cfg.checkpointed(functools.partial(block_fn, kind), unrolled=True)(block, cache, x))
    if return_hidden:
        return x.reshape(b, k, s, t, -1)
    return hybrid.logits_from_hidden(params, cfg, x).reshape(b, k, s, t, -1)


def init_branch_cache(cfg: HybridConfig, prefix: HybridPrefix, thoughts: int, length: int) -> BranchCache:
    """An empty `BranchCache` for `thoughts` (S) branches at each of the prefix's positions, `length` (C) slots
    each: Mamba states start from their position's state, attention slots are empty."""
    _check_prefix(cfg, prefix)
    if thoughts < 1 or length < 1:
        raise ValueError(f"thoughts ({thoughts}) and length ({length}) must be >= 1")
    b, k = prefix.t.shape
    blocks = []
    for kind, cache in zip(cfg.block_types, prefix.blocks):
        if kind == MAMBA:
            blocks.append(_per_branch(cache, thoughts))
        elif kind == ATTENTION:
            zeros = jnp.zeros((b, k * thoughts, length, cfg.num_kv_heads, cfg.head_dim), cfg.jnp_compute_dtype)
            blocks.append((zeros, zeros))
        else:
            blocks.append(None)
    return BranchCache(tuple(blocks), jnp.zeros((), jnp.int32))


def decode_step(params: Params, cfg: HybridConfig, prefix: HybridPrefix, cache: BranchCache, token_bn):
    """Feed one token per branch [B, N] (N = K S, branch n = k S + s) -> (logits [B, N, V] float32 of the next
    token, the cache after it). Token i of a branch gets the logits `branch_forward` gives its slot i; feeding
    more tokens than the cache's C slots is not checked (jit with cfg static)."""
    _check_prefix(cfg, prefix)
    token_bn = jnp.asarray(token_bn)
    b, k = prefix.t.shape
    n = jax.tree.leaves(cache.blocks)[0].shape[1] if jax.tree.leaves(cache.blocks) else k
    if token_bn.shape != (b, n) or n % k:
        raise ValueError(f"tokens must be [B, N] = {(b, n)} (the cache's branches, a multiple of K = {k}); "
                         f"got {token_bn.shape}")
    s, step = n // k, cache.step
    x = layers.constrain_residual(hybrid.embed(params, cfg, token_bn[:, :, None]))     # [B, N, 1, D]
    blocks = []
    for kind, block, pre, own in zip(cfg.block_types, params["blocks"], prefix.blocks, cache.blocks):
        p = block["mixer"]
        h = layers.rms_norm(x, block["norm"], cfg.eps)
        if kind == MAMBA:
            y, state = mamba2.mamba2_step(p, cfg.mamba, h.reshape(b * n, -1), _flat(own, b, n))
            out, own = y.reshape(b, n, 1, -1), _unflat(state, b, n)
        elif kind == ATTENTION:
            q, kk, v = hybrid.attention_qkv(p, cfg, h)                             # kk, v [B, N, 1, E, W]
            out = _attend_filled(p, cfg, q, prefix, pre, s, own, step, kk, v)
            own = tuple(jax.lax.dynamic_update_slice_in_dim(c, new, step, axis=2) for c, new in zip(own, (kk, v)))
        else:
            out = hybrid.mlp_mixer(p, h)
        blocks.append(own)
        x = layers.constrain_residual(x + out)
    return hybrid.logits_from_hidden(params, cfg, x[:, :, 0]), BranchCache(tuple(blocks), step + 1)
