"""``FitState``: the state a checkpoint saves and a resume loads, a part of the ``Trainer``.

``train_state()`` is the device state (``carry.FitCarry.state_dict``), ``loop_state()`` the
host counters, History, callbacks' and loader's state; ``checkpoint_state()`` is what a
checkpoint saves now: the live state, or, once a fit ended inside an epoch, the state from
before that epoch's end (``resume_point.py``). Which checkpoint a fit resumes from is
``resume.py``'s; the orbax side is ``checkpoint.py`` and ``callbacks/checkpoint.py``.
"""

from __future__ import annotations

import numpy as np

from nnxfit.callbacks.checkpoint import ModelCheckpoint, check_one_writer_per_directory
from nnxfit.data import loader_state
from nnxfit.resume import resume_fit
from nnxfit.resume_point import ResumeInfo, Trail, capture, step_of


class FitState:
    """The checkpointed state of a ``Trainer``'s fit."""

    def train_state(self) -> dict:
        """The device state of the fit as pytrees (for checkpoints): module state, optimizer
        state, step counter and the epoch's metric accumulators."""
        return self._carry.state_dict()

    def load_train_state(self, state: dict) -> None:
        """Replaces the device state with ``state`` (same structure as ``train_state()``)."""
        self._carry.load_state_dict(state)
        self._sync_to_module()

    def loop_state(self) -> dict:
        """Host-side counters a resumed run needs (plain Python), live."""
        seen, trail = self._seen, self._trail
        return {
            "global_step": seen.step,
            "epoch": seen.epoch,
            "batch_in_epoch": seen.batch,
            "should_stop": self.should_stop,  # informative: a resumed fit decides anew
            "history": self.history.state_dict(),
            "epoch_acc": self._carry.epoch_acc.tolist(),
            "callbacks": self.cb.state_dicts(),
            "loader": loader_state(self.train_data, seen.epoch, seen.batch),
            "call_rest": 0,
            "superseded_from": seen.step + 1,
            **trail.loop_fields(*trail.regular()),
        }

    def load_loop_state(self, state: dict) -> None:
        seen = self._seen
        seen.step, seen.epoch = int(state["global_step"]), int(state["epoch"])
        seen.batch = int(state["batch_in_epoch"])
        # A new fit call is a new decision: a stop saved with the state does not carry over.
        self.should_stop = False
        self.history.load_state_dict(state.get("history", {}))
        calls = self._trail.calls
        keep = calls.maxlen if calls is not None else 0
        trail = self._trail = Trail.restored(state, seen.step, keep)
        log_step, logs = trail.prev
        self._schedule.log_from = log_step if log_step != seen.step else None
        self._plan.call_rest = int(state.get("call_rest", 0))
        self.logged_metrics = dict(logs)
        self.resume_info = ResumeInfo.of(state, seen.step, trail)
        acc, carry = state.get("epoch_acc"), self._carry
        if acc is not None and len(acc) == len(carry.epoch_acc):
            carry.epoch_acc = np.asarray(acc, np.float64)
        self.cb.load_state_dicts(state.get("callbacks", {}))
        if state.get("loader") and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(state["loader"])

    def checkpoint_state(self) -> tuple[dict, dict]:
        """What a checkpoint saves, ``(train_state(), loop_state())``-shaped: the point a
        resume continues from. The live state while the fit trains; once it has ended inside
        an epoch, the state from before that epoch's end (``resume_point.py``)."""
        point = self._resume_point
        if point is None:
            point = capture(self, self._trail, self._plan.cut_rest, at_end=False)
        return self._carry.state_dict(point.leaves), point.loop

    def _rewind(self, state: dict, step: int) -> None:
        """A guard's rollback (``rollback.py``): the device state becomes ``state`` (from the
        checkpoint of ``step``), the step count goes back to ``step``; the data position, the
        epoch, the History and the callbacks' states stay. Called in step with the device
        (nothing dispatched past the event being delivered)."""
        self.load_train_state(state)
        seen = self._seen
        self._plan.rolled_back(seen.step - step)
        seen.step = self._sent.step = self._signals.sending = step
        calls = self._trail.calls
        keep = calls.maxlen if calls is not None else 0
        self._trail = Trail(step, dict(self.logged_metrics), keep)
        self._resume_point = None  # a fit that had reached its end trains on
        self._schedule.log_from = None
        self._device_clock.start(step)
        self._speculation.after_barrier()  # the restored state is the one to re-run from

    @property
    def checkpoint_step(self) -> int:
        """The step of the state a checkpoint saves now (``checkpoint_state``): the global
        step, or the last good step's after ``NaNGuard("stop")``."""
        return step_of(self, self._resume_point)

    def _resume(self, resume) -> None:
        check_one_writer_per_directory(self)  # before anything is loaded into the module
        dirs = [c.resolve_directory(self) for c in self.cb if isinstance(c, ModelCheckpoint)]
        resume_fit(self, resume, dirs)

    def _saving_dirs(self) -> list[str]:
        """Where the fit's ``ModelCheckpoint``s save (none under ``fast_dev_run``)."""
        if self.fast_dev_run:
            return []
        return [
            c.directory
            for c in self.cb
            if isinstance(c, ModelCheckpoint) and c.directory is not None
        ]
