"""One fit, one run: what a fit says and does about the runs before it, before it trains.

``begin_run(trainer, refit)``, called by ``Trainer.fit`` once the fit is set up (and resumed):

* says in one console line from which checkpoint, step and epoch a resumed fit continues;
* says when a Trainer fits the same module again: the weights carry over, the optimizer
  starts fresh (as in Lightning, where every fit calls ``configure_optimizers``);
* writes the module's ``hparams`` to ``workdir/hparams.yaml`` (``nnxfit.hparams``);
* keeps earlier runs (``new_version``): a fit that does not resume, into a ``workdir`` that
  already holds a run's files, first moves those files into ``workdir/version_N/`` (N = 0,
  1, ... oldest first, Lightning's naming), so the newest run is always at the top of the
  workdir, where ``fit(..., resume=True)``, ``nnxfit plot WORKDIR`` and
  ``load_checkpoint(module, WORKDIR)`` find it, and every earlier run keeps the same layout
  one level down (``nnxfit plot WORKDIR/version_0``). Nothing is deleted.

What counts as a run's files: what nnxfit writes into the workdir (``RUN_FILES``, the
``checkpoints.previous-*``/``checkpoints.corrupt-*`` folders, and the paths the fit's own
built-in callbacks write to). Anything else in the workdir stays where it is, and so do the
trackers' stores (``SHARED_STORES``: ``mlruns``, ``wandb``), which hold every version's run.
"""

from __future__ import annotations

import os
import re

import jax

from nnxfit import hparams
from nnxfit.callbacks.monitor import announce

# name -> whether nnxfit writes it as a folder (True) or a file (False).
RUN_FILES = {
    "metrics.csv": False,
    "checkpoints": True,
    "tensorboard": True,
    "plots": True,
    "profile": True,
    "hparams.yaml": False,
}
# Stores that hold many runs stay at the top of the workdir, shared by every version: MLflow's
# ``mlruns`` (one experiment, a run per fit, compared in ``mlflow ui``) and W&B's ``wandb``
# (an ``offline-run-*`` folder per fit). Each fit is a new run in them; a resumed fit
# continues its own.
SHARED_STORES = ("mlruns", "wandb")
RUN_PREFIXES = ("checkpoints.previous-", "checkpoints.corrupt-")
VERSION = re.compile(r"^version_(\d+)$")


def begin_run(trainer, refit: bool) -> None:
    if trainer.resumed_from is not None:
        announce(
            trainer,
            f"Resumed from {trainer.resumed_from}: step {trainer.global_step}, epoch "
            f"{trainer.current_epoch} (batch {trainer.batch_in_epoch} of it).",
        )
    elif refit:
        module = trainer.module
        announce(
            trainer,
            f"Trainer.fit: this Trainer fitted this {type(module).__name__} before. The new fit "
            "starts from the weights that fit left, with a fresh optimizer state from "
            "configure_optimizers, steps and epochs counted from 0, a new History. To continue "
            "the earlier fit itself (optimizer state, schedule, step count), fit with "
            "resume=True from its ModelCheckpoint and a higher max_epochs.",
        )
    if trainer.resumed_from is None:
        new_version(trainer)
    hparams.write_file(trainer)  # workdir/hparams.yaml, after an earlier run's moved away


def run_files(trainer) -> list[str]:
    """Top-level names in the workdir that belong to a run (see the module docstring): each
    of the kind nnxfit writes there, so that a stray file named like a folder nnxfit would
    write (a broken setup, reported by the callback that cannot write) is not taken for a
    run."""
    workdir = trainer.workdir
    kinds = dict(RUN_FILES)
    for cb in getattr(trainer, "cb", None) or []:
        if not type(cb).__module__.startswith("nnxfit."):
            continue  # a user's attribute named like these may point at anything
        for attr in ("filename", "dirname", "log_dir"):
            path = getattr(cb, attr, None)
            if not isinstance(path, str) or not path:
                continue
            full = os.path.normpath(os.path.join(workdir, path))
            rel = os.path.relpath(full, os.path.normpath(workdir))
            if rel != "." and not rel.startswith(".."):
                parts = rel.split(os.sep)
                kinds[parts[0]] = len(parts) > 1 or attr != "filename"
    found = []
    for name in sorted(os.listdir(workdir)):
        if VERSION.match(name) or name in SHARED_STORES:
            continue
        path = os.path.join(workdir, name)
        if name.startswith(RUN_PREFIXES) and os.path.isdir(path):
            found.append(name)
        elif name in kinds and os.path.isdir(path) == kinds[name]:
            found.append(name)
    return found


def new_version(trainer) -> str | None:
    """Moves an earlier run's files into ``workdir/version_N``; returns that folder (or None
    when there was nothing to move). Process 0 moves; every process waits for it."""
    workdir = trainer.workdir
    if workdir is None or trainer.fast_dev_run:
        return None
    dest = None
    if trainer.is_global_zero and os.path.isdir(workdir):
        names = run_files(trainer)
        if names:
            taken = [int(m.group(1)) for n in os.listdir(workdir) if (m := VERSION.match(n))]
            dest = os.path.join(workdir, f"version_{max(taken, default=-1) + 1}")
            os.makedirs(dest)
            for name in names:
                os.replace(os.path.join(workdir, name), os.path.join(dest, name))
            announce(
                trainer,
                f"{workdir} held an earlier run; moved its files ({', '.join(names)}) to "
                f"{dest}. This run writes to {workdir}; fit(..., resume=True) continues a run "
                "instead of starting one.",
            )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # Other processes look for checkpoints in the workdir next: after the move.
        multihost_utils.sync_global_devices("nnxfit_new_version")
    return dest
