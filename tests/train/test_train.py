"""The training command end to end on the `smoke` recipe: CLI errors, exact resume after SIGKILL,
SIGTERM checkpointing, the non-finite guard, incompatible checkpoints."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rlp_jax.train.train_step import load_run_state
from tests.train.train_cases import ANY_LENGTH, train_smoke

ROOT = Path(__file__).resolve().parents[2]


def _metrics(workdir, split="train"):
    rows = []
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return {r["step"]: r for r in rows if r["split"] == split}


def _final_state(workdir, step):
    return load_run_state(workdir, step=step)[0].state


def _assert_trees_equal(a, b):
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    proc = train_smoke(workdir, "train.eval_every=7")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, proc


def test_smoke_run_writes_everything(straight_run):
    workdir, proc = straight_run
    assert "final: " in proc.stdout
    cfg = json.loads((workdir / "config.json").read_text())
    assert cfg["experiment"] == "smoke" and cfg["run"]["train"]["steps"] == 8
    train = _metrics(workdir)
    assert sorted(train) == list(range(1, 9))
    assert all(np.isfinite(train[s]["reward/mean"]) for s in train)
    assert train[1]["policy/max_abs_ratio_minus_1"] < 1e-4
    assert set(_metrics(workdir, "eval")) == {7, 8}
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 8


def test_resume_after_sigkill_is_exact(straight_run, tmp_path):
    """Kill a run (SIGKILL) after its step-6 checkpoint, restart it: steps 7..8 and the final state match."""
    straight, _ = straight_run
    Path(tmp_path).mkdir(exist_ok=True)
    proc = train_smoke(tmp_path, "train.eval_every=7", wait=False)
    deadline = time.time() + 300
    # The first eval (step 7) compiles for seconds: the run is killed there, after checkpoint 6.
    while time.time() < deadline:
        if (tmp_path / "metrics.jsonl").exists() and 7 in _metrics(tmp_path):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps_before and steps_before[-1] < 8, steps_before
    resumed = train_smoke(tmp_path, "train.eval_every=7")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resumed from {tmp_path} at step {steps_before[-1]}" in resumed.stdout
    a, b = _metrics(straight), _metrics(tmp_path)
    for step in range(1, 9):
        assert a[step]["loss/total"] == b[step]["loss/total"], step
        assert a[step]["reward/mean"] == b[step]["reward/mean"], step
    _assert_trees_equal(_final_state(straight, 8), _final_state(tmp_path, 8))


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_and_exits_with_its_code(tmp_path, sig, code):
    """SIGTERM (preemption) and Ctrl-C both save at the next step boundary, say how to resume, and exit
    non-zero (75 = requeue, 130 = interrupted) without a traceback or a `final:` summary."""
    proc = train_smoke(tmp_path, "train.steps=400", "train.save_every=100", "train.eval_every=0", ANY_LENGTH,
                  wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not ((tmp_path / "metrics.jsonl").exists() and _metrics(tmp_path)):
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=300)
    out = (tmp_path / "stdout.log").read_text()
    assert proc.returncode == code, out[-3000:]
    name = signal.Signals(sig).name
    assert f"{name}: saving step" in out and f"preempted by {name} at step" in out and "rerun the same command" in out
    assert "final:" not in out and "Traceback" not in out
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and 0 < max(saved) < 400 and max(saved) % 100, saved  # an off-interval save


def test_incompatible_checkpoint_is_refused(straight_run):
    workdir, _ = straight_run
    proc = train_smoke(workdir, "model.preset=small")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and "hidden_size" in err[-1], proc.stderr[-2000:]


def test_nonfinite_steps_stop_the_run(tmp_path):
    proc = train_smoke(tmp_path, "optim.lr=1e30", "optim.clip_norm=0", "train.max_nonfinite=2",
                  "train.steps=20")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "non-finite steps in a row" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--experiment=nope"], "unknown experiment 'nope'; valid experiments: cpt_baseline, "),
    (["--experiment=smoke", "--set", "rlp.rollout.gruop_size=2"], "unknown config field 'rlp.rollout.gruop_size'"),
    (["--experiment=smoke", "--set", "optim.lr=fast"], "--set optim.lr=fast: expected float"),
    (["--experiment=smoke", "--set", "optim.lr=nan"], "optim.lr must be a finite number, got nan"),
    (["--experiment=smoke", "--set", "rlp.rollout.group_size=1"], "G) must be >= 2"),
    (["--experiment=smoke", "--set", "train.mesh.data=3"], "mesh data*fsdp*tensor = 3 but 1 devices"),
    (["--experiment=smoke", "--set", "model.remat=ful"], "model.remat must be none, full or dots"),
    (["--experiment=smoke", "--set", "train.eval_batches=0"], "eval_batches must be >= 1"),
    (["--experiment=smoke", "--set", "rlp.rollout.min_context=64"], "no position of a 64-token row can be chosen"),
    (["--experiment=smoke", "--set", "train.micro_batches=0"], "train.micro_batches must be >= 1"),
    (["--experiment=smoke", "--set", "train.micro_batches=3"], "does not split into train.micro_batches=3"),
    (["--experiment=smoke", "--set", "rlp.rollout.think_start_id=7"], "the ids come from the tokenizer"),
    (["--experiment=smoke", "--set", 'data.sources=[{"path": "a.jsonl", "wieght": 1}]'], "unknown field(s) ['wieght']"),
    (["--experiment=smoke", "--set", 'data.sources=[{"path": "a.jsonl", "weight": -1}]'], "weight must be a positive"),
    (["--experiment=smoke", "--set", 'data.sources={"path": "a.jsonl"}'], "data.sources: expected a JSON list"),
    (["--experiment=smoke", "--set", 'data.sources=[{"path": "a.jsonl"'], "not valid JSON (Expecting ','"),
    (["--experiment=web_mix", "--set", "model.preset=tiny", "--set", "train.tokenizer=/nonexistent/tok.model"],
     "/nonexistent/tok.model"),
])
def test_cli_errors_are_one_line(args, message, capsys, tmp_path):
    from rlp_jax import train

    code = train.main(args + [f"--workdir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize("recipe,message", [
    ("def config(:\n", "has a syntax error at line 1"),
    ("from rlp_jax.config import RunConfig\ndef config():\n    pass\n", "cannot be imported: No module named"),
    ("def config():\n    return 3\n", "config() returned int, not a RunConfig"),
    ("x = 1\n", "defines no config() function"),
])
def test_broken_recipes_are_one_line_errors(recipe, message, capsys, tmp_path):
    from rlp_jax import train

    (tmp_path / "recipe.py").write_text(recipe)
    code = train.main([f"--experiment={tmp_path / 'recipe.py'}", f"--workdir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("where,message", [("file", "is a file, not a directory"),
                                           ("file/sub", "cannot write a run directory there (Not a directory)"),
                                           ("/proc/rlp_jax_run", "cannot write a run directory there")])
def test_unusable_workdirs_are_one_line_errors(where, message, capsys, tmp_path):
    from rlp_jax import train

    (tmp_path / "file").write_text("not a run")
    workdir = where if where.startswith("/") else str(tmp_path / where)
    code = train.main(["--experiment=smoke", f"--workdir={workdir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert (tmp_path / "file").read_text() == "not a run"


def test_a_second_training_in_the_same_workdir_is_refused(capsys, tmp_path):
    """While a training holds WORKDIR/.lock, another one into the same directory stops in one line that
    names the holder, and writes no checkpoint or metrics there."""
    from rlp_jax import train
    from rlp_jax.train.lock import local_lock

    with local_lock(tmp_path):
        code = train.main(["--experiment=smoke", f"--workdir={tmp_path}", "--set", "train.steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is in use by another training (pid" in err[0], err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    with local_lock(tmp_path):   # released when its holder ends
        pass


def test_show_config_lists_fields(capsys):
    from rlp_jax import train

    assert train.main(["--experiment=web_mix", "--show-config", "--set", "rlp.rollout.group_size=8"]) == 0
    out = capsys.readouterr().out
    assert "rlp.rollout.group_size = 8" in out and "optim.lr = 1e-06" in out


def test_init_from_hf_grows_the_embedding_for_think_markers(tmp_path):
    """model.init_from + an HF tokenizer without <think>/</think>: the markers get new embedding rows."""
    import jax
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from rlp_jax import train
    from rlp_jax.data.tokenizer import load_tokenizer
    from rlp_jax.model.dense import hf
    from rlp_jax.runs.config import ModelSection, load_experiment
    from tests.hf_models import make_hf_model

    texts = [f"the number {i} follows {i - 1}" for i in range(200)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<|endoftext|>"]))
    assert tok.get_vocab_size() == 96
    tok.save(str(tmp_path / "tokenizer.json"))
    make_hf_model("qwen3", tied=False).save_pretrained(tmp_path)  # vocab 96, untied head
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.vocab_size == 98
    cfg = dataclasses.replace(load_experiment("smoke").config(), model=ModelSection(init_from=str(tmp_path)))
    mcfg, params = train.build_model(cfg, tokenizer, jax.random.key(0))
    _, original = hf.from_hf(tmp_path)
    assert mcfg.vocab_size == 98 and params["embed"].shape == (98, 32) and params["lm_head"].shape == (32, 98)
    np.testing.assert_array_equal(params["embed"][:96], original["embed"])
    np.testing.assert_array_equal(params["lm_head"][:, :96], original["lm_head"])


def test_data_running_out_stops_cleanly_with_a_checkpoint(tmp_path):
    proc = train_smoke(tmp_path, "data.num_epochs=1", "train.steps=1000", "train.save_every=1000", "train.log_every=10",
                  "train.eval_every=0", ANY_LENGTH)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "data exhausted after" in proc.stdout
    last = max(_metrics(tmp_path))
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert 0 < max(saved) < 1000 and max(saved) >= last


def test_every_checkpoint_carries_the_run_config(straight_run):
    """What lets another machine read a gs:// run from the bucket alone: the newest step holds config.json."""
    from rlp_jax.runs.layout import config_from_checkpoints

    workdir, _ = straight_run
    assert config_from_checkpoints(workdir / "checkpoints") == json.loads((workdir / "config.json").read_text())
    assert config_from_checkpoints(workdir / "no-such-dir") is None


@pytest.mark.skipif(__import__("importlib").util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_gs_run_without_gcsfs_names_the_extra(capsys):
    from rlp_jax.generate import cli as generate

    code = generate.main(["--checkpoint", "gs://some-bucket/runs/x", "--prompt", "a"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'rlp_jax[gcs]'" in err[0], err


def test_from_run_reruns_a_run_exactly(straight_run, tmp_path, capsys):
    """`--from-run RUN_DIR` runs what RUN_DIR ran (its config.json) in a new workdir: the same config and,
    on CPU, the same losses and rewards step for step. A path that is no run is a one-line error."""
    workdir, _ = straight_run
    again = tmp_path / "again"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "rlp_jax.train", f"--from-run={workdir}", f"--workdir={again}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before, after = (json.loads((d / "config.json").read_text()) for d in (workdir, again))
    assert after["run"] == before["run"] and after["model_full"] == before["model_full"]
    keys = ("loss/total", "reward/mean", "train/grad_norm")
    curve = lambda d: {s: [r[k] for k in keys] for s, r in _metrics(d).items()}
    assert curve(again) == curve(workdir) and len(curve(workdir)) == 8

    from rlp_jax import train
    assert train.main([f"--from-run={tmp_path / 'nothing'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no readable rlp_jax run config" in err[0], err


def test_a_run_config_written_with_the_tokenizers_ids_still_reads():
    """Run directories written before the marker and prompt ids became a runtime value (`rlp.think_ids`) hold
    them in config.json; they read as the same settings, the ids dropped (the tokenizer gives them again)."""
    from rlp_jax.runs.config import ConfigError, from_dict, load_experiment, to_dict

    cfg = load_experiment("smoke").config()
    old = to_dict(cfg)
    old["rlp"]["rollout"].update(think_start_id=7, think_end_id=8)
    old["rlp"]["prompt"]["ids"] = [1, 2, 3]
    assert from_dict(old) == cfg
    old["rlp"]["rollout"]["think_strat_id"] = 7     # anything else unknown is still refused
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(old)


def test_a_step_compiled_ahead_of_time_trains_the_same_run(straight_run, tmp_path):
    """`python -m rlp_jax.plan --devices=cpu --compile --save-executable FILE`, then `python -m rlp_jax.train ...
    --executable FILE`: the trainer loads the step instead of compiling it, and the run is the straight run, metric
    for metric; a file compiled for other settings is refused in one line, before any step."""
    from tests.train.train_cases import FAST

    workdir, _ = straight_run
    sets = {**FAST, "train.eval_every": "7", "train.tokenizer": str(workdir / "data" / "tokenizer.model")}
    exe = tmp_path / "step.exe"
    # XLA's own CPU flags: a CPU executable compiled with the suite's fast-compile flags (classic emitters) loses
    # its fused kernels when serialized ("Function slice_pad_fusion not found" when it runs)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAX_ENABLE_COMPILATION_CACHE": "false"}
    plan = subprocess.run([sys.executable, "-m", "rlp_jax.plan", "--experiment=smoke", "--devices=cpu", "--compile",
                           "--save-executable", str(exe), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]],
                          capture_output=True, text=True, timeout=600, env=env)
    assert plan.returncode == 0 and exe.is_file(), plan.stdout[-2000:] + plan.stderr[-2000:]
    overrides = [f"{k}={v}" for k, v in sets.items() if k not in FAST]
    proc = train_smoke(tmp_path / "aot", *overrides, args=("--executable", str(exe)), env=env)
    assert proc.returncode == 0 and "loaded from" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    for split in ("train", "eval"):   # the same run (float32 round-off apart: the straight run compiled at -O0)
        got, want = _metrics(tmp_path / "aot", split), _metrics(workdir, split)
        assert sorted(got) == sorted(want)
        for step in want:
            for key in ("reward/mean", "reward/s_pred", "thought/mean_len", "eval/info_gain"):
                if key in want[step]:
                    np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-4, atol=1e-6,
                                               err_msg=f"{split} {step} {key}")
    other = train_smoke(tmp_path / "other", *overrides, "optim.lr=0.5", args=("--executable", str(exe)))
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert other.returncode == 2 and len(errors) == 1 and "compiled for another run: settings" in errors[0], other.stderr
    assert "Traceback" not in other.stderr and not list((tmp_path / "other").glob("checkpoints/[0-9]*"))
