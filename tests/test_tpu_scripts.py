"""tpu_scripts/: bash -n and shellcheck clean; the exact commands each subcommand prints with --dry-run;
one-line usage errors (exit 2); the train/stop remote commands run for real in a local bash against
a fake worker home; gpu_launch.sh under fake SLURM exports what sharding.maybe_initialize_distributed
reads."""

import ast
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
TPU = SCRIPTS / "tpu_vm.sh"
GPU = SCRIPTS / "gpu_launch.sh"
ALL = [TPU, GPU, SCRIPTS / "lib.sh", SCRIPTS / "slurm_example.sbatch"]
BASE = ["--name", "rlp-1", "--zone", "us-central2-b"]
SSH = "gcloud compute tpus tpu-vm ssh rlp-1 --zone=us-central2-b"


def _env(**extra):
    """A clean environment: none of the scripts' RLP_* / JAX_* / SLURM_* defaults leak in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RLP_", "JAX_", "SLURM_")) and k != "PYTHON"}
    env.update(extra)
    return env


def _run(script, *args, env=None, check=True):
    p = subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                       env=env or _env(), timeout=30)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _dry(*args, env=None):
    """The lines a --dry-run prints (each must start with '+ ')."""
    p = _run(TPU, *args, *BASE, "--dry-run", env=env)
    lines = p.stdout.splitlines()
    assert lines and all(l.startswith("+ ") for l in lines), p.stdout
    return lines


def _remote(line):
    """The --command string of a printed `gcloud ... ssh` line."""
    argv = shlex.split(line[2:])
    return argv[argv.index("--command") + 1]


@pytest.mark.parametrize("script", ALL, ids=lambda p: p.name)
def test_bash_n(script):
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    p = subprocess.run(["shellcheck", *map(str, ALL)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_create():
    assert _dry("create", "--spot", "--accelerator-type", "v5p-64") == [
        "+ gcloud compute tpus tpu-vm create rlp-1 --zone=us-central2-b --accelerator-type=v5p-64 "
        "--version=v2-alpha-tpuv5 --spot"]
    assert _dry("create", "--accelerator-type=v4-8", "--runtime-version=tpu-ubuntu2204-base", "--project=proj") == [
        "+ gcloud compute tpus tpu-vm create rlp-1 --zone=us-central2-b --project=proj --accelerator-type=v4-8 "
        "--version=tpu-ubuntu2204-base"]


def test_create_and_delete_queued():
    assert _dry("create", "--queued", "--accelerator-type", "v5litepod-16") == [
        "+ gcloud compute tpus queued-resources create rlp-1 --zone=us-central2-b --node-id=rlp-1 "
        "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite"]
    assert _dry("delete", "--queued") == [
        "+ gcloud compute tpus queued-resources delete rlp-1 --zone=us-central2-b --force --quiet"]
    assert _dry("delete") == ["+ gcloud compute tpus tpu-vm delete rlp-1 --zone=us-central2-b --quiet"]


def test_env_defaults():
    env = _env(RLP_TPU_NAME="from-env", RLP_TPU_ZONE="europe-west4-a", RLP_TPU_TYPE="v6e-8", RLP_TPU_SPOT="1")
    p = _run(TPU, "create", "--dry-run", env=env)
    assert p.stdout == ("+ gcloud compute tpus tpu-vm create from-env --zone=europe-west4-a "
                        "--accelerator-type=v6e-8 --version=v2-alpha-tpuv6e --spot\n")


def test_install():
    (line,) = _dry("install")
    assert line.startswith(f"+ {SSH} --worker=all --command ")
    cmd = _remote(line)
    assert 'python3 -m uv venv --allow-existing --python 3.11 "$HOME"/rlp_venv' in cmd
    assert ('python3 -m uv pip install --python "$HOME"/rlp_venv/bin/python "jax[tpu]==0.10.2" '
            '-e "$HOME"/rlp_jax\'[gcs]\'') in cmd   # gs:// workdirs need gcsfs


def test_sync(tmp_path):
    pack, scp, unpack, rm = _dry("sync", "--repo", str(tmp_path))
    tarball = shlex.split(scp[2:])[5]
    assert tarball.endswith(".tar.gz") and pack == f"+ tar -C {tmp_path} -czf {tarball} ."   # not a git checkout
    assert scp == f"+ gcloud compute tpus tpu-vm scp {tarball} rlp-1:rlp_jax_src.tar.gz --zone=us-central2-b --worker=all"
    assert _remote(unpack) == ('rm -rf "$HOME"/rlp_jax && mkdir -p "$HOME"/rlp_jax && tar -xzf "$HOME"/rlp_jax_src.tar.gz'
                               ' -C "$HOME"/rlp_jax && rm -f "$HOME"/rlp_jax_src.tar.gz')
    assert rm == f"+ rm -f {tarball}"
    (line,) = _dry("sync", "--repo", "https://github.com/o/rlp_jax.git", "--branch", "dev")
    assert _remote(line) == ('rm -rf "$HOME"/rlp_jax && git clone --depth=1 --branch=dev '
                             'https://github.com/o/rlp_jax.git "$HOME"/rlp_jax')


def test_sync_of_a_checkout_copies_what_git_would_commit(tmp_path):
    """Run sync for real against a fake gcloud whose scp copies into, and whose ssh runs the command in,
    a fake worker home: tracked and untracked files arrive, ignored runs/ and .git do not."""
    repo, home = tmp_path / "repo", tmp_path / "home"
    (repo / "pkg").mkdir(parents=True)
    home.mkdir()
    (repo / ".gitignore").write_text("runs/\n__pycache__/\n")
    (repo / "pkg" / "a.py").write_text("A = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    (repo / "pkg" / "new.py").write_text("B = 2\n")                      # untracked, not ignored
    (repo / "runs" / "big").mkdir(parents=True)
    (repo / "runs" / "big" / "ckpt").write_text("x" * 1000)             # ignored
    (repo / "pkg" / "__pycache__").mkdir()
    (repo / "pkg" / "__pycache__" / "a.pyc").write_text("")
    (home / "rlp_jax" / "stale").mkdir(parents=True)                    # replaced, not merged
    bin_dir = _fake_bin(tmp_path, "gcloud", f"""
if [ "$4" = scp ]; then cp "$5" {home}/"${{6#*:}}"; exit; fi
for a in "$@"; do cmd=$a; done   # ssh: the --command string is the last argument
cd {home} && HOME={home} bash -c "$cmd"
""")
    _run(TPU, "sync", "--repo", str(repo), *BASE, env=_env(PATH=f"{bin_dir}:{os.environ['PATH']}"))
    got = sorted(str(p.relative_to(home / "rlp_jax")) for p in (home / "rlp_jax").rglob("*") if p.is_file())
    assert got == [".gitignore", "pkg/a.py", "pkg/new.py"]
    assert not (home / "rlp_jax_src.tar.gz").exists()


TRICKY_SETS = ["optim.lr=1e-6", 'data.sources=[{"path": "gs://b/web/*.parquet", "weight": 1}]',
               "x=it's", "y=$HOME `id` \\n", "z=a b"]


def _train_line(*extra, env=None):
    args = ["train", "--experiment", "web_mix", "--workdir", "gs://bucket/runs/web_mix"]
    for s in TRICKY_SETS:
        args += ["--set", s]
    (line,) = _dry(*args, *extra, env=env)
    return line


def test_train():
    line = _train_line()
    assert line.startswith(f"+ {SSH} --worker=all --command ")
    cmd = _remote(line)
    assert ("RLP_JAX_DISTRIBUTED=1 nohup \"$HOME\"/rlp_venv/bin/python -m rlp_jax.train --experiment=web_mix "
            "--workdir=gs://bucket/runs/web_mix --set optim.lr=1e-6 ") in cmd
    assert '> "$HOME"/rlp_jax_train.log 2>&1 < /dev/null &' in cmd
    # each --set reaches the remote shell as one word, verbatim (run for real in the test below)
    words = shlex.split(cmd[cmd.index(" -m rlp_jax.train "):cmd.index(" > ")])
    assert words == ["-m", "rlp_jax.train", "--experiment=web_mix", "--workdir=gs://bucket/runs/web_mix",
                     *[a for s in TRICKY_SETS for a in ("--set", s)]]


def test_train_on_a_shared_mount():
    (line,) = _dry("train", "--experiment", "web_mix", "--workdir", "/mnt/nfs/runs/x", "--shared-fs")
    assert "-m rlp_jax.train --experiment=web_mix --workdir=/mnt/nfs/runs/x" in _remote(line)


def test_logs_stop_ssh():
    assert _dry("logs") == [f"+ {SSH} --worker=0 --command 'tail -n 200 -F \"$HOME\"/rlp_jax_train.log'"]
    assert _dry("logs", "--worker=3")[0].startswith(f"+ {SSH} --worker=3 --command ")
    (stop,) = _dry("stop")
    assert stop.startswith(f"+ {SSH} --worker=all --command ")
    assert _remote(stop).startswith('pkill -TERM -f "^[^ ]*/rlp_venv/bin/python[0-9.]* -m rlp_jax[.]train"')
    assert "pkill -KILL" in _remote(stop)
    p = _run(TPU, "ssh", *BASE, "--dry-run", "--", "ls", "-la", "/tmp")
    assert p.stdout == f'+ {SSH} --worker=all --command "ls -la /tmp"\n'


@pytest.mark.parametrize("args, message", [
    (["create", "--name", "x", "--zone", "z", "--accelerator-type", "v5p-8", "--bogus"], "unknown flag '--bogus'"),
    (["create", "--zone", "z", "--accelerator-type", "v5p-8"], "--name is required"),
    (["create", "--name", "x", "--accelerator-type", "v5p-8"], "--zone is required"),
    (["create", "--name", "x", "--zone", "z"], "--accelerator-type is required"),
    (["create", "--name", "x", "--zone", "z", "--accelerator-type", "tpu9-8"], "--runtime-version is required"),
    (["train", "--name", "x", "--zone", "z", "--workdir", "gs://b/r"], "--experiment is required"),
    (["train", "--name", "x", "--zone", "z", "--experiment", "web_mix"], "--workdir is required"),
    (["train", "--name", "x", "--zone", "z", "--experiment", "e", "--workdir", "w", "--set", "novalue"], "KEY=VALUE"),
    (["train", "--name", "x", "--zone", "z", "--experiment", "e", "--workdir", "/home/me/runs/x"],
     "is a local path: on a multi-worker slice"),
    (["frobnicate"], "unknown command"),
    ([], "no command"),
    (["logs", "--name", "x", "--zone", "z", "--worker"], "--worker needs a value"),
    (["logs", "--name", "x", "--zone", "z", "--worker", "w1"], "--worker must be"),
    (["create", "--name", "x", "--zone", "z", "--spot=yes"], "--spot takes no value"),
    (["sync", "--name", "x", "--zone", "z", "--repo", "/no/such/dir"], "neither a directory nor a git URL"),
    (["ssh", "--name", "x", "--zone", "z"], "ssh needs a command"),
])
def test_tpu_usage_errors(args, message):
    p = _run(TPU, *args, *(["--dry-run"] if args else []), check=False)
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.startswith("error: ") and message in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_help():
    for script in (TPU, GPU):
        p = _run(script, "--help")
        assert p.stdout.startswith("usage: ") and "--dry-run" in p.stdout


def _fake_bin(tmp_path, name, body):
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    f = d / name
    f.write_text("#!/bin/sh\n" + body)
    f.chmod(0o755)
    return d


def test_dry_run_runs_nothing_and_real_run_runs_what_it_prints(tmp_path):
    log = tmp_path / "gcloud.log"
    bin_dir = _fake_bin(tmp_path, "gcloud", f'for a in "$@"; do printf "%s\\n" "$a"; done > {log}\n')
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    line = _train_line(env=env)
    assert not log.exists()
    p = _run(TPU, "train", "--experiment", "web_mix", "--workdir", "gs://bucket/runs/web_mix",
             *[a for s in TRICKY_SETS for a in ("--set", s)], *BASE, env=env)
    assert p.stderr == line + "\n"  # the command, echoed to stderr before it runs
    assert ["gcloud", *log.read_text().splitlines()] == shlex.split(line[2:])


FAKE_TRAIN = """
import json, os, signal, sys, time
out = os.environ["FAKE_TRAIN_OUT"]
def term(*_):
    open(out + ".term", "w").write("sigterm")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
json.dump({"argv": sys.argv[1:], "distributed": os.environ.get("RLP_JAX_DISTRIBUTED")}, open(out + ".tmp", "w"))
os.rename(out + ".tmp", out)
time.sleep(60)
"""


def _wait_for(path, seconds=20):
    deadline = time.time() + seconds
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_train_and_stop_remote_commands_run(tmp_path):
    """Run the train and stop --command strings in a local bash whose $HOME is a fake worker: a venv
    python (a link to this interpreter, under a name unique to this test so that pgrep/pkill can only
    match our own process) and a checkout whose rlp_jax/train.py records its argv and its SIGTERM."""
    venv = f"venv_{uuid.uuid4().hex[:12]}"
    home = tmp_path / "home"
    (home / venv / "bin").mkdir(parents=True)
    (home / venv / "bin" / "python").symlink_to(sys.executable)
    (home / "rlp_jax" / "rlp_jax").mkdir(parents=True)
    (home / "rlp_jax" / "rlp_jax" / "__init__.py").write_text("")
    (home / "rlp_jax" / "rlp_jax" / "train.py").write_text(FAKE_TRAIN)
    out = tmp_path / "record.json"
    env = _env(RLP_VENV=venv, RLP_STOP_TIMEOUT="20")
    train_cmd = _remote(_train_line(env=env))
    (stop,) = _dry("stop", env=env)
    worker_env = _env(HOME=str(home), FAKE_TRAIN_OUT=str(out))
    sh = lambda cmd: subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=worker_env,
                                    cwd=tmp_path, timeout=40)
    p = sh(train_cmd)
    assert p.returncode == 0 and p.stdout.startswith("started pid "), p.stdout + p.stderr
    pid = int(p.stdout.split()[2])
    try:
        _wait_for(out)
        record = json.loads(out.read_text())
        expected = ["--experiment=web_mix", "--workdir=gs://bucket/runs/web_mix"]
        for s in TRICKY_SETS:
            expected += ["--set", s]
        assert record == {"argv": expected, "distributed": "1"}
        again = sh(train_cmd)
        assert again.returncode == 1 and "already running" in again.stderr
        p = sh(_remote(stop))
        assert p.returncode == 0 and p.stdout.strip() == "stopped", p.stdout + p.stderr
        assert (tmp_path / "record.json.term").read_text() == "sigterm"
        p = sh(_remote(stop))
        assert p.stdout.strip() == "no rlp_jax.train running"
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- gpu_launch.sh -------------------------------------------------------------------------------

def _gpu(*args, env, check=True):
    return _run(GPU, "--experiment", "web_mix", "--workdir", "gs://bucket/runs/x", "--set", "optim.lr=1e-6",
                "--set", "z=a b", *args, env=env, check=check)


def test_gpu_single_process():
    p = _gpu("--dry-run", env=_env())
    assert p.stdout == "+ python -m rlp_jax.train --experiment=web_mix --workdir=gs://bucket/runs/x " \
                       "--set optim.lr=1e-6 --set \"z=a b\"\n"


def _slurm_env(tmp_path, **extra):
    bin_dir = _fake_bin(tmp_path, "scontrol", '[ "$1 $2" = "show hostnames" ] || exit 1\n'
                                              '[ "$3" = "gpu-[07-08]" ] || exit 1\necho gpu-07\necho gpu-08\n')
    return _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NTASKS="4", SLURM_PROCID="2",
                SLURM_JOB_ID="1000", SLURM_JOB_NODELIST="gpu-[07-08]", SLURM_LOCALID="0", **extra)


def test_gpu_slurm(tmp_path):
    p = _gpu("--dry-run", "--", "--show-config", env=_slurm_env(tmp_path))
    assert p.stdout.splitlines() == [
        "+ export JAX_COORDINATOR_ADDRESS=gpu-07:62440",  # 61440 + 1000 % 4096
        "+ export JAX_NUM_PROCESSES=4",
        "+ export JAX_PROCESS_ID=2",
        "+ python -m rlp_jax.train --experiment=web_mix --workdir=gs://bucket/runs/x --set optim.lr=1e-6 "
        "--set \"z=a b\" --show-config"]
    # flags and JAX_* variables win over SLURM
    p = _gpu("--dry-run", "--coordinator", "head:1234", "--local-device-ids", "0,1",
             env=_slurm_env(tmp_path, JAX_PROCESS_ID="3", JAX_COORDINATOR_PORT="9999"))
    assert p.stdout.splitlines()[:4] == ["+ export JAX_COORDINATOR_ADDRESS=head:1234", "+ export JAX_NUM_PROCESSES=4",
                                         "+ export JAX_PROCESS_ID=3", "+ export JAX_LOCAL_DEVICE_IDS=0,1"]


def test_gpu_exports_reach_the_trainer_and_sharding_reads_them(tmp_path):
    """Not a dry run: a fake $PYTHON records the environment it was exec'd with, and
    maybe_initialize_distributed passes those values to jax.distributed.initialize."""
    record = tmp_path / "env.json"
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    env = _slurm_env(tmp_path, PYTHON=str(fake))
    p = _gpu(env=env)
    assert p.stderr.splitlines()[0] == "+ export JAX_COORDINATOR_ADDRESS=gpu-07:62440"
    got = json.loads(record.read_text())
    assert got["argv"] == ["-m", "rlp_jax.train", "--experiment=web_mix", "--workdir=gs://bucket/runs/x",
                           "--set", "optim.lr=1e-6", "--set", "z=a b"]
    seen = {k: got["env"][k] for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    assert seen == {"JAX_COORDINATOR_ADDRESS": "gpu-07:62440", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}

    assert _maybe_initialize_distributed(seen) == [
        dict(coordinator_address="gpu-07:62440", num_processes=4, process_id=2)]


def _maybe_initialize_distributed(environ):
    """Run rlp_jax.sharding.maybe_initialize_distributed's own source (without importing jax, which
    takes seconds) against `environ`, with a stub jax; returns the jax.distributed.initialize calls."""
    source = (ROOT / "rlp_jax" / "sharding.py").read_text()
    (fn,) = [n for n in ast.parse(source).body
             if isinstance(n, ast.FunctionDef) and n.name == "maybe_initialize_distributed"]
    calls = []
    jax = types.SimpleNamespace(distributed=types.SimpleNamespace(initialize=lambda **kw: calls.append(kw)),
                                config=types.SimpleNamespace(update=lambda *a: None),
                                process_index=lambda: 0, process_count=lambda: 1)
    namespace = {"os": types.SimpleNamespace(environ=environ), "jax": jax, "logging": logging}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "sharding.py", "exec"), namespace)
    assert namespace["maybe_initialize_distributed"]() == bool(calls)
    return calls


@pytest.mark.parametrize("args, message", [
    (["--workdir", "w"], "--experiment is required"),
    (["--experiment", "e", "--bogus"], "unknown flag '--bogus'"),
    (["--experiment", "e", "stray"], "unexpected argument 'stray'"),
    (["--experiment", "e", "--coordinator", "h:1"], "go together"),
    (["--experiment", "e", "--workdir", "w", "--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"],
     "HOST:PORT"),
    (["--experiment", "e", "--workdir", "w", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in 0..1"),
    (["--experiment", "e", "--workdir", "w", "--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"],
     "--num-processes must be"),
    (["--experiment", "e", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"], "--workdir is required"),
    (["--experiment", "e", "--local-device-ids", "a,b"], "--local-device-ids"),
    (["--experiment"], "--experiment needs a value"),
])
def test_gpu_usage_errors(args, message):
    p = _run(GPU, *args, "--dry-run", check=False)
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.startswith("error: ") and message in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_tpu_train_env_makes_sharding_initialize():
    # a GCE TPU VM sets no TPU_WORKER_HOSTNAMES in the ssh shell; tpu_vm.sh train sets RLP_JAX_DISTRIBUTED=1
    assert _maybe_initialize_distributed({"RLP_JAX_DISTRIBUTED": "1"}) == [{}]
