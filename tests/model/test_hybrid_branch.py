"""Thoughts branched off a Nemotron-H prefix (`branch`) equal the naive path, each thought run as its own
sequence x_<t + thought through `hybrid.forward`: the thoughts' logits and the gradient of a loss on them with
respect to every parameter; decoding a thought token by token gives `branch_forward`'s logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax.model.nemotron_h import branch, hybrid
from tests.hf_models import tiny_nemotron_h

L = 21            # not a multiple of the chunk size 8: a partial last chunk

B, K, S, T = 2, 2, 3, 5
LENGTHS = (L, 13)                        # row 1 is right-padded after 13 real tokens
# chunk size 8: t = 8 a chunk boundary; 21 = L and 13 (row 1's length) inside a chunk; t = 1 one token seen
T_BK = np.array([[8, L], [13, 1]], np.int32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("nemotron_h_branch")
    tiny_nemotron_h(seed=3).save_pretrained(path)
    cfg, params = hybrid.from_hf(path)
    kinds = set(cfg.block_types)
    assert {hybrid.MAMBA, hybrid.ATTENTION} <= kinds
    return cfg, jax.tree.map(jnp.asarray, params)


def _case(vocab, seed=0):
    """Documents [B, L] with their mask, thoughts [B, K, S, T], loss targets and weights [B, K, S, T]: the thought's
    next tokens, then the document's token t (0 past the end)."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, size=(B, L)).astype(np.int32)
    mask = (np.arange(L)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
    thoughts = rng.randint(0, vocab, size=(B, K, S, T)).astype(np.int32)
    after = np.where(T_BK < L, tokens[np.arange(B)[:, None], np.minimum(T_BK, L - 1)], 0)      # [B, K]
    targets = np.concatenate([thoughts[..., 1:], np.broadcast_to(after[:, :, None, None], (B, K, S, 1))], -1)
    weights = rng.randn(B, K, S, T).astype(np.float32)
    return tokens, mask, thoughts, targets, weights


def _naive_inputs(tokens, thoughts):
    """Every thought as its own right-padded sequence x_<t + thought [B K S, L + T], its mask and where its T
    tokens sit."""
    seqs = np.zeros((B * K * S, L + T), np.int32)
    mask = np.zeros_like(seqs)
    where = np.zeros((B * K * S, T), np.int32)
    for i, (b, k, s) in enumerate(np.ndindex(B, K, S)):
        t = T_BK[b, k]
        seqs[i, :t + T] = np.concatenate([tokens[b, :t], thoughts[b, k, s]])
        mask[i, :t + T] = 1
        where[i] = t + np.arange(T)
    return seqs, mask, where


def _naive_logits(params, cfg, seqs, mask, where):
    logits = hybrid.forward(params, cfg, seqs, mask)                               # [B K S, L + T, V]
    return jnp.take_along_axis(logits, where[:, :, None], axis=1).reshape(B, K, S, T, -1)


def _branched_logits(params, cfg, tokens, mask, thoughts):
    _, prefix = branch.prefix_forward(params, cfg, tokens, T_BK, mask)
    return branch.branch_forward(params, cfg, prefix, thoughts)


def _loss(logits, targets, weights):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights)


def _rel(ours, ref):
    return float(jnp.abs(ours - ref).max() / jnp.abs(ref).max())


def test_branch_logits_equal_each_thought_run_alone(model):
    cfg, params = model
    tokens, mask, thoughts, _, _ = _case(cfg.vocab_size)
    want = jax.jit(_naive_logits, static_argnums=1)(params, cfg, *_naive_inputs(tokens, thoughts))
    ours = jax.jit(_branched_logits, static_argnums=1)(params, cfg, tokens, mask, thoughts)
    assert ours.dtype == jnp.float32 and ours.shape == (B, K, S, T, cfg.vocab_size)
    err = _rel(ours, want)
    print(f"branch logits max relative error {err:.2e}")
    assert err <= 1e-5
    # the prefix pass's own logits are the documents' teacher-forced ones
    doc_logits, _ = branch.prefix_forward(params, cfg, tokens, T_BK, mask, return_logits=True)
    real = mask.astype(bool)
    assert _rel(doc_logits[real], hybrid.forward(params, cfg, tokens, mask)[real]) <= 1e-6


def test_gradients_equal_each_thought_run_alone(model):
    """The gradient of a loss on the thoughts' log-probs w.r.t. every parameter, through the prefix pass (its
    attention keys and Mamba states) and the branches, equals the naive path's."""
    cfg, params = model
    tokens, mask, thoughts, targets, weights = _case(cfg.vocab_size, seed=1)
    seqs, seq_mask, where = _naive_inputs(tokens, thoughts)
    naive = jax.jit(jax.value_and_grad(lambda p: _loss(_naive_logits(p, cfg, seqs, seq_mask, where), targets,
                                                       weights)))
    branched = jax.jit(jax.value_and_grad(lambda p: _loss(_branched_logits(p, cfg, tokens, mask, thoughts),
                                                          targets, weights)))
    (want_loss, want), (loss, ours) = naive(params), branched(params)
    assert abs(float(loss - want_loss)) <= 1e-5 * abs(float(want_loss))
    errs = jax.tree.map(_rel, ours, want)
    worst = max(jax.tree.leaves(errs))
    print(f"gradient max relative error (per leaf, worst) {worst:.2e}")
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(want))
    assert worst <= 1e-5, errs


def test_decoding_token_by_token_equals_branch_forward(model):
    cfg, params = model
    tokens, mask, thoughts, _, _ = _case(cfg.vocab_size, seed=2)
    _, prefix = jax.jit(branch.prefix_forward, static_argnums=1)(params, cfg, tokens, T_BK, mask)
    want = jax.jit(branch.branch_forward, static_argnums=1)(params, cfg, prefix, thoughts)
    cache = branch.init_branch_cache(cfg, prefix, S, T + 3)        # more slots than tokens: unused ones masked
    step = jax.jit(branch.decode_step, static_argnums=1)
    flat = thoughts.reshape(B, K * S, T)
    err = 0.0
    for i in range(T):
        logits, cache = step(params, cfg, prefix, cache, flat[:, :, i])
        err = max(err, _rel(logits.reshape(B, K, S, -1), want[:, :, :, i]))
    print(f"decode vs branch_forward max relative error {err:.2e}")
    assert err <= 1e-5 and int(cache.step) == T


def test_bad_shapes_say_what_is_wrong(model):
    cfg, params = model
    tokens, mask, thoughts, _, _ = _case(cfg.vocab_size)
    with pytest.raises(ValueError, match=r"tokens must be \[B, L\] and t \[B, K\]"):
        branch.prefix_forward(params, cfg, tokens, T_BK[:1], mask)
    _, prefix = branch.prefix_forward(params, cfg, tokens, T_BK, mask)
    with pytest.raises(ValueError, match=r"thought tokens must be \[B, K, S, T\]"):
        branch.branch_forward(params, cfg, prefix, thoughts[:, :1])
    cache = branch.init_branch_cache(cfg, prefix, S, T)
    with pytest.raises(ValueError, match=r"tokens must be \[B, N\]"):
        branch.decode_step(params, cfg, prefix, cache, thoughts[:, :, 0])
