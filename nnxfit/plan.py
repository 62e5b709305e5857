"""Batches to jitted calls: how each epoch of the training data becomes calls of the train
programs (``Plan``).

A call (``Call``) runs one optimizer step (``CallKind.SINGLE``) or several in a ``lax.scan``
(``CallKind.MULTI``: ``steps_per_execution=K``, K steps per call); an optimizer step takes one
batch, or ``grad_accum_steps=A`` micro-batches stacked. Only batches of one shape are
stacked: a short last batch gets a group and a call of its own, so each distinct shape
compiles once. One path per case:

* ``_runs``: an ``ArrayLoader`` with K > 1 and A = 1: runs of K batches come stacked straight
  from the loader's gather buffer (``ArrayLoader.iter_runs``, no copy);
* ``_singles``: K = A = 1, the common case, kept lean: one batch per call;
* ``_groups`` and ``_Packing``: everything else: A batches per step, K steps per call.

An ``ArrayLoader``'s batches are slices of arrays checked once at construction, so they come
as leaves with no per-batch check; other sources' batches are checked against the first
(``data.BatchSpec``), which names the leaf, the shapes and the batch index of a mismatch.

``max_steps`` ends the plan. A call it cuts short leaves ``cut_rest`` steps unplanned; a fit
resumed from there runs them first (``call_rest``), so that its calls, and the logs at their
ends, fall where the uninterrupted run's do (``resume_point.py``).

``Trainer(prefetch=n)`` plans on a background thread, ``n`` calls ahead (``Prefetch``). The
time the loop waits for each call is handed to ``on_wait`` (the data-wait clock).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from nnxfit.data import ArrayLoader, epoch_batches, num_batches
from nnxfit.step import CallKind, stack

SINGLE, MULTI = CallKind  # bound once: looked up on the class each call they cost ~0.4 us


class Call(NamedTuple):
    """One call of a train program."""

    kind: CallKind
    batch: list  # the program's batch leaves: one batch, or A, K or K x A stacked
    n_steps: int  # optimizer steps it runs
    n_batches: int  # batches of the epoch it consumes


# ``Call``s made without the NamedTuple's Python ``__new__`` (~0.3 us less per call).
new_call = functools.partial(tuple.__new__, Call)


def epoch_size(data: Any, limit: int | None, accum: int, max_epochs, max_steps) -> tuple:
    """``(batches per epoch, optimizer steps per epoch, steps of the whole fit)``, each None
    where the data does not say its length (``limit``: ``limit_train_batches``)."""
    nb = num_batches(data)
    if limit is not None:
        nb = limit if nb is None else min(nb, limit)
    steps_per_epoch = -(-nb // accum) if nb is not None else None
    totals = []
    if max_steps is not None:
        totals.append(max_steps)
    if max_epochs is not None and steps_per_epoch is not None:
        totals.append(max_epochs * steps_per_epoch)
    return nb, steps_per_epoch, min(totals) if totals else None


class Plan:
    """A fit's batches as calls (see the module docstring)."""

    def __init__(self, data: Any, spec, put: Callable, config):
        """``data``: the training data; ``spec``: its ``data.BatchSpec``; ``put``: where a
        call's batch goes (``placement.put_batch``); ``config``: the Trainer's options."""
        self.data, self.spec, self.put = data, spec, put
        self.call_rest = 0  # steps of a cut call a resumed fit runs first (set by a resume)
        self.cut_rest = 0  # steps max_steps cut from the last call planned
        self._shift = 0  # added to max_steps until the next epoch's plan (``rolled_back``)
        self.configure(config)

    def configure(self, config) -> None:
        """Takes the Trainer's options (again, when they change during the fit: from the
        next epoch on; ``max_steps`` at once)."""
        self.K, self.A = config.steps_per_execution, config.grad_accum_steps
        self.max_steps, self.limit = config.max_steps, config.limit_train_batches
        self.seed, self.prefetch = config.seed, config.prefetch

    def calls(
        self, epoch: int, start: int, planned: int, on_wait: Callable[[float, float], None]
    ) -> Iterator[Call]:
        """The calls of ``epoch`` from its batch ``start``, ``planned`` steps having gone out
        before. ``on_wait(t0, seconds)``: the loop waited from ``t0`` for the next call (also
        for the end of the epoch)."""
        if self._shift:  # ``planned`` is the fit's step count again
            self.max_steps, self._shift = self.max_steps - self._shift, 0
        calls = self._plan(epoch, start, planned)
        prefetch = Prefetch(calls, self.prefetch) if self.prefetch else None
        it, clock = iter(prefetch if prefetch is not None else calls), time.perf_counter
        try:
            while True:
                t0 = clock()
                call = next(it, None)
                on_wait(t0, clock() - t0)
                if call is None:
                    return
                yield call
        finally:
            if prefetch is not None:
                prefetch.close()

    def rolled_back(self, steps: int) -> None:
        """The fit's step count went back ``steps`` steps (``rollback.py``) while the epoch's
        calls are planned from a count of their own, now ``steps`` too high: ``max_steps``
        moves up with it until the next epoch's plan starts from the fit's count."""
        if self.max_steps is not None:
            self.max_steps += steps
            self._shift += steps

    def _plan(self, epoch: int, start: int, planned: int) -> Iterator[Call]:
        K, A, data, limit = self.K, self.A, self.data, self.limit
        # A resumed fit first runs the rest of the call that max_steps cut short.
        cap, self.call_rest = min(K, self.call_rest or K), 0
        if K > 1 and A == 1 and isinstance(data, ArrayLoader):
            yield from self._runs(epoch, start, planned, cap)
            return
        if isinstance(data, ArrayLoader):
            batches = data.iter_leaves(epoch, start)
            if limit is not None:
                batches = itertools.islice(batches, max(0, limit - start))
            check = _checked_already
        else:
            batches = epoch_batches(data, epoch, start, limit, self.seed)
            check = self.spec.check
        if K == 1 and A == 1:
            yield from self._singles(batches, check, start, planned)
            return
        packing = _Packing(self, planned, cap)
        for group in self._groups(batches, check, start, packing.steps_left):
            yield from packing.add(group)
        yield from packing.rest()

    def _runs(self, epoch: int, start: int, planned: int, cap: int) -> Iterator[Call]:
        """K-step calls of batches the ``ArrayLoader`` stacks in place; the first only
        ``cap`` long after a resume."""
        data, K, put, limit = self.data, self.K, self.put, self.limit

        def runs():
            at = start
            for leaves, m in data.iter_runs(epoch, start, cap, limit) if cap < K else ():
                yield leaves, m
                at += m
                break
            yield from data.iter_runs(epoch, at, K, limit)

        for leaves, m in runs():
            max_steps = self.max_steps
            if max_steps is not None:
                if planned >= max_steps:
                    return
                if m > max_steps - planned:
                    self.cut_rest = m - (max_steps - planned)
                    m = max_steps - planned
                    leaves = [x[:m] for x in leaves]
            planned += m
            if m == 1:
                yield new_call((SINGLE, put([x[0] for x in leaves]), 1, 1))
            else:
                yield new_call((MULTI, put(leaves, 1), m, m))

    def _singles(self, batches, check, start: int, planned: int) -> Iterator[Call]:
        """One batch per call."""
        put = self.put
        for i, batch in enumerate(batches, start):
            if self.max_steps is not None and planned >= self.max_steps:
                return
            planned += 1
            yield new_call((SINGLE, put(check(batch, i)), 1, 1))

    def _groups(self, batches, check, start: int, steps_left: Callable[[], bool]):
        """The batches' leaves in groups of A of one shape (an optimizer step each); stops
        once ``steps_left()`` says no further step fits (asked before each new group)."""
        A, group = self.A, []
        for i, batch in enumerate(batches, start):
            leaves = check(batch, i)
            if group and leaves[0].shape[0] != group[0][0].shape[0]:
                yield group
                group = []
            if not group and not steps_left():
                return
            group.append(leaves)
            if len(group) == A:
                yield group
                group = []
        if group:
            yield group

    def call_of(self, chunk: list[list]) -> Call:
        """The call of ``chunk``, steps' groups of batch leaves of one shape."""
        A, put = self.A, self.put
        n_batches = sum(len(g) for g in chunk)
        groups = [stack(g) if A > 1 else g[0] for g in chunk]
        if len(groups) == 1:
            return Call(SINGLE, put(groups[0], int(A > 1)), 1, n_batches)
        return Call(MULTI, put(stack(groups), 1 + int(A > 1)), len(groups), n_batches)


class _Packing:
    """Optimizer steps (groups of batches) packed into calls of up to K steps of one shape, the
    first only ``cap`` long after a resume; ``max_steps`` cuts the last short."""

    def __init__(self, plan: Plan, planned: int, cap: int):
        self.plan, self.planned, self.cap = plan, planned, cap
        self.chunk: list[list] = []  # the groups of the call being filled

    def steps_left(self) -> bool:
        max_steps = self.plan.max_steps
        return max_steps is None or self.planned + len(self.chunk) < max_steps

    def add(self, group: list) -> Iterator[Call]:
        chunk = self.chunk
        if chunk and (len(chunk[0]), chunk[0][0][0].shape[0]) != (len(group), group[0][0].shape[0]):
            yield self._flush()  # a step of another size or shape starts a call of its own
        self.chunk.append(group)
        max_steps = self.plan.max_steps
        room = self.cap if max_steps is None else min(self.cap, max_steps - self.planned)
        if len(self.chunk) >= room:
            if len(self.chunk) < self.cap:  # cut short by max_steps (``resume_point.py``)
                self.plan.cut_rest = self.cap - len(self.chunk)
            yield self._flush()

    def rest(self) -> Iterator[Call]:
        if self.chunk:
            yield self.plan.call_of(self.chunk)

    def _flush(self) -> Call:
        call = self.plan.call_of(self.chunk)
        self.planned += call.n_steps
        self.chunk, self.cap = [], self.plan.K
        return call


def _checked_already(leaves: list, index: int) -> list:
    """The check of an ``ArrayLoader``'s batches: done once, when the loader was built."""
    return leaves


class Prefetch:
    """Runs a generator on a background thread, ``size`` items ahead; re-raises its errors."""

    _END = object()

    def __init__(self, gen, size: int):
        self._q: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._gen = gen
        self._t = threading.Thread(target=self._run, daemon=True, name="nnxfit-prefetch")
        self._t.start()

    def _run(self):
        try:
            for item in self._gen:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(self._END)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
            self._q.put(e)

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()
        self._t.join(timeout=5)
