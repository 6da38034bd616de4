"""The model interface that RLP, training and evaluation call, dispatched over the model families by the config.

A family is one folder under `rlp_jax/model/` with an `interface` module that satisfies `Family` (below), and
one entry in `FAMILIES`:

  `dense.interface`       Qwen3 / Qwen2 / Llama (`dense.config.ModelConfig`): `dense/transformer.py`
  `nemotron_h.interface`  NVIDIA Nemotron-H, Mamba-2 / attention / MLP blocks (`nemotron_h.hybrid.HybridConfig`)

Every function takes the same signature in every family. One difference callers honour: a Nemotron-H prefix
holds each Mamba block's state after x_<t for the positions t it was built for, so `forward(...,
return_cache=True)` needs `branch_positions_bk` [B, K] there, and branches taken off that prefix must be
`branches_at(prefix, repeat(branch_positions_bk, G, axis=1))`: G per position, in order (branch n = k G + g).
A dense prefix serves branches at any position and ignores branch_positions_bk. Decoding from prompts
(`prefill` / `decode_step`) runs a hybrid as one branch per prompt, off the prompt's end. A prompt context
(`rlp.prompt`) is for families whose `SUPPORTS_PROMPT` is true.

Shapes: B rows, L tokens, K branch positions per row, N branches per row, S branch tokens, C cache slots,
V vocabulary, D width.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from rlp_jax import sharding
from rlp_jax.model.dense import interface as dense
from rlp_jax.model.dense.config import ModelConfig
from rlp_jax.model.nemotron_h import interface as nemotron_h
from rlp_jax.model.nemotron_h.hybrid import HybridConfig
from rlp_jax.model.safetensors_io import MAX_SHARD_BYTES

FAMILIES: tuple[ModuleType, ...] = (dense, nemotron_h)     # a new family: its folder and one entry here
Config = ModelConfig | HybridConfig
PRESET_NAMES = tuple(name for f in FAMILIES for name in f.PRESET_NAMES)


@runtime_checkable
class Family(Protocol):
    """What a family's `interface` module provides (`tests/model/test_family.py` checks every registered one)."""

    NAME: str                       # the family's folder name
    CONFIG: type                    # its config dataclass (a `config.Numerics`)
    PRESET_NAMES: tuple[str, ...]
    SUPPORTS_PROMPT: bool           # reads documents after a shared prompt context (`context_cache`)
    Prefix: type                    # what `forward(..., return_cache=True)` returns

    def preset(self, name: str, **numerics) -> Any: ...
    def claims_hf_config(self, hf_config: dict) -> bool: ...
    def claims_fields(self, fields: dict) -> bool: ...
    def config_from_dict(self, fields: dict) -> Any: ...
    def config_from_hf(self, hf_config: dict, **numerics) -> Any: ...
    def from_hf(self, path, *, param_dtype=None, mesh=None, **numerics) -> tuple: ...
    def to_hf(self, params, cfg, path, *, dtype=None, max_shard_bytes: int = ...) -> Path: ...
    def init_params(self, cfg, rng) -> dict: ...
    def param_logical_axes(self, cfg) -> dict: ...
    def param_shapes(self, cfg) -> dict: ...
    def logits_from_hidden(self, params, cfg, x): ...
    def context_cache(self, params, cfg, prompt_ids_p): ...
    def forward(self, params, cfg, tokens_bl, **kwargs): ...
    def branches_at(self, prefix, t_bn): ...
    def init_branch_cache(self, cfg, prefix, branches, length: int): ...
    def branch_forward(self, params, cfg, prefix, branches, tokens_bns, **kwargs): ...
    def prefill(self, params, cfg, prompts_bl, prompt_lens_b, max_new_tokens: int): ...
    def split_layers(self, params) -> dict: ...
    def decode_step(self, params, cfg, state, tokens_b): ...


def of(cfg: Config) -> Family:
    """The family of a config."""
    for f in FAMILIES:
        if isinstance(cfg, f.CONFIG):
            return f
    raise TypeError(f"{type(cfg).__name__} is not the config of a registered model family")


def _of_prefix(prefix) -> Family:
    return next(f for f in FAMILIES if isinstance(prefix, f.Prefix))


# ----------------------------------------------------------------------------------------------
# Configs and parameters
# ----------------------------------------------------------------------------------------------

def preset(name: str, **numerics) -> Config:
    """A named size of any family with `Numerics` fields set (an unknown name: the dense family's error)."""
    return next((f for f in FAMILIES if name in f.PRESET_NAMES), dense).preset(name, **numerics)


def config_from_dict(fields: dict) -> Config:
    """The config `dataclasses.asdict` wrote (a run record's "model_full"), of any family."""
    return next((f for f in FAMILIES if f is not dense and f.claims_fields(fields)), dense).config_from_dict(fields)


def _of_hf(hf_config: dict) -> Family:
    """The family that reads a config.json; the dense reader otherwise (its error names what is supported)."""
    return next((f for f in FAMILIES if f.claims_hf_config(hf_config)), dense)


def config_from_hf(hf_config: dict, **numerics) -> Config:
    """The config of a Hugging Face config.json dict; safetensors_io.CheckpointError (one line) if unsupported."""
    return _of_hf(hf_config).config_from_hf(hf_config, **numerics)


def from_hf(path, *, param_dtype: str | None = None, mesh=None, **numerics) -> tuple[Config, dict]:
    """(config, params) of a Hugging Face checkpoint folder of any family. With a mesh the params are global
    arrays sharded by `param_logical_axes`; without, host numpy arrays in param_dtype."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):   # missing or not JSON: the dense reader says which, in one line
        raw = {}
    return _of_hf(raw).from_hf(path, param_dtype=param_dtype, mesh=mesh, **numerics)


def to_hf(params: dict, cfg: Config, path, *, dtype: str | None = None,
          max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write params as a Hugging Face folder of their family (`safetensors_io.write_folder`: default dtype the
    params' own, shards above max_shard_bytes); multi-host: every process calls it, process 0 writes."""
    return of(cfg).to_hf(params, cfg, path, dtype=dtype, max_shard_bytes=max_shard_bytes)


def init_params(cfg: Config, rng) -> dict:
    return of(cfg).init_params(cfg, rng)


def param_logical_axes(cfg: Config) -> dict:
    return of(cfg).param_logical_axes(cfg)


def param_shapes(cfg: Config) -> dict:
    return of(cfg).param_shapes(cfg)


# ----------------------------------------------------------------------------------------------
# The forward modes RLP uses
# ----------------------------------------------------------------------------------------------

def logits_from_hidden(params: dict, cfg: Config, x):
    """Final norm and output projection: hidden [..., D] -> logits [..., V] float32."""
    return of(cfg).logits_from_hidden(params, cfg, x)


def supports_prompt(cfg: Config) -> bool:
    """Whether the family reads documents after a shared prompt context (`context_cache`)."""
    return of(cfg).SUPPORTS_PROMPT


def context_cache(params: dict, cfg: Config, prompt_ids_p):
    """The cache of a prompt every document is read after (`dense.transformer.context_cache`)."""
    return of(cfg).context_cache(params, cfg, prompt_ids_p)


def forward(params: dict, cfg: Config, tokens_bl, *, segment_ids_bl=None, positions_bl=None,
            return_cache: bool = False, return_logits: bool = True, logits_at_b=None, return_hidden: bool = False,
            context=None, branch_positions_bk=None):
    """Teacher-forced pass (`dense.transformer.forward`): (logits [B, L, V] or hidden, prefix or None)."""
    return of(cfg).forward(params, cfg, tokens_bl, segment_ids_bl=segment_ids_bl, positions_bl=positions_bl,
                           return_cache=return_cache, return_logits=return_logits, logits_at_b=logits_at_b,
                           return_hidden=return_hidden, context=context, branch_positions_bk=branch_positions_bk)


def branches_at(prefix, t_bn):
    """Branches [B, N] off `prefix` at positions t_bn (`dense.transformer.branches_at`)."""
    return _of_prefix(prefix).branches_at(prefix, t_bn)


def sampling_params(params: dict, cfg: Config) -> dict:
    """The weights a token loop reads, as `cfg.sampler_weights` says: `params` themselves ("sharded") or their
    fsdp-sharded matrices gathered once in the compute dtype ("gathered", `sharding.gathered`)."""
    if cfg.sampler_weights == "sharded":
        return params
    return sharding.gathered(params, param_logical_axes(cfg), cfg.jnp_compute_dtype)


def init_branch_cache(cfg: Config, prefix, branches, length: int):
    """An empty cache of `length` (C) slots for the branches [B, N] of `prefix`, for token-by-token sampling."""
    return of(cfg).init_branch_cache(cfg, prefix, branches, length)


def branch_forward(params: dict, cfg: Config, prefix, branches, tokens_bns, *, cache=None, offset=0,
                   return_hidden: bool = False):
    """Logits [B, N, S, V] (hidden [B, N, S, D] with return_hidden) of branch tokens, and the cache after them
    (None without one). A hybrid with a cache takes one token a call (S = 1) at the cache's own step."""
    return of(cfg).branch_forward(params, cfg, prefix, branches, tokens_bns, cache=cache, offset=offset,
                                  return_hidden=return_hidden)


# ----------------------------------------------------------------------------------------------
# Decoding from prompts (generation, evaluation)
# ----------------------------------------------------------------------------------------------

def prefill(params: dict, cfg: Config, prompts_bl, prompt_lens_b, max_new_tokens: int):
    """(logits of each prompt's last token [B, V] float32, decode state) of right-padded prompts [B, L] with
    lengths [B] (>= 1)."""
    return of(cfg).prefill(params, cfg, prompts_bl, prompt_lens_b, max_new_tokens)


def split_layers(params: dict, cfg: Config) -> dict:
    """Per-layer weights for a decode loop, read as `cfg.sampler_weights` says (`sampling_params`), split per layer
    (`dense.transformer.split_layers`)."""
    return of(cfg).split_layers(sampling_params(params, cfg))


def decode_step(params: dict, cfg: Config, state, tokens_b):
    """Feed one token per row [B] -> (next-token logits [B, V], state)."""
    return of(cfg).decode_step(params, cfg, state, tokens_b)
