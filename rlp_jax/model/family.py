"""The model interface that RLP, training and evaluation call, for both model families, chosen by the config:

  `ModelConfig`          the dense decoder (Qwen3 / Qwen2 / Llama): `rlp_jax.model.transformer`
  `hybrid.HybridConfig`  NVIDIA Nemotron-H (Mamba-2 / attention / MLP blocks): `hybrid` + `hybrid_branch`

Every function takes the transformer's signature; the hybrid's own functions are adapted here. One difference
callers honour: a hybrid's prefix holds each Mamba block's state after x_<t for the positions t it was built
for, so `forward(..., return_cache=True)` of a hybrid needs `branch_positions_bk` [B, K], and branches taken off
that prefix must be `branches_at(prefix, repeat(branch_positions_bk, G, axis=1))`: G per position, in order
(branch n = k G + g). A transformer's prefix serves branches at any position and ignores branch_positions_bk.
Decoding from prompts (`prefill` / `decode_step`) runs a hybrid as one branch per prompt, off the prompt's end.
Not supported for a hybrid: a prompt context (`rlp.prompt`).

Shapes: B rows, L tokens, K branch positions per row, N branches per row, S branch tokens, C cache slots,
V vocabulary, D width.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlp_jax import sharding
from rlp_jax.model import hf, hybrid, hybrid_branch, hybrid_hf, mamba2, transformer
from rlp_jax.model.config import PRESETS, ModelConfig
from rlp_jax.model.hybrid import HybridConfig

Config = ModelConfig | HybridConfig
PRESET_NAMES = (*PRESETS, *hybrid.PRESETS)


def is_hybrid(cfg: Config) -> bool:
    return isinstance(cfg, HybridConfig)


def _impl(cfg: Config):
    return hybrid if is_hybrid(cfg) else transformer


# ----------------------------------------------------------------------------------------------
# Configs and parameters
# ----------------------------------------------------------------------------------------------

def preset(name: str, **numerics) -> Config:
    """A named size of either family (`ModelConfig.preset`, `hybrid.preset`) with `Numerics` fields set."""
    if name in hybrid.PRESETS:
        return hybrid.preset(name, **numerics)
    return ModelConfig.preset(name, **numerics)


def config_from_dict(fields: dict) -> Config:
    """The config `dataclasses.asdict` wrote (a run record's "model_full"), of either family."""
    if "block_types" not in fields:
        return ModelConfig(**fields)
    m = dict(fields["mamba"], dt_limit=tuple(fields["mamba"]["dt_limit"]))
    return HybridConfig(**{**fields, "block_types": tuple(fields["block_types"]), "mamba": mamba2.Mamba2Config(**m)})


def _is_nemotron_h(hf_config: dict) -> bool:
    return hf_config.get("model_type") == "nemotron_h" or "NemotronHForCausalLM" in (hf_config.get("architectures") or [])


def config_from_hf(hf_config: dict, **numerics) -> Config:
    """The config of a Hugging Face config.json dict, of either family; hf.CheckpointError (one line) if unsupported."""
    if not _is_nemotron_h(hf_config):
        return hf.config_from_hf(hf_config, **numerics)
    try:
        return hybrid.config_from_hf(hf_config, **numerics)
    except ValueError as e:
        raise hf.CheckpointError(str(e)) from None


def from_hf(path, *, param_dtype: str | None = None, mesh=None, **numerics) -> tuple[Config, dict]:
    """(config, params) of a Hugging Face checkpoint folder of either family (`hf.from_hf`, `hybrid.from_hf`).
    With a mesh the params are global arrays sharded by `param_logical_axes` (a hybrid's are read whole on every
    host, then placed); without, host numpy arrays in param_dtype."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):   # missing or not JSON: the dense reader says which, in one line
        raw = {}
    if not _is_nemotron_h(raw):
        return hf.from_hf(path, param_dtype=param_dtype, mesh=mesh, **numerics)
    if param_dtype is not None:
        numerics["param_dtype"] = param_dtype
    try:
        cfg, params = hybrid.from_hf(path, **numerics)
    except ValueError as e:   # an unsupported config (checked before any tensor is read), in one line
        raise hf.CheckpointError(str(e)) from None
    params = jax.tree.map(lambda a: a.astype(cfg.jnp_param_dtype), params)
    if mesh is not None:
        params = jax.device_put(params, sharding.tree_shardings(param_logical_axes(cfg), params, mesh))
    return cfg, params


def to_hf(params: dict, cfg: Config, path, *, dtype: str | None = None) -> Path:
    """Write params as a Hugging Face folder of their family (`hf.to_hf`, `hybrid_hf.to_hf`); multi-host: every
    process calls it, process 0 writes."""
    if is_hybrid(cfg):
        return hybrid_hf.to_hf(params, cfg, path, dtype=dtype or cfg.param_dtype)
    return hf.to_hf(params, cfg, path, dtype=dtype)


def init_params(cfg: Config, rng) -> dict:
    return _impl(cfg).init_params(cfg, rng)


def param_logical_axes(cfg: Config) -> dict:
    return _impl(cfg).param_logical_axes(cfg)


def param_shapes(cfg: Config) -> dict:
    return _impl(cfg).param_shapes(cfg)


# ----------------------------------------------------------------------------------------------
# The forward modes RLP uses
# ----------------------------------------------------------------------------------------------

def logits_from_hidden(cfg: Config, params: dict, x):
    """Final norm and output projection: hidden [..., D] -> logits [..., V] float32."""
    if is_hybrid(cfg):
        return hybrid.logits_from_hidden(params, cfg, x)
    return transformer.logits_from_hidden(cfg, params, x)


def supports_prompt(cfg: Config) -> bool:
    """Whether the family reads documents after a shared prompt context (`context_cache`; not Nemotron-H)."""
    return not is_hybrid(cfg)


def context_cache(params: dict, cfg: Config, prompt_ids_p):
    """`transformer.context_cache` (a prompt every document is read after); not for a hybrid."""
    if is_hybrid(cfg):
        raise ValueError("a prompt context (rlp.prompt) is not supported for Nemotron-H models; leave rlp.prompt unset")
    return transformer.context_cache(params, cfg, prompt_ids_p)


def forward(params: dict, cfg: Config, tokens_bl, *, segment_ids_bl=None, positions_bl=None,
            return_cache: bool = False, return_logits: bool = True, logits_at_b=None, return_hidden: bool = False,
            context=None, branch_positions_bk=None):
    """`transformer.forward` for either family. For a hybrid: positions are unused (Nemotron-H has no position
    encoding; each packed segment's Mamba state starts from zero), and return_cache needs branch_positions_bk
    [B, K] (the prefix then holds the Mamba states after x_<t at those t: `hybrid_branch.HybridPrefix`)."""
    if not is_hybrid(cfg):
        return transformer.forward(params, cfg, tokens_bl, segment_ids_bl=segment_ids_bl, positions_bl=positions_bl,
                                   return_cache=return_cache, return_logits=return_logits, logits_at_b=logits_at_b,
                                   return_hidden=return_hidden, context=context)
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
    return out, (hybrid_branch.HybridPrefix(caches, seg_bl, t_bk) if return_cache else None)


def branches_at(prefix, t_bn) -> transformer.Branches:
    """`transformer.branches_at`; for a hybrid prefix, t_bn must repeat its positions (see the module doc)."""
    if isinstance(prefix, hybrid_branch.HybridPrefix):
        t_bn = jnp.asarray(t_bn, jnp.int32)
        return transformer.Branches(start=t_bn, segment=jnp.ones_like(t_bn), position=t_bn)
    return transformer.branches_at(prefix, t_bn)


def init_branch_cache(cfg: Config, prefix, branches: transformer.Branches, length: int):
    """An empty cache of `length` (C) slots for the branches [B, N] of `prefix`, for token-by-token sampling."""
    b, n = branches.start.shape
    if is_hybrid(cfg):
        return hybrid_branch.init_branch_cache(cfg, prefix, n // prefix.t.shape[1], length)
    return transformer.init_branch_cache(cfg, b, n, length)


def branch_forward(params: dict, cfg: Config, prefix, branches: transformer.Branches, tokens_bns, *, cache=None,
                   offset=0, return_hidden: bool = False):
    """`transformer.branch_forward` for either family: logits [B, N, S, V] (hidden [B, N, S, D] with return_hidden)
    and the cache after the tokens (None without one). A hybrid with a cache takes one token a call (S = 1), at
    the cache's own step (`offset` must equal it, as token-by-token sampling does)."""
    if not is_hybrid(cfg):
        return transformer.branch_forward(params, cfg, prefix, branches, tokens_bns, cache=cache, offset=offset,
                                          return_hidden=return_hidden)
    b, n, s = tokens_bns.shape
    if cache is not None:
        if s != 1 or return_hidden:
            raise ValueError("a Nemotron-H branch cache decodes one token a call and returns logits")
        logits, cache = hybrid_branch.decode_step(params, cfg, prefix, cache, tokens_bns[:, :, 0])
        return logits[:, :, None], cache
    k = prefix.t.shape[1]
    out = hybrid_branch.branch_forward(params, cfg, prefix, tokens_bns.reshape(b, k, n // k, s),
                                       return_hidden=return_hidden)
    return out.reshape(b, n, s, -1), None


# ----------------------------------------------------------------------------------------------
# Decoding from prompts (generation, evaluation)
# ----------------------------------------------------------------------------------------------

class HybridDecodeState(NamedTuple):
    """A hybrid's decoding state: the prompts' prefix (states after each whole prompt) and one branch per row."""

    prefix: hybrid_branch.HybridPrefix
    cache: hybrid_branch.BranchCache


def prefill(params: dict, cfg: Config, prompts_bl, prompt_lens_b, max_new_tokens: int):
    """`transformer.prefill` for either family: (logits of each prompt's last token [B, V] float32, decode state)
    of right-padded prompts [B, L] with lengths [B] (>= 1)."""
    if not is_hybrid(cfg):
        return transformer.prefill(params, cfg, prompts_bl, prompt_lens_b, max_new_tokens)
    lens = jnp.asarray(prompt_lens_b, jnp.int32)
    seg = (jnp.arange(prompts_bl.shape[1])[None, :] < lens[:, None]).astype(jnp.int32)
    last, prefix = forward(params, cfg, prompts_bl, segment_ids_bl=seg, return_cache=True, logits_at_b=lens - 1,
                           branch_positions_bk=lens[:, None])
    return last, HybridDecodeState(prefix, hybrid_branch.init_branch_cache(cfg, prefix, 1, max_new_tokens))


def split_layers(params: dict) -> dict:
    """`transformer.split_layers` (per-layer weights for a decode loop); a hybrid's blocks are already a list."""
    return transformer.split_layers(params) if "layers" in params else params


def decode_step(params: dict, cfg: Config, state, tokens_b):
    """`transformer.decode_step` for either family: feed one token per row [B] -> (next-token logits [B, V], state)."""
    if not is_hybrid(cfg):
        return transformer.decode_step(params, cfg, state, tokens_b)
    logits, cache = hybrid_branch.decode_step(params, cfg, state.prefix, state.cache, tokens_b[:, None])
    return logits[:, 0], state._replace(cache=cache)
