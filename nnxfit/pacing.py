"""How far the host may run ahead of the device in a loop of asynchronous calls.

JAX returns from a jitted call as soon as it is queued, so a loop that sends small work
quickly (validation batches) queues all of it long before the device is done: a signal that
arrives then has to wait for every batch queued. ``DeviceQueue`` keeps about ``max_lag``
seconds of work queued, and never fewer than ``min_queued`` calls, so the device stays busy
and a stop waits for little.

Per call it takes an array that is ready once the device has done that call (a small output
that is not donated), or a function that makes one, called only for the calls it looks at.
From the calls it sees finish it estimates the device's seconds per call, and it waits
(sleeping, ``carry.wait_ready``) only when the calls not yet seen done are worth more than
``max_lag``. A device that keeps up never makes it wait; with calls quicker than
``quick_s`` it looks only every ``quick_every``-th call, so it costs well under 1 us a call.
``wait(arrays)`` waits for arrays (``carry.wait_ready``: it sleeps rather than spins).

Validation batches (``evaluate.py``) and train calls (the Trainer) are paced so.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

QUICK_S = 1e-3  # calls quicker than this are looked at every ``QUICK_EVERY``-th time
QUICK_EVERY = 16


# Train calls (the Trainer): about this many seconds of them queued behind the one running,
# so that a SIGTERM or Ctrl-C waits for little more than the call in flight (unpaced, the host
# ran up to ~62 calls ahead: a minute of 1 s steps, past a preemption's grace period). Calls
# quicker than 1/32 of it cannot reach it (XLA's CPU client queues at most 32 per device), so
# those are looked at only every 64th call; a look is a one-element program.
TRAIN_MAX_LAG_S = 2.0


class DeviceQueue:
    def __init__(
        self,
        max_lag: float,
        wait: Callable[[list], None],
        min_queued: int = 2,
        clock: Callable[[], float] = time.perf_counter,
        quick_s: float = QUICK_S,
        quick_every: int = QUICK_EVERY,
    ):
        self.max_lag, self.min_queued, self._wait, self._clock = max_lag, min_queued, wait, clock
        self.quick_s, self.quick_every = quick_s, quick_every
        self._sent = 0  # calls sent
        self._done, self._done_at = 0, clock()  # calls seen done, and when
        self.per_call: float | None = None  # device seconds per call, once seen
        self._watched: collections.deque = collections.deque()  # (call number, its array)

    def sent(self, done_flag) -> None:
        """Call right after sending a call; ``done_flag`` is ready once it is done (or makes
        such an array). Waits while more than ``max_lag`` seconds of calls are queued."""
        self._sent += 1
        quick = self.per_call is not None and self.per_call < self.quick_s
        if quick and self._sent % self.quick_every:
            return
        self._watched.append((self._sent, done_flag() if callable(done_flag) else done_flag))
        self._collect()
        queued = self._sent - self._done
        if queued > self.min_queued and (
            self.per_call is None or queued * self.per_call > self.max_lag
        ):
            self._wait([self._watched[0][1]])
            self._collect()

    def _collect(self) -> None:
        now, last = self._clock(), None
        while self._watched and self._watched[0][1].is_ready():
            last = self._watched.popleft()[0]
        if last is not None:
            self.per_call = (now - self._done_at) / (last - self._done)
            self._done, self._done_at = last, now


def train_queue(wait: Callable[[list], None]) -> DeviceQueue:
    """The pacing of a fit's train calls (``TRAIN_MAX_LAG_S``); one call may wait queued."""
    lag = TRAIN_MAX_LAG_S
    return DeviceQueue(lag, wait, min_queued=1, quick_s=lag / 32, quick_every=64)
