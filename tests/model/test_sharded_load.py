"""Pretrained weights load straight into their shards: two CPU processes joined by jax.distributed, each
with two devices, load a Hugging Face folder and a GGUF file onto a (fsdp 2, tensor 2) mesh; every device
slice equals the whole host load, and each process reads from the safetensors file only the slices its
own devices hold (each once), less than the whole checkpoint; `to_hf` of the sharded params (every process
joins the gathers, process 0 writes) writes what `to_hf` of the whole load writes."""

import json
import subprocess
import sys

from tests.gguf_files import bpe_vocab, tiny_hf_model, write_gguf
from tests.hf_models import make_hf_model
from tests.train.multihost_cases import ROOT, base_env, free_port
from tests.xla_env import xla_flags


def test_two_processes_load_only_their_own_slices(tmp_path):
    tokens, merges = bpe_vocab()
    make_hf_model("qwen2", tied=False).save_pretrained(tmp_path / "hf")   # every layout kind: biases, lm_head
    gguf_path = write_gguf(tmp_path / "tiny.gguf", tiny_hf_model("llama", len(tokens), tmp_path, seed=1), "llama",
                           tokens, merges, qtype="Q8_0")
    port, out = free_port(), tmp_path / "res"
    args = [sys.executable, str(ROOT / "tests" / "model" / "load_worker.py"), str(tmp_path / "hf"), str(gguf_path), str(out)]
    procs = [subprocess.Popen(args, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={
        **base_env(), "XLA_FLAGS": xla_flags(devices=2),
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
        for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    results = [json.loads((tmp_path / f"res.{i}").read_text()) for i in range(2)]
    for r in results:
        assert r["devices"] == 4
        for kind in ("hf", "gguf"):
            assert r[kind]["mismatched"] == [] and r[kind]["sharded"] >= 8, r
        assert r["read"] == r["held"] < r["total"], r   # its own slices, each once; never the whole model
    assert results[0]["hf"]["export_equal"] and results[0]["gguf"]["export_equal"]   # to_hf of sharded params
