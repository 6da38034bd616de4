"""The dense decoder (Qwen3 / Qwen2 / Llama) as a `rlp_jax.model.family.Family`: its functions under the
interface's names. The interface is this family's own signatures, so most are the transformer's functions."""

from __future__ import annotations

from pathlib import Path

from rlp_jax.model.dense import hf, transformer, weights
from rlp_jax.model.dense.config import PRESETS, ModelConfig
from rlp_jax.model.safetensors_io import MAX_SHARD_BYTES

NAME = "dense"
CONFIG = ModelConfig
PRESET_NAMES = tuple(PRESETS)
SUPPORTS_PROMPT = True
Prefix = transformer.PrefixCache


def preset(name: str, **numerics) -> ModelConfig:
    return ModelConfig.preset(name, **numerics)


def claims_hf_config(hf_config: dict) -> bool:
    return any(a in hf.ARCHITECTURES for a in hf_config.get("architectures") or [])


def claims_fields(fields: dict) -> bool:
    return set(fields) <= {f for f in ModelConfig.__dataclass_fields__}


def config_from_dict(fields: dict) -> ModelConfig:
    return ModelConfig(**fields)


config_from_hf = hf.config_from_hf
from_hf = hf.from_hf


def to_hf(params: dict, cfg: ModelConfig, path, *, dtype: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    return hf.to_hf(params, cfg, path, dtype=dtype, max_shard_bytes=max_shard_bytes)


init_params = weights.init_params
param_logical_axes = weights.param_logical_axes
param_shapes = weights.param_shapes
logits_from_hidden = transformer.logits_from_hidden
context_cache = transformer.context_cache


def forward(params: dict, cfg: ModelConfig, tokens_bl, *, segment_ids_bl=None, positions_bl=None,
            return_cache: bool = False, return_logits: bool = True, logits_at_b=None, return_hidden: bool = False,
            context=None, branch_positions_bk=None):
    """`transformer.forward`; a dense prefix serves branches at any position (branch_positions_bk unused)."""
    return transformer.forward(params, cfg, tokens_bl, segment_ids_bl=segment_ids_bl, positions_bl=positions_bl,
                               return_cache=return_cache, return_logits=return_logits, logits_at_b=logits_at_b,
                               return_hidden=return_hidden, context=context)


branches_at = transformer.branches_at
branch_forward = transformer.branch_forward
prefill = transformer.prefill
split_layers = transformer.split_layers
decode_step = transformer.decode_step


def init_branch_cache(cfg: ModelConfig, prefix, branches: transformer.Branches, length: int):
    b, n = branches.start.shape
    return transformer.init_branch_cache(cfg, b, n, length)
