"""`python -m rlp_jax.export`: a trained run (and a Hugging Face dir) exported loads in transformers with
the same logits and a tokenizer that encodes exactly as the one the run trained with; errors are one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax import export as export_mod
from rlp_jax.data.corpus import generate_documents
from rlp_jax.data.tokenizer import (
    THINK_TOKENS,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from rlp_jax.export import PROBES, export, main, sentencepiece_to_hf
from rlp_jax.model.dense import hf
from rlp_jax.model.dense import transformer
from rlp_jax.runs.loading import load_model, load_run_params
from tests.hf_models import hf_logits, make_hf_model, torch, transformers
from tests.train.train_cases import ANY_LENGTH

ROOT = Path(__file__).resolve().parents[1]
# Texts beyond the corpus: markers anywhere, leading/trailing/double spaces, digits, punctuation, and
# characters outside the vocabulary (byte fallback).
EXTRA = list(PROBES) + ["<think>x", " <think> a</think>b", "x  y ", " ", "", "12345 67.8",
                        "\u00e9\u00e8 \u4e2d\u6587 \U0001f600"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step smoke RLP run with checkpoints at steps 1 and 2 (its sentencepiece tokenizer in data/)."""
    workdir = tmp_path_factory.mktemp("run")
    sets = ["train.steps=2", "train.save_every=1", "train.eval_every=0", "train.plot=false",
            "rlp.rollout.thought_len=4", "rlp.rollout.group_size=2", ANY_LENGTH]
    cmd = [sys.executable, "-m", "rlp_jax.train", "--experiment=smoke", f"--workdir={workdir}"]
    cmd += [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return workdir


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    return export(run_dir, tmp_path_factory.mktemp("export") / "hf")


def test_logits_match_transformers(run_dir, exported):
    lm = load_model(run_dir)
    cfg_json = json.loads((exported / "config.json").read_text())
    assert cfg_json["vocab_size"] == lm.cfg.vocab_size == lm.params["embed"].shape[0] == lm.tokenizer.vocab_size
    gen = json.loads((exported / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (lm.tokenizer.bos_id, lm.tokenizer.eos_id)
    docs = generate_documents(3, seed=1)
    tokens = np.array([lm.tokenizer.encode(d + " <think> so </think> ok")[:24] for d in docs], np.int32)  # [B, L]
    ours, _ = transformer.forward(lm.params, lm.cfg, jnp.asarray(tokens))
    ref = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert ref.generation_config.eos_token_id == lm.tokenizer.eos_id
    np.testing.assert_allclose(np.asarray(ours), hf_logits(ref, tokens), rtol=0, atol=1e-4)


def test_tokenizer_encodes_like_sentencepiece(run_dir, exported):
    ours = load_model(run_dir).tokenizer
    assert isinstance(ours, SentencePieceTokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(exported)
    reloaded = load_tokenizer(exported)  # rlp_jax reading the export back (tokenizer.json)
    assert isinstance(reloaded, HFTokenizer)
    assert theirs.convert_tokens_to_ids(list(THINK_TOKENS)) == [ours.think_start_id, ours.think_end_id]
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert {ours.think_start_id, ours.think_end_id} <= set(theirs.all_special_ids)
    for text in generate_documents(200, seed=3) + EXTRA:
        ids = ours.encode(text)
        assert theirs.encode(text) == ids, text
        assert reloaded.encode(text) == ids, text
        assert theirs.decode(ids) == ours.decode(ids) == text, text
    assert any(ours.sp.is_byte(i) for i in ours.encode(EXTRA[-1]))  # byte fallback was exercised
    # The one documented difference: a text that is exactly a marker. sentencepiece puts its dummy prefix
    # "▁" before it; the exported tokenizer gives the marker alone.
    assert ours.encode("<think>")[1:] == theirs.encode("<think>") == [ours.think_start_id]


@pytest.mark.parametrize("variant", ["unigram", "no_markers"])
def test_other_sentencepiece_models_convert_exactly(tmp_path, variant):
    """A unigram model, and a BPE model without the markers (ids V, V+1, split out of the text)."""
    docs = generate_documents(300, seed=0)
    kwargs = {"model_type": "unigram"} if variant == "unigram" else {"user_defined_symbols": ()}
    ours = SentencePieceTokenizer(train_sentencepiece(docs, tmp_path / "sp", vocab_size=400, **kwargs))
    assert ours.num_added_tokens == (2 if variant == "no_markers" else 0)
    theirs = sentencepiece_to_hf(ours)
    for text in generate_documents(100, seed=4) + EXTRA:
        assert theirs.encode(text, add_special_tokens=False).ids == ours.encode(text), text
    assert theirs.token_to_id("</think>") == ours.think_end_id


def test_ema_and_bfloat16_exports(run_dir, tmp_path):
    out = export(run_dir, tmp_path / "ema", which="ema")
    _, want, _, _ = load_run_params(run_dir, which="ema")
    _, got = hf.from_hf(out)
    policy = load_model(run_dir).params
    for a, b, p in zip(*(jax.tree.leaves(t) for t in (want, got, policy))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not all(np.array_equal(a, p) for a, p in zip(jax.tree.leaves(want), jax.tree.leaves(policy)))

    out = export(run_dir, tmp_path / "bf16", dtype="bfloat16")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert ref.dtype == torch.bfloat16
    embed = np.asarray(load_model(run_dir).params["embed"].astype(jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(ref.model.embed_tokens.weight.detach().float().numpy(), embed)


def test_hf_dir_round_trip(tmp_path):
    """A Hugging Face dir (96-row embedding, 100-token tokenizer.json) exports with the markers at ids 100, 101."""
    import tokenizers

    src = tmp_path / "in"
    ref = make_hf_model("qwen3")
    ref.save_pretrained(src)
    words = ["<pad>", "<unk>", "</s>"] + [f"w{i}" for i in range(3, 100)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    out = export(src, tmp_path / "out")
    cfg, params = hf.from_hf(out)
    assert cfg.vocab_size == params["embed"].shape[0] == 102
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.random.RandomState(0).randint(0, 96, size=(2, 10))
    np.testing.assert_allclose(hf_logits(reloaded, tokens)[..., :96], hf_logits(ref, tokens), rtol=0, atol=1e-5)
    theirs, ours = transformers.AutoTokenizer.from_pretrained(out), load_tokenizer(src)
    text = "w5 <think> w7 w8 </think> w9"
    assert theirs.encode(text) == ours.encode(text) == [5, 100, 7, 8, 101, 9]
    assert theirs.eos_token_id == 2


def _cli(*args):
    try:
        return main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        return e.code


def test_errors_are_one_line_and_leave_out_intact(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    cases = [(("--checkpoint", tmp_path / "missing", "--out", tmp_path / "o1"), "does not exist"),
             (("--checkpoint", bad, "--out", tmp_path / "o2"), "is not valid JSON"),
             (("--checkpoint", tmp_path, "--out", tmp_path / "o2"), "neither an rlp_jax run"),
             (("--checkpoint", run_dir, "--out", out), "exists and is not empty; pass --force"),
             (("--checkpoint", run_dir, "--out", tmp_path / "o3", "--dtype", "fp8"), "dtype must be one of"),
             (("--checkpoint", run_dir, "--out", run_dir, "--force"), "would replace the checkpoint"),
             (("--checkpoint", run_dir, "--out", out, "--force", "--step", "7"), "7"),
             (("--checkpoint", run_dir, "--out", out, "--which", "teacher"), "invalid choice")]
    for args, message in cases:
        assert _cli(*args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)

    def fail(*args, **kwargs):  # fails halfway through writing (to_hf creates its folder)
        Path(args[2]).mkdir(parents=True, exist_ok=True)
        Path(args[2], "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export_mod.family, "to_hf", fail)
    assert _cli("--checkpoint", run_dir, "--out", out, "--force") == 2
    assert "disk full" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "out"]
    monkeypatch.undo()
    assert _cli("--checkpoint", run_dir, "--out", out, "--force") == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
