"""Transformer building blocks as pure functions: RMSNorm, rotary embeddings, attention, SwiGLU.

Shapes (docs/method.md): B rows, L tokens (keys of the prefix), P prompt tokens, N branches per row,
S branch tokens, C cache slots, Q query heads, E key/value heads, A = Q / E query heads per key/value
head, W head width, D model width, F MLP width. In einsum specs of full attention, l and s are the query
and key positions.
Softmax and normalisation statistics are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rlp_jax import sharding
from rlp_jax.model import blockwise

# Finite "minus infinity" for masked scores: a fully masked row (a padding query) gives a uniform
# softmax instead of NaN; its output is never used.
_MASKED = -1e30



def constrain_residual(x):
    """The residual stream [B, L, D] or [B, N, S, D] sharded by logical names (rows over the data axes; identity
    without a mesh), after the embedding and every block of either family. Without it XLA's propagation may
    follow the FSDP-sharded weights and keep every row of the global batch on every device."""
    return sharding.constrain(x, ("batch", "length", "embed") if x.ndim == 3 else ("batch", "branch", "length", "embed"))

def rms_norm(x, weight, eps: float):
    """RMSNorm over the last axis, statistics in float32, result in x's dtype (as Hugging Face)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(head_dim: int, rope_theta: float, scaling: dict | None) -> jax.Array:
    """Rotary inverse frequencies [W/2] float32 (W = head_dim), with optional Llama-3 frequency scaling."""
    dh = head_dim
    inv_freq = 1.0 / (rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    if scaling is None or scaling.get("rope_type", scaling.get("type")) == "default":
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x, positions, inv_freq):
    """Rotate x [..., P, heads, W] by integer positions [..., P] (half-split layout, as Hugging Face)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., P, W/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[..., None, :]  # [..., P, 1, W]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[..., None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def swiglu(x, gate, up, down):
    """down(silu(x @ gate) * (x @ up)); x [..., D], gate/up [D, F], down [F, D]."""
    g = jnp.einsum("...d,df->...f", x, gate.astype(x.dtype))
    u = jnp.einsum("...d,df->...f", x, up.astype(x.dtype))
    return jnp.einsum("...f,fd->...d", jax.nn.silu(g) * u, down.astype(x.dtype))


def _softmax_combine(scores_list, values_list, out_specs, dtype):
    """Joint float32 softmax over several key blocks; returns sum_i einsum(spec_i, p_i, v_i)."""
    sizes = [s.shape[-1] for s in scores_list]
    probs = jax.nn.softmax(jnp.concatenate(scores_list, axis=-1), axis=-1).astype(dtype)
    out, start = 0, 0
    for size, v, spec in zip(sizes, values_list, out_specs):
        out = out + jnp.einsum(spec, probs[..., start:start + size], v)
        start += size
    return out


def _context_scores(q, context_k_pew, spec: str, dh: int):
    """Scores of queries against a prompt's keys [P, E, W] shared by every row (never copied per row)."""
    return jnp.einsum(spec, q, context_k_pew.astype(q.dtype), preferred_element_type=jnp.float32) / math.sqrt(dh)


def causal_segment_mask(seg_bl):
    """[B, L, L] bool: query i sees key j <= i of its own segment (seg [B, L] int32, 0 = padding: never a key)."""
    length = seg_bl.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None] & (seg_bl[:, :, None] == seg_bl[:, None, :]) & (seg_bl[:, None, :] > 0)


def full_attention(q_blqw, k_blew, v_blew, mask_bls, q_per_kv: int, context_k=None, context_v=None):
    """Self-attention over one sequence batch, optionally after a shared context (a prompt).

    q [B, L, Q, W], k/v [B, L, E, W], mask [B, L_q, L_k] bool -> out [B, L, Q, W].
    context_k/v: [P, E, W] keys/values of a prompt every query sees in full (the prompted setting).
    """
    b, l, h, dh = q_blqw.shape
    q = q_blqw.reshape(b, l, h // q_per_kv, q_per_kv, dh)  # [B, L, E, A, W]
    scores = jnp.einsum("bleaw,bsew->beals", q, k_blew, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_bls[:, None, None], scores / math.sqrt(dh), _MASKED)
    blocks, values, specs = [scores], [v_blew], ["beals,bsew->bleaw"]
    if context_k is not None:
        blocks.insert(0, _context_scores(q, context_k, "bleaw,pew->bealp", dh))
        values.insert(0, context_v.astype(q.dtype))
        specs.insert(0, "bealp,pew->bleaw")
    out = _softmax_combine(blocks, values, specs, q.dtype)
    return out.reshape(b, l, h, dh)


def decode_attention(q_bqw, k_bewc, v_becw, mask_bc, q_per_kv: int, unrolled_scores: bool | None = None):
    """One query per sequence over a KV cache: q [B, Q, W], keys [B, E, W, C] (transposed),
    values [B, E, C, W], mask [B, C] bool -> [B, Q, W].

    unrolled_scores: compute q.k as W multiply-adds instead of a dot; None = on the CPU backend only."""
    b, h, dh = q_bqw.shape
    q = q_bqw.reshape(b, h // q_per_kv, q_per_kv, dh)                     # [B, E, A, W]
    if unrolled_scores is None:
        unrolled_scores = jax.default_backend() == "cpu"
    if unrolled_scores:
        # q.k as W multiply-adds of [B, E, A, C] slices, one loop fusion that reads every key once.
        # XLA:CPU runs the batched dot of A query rows (2 for Qwen3) against B x E key blocks at
        # about 5 GB/s; this form ~9 GB/s, 9-15% off a whole decode step at batch 64 (small preset).
        q32 = q.astype(jnp.float32)
        scores = q32[..., 0:1] * k_bewc[:, :, None, 0].astype(jnp.float32)
        for d in range(1, dh):
            scores = scores + q32[..., d:d + 1] * k_bewc[:, :, None, d].astype(jnp.float32)
    else:
        scores = jnp.einsum("beaw,bewc->beac", q, k_bewc, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_bc[:, None, None], scores / math.sqrt(dh), _MASKED)
    out = _softmax_combine([scores], [v_becw], ["beac,becw->beaw"], q.dtype)
    return out.reshape(b, h, dh)


def branch_attention(q_bnsqw, prefix_k, prefix_v, prefix_mask_bnl, self_k, self_v, self_mask_bnsc,
                     q_per_kv: int, context_k=None, context_v=None):
    """Attention of branch queries over the shared prefix plus the branch's own keys.

    q [B, N, S, Q, W]; prefix_k/v [B, L, E, W] (shared by the N branches of a row, never copied);
    prefix_mask [B, N, L] bool; self_k/v [B, N, C, E, W]; self_mask [B, N, S, C] bool;
    context_k/v: optional [P, E, W] prompt keys/values seen by every branch (shared by all rows).
    Returns [B, N, S, Q, W].
    """
    b, n, s, h, dh = q_bnsqw.shape
    q = q_bnsqw.reshape(b, n, s, h // q_per_kv, q_per_kv, dh)  # [B, N, S, E, A, W]
    scale = 1.0 / math.sqrt(dh)
    sp = jnp.einsum("bnseaw,blew->bneasl", q, prefix_k, preferred_element_type=jnp.float32)
    sp = jnp.where(prefix_mask_bnl[:, :, None, None, None, :], sp * scale, _MASKED)
    ss = jnp.einsum("bnseaw,bncew->bneasc", q, self_k, preferred_element_type=jnp.float32)
    ss = jnp.where(self_mask_bnsc[:, :, None, None], ss * scale, _MASKED)
    blocks, values = [sp, ss], [prefix_v, self_v]
    specs = ["bneasl,blew->bnseaw", "bneasc,bncew->bnseaw"]
    if context_k is not None:
        blocks.insert(0, _context_scores(q, context_k, "bnseaw,pew->bneasp", dh))
        values.insert(0, context_v.astype(q.dtype))
        specs.insert(0, "bneasp,pew->bnseaw")
    out = _softmax_combine(blocks, values, specs, q.dtype)
    return out.reshape(b, n, s, h, dh)



def full_attention_blockwise(q_blqw, k_blew, v_blew, seg_bl, q_per_kv: int, context_k=None, context_v=None, *,
                             block: int = blockwise.DEFAULT_BLOCK):
    """`full_attention` for causal attention within segments (seg [B, L] int32, 0 = padding), key block by
    key block (`rlp_jax.model.blockwise`): no [B, L, L] mask or scores. Same arguments otherwise."""
    b, l, h, dh = q_blqw.shape
    q = q_blqw.reshape(b, l, h // q_per_kv, q_per_kv, dh)  # [B, L, E, A, W]
    seg = seg_bl.astype(jnp.int32)
    lim = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))    # causal: key index <= query index
    parts = [blockwise.attend_blocks(q, k_blew, v_blew, seg, lim, seg, block)]
    if context_k is not None:
        scores = _context_scores(q, context_k, "bleaw,pew->bealp", dh)
        parts.insert(0, blockwise.dense_part(scores, context_v.astype(q.dtype), "bealp,pew->bleaw"))
    return blockwise.merge(parts).reshape(b, l, h, dh)


def branch_attention_blockwise(q_bnsqw, prefix_k, prefix_v, prefix_seg_bl, branch_seg_bn, branch_start_bn,
                               self_k, self_v, self_lim_s, q_per_kv: int, context_k=None, context_v=None, *,
                               block: int = blockwise.DEFAULT_BLOCK, prefix_blocks: bool = True,
                               own_blocks: bool | None = None):
    """`branch_attention` with descriptor masks, key block by key block: a branch's S queries see the prefix
    keys l < branch_start of the branch's segment (prefix_seg [B, L], branch_seg/start [B, N] int32) and
    their own keys [B, N, C, E, W] at slots c <= self_lim_s[i] ([S] int32: causal, or a cache's filled
    slots). The prefix is read blockwise when `prefix_blocks`, the own keys when `own_blocks` (default:
    C > block, the paper's long thoughts), otherwise densely; a prompt's keys densely; all merged by
    log-sum-exp.
    Returns [B, N, S, Q, W]."""
    b, n, s, h, dh = q_bnsqw.shape
    c, e, a = self_k.shape[2], h // q_per_kv, q_per_kv
    q = q_bnsqw.reshape(b, n * s, e, a, dh)                               # a row's N x S queries: M = N S
    parts = [_prefix_part(q, prefix_k, prefix_v, prefix_seg_bl, branch_seg_bn, branch_start_bn, s,
                          block if prefix_blocks else None)]
    lim = jnp.broadcast_to(self_lim_s.astype(jnp.int32), (b * n, s))
    if c > block if own_blocks is None else own_blocks:   # each branch its own row: [B N, S] over [B N, C]
        ones_q, ones_k = jnp.ones((b * n, s), jnp.int32), jnp.ones((b * n, c), jnp.int32)
        own, lse = blockwise.attend_blocks(q.reshape(b * n, s, e, a, dh), self_k.reshape(b * n, c, e, dh),
                                           self_v.reshape(b * n, c, e, dh), ones_q, lim, ones_k, block)
        own, lse = own.reshape(b, n * s, e, a, dh), lse.reshape(b, n, e, a, s).transpose(0, 2, 3, 1, 4)
        parts.append((own, lse.reshape(b, e, a, n * s)))
    else:
        own_mask = jnp.arange(c)[None, :] <= self_lim_s[:, None]              # [S, C]
        parts.append(_own_part(q.reshape(b, n, s, e, a, dh), self_k, self_v, own_mask))
    return _merged(parts, q, context_k, context_v).reshape(b, n, s, h, dh)


def _prefix_part(q_bmeaw, prefix_k, prefix_v, prefix_seg_bl, branch_seg_bn, branch_start_bn, s: int,
                 block: int | None, layer=None, *, inference: bool = False):
    """The prefix keys a row's N x S branch queries (M = N S, branch-major) see: l < branch start, in the
    branch's segment; blockwise by `block` keys, or densely when block is None. Returns (out, lse).
    layer: given, prefix_k/v are every layer's [Y, B, L, E, W] and layer `layer` is read. inference: blocks are
    read in place (`blockwise.attend_prefix`, no VJP) rather than by the differentiable `attend_blocks`."""
    seg_q = jnp.repeat(branch_seg_bn.astype(jnp.int32), s, axis=1)       # [B, M]
    lim_q = jnp.repeat(branch_start_bn.astype(jnp.int32) - 1, s, axis=1)
    prefix_seg = prefix_seg_bl.astype(jnp.int32)
    if block is not None and inference:
        return blockwise.attend_prefix(q_bmeaw, prefix_k, prefix_v, seg_q, lim_q, prefix_seg, block, layer=layer)
    if layer is not None:
        prefix_k, prefix_v = prefix_k[layer], prefix_v[layer]
    if block is not None:
        return blockwise.attend_blocks(q_bmeaw, prefix_k, prefix_v, seg_q, lim_q, prefix_seg, block)
    idx = jnp.arange(prefix_k.shape[1])
    mask = ((idx[None, None] <= lim_q[:, :, None]) & (prefix_seg[:, None, :] == seg_q[:, :, None])
            & (prefix_seg[:, None, :] > 0))
    scores = jnp.einsum("bmeaw,blew->beaml", q_bmeaw, prefix_k,
                        preferred_element_type=jnp.float32) / math.sqrt(q_bmeaw.shape[-1])
    return blockwise.dense_part(jnp.where(mask[:, None, None], scores, _MASKED), prefix_v, "beaml,blew->bmeaw")


def branch_decode_attention(q_bnsqw, prefix_k, prefix_v, prefix_seg_bl, branch_seg_bn, branch_start_bn,
                            cache_k, cache_v, filled, new_k, new_v, q_per_kv: int, context_k=None, context_v=None, *,
                            prefix_block: int | None = None, cache_block: int = blockwise.DECODE_BLOCK, layer=None):
    """Sampling's attention: S new branch tokens (slots filled .. filled + S - 1 of their branch) over the prefix
    (blockwise by prefix_block keys, or densely when None), over the cache's filled slots [0, filled) read only
    up to the last filled block (`blockwise.attend_filled`), over each other (causal) and a prompt's keys, merged
    by log-sum-exp. The cache is only read here: the caller writes the new keys/values once per step.
    q [B, N, S, Q, W]; prefix_k/v [B, L, E, W]; prefix_seg [B, L]; branch_seg/start [B, N];
    cache_k/v [B, N, C, E, W]; filled: int (may be traced); new_k/v [B, N, S, E, W]. Returns [B, N, S, Q, W].
    layer (may be traced): given, prefix_k/v are every layer's [Y, B, L, E, W] and cache_k/v [Y, B, N, C, E, W],
    and layer `layer`'s blocks are read in place: inside a layer scan, pass the stacked caches and the layer
    index rather than scanning over them (a scanned slice that feeds a block loop is copied whole at every
    token; `blockwise.attend_filled`)."""
    b, n, s, h, dh = q_bnsqw.shape
    c, e, a = cache_k.shape[-3], h // q_per_kv, q_per_kv
    q = q_bnsqw.reshape(b, n * s, e, a, dh)
    parts = [_prefix_part(q, prefix_k, prefix_v, prefix_seg_bl, branch_seg_bn, branch_start_bn, s, prefix_block,
                          layer, inference=True)]
    stacked = cache_k.shape[:-5] + (b * n, c, e, dh)                                   # [(Y,) B N, C, E, W]
    cached, lse = blockwise.attend_filled(q_bnsqw.reshape(b * n, s, e, a, dh), cache_k.reshape(stacked),
                                          cache_v.reshape(stacked), filled, cache_block, layer=layer)
    parts.append((cached.reshape(b, n * s, e, a, dh), lse.reshape(b, n, e, a, s).transpose(0, 2, 3, 1, 4)
                  .reshape(b, e, a, n * s)))
    parts.append(_own_part(q_bnsqw.reshape(b, n, s, e, a, dh), new_k, new_v, jnp.tril(jnp.ones((s, s), bool))))
    return _merged(parts, q, context_k, context_v).reshape(b, n, s, h, dh)


def _own_part(q_bnseaw, k_bncew, v_bncew, mask_sc):
    """A branch's own keys [B, N, C, E, W] scored densely under mask [S, C]: (out [B, N S, E, A, W],
    lse [B, E, A, N S]), the form `blockwise.merge` takes."""
    b, n, s, e, a, dh = q_bnseaw.shape
    ss = jnp.einsum("bnseaw,bncew->beansc", q_bnseaw, k_bncew, preferred_element_type=jnp.float32) / math.sqrt(dh)
    ss = jnp.where(mask_sc, ss, _MASKED)                                           # [B, E, A, N, S, C]
    lse = jax.nn.logsumexp(ss, axis=-1)
    probs = jnp.exp(ss - lse[..., None]).astype(q_bnseaw.dtype)
    own = jnp.einsum("beansc,bncew->bnseaw", probs, v_bncew).reshape(b, n * s, e, a, dh)
    return own, lse.reshape(b, e, a, n * s)


def _merged(parts, q_bmeaw, context_k, context_v):
    """The joint softmax over the parts and, when given, a prompt's keys [P, E, W] (read densely): [B, M, E, A, W]."""
    if context_k is not None:
        scores = _context_scores(q_bmeaw, context_k, "bmeaw,pew->beamp", q_bmeaw.shape[-1])
        parts = [blockwise.dense_part(scores, context_v.astype(q_bmeaw.dtype), "beamp,pew->bmeaw"), *parts]
    return blockwise.merge(parts)
