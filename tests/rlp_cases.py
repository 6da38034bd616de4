"""Shared cases of the RLP tests: a tiny model, its params, a packed two-row batch, an RLP config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax.model.dense import transformer
from rlp_jax.model.dense.config import ModelConfig
from rlp_jax.rlp.config import LossConfig, RewardConfig, RLPConfig, RolloutConfig
from rlp_jax.rlp.objective import (
    SHARED_PREFIX,
    Objective,
    Rollout,
    loss_and_grad,
    with_reference,
)
from rlp_jax.rlp.rollout import thought_rollout
from rlp_jax.rlp.think_ids import ThinkIds

CFG = ModelConfig.preset("tiny", vocab_size=48)
START, END = 1, 2
IDS = ThinkIds(start=START, end=END)


def bind(rlp, path=SHARED_PREFIX, ids=IDS) -> Objective:
    """The objective the tests' tokenizer would give `rlp` (markers 1 and 2)."""
    return Objective(rlp, ids, path)


def assert_grads_close(got, want, rel=1e-5):
    """Every leaf within `rel` of its largest entry (at least 1): float32 sums in another order (the
    CPU's, or another layout's) differ by about the leaf's scale times float32 eps."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert float(jnp.abs(a - b).max()) <= rel * max(1.0, float(jnp.abs(b).max()))


def assert_steps_equal(fast, naive):
    """Two RLP steps' `(StepOut, grads)` agree (rewards, advantages, loss, the thought tokens' entropy estimate
    to 1e-5; every gradient leaf by `assert_grads_close`), and are not trivial."""
    (f, g_f), (n, g_n) = fast, naive
    np.testing.assert_allclose(f.rewards, n.rewards, atol=1e-5)
    np.testing.assert_allclose(f.advantages, n.advantages, atol=1e-5)
    np.testing.assert_allclose(f.loss, n.loss, atol=1e-5)
    np.testing.assert_allclose(f.metrics["policy/entropy_estimate"], n.metrics["policy/entropy_estimate"], atol=1e-5)
    assert float(jnp.abs(f.rewards).max()) > 0.01 and float(jnp.abs(f.loss)) > 0.1
    assert float(f.metrics["policy/entropy_estimate"]) > 0.1   # mean -log pi of the thought tokens: both paths' new log-probs
    assert_grads_close(g_f, g_n)


def assert_same_thoughts(fast, slow):
    """Two samplers drew the same thoughts (tokens and action masks exactly, behaviour log-probs to 1e-5)."""
    np.testing.assert_array_equal(fast.tokens, slow.tokens)
    np.testing.assert_array_equal(fast.action_mask, slow.action_mask)
    np.testing.assert_allclose(fast.logprobs, slow.logprobs, atol=1e-5)


def rlp_config(horizon=1, baseline="group", kl_beta=0.0, g=3, k=2, t=5, ntp_weight=0.0):
    return RLPConfig(
        rollout=RolloutConfig(group_size=g, positions_per_doc=k, thought_len=t, min_context=2, temperature=1.0),
        reward=RewardConfig(horizon=horizon), loss=LossConfig(baseline=baseline, kl_beta=kl_beta, ntp_weight=ntp_weight))


@pytest.fixture(scope="module")
def params():
    return transformer.init_params(CFG, jax.random.key(0), std=0.3)


@pytest.fixture(scope="module")
def batch():
    toks = jax.random.randint(jax.random.key(1), (2, 14), 3, CFG.vocab_size)
    seg = jnp.array([[1] * 14, [1] * 6 + [2] * 8])
    pos = jnp.array([list(range(14)), list(range(6)) + list(range(8))])
    return {"tokens": toks, "segment_ids": seg, "positions": pos}


def sample(params, batch, rlp, t_bk, seed=5):
    _, prefix = transformer.forward(params, CFG, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                              positions_bl=batch["positions"], return_cache=True)
    return jax.jit(thought_rollout, static_argnums=(1, 5, 6))(params, CFG, prefix, t_bk, jax.random.key(seed),
                                                               rlp.rollout, IDS)


def objective(params, batch, rlp, thoughts, t_bk, ema_lp, ref=None, path=SHARED_PREFIX, cfg=CFG, ids=IDS):
    """`loss_and_grad` of given thoughts -> (StepOut, grads); `path`: SHARED_PREFIX or naive.NAIVE (every thought
    run as its own sequence, the reference). `ref`: the KL reference's params when rlp.loss.kl_beta > 0."""
    bound = Objective(rlp, ids, path)
    rollout = Rollout(ema_logprobs=ema_lp, positions=t_bk, mask=jnp.ones(t_bk.shape, bool), thoughts=thoughts)
    if ref is not None:
        rollout = with_reference(ref, cfg, bound, batch, rollout)
    return loss_and_grad(params, cfg, bound, batch, rollout)
