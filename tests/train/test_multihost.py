"""Multi-host evaluation: `python -m rlp_jax.evaluate` in two CPU processes joined by jax.distributed
(the JAX_COORDINATOR_ADDRESS variables `tpu_scripts/gpu_launch.sh` sets) decodes exactly what one
process with the same two devices decodes; process 0 alone prints and writes the results."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.run_dirs import make_run_dir

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_decode_what_one_process_with_two_devices_decodes(tmp_path):
    run = make_run_dir(tmp_path / "run", num_problems=6)
    args = [sys.executable, "-m", "rlp_jax.evaluate", f"--checkpoint={run}", "--tasks=generated",
            f"--data_dir={run / 'data'}", "--modes=no_think,think", "--batch_size=4", "--think_tokens=3",
            "--max_new_tokens=4"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_", "RLP_JAX"))}
    base.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    base.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = {"ref": subprocess.Popen(args + [f"--out={tmp_path / 'ref.json'}"], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})}
    for i in range(2):
        procs[i] = subprocess.Popen(args + [f"--out={tmp_path / 'multi.json'}"], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env={**base, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                         "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
    out = {k: p.communicate(timeout=600)[0] for k, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), out
    assert "devices cpu x 2" in out["ref"] and "devices cpu x 2" in out[0]
    assert "| generated | 6 |" in out[0] and "| generated |" not in out[1] and "predictions:" not in out[1]
    ref, multi = (json.loads((tmp_path / f).read_text()) for f in ("ref.json", "multi.json"))

    def samples(res):
        return [(r["mode"], r["id"], s["thought_ids"], s["answer_ids"]) for r in res["items"] for s in r["samples"]]

    assert samples(multi) == samples(ref) and len(samples(ref)) == 12
    assert all(len(s[2]) >= 1 for s in samples(ref) if s[0] == "think")
    assert multi["results"] == ref["results"]
