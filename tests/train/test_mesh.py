"""One train step on 8 CPU devices gives the single-device result for (data, fsdp, tensor) meshes; the thought
sampler's tokens on an fsdp mesh, with the weights gathered at every token or once before the loop."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from rlp_jax.model import family
from tests.xla_env import xla_flags

ROOT = Path(__file__).resolve().parents[2]


def test_mesh_step_equals_single_device():
    """RLP step on meshes (2,4,1) and (2,2,2) and the NTP step on (2,2,2) vs one device; the sampler's tokens on an
    fsdp=8 mesh under both model.sampler_weights settings vs one device, and the collectives left in its token loop."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices=8), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "mesh_worker.py"), "rlp,ntp,sampler"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result.pop("devices") == 8
    assert set(result) == {"rlp", "ntp", "sampler"}
    sampled = result.pop("sampler")
    for kind, out in result.items():
        single = out.pop("single")
        assert single["constraints"] == 0, kind
        for shape, res in out.items():
            assert res["constraints"] > 0, (kind, shape)
            assert abs(res["loss"] - single["loss"]) <= 1e-5 * max(1, abs(single["loss"])), (kind, shape)
            for name, value in res["params"].items():
                np.testing.assert_allclose(value, single["params"][name], atol=1e-5, err_msg=f"{kind} {shape} {name}")
    # The meshes really shard: fsdp splits the embedding, tensor splits heads.
    assert "fsdp" in result["rlp"]["(2, 4, 1)"]["specs"]["['embed']"]
    assert "tensor" in result["rlp"]["(2, 2, 2)"]["specs"]["['layers']['q_proj']"]

    # model.sampler_weights: the same thoughts on one device and on the fsdp mesh either way; "gathered" leaves
    # no collective in the token loop, where "sharded" gathers the dense model's weight matrices at every token.
    for preset in ("tiny", "nemotron-h-tiny"):
        runs = {key.split(" ", 1)[1]: out for key, out in sampled.items() if key.split(" ")[0] == preset}
        assert len(runs) == 4, preset
        first = runs.pop("sharded None")
        for key, out in runs.items():
            np.testing.assert_array_equal(out["tokens"], first["tokens"], err_msg=f"{preset} {key}")
            np.testing.assert_allclose(out["logprobs"], first["logprobs"], atol=1e-5, err_msg=f"{preset} {key}")
        assert runs["gathered (1, 8, 1)"]["collectives"] == 0, preset
    # the tiny dense model's layer matrices (float32 [Y, D, ...]): "sharded" gathers each at every token
    shapes = jax.eval_shape(lambda: family.init_params(family.preset("tiny"), jax.random.key(0)))
    matrices = sum(4 * x.size for x in jax.tree.leaves(shapes["layers"]) if x.ndim >= 3)
    assert sampled["tiny sharded (1, 8, 1)"]["collective_bytes"] >= matrices
