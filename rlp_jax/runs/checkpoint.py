"""Checkpoints: a thin layer over `orbax.checkpoint.CheckpointManager`.

One Orbax step `<directory>/<step>/` holds everything a resumed run needs, written together so that
they can never disagree (MaxText #416, Grain #1179):
  * `state`:  the `TrainState` pytree: step, params, EMA params, optimizer state, and ref_params when
              not None (arrays, OCDBT/tensorstore; restored onto the caller's shardings).
  * `meta`:   JSON {"data_states": every process's data-iterator state (a dict, or null), in process
              order; "rng_impl" and "rng_key_data": the run's typed PRNG key (the same on every host)}.
              Orbax writes it from the primary process, so `save` gathers the states first; each process
              restores its own. (Steps written before 2026-12-04 hold one "data_state" and the key as an
              array item `rng`; they still restore.)
  * `config`: the run config as JSON (the caller also writes `config.json` in the run dir).

Saves are asynchronous by default: `save` returns after the device-to-host copy (so the train step may
donate the state right after) and the write finishes in the background. Orbax only logs some background
failures (Orbax #605), so `wait()` (and the next `save`) re-raise them as `CheckpointSaveError`; call
`close()` (or use `with Checkpointer(...)`) before exit so the last checkpoint is complete.

`restore` refuses a checkpoint written for a different model (`CheckpointMismatch`), skips a corrupt or
partial latest step with a warning and falls back to the previous one, and verifies what it restored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rlp_jax.runs.orbax_errors import quiet_orbax_leftovers, reason

log = logging.getLogger(__name__)
_policies = ocp.checkpoint_managers
class CheckpointMismatch(ValueError):
    """The checkpoint was written with a different model config or state shapes than this run's."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (surfaced from Orbax's background thread)."""


class CheckpointRestoreError(RuntimeError):
    """No checkpoint in the directory could be restored."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` returns. rng is a typed key; config is the config saved in the step."""

    step: int
    state: Any
    data_state: dict | None
    rng: jax.Array
    config: dict


def _to_json(x, what: str):
    """x as plain JSON (tuples become lists), checked now rather than in Orbax's background thread."""
    try:
        return json.loads(json.dumps(x))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint {what} must be JSON-serialisable: {e}") from e


def _retry_vanished(list_dir, tries: int = 3):
    """`list_dir()`, again when it fails on a step folder that vanished: a reader lists while the training
    that owns the directory deletes an old step (its retention). FileNotFoundError after `tries`."""
    for _ in range(tries - 1):
        try:
            return list_dir()
        except FileNotFoundError:
            pass
    return list_dir()


def _gather_json(obj) -> list:
    """[obj of process 0, obj of process 1, ...]: a JSON value from every process (a collective when
    there are several; each process calls it at the same save)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def _host_value(x):
    """A (replicated) scalar as a numpy value; works for arrays spanning several hosts."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def all_finite(tree) -> jax.Array:
    """[] bool: every floating-point leaf of `tree` is finite (integer leaves, e.g. step counters, skipped)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


_all_finite = jax.jit(all_finite)


def _shapes(tree) -> dict[str, tuple]:
    """{"params.embed": (shape, dtype), ...} with Orbax's own leaf names; None nodes are left out."""
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in ocp.tree.to_flat_dict(tree, sep=".").items()
            if v is not None}


class Checkpointer:
    """Saves and restores (TrainState, data-iterator state, RNG, config) in one Orbax step per save.

    Args:
      directory: where the steps go (e.g. `<workdir>/checkpoints`; local path or a URL Orbax supports).
      save_every: `save` writes only when step % save_every == 0 (or on a preemption signal, or force).
      keep: how many of the most recent steps to keep.
      async_save: write in a background thread (True) or block in `save` (False).
    """

    def __init__(self, directory, *, save_every: int, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        """read_only: a reader's view (evaluate, export, generate, init_from): it never creates, cleans up,
        deletes or saves anything, so it cannot touch a running job's in-flight save or its older steps."""
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every and keep must be >= 1, got save_every={save_every}, keep={keep}")
        directory = str(directory)
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save, create=not read_only,
            cleanup_tmp_directories=not read_only, read_only=read_only,
            # Orbax's default also saves the first step of a run (InitialSavePolicy); we save on the interval only.
            save_decision_policy=_policies.AnySavePolicy(
                [_policies.FixedIntervalPolicy(save_every), _policies.PreemptionCheckpointingPolicy()]))
        # A reader reads the state through the PyTree handler (the same files), which can restore a part of it.
        state_handler = ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler()
        self._mngr = _retry_vanished(lambda: ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": state_handler, "rng": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}))
        self._pending: int | None = None   # step of the last async save not yet waited for
        quiet_orbax_leftovers()

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state, *, data_state: dict | None, rng: jax.Array, config: dict,
             force: bool = False) -> bool:
        """Saves (state, data_state, rng, config) as step `step` if due (or force); True if a save started.

        Call it every step: a step that is not due returns False at once, without waiting for a save in
        flight. A step that already exists is never overwritten (e.g. a final forced save of an on-interval
        step returns False). Raises CheckpointSaveError if this save, or the previous asynchronous one, failed.
        """
        if self.read_only:
            raise CheckpointSaveError(f"{self.directory} was opened read-only; nothing is saved there")
        self._check_background()
        if not (force or self._mngr.should_save(step)) or step in self._mngr.all_steps():
            return False
        # Every process's data state (each host reads its own shard), gathered into the one JSON file that
        # Orbax writes from the primary process; the RNG key as its key data (a host-local array cannot be
        # saved as an array from several processes, and it is the same on every host).
        meta = {"data_states": _gather_json(_to_json(data_state, "data_state")),
                "rng_impl": str(jax.random.key_impl(rng)),
                "rng_key_data": np.asarray(jax.random.key_data(rng)).tolist()}
        config = _to_json(config, "config")
        self.wait()                                   # surface a failed previous save under its own step
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                                  config=ocp.args.JsonSave(config))
        try:
            saved = self._mngr.save(step, args=args, force=True)   # due: decided above
        except Exception as e:
            raise CheckpointSaveError(self._save_failed(step, e)) from e
        if saved:
            self._pending = step
        return saved

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written; raises CheckpointSaveError if one failed."""
        step, self._pending = self._pending, None
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            raise CheckpointSaveError(self._save_failed(step, e)) from e
        if step is not None:
            self._mngr.reload()                       # trust the directory, not Orbax's in-memory list
            if step not in self._mngr.all_steps():
                raise CheckpointSaveError(self._save_failed(step, None))

    def _check_background(self) -> None:
        """Raise CheckpointSaveError as soon as the asynchronous save in flight has failed (a local check,
        no waiting), rather than at the next due save."""
        if self._pending is None:
            return
        try:
            self._mngr.check_for_errors()
        except Exception as e:
            step, self._pending = self._pending, None
            raise CheckpointSaveError(self._save_failed(step, e)) from e

    def _save_failed(self, step, e: BaseException | None) -> str:
        """One line: which step failed and why, the step a rerun resumes from, and the fix."""
        why = reason(e) if e is not None else "it was not finalized; see the Orbax errors logged above"
        full = e is not None and any(m in str(e) for m in (
            "No space left on device", "RESOURCE_EXHAUSTED", "File too large", "Disk quota exceeded"))
        try:
            self._mngr.reload()
            done = [s for s in self._mngr.all_steps() if s != step]
        except Exception:
            done = []
        resume = f"rerun the same command to resume from step {max(done)}" if done else \
            "rerun the same command (there is no earlier checkpoint: it starts from step 0)"
        fix = "free space there (or raise the quota / file-size limit) or lower train.keep, then " if full \
            else "fix the storage, then "
        return f"checkpoint step {step} could not be written to {self.directory} ({why}); {fix}{resume}"

    def close(self) -> None:
        """Waits for pending saves (raising if one failed) and releases Orbax's threads."""
        try:
            self.wait()
        finally:
            self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def restore_part(self, abstract_state, part: str, *, config: dict, step: int | None = None) -> Restored | None:
        """A reader's restore of one field of the state (`part`: "params" or "ema_params"), read alone, so
        that evaluating or exporting needs the memory of the weights, not of the whole train state (AdamW
        moments, EMA). Same fallback, checks and errors as `restore`; the Restored.state is
        {"step": ..., part: tree}. Only on a read-only Checkpointer."""
        if not self.read_only:
            raise ValueError("restore_part needs a read-only Checkpointer (a reader's)")
        if isinstance(abstract_state, dict):   # already {"step": ..., part: ...}
            target = {"step": abstract_state["step"], part: abstract_state[part]}
        else:
            target = {"step": abstract_state.step, part: getattr(abstract_state, part)}
        return self.restore(target, config=config, step=step)

    def restore(self, abstract_state, *, config: dict, step: int | None = None) -> Restored | None:
        """Restores the latest restorable step (or exactly `step`); None if the directory has no checkpoint.

        Args:
          abstract_state: the state's pytree of `jax.ShapeDtypeStruct` (`jax.eval_shape(init_fn)`); leaves
            with a `.sharding` are restored onto it. Its structure says whether ref_params are expected.
          config: this run's config; `config["model"]` must equal the one saved with the checkpoint.
        Raises:
          CheckpointMismatch: saved model config or state shapes/dtypes differ from this run's.
          CheckpointRestoreError: every candidate step was corrupt or failed verification.
        Corrupt or partial steps are logged (warning) and skipped; when an older step is restored, the newer
        failed steps are deleted so that this run can save those step numbers again (never when read-only).
        """
        self.wait()
        steps = self._list_steps()
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} (steps: {sorted(steps)})")
            steps = [step]
        want_model = _to_json(config, "config").get("model")
        failed = []
        for s in steps:
            try:
                restored = self._restore_step(s, abstract_state, want_model)
            except CheckpointMismatch:
                raise
            except Exception as e:  # corrupt, partial or unverifiable: try the previous step
                if self.read_only and not self._still_there(s):
                    # the training that owns the directory deleted this step (its retention) while we read
                    log.info("checkpoint step %d of %s went away while reading; trying the previous step", s,
                             self.directory)
                    continue
                log.warning("checkpoint at %s step %d cannot be restored (%s); trying the previous step",
                            self.directory, s, reason(e))
                failed.append((s, reason(e)))
                continue
            for bad, _ in failed if not self.read_only else ():   # a reader never deletes
                log.warning("deleting unrestorable checkpoint step %d in %s", bad, self.directory)
                try:
                    self._mngr.delete(bad)
                except Exception as e:  # saves of steps <= `bad` will be skipped while it exists
                    log.warning("could not delete checkpoint step %d in %s: %s", bad, self.directory, e)
            return restored
        if not failed:
            return None
        raise CheckpointRestoreError(
            f"no checkpoint in {self.directory} could be restored ({'; '.join(f'step {s}: {err}' for s, err in failed)}): "
            "the files are damaged; delete those step folders to start over from step 0 (earlier metrics are kept "
            "aside), or use a new --workdir")

    def _list_steps(self) -> list[int]:
        """The steps in the directory, newest first (listed again if a step vanishes meanwhile)."""
        def listing():
            self._mngr.reload()
            return sorted(self._mngr.all_steps(), reverse=True)
        return _retry_vanished(listing)

    def _still_there(self, s: int) -> bool:
        try:
            return s in self._list_steps()
        except FileNotFoundError:
            return False

    def _restore_step(self, s: int, abstract_state, want_model) -> Restored:
        small = self._mngr.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                              meta=ocp.args.JsonRestore()))
        self._check_compatible(s, small.config.get("model"), want_model, abstract_state)
        meta, impl = small.meta, small.meta["rng_impl"]
        data_state = self._own_data_state(s, meta)
        if self.read_only:   # the PyTree handler: the target may be a part of the saved state
            restore_args = jax.tree.map(   # as StandardRestore: onto a leaf's sharding, else as numpy
                lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
                if getattr(x, "sharding", None) is not None else ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype),
                abstract_state)
            items = dict(state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args,
                                                      partial_restore=isinstance(abstract_state, dict)))
        else:
            items = dict(state=ocp.args.StandardRestore(abstract_state))
        if "rng_key_data" not in meta:   # written before 2026-12-04: the key as an array item
            rng_abstract = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl)))
            items["rng"] = ocp.args.StandardRestore({"key_data": rng_abstract})
        big = self._mngr.restore(s, args=ocp.args.Composite(**items))
        key_data = np.asarray(meta["rng_key_data"], np.uint32) if "rng_key_data" in meta else \
            np.asarray(big.rng["key_data"])
        state = big.state
        saved_step = state["step"] if isinstance(state, dict) else getattr(state, "step", None)
        if saved_step is not None and int(_host_value(saved_step)) != s:
            raise ValueError(f"restored state.step={int(_host_value(saved_step))} != checkpoint step {s}")
        if not bool(_host_value(_all_finite(state))):
            raise ValueError("restored state has non-finite values")
        return Restored(step=s, state=state, data_state=data_state,
                        rng=jax.random.wrap_key_data(key_data, impl=impl), config=small.config)

    def _own_data_state(self, s: int, meta: dict) -> dict | None:
        """This process's data-iterator state in a step's meta (one per process, in process order)."""
        if "data_states" not in meta:   # written before 2026-12-04, by one process
            states = [meta.get("data_state")]
        else:
            states = meta["data_states"]
        if len(states) != jax.process_count():
            if self.read_only:   # a reader (evaluate, export, ...) on any number of hosts needs no data position
                return None
            raise CheckpointMismatch(f"checkpoint at {self.directory} step {s} was written by {len(states)} "
                                     f"process(es), this run has {jax.process_count()}: resume with the same "
                                     "number of hosts, or use a new --workdir")
        return states[jax.process_index()]

    def _check_compatible(self, s: int, saved_model, want_model, abstract_state) -> None:
        where = f"checkpoint at {self.directory} step {s} was written with"
        fix = "use a new --workdir or matching settings"
        saved_model, want_model = saved_model or {}, want_model or {}
        diffs = [f"model.{k}={saved_model.get(k, '<unset>')}, this run has {want_model.get(k, '<unset>')}"
                 for k in sorted(set(saved_model) | set(want_model)) if saved_model.get(k) != want_model.get(k)]
        if diffs:
            raise CheckpointMismatch(f"{where} {'; '.join(diffs)}; {fix}")
        saved, want = _shapes(self._mngr.item_metadata(s)["state"].tree), _shapes(abstract_state)
        if isinstance(abstract_state, dict):   # a part (restore_part): compare only the fields read
            saved = {k: v for k, v in saved.items() if k.split(".", 1)[0] in abstract_state}
        fmt = lambda v: "<absent>" if v is None else f"{v[1]}{list(v[0])}"
        diffs = [f"state.{k}={fmt(saved.get(k))}, this run has {fmt(want.get(k))}"
                 for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
        if diffs:
            more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise CheckpointMismatch(f"{where} {'; '.join(diffs[:3])}{more}; {fix}")
