"""One process of tests/model/test_sharded_load.py: load an HF folder and a GGUF file onto a (fsdp 2,
tensor 2) mesh of 4 CPU devices spread over the processes, and report whether each device's slice
equals the whole host load, and how much of the checkpoint this process read."""

import json
import sys
from pathlib import Path

from rlp_jax import sharding

sharding.maybe_initialize_distributed()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402

from rlp_jax.model.dense import gguf, hf, weights  # noqa: E402


def held(params) -> int:
    """Elements of the distinct slices this process's devices hold."""
    total = 0
    for leaf in jax.tree.leaves(params):
        slices = {tuple((s.start, s.stop) for s in sh.index) for sh in leaf.addressable_shards}
        total += sum(int(np.prod([(b or n) - (a or 0) for (a, b), n in zip(sl, leaf.shape)])) for sl in slices)
    return total


def main(hf_dir: str, gguf_path: str, out: str) -> None:
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=2))
    res = {"process": jax.process_index(), "devices": jax.device_count()}
    for name, load in (("hf", lambda m: hf.from_hf(hf_dir, mesh=m)), ("gguf", lambda m: gguf.from_gguf(gguf_path, mesh=m))):
        _, whole = load(None)
        _, placed = load(mesh)
        bad = []
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(placed), jax.tree.leaves(whole)):
            ok = got.shape == want.shape and got.sharding.mesh == mesh and all(
                np.array_equal(np.asarray(s.data), want[s.index]) for s in got.addressable_shards)
            bad += [] if ok else [jax.tree_util.keystr(path)]
        res[name] = {"mismatched": bad, "sharded": sum(not leaf.is_fully_replicated for leaf in jax.tree.leaves(placed))}
        # and back out: every process joins the gathers of the sharded params, process 0 writes
        cfg, _ = load(None)
        written = hf.to_hf(placed, cfg, Path(f"{out}.{name}-export"))
        if jax.process_index() == 0:
            ref = hf.to_hf(whole, cfg, Path(f"{out}.{name}-ref"))
            res[name]["export_equal"] = (written / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    # What the loader asks a safetensors file for, counted at the file: only the slices of this process's devices.
    f = safe_open(str(Path(hf_dir) / "model.safetensors"), framework="np")
    asked = []

    def get(name, index):
        arr = f.get_tensor(name) if index is None else f.get_slice(name)[index]
        asked.append(int(np.asarray(arr).size))
        return np.asarray(arr)

    cfg = hf.config_from_hf(json.loads((Path(hf_dir) / "config.json").read_text()), param_dtype="float32")
    params = weights.assemble(cfg, hf.leaf_reader(cfg, get, lambda n: tuple(f.get_slice(n).get_shape())), mesh)
    res.update(read=sum(asked), held=held(params), total=sum(int(x.size) for x in jax.tree.leaves(params)))
    Path(f"{out}.{jax.process_index()}").write_text(json.dumps(res))


if __name__ == "__main__":
    main(*sys.argv[1:4])
