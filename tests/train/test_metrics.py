"""The metric sinks resume into the same run and never lose earlier records."""

import importlib.util
import json
import os
import sys

import pytest

from rlp_jax.runs.config import WandbConfig
from rlp_jax.train.metrics import MetricsWriter
from tests.train.train_cases import ANY_LENGTH, ROOT, train_smoke
from tests.train.wandb_cases import FAKE_PATH, history, read_calls


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _write(run_dir, steps, resume_step=0):
    w = MetricsWriter(run_dir, resume_step=resume_step)
    for s in steps:
        w.write(s, {"loss/total": float(s)})
    w.close()


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    _write(tmp_path, [1, 2, 3, 4])
    _write(tmp_path, [3], resume_step=2)          # the killed process had logged 3 and 4 after its save at 2
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3]
    assert not list(tmp_path.glob("*before-restart*"))


def test_restart_without_checkpoint_moves_the_old_metrics_aside(tmp_path, caplog):
    _write(tmp_path, [1, 2, 3])
    _write(tmp_path, [1, 2])                      # no checkpoint: the run starts over at step 0
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2]      # no duplicate steps
    (old,) = tmp_path.glob("metrics.before-restart-*.jsonl")
    assert _steps(old) == [1, 2, 3]                          # nothing lost
    (tb,) = tmp_path.glob("tensorboard.before-restart-*")
    assert any(tb.iterdir()) and (tmp_path / "tensorboard").is_dir()
    assert "starting over at step 0" in caplog.text


# -- Weights & Biases: what rlp_jax sends through wandb's public API (init, log, finish), recorded by a fake
#    at that boundary (tests/fake_wandb); one test runs the real wandb offline and reads only public facts.


@pytest.fixture
def fake_wandb(monkeypatch):
    spec = importlib.util.spec_from_file_location("fake_wandb", FAKE_PATH / "wandb" / "__init__.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    monkeypatch.setitem(sys.modules, "wandb", fake)   # `import wandb` in rlp_jax.train.metrics gets the fake
    fake.CALLS.clear()
    return fake


OFFLINE = WandbConfig(project="rlp-jax-tests", mode="offline")


def _write_wb(run_dir, steps, resume_step=0, eval_at=()):
    w = MetricsWriter(run_dir, resume_step=resume_step, wandb=OFFLINE, config={"train": {"steps": 9}})
    for s in steps:
        w.write(s, {"loss/total": float(s)})
        if s in eval_at:
            w.write(s, {"eval/info_gain": -float(s)}, split="eval")
    w.close()


def test_wandb_gets_the_tensorboard_metrics_and_resumes_the_same_run(tmp_path, fake_wandb):
    _write_wb(tmp_path, [1, 2, 3, 4], eval_at=(4,))
    first = json.loads((tmp_path / "wandb_run.json").read_text())
    assert first["last_step"] == 4
    _write_wb(tmp_path, [3, 4, 5, 6], resume_step=2, eval_at=(4, 6))   # killed after its save at 2
    assert json.loads((tmp_path / "wandb_run.json").read_text()) == {"id": first["id"], "last_step": 6}
    (id1, h1), (id2, h2) = history(fake_wandb.CALLS)
    assert id1 == id2 == first["id"]                    # one W&B run, continued
    inits = [c for c in fake_wandb.CALLS if c["event"] == "init"]
    assert [c["resume"] for c in inits] == [None, "allow"] and inits[0]["config"] == {"train": {"steps": 9}}
    assert h1 == {1: {"loss/total": 1.0}, 2: {"loss/total": 2.0}, 3: {"loss/total": 3.0},
                  4: {"loss/total": 4.0, "eval/info_gain": -4.0}}
    assert h2 == {5: {"loss/total": 5.0}, 6: {"loss/total": 6.0, "eval/info_gain": -6.0}}   # no step twice


def test_wandb_starting_over_is_a_new_run(tmp_path, fake_wandb):
    _write_wb(tmp_path, [1, 2])
    old = json.loads((tmp_path / "wandb_run.json").read_text())["id"]
    _write_wb(tmp_path, [1])                            # no checkpoint: the run starts over
    (id1, _), (id2, h2) = history(fake_wandb.CALLS)
    assert (id1, id2 != old) == (old, True) and h2 == {1: {"loss/total": 1.0}}


def test_training_logs_to_wandb(tmp_path):
    calls = tmp_path / "wandb_calls.jsonl"
    proc = train_smoke(tmp_path, "train.steps=2", "train.save_every=1", "train.wandb.project=rlp-jax-tests",
                       ANY_LENGTH, env={"PYTHONPATH": f"{FAKE_PATH}{os.pathsep}{ROOT}",
                                        "RLP_FAKE_WANDB_LOG": str(calls)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    ((run_id, received),) = history(read_calls(calls))
    assert json.loads((tmp_path / "wandb_run.json").read_text())["id"] == run_id
    tb = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
          if r["split"] == "train"}
    assert sorted(received) == [1, 2]
    assert received[2]["loss/total"] == pytest.approx(tb[2]["loss/total"]) and "reward/mean" in received[2]


def test_the_real_wandb_runs_offline_under_the_recorded_id(tmp_path):
    """The real package, offline: the run starts, finishes, and its local run folder carries the id the run
    directory recorded (the folder `wandb sync` uploads)."""
    pytest.importorskip("wandb")
    _write_wb(tmp_path, [1, 2])
    state = json.loads((tmp_path / "wandb_run.json").read_text())
    assert state["last_step"] == 2
    assert [p.name for p in (tmp_path / "wandb").glob(f"offline-run-*-{state['id']}")]
