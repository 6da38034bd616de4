"""The RLP objective end to end: fast shared-prefix path == naive path, layouts agree, EMA invariance,
and a tiny model learns to think (reward rises)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlp_jax.model import transformer as model
from rlp_jax.model.config import ModelConfig
from rlp_jax.rlp import reference as naive
from rlp_jax.rlp import rollout as rollout_lib
from rlp_jax.rlp.config import LossConfig, RewardConfig, RLPConfig, RolloutConfig
from rlp_jax.rlp.objective import rlp_objective, rollout_phase
from rlp_jax.rlp.rollout import thought_rollout
from rlp_jax.rlp.teacher import teacher_logprobs
from rlp_jax.train import step as train_step

CFG = ModelConfig.preset("tiny", vocab_size=48)
START, END = 1, 2


def _assert_grads_close(got, want, rel=1e-5):
    """Every leaf within `rel` of its largest entry (at least 1): float32 sums in another order (the
    CPU's, or another layout's) differ by about the leaf's scale times float32 eps."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert float(jnp.abs(a - b).max()) <= rel * max(1.0, float(jnp.abs(b).max()))


def _rlp(horizon=1, baseline="group", kl_beta=0.0, g=3, k=2, t=5, ntp_weight=0.0):
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


def _sample(params, batch, rlp, t_bk, seed=5):
    _, prefix = model.forward(params, CFG, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                              positions_bl=batch["positions"], return_cache=True)
    return jax.jit(thought_rollout, static_argnums=(1, 5))(params, CFG, prefix, t_bk, jax.random.key(seed),
                                                            rlp.rollout)


def _objective(params, batch, rlp, thoughts, t_bk, ema_lp, ref=None, naive_path=False):
    """rlp_objective, optionally with every thought run as its own sequence (the naive reference)."""
    return rlp_objective(params, CFG, rlp, batch, thoughts, t_bk, jnp.ones(t_bk.shape, bool),
                                    ema_lp, ref, naive_path=naive_path)


@pytest.mark.parametrize("horizon,kl_beta", [(1, 0.0), (2, 0.1)])
def test_fast_path_equals_naive(params, batch, horizon, kl_beta):
    rlp = _rlp(horizon=horizon, kl_beta=kl_beta, ntp_weight=0.3)   # a loss that is not ~0 by construction
    t_bk = jnp.array([[3, 9], [4, 10]])  # second row: one position in each packed document
    thoughts = _sample(params, batch, rlp, t_bk)
    ema_lp = jax.random.normal(jax.random.key(7), batch["tokens"].shape) - 3.0
    ref = jax.tree.map(lambda x: x * 0.9, params)
    grad = lambda naive_path: jax.jit(jax.value_and_grad(
        functools.partial(_objective, naive_path=naive_path), has_aux=True), static_argnums=2)(
        params, batch, rlp, thoughts, t_bk, ema_lp, ref)
    (loss_f, (m_f, r_f, a_f)), g_f = grad(False)
    (loss_n, (m_n, r_n, a_n)), g_n = grad(True)
    np.testing.assert_allclose(r_f, r_n, atol=1e-5)
    np.testing.assert_allclose(a_f, a_n, atol=1e-5)
    np.testing.assert_allclose(loss_f, loss_n, atol=1e-5)
    np.testing.assert_allclose(m_f["policy/entropy_estimate"], m_n["policy/entropy_estimate"], atol=1e-5)
    assert float(jnp.abs(r_f).max()) > 0.01 and float(jnp.abs(loss_f)) > 0.1
    assert float(m_f["policy/entropy_estimate"]) > 0.1   # mean -log pi of the thought tokens: both paths' new log-probs
    _assert_grads_close(g_f, g_n)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_f)) > 1e-4  # a real gradient


def test_sampler_equals_naive_sampler(params, batch):
    rlp = _rlp()
    t_bk = jnp.array([[3, 9], [4, 10]])
    fast = _sample(params, batch, rlp, t_bk, seed=11)
    slow = jax.jit(naive.naive_thought_rollout, static_argnums=(1, 5))(params, CFG, batch, t_bk,
                                                                        jax.random.key(11), rlp.rollout)
    np.testing.assert_array_equal(fast.tokens, slow.tokens)
    np.testing.assert_array_equal(fast.action_mask, slow.action_mask)
    np.testing.assert_allclose(fast.logprobs, slow.logprobs, atol=1e-5)


def test_k_positions_equal_k_separate_examples(params, batch):
    """K positions sharing a document give the per-thought quantities of K separate (context, x_t) examples."""
    rlp = _rlp(k=2, ntp_weight=0.3)
    t_bk = jnp.array([[3, 9], [2, 11]])
    thoughts = _sample(params, batch, rlp, t_bk)
    ema_lp = jax.random.normal(jax.random.key(8), batch["tokens"].shape) - 3.0
    vg = jax.jit(jax.value_and_grad(_objective, has_aux=True), static_argnums=2)
    (loss_s, (_, r_s, a_s)), g_s = vg(params, batch, rlp, thoughts, t_bk, ema_lp)
    # The paper's layout: every (document, t) is its own example with K = 1.
    sep_batch = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0), batch)
    sep_thoughts = jax.tree.map(lambda x: x.reshape(4, 1, *x.shape[2:]), thoughts)
    (loss_p, (_, r_p, a_p)), g_p = vg(params, sep_batch, _rlp(k=1, ntp_weight=0.3), sep_thoughts,
                                      t_bk.reshape(4, 1), jnp.repeat(ema_lp, 2, axis=0))
    np.testing.assert_allclose(r_s.reshape(4, 1, -1), r_p, atol=1e-5)
    np.testing.assert_allclose(a_s.reshape(4, 1, -1), a_p, atol=1e-5)
    np.testing.assert_allclose(loss_s, loss_p, atol=1e-6)
    assert float(jnp.abs(loss_s)) > 0.1
    _assert_grads_close(g_s, g_p)   # 2026-12-02, an AVX-512 EPYC: up to 1.2e-6 off in a leaf with max |g| 0.42


@pytest.mark.parametrize("baseline", ["group", "batch"])
def test_ema_shift_changes_gradient_only_under_batch_baseline(params, batch, baseline):
    rlp = _rlp(baseline=baseline)
    t_bk = jnp.array([[3, 9], [4, 10]])
    thoughts = _sample(params, batch, rlp, t_bk)
    ema_lp = jax.random.normal(jax.random.key(9), batch["tokens"].shape) - 3.0
    shifted = ema_lp + 5.0 * jax.random.normal(jax.random.key(10), ema_lp.shape)  # a different shift per position
    g = jax.jit(jax.grad(lambda p, e: _objective(p, batch, rlp, thoughts, t_bk, e)[0]))
    g0, g1 = g(params, ema_lp), g(params, shifted)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    if baseline == "group":
        assert diff <= 1e-6
    else:
        assert diff > 1e-4


def test_train_step_ratio_is_one_and_metrics_present(params, batch):
    rlp = _rlp(ntp_weight=0.5)
    opt = optax.adamw(1e-3)
    state = train_step.init_train_state(jax.tree.map(jnp.copy, params), opt)  # the step donates its state
    step = train_step.make_rlp_train_step(CFG, rlp, opt)
    new_state, m = step(state, batch, jax.random.key(0))
    assert float(m["policy/max_abs_ratio_minus_1"]) < 1e-4
    assert int(new_state.step) == 1 and int(m["train/skipped_nonfinite"]) == 0
    for key in ("reward/mean", "reward/frac_positive", "reward/s_pred", "reward/s_ema", "advantage/std",
                "advantage/zero_spread_groups", "policy/clip_fraction", "thought/mean_len",
                "policy/entropy_estimate", "loss/ntp", "thought/min_len"):
        assert np.isfinite(float(m[key])), key
    # EMA moved by (1 - tau) of the update: phi1 - phi0 = (1 - tau) (theta1 - phi0).
    e0, e1, p1 = params["final_norm"], new_state.ema_params["final_norm"], new_state.params["final_norm"]
    np.testing.assert_allclose(e1 - e0, (1 - rlp.ema_decay) * (p1 - e0), atol=1e-7)


def test_step_builders_refuse_fewer_than_one_micro_batch():
    opt = optax.sgd(1.0)
    with pytest.raises(ValueError, match="micro_batches must be >= 1, got 0"):
        train_step.make_rlp_train_step(CFG, _rlp(), opt, micro_batches=0)
    with pytest.raises(ValueError, match="micro_batches must be >= 1, got -1"):
        train_step.make_ntp_train_step(CFG, opt, micro_batches=-1)


@pytest.mark.parametrize("objective", ["rlp", "ntp"])
def test_micro_batches_give_the_whole_batch_gradient(params, objective):
    """M = 2 micro-batches: the update equals the gradient of the whole batch's loss given the thoughts
    each micro-batch sampled (rows with different token and valid-position counts, NTP and KL terms on)."""
    toks = jax.random.randint(jax.random.key(3), (4, 14), 3, CFG.vocab_size)
    seg = jnp.array([[1] * 14, [1] * 6 + [2] * 8, [1] * 9 + [0] * 5, [1] * 3 + [0] * 11])
    pos = jnp.where(seg > 0, jnp.array([list(range(14)), list(range(6)) + list(range(8)),
                                        list(range(14)), list(range(14))]), 0)
    batch4 = {"tokens": toks, "segment_ids": seg, "positions": pos}
    rlp = _rlp(kl_beta=0.1, ntp_weight=0.5)
    opt = optax.sgd(1.0)                       # new params = params - gradient
    fresh = lambda: train_step.init_train_state(jax.tree.map(jnp.copy, params), opt, keep_reference=True)
    key = jax.random.key(4)
    if objective == "rlp":
        new_state, m = train_step.make_rlp_train_step(CFG, rlp, opt, micro_batches=2)(fresh(), batch4, key)
    else:
        new_state, m = train_step.make_ntp_train_step(CFG, opt, micro_batches=2)(fresh(), batch4, key)
    got = jax.tree.map(lambda a, b: a - b, params, new_state.params)
    order = jnp.array([0, 2, 1, 3])            # micro-batch 0 = rows 0, 2; micro-batch 1 = rows 1, 3
    whole = jax.tree.map(lambda x: x[order], batch4)
    for i in range(2):
        np.testing.assert_array_equal(train_step.split_micro_batches(toks, 2)[i], toks[order[2 * i:2 * i + 2]])
    if objective == "rlp":
        state = fresh()
        parts = [rollout_phase(state, jax.tree.map(lambda x: x[order[2 * i:2 * i + 2]], batch4),
                                           jax.random.fold_in(key, i), cfg=CFG, rlp=rlp, naive_path=False)
                 for i in range(2)]
        ema_lp, t_bk, t_mask, thoughts = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
        assert not bool(t_mask.all())          # the short row has invalid positions
        loss_fn = lambda p: rlp_objective(p, CFG, rlp, whole, thoughts, t_bk, t_mask, ema_lp,
                                                     state.ref_params)[0]
    else:
        from rlp_jax.rlp.losses import shifted_ntp_loss

        loss_fn = lambda p: shifted_ntp_loss(model.forward(p, CFG, whole["tokens"], segment_ids_bl=whole["segment_ids"],
                                                           positions_bl=whole["positions"])[0],
                                             whole["tokens"], whole["segment_ids"])
    loss, ref = jax.value_and_grad(loss_fn)(params)
    np.testing.assert_allclose(float(m["loss/total"]), float(loss), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), got, ref)


def test_rewards_against_hand_built_sequences(params, batch):
    """S_pred and S_ema of each thought from plain `model.forward` on `[x_<t, <think> c </think>]` and `x_<t`:
    fails if either is read one token off."""
    rlp = _rlp(k=2, g=2)
    t_bk = jnp.array([[3, 9], [4, 10]])
    thoughts = _sample(params, batch, rlp, t_bk)
    ema = jax.tree.map(lambda x: x * 0.9, params)
    ema_lp = teacher_logprobs(ema, CFG, batch)
    _, (_, rewards, _) = _objective(params, batch, rlp, thoughts, t_bk, ema_lp)
    toks, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
    last_logp = lambda p, seq: jax.nn.log_softmax(model.forward(p, CFG, jnp.asarray([seq]))[0][0, -1])
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
    rlp = _rlp()
    t_bk = jnp.array([[3, 9], [4, 10]])
    _, prefix = model.forward(params, cfg16, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                              positions_bl=batch["positions"], return_cache=True)
    thoughts = thought_rollout(params, cfg16, prefix, t_bk, jax.random.key(5), rlp.rollout)
    # The sampler's log-probs as a larger model's bf16 decode gives them (measured: |rho - 1| up to 0.023).
    noise = 0.02 * jax.random.normal(jax.random.key(6), thoughts.logprobs.shape)
    thoughts = thoughts.replace(logprobs=jnp.where(thoughts.action_mask, thoughts.logprobs + noise, 0.0))
    ema_lp = jax.random.normal(jax.random.key(7), batch["tokens"].shape) - 3.0
    mask = jnp.ones(t_bk.shape, bool)
    (_, (m, _, adv)), g = jax.value_and_grad(rlp_objective, has_aux=True)(
        params, cfg16, rlp, batch, thoughts, t_bk, mask, ema_lp)
    assert float(m["policy/max_abs_ratio_minus_1"]) > 0.01      # the diagnostic sees the sampler's gap

    def policy_gradient_surrogate(p, sampler_ratio=False):
        _, pre = model.forward(p, cfg16, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                               positions_bl=batch["positions"], return_cache=True, return_logits=False)
        targets = jnp.take_along_axis(batch["tokens"], t_bk, axis=1)[..., None]
        new_lp, _, _ = rollout_lib.thought_forward(p, cfg16, pre, t_bk, thoughts, targets, rlp.rollout)
        act = thoughts.action_mask
        # sampler_ratio: the gradient a loss would have whose old log-probs were the sampler's (rho != 1)
        w = jnp.exp(jax.lax.stop_gradient(new_lp) - thoughts.logprobs) if sampler_ratio else 1.0
        per_thought = jnp.where(act, w * new_lp, 0.0).sum(-1) / jnp.maximum(act.sum(-1), 1)
        return -jnp.mean(jax.lax.stop_gradient(adv) * per_thought)

    def worst_relative_error(want):   # per leaf |got - want| / |want| (Frobenius); bf16 rounding ~ 0.5%
        return max(float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
                   for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want), strict=True))

    assert worst_relative_error(jax.grad(policy_gradient_surrogate)(params)) <= 1e-2
    assert worst_relative_error(jax.grad(lambda p: policy_gradient_surrogate(p, True))(params)) >= 1.5e-2


def test_run_keys_never_repeat():
    """The run's build, init, step and eval keys are all different (no key reused for two purposes)."""
    from rlp_jax.train.loop import run_key
    base = jax.random.key(0)
    keys = [run_key(base, "build"), run_key(base, "init")] + [run_key(base, "steps", s) for s in range(1, 40)]
    keys += [run_key(base, "eval", i) for i in range(8)]
    data = {tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in keys}
    assert len(data) == len(keys)


def test_nonfinite_gradient_skips_update(params, batch):
    rlp = _rlp()
    opt = optax.adamw(1e-3)
    bad = jax.tree.map(jnp.copy, params) | {"final_norm": params["final_norm"].at[0].set(jnp.nan)}
    expected = jax.tree.map(np.asarray, bad)
    state = train_step.init_train_state(bad, opt)
    new_state, m = train_step.make_rlp_train_step(CFG, rlp, opt)(state, batch, jax.random.key(0))
    assert int(m["train/skipped_nonfinite"]) == 1 and int(new_state.step) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new_state.params, expected)


# ------------------------------------------------------------------------------------------------
# A tiny model learns to think: the answer is a copy of the first digit, and a warm start taught the
# model to copy whatever digit it wrote in its thought. RLP must teach it to write the right digit.
# ------------------------------------------------------------------------------------------------

EQ, DIGITS = 3, np.arange(4, 14)
TOY = ModelConfig.preset("tiny", vocab_size=16, num_layers=2, hidden_size=64)


def _toy_batches(rng, n):
    a, b, r = (rng.choice(DIGITS, n) for _ in range(3))
    warm = np.stack([a, b, np.full(n, EQ), np.full(n, START), r, np.full(n, END), r, np.zeros(n, int)], 1)
    task = np.stack([a, b, np.full(n, EQ), a], 1)
    return warm, task


def _as_batch(tokens, seg=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    seg = jnp.ones_like(tokens) if seg is None else jnp.asarray(seg, jnp.int32)
    return {"tokens": tokens, "segment_ids": seg, "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)}


def test_reward_rises_on_toy_reasoning_task():
    rng = np.random.RandomState(0)
    params = model.init_params(TOY, jax.random.key(0))
    opt = optax.adam(3e-3)
    state = train_step.init_train_state(params, opt)
    ntp = train_step.make_ntp_train_step(TOY, opt)
    for _ in range(150):
        warm, _ = _toy_batches(rng, 32)
        state, _ = ntp(state, _as_batch(warm, warm != 0), jax.random.key(0))
    rlp = RLPConfig(rollout=RolloutConfig(group_size=8, positions_per_doc=1, thought_len=1, min_context=3,
                                          temperature=1.0, think_start_id=START, think_end_id=END),
                    loss=LossConfig(), ema_decay=1.0)  # a frozen teacher: reward = S_pred - const
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    state = train_step.init_train_state(state.params, opt)
    step = train_step.make_rlp_train_step(TOY, rlp, opt)
    rewards = []
    for i in range(150):
        _, task = _toy_batches(rng, 16)
        state, m = step(state, _as_batch(task), jax.random.key(i))
        rewards.append((float(m["reward/mean"]), float(m["reward/s_pred"])))
    early, late = np.mean(rewards[:20], axis=0), np.mean(rewards[-20:], axis=0)
    print("reward, s_pred: first 20 steps", early, "last 20 steps", late)
    assert late[0] > early[0] + 1.0 and late[1] > early[1] + 1.0, (early, late)
    # The thoughts now carry the answer: sampled thoughts equal the first digit far above chance (1/10).
    _, task = _toy_batches(rng, 64)
    b = _as_batch(task)
    _, prefix = model.forward(state.params, TOY, b["tokens"], return_cache=True)
    th = thought_rollout(state.params, TOY, prefix, jnp.full((64, 1), 3), jax.random.key(123), rlp.rollout)
    hit = np.mean(np.asarray(th.tokens[:, 0, :, 0]) == task[:, :1])
    print("share of thoughts that carry the answer", hit)
    assert hit > 0.3, hit   # 3x chance (was > 0.5; 0.496 once the loss ratio became exactly 1, same seed)
