"""A recorded stand-in for the part of wandb's public API rlp_jax uses: `wandb.init(...)` returning a run with
`.id`, `.log(data, step=)` and `.finish()`. Each call is appended to `CALLS` and, when the environment names
a file in RLP_FAKE_WANDB_LOG, to that file as a JSON line (for a training subprocess that has this folder on
its PYTHONPATH). Tests read what W&B would have received with `tests.train.wandb_cases.history`."""

import json
import os
import uuid

CALLS: list[dict] = []


def _record(event: dict) -> None:
    CALLS.append(event)
    path = os.environ.get("RLP_FAKE_WANDB_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")


class Run:
    def __init__(self, run_id: str):
        self.id = run_id

    def log(self, data: dict, step: int | None = None) -> None:
        _record({"event": "log", "id": self.id, "step": step, "data": dict(data)})

    def finish(self) -> None:
        _record({"event": "finish", "id": self.id})


def init(*, project=None, entity=None, name=None, group=None, tags=None, mode=None, dir=None, id=None,
         resume=None, config=None):
    run_id = id or uuid.uuid4().hex[:8]
    _record({"event": "init", "id": run_id, "project": project, "name": name, "mode": mode, "resume": resume,
             "config": config})
    return Run(run_id)
