"""``FitView``: what callbacks read of a fit, a read-only surface the ``Trainer`` inherits.

Callbacks, checkpoints and benchmarks read a fit through these, never through the Trainer's
private attributes: the counters (``global_step``, ``dispatch_step``: ``trainer.py``), the
device's progress, the programs and the device carry, the batch spec, the metric names, whether
an epoch is ending, the non-finite and spike step counts, and the optimizer's hyperparameters.
"""

from __future__ import annotations

from typing import Any

from nnxfit import hyperparams, loop
from nnxfit.carry import FitCarry
from nnxfit.data import BatchSpec
from nnxfit.device_clock import DeviceProgress
from nnxfit.loop import Schedule
from nnxfit.modes import eval_mode
from nnxfit.step import Programs


class FitView:
    """The read-only surface of a ``Trainer``'s current (or last) fit."""

    @property
    def device_progress(self) -> DeviceProgress:
        """How far the device had got by the event the hooks are seeing: the steps it was known
        to have finished (never more than ``global_step``), when that became known, and the
        time that was not training (``nnxfit.device_clock``). Rates and ETAs come from here,
        not from when hooks run: hooks trail the device by up to ``lookahead`` events."""
        return self._device_clock.progress(self._seen.step)

    @property
    def programs(self) -> Programs | None:
        """The jitted programs of the current (or last) fit (``step.Programs``): the train and
        eval steps, their metric order and trace counts; None before the first fit."""
        return None if self._carry is None else self._carry.programs

    @property
    def carry(self) -> FitCarry | None:
        """The device state of the current (or last) fit (``carry.FitCarry``): its flat
        ``leaves`` (what the programs take), their ``layout``, the host side of the metrics.
        Read it; the loop replaces its leaves with every call. None before the first fit."""
        return self._carry

    @property
    def batch_spec(self) -> BatchSpec | None:
        """The structure, shapes and batch size of the fit's training batches
        (``data.BatchSpec``, from the first batch); None before the first fit."""
        return self._spec

    @property
    def n_train_batches(self) -> int | None:
        """Training batches in an epoch (after ``limit_train_batches``); None when the data
        does not say (an iterable without ``len``)."""
        return self._n_train_batches

    @property
    def metric_names(self) -> list[str]:
        """Names the train step logs: ``loss``, ``training_step``'s metrics, the step features'
        (``grad_norm``, ``lr``, ``nonfinite_steps``, ``spike_steps``); empty before the first
        fit."""
        if self._carry is None:
            return []
        names, features = list(self.programs.metric_order), self.programs.config.features
        names += list(self._carry.last)  # lr (lr_<name> with several optimizers)
        names += ["nonfinite_steps"] * features.finite
        return names + ["spike_steps"] * (features.spike is not None)

    @property
    def epochs_total(self) -> int | None:
        """How many epochs the fit will run (``max_steps`` may end it before ``max_epochs``);
        None when neither says (``max_steps`` with data of unknown length)."""
        return loop.epochs_total(self.max_epochs, self.max_steps, self.steps_per_epoch)

    def epoch_ending(self) -> bool:
        """Whether the epoch ends after the call the hooks are seeing: the fit stops there
        (``should_stop``, ``max_steps``) or it was the epoch's last batch."""
        schedule = self._schedule or Schedule(self.config)
        return schedule.epoch_ending(self._seen, self.should_stop)

    @property
    def nonfinite_steps(self) -> int:
        """Steps whose loss or gradient was not finite, as of the latest log (with NaNGuard)."""
        return 0 if self._carry is None else self._carry.nonfinite_steps

    @property
    def first_nonfinite_step(self) -> int | None:
        """The first step whose loss or gradient was not finite, as of the latest log."""
        return None if self._carry is None else self._carry.first_nonfinite_step

    @property
    def spike_steps(self) -> int:
        """Steps ``SpikeGuard`` skipped (or the one it stopped at) as spikes, as of the latest
        log; 0 without it."""
        return 0 if self._carry is None else self._carry.spike_steps

    @property
    def first_spike_step(self) -> int | None:
        """The first step ``SpikeGuard`` found a spike at, as of the latest log."""
        return None if self._carry is None else self._carry.first_spike_step

    @property
    def rollback(self):
        """The current (or last) fit's rollbacks (``rollback.Rollback``), with a ``NaNGuard``
        or ``SpikeGuard`` whose action is ``"rollback"``; else None."""
        return getattr(self, "_rollback", None)

    @property
    def rolling_back(self) -> bool:
        """Whether a guard with ``action="rollback"`` asked, at the event the hooks are
        seeing, to go back to a checkpoint once its hooks ran (``nnxfit/rollback.py``): the
        state now is about to be abandoned, and ``ModelCheckpoint`` does not save it."""
        rollback = self.rollback
        return rollback is not None and rollback.request is not None

    def get_hyperparameter(self, name: str, optimizer: str | None = None) -> Any:
        """The value of the optimizer's hyperparameter ``name`` in the fit's current state
        (a float; an array for a non-scalar one), read from a callback's hook or after fit.

        Any hyperparameter ``optax.inject_hyperparams`` keeps in the optimizer state; the
        learning rate (``"learning_rate"`` or ``"lr"``) also from a ``lr_schedule`` or from
        optax's own optimizers (``nnxfit.hyperparams``). With several optimizers,
        ``optimizer`` names one. A ``ConfigError`` names the fix when it cannot be read. One
        device sync."""
        return hyperparams.get_hyperparameter(self, name, optimizer)

    def set_hyperparameter(self, name: str, value: Any, optimizer: str | None = None) -> None:
        """Sets the optimizer's hyperparameter ``name`` to ``value`` from the next step on,
        without recompiling: the value is written into the ``optax.inject_hyperparams`` state
        with the old array's dtype, shape and placement, and is checkpointed with it.

        Call it from a callback's hook (one in step with the device: any callback that is
        not ``records_only``). A ``ConfigError`` names the fix when the optimizer does not
        keep ``name`` in its state, or a schedule sets it every step. With several
        optimizers, ``optimizer`` names the one to change."""
        hyperparams.set_hyperparameter(self, name, value, optimizer)

    def eval_mode(self, module):
        """``with trainer.eval_mode(module): ...`` runs the block in eval mode and undoes
        whatever it did to the module (``modes.eval_mode``): for callbacks that call it."""
        return eval_mode(module)
