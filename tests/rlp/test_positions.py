"""Choosing thinking positions (docs/method.md step 1) against hand cases and naive numpy loops."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlp_jax.rlp.config import RolloutConfig
from rlp_jax.rlp.positions import choose_positions, select_positions, valid_positions

SETTINGS = settings(max_examples=40, deadline=None)
B, L = 3, 16

_valid = jax.jit(valid_positions, static_argnames=("min_context", "horizon"))
_choose = jax.jit(choose_positions, static_argnums=2)
_select = jax.jit(select_positions, static_argnames=("rollout", "horizon"))


def _packed(seed, b=B, length=L):
    """Random packed rows: documents of random lengths, positions restarting at 0, trailing padding (segment 0)."""
    rng = np.random.RandomState(seed)
    seg = np.zeros((b, length), np.int32)
    pos = np.zeros((b, length), np.int32)
    for row in range(b):
        i, s = 0, 1
        end = length - rng.randint(0, 4)        # up to 3 padding tokens
        while i < end:
            n = min(rng.randint(1, 8), end - i)
            seg[row, i:i + n] = s
            pos[row, i:i + n] = np.arange(n)
            i, s = i + n, s + 1
    return seg, pos, rng


def naive_valid(seg, pos, min_context, horizon):
    out = np.zeros(seg.shape, bool)
    for b in range(seg.shape[0]):
        for t in range(seg.shape[1]):
            if seg[b, t] == 0 or pos[b, t] < min_context:
                continue
            if t + horizon > seg.shape[1]:
                continue
            out[b, t] = all(seg[b, t + h] == seg[b, t] for h in range(horizon))
    return out


# ------------------------------------------------------------------------------------------------
# valid_positions
# ------------------------------------------------------------------------------------------------

def test_valid_hand_example():
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0, 0]])
    pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0, 0]])
    v1 = np.asarray(valid_positions(seg, pos, min_context=2))
    np.testing.assert_array_equal(np.nonzero(v1[0])[0], [2, 3, 6])
    v2 = np.asarray(valid_positions(seg, pos, min_context=2, horizon=2))
    np.testing.assert_array_equal(np.nonzero(v2[0])[0], [2])          # 3 -> seg 2, 6 -> padding
    v3 = np.asarray(valid_positions(seg, pos, min_context=1, horizon=3))
    np.testing.assert_array_equal(np.nonzero(v3[0])[0], [1])           # 4 has no context, 5 runs into padding
    v4 = np.asarray(valid_positions(seg, pos, min_context=4))
    assert not v4.any()
    # a document running to the end of the row: no room for a horizon past the row
    seg_full = jnp.ones((1, 5), jnp.int32)
    pos_full = jnp.arange(5)[None]
    np.testing.assert_array_equal(np.nonzero(np.asarray(valid_positions(seg_full, pos_full, min_context=1,
                                                                        horizon=2))[0])[0], [1, 2, 3])


@SETTINGS
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([1, 2, 3]), st.sampled_from([1, 2, 3]))
def test_valid_matches_naive(seed, min_context, horizon):
    seg, pos, _ = _packed(seed)
    got = np.asarray(_valid(seg, pos, min_context=min_context, horizon=horizon))
    np.testing.assert_array_equal(got, naive_valid(seg, pos, min_context, horizon))


# ------------------------------------------------------------------------------------------------
# choose_positions
# ------------------------------------------------------------------------------------------------

@SETTINGS
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([1, 3]))
def test_choose_distinct_sorted_valid(seed, k):
    seg, pos, rng = _packed(seed)
    valid = naive_valid(seg, pos, 2, 1)
    t, mask = _choose(jax.random.key(seed % 1000), valid, k)
    t, mask = np.asarray(t), np.asarray(mask)
    assert t.shape == (B, k) and mask.shape == (B, k) and t.dtype == np.int32
    for b in range(B):
        n_valid = valid[b].sum()
        assert mask[b].sum() == min(k, n_valid)
        # the masked-in slots come first, hold distinct valid indices, ascending
        np.testing.assert_array_equal(mask[b], np.arange(k) < min(k, n_valid))
        chosen = t[b][mask[b]]
        assert np.all(valid[b][chosen])
        assert np.all(np.diff(chosen) > 0)
        if n_valid < k:
            np.testing.assert_array_equal(np.sort(chosen), np.nonzero(valid[b])[0])   # all of them


def test_choose_none_valid():
    t, mask = choose_positions(jax.random.key(0), jnp.zeros((2, 8), bool), 2)
    assert not np.asarray(mask).any()
    np.testing.assert_array_equal(np.asarray(t), 0)


def _uniformity_stats(counts, valid_row, rows, k):
    """Max |z| and sum z^2 of the per-position counts against rows * K / n_valid."""
    p = k / valid_row.sum()
    sigma = np.sqrt(rows * p * (1 - p))
    z = (counts[valid_row] - rows * p) / sigma
    return np.max(np.abs(z)), np.sum(z ** 2)


def _chi2_bound(df, z=5.0):
    a = 2.0 / (9.0 * df)
    return df * (1 - a + z * np.sqrt(a)) ** 3


def test_choose_uniform_frequency():
    """Each valid position is chosen with probability K / n_valid, and each pair with K(K-1)/(n(n-1)):
    uniform K-subsets (rows are independent draws)."""
    rows, k = 20000, 3
    valid_row = np.zeros(L, bool)
    valid_row[[1, 2, 4, 5, 6, 9, 11, 12, 14, 15]] = True                 # 10 valid positions
    n = valid_row.sum()
    valid = np.broadcast_to(valid_row, (rows, L))
    t, mask = _choose(jax.random.key(123), valid, k)
    t, mask = np.asarray(t), np.asarray(mask)
    assert mask.all()
    counts = np.bincount(t.ravel(), minlength=L)
    assert counts[~valid_row].sum() == 0
    max_z, sum_z2 = _uniformity_stats(counts, valid_row, rows, k)
    # the counts are negatively correlated (they sum to rows * K), which only shrinks sum z^2
    assert max_z < 5 and sum_z2 < _chi2_bound(n), (counts, max_z, sum_z2)
    # the same bounds reject a slightly biased sampler: Gumbel top-k with log-weights 0.15 * t / L
    gen = np.random.RandomState(0)
    scores = np.where(valid_row, gen.gumbel(size=(rows, L)) + 0.15 * np.arange(L) / L, -np.inf)
    fake = np.bincount(np.argsort(-scores, axis=1)[:, :k].ravel(), minlength=L)
    f_max, f_sum = _uniformity_stats(fake, valid_row, rows, k)
    assert f_max >= 5 or f_sum >= _chi2_bound(n), (f_max, f_sum)
    # pairs
    idx = np.nonzero(valid_row)[0]
    pair = np.zeros((L, L))
    for a in range(k):
        for b in range(a + 1, k):
            np.add.at(pair, (t[:, a], t[:, b]), 1)
    p2 = k * (k - 1) / (n * (n - 1))
    sigma2 = np.sqrt(rows * p2 * (1 - p2))
    sub = pair[np.ix_(idx, idx)][np.triu_indices(n, 1)]
    assert pair[np.tril_indices(L)].sum() == 0                     # sorted ascending
    assert np.all(np.abs(sub - rows * p2) < 5 * sigma2)


def test_choose_depends_on_rng():
    valid = np.ones((2, L), bool)
    a = np.asarray(_choose(jax.random.key(0), valid, 3)[0])
    b = np.asarray(_choose(jax.random.key(0), valid, 3)[0])
    c = np.asarray(_choose(jax.random.key(1), valid, 3)[0])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@SETTINGS
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([1, 3]))
def test_choose_prefers_score(seed, k):
    seg, pos, rng = _packed(seed)
    valid = naive_valid(seg, pos, 1, 1)
    score = rng.rand(B, L) < 0.4
    t, mask = _choose(jax.random.key(seed % 997), valid, k, score_bl=score)
    t, mask = np.asarray(t), np.asarray(mask)
    for b in range(B):
        preferred = valid[b] & score[b]
        chosen = t[b][mask[b]]
        assert np.all(valid[b][chosen])
        if preferred.sum() >= k:
            assert mask[b].all()
            assert np.all(preferred[chosen]), (chosen, np.nonzero(preferred)[0])
        else:   # falls back to the plain valid set for this document
            assert mask[b].sum() == min(k, valid[b].sum())


def test_choose_prefers_score_hand():
    valid = np.ones((2, 8), bool)
    score = np.zeros((2, 8), bool)
    score[0, [2, 5, 7]] = True     # enough for K = 2: only these
    score[1, [3]] = True           # not enough: any valid
    seen0, seen1 = set(), set()
    for s in range(30):
        t, mask = _choose(jax.random.key(s), valid, 2, score_bl=score)
        seen0 |= set(np.asarray(t)[0].tolist())
        seen1 |= set(np.asarray(t)[1].tolist())
        assert np.asarray(mask).all()
    assert seen0 == {2, 5, 7}
    assert len(seen1) > 3


# ------------------------------------------------------------------------------------------------
# select_positions
# ------------------------------------------------------------------------------------------------

def _cfg(**kw):
    return RolloutConfig(**{**dict(group_size=2, positions_per_doc=2, min_context=2), **kw})


@SETTINGS
@given(st.integers(0, 2 ** 31 - 1))
def test_select_ema_band(seed):
    seg, pos, rng = _packed(seed)
    ema = (-rng.exponential(3.0, (B, L))).astype(np.float32)     # log-probs <= 0
    r = _cfg(position_rule="ema_band", ema_band=(1.0, 4.0))
    t, mask = _select(jax.random.key(seed % 991), seg, pos, ema, r, 1)
    t, mask = np.asarray(t), np.asarray(mask)
    valid = naive_valid(seg, pos, 2, 1)
    surprise = -ema
    band = (surprise >= 1.0) & (surprise <= 4.0)
    for b in range(B):
        chosen = t[b][mask[b]]
        assert np.all(valid[b][chosen])
        if (valid[b] & band[b]).sum() >= 2:
            assert mask[b].all()
            assert np.all(band[b][chosen]), (surprise[b][chosen])
        else:
            assert mask[b].sum() == min(2, valid[b].sum())


def test_select_uniform_ignores_ema_and_respects_horizon():
    seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0]] * 200, np.int32)
    pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0]] * 200, np.int32)
    ema = np.zeros(seg.shape, np.float32)          # surprise 0: outside every band
    ema[:, 2] = -2.0
    r = _cfg(positions_per_doc=1, min_context=2)
    t, mask = _select(jax.random.key(0), seg, pos, ema, r, 2)
    t = np.asarray(t)[:, 0]
    assert np.asarray(mask).all()
    assert set(t.tolist()) == {2, 3, 7}            # H = 2: x_t, x_{t+1} in one document
    rb = _cfg(positions_per_doc=1, min_context=2, position_rule="ema_band", ema_band=(1.0, 3.0))
    tb = np.asarray(_select(jax.random.key(0), seg, pos, ema, rb, 2)[0])[:, 0]
    assert set(tb.tolist()) == {2}


def test_window_rule_picks_k_consecutive_valid_positions():
    from rlp_jax.rlp.positions import choose_window

    # Row 0: valid 2..9 (8 positions); row 1: valid runs of length 2 only -> no window of 3.
    valid = np.zeros((2, 12), bool)
    valid[0, 2:10] = True
    valid[1, [1, 2, 5, 6, 9, 10]] = True
    starts = []
    for seed in range(200):
        t, m = choose_window(jax.random.key(seed), jnp.asarray(valid), 3)
        t, m = np.asarray(t), np.asarray(m)
        assert m[0].all() and not m[1].any()
        assert (np.diff(t[0]) == 1).all() and valid[0, t[0]].all()
        starts.append(t[0, 0])
    # Every admissible start (2..7) is drawn, roughly uniformly.
    counts = np.bincount(starts, minlength=8)[2:8]
    assert counts.min() > 15, counts
    rollout = RolloutConfig(group_size=2, positions_per_doc=3, min_context=2, position_rule="window")
    seg = jnp.ones((1, 12), jnp.int32)
    pos = jnp.arange(12)[None]
    t, m = select_positions(jax.random.key(0), seg, pos, jnp.zeros((1, 12)), rollout, 1)
    assert bool(m.all()) and (np.diff(np.asarray(t[0])) == 1).all() and int(t[0, 0]) >= 2


def test_eval_positions_never_depend_on_a_model():
    """Evaluation under ema_band draws uniformly (no model's surprise enters): for any two models' log-probs the
    training rule picks differently, the evaluation rule picks the same positions, those of `uniform`."""
    from rlp_jax.rlp.positions import eval_positions

    seg, pos, rng = _packed(3)
    band = _cfg(positions_per_doc=2, min_context=1, position_rule="ema_band", ema_band=(1.0, 3.0))
    lp_a, lp_b = (-rng.uniform(0, 4, seg.shape).astype(np.float32) for _ in range(2))
    key = jax.random.key(4)
    train_a, train_b = (np.asarray(_select(key, seg, pos, lp, band, 1)[0]) for lp in (lp_a, lp_b))
    assert (train_a != train_b).any()                 # the training rule follows the model's surprise
    got = eval_positions(key, seg, pos, band, 1)
    want = _select(key, seg, pos, None, _cfg(positions_per_doc=2, min_context=1), 1)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_docs_per_row_draws_k_positions_in_each_packed_document():
    """docs_per_row = D: K positions in each of a row's first D documents (the paper's one draw per document),
    every valid position of a document equally likely; a row with fewer documents, or a document with fewer
    valid positions, leaves its slots masked; 0 keeps K per row."""
    seg = np.array([[1] * 6 + [2] * 6 + [3] * 4, [1] * 10 + [2] * 3 + [0] * 3], np.int32)
    pos = np.array([list(range(6)) + list(range(6)) + list(range(4)),
                    list(range(10)) + list(range(3)) + [0] * 3], np.int32)
    ro = RolloutConfig(group_size=2, positions_per_doc=2, min_context=2, docs_per_row=3)
    assert ro.positions_per_row == 6
    counts = np.zeros(seg.shape)
    for i in range(400):
        t, m = (np.asarray(x) for x in _select(jax.random.key(i), seg, pos, None, rollout=ro, horizon=1))
        assert t.shape == (2, 6) and list(m.sum(1)) == [6, 3]   # row 1: doc 2 has 1 valid position, no doc 3
        for b in range(2):
            chosen = t[b][m[b]]
            assert list(chosen) == sorted(chosen) and len(set(chosen)) == len(chosen)
            docs = seg[b][chosen]
            for d in (1, 2, 3):
                assert (docs == d).sum() == min(2, int(((seg[b] == d) & (pos[b] >= 2)).sum()))
            counts[b, chosen] += 1
    # uniform within a document: 2 of its 4 valid positions each draw -> each chosen half the time
    for lo, hi in ((2, 6), (8, 12)):
        np.testing.assert_allclose(counts[0, lo:hi] / 400, 0.5, atol=0.1)
    assert counts[0, 14:16].tolist() == [400, 400] and counts[1, 12] == 400   # 2 valid of 2, 1 valid of 1
    per_row = dataclasses.replace(ro, docs_per_row=0)
    t, m = _select(jax.random.key(0), seg, pos, None, rollout=per_row, horizon=1)
    assert t.shape == (2, 2) and bool(m.all())


def test_word_starts_restrict_every_rule_to_the_allowed_tokens():
    """With `word_start_mask`, training's and evaluation's positions are drawn only where x_t is an allowed id,
    uniformly over those (400 keys), and a row without one gets no position."""
    from rlp_jax.rlp.positions import eval_positions, word_start_mask

    tokens = jnp.asarray([[5, 9, 7, 9, 3, 9, 9, 2, 9, 1, 9, 4], [5] * 12], jnp.int32)
    seg, pos = jnp.ones((2, 12), jnp.int32), jnp.tile(jnp.arange(12), (2, 1))
    allowed = word_start_mask(tokens, (9,))
    assert word_start_mask(tokens, ()) is None
    rollout = RolloutConfig(group_size=2, positions_per_doc=1, min_context=2)
    seen = np.zeros(12)
    for k in range(400):
        t, m = _select(jax.random.key(k), seg, pos, jnp.zeros((2, 12)), rollout, 1, allowed)
        assert bool(m[0, 0]) and not bool(m[1, 0])
        assert int(tokens[0, t[0, 0]]) == 9 and int(t[0, 0]) >= 2
        seen[int(t[0, 0])] += 1
    assert set(np.flatnonzero(seen)) == {3, 5, 6, 8, 10}                  # 9s at t >= 2: all of them drawn
    assert seen[[3, 5, 6, 8, 10]].min() > 400 / 5 * 0.6
    t, m = eval_positions(jax.random.key(0), seg, pos, rollout, 1, allowed)
    assert int(tokens[0, t[0, 0]]) == 9 and bool(m[0, 0]) and not bool(m[1, 0])


def _word_level_tokenizer(tmp_path, pieces):
    from tokenizers import Tokenizer, models

    from rlp_jax.data.tokenizer import load_tokenizer

    Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token=pieces[0])).save(
        str(tmp_path / "tokenizer.json"))
    return load_tokenizer(tmp_path / "tokenizer.json")


def test_word_starts_come_from_the_tokenizer_or_stop_in_one_line(tmp_path):
    from rlp_jax.rlp.config import RLPConfig
    from rlp_jax.rlp.think_ids import ThinkIdsError, think_ids

    rlp = RLPConfig(rollout=RolloutConfig(word_starts=True))
    tok = _word_level_tokenizer(tmp_path, ["<unk>", "a", "\u0120b", "\u01209", ",", "\u0120,", "\u0120"])
    assert think_ids(rlp, tok).word_starts == (2, 3)
    assert think_ids(RLPConfig(), tok).word_starts == ()
    (tmp_path / "p").mkdir()
    with pytest.raises(ThinkIdsError, match="word_starts=false"):
        think_ids(rlp, _word_level_tokenizer(tmp_path / "p", ["<unk>", ",", "."]))
