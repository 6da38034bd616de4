"""Hugging Face checkpoint interop: `from_hf` and `to_hf` for Qwen3, Qwen2 and Llama causal LMs.

Only safetensors are read or written (pickled `.bin` files are refused: unpickling a downloaded file
can run arbitrary code). Tensors are read one at a time from a memory map and written one at a time,
so conversion never holds two copies of the model in host memory. transformers is not needed here;
tests use it to check that the logits match.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from rlp_jax.model.config import ModelConfig

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A Hugging Face checkpoint that cannot be read or converted (message says what and how to fix)."""


# ----------------------------------------------------------------------------------------------
# safetensors, read and written tensor by tensor
# ----------------------------------------------------------------------------------------------

def _open(path: Path):
    """`safetensors.safe_open` (numpy, bf16 through ml_dtypes); a damaged file is a one-line CheckpointError."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="np")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}); it is truncated or not a safetensors "
                              "file: download or export the checkpoint again") from None


def _tensor_index(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single file or sharded index)."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / fname for name, fname in weight_map.items()}
    if single.exists():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory} holds only pickled PyTorch weights (.bin/.pt), which rlp_jax refuses to unpickle; "
            "convert them once with transformers: AutoModelForCausalLM.from_pretrained(DIR)"
            ".save_pretrained(DIR, safe_serialization=True)")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {directory}")


class SafetensorsReader:
    """The tensors of a checkpoint directory, read one at a time through the safetensors library."""

    def __init__(self, directory: Path):
        self.files = _tensor_index(directory)
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, index: tuple | None = None) -> np.ndarray:
        """Tensor `name`, or only its part `index` (a tuple of slices: just those bytes are read)."""
        return self._read(name, lambda f: f.get_tensor(name) if index is None else np.asarray(f.get_slice(name)[index]))

    def shape(self, name: str) -> tuple:
        return self._read(name, lambda f: tuple(f.get_slice(name).get_shape()))

    def _read(self, name: str, what):
        """`what(open file)` for the file holding `name`; a damaged file is a one-line CheckpointError."""
        from safetensors import SafetensorError

        if name not in self.files:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        path = self.files[name]
        if path not in self._open:
            self._open[path] = _open(path)
        try:
            return what(self._open[path])
        except (SafetensorError, OSError, TypeError, ValueError) as e:
            raise CheckpointError(f"tensor {name!r} of {path} cannot be read ({e}); download or export the "
                                  "checkpoint again") from None


def write_safetensors(path: Path, tensors: Iterator[tuple[str, np.ndarray]], shapes: dict[str, tuple],
                      dtypes: dict[str, np.dtype]) -> None:
    """Write tensors to one safetensors file, streaming: only one tensor is in memory at a time.

    `shapes`/`dtypes` give every tensor's layout up front (the header precedes the data).
    """
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * np.dtype(dtypes[name]).itemsize
        header[name] = {"dtype": _ST_NAMES[np.dtype(dtypes[name])], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, arr in tensors:
            arr = np.ascontiguousarray(arr, dtype=dtypes[name])
            if tuple(arr.shape) != tuple(shapes[name]):
                raise ValueError(f"tensor {name} has shape {arr.shape}, header says {shapes[name]}")
            f.write(arr.tobytes())


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------

def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (transformers 4 or 5 layout)."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None and hf.get("model_type") == "nemotron_h":
        raise CheckpointError("a Nemotron-H (hybrid Mamba-2) checkpoint: read it with rlp_jax.model.family.from_hf "
                              "(rlp_jax.model.hybrid); this module reads the dense families")
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
    from rlp_jax.model.weights import param_shapes

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
    from rlp_jax.model.weights import assemble

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
    if param_dtype is None:
        declared = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        param_dtype = "bfloat16" if declared == "bfloat16" else "float32"
    cfg = config_from_hf(hf, param_dtype=param_dtype, **config_overrides)
    reader = SafetensorsReader(directory)
    return cfg, assemble(cfg, leaf_reader(cfg, reader.get, reader.shape), mesh)


def _check_shape(name: str, theirs: tuple, ours: tuple) -> None:
    if int(np.prod(theirs)) != int(np.prod(ours)):
        raise CheckpointError(f"tensor {name} has shape {tuple(theirs)}, config.json implies {int(np.prod(ours))} "
                              "elements; the checkpoint and its config.json disagree")


def to_hf(params, cfg: ModelConfig, path: str | os.PathLike, *, dtype: str | None = None,
          tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write params as a Hugging Face checkpoint directory that `transformers` loads.

    Args:
      params: our params pytree. cfg: its ModelConfig. path: output directory (created).
      dtype: "float32" or "bfloat16" for the saved tensors (default: cfg.param_dtype).
      tokenizer_dir: optional directory whose tokenizer files are copied alongside.
    Returns: the output directory.

    Multi-host: every process must call it (each tensor is gathered from the hosts that hold it, one at a
    time, with `process_allgather`); process 0 alone writes.
    """
    import shutil

    import jax
    from jax.experimental import multihost_utils

    out = Path(path)
    dtype = dtype or cfg.param_dtype
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    entries = []
    for key, name, kind in _hf_names(cfg):
        if key[0] == "layers":
            for i in range(cfg.num_layers):
                entries.append((name.format(i=i), kind, key, i))
        else:
            entries.append((name, kind, key, None))

    def host(key, i):
        leaf = params[key[0]] if len(key) == 1 else params[key[0]][key[1]]
        arr = leaf if i is None else leaf[i]
        if isinstance(arr, jax.Array) and not arr.is_fully_addressable:
            arr = multihost_utils.process_allgather(arr, tiled=True)
        return np.asarray(arr.astype("float32") if hasattr(arr, "astype") else arr, dtype=np.float32)

    shapes = {}
    for name, kind, key, i in entries:
        leaf = params[key[0]] if len(key) == 1 else params[key[0]][key[1]]
        one = tuple(leaf.shape if i is None else leaf.shape[1:])
        shapes[name] = tuple(_to_theirs(np.empty(one, np.int8), kind).shape)
    tensors = ((name, _to_theirs(host(key, i), kind)) for name, kind, key, i in entries)
    if jax.process_index() != 0:
        for _ in tensors:   # join every gather, write nothing
            pass
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_safetensors(out / "model.safetensors", tensors, shapes, {n: np_dtype for n in shapes})
    finally:
        for _ in tensors:   # after a failed write too: the other hosts' gathers must complete
            pass
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json",
                                                            "merges.txt") or f.suffix == ".model":
                shutil.copy(f, out / f.name)
    return out
