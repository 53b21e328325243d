"""Reads offline W&B runs back from their files, to check what a user would see after `wandb sync`.

wandb 0.2x keeps an offline run in `run-<id>.wandb`: a header (":W&B", a 2-byte magic, a
version byte), then LevelDB-log blocks of 32 KiB holding protobuf `Record`s, each record in one
chunk (type 1) or split over several (2 first, 3 middle, 4 last). wandb no longer ships a Python
reader for it, so the tests carry these few lines.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


@dataclass
class OfflineRun:
    path: Path
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every logged row, in order (`trainer/global_step` is the step Lightning's logger gave)."""


def _chunks(data: bytes) -> list[bytes]:
    out, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
            pending = b""
    return out


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(run_dir: Path) -> OfflineRun:
    """The run's name, group, tags, config, history, final summary and exit code, as its records say."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    run = OfflineRun(path=Path(run_dir))
    for raw in _chunks(data):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":  # the first, and again when tags or config change
            run.name = record.run.display_name or run.name
            run.group = record.run.run_group or run.group
            run.tags = list(record.run.tags)
            run.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def read_runs(save_dir: Path) -> list[OfflineRun]:
    return [read_run(d) for d in sorted(Path(save_dir, "wandb").glob("offline-run-*"))]
