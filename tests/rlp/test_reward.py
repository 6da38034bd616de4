"""The rewards' own functions on hand-computed cases: information gain (RLP) and RPT's exact-match reward."""

import jax.numpy as jnp
import numpy as np

from rlp_jax.rlp import REWARDS, info_gain, rpt


def test_info_gain_is_s_pred_minus_the_positions_s_ema():
    s_pred = jnp.array([[[-1.0, -3.0], [-0.5, -0.25]]])          # [B=1, K=2, G=2]
    s_ema = jnp.array([[-2.0, -0.5]])                             # [B=1, K=2]
    np.testing.assert_allclose(info_gain(s_pred, s_ema), [[[1.0, -1.0], [0.0, 0.25]]])
    # the registry form sums the horizon and reports S_ema per thought
    lp = jnp.stack([s_pred / 2, s_pred / 2], axis=-1)            # H = 2
    ema = jnp.stack([s_ema / 2, s_ema / 2], axis=-1)
    r, terms = REWARDS["info_gain"](lp, None, None, ema)
    np.testing.assert_allclose(r, [[[1.0, -1.0], [0.0, 0.25]]], atol=1e-6)
    np.testing.assert_allclose(terms["s_ema"], [[[-2.0, -2.0], [-0.5, -0.5]]])


def test_rpt_rewards_an_exact_prediction_of_every_horizon_token():
    targets = jnp.array([[[5, 7], [2, 2]]])                      # [B=1, K=2, H=2]
    predicted = jnp.array([[[[5, 7], [5, 8], [7, 5]],            # K=0: exact, one wrong, swapped
                            [[2, 2], [2, 2], [3, 2]]]])          # K=1: exact, exact, first wrong
    np.testing.assert_array_equal(rpt(predicted, targets), [[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]])
    r, terms = REWARDS["rpt"](jnp.zeros(predicted.shape), predicted, targets, None)
    np.testing.assert_array_equal(r, terms["accuracy"])


def test_the_library_functions_refuse_mismatched_shapes_at_the_boundary():
    """chex checks at trace time: a [B, K] teacher against [B, K', G] thoughts, a [R, 1] advantage (which would
    broadcast over the thought's tokens) and a mask of another shape are errors, not silent broadcasts."""
    import pytest

    from rlp_jax.rlp import group_advantages, rlp_loss

    with pytest.raises(AssertionError):
        info_gain(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4)))
    with pytest.raises(AssertionError):
        rpt(jnp.zeros((1, 2, 3, 2), int), jnp.zeros((1, 2, 3), int))
    with pytest.raises(AssertionError):
        group_advantages(jnp.zeros((2, 4)), jnp.ones((2, 3), bool))
    lp, mask = jnp.zeros((5, 7)), jnp.ones((5, 7), bool)
    assert float(rlp_loss(lp, lp, jnp.ones(5), mask)) == -1.0            # ratio 1, advantage 1: -1 per thought
    with pytest.raises(AssertionError):
        rlp_loss(lp, lp, jnp.ones((5, 1)), mask)
    with pytest.raises(AssertionError):
        rlp_loss(lp, lp, jnp.ones(5), mask[:, :6])
