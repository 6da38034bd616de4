"""Tests of rlp_jax.runs.checkpoint on a tiny model (CPU)."""

import dataclasses
import functools
import gc
import logging
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlp_jax.model.dense import transformer
from rlp_jax.model.dense.config import ModelConfig
from rlp_jax.runs.checkpoint import (
    Checkpointer,
    CheckpointMismatch,
    CheckpointSaveError,
)
from rlp_jax.train import train_step

CFG = ModelConfig.preset("tiny")
OPT = optax.adamw(1e-3)


# After a failed read or write, Orbax/TensorStore callbacks fire into event loops Orbax has already closed
# ("RuntimeError: Event loop is closed"); that is Orbax-internal noise, not an error of ours.
def orbax_failure_noise(test):
    filters = ("ignore::pytest.PytestUnraisableExceptionWarning", "ignore:coroutine .* was never awaited")

    @functools.wraps(test)
    def run(*args, **kwargs):
        try:
            test(*args, **kwargs)
        finally:
            gc.collect()   # let Orbax's abandoned coroutines die inside this test's warning filters
    for f in filters:
        run = pytest.mark.filterwarnings(f)(run)
    return run


def _config(cfg=CFG):
    return {"model": dataclasses.asdict(cfg), "rlp": {"lr": 1e-3}}


@functools.lru_cache(maxsize=None)
def _template():
    """A fresh TrainState of the tiny model; numpy-initialised params (XLA compiles are slow on a busy CPU)."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda shape: jnp.asarray(0.02 * rng.standard_normal(shape), jnp.float32),
                          transformer.param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))
    return train_step.init_train_state(params, OPT)


def _state(step=0, seed=0):
    """A TrainState whose every float leaf (params, EMA, Adam mu and nu) is distinct random data."""
    rng = np.random.default_rng(seed + 1)

    def fill(x):
        x = np.asarray(x)
        return jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype) if x.dtype.kind == "f" else x + step)

    return jax.tree.map(fill, _template())   # int leaves: step and Adam's count, both = step


def _abstract(cfg=CFG):
    return jax.eval_shape(lambda: train_step.init_train_state(transformer.init_params(cfg, jax.random.key(0)), OPT))


def _save(ckpt, step, *, seed=None, force=False):
    seed = step if seed is None else seed
    state = _state(step, seed)
    ok = ckpt.save(step, state, data_state={"epoch": 1, "offset": 10 * step}, rng=jax.random.key(100 + step),
                   config=_config(), force=force)
    return state, ok


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip(tmp_path):
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        state, ok = _save(ckpt, 3)
        assert ok
        ckpt.wait()
        assert ckpt.latest_step() == 3
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        r = ckpt.restore(_abstract(), config=_config())
    assert r.step == 3 and int(r.state.step) == 3
    _assert_trees_equal(r.state, state)   # params, ema, opt state (count, mu, nu), step
    assert r.state.ref_params is None
    key = jax.random.key(103)
    assert jax.random.key_impl(r.rng) == jax.random.key_impl(key)
    np.testing.assert_array_equal(jax.random.normal(r.rng, (8,)), jax.random.normal(key, (8,)))
    np.testing.assert_array_equal(jax.random.normal(jax.random.split(r.rng)[1], (8,)),
                                  jax.random.normal(jax.random.split(key)[1], (8,)))
    assert r.data_state == {"epoch": 1, "offset": 30}
    assert r.config == _config()


def test_round_trip_with_reference_params(tmp_path):
    state = train_step.init_train_state(_template().params, OPT, keep_reference=True)
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(0, state, data_state=None, rng=jax.random.key(0), config=_config(), force=True)
        r = ckpt.restore(jax.eval_shape(lambda: state), config=_config())
        _assert_trees_equal(r.state, state)
        assert r.data_state is None
        with pytest.raises(CheckpointMismatch, match="ref_params"):   # the run no longer keeps ref params
            ckpt.restore(_abstract(), config=_config())


def test_no_checkpoint_returns_none(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.restore(_abstract(), config=_config()) is None
        assert ckpt.latest_step() is None and ckpt.all_steps() == []


def test_interval_keep_and_force(tmp_path, monkeypatch):
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        saved = [_save(ckpt, s)[1] for s in range(1, 8)]
        assert saved == [False, True, False, True, False, True, False]
        with monkeypatch.context() as m:             # a step that is not due never waits for the save in flight
            m.setattr(ckpt, "wait", lambda: pytest.fail("save() of a non-due step waited"))
            assert not _save(ckpt, 9)[1]
        assert _save(ckpt, 7, force=True)[1]          # off-interval, forced
        assert not _save(ckpt, 7, force=True)[1]      # already there: nothing to do
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
        assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [6, 7]


@orbax_failure_noise
def test_corrupt_latest_falls_back(tmp_path, caplog):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        state1, _ = _save(ckpt, 1)
        _save(ckpt, 2)
    data = tmp_path / "2" / "state" / "ocdbt.process_0" / "d"
    files = list(data.iterdir())
    assert files
    for f in files:                                   # truncate every array data file of step 2
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="rlp_jax.runs.checkpoint"):
        with Checkpointer(tmp_path, save_every=1) as ckpt:
            r = ckpt.restore(_abstract(), config=_config())
            assert r.step == 1
            _assert_trees_equal(r.state, state1)
            assert ckpt.all_steps() == [1]            # the corrupt step is gone, so step 2 can be saved again
            assert _save(ckpt, 2)[1]
    assert any("step 2 cannot be restored" in rec.getMessage() for rec in caplog.records)


def test_a_reader_deletes_nothing(tmp_path):
    """A read-only Checkpointer (evaluate, export, generate, init_from) falls back past a corrupt newer
    step without deleting it, leaves another job's in-flight save alone, and refuses to save."""
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        state1, _ = _save(ckpt, 1)
        _save(ckpt, 2)
    for f in (tmp_path / "2" / "state" / "ocdbt.process_0" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    in_flight = tmp_path / "3.orbax-checkpoint-tmp-1234"      # a training job's save in progress
    in_flight.mkdir()
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with Checkpointer(tmp_path, save_every=1, read_only=True) as reader:
        r = reader.restore(_abstract(), config=_config())
        assert r.step == 1
        _assert_trees_equal(r.state, state1)
        with pytest.raises(CheckpointSaveError, match="read-only"):
            _save(reader, 4)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("part", ["params", "ema_params"])
def test_a_reader_restores_one_part_alone(tmp_path, part):
    """restore_part reads one field (the weights a reader needs) and returns exactly what a full restore
    holds there; a mismatching model is still refused; writers cannot use it."""
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        state, _ = _save(ckpt, 3)
        with pytest.raises(ValueError, match="read-only"):
            ckpt.restore_part(_abstract(), part, config=_config())
    with Checkpointer(tmp_path, save_every=1, read_only=True) as reader:
        got = reader.restore_part(_abstract(), part, config=_config())
        assert got.step == 3 and sorted(got.state) == sorted(["step", part]) and got.data_state is not None
        _assert_trees_equal(got.state[part], getattr(state, part))
        other = dataclasses.replace(CFG, hidden_size=2 * CFG.hidden_size)
        with pytest.raises(CheckpointMismatch, match="hidden_size"):
            reader.restore_part(_abstract(other), part, config=_config(other))


@orbax_failure_noise
def test_all_corrupt_raises(tmp_path, caplog):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        _save(ckpt, 1)
    os.remove(tmp_path / "1" / "state" / "_METADATA")
    with Checkpointer(tmp_path, save_every=1) as ckpt, pytest.raises(RuntimeError, match="could be restored"):
        ckpt.restore(_abstract(), config=_config())


def test_incompatible_config(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        _save(ckpt, 20)
    other = CFG.replace(hidden_size=128)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(CheckpointMismatch, match=r"step 20 was written with model.hidden_size=64, this run has 128"):
            ckpt.restore(_abstract(other), config=_config(other))
        # Same model config but a state of other shapes (e.g. a stale caller): still refused, by leaf name.
        with pytest.raises(CheckpointMismatch, match=r"state.ema_params.embed=float32\[512, 64\], this run has float32\[512, 128\]"):
            ckpt.restore(_abstract(other), config=_config())
        assert ckpt.all_steps() == [20]               # a mismatch never deletes anything


def test_restore_then_continue_saving_same_dir(tmp_path):
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        for s in (2, 4):
            _save(ckpt, s)
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        r = ckpt.restore(_abstract(), config=_config())
        assert r.step == 4
        for s in (5, 6, 7, 8):
            _save(ckpt, s)
        ckpt.wait()
        assert ckpt.all_steps() == [6, 8]
        r = ckpt.restore(_abstract(), config=_config())   # restore from the dir it is saving to
        assert r.step == 8 and r.data_state["offset"] == 80
        assert _save(ckpt, 10)[1]
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        assert ckpt.all_steps() == [8, 10]
        _assert_trees_equal(ckpt.restore(_abstract(), config=_config()).state, _state(10, 10))


def test_sharded_restore(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), _abstract())
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        state, _ = _save(ckpt, 1)
        r = ckpt.restore(abstract, config=_config())
    leaves = jax.tree.leaves(r.state)
    assert leaves and all(x.sharding == sharding for x in leaves)
    _assert_trees_equal(r.state, state)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE/SIGXFSZ semantics are Linux's")
@pytest.mark.parametrize("async_save", [True, False])
@orbax_failure_noise
def test_save_failure_is_surfaced(tmp_path, async_save):
    """A write that fails in Orbax's background thread ('File too large', like a full disk or a quota)."""
    import resource
    ckpt = Checkpointer(tmp_path, save_every=1, async_save=async_save)
    _save(ckpt, 1)
    ckpt.wait()
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old_limit[1]))
    try:
        if async_save:
            assert _save(ckpt, 2)[1]                  # the write fails later, in Orbax's background thread
            with pytest.raises(CheckpointSaveError, match="checkpoint step 2 could not be written .*File too large.*raise the quota.*resume from step 1"):
                ckpt.wait()
        else:
            with pytest.raises(CheckpointSaveError, match="checkpoint step 2 could not be written .*File too large.*raise the quota.*resume from step 1"):
                _save(ckpt, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert ckpt.all_steps() == [1]
    assert _save(ckpt, 3)[1]                          # the next save works again
    ckpt.close()
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.restore(_abstract(), config=_config()).step == 3


def test_non_json_data_state_fails_fast(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt, pytest.raises(TypeError, match="data_state"):
        ckpt.save(1, _state(1), data_state={"x": object()}, rng=jax.random.key(0), config=_config())


def test_steps_in_the_earlier_layout_still_restore(tmp_path):
    """Before 2026-12-04 a step held the RNG key as an array item `rng` and one `data_state` in meta."""
    import orbax.checkpoint as ocp

    state, rng = _state(4), jax.random.key(7)
    with ocp.CheckpointManager(str(tmp_path), item_handlers={
            "state": ocp.StandardCheckpointHandler(), "rng": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}) as mngr:
        mngr.save(4, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), rng=ocp.args.StandardSave({"key_data": jax.random.key_data(rng)}),
            meta=ocp.args.JsonSave({"data_state": {"epoch": 3}, "rng_impl": str(jax.random.key_impl(rng))}),
            config=ocp.args.JsonSave(_config())))
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        got = ckpt.restore(_abstract(), config=_config())
    assert got.step == 4 and got.data_state == {"epoch": 3}
    _assert_trees_equal(got.state, state)
    np.testing.assert_array_equal(jax.random.key_data(got.rng), jax.random.key_data(rng))


def test_a_step_of_another_host_count_is_refused(tmp_path):
    """A step written by two processes (two data states) does not resume a training in one; readers read it."""
    import orbax.checkpoint as ocp

    rng = jax.random.key(7)
    with ocp.CheckpointManager(str(tmp_path), item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler()}) as mngr:
        mngr.save(4, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_state(4)), config=ocp.args.JsonSave(_config()),
            meta=ocp.args.JsonSave({"data_states": [{"epoch": 0}, {"epoch": 1}],
                                    "rng_impl": str(jax.random.key_impl(rng)),
                                    "rng_key_data": np.asarray(jax.random.key_data(rng)).tolist()})))
    with Checkpointer(tmp_path, save_every=1) as ckpt, \
            pytest.raises(CheckpointMismatch, match="written by 2 process.*this run has 1.*same number of hosts"):
        ckpt.restore(_abstract(), config=_config())
    with Checkpointer(tmp_path, save_every=1, read_only=True) as reader:   # a reader needs no data position
        got = reader.restore(_abstract(), config=_config())
        assert got.step == 4 and got.data_state is None


def test_a_reader_follows_a_training_that_deletes_old_steps(tmp_path):
    """A reader opened before the training's retention deleted a step lists again at restore and reads
    what is there (the fault review's r01: a bare FileNotFoundError before)."""
    import shutil

    with Checkpointer(tmp_path, save_every=1) as ckpt:
        _save(ckpt, 1)
        state2, _ = _save(ckpt, 2)
    reader = Checkpointer(tmp_path, save_every=1, read_only=True)   # sees steps 1 and 2
    shutil.rmtree(tmp_path / "1")                                   # the training's retention
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        state3, _ = _save(ckpt, 3)
    try:
        got = reader.restore(_abstract(), config=_config())
    finally:
        reader.close()
    assert got.step == 3
    _assert_trees_equal(got.state, state3)
