"""The metric sinks resume into the same run and never lose earlier records."""

import json

import pytest

from rlp_jax.train.config import WandbConfig
from rlp_jax.train.metrics import MetricsWriter
from tests.train.test_train import ANY_LENGTH, _train
from tests.wandb_files import offline_runs


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


# -- Weights & Biases (offline mode: what wandb writes is read back from its own files) --

wandb = pytest.importorskip("wandb")
OFFLINE = WandbConfig(project="rlp-jax-tests", mode="offline")


def _write_wb(run_dir, steps, resume_step=0, eval_at=()):
    w = MetricsWriter(run_dir, resume_step=resume_step, wandb=OFFLINE, config={"train": {"steps": 9}})
    for s in steps:
        w.write(s, {"loss/total": float(s)})
        if s in eval_at:
            w.write(s, {"eval/info_gain": -float(s)}, split="eval")
    w.close()


def test_wandb_gets_the_tensorboard_metrics_and_resumes_the_same_run(tmp_path):
    _write_wb(tmp_path, [1, 2, 3, 4], eval_at=(4,))
    first = json.loads((tmp_path / "wandb_run.json").read_text())
    assert first["last_step"] == 4
    _write_wb(tmp_path, [3, 4, 5, 6], resume_step=2, eval_at=(4, 6))   # killed after its save at 2
    assert json.loads((tmp_path / "wandb_run.json").read_text()) == {"id": first["id"], "last_step": 6}
    (id1, h1), (id2, h2) = offline_runs(tmp_path)
    assert id1 == id2 == first["id"]                    # one W&B run, continued
    assert h1 == {1: {"loss/total": 1.0}, 2: {"loss/total": 2.0}, 3: {"loss/total": 3.0},
                  4: {"loss/total": 4.0, "eval/info_gain": -4.0}}
    assert h2 == {5: {"loss/total": 5.0}, 6: {"loss/total": 6.0, "eval/info_gain": -6.0}}   # no step twice


def test_wandb_starting_over_is_a_new_run(tmp_path):
    _write_wb(tmp_path, [1, 2])
    old = json.loads((tmp_path / "wandb_run.json").read_text())["id"]
    _write_wb(tmp_path, [1])                            # no checkpoint: the run starts over
    (id1, _), (id2, h2) = offline_runs(tmp_path)
    assert (id1, id2 != old) == (old, True) and h2 == {1: {"loss/total": 1.0}}


def test_training_logs_to_wandb(tmp_path):
    proc = _train(tmp_path, "train.steps=2", "train.save_every=1", "train.wandb.project=rlp-jax-tests",
                  "train.wandb.mode=offline", ANY_LENGTH)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ((run_id, history),) = offline_runs(tmp_path)
    assert json.loads((tmp_path / "wandb_run.json").read_text())["id"] == run_id
    tb = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
          if r["split"] == "train"}
    assert sorted(history) == [1, 2]
    assert history[2]["loss/total"] == pytest.approx(tb[2]["loss/total"]) and "reward/mean" in history[2]
