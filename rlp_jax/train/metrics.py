"""Host-side metric sinks: a JSONL file and TensorBoard event files in the run directory.

Both resume into the same run: on restart from step S, JSONL lines after S (written by the killed
process after its last checkpoint) are dropped, and TensorBoard events go to the same directory
with `purge_step=S` so the curves continue instead of forking. A run directory with metrics but no
checkpoint (killed before its first save, or its checkpoints deleted) starts over from step 0: the
earlier metrics.jsonl and tensorboard/ are moved aside (`*.before-restart-TIMESTAMP`), never appended to
or deleted, and a warning says where they went.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from tensorboardX import SummaryWriter


class MetricsWriter:
    """`write(step, metrics, split)` appends to RUN_DIR/metrics.jsonl and RUN_DIR/tensorboard."""

    def __init__(self, run_dir: str | Path, *, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        if not enabled:
            return
        if not resume_step and self.path.exists() and self.path.read_text().strip():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            moved = [self.path.rename(self.path.with_name(f"metrics.before-restart-{stamp}.jsonl"))]
            tb = Path(run_dir) / "tensorboard"
            if tb.exists():
                moved.append(tb.rename(tb.with_name(f"tensorboard.before-restart-{stamp}")))
            logging.getLogger(__name__).warning(
                "%s has metrics but no checkpoint to resume from: starting over at step 0; the earlier metrics "
                "are kept in %s", run_dir, ", ".join(str(m) for m in moved))
        elif resume_step and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step or None)

    def write(self, step: int, metrics: dict, split: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        record = {"step": int(step), "split": split,
                  **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for k, v in clean.items():
            self._tb.add_scalar(k if split == "train" else f"{split}/{k}", v, int(step))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 0
