"""The RLP objective: the fast shared-prefix path equals the naive path, K positions equal K examples,
the EMA's invariance, rewards against hand-built sequences, the surrogate's gradient under bfloat16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax.model.dense import transformer
from rlp_jax.rlp import naive
from rlp_jax.rlp import rollout as rollout_lib
from rlp_jax.rlp.objective import SHARED_PREFIX
from rlp_jax.rlp.rollout import thought_rollout
from rlp_jax.rlp.teacher import teacher_logprobs
from tests.rlp_cases import (  # noqa: F401
    CFG,
    END,
    IDS,
    START,
    assert_grads_close,
    assert_same_thoughts,
    assert_steps_equal,
    batch,
    bind,
    objective,
    params,
    rlp_config,
    sample,
)


@pytest.mark.parametrize("horizon,kl_beta", [(1, 0.0), (2, 0.1)])
def test_fast_path_equals_naive(params, batch, horizon, kl_beta):
    rlp = rlp_config(horizon=horizon, kl_beta=kl_beta, ntp_weight=0.3)   # a loss that is not ~0 by construction
    t_bk = jnp.array([[3, 9], [4, 10]])  # second row: one position in each packed document
    thoughts = sample(params, batch, rlp, t_bk)
    ema_lp = jax.random.normal(jax.random.key(7), batch["tokens"].shape) - 3.0
    ref = jax.tree.map(lambda x: x * 0.9, params)
    step = lambda path: jax.jit(functools.partial(objective, path=path), static_argnums=2)(
        params, batch, rlp, thoughts, t_bk, ema_lp, ref)
    fast = step(SHARED_PREFIX)
    assert_steps_equal(fast, step(naive.NAIVE))
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(fast[1])) > 1e-4  # a real gradient


def test_sampler_equals_naive_sampler(params, batch):
    rlp = rlp_config()
    t_bk = jnp.array([[3, 9], [4, 10]])
    fast = sample(params, batch, rlp, t_bk, seed=11)
    slow = jax.jit(naive.naive_thought_rollout, static_argnums=(1, 5, 6))(params, CFG, batch, t_bk,
                                                                           jax.random.key(11), rlp.rollout, IDS)
    assert_same_thoughts(fast, slow)


def test_k_positions_equal_k_separate_examples(params, batch):
    """K positions sharing a document give the per-thought quantities of K separate (context, x_t) examples."""
    rlp = rlp_config(k=2, ntp_weight=0.3)
    t_bk = jnp.array([[3, 9], [2, 11]])
    thoughts = sample(params, batch, rlp, t_bk)
    ema_lp = jax.random.normal(jax.random.key(8), batch["tokens"].shape) - 3.0
    vg = jax.jit(objective, static_argnums=2)
    out_s, g_s = vg(params, batch, rlp, thoughts, t_bk, ema_lp)
    loss_s, r_s, a_s = out_s.loss, out_s.rewards, out_s.advantages
    # The paper's layout: every (document, t) is its own example with K = 1.
    sep_batch = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0), batch)
    sep_thoughts = jax.tree.map(lambda x: x.reshape(4, 1, *x.shape[2:]), thoughts)
    out_p, g_p = vg(params, sep_batch, rlp_config(k=1, ntp_weight=0.3), sep_thoughts, t_bk.reshape(4, 1),
                    jnp.repeat(ema_lp, 2, axis=0))
    loss_p, r_p, a_p = out_p.loss, out_p.rewards, out_p.advantages
    np.testing.assert_allclose(r_s.reshape(4, 1, -1), r_p, atol=1e-5)
    np.testing.assert_allclose(a_s.reshape(4, 1, -1), a_p, atol=1e-5)
    np.testing.assert_allclose(loss_s, loss_p, atol=1e-6)
    assert float(jnp.abs(loss_s)) > 0.1
    assert_grads_close(g_s, g_p)   # 2026-12-02, an AVX-512 EPYC: up to 1.2e-6 off in a leaf with max |g| 0.42


@pytest.mark.parametrize("baseline", ["group", "batch"])
def test_ema_shift_changes_gradient_only_under_batch_baseline(params, batch, baseline):
    rlp = rlp_config(baseline=baseline)
    t_bk = jnp.array([[3, 9], [4, 10]])
    thoughts = sample(params, batch, rlp, t_bk)
    ema_lp = jax.random.normal(jax.random.key(9), batch["tokens"].shape) - 3.0
    shifted = ema_lp + 5.0 * jax.random.normal(jax.random.key(10), ema_lp.shape)  # a different shift per position
    g = jax.jit(lambda p, e: objective(p, batch, rlp, thoughts, t_bk, e)[1])
    g0, g1 = g(params, ema_lp), g(params, shifted)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    if baseline == "group":
        assert diff <= 1e-6
    else:
        assert diff > 1e-4


def test_rewards_against_hand_built_sequences(params, batch):
    """S_pred and S_ema of each thought from plain `transformer.forward` on `[x_<t, <think> c </think>]` and `x_<t`:
    fails if either is read one token off."""
    rlp = rlp_config(k=2, g=2)
    t_bk = jnp.array([[3, 9], [4, 10]])
    thoughts = sample(params, batch, rlp, t_bk)
    ema = jax.tree.map(lambda x: x * 0.9, params)
    ema_lp = jax.jit(teacher_logprobs, static_argnums=1)(ema, CFG, batch)
    rewards = jax.jit(objective, static_argnums=2)(params, batch, rlp, thoughts, t_bk, ema_lp)[0].rewards
    toks, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
    forward = jax.jit(transformer.forward, static_argnums=1)      # one program per sequence length
    last_logp = lambda p, seq: jax.nn.log_softmax(forward(p, CFG, jnp.asarray([seq]))[0][0, -1])
    for b in range(2):
        for k in range(2):
            t = int(t_bk[b, k])
            doc = [int(x) for x, s in zip(toks[b, :t], seg[b, :t]) if s == seg[b, t]]   # x_<t of x_t's document
            s_ema = float(last_logp(ema, doc)[toks[b, t]])
            for g in range(2):
                n = int(thoughts.lengths[b, k, g])
                thought = [int(x) for x in thoughts.tokens[b, k, g, :n]]
                s_pred = float(last_logp(params, doc + [START] + thought + [END])[toks[b, t]])
                np.testing.assert_allclose(float(rewards[b, k, g]), s_pred - s_ema, atol=1e-4)


def test_surrogate_is_the_policy_gradient_under_bfloat16(params, batch):
    """With one update per rollout the importance ratio is 1 in value even when the sampler's bf16
    log-probs differ from the loss's: the gradient is exactly -mean_thoughts(A * mean_k grad log pi)."""
    cfg16 = CFG.replace(compute_dtype="bfloat16")
    rlp = rlp_config()
    t_bk = jnp.array([[3, 9], [4, 10]])
    _, prefix = jax.jit(transformer.forward, static_argnums=1, static_argnames="return_cache")(
        params, cfg16, batch["tokens"], segment_ids_bl=batch["segment_ids"], positions_bl=batch["positions"],
        return_cache=True)
    thoughts = jax.jit(thought_rollout, static_argnums=(1, 5, 6))(params, cfg16, prefix, t_bk, jax.random.key(5),
                                                                   rlp.rollout, IDS)
    # The sampler's log-probs as a larger model's bf16 decode gives them (measured: |rho - 1| up to 0.023).
    noise = 0.02 * jax.random.normal(jax.random.key(6), thoughts.logprobs.shape)
    thoughts = thoughts.replace(logprobs=jnp.where(thoughts.action_mask, thoughts.logprobs + noise, 0.0))
    ema_lp = jax.random.normal(jax.random.key(7), batch["tokens"].shape) - 3.0
    out, g = jax.jit(functools.partial(objective, cfg=cfg16), static_argnums=2)(params, batch, rlp, thoughts, t_bk,
                                                                                 ema_lp)
    m, adv = out.metrics, out.advantages
    assert float(m["policy/max_abs_ratio_minus_1"]) > 0.01      # the diagnostic sees the sampler's gap

    def policy_gradient_surrogate(p, sampler_ratio=False):
        _, pre = transformer.forward(p, cfg16, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                               positions_bl=batch["positions"], return_cache=True, return_logits=False)
        targets = jnp.take_along_axis(batch["tokens"], t_bk, axis=1)[..., None]
        new_lp, _, _ = rollout_lib.thought_forward(p, cfg16, pre, t_bk, thoughts, targets, rlp.rollout, IDS)
        act = thoughts.action_mask
        # sampler_ratio: the gradient a loss would have whose old log-probs were the sampler's (rho != 1)
        w = jnp.exp(jax.lax.stop_gradient(new_lp) - thoughts.logprobs) if sampler_ratio else 1.0
        per_thought = jnp.where(act, w * new_lp, 0.0).sum(-1) / jnp.maximum(act.sum(-1), 1)
        return -jnp.mean(jax.lax.stop_gradient(adv) * per_thought)

    def worst_relative_error(want):   # per leaf |got - want| / |want| (Frobenius); bf16 rounding ~ 0.5%
        return max(float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
                   for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want), strict=True))

    assert worst_relative_error(jax.jit(jax.grad(policy_gradient_surrogate))(params)) <= 1e-2
    assert worst_relative_error(jax.jit(jax.grad(lambda p: policy_gradient_surrogate(p, True)))(params)) >= 1.5e-2


def test_rollout_phase_thinks_only_before_the_word_start_ids(params, batch):
    """`rollout_phase` with `ThinkIds.word_starts` (`rollout.word_starts`) draws every position at one of them."""
    import types

    from rlp_jax.rlp.objective import rollout_phase
    from rlp_jax.rlp.think_ids import ThinkIds

    allowed = tuple(sorted({int(x) for x in np.asarray(batch["tokens"][:, 4:]).ravel()})[::2])
    objective = bind(rlp_config(k=2), ids=ThinkIds(start=1, end=2, word_starts=allowed))
    state = types.SimpleNamespace(params=params, ema_params=params)
    out = rollout_phase(state, CFG, objective, batch, jax.random.key(3))
    chosen = np.asarray(jnp.take_along_axis(batch["tokens"], out.positions, axis=1))[np.asarray(out.mask)]
    assert chosen.size > 0 and set(chosen.tolist()) <= set(allowed)
