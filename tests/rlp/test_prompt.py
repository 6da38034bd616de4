"""The prompted setting: the prompt's shared context equals each sequence carrying its own copy of the
prompt (sampler, rewards, loss, gradients), and prompts render from a tokenizer's chat template."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from rlp_jax.data.tokenizer import HFTokenizer
from rlp_jax.model.dense import transformer
from rlp_jax.model.dense.config import ModelConfig
from rlp_jax.rlp import naive
from rlp_jax.rlp.config import (
    LossConfig,
    PromptConfig,
    RewardConfig,
    RLPConfig,
    RolloutConfig,
)
from rlp_jax.rlp.objective import SHARED_PREFIX, Objective
from rlp_jax.rlp.prompt import PromptError, prompt_text, render_prompt
from rlp_jax.rlp.rollout import thought_rollout
from rlp_jax.rlp.teacher import teacher_logprobs
from rlp_jax.rlp.think_ids import ThinkIds
from tests.rlp_cases import objective

CFG = ModelConfig.preset("tiny", vocab_size=48)
START, END = 1, 2
PROMPT = (40, 41, 42, 43, 44, 45, 46)
IDS = ThinkIds(start=START, end=END, prompt=PROMPT)     # what a tokenizer would render the prompt as


def _rlp(teacher_sees=False, ntp_weight=0.0):
    return RLPConfig(
        rollout=RolloutConfig(group_size=3, positions_per_doc=2, thought_len=5, min_context=2, temperature=1.0),
        reward=RewardConfig(horizon=2), loss=LossConfig(ntp_weight=ntp_weight),
        prompt=PromptConfig(style="text", teacher_sees=teacher_sees))


@pytest.fixture(scope="module")
def params():
    return transformer.init_params(CFG, jax.random.key(0), std=0.3)


@pytest.fixture(scope="module")
def batch():
    toks = jax.random.randint(jax.random.key(1), (2, 14), 3, 40)
    seg = jnp.array([[1] * 14, [1] * 6 + [2] * 8])
    pos = jnp.array([list(range(14)), list(range(6)) + list(range(8))])
    return {"tokens": toks, "segment_ids": seg, "positions": pos}


def _with_own_prompt(batch, prompt):
    """Every packed document of every row preceded by its own copy of the prompt (the naive layout)."""
    rows = []
    for toks, seg in zip(np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])):
        t_out, s_out, p_out = [], [], []
        for s in sorted(set(seg.tolist()) - {0}):
            doc = toks[seg == s].tolist()
            t_out += list(prompt) + doc
            s_out += [s] * (len(prompt) + len(doc))
            p_out += list(range(len(prompt) + len(doc)))
        rows.append((t_out, s_out, p_out))
    width = max(len(r[0]) for r in rows)
    pad = lambda x: x + [0] * (width - len(x))
    return {k: jnp.array([pad(r[i]) for r in rows]) for i, k in enumerate(("tokens", "segment_ids", "positions"))}


def test_context_forward_equals_prompt_prepended_to_every_document(params, batch):
    ctx = transformer.context_cache(params, CFG, PROMPT)
    got, _ = transformer.forward(params, CFG, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                           positions_bl=batch["positions"], context=ctx)
    long = _with_own_prompt(batch, PROMPT)
    ref, _ = transformer.forward(params, CFG, long["tokens"], segment_ids_bl=long["segment_ids"],
                           positions_bl=long["positions"])
    p = len(PROMPT)
    np.testing.assert_allclose(got[0], ref[0, p:p + 14], atol=2e-5)                      # one document
    np.testing.assert_allclose(got[1, :6], ref[1, p:p + 6], atol=2e-5)             # first packed document
    np.testing.assert_allclose(got[1, 6:], ref[1, 2 * p + 6:], atol=2e-5)          # second, its own prompt
    plain, _ = transformer.forward(params, CFG, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                             positions_bl=batch["positions"])
    assert float(jnp.abs(plain - got).max()) > 1e-2                                # the prompt matters


def test_prompted_sampler_equals_naive_sampler(params, batch):
    rlp = _rlp()
    t_bk = jnp.array([[3, 9], [4, 10]])
    ctx = transformer.context_cache(params, CFG, PROMPT)
    _, prefix = transformer.forward(params, CFG, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                              positions_bl=batch["positions"], return_cache=True, context=ctx)
    fast = jax.jit(thought_rollout, static_argnums=(1, 5, 6))(params, CFG, prefix, t_bk, jax.random.key(3), rlp.rollout,
                                                                 IDS)
    slow = jax.jit(naive.naive_thought_rollout, static_argnums=(1, 5, 6))(
        params, CFG, batch, t_bk, jax.random.key(3), rlp.rollout, IDS)
    np.testing.assert_array_equal(fast.tokens, slow.tokens)
    np.testing.assert_allclose(fast.logprobs, slow.logprobs, atol=1e-5)
    unprompted = jax.jit(naive.naive_thought_rollout, static_argnums=(1, 5, 6))(
        params, CFG, batch, t_bk, jax.random.key(3), rlp.rollout, dataclasses.replace(IDS, prompt=()))
    assert float(jnp.abs(unprompted.logprobs - slow.logprobs).max()) > 1e-3


def test_teacher_reads_the_prompt_only_when_asked(params, batch):
    ema = jax.tree.map(lambda x: x * 0.95, params)
    plain = teacher_logprobs(ema, CFG, batch)
    np.testing.assert_array_equal(teacher_logprobs(ema, CFG, batch, Objective(_rlp(), IDS).teacher_prompt), plain)
    seen = teacher_logprobs(ema, CFG, batch, Objective(_rlp(teacher_sees=True), IDS).teacher_prompt)
    ctx = transformer.context_cache(ema, CFG, PROMPT)
    logits, _ = transformer.forward(ema, CFG, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                              positions_bl=batch["positions"], context=ctx)
    want = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), batch["tokens"][:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(seen[:, 1:], want, atol=1e-5)
    assert float(jnp.abs(seen - plain).max()) > 1e-3


def test_prompted_objective_equals_naive(params, batch):
    rlp = _rlp(ntp_weight=0.5)
    t_bk = jnp.array([[3, 9], [4, 10]])
    ema_lp = jax.jit(teacher_logprobs, static_argnums=(1, 3))(jax.tree.map(lambda x: x * 0.95, params), CFG, batch,
                                                              Objective(rlp, IDS).teacher_prompt)

    @jax.jit
    def sample(params):
        ctx = transformer.context_cache(params, CFG, PROMPT)
        _, prefix = transformer.forward(params, CFG, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                                  positions_bl=batch["positions"], return_cache=True, context=ctx)
        return thought_rollout(params, CFG, prefix, t_bk, jax.random.key(4), rlp.rollout, IDS)

    thoughts = sample(params)
    step = lambda path, ids=IDS: jax.jit(lambda p: objective(p, batch, rlp, thoughts, t_bk, ema_lp, path=path, cfg=CFG,
                                                             ids=ids))(params)
    (f, g_f), (n, g_n) = step(SHARED_PREFIX), step(naive.NAIVE)
    m_f, m_n = f.metrics, n.metrics
    np.testing.assert_allclose(f.rewards, n.rewards, atol=1e-5)
    np.testing.assert_allclose(f.loss, n.loss, atol=1e-5)
    np.testing.assert_allclose(m_f["reward/s_pred"], m_n["reward/s_pred"], atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_n), strict=True):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(1.0, float(jnp.abs(b).max()))
    # The prompt changes S_pred (the policy reads it) but not the next-token term (plain text).
    m_plain = step(SHARED_PREFIX, dataclasses.replace(IDS, prompt=()))[0].metrics
    assert abs(float(m_plain["reward/s_pred"] - m_f["reward/s_pred"])) > 1e-3
    np.testing.assert_allclose(m_plain["loss/ntp"], m_f["loss/ntp"], atol=1e-6)


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _chat_tokenizer(tmp_path, template=CHATML):
    words = ["<|im_start|>", "<|im_end|>", "system", "user", "assistant", "\n", " ", "Think", "Continue", "the",
             "text", ".", "<think>", "</think>", "a", "b"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"\s|\.|\w+"), behavior="isolated")
    tok.add_special_tokens([tokenizers.AddedToken(w, special=True) for w in ("<|im_start|>", "<|im_end|>")])
    tok.save(str(tmp_path / "tokenizer.json"))
    return HFTokenizer(tmp_path, names={"eos_token": "<|im_end|>", "chat_template": template})


def test_chat_prompt_renders_the_tokenizers_template(tmp_path):
    tok = _chat_tokenizer(tmp_path)
    cfg = PromptConfig(style="chat", system="Think {think_start} {think_end}.", user="Continue the text.")
    assert prompt_text(cfg, tok) == ("<|im_start|>system\nThink <think> </think>.<|im_end|>\n"
                                     "<|im_start|>user\nContinue the text.<|im_end|>\n<|im_start|>assistant\n")
    ids = render_prompt(cfg, tok)
    assert ids[0] == tok.tok.token_to_id("<|im_start|>") and tok.think_start_id in ids
    assert render_prompt(PromptConfig(), tok) == ()
    assert prompt_text(dataclasses.replace(cfg, style="text"), tok) == "Think <think> </think>.\n\n"


def test_chat_prompt_without_template_is_a_one_line_error(tmp_path):
    tok = _chat_tokenizer(tmp_path, template=None)
    with pytest.raises(PromptError, match="style=text"):
        render_prompt(PromptConfig(style="chat"), tok)
    with pytest.raises(ValueError, match="rlp.prompt.style"):
        PromptConfig(style="chatml")
