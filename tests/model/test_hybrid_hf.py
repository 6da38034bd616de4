"""Nemotron-H export (`hf.to_hf`): the folder round-trips through `hybrid.from_hf` bit for bit, transformers
loads it and its logits equal `hybrid.forward`'s; user mistakes are one-line errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax.model.nemotron_h import hf, hybrid
from rlp_jax.model.safetensors_io import CheckpointError
from tests.hf_models import hf_logits, tiny_nemotron_h, transformers

L = 19     # not a multiple of the chunk size 8


def _padded_batch(vocab, seed=0):
    """Tokens [3, L] and their mask: one full row, two right-padded (11 and 5 real). (Left padding is
    tests/model/test_hybrid.py's: with in_proj biases our segment-aware conv does not read the padded positions'
    bias values that transformers' conv reads.)"""
    tokens = np.random.RandomState(seed).randint(0, vocab, size=(3, L)).astype(np.int32)
    mask = (np.arange(L)[None] < np.array([L, 11, 5])[:, None]).astype(np.int32)
    return tokens, mask


def _leaves(params):
    return jax.tree_util.tree_flatten_with_path(params)[0]


def _assert_bitwise_equal(a, b):
    left, right = _leaves(a), _leaves(b)
    assert [p for p, _ in left] == [p for p, _ in right]
    for (path, x), (_, y) in zip(left, right):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes(), path


# tied head, no biases, one file; untied head with every optional bias, sharded into several files
CASES = {"tied": dict(tied=True, extra={}, shard=hf.MAX_SHARD_BYTES),
         "untied-biases-sharded": dict(tied=False, extra=dict(use_bias=True, mlp_bias=True), shard=40_000)}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bitwise_and_transformers_logits_match(tmp_path, case):
    c = CASES[case]
    tiny_nemotron_h(seed=5, tied=c["tied"], **c["extra"]).save_pretrained(tmp_path / "in")
    cfg, params = hybrid.from_hf(tmp_path / "in")
    assert cfg.tie_word_embeddings == c["tied"] and ("lm_head" in params) != c["tied"]
    assert cfg.use_bias == cfg.mlp_bias == bool(c["extra"])
    out = hf.to_hf(params, cfg, tmp_path / "out", max_shard_bytes=c["shard"])
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if c["shard"] < hf.MAX_SHARD_BYTES:
        assert len(files) > 2 and (out / "model.safetensors.index.json").exists()
    else:
        assert files == ["model.safetensors"]

    cfg2, params2 = hybrid.from_hf(out)                 # (a) exact round trip of config and params
    assert cfg2 == cfg
    _assert_bitwise_equal(params2, params)
    written = json.loads((out / "config.json").read_text())
    assert written["layers_block_type"] == list(cfg.block_types) and written["dtype"] == "float32"

    reloaded = transformers.NemotronHForCausalLM.from_pretrained(out).float().eval()   # (b) transformers loads it
    tokens, mask = _padded_batch(cfg.vocab_size)
    want = hf_logits(reloaded, tokens, mask)
    ours = np.asarray(jax.jit(hybrid.forward, static_argnums=1)(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    real = mask.astype(bool)
    err = float(np.abs(ours[real] - want[real]).max() / np.abs(want[real]).max())
    print(f"{case}: transformers vs hybrid.forward max relative error {err:.2e}")
    assert err <= 1e-4
    if c["tied"]:      # transformers never ties Nemotron-H's head: it reads the embedding's copy from the file
        assert np.array_equal(reloaded.lm_head.weight.detach().numpy(), params["embed"])


def test_bfloat16_export_round_trips(tmp_path):
    tiny_nemotron_h(seed=6).save_pretrained(tmp_path / "in")
    cfg, params = hybrid.from_hf(tmp_path / "in")
    half = hf.to_hf(params, cfg, tmp_path / "bf16", dtype="bfloat16")
    cfg2, params2 = hybrid.from_hf(half)
    assert cfg2 == cfg and json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert {leaf.dtype.name for leaf in jax.tree.leaves(params2)} == {"bfloat16"}
    _assert_bitwise_equal(params2, jax.tree.map(lambda a: a.astype(params2["embed"].dtype), params))
    again = hf.to_hf(params2, cfg2, tmp_path / "again")     # default dtype: the params' own
    _assert_bitwise_equal(hybrid.from_hf(again)[1], params2)


def test_config_fields_round_trip_exactly():
    """Every field `config_from_hf` reads is written: non-default values come back unchanged."""
    import dataclasses

    cfg = hybrid.preset("nemotron-nano-12b-v2")
    odd = dataclasses.replace(cfg, eps=1e-6, tie_word_embeddings=True, use_bias=True, use_conv_bias=False,
                              mlp_bias=True, mamba=dataclasses.replace(cfg.mamba, eps=1e-6, chunk_size=64,
                                                                       dt_limit=(0.001, 0.1), conv_kernel=3))
    for c in (cfg, odd):
        assert hybrid.config_from_hf(json.loads(json.dumps(hf.config_to_hf(c, "float32")))) == c


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_user_mistakes_are_one_line_errors(tmp_path):
    tiny_nemotron_h(seed=7).save_pretrained(tmp_path / "in")
    cfg, params = hybrid.from_hf(tmp_path / "in")
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(CheckpointError) as e:
        hf.to_hf(params, cfg, tmp_path / "a_file")
    assert "exists and is not a folder" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        hf.to_hf(params, cfg, tmp_path / "a_file" / "below")
    assert "cannot create the folder" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        hf.to_hf(params, cfg, tmp_path / "out", dtype="float16")
    assert "float32 or bfloat16" in _one_line(e)
    other = hybrid.from_hf(tmp_path / "in")[1]
    other["blocks"] = other["blocks"][:-1]                          # a block short of the config
    with pytest.raises(CheckpointError) as e:
        hf.to_hf(other, cfg, tmp_path / "out")
    assert "params do not match the config" in _one_line(e)
    other = hybrid.from_hf(tmp_path / "in")[1]
    other["final_norm"] = other["final_norm"][:-1]
    with pytest.raises(CheckpointError) as e:
        hf.to_hf(other, cfg, tmp_path / "out")
    assert "['final_norm'] has shape (63,), the config implies (64,)" in _one_line(e)
    assert not (tmp_path / "out").exists()                          # nothing was written
