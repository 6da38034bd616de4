"""The three forward modes agree with each other and with the naive path (fp32, CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax.model import layers
from rlp_jax.model.dense import transformer
from rlp_jax.model.dense.config import ModelConfig

CFG = ModelConfig.preset("tiny", vocab_size=64)


@pytest.fixture(scope="module")
def params():
    p = transformer.init_params(CFG, jax.random.key(0), std=0.2)
    # Non-trivial norm weights, so a mode that skips a norm cannot pass.
    return p | {"final_norm": 1 + 0.1 * jax.random.normal(jax.random.key(1), (CFG.hidden_size,))}


@jax.jit
def _naive_branch_logits(params, docs, t_bn, branch_bns):
    """Every branch as its own sequence [x_<t, branch tokens] (right-padded) through the full forward."""
    b, n, s = branch_bns.shape
    length = docs.shape[1]
    idx = jnp.arange(length + s)                                                   # [L + S]
    t = t_bn[..., None]                                                            # [B, N, 1]
    from_doc = jnp.take_along_axis(docs[:, None, :], jnp.minimum(idx, length - 1)[None, None].repeat(n, 1), 2)
    from_branch = jnp.take_along_axis(branch_bns, jnp.clip(idx - t, 0, s - 1), 2)
    seqs = jnp.where(idx < t, from_doc, jnp.where(idx < t + s, from_branch, 0))   # [B, N, L + S]
    seg = (idx < t + s).astype(jnp.int32)
    logits, _ = transformer.forward(params, CFG, seqs.reshape(b * n, -1), segment_ids_bl=seg.reshape(b * n, -1))
    logits = logits.reshape(b, n, length + s, -1)
    return jnp.take_along_axis(logits, (t + jnp.arange(s))[..., None], axis=2)   # [B, N, S, V]


def _branch_case(seed, b=2, n=3, length=10, s=4):
    rng = np.random.RandomState(seed)
    docs = jnp.asarray(rng.randint(0, CFG.vocab_size, (b, length)), jnp.int32)
    t_bn = jnp.asarray(rng.randint(1, length, (b, n)), jnp.int32)
    branch = jnp.asarray(rng.randint(0, CFG.vocab_size, (b, n, s)), jnp.int32)
    return docs, t_bn, branch


@functools.partial(jax.jit, static_argnums=1)
def _fast_branch_logits(params, cfg, docs, t_bn, branch):
    _, prefix = transformer.forward(params, cfg, docs, return_cache=True)
    logits, _ = transformer.branch_forward(params, cfg, prefix, transformer.branches_at(prefix, t_bn), branch)
    return logits


@pytest.mark.parametrize("seed", [0, 1])
def test_branch_equals_naive_logits(params, seed):
    docs, t_bn, branch = _branch_case(seed)
    fast = _fast_branch_logits(params, CFG, docs, t_bn, branch)
    naive = _naive_branch_logits(params, docs, t_bn, branch)
    np.testing.assert_allclose(fast, naive, atol=1e-5, rtol=0)


def test_branch_equals_naive_gradients(params):
    docs, t_bn, branch = _branch_case(2)
    w = jax.random.normal(jax.random.key(3), (*branch.shape, CFG.vocab_size))

    def f_fast(p):
        return jnp.sum(w * jax.nn.log_softmax(_fast_branch_logits(p, CFG, docs, t_bn, branch)))

    def f_naive(p):
        return jnp.sum(w * jax.nn.log_softmax(_naive_branch_logits(p, docs, t_bn, branch)))

    g_fast, g_naive = jax.jit(jax.grad(f_fast))(params), jax.jit(jax.grad(f_naive))(params)
    for path, a in jax.tree_util.tree_leaves_with_path(g_fast):
        b = g_naive
        for k in path:
            b = b[k.key]
        scale = max(float(jnp.abs(b).max()), 1e-3)
        assert float(jnp.abs(a - b).max()) <= 1e-5 * scale, jax.tree_util.keystr(path)


def test_branch_respects_packed_segments(params):
    """A branch in the second packed document sees only that document, with restarted positions."""
    rng = np.random.RandomState(4)
    doc_a = rng.randint(0, CFG.vocab_size, 5)
    doc_b = rng.randint(0, CFG.vocab_size, 6)
    packed = jnp.asarray(np.concatenate([doc_a, doc_b])[None], jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 6], jnp.int32)
    pos = jnp.asarray([list(range(5)) + list(range(6))], jnp.int32)
    branch = jnp.asarray(rng.randint(0, CFG.vocab_size, (1, 1, 3)), jnp.int32)
    _, prefix = transformer.forward(params, CFG, packed, segment_ids_bl=seg, positions_bl=pos, return_cache=True)
    t = 5 + 4  # token 4 of doc_b
    fast, _ = transformer.branch_forward(params, CFG, prefix, transformer.branches_at(prefix, jnp.array([[t]])), branch)
    naive, _ = transformer.forward(params, CFG, jnp.concatenate([jnp.asarray(doc_b[:4]), branch[0, 0]])[None])
    np.testing.assert_allclose(fast[0, 0], naive[0, 4:], atol=1e-5)


def test_packed_forward_equals_separate_documents(params):
    rng = np.random.RandomState(5)
    a, b = rng.randint(0, CFG.vocab_size, 4), rng.randint(0, CFG.vocab_size, 7)
    packed = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
    seg = jnp.asarray([[1] * 4 + [2] * 7])
    pos = jnp.asarray([list(range(4)) + list(range(7))])
    lp, _ = transformer.forward(params, CFG, packed, segment_ids_bl=seg, positions_bl=pos)
    la, _ = transformer.forward(params, CFG, jnp.asarray(a[None]))
    lb, _ = transformer.forward(params, CFG, jnp.asarray(b[None]))
    np.testing.assert_allclose(lp[0, :4], la[0], atol=1e-5)
    np.testing.assert_allclose(lp[0, 4:], lb[0], atol=1e-5)


def test_branch_token_by_token_with_cache_equals_whole_branch(params):
    docs, t_bn, branch = _branch_case(6, s=5)
    _, prefix = transformer.forward(params, CFG, docs, return_cache=True)
    br = transformer.branches_at(prefix, t_bn)
    whole, _ = transformer.branch_forward(params, CFG, prefix, br, branch)
    cache = transformer.init_branch_cache(CFG, *branch.shape[:2], 8)
    step = jax.jit(lambda c, tok, off: transformer.branch_forward(params, CFG, prefix, br, tok, cache=c, offset=off))
    stepped = []
    for i in range(branch.shape[2]):
        logits, cache = step(cache, branch[:, :, i:i + 1], i)
        stepped.append(logits[:, :, 0])
    np.testing.assert_allclose(jnp.stack(stepped, axis=2), whole, atol=1e-5)


def test_decode_equals_full_forward(params):
    rng = np.random.RandomState(7)
    seqs = jnp.asarray(rng.randint(0, CFG.vocab_size, (3, 12)), jnp.int32)
    prompt_lens = jnp.array([3, 5, 1])
    prompts = jnp.where(jnp.arange(12)[None] < prompt_lens[:, None], seqs, 0)[:, :6]
    full, _ = transformer.forward(params, CFG, seqs)
    last, state = transformer.prefill(params, CFG, prompts, prompt_lens, max_new_tokens=6)
    np.testing.assert_allclose(last, full[jnp.arange(3), prompt_lens - 1], atol=1e-5)
    step = jax.jit(lambda s, tok: transformer.decode_step(params, CFG, s, tok))
    for i in range(5):
        fed = seqs[jnp.arange(3), prompt_lens + i]
        logits, state = step(state, fed)
        np.testing.assert_allclose(logits, full[jnp.arange(3), prompt_lens + i], atol=1e-5)


@pytest.mark.parametrize("unrolled", [False, True])
def test_decode_attention_equals_naive(unrolled):
    """Both forms of the single-query scores (dot, and the CPU's unrolled multiply-adds) against a
    per-head numpy softmax over the unmasked cache slots; group size 2 (GQA), ragged masks."""
    rng = np.random.RandomState(0)
    b, hk, r, dh, t = 3, 2, 2, 8, 11
    q = rng.randn(b, hk * r, dh).astype(np.float32)
    k = rng.randn(b, hk, dh, t).astype(np.float32)
    v = rng.randn(b, hk, t, dh).astype(np.float32)
    mask = rng.rand(b, t) < 0.6
    mask[:, 0] = True
    out = layers.decode_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), r,
                                  unrolled_scores=unrolled)
    ref = np.zeros_like(q)
    for i in range(b):
        for h in range(hk * r):
            s = q[i, h] @ k[i, h // r] / np.sqrt(dh)
            s = np.where(mask[i], s, -np.inf)
            p = np.exp(s - s.max())
            ref[i, h] = (p / p.sum()) @ v[i, h // r]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_nothing(params, remat):
    docs, t_bn, branch = _branch_case(8)
    cfg_r = CFG.replace(remat=remat)

    def f(p, cfg):
        return jnp.sum(jax.nn.log_softmax(_fast_branch_logits(p, cfg, docs, t_bn, branch))[..., 0])

    vg = jax.jit(jax.value_and_grad(f), static_argnums=1)
    v0, g0 = vg(params, CFG)
    v1, g1 = vg(params, cfg_r)
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max())), g0, g1)


def test_bf16_compute_is_close_and_logits_are_fp32(params):
    docs, _, _ = _branch_case(9)
    l32, _ = transformer.forward(params, CFG, docs)
    l16, _ = transformer.forward(params, CFG.replace(compute_dtype="bfloat16"), docs)
    assert l16.dtype == jnp.float32
    assert float(jnp.abs(l32 - l16).max()) < 0.1 * float(jnp.abs(l32).max())


def test_param_count_and_axes_cover_every_param():
    for name in ("tiny", "small"):
        cfg = ModelConfig.preset(name)
        p = transformer.init_params(cfg, jax.random.key(0))
        assert sum(x.size for x in jax.tree.leaves(p)) == cfg.num_params()
        axes = transformer.param_logical_axes(cfg)
        shapes = jax.tree.map(lambda x: x.shape, p)
        jax.tree.map(lambda names, shape: len(names) == len(shape) or pytest.fail(f"{names} vs {shape}"),
                     axes, shapes, is_leaf=lambda x: isinstance(x, tuple))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of"):
        ModelConfig.preset("tiny", num_heads=3)
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="remat"):
        ModelConfig.preset("tiny", remat="sometimes")


@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_chunked_token_logprobs_equal_full_logits(params, chunk):
    from rlp_jax.model.scoring import (
        shifted_token_logprobs,
        shifted_token_logprobs_chunked,
    )

    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 64, (2, 10)), jnp.int32)
    logits, _ = transformer.forward(params, CFG, tokens)
    hidden, _ = transformer.forward(params, CFG, tokens, return_hidden=True)
    ref = shifted_token_logprobs(logits, tokens)
    got = shifted_token_logprobs_chunked(params, CFG, hidden, tokens, chunk=chunk)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[:, 0]), 0.0)
