"""Loading a model for reading (evaluate, generate, export, lm_eval, plan) or to start a run from
(`model.init_from`): an rlp_jax run directory (its latest or a chosen Orbax step, the policy or the EMA
teacher, with the run's tokenizer), a Hugging Face checkpoint directory, a GGUF file, a model name of
`rlp_jax.fetch` or a Hugging Face Hub id (`resolve_model_name`). `load_model` dispatches on what the path is.
Nothing here imports the train step, the optimizer or Grain: a run's weights are restored alone
(`checkpoint.Checkpointer.restore_part`), against the shapes the run's model record gives.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlp_jax import fetch, sharding
from rlp_jax.data.tokenizer import (
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    resize_embeddings,
)
from rlp_jax.model import family
from rlp_jax.model.dense import gguf
from rlp_jax.model.family import Config
from rlp_jax.model.safetensors_io import CheckpointError
from rlp_jax.rlp.think_ids import ThinkIds, think_ids
from rlp_jax.runs import checkpoint, layout
from rlp_jax.runs.config import ConfigError, ModelSection, RunConfig


@dataclasses.dataclass
class LoadedModel:
    """cfg: ModelConfig. params: the parameter pytree (device arrays). tokenizer: the run's tokenizer.
    source: "run", "hf", "gguf" (or a caller's own label). step: the checkpoint step (None for pretrained
    files). path: where it came from. run: the RunConfig it trained with (None for pretrained files)."""

    cfg: Config
    params: dict
    tokenizer: Tokenizer
    source: str
    step: int | None
    path: Path | str
    run: RunConfig | None = None

    @property
    def think_ids(self) -> ThinkIds:
        """The ids the run's thoughts were sampled with (`rlp.think_ids.think_ids` of its rlp config and
        tokenizer): evaluation and generation ban what its rollout banned and read the prompt it thought
        after. Pretrained files: the markers alone (nothing else banned, no prompt)."""
        if self.run is None:
            return ThinkIds(start=self.tokenizer.think_start_id, end=self.tokenizer.think_end_id)
        return think_ids(self.run.rlp, self.tokenizer)

    @property
    def think_temperature(self) -> float:
        """The rollout temperature the run sampled its thoughts at (1.0 for pretrained files)."""
        return float(self.run.rlp.rollout.temperature) if self.run else 1.0


def is_pretrained(path) -> bool:
    """A pretrained checkpoint rlp_jax reads: a Hugging Face directory (config.json) or a .gguf file."""
    return gguf.is_gguf(path) or (not layout.is_url(path) and (Path(path) / "config.json").is_file()
                                     and not layout.is_run_dir(path))


def load_pretrained(path, *, param_dtype: str | None = None, mesh=None, **config_overrides):
    """(ModelConfig, params) of a Hugging Face checkpoint directory or a GGUF file (`hf.from_hf`,
    `gguf.from_gguf`): with a mesh, global arrays of which each process read only its devices'
    slices; without, whole host (numpy) arrays."""
    if gguf.is_gguf(path):
        return gguf.from_gguf(path, param_dtype=param_dtype, mesh=mesh, **config_overrides)
    return family.from_hf(path, param_dtype=param_dtype, mesh=mesh, **config_overrides)


def resolve_model_name(path):
    """A model name ("smollm2") or Hugging Face Hub id that is not a local path -> its local copy (`fetch.resolve`)."""
    return fetch.resolve(path)


def model_config(section: ModelSection) -> Config:
    """The architecture a run's `model` section names, read without weights: the preset, or what
    `init_from` holds (an rlp_jax run's saved model, a GGUF file's metadata, a Hugging Face config.json),
    with the section's dtypes and remat. The vocabulary is the checkpoint's own (before added markers).
    Raises ConfigError (one line) when init_from cannot be read."""
    if section.init_from is None:
        return family.preset(section.preset, **section.overrides)
    src = section.init_from
    try:
        src = resolve_model_name(src)
        if layout.is_run_dir(src):
            return layout.read_run_record(src).model.replace(**section.overrides)
        if gguf.is_gguf(src):
            return gguf.config_from_gguf(gguf.open_gguf(src), **section.overrides)
        path = Path(src) / "config.json"
        if layout.is_url(src) or not path.is_file():
            raise ConfigError(f"model.init_from={src}: neither an rlp_jax run directory, a .gguf file nor a Hugging "
                              "Face checkpoint directory (no config.json there)")
        return family.config_from_hf(json.loads(path.read_text()), **section.overrides)
    except (CheckpointError, layout.LoadError, json.JSONDecodeError, fetch.FetchError) as e:
        raise ConfigError(f"model.init_from={src}: {e}") from None


def fit_embeddings(mcfg: Config, params: dict, tokenizer: Tokenizer, rng, init: str = "mean",
                   marker_rows: tuple[str, str] = ("", "")):
    """Grow the embedding (and an untied lm_head) to the tokenizer's vocabulary when it added tokens
    (the think markers), new rows by `init`, an added marker with a text in `marker_rows` from that text's
    rows (`tokenizer.resize_embeddings`). Returns (cfg, params)."""
    if tokenizer.vocab_size <= mcfg.vocab_size:
        return mcfg, params
    k1, k2 = jax.random.split(rng)
    chosen = {i: tokenizer.encode(text) for i, text in zip((tokenizer.think_start_id, tokenizer.think_end_id),
                                                           marker_rows) if text and i >= mcfg.vocab_size}
    for i, ids in chosen.items():
        if not ids or max(ids) >= mcfg.vocab_size:
            raise ConfigError(f"model.marker_rows: {tokenizer.decode(ids)!r} for {tokenizer.decode([i])!r} is no text of "
                              "the original vocabulary; choose ordinary text such as '.'")
    grow = lambda table, key: resize_embeddings(table, tokenizer.vocab_size, key, init=init,  # noqa: E731
                                                pieces=tokenizer.added_pieces, chosen=chosen)
    params = dict(params, embed=grow(params["embed"], k1))
    if "lm_head" in params:
        params["lm_head"] = grow(params["lm_head"].T, k2).T
    return mcfg.replace(vocab_size=tokenizer.vocab_size), params


def _vanished(ckpt_dir, e: OSError) -> str:
    return (f"{ckpt_dir}: {e.filename} went away while reading ({e.strerror}): the training that owns the run "
            "is deleting old steps as it saves; run the command again")


def load_run_params(run_dir, *, step: int | None = None, which: str = "params", mesh=None):
    """Restore one parameter tree of a run's checkpoint (read-only: a running job's files are not touched).

    Args:
      run_dir: an rlp_jax run directory. step: checkpoint step (default: the latest restorable).
      which: "params" (the policy theta) or "ema" (the teacher phi, float32).
      mesh: optional `jax.sharding.Mesh`; params are restored sharded by the logical rules over it
        (default: all local devices on the data axis).
    Returns:
      (ModelConfig, params pytree, step, the run's RunRecord).
    """
    if which not in ("params", "ema"):
        raise layout.LoadError(f"which must be 'params' or 'ema', got {which!r}")
    if not layout.is_run_dir(run_dir):
        raise layout.LoadError(f"{run_dir} is not an rlp_jax run directory (no config.json + checkpoints/); pass a run "
                        "directory written by `python -m rlp_jax.train` or a Hugging Face checkpoint dir")
    part = "params" if which == "params" else "ema_params"
    ckpt_dir = layout.local_dirs(run_dir)[1]
    record = layout.read_run_record(run_dir)
    mcfg = record.model
    if mesh is None:
        mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
    shapes = jax.eval_shape(lambda k: family.init_params(mcfg, k), jax.random.key(0))
    if part == "ema_params":   # the teacher is kept in float32
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), shapes)
    shardings = sharding.tree_shardings(family.param_logical_axes(mcfg), shapes, mesh)
    target = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
              part: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)}
    try:   # the Checkpointer lists again when the training that owns the run deletes a step meanwhile
        ckpt = checkpoint.Checkpointer(ckpt_dir, save_every=1, read_only=True)
    except FileNotFoundError as e:
        raise layout.LoadError(_vanished(ckpt_dir, e)) from None
    try:
        restored = ckpt.restore_part(target, part, config=record.raw, step=step)
    except FileNotFoundError as e:
        raise layout.LoadError(str(e) if e.errno is None else _vanished(ckpt_dir, e)) from None
    finally:
        ckpt.close()
    if restored is None:
        raise layout.LoadError(f"{ckpt_dir} holds no checkpoint yet; train first or pass another run")
    params = restored.state[part]
    if which == "ema":   # served in the model's storage dtype
        params = jax.tree.map(lambda p: p.astype(mcfg.jnp_param_dtype), params)
    return mcfg, params, restored.step, record


def load_model(path, *, step: int | None = None, which: str = "params", mesh=None,
               compute_dtype: str | None = None) -> LoadedModel:
    """Load a model and its tokenizer from a run directory, a Hugging Face checkpoint directory or a GGUF file.

    For a pretrained checkpoint whose tokenizer gained the think markers, the embedding grows to match
    (new rows drawn like `resize_embeddings`; a fixed seed, so repeated loads agree).
    Raises layout.LoadError / TokenizerError / CheckpointError / checkpoint.CheckpointMismatch with one-line messages.
    """
    path = resolve_model_name(path)
    if not layout.is_url(path):
        path = Path(path)
        if not path.exists():
            raise layout.LoadError(f"checkpoint {path} does not exist; pass a run directory, a Hugging Face checkpoint dir or a .gguf file")
    run = layout.is_run_dir(path)   # for a URL, one look at the bucket
    if layout.is_url(path) and not run:
        raise layout.LoadError(f"{path}: no rlp_jax run there (its config.json is looked for in the local mirror "
                        f"{layout.local_dirs(path)[0]}, its checkpoints at {layout.local_dirs(path)[1]}); run from the host "
                        "that trained it, or copy the run directory locally")
    if run:
        mcfg, params, got_step, record = load_run_params(path, step=step, which=which, mesh=mesh)
        tokenizer, run_cfg, source = layout.run_tokenizer(path, record.run), record.run, "run"
    elif is_pretrained(path):
        if step is not None or which != "params":
            raise layout.LoadError(f"{path} is a pretrained checkpoint, not a run: --step and --which=ema apply to run "
                            "directories only")
        if mesh is None:
            mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
        mcfg, params = load_pretrained(path, mesh=mesh)   # each process reads only its devices' slices
        tokenizer = load_tokenizer(path)
        mcfg, params = fit_embeddings(mcfg, params, tokenizer, jax.random.key(0))
        params = jax.device_put(params, sharding.tree_shardings(family.param_logical_axes(mcfg), params, mesh))
        got_step, run_cfg, source = None, None, "gguf" if gguf.is_gguf(path) else "hf"
    else:
        raise layout.LoadError(f"{path} is neither an rlp_jax run directory (config.json + checkpoints/), a Hugging "
                        "Face checkpoint (config.json + model.safetensors) nor a .gguf file")
    if compute_dtype is not None:
        mcfg = mcfg.replace(compute_dtype=compute_dtype)
    return LoadedModel(cfg=mcfg, params=params, tokenizer=tokenizer, source=source, step=got_step, path=path,
                       run=run_cfg)


LOAD_ERRORS = (layout.LoadError, TokenizerError, CheckpointError, checkpoint.CheckpointMismatch,
               checkpoint.CheckpointRestoreError, ConfigError, fetch.FetchError)
