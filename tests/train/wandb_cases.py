"""What W&B received, from the recorded fake's calls (tests/fake_wandb)."""

import json
from pathlib import Path

FAKE_PATH = Path(__file__).resolve().parents[1] / "fake_wandb"


def history(calls: list[dict]) -> list[tuple[str, dict[int, dict]]]:
    """[(run id, {step: metrics})], one entry per `wandb.init`, in order; every run was finished."""
    out, open_runs = [], set()
    for c in calls:
        if c["event"] == "init":
            out.append((c["id"], {}))
            open_runs.add(c["id"])
        elif c["event"] == "log":
            assert c["id"] == out[-1][0] and c["id"] in open_runs, "a log after its run was finished"
            out[-1][1].setdefault(int(c["step"]), {}).update(c["data"])
        else:
            open_runs.discard(c["id"])
    assert not open_runs, f"runs never finished: {open_runs}"
    return out


def read_calls(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
