"""Thought sampling: logit filters, marker masks, empirical distribution of the sampler, stopping,
behaviour log-probs and the branch layout (docs/method.md step 2)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rlp_jax.model.dense import transformer
from rlp_jax.model.dense.config import ModelConfig
from rlp_jax.model.sampling import filter_logits
from rlp_jax.rlp import naive
from rlp_jax.rlp import rollout as rollout_lib
from rlp_jax.rlp.config import RolloutConfig
from rlp_jax.rlp.rollout import (
    Thoughts,
    branch_tokens,
    thought_forward,
    thought_logits,
    thought_rollout,
)
from rlp_jax.rlp.think_ids import ThinkIds

SETTINGS = settings(max_examples=40, deadline=None)
V = 32
START, END = 1, 2
CFG = ModelConfig.preset("tiny", vocab_size=V)
L = 12


def _rollout_cfg(**kw):
    base = dict(group_size=4, positions_per_doc=1, thought_len=1, temperature=1.0, min_context=1)
    return RolloutConfig(**{**base, **kw})


IDS = ThinkIds(start=START, end=END)


def _init_params(seed=1, std=0.12):
    """Like `transformer.init_params` (normal(0, std) matrices, unit norms), drawn with numpy: eager
    `init_params` compiles one random kernel per parameter shape, which dominates this file's runtime.
    std = 0.12 makes the next-token softmax clearly non-uniform without being one-hot."""
    rng = np.random.RandomState(seed)

    def leaf(path, shape):
        if path[-1].key.endswith("norm"):
            return jnp.ones(shape, jnp.float32)
        return jnp.asarray(std * rng.randn(*shape), jnp.float32)

    shapes = transformer.param_shapes(CFG)
    params = jax.tree_util.tree_map_with_path(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple))
    assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(lambda k: transformer.init_params(CFG, k), jax.random.key(0)))
    return params


@pytest.fixture(scope="module")
def params():
    return _init_params()


@pytest.fixture(scope="module")
def docs():
    rng = np.random.RandomState(0)
    return jnp.asarray(rng.randint(3, V, (2, L)), jnp.int32)


@functools.partial(jax.jit, static_argnames=("rollout", "ids"))
def _rollout_packed(params, tokens, seg, pos, positions_bk, rng, rollout, ids=IDS):
    _, prefix = transformer.forward(params, CFG, tokens, segment_ids_bl=seg, positions_bl=pos, return_cache=True)
    return thought_rollout(params, CFG, prefix, positions_bk, rng, rollout, ids)


def _rollout(params, docs, positions_bk, rng, rollout, ids=IDS):
    seg, pos = transformer.default_segments(docs)
    return _rollout_packed(params, docs, seg, pos, positions_bk, rng, rollout, ids)


_forward = jax.jit(lambda p, seq: transformer.forward(p, CFG, seq[None])[0][0])


def _first_token_probs(params, doc, t, temperature=1.0, top_p=1.0):
    """Reference: softmax of the logits after the naive sequence [x_<t, <think>] (one full causal forward;
    the row is zero-padded to a fixed length, which cannot affect position t), markers banned as in slot 0.
    With top_p < 1: the renormalised nucleus."""
    seq = jnp.concatenate([doc[:t], jnp.array([START], jnp.int32), jnp.zeros(L - t, jnp.int32)])
    logits = np.asarray(_forward(params, seq)[t], np.float64) / temperature
    logits[[START, END]] = -np.inf
    p = np.exp(logits - logits.max())
    p /= p.sum()
    if top_p < 1.0:
        p = np.where(np.isin(np.arange(V), list(_nucleus(p, top_p))), p, 0.0)
        p /= p.sum()
    return p


def _nucleus(p, top_p):
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    return set(order[:int(np.searchsorted(cum, top_p)) + 1].tolist())


# ------------------------------------------------------------------------------------------------
# filter_logits
# ------------------------------------------------------------------------------------------------

def _naive_nucleus(logits, top_p):
    """The smallest set of most likely tokens whose mass reaches top_p, by sort + cumsum + search."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    n = int(np.searchsorted(cum, top_p)) + 1        # first index with cum >= top_p
    return set(order[:min(n, len(p))].tolist()), cum


def _kept(filtered):
    return set(np.nonzero(np.asarray(filtered) > -1e29)[0].tolist())


_filter = jax.jit(filter_logits, static_argnames=("top_k", "top_p"))


@SETTINGS
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([0.3, 0.5, 0.95]))
def test_top_p_is_smallest_nucleus(seed, top_p):
    rng = np.random.RandomState(seed)
    logits = (2.0 * rng.randn(3, 10)).astype(np.float32)
    out = np.asarray(_filter(logits, top_p=top_p))
    for row in range(3):
        want, cum = _naive_nucleus(logits[row].astype(np.float64), top_p)
        assume(np.min(np.abs(cum - top_p)) > 1e-4)   # no float ties at the boundary
        assert _kept(out[row]) == want
        kept = out[row] > -1e29
        np.testing.assert_array_equal(out[row][kept], logits[row][kept])   # survivors unchanged
        # minimality: the kept mass reaches top_p, and without its least likely token it does not
        p = np.exp(logits[row] - logits[row].max())
        p /= p.sum()
        assert p[kept].sum() >= top_p - 1e-6
        assert p[kept].sum() - p[kept].min() < top_p


def test_top_p_keeps_argmax():
    logits = jnp.array([[5.0, 0.0, 0.0, 0.0]])
    assert _kept(filter_logits(logits, top_p=0.01)[0]) == {0}
    assert _kept(filter_logits(logits, top_p=1.0)[0]) == {0, 1, 2, 3}


@SETTINGS
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([1, 3, 9]))
def test_top_k_keeps_k_largest(seed, k):
    rng = np.random.RandomState(seed)
    logits = rng.randn(3, 10).astype(np.float32)
    out = np.asarray(_filter(logits, top_k=k))
    for row in range(3):
        assert _kept(out[row]) == set(np.argsort(-logits[row])[:k].tolist())


@SETTINGS
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([3, 7]), st.sampled_from([0.5, 0.9]))
def test_top_k_then_top_p(seed, k, top_p):
    rng = np.random.RandomState(seed)
    logits = (2.0 * rng.randn(2, 10)).astype(np.float32)
    out = np.asarray(_filter(logits, top_k=k, top_p=top_p))
    for row in range(2):
        top = np.argsort(-logits[row])[:k]
        sub, cum = _naive_nucleus(logits[row][top].astype(np.float64), top_p)   # renormalised over the top k
        assume(np.min(np.abs(cum - top_p)) > 1e-4)
        assert _kept(out[row]) == {int(top[i]) for i in sub}


# ------------------------------------------------------------------------------------------------
# thought_logits
# ------------------------------------------------------------------------------------------------

def test_thought_logits_masks_and_temperature():
    rng = np.random.RandomState(0)
    raw = jnp.asarray(rng.randn(2, 3, V), jnp.float32)                 # [B, T, V]
    r = _rollout_cfg(temperature=0.5)
    out = np.asarray(thought_logits(raw, jnp.arange(3), r, IDS))
    assert np.all(out[..., START] < -1e29)                            # <think> banned in every slot
    assert np.all(out[:, 0, END] < -1e29)                             # </think> banned in slot 0 only
    np.testing.assert_allclose(out[:, 1:, END], np.asarray(raw)[:, 1:, END] / 0.5, rtol=1e-6)
    others = np.ones(V, bool)
    others[[START, END]] = False
    np.testing.assert_allclose(out[..., others], np.asarray(raw)[..., others] / 0.5, rtol=1e-6)
    # scalar slot
    out0 = np.asarray(thought_logits(raw[:, 0], 0, r, IDS))
    assert np.all(out0[:, END] < -1e29) and np.all(out0[:, START] < -1e29)
    out1 = np.asarray(thought_logits(raw[:, 0], 1, r, IDS))
    np.testing.assert_allclose(out1[:, END], np.asarray(raw)[:, 0, END] / 0.5, rtol=1e-6)


def test_banned_ids_are_never_sampled(params, docs):
    """The banned ids (rollout.banned_ids and, with ban_special_tokens, e.g. eos) are masked in every slot, in
    the sampler and the loss's logits alike; a thought of many slots at high temperature never contains one."""
    raw = jnp.zeros((1, 4, V), jnp.float32)
    out = np.asarray(thought_logits(raw, jnp.arange(4), _rollout_cfg(), dataclasses.replace(IDS, banned=(5, 7))))
    assert np.all(out[..., [5, 7]] < -1e29) and np.all(out[:, 1:, [6, END]] == 0.0)
    r = _rollout_cfg(group_size=64, positions_per_doc=2, thought_len=6, temperature=3.0)
    ban = tuple(range(3, V, 2))                                          # half the vocabulary
    free = _rollout(params, docs, jnp.asarray(POSITIONS), jax.random.key(3), r)
    th = _rollout(params, docs, jnp.asarray(POSITIONS), jax.random.key(3), r, dataclasses.replace(IDS, banned=ban))
    sampled = lambda t: set(np.asarray(t.tokens)[np.asarray(t.action_mask)].tolist())
    assert sampled(free) & set(ban)                                      # without the ban they do occur
    assert not sampled(th) & set(ban)


def test_train_bans_the_tokenizers_special_ids_on_request():
    from types import SimpleNamespace

    from rlp_jax.runs.config import load_experiment
    from rlp_jax.train.loop import objective_of

    # special ids: bos, eos, the markers and a chat-control token (50, e.g. <|im_start|>)
    tok = SimpleNamespace(think_start_id=10, think_end_id=11, eos_id=2, bos_id=1, pad_id=2, special_ids={1, 2, 10, 11, 50})
    cfg = load_experiment("smoke").config()
    assert cfg.rlp.rollout.ban_special_tokens   # the default
    ids = objective_of(cfg, tok).ids
    assert (ids.start, ids.end, ids.banned, ids.prompt) == (10, 11, (1, 2, 50), ())
    off = dataclasses.replace(cfg, rlp=dataclasses.replace(cfg.rlp, rollout=dataclasses.replace(
        cfg.rlp.rollout, ban_special_tokens=False, banned_ids=(7,))))
    assert objective_of(off, tok).ids.banned == (7,)
    on = dataclasses.replace(off, rlp=dataclasses.replace(off.rlp, rollout=dataclasses.replace(
        off.rlp.rollout, ban_special_tokens=True)))
    assert objective_of(on, tok).ids.banned == (1, 2, 7, 50)
    assert on.rlp.rollout.banned_ids == (7,)      # the setting itself is left as the user wrote it


# ------------------------------------------------------------------------------------------------
# Empirical distribution of the first thought token
# ------------------------------------------------------------------------------------------------

def _chi2(counts, probs, min_expected=5.0):
    """Pearson chi-square of counts against probs, pooling cells with small expectation; (stat, df)."""
    n = counts.sum()
    expected = n * probs
    big = expected >= min_expected
    obs = list(counts[big]) + [counts[~big].sum()]
    exp = list(expected[big]) + [expected[~big].sum()]
    obs, exp = np.array(obs, np.float64), np.array(exp, np.float64)
    if exp[-1] == 0:          # nothing pooled: drop the empty cell (a sample there is impossible: inf)
        if obs[-1] > 0:
            return float("inf"), len(obs) - 2
        obs, exp = obs[:-1], exp[:-1]
    stat = float(np.sum((obs - exp) ** 2 / np.maximum(exp, 1e-300)))
    return stat, len(obs) - 1


def _chi2_bound(df, z=5.0):
    """Wilson-Hilferty upper quantile of chi2(df) at ~z sigmas (p ~ 3e-7)."""
    a = 2.0 / (9.0 * df)
    return df * (1 - a + z * np.sqrt(a)) ** 3


POSITIONS = np.array([[3, 8], [5, 11]], np.int32)      # B = 2 documents, K = 2 positions


def test_first_token_distribution(params, docs):
    g = 2048
    r = _rollout_cfg(group_size=g, positions_per_doc=2, temperature=1.0)
    th = _rollout(params, docs, jnp.asarray(POSITIONS), jax.random.key(7), r)
    tokens = np.asarray(th.tokens[..., 0])                              # [B, K, G]
    assert np.all(np.asarray(th.action_mask[..., 0]))
    logp = np.asarray(th.logprobs[..., 0])
    rng = np.random.RandomState(1)
    for b in range(2):
        for k in range(2):
            t = int(POSITIONS[b, k])
            ref = _first_token_probs(params, docs[b], t)
            counts = np.bincount(tokens[b, k], minlength=V)
            assert counts[START] == 0 and counts[END] == 0
            stat, df = _chi2(counts, ref)
            bound = _chi2_bound(df)
            assert stat < bound, (b, k, stat, bound)
            np.testing.assert_allclose(logp[b, k], np.log(ref[tokens[b, k]]), atol=1e-4)
            # the same statistic rejects wrong samplers: temperature 0.7 and the uniform distribution
            wrong_t = _first_token_probs(params, docs[b], t, 0.7)
            allowed = np.ones(V)
            allowed[[START, END]] = 0
            for wrong in (wrong_t, allowed / allowed.sum()):
                fake = np.bincount(rng.choice(V, size=g, p=wrong), minlength=V)
                assert _chi2(fake, ref)[0] > bound, (b, k)
                assert _chi2(counts, wrong)[0] > _chi2_bound(_chi2(counts, wrong)[1])


def test_temperature_top_p_rollout(params, docs):
    """temperature 0.6, top_p 0.5: samples lie in the nucleus of the temperature-scaled reference and follow
    its renormalised distribution; behaviour log-probs are those of the untruncated distribution."""
    temperature, top_p, g = 0.6, 0.5, 2048
    r = _rollout_cfg(group_size=g, positions_per_doc=2, temperature=temperature, top_p=top_p)
    th = _rollout(params, docs, jnp.asarray(POSITIONS), jax.random.key(3), r)
    tokens = np.asarray(th.tokens[..., 0])
    logp = np.asarray(th.logprobs[..., 0])
    multi = 0
    for b in range(2):
        for k in range(2):
            t = int(POSITIONS[b, k])
            full = _first_token_probs(params, docs[b], t, temperature)
            nucleus = _nucleus(full, top_p)
            sampled = set(tokens[b, k].tolist())
            assert sampled <= nucleus, (sampled, nucleus)
            np.testing.assert_allclose(logp[b, k], np.log(full[tokens[b, k]]), atol=1e-4)
            if len(nucleus) > 1:
                multi += 1
                ref = _first_token_probs(params, docs[b], t, temperature, top_p)
                stat, df = _chi2(np.bincount(tokens[b, k], minlength=V), ref)
                assert stat < _chi2_bound(df), (b, k, stat)
                # an untempered sampler would be rejected
                wrong = _first_token_probs(params, docs[b], t, 1.0, top_p)
                fake = np.bincount(rng_choice(wrong, g), minlength=V)
                assert _chi2(fake, ref)[0] > _chi2_bound(df)
    assert multi >= 1      # the case exercises a nucleus of more than one token


def rng_choice(p, n, seed=0):
    return np.random.RandomState(seed).choice(len(p), size=n, p=p)


# One compiled rollout for the determinism, stopping and log-prob tests (compiles dominate the runtime).
SMALL = _rollout_cfg(group_size=8, thought_len=3, positions_per_doc=2, temperature=0.7, top_k=12, top_p=0.9)


def test_same_rng_same_thoughts(params, docs):
    pos = jnp.asarray(POSITIONS)
    a = _rollout(params, docs, pos, jax.random.key(11), SMALL)
    b = _rollout(params, docs, pos, jax.random.key(11), SMALL)
    c = _rollout(params, docs, pos, jax.random.key(12), SMALL)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    # thoughts of one group are not all copies of one another
    assert len({tuple(row) for row in np.asarray(a.tokens[0, 0]).tolist()}) > 1


# ------------------------------------------------------------------------------------------------
# Stopping
# ------------------------------------------------------------------------------------------------

def _with_end_logit(params, end_coord):
    """Tied embedding: give every row a large constant coordinate 0, so the (RMS-normed) final hidden state
    has a large positive coordinate 0; `</think>`'s coordinate then shifts its logit relative to all others."""
    embed = params["embed"].at[:, 0].set(1000.0).at[END, 0].set(end_coord)
    return {**params, "embed": embed}


def _check_end_logprob(p, docs, t, want_high):
    """Precondition: log p(</think>) after [x_<t, <think>, c_1, c_2] is ~0 (want_high) or < -100."""
    seq = jnp.concatenate([docs[0, :t], jnp.array([START, 5, 6], jnp.int32), jnp.zeros(L - t - 2, jnp.int32)])
    logits = _forward(p, seq)
    lp_end = np.asarray(jax.nn.log_softmax(logits[t:t + 3])[:, END])
    assert np.all(lp_end > -1e-3) if want_high else np.all(lp_end < -100), lp_end


def test_forced_end(params, docs):
    p = _with_end_logit(params, -1000.0)
    _check_end_logprob(p, docs, 6, want_high=False)
    th = _rollout(p, docs, jnp.asarray(POSITIONS), jax.random.key(0), SMALL)
    np.testing.assert_array_equal(np.asarray(th.lengths), 3)
    assert not np.any(np.asarray(th.ended))
    assert np.all(np.asarray(th.action_mask))
    tokens = np.asarray(th.tokens)
    assert not np.any((tokens == END) | (tokens == START))
    assert np.all(np.asarray(th.logprobs) < 0)


def test_early_stop(params, docs):
    p = _with_end_logit(params, 3000.0)
    _check_end_logprob(p, docs, 6, want_high=True)
    th = _rollout(p, docs, jnp.asarray(POSITIONS), jax.random.key(0), SMALL)
    assert np.all(np.asarray(th.ended))
    np.testing.assert_array_equal(np.asarray(th.lengths), 1)
    mask = np.asarray(th.action_mask)
    np.testing.assert_array_equal(mask, np.broadcast_to([True, True, False], mask.shape))
    tokens = np.asarray(th.tokens)
    assert np.all(tokens[..., 0] != END) and np.all(tokens[..., 0] != START)
    np.testing.assert_array_equal(tokens[..., 1], END)
    np.testing.assert_array_equal(tokens[..., 2:], 0)
    logp = np.asarray(th.logprobs)
    np.testing.assert_array_equal(logp[..., 2:], 0.0)
    assert np.all(logp[..., 1] > -1e-3)
    assert np.all(logp[..., 0] < 0)


def test_mixed_stopping(params, docs):
    """Some branches stop at slot 1, some at slot 2, some are forced: the loop must keep going for the live
    ones while the finished ones stay finished (no actions, tokens or log-probs after their `</think>`)."""
    p = _with_end_logit(params, 1000.15)    # `</think>` moderately boosted: ~half stop at slot 1 or 2
    th = _rollout(p, docs, jnp.asarray(POSITIONS), jax.random.key(2), SMALL)
    mask, tokens, logp = np.asarray(th.action_mask), np.asarray(th.tokens), np.asarray(th.logprobs)
    lengths, ended = np.asarray(th.lengths), np.asarray(th.ended)
    stop_slot = np.where(ended, lengths, -1)
    assert np.any(stop_slot == 1) and np.any(stop_slot == 2) and np.any(~ended), (stop_slot,)
    np.testing.assert_array_equal(mask, np.arange(3) < (lengths + ended)[..., None])   # a prefix of slots
    np.testing.assert_array_equal(tokens[~mask], 0)
    np.testing.assert_array_equal(logp[~mask], 0.0)
    assert np.all(logp[mask] < 0)
    is_end = tokens == END
    np.testing.assert_array_equal(is_end.any(-1), ended)
    np.testing.assert_array_equal(np.take_along_axis(is_end, np.minimum(lengths, 2)[..., None], -1)[..., 0]
                                  | ~ended, True)
    assert not np.any(is_end[..., 0])


# ------------------------------------------------------------------------------------------------
# Behaviour log-probs = recomputed log-probs (ratio 1 before an update)
# ------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("rollout",))
def _fast_forward(params, docs_tokens, seg, pos, positions_bk, thoughts, targets, rollout):
    _, prefix = transformer.forward(params, CFG, docs_tokens, segment_ids_bl=seg, positions_bl=pos, return_cache=True)
    return thought_forward(params, CFG, prefix, positions_bk, thoughts, targets, rollout, IDS)


_naive_forward = jax.jit(naive.naive_thought_forward, static_argnames=("cfg", "rollout", "ids"))


def test_behaviour_logprobs_are_recomputed(params, docs):
    # Row 0: two packed documents (6 + 6 tokens); row 1: one document with 2 padding tokens.
    seg = jnp.array([[1] * 6 + [2] * 6, [1] * 10 + [0] * 2], jnp.int32)
    pos = jnp.array([list(range(6)) * 2, list(range(10)) + [0, 0]], jnp.int32)
    positions_bk = jnp.array([[4, 9], [2, 9]], jnp.int32)
    r = SMALL
    th = _rollout_packed(params, docs, seg, pos, positions_bk, jax.random.key(5), r)
    targets = jnp.take_along_axis(docs, positions_bk, axis=1)[..., None]       # H = 1
    new_fast, _, _ = _fast_forward(params, docs, seg, pos, positions_bk, th, targets, r)
    batch = {"tokens": docs, "segment_ids": seg, "positions": pos}
    new_naive, _, _ = _naive_forward(params, CFG, batch, positions_bk, th, targets, r, IDS)
    mask = np.asarray(th.action_mask)
    old = np.asarray(th.logprobs)
    for new in (np.asarray(new_fast), np.asarray(new_naive)):
        ratio = np.exp(new - old)
        assert np.max(np.abs(ratio - 1.0)[mask]) < 1e-5
        np.testing.assert_array_equal(new[~mask], 0.0)
    np.testing.assert_array_equal(old[~mask], 0.0)
    # structural invariants of a rollout
    lengths, ended = np.asarray(th.lengths), np.asarray(th.ended)
    np.testing.assert_array_equal(mask.sum(-1), lengths + ended)
    assert np.all((lengths >= 1) & (lengths <= 3))
    tokens = np.asarray(th.tokens)
    assert not np.any(tokens == START)
    assert not np.any(tokens[..., 0] == END)
    np.testing.assert_array_equal(np.any(tokens == END, -1) & mask.any(-1), ended)
    np.testing.assert_array_equal(tokens[~mask], 0)


# ------------------------------------------------------------------------------------------------
# Branch layout
# ------------------------------------------------------------------------------------------------

def _hand_thoughts():
    # B = 1, K = 1, G = 2, T = 3. Thought 0 stopped itself after one token; thought 1 was forced.
    tokens = jnp.array([[[[5, END, 0], [5, 6, 7]]]], jnp.int32)
    mask = jnp.array([[[[True, True, False], [True, True, True]]]])
    return Thoughts(tokens=tokens, action_mask=mask, logprobs=jnp.zeros(tokens.shape),
                    lengths=jnp.array([[[1, 3]]], jnp.int32), ended=jnp.array([[[True, False]]]))


def test_branch_tokens_horizon_1():
    seq, idx = branch_tokens(_hand_thoughts(), jnp.array([[[9]]], jnp.int32), IDS)
    # H = 1: `</think>` predicts x_t, which is not fed (`.. x_{t+H-2}` is empty); padded to S = T + 2
    np.testing.assert_array_equal(np.asarray(seq), [[[START, 5, END, 0, 0], [START, 5, 6, 7, END]]])
    np.testing.assert_array_equal(np.asarray(idx), [[[2], [4]]])


def test_branch_tokens_horizon_2():
    seq, idx = branch_tokens(_hand_thoughts(), jnp.array([[[9, 10]]], jnp.int32), IDS)
    # `<think> c </think> x_t` (x_{t+1} is only a target), padded to S = T + 1 + H = 6
    np.testing.assert_array_equal(np.asarray(seq), [[[START, 5, END, 9, 0, 0], [START, 5, 6, 7, END, 9]]])
    np.testing.assert_array_equal(np.asarray(idx), [[[2, 3], [4, 5]]])


def test_branch_tokens_k2_groups():
    # K = 2 positions, G = 2: branch n = k * G + g carries the targets of position k
    th = _hand_thoughts()
    th2 = jax.tree.map(lambda x: jnp.concatenate([x, x], axis=1), th)          # lengths [1, 3, 1, 3]
    seq, idx = branch_tokens(th2, jnp.array([[[9], [11]]], jnp.int32), IDS)
    np.testing.assert_array_equal(np.asarray(seq)[0], [[START, 5, END, 0, 0], [START, 5, 6, 7, END],
                                                      [START, 5, END, 0, 0], [START, 5, 6, 7, END]])
    np.testing.assert_array_equal(np.asarray(idx)[0, :, 0], [2, 4, 2, 4])
    seq, idx = branch_tokens(th2, jnp.array([[[9, 10], [11, 12]]], jnp.int32), IDS)
    np.testing.assert_array_equal(np.asarray(seq)[0, :, 3], [9, 7, 11, 7])
    np.testing.assert_array_equal(np.asarray(seq)[0, :, 5], [0, 9, 0, 11])
    np.testing.assert_array_equal(np.asarray(idx)[0], [[2, 3], [4, 5], [2, 3], [4, 5]])


@pytest.mark.parametrize("chunk", [1, 2, 3, 8])
def test_chunked_scoring_equals_full_logits_with_gradients(params, chunk):
    # T = 3 thought slots scored in chunks (3 % 2 != 0 exercises the padding) against score_branches
    # on the full [B, N, S, V] logits: values and the gradient of a loss through both.
    th = _hand_thoughts()
    th = th.replace(logprobs=jnp.where(th.action_mask, -1.0, 0.0))
    targets = jnp.array([[[9, 10]]], jnp.int32)
    r = _rollout_cfg(group_size=2, thought_len=3)
    seq, idx = branch_tokens(th, targets, IDS)
    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.randn(1, 2, seq.shape[-1], CFG.hidden_size), jnp.float32)

    def loss(p, use_chunks):
        if use_chunks:
            out = rollout_lib.score_hidden(p, CFG, hidden, idx, th, targets, r, IDS, chunk=chunk)
        else:
            out = rollout_lib.score_branches(transformer.logits_from_hidden(p, CFG, hidden), idx, th, targets, r, IDS)
        return out[0].sum() + 0.5 * out[1].sum(), out

    (l_c, out_c), g_c = jax.value_and_grad(lambda p: loss(p, True), has_aux=True)(params)
    (l_f, out_f), g_f = jax.value_and_grad(lambda p: loss(p, False), has_aux=True)(params)
    for a, b in zip(out_c, out_f):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(l_c), float(l_f), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_f)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Sampling weights gathered once (model.sampler_weights)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "nemotron-h-tiny"])
def test_gathered_sampler_weights_sample_the_same_thoughts(preset):
    """sampler_weights="gathered" casts the weight matrices to the compute dtype once, before the token loop
    (and, on an fsdp mesh, gathers them there: tests/train/test_mesh.py): the same thoughts and log-probs, bit
    for bit, as casting them where each is used. float32 storage, bfloat16 compute: the casts are real. Also
    generation from prompts and its one-prompt stream, which read their weights the same way."""
    from rlp_jax.generate.generation import SamplingConfig, generate, stream
    from rlp_jax.model import family

    out = {}
    for weights in ("sharded", "gathered"):
        cfg = family.preset(preset, compute_dtype="bfloat16", sampler_weights=weights)
        params = family.init_params(cfg, jax.random.key(0))
        docs = jax.random.randint(jax.random.key(1), (2, 16), 3, 64)
        t_bk = jnp.asarray([[4, 10], [6, 12]], jnp.int32)

        @jax.jit
        def run(params, docs):
            _, prefix = family.forward(params, cfg, docs, return_cache=True, branch_positions_bk=t_bk)
            thoughts = thought_rollout(params, cfg, prefix, t_bk, jax.random.key(2), SMALL, IDS)
            text = generate(params, cfg, docs, jnp.asarray([16, 9]), jax.random.key(3),
                            SamplingConfig(max_new_tokens=4, temperature=0.8))
            return thoughts, text

        streamed = list(stream(params, cfg, [5, 9, 17], jax.random.key(4),
                               SamplingConfig(max_new_tokens=4, temperature=0.8)))
        out[weights] = run(params, docs) + (np.asarray(streamed),)
    assert np.asarray(out["sharded"][0].lengths).min() >= 1
    for a, b in zip(jax.tree.leaves(out["sharded"]), jax.tree.leaves(out["gathered"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
