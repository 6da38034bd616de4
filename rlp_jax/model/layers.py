"""Transformer building blocks as pure functions: RMSNorm, rotary embeddings, attention, SwiGLU.

Shape vocabulary: B batch, L length (keys of the prefix), N branches per document, S branch length,
H query heads, Hk key/value heads, R = H / Hk, Dh head width, D model width, F MLP width.
Softmax and normalisation statistics are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rlp_jax.model.config import ModelConfig

# Finite "minus infinity" for masked scores: a fully masked row (a padding query) gives a uniform
# softmax instead of NaN; its output is never used.
_MASKED = -1e30


def rms_norm(x, weight, eps: float):
    """RMSNorm over the last axis, statistics in float32, result in x's dtype (as Hugging Face)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Rotary inverse frequencies [Dh/2] float32, with optional Llama-3 frequency scaling."""
    dh = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    scaling = cfg.rope_scaling
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
    """Rotate x [..., P, heads, Dh] by integer positions [..., P] (half-split layout, as Hugging Face)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., P, Dh/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[..., None, :]  # [..., P, 1, Dh]
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


def _context_scores(q, context_k_pkd, spec: str, dh: int):
    """Scores of queries against a prompt's keys [P, Hk, Dh] shared by every row (never copied per row)."""
    return jnp.einsum(spec, q, context_k_pkd.astype(q.dtype), preferred_element_type=jnp.float32) / math.sqrt(dh)


def full_attention(q_blhd, k_blkd, v_blkd, mask_bqs, group_size: int, context_k=None, context_v=None):
    """Self-attention over one sequence batch, optionally after a shared context (a prompt).

    q [B, L, H, Dh], k/v [B, L, Hk, Dh], mask [B, L_q, L_k] bool -> out [B, L, H, Dh].
    context_k/v: [P, Hk, Dh] keys/values of a prompt every query sees in full (the prompted setting).
    """
    b, l, h, dh = q_blhd.shape
    q = q_blhd.reshape(b, l, h // group_size, group_size, dh)  # [B, L, Hk, R, Dh]
    scores = jnp.einsum("bqkrd,bskd->bkrqs", q, k_blkd, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_bqs[:, None, None], scores / math.sqrt(dh), _MASKED)
    blocks, values, specs = [scores], [v_blkd], ["bkrqs,bskd->bqkrd"]
    if context_k is not None:
        blocks.insert(0, _context_scores(q, context_k, "bqkrd,pkd->bkrqp", dh))
        values.insert(0, context_v.astype(q.dtype))
        specs.insert(0, "bkrqp,pkd->bqkrd")
    out = _softmax_combine(blocks, values, specs, q.dtype)
    return out.reshape(b, l, h, dh)


def decode_attention(q_bhd, k_bkdt, v_bktd, mask_bt, group_size: int, unrolled_scores: bool | None = None):
    """One query per sequence over a KV cache: q [B, H, Dh], keys [B, Hk, Dh, T] (transposed),
    values [B, Hk, T, Dh], mask [B, T] bool -> [B, H, Dh].

    unrolled_scores: compute q.k as Dh multiply-adds instead of a dot; None = on the CPU backend only."""
    b, h, dh = q_bhd.shape
    q = q_bhd.reshape(b, h // group_size, group_size, dh)                     # [B, Hk, R, Dh]
    if unrolled_scores is None:
        unrolled_scores = jax.default_backend() == "cpu"
    if unrolled_scores:
        # q.k as Dh multiply-adds of [B, Hk, R, T] slices, one loop fusion that reads every key once.
        # XLA:CPU runs the batched dot of R query rows (2 for Qwen3) against B x Hk key blocks at
        # about 5 GB/s; this form ~9 GB/s, 9-15% off a whole decode step at batch 64 (small preset).
        q32 = q.astype(jnp.float32)
        scores = q32[..., 0:1] * k_bkdt[:, :, None, 0].astype(jnp.float32)
        for d in range(1, dh):
            scores = scores + q32[..., d:d + 1] * k_bkdt[:, :, None, d].astype(jnp.float32)
    else:
        scores = jnp.einsum("bkrd,bkdt->bkrt", q, k_bkdt, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_bt[:, None, None], scores / math.sqrt(dh), _MASKED)
    out = _softmax_combine([scores], [v_bktd], ["bkrt,bktd->bkrd"], q.dtype)
    return out.reshape(b, h, dh)


def branch_attention(q_bnshd, prefix_k, prefix_v, prefix_mask_bnl, self_k, self_v, self_mask_bnsj,
                     group_size: int, context_k=None, context_v=None):
    """Attention of branch queries over the shared prefix plus the branch's own keys.

    q [B, N, S, H, Dh]; prefix_k/v [B, L, Hk, Dh] (shared by the N branches of a document, never
    copied); prefix_mask [B, N, L] bool; self_k/v [B, N, J, Hk, Dh]; self_mask [B, N, S, J] bool;
    context_k/v: optional [P, Hk, Dh] prompt keys/values seen by every branch (shared by all rows).
    Returns [B, N, S, H, Dh].
    """
    b, n, s, h, dh = q_bnshd.shape
    q = q_bnshd.reshape(b, n, s, h // group_size, group_size, dh)  # [B, N, S, Hk, R, Dh]
    scale = 1.0 / math.sqrt(dh)
    sp = jnp.einsum("bnskrd,blkd->bnkrsl", q, prefix_k, preferred_element_type=jnp.float32)
    sp = jnp.where(prefix_mask_bnl[:, :, None, None, None, :], sp * scale, _MASKED)
    ss = jnp.einsum("bnskrd,bnjkd->bnkrsj", q, self_k, preferred_element_type=jnp.float32)
    ss = jnp.where(self_mask_bnsj[:, :, None, None], ss * scale, _MASKED)
    blocks, values = [sp, ss], [prefix_v, self_v]
    specs = ["bnkrsl,blkd->bnskrd", "bnkrsj,bnjkd->bnskrd"]
    if context_k is not None:
        blocks.insert(0, _context_scores(q, context_k, "bnskrd,pkd->bnkrsp", dh))
        values.insert(0, context_v.astype(q.dtype))
        specs.insert(0, "bnkrsp,pkd->bnskrd")
    out = _softmax_combine(blocks, values, specs, q.dtype)
    return out.reshape(b, n, s, h, dh)
