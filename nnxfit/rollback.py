"""Rolling back instead of dying: ``NaNGuard(action="rollback", max_consecutive=K)`` and
``SpikeGuard(action="rollback", max_consecutive=K)``.

What it does. Each bad step (non-finite loss or gradient; a spike) is skipped inside the step
as ``"skip"`` skips it: parameters, optimizer and module state untouched. When K steps in a
row were bad (counted on the device, ``bad_runs.py``), skipping is not enough: the fit goes
back to the newest good checkpoint, in process, and goes on:

* *the newest good checkpoint* is the newest complete checkpoint that the fit's
  ``ModelCheckpoint``s wrote at a step before the run of bad steps began (a checkpoint
  written during the run holds the state the run started from). ``ModelCheckpoint`` never
  writes a non-finite state, and each checkpoint's files are verified against their
  checksums; an unreadable one is passed over for an older one (it is left where it is).
  A fit with such a guard needs a ``ModelCheckpoint`` that saves full checkpoints and keeps
  two or more (``save_top_k``; the saves during a run would rotate a single one away):
  without one it is a ``ConfigError`` at fit start (no hidden in-memory copy doubling the
  state's memory; ``fast_dev_run``, which writes none, is let through). Save often enough to
  roll back to something: ``every_n_steps``. The save due at the very event that rolls back
  is not made (``FitView.rolling_back``): it would hold the state being abandoned;
* *restored* from it: the module's variables, the optimizer state (with it the learning
  rate schedule's position and any injected hyperparameter such as a ``ReduceLROnPlateau``
  rate), the step features' state (the ``EMA``, ``SpikeGuard``'s window) and the step count.
  The health counters (``nonfinite_steps``, ``spike_steps``) keep counting: they say what
  happened. The host's step counter (``global_step``) returns to the checkpoint's step;
* *the data* does not go back: the position in the data keeps moving forward, so the batches
  since the checkpoint, the bad ones among them, are not trained on again (as PaLM restarted
  ~100 steps before a spike and skipped ~200-500 batches). The epoch count goes on too: a
  fit bounded by ``max_epochs`` ends with fewer optimizer steps, one bounded by
  ``max_steps`` trains on until the step count reaches it;
* *what stays*: the History, the loggers' rows (a train row at each step as it was counted:
  after a rollback the steps repeat from the checkpoint's) and every callback's state
  (``EarlyStopping``'s patience, ``ReduceLROnPlateau``'s counters count the epochs as they
  happen). ``ModelCheckpoint`` moves the checkpoints of the abandoned steps aside
  (``<dir>.rolled-back-<time>/``, never deleted) and counts its step saves from the
  checkpoint's step again;
* *logged*: a warning at the user's ``fit`` line for each rollback (the bad steps, the
  checkpoint, how many steps and batches were dropped), ``rollbacks`` in the logs and the
  History (a running count), and the guard's ``rollback_log`` (``RollbackRecord``s);
* *bounded*: after ``max_rollbacks`` rollbacks in one ``fit`` call, the next run of K bad
  steps raises ``nnxfit.RollbackError`` naming the steps, the checkpoint and the fix; so does
  a run with no checkpoint before it.

When. The host learns of a run at a log step (``log_every_n_steps``) or an epoch end, like
every health counter. A guard that may roll back asks the loop to be in step with the device
there (``needs_sync``: nothing dispatched past that call), so the rollback happens after that
event's hooks with nothing in flight: no lookahead call or NaNGuard speculation journal
(``speculation.py``) refers to the abandoned state. Both the detection step and the data
position are set by the log grid and the data alone, so a rolled-back fit run twice ends bit
for bit equal; with ``steps_per_execution=K`` the run is seen at the first log after the
call that completed it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp

from nnxfit import bad_runs
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.checkpoint import CheckpointCorruptError, list_steps, read_train_state
from nnxfit.errors import ConfigError, RollbackError
from nnxfit.warn import warn


class RollbackWarning(RuntimeWarning):
    """A guard rolled the fit back to a checkpoint (``NaNGuard`` / ``SpikeGuard``
    ``action="rollback"``)."""


class RollbackRecord(NamedTuple):
    """One rollback, as the guard's ``rollback_log`` keeps it."""

    kind: str  # "nonfinite" or "spike"
    first_bad_step: int  # the first step of the run of bad steps
    bad_step: int  # the step at which the run reached max_consecutive
    seen_at: int  # the step the fit had reached when it went back
    checkpoint: str  # the checkpoint restored (its step folder)
    checkpoint_step: int
    undone_steps: int  # seen_at - checkpoint_step: optimizer steps given up
    skipped_batches: int  # batches trained on since the checkpoint, not trained on again


WHAT = {"nonfinite": "non-finite loss or gradient", "spike": "loss spike"}


def check_config(trainer, owner: str) -> None:
    """At fit start: a rollback needs a ``ModelCheckpoint`` writing full checkpoints."""
    if trainer.fast_dev_run:  # a smoke test writes no checkpoint: a run of bad steps there
        return  # raises RollbackError, naming the steps
    saving = [c for c in trainer.cb if isinstance(c, ModelCheckpoint)]
    full = [c for c in saving if not c.save_weights_only]
    if full and all(0 <= c.save_top_k < 2 for c in full):
        raise ConfigError(
            f'{owner}(action="rollback") goes back to the newest checkpoint from before a run of '
            f"bad steps, but the fit's ModelCheckpoint keeps one (save_top_k="
            f"{full[0].save_top_k}): the saves during such a run would rotate it away. Pass "
            "ModelCheckpoint(every_n_steps=N, save_top_k=2) or more (-1 keeps all)."
        )
    if not full:
        why = (
            "its ModelCheckpoint saves weights only (save_weights_only=True)"
            if saving
            else "the fit has no ModelCheckpoint"
        )
        raise ConfigError(
            f'{owner}(action="rollback") goes back to the newest checkpoint before a run of bad '
            f"steps, but {why}. Add ModelCheckpoint(every_n_steps=N, save_top_k=2) (full, N "
            f'well below the steps you can afford to lose), or use action="skip" or "stop".'
        )


class Rollback:
    """The rollbacks of one fit (``trainer.rollback``; None without a rolling-back guard):
    a guard ``ask``s at a log step, the Trainer ``perform``s after that event's hooks."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.request: tuple | None = None  # (guard, kind, first bad step, K-th bad step)

    @classmethod
    def of(cls, trainer) -> Rollback | None:
        if any(isinstance(c, RollsBack) and c.action == "rollback" for c in trainer.cb):
            return cls(trainer)
        return None

    # -- asked by a guard, at a log step or epoch end -------------------------------------
    def ask(self, guard, kind: str) -> bool:
        """Whether the carry shows a run of ``guard.max_consecutive`` bad steps of ``kind``:
        then a rollback is requested (``guard.rollbacks`` counts it), or, with
        ``max_rollbacks`` spent, ``RollbackError`` is raised."""
        at = self.trainer.carry.rollback_at.get(kind)
        if at is None or self.request is not None:
            return False
        first = at - guard.max_consecutive + 1
        if guard.rollbacks - guard.rollbacks_before >= guard.max_rollbacks:
            last = guard.rollback_log[-1].checkpoint if guard.rollback_log else None
            raise RollbackError(
                f"{type(guard).__name__}: {guard.max_consecutive} {WHAT[kind]} steps in a row "
                f"(steps {first}-{at}) after {guard.max_rollbacks} rollback(s) in this fit "
                f"(the last to {last}); giving up. Rolling back does not get past them: lower "
                "the learning rate or clip gradients (grad_clip_norm), look at the batches of "
                f"those steps, or raise max_rollbacks. The parameters are those after the "
                f"last good step before step {first}.",
                step=first,
            )
        guard.rollbacks += 1
        self.request = (guard, kind, first, at)
        return True

    # -- after the event's hooks, the device in step ---------------------------------------
    def perform(self, rewind: Callable[[dict, int], None]) -> None:
        """Goes back to the newest good checkpoint before the requested run (module
        docstring); ``rewind(state, step)`` puts the fit there (the Trainer's
        ``FitState._rewind``)."""
        t = self.trainer
        guard, kind, first, at = self.request
        self.request = None
        saving = [c for c in t.cb if isinstance(c, ModelCheckpoint) and not c.save_weights_only]
        for c in saving:
            c.finish_saves()
        meta, state, path = self._newest_before(guard, kind, first, at, saving)
        c_step = int(meta["step"])
        record = RollbackRecord(
            kind=kind,
            first_bad_step=first,
            bad_step=at,
            seen_at=t.global_step,
            checkpoint=path,
            checkpoint_step=c_step,
            undone_steps=t.global_step - c_step,
            skipped_batches=self._batches_since(meta),
        )
        carry = t.carry
        live = carry.state_dict()
        health = dict(live["health"])
        for k in bad_runs.KINDS:  # a clean record of runs; the counts of bad steps stay
            if bad_runs.run_key(k) in health:
                health[bad_runs.run_key(k)] = jnp.zeros_like(health[bad_runs.run_key(k)])
                health[bad_runs.at_key(k)] = jnp.full_like(health[bad_runs.at_key(k)], -1)
        # The step count goes back, the data position does not (``FitState._rewind``).
        rewind({**state, "acc": live["acc"], "last": live["last"], "health": health}, c_step)
        carry.rollback_at = {}
        for c in saving:
            c.rolled_back(t, c_step)
        guard.rollback_log.append(record)
        left = guard.max_rollbacks - (guard.rollbacks - guard.rollbacks_before)
        warn(
            f"{type(guard).__name__}: {guard.max_consecutive} {WHAT[kind]} steps in a row "
            f"(steps {first}-{at}, seen at step {record.seen_at}); rolled back to checkpoint "
            f"{path} (step {c_step}): {record.undone_steps} steps undone, the "
            f"{record.skipped_batches} batches since that checkpoint skipped; training goes "
            f"on from step {c_step} with the next batch. Rollback {guard.rollbacks} "
            f"({left} more allowed in this fit, then RollbackError).",
            RollbackWarning,
        )

    def _newest_before(self, guard, kind, first: int, at: int, saving: list):
        """(metadata, state, path) of the newest readable checkpoint before step ``first``."""
        t = self.trainer
        candidates = sorted(
            ((s, c.directory) for c in saving if c.directory for s in list_steps(c.directory)),
            reverse=True,
        )
        for step, directory in candidates:
            if step >= first:
                continue
            try:
                meta, state, _ = read_train_state(t, directory, step)
            except CheckpointCorruptError as e:
                warn(f"{e} Rolling back to an older checkpoint.", RollbackWarning)
                continue
            return meta, state, os.path.join(directory, str(step))
        where = ", ".join(sorted({d for _, d in candidates})) or "its checkpoint folder"
        raise RollbackError(
            f"{type(guard).__name__}: {guard.max_consecutive} {WHAT[kind]} steps in a row "
            f"(steps {first}-{at}) and no readable checkpoint before step {first} in {where} to "
            "roll back to. Save more often (ModelCheckpoint(every_n_steps=N) with N below "
            f"{first}), lower the learning rate, or look at the batches of those steps.",
            step=first,
        )

    def _batches_since(self, meta: dict) -> int:
        """Batches trained on between the checkpoint's data position and the fit's now."""
        t = self.trainer
        e0, b0 = int(meta["epoch"]), int(meta["batch_in_epoch"])
        epoch, batch, nb = t.current_epoch, t.batch_in_epoch, t.n_train_batches
        if e0 == epoch:
            return batch - b0
        if nb is not None:
            return (epoch - e0) * nb + batch - b0
        return (t.global_step - int(meta["step"])) * t.grad_accum_steps  # length unknown


DEFAULT_MAX_CONSECUTIVE = 3
DEFAULT_MAX_ROLLBACKS = 3


class RollsBack:
    """What ``NaNGuard`` and ``SpikeGuard`` share: their hooks, and for ``action="rollback"``
    the options, the counters, when the loop must be in step with the device, and the ask at
    a log step."""

    action: str
    kind: str  # bad_runs kind

    def _rollback_options(self, owner: str, max_consecutive, max_rollbacks) -> None:
        from nnxfit.errors import positive_int

        rolls = self.action == "rollback"
        if not rolls and (max_consecutive is not None or max_rollbacks is not None):
            raise ConfigError(
                f"{owner} max_consecutive and max_rollbacks apply to action='rollback'; got "
                f"action={self.action!r}. Drop them, or pass action='rollback'."
            )
        k = DEFAULT_MAX_CONSECUTIVE if max_consecutive is None else max_consecutive
        n = DEFAULT_MAX_ROLLBACKS if max_rollbacks is None else max_rollbacks
        self.max_consecutive = positive_int(f"{owner} max_consecutive", k) if rolls else None
        self.max_rollbacks = positive_int(f"{owner} max_rollbacks", n) if rolls else None
        # In step with the device where it may roll back (``needs_sync``): not records_only.
        self.records_only = not rolls
        self.rollbacks = 0  # in the run (a resumed fit goes on counting)
        self.rollbacks_before = 0  # of those, before this fit call (max_rollbacks is per call)
        self.rollback_log: list[RollbackRecord] = []

    def _rollback_fit_start(self, trainer, owner: str) -> None:
        if self.action != "rollback":
            return
        check_config(trainer, owner)
        if trainer.resumed_from is None:
            self.rollbacks = 0
        self.rollbacks_before = self.rollbacks
        self.rollback_log = []

    def needs_sync(self, trainer, event: str, step: int, n_steps: int) -> bool:
        """Log steps and epoch ends, where a rollback may follow the hooks (module docstring
        of ``rollback.py``); the device runs ahead in between."""
        if event == "epoch_end":
            return True
        if event != "batch":
            return False
        n, last = trainer.log_every_n_steps, trainer.max_steps
        return step // n != (step - n_steps) // n or (last is not None and step >= last)

    # The guards' hooks: the guard's own ``_check(trainer)`` says what it saw, then a rollback
    # may be asked for; the count of rollbacks is checkpointed with the guard.
    def on_train_batch_end(self, trainer, module, step, logs) -> None:
        if logs:  # a log step: the trainer just fetched the device's counters
            self._check(trainer)
            self._rollback_check(trainer, logs)

    def on_train_epoch_end(self, trainer, module, epoch, logs) -> None:
        self._check(trainer)
        self._rollback_check(trainer, logs)

    def state_dict(self) -> dict:
        return {"rollbacks": self.rollbacks} if self.action == "rollback" else {}

    def load_state_dict(self, state) -> None:
        self.rollbacks = int(state.get("rollbacks", 0))

    def _rollback_check(self, trainer, logs: dict) -> None:
        """At a log step or epoch end: asks for a rollback when a run is long enough; the
        running count goes into the logs."""
        if self.action != "rollback":
            return
        rb = trainer.rollback
        if rb is not None:
            rb.ask(self, self.kind)
        logs["rollbacks"] = float(self.rollbacks)
