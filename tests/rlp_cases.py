"""Shared cases of the RLP tests: a tiny model, its params, a packed two-row batch, an RLP config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax.model import transformer as model
from rlp_jax.model.config import ModelConfig
from rlp_jax.rlp.config import LossConfig, RewardConfig, RLPConfig, RolloutConfig
from rlp_jax.rlp.objective import rlp_objective
from rlp_jax.rlp.rollout import thought_rollout

CFG = ModelConfig.preset("tiny", vocab_size=48)
START, END = 1, 2


def assert_grads_close(got, want, rel=1e-5):
    """Every leaf within `rel` of its largest entry (at least 1): float32 sums in another order (the
    CPU's, or another layout's) differ by about the leaf's scale times float32 eps."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert float(jnp.abs(a - b).max()) <= rel * max(1.0, float(jnp.abs(b).max()))


def assert_steps_equal(fast, naive):
    """Two RLP steps' `((loss, (metrics, rewards, advantages)), grads)` agree (rewards, advantages, loss, the
    thought tokens' entropy estimate to 1e-5; every gradient leaf by `assert_grads_close`), and are not trivial."""
    (loss_f, (m_f, r_f, a_f)), g_f = fast
    (loss_n, (m_n, r_n, a_n)), g_n = naive
    np.testing.assert_allclose(r_f, r_n, atol=1e-5)
    np.testing.assert_allclose(a_f, a_n, atol=1e-5)
    np.testing.assert_allclose(loss_f, loss_n, atol=1e-5)
    np.testing.assert_allclose(m_f["policy/entropy_estimate"], m_n["policy/entropy_estimate"], atol=1e-5)
    assert float(jnp.abs(r_f).max()) > 0.01 and float(jnp.abs(loss_f)) > 0.1
    assert float(m_f["policy/entropy_estimate"]) > 0.1   # mean -log pi of the thought tokens: both paths' new log-probs
    assert_grads_close(g_f, g_n)


def assert_same_thoughts(fast, slow):
    """Two samplers drew the same thoughts (tokens and action masks exactly, behaviour log-probs to 1e-5)."""
    np.testing.assert_array_equal(fast.tokens, slow.tokens)
    np.testing.assert_array_equal(fast.action_mask, slow.action_mask)
    np.testing.assert_allclose(fast.logprobs, slow.logprobs, atol=1e-5)


def rlp_config(horizon=1, baseline="group", kl_beta=0.0, g=3, k=2, t=5, ntp_weight=0.0):
    return RLPConfig(
        rollout=RolloutConfig(group_size=g, positions_per_doc=k, thought_len=t, min_context=2, temperature=1.0,
                              think_start_id=START, think_end_id=END),
        reward=RewardConfig(horizon=horizon), loss=LossConfig(baseline=baseline, kl_beta=kl_beta, ntp_weight=ntp_weight))


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.key(0), std=0.3)


@pytest.fixture(scope="module")
def batch():
    toks = jax.random.randint(jax.random.key(1), (2, 14), 3, CFG.vocab_size)
    seg = jnp.array([[1] * 14, [1] * 6 + [2] * 8])
    pos = jnp.array([list(range(14)), list(range(6)) + list(range(8))])
    return {"tokens": toks, "segment_ids": seg, "positions": pos}


def sample(params, batch, rlp, t_bk, seed=5):
    _, prefix = model.forward(params, CFG, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                              positions_bl=batch["positions"], return_cache=True)
    return jax.jit(thought_rollout, static_argnums=(1, 5))(params, CFG, prefix, t_bk, jax.random.key(seed),
                                                            rlp.rollout)


def objective(params, batch, rlp, thoughts, t_bk, ema_lp, ref=None, naive_path=False):
    """rlp_objective, optionally with every thought run as its own sequence (the naive reference)."""
    return rlp_objective(params, CFG, rlp, batch, thoughts, t_bk, jnp.ones(t_bk.shape, bool),
                                    ema_lp, ref, naive_path=naive_path)
