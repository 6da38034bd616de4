"""NVIDIA Nemotron-H (Mamba-2 / attention / MLP blocks) as a `rlp_jax.model.family.Family`: the hybrid's own
functions (`hybrid`, `branch`, `hf`) adapted to the interface's signatures.

Differences callers honour (`rlp_jax.model.family` says them): a prefix is built for given branch positions
(`forward(..., return_cache=True, branch_positions_bk=[B, K])`) and serves G branches per position in order;
decoding from prompts runs one branch per prompt off the prompt's end; no prompt context (`rlp.prompt`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlp_jax import sharding
from rlp_jax.model import mamba2
from rlp_jax.model.branches import Branches
from rlp_jax.model.nemotron_h import branch, hf, hybrid
from rlp_jax.model.nemotron_h.hybrid import HybridConfig
from rlp_jax.model.safetensors_io import (
    MAX_SHARD_BYTES,
    CheckpointError,
    declared_dtype,
)

NAME = "nemotron_h"
CONFIG = HybridConfig
PRESET_NAMES = tuple(hybrid.PRESETS)
SUPPORTS_PROMPT = False
Prefix = branch.HybridPrefix
preset = hybrid.preset
init_params = hybrid.init_params
param_logical_axes = hybrid.param_logical_axes
param_shapes = hybrid.param_shapes
logits_from_hidden = hybrid.logits_from_hidden


def claims_hf_config(hf_config: dict) -> bool:
    return (hf_config.get("model_type") == "nemotron_h"
            or "NemotronHForCausalLM" in (hf_config.get("architectures") or []))


def claims_fields(fields: dict) -> bool:
    return "block_types" in fields


def config_from_dict(fields: dict) -> HybridConfig:
    m = dict(fields["mamba"], dt_limit=tuple(fields["mamba"]["dt_limit"]))
    return HybridConfig(**{**fields, "block_types": tuple(fields["block_types"]), "mamba": mamba2.Mamba2Config(**m)})


def config_from_hf(hf_config: dict, **numerics) -> HybridConfig:
    try:
        return hybrid.config_from_hf(hf_config, **numerics)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def from_hf(path, *, param_dtype: str | None = None, mesh=None, **numerics):
    """`hybrid.from_hf` (read whole on every host), cast to param_dtype (default: the checkpoint's own,
    `safetensors_io.declared_dtype`) and placed on the mesh when given."""
    try:
        declared = declared_dtype(json.loads((Path(path) / "config.json").read_text()))
    except (OSError, ValueError):
        declared = "float32"              # hybrid.from_hf says what is wrong with the folder, in one line
    numerics["param_dtype"] = param_dtype or declared
    try:
        cfg, params = hybrid.from_hf(path, **numerics)
    except ValueError as e:   # an unsupported config (checked before any tensor is read), in one line
        raise CheckpointError(str(e)) from None
    params = jax.tree.map(lambda a: a.astype(cfg.jnp_param_dtype), params)
    if mesh is not None:
        params = jax.device_put(params, sharding.tree_shardings(param_logical_axes(cfg), params, mesh))
    return cfg, params


def to_hf(params: dict, cfg: HybridConfig, path, *, dtype: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    return hf.to_hf(params, cfg, path, dtype=dtype, max_shard_bytes=max_shard_bytes)


def context_cache(params: dict, cfg: HybridConfig, prompt_ids_p):
    raise ValueError("a prompt context (rlp.prompt) is not supported for Nemotron-H models; leave rlp.prompt unset")


def forward(params: dict, cfg: HybridConfig, tokens_bl, *, segment_ids_bl=None, positions_bl=None,
            return_cache: bool = False, return_logits: bool = True, logits_at_b=None, return_hidden: bool = False,
            context=None, branch_positions_bk=None):
    """Positions are unused (Nemotron-H has no position encoding; each packed segment's Mamba state starts from
    zero); return_cache needs branch_positions_bk [B, K] (the prefix holds the Mamba states after x_<t there)."""
    if context is not None:
        context_cache(params, cfg, ())   # the one-line refusal
    if return_cache and branch_positions_bk is None:
        raise ValueError("a Nemotron-H prefix is built for given branch positions: pass branch_positions_bk [B, K]")
    seg_bl = jnp.ones(tokens_bl.shape, jnp.int32) if segment_ids_bl is None else segment_ids_bl.astype(jnp.int32)
    t_bk = jnp.asarray(branch_positions_bk, jnp.int32) if return_cache else None
    x, caches = hybrid.run_blocks(params, cfg, tokens_bl, seg_bl, positions_bm=t_bk)
    if logits_at_b is not None:
        x = jnp.take_along_axis(x, logits_at_b.astype(jnp.int32)[:, None, None], axis=1)[:, 0]   # [B, D]
    out = x if return_hidden else (hybrid.logits_from_hidden(params, cfg, x) if return_logits else None)
    return out, (branch.HybridPrefix(caches, seg_bl, t_bk) if return_cache else None)


def branches_at(prefix: branch.HybridPrefix, t_bn) -> Branches:
    """t_bn must repeat the prefix's positions, G per position in order (branch n = k G + g)."""
    t_bn = jnp.asarray(t_bn, jnp.int32)
    return Branches(start=t_bn, segment=jnp.ones_like(t_bn), position=t_bn)


def init_branch_cache(cfg: HybridConfig, prefix: branch.HybridPrefix, branches: Branches, length: int):
    return branch.init_branch_cache(cfg, prefix, branches.start.shape[1] // prefix.t.shape[1], length)


def branch_forward(params: dict, cfg: HybridConfig, prefix: branch.HybridPrefix, branches: Branches, tokens_bns, *,
                   cache=None, offset=0, return_hidden: bool = False):
    """With a cache: one token a call (S = 1) at the cache's own step (`offset` must equal it), logits only."""
    b, n, s = tokens_bns.shape
    if cache is not None:
        if s != 1 or return_hidden:
            raise ValueError("a Nemotron-H branch cache decodes one token a call and returns logits")
        logits, cache = branch.decode_step(params, cfg, prefix, cache, tokens_bns[:, :, 0])
        return logits[:, :, None], cache
    k = prefix.t.shape[1]
    out = branch.branch_forward(params, cfg, prefix, tokens_bns.reshape(b, k, n // k, s), return_hidden=return_hidden)
    return out.reshape(b, n, s, -1), None


class DecodeState(NamedTuple):
    """Decoding from prompts: the prompts' prefix (states after each whole prompt) and one branch per row."""

    prefix: branch.HybridPrefix
    cache: branch.BranchCache


def prefill(params: dict, cfg: HybridConfig, prompts_bl, prompt_lens_b, max_new_tokens: int):
    lens = jnp.asarray(prompt_lens_b, jnp.int32)
    seg = (jnp.arange(prompts_bl.shape[1])[None, :] < lens[:, None]).astype(jnp.int32)
    last, prefix = forward(params, cfg, prompts_bl, segment_ids_bl=seg, return_cache=True, logits_at_b=lens - 1,
                           branch_positions_bk=lens[:, None])
    return last, DecodeState(prefix, branch.init_branch_cache(cfg, prefix, 1, max_new_tokens))


def split_layers(params: dict) -> dict:
    return params   # the blocks are already a list


def decode_step(params: dict, cfg: HybridConfig, state: DecodeState, tokens_b):
    logits, cache = branch.decode_step(params, cfg, state.prefix, state.cache, tokens_b[:, None])
    return logits[:, 0], state._replace(cache=cache)
