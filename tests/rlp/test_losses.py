"""rlp_loss / ntp_loss / shifted_ntp_loss against hand-computed cases and naive numpy (docs/method.md step 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlp_jax.rlp.losses import ntp_loss, rlp_loss, rlp_loss_metrics, shifted_ntp_loss

SETTINGS = settings(max_examples=40, deadline=None)
M, T = 5, 4   # fixed shapes for the property tests: compile once


_value_and_grad = jax.jit(jax.value_and_grad(rlp_loss), static_argnames=("clip_eps", "kl_beta"))
_metrics_jit = jax.jit(rlp_loss_metrics, static_argnames=("clip_eps",))


# ------------------------------------------------------------------------------------------------
# Naive reference
# ------------------------------------------------------------------------------------------------

def naive_rlp(new, old, adv, mask, eps_low, eps_high, ref=None, beta=0.0):
    """Loss value and analytic d loss / d new, by explicit loops (float64)."""
    new, old, adv = (np.asarray(x, np.float64) for x in (new, old, adv))
    mask = np.asarray(mask, bool)
    m, t = new.shape
    total = 0.0
    grad = np.zeros_like(new)
    rows = [i for i in range(m) if mask[i].any()]
    for i in rows:
        n_tok = mask[i].sum()
        acc = 0.0
        for k in range(t):
            if not mask[i, k]:
                continue
            rho = np.exp(new[i, k] - old[i, k])
            a = adv[i]
            clipped_rho = min(max(rho, 1 - eps_low), 1 + eps_high)
            obj = min(rho * a, clipped_rho * a)
            # the min picks the clipped branch (constant, zero gradient) only when it is strictly smaller
            g_obj = 0.0 if clipped_rho * a < rho * a else rho * a
            val = -obj
            g = -g_obj
            if beta > 0:
                d = ref[i, k] - new[i, k]
                val += beta * (np.exp(d) - d - 1)
                g += beta * (-np.exp(d) + 1)
            acc += val
            grad[i, k] = g / n_tok
        total += acc / n_tok
    n = max(len(rows), 1)
    return total / n, grad / n


def _random_case(seed, p_mask=0.7, spread=0.5):
    rng = np.random.RandomState(seed)
    old = (-np.abs(rng.randn(M, T)) - 0.1).astype(np.float32)
    new = (old + spread * rng.randn(M, T)).astype(np.float32)
    adv = rng.randn(M).astype(np.float32)
    mask = rng.rand(M, T) < p_mask
    return new, old, adv, mask, rng


# ------------------------------------------------------------------------------------------------
# One token, by hand
# ------------------------------------------------------------------------------------------------

def _one(ratio, adv, clip_eps=0.2):
    old = jnp.array([[-1.0]])
    new = old + jnp.log(ratio)
    mask = jnp.array([[True]])
    a = jnp.array([adv])
    loss, metrics = rlp_loss(new, old, a, mask, clip_eps), rlp_loss_metrics(new, old, a, mask, clip_eps)
    grad = jax.grad(rlp_loss)(new, old, a, mask, clip_eps)
    return float(loss), float(grad[0, 0]), metrics


def test_positive_adv_inside_range():
    loss, grad, met = _one(1.1, 2.0)
    assert loss == pytest.approx(-1.1 * 2.0, rel=1e-5)
    assert grad == pytest.approx(-1.1 * 2.0, rel=1e-5)   # d(-rho A)/d log rho = -rho A
    assert float(met["policy/clip_fraction"]) == 0.0


def test_positive_adv_above_high_clipped():
    loss, grad, met = _one(1.5, 2.0)
    assert loss == pytest.approx(-1.2 * 2.0, rel=1e-5)
    assert grad == 0.0
    assert float(met["policy/clip_fraction"]) == 1.0


def test_positive_adv_below_low_unclipped():
    # A > 0, rho < 1 - eps: min picks rho A (pessimistic), gradient flows
    loss, grad, met = _one(0.5, 2.0)
    assert loss == pytest.approx(-0.5 * 2.0, rel=1e-5)
    assert grad == pytest.approx(-0.5 * 2.0, rel=1e-5)
    assert float(met["policy/clip_fraction"]) == 0.0


def test_negative_adv_below_low_clipped():
    loss, grad, met = _one(0.5, -2.0)
    assert loss == pytest.approx(-0.8 * -2.0, rel=1e-5)
    assert grad == 0.0
    assert float(met["policy/clip_fraction"]) == 1.0


def test_negative_adv_above_high_unclipped():
    loss, grad, met = _one(1.5, -2.0)
    assert loss == pytest.approx(-1.5 * -2.0, rel=1e-5)
    assert grad == pytest.approx(3.0, rel=1e-5)
    assert float(met["policy/clip_fraction"]) == 0.0


def test_asymmetric_clip():
    # eps = (0.1, 0.3): A > 0 with rho 1.25 is inside (would be clipped by a symmetric 0.2)
    loss, grad, met = _one(1.25, 1.0, clip_eps=(0.1, 0.3))
    assert loss == pytest.approx(-1.25, rel=1e-5)
    assert grad == pytest.approx(-1.25, rel=1e-5)
    assert float(met["policy/clip_fraction"]) == 0.0
    loss, grad, _ = _one(1.25, 1.0, clip_eps=0.2)
    assert loss == pytest.approx(-1.2, rel=1e-5) and grad == 0.0
    # A > 0 with rho 1.4 is clipped at 1 + eps_high = 1.3 (not 1.1)
    loss, grad, met = _one(1.4, 1.0, clip_eps=(0.1, 0.3))
    assert loss == pytest.approx(-1.3, rel=1e-5) and grad == 0.0
    assert float(met["policy/clip_fraction"]) == 1.0
    # A < 0 with rho 0.85 is clipped at 1 - eps_low = 0.9 (not 0.7)
    loss, grad, met = _one(0.85, -1.0, clip_eps=(0.1, 0.3))
    assert loss == pytest.approx(0.9, rel=1e-5) and grad == 0.0
    assert float(met["policy/clip_fraction"]) == 1.0
    # ... but inside for eps_low = 0.3
    loss, grad, _ = _one(0.85, -1.0, clip_eps=(0.3, 0.1))
    assert loss == pytest.approx(0.85, rel=1e-5) and grad == pytest.approx(0.85, rel=1e-5)


def test_clip_fraction_counts_tokens():
    old = jnp.zeros((2, 3))
    ratio = jnp.array([[1.0, 1.5, 0.5], [1.5, 0.5, 1.0]])
    adv = jnp.array([1.0, -1.0])
    mask = jnp.array([[True, True, True], [True, True, False]])
    met = rlp_loss_metrics(jnp.log(ratio), old, adv, mask, 0.2)
    # clipped: row 0 slot 1 (A>0, rho>1.2); row 1 slot 1 (A<0, rho<0.8); 5 action tokens
    assert float(met["policy/clip_fraction"]) == pytest.approx(2 / 5)
    assert float(met["policy/max_abs_ratio_minus_1"]) == pytest.approx(0.5, rel=1e-5)
    assert float(met["thought/mean_action_tokens"]) == pytest.approx(2.5)


# ------------------------------------------------------------------------------------------------
# Averaging, masking and gradients against the naive loop
# ------------------------------------------------------------------------------------------------

@SETTINGS
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([0.2, (0.1, 0.3), (0.3, 0.05)]))
def test_matches_naive(seed, clip_eps):
    new, old, adv, mask, _ = _random_case(seed)
    low, high = clip_eps if isinstance(clip_eps, tuple) else (clip_eps, clip_eps)
    loss, grad = _value_and_grad(new, old, adv, mask, clip_eps=clip_eps)
    ref_loss, ref_grad = naive_rlp(new, old, adv, mask, low, high)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grad)[~mask] == 0.0)
    # clip fraction: share of action tokens whose objective is the (constant) clipped branch
    met = _metrics_jit(new, old, adv, mask, clip_eps=clip_eps)
    rho = np.exp(new.astype(np.float64) - old)
    a = adv[:, None]
    clipped = ((a > 0) & (rho > 1 + high)) | ((a < 0) & (rho < 1 - low))
    np.testing.assert_allclose(float(met["policy/clip_fraction"]), (clipped & mask).sum() / max(mask.sum(), 1),
                               rtol=1e-6, atol=1e-7)
    # and those are exactly the action tokens with zero gradient (the others have A != 0, rho > 0)
    np.testing.assert_array_equal(np.asarray(grad)[mask] == 0.0, clipped[mask])


@SETTINGS
@given(st.integers(0, 2 ** 31 - 1))
def test_masked_tokens_are_ignored(seed):
    new, old, adv, mask, rng = _random_case(seed)
    loss, grad = _value_and_grad(new, old, adv, mask)
    new2 = np.where(mask, new, 50.0 * rng.randn(M, T)).astype(np.float32)
    old2 = np.where(mask, old, 50.0 * rng.randn(M, T)).astype(np.float32)
    loss2, grad2 = _value_and_grad(new2, old2, adv, mask)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad2), np.asarray(grad), rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(grad2)[~mask] == 0.0)


@SETTINGS
@given(st.integers(0, 2 ** 31 - 1))
def test_empty_thought_does_not_count(seed):
    new, old, adv, mask, rng = _random_case(seed)
    mask[0] = True
    mask[-1] = False   # last thought has no action token
    loss_all, _ = _value_and_grad(new, old, adv, mask)
    loss_sub, _ = _value_and_grad(new[:-1], old[:-1], adv[:-1], mask[:-1])
    np.testing.assert_allclose(float(loss_all), float(loss_sub), rtol=1e-5, atol=1e-6)
    # its advantage does not matter either
    adv2 = adv.copy()
    adv2[-1] = 1e3
    np.testing.assert_allclose(float(_value_and_grad(new, old, adv2, mask)[0]), float(loss_all), rtol=1e-6)


def test_all_empty_gives_zero():
    z = jnp.zeros((3, 2))
    loss, met = rlp_loss(z, z, jnp.ones(3), jnp.zeros((3, 2), bool)), rlp_loss_metrics(z, z, jnp.ones(3), jnp.zeros((3, 2), bool))
    assert float(loss) == 0.0 and np.isfinite(float(met["policy/clip_fraction"]))


@SETTINGS
@given(st.integers(0, 2 ** 31 - 1))
def test_policy_gradient_at_ratio_one(seed):
    _, old, adv, mask, _ = _random_case(seed)
    mask[0, 0] = True
    loss, grad = _value_and_grad(old, old, adv, mask)
    lengths = mask.sum(-1)
    n_thoughts = (lengths > 0).sum()
    expected = np.where(mask, -adv[:, None] / np.maximum(lengths, 1)[:, None] / n_thoughts, 0.0)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)
    # value: -mean over thoughts of A
    np.testing.assert_allclose(float(loss), -adv[lengths > 0].mean(), rtol=1e-5, atol=1e-6)


def test_advantage_is_not_differentiated():
    new, old, adv, mask, _ = _random_case(3)
    g = jax.grad(lambda a: rlp_loss(new, old, a, mask))(jnp.asarray(adv))
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    g_old = jax.grad(lambda o: rlp_loss(new, o, adv, mask))(jnp.asarray(old))
    np.testing.assert_array_equal(np.asarray(g_old), 0.0)


# ------------------------------------------------------------------------------------------------
# KL term and metrics
# ------------------------------------------------------------------------------------------------

@SETTINGS
@given(st.integers(0, 2 ** 31 - 1))
def test_kl_term_matches_naive(seed):
    new, old, adv, mask, rng = _random_case(seed)
    ref = (new + 0.3 * rng.randn(M, T)).astype(np.float32)
    beta = 0.1
    loss0, _ = _value_and_grad(new, old, adv, mask)
    loss, grad = _value_and_grad(new, old, adv, mask, ref_logprobs=ref, kl_beta=beta)
    ref_loss, ref_grad = naive_rlp(new, old, adv, mask, 0.2, 0.2, ref=ref, beta=beta)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-6)
    # the increase is beta * (per-thought mean of k3, averaged over thoughts), k3 >= 0
    d = (ref - new).astype(np.float64)
    k3 = np.where(mask, np.exp(d) - d - 1, 0.0)
    assert np.all(k3 >= 0)
    lengths = mask.sum(-1)
    has = lengths > 0
    kl = (k3.sum(-1)[has] / lengths[has]).mean() if has.any() else 0.0
    np.testing.assert_allclose(float(loss) - float(loss0), beta * kl, rtol=1e-3, atol=1e-6)
    met = _metrics_jit(new, old, adv, mask, ref_logprobs=ref)
    np.testing.assert_allclose(float(met["policy/kl_to_ref"]), kl, rtol=1e-4, atol=1e-6)


@SETTINGS
@given(st.integers(0, 2 ** 31 - 1))
def test_kl_masked_tokens_are_ignored(seed):
    """Off-mask values of new / ref log-probs must not matter with the KL term either (value and gradient)."""
    new, old, adv, mask, rng = _random_case(seed)
    mask[0, 0], mask[0, 1] = True, False
    ref = (new + 0.3 * rng.randn(M, T)).astype(np.float32)
    loss, grad = _value_and_grad(new, old, adv, mask, ref_logprobs=ref, kl_beta=0.1)
    new2 = np.where(mask, new, 50.0 * rng.randn(M, T)).astype(np.float32)
    new2[0, 1] = -200.0                       # e.g. the log-prob of a banned token, far below the reference
    ref2 = np.where(mask, ref, 50.0 * rng.randn(M, T)).astype(np.float32)
    ref2[0, 1] = 0.0
    loss2, grad2 = _value_and_grad(new2, old, adv, mask, ref_logprobs=ref2, kl_beta=0.1)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(np.asarray(grad2))), np.asarray(grad2)
    np.testing.assert_allclose(np.asarray(grad2), np.asarray(grad), rtol=1e-6, atol=1e-7)


def test_kl_zero_at_reference():
    new, old, adv, mask, _ = _random_case(1)
    a = rlp_loss(new, old, adv, mask, ref_logprobs=new, kl_beta=1.0)
    b = rlp_loss(new, old, adv, mask)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_kl_without_ref_raises():
    new, old, adv, mask, _ = _random_case(0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        rlp_loss(new, old, adv, mask, kl_beta=0.01)


def test_reward_metrics():
    z = jnp.zeros((4, 2))
    mask = jnp.array([[True, False], [True, True], [False, False], [True, False]])
    rewards = jnp.array([1.0, -2.0, 100.0, 0.5])      # thought 2 has no action tokens: not counted
    met = rlp_loss_metrics(z, z, jnp.zeros(4), mask, rewards=rewards)
    assert float(met["reward/mean"]) == pytest.approx((1.0 - 2.0 + 0.5) / 3)
    assert float(met["reward/frac_positive"]) == pytest.approx(2 / 3)
    met = rlp_loss_metrics(z, z, jnp.zeros(4), mask)
    assert "reward/mean" not in met


# ------------------------------------------------------------------------------------------------
# Next-token losses
# ------------------------------------------------------------------------------------------------

def _naive_ce(logits, targets, mask):
    logits = np.asarray(logits, np.float64)
    total, count = 0.0, 0.0
    for idx in np.ndindex(targets.shape):
        if mask[idx]:
            row = logits[idx]
            lse = np.log(np.sum(np.exp(row - row.max()))) + row.max()
            total += lse - row[targets[idx]]
            count += 1
    return total / max(count, 1.0)


@SETTINGS
@given(st.integers(0, 2 ** 31 - 1))
def test_ntp_loss_matches_naive(seed):
    rng = np.random.RandomState(seed)
    logits = (3 * rng.randn(2, 5, 7)).astype(np.float32)
    targets = rng.randint(0, 7, (2, 5)).astype(np.int32)
    mask = rng.rand(2, 5) < 0.6
    np.testing.assert_allclose(float(ntp_loss(logits, targets, mask)), _naive_ce(logits, targets, mask),
                               rtol=1e-5, atol=1e-6)


def test_ntp_loss_empty_mask_and_dtype():
    logits = jnp.ones((2, 3, 4), jnp.bfloat16)
    assert float(ntp_loss(logits, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3), bool))) == 0.0
    assert float(ntp_loss(logits, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3)))) == pytest.approx(np.log(4), rel=1e-5)


def test_shifted_ntp_two_packed_segments():
    rng = np.random.RandomState(0)
    v = 6
    logits = (2 * rng.randn(1, 8, v)).astype(np.float32)
    tokens = np.array([[1, 2, 3, 4, 5, 0, 0, 0]], np.int32)
    seg = np.array([[1, 1, 1, 2, 2, 0, 0, 0]], np.int32)
    # pairs (j -> j+1) inside one segment: (0->1), (1->2) [seg 1], (3->4) [seg 2];
    # (2->3) crosses segments, (4->5)... target is padding
    pairs = [(0, 1), (1, 2), (3, 4)]
    expected = np.mean([
        np.log(np.sum(np.exp(logits[0, j].astype(np.float64)))) - logits[0, j, tokens[0, k]] for j, k in pairs])
    got = float(shifted_ntp_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(seg)))
    assert got == pytest.approx(expected, rel=1e-5)
    # changing logits at the rows that predict across a boundary / padding changes nothing
    logits2 = logits.copy()
    logits2[0, [2, 4, 5, 6, 7]] = 100 * rng.randn(5, v)
    assert float(shifted_ntp_loss(jnp.asarray(logits2), jnp.asarray(tokens), jnp.asarray(seg))) == pytest.approx(got, rel=1e-6)
    # ... while changing a real one does
    logits3 = logits.copy()
    logits3[0, 3] += 5 * rng.randn(v)
    assert float(shifted_ntp_loss(jnp.asarray(logits3), jnp.asarray(tokens), jnp.asarray(seg))) != pytest.approx(got, rel=1e-6)


def test_per_thought_losses_average_to_the_loss():
    """reduction="none": one loss per thought (0 without action tokens); their mean over the thoughts that have
    action tokens is the "mean" loss, and weighting them is the caller's."""
    new, old, adv, mask, _ = _random_case(5)
    mask[1] = False
    per = rlp_loss(new, old, adv, mask, reduction="none")
    assert per.shape == (M,) and float(per[1]) == 0.0
    np.testing.assert_allclose(float(per[mask.any(-1)].mean()), float(rlp_loss(new, old, adv, mask)), rtol=1e-6)
    ref, _ = naive_rlp(new[:1], old[:1], adv[:1], mask[:1], 0.2, 0.2)
    np.testing.assert_allclose(float(per[0]), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        rlp_loss(new, old, adv, mask, reduction="sum")
