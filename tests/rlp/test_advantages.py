"""Group / batch advantages against hand-computed cases and naive numpy loops (docs/method.md step 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlp_jax.rlp.advantages import batch_advantages, group_advantages, zero_spread_fraction

SETTINGS = settings(max_examples=40, deadline=None)

_group = jax.jit(group_advantages, static_argnames=("std_normalize",))
_batch = jax.jit(batch_advantages, static_argnames=("std_normalize",))


# ------------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------------

def naive_group(rewards, mask, std_normalize=False, eps=1e-6):
    """Leave-one-out baseline by explicit loops: A_i = r_i - mean_{j != i, j valid} r_j."""
    rewards = np.asarray(rewards, np.float64)
    mask = np.asarray(mask, bool)
    out = np.zeros_like(rewards)
    for idx in np.ndindex(rewards.shape[:-1]):
        r, m = rewards[idx], mask[idx]
        valid = [i for i in range(len(r)) if m[i]]
        if len(valid) < 2:
            continue
        vals = np.array([r[i] for i in valid])
        std = np.sqrt(np.mean((vals - vals.mean()) ** 2))
        for i in valid:
            others = [r[j] for j in valid if j != i]
            a = r[i] - sum(others) / len(others)
            if std_normalize:
                a = a / (std + eps)
            out[idx + (i,)] = a
    return out


def _rewards(draw_shape, seed, scale=3.0):
    rng = np.random.RandomState(seed)
    return (scale * rng.randn(*draw_shape)).astype(np.float32), rng


shapes = st.sampled_from([(1, 2), (3, 5), (2, 7)])   # few shapes: one compile each
seeds = st.integers(0, 2 ** 31 - 1)


# ------------------------------------------------------------------------------------------------
# Hand-computed cases
# ------------------------------------------------------------------------------------------------

def test_hand_example():
    r = jnp.array([1.0, 2.0, 3.0, 6.0])
    adv = np.asarray(group_advantages(r, jnp.ones(4, bool)))
    # mean 3, G/(G-1) = 4/3: (r - 3) * 4/3
    np.testing.assert_allclose(adv, [-8 / 3, -4 / 3, 0.0, 4.0], rtol=1e-6, atol=1e-6)
    # r_i minus the mean of the other three
    loo = [1 - (2 + 3 + 6) / 3, 2 - (1 + 3 + 6) / 3, 3 - (1 + 2 + 6) / 3, 6 - (1 + 2 + 3) / 3]
    np.testing.assert_allclose(adv, loo, rtol=1e-6, atol=1e-6)


def test_hand_example_masked():
    # The masked 100 must not enter the mean: valid [1, 2, 6] -> mean 3, factor 3/2.
    r = jnp.array([1.0, 100.0, 2.0, 6.0])
    m = jnp.array([True, False, True, True])
    adv = np.asarray(group_advantages(r, m))
    np.testing.assert_allclose(adv, [-3.0, 0.0, -1.5, 4.5], rtol=1e-6, atol=1e-6)


def test_hand_example_std():
    r = jnp.array([1.0, 3.0])
    adv = np.asarray(group_advantages(r, jnp.ones(2, bool), std_normalize=True, eps=0.0))
    # unnormalised: [-2, 2]; population std of {1, 3} = 1
    np.testing.assert_allclose(adv, [-2.0, 2.0], rtol=1e-6)


def test_g1_raises():
    with pytest.raises(ValueError, match="G"):
        group_advantages(jnp.ones((3, 1)), jnp.ones((3, 1), bool))


def test_fewer_than_two_valid_get_zero():
    r = jnp.array([[5.0, -2.0, 7.0], [1.0, 2.0, 3.0], [4.0, 4.0, 9.0]])
    m = jnp.array([[False, True, False], [False, False, False], [True, True, False]])
    adv = np.asarray(group_advantages(r, m))
    np.testing.assert_array_equal(adv[0], 0.0)
    np.testing.assert_array_equal(adv[1], 0.0)
    np.testing.assert_allclose(adv[2], [0.0, 0.0, 0.0], atol=1e-6)
    adv_std = np.asarray(group_advantages(r, m, std_normalize=True))
    assert np.all(np.isfinite(adv_std))
    np.testing.assert_array_equal(adv_std[:2], 0.0)


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------

@SETTINGS
@given(shapes, seeds)
def test_sums_to_zero_and_equals_leave_one_out(shape, seed):
    r, _ = _rewards(shape, seed)
    m = np.ones(shape, bool)
    adv = np.asarray(_group(r, m))
    np.testing.assert_allclose(adv.sum(-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(adv, naive_group(r, m), rtol=1e-4, atol=1e-4)


@SETTINGS
@given(shapes, seeds)
def test_shift_invariant_per_group(shape, seed):
    r, rng = _rewards(shape, seed)
    m = rng.rand(*shape) < 0.8
    shift = (10.0 * rng.randn(*shape[:-1], 1)).astype(np.float32)
    a = np.asarray(_group(r, m))
    b = np.asarray(_group(r + shift, m))
    np.testing.assert_allclose(a, b, atol=2e-4)


@SETTINGS
@given(shapes, seeds)
def test_mask_equals_valid_subset(shape, seed):
    r, rng = _rewards(shape, seed)
    m = rng.rand(*shape) < 0.6
    adv = np.asarray(_group(r, m))
    np.testing.assert_array_equal(adv[~m], 0.0)
    # each group computed on its valid subset only, with masked rewards replaced by garbage
    garbage = np.where(m, r, 1e6 * rng.randn(*shape)).astype(np.float32)
    adv_g = np.asarray(_group(garbage, m))
    np.testing.assert_allclose(adv_g, adv, atol=1e-4)
    for idx in np.ndindex(shape[:-1]):
        valid = m[idx]
        if valid.sum() >= 2:
            sub = np.asarray(_group(r[idx][valid], np.ones(valid.sum(), bool)))
            np.testing.assert_allclose(adv[idx][valid], sub, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(adv[idx].sum(), 0.0, atol=1e-4)
        else:
            np.testing.assert_array_equal(adv[idx], 0.0)
    np.testing.assert_allclose(adv, naive_group(r, m), rtol=1e-4, atol=1e-4)


@SETTINGS
@given(shapes, seeds)
def test_std_normalize_is_divided_by_population_std(shape, seed):
    r, rng = _rewards(shape, seed)
    m = rng.rand(*shape) < 0.8
    eps = 1e-6
    plain = np.asarray(_group(r, m))
    normed = np.asarray(_group(r, m, std_normalize=True))
    for idx in np.ndindex(shape[:-1]):
        valid = m[idx]
        if valid.sum() < 2:
            np.testing.assert_array_equal(normed[idx], 0.0)
            continue
        std = np.asarray(r[idx][valid], np.float64).std()  # population std (ddof=0)
        np.testing.assert_allclose(normed[idx], plain[idx] / (std + eps), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(normed, naive_group(r, m, std_normalize=True), rtol=1e-3, atol=1e-3)


@SETTINGS
@given(shapes, seeds)
def test_std_normalize_shift_and_scale_invariant(shape, seed):
    r, rng = _rewards(shape, seed)
    m = rng.rand(*shape) < 0.8
    shift = (5.0 * rng.randn(*shape[:-1], 1)).astype(np.float32)
    scale = np.exp(rng.uniform(-1.0, 1.0, (*shape[:-1], 1))).astype(np.float32)
    a = np.asarray(_group(r, m, std_normalize=True))
    b = np.asarray(_group(r * scale + shift, m, std_normalize=True))
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Batch baseline and zero-spread metric
# ------------------------------------------------------------------------------------------------

def test_batch_hand_example():
    r = jnp.array([[1.0, 2.0], [3.0, 100.0], [6.0, 0.0]])
    m = jnp.array([[True, True], [True, False], [True, True]])
    adv = np.asarray(batch_advantages(r, m))
    # valid: 1, 2, 3, 6, 0 -> mean 12/5
    np.testing.assert_allclose(adv, [[1 - 2.4, 2 - 2.4], [3 - 2.4, 0.0], [6 - 2.4, 0 - 2.4]], atol=1e-6)


@SETTINGS
@given(shapes, seeds)
def test_batch_centred_over_all_valid(shape, seed):
    r, rng = _rewards(shape, seed)
    m = rng.rand(*shape) < 0.7
    m.flat[0] = True
    adv = np.asarray(_batch(r, m))
    mean = r[m].astype(np.float64).mean()
    np.testing.assert_allclose(adv, np.where(m, r - mean, 0.0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(adv.sum(), 0.0, atol=1e-3)
    # a per-group shift is NOT removed by the batch baseline (unlike the group one), unless all shifts agree
    normed = np.asarray(_batch(r, m, std_normalize=True))
    std = (r[m].astype(np.float64) - mean).std()
    np.testing.assert_allclose(normed, np.where(m, (r - mean) / (std + 1e-6), 0.0), rtol=1e-3, atol=1e-3)


def test_batch_not_group_invariant():
    r = jnp.array([[0.0, 1.0], [0.0, 1.0]])
    m = jnp.ones((2, 2), bool)
    shifted = r + jnp.array([[0.0], [5.0]])
    assert not np.allclose(batch_advantages(r, m), batch_advantages(shifted, m))
    np.testing.assert_allclose(group_advantages(r, m), group_advantages(shifted, m), atol=1e-6)


def test_zero_spread_fraction_hand():
    r = jnp.array([
        [1.0, 1.0, 1.0],    # zero spread
        [1.0, 2.0, 1.0],    # spread
        [3.0, 9.0, 3.0],    # zero spread among valid (9 masked)
        [5.0, 0.0, 0.0],    # < 2 valid: not counted
    ])
    m = jnp.array([[True, True, True], [True, True, True], [True, False, True], [True, False, False]])
    np.testing.assert_allclose(float(zero_spread_fraction(r, m)), 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(zero_spread_fraction(r[1:2], m[1:2])), 0.0)
    np.testing.assert_allclose(float(zero_spread_fraction(r[3:], m[3:])), 0.0)   # no real group
