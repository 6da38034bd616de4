"""Hugging Face checkpoint interop of the dense family: `from_hf` and `to_hf` for Qwen3, Qwen2 and Llama.

The names, layouts and config.json of these architectures; the files are read and written by
`rlp_jax.model.safetensors_io` (safetensors only, one tensor at a time on read, one shard at a time on write).
transformers is not needed here; tests use it to check that the logits match.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from rlp_jax.model.dense.config import ModelConfig
from rlp_jax.model.safetensors_io import (MAX_SHARD_BYTES, CheckpointError, SafetensorsReader, Tensor,
                                          declared_dtype, host_float32, stored_dtype, write_folder)

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}

# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------

def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (transformers 4 or 5 layout)."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None and hf.get("model_type") == "nemotron_h":
        raise CheckpointError("a Nemotron-H (hybrid Mamba-2) checkpoint: read it with rlp_jax.model.family.from_hf "
                              "(rlp_jax.model.nemotron_h.hybrid); this module reads the dense families")
    if arch is None:
        raise CheckpointError(f"unsupported architecture {archs or hf.get('model_type')}; "
                              f"supported: {', '.join(ARCHITECTURES)}")
    family = ARCHITECTURES[arch]
    if hf.get("mlp_bias"):
        raise CheckpointError("mlp_bias=True is not supported (no Qwen3/Qwen2/Llama release uses it)")
    rope = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)}; is it a causal LM's config?")
    heads = hf["num_attention_heads"]
    kwargs = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rope_theta=float(theta),
        rope_scaling=scaling, rms_norm_eps=hf.get("rms_norm_eps", 1e-6), qk_norm=family == "qwen3",
        attention_bias=True if family == "qwen2" else bool(hf.get("attention_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", family != "llama")),
        max_position_embeddings=int(hf.get("max_position_embeddings") or 32768),
    )
    kwargs.update(overrides)
    try:
        return ModelConfig(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"config.json describes a model rlp_jax cannot build: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    """A config.json dict that transformers loads as Qwen3/Qwen2/Llama (chosen from the config switches)."""
    if cfg.qk_norm:
        arch, model_type = "Qwen3ForCausalLM", "qwen3"
    elif cfg.attention_bias:
        arch, model_type = "Qwen2ForCausalLM", "qwen2"
    else:
        arch, model_type = "LlamaForCausalLM", "llama"
    out = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings, "torch_dtype": dtype, "dtype": dtype,
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    if model_type != "qwen2":
        out["attention_bias"] = cfg.attention_bias
    return out


# ----------------------------------------------------------------------------------------------
# Tensor names
# ----------------------------------------------------------------------------------------------

def _hf_names(cfg: ModelConfig) -> Iterator[tuple[tuple[str, ...], str, str]]:
    """(path in our params, HF name with {i} for the layer, layout kind) for every parameter."""
    yield ("embed",), "model.embed_tokens.weight", "copy"
    yield ("final_norm",), "model.norm.weight", "copy"
    if not cfg.tie_word_embeddings:
        yield ("lm_head",), "lm_head.weight", "transpose"
    p = "model.layers.{i}."
    layer = [("attn_norm", "input_layernorm.weight", "copy"),
             ("mlp_norm", "post_attention_layernorm.weight", "copy"),
             ("q_proj", "self_attn.q_proj.weight", "in_heads"),
             ("k_proj", "self_attn.k_proj.weight", "in_heads"),
             ("v_proj", "self_attn.v_proj.weight", "in_heads"),
             ("o_proj", "self_attn.o_proj.weight", "heads_out"),
             ("gate_proj", "mlp.gate_proj.weight", "transpose"),
             ("up_proj", "mlp.up_proj.weight", "transpose"),
             ("down_proj", "mlp.down_proj.weight", "transpose")]
    if cfg.attention_bias:
        layer += [(f"{x}_bias", f"self_attn.{x}_proj.bias", "heads") for x in "qkv"]
    if cfg.qk_norm:
        layer += [("q_norm", "self_attn.q_norm.weight", "copy"), ("k_norm", "self_attn.k_norm.weight", "copy")]
    for ours, theirs, kind in layer:
        yield ("layers", ours), p + theirs, kind


def _to_ours(arr: np.ndarray, kind: str, shape: tuple) -> np.ndarray:
    """HF torch layout -> ours. shape is our per-layer shape (without the layers axis)."""
    if kind == "copy":
        return arr.reshape(shape)
    if kind == "transpose":
        return arr.T
    if kind == "in_heads":  # [H*Dh, D] -> [D, H, Dh]
        return arr.T.reshape(shape)
    if kind == "heads_out":  # [D, H*Dh] -> [H, Dh, D]
        return arr.T.reshape(shape)
    if kind == "heads":  # [H*Dh] -> [H, Dh]
        return arr.reshape(shape)
    raise AssertionError(kind)


def _ours_slice(get, kind: str, shape: tuple, index: tuple, theirs: tuple) -> np.ndarray:
    """Part `index` (slices with explicit bounds over our per-layer `shape`) of a tensor in our layout,
    read from its HF-layout source through `get(their_index)`, which is asked only for the rows and
    columns the part covers (whole heads: a head-width slice reads its heads and cuts after)."""
    if kind == "copy" and tuple(theirs) == tuple(shape):
        return get(index)
    if kind == "transpose":
        return get((index[1], index[0])).T
    heads = index[0] if kind in ("heads", "heads_out") else index[1]
    width = shape[1] if kind in ("heads", "heads_out") else shape[2]
    rows = slice(heads.start * width, heads.stop * width)
    if kind == "heads":    # [H*Dh] -> [H, Dh]
        return get((rows,)).reshape(-1, width)[:, index[1]]
    if kind == "in_heads":    # [H*Dh, D] -> [D, H, Dh]
        return get((rows, index[0])).T.reshape(index[0].stop - index[0].start, -1, width)[:, :, index[2]]
    if kind == "heads_out":   # [D, H*Dh] -> [H, Dh, D]
        return get((index[2], rows)).T.reshape(-1, width, index[2].stop - index[2].start)[:, index[1], :]
    return _to_ours(get(None), kind, shape)[index]


def leaf_reader(cfg: ModelConfig, get, shape_of):
    """`weights.assemble`'s reader over a checkpoint in HF names and layout: get(name, their_index or None)
    -> np.ndarray, shape_of(name) -> their shape (checked against the config before anything is read)."""
    from rlp_jax.model.dense.weights import param_shapes

    shapes = param_shapes(cfg)
    names = {key: (name, kind) for key, name, kind in _hf_names(cfg)}

    def read(path: tuple, index: tuple) -> np.ndarray:
        name, kind = names[path]
        if path[0] != "layers":
            theirs = shape_of(name)
            _check_shape(name, theirs, shapes[path[0]])
            return _ours_slice(lambda i: get(name, i), kind, shapes[path[0]], index, theirs)
        shape, out = shapes["layers"][path[1]][1:], None
        for n, i in enumerate(range(index[0].start, index[0].stop)):   # into one array, a layer at a time
            layer = name.format(i=i)
            theirs = shape_of(layer)
            _check_shape(layer, theirs, shape)
            part = _ours_slice(lambda j: get(layer, j), kind, shape, index[1:], theirs)
            if out is None:
                out = np.empty((index[0].stop - index[0].start, *part.shape), part.dtype)
            out[n] = part
        return out

    return read


def _to_theirs(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind in ("copy",):
        return arr
    if kind == "transpose":
        return arr.T
    if kind == "in_heads":  # [D, H, Dh] -> [H*Dh, D]
        return arr.reshape(arr.shape[0], -1).T
    if kind == "heads_out":  # [H, Dh, D] -> [D, H*Dh]
        return arr.reshape(-1, arr.shape[-1]).T
    if kind == "heads":
        return arr.reshape(-1)
    raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def from_hf(path: str | os.PathLike, *, param_dtype: str | None = None, mesh=None, **config_overrides):
    """Load a local Hugging Face checkpoint directory into (ModelConfig, params).

    Args:
      path: directory with config.json and model.safetensors (or a sharded safetensors index).
      param_dtype: "float32"/"bfloat16" for the loaded params; default: the checkpoint's own dtype
        (float16 checkpoints load as float32).
      mesh: a `jax.sharding.Mesh` to load onto: every parameter becomes a global `jax.Array` with its
        `param_logical_axes` sharding, and this process reads from the files only the slices its own
        devices hold (`weights.assemble`). None: whole host numpy arrays, nothing on a device.
      config_overrides: extra ModelConfig fields (e.g. compute_dtype, remat).
    Returns:
      (ModelConfig, params pytree, layers stacked on a leading axis).
    """
    from rlp_jax.model.dense.weights import assemble

    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory at {directory}: expected a Hugging Face model "
                              "folder with config.json and *.safetensors")
    cfg_file = directory / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e})") from None
    param_dtype = param_dtype or declared_dtype(hf)
    cfg = config_from_hf(hf, param_dtype=param_dtype, **config_overrides)
    reader = SafetensorsReader(directory)
    return cfg, assemble(cfg, leaf_reader(cfg, reader.get, reader.shape), mesh)


def _check_shape(name: str, theirs: tuple, ours: tuple) -> None:
    if int(np.prod(theirs)) != int(np.prod(ours)):
        raise CheckpointError(f"tensor {name} has shape {tuple(theirs)}, config.json implies {int(np.prod(ours))} "
                              "elements; the checkpoint and its config.json disagree")


def to_hf(params, cfg: ModelConfig, path: str | os.PathLike, *, dtype: str | None = None,
          tokenizer_dir: str | os.PathLike | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write params as a Hugging Face checkpoint directory that `transformers` loads (`safetensors_io.write_folder`).

    Args:
      params: our params pytree. cfg: its ModelConfig. path: output directory (created).
      dtype: "float32" or "bfloat16" for the saved tensors (default: the params' own, `stored_dtype`).
      tokenizer_dir: optional directory whose tokenizer files are copied alongside.
      max_shard_bytes: above it, the weights go to several files and an index.
    Returns: the output directory. Multi-host: every process must call it; process 0 alone writes.
    """
    dtype = dtype or stored_dtype(params["embed"])
    tensors = {}
    for key, name, kind in _hf_names(cfg):
        leaf = params[key[0]] if len(key) == 1 else params[key[0]][key[1]]
        for i in range(cfg.num_layers) if key[0] == "layers" else (None,):
            one = tuple(leaf.shape if i is None else leaf.shape[1:])
            theirs = tuple(_to_theirs(np.empty(one, np.int8), kind).shape)
            fetch = (lambda leaf=leaf, i=i, kind=kind: _to_theirs(host_float32(leaf if i is None else leaf[i]), kind))
            tensors[name if i is None else name.format(i=i)] = Tensor(theirs, fetch)
    out = write_folder(path, tensors, config_to_hf(cfg, dtype), dtype, max_shard_bytes=max_shard_bytes)
    import jax

    if tokenizer_dir is not None and jax.process_index() == 0:
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json",
                                                            "merges.txt") or f.suffix == ".model":
                shutil.copy(f, out / f.name)
    return out
