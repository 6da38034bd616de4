"""The jitted train steps: ratio 1 and metrics, micro-batching equals the whole batch, non-finite steps
are skipped, run keys never repeat."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlp_jax.model.dense import transformer
from rlp_jax.rlp import objective
from rlp_jax.train import train_step
from tests.rlp_cases import CFG, batch, bind, params, rlp_config  # noqa: F401 (fixtures)


def test_train_step_ratio_is_one_and_metrics_present(params, batch):
    rlp = rlp_config(ntp_weight=0.5)
    opt = optax.adamw(1e-3)
    state = train_step.init_train_state(jax.tree.map(jnp.copy, params), opt)  # the step donates its state
    step = train_step.make_rlp_train_step(CFG, bind(rlp), opt)
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
        train_step.make_rlp_train_step(CFG, bind(rlp_config()), opt, micro_batches=0)
    with pytest.raises(ValueError, match="micro_batches must be >= 1, got -1"):
        train_step.make_ntp_train_step(CFG, opt, micro_batches=-1)


@pytest.mark.parametrize("kind", ["rlp", "ntp"])
def test_micro_batches_give_the_whole_batch_gradient(params, kind):
    """M = 2 micro-batches: the update equals the gradient of the whole batch's loss given the thoughts
    each micro-batch sampled (rows with different token and valid-position counts, NTP and KL terms on)."""
    toks = jax.random.randint(jax.random.key(3), (4, 14), 3, CFG.vocab_size)
    seg = jnp.array([[1] * 14, [1] * 6 + [2] * 8, [1] * 9 + [0] * 5, [1] * 3 + [0] * 11])
    pos = jnp.where(seg > 0, jnp.array([list(range(14)), list(range(6)) + list(range(8)),
                                        list(range(14)), list(range(14))]), 0)
    batch4 = {"tokens": toks, "segment_ids": seg, "positions": pos}
    rlp = rlp_config(kl_beta=0.1, ntp_weight=0.5)
    opt = optax.sgd(1.0)                       # new params = params - gradient
    fresh = lambda: train_step.init_train_state(jax.tree.map(jnp.copy, params), opt, keep_reference=True)
    key = jax.random.key(4)
    if kind == "rlp":
        new_state, m = train_step.make_rlp_train_step(CFG, bind(rlp), opt, micro_batches=2)(fresh(), batch4, key)
    else:
        new_state, m = train_step.make_ntp_train_step(CFG, opt, micro_batches=2)(fresh(), batch4, key)
    got = jax.tree.map(lambda a, b: a - b, params, new_state.params)
    order = jnp.array([0, 2, 1, 3])            # micro-batch 0 = rows 0, 2; micro-batch 1 = rows 1, 3
    whole = jax.tree.map(lambda x: x[order], batch4)
    for i in range(2):
        np.testing.assert_array_equal(train_step.split_micro_batches(toks, 2)[i], toks[order[2 * i:2 * i + 2]])
    if kind == "rlp":
        state = fresh()
        rollout = jax.jit(functools.partial(objective.rollout_phase, cfg=CFG, objective=bind(rlp)))
        parts = [rollout(state, batch=jax.tree.map(lambda x: x[order[2 * i:2 * i + 2]], batch4),
                         rng=jax.random.fold_in(key, i)) for i in range(2)]
        joined = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
        assert not bool(joined.mask.all())          # the short row has invalid positions
        loss_fn = lambda p: objective.loss_and_grad(p, CFG, bind(rlp), whole, joined)[0].loss
        whole_out = jax.jit(lambda p: objective.loss_and_grad(p, CFG, bind(rlp), whole, joined)[0])(params)
        want = {**objective.finish_metrics(whole_out.metrics),
                **objective.rollout_metrics(joined.thoughts, joined.mask)}
        # every metric reduced over the two micro-batches equals the whole batch's (std, max, fractions included)
        assert set(want) <= set(m)
        # atol: policy/max_abs_ratio_minus_1 is float32 round-off of exp(logp - logp_sampler) (a few 1e-6) and
        # differs in its last bits between the micro-batched and whole-batch forwards
        for k, v in want.items():
            np.testing.assert_allclose(float(m[k]), float(v), rtol=1e-5, atol=1e-5, err_msg=k)
    else:
        from rlp_jax.rlp.losses import shifted_ntp_loss

        loss_fn = lambda p: shifted_ntp_loss(transformer.forward(p, CFG, whole["tokens"], segment_ids_bl=whole["segment_ids"],
                                                           positions_bl=whole["positions"])[0],
                                             whole["tokens"], whole["segment_ids"])
    loss, ref = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(float(m["loss/total"]), float(loss), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), got, ref)


def test_run_keys_never_repeat():
    """The run's build, init, step and eval keys are all different (no key reused for two purposes)."""
    from rlp_jax.train.loop import run_key
    base = jax.random.key(0)
    keys = [run_key(base, "build"), run_key(base, "init")] + [run_key(base, "steps", s) for s in range(1, 40)]
    keys += [run_key(base, "eval", i) for i in range(8)]
    data = {tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in keys}
    assert len(data) == len(keys)


def test_nonfinite_gradient_skips_update(params, batch):
    rlp = rlp_config(ntp_weight=0.5)   # the first test's step: compiled once (the compilation cache)
    opt = optax.adamw(1e-3)
    bad = jax.tree.map(jnp.copy, params) | {"final_norm": params["final_norm"].at[0].set(jnp.nan)}
    expected = jax.tree.map(np.asarray, bad)
    state = train_step.init_train_state(bad, opt)
    new_state, m = train_step.make_rlp_train_step(CFG, bind(rlp), opt)(state, batch, jax.random.key(0))
    assert int(m["train/skipped_nonfinite"]) == 1 and int(new_state.step) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new_state.params, expected)


def test_a_non_finite_update_from_finite_gradients_is_skipped(params, batch):
    """Finite loss and gradients but a non-finite step size (or an overflow in the optimizer): the update
    would write NaN params into the checkpointed "last good state"; it is skipped instead."""
    opt = optax.sgd(float("nan"))
    expected = jax.tree.map(np.asarray, params)
    state = train_step.init_train_state(jax.tree.map(jnp.copy, params), opt)
    new_state, m = train_step.make_ntp_train_step(CFG, opt)(state, batch, jax.random.key(0))
    assert np.isfinite(float(m["loss/total"])) and np.isfinite(float(m["train/grad_norm"]))
    assert int(m["train/skipped_nonfinite"]) == 1 and int(new_state.step) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new_state.params, expected)


def test_a_step_draws_positions_per_packed_document(params, batch):
    """rollout.docs_per_row = 2 on rows of one and of two packed documents: K = 2 positions in each document,
    so 4 slots a row, of which the one-document row fills 2 (`positions/valid_fraction` = 3/4)."""
    import dataclasses

    rlp = rlp_config()
    rlp = dataclasses.replace(rlp, rollout=dataclasses.replace(rlp.rollout, docs_per_row=2))
    opt = optax.sgd(0.0)
    state = train_step.init_train_state(jax.tree.map(jnp.copy, params), opt)
    _, m = train_step.make_rlp_train_step(CFG, bind(rlp), opt)(state, batch, jax.random.key(0))
    assert float(m["positions/valid_fraction"]) == 0.75
    assert np.isfinite(float(m["reward/mean"])) and float(m["thought/mean_len"]) > 0
