"""A Qwen3/Qwen2/Llama-family decoder as pure functions over a parameter pytree.

Parameters are a nested dict of arrays (no module objects, `rlp_jax.model.dense.weights`): `init_params` makes one, `rlp_jax.model.dense.hf`
converts Hugging Face checkpoints to and from it, and `param_logical_axes` names every axis for
sharding. Per-layer parameters are stacked on a leading `layers` axis and the blocks run under
`lax.scan` (one compiled block, fast compiles at any depth), optionally rematerialised.

Three forward modes (all jit-compatible, static shapes):
  * `forward`: causal pass over [B, L] with segment ids (packing/padding); returns float32 logits and,
    on request, every layer's keys/values: the *prefix cache*.
  * `branch_forward`: N branches per document; branch n of document b attends to that document's
    prefix-cache positions < start[b, n] (same segment) plus its own tokens, with rotary positions
    continuing from position[b, n]. The prefix keys are shared by all branches of a document (the
    einsum broadcasts them; nothing is copied per branch). Used token by token with a `BranchCache`
    (sampling) and for whole branches at once (the differentiable loss forward).
  * decode: `prefill` + `decode_step`, incremental generation from right-padded prompts with a KV
    cache per layer holding the prompt's keys/values and then the generated tokens' (`DecodeState`).

Shapes (docs/method.md): B rows, L tokens, P prompt tokens, N branches per row, S branch tokens,
C cache slots, V vocabulary, D width, F MLP width, Q / E query / key-value heads, W head width, Y layers.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from rlp_jax.model import kernels, layers
from rlp_jax.model.branches import Branches
from rlp_jax.model.dense.config import ModelConfig
from rlp_jax.model.dense.weights import Params, init_params, param_logical_axes, param_shapes

__all__ = ["Params", "init_params", "param_logical_axes", "param_shapes",   # the parameter pytree (model.weights)
           "ContextCache", "context_cache", "PrefixCache", "BranchCache", "Branches", "branches_at",
           "init_branch_cache", "logits_from_hidden", "default_segments", "forward", "branch_forward",
           "DecodeState", "prefill", "split_layers", "decode_step"]


# ----------------------------------------------------------------------------------------------
# Caches
# ----------------------------------------------------------------------------------------------

@flax.struct.dataclass
class ContextCache:
    """Every layer's keys/values of a prompt that every document is read after (the prompted setting,
    `rlp_jax.rlp.prompt`): k, v [Y, P, E, W] at rotary positions 0..P-1, shared by all rows and branches."""

    k: jax.Array
    v: jax.Array

    @property
    def length(self) -> int:
        return self.k.shape[1]


def context_cache(params: Params, cfg: ModelConfig, prompt_ids_p) -> ContextCache:
    """The ContextCache of a prompt (token ids [P]); differentiable in params."""
    _, cache = forward(params, cfg, jnp.asarray(prompt_ids_p, jnp.int32)[None], return_cache=True,
                       return_logits=False)
    return ContextCache(k=cache.k[:, 0], v=cache.v[:, 0])


@flax.struct.dataclass
class PrefixCache:
    """Every layer's keys/values of a teacher-forced pass, plus where each token sits.

    k, v: [Y, B, L, E, W] (rotary already applied to k), compute dtype.
    segment_ids: [B, L] int32 (0 = padding). positions: [B, L] int32 rotary positions (after a
    context, shifted by its length P). context: the ContextCache the documents were read after, or None.
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    context: ContextCache | None = None


@flax.struct.dataclass
class BranchCache:
    """Keys/values of branch tokens written so far: k, v [Y, B, N, C, E, W]."""

    k: jax.Array
    v: jax.Array


def branches_at(cache: PrefixCache, t_bn: jax.Array) -> Branches:
    """Branches that replace token t of each document: they see x_<t of t's segment and take t's position.

    t_bn: [B, N] int32 indices in [0, L). A branch at t reproduces a full forward over
    [x_<t, branch tokens].
    """
    seg = jnp.take_along_axis(cache.segment_ids, t_bn, axis=1)
    pos = jnp.take_along_axis(cache.positions, t_bn, axis=1)
    return Branches(start=t_bn.astype(jnp.int32), segment=seg.astype(jnp.int32), position=pos.astype(jnp.int32))


def init_branch_cache(cfg: ModelConfig, batch: int, branches: int, length: int) -> BranchCache:
    """An empty branch cache with C = length slots per branch."""
    shape = (cfg.num_layers, batch, branches, length, cfg.num_kv_heads, cfg.head_dim)
    zeros = jnp.zeros(shape, cfg.jnp_compute_dtype)
    return BranchCache(k=zeros, v=zeros)


# ----------------------------------------------------------------------------------------------
# The block, shared by all modes
# ----------------------------------------------------------------------------------------------

def _project_qkv(cfg: ModelConfig, lp: dict, h, positions, inv_freq):
    """h [..., P, D] -> rotated q [..., P, Q, W], k/v [..., P, E, W]."""
    dt = h.dtype
    q = jnp.einsum("...d,dhk->...hk", h, lp["q_proj"].astype(dt))
    k = jnp.einsum("...d,dhk->...hk", h, lp["k_proj"].astype(dt))
    v = jnp.einsum("...d,dhk->...hk", h, lp["v_proj"].astype(dt))
    if cfg.attention_bias:
        q, k, v = q + lp["q_bias"].astype(dt), k + lp["k_bias"].astype(dt), v + lp["v_bias"].astype(dt)
    if cfg.qk_norm:
        q = layers.rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = layers.rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    return layers.apply_rope(q, positions, inv_freq), layers.apply_rope(k, positions, inv_freq), v


def _block(cfg: ModelConfig, attend, x, lp, extra):
    """One pre-norm transformer block. `attend(q, k, v, extra) -> (attn_out, new_kv)`."""
    with jax.named_scope("attention"):       # scopes name the ops in profiles (benchmarks/decode_profile.py)
        h = layers.rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
        attn, new_kv = attend(lp, h, extra)
        x = x + jnp.einsum("...hk,hkd->...d", attn, lp["o_proj"].astype(x.dtype))
    with jax.named_scope("mlp"):
        h = layers.rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
        x = x + layers.swiglu(h, lp["gate_proj"], lp["up_proj"], lp["down_proj"])
    return x, new_kv


def _run_blocks(params: Params, cfg: ModelConfig, x, attend, extras):
    """Scan the blocks over the stacked `layers` params; extras is a per-layer pytree (leading Y axis)."""
    def body(carry, xs):
        lp, extra = xs
        out, kv = _block(cfg, attend, carry, lp, extra)
        return layers.constrain_residual(out), kv

    return jax.lax.scan(cfg.checkpointed(body), layers.constrain_residual(x), (params["layers"], extras))


def _embed(params: Params, cfg: ModelConfig, tokens):
    return jnp.take(params["embed"], tokens, axis=0).astype(cfg.jnp_compute_dtype)


def logits_from_hidden(params: Params, cfg: ModelConfig, x):
    """Final norm and output projection: x [..., D] -> float32 logits [..., V]."""
    with jax.named_scope("lm_head"):
        x = layers.rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
        w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
        return jnp.einsum("...d,dv->...v", x, w.astype(x.dtype), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------
# Mode 1: full causal forward
# ----------------------------------------------------------------------------------------------

def default_segments(tokens_bl, pad_id: int | None = None):
    """Segment ids (1 for real tokens, 0 for `pad_id`) and positions 0..L-1 for unpacked rows."""
    seg = jnp.ones_like(tokens_bl, jnp.int32) if pad_id is None else (tokens_bl != pad_id).astype(jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(tokens_bl.shape[1], dtype=jnp.int32), tokens_bl.shape)
    return seg, pos


def forward(params: Params, cfg: ModelConfig, tokens_bl, *, segment_ids_bl=None, positions_bl=None,
            return_cache: bool = False, return_logits: bool = True, logits_at_b=None,
            return_hidden: bool = False, context: ContextCache | None = None):
    """Teacher-forced causal pass.

    Args:
      tokens_bl: [B, L] int32.
      segment_ids_bl: [B, L] int32; a token attends to earlier tokens of its own segment; 0 marks
        padding. Default: one segment per row.
      positions_bl: [B, L] int32 rotary positions (restart at 0 per packed document). Default 0..L-1.
      return_cache: also return the `PrefixCache` of every layer's keys/values.
      return_logits: False skips the output projection (a prefix cache is all the caller needs).
      logits_at_b: optional [B] int32 index of the one position per row whose logits are wanted
        (e.g. a prompt's last token): the output projection then runs on B vectors, not B x L.
      return_hidden: return the final hidden states [B, L, D] (before the final norm) in place of
        the logits (for chunked projections, `scoring.shifted_token_logprobs_chunked`).
      context: a ContextCache (a prompt) every token also attends to, in full; the row's rotary
        positions are shifted by its length P, as if each document followed the prompt.
    Returns:
      (logits [B, L, V] float32 ([B, V] with logits_at_b; hidden [B, L, D] with return_hidden) or None,
       PrefixCache or None).
    """
    seg_default, pos_default = default_segments(tokens_bl)
    seg = seg_default if segment_ids_bl is None else segment_ids_bl.astype(jnp.int32)
    pos = pos_default if positions_bl is None else positions_bl.astype(jnp.int32)
    if context is not None:
        pos = pos + context.length
    length = tokens_bl.shape[1]
    kernel = cfg.attention == "kernel" and context is None   # a prompt context: never the kernel
    refused = kernels.supported(length, cfg.jnp_compute_dtype) if kernel else None
    if refused:
        kernels.warn_once(f"model.attention=kernel: {refused}; the pure-JAX attention runs instead")
        kernel = False
    blockwise = not kernel and cfg.blockwise_for(length)
    if not blockwise and not kernel:
        mask = layers.causal_segment_mask(seg)                                          # [B, Lq, Lk]
    inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def attend(lp, h, extra):
        ck, cv = extra if extra is not None else (None, None)
        q, k, v = _project_qkv(cfg, lp, h, pos, inv_freq)
        if kernel:
            out = kernels.full_attention(q, k, v, seg, cfg.q_per_kv)
        elif blockwise:
            out = layers.full_attention_blockwise(q, k, v, seg, cfg.q_per_kv, context_k=ck, context_v=cv,
                                                  block=cfg.attention_block)
        else:
            out = layers.full_attention(q, k, v, mask, cfg.q_per_kv, context_k=ck, context_v=cv)
        return out, ((k, v) if return_cache else None)

    extras = None if context is None else (context.k, context.v)
    x, kv = _run_blocks(params, cfg, _embed(params, cfg, tokens_bl), attend, extras)
    if logits_at_b is not None:
        x = jnp.take_along_axis(x, logits_at_b.astype(jnp.int32)[:, None, None], axis=1)[:, 0]   # [B, D]
    logits = x if return_hidden else (logits_from_hidden(params, cfg, x) if return_logits else None)
    cache = (PrefixCache(k=kv[0], v=kv[1], segment_ids=seg, positions=pos, context=context)
             if return_cache else None)
    return logits, cache


# ----------------------------------------------------------------------------------------------
# Mode 2: branches off a shared prefix
# ----------------------------------------------------------------------------------------------

def branch_forward(params: Params, cfg: ModelConfig, prefix: PrefixCache, branches: Branches,
                   tokens_bns, *, cache: BranchCache | None = None, offset=0, return_hidden: bool = False):
    """Forward of N branches per document over the shared prefix cache.

    Args:
      prefix: the documents' `PrefixCache` ([Y, B, L, E, W]).
      branches: `Branches` ([B, N]) saying where each branch hangs off its document.
      tokens_bns: [B, N, S] int32 branch tokens, at branch indices offset .. offset+S-1.
      cache: optional `BranchCache` with C slots. Given: the S new keys/values are written at
        `offset` and queries attend to slots < offset + their index + 1 (token-by-token sampling).
        None: the S tokens attend to each other causally (a whole branch at once; differentiable).
      offset: int (may be traced) index of the first token within the branch.
      return_hidden: return the final hidden states [B, N, S, D] (before the final norm) instead of
        the logits, for callers that project only some slots or in chunks (`logits_from_hidden`).
    Returns:
      (logits [B, N, S, V] float32 (or hidden [B, N, S, D]), updated BranchCache or None).
    """
    b, n, s = tokens_bns.shape
    length = prefix.segment_ids.shape[1]
    idx = jnp.arange(length)
    prefix_mask = ((idx[None, None, :] < branches.start[:, :, None])
                   & (prefix.segment_ids[:, None, :] == branches.segment[:, :, None]))  # [B, N, L]
    step = offset + jnp.arange(s)                                                      # [S]
    positions = branches.position[:, :, None] + step                                     # [B, N, S]
    slots = s                                     # whole branches (no cache): the S tokens are the own keys
    self_mask = jnp.broadcast_to(jnp.arange(slots)[None, :] <= step[:, None], (b, n, s, slots))   # [B, N, S, S]
    inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def attend(lp, h, extra):
        pk, pv, layer, xk, xv = extra
        q, k, v = _project_qkv(cfg, lp, h, positions, inv_freq)
        if cache is not None:   # sampling: read the filled slots, hand the new keys/values back to be written once
            # every layer's prefix and cache [Y, ...], read in place at `layer` (scanned slices would be copied)
            pk, pv, ck, cv = prefix.k, prefix.v, cache.k, cache.v
            out = layers.branch_decode_attention(
                q, pk, pv, prefix.segment_ids, branches.segment, branches.start,
                ck, cv, offset, k.astype(ck.dtype), v.astype(cv.dtype), cfg.q_per_kv, context_k=xk, context_v=xv,
                prefix_block=cfg.attention_block if cfg.blockwise_for(length) else None,
                cache_block=cfg.decode_block, layer=layer)
            return out, (k.astype(ck.dtype), v.astype(cv.dtype))
        if cfg.blockwise_for(length) or cfg.blockwise_for(slots):
            out = layers.branch_attention_blockwise(
                q, pk.astype(q.dtype), pv.astype(q.dtype), prefix.segment_ids, branches.segment, branches.start,
                k.astype(q.dtype), v.astype(q.dtype), step, cfg.q_per_kv, context_k=xk, context_v=xv,
                block=cfg.attention_block, prefix_blocks=cfg.blockwise_for(length), own_blocks=cfg.blockwise_for(slots))
        else:
            out = layers.branch_attention(q, pk.astype(q.dtype), pv.astype(q.dtype), prefix_mask,
                                          k.astype(q.dtype), v.astype(q.dtype), self_mask, cfg.q_per_kv,
                                          context_k=xk, context_v=xv)
        return out, None

    ctx = prefix.context
    extras = ((prefix.k, prefix.v, None) if cache is None else (None, None, jnp.arange(cfg.num_layers))) + (
        None if ctx is None else ctx.k, None if ctx is None else ctx.v)
    x, kv = _run_blocks(params, cfg, _embed(params, cfg, tokens_bns), attend, extras)
    # the S new keys/values [Y, B, N, S, E, W] written at `offset`, in place in a sampling loop's carry
    new_cache = None if cache is None else BranchCache(
        k=jax.lax.dynamic_update_slice_in_dim(cache.k, kv[0], offset, axis=3),
        v=jax.lax.dynamic_update_slice_in_dim(cache.v, kv[1], offset, axis=3))
    return (x if return_hidden else logits_from_hidden(params, cfg, x)), new_cache


# ----------------------------------------------------------------------------------------------
# Mode 3: incremental decoding from prompts
# ----------------------------------------------------------------------------------------------

@flax.struct.dataclass
class DecodeState:
    """KV cache of B sequences for incremental decoding: each layer's prompt keys/values followed by
    J slots for the generated tokens, in the layouts the single-query attention reads directly.

    k: tuple of Y arrays [B, E, W, L + J] (keys transposed: q.k is a plain batched matmul).
    v: tuple of Y arrays [B, E, L + J, W]. One array per layer (not stacked on a `layers` axis), so a
    step writes one slot per layer in place and reads each layer's cache without slicing a copy out.
    Slot t < L holds prompt token t (valid where t < prompt_lens); slot L + i generated token i.
    prompt_lens: [B] int32. step: [] int32 tokens fed so far. prompt_width: L (static).
    """

    k: tuple
    v: tuple
    prompt_lens: jax.Array
    step: jax.Array
    prompt_width: int = flax.struct.field(pytree_node=False)


def prefill(params: Params, cfg: ModelConfig, prompts_bl, prompt_lens_b, max_new_tokens: int):
    """Encode right-padded prompts [B, L] with lengths [B] (>= 1).

    Returns (logits of each prompt's last token [B, V] float32, DecodeState).
    """
    length = prompts_bl.shape[1]
    seg = (jnp.arange(length)[None, :] < prompt_lens_b[:, None]).astype(jnp.int32)
    last, prefix = forward(params, cfg, prompts_bl, segment_ids_bl=seg, return_cache=True,
                           logits_at_b=prompt_lens_b - 1)
    dt = cfg.jnp_compute_dtype
    pad = lambda x, axis: jnp.pad(x.astype(dt), [(0, max_new_tokens if a == axis else 0) for a in range(4)])
    ks = tuple(pad(jnp.transpose(prefix.k[i], (0, 2, 3, 1)), 3) for i in range(cfg.num_layers))  # [B, E, W, L + J]
    vs = tuple(pad(jnp.transpose(prefix.v[i], (0, 2, 1, 3)), 2) for i in range(cfg.num_layers))  # [B, E, L + J, W]
    state = DecodeState(k=ks, v=vs, prompt_lens=prompt_lens_b.astype(jnp.int32), step=jnp.zeros((), jnp.int32),
                        prompt_width=length)
    return last, state


def split_layers(params: Params) -> Params:
    """params with `layers` as a tuple of per-layer dicts instead of stacked arrays, for `decode_step`.

    Split once outside a decode loop: slicing layer i out of the stacked arrays inside the loop copies
    every weight at every step (XLA does not hoist the slices out of the while loop)."""
    if isinstance(params["layers"], tuple):
        return params
    stacked = params["layers"]
    n = next(iter(stacked.values())).shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a: a[i], stacked) for i in range(n))}


def decode_step(params: Params, cfg: ModelConfig, state: DecodeState, tokens_b):
    """Feed one token per sequence [B]; returns (next-token logits [B, V] float32, new DecodeState).

    params: as `init_params`, or better `split_layers(params)` computed once outside the decode loop.
    The layers are unrolled (a Python loop): with one cache array per layer every write is in place
    and no layer's cache is sliced out of a stacked array (a full copy per layer and step on CPU).
    """
    slot = state.prompt_width + state.step
    total = state.v[0].shape[2]
    t = jnp.arange(total)
    valid = ((t[None, :] < state.prompt_lens[:, None])                                      # [B, L + J]
             | ((t[None, :] >= state.prompt_width) & (t[None, :] <= slot)))
    positions = (state.prompt_lens + state.step)[:, None]                                  # [B, 1]
    inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    x = _embed(params, cfg, tokens_b[:, None])                                              # [B, 1, D]
    new_k, new_v = [], []
    per_layer = split_layers(params)["layers"]
    for i in range(cfg.num_layers):
        lp = per_layer[i]
        ck, cv = state.k[i], state.v[i]

        def attend(lp, h, _):
            with jax.named_scope("qkv_proj"):
                q, k, v = _project_qkv(cfg, lp, h, positions, inv_freq)  # [B, 1, Q, W], [B, 1, E, W]
            with jax.named_scope("kv_write"):
                k = jax.lax.dynamic_update_slice(ck, jnp.transpose(k, (0, 2, 3, 1)).astype(ck.dtype), (0, 0, 0, slot))
                v = jax.lax.dynamic_update_slice(cv, jnp.transpose(v, (0, 2, 1, 3)).astype(cv.dtype), (0, 0, slot, 0))
            with jax.named_scope("cache_read"):
                out = layers.decode_attention(q[:, 0], k.astype(q.dtype), v.astype(q.dtype), valid, cfg.q_per_kv)
            return out[:, None], (k, v)

        x, (k, v) = _block(cfg, attend, x, lp, None)
        new_k.append(k)
        new_v.append(v)
    logits = logits_from_hidden(params, cfg, x[:, 0])
    return logits, state.replace(k=tuple(new_k), v=tuple(new_v), step=state.step + 1)
