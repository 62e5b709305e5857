"""``SpikeGuard``: skip (or stop at) a step whose loss or gradient norm spikes.

As MaxText's ``skip_step_on_spikes`` and Levanter's ``SkipStepConfig`` (after OLMo-core), but
decided inside the jitted step with no host sync (``spikes.py``): the step keeps a ring
buffer of the last ``window`` accepted values in the device carry, and a step whose value is
above their mean + ``threshold`` x std is gated exactly as ``NaNGuard("skip")`` gates a
non-finite step: parameters, optimizer state, other module state, the EMA and the buffer
itself untouched. With NaNGuard it is one gate, not two. Nothing is skipped before ``window``
values were seen. The buffer and the counts are in checkpoints, so a resumed fit skips what
the uninterrupted one skips.

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
from nnxfit.spikes import MONITORS, SpikeSpec
from nnxfit.step import StepFeatures
from nnxfit.warn import warn

ACTIONS = ("skip", "stop")


class SpikeWarning(RuntimeWarning):
    """A loss or gradient-norm spike was skipped or stopped the fit (``SpikeGuard``)."""


class SpikeGuard(Callback):
    """Skips or stops at steps whose ``monitor`` is above mean + ``threshold`` x std of the
    last ``window`` accepted steps' values.

    Args:
        monitor: ``"loss"`` or ``"grad_norm"`` (the global norm before clipping).
        window: how many accepted values the mean and std are over; nothing is skipped
            before that many were seen.
        threshold: how many standard deviations above the mean is a spike.
        action: ``"skip"`` leaves the state untouched on such steps and counts them as
            ``spike_steps``; ``"stop"`` ends the fit at the first (its state from before it).

    After a fit, ``spike_step`` is the first spiking step (``None`` if none).
    """

    order = -95  # after NaNGuard, before checkpoints: a stopped fit saves the good state
    records_only = True  # a stop comes after the step froze the state, as NaNGuard's

    def __init__(
        self,
        monitor: str = "loss",
        window: int = 128,
        threshold: float = 6.0,
        action: str = "skip",
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
        spec = SpikeSpec(monitor, window, self.threshold, halt=action == "stop")
        self.step_features = StepFeatures(spike=spec)
        self.spike_step: int | None = None

    def logged_metrics(self, trainer) -> list[str]:
        return ["spike_steps"]

    def on_fit_start(self, trainer, module) -> None:
        self.spike_step = None

    def on_train_batch_end(self, trainer, module, step, logs) -> None:
        if logs:  # a log step: the trainer just fetched the device's counters
            self._check(trainer)

    def on_train_epoch_end(self, trainer, module, epoch, logs) -> None:
        self._check(trainer)

    def _check(self, trainer) -> None:
        n = trainer.first_spike_step
        if n is None or self.spike_step is not None:
            return
        self.spike_step = n
        what = (
            f"SpikeGuard: {self.monitor} at step {n} was above mean + {self.threshold:g} x std "
            f"of the last {self.window} steps'"
        )
        if self.action == "skip":
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
            f"threshold={self.threshold:g}, action={self.action!r})"
        )
