"""Hugging Face weight folders, read and written through the `safetensors` library, for every model family.

Read: `SafetensorsReader` opens `model.safetensors` or the shards an index names, and reads one tensor (or one
slice of it) at a time from a memory map. Pickled `.bin`/`.pt` weights are refused (unpickling a downloaded
file can run arbitrary code).

Write: `write_folder` is the one writer of both families' `to_hf`. One dtype policy: float32 or bfloat16
tensors, by default the dtype the params are stored in (`stored_dtype`) when written and the checkpoint's own
(`declared_dtype`) when read. The weights go to `model.safetensors`, or to shards
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` when they exceed `max_shard_bytes`
(transformers' 5 GB by default); one shard is in host memory at a time. Multi-host: every process calls it,
each tensor is gathered from the hosts that hold it (`process_allgather`, the same order on every process),
and process 0 alone writes. A family supplies only its names, its layouts and its config.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, NamedTuple

import ml_dtypes
import numpy as np

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
MAX_SHARD_BYTES = 5 * 10 ** 9          # transformers' default shard size ("5GB")


class CheckpointError(ValueError):
    """A Hugging Face checkpoint that cannot be read or converted (message says what and how to fix)."""


# ----------------------------------------------------------------------------------------------
# Reading
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


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

class Tensor(NamedTuple):
    """One tensor of a folder being written: its shape in the file and how to get it as a host array."""
    shape: tuple
    fetch: Callable[[], np.ndarray]      # the tensor in the file's layout (any float dtype); may gather hosts


def host_float32(leaf) -> np.ndarray:
    """A leaf as a host float32 array, gathered from the hosts that hold it when it spans processes."""
    import jax
    from jax.experimental import multihost_utils

    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(leaf.astype("float32") if hasattr(leaf, "astype") else leaf, dtype=np.float32)


def stored_dtype(leaf) -> str:
    """The policy's default dtype: bfloat16 for bfloat16 params, float32 otherwise."""
    return "bfloat16" if np.dtype(leaf.dtype) == DTYPES["bfloat16"] else "float32"


def declared_dtype(hf_config: dict) -> str:
    """The policy's default dtype on read: the checkpoint's own (config.json `dtype` / `torch_dtype`), bfloat16 or
    float32 (float16 and others load as float32)."""
    declared = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return "bfloat16" if declared == "bfloat16" else "float32"


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


def write_folder(out_dir, tensors: dict[str, Tensor], config: dict, dtype: str, *,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `tensors` (file name -> Tensor, in file order) as `dtype` and `config` as config.json into out_dir.

    Returns the folder. Every process must call it; process 0 alone writes. Raises CheckpointError (one line)
    on a bad dtype, a tensor whose shape is not the declared one, or an unusable out_dir."""
    import jax
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use {' or '.join(DTYPES)}")
    np_dtype = DTYPES[dtype]
    sizes = {name: math.prod(t.shape) * np_dtype.itemsize for name, t in tensors.items()}
    shards = shard_plan(sizes, max_shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    def fetched(name: str) -> np.ndarray:
        arr = np.ascontiguousarray(tensors[name].fetch(), dtype=np_dtype)
        if tuple(arr.shape) != tuple(tensors[name].shape):
            raise CheckpointError(f"tensor {name} has shape {arr.shape} where {tuple(tensors[name].shape)} is "
                                  "expected; the params do not match their config")
        return arr

    pending = ({name: fetched(name) for name in names} for names in shards)   # every process, the same order
    if jax.process_index() != 0:
        for _ in pending:
            pass
        return Path(out_dir)
    try:
        out = _output_dir(out_dir)
        for fname, shard in zip(files, pending):
            try:
                save_file(shard, str(out / fname), metadata={"format": "pt"})
            except SafetensorError as e:    # the library's I/O errors (a full disk, a file-size limit)
                raise CheckpointError(f"cannot write {out / fname}: {e}") from None
    finally:
        for _ in pending:   # after a failure too: the other hosts' gathers must complete
            pass
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: fname for fname, names in zip(files, shards) for name in names}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
