"""Where a fit ended: the state a checkpoint holds so that a resume continues exactly.

A fit can end inside an epoch: at ``max_steps``, when a callback sets ``trainer.should_stop``,
or when ``NaNGuard("stop")`` halts it. The user still gets that partial epoch's end
(validation if due, ``on_train_epoch_end``, a History row), but a resume must not start
after it: it continues *inside* that epoch and finishes it, so that its History and metrics
equal one uninterrupted run's. A ``ResumePoint`` is that state, taken just before the
partial epoch's end ran:

* the step and loader position (epoch, batch in the epoch) to continue from;
* the epoch's running metric sums: the host's f64 sums of the train-interval logs the
  uninterrupted run also makes, and, for the carry, the f32 sums since the last of them;
* every callback's state and the History as they were before the partial epoch end, and the
  device state from before its hooks (``ReduceLROnPlateau`` acting there, a hook changing
  the module: none of it reaches the resumed run, whose own epoch end decides again);
* for the train-interval grid: the step of the last log the uninterrupted run also makes
  (``log_step``: the fit's final call logs even off the grid, and with
  ``steps_per_execution=K`` a call cut short by ``max_steps`` ends off the grid; the resumed
  run's first call then runs the rest of it, ``call_rest`` steps).

After ``NaNGuard("stop")`` the device state is frozen from the first non-finite step n on;
the resume point is the state after step n - 1, at its position, with a clean non-finite
record: a resumed fit runs step n again (and stops there again if nothing changed).

``should_stop`` is not part of it: a new ``fit`` call is a new decision (EarlyStopping's
restored state decides again at the next epoch end).

A checkpoint taken while the fit runs is the live state, except after the final call's
off-grid log (a SIGTERM right then), which is undone the same way.
"""

from __future__ import annotations

import collections
import copy
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nnxfit.data import loader_state


class LogEntry(NamedTuple):
    """One train-interval log as the hooks got it."""

    step: int
    extra: bool  # off the uninterrupted run's grid: the final call's forced or cut log
    acc_before: np.ndarray | None  # the epoch's sums before this log's were added
    acc: np.ndarray | None  # this log's sums (f32 values, as f64); None once its epoch ended
    logs: dict


class ResumeInfo(NamedTuple):
    """What a resumed fit knows about the run it continues (``Trainer.resume_info``), for
    the loggers: they keep the earlier run's train logs up to ``log_step`` and its epoch
    rows of the epochs before the resumed one; nothing it logged from ``superseded_from`` on
    belongs to the resumed run's past, except the train log at ``log_step`` (``logs``) and
    the last epoch end (``epoch_end``: its step and logs), which a logger that hides by step
    writes again when they fall there."""

    log_step: int
    superseded_from: int
    logs: dict
    epoch_end: tuple[int, dict] | None

    @classmethod
    def of(cls, state: dict, step: int, trail: Trail) -> ResumeInfo:
        """From a checkpoint's loop ``state`` at ``step`` and the trail restored from it."""
        log_step, logs = trail.prev
        superseded = int(state.get("superseded_from", step + 1))
        return cls(log_step, superseded, dict(logs), trail.epoch)


class Trail:
    """What the Trainer keeps while it trains to compute a resume point: the last two train
    logs, the sums of the epoch end, and, under ``NaNGuard("stop")``, where recent calls
    ended (``keep_calls`` of them)."""

    @classmethod
    def restored(cls, state: dict, step: int, keep_calls: int) -> Trail:
        """The trail of a resumed fit at ``step``, from its checkpoint's loop ``state``."""
        trail = cls(int(state.get("log_step", step)), state.get("logged_metrics"), keep_calls)
        end = state.get("epoch_end")
        trail.epoch = (int(end[0]), dict(end[1])) if end else None
        return trail

    def __init__(self, log_step: int = 0, logs: dict | None = None, keep_calls: int = 0):
        self.prev: tuple[int, dict] = (log_step, dict(logs or {}))  # the last regular log
        self.last: LogEntry | None = None
        self.end: tuple[np.ndarray, np.ndarray] | None = None  # (sums before, end's sums)
        self.epoch: tuple[int, dict] | None = None  # the last complete epoch end: step, logs
        self.calls = collections.deque(maxlen=keep_calls) if keep_calls else None

    def regular(self) -> tuple[int, dict]:
        """Step and logs of the last log the uninterrupted run also makes."""
        if self.last is not None and not self.last.extra:
            return self.last.step, self.last.logs
        return self.prev

    def logged(self, step, acc_before, acc, logs, *, every: int, final: bool, cut: bool):
        """A train-interval log at ``step``. On the fit's final call (``final``) a log that
        crossed no multiple of ``every`` since the last regular one, or ends a call cut
        short (``cut``), is one the uninterrupted run does not make."""
        reg_step, reg_logs = self.regular()
        extra = final and (cut or step // every == reg_step // every)
        self.prev = (reg_step, reg_logs)
        self.last = LogEntry(step, extra, acc_before, acc, logs)

    def loop_fields(self, log_step: int, logs: dict) -> dict:
        """The loop-state entries for the loggers (``ResumeInfo``), as plain JSON."""
        epoch = [self.epoch[0], numbers(self.epoch[1])] if self.epoch is not None else None
        return {"log_step": log_step, "logged_metrics": numbers(logs), "epoch_end": epoch}

    def epoch_ended(self, step: int, logs: dict) -> None:
        """After an epoch end's hooks: the sums logged so far belong to a closed epoch."""
        self.epoch = (step, logs)
        if self.last is not None:
            self.last = self.last._replace(acc_before=None, acc=None)


class ResumePoint(NamedTuple):
    step: int
    leaves: list  # the carry to save (``FitCarry.leaves`` layout)
    loop: dict  # the loop state to save (Trainer.loop_state layout)


def numbers(logs: dict) -> dict[str, float]:
    """The values of ``logs`` that are numbers, as floats (what the loggers write)."""
    out = {}
    for k, v in logs.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def frozen_at(trainer) -> int | None:
    """The step at which ``NaNGuard("stop")`` (a non-finite step) or ``SpikeGuard("stop")``
    (a spike) froze the state, once the host has seen it; else None."""
    features, carry = trainer.programs.config.features, trainer.carry
    firsts = []
    if features.halts and carry.first_nonfinite_step is not None:
        firsts.append(carry.first_nonfinite_step)
    if features.spike is not None and features.spike.halt and carry.first_spike_step is not None:
        firsts.append(carry.first_spike_step)
    return min(firsts, default=None)


def halted(trainer) -> bool:
    """A guard froze the state at a step the host has seen (``frozen_at``)."""
    return frozen_at(trainer) is not None


def step_of(trainer, point: ResumePoint | None) -> int:
    """The step a checkpoint taken now is at (``Trainer.checkpoint_step``), given the fit's
    resume ``point`` (None while it trains)."""
    if point is not None:
        return point.step
    return frozen_at(trainer) - 1 if halted(trainer) else trainer.global_step


def capture(
    trainer, trail: Trail, cut_rest: int, *, at_end: bool, partial: bool = False
) -> ResumePoint | None:
    """The resume point of ``trainer`` now, from what its ``trail`` kept and the steps
    ``max_steps`` cut from its last call (``cut_rest``, ``plan.Plan``). ``at_end``: at an
    epoch end whose sums were just read (``Trail.end``), before its validation and hooks; None
    there when the epoch is complete and nothing was halted (the epoch end then belongs to the
    checkpoint). Otherwise (a checkpoint while training) the live state, with an off-grid
    final log undone."""
    t, frozen, carry = trainer, halted(trainer), trainer.carry
    if at_end and not (partial or frozen):
        return None
    step = frozen_at(t) - 1 if frozen else t.global_step
    if at_end:
        epoch_acc, acc = trail.end
    else:
        epoch_acc, acc = carry.epoch_acc, None  # the carry holds the sums since the last log
    last = trail.last
    undo = last is not None and (last.step > step or last.extra)
    if undo:
        log_step, logs = trail.prev
        if last.acc is not None:  # sums the uninterrupted run has not logged go back
            epoch_acc, acc = last.acc_before, last.acc
    else:
        log_step, logs = trail.regular()
    if frozen:
        epoch, batch, rest = t.current_epoch, *_position(trail, step)
        superseded = step + 1
    else:
        epoch, batch, rest = t.current_epoch, t.batch_in_epoch, cut_rest
        superseded = step if (partial or undo) else step + 1
    if not (at_end or undo or frozen) and not rest:
        return ResumePoint(step, carry.leaves, t.loop_state())

    leaves, layout = list(carry.leaves), carry.layout
    if acc is not None:
        old = leaves[layout.n_head]
        leaves[layout.n_head] = jax.device_put(np.asarray(acc, np.float32), old.sharding)
    if frozen:  # the state after step n - 1, with a clean non-finite (and spike) record
        if layout.step_index is not None:
            leaves[layout.step_index] = jnp.full_like(leaves[layout.step_index], step)
        for i in layout.health_indices:
            leaves[i] = jnp.full_like(leaves[i], 0 if i in layout.counter_indices else -1)
    loop = {
        "global_step": step,
        "epoch": epoch,
        "batch_in_epoch": batch,
        "should_stop": False,
        "history": t.history.state_dict(),
        "epoch_acc": np.asarray(epoch_acc, np.float64).tolist(),
        "callbacks": copy.deepcopy(t.cb.state_dicts()),
        "loader": loader_state(t.train_data, epoch, batch),
        "call_rest": rest,
        "superseded_from": superseded,
        **trail.loop_fields(log_step, logs),
    }
    return ResumePoint(step, leaves, loop)


def _position(trail: Trail, step: int) -> tuple[int, int]:
    """(batch in the epoch, steps left of its call) after ``step``, from the recorded ends of
    the calls: a call's steps take equal shares of its batches (one stack of groups)."""
    calls = list(trail.calls or ())
    for (s0, b0), (s1, b1) in zip(calls, calls[1:], strict=False):
        if s0 <= step < s1:
            return b0 + (step - s0) * (b1 - b0) // (s1 - s0), (s1 - step if step > s0 else 0)
    if calls and calls[-1][0] == step:
        return calls[-1][1], 0
    raise RuntimeError(f"nnxfit: no record of where step {step} ended (calls: {calls}).")
