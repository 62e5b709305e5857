"""``SpikeGuard``: skip (or stop at) a step whose loss or gradient norm spikes.

As MaxText's ``skip_step_on_spikes`` and Levanter's ``SkipStepConfig`` (after OLMo-core), but
decided inside the jitted step with no host sync (``spikes.py``): the step keeps a ring
buffer of the last ``window`` accepted values in the device carry, and a step whose value is
above their mean + ``threshold`` x std is gated exactly as ``NaNGuard("skip")`` gates a
non-finite step: parameters, optimizer state, other module state, the EMA and the buffer
itself untouched. With NaNGuard it is one gate, not two. Nothing is skipped before ``window``
values were seen. The buffer and the counts are in checkpoints, so a resumed fit skips what
the uninterrupted one skips.

``action="rollback"`` skips as ``"skip"`` does; after ``max_consecutive`` spikes in a row
(the loss has moved to a level the window does not know) the fit goes back to the newest good
checkpoint, in process, and goes on with the next batch, at most ``max_rollbacks`` times a fit
(``nnxfit/rollback.py``).

The host learns of spikes at log steps (``spike_steps`` in the logs, a running count) and
warns once, naming the first. ``action="stop"`` freezes the state at the first spike (as
``NaNGuard("stop")`` does at a non-finite step, so the steps already dispatched change
nothing) and ends the fit at the next log step, naming the step.

A fit with a SpikeGuard gates every update inside the step (no speculation,
``speculation.py``): the cost is measured in ``benchmarks/step_features.py``.
"""

from __future__ import annotations

from nnxfit.callbacks.base import Callback
from nnxfit.errors import ConfigError
from nnxfit.rollback import RollsBack
from nnxfit.spikes import MONITORS, SpikeSpec
from nnxfit.step import StepFeatures
from nnxfit.warn import warn

ACTIONS = ("skip", "stop", "rollback")


class SpikeWarning(RuntimeWarning):
    """A loss or gradient-norm spike was skipped or stopped the fit (``SpikeGuard``)."""


class SpikeGuard(RollsBack, Callback):
    """Skips or stops at steps whose ``monitor`` is above mean + ``threshold`` x std of the
    last ``window`` accepted steps' values.

    Args:
        monitor: ``"loss"`` or ``"grad_norm"`` (the global norm before clipping).
        window: how many accepted values the mean and std are over; nothing is skipped
            before that many were seen.
        threshold: how many standard deviations above the mean is a spike.
        action: ``"skip"`` leaves the state untouched on such steps and counts them as
            ``spike_steps``; ``"stop"`` ends the fit at the first (its state from before it);
            ``"rollback"`` skips, and after ``max_consecutive`` spikes in a row restores the
            newest good checkpoint and goes on with the next batch.
        max_consecutive: with ``"rollback"``, spikes in a row that roll back (default 3).
        max_rollbacks: with ``"rollback"``, rollbacks in a fit call; the next run of spikes
            raises ``nnxfit.RollbackError`` (default 3).

    After a fit, ``spike_step`` is the first spiking step (``None`` if none); with
    ``"rollback"``, ``rollbacks`` and ``rollback_log`` as ``NaNGuard``'s.
    """

    kind = "spike"

    order = -95  # after NaNGuard, before checkpoints: a stopped fit saves the good state
    records_only = True  # a stop comes after the step froze the state, as NaNGuard's

    def __init__(
        self,
        monitor: str = "loss",
        window: int = 128,
        threshold: float = 6.0,
        action: str = "skip",
        *,
        max_consecutive: int | None = None,
        max_rollbacks: int | None = None,
    ):
        if monitor not in MONITORS:
            raise ConfigError(f"SpikeGuard monitor must be one of {MONITORS}; got {monitor!r}.")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ConfigError(
                f"SpikeGuard window must be an int >= 2 (values the mean and std are over); "
                f"got {window!r}."
            )
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold < 0:
            raise ConfigError(
                f"SpikeGuard threshold must be a number >= 0 (standard deviations above the "
                f"mean); got {threshold!r}."
            )
        if action not in ACTIONS:
            raise ConfigError(f"SpikeGuard action must be one of {ACTIONS}; got {action!r}.")
        self.monitor, self.window, self.threshold = monitor, window, float(threshold)
        self.action = action
        self._rollback_options("SpikeGuard", max_consecutive, max_rollbacks)
        spec = SpikeSpec(
            monitor, window, self.threshold, halt=action == "stop",
            rollback_after=self.max_consecutive,
        )  # fmt: skip
        self.step_features = StepFeatures(spike=spec)
        self.spike_step: int | None = None

    def logged_metrics(self, trainer) -> list[str]:
        return ["spike_steps"] + ["rollbacks"] * (self.action == "rollback")

    def on_fit_start(self, trainer, module) -> None:
        self.spike_step = None
        self._rollback_fit_start(trainer, "SpikeGuard")

    def _check(self, trainer) -> None:
        n = trainer.first_spike_step
        if n is None or self.spike_step is not None:
            return
        self.spike_step = n
        what = (
            f"SpikeGuard: {self.monitor} at step {n} was above mean + {self.threshold:g} x std "
            f"of the last {self.window} steps'"
        )
        if self.action in ("skip", "rollback"):
            warn(
                f"{what}; that update was skipped (parameters, optimizer and module state kept) "
                f"and training goes on. Later skips are counted in the logs as spike_steps "
                f"({trainer.spike_steps} by step {trainer.global_step}).",
                SpikeWarning,
            )
            return
        trainer.should_stop = True
        warn(
            f"{what}; training stopped with the parameters after step {n - 1}. Look at the "
            f"batch of step {n} and the learning rate.",
            SpikeWarning,
        )

    def __repr__(self) -> str:
        return (
            f"SpikeGuard(monitor={self.monitor!r}, window={self.window}, "
            f"threshold={self.threshold:g}, action={self.action!r}"
            + (
                f", max_consecutive={self.max_consecutive}, max_rollbacks={self.max_rollbacks})"
                if self.action == "rollback"
                else ")"
            )
        )
