"""Checksums of checkpoint folders: the manifest each save writes into its step folder before
orbax commits it, and the check every restore makes before it reads an array.

Orbax writes arrays raw: a flipped byte in an array file loads silently (one 4-byte flip in
an optimizer moment took a loss from 1.30 to 15.6), and only some truncations are caught by
TensorStore. So every save writes ``<step>/nnxfit_manifest.json``::

    {"format": 1, "algorithm": "crc32", "save_id": "<32 hex>", "step": 40,
     "items": {"meta": {"metadata": [size, crc], ...}, "module": {...}, "train": {...}}}

with the size and CRC-32 of every file of every item folder. It is written from orbax's
background thread once every item is finalized and before the step folder is renamed to its
final name (``checkpoint_writer.Writer``), so a complete step folder always has one and the
training thread never reads a byte for it. The files are read back from the page cache right
after they were written: ~0.13 s of one core per 115 MiB on the 2-core test machine.

``save_id`` is new for every save; the checkpoint's ``meta`` and each array item's orbax
``custom_metadata`` carry it too, so items of two saves mixed in one folder are named as such.
CRC-32 detects every burst of up to 32 flipped bits and other damage with probability
1 - 2**-32: it guards against damage on disk, not against tampering.

A restore checks what it reads (``verify``): every file of the items it loads is present, of
the recorded size, with the recorded checksum, and no file the save did not write is there.
Checkpoints written before nnxfit recorded checksums have no manifest: they load, with a
warning that they were not verified (``LEGACY``).
"""

from __future__ import annotations

import json
import os
import uuid
import zlib
from collections.abc import Iterable

from nnxfit.errors import CheckpointError

MANIFEST = "nnxfit_manifest.json"
FORMAT = 1
ALGORITHM = "crc32"
# orbax's custom_metadata key (array items) holding the save's id and step.
SAVE_KEY = "nnxfit_save"
_CHUNK = 4 << 20  # zlib.crc32 and readinto release the GIL for buffers this large


class CheckpointCorruptError(CheckpointError):
    """A checkpoint folder cannot be read (truncated, garbled, missing files, bytes that do
    not match their checksum, or items of different saves)."""


def new_save_id() -> str:
    return uuid.uuid4().hex


def _crc(path: str, view: memoryview) -> list[int]:
    crc = size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return [size, crc]


def _files(item_dir: str) -> list[str]:
    """Paths of the files under ``item_dir``, relative, with ``/``, sorted."""
    out = []
    for root, dirs, files in os.walk(item_dir):
        dirs.sort()
        rel = os.path.relpath(root, item_dir)
        for name in sorted(files):
            out.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return out


def file_sums(item_dir: str) -> dict[str, list[int]]:
    """``{relative path: [size, crc32]}`` of every file under ``item_dir``."""
    view = memoryview(bytearray(_CHUNK))
    return {rel: _crc(os.path.join(item_dir, rel), view) for rel in _files(item_dir)}


def write_manifest(step_dir: str, save_id: str, step: int) -> None:
    """Records every item folder of ``step_dir`` (a step folder not yet committed)."""
    items = sorted(n for n in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, n)))
    manifest = {
        "format": FORMAT,
        "algorithm": ALGORITHM,
        "save_id": save_id,
        "step": int(step),
        "items": {name: file_sums(os.path.join(step_dir, name)) for name in items},
    }
    tmp = os.path.join(step_dir, f"{MANIFEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, separators=(",", ":"))
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def read_manifest(step_dir: str, where: str) -> dict | None:
    """The manifest of a step folder; None when it has none (a checkpoint written before
    nnxfit recorded checksums, or a damaged one: ``check_save_ids`` tells them apart)."""
    path = os.path.join(step_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointCorruptError(
            f"checkpoint {where} is unreadable: its checksum manifest {MANIFEST} is damaged ({e})."
        ) from e
    ok = (
        isinstance(manifest, dict)
        and manifest.get("format") == FORMAT
        and manifest.get("algorithm") == ALGORITHM
        and isinstance(manifest.get("items"), dict)
    )
    if not ok:
        raise CheckpointCorruptError(
            f"checkpoint {where} is unreadable: its checksum manifest {MANIFEST} is not one "
            "this nnxfit writes."
        )
    return manifest


def check_save_ids(where: str, step: int, manifest: dict | None, meta: dict, items: dict) -> None:
    """Raises ``CheckpointCorruptError`` unless the manifest, ``meta`` and every array item
    (``items``: name -> orbax ``custom_metadata``) come from one save, the one of ``step``."""
    if meta.get("step") != step:
        raise CheckpointCorruptError(
            f"checkpoint {where} holds the metadata of step {meta.get('step')}, not {step}: "
            "its meta item comes from another checkpoint."
        )
    save_id = meta.get("save_id")
    if manifest is None:
        if save_id is not None:
            raise CheckpointCorruptError(
                f"checkpoint {where} is damaged: its checksum manifest {MANIFEST} is missing."
            )
    elif manifest.get("save_id") != save_id:
        raise CheckpointCorruptError(
            f"checkpoint {where} mixes items of different saves: its meta item was written by "
            f"the save of step {meta.get('step')}, its manifest by the save of step "
            f"{manifest.get('step')}."
        )
    for name, custom in items.items():
        mark = (custom or {}).get(SAVE_KEY) if isinstance(custom, dict) else None
        got = (mark or {}).get("id")
        if got != save_id:
            other = f"the save of step {mark.get('step')}" if mark else "a save without an id"
            raise CheckpointCorruptError(
                f"checkpoint {where} mixes items of different saves: its {name!r} item was "
                f"written by {other}, its meta by the save of step {step}."
            )


def verify(step_dir: str, manifest: dict, items: Iterable[str], where: str) -> None:
    """Raises ``CheckpointCorruptError`` naming the first file of ``items`` that is missing,
    of another size, of another checksum, or that the save did not write."""
    view = memoryview(bytearray(_CHUNK))
    for item in items:
        recorded = manifest["items"].get(item)
        if recorded is None:
            raise CheckpointCorruptError(
                f"checkpoint {where} is damaged: its manifest records no {item!r} item."
            )
        item_dir = os.path.join(step_dir, item)
        present = set(_files(item_dir))
        missing = sorted(set(recorded) - present)
        if missing:
            raise CheckpointCorruptError(
                f"checkpoint {where} is damaged: {item}/{missing[0]} is missing"
                f"{f' ({len(missing)} files in all)' if len(missing) > 1 else ''}."
            )
        extra = sorted(present - set(recorded))
        if extra:
            raise CheckpointCorruptError(
                f"checkpoint {where} is damaged: {item}/{extra[0]} was not written by its save "
                "(a file of another checkpoint copied in?)."
            )
        for rel, (size, crc) in recorded.items():
            got_size, got_crc = _crc(os.path.join(item_dir, rel), view)
            if got_size != size:
                raise CheckpointCorruptError(
                    f"checkpoint {where} is damaged: {item}/{rel} is {got_size} bytes, its save "
                    f"wrote {size} (truncated or overwritten)."
                )
            if got_crc != crc:
                raise CheckpointCorruptError(
                    f"checkpoint {where} is damaged: {item}/{rel} does not match the checksum "
                    "recorded when it was saved (its bytes changed on disk)."
                )
