"""NaNGuard's speculation: the train steps run ungated, and a step that was not finite is undone
from a kept copy of the state before any callback can see it.

Why. ``NaNGuard`` promises that a non-finite step changes nothing (``"skip"``) or that nothing
changes from the first one on (``"stop"``, ``"raise"``). Gating each update on the whole
gradient being finite (``step.Programs``, ``gate="cond"``) keeps that promise inside the step,
but makes the update wait for the gradient's finite check, which takes away the overlap of
the backward pass with the optimizer update: +33-45 % step time on a small MLP on 2 CPU
cores. So for small states (``should_speculate``: up to ``SPECULATE_MAX_BYTES``, one device,
no ``val_every_n_steps``) the programs run ungated (``StepConfig.speculate``) and the loop
speculates that every step is finite:

* it keeps a copy of the carry at a point known to be good, the *mark*, and a *journal* of
  what it dispatched since: the calls, the log snapshots (``FitCarry.snapshot``) and periodic
  marks, one every ``MARK_EVERY_N_STEPS`` steps (sooner when the batches the journal holds
  reach ``MARK_MAX_BATCH_BYTES``; a copy of the small benchmark MLP's 0.3 MB state takes
  ~100 us on 2 cores: 0.3 % at 256 steps);
* before any hook sees an event (``verify``), it reads the non-finite count the event shows:
  from its log snapshot, its mark, or, at a barrier (nothing went out after it), the live
  carry. The loop's lookahead keeps those reads off an idle device. An event with none of
  these shows its hooks no state and is not checked. A count that did not move means
  everything up to there is good: the newest mark up to the event becomes the one to re-run
  from, and the journal before it is dropped;
* a count that moved means a step was not finite: ``rollback`` re-runs the journal from the
  mark with the same programs, call by call, each checked. A one-step call whose step was not
  finite gets the state from before it with the step's counters (``Programs.gated``'s
  ``skipped``: what the gated step leaves, bit for bit); a K-step call with such a step is
  redone a step at a time (the scan's steps, bit for bit in the tests). Snapshots and marks are
  re-taken in place, so the pending events see the corrected numbers. Under ``"stop"`` the
  first bad step halts: every later step, in the re-run and in the calls still to come, runs
  gated (``FitCarry.gate_from_now``) and speculation ends;
* after a barrier event's hooks, which may have changed the state, the live carry becomes
  the mark (``after_barrier``).

A speculating fit is exact in itself: a skipped batch leaves everything as a run without it,
and a resumed run re-runs alike. Against gating every step, whose update compiles apart, it
agrees to rounding. Above ``SPECULATE_MAX_BYTES`` the gate's cost is small next to the step
(0-2 % on the large benchmark MLP, 13 MB) while the copies would double the state's memory, so
those fits gate. ``NoSpeculation`` is the same interface doing nothing: the loop calls it
unconditionally.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import NamedTuple

# Up to this much state (params, other variables, optimizer), a fit with a non-finite gate
# speculates; above it, each step gates its update.
SPECULATE_MAX_BYTES = 1 << 20
# The loop copies the state every this many steps, or sooner when the batches the journal
# holds since the last copy reach ``MARK_MAX_BATCH_BYTES``.
MARK_EVERY_N_STEPS = 256
MARK_MAX_BATCH_BYTES = 64 << 20


def should_speculate(features, state_bytes: int, sharded: bool, val_every_n_steps) -> bool:
    """Whether a fit with these step ``features`` runs its steps ungated and speculates: only
    with a non-finite gate, a small state, one device, and validations at epoch ends only
    (``val_every_n_steps`` validations are not barriers, so nothing would be verified)."""
    return (
        features.gates
        and features.spike is None  # the re-run knows non-finite steps only: SpikeGuard gates
        and state_bytes <= SPECULATE_MAX_BYTES
        and not sharded
        and val_every_n_steps is None
    )


def mark_every(batch_bytes: int, grad_accum_steps: int) -> int:
    """Steps between periodic marks for steps of ``grad_accum_steps`` batches of
    ``batch_bytes``."""
    step_bytes = max(1, batch_bytes * grad_accum_steps)
    return max(1, min(MARK_EVERY_N_STEPS, MARK_MAX_BATCH_BYTES // step_bytes))


class Taken(NamedTuple):
    """A journal entry other than a call: arrays taken out of the carry at dispatch."""

    kind: str  # "snap" (a log snapshot) or "mark" (a copy of the carry)
    arrays: list


class NoSpeculation:
    """Speculation off (no gate, a large state, a mesh): nothing to record or check."""

    def record(self, call) -> None:
        pass

    def record_snapshot(self, snap: list) -> None:
        pass

    def take_mark(self) -> list | None:
        return None

    def verify(self, event) -> None:
        pass

    def after_barrier(self) -> None:
        pass


class Speculation:
    """The mark and the journal of a speculating fit (see the module docstring).

    ``carry``: the fit's ``carry.FitCarry``; ``sent()``: the steps dispatched so far;
    ``every``: steps between periodic marks (``mark_every``)."""

    def __init__(self, carry, sent: Callable[[], int], every: int):
        self.carry, self.sent, self.every = carry, sent, every
        self.journal: collections.deque | None = collections.deque()  # None once halted
        self.good = carry.count()  # the non-finite count verified last
        self.mark_here()

    def mark_here(self) -> None:
        """The state as it is now, known good, becomes the mark; the journal starts over."""
        self.mark, self.mark_step = self.carry.copy(), self.sent()
        self.journal.clear()

    # -- at dispatch ---------------------------------------------------------------------
    def record(self, call) -> None:
        """``call`` (a ``plan.Call``) went out."""
        if self.journal is not None:
            self.journal.append(call)

    def record_snapshot(self, snap: list) -> None:
        if self.journal is not None:
            self.journal.append(Taken("snap", snap))

    def take_mark(self) -> list | None:
        """Every ``every`` steps: a copy of the carry to re-run from, for the call's event."""
        if self.journal is None or self.sent() - self.mark_step < self.every:
            return None
        carry = self.carry
        mark, self.mark_step = carry.copy(), self.sent()
        mark[carry.layout.count_index].copy_to_host_async()
        self.journal.append(Taken("mark", mark))
        return mark

    # -- before the hooks ----------------------------------------------------------------
    def verify(self, event) -> None:
        """Before an event's hooks: the state up to it is good, or the journal is re-run so
        that it is. The count comes from the event's log snapshot, its mark, or, at a barrier
        (nothing went out after it), the live state."""
        if self.journal is None:  # halted: gated from here on, nothing to verify
            return
        snap, mark = event.snap, event.mark
        if snap is None and mark is None and not event.barrier:
            return
        carry = self.carry

        def count() -> int:  # the lists are re-taken in place by a re-run, the live one not
            return carry.snapshot_count(snap) if snap is not None else carry.count(mark)

        n = count()
        if n != self.good:
            self.rollback()
            if self.journal is None:
                return
            n = count()
        self.good = n
        anchor = mark if mark is not None else snap  # the mark comes last
        if anchor is not None:
            self._forget_through(anchor)

    def after_barrier(self) -> None:
        """A barrier's hooks ran in step with the device and may have changed the state."""
        if self.journal is not None:
            self.mark_here()

    def _forget_through(self, anchor: list) -> None:
        """Everything up to ``anchor`` (a snapshot or mark in the journal) is good: the
        newest mark up to there becomes the one to re-run from."""
        last = None
        for i, entry in enumerate(self.journal):
            if type(entry) is Taken:
                if entry.kind == "mark":
                    last = i
                if entry.arrays is anchor:
                    break
        if last is not None:
            self.mark = self.journal[last].arrays
            for _ in range(last + 1):
                self.journal.popleft()

    def rollback(self) -> None:
        """Re-runs the journal from the mark, each call checked (see the module docstring)."""
        carry = self.carry
        single, multi = carry.program("single"), carry.program("multi")
        gated_single, gated_multi, skipped = carry.programs.gated()
        halt = carry.programs.config.features.halts
        journal, self.journal = self.journal, None  # the re-run's snapshots are not new
        # From a copy: the mark stays the start of the journal, which a later re-run needs.
        carry.leaves = carry.copy(self.mark)
        good = carry.count(self.mark)
        halted = False

        def run(kind: str, batch: list) -> None:
            nonlocal good, halted
            if halted:
                program = gated_single if kind == "single" else gated_multi
                carry.leaves = program(carry.leaves, batch)
                return
            before = carry.copy()
            carry.leaves = (single if kind == "single" else multi)(carry.leaves, batch)
            if carry.count() == good:
                return
            if kind == "multi":  # the steps one by one: as the scan's
                carry.leaves = before
                for j in range(batch[0].shape[0]):
                    run("single", [x[j] for x in batch])
                return
            carry.leaves = skipped(before, carry.leaves)
            good = carry.count()
            if halt:
                carry.gate_from_now()
                halted = True

        for entry in journal:
            if type(entry) is not Taken:
                run(entry.kind, entry.batch)
            elif entry.kind == "snap":
                entry.arrays[:] = carry.snapshot()
            else:
                entry.arrays[:] = carry.copy()
        if not halt:
            self.journal = journal
