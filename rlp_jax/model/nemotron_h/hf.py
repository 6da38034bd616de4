"""Nemotron-H params back to a Hugging Face folder: `to_hf`, the inverse of `nemotron_h.hybrid.from_hf`.

The folder holds config.json (`layers_block_type` and every field `hybrid.config_from_hf` reads, so config and
params round-trip exactly) and the weights in transformers' `NemotronHForCausalLM` names and layouts, written
by `rlp_jax.model.safetensors_io.write_folder` (the dense family's writer too: dtype policy, shards, multi-host).
Tensor names use the `backbone.` prefix, as transformers' `save_pretrained` and NVIDIA's published checkpoints
do. A tied head (config tie_word_embeddings) is still written as lm_head.weight, a copy of the embedding,
because transformers' `NemotronHForCausalLM` never ties its head (its `_tied_weights_keys` is empty) and would
start it at random.

Layouts (ours -> theirs): linear weights [in, out] -> [out, in]; the Mamba conv [K, X] -> [X, 1, K]; vectors
as they are.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from rlp_jax.model.nemotron_h import hybrid
from rlp_jax.model.nemotron_h.hybrid import ATTENTION, MAMBA, HybridConfig, Params
from rlp_jax.model.safetensors_io import (
    MAX_SHARD_BYTES,
    CheckpointError,
    Tensor,
    host_float32,
    stored_dtype,
    write_folder,
)

_ROOT = "backbone."
# (our key in a block's mixer, their name after "<root>layers.<i>.mixer.", layout) for each block type;
# optional entries are written when the params hold them (the config's bias switches say which they must)
_MIXER_NAMES = {
    MAMBA: [("in_proj", "in_proj.weight", "linear"), ("in_proj_b", "in_proj.bias", "copy"),
            ("conv_w", "conv1d.weight", "conv"), ("conv_b", "conv1d.bias", "copy"),
            ("dt_bias", "dt_bias", "copy"), ("A_log", "A_log", "copy"), ("D", "D", "copy"),
            ("norm", "norm.weight", "copy"), ("out_proj", "out_proj.weight", "linear"),
            ("out_proj_b", "out_proj.bias", "copy")],
    ATTENTION: [(k, f"{k}_proj.weight", "linear") for k in ("q", "k", "v", "o")],
    hybrid.MLP: [("up", "up_proj.weight", "linear"), ("up_b", "up_proj.bias", "copy"),
                 ("down", "down_proj.weight", "linear"), ("down_b", "down_proj.bias", "copy")],
}


def _json_number(x: float):
    """A float as transformers writes it in config.json: infinities and NaN as {"__float__": "Infinity"}."""
    return x if math.isfinite(x) else {"__float__": "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")}


def config_to_hf(cfg: HybridConfig, dtype: str) -> dict:
    """A config.json dict that transformers loads as `NemotronHForCausalLM` and `hybrid.config_from_hf` reads
    back as `cfg`."""
    m = cfg.mamba
    if m.eps != cfg.eps:
        raise CheckpointError(f"the Mamba norm eps {m.eps} differs from the block norms' {cfg.eps}; Nemotron-H's "
                              "config.json has one layer_norm_epsilon for both")
    return {
        "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "layers_block_type": list(cfg.block_types),
        "num_hidden_layers": len(cfg.block_types), "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
        "mamba_num_heads": m.num_heads, "mamba_head_dim": m.head_dim, "n_groups": m.n_groups,
        "ssm_state_size": m.state_size, "conv_kernel": m.conv_kernel, "chunk_size": m.chunk_size,
        "time_step_limit": [_json_number(float(v)) for v in m.dt_limit], "layer_norm_epsilon": cfg.eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "use_bias": cfg.use_bias, "use_conv_bias": cfg.use_conv_bias,
        "mlp_bias": cfg.mlp_bias, "attention_bias": False, "mamba_hidden_act": "silu", "mlp_hidden_act": "relu2",
        "num_nextn_predict_layers": 0, "max_position_embeddings": cfg.max_position_embeddings, "torch_dtype": dtype,
        "dtype": dtype,
    }


def tensor_names(cfg: HybridConfig) -> Iterator[tuple[str, tuple, str]]:
    """(their tensor name, path of the leaf in our params, layout) for every tensor `cfg` implies, in
    transformers' module order."""
    have = hybrid.param_shapes(cfg)
    yield _ROOT + "embeddings.weight", ("embed",), "copy"
    for i, (kind, block) in enumerate(zip(cfg.block_types, have["blocks"])):
        yield f"{_ROOT}layers.{i}.norm.weight", ("blocks", i, "norm"), "copy"
        for ours, theirs, layout in _MIXER_NAMES[kind]:
            if ours in block["mixer"]:
                yield f"{_ROOT}layers.{i}.mixer.{theirs}", ("blocks", i, "mixer", ours), layout
    yield _ROOT + "norm_f.weight", ("final_norm",), "copy"
    if cfg.tie_word_embeddings:    # transformers' Nemotron-H reads its head from the file whatever config.json says
        yield "lm_head.weight", ("embed",), "copy"
    else:
        yield "lm_head.weight", ("lm_head",), "linear"


def _theirs(arr: np.ndarray, layout: str) -> np.ndarray:
    """Our layout -> transformers': linear [in, out] -> [out, in]; conv [K, X] -> [X, 1, K]."""
    if layout == "linear":
        return arr.T
    if layout == "conv":
        return arr.T[:, None, :]
    return arr


def _leaf(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _check_params(params: Params, cfg: HybridConfig) -> None:
    """params hold exactly the tensors cfg implies, with their shapes (one-line CheckpointError otherwise)."""
    import jax

    def flat(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
        return {jax.tree_util.keystr(path): shape for path, shape in leaves}

    want = flat(hybrid.param_shapes(cfg))
    got = flat(jax.tree.map(lambda a: tuple(np.shape(a)), params))
    if want.keys() != got.keys():
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        raise CheckpointError(f"params do not match the config: missing {missing[:3]}, unexpected {extra[:3]}; pass "
                              "the params this HybridConfig was loaded or built with")
    for key, shape in want.items():
        if got[key] != shape:
            raise CheckpointError(f"params{key} has shape {got[key]}, the config implies {shape}; pass the params "
                                  "this HybridConfig was loaded or built with")


def to_hf(params: Params, cfg: HybridConfig, out_dir: str | os.PathLike, *, dtype: str | None = None,
          max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write params (the pytree `hybrid.from_hf` returns, host or device arrays) as a folder that transformers'
    `NemotronHForCausalLM.from_pretrained` and `hybrid.from_hf` load.

    dtype: "float32" or "bfloat16" for the saved tensors (default: the params' own, `stored_dtype`).
    max_shard_bytes: above it, the weights go to several files and an index. Returns the folder. Multi-host:
    every process must call it; process 0 alone writes. Raises CheckpointError (one line) on params that do not
    match cfg, a bad dtype or an unusable out_dir."""
    _check_params(params, cfg)
    dtype = dtype or stored_dtype(params["embed"])
    tensors = {}
    for name, path, layout in tensor_names(cfg):
        leaf = _leaf(params, path)
        theirs = tuple(_theirs(np.empty(leaf.shape, np.int8), layout).shape)
        tensors[name] = Tensor(theirs, lambda leaf=leaf, layout=layout: _theirs(host_float32(leaf), layout))
    return write_folder(out_dir, tensors, config_to_hf(cfg, dtype), dtype, max_shard_bytes=max_shard_bytes)
