"""``EarlyStopping``: end the fit when a monitored metric stops improving.

Keras 3's semantics (``keras/src/callbacks/early_stopping.py``), checked at each epoch end:
``wait`` counts the epochs since the last improvement by more than ``min_delta``; the fit
stops when ``wait >= patience`` on an epoch that did not improve (never on the first epoch).
With a ``baseline``, an improvement resets ``wait`` only if it also beats the baseline, so
a run that never beats it stops after ``patience`` epochs. Lightning's thresholds stop at
once: ``stopping_threshold`` (good enough), ``divergence_threshold`` (hopeless), and a
non-finite value (``check_finite``).

``restore_best_weights`` puts the module state of the best epoch back at the end of every
fit that finishes, stopped early or not (Keras 3). The snapshot is a host copy: the fit's
device arrays are donated to the next step and deleted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from nnxfit.callbacks.base import Callback
from nnxfit.callbacks.monitor import Monitor, announce
from nnxfit.errors import ConfigError
from nnxfit.module_leaves import live_leaves
from nnxfit.warn import warn


def _number(owner: str, name: str, value: Any, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{owner} {name} must be a number; got {value!r}.")
    return float(value)


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _count(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{owner} {name} must be an integer >= 0; got {value!r}.")
    return value


class EarlyStopping(Callback):
    """Stops training when ``monitor`` has not improved for ``patience`` epochs.

    Args:
        monitor: the metric to watch (a key of the epoch logs, e.g. ``"val_loss"``).
        mode: ``"min"``, ``"max"`` or ``"auto"`` (decided from the name).
        patience: epochs without improvement before stopping.
        min_delta: an improvement must beat the best value by more than this.
        baseline: a value the metric must beat; improvements that don't beat it do not
            reset the patience count.
        restore_best_weights: at the end of fit, put back the module state (parameters and
            other non-RNG variables, not the optimizer state) of the best epoch.
        start_from_epoch: epochs (from 0) to skip before watching: a warm-up.
        stopping_threshold: stop as soon as the metric is better than this.
        divergence_threshold: stop as soon as the metric is worse than this.
        check_finite: stop as soon as the metric is NaN or infinite.
        verbose: print a line when stopping and when restoring weights.

    After a fit: ``stopped_epoch`` (0-based, ``None`` if it did not stop the fit),
    ``stop_reason``, ``best``, ``best_epoch``. A val_ metric is not watched on epochs
    without validation (``val_every_n_epochs > 1``); those epochs do not count.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "min",
        patience: int = 0,
        min_delta: float = 0.0,
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_finite: bool = True,
        verbose: bool = True,
    ):
        me = "EarlyStopping"
        self.monitor, self.mode = monitor, mode  # as given (Keras's attributes)
        self._m = Monitor(monitor, mode, owner=me)
        self.patience = _count(me, "patience", patience)
        self.start_from_epoch = _count(me, "start_from_epoch", start_from_epoch)
        self.min_delta = _number(me, "min_delta", min_delta)
        if self.min_delta < 0:
            raise ConfigError(
                f"EarlyStopping min_delta must be >= 0 (the margin an improvement must beat, in "
                f"either mode); got {min_delta!r}."
            )
        self.baseline = _number(me, "baseline", baseline, allow_none=True)
        self.stopping_threshold = _number(
            me, "stopping_threshold", stopping_threshold, allow_none=True
        )
        self.divergence_threshold = _number(
            me, "divergence_threshold", divergence_threshold, allow_none=True
        )
        st, dt = self.stopping_threshold, self.divergence_threshold
        if st is not None and dt is not None and not self._m.is_better(st, dt):
            raise ConfigError(
                f"EarlyStopping stopping_threshold={st} must be better than divergence_threshold="
                f"{dt} for mode={self._m.direction!r}; swap them or fix the mode."
            )
        self.restore_best_weights = bool(restore_best_weights)
        self.check_finite = bool(check_finite)
        self.verbose = bool(verbose)
        self._reset()

    @property
    def direction(self) -> str:
        """``"min"`` or ``"max"``: ``mode`` with ``"auto"`` resolved."""
        return self._m.direction

    def _reset(self) -> None:
        self.wait = 0
        self.best = self._m.worst
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self.stop_reason: str | None = None
        self._best_state = None  # host copy of the best epoch's module state (not checkpointed)
        self._finished = True
        self._stopped_now = False  # stopped in this fit (not a state loaded from a checkpoint)

    # ------------------------------------------------------------------------ hooks ---
    def on_fit_start(self, trainer, module) -> None:
        if getattr(trainer, "resumed_from", None) is None:
            self._reset()  # a reused callback starts afresh (Keras #20256)
        else:
            self._best_state = None  # the counters came from the checkpoint; weights did not
        self._finished, self._stopped_now = True, False
        self._m.check_fit(trainer, self)

    def on_train_epoch_end(self, trainer, module, epoch, logs) -> None:
        current = self._m.lookup(logs)
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_epoch is None:
            self._snapshot(module, epoch)  # the first watched epoch is the best so far
        self.wait += 1
        improved = self._m.is_better(current, self.best, self.min_delta)
        if improved:
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self._snapshot(module, epoch)
            # Only an improvement that also beats the baseline restarts the count.
            if self.baseline is None or self._m.is_better(current, self.baseline, self.min_delta):
                self.wait = 0
        reason = self._reason(current, improved, epoch)
        if reason is not None:
            self.stopped_epoch, self.stop_reason = epoch, reason
            self._stopped_now = True
            trainer.should_stop = True

    def _reason(self, current: float, improved: bool, epoch: int) -> str | None:
        name, m = self.monitor, self._m
        if self.check_finite and not math.isfinite(current):
            return f"{name} = {current} is not finite"
        if self.stopping_threshold is not None and m.is_better(current, self.stopping_threshold):
            return f"{name} = {current:.6g} reached stopping_threshold={self.stopping_threshold:g}"
        if self.divergence_threshold is not None and m.is_worse(current, self.divergence_threshold):
            return (
                f"{name} = {current:.6g} is past divergence_threshold={self.divergence_threshold:g}"
            )
        if not improved and self.wait >= self.patience and epoch > 0:
            if self.baseline is not None and not m.is_better(
                self.best, self.baseline, self.min_delta
            ):
                return (
                    f"{name} did not beat baseline={self.baseline:g} in {_epochs(self.wait)} "
                    f"(best {self.best:.6g})"
                )
            best_at = "" if self.best_epoch is None else f" at epoch {self.best_epoch + 1}"
            return (
                f"{name} did not improve for {_epochs(self.wait)} (best {self.best:.6g}{best_at})"
            )
        return None

    def on_interrupt(self, trainer, module) -> None:
        self._finished = False  # the module keeps the state it was interrupted in

    def on_exception(self, trainer, module, error) -> None:
        self._finished = False

    def on_fit_end(self, trainer, module) -> None:
        # Said here, after the progress display's line for the last epoch.
        if self.verbose and self._stopped_now:
            announce(
                trainer,
                f"EarlyStopping: stopped after epoch {self.stopped_epoch + 1}: {self.stop_reason}.",
            )
        self._stopped_now = False
        # After the final write-back: what is assigned here is what the caller's module holds.
        if not (self.restore_best_weights and self._finished) or self.best_epoch is None:
            return
        if self._best_state is None:
            warn(
                f"EarlyStopping could not restore the weights of the best epoch "
                f"({self.best_epoch + 1}, {self.monitor}={self.best:.6g}): it ran before "
                "the resume and host snapshots are not checkpointed. The module keeps its "
                "final weights; ModelCheckpoint(monitor=...) keeps the best checkpoint."
            )
            return
        handles, host, shardings = self._best_state
        for handle, h, s in zip(handles, host, shardings, strict=True):
            handle.set_raw_value(h if s is None else jax.device_put(h, s))
        if self.verbose:
            announce(
                trainer,
                f"EarlyStopping: restored the weights from the end of epoch "
                f"{self.best_epoch + 1} ({self.monitor}={self.best:.6g}).",
            )

    def _snapshot(self, module, epoch: int) -> None:
        # A real copy: a NumPy view of a CPU buffer would pin it (donation then copies every
        # step) and dies with it. RNG state is left out: restoring it would replay randomness.
        # Handles rather than nnx.update: plain array attributes, tuples too (module_leaves.py).
        handles = live_leaves(module, nnx.state(module, nnx.Not(nnx.RngState)))
        leaves = [h.get_raw_value() for h in handles]
        host = [np.array(x, copy=True) for x in leaves]
        shardings = [getattr(x, "sharding", None) for x in leaves]
        self._best_state = (handles, host, shardings)
        self.best_epoch = epoch

    # ----------------------------------------------------------------------- state ---
    def state_dict(self) -> dict[str, Any]:
        return {
            "wait": self.wait,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.wait = int(state.get("wait", 0))
        self.best = float(state.get("best", self._m.worst))
        be, se = state.get("best_epoch"), state.get("stopped_epoch")
        self.best_epoch = None if be is None else int(be)
        self.stopped_epoch = None if se is None else int(se)
        self.stop_reason = state.get("stop_reason")

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(monitor={self.monitor!r}, mode={self.mode!r}, "
            f"patience={self.patience}, min_delta={self.min_delta}, baseline={self.baseline})"
        )
