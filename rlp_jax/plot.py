"""Plots of a training run's RUN_DIR/metrics.jsonl (as written by `rlp_jax.train.metrics.MetricsWriter`).

    python -m rlp_jax.plot RUN_DIR [OTHER_RUN ...] [--out DIR]

writes one PNG per metric group (the name prefix before "/": loss, reward, advantage, policy, thought,
train, perf, eval, ...) with a subplot per metric, plus `summary.png` with the main curves, into
DIR (default RUN_DIR/plots). Further run directories are overlaid, labelled by directory name
(e.g. an RLP run against its CPT baseline). Figures are drawn with `matplotlib.figure.Figure` and
the Agg canvas: no display and no pyplot global state.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Series = tuple[np.ndarray, np.ndarray]
GROUP_ORDER = ("loss", "reward", "advantage", "policy", "thought", "train", "perf", "eval")
# summary panels: (title, [(split, metric), ...]); a panel is drawn if any of its curves has data
SUMMARY = (("reward", [("train", "reward/mean"), ("train", "reward/s_pred"), ("train", "reward/s_ema")]),
           ("thought/mean_len", [("train", "thought/mean_len")]),
           ("loss/total", [("train", "loss/total")]),
           ("eval NLL", [("eval", "eval/nll_no_think"), ("eval", "eval/nll_think")]))


class PlotError(ValueError):
    """A run directory or its metrics.jsonl cannot be read."""


def load_metrics(run_dir: str | Path) -> dict[str, dict[str, Series]]:
    """split -> metric -> (steps, values), sorted by step, keeping the last line per (split, step).

    Malformed lines are skipped with a warning naming the file and line number; non-finite values
    (logged as the strings "nan"/"inf") become floats. Raises PlotError if the file is missing or
    holds no readable line.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no such file (is {run_dir} a run directory?)")
    records: dict[tuple[str, int], dict] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step, split = int(rec["step"]), str(rec.get("split", "train"))
        except (ValueError, KeyError, TypeError) as e:
            warnings.warn(f"{path}:{lineno}: skipping malformed line ({type(e).__name__}: {e})", stacklevel=2)
            continue
        records[(split, step)] = rec  # a resumed run re-logs steps: the last occurrence wins
    if not records:
        raise PlotError(f"{path}: no readable metrics lines")
    points: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for (split, step), rec in records.items():
        for k, v in rec.items():
            if k in ("step", "split") or isinstance(v, bool):
                continue
            try:
                points[split][k].append((step, float(v)))
            except (TypeError, ValueError):
                continue
    out: dict[str, dict[str, Series]] = {}
    for split, metrics in points.items():
        out[split] = {}
        for k, pts in sorted(metrics.items()):
            pts.sort()
            out[split][k] = (np.array([p[0] for p in pts], np.int64), np.array([p[1] for p in pts], np.float64))
    return out


def _smooth(v: np.ndarray) -> np.ndarray | None:
    """Trailing moving average (window ~n/25, NaN-aware) for long series, else None."""
    n = len(v)
    if n < 30:
        return None
    w = max(3, n // 25)
    ok = np.isfinite(v)
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    m = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(1, n + 1)
    lo = np.maximum(idx - w, 0)
    cnt = m[idx] - m[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (c[idx] - c[lo]) / cnt, np.nan)


def _draw(ax, series: Series, label: str, color: str, ls: str = "-") -> None:
    """Raw points (light) plus their moving average when there are many points."""
    steps, vals = series
    smooth = _smooth(vals)
    if smooth is None:
        ax.plot(steps, vals, color=color, ls=ls, label=label, marker=".", lw=1.2)
    else:
        ax.plot(steps, vals, color=color, ls=ls, alpha=0.25, lw=0.8)
        ax.plot(steps, smooth, color=color, ls=ls, label=label, lw=1.6)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def _grid(n: int, title: str) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    w, h = 4.8 * cols, 3.4 * rows + 0.5
    fig = Figure(figsize=(w, h))  # fixed margins: constrained layout would double the drawing time
    fig.subplots_adjust(left=0.75 / w, right=1 - 0.25 / w, bottom=0.5 / h, top=1 - 0.75 / h,
                        wspace=0.3, hspace=0.45)
    fig.suptitle(title)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, *,
             compare: list[str | Path] | None = None) -> list[Path]:
    """Write one PNG per (split, metric group) and summary.png into out_dir (default RUN_DIR/plots).

    `compare` runs are overlaid on every panel where they have data. Groups without data are skipped.
    Returns the written paths.
    """
    run_dirs = [Path(run_dir), *map(Path, compare or [])]
    labels = [p.resolve().name or str(p) for p in run_dirs]
    if len(set(labels)) < len(labels):  # e.g. a/rlp vs b/rlp: label by the last two path parts
        labels = ["/".join(p.resolve().parts[-2:]) for p in run_dirs]
    runs = [(label, load_metrics(p)) for label, p in zip(labels, run_dirs)]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    out = Path(out_dir) if out_dir is not None else run_dirs[0] / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    groups: dict[tuple[str, str], list[str]] = defaultdict(list)  # (split, group) -> metrics, any run
    for _, data in runs:
        for split, metrics in data.items():
            for k in metrics:
                g = groups[(split, k.split("/")[0] if "/" in k else "other")]
                if k not in g:
                    g.append(k)
    rank = {g: i for i, g in enumerate(GROUP_ORDER)}
    for split, group in sorted(groups, key=lambda sg: (sg[0] != "train", rank.get(sg[1], 99), sg)):
        names = sorted(groups[(split, group)])
        fig, axes = _grid(len(names), f"{group} ({split})" if split not in ("train", group) else group)
        for ax, name in zip(axes, names):
            for (label, data), color in zip(runs, colors):
                if name in data.get(split, {}):
                    _draw(ax, data[split][name], label, color)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if len(runs) > 1:
                ax.legend(fontsize=8)
        stem = group if split in ("train", group) else f"{split}_{group}"
        written.append(_save(fig, out / f"{stem}.png"))

    panels = [(t, cs) for t, cs in SUMMARY if any(k in d.get(s, {}) for _, d in runs for s, k in cs)]
    if panels:
        fig, axes = _grid(len(panels), f"summary: {runs[0][0]}" + (" vs " + ", ".join(r[0] for r in runs[1:])
                                                                   if len(runs) > 1 else ""))
        for ax, (title, curves) in zip(axes, panels):
            for (label, data), color in zip(runs, colors):
                for ci, (split, name) in enumerate(curves):
                    if name in data.get(split, {}):
                        # one run: a color per curve; several runs: a color per run, a line style per curve
                        if len(runs) == 1:
                            _draw(ax, data[split][name], name, f"C{ci}")
                        else:
                            _draw(ax, data[split][name], label if len(curves) == 1 else f"{label}: {name}",
                                  color, ("-", "--", ":", "-.")[ci % 4])
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if len(curves) > 1 or len(runs) > 1:
                ax.legend(fontsize=8)
        written.append(_save(fig, out / "summary.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: plot RUN_DIR (plus overlaid runs); prints the written files; 2 on bad input."""
    ap = argparse.ArgumentParser(prog="python -m rlp_jax.plot", description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="main run, then runs to overlay")
    ap.add_argument("--out", default=None, help="output directory (default: FIRST_RUN_DIR/plots)")
    args = ap.parse_args(argv)
    try:
        for d in args.run_dirs:
            if not Path(d).is_dir():
                raise PlotError(f"{d}: no such run directory")
        with warnings.catch_warnings():  # skipped-line warnings as one line each, without source context
            warnings.showwarning = lambda msg, *_a, **_k: print(f"warning: {msg}", file=sys.stderr)
            paths = plot_run(args.run_dirs[0], args.out, compare=args.run_dirs[1:])
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
