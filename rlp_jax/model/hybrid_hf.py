"""Nemotron-H params back to a Hugging Face folder: `to_hf`, the inverse of `rlp_jax.model.hybrid.from_hf`.

The folder holds config.json (`layers_block_type` and every field `hybrid.config_from_hf` reads, so config and
params round-trip exactly) and the weights in transformers' `NemotronHForCausalLM` names and layouts, written
with the `safetensors` library: `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json` when the weights exceed `max_shard_bytes` (only one shard is in host memory at
a time). Tensor names use the `backbone.` prefix, as transformers' `save_pretrained` and NVIDIA's published
checkpoints do. Conventions of `rlp_jax.model.hf.to_hf`: float32 or bfloat16 tensors, multi-host arrays gathered
tensor by tensor with `process_allgather`, process 0 alone writes. One difference: a tied head (config
tie_word_embeddings) is still written as lm_head.weight, a copy of the embedding, because transformers'
`NemotronHForCausalLM` never ties its head (its `_tied_weights_keys` is empty) and would start it at random.

Layouts (ours -> theirs): linear weights [in, out] -> [out, in]; the Mamba conv [K, X] -> [X, 1, K]; vectors
as they are.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from rlp_jax.model import hybrid
from rlp_jax.model.hf import CheckpointError
from rlp_jax.model.hybrid import ATTENTION, MAMBA, HybridConfig, Params

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
MAX_SHARD_BYTES = 5 * 10 ** 9          # transformers' default shard size ("5GB")
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


def _host(leaf) -> np.ndarray:
    """A leaf as a host float32 array, gathered from the hosts that hold it when it spans processes."""
    import jax
    from jax.experimental import multihost_utils

    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(leaf.astype("float32") if hasattr(leaf, "astype") else leaf, dtype=np.float32)


def shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names (in order) grouped into shards of at most max_shard_bytes (a larger tensor alone)."""
    shards, current, used = [], [], 0
    for name, nbytes in sizes.items():
        if current and used + nbytes > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    return shards + [current] if current else shards


def _output_dir(path) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder; pass a folder path for the checkpoint")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the folder {out}: {e.strerror}") from None
    for stale in (*out.glob("model-*-of-*.safetensors"), out / "model.safetensors", out / "model.safetensors.index.json"):
        stale.unlink(missing_ok=True)   # an earlier export's weights would mix with these (save_pretrained does too)
    return out


def to_hf(params: Params, cfg: HybridConfig, out_dir: str | os.PathLike, *, dtype: str | None = None,
          max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write params (the pytree `hybrid.from_hf` returns, host or device arrays) as a folder that transformers'
    `NemotronHForCausalLM.from_pretrained` and `hybrid.from_hf` load.

    dtype: "float32" or "bfloat16" for the saved tensors (default: the embedding's dtype, bfloat16 if it is
    bfloat16, else float32). max_shard_bytes: above it, the weights go to several files and an index.
    Returns the folder. Multi-host: every process must call it; process 0 alone writes.
    Raises CheckpointError (one line) on params that do not match cfg, a bad dtype or an unusable out_dir."""
    import jax
    from safetensors.numpy import save_file

    if dtype is None:
        dtype = "bfloat16" if np.dtype(params["embed"].dtype) == DTYPES["bfloat16"] else "float32"
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use {' or '.join(DTYPES)}")
    _check_params(params, cfg)
    config = config_to_hf(cfg, dtype)
    np_dtype = DTYPES[dtype]
    entries = {name: (path, layout) for name, path, layout in tensor_names(cfg)}
    sizes = {name: math.prod(_leaf(params, path).shape) * np_dtype.itemsize for name, (path, _) in entries.items()}
    shards = shard_plan(sizes, max_shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    def gathered(names):    # every process gathers every tensor, in the same order
        return {name: np.ascontiguousarray(_theirs(_host(_leaf(params, entries[name][0])), entries[name][1]),
                                           dtype=np_dtype) for name in names}

    pending = (gathered(names) for names in shards)
    if jax.process_index() != 0:
        for _ in pending:
            pass
        return Path(out_dir)
    try:
        out = _output_dir(out_dir)
        for fname, tensors in zip(files, pending):
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
    finally:
        for _ in pending:   # after a failure too: the other hosts' gathers must complete
            pass
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: fname for fname, names in zip(files, shards) for name in names}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
