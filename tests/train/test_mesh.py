"""One train step on 8 CPU devices gives the single-device result for (data, fsdp, tensor) meshes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.xla_env import xla_flags

ROOT = Path(__file__).resolve().parents[2]


def test_mesh_step_equals_single_device():
    """RLP step on meshes (2,4,1) and (2,2,2) and the NTP step on (2,2,2) vs one device."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices=8), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "mesh_worker.py"), "rlp,ntp"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result.pop("devices") == 8
    assert set(result) == {"rlp", "ntp"}
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
