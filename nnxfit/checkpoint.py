"""Checkpoints on disk: the orbax plumbing, saving and restoring a fit's state, and
``load_checkpoint`` (``fit(resume=...)``, which picks the checkpoint, is ``resume.py``).

A checkpoint is one orbax step folder ``<dir>/<step>/``. Orbax writes it as
``<step>.orbax-checkpoint-tmp`` and renames it once every item is on disk, so a folder named
just ``<step>`` is complete; a tmp folder (a process killed mid-save) is never listed. Items:

* ``module``: ``{"params": ..., "rest": ...}``, every variable of the module (trainable
  params, frozen params, BatchNorm statistics, RNG keys and counts, custom variables);
* ``train``: ``{"opt", "extra", "step", "acc", "last", "health"}``, the rest of
  ``Trainer.train_state()`` (``extra``: the EMA, SpikeGuard's buffer; empty without them;
  absent from ``save_weights_only`` checkpoints, which cannot resume a fit);
* ``meta``: JSON: ``Trainer.loop_state()`` (step, epoch, batch in the epoch, History, callback
  states, loader state), the metrics at save time, nnxfit/jax/flax versions, Trainer options,
  the module's ``hparams``, wall time, and the save's id (also in each array item's orbax
  ``custom_metadata``);
* ``nnxfit_manifest.json``: size and CRC-32 of every file of every item, written last, before
  orbax's rename (``nnxfit.integrity``). A restore checks the files it reads against it and
  treats any failure to read a step (bad checksum, truncated or missing file, items of two
  saves, any orbax/TensorStore read error) as that step being corrupt.

The arrays and the loop state come from ``Trainer.checkpoint_state()``: the point a resume
continues from (the live state, or the state from before a partial epoch end:
``resume_point.py``).

Arrays are stored as nested dicts keyed by their pytree path (``opt/0/mu/net/l1/kernel``), so a
mismatch is reported by path, and they are restored into the *live* structure (optax
namedtuples, ``nnx.State``) with the live shardings. Typed PRNG keys are stored as their
``key_data`` and wrapped again on restore with the live key's implementation.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from importlib import metadata as _metadata
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxfit import integrity, multihost, orbax_leaks, orbax_loops
from nnxfit.config import EXACTNESS_OPTIONS, trainer_options  # noqa: F401 (re-exported)
from nnxfit.errors import CheckpointError, ConfigError
from nnxfit.hparams import of as hparams_of
from nnxfit.integrity import CheckpointCorruptError
from nnxfit.module_leaves import live_leaves

FORMAT = 1
TRAIN_FIELDS = ("opt", "extra", "step", "acc", "last", "health")
TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's arrays differ in structure, shape or dtype from the live module."""


class ResumeWarning(UserWarning):
    """``fit(resume=...)`` started fresh, skipped a corrupt checkpoint, or moved one aside."""


class CheckpointWarning(UserWarning):
    """A checkpoint was loaded without checksums to verify it against (written before nnxfit
    recorded them), or ``ModelCheckpoint`` refused to save a non-finite state."""


class CheckpointInfo(NamedTuple):
    """What ``load_checkpoint`` loaded: the step folder, its step and its metrics."""

    path: str
    step: int
    metrics: dict


# ------------------------------------------------------------------------ orbax managers ---
class _QuietAbsl(logging.Filter):
    """Drops orbax's warnings about things nnxfit does on purpose (metric-less saves in a
    manager that tracks a best metric, read-only managers for restoring)."""

    EXPECTED = ("Requested `tracked_metric`", "Given directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(msg.startswith(e) for e in self.EXPECTED)


_quiet = _QuietAbsl()
logging.getLogger("absl").addFilter(_quiet)


def _ocp():
    import orbax.checkpoint as ocp  # slow import: only when checkpoints are used

    orbax_leaks.install()  # two TensorStore calls orbax makes per save leak host memory
    orbax_loops.install()  # its loops close with writes and executor threads still running
    return ocp


def _handlers(compress: bool = False) -> dict:
    ocp = _ocp()
    return {
        "module": _tree_handler(compress),
        "train": _tree_handler(compress),
        "meta": ocp.JsonCheckpointHandler(),
    }


def _tree_handler(compress: bool):
    """orbax's ``StandardCheckpointHandler``, writing zstd-compressed arrays or not. Float
    weights and optimizer moments shrink ~11 % under zstd (115 -> 103 MiB), and on 2 CPU cores
    it took ~0.08 s of the ~0.22 s each such save cost the training loop
    (``checkpoint_stall.py``). Restoring reads either kind."""
    ocp = _ocp()
    handler = ocp.StandardCheckpointHandler()
    if not compress:
        # The standard handler does not pass ``use_compression`` on to the PyTree handler it
        # wraps, so that one is replaced, with the standard handler's own settings.
        # orbax-checkpoint is pinned (pyproject.toml); tests/test_checkpoint.py pins this.
        handler._impl = ocp.PyTreeCheckpointHandler(
            save_concurrent_gb=96, restore_concurrent_gb=96, use_compression=False
        )
    return handler


def open_manager(
    directory: str,
    *,
    monitor: str | None = None,
    mode: str = "min",
    keep: Any = None,
    compress: bool = False,
    on_commit: Any = None,
):
    """An asynchronous orbax ``CheckpointManager`` for writing to ``directory``, compressing
    arrays with zstd only if ``compress`` (``_tree_handler``).

    ``keep`` is an orbax preservation policy. Orbax applies it in its finalize thread after
    the new checkpoint is committed, so an old checkpoint is never deleted before its
    successor is complete. Leftover tmp folders of killed saves are removed on creation.
    ``on_commit()`` runs in orbax's background thread once every item of a save is written,
    before the step folder is renamed (``checkpoint_writer.Writer._seal``).
    """
    ocp = _ocp()
    best = {}
    if monitor is not None:  # orbax writes a step's metrics to disk only with a best_fn
        best = dict(best_fn=lambda m: m[monitor], best_mode=mode)
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        preservation_policy=keep,
        async_options=ocp.AsyncOptions(post_finalization_callback=on_commit),
        multiprocessing_options=multihost.orbax_options(),
        **best,
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=_handlers(compress))


def _reader(directory: str):
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    return ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())


def list_steps(directory: str) -> list[int]:
    """Steps of the complete checkpoints in ``directory``, oldest first (tmp folders of
    interrupted saves are not complete and not listed)."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n))
    )


def tmp_dirs(directory: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(directory) if TMP_MARKER in n)
    except (FileNotFoundError, NotADirectoryError):
        return []


def move_aside(directory: str, steps: list[int], label: str) -> str:
    """Moves step folders to ``<directory>.<label>-<time>/`` (never deletes); returns it."""
    dest = f"{directory.rstrip(os.sep)}.{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    base, n = dest, 1
    while os.path.exists(dest):
        n += 1
        dest = f"{base}-{n}"
    os.makedirs(dest)
    for s in steps:
        shutil.move(os.path.join(directory, str(s)), os.path.join(dest, str(s)))
    return dest


# ------------------------------------------------------------------- arrays by pytree path ---
def _entry(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _walk(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) pairs of a nested dict, depth first in insertion order."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _walk(v, (*prefix, str(k)))
    else:
        yield prefix, tree


def _nest(pairs: list[tuple[tuple, Any]]) -> dict:
    out: dict = {}
    for path, value in pairs:
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


class _Tree:
    """One live pytree, seen as ``{path: leaf}``: what orbax saves, the target it restores
    into, and the way back into the live structure."""

    def __init__(self, name: str, tree: Any):
        self.name = name
        pairs, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        self.paths = [tuple(_entry(k) for k in p) for p, _ in pairs]
        self.leaves = [x for _, x in pairs]
        if len(set(self.paths)) != len(self.paths):
            raise CheckpointError(
                f"two leaves of the {name} state have the same path once written as strings; "
                "rename the variables or pytree keys so that each path is unique."
            )

    def storable(self) -> dict:
        return _nest(
            [
                (p, jax.random.key_data(x) if _is_key(x) else x)
                for p, x in zip(self.paths, self.leaves, strict=True)
            ]
        )

    def _spec(self, x):
        if _is_key(x):
            s = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=x.sharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    def target(self) -> dict:
        return _nest([(p, self._spec(x)) for p, x in zip(self.paths, self.leaves, strict=True)])

    def check(self, disk: Any, where: str) -> None:
        """Raises ``CheckpointMismatchError`` naming the first path whose presence, shape or
        dtype differs between the checkpoint's metadata ``disk`` and this live tree."""
        on_disk = {p: m for p, m in _walk(disk if disk is not None else {})}
        problems = []
        for p, x in zip(self.paths, self.leaves, strict=True):
            want = self._spec(x)
            live = f"{tuple(want.shape)} {want.dtype}"
            m = on_disk.pop(p, None)
            if m is None:
                problems.append((p, "missing", live))
            elif tuple(m.shape) != tuple(want.shape) or str(m.dtype) != str(want.dtype):
                problems.append((p, f"{tuple(m.shape)} {m.dtype}", live))
        problems += [(p, f"{tuple(m.shape)} {m.dtype}", "missing") for p, m in on_disk.items()]
        if problems:
            path, disk_s, live_s = problems[0]
            name = "/".join((self.name, *path))
            more = f" ({len(problems)} differences in all)" if len(problems) > 1 else ""
            raise CheckpointMismatchError(
                f"checkpoint {where} does not match the live {self.name} state: at {name!r} "
                f"the checkpoint has {disk_s}, the module/optimizer has {live_s}{more}. "
                "Build the module and optimizer exactly as in the run that saved it (same "
                "layers, sizes, dtypes, trainable filter and optimizer), or start a fresh run "
                "in another workdir. Nothing was overwritten."
            )

    def rebuild_leaves(self, restored: dict) -> list:
        """The restored arrays in the live leaf order, as live-like arrays (keys wrapped,
        on the live shardings)."""
        flat = dict(_walk(restored))
        out = []
        for p, live in zip(self.paths, self.leaves, strict=True):
            x = flat[p]
            if getattr(x, "committed", False) and not getattr(live, "committed", True):
                # A fresh fit's leaves are uncommitted, and so are the zeros the carry puts
                # back at each log; a restored leaf comes back committed to its device. jit
                # keys its cache on that, so every program would compile twice on resume.
                x = jax.device_put(np.asarray(x))
            if _is_key(live):
                x = jax.random.wrap_key_data(x, impl=jax.random.key_impl(live))
            sharding = getattr(live, "sharding", None)
            if sharding is not None and getattr(x, "sharding", None) != sharding:
                x = jax.device_put(x, sharding)
            out.append(x)
        return out


def _split_train_state(state: dict) -> tuple[_Tree, _Tree]:
    module = _Tree("module", {"params": state["params"], "rest": state["rest"]})
    train = _Tree("train", {k: state[k] for k in TRAIN_FIELDS})
    return module, train


# ------------------------------------------------------------------------------- saving ---
def versions() -> dict[str, str]:
    out = {}
    for dist in ("nnxfit", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        try:
            out[dist] = _metadata.version(dist)
        except _metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _json_float(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def save_state(
    manager,
    trainer,
    step: int,
    *,
    metrics: Mapping | None = None,
    monitor: str | None = None,
    mode: str = "min",
    weights_only: bool = False,
    save_id: str | None = None,
) -> bool:
    """Starts an asynchronous save of the fit's state at ``step``; returns once the arrays
    are copied off the device. ``metrics`` are the values at save time (the monitored one is
    ranked by orbax only when finite: a NaN must never count as the best). ``save_id`` marks
    every item as this save's (``checkpoint_writer.Writer`` passes it and writes the checksum
    manifest under the same id)."""
    ocp = _ocp()
    state, loop = trainer.checkpoint_state()  # the resume point (resume_point.py)
    if multihost.active() and not weights_only:
        # Only process 0 writes the meta item; a loader sharded by process (grain) has a
        # state of its own on each.
        loop = {**loop, "loader_by_process": multihost.gathered("loader-state", loop["loader"])}
    module, train = _split_train_state(state)
    metrics = {k: _json_float(v) for k, v in (metrics or {}).items()}
    meta = {
        "format": FORMAT,
        "kind": "weights" if weights_only else "full",
        "step": int(step),
        "epoch": int(loop["epoch"]),
        "batch_in_epoch": int(loop["batch_in_epoch"]),
        "monitor": monitor,
        "mode": mode,
        "metrics": metrics,
        "loop": None if weights_only else loop,
        "versions": versions(),
        "trainer": trainer_options(trainer),
        "hparams": hparams_of(getattr(trainer, "module", None)),
        "time": time.time(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    mark = None
    if save_id is not None:
        meta["save_id"] = save_id
        mark = {integrity.SAVE_KEY: {"id": save_id, "step": int(step)}}
    items = {"module": ocp.args.StandardSave(module.storable(), custom_metadata=mark)}
    if not weights_only:
        items["train"] = ocp.args.StandardSave(train.storable(), custom_metadata=mark)
    items["meta"] = ocp.args.JsonSave(meta)
    ranked = None
    if monitor is not None:
        v = metrics.get(monitor)
        ranked = {monitor: v} if v is not None and math.isfinite(v) else None
    return manager.save(step, args=ocp.args.Composite(**items), metrics=ranked, force=True)


def _inexact_leaves(tree: Any) -> list:
    return [
        x
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jnp.inexact)
    ]


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    if not leaves:
        return jnp.asarray(True)
    return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()


def state_is_finite(trainer) -> bool:
    """Whether every float of the module's variables and of the optimizer state is finite:
    one fused reduction, asked only when a checkpoint is about to be taken (never per step).
    The state checked is the one a save writes (``Trainer.checkpoint_state``)."""
    state, _ = trainer.checkpoint_state()
    out = _all_finite(_inexact_leaves((state["params"], state["rest"], state["opt"])))
    # Replicated on every device (and process): the local copy answers for all of them.
    return bool(np.asarray(out.addressable_data(0)))


# ----------------------------------------------------------------------------- restoring ---
def _read_failure(error: BaseException) -> bool:
    """Whether an exception raised while orbax/TensorStore read a step means the step cannot
    be read. They raise ValueError (DATA_LOSS, OUT_OF_RANGE, NOT_FOUND), KeyError, OSError,
    garbled JSON, and a bare ``Exception`` ("Encountered error while reading array index") for
    a truncated or missing data file: any of them. Running out of memory is not the
    checkpoint's fault and propagates."""
    if isinstance(error, MemoryError | CheckpointMismatchError):
        return False
    return "RESOURCE_EXHAUSTED" not in str(error)


def _read_meta(reader, step: int, where: str) -> dict:
    ocp = _ocp()
    try:
        meta = reader.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        if not _read_failure(e):
            raise
        raise CheckpointCorruptError(f"checkpoint {where} is unreadable: its meta item: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointCorruptError(
            f"checkpoint {where} has no nnxfit metadata (meta/ is missing or of another format); "
            "it was not written by nnxfit.callbacks.ModelCheckpoint."
        )
    return meta


def _check_step(reader, directory: str, step: int, names: tuple[str, ...]) -> tuple:
    """Everything that can be checked before an array is read: the metadata, that every item
    comes from the one save of ``step``, and the checksum of every file of ``names`` and meta.
    Returns ``(meta, orbax item metadata, verified)``; ``verified`` is False for a checkpoint
    written before nnxfit recorded checksums."""
    where = os.path.join(directory, str(step))
    manifest = integrity.read_manifest(where, where)
    meta = _read_meta(reader, step, where)
    try:
        md = reader.item_metadata(step)
    except Exception as e:
        if not _read_failure(e):
            raise
        raise CheckpointCorruptError(f"checkpoint {where} is unreadable: {e}") from e
    present = {n: md.get(n) for n in names if hasattr(md, "get") and md.get(n) is not None}
    customs = {n: getattr(m, "custom_metadata", None) for n, m in present.items()}
    integrity.check_save_ids(where, step, manifest, meta, customs)
    if manifest is not None:
        integrity.verify(where, manifest, (*present, "meta"), where)
    return meta, md, manifest is not None


def _restore_items(reader, step: int, where: str, trees: dict[str, _Tree], md) -> dict:
    """Checks every tree against the checkpoint's item metadata ``md``, then restores them
    all; returns ``{item: restored leaves in live order}``."""
    ocp = _ocp()
    for name, tree in trees.items():
        disk = md.get(name) if hasattr(md, "get") else None
        if disk is None:
            raise CheckpointCorruptError(f"checkpoint {where} has no {name!r} item.")
        tree.check(getattr(disk, "tree", disk), where)
    args = ocp.args.Composite(**{n: ocp.args.StandardRestore(t.target()) for n, t in trees.items()})
    try:
        out = reader.restore(step, args=args)
        jax.block_until_ready([out[n] for n in trees])
    except Exception as e:
        if not _read_failure(e):
            raise
        raise CheckpointCorruptError(
            f"checkpoint {where} is unreadable (truncated or corrupt data): {e}"
        ) from e
    return {n: t.rebuild_leaves(out[n]) for n, t in trees.items()}


def unverified(where: str, stacklevel: int) -> None:
    warnings.warn(
        f"checkpoint {where} has no checksums (it was written before nnxfit recorded them): it "
        "was loaded without verifying its bytes. Checkpoints saved from now on are verified.",
        CheckpointWarning,
        stacklevel=stacklevel + 1,
    )


def restore_and_verify(trainer, directory: str, step: int) -> tuple[dict, bool]:
    """Loads checkpoint ``step`` of ``directory`` into the fit; returns its metadata and
    whether its files were checked against a checksum manifest (older checkpoints have none)."""
    meta, state, verified = read_train_state(trainer, directory, step)
    trainer.load_train_state(state)
    trainer.load_loop_state(_this_process_loop(meta["loop"], os.path.join(directory, str(step))))
    return meta, verified


def read_train_state(trainer, directory: str, step: int) -> tuple[dict, dict, bool]:
    """Reads full checkpoint ``step`` of ``directory`` for the fit of ``trainer``, changing
    nothing: ``(metadata, state shaped as trainer.train_state(), verified)``. Files checked
    against the checksum manifest and every array against the live state first."""
    where = os.path.join(directory, str(step))
    reader = _reader(directory)
    try:
        meta, md, verified = _check_step(reader, directory, step, ("module", "train"))
        if meta.get("kind") != "full":
            raise CheckpointError(
                f"checkpoint {where} holds weights only (ModelCheckpoint(save_weights_only="
                "True)) and cannot resume a fit; load it with nnxfit.load_checkpoint(module, "
                "path), or resume from a full checkpoint."
            )
        module, train = _split_train_state(trainer.train_state())
        out = _restore_items(reader, step, where, {"module": module, "train": train}, md)
    finally:
        reader.close()
    state = {**module.treedef.unflatten(out["module"]), **train.treedef.unflatten(out["train"])}
    return meta, state, verified


def _this_process_loop(loop: dict, where: str) -> dict:
    """The loop state with this process's own loader state, when several processes saved
    theirs (``loader_by_process``)."""
    states = loop.get("loader_by_process")
    if not states:
        return loop
    if len(states) == jax.process_count():
        return {**loop, "loader": states[jax.process_index()]}
    if any(s != states[0] for s in states):
        warnings.warn(
            f"checkpoint {where} was saved by {len(states)} processes whose loaders had "
            f"different states (a loader sharded by process), and is resumed on "
            f"{jax.process_count()}: every process continues from process 0's loader state. "
            "Resume on as many processes, or use ArrayLoader(..., shard_by_process=True), "
            "whose position counts global batches.",
            ResumeWarning,
            stacklevel=4,
        )
    return loop


def restore_into_trainer(trainer, directory: str, step: int) -> dict:
    """Loads checkpoint ``step`` of ``directory`` into the fit; returns its metadata. Nothing
    in the trainer changes unless every file checked out and every array was read and
    matched."""
    return restore_and_verify(trainer, directory, step)[0]


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint (a step folder, or the newest one in a checkpoints
    folder or workdir): step, epoch, batch_in_epoch, metrics, loop state, versions, options."""
    directory, step = resolve(path)
    if step is None:
        steps = list_steps(directory)
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {directory}.")
        step = steps[-1]
    reader = _reader(directory)
    try:
        return _read_meta(reader, step, os.path.join(directory, str(step)))
    finally:
        reader.close()


# ------------------------------------------------------------------------- finding them ---
def _is_step_dir(path: str) -> bool:
    return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(path)


def resolve(path: str | os.PathLike) -> tuple[str, int | None]:
    """``(checkpoints folder, step or None)`` for a step folder, a checkpoints folder, or a
    workdir holding ``checkpoints/``."""
    path = os.path.abspath(os.fspath(path))
    if TMP_MARKER in os.path.basename(path):
        raise CheckpointError(
            f"{path} is an incomplete checkpoint (a save that never finished); pass a "
            "complete step folder or the checkpoints folder."
        )
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist.")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path} is a file; pass a checkpoint folder.")
    if _is_step_dir(path) and os.path.exists(os.path.join(path, "meta")):
        return os.path.dirname(path), int(os.path.basename(path))
    if not list_steps(path) and list_steps(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    return path, None


def newest_intact(directory: str, steps: list[int], try_one) -> tuple[int, Any, list]:
    """Tries ``try_one(step)`` from the newest step down; a corrupt one is skipped with a
    warning. Returns (step, result, corrupt steps). A mismatch is the caller's error and
    propagates at once."""
    corrupt: list[tuple[int, CheckpointCorruptError]] = []
    for step in sorted(steps, reverse=True):
        try:
            return step, try_one(step), [s for s, _ in corrupt]
        except CheckpointCorruptError as e:
            corrupt.append((step, e))
            warnings.warn(f"{e} Trying an older checkpoint.", ResumeWarning, stacklevel=3)
    lines = "\n".join(f"  {s}: {e}" for s, e in corrupt)
    raise CheckpointCorruptError(
        f"no checkpoint in {directory} is readable:\n{lines}\nNothing was changed on disk; "
        "start a fresh run or restore the folder from a backup."
    )


# ----------------------------------------------------------------------- load_checkpoint ---
def _pick_best(reader, directory: str, steps: list[int]) -> int:
    best, best_v = None, None
    for s in steps:
        try:
            meta = _read_meta(reader, s, os.path.join(directory, str(s)))
        except CheckpointCorruptError:
            continue
        name, mode = meta.get("monitor"), meta.get("mode", "min")
        v = (meta.get("metrics") or {}).get(name) if name else None
        if v is None or not math.isfinite(v):
            continue
        if best_v is None or (v < best_v if mode == "min" else v > best_v):
            best, best_v = s, v
    return best


def load_checkpoint(
    module: nnx.Module, path_or_workdir: str | os.PathLike, which: str | int = "best"
) -> CheckpointInfo:
    """Restores ``module``'s variables in place from a checkpoint, without a Trainer.

    ``path_or_workdir`` is a step folder (``…/checkpoints/12``), a checkpoints folder, or a
    workdir holding ``checkpoints/``. ``which``: ``"best"`` (by the ModelCheckpoint's
    ``monitor``; the newest when it had none), ``"last"``, or a step number; ignored when the
    path is a step folder. The module must have the structure, shapes and dtypes of the one
    that was trained (checked before anything is overwritten). Returns a ``CheckpointInfo``.
    """
    directory, step = resolve(path_or_workdir)
    steps = list_steps(directory)
    if step is None and not steps:
        raise CheckpointError(f"no complete checkpoint in {directory}.")
    trainable = getattr(module, "trainable", nnx.Param)
    if isinstance(trainable, dict):  # several optimizers: the union of their filters
        trainable = nnx.Any(*trainable.values())
    _, params_v, rest_v = nnx.split(module, trainable, ...)
    variables = live_leaves(module, params_v, rest_v)  # plain array attributes too
    tree = _Tree("module", {"params": nnx.as_pure(params_v), "rest": nnx.as_pure(rest_v)})
    reader = _reader(directory)
    try:
        if step is None:
            if isinstance(which, int) and not isinstance(which, bool):
                if which not in steps:
                    raise CheckpointError(
                        f"no checkpoint at step {which} in {directory}; steps there: {steps}."
                    )
                step = which
            elif which == "best":
                step = _pick_best(reader, directory, steps)
            elif which != "last":
                raise ConfigError(
                    f"load_checkpoint(which={which!r}): use 'best', 'last' or a step number."
                )

        def load(s):
            where = os.path.join(directory, str(s))
            meta, md, verified = _check_step(reader, directory, s, ("module",))
            return meta, _restore_items(reader, s, where, {"module": tree}, md)["module"], verified

        if step is not None:
            meta, restored, verified = load(step)
        else:
            step, (meta, restored, verified), _ = newest_intact(directory, steps, load)
    finally:
        reader.close()
    if not verified:
        unverified(os.path.join(directory, str(step)), stacklevel=2)
    for var, x in zip(variables, restored, strict=True):
        var.set_raw_value(x)
    return CheckpointInfo(os.path.join(directory, str(step)), step, dict(meta.get("metrics") or {}))


# ------------------------------------------------------------------------- export_weights ---
def export_weights(module: nnx.Module, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Writes ``nnx.state(module)`` to ``path`` as a plain orbax checkpoint; returns its path.

    Every variable of the module is written (params, BatchNorm statistics, RNG state, any
    custom variable), with nothing of nnxfit's around it: an inference script loads it with
    flax and orbax alone, into the state of a freshly built (or abstract) module::

        abstract = nnx.eval_shape(lambda: Net(rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        state = ocp.StandardCheckpointer().restore(path, state)
        model = nnx.merge(graphdef, state)
        model.eval()

    ``module`` may be any ``nnx.Module``: pass a submodule (``module.net``) so that the
    inference script needs only that network's class, not the ``TrainModule``. To export
    the best checkpoint of a run, load it first: ``nnxfit.load_checkpoint(module, workdir,
    "best")``. An existing ``path`` is an error unless ``overwrite``. On several processes,
    every process calls it (orbax writes each array once).
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(
            f"export_weights takes an nnx.Module (e.g. the trained module or module.net); got "
            f"{type(module).__name__}."
        )
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(
            f"export_weights: {path} exists; pass overwrite=True to replace it, or another path."
        )
    ocp = _ocp()
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(path, nnx.state(module), force=overwrite)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    return path
