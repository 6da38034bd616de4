"""think_eval against the naive reference: every reading of x_t (no thought, the empty-thought control,
sampled and greedy thoughts) equals a full causal forward of the explicit sequence `x_<t <think> c </think> x_t`;
the host-side summaries on a hand-computed case; evaluation positions that do not depend on the model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax.data import modsum
from rlp_jax.data.tokenizer import load_tokenizer
from rlp_jax.evaluate import modsum as modsum_eval
from rlp_jax.model import family
from rlp_jax.model.dense.config import ModelConfig
from rlp_jax.rlp.config import RLPConfig, RolloutConfig
from rlp_jax.rlp.objective import Objective
from rlp_jax.rlp.think_eval import (
    bootstrap_ci,
    evaluate_thoughts_jit,
    per_position,
    summarize,
)
from rlp_jax.rlp.think_ids import ThinkIds, think_ids

V, START, END, L, PAD = 32, 1, 2, 24, 24
CFG = ModelConfig.preset("tiny", vocab_size=V)
ROLLOUT = RolloutConfig(group_size=3, thought_len=4, temperature=0.7, min_context=1)
OBJECTIVE = Objective(RLPConfig(rollout=ROLLOUT), ThinkIds(start=START, end=END))


def _params(seed):
    rng = np.random.RandomState(seed)
    shapes = family.param_shapes(CFG)
    return jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.ones(s, jnp.float32) if p[-1].key.endswith("norm") else jnp.asarray(0.3 * rng.randn(*s), jnp.float32),
        shapes, is_leaf=lambda x: isinstance(x, tuple))


_full = jax.jit(lambda p, seq: family.forward(p, CFG, seq[None])[0][0].astype(jnp.float32))   # [PAD, V]


def _after(params, seq):
    """log-softmax of the logits after the explicit sequence `seq` (zero-padded to PAD: causal, so unread)."""
    logits = _full(params, jnp.asarray(list(seq) + [0] * (PAD - len(seq)), jnp.int32))
    return np.array(jax.nn.log_softmax(logits[len(seq) - 1]))


@pytest.fixture(scope="module")
def case():
    params = _params(3)
    tokens = np.random.RandomState(0).randint(3, V, (2, 10)).astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens), "positions": np.tile(np.arange(10), (2, 1))}
    t_bk = np.array([[4, 7], [2, 9]], np.int32)
    ev = evaluate_thoughts_jit(params, CFG, OBJECTIVE, batch, t_bk, jax.random.key(5))
    return params, tokens, t_bk, jax.device_get(ev)


def test_every_reading_is_the_explicit_sequence(case):
    params, tokens, t_bk, ev = case
    for b, k in np.ndindex(*t_bk.shape):
        t = int(t_bk[b, k])
        ctx, x_t = list(tokens[b, :t]), int(tokens[b, t])
        none = _after(params, ctx)
        np.testing.assert_allclose(ev.lp_none[b, k], none[x_t], atol=2e-5)
        assert ev.hit_none[b, k] == (np.argmax(none) == x_t)
        empty = _after(params, ctx + [START, END])       # the format control: markers and nothing between
        np.testing.assert_allclose(ev.lp_empty[b, k], empty[x_t], atol=2e-5)
        assert ev.hit_empty[b, k] == (np.argmax(empty) == x_t)
        for g in range(ROLLOUT.group_size):
            n = int(ev.sampled.lengths[b, k, g])
            c = list(ev.sampled.tokens[b, k, g, :n])
            got = _after(params, ctx + [START] + c + [END])
            np.testing.assert_allclose(ev.lp_sampled[b, k, g], got[x_t], atol=2e-5)
            assert ev.hit_sampled[b, k, g] == (np.argmax(got) == x_t) and ev.top_sampled[b, k, g] == np.argmax(got)


def test_the_greedy_thought_takes_the_most_likely_allowed_token_each_slot(case):
    params, tokens, t_bk, ev = case
    for b, k in np.ndindex(*t_bk.shape):
        t = int(t_bk[b, k])
        ctx, x_t = list(tokens[b, :t]), int(tokens[b, t])
        seq, thought = ctx + [START], []
        for slot in range(ROLLOUT.thought_len):
            lp = _after(params, seq)
            lp[START] = -np.inf
            if slot == 0:
                lp[END] = -np.inf
            tok = int(np.argmax(lp))
            if tok == END:
                break
            thought.append(tok)
            seq.append(tok)
        n = int(ev.greedy.lengths[b, k, 0])
        assert list(ev.greedy.tokens[b, k, 0, :n]) == thought
        np.testing.assert_allclose(ev.lp_greedy[b, k], _after(params, ctx + [START] + thought + [END])[x_t], atol=2e-5)


def test_summaries_on_a_hand_computed_case():
    ev = dataclasses.make_dataclass("Ev", ["positions", "lp_none", "lp_empty", "lp_sampled", "lp_greedy", "hit_none",
                                           "hit_empty", "hit_sampled", "hit_greedy", "sampled"])(
        positions=np.array([[3], [5]]), lp_none=np.array([[-2.0], [-1.0]]), lp_empty=np.array([[-3.0], [-1.5]]),
        lp_sampled=np.array([[[-0.5, -1.5]], [[-4.0, -2.0]]]), lp_greedy=np.array([[-0.4], [-2.0]]),
        hit_none=np.array([[False], [True]]), hit_empty=np.array([[False], [False]]),
        hit_sampled=np.array([[[True, False]], [[False, False]]]), hit_greedy=np.array([[True], [False]]),
        sampled=dataclasses.make_dataclass("Th", ["lengths", "ended"])(np.array([[[2, 4]], [[3, 3]]]),
                                                                         np.array([[[True, False]], [[True, True]]])))
    rows = per_position(ev, np.array([[True], [True]]), thought_ok_bkg=np.array([[[True, False]], [[False, True]]]))
    s = summarize(rows)
    # think log-probs per position: -1.0 and -3.0; none: -2, -1; empty: -3, -1.5
    assert s["info_gain"] == pytest.approx(((-1.0 + 2.0) + (-3.0 + 1.0)) / 2)            # -0.5
    assert s["info_gain_vs_empty"] == pytest.approx(((-1.0 + 3.0) + (-3.0 + 1.5)) / 2)   # +0.25
    assert s["acc_think"] == pytest.approx(0.25) and s["acc_no_think"] == pytest.approx(0.5)
    assert s["acc_greedy"] == pytest.approx(0.5) and s["acc_empty"] == 0.0
    assert s["nll_correct_thought"] == pytest.approx((0.5 + 2.0) / 2)
    assert s["nll_wrong_thought"] == pytest.approx((1.5 + 4.0) / 2)
    assert s["thought_ok"] == pytest.approx(0.5) and s["thought_len"] == pytest.approx(3.0)
    assert s["ended"] == pytest.approx(0.75)
    assert list(rows["position"]) == [3, 5]


def test_bootstrap_ci_covers_the_mean_and_narrows_with_n():
    x = np.random.RandomState(0).normal(1.0, 2.0, 400)
    m, lo, hi = bootstrap_ci(x)
    assert lo < m < hi and m == pytest.approx(x.mean())
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / 20, rel=0.15)


def test_evaluation_positions_do_not_depend_on_the_model(tmp_path):
    tok = load_tokenizer(modsum.train_tokenizer(tmp_path / "tok"))
    cfg = CFG.replace(vocab_size=tok.vocab_size)
    docs = modsum.generate_documents(6, seed=0, mix=modsum.CONTINUATION_MIX)
    rlp = RLPConfig(rollout=dataclasses.replace(ROLLOUT, min_context=4))
    ro = Objective(rlp, think_ids(rlp, tok))
    a, b = (modsum_eval.uniform_rows(family.init_params(cfg, jax.random.key(s)), cfg, tok, docs, ro, 48,
                                     jax.random.key(9)) for s in (0, 1))
    assert list(a["position"]) == list(b["position"])
    assert not np.allclose(a["lp_none"], b["lp_none"])   # different models, scored at the same places
    assert all(4 <= p < len(d.words) + 1 for p, d in zip(a["position"], docs))
    ans = modsum_eval.answer_rows(family.init_params(cfg, jax.random.key(0)), cfg, tok, docs, ro, 48, jax.random.key(9))
    assert list(ans["position"]) == [d.answer_index for d in docs]
