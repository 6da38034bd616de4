"""Host-side metric sinks: a JSONL file and TensorBoard event files in the run directory, and optionally a
Weights & Biases run (`train.wandb`).

Both resume into the same run: on restart from step S, JSONL lines after S (written by the killed
process after its last checkpoint) are dropped, and TensorBoard events go to the same directory
with `purge_step=S` so the curves continue instead of forking. A run directory with metrics but no
checkpoint (killed before its first save, or its checkpoints deleted) starts over from step 0: the
earlier metrics.jsonl and tensorboard/ are moved aside (`*.before-restart-TIMESTAMP`), never appended to
or deleted, and a warning says where they went.

W&B cannot rewind a run: its id and the last step sent are kept in RUN_DIR/wandb_run.json, a resumed
run continues the same W&B run and sends only the steps after that one (the steps replayed since the
checkpoint are recomputed exactly, so the curve is the same); starting over starts a new W&B run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from tensorboardX import SummaryWriter

from rlp_jax.runs.config import ConfigError, WandbConfig


class MetricsWriter:
    """`write(step, metrics, split)` appends to RUN_DIR/metrics.jsonl and RUN_DIR/tensorboard."""

    def __init__(self, run_dir: str | Path, *, resume_step: int = 0, enabled: bool = True,
                 wandb: WandbConfig = WandbConfig(), config: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        if not enabled:
            return
        self._wandb = _WandbRun(Path(run_dir), wandb, config or {}, resume_step) if wandb.project else None
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
        named = {k if split == "train" or k.startswith(f"{split}/") else f"{split}/{k}": v for k, v in clean.items()}
        for k, v in named.items():
            self._tb.add_scalar(k, v, int(step))
        if self._wandb is not None:
            self._wandb.log(int(step), named)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.close()


class _WandbRun:
    """One W&B run per run directory; its id and last step in RUN_DIR/wandb_run.json (see the module doc)."""

    def __init__(self, run_dir: Path, cfg: WandbConfig, config: dict, resume_step: int):
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.wandb.project needs the wandb package: pip install 'rlp_jax[wandb]'") from None
        self.state_path = run_dir / "wandb_run.json"
        state = json.loads(self.state_path.read_text()) if resume_step and self.state_path.exists() else {}
        self.last = int(state.get("last_step", 0))
        try:
            self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name,
                                  group=cfg.group, tags=list(cfg.tags) or None, mode=cfg.mode, dir=str(run_dir),
                                  id=state.get("id"), resume="allow" if state else None, config=config)
        except Exception as e:
            raise ConfigError(f"W&B could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}); "
                              "log in (wandb login), or --set train.wandb.mode=offline") from None
        self.run_id = self.run.id
        self._save()

    def log(self, step: int, metrics: dict) -> None:
        """Send `metrics` at `step` unless an earlier process sent that step already (train and eval
        metrics of one step are sent by the same process, one after the other)."""
        if step > self.last or (step == self.last and self._sent):
            self.run.log(metrics, step=step)
            self.last, self._sent = step, True
            self._save()

    _sent = False   # this process has sent something

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"id": self.run_id, "last_step": self.last}))
        tmp.replace(self.state_path)

    def close(self) -> None:
        self.run.finish()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 0
