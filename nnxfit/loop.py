"""The fit's event loop without the Trainer: what the hooks see of it (``Event``), its counters
(``Progress``), when it stops, logs and validates (``Schedule``), and the consumer that runs
the hooks a few events behind the device (``run``).

The Trainer's fit is two halves. ``Trainer._dispatch`` sends the calls to the device and
yields an event per epoch start, call and epoch end as soon as it is on its way;
``Trainer._deliver`` runs the hooks for one event. ``run`` connects them: the hooks get every
event in order, up to ``ahead`` events behind the device, so that a log or epoch-end fetch
finds its numbers computed while later calls keep the device busy (a fetch with an idle
device behind it cost ~10 % of throughput at each epoch end of a short epoch). A *barrier*
event, one a callback needs in step with the device (``Callback.needs_sync``), is delivered
before anything more is dispatched, and so is everything before it.

Two ``Progress`` counters: what went out to the device (``Trainer.dispatch_step`` /
``dispatch_epoch``) and what the hooks have seen (``global_step``, ``current_epoch``,
``batch_in_epoch``), which trails it. One ``Schedule`` answers the stop, log and validation
questions for either.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple


class EventKind(StrEnum):
    START = "start"  # an epoch starts
    CALL = "call"  # a call of the train program went out
    END = "end"  # an epoch ends (validation, on_train_epoch_end)
    INTERRUPT = "interrupt"  # a signal stops the fit here


# Bound once: an enum member looked up on its class costs ~0.4 us on the per-call path.
START, CALL, END, INTERRUPT = EventKind


class Event(NamedTuple):
    """What the hooks see of the loop, in order."""

    kind: EventKind
    epoch: int
    n_steps: int = 0
    n_batches: int = 0
    snap: list | None = None  # metric sums to log, taken out of the carry (FitCarry.snapshot)
    barrier: bool = False  # deliver everything up to here before dispatching more
    mark: list | None = None  # a copy of the carry after the call, when speculating
    partial: bool = False  # an epoch end before the epoch's last batch (the fit stopped)


# ``Event``s of every field, made without the NamedTuple's Python ``__new__`` (~0.3 us less
# per call): ``new_event((kind, epoch, n_steps, n_batches, snap, barrier, mark, partial))``.
new_event = functools.partial(tuple.__new__, Event)


@dataclass(slots=True)
class Progress:
    """Where a fit is: optimizer steps done, the epoch (from 0) and batches into it."""

    step: int = 0
    epoch: int | None = 0  # None for what went out before any fit
    batch: int = 0


def crossed(n: int, step: int, n_steps: int) -> bool:
    """Whether a call of ``n_steps`` steps ending at ``step`` crossed a multiple of ``n``."""
    return step // n != (step - n_steps) // n


def epochs_total(max_epochs: int | None, max_steps: int | None, steps_per_epoch) -> int | None:
    """How many epochs a fit runs (``max_steps`` may end it before ``max_epochs``)."""
    n = max_epochs
    if max_steps is not None and steps_per_epoch:
        by_steps = -(-max_steps // steps_per_epoch)
        n = by_steps if n is None else min(n, by_steps)
    return n


def lookahead(steps_per_execution: int, val_every_n_steps: int | None) -> int:
    """Events the hooks may trail the device by: about 8 steps' worth, plus room for an
    epoch's start and end. None with ``val_every_n_steps``: its validations run between
    calls, in step with the device."""
    if val_every_n_steps is not None:
        return 0
    return 4 + -(-8 // steps_per_execution)


class Schedule:
    """When a fit stops, logs and validates, for either ``Progress`` (``configure`` takes the
    options again when they change during the fit)."""

    def __init__(self, config, n_train_batches: int | None = None, validates: bool = False):
        self.n_train_batches, self.validates = n_train_batches, validates
        # A resumed fit's last log may lie before its checkpoint: the step to count from.
        self.log_from: int | None = None
        self.configure(config)

    def configure(self, config) -> None:
        self.max_epochs, self.max_steps = config.max_epochs, config.max_steps
        self.log_every = config.log_every_n_steps
        self.val_every_n_epochs = config.val_every_n_epochs
        self.val_every_n_steps = config.val_every_n_steps

    def steps_done(self, step: int) -> bool:
        return self.max_steps is not None and step >= self.max_steps

    def done(self, p: Progress, stopped: bool, after_epoch: bool = False) -> bool:
        """Nothing more to run from ``p`` (``after_epoch``: once its epoch has ended)."""
        epoch = p.epoch + (1 if after_epoch else 0)
        return (
            stopped
            or self.steps_done(p.step)
            or (self.max_epochs is not None and epoch >= self.max_epochs)
        )

    def epoch_ending(self, p: Progress, stopped: bool) -> bool:
        """The epoch ends at ``p``: the fit stops there or the epoch's batches are done."""
        nb = self.n_train_batches
        return stopped or self.steps_done(p.step) or (nb is not None and p.batch >= nb)

    def log_due(self, step: int, n_steps: int) -> bool:
        """A call ending at ``step`` logs: it crossed a multiple of ``log_every_n_steps``, or
        it is the last."""
        prev = step - n_steps
        if self.log_from is not None:  # resumed: the last log may lie before the checkpoint
            prev, self.log_from = self.log_from, None
        n = self.log_every
        return step // n != prev // n or self.steps_done(step)

    def validates_at_epoch_end(self, epoch: int, p: Progress, stopped: bool) -> bool:
        """Validation runs at the end of ``epoch``: every ``val_every_n_epochs``, and last."""
        every = (epoch + 1) % self.val_every_n_epochs == 0
        return self.validates and (every or self.done(p, stopped, after_epoch=True))

    def validates_after_call(self, p: Progress, n_steps: int, stopped: bool) -> bool:
        """``val_every_n_steps`` crossed, unless the epoch-end validation is about to run."""
        n = self.val_every_n_steps
        if n is None or not self.validates or not crossed(n, p.step, n_steps):
            return False
        last = self.epoch_ending(p, stopped)
        at_end = (p.epoch + 1) % self.val_every_n_epochs == 0 or self.done(p, stopped, True)
        return not (last and at_end)


def run(
    events: Iterator[Event],
    deliver: Callable[[Event], bool],
    *,
    ahead: int,
    speculation,
    on_stop: Callable[[collections.deque], None],
) -> None:
    """Delivers ``events`` in order, up to ``ahead`` behind the producer, everything up to a
    barrier before the producer runs on. ``deliver(event)`` runs its hooks and says whether
    the fit is to stop. ``speculation`` verifies the state before each event's hooks and
    re-marks after a barrier's (``speculation.py``). A stop while later events are pending
    hands those to ``on_stop`` (they are not delivered). An error from the producer first
    delivers what is pending: the calls on the device happened."""
    pending: collections.deque[Event] = collections.deque()
    verify, after_barrier = speculation.verify, speculation.after_barrier

    def drain(keep: int) -> bool:
        while len(pending) > keep:
            ev = pending.popleft()
            verify(ev)
            stop = deliver(ev)
            if ev.barrier and not pending:
                after_barrier()  # a hook in step with the device may have changed the state
            if stop and pending:
                on_stop(pending)
                return False
        return True

    try:
        while True:
            try:
                ev = next(events, None)
            except Exception:
                drain(0)
                raise
            if ev is None:
                break
            pending.append(ev)
            if not drain(0 if ev.barrier else ahead):
                break
        drain(0)
    finally:
        events.close()


def counter(progress: str, field: str, doc: str) -> property:
    """A property of the Trainer that reads and sets ``field`` of its ``Progress`` named
    ``progress`` (``global_step`` is ``_seen.step``)."""

    def get(self):
        return getattr(getattr(self, progress), field)

    def set_(self, value):
        setattr(getattr(self, progress), field, value)

    return property(get, set_, doc=doc)
