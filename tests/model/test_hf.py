"""Hugging Face interop: our forward equals transformers' for Qwen3 / Qwen2 / Llama; to_hf round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax.model.dense import hf
from rlp_jax.model.dense import transformer
from rlp_jax.model.safetensors_io import CheckpointError
from tests.hf_models import hf_logits, make_hf_model, torch

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def _padded_batch(vocab, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, size=(3, 12)).astype(np.int32)
    lengths = np.array([12, 7, 3])
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    return tokens, mask


def _rel_err(ours, ref, mask):
    sel = mask.astype(bool)
    return np.abs(ours[sel] - ref[sel]).max() / np.abs(ref[sel]).max()


@pytest.mark.parametrize("family,tied,extra", [
    ("qwen3", False, {}), ("qwen3", True, {}), ("qwen2", False, {}), ("llama", False, {}),
    ("llama", True, {"rope_scaling": LLAMA3_SCALING}),
])
def test_logits_match_transformers(tmp_path, family, tied, extra):
    ref_model = make_hf_model(family, tied=tied, **extra)
    ref_model.save_pretrained(tmp_path)
    cfg, params = hf.from_hf(tmp_path)
    assert all(type(leaf) is np.ndarray for leaf in jax.tree.leaves(params))   # host arrays: no device holds it all
    assert cfg.tie_word_embeddings == tied
    assert cfg.qk_norm == (family == "qwen3") and cfg.attention_bias == (family == "qwen2")
    tokens, mask = _padded_batch(cfg.vocab_size)
    ref = hf_logits(ref_model, tokens, mask)
    ours, _ = transformer.forward(params, cfg, jnp.asarray(tokens), segment_ids_bl=jnp.asarray(mask))
    assert _rel_err(np.asarray(ours), ref, mask) <= 1e-4


def test_to_hf_round_trip_loads_in_transformers(tmp_path):
    ref_model = make_hf_model("qwen3")
    ref_model.save_pretrained(tmp_path / "in")
    cfg, params = hf.from_hf(tmp_path / "in")
    hf.to_hf(params, cfg, tmp_path / "out")
    reloaded = type(ref_model).from_pretrained(tmp_path / "out").eval()
    tokens, mask = _padded_batch(cfg.vocab_size, seed=1)
    np.testing.assert_allclose(hf_logits(reloaded, tokens, mask), hf_logits(ref_model, tokens, mask),
                               rtol=0, atol=1e-6)
    cfg2, params2 = hf.from_hf(tmp_path / "out")
    assert cfg2 == cfg
    source, out = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("in", "out"))
    assert out["max_position_embeddings"] == source["max_position_embeddings"] == cfg.max_position_embeddings
    for a, b in zip(*(map(np.asarray, __import__("jax").tree.leaves(p)) for p in (params, params2))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_to_hf_other_families(tmp_path, family):
    ref_model = make_hf_model(family)
    ref_model.save_pretrained(tmp_path / "in")
    cfg, params = hf.from_hf(tmp_path / "in")
    hf.to_hf(params, cfg, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [type(ref_model).__name__]
    reloaded = type(ref_model).from_pretrained(tmp_path / "out").eval()
    tokens, mask = _padded_batch(cfg.vocab_size, seed=2)
    np.testing.assert_allclose(hf_logits(reloaded, tokens, mask), hf_logits(ref_model, tokens, mask), atol=1e-6)


def test_bf16_checkpoint(tmp_path):
    ref_model = make_hf_model("qwen3", dtype=torch.bfloat16)
    ref_model.save_pretrained(tmp_path)
    cfg, params = hf.from_hf(tmp_path)
    assert cfg.param_dtype == "bfloat16" and params["embed"].dtype == jnp.bfloat16
    ref_w = ref_model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"], np.float32), ref_w)
    # Loaded as float32 on request, the logits equal transformers' run in float32 on the same weights.
    cfg32, params32 = hf.from_hf(tmp_path, param_dtype="float32")
    tokens, mask = _padded_batch(cfg.vocab_size, seed=3)
    ref = hf_logits(ref_model.float(), tokens, mask)
    ours, _ = transformer.forward(params32, cfg32, jnp.asarray(tokens), segment_ids_bl=jnp.asarray(mask))
    assert _rel_err(np.asarray(ours), ref, mask) <= 1e-4
    # bf16 export reloads in transformers with identical weights.
    hf.to_hf(params, cfg, tmp_path / "out")
    reloaded = type(ref_model).from_pretrained(tmp_path / "out")
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(reloaded.model.embed_tokens.weight.detach().float().numpy(), ref_w)


def test_sharded_index(tmp_path):
    ref_model = make_hf_model("qwen3")
    ref_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    cfg, params = hf.from_hf(tmp_path)
    tokens, mask = _padded_batch(cfg.vocab_size, seed=4)
    ours, _ = transformer.forward(params, cfg, jnp.asarray(tokens), segment_ids_bl=jnp.asarray(mask))
    assert _rel_err(np.asarray(ours), hf_logits(ref_model, tokens, mask), mask) <= 1e-4


def test_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        hf.from_hf(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json"):
        hf.from_hf(tmp_path)
    ref_model = make_hf_model("qwen3")
    ref_model.save_pretrained(tmp_path / "ok")
    cfg_json = json.loads((tmp_path / "ok" / "config.json").read_text())

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(cfg_json))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        hf.from_hf(pickled)

    bad_arch = tmp_path / "gpt2"
    bad_arch.mkdir()
    (bad_arch / "config.json").write_text(json.dumps({**cfg_json, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="unsupported architecture.*GPT2LMHeadModel"):
        hf.from_hf(bad_arch)

    # A checkpoint whose config claims more layers than it holds names the missing tensor.
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg_json, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.2"):
        hf.from_hf(tmp_path / "ok")

    # A truncated weights file (an interrupted download) names the file and says what to do.
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg_json))
    weights = tmp_path / "ok" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read as safetensors .*truncated.*download or export"):
        hf.from_hf(tmp_path / "ok")
