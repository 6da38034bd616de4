"""The model-family registry: every registered family gives the whole interface, configs find their family,
and both families write Hugging Face folders through the one writer (sharded, same dtype policy) that reads
back bit for bit."""

import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest

from rlp_jax.model import family
from rlp_jax.model.safetensors_io import CheckpointError, shard_plan

PRESETS = ("tiny", "nemotron-h-tiny")


@pytest.mark.parametrize("member", family.FAMILIES, ids=lambda f: f.NAME)
def test_every_family_gives_the_whole_interface(member):
    assert isinstance(member, family.Family)
    names = set(family.Family.__annotations__) | {n for n, v in vars(family.Family).items()
                                                   if callable(v) and not n.startswith("_")}
    assert len(names) > 20 and not [name for name in names if not hasattr(member, name)]
    assert member.NAME == member.__name__.split(".")[-2]           # the family's folder


@pytest.mark.parametrize("name", PRESETS)
def test_a_config_finds_its_family_and_survives_a_run_record(name):
    cfg = family.preset(name)
    assert family.of(cfg).CONFIG is type(cfg) and name in family.of(cfg).PRESET_NAMES
    saved = json.loads(json.dumps(dataclasses.asdict(cfg)))        # what a run record holds
    assert family.config_from_dict(saved) == cfg
    with pytest.raises(TypeError, match="not the config of a registered model family"):
        family.of(object())


def test_shard_plan_keeps_order_and_puts_a_large_tensor_alone():
    assert shard_plan({"a": 4, "b": 4, "c": 9, "d": 1}, 8) == [["a", "b"], ["c"], ["d"]]
    assert shard_plan({"a": 3}, 8) == [["a"]]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_both_families_write_sharded_folders_that_read_back_exactly(tmp_path, name, dtype):
    cfg = family.preset(name)
    params = jax.tree.map(np.asarray, family.init_params(cfg, jax.random.key(0)))
    out = family.to_hf(params, cfg, tmp_path / "one", dtype=dtype)
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    sharded = family.to_hf(params, cfg, tmp_path / "many", dtype=dtype, max_shard_bytes=64 * 1024)
    for folder in (out, sharded):
        cfg2, params2 = family.from_hf(folder)
        want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)   # default: params' own
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
            assert np.dtype(b.dtype) == (want if dtype else np.dtype(a.dtype))
            np.testing.assert_array_equal(np.asarray(a).astype(want), np.asarray(b).astype(want))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (sharded / "model.safetensors").exists()


def test_the_writer_refuses_a_bad_dtype_in_one_line(tmp_path):
    cfg = family.preset("tiny")
    params = jax.tree.map(np.asarray, family.init_params(cfg, jax.random.key(0)))
    with pytest.raises(CheckpointError, match="dtype 'float16' is not supported; use float32 or bfloat16"):
        family.to_hf(params, cfg, tmp_path / "x", dtype="float16")
