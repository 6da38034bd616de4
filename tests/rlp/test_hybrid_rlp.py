"""The RLP step on a Nemotron-H hybrid (through `rlp_jax.model.family`): thoughts branched off the Mamba states at
their positions and the shared attention keys equal the naive path (every thought its own sequence) for the
sampled thoughts, rewards, advantages, the loss and every parameter's gradient; the EMA teacher's log-probs equal
the plain forward's; and `--experiment=web_mix` trains and resumes from a saved transformers NemotronH checkpoint.
The batch packs two documents into one row: each thought continues its own document only."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax.model import family
from rlp_jax.model.nemotron_h import hybrid
from rlp_jax.model.scoring import shifted_token_logprobs
from rlp_jax.rlp import naive
from rlp_jax.rlp.objective import SHARED_PREFIX
from rlp_jax.rlp.rollout import thought_rollout
from rlp_jax.rlp.teacher import teacher_logprobs
from tests.hf_models import tiny_nemotron_h
from tests.rlp_cases import (
    IDS,
    assert_grads_close,
    assert_same_thoughts,
    assert_steps_equal,
    objective,
    rlp_config,
)

L = 14
SEG_1 = [1] * 6 + [2] * 5 + [0] * 3           # row 1: two packed documents (the second across the chunk boundary
T_BK = jnp.array([[3, 9], [4, 9]])            # at 8), then padding; one position in each of them


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("nemotron_h_rlp")
    tiny_nemotron_h(seed=4).save_pretrained(path)
    cfg, params = family.from_hf(path)
    assert family.of(cfg).NAME == "nemotron_h" and {hybrid.MAMBA, hybrid.ATTENTION, hybrid.MLP} <= set(cfg.block_types)
    return cfg, jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def batch(model):
    cfg = model[0]
    toks = jax.random.randint(jax.random.key(1), (2, L), 3, cfg.vocab_size)
    seg = jnp.array([[1] * L, SEG_1])
    toks = jnp.where(seg > 0, toks, 0)
    pos = jnp.where(seg > 0, jnp.arange(L), 0)
    return {"tokens": toks, "segment_ids": seg, "positions": pos}


def _sample(cfg, params, batch, rlp, seed=5):
    _, prefix = family.forward(params, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"], return_cache=True,
                               branch_positions_bk=T_BK)
    return jax.jit(thought_rollout, static_argnums=(1, 5, 6))(params, cfg, prefix, T_BK, jax.random.key(seed),
                                                               rlp.rollout, IDS)


RLP = rlp_config(horizon=2, kl_beta=0.1, ntp_weight=0.3)   # every branch of the objective runs


def _step(cfg, params, batch, thoughts, *, path=SHARED_PREFIX):
    """(StepOut, grads) of the RLP objective on given thoughts."""
    ema_lp = jax.random.normal(jax.random.key(7), batch["tokens"].shape) - 3.0
    ref = jax.tree.map(lambda x: x * 0.9, params)
    return jax.jit(lambda p: objective(p, batch, RLP, thoughts, T_BK, ema_lp, ref, path=path, cfg=cfg))(params)


@pytest.fixture(scope="module")
def fast_step(model, batch):
    """The thoughts sampled for `RLP` and the branched float32 step on them (shared by two tests)."""
    cfg, params = model
    thoughts = _sample(cfg, params, batch, RLP)
    return thoughts, _step(cfg, params, batch, thoughts)


def test_branched_rlp_step_equals_the_naive_one(model, batch, fast_step):
    """Horizon 2, a KL term to a reference and the next-token term."""
    cfg, params = model
    thoughts, fast = fast_step
    assert_steps_equal(fast, _step(cfg, params, batch, thoughts, path=naive.NAIVE))
    mixers = [fast[1]["blocks"][i]["mixer"] for i, kind in enumerate(cfg.block_types) if kind == hybrid.MAMBA]
    assert all(float(jnp.abs(m["A_log"]).max()) > 1e-6 for m in mixers)   # the loss reaches the SSM decays


def test_bfloat16_compute_keeps_the_step_within_bfloat16_error(model, batch, fast_step):
    """model.compute_dtype=bfloat16: the residual stream and projections run in bfloat16 (hidden states come out
    bfloat16, logits float32), the Mamba scan in float32; the branched step's rewards and gradient stay within
    bfloat16 error of float32's (the same thoughts)."""
    cfg, params = model
    bf = cfg.replace(compute_dtype="bfloat16")
    hidden, _ = family.forward(params, bf, batch["tokens"], segment_ids_bl=batch["segment_ids"], return_hidden=True)
    assert hidden.dtype == jnp.bfloat16
    assert family.forward(params, bf, batch["tokens"])[0].dtype == jnp.float32
    thoughts, (out32, g32) = fast_step
    r32 = out32.rewards
    out16, g16 = _step(bf, params, batch, thoughts)
    r16 = out16.rewards
    np.testing.assert_allclose(r16, r32, atol=0.1)
    flat = lambda g: jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
    cos = float(flat(g16) @ flat(g32) / (jnp.linalg.norm(flat(g16)) * jnp.linalg.norm(flat(g32))))
    assert cos > 0.99, cos


def test_blockwise_attention_equals_dense(model, batch, fast_step):
    """model.attention=blockwise with 4-key blocks (documents of 14 tokens, thoughts of 5 slots): the prefix pass,
    the thoughts' forward and their token-by-token sampling read the attention blocks' keys block by block, with
    the dense step's thoughts, rewards, loss and gradient."""
    cfg, params = model
    blocky = cfg.replace(attention="blockwise", attention_block=4)
    thoughts, (out_d, g_d) = fast_step
    loss_d, r_d = out_d.loss, out_d.rewards
    resampled = _sample(blocky, params, batch, RLP)
    np.testing.assert_array_equal(resampled.tokens, thoughts.tokens)
    np.testing.assert_allclose(resampled.logprobs, thoughts.logprobs, atol=1e-5)
    out_b, g_b = _step(blocky, params, batch, thoughts)
    loss_b, r_b = out_b.loss, out_b.rewards
    np.testing.assert_allclose(r_b, r_d, atol=1e-5)
    np.testing.assert_allclose(loss_b, loss_d, atol=1e-5)
    assert_grads_close(g_b, g_d)


def test_sampler_equals_the_naive_sampler(model, batch):
    cfg, params = model
    rlp = rlp_config(t=6)
    fast = _sample(cfg, params, batch, rlp, seed=11)
    slow = jax.jit(naive.naive_thought_rollout, static_argnums=(1, 5, 6))(params, cfg, batch, T_BK,
                                                                           jax.random.key(11), rlp.rollout, IDS)
    assert_same_thoughts(fast, slow)
    assert int(fast.action_mask.sum()) > 2 * 2 * 3   # more than one token per thought


def test_teacher_logprobs_equal_the_plain_forward(model, batch):
    cfg, params = model
    got = teacher_logprobs(params, cfg, batch)
    want = shifted_token_logprobs(hybrid.forward(params, cfg, batch["tokens"], batch["segment_ids"]), batch["tokens"])
    real = np.asarray(batch["segment_ids"] > 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)


def test_missing_branch_positions_and_prompts_are_refused_in_one_line(model, batch):
    cfg, params = model
    with pytest.raises(ValueError, match="branch_positions_bk"):
        family.forward(params, cfg, batch["tokens"], return_cache=True)
    with pytest.raises(ValueError, match="prompt"):
        family.context_cache(params, cfg, [5, 6])


def _tokenizer(folder: Path, texts, vocab: int):
    """A byte-pair tokenizer of exactly `vocab` tokens (the think markers come on top) saved into folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<|endoftext|>"]))
    assert tok.get_vocab_size() == vocab
    tok.save(str(folder / "tokenizer.json"))


def test_web_mix_trains_from_a_nemotron_h_checkpoint_and_restores(tmp_path):
    """The user's command: `--experiment=web_mix --set model.init_from=<NemotronH folder>`, shrunk to CPU size; then
    `export` of the trained run, which transformers loads with the same logits."""
    folder, data, work = tmp_path / "nemotron_h", tmp_path / "data", tmp_path / "run"
    folder.mkdir()
    data.mkdir()
    texts = [f"the number {i} follows {i - 1} and comes before {i + 1} in the list" for i in range(300)]
    _tokenizer(folder, texts, 128)
    tiny_nemotron_h(seed=2).save_pretrained(folder)
    (data / "web.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    root = Path(__file__).resolve().parents[2]
    sources = json.dumps([{"path": str(data / "web.jsonl"), "weight": 1.0}])

    def train(steps: int):
        args = [sys.executable, "-m", "rlp_jax.train", "--experiment=web_mix", f"--workdir={work}",
                "--set", f"model.init_from={folder}", "--set", f"data.sources={sources}",
                "--set", "data.seq_len=32", "--set", "data.batch_size=2", "--set", "data.eval_fraction=0.2",
                "--set", "rlp.rollout.group_size=2", "--set", "rlp.rollout.thought_len=4",
                "--set", "rlp.rollout.min_context=8", "--set", f"train.steps={steps}", "--set", "train.save_every=1",
                "--set", "train.eval_batches=1", "--set", "optim.lr=1e-3"]
        res = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        return res

    train(2)
    res = train(2)    # a second start restores the hybrid's state from its record and checkpoint, then stops
    assert "resumed from" in res.stdout and "at step 2" in res.stdout and "nothing to do" in res.stdout
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(r["loss/total"]) and r["thought/mean_len"] > 0 for r in steps)
    assert any("eval/info_gain" in r and np.isfinite(r["eval/info_gain"]) for r in rows)
    record = json.loads((work / "config.json").read_text())
    assert record["model_full"]["block_types"][:2] == ["linear_attention", "full_attention"]
    from rlp_jax.runs.loading import load_run_params

    cfg, trained, step, _ = load_run_params(work)
    _, start = family.from_hf(folder)
    assert family.of(cfg).NAME == "nemotron_h" and step == 2 and cfg.vocab_size == 130     # 128 + the two think markers
    moved = [float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(start))
             if a.shape == b.shape]
    assert max(moved) > 1e-4   # RLP updated the pretrained weights
    # the trained run exports as a NemotronHForCausalLM folder with the same logits in transformers
    import torch
    import transformers

    from rlp_jax.export import export

    out = export(work, tmp_path / "exported")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    toks = np.random.RandomState(0).randint(0, cfg.vocab_size, size=(2, 12))
    with torch.no_grad():
        want = theirs(torch.as_tensor(toks)).logits.numpy()
    got = np.asarray(family.forward(trained, cfg.replace(compute_dtype="float32"), jnp.asarray(toks))[0])   # web_mix: bf16
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-4
