"""The metric sinks resume into the same run and never lose earlier records."""

import json

from rlp_jax.train.metrics import MetricsWriter


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
