"""rlp_jax.plot: metrics.jsonl loading (dedup, malformed lines, missing metrics), PNG output, compare
mode and the CLI's error path."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlp_jax.plot import PlotError, load_metrics, main, plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def _write_run(run_dir: Path, *, rlp: bool, steps: int = 60) -> Path:
    """A synthetic run: train lines every step, eval every 10, a resumed re-log of steps 40..45
    (the later values must win), one malformed line and a non-finite value logged as a string."""
    run_dir.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        m = {"step": s, "split": "train", "loss/total": 3.0 - s / steps, "loss/ntp": 2.5 - s / steps,
             "train/grad_norm": 1.0 + 0.1 * np.sin(s), "train/lr": 1e-4, "perf/tokens_per_s": 1000.0 + s}
        if rlp:
            m.update({"loss/rlp": -0.1 * s / steps, "reward/mean": 0.01 * s, "reward/s_pred": -2.0 + 0.01 * s,
                      "reward/s_ema": -2.0, "advantage/std": 0.5, "policy/clip_fraction": 0.05,
                      "thought/mean_len": 16.0 + (s % 5), "thought/ended_fraction": 0.9})
        lines.append(json.dumps(m))
        if s % 10 == 0:
            ev = {"step": s, "split": "eval", "eval/nll_no_think": 2.0 - s / 100}
            if rlp:
                ev.update({"eval/nll_think": 1.9 - s / 100, "eval/info_gain": 0.1})
            lines.append(json.dumps(ev))
        if s == 30:
            lines.append('{"step": 31, "split": "train", "loss/total": ')  # truncated by a kill
    # resumed from step 39: steps 40..45 re-logged with different values
    lines += [json.dumps({"step": s, "split": "train", "loss/total": 100.0 + s, "train/grad_norm": "nan"})
              for s in range(40, 46)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


@pytest.fixture
def runs(tmp_path):
    return _write_run(tmp_path / "rlp_run", rlp=True), _write_run(tmp_path / "cpt_run", rlp=False)


def _assert_pngs(paths):
    assert paths
    for p in paths:
        data = Path(p).read_bytes()
        assert data[:8] == PNG_MAGIC, p
        assert len(data) > 5000, (p, len(data))


def test_load_metrics_dedup_and_malformed(runs):
    rlp, cpt = runs
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:\d+: skipping malformed line"):
        m = load_metrics(rlp)
    assert set(m) == {"train", "eval"}
    steps, vals = m["train"]["loss/total"]
    assert np.array_equal(steps, np.arange(1, 61)) and np.all(np.diff(steps) > 0)
    assert vals[steps == 42][0] == 142.0 and vals[steps == 39][0] == pytest.approx(3.0 - 39 / 60)
    # the re-logged lines lack reward: the last occurrence wins, so those steps have no reward point
    rs, _ = m["train"]["reward/mean"]
    assert len(rs) == 54 and not np.isin(np.arange(40, 46), rs).any()
    gs, gv = m["train"]["train/grad_norm"]
    assert np.isnan(gv[gs == 40][0]) and len(gs) == 60
    assert np.array_equal(m["eval"]["eval/nll_think"][0], np.arange(10, 61, 10))
    with pytest.warns(UserWarning):
        c = load_metrics(cpt)
    assert not any(k.startswith("reward/") for k in c["train"]) and "eval/nll_think" not in c["eval"]


def test_load_metrics_errors(tmp_path):
    with pytest.raises(PlotError, match="metrics.jsonl"):
        load_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("not json\n{\"split\": \"train\"}\n")
    with pytest.warns(UserWarning) as rec, pytest.raises(PlotError, match="no readable"):
        load_metrics(tmp_path)
    assert [str(w.message).split(": ")[0].rsplit(":", 1)[1] for w in rec] == ["1", "2"]


@pytest.mark.filterwarnings("ignore:.*malformed")
def test_plot_single_ntp_run_via_cli(runs, capsys):
    _, cpt = runs
    # in-process CLI, one run, default out dir RUN_DIR/plots; no reward, so those groups are skipped
    assert main([str(cpt)]) == 0
    printed = capsys.readouterr().out.split()
    assert {Path(p).name for p in printed} == {"loss.png", "train.png", "perf.png", "eval.png", "summary.png"}
    assert all(Path(p).parent == cpt / "plots" for p in printed)
    _assert_pngs(printed)


@pytest.mark.filterwarnings("ignore:.*malformed")
def test_plot_run_compare(runs, tmp_path):
    rlp, cpt = runs
    out = tmp_path / "cmp"
    paths = plot_run(rlp, out, compare=[cpt])  # RLP vs CPT baseline: every group of either run
    assert {p.name for p in paths} == {f"{g}.png" for g in ("loss", "reward", "advantage", "policy", "thought",
                                                            "train", "perf", "eval", "summary")}
    assert all(p.parent == out for p in paths) and not (rlp / "plots").exists()
    _assert_pngs(paths)


def test_cli_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    r = subprocess.run([sys.executable, "-m", "rlp_jax.plot", str(missing)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "Traceback" not in r.stderr, r.stderr
