"""``DeviceClock``: what the device has finished and when, learned without making the host wait.

The loop sends calls to the device ahead of the hooks, so a hook's own clock says when the hook
ran, not when the device finished the steps it reports: calls reach the hooks in bursts when
the device runs behind, and rates timed from hook calls came out tens to thousands of times
too high. The host learns that the device finished a step in two ways, both already part of
the loop:

* a log step or an epoch end reads the call's metrics and waits for them: the device has
  finished that call when the wait ends;
* after waiting for its next batch, before sending it, the loop may ask the newest call's
  output whether it is ready (``jax.Array.is_ready()``: non-blocking, ~1.5 us): if it is, the
  device has finished everything sent so far. It asks at an epoch's first call, after a data
  wait of ``LONG_WAIT_S`` or more, and otherwise at most every ``POLL_EVERY_S``, so the cost
  per call stays well under a microsecond.

Each time it learns something it stamps a ``DeviceProgress``: the step the device had
finished and the clock reading when that became known (an upper bound on when it happened).
A stamp is on time when the device is behind the host (a read then waits) or keeps up with it
(a poll finds it done within ``POLL_EVERY_S``); when the device is only a few calls behind, a
read may find the step long done and stamp it up to ``lookahead`` calls late. That moves
those seconds from the interval after the stamp to the one before it: rates over many steps
stay right, a rate over a few steps (the first log step of an epoch) can be off. The same
holds at an epoch's start (``epoch_start``): the next epoch's first batch is fetched before
the epoch-end hooks read the last step's metrics; a device still running the last call then
is first seen done after the wait for that batch, which counts in the epoch before (a loader
of 20 ms a batch read 50.3 steps/s over 20 steps in 3 of 5 quiet runs, not at most 50).
The Trainer publishes, for each event it delivers to the hooks, the progress up to that
event's step (``Trainer.device_progress``): a hook never sees the device ahead of the event,
nor a step the device was not known to have finished.

Rates are steps per second of training time, ``time - excluded``: the clock leaves out what is
not training, so that a rate between two readings is the training speed:

* compiles on the loop's thread (the train step's first call, the loop's small helper
  programs, a new batch shape): jax reports their durations through ``jax.monitoring``;
* validation during fit (timed from when the device finished the steps before it);
* the gaps between epochs: from when the device was known to have finished an epoch until the
  loop asked for the next epoch's first batch, when the device sat idle meanwhile (epoch-end
  hooks, checkpoints, validation).

It also adds up the loop's waits for its next batch (``data_wait``) and the part of them at
whose end the device had already finished everything it was sent (``data_wait_idle``): the
waits that held training back.
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from jax import monitoring

POLL_EVERY_S = 1e-3  # asks the device at most this often, short waits aside (1.5 us a time)
LONG_WAIT_S = 1e-4  # a data wait at least this long is worth a poll (1.5 us) after it
# Events jax records around every compile (jax/_src/dispatch.py, pxla.py): tracing, lowering
# to MLIR, and the backend compile (or the load from the persistent compilation cache).
COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)
_active: dict[int, DeviceClock] = {}  # thread id -> the clock of the loop it runs
_listening = False


def _on_duration(event: str, duration: float, **kwargs: Any) -> None:
    if event in COMPILE_EVENTS:
        clock = _active.get(threading.get_ident())
        if clock is not None and not clock._excluding:
            clock.excluded += duration


def _is_ready(x: Any) -> bool:
    """Whether the device finished computing ``x`` (non-blocking); a deleted array (the
    state was replaced) tells nothing."""
    try:
        return x.is_ready()
    except Exception:  # noqa: BLE001
        return False


class DeviceProgress(NamedTuple):
    """How far the device had got, as far as the host knew at ``time``.

    ``step``: optimizer steps the device had finished (never more than the hooks have seen).
    ``time``: the clock reading (``time.perf_counter``) by which the host knew it.
    ``excluded``: seconds up to ``time`` that were not training (compiles, validation, the
    gaps between epochs). ``data_wait``: seconds up to ``time`` the loop waited for its next
    batch; ``data_wait_idle``: the part of those waits at whose end the device had finished
    everything it was sent. The last three only grow: take differences between two readings.
    """

    step: int
    time: float
    excluded: float = 0.0
    data_wait: float = 0.0
    data_wait_idle: float = 0.0

    @property
    def train_time(self) -> float:
        """``time - excluded``: seconds on a clock that stops outside training."""
        return self.time - self.excluded


def steps_per_second(a: DeviceProgress, b: DeviceProgress) -> float | None:
    """Optimizer steps per second of training time from ``a`` to ``b``; None when there is
    nothing to tell (no step or no time between them)."""
    steps, seconds = b.step - a.step, b.train_time - a.train_time
    if steps <= 0 or seconds <= 0:
        return None
    return steps / seconds


class DeviceClock:
    """Stamps what the device finished; the Trainer calls it from its loop (see the module doc).

    ``wait`` waits for a list of arrays (the loop's sleeping ``carry.wait_ready``); ``clock`` is the
    time source (tests pass a fake one).
    """

    def __init__(
        self, wait: Callable[[list], None], clock: Callable[[], float] = time.perf_counter
    ):
        self._wait = wait
        self.clock = clock
        self._reset(0)

    def start(self, step: int) -> None:
        """A fit's loop begins with the device having finished ``step`` steps. From now on,
        compiles on this thread are excluded time."""
        global _listening
        self._reset(step)
        if not _listening:  # once per process; it costs nothing between compiles
            monitoring.register_event_duration_secs_listener(_on_duration)
            _listening = True
        _active[self._thread] = self

    def _reset(self, step: int) -> None:
        now = self.clock()
        self.excluded = self.data_wait = self.data_wait_idle = 0.0
        self._stamps = collections.deque([DeviceProgress(step, now)])
        self._thread = threading.get_ident()
        self._excluding = False  # inside ``excluding()``: compiles in it are excluded already
        self._epoch: int | None = None
        self._last_poll = -math.inf
        self._published: DeviceProgress | None = None  # for the hooks' step, cached
        self._published_at = step

    # -- called by the loop ------------------------------------------------------------------
    def poll(self, start: float, wait: float, epoch: int, sent: int, newest: Any) -> None:
        """The loop waited ``wait`` seconds from ``start`` for its next batch (of ``epoch``)
        and is about to send it; ``sent`` steps went out so far, the newest call's output
        holds ``newest`` (ready once the device finished it). Has the device finished?"""
        self.data_wait += wait
        now = start + wait
        first = epoch != self._epoch
        if not (first or wait >= LONG_WAIT_S or now - self._last_poll >= POLL_EVERY_S):
            return
        self._epoch = epoch
        self._last_poll = now
        if not _is_ready(newest):
            return
        s = self._covering(sent)
        if first and s.step >= sent:
            # The device finished the previous epoch and has waited since: from when that
            # became known until the loop asked for this epoch's first batch was epoch-end
            # work, not training (validation and compiles in it were excluded already: max).
            self.excluded = max(self.excluded, s.excluded + start - s.time)
        self.data_wait_idle += wait  # the device ran out of work during this wait
        self._stamp(sent, now)

    def epoch_start(self, sent: int, newest: Any) -> None:
        """The loop is about to ask for an epoch's first batch, ``sent`` steps out, the newest
        call's output ``newest``. The next epoch starts before the epoch-end hooks read the
        last step's metrics: a device done by now is stamped done now, so that the wait for
        that batch counts in the new epoch, not in the one before."""
        if sent > self._stamps[-1].step and _is_ready(newest):
            self._stamp(sent, self.clock())

    def read(self, step: int, snap: list) -> None:
        """The hooks are about to see a log step or an epoch end at ``step``, whose metrics
        ``snap`` the Trainer reads and so waits for anyway: waiting here first times it."""
        self._wait(snap)
        self._stamp(step, self.clock())
        self._forget_before(step)

    @contextlib.contextmanager
    def excluding(self, sent: int, newest: Any):
        """Validation inside a fit: not training time. It starts once the device finished the
        ``sent`` steps before it (``newest`` is their last output; validation waits for them
        anyway)."""
        if newest is not None and not newest.is_deleted():
            self._wait([newest])
            self._stamp(sent, self.clock())
        start = self.clock()
        self._excluding = True
        try:
            yield
        finally:
            self._excluding = False
            self.excluded += self.clock() - start

    def progress(self, step: int) -> DeviceProgress:
        """The device's progress up to ``step``, the hooks' step (``Trainer.device_progress``):
        the earliest stamp at or past it, as ``step``; else the latest stamp before it."""
        p = self._published
        if p is None or self._published_at != step:
            self._forget_before(step)
            s = self._covering(step)
            p = self._published = s._replace(step=step) if s.step > step else s
            self._published_at = step
        return p

    # -- helpers ----------------------------------------------------------------------------
    def _stamp(self, step: int, now: float) -> None:
        stamps = self._stamps
        if step > stamps[-1].step:  # an older step's stamp has an earlier time already
            stamps.append(
                DeviceProgress(step, now, self.excluded, self.data_wait, self.data_wait_idle)
            )
            self._published = None
            if len(stamps) > 64:  # nobody asked for a while: keep what they still may
                self._forget_before(self._published_at)

    def _covering(self, step: int) -> DeviceProgress:
        """The earliest stamp at or past ``step`` (else the latest)."""
        for s in self._stamps:
            if s.step >= step:
                return s
        return self._stamps[-1]

    def _forget_before(self, step: int) -> None:
        """Keeps the latest stamp at or before ``step`` and everything after it."""
        stamps = self._stamps
        while len(stamps) > 1 and stamps[1].step <= step:
            stamps.popleft()
