"""``ModelCheckpoint``: asynchronous orbax checkpoints of a fit, the best ``save_top_k`` by a
monitored metric plus the last one.

When a checkpoint is taken:

* with neither ``every_n_epochs`` nor ``every_n_steps``: after every epoch; with
  ``every_n_epochs=n``: after every n-th epoch; with ``every_n_steps=n`` alone: whenever the
  optimizer step count crosses a multiple of n (per jitted call, so with
  ``steps_per_execution=K`` at the first call that reaches it), and at the end of fit;
* an epoch checkpoint is written after the whole epoch end (validation, every callback's
  ``on_train_epoch_end``, the History row), at the start of the next epoch or the end of fit:
  it is the state from which the next epoch starts, so a resume never runs an epoch end twice.
  A step checkpoint due on the last call of an epoch waits for that epoch end the same way;
* on SIGTERM/SIGINT (``on_interrupt``), at the current step, waiting until it is on disk,
  then saying where on stderr;
* at the end of a fit that finished normally, when ``save_last`` and the last step is unsaved.

What a checkpoint holds is ``Trainer.checkpoint_state()``: the live state, except once a fit
has ended inside an epoch (``max_steps``, ``should_stop``, ``NaNGuard("stop")``): from that
partial epoch end on, every save holds the state from before it, from which a resume
finishes the epoch (``nnxfit/resume_point.py``); after ``NaNGuard("stop")`` that is the last
good step's state, and checkpoints written of the frozen steps after it are moved aside.

Retention: orbax's preservation policy keeps the newest checkpoint (the resume point, always
during a fit; after it only with ``save_last``) and the best ``save_top_k`` by ``monitor``
(the newest ``save_top_k`` without a monitor; ``-1`` keeps all). Orbax deletes evicted
checkpoints only after the new one is committed. A NaN metric never ranks as best. A step
that already has a checkpoint is never saved again (orbax would delete newer ones).

Saves run in orbax's background thread; the loop waits for the disk only on interruption and
at the end of fit (on every exit path: an exit without closing the manager loses the save).
After an exception nothing new is written; the last complete checkpoint stays.

Integrity (``nnxfit.checkpoint_writer``, ``nnxfit.integrity``): every checkpoint carries the
size and CRC-32 of each of its files, written before orbax's commit; the commit of a step save
waits until every callback's hook of that step ran (its CSV row is on disk first). A save whose
background write fails is reported once, as a ``CheckpointError`` naming its step and why
("disk full"), at the next hook. A state with a non-finite parameter or optimizer value is
never saved: the save is skipped with one ``CheckpointWarning`` naming the step, so the last
finite checkpoint is never rotated away for it (one fused check per save, none per step).

Several processes (``jax.distributed``): every process saves into the one (shared) folder;
orbax writes each process's shards, process 0 the metadata and the commit, and the checksum
manifest is written by process 0 once every process's files are on disk. Each save decides
from process 0's metrics (``multihost.agreed``), so top-k and ``save_last`` keep and delete
the same checkpoints everywhere; each writer has its own orbax barrier prefix.

At fit start, checkpoints that belong to another run are moved (never deleted) to
``<dir>.previous-<time>/``: all of them for a fresh fit, those newer than the resume point
for a resumed one. Leftover ``*.orbax-checkpoint-tmp`` folders of killed saves are removed.

The ``monitor`` must name a metric the fit is known to log before it trains (the train step's
metrics, ``val_*`` of ``validation_step``, ``lr``, ``nonfinite_steps``, or a name a callback
declares in ``Callback.logged_metrics``), whatever the order of the callbacks.
"""

from __future__ import annotations

import math
import os
import warnings
from numbers import Real
from typing import Any

from nnxfit import multihost
from nnxfit.callbacks.base import Callback
from nnxfit.callbacks.monitor import MODES, Monitor, known_metrics  # noqa: F401 (re-exported)
from nnxfit.checkpoint import (
    CheckpointWarning,
    ResumeWarning,
    list_steps,
    move_aside,
    read_meta,
    state_is_finite,
)
from nnxfit.checkpoint_writer import Writer
from nnxfit.errors import CheckpointError, ConfigError, positive_int
from nnxfit.interrupt import notice
from nnxfit.warn import warn


def _opt_positive(name: str, value: Any) -> int | None:
    return positive_int(f"ModelCheckpoint {name}", value, allow_none=True, hint=" or None")


class ModelCheckpoint(Callback):
    """Saves the fit's full state with orbax, asynchronously (see the module docstring).

    ``dirname`` is relative to the Trainer's ``workdir`` (an absolute path is used as is).
    ``save_weights_only=True`` writes only the module's variables: smaller, loadable with
    ``nnxfit.load_checkpoint``, but such a checkpoint cannot resume a fit. ``compress=True``
    has orbax zstd-compress the arrays: ~11 % smaller for a float MLP, for CPU time taken from
    training while the save runs.

    After a fit: ``best_model_path``, ``best_model_score`` (by ``monitor``), ``last_model_path``
    and ``directory``.
    """

    order = 50  # after NaNGuard (a bad state is never saved), before the loggers

    def __init__(
        self,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        save_last: bool = True,
        save_weights_only: bool = False,
        dirname: str | os.PathLike = "checkpoints",
        compress: bool = False,
    ):
        if mode not in MODES:
            raise ConfigError(f"ModelCheckpoint mode must be one of {MODES}; got {mode!r}.")
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
            raise ConfigError(
                f"ModelCheckpoint save_top_k must be an integer >= -1 (-1 keeps every "
                f"checkpoint, 0 none but the last); got {save_top_k!r}."
            )
        # "auto" resolves from the name (val_accuracy -> max); shared with EarlyStopping.
        self._monitor = None if monitor is None else Monitor(monitor, mode, owner="ModelCheckpoint")
        if save_top_k == 0 and not save_last:
            raise ConfigError(
                "ModelCheckpoint(save_top_k=0, save_last=False) would keep no checkpoint; set "
                "save_top_k >= 1 or save_last=True."
            )
        self.monitor = monitor
        self.mode = mode if self._monitor is None else self._monitor.direction
        self.save_top_k = save_top_k
        self.every_n_epochs = _opt_positive("every_n_epochs", every_n_epochs)
        self.every_n_steps = _opt_positive("every_n_steps", every_n_steps)
        self.save_last = bool(save_last)
        self.save_weights_only = bool(save_weights_only)
        self.compress = bool(compress)
        self.dirname = os.fspath(dirname)
        if not self.dirname:
            raise ConfigError("ModelCheckpoint dirname is empty; pass e.g. 'checkpoints'.")

        self.directory: str | None = None
        self.best_model_score: float | None = None
        self.best_model_step: int | None = None
        self.last_saved_step: int | None = None
        self._writer: Writer | None = None
        self._manager = None  # the writer's orbax CheckpointManager
        self._undo: tuple | None = None  # best/last before the save in flight
        self._refused_at: int | None = None  # first step whose non-finite state was not saved
        self._pending: dict | None = None  # a save waiting for the epoch end to finish
        self._seen_step = 0
        self._failed = False
        self._interrupted = False

    def __repr__(self) -> str:
        return (
            f"ModelCheckpoint(monitor={self.monitor!r}, mode={self.mode!r}, "
            f"save_top_k={self.save_top_k}, dirname={self.dirname!r})"
        )

    # -- paths ----------------------------------------------------------------------------
    def resolve_directory(self, trainer) -> str:
        if os.path.isabs(self.dirname):
            return self.dirname
        if trainer.workdir is None:
            raise ConfigError(
                "ModelCheckpoint needs a place to write: pass Trainer(workdir='runs/name') (it "
                f"saves to <workdir>/{self.dirname}) or an absolute ModelCheckpoint dirname."
            )
        return os.path.abspath(os.path.join(trainer.workdir, self.dirname))

    @property
    def best_model_path(self) -> str | None:
        return self._path(self.best_model_step)

    @property
    def last_model_path(self) -> str | None:
        return self._path(self.last_saved_step)

    def _path(self, step: int | None) -> str | None:
        if step is None or self.directory is None:
            return None
        return os.path.join(self.directory, str(step))

    # -- hooks ----------------------------------------------------------------------------
    def on_fit_start(self, trainer, module) -> None:
        self._close()  # a manager left open by an earlier fit of this callback
        self._pending, self._failed, self._interrupted = None, False, False
        self._undo = self._refused_at = None
        self._seen_step = trainer.global_step
        if trainer.fast_dev_run:  # a smoke test writes nothing
            return
        directory = self.resolve_directory(trainer)
        if self.monitor is not None:
            self._check_monitor(trainer)
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ConfigError(
                f"ModelCheckpoint directory {directory} is a file; remove it or pass another "
                "dirname/workdir."
            )
        check_one_writer_per_directory(trainer)
        if trainer.resumed_from is None:
            self.best_model_score = self.best_model_step = self.last_saved_step = None
        self.directory = directory
        if trainer.is_global_zero:
            self._move_foreign_checkpoints(trainer)
        # Several processes: none opens its manager on the folder before process 0 cleared it.
        multihost.barrier("checkpoint-folder")
        try:
            self._writer = Writer(
                directory,
                monitor=self.monitor,
                mode=self.mode,
                keep=self._policy(during_fit=True),
                compress=self.compress,
            )
            self._manager = self._writer.manager
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"ModelCheckpoint cannot use {directory}: {e}. Pass a writable Trainer workdir."
            ) from e

    def needs_sync(self, trainer, event: str, step: int, n_steps: int) -> bool:
        if event == "epoch_start":  # a save due at the last epoch end is written here
            return True
        n = self.every_n_steps
        # Elsewhere only a step save reads the state; the device may run ahead of the rest.
        return event == "batch" and n is not None and step // n != (step - n_steps) // n

    def on_train_batch_end(self, trainer, module, step: int, logs: dict) -> None:
        if self._manager is None:
            return
        self._settle()
        n, prev = self.every_n_steps, self._seen_step
        self._seen_step = step
        if n is None or step // n == prev // n:
            return
        if trainer.epoch_ending():
            # The epoch end follows this call: save after it, as the next epoch's start.
            self._pending = self._pending or {"metrics": {}}
            return
        # Committed only once the other callbacks ran this step's hooks (its CSV row).
        self._save(trainer, dict(trainer.logged_metrics), hold=True)

    def on_train_epoch_end(self, trainer, module, epoch: int, logs: dict) -> None:
        if self._manager is None:
            return
        self._settle()
        due = self.every_n_steps is None or self.every_n_epochs is not None
        due = due and (self.every_n_epochs is None or (epoch + 1) % self.every_n_epochs == 0)
        if due or self._pending is not None:
            self._pending = {"metrics": dict(logs)}

    def on_train_epoch_start(self, trainer, module, epoch: int) -> None:
        if self._manager is None:
            return
        self._settle()
        self._flush_pending(trainer)

    def on_interrupt(self, trainer, module) -> None:
        self._interrupted = True
        if self._manager is None:
            return
        self._settle()
        self._flush_pending(trainer)
        saved = self._save(trainer, {})
        self._wait()
        step = trainer.global_step
        did = "saved" if saved else "had already saved"  # a save due at this very step
        notice(trainer, f"ModelCheckpoint {did} step {step} to {self._path(step)}.")

    def on_exception(self, trainer, module, error: BaseException) -> None:
        self._failed = True  # keep the last complete checkpoint; write nothing new
        if self._writer is not None:
            self._writer.release()

    def on_fit_end(self, trainer, module) -> None:
        if self._manager is None:
            return
        self._writer.release()
        error = None
        try:
            if not (self._failed or self._interrupted):
                if self._pending is not None:
                    self._flush_pending(trainer)
                elif self.save_last or (self.every_n_steps and not self.every_n_epochs):
                    self._save(trainer, {})
                self._wait()
                if not self.save_last:
                    self._drop_latest_unless_best()
        except Exception as e:
            error = e
        close_error = self._close()
        if error is not None or close_error is not None:
            raise error or close_error

    # -- rolling back (``nnxfit/rollback.py``) --------------------------------------------
    def finish_saves(self) -> None:
        """Waits until the save in flight is on disk (a rollback looks for the newest)."""
        if self._writer is not None:
            self._settle()
            self._wait()

    def rolled_back(self, trainer, step: int) -> None:
        """The fit went back to the state of its checkpoint ``step``. Checkpoints of later
        steps hold the timeline it abandoned (a resume must not continue it, and orbax
        deletes newer steps when an older one is saved): moved aside, never deleted. A save
        due at this epoch end is dropped; step saves count from ``step`` again."""
        self._pending, self._seen_step = None, step
        if self._manager is None:
            return
        newer = [s for s in list_steps(self.directory) if s > step]
        if newer and trainer.is_global_zero:
            move_aside(self.directory, newer, "rolled-back")
        self._manager.reload()
        if self.last_saved_step is not None and self.last_saved_step > step:
            self.last_saved_step = step
        if self.best_model_step is not None and self.best_model_step > step:
            self.best_model_score = self.best_model_step = None  # ranked again from here

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "best_model_score": self.best_model_score,
            "best_model_step": self.best_model_step,
            "last_saved_step": self.last_saved_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best_model_score = state.get("best_model_score")
        self.best_model_step = state.get("best_model_step")
        self.last_saved_step = state.get("last_saved_step")

    # -- saving ---------------------------------------------------------------------------
    def _flush_pending(self, trainer) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._save(trainer, pending["metrics"])

    def _save(self, trainer, metrics: dict, hold: bool = False) -> bool:
        step = trainer.checkpoint_step  # the step of the state saved (resume_point.py)
        self._wait()  # the previous save: its failure is reported as its own, not this one's
        moved = self._move_undone(trainer, step) if trainer.is_global_zero else False
        if multihost.active():
            # Every process decides from process 0's metrics (top-k, best), and lists the
            # folder only after process 0 moved undone checkpoints out of it.
            numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, Real)}
            agreed = multihost.agreed("checkpoint-save", {"metrics": numbers, "moved": moved})
            metrics = agreed["metrics"]
            if agreed["moved"] and not trainer.is_global_zero:
                self._manager.reload()
        if step in self._manager.all_steps() or step in list_steps(self.directory):
            return False  # never twice: orbax would delete every newer checkpoint
        if trainer.rolling_back:  # abandoned next: it would rotate the one to go back to away
            return False
        if not state_is_finite(trainer):
            self._refuse(step)
            return False
        self._undo = (self.best_model_score, self.best_model_step, self.last_saved_step)
        score = self._score(metrics)
        if score is not None and self.save_top_k != 0 and self._better(score):
            self.best_model_score, self.best_model_step = score, step
        self.last_saved_step = step
        return self._guarded(
            self._writer.save,
            trainer,
            step,
            hold=hold,
            metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
            monitor=self.monitor,
            mode=self.mode,
            weights_only=self.save_weights_only,
        )

    def _refuse(self, step: int) -> None:
        """A non-finite state is never written (a NaN checkpoint would rotate the last good
        one away and be what a resume loads); said once per fit."""
        if self._refused_at is not None:
            return
        self._refused_at = step
        kept = self.last_model_path or "none was saved in this fit"
        warnings.warn(
            f"ModelCheckpoint: the state at step {step} has a non-finite (NaN or inf) parameter "
            "or optimizer value; it was not saved, nor will be any later non-finite state. "
            f"The last finite checkpoint is kept: {kept}. Attach NaNGuard to stop or skip such "
            "steps.",
            CheckpointWarning,
            stacklevel=3,
        )

    def _settle(self) -> None:
        """At every hook: the save taken at an earlier step may commit now, and a save whose
        background write has failed is reported (once, under its own step)."""
        self._writer.release()
        self._guarded(self._writer.poll)

    def _guarded(self, call, *args, **kwargs):
        """Runs a writer call; when a save failed, best/last go back to what they were
        before it."""
        try:
            return call(*args, **kwargs)
        except CheckpointError:
            if self._undo is not None:
                self.best_model_score, self.best_model_step, self.last_saved_step = self._undo
                self._undo = None
            raise

    def _score(self, metrics: dict) -> float | None:
        if self.monitor is None:
            return None
        v = metrics.get(self.monitor)
        if v is None:
            return None
        v = float(v)
        return v if math.isfinite(v) else None  # NaN/inf never rank as the best

    def _better(self, score: float) -> bool:
        return self._monitor.is_better(score, self.best_model_score)

    def _wait(self) -> None:
        self._guarded(self._writer.wait)
        self._undo = None  # committed

    def _close(self) -> Exception | None:
        """Waits for the pending save and closes the manager; returns (not raises) a
        failure, so that it never hides an error already on its way to the caller."""
        writer, self._writer, self._manager = self._writer, None, None
        if writer is None:
            return None
        try:
            self._guarded(writer.close)
        except CheckpointError as e:
            return e
        except Exception as e:
            return CheckpointError(
                f"ModelCheckpoint: closing the checkpoints of {self.directory} failed: {e}. The "
                "previous complete checkpoints are kept."
            )
        return None

    # -- retention ------------------------------------------------------------------------
    def _policy(self, during_fit: bool):
        from orbax.checkpoint import checkpoint_managers as ocm

        if self.save_top_k == -1:
            return ocm.LatestN(n=None)  # keeps all
        keep = [ocm.LatestN(n=1)] if (during_fit or self.save_last) else []
        if self.monitor is None:
            keep.append(ocm.LatestN(n=self.save_top_k))
        else:
            monitor = self.monitor
            keep.append(
                ocm.BestN(
                    get_metric_fn=lambda m: m[monitor],
                    reverse=self.mode == "min",  # BestN keeps the end of the sorted list
                    n=self.save_top_k,
                    keep_checkpoints_without_metrics=False,
                )
            )
        return ocm.AnyPreservationPolicy(keep)

    def _drop_latest_unless_best(self) -> None:
        """``save_last=False``: the newest checkpoint was kept only as a resume point; at the
        end of the fit it goes unless it is among the best ``save_top_k``."""
        steps = list_steps(self.directory)
        if not steps or self.save_top_k == -1 or self.monitor is None:
            return  # without a monitor the newest is among the newest save_top_k anyway
        scores = {}
        for s in steps:
            v = (read_meta(os.path.join(self.directory, str(s))).get("metrics") or {}).get(
                self.monitor
            )
            if v is not None and math.isfinite(v):
                scores[s] = v
        ranked = sorted(scores, key=scores.get, reverse=self.mode == "max")
        latest = steps[-1]
        if latest not in ranked[: self.save_top_k]:
            self._manager.delete(latest)
            if self.last_saved_step == latest:
                self.last_saved_step = None

    def _move_foreign_checkpoints(self, trainer) -> None:
        """A fresh fit's folder may hold an earlier run's checkpoints, and a resumed fit's
        folder checkpoints newer than its resume point (another timeline). Saving next to
        them would mix the runs (and orbax deletes newer steps when an older one is saved),
        so they are moved aside, never deleted."""
        steps = list_steps(self.directory)
        resumed = trainer.resumed_from
        if resumed is None:
            foreign, why = steps, "from an earlier run"
            hint = " (fit(..., resume=True) continues a run instead)"
        else:
            foreign = [s for s in steps if s > trainer.global_step]
            why, hint = f"newer than the resumed checkpoint {resumed}", ""
        if foreign:
            dest = move_aside(self.directory, foreign, "previous")
            warnings.warn(
                f"ModelCheckpoint: checkpoint(s) {foreign} in {self.directory} are {why}; "
                f"moved them to {dest}{hint}.",
                ResumeWarning,
                stacklevel=3,
            )

    def _move_undone(self, trainer, step: int) -> bool:
        """A save older than checkpoints already written: after ``NaNGuard("stop")`` the
        fit's state is that of the last good step, and a checkpoint of a later step held the
        frozen state of the steps it undid (a resume from it would stay frozen). Those are
        moved aside, never deleted, so that the newest checkpoint is the resume point."""
        newer = [s for s in list_steps(self.directory) if s > step]
        if not newer:
            return False
        dest = move_aside(self.directory, newer, "undone")
        self._manager.reload()
        warn(
            f"ModelCheckpoint: checkpoint(s) {newer} in {self.directory} hold steps the fit "
            f"undid (it ends at step {step}); moved them to {dest}.",
            ResumeWarning,
        )
        return True

    # -- checks ---------------------------------------------------------------------------
    def _check_monitor(self, trainer) -> None:
        """Before training: a typo found after the first epoch may cost hours."""
        self._monitor.check_fit(trainer, self)


def check_one_writer_per_directory(trainer) -> None:
    """Two ModelCheckpoints saving into one folder would delete each other's checkpoints and
    crash orbax mid-save: a ``ConfigError`` before anything is read or written."""
    seen: dict[str, ModelCheckpoint] = {}
    for cb in trainer.cb:
        if not isinstance(cb, ModelCheckpoint):
            continue
        directory = cb.resolve_directory(trainer)
        other = seen.setdefault(directory, cb)
        if other is not cb:
            raise ConfigError(
                f"two ModelCheckpoints write to {directory}: {other!r} and {cb!r}. Keep one, or "
                "give each its own dirname (e.g. ModelCheckpoint(dirname='best'))."
            )
