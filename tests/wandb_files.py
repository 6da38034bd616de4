"""Reading what wandb wrote in offline mode: its `run-<id>.wandb` transaction log (a ":W&B" header, then
LevelDB-log records of wandb's own protobuf `Record`s), so tests check the metrics W&B would receive."""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK, _HEADER = 32768, 7   # LevelDB log: 32 KiB blocks; record header crc32 (4), length (2), type (1)
_FULL, _FIRST, _LAST = 1, 2, 4


def records(path: Path):
    """The protobuf Records of one .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, buf = _HEADER, b""
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        _, n, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if room < _HEADER or (kind == 0 and n == 0):   # block trailer padding
            pos += room
            continue
        chunk, pos = data[pos + _HEADER: pos + _HEADER + n], pos + _HEADER + n
        buf = chunk if kind in (_FULL, _FIRST) else buf + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def offline_runs(run_dir: Path) -> list[tuple[str, dict[int, dict]]]:
    """[(run id, {step: metrics})] per offline run under RUN_DIR/wandb, oldest first."""
    out = []
    for f in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime):
        run_id, history = None, {}
        for r in records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run_id = r.run.run_id
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history.setdefault(int(row.pop("_step")), {}).update(
                    {k: v for k, v in row.items() if not k.startswith("_")})
        out.append((run_id, history))
    return out
