"""Loading a trained model: from an rlp_jax run directory (Orbax checkpoint) or a Hugging Face directory.

A run directory is what `python -m rlp_jax.train` writes: `config.json` (the model shape and the run
config) and `checkpoints/<step>/`. A run trained with a URL workdir (`gs://bucket/runs/x`) is named by
that URL: its checkpoints are read from the bucket, its config.json from the local mirror that
training wrote (`local_dirs`). `load_model` restores the policy (or the EMA teacher) of its latest
(or a chosen) step together with the tokenizer the run used; a Hugging Face directory is read with
`hf.from_hf` and its own tokenizer. Used by `evaluate`, `generate`, `export` and as `model.init_from`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax

from rlp_jax import fetch
from rlp_jax.data.tokenizer import (
    THINK_TOKENS,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    resize_embeddings,
)
from rlp_jax.model import gguf as gguf_io
from rlp_jax.model import hf
from rlp_jax.model import family
from rlp_jax.model.family import Config
from rlp_jax.train import checkpoint
from rlp_jax.train import train_step
from rlp_jax.train.config import ConfigError, ModelSection, RunConfig, from_dict
from rlp_jax.train.optim import make_optimizer


class LoadError(ValueError):
    """A path that is neither a readable run directory nor a Hugging Face checkpoint (one line, with the fix)."""


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A run directory's config.json, typed (`read_run_record`).

    model: the ModelConfig it trained (architecture, dtypes). run: its RunConfig, as the run used it
    (marker, prompt and banned ids filled from the tokenizer). experiment: the recipe's name.
    raw: the file as written (the checkpoint's compatibility check compares its "model" part)."""

    model: Config
    run: RunConfig
    experiment: str
    raw: dict


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
    def think_banned_ids(self) -> tuple[int, ...]:
        """The rlp.rollout.banned_ids the run trained with: token ids that evaluation and generation never
        sample in its thoughts, as its rollout did (() for pretrained files)."""
        return tuple(self.run.rlp.rollout.banned_ids) if self.run else ()

    @property
    def think_prompt_ids(self) -> tuple[int, ...]:
        """The token ids of the prompt the run's policy thought after (rlp.prompt, the prompted setting):
        evaluation reads it before a question when it thinks (() without a prompt, for pretrained files)."""
        return tuple(self.run.rlp.prompt.ids) if self.run else ()

    @property
    def think_temperature(self) -> float:
        """The rollout temperature the run sampled its thoughts at (1.0 for pretrained files)."""
        return float(self.run.rlp.rollout.temperature) if self.run else 1.0


def is_url(path) -> bool:
    return "://" in str(path)


def local_dirs(workdir) -> tuple[Path, str]:
    """(local run directory, checkpoint directory) of a workdir.

    A local workdir holds everything. A URL workdir (gs://bucket/runs/x, an `etils.epath.Path` or str)
    keeps the checkpoints there (Orbax writes to it directly, from every host) and the config,
    metrics, TensorBoard events and plots in the local mirror ~/.cache/rlp_jax/runs/<bucket>/<path>.
    """
    text = str(workdir)
    if not is_url(text):
        return Path(workdir), str(Path(workdir) / "checkpoints")
    mirror = Path.home() / ".cache" / "rlp_jax" / "runs" / text.split("://", 1)[1].strip("/")
    return mirror, text.rstrip("/") + "/checkpoints"


def remote_workdir(ckpt_dir: str) -> str | None:
    """The URL workdir whose checkpoints are `ckpt_dir` (from `local_dirs`); None for a local run."""
    return ckpt_dir[: -len("/checkpoints")] if is_url(ckpt_dir) else None


# The fsspec package etils.epath needs per URL scheme (it fails lazily, at the first I/O), and its install.
_FS_PACKAGES = {"gs": ("gcsfs", "pip install 'rlp_jax[gcs]'"), "s3": ("s3fs", "pip install s3fs")}


def _any_path(path):
    """A local `Path`, or `etils.epath.Path(url)`; LoadError (checked before any I/O) if its package is missing."""
    text = str(path)
    if not is_url(text):
        return Path(path)
    package, fix = _FS_PACKAGES.get(text.split("://", 1)[0], (None, None))
    if package is not None and importlib.util.find_spec(package) is None:
        raise LoadError(f"{text}: reading it needs the {package} package: {fix}")
    from etils import epath
    return epath.Path(text)


def _dir_exists(path: str) -> bool:
    if not is_url(path):
        return Path(path).is_dir()
    try:
        return _any_path(path).exists()
    except LoadError:
        raise
    except Exception:   # no credentials, no such bucket: not a run we can read
        return False


def config_from_checkpoints(ckpt_dir) -> dict | None:
    """The run config saved in the newest checkpoint step of `ckpt_dir` (every step holds the config.json
    its run wrote), or None. Lets any machine read a gs:// run from the bucket alone, without the local
    mirror of the machine that trained it."""
    root = _any_path(ckpt_dir)
    try:
        steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
        for s in steps:
            item = root / str(s) / "config" / "metadata"
            if item.exists():
                return json.loads(item.read_text())
    except (OSError, ValueError):
        return None
    return None


def is_run_dir(path) -> bool:
    """True if `path` holds an rlp_jax run (config.json with a "run" section and a checkpoints dir);
    a URL counts when the bucket has the checkpoints (the config from the local mirror, else from the
    newest step)."""
    local, ckpt_dir = local_dirs(path)
    if not _dir_exists(ckpt_dir):
        return False
    try:
        raw = read_run_config(path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and "run" in raw


def read_run_config(path) -> dict:
    """A run's config.json as written. A URL run's comes from the local mirror of the machine that trained
    it, and on any other machine from the newest checkpoint step in the bucket."""
    local, ckpt_dir = local_dirs(path)
    if (local / "config.json").is_file() or not is_url(str(path)):
        return json.loads((local / "config.json").read_text())
    raw = config_from_checkpoints(ckpt_dir)
    if raw is None:
        raise FileNotFoundError(f"{path}: no config.json in the local mirror {local} and no checkpoint step "
                                f"in {ckpt_dir} holding one")
    return raw


def read_run_record(path) -> RunRecord:
    """A run's config.json, typed; a one-line LoadError when it cannot be read as one."""
    try:
        raw = read_run_config(path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: no readable rlp_jax run config there ({e}); pass a run directory written by "
                        "`python -m rlp_jax.train`") from None
    try:
        return RunRecord(model=family.config_from_dict(raw["model_full"]), run=from_dict(raw["run"]),
                         experiment=raw.get("experiment", "custom"), raw=raw)
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise LoadError(f"{path}/config.json cannot be read as an rlp_jax run config ({e}); was it written "
                        "by a different rlp_jax version?") from None


def _resolve(p: str | None, run_dir: Path) -> str | None:
    """A path recorded in a run's config: as recorded if it exists, else relative to the run's parent."""
    if p is None or is_url(p) or Path(p).exists():
        return p
    for base in (run_dir, run_dir.parent):
        if (base / p).exists():
            return str(base / p)
    return p


def run_tokenizer_path(run_dir: Path, run: RunConfig) -> str:
    """The tokenizer a run trained with (train.tokenizer, else model.init_from)."""
    path = run.train.tokenizer or run.model.init_from
    if path is None:
        raise LoadError(f"{run_dir}/config.json names no tokenizer (train.tokenizer / model.init_from)")
    return _resolve(path, run_dir)


def run_tokenizer(run_dir, run: RunConfig) -> Tokenizer:
    """The tokenizer a run trained with, with its think markers. A URL run whose recorded tokenizer is not on
    this machine fetches the copy training stored in the bucket (`store_tokenizer`) into its local mirror."""
    markers = tuple(run.model.think_tokens or THINK_TOKENS)
    local = local_dirs(run_dir)[0]
    path = run_tokenizer_path(local, run)
    if is_url(str(run_dir)) and not Path(path).exists():
        copy_tokenizer(str(run_dir).rstrip("/") + "/tokenizer", local / "tokenizer")
        path = str(local / "tokenizer" / Path(path).name) if Path(path).suffix == ".model" else str(local / "tokenizer")
    return load_tokenizer(path, think_tokens=markers)


# The files of a tokenizer: a sentencepiece model, or those of a Hugging Face tokenizer directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def copy_tokenizer(src, dest) -> list[str]:
    """Copy a tokenizer (a sentencepiece `.model` file, or the tokenizer files of a directory) into the
    directory `dest`; either side may be a URL (`etils.epath`). Returns the names copied."""
    src, dest = _any_path(src), _any_path(dest)
    files = [src] if src.is_file() else [src / n for n in TOKENIZER_FILES if (src / n).exists()]
    if not files:
        raise LoadError(f"{src}: no tokenizer files there ({', '.join(TOKENIZER_FILES)})")
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        (dest / f.name).write_bytes(f.read_bytes())
    return [f.name for f in files]


def store_tokenizer(tokenizer_path: str, workdir_url: str) -> None:
    """Keep a copy of a URL run's tokenizer in `<workdir>/tokenizer/`, so any machine can read the run from the
    bucket alone (a GGUF tokenizer lives in its GGUF file: not copied)."""
    if gguf_io.is_gguf(tokenizer_path):
        return
    dest = workdir_url.rstrip("/") + "/tokenizer"
    if not _any_path(dest).exists():
        copy_tokenizer(tokenizer_path, dest)


def is_pretrained(path) -> bool:
    """A pretrained checkpoint rlp_jax reads: a Hugging Face directory (config.json) or a .gguf file."""
    return gguf_io.is_gguf(path) or (not is_url(path) and (Path(path) / "config.json").is_file()
                                     and not is_run_dir(path))


def load_pretrained(path, *, param_dtype: str | None = None, mesh=None, **config_overrides):
    """(ModelConfig, params) of a Hugging Face checkpoint directory or a GGUF file (`hf.from_hf`,
    `gguf_io.from_gguf`): with a mesh, global arrays of which each process read only its devices'
    slices; without, whole host (numpy) arrays."""
    if gguf_io.is_gguf(path):
        return gguf_io.from_gguf(path, param_dtype=param_dtype, mesh=mesh, **config_overrides)
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
        if is_run_dir(src):
            return read_run_record(src).model.replace(**section.overrides)
        if gguf_io.is_gguf(src):
            return gguf_io.config_from_gguf(gguf_io.open_gguf(src), **section.overrides)
        path = Path(src) / "config.json"
        if is_url(src) or not path.is_file():
            raise ConfigError(f"model.init_from={src}: neither an rlp_jax run directory, a .gguf file nor a Hugging "
                              "Face checkpoint directory (no config.json there)")
        return family.config_from_hf(json.loads(path.read_text()), **section.overrides)
    except (hf.CheckpointError, LoadError, json.JSONDecodeError, fetch.FetchError) as e:
        raise ConfigError(f"model.init_from={src}: {e}") from None


def fit_embeddings(mcfg: Config, params: dict, tokenizer: Tokenizer, rng, init: str = "mean"):
    """Grow the embedding (and an untied lm_head) to the tokenizer's vocabulary when it added tokens
    (the think markers), new rows by `init` (`tokenizer.resize_embeddings`). Returns (cfg, params)."""
    if tokenizer.vocab_size <= mcfg.vocab_size:
        return mcfg, params
    k1, k2 = jax.random.split(rng)
    grow = lambda table, key: resize_embeddings(table, tokenizer.vocab_size, key, init=init,
                                                pieces=tokenizer.added_pieces)
    params = dict(params, embed=grow(params["embed"], k1))
    if "lm_head" in params:
        params["lm_head"] = grow(params["lm_head"].T, k2).T
    return mcfg.replace(vocab_size=tokenizer.vocab_size), params


def load_run_state(run_dir, *, step: int | None = None, mesh=None,
                   part: str | None = None) -> tuple[checkpoint.Restored, RunRecord]:
    """Restore the train state of a run's checkpoint (read-only: a running job's files are not touched).

    step: checkpoint step (default: the latest restorable). mesh: a `jax.sharding.Mesh` to restore onto
    (default: all local devices on the data axis). part: "params" or "ema_params" to read only that field
    (`Restored.state` is then {"step", part}); None reads the whole state.
    Returns (checkpoint.Restored, the run's RunRecord).
    """
    from rlp_jax import sharding

    if not is_run_dir(run_dir):
        raise LoadError(f"{run_dir} is not an rlp_jax run directory (no config.json + checkpoints/); pass a run "
                        "directory written by `python -m rlp_jax.train` or a Hugging Face checkpoint dir")
    ckpt_dir = local_dirs(run_dir)[1]
    record = read_run_record(run_dir)
    mcfg, cfg = record.model, record.run
    if mesh is None:
        mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
    layout = train_step.state_layout(mcfg, make_optimizer(cfg.optim, cfg.train.steps), mesh,
                                     keep_reference=cfg.keeps_kl_reference)
    try:   # the Checkpointer lists again when the training that owns the run deletes a step meanwhile
        ckpt = checkpoint.Checkpointer(ckpt_dir, save_every=1, read_only=True)
    except FileNotFoundError as e:
        raise LoadError(_vanished(ckpt_dir, e)) from None
    try:
        restored = (ckpt.restore(layout.restore_target(), config=record.raw, step=step) if part is None else
                    ckpt.restore_part(layout.restore_target(), part, config=record.raw, step=step))
    except FileNotFoundError as e:
        raise LoadError(str(e) if e.errno is None else _vanished(ckpt_dir, e)) from None
    finally:
        ckpt.close()
    if restored is None:
        raise LoadError(f"{ckpt_dir} holds no checkpoint yet; train first or pass another run")
    return restored, record


def _vanished(ckpt_dir, e: OSError) -> str:
    return (f"{ckpt_dir}: {e.filename} went away while reading ({e.strerror}): the training that owns the run "
            "is deleting old steps as it saves; run the command again")


def load_run_params(run_dir, *, step: int | None = None, which: str = "params", mesh=None):
    """Restore one parameter tree of a run's checkpoint.

    Args:
      run_dir: an rlp_jax run directory. step: checkpoint step (default: the latest restorable).
      which: "params" (the policy theta) or "ema" (the teacher phi, float32).
      mesh: optional `jax.sharding.Mesh`; params are restored sharded by the logical rules over it.
    Returns:
      (ModelConfig, params pytree, step, the run's RunRecord).
    """
    if which not in ("params", "ema"):
        raise LoadError(f"which must be 'params' or 'ema', got {which!r}")
    part = "params" if which == "params" else "ema_params"
    restored, record = load_run_state(run_dir, step=step, mesh=mesh, part=part)   # the weights alone
    mcfg = record.model
    params = restored.state[part]
    if which == "ema":   # the teacher is kept in float32; serve it in the model's storage dtype
        params = jax.tree.map(lambda p: p.astype(mcfg.jnp_param_dtype), params)
    return mcfg, params, restored.step, record


def load_model(path, *, step: int | None = None, which: str = "params", mesh=None,
               compute_dtype: str | None = None) -> LoadedModel:
    """Load a model and its tokenizer from a run directory, a Hugging Face checkpoint directory or a GGUF file.

    For a pretrained checkpoint whose tokenizer gained the think markers, the embedding grows to match
    (new rows drawn like `resize_embeddings`; a fixed seed, so repeated loads agree).
    Raises LoadError / TokenizerError / hf.CheckpointError / checkpoint.CheckpointMismatch with one-line messages.
    """
    from rlp_jax import sharding

    path = resolve_model_name(path)
    if not is_url(path):
        path = Path(path)
        if not path.exists():
            raise LoadError(f"checkpoint {path} does not exist; pass a run directory, a Hugging Face checkpoint dir or a .gguf file")
    run = is_run_dir(path)   # for a URL, one look at the bucket
    if is_url(path) and not run:
        raise LoadError(f"{path}: no rlp_jax run there (its config.json is looked for in the local mirror "
                        f"{local_dirs(path)[0]}, its checkpoints at {local_dirs(path)[1]}); run from the host "
                        "that trained it, or copy the run directory locally")
    if run:
        mcfg, params, got_step, record = load_run_params(path, step=step, which=which, mesh=mesh)
        tokenizer, run_cfg, source = run_tokenizer(path, record.run), record.run, "run"
    elif is_pretrained(path):
        if step is not None or which != "params":
            raise LoadError(f"{path} is a pretrained checkpoint, not a run: --step and --which=ema apply to run "
                            "directories only")
        if mesh is None:
            mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
        mcfg, params = load_pretrained(path, mesh=mesh)   # each process reads only its devices' slices
        tokenizer = load_tokenizer(path)
        mcfg, params = fit_embeddings(mcfg, params, tokenizer, jax.random.key(0))
        params = jax.device_put(params, sharding.tree_shardings(family.param_logical_axes(mcfg), params, mesh))
        got_step, run_cfg, source = None, None, "gguf" if gguf_io.is_gguf(path) else "hf"
    else:
        raise LoadError(f"{path} is neither an rlp_jax run directory (config.json + checkpoints/), a Hugging "
                        "Face checkpoint (config.json + model.safetensors) nor a .gguf file")
    if compute_dtype is not None:
        mcfg = mcfg.replace(compute_dtype=compute_dtype)
    return LoadedModel(cfg=mcfg, params=params, tokenizer=tokenizer, source=source, step=got_step, path=path,
                       run=run_cfg)


LOAD_ERRORS = (LoadError, TokenizerError, hf.CheckpointError, checkpoint.CheckpointMismatch,
               checkpoint.CheckpointRestoreError, ConfigError, fetch.FetchError)
