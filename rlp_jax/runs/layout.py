"""A run directory's layout: what `python -m rlp_jax.train` writes and where a reader finds it.

    WORKDIR/config.json          the run's record (`RunRecord`: the model it trained, the RunConfig it ran with)
    WORKDIR/checkpoints/<step>/  Orbax steps (state, RNG, data-iterator state, and the record again)
    WORKDIR/tokenizer/           a copy of the tokenizer, for a URL workdir (`store_tokenizer`)
    WORKDIR/metrics.jsonl, tensorboard/, plots/

A URL workdir (`gs://bucket/runs/x`) keeps its checkpoints in the bucket and the rest in a local mirror
(`local_dirs`). Nothing here imports the train step, the optimizer or Grain.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

from rlp_jax.data.tokenizer import THINK_TOKENS, Tokenizer, load_tokenizer
from rlp_jax.model import family
from rlp_jax.model.dense.gguf import is_gguf
from rlp_jax.model.family import Config
from rlp_jax.runs.config import ConfigError, RunConfig, from_dict


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
    if is_gguf(tokenizer_path):
        return
    dest = workdir_url.rstrip("/") + "/tokenizer"
    if not _any_path(dest).exists():
        copy_tokenizer(tokenizer_path, dest)
