"""Blockwise (flash-style) attention in pure JAX: an online softmax over key blocks, with a custom VJP that
recomputes each block's probabilities in the backward pass, so neither pass holds more than one key
block of scores: [B, M, E, A, block] instead of [B, M, E, A, L].

The one mask every mode needs is written from per-position descriptors, never as an [M, L] array:
query m may read key l iff  seg_k[l] > 0,  seg_q[m] == seg_k[l]  and  l <= lim_q[m].
- full (causal, packed) attention: seg = the segment ids, lim_q = the query's own index;
- branch queries over their document's prefix: seg_q = the branch's segment, lim_q = its start - 1.

`attend_blocks` returns the normalised output and the log-sum-exp of each query's scores, so that a
caller merges it with other key sets (a prompt's keys, a branch's own keys) by `merge`: the result is
the joint softmax over all of them, as `layers._softmax_combine` computes it densely.

Sampling reads its caches with `attend_filled` (a branch's thought cache, up to its last filled block) and
`attend_prefix` (the documents' prefix, under the same descriptor mask): no VJP, each block sliced in place
out of every layer's stacked cache at a (traced) layer index, so a decode step copies no cache.

Shapes (docs/method.md): B rows, M queries, L keys, E key/value heads, A query heads per key/value head,
W head width. Scores, the running max and sums are float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

MASKED = -1e30   # as layers._MASKED: a fully masked query gets a uniform softmax, not NaN
DEFAULT_BLOCK = 512
DECODE_BLOCK = 128   # at most this many cache slots per read in sampling (`attend_filled`)
FILLED_SCOPE = "attend_filled"   # the named scope of its loop (the planner's roofline counts its trips by it)


def _blocks(x, block: int, axis: int = 1):
    """[B, L, ...] -> [L/block, B, block, ...] (L padded with zeros to a multiple of block)."""
    pad = -x.shape[axis] % block
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths)
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _mask(seg_q, lim_q, seg_kb, idx_kb):
    """[B, M, block] bool from seg_q/lim_q [B, M], seg_kb [B, block], idx_kb [block]."""
    return ((seg_kb[:, None, :] > 0) & (seg_q[:, :, None] == seg_kb[:, None, :])
            & (idx_kb[None, None, :] <= lim_q[:, :, None]))


def _scores(q, kb, mask, idx_kb, length, scale):
    """q [B, M, E, A, W] . kb [B, blk, E, W] -> [B, E, A, M, blk] float32, masked. Keys past `length` (the
    padding of the last block) score below MASKED, so a fully masked query averages the L real values
    only, exactly as the dense path does."""
    s = jnp.einsum("bmeaw,bkew->beamk", q, kb, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None, None], s, jnp.where(idx_kb < length, MASKED, 2 * MASKED))


def _key_blocks(k, v, seg_k, block):
    kb, vb, sb = _blocks(k, block), _blocks(v, block), _blocks(seg_k, block)
    return kb, vb, sb, jnp.arange(kb.shape[0] * block).reshape(kb.shape[0], block)


def _query_chunks(x, block: int):
    """[B, M, ...] -> [M/block, B, block, ...] (zero padded; a padded query has segment 0: fully masked)."""
    return _blocks(x, block)


def _unchunk(x, length: int, axis: int = 1):
    """Inverse of `_blocks` along `axis` of the un-blocked array: [n, B, blk, ...] -> [B, n * blk, ...][:, :length]
    (axis 1), or for a chunk axis placed last ([n, B, E, A, blk]) -> [B, E, A, n * blk][..., :length]."""
    if axis == 1:
        return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :length]
    return jnp.moveaxis(x, 0, -2).reshape(*x.shape[1:-1], -1)[..., :length]


def _forward_chunk(q, seg_q, lim_q, keys, length, scale):
    """One chunk of queries q [B, m, E, A, W] over every key block: (out [B, m, E, A, W] float32,
    running max and sum [B, E, A, m])."""
    b, m, e, a, w = q.shape

    def body(carry, xs):
        mx, den, acc = carry                                   # [B, E, A, m] x2, [B, E, A, m, W]
        k_i, v_i, s_i, idx_i = xs
        s = _scores(q, k_i, _mask(seg_q, lim_q, s_i, idx_i), idx_i, length, scale)
        new_mx = jnp.maximum(mx, s.max(-1))
        p = jnp.exp(s - new_mx[..., None])
        fix = jnp.exp(mx - new_mx)
        acc = acc * fix[..., None] + jnp.einsum("beamk,bkew->beamw", p.astype(v_i.dtype), v_i,
                                                preferred_element_type=jnp.float32)
        return (new_mx, den * fix + p.sum(-1), acc), None

    init = (jnp.full((b, e, a, m), MASKED, jnp.float32), jnp.zeros((b, e, a, m), jnp.float32),
            jnp.zeros((b, e, a, m, w), jnp.float32))
    (mx, den, acc), _ = jax.lax.scan(_no_residuals(body), init, keys)
    return (acc / den[..., None]).transpose(0, 3, 1, 2, 4), mx, den


def _no_residuals(fn):
    """`fn` (a loop body) rematerialised: when the forward is differentiated (`jax.checkpoint` around a layer
    makes JAX linearise it), the scan's partial evaluation would otherwise hoist what depends only on the
    integer descriptors (each block's mask, broadcast to every head) out of the loop and keep it for every
    query chunk x key block: [chunks, blocks, B, E, A, block, block] bools. Rematerialised, the body keeps
    only its inputs, and the masks are rebuilt inside the loop."""
    return jax.checkpoint(fn, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)


def _q_block(m: int, block: int) -> int:
    """Queries per chunk: `block`, or all M when fewer (a decode step's few queries are not padded to a block)."""
    return min(m, block)


def _forward(q, k, v, seg_q, lim_q, seg_k, block):
    """Query chunks of `block` (one at a time, `lax.map`), each over all key blocks."""
    m, scale = q.shape[1], 1.0 / math.sqrt(q.shape[-1])
    keys = _key_blocks(k, v, seg_k, block)
    chunk = lambda xs: _forward_chunk(*xs, keys, k.shape[1], scale)                  # noqa: E731
    out, mx, den = jax.lax.map(_no_residuals(chunk), tuple(_query_chunks(x, _q_block(m, block)) for x in (q, seg_q, lim_q)))
    out, mx, den = _unchunk(out, m), _unchunk(mx, m, axis=-1), _unchunk(den, m, axis=-1)
    return out.astype(q.dtype), mx + jnp.log(den), (mx, den)    # out [B, M, E, A, W], lse [B, E, A, M]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def attend_blocks(q, k, v, seg_q, lim_q, seg_k, block: int = DEFAULT_BLOCK):
    """Attention of queries q [B, M, E, A, W] over keys/values k, v [B, L, E, W] under the descriptor mask
    (module docstring; seg_q, lim_q [B, M] int32, seg_k [B, L] int32), in chunks of `block` queries by
    blocks of `block` keys: at most [B, E, A, block, block] scores exist at once.
    Returns (out [B, M, E, A, W] in q's dtype, lse [B, E, A, M] float32)."""
    return _forward(q, k, v, seg_q, lim_q, seg_k, block)[:2]


def _fwd(q, k, v, seg_q, lim_q, seg_k, block):
    out, lse, (mx, den) = _forward(q, k, v, seg_q, lim_q, seg_k, block)
    return (out, lse), (q, k, v, seg_q, lim_q, seg_k, out, mx, den)


def _bwd(block, res, cts):
    # The probabilities are recomputed as exp(s - max) / sum, not exp(s - lse): for a fully masked query
    # lse = MASKED + log(L) rounds to MASKED in float32, and the dense path's 1/L would become 1.
    q, k, v, seg_q, lim_q, seg_k, out, mx, den = res
    d_out, d_lse = cts
    m, length, scale = q.shape[1], k.shape[1], 1.0 / math.sqrt(q.shape[-1])
    do = d_out.astype(jnp.float32)
    # d/ds_j of (out, lse) = p_j (do.v_j - (do.out - d_lse))
    delta = jnp.einsum("bmeaw,bmeaw->beam", do, out.astype(jnp.float32)) - d_lse.astype(jnp.float32)
    kb, vb, sb, idx = _key_blocks(k, v, seg_k, block)
    qb = _q_block(m, block)
    per_query = [_query_chunks(x, qb) for x in (q, seg_q, lim_q, do)]
    per_stat = [_query_chunks(jnp.moveaxis(x, -1, 1), qb) for x in (mx, den, delta)]   # [n, B, qb, E, A]

    def chunk(dkv, xs):                       # one query chunk against every key block
        q_c, sq_c, lq_c, do_c, mx_c, den_c, delta_c = xs
        mx_c, den_c, delta_c = (jnp.moveaxis(x, 1, -1) for x in (mx_c, den_c, delta_c))   # [B, E, A, blk]
        den_c = jnp.where(den_c > 0, den_c, 1.0)   # padded queries (sum 0): p = 0, not 0 / 0

        def body(dq, ys):
            k_i, v_i, s_i, idx_i = ys
            mask = _mask(sq_c, lq_c, s_i, idx_i)
            p = jnp.exp(_scores(q_c, k_i, mask, idx_i, length, scale) - mx_c[..., None]) / den_c[..., None]
            dv = jnp.einsum("beamk,bmeaw->bkew", p, do_c)
            dp = jnp.einsum("bmeaw,bkew->beamk", do_c, v_i.astype(jnp.float32))
            ds = jnp.where(mask[:, None, None], p * (dp - delta_c[..., None]), 0.0) * scale
            dq = dq + jnp.einsum("beamk,bkew->bmeaw", ds, k_i.astype(jnp.float32))
            return dq, (jnp.einsum("beamk,bmeaw->bkew", ds, q_c.astype(jnp.float32)), dv)

        dq_c, (dk, dv) = jax.lax.scan(body, jnp.zeros(q_c.shape, jnp.float32), (kb, vb, sb, idx))
        return (dkv[0] + dk, dkv[1] + dv), dq_c

    zeros = jnp.zeros(kb.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(chunk, (zeros, zeros), (*per_query, *per_stat))
    zero = lambda x: jnp.zeros(x.shape, jax.dtypes.float0)                            # noqa: E731 (integer inputs)
    return (_unchunk(dq, m).astype(q.dtype), _unchunk(dk, length).astype(k.dtype), _unchunk(dv, length).astype(v.dtype),
            zero(seg_q), zero(lim_q), zero(seg_k))


attend_blocks.defvjp(_fwd, _bwd)


def dense_part(scores, v, spec: str):
    """A key set scored densely (a prompt's keys, a branch's own keys) in `attend_blocks`' output form:
    scores [..., keys] float32 (masked), `spec` the einsum of probabilities and v giving [B, M, E, A, W]
    (e.g. "beamp,pew->bmeaw"). Returns (out, lse [B, E, A, M])."""
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.exp(scores - lse[..., None]).astype(v.dtype)
    return jnp.einsum(spec, probs, v), lse


def merge(parts):
    """The joint softmax over several key sets from their (out [B, M, E, A, W], lse [B, E, A, M]) parts."""
    lse = functools.reduce(jnp.logaddexp, [p[1] for p in parts])
    total = 0
    for out, part_lse in parts:
        weight = jnp.exp(part_lse - lse).transpose(0, 3, 1, 2)[..., None]        # [B, M, E, A, 1]
        total = total + weight * out.astype(jnp.float32)
    return total.astype(parts[0][0].dtype)


def _read_in_place(q, k, v, layer, trips, blk: int, keep):
    """The online softmax of queries q [B, M, E, A, W] over `trips` blocks of `blk` keys, each block sliced
    straight out of layer `layer` of k, v [Y, B, C, E, W] (block i covers keys [i blk, (i + 1) blk); the last
    block is read from C - blk and overlaps the one before it). keep(lo, idx) -> bool mask of the block's keys
    idx [blk] (lo: the block's first own key), broadcastable to [B, E, A, M, blk]. For inference (no custom
    VJP). Returns (out [B, M, E, A, W] in q's dtype, lse [B, E, A, M] float32; out 0 and lse MASKED for a query
    that kept no key)."""
    b, m, e, a, w = q.shape
    c = k.shape[2]
    scale = 1.0 / math.sqrt(w)

    def body(i, carry):
        mx, den, acc = carry                                   # [B, E, A, M] x2, [B, E, A, M, W]
        lo = i * blk
        start = jnp.minimum(lo, c - blk)
        k_i = jax.lax.dynamic_slice(k, (layer, 0, start, 0, 0), (1, b, blk, e, w))[0].astype(q.dtype)
        v_i = jax.lax.dynamic_slice(v, (layer, 0, start, 0, 0), (1, b, blk, e, w))[0].astype(q.dtype)
        keep_i = keep(lo, start + jnp.arange(blk))
        s = jnp.einsum("bmeaw,bkew->beamk", q, k_i, preferred_element_type=jnp.float32) * scale
        s = jnp.where(keep_i, s, MASKED)
        new_mx = jnp.maximum(mx, s.max(-1))
        p = jnp.where(keep_i, jnp.exp(s - new_mx[..., None]), 0.0)
        fix = jnp.exp(mx - new_mx)
        acc = acc * fix[..., None] + jnp.einsum("beamk,bkew->beamw", p.astype(v_i.dtype), v_i,
                                                preferred_element_type=jnp.float32)
        return new_mx, den * fix + p.sum(-1), acc

    init = (jnp.full((b, e, a, m), MASKED, jnp.float32), jnp.zeros((b, e, a, m), jnp.float32),
            jnp.zeros((b, e, a, m, w), jnp.float32))
    mx, den, acc = jax.lax.fori_loop(0, trips, body, init)
    some = den > 0
    safe = jnp.where(some, den, 1.0)
    out = (acc / safe[..., None]).transpose(0, 3, 1, 2, 4)
    return out.astype(q.dtype), jnp.where(some, mx + jnp.log(safe), MASKED)


def _stacked(k, v, layer):
    """(k, v, layer) with a leading layer axis: [B, C, E, W] caches become a one-layer stack read at 0."""
    return (k[None], v[None], 0) if layer is None else (k, v, layer)


def attend_filled(q, k, v, filled, block: int = DECODE_BLOCK, layer=None):
    """Queries q [B, M, E, A, W] over the first `filled` slots (an int, may be traced) of a cache k, v [B, C, E, W],
    reading only the blocks of `block` slots that hold them: a `lax.fori_loop` of ceil(filled / block) trips,
    so a sampling step's cache traffic follows the thought's length, not the cache's size C. For inference
    (no custom VJP). Returns (out [B, M, E, A, W] in q's dtype, lse [B, E, A, M] float32; out 0 and lse MASKED
    while nothing is filled).

    layer: given (an int, may be traced), k and v are every layer's caches [Y, B, C, E, W] and the blocks are
    read from layer `layer` directly. Inside a layer scan, pass the stacked caches and the layer index rather
    than scanning over them: a scan's per-layer slice of a cache that feeds this loop is copied whole (XLA:TPU
    materialises a loop's operand), which costs the whole cache's traffic at every token."""
    k, v, layer = _stacked(k, v, layer)
    blk = min(block, k.shape[2])
    with jax.named_scope(FILLED_SCOPE):
        return _read_in_place(q, k, v, layer, (filled + blk - 1) // blk, blk,
                              lambda lo, idx: (idx >= lo) & (idx < filled))


def attend_prefix(q, k, v, seg_q, lim_q, seg_k, block: int = DEFAULT_BLOCK, layer=None):
    """`attend_blocks` for inference: queries q [B, M, E, A, W] over keys k, v [B, L, E, W] (or every layer's
    [Y, B, L, E, W] read at `layer`, as `attend_filled`) under the descriptor mask (seg_q, lim_q [B, M], seg_k
    [B, L]), each block of `block` keys sliced in place (no blocked copy of the keys). Returns (out, lse) as
    `attend_blocks` does, except that a query that sees no key gets out 0 and lse MASKED (either merges the
    same: its part weighs nothing)."""
    k, v, layer = _stacked(k, v, layer)
    length = k.shape[2]
    blk = min(block, length)

    def keep(lo, idx):
        seg_kb = jax.lax.dynamic_slice_in_dim(seg_k, idx[0], blk, axis=1)                    # [B, blk]
        return (_mask(seg_q, lim_q, seg_kb, idx) & (idx >= lo))[:, None, None]               # [B, 1, 1, M, blk]

    return _read_in_place(q, k, v, layer, -(-length // blk), blk, keep)
