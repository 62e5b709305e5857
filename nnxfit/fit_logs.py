"""The logs of a fit out of the device's metric sums: a snapshot taken when a call goes out,
read (waiting for the device) when its hooks run. Functions of the ``Trainer``, bound to it as
``_snapshot``, ``_interval_logs`` and ``_epoch_logs``."""

from __future__ import annotations


def snapshot(trainer) -> list:
    """The metric sums since the last snapshot, out of the carry (``FitCarry.snapshot``)."""
    snap = trainer._carry.snapshot()
    trainer._speculation.record_snapshot(snap)
    return snap


def interval_logs(trainer, snap: list) -> dict[str, float]:
    """Means over the steps since the last log; their sums join the epoch's."""
    carry, schedule, step = trainer._carry, trainer._schedule, trainer._seen.step
    acc, last = carry.read(snap)
    before = carry.epoch_acc.copy()
    carry.epoch_acc += acc
    logs = carry.means(acc, last)
    trainer.logged_metrics = dict(logs)
    final, cut = schedule.steps_done(step), trainer._plan.cut_rest > 0
    trainer._trail.logged(step, before, acc, logs, every=schedule.log_every, final=final, cut=cut)
    return logs


def epoch_logs(trainer, snap: list | None) -> dict[str, float]:
    """Means over the epoch; its sums are cleared after the epoch-end hooks."""
    carry = trainer._carry
    acc, last = carry.read(snap)
    trainer._trail.end = (carry.epoch_acc.copy(), acc)
    carry.epoch_acc += acc
    return carry.means(carry.epoch_acc, last)
