"""Reads wandb's offline run files (``run-<id>.wandb``) back, with wandb's own record protos.

wandb 0.31 writes every run, offline or online, as a log of ``wandb_internal_pb2.Record``s in
leveldb's log format (32 KiB blocks of chunks, each with a 7-byte header: checksum, length,
type FULL/FIRST/MIDDLE/LAST), after a 7-byte file header ``:W&B``, magic ``0xBEE1``, version.
That is what ``wandb sync`` uploads. The Python reader wandb once shipped
(``wandb.sdk.internal.datastore``) moved into its Go core, so the tests parse the container
here and the records with wandb's protos.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
import zlib

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str):
    """Every ``Record`` of a ``.wandb`` file, in order (checksums verified)."""
    with open(path, "rb") as f:
        data = f.read()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic) == (b":W&B", 0xBEE1), path
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's trailer: zero padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + HEADER + length > len(data):
            break  # the service is still writing it
        chunk = data[pos + HEADER : pos + HEADER + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, (path, pos)
        pos += HEADER + length
        buf = chunk if kind in (FULL, FIRST) else buf + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(run_dir: str, timeout: float = 60.0) -> dict:
    """One offline run folder: its id, config, history ({step: {key: value}}), summary and
    exit code. ``run.finish()`` hands the records to wandb's service process, which writes
    them a moment later: this waits (up to ``timeout`` s) for the run's exit record."""
    deadline = time.monotonic() + timeout
    while True:
        out = _read(run_dir)
        if out["ended"] or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _read(run_dir: str) -> dict:
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    out = {
        "ended": False,
        "run_id": None,
        "config": {},
        "history": {},
        "summary": {},
        "exit_code": None,
    }
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = r.run.run_id
            for item in r.run.config.update:
                out["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                out["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in r.history.item}
            step = row.pop("_step")
            assert step == r.history.step.num
            out["history"][step] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind == "summary":
            for item in r.summary.update:
                out["summary"][_key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
            out["ended"] = True
    out["config"].pop("_wandb", None)
    return out


def run_dirs(wandb_dir: str) -> list[str]:
    """The ``offline-run-*`` folders under ``wandb_dir``, oldest first."""
    return sorted(glob.glob(os.path.join(wandb_dir, "offline-run-*")))
