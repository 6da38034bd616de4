"""Multi-host runs: two CPU processes joined by jax.distributed (the JAX_COORDINATOR_ADDRESS variables
`tpu_scripts/gpu_launch.sh` sets; gloo collectives).
  * `python -m rlp_jax.evaluate` decodes exactly what one process with the same two devices decodes;
    process 0 alone prints and writes the results.
  * `python -m rlp_jax.export` writes from two processes what one process writes (process 0 alone).
  * `python -m rlp_jax.train` saves from both processes, and after both are killed with SIGKILL mid-run a
    relaunch of the same command resumes each process at its own data position and finishes with exactly
    the losses and rewards of an uninterrupted two-process run. (One process with two devices is not the
    reference here: each host reads its own shard of the files, so the global batches hold other rows.)
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.run_dirs import make_run_dir
from tests.train.multihost_cases import ROOT, base_env, free_port
from tests.xla_env import xla_flags


def test_two_processes_decode_what_one_process_with_two_devices_decodes(tmp_path):
    run = make_run_dir(tmp_path / "run", num_problems=6)
    args = [sys.executable, "-m", "rlp_jax.evaluate", f"--checkpoint={run}", "--tasks=generated",
            f"--data_dir={run / 'data'}", "--modes=no_think,think", "--batch_size=4", "--think_tokens=3",
            "--max_new_tokens=4"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_", "RLP_JAX"))}
    base.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags())
    port = free_port()
    procs = {"ref": subprocess.Popen(args + [f"--out={tmp_path / 'ref.json'}"], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**base, "XLA_FLAGS": xla_flags(devices=2)})}
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


def test_two_processes_export_what_one_process_exports(tmp_path):
    """Multi-host export: each process loads its slices, every tensor is gathered, process 0 alone writes."""
    run = make_run_dir(tmp_path / "run", num_problems=2)
    args = [sys.executable, "-m", "rlp_jax.export", f"--checkpoint={run}"]
    procs = {"ref": subprocess.Popen(args + [f"--out={tmp_path / 'one'}"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=base_env())}
    port = free_port()
    for i in range(2):
        procs[i] = subprocess.Popen(args + [f"--out={tmp_path / 'two'}"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env={
                                        **base_env(), "XLA_FLAGS": xla_flags(devices=2),
                                        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                        "JAX_PROCESS_ID": str(i)})
    out = {k: p.communicate(timeout=600)[0] for k, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), out
    assert "exported" in out[0] and "exported" not in out[1]
    one, two = sorted(f.name for f in (tmp_path / "one").iterdir()), sorted(f.name for f in (tmp_path / "two").iterdir())
    assert one == two and "model.safetensors" in one
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".two")]   # no leftover temporary folder

    # process 0 cannot write (a file-size limit on it alone): both processes end with one error line, none waits
    port = free_port()
    limit = ["bash", "-c", "ulimit -f 8; trap '' XFSZ; exec \"$@\"", "bash"]
    procs = [subprocess.Popen((limit if i == 0 else []) + args + [f"--out={tmp_path / 'three'}"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={
                                  **base_env(), "XLA_FLAGS": xla_flags(devices=2),
                                  "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                  "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], logs
    assert all("Traceback" not in log and sum(line.startswith("error:") for line in log.splitlines()) == 1
               for log in logs), logs
    assert "process 0 could not write" in logs[1] and not (tmp_path / "three").exists()


STEPS = 16   # long enough that a signal sent at the first save lands mid-run


def _two_process_train(workdir: Path, tag: str) -> list[subprocess.Popen]:
    args = [sys.executable, "-m", "rlp_jax.train", "--experiment=smoke", f"--workdir={workdir}",
            "--set", f"train.steps={STEPS}", "--set", "train.save_every=2", "--set", "train.plot=false",
            "--set", "train.eval_every=0", "--set", "rlp.rollout.thought_len=4", "--set", "rlp.rollout.group_size=2"]
    port, procs = free_port(), []
    for i in range(2):
        log = open(workdir.parent / f"{workdir.name}-{tag}-p{i}.log", "w")
        procs.append(subprocess.Popen(args, cwd=ROOT, text=True, stdout=log, stderr=subprocess.STDOUT, env={
            **base_env(), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(i)}))
    return procs


def _finish(procs, workdir: Path, tag: str) -> list[str]:
    for p in procs:
        p.wait(timeout=600)
    logs = [(workdir.parent / f"{workdir.name}-{tag}-p{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    return logs


def _curve(workdir: Path) -> dict[int, tuple]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss/total"], r["reward/mean"], r["data/tokens"]) for r in rows if r["split"] == "train"}


def _wait_for_step(workdir: Path, step: int) -> None:
    deadline = time.time() + 600
    while not (workdir / "checkpoints" / str(step) / "commit_success.txt").exists() and time.time() < deadline:
        time.sleep(0.2)


def test_two_process_training_survives_preemption_and_sigkill_exactly(tmp_path):
    """SIGTERM to one host: both save the same step and exit 75; relaunch; SIGKILL both mid-run;
    relaunch: the curve is that of an uninterrupted run, and each host resumed its own data position (a
    host restoring another's state would stop: the data fingerprint holds the process index)."""
    straight = tmp_path / "straight"
    _finish(_two_process_train(straight, "run"), straight, "run")
    assert sorted(os.listdir(straight / "checkpoints"), key=int) == ["12", "14", "16"]   # train.keep=3

    stopped = tmp_path / "stopped"
    procs = _two_process_train(stopped, "first")
    _wait_for_step(stopped, 2)
    procs[1].send_signal(signal.SIGTERM)                 # the scheduler preempts one host
    for p in procs:
        p.wait(timeout=600)
    logs = [(tmp_path / f"stopped-first-p{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [75, 75], "\n".join(x[-3000:] for x in logs)
    saved = sorted(int(d) for d in os.listdir(stopped / "checkpoints") if d.isdigit())
    assert 2 in saved and saved[-1] < STEPS, saved          # both saved the same step, before the end

    procs = _two_process_train(stopped, "second")
    _wait_for_step(stopped, saved[-1] + 2 - saved[-1] % 2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (stopped / "checkpoints" / str(STEPS)).exists()   # killed mid-run
    logs = _finish(_two_process_train(stopped, "third"), stopped, "third")
    assert "resumed from" in logs[0], logs[0][-2000:]
    assert _curve(stopped) == _curve(straight) and sorted(_curve(straight)) == list(range(1, STEPS + 1))
