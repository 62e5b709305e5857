"""``fit(resume=...)``: which checkpoint a fit continues from, loading it, and what differs.

The Trainer hands in the folders its ``ModelCheckpoint``s write to (``dirs``); with none, a
fit looks in ``<workdir>/checkpoints``. ``resume=True`` loads the newest complete checkpoint
among them (an unreadable one is skipped with a warning and moved aside), a path loads that
checkpoint or the newest in that folder. Loading itself (``checkpoint.restore_into_trainer``)
changes nothing unless every array was read and matched.

A resume then warns (``ResumeWarning``, at the user's ``fit`` line) about what differs from
the run that saved the checkpoint and keeps it from continuing bit for bit: options that
change the numbers a step computes (``config.EXACTNESS_OPTIONS``), the ``ArrayLoader``'s
shuffle, drop_last and seed, the mesh, the jax version.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from nnxfit.checkpoint import (
    ResumeWarning,
    list_steps,
    move_aside,
    newest_intact,
    resolve,
    restore_and_verify,
    unverified,
    versions,
)
from nnxfit.config import EXACTNESS_OPTIONS, trainer_options
from nnxfit.errors import CheckpointError, ConfigError
from nnxfit.warn import warn


def candidate_dirs(dirs: list[str], workdir: str | None) -> list[str]:
    """The folders a ``resume=True`` looks in: ``dirs`` (the ``ModelCheckpoint``s'), else the
    workdir's ``checkpoints``."""
    if dirs:
        return list(dict.fromkeys(dirs))
    if workdir is None:
        raise ConfigError(
            "fit(resume=True) looks for checkpoints in the Trainer's workdir, but workdir is "
            "None; pass Trainer(workdir=...) or a checkpoint path: fit(..., resume='path')."
        )
    return [os.path.abspath(os.path.join(workdir, "checkpoints"))]


def resume_fit(trainer, resume: Any, dirs: list[str]) -> None:
    """``fit(resume=...)``: loads the newest complete checkpoint in ``dirs`` (``resume=True``)
    or the one at a path, into a Trainer whose fit is set up; sets ``trainer.resumed_from``
    and warns about what differs from the run that saved it."""
    # As given, before the checkpoint's loader state replaces the loader's seed.
    requested = trainer_options(trainer)
    if resume is True:
        dirs = candidate_dirs(dirs, trainer.workdir)
        candidates = [(d, s) for d in dirs for s in list_steps(d)]
        if not candidates:
            warnings.warn(
                f"fit(resume=True): no checkpoint in {', '.join(dirs)}; starting fresh.",
                ResumeWarning,
                stacklevel=4,
            )
            return
        newest = max(s for _, s in candidates)
        directory = next(d for d, s in candidates if s == newest)
        steps, explicit = list_steps(directory), False
    elif isinstance(resume, str | os.PathLike):
        directory, step = resolve(resume)
        explicit = step is not None
        steps = [step] if explicit else list_steps(directory)
        if not steps:
            raise CheckpointError(
                f"fit(resume={os.fspath(resume)!r}): no complete checkpoint in {directory}; "
                "pass a checkpoint folder (…/checkpoints/<step>), a checkpoints folder, or "
                "resume=True to start fresh when there is none."
            )
    else:
        raise ConfigError(
            f"fit(resume=...) takes True, False or a checkpoint path; got {resume!r}."
        )

    def load(step):
        return restore_and_verify(trainer, directory, step)

    if explicit:
        step, (meta, verified), corrupt = steps[0], load(steps[0]), []
    else:
        step, (meta, verified), corrupt = newest_intact(directory, steps, load)
    if corrupt and trainer.is_global_zero:
        dest = move_aside(directory, corrupt, "corrupt")
        warnings.warn(
            f"resumed from checkpoint {step}; the unreadable checkpoint(s) {corrupt} were "
            f"moved to {dest}.",
            ResumeWarning,
            stacklevel=4,
        )
    trainer.resumed_from = os.path.join(directory, str(step))
    if not verified:
        unverified(trainer.resumed_from, stacklevel=4)
    warn_on_drift(meta, trainer, requested)


def warn_on_drift(meta: dict, trainer, requested: dict | None = None) -> None:
    """Warns (``ResumeWarning``, at the user's ``fit`` line) about what differs from the run
    that saved the checkpoint: options the resumed fit uses although they change its numbers,
    and the ``ArrayLoader`` seed, which the checkpoint's loader state overrides. ``requested``:
    the options as given, taken before the restore (default: as they are now)."""
    old = meta.get("trainer", {})
    new = requested or trainer_options(trainer)
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in EXACTNESS_OPTIONS
        if k in old and old.get(k) != new.get(k)
    ]
    old_l, new_l = old.get("loader") or {}, new.get("loader") or {}
    changed += [
        f"ArrayLoader {k}: {old_l[k]!r} -> {new_l[k]!r}"
        for k in ("shuffle", "drop_last")
        if k in old_l and k in new_l and old_l[k] != new_l[k]
    ]
    # Without a mesh a fit runs on one device, however many there are; with one, its shape
    # decides how batches split and how gradients are summed.
    if "mesh" in old and (old.get("mesh") or new.get("mesh")):
        old_n, new_n = old.get("num_devices"), new.get("num_devices")
        if old.get("mesh") != new.get("mesh") or old_n != new_n:
            changed.append(
                f"mesh: {old.get('mesh')} on {old_n} device(s) -> {new.get('mesh')} on "
                f"{new_n} device(s)"
            )
    old_v, new_v = meta.get("versions", {}), versions()
    changed += [
        f"{k} {old_v[k]} -> {new_v.get(k)}"
        for k in ("jax", "jaxlib")
        if k in old_v and old_v[k] != new_v.get(k)
    ]
    if changed:
        warn(
            f"resuming {trainer.resumed_from} with settings that differ from the run that "
            f"saved it ({'; '.join(changed)}); training continues with the new settings, but "
            "not bit for bit as the uninterrupted run would have.",
            ResumeWarning,
        )
    if "seed" in old_l and "seed" in new_l and old_l["seed"] != new_l["seed"]:
        seed = old_l["seed"]
        warn(
            f"resuming {trainer.resumed_from}: the ArrayLoader has seed={new_l['seed']!r} but "
            f"the checkpoint's loader state has seed={seed!r}; the checkpoint's seed {seed!r} "
            "is used, so the batches continue in the saved run's order. To shuffle with "
            f"seed={new_l['seed']!r}, start a fresh fit (resume=False) or use another workdir.",
            ResumeWarning,
        )
