"""Hugging Face Hub ids wherever a checkpoint is named, through huggingface_hub's cache: a model cached in
the Hub's own layout loads by its id with HF_HUB_OFFLINE=1 (train, evaluate, lm-eval, plan all resolve
names through `rlp_jax.fetch.resolve`); one that is not cached is a one-line error."""

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax.fetch import FetchError, resolve
from rlp_jax.fetch.hub import is_hub_id
from rlp_jax.model.dense import transformer
from rlp_jax.runs.loading import load_model
from tests.gguf_files import bpe_vocab
from tests.hf_models import hf_logits, make_hf_model

ROOT = Path(__file__).resolve().parents[2]
REPO, COMMIT = "tiny-org/tiny-qwen3", "0123456789abcdef0123456789abcdef01234567"


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer.json over `bpe_vocab`, saved as transformers saves one."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = bpe_vocab(96)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=tokens[-1]).save_pretrained(folder)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """HF_HUB_CACHE holding REPO at COMMIT in the Hub's cache layout (models--owner--name/{refs,snapshots})."""
    cache = tmp_path_factory.mktemp("hub")
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    snap = repo_dir / "snapshots" / COMMIT
    model = make_hf_model("qwen3", tied=True)
    model.save_pretrained(snap)
    write_tokenizer(snap)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return cache, snap, model


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """The Hub library reading only its cache (its constants are read at import: patched there too)."""
    from huggingface_hub import constants

    cache = hub_cache[0]
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def test_an_id_loads_from_the_hub_cache_offline(offline):
    _, snap, model = offline
    assert is_hub_id(REPO) and not is_hub_id("runs") and not is_hub_id("/abs/path/x")
    assert Path(resolve(REPO)) == snap and Path(resolve(f"{REPO}@main")) == snap
    lm = load_model(REPO)
    assert lm.source == "hf" and Path(lm.path) == snap
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12))
    logits, _ = transformer.forward(lm.params, lm.cfg, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits)[..., : model.config.vocab_size], hf_logits(model, tokens),
                               rtol=1e-4, atol=1e-4)


def test_an_uncached_id_is_one_line(offline):
    with pytest.raises(FetchError, match="neither a local path nor in the Hugging Face cache"):
        resolve("tiny-org/not-there")


def test_the_cli_takes_an_id(offline, tmp_path):
    cache = offline[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "rlp_jax.generate", "--checkpoint", REPO, "--prompt", "ab",
                         "--max_new_tokens", "3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "rlp_jax.plan", "--experiment=smoke",
                          "--set", "model.init_from=tiny-org/not-there", "--devices=cpu"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "Hugging Face cache" in bad.stderr
