"""Blockwise attention (`rlp_jax.model.blockwise`, `model.attention=blockwise`) equals the dense path: the
layers (outputs and gradients, with and without a prompt, packed and padded rows, a last block that is
partly padding), the model's logits and parameter gradients under every remat mode, and the RLP step's
rollout, rewards, loss and gradients."""


import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax.model import blockwise, layers
from rlp_jax.model.config import REMATS
from rlp_jax.model.dense import transformer
from rlp_jax.rlp.rollout import thought_rollout
from tests.rlp_cases import (  # noqa: F401
    CFG,
    IDS,
    assert_grads_close,
    batch,
    objective,
    params,
    rlp_config,
)

B, L, E, A, W, P = 2, 37, 2, 2, 8, 5   # L = 4 blocks of 8 and a partial one
BLOCK = 8


def _normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


@pytest.fixture(scope="module")
def qkv():
    r = np.random.default_rng(0)
    seg = np.ones((B, L), np.int32)
    seg[0, 20:] = 2   # row 0: two packed documents; row 1: padding after 30
    seg[1, 30:] = 0
    return dict(q=_normal(r, B, L, E * A, W), k=_normal(r, B, L, E, W), v=_normal(r, B, L, E, W),
                ck=_normal(r, P, E, W), cv=_normal(r, P, E, W), seg=jnp.asarray(seg), r=r)


def _max_diff(a, b):
    """The largest |a - b| over all leaves (NaN if any leaf has one: np.max propagates it, Python's max may not)."""
    return float(np.max([jnp.abs(x - y).max() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]))


@pytest.mark.parametrize("with_prompt", [False, True])
def test_full_attention_equals_dense(qkv, with_prompt):
    q, k, v, seg = qkv["q"], qkv["k"], qkv["v"], qkv["seg"]
    ctx = dict(context_k=qkv["ck"], context_v=qkv["cv"]) if with_prompt else {}
    mask = jnp.tril(jnp.ones((L, L), bool))[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    ct = _normal(qkv["r"], *q.shape)
    dense = lambda q, k, v: (layers.full_attention(q, k, v, mask, A, **ctx) * ct).sum()
    blocks = lambda q, k, v: (layers.full_attention_blockwise(q, k, v, seg, A, **ctx, block=BLOCK) * ct).sum()
    assert _max_diff(layers.full_attention(q, k, v, mask, A, **ctx),
                     layers.full_attention_blockwise(q, k, v, seg, A, **ctx, block=BLOCK)) < 1e-5
    assert _max_diff(jax.grad(dense, (0, 1, 2))(q, k, v), jax.grad(blocks, (0, 1, 2))(q, k, v)) < 1e-5


@pytest.mark.parametrize("with_prompt,own_blocks", [(False, False), (True, False), (False, True)])
def test_branch_attention_equals_dense(qkv, with_prompt, own_blocks):
    """Prefix blockwise; the branch's own keys dense, or blockwise too (long thoughts: 12 slots, blocks of 8)."""
    k, v, seg, r = qkv["k"], qkv["v"], qkv["seg"], qkv["r"]
    n, s, c = (3, 4, 4) if not own_blocks else (2, 12, 12)
    q = _normal(r, B, n, s, E * A, W)
    self_k, self_v = _normal(r, B, n, c, E, W), _normal(r, B, n, c, E, W)
    start = jnp.asarray([[5, 19, 33], [0, 12, 29]], jnp.int32)[:, :n]   # a branch at 0 sees no prefix key
    bseg = jnp.asarray([[1, 1, 2], [1, 1, 1]], jnp.int32)[:, :n]
    prefix_mask = (jnp.arange(L)[None, None] < start[:, :, None]) & (seg[:, None, :] == bseg[:, :, None])
    self_mask = jnp.broadcast_to(jnp.arange(c)[None] <= jnp.arange(s)[:, None], (B, n, s, c))
    ctx = dict(context_k=qkv["ck"], context_v=qkv["cv"]) if with_prompt else {}
    ct = _normal(r, *q.shape)
    dense = lambda *a: layers.branch_attention(a[0], a[1], a[2], prefix_mask, a[3], a[4], self_mask, A, **ctx)
    blocks = lambda *a: layers.branch_attention_blockwise(a[0], a[1], a[2], seg, bseg, start, a[3], a[4],
                                                          jnp.arange(s), A, **ctx, block=BLOCK, own_blocks=own_blocks)
    args = (q, k, v, self_k, self_v)
    assert _max_diff(dense(*args), blocks(*args)) < 1e-5
    grad = lambda f: jax.grad(lambda *a: (f(*a) * ct).sum(), argnums=tuple(range(5)))(*args)
    assert _max_diff(grad(dense), grad(blocks)) < 1e-5


@pytest.mark.parametrize("remat", REMATS)
def test_model_logits_and_gradients_equal_dense(params, batch, remat):  # noqa: F811
    dense, blocks = CFG.replace(attention="dense", remat=remat), CFG.replace(attention="blockwise",
                                                                                attention_block=4, remat=remat)
    context = transformer.context_cache(params, dense, jnp.asarray([5, 6, 7]))

    def loss(p, cfg):
        logits, _ = transformer.forward(p, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                                  positions_bl=batch["positions"], context=context)
        lp = jax.nn.log_softmax(logits[:, :-1], -1)
        return -jnp.take_along_axis(lp, batch["tokens"][:, 1:, None], -1).mean(), logits

    (l_d, logits_d), g_d = jax.value_and_grad(loss, has_aux=True)(params, dense)
    (l_b, logits_b), g_b = jax.value_and_grad(loss, has_aux=True)(params, blocks)
    np.testing.assert_allclose(logits_b, logits_d, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(l_b, l_d, atol=1e-6)
    assert_grads_close(g_b, g_d)


@pytest.mark.parametrize("with_prompt,prefix_block", [(False, None), (True, None), (False, BLOCK)])
def test_a_sampling_step_reads_the_filled_slots_as_the_dense_path_does(qkv, with_prompt, prefix_block):
    """`branch_decode_attention` (the cache read block by block up to the last filled slot, the new token's key
    apart) equals `branch_attention` after writing the new key into the cache, at every fill level of a
    13-slot cache in blocks of 4 (the last block overlaps the one before it)."""
    k, v, seg, r = qkv["k"], qkv["v"], qkv["seg"], qkv["r"]
    n, c = 3, 13
    q = _normal(r, B, n, 1, E * A, W)
    cache_k, cache_v = _normal(r, B, n, c, E, W), _normal(r, B, n, c, E, W)
    start = jnp.asarray([[5, 19, 33], [0, 12, 29]], jnp.int32)
    bseg = jnp.asarray([[1, 1, 2], [1, 1, 1]], jnp.int32)
    prefix_mask = (jnp.arange(L)[None, None] < start[:, :, None]) & (seg[:, None, :] == bseg[:, :, None])
    ctx = dict(context_k=qkv["ck"], context_v=qkv["cv"]) if with_prompt else {}
    step = jax.jit(lambda f, nk, nv: layers.branch_decode_attention(q, k, v, seg, bseg, start, cache_k, cache_v, f,
                                                                    nk, nv, A, **ctx, prefix_block=prefix_block,
                                                                    cache_block=4))
    for filled in range(c):
        new_k, new_v = _normal(r, B, n, 1, E, W), _normal(r, B, n, 1, E, W)
        written_k = cache_k.at[:, :, filled].set(new_k[:, :, 0])
        written_v = cache_v.at[:, :, filled].set(new_v[:, :, 0])
        self_mask = jnp.broadcast_to(jnp.arange(c) <= filled, (B, n, 1, c))
        want = layers.branch_attention(q, k, v, prefix_mask, written_k, written_v, self_mask, A, **ctx)
        assert _max_diff(step(filled, new_k, new_v), want) < 1e-5, filled


def test_a_sampling_step_never_reads_the_blocks_past_the_last_filled_slot(qkv):
    """NaN in every cache block after the one holding slot filled - 1 leaves the output unchanged and finite: those
    blocks are not read (a masked read would multiply NaN values by 0 and give NaN)."""
    k, v, seg, r = qkv["k"], qkv["v"], qkv["seg"], qkv["r"]
    n, c, filled = 2, 16, 5                                     # blocks of 4: slots 0-7 read, 8-15 not
    q = _normal(r, B, n, 1, E * A, W)
    cache_k, cache_v = _normal(r, B, n, c, E, W), _normal(r, B, n, c, E, W)
    new_k, new_v = _normal(r, B, n, 1, E, W), _normal(r, B, n, 1, E, W)
    start, bseg = jnp.asarray([[5, 19], [3, 12]], jnp.int32), jnp.ones((B, n), jnp.int32)
    step = lambda ck, cv: layers.branch_decode_attention(q, k, v, seg, bseg, start, ck, cv, jnp.int32(filled),
                                                          new_k, new_v, A, cache_block=4)
    poisoned = (cache_k.at[:, :, 8:].set(jnp.nan), cache_v.at[:, :, 8:].set(jnp.nan))
    got = jax.jit(step)(*poisoned)
    assert bool(jnp.isfinite(got).all())
    np.testing.assert_array_equal(got, jax.jit(step)(cache_k, cache_v))


@pytest.mark.parametrize("prefix_block", [None, BLOCK])
def test_a_sampling_step_reads_one_layer_of_the_stacked_caches(qkv, prefix_block):
    """Given every layer's prefix [Y, B, L, E, W] and cache [Y, B, N, C, E, W] and a (traced) layer index, the step
    reads that layer's blocks in place: the same output as that layer's arrays alone, with NaN in every other
    layer (also when some branch sees no prefix key: start 0)."""
    k, v, seg, r = qkv["k"], qkv["v"], qkv["seg"], qkv["r"]
    n, c, filled = 2, 16, 9
    q = _normal(r, B, n, 1, E * A, W)
    cache_k, cache_v = _normal(r, B, n, c, E, W), _normal(r, B, n, c, E, W)
    new_k, new_v = _normal(r, B, n, 1, E, W), _normal(r, B, n, 1, E, W)
    start, bseg = jnp.asarray([[5, 19], [0, 12]], jnp.int32), jnp.ones((B, n), jnp.int32)

    def step(pk, pv, ck, cv, layer):
        return layers.branch_decode_attention(q, pk, pv, seg, bseg, start, ck, cv, jnp.int32(filled), new_k, new_v,
                                              A, prefix_block=prefix_block, cache_block=4, layer=layer)

    def nan_around(x):
        return jnp.stack([jnp.full_like(x, jnp.nan), x, jnp.full_like(x, jnp.nan)])

    got = jax.jit(step)(*map(nan_around, (k, v, cache_k, cache_v)), jnp.int32(1))
    want = jax.jit(lambda *xs: step(*xs, None))(k, v, cache_k, cache_v)
    assert bool(jnp.isfinite(got).all())
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_rlp_step_equals_dense(params, batch):  # noqa: F811
    rlp = rlp_config(horizon=2, ntp_weight=0.3)
    t_bk = jnp.array([[3, 9], [4, 10]])
    dense, blocks = CFG.replace(attention="dense"), CFG.replace(attention="blockwise", attention_block=4)
    ema_lp = jax.random.normal(jax.random.key(7), batch["tokens"].shape) - 3.0

    def rollout(cfg):
        _, prefix = transformer.forward(params, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                                  positions_bl=batch["positions"], return_cache=True)
        return jax.jit(thought_rollout, static_argnums=(1, 5, 6))(params, cfg, prefix, t_bk, jax.random.key(5),
                                                                   rlp.rollout, IDS)

    thoughts_d, thoughts_b = rollout(dense), rollout(blocks)
    np.testing.assert_array_equal(thoughts_b.tokens, thoughts_d.tokens)   # the same sampled thoughts
    grad = lambda cfg: jax.jit(lambda p: objective(p, batch, rlp, thoughts_d, t_bk, ema_lp, cfg=cfg))(params)
    (out_d, g_d), (out_b, g_b) = grad(dense), grad(blocks)
    loss_d, rewards_d, loss_b, rewards_b = out_d.loss, out_d.rewards, out_b.loss, out_b.rewards
    np.testing.assert_allclose(rewards_b, rewards_d, atol=1e-5)
    np.testing.assert_allclose(loss_b, loss_d, atol=1e-5)
    assert float(jnp.abs(loss_d)) > 0.1
    assert_grads_close(g_b, g_d)



def _stacked_masks_and_scores(jaxpr, blocks: int) -> list[str]:
    """Every value in `jaxpr` (nested loops included) stacked on a leading axis of `blocks` (one slice per key
    block or query chunk) that is a mask (bool) or a block of scores (float32 [..., BLOCK, BLOCK])."""
    found = []
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = var.aval
            if getattr(aval, "ndim", 0) >= 3 and aval.shape[0] == blocks and (
                    aval.dtype == jnp.bool_ or (aval.dtype == jnp.float32 and aval.shape[-2:] == (BLOCK, BLOCK))):
                found.append(f"{eqn.primitive}: {aval.str_short()}")
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _stacked_masks_and_scores(sub, blocks)
    return found


def test_a_rematerialised_layer_keeps_no_per_block_masks_or_scores(qkv):
    """Under the layer's remat (`jax.checkpoint`) JAX linearises attention's forward; what it keeps for the
    backward is the inputs, the output and per-query statistics, never one array per key block (masks
    broadcast to every head, score blocks: what made the paper config 40% over the planner)."""
    seg, lim = qkv["seg"], jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    q = qkv["q"].reshape(B, L, E, A, W)

    def loss(q, k, v):
        return blockwise.attend_blocks(q, k, v, seg, lim, seg, BLOCK)[0].sum()

    jaxpr = jax.make_jaxpr(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, qkv["k"], qkv["v"]).jaxpr
    assert _stacked_masks_and_scores(jaxpr, -(-L // BLOCK)) == []
