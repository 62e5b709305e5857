"""``ReduceLROnPlateau``: multiply the learning rate by ``factor`` when a metric stalls.

Keras's semantics (``keras/src/callbacks/reduce_lr_on_plateau.py``), on optax: the
optimizer must keep its learning rate in its state, which ``optax.inject_hyperparams``
does::

    def configure_optimizers(self):
        return optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)

At an epoch end that calls for a reduction, the callback sets the new rate with
``trainer.set_hyperparameter("learning_rate", lr)``, which writes it into that state as an
array of the old one's type and placement. The jitted step reads the rate as an input of an
unchanged signature: nothing is rebuilt or recompiled, and the rate is checkpointed with the
optimizer state, so a resumed run continues at the reduced rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from nnxfit.callbacks.base import Callback
from nnxfit.callbacks.early_stopping import _count, _epochs, _number
from nnxfit.callbacks.monitor import Monitor, announce
from nnxfit.errors import ConfigError
from nnxfit.hyperparams import fit_optimizer, optimizer_names, settable_error


class ReduceLROnPlateau(Callback):
    """Multiplies the learning rate by ``factor`` after ``patience`` epochs without an
    improvement of ``monitor`` by more than ``min_delta``.

    The optimizer must come from ``optax.inject_hyperparams`` with a constant
    ``learning_rate``; anything else fails at fit start, naming the fix. The new rate is set
    with ``trainer.set_hyperparameter("learning_rate", lr)``, which never recompiles the step;
    a callback of your own can change any injected hyperparameter the same way.

    Args:
        monitor: metric to watch (key of the epoch logs).
        factor: multiplier, in (0, 1).
        patience: epochs without improvement before a reduction.
        mode: ``"min"``, ``"max"`` or ``"auto"``.
        min_delta: an improvement must beat the best value by more than this (absolute).
        cooldown: epochs to wait after a reduction before counting again.
        min_lr: the rate never goes below this.
        verbose: print a line on each reduction.
        optimizer: with several optimizers, the name of the one to reduce; ``None`` reduces
            each of them (each from its own rate).

    ``lr`` (the rate of the epoch's last step) is logged at log steps and epoch ends.
    """

    step_features = frozenset({"lr"})  # logs the rate the step used, from the opt state

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        mode: str = "min",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
        verbose: bool = True,
        optimizer: str | None = None,
    ):
        me = "ReduceLROnPlateau"
        self.monitor, self.mode = monitor, mode  # as given (Keras's attributes)
        self._m = Monitor(monitor, mode, owner=me)
        self.factor = _number(me, "factor", factor)
        if not 0.0 < self.factor < 1.0:
            raise ConfigError(
                f"ReduceLROnPlateau factor must be in (0, 1): the rate is multiplied by it; got "
                f"{factor!r}."
            )
        self.patience = _count(me, "patience", patience)
        self.cooldown = _count(me, "cooldown", cooldown)
        self.min_delta = _number(me, "min_delta", min_delta)
        self.min_lr = _number(me, "min_lr", min_lr)
        if self.min_delta < 0 or self.min_lr < 0:
            raise ConfigError(
                f"ReduceLROnPlateau min_delta and min_lr must be >= 0; got min_delta="
                f"{min_delta!r}, min_lr={min_lr!r}."
            )
        self.verbose = bool(verbose)
        self.optimizer = optimizer
        self._reset()

    @property
    def direction(self) -> str:
        """``"min"`` or ``"max"``: ``mode`` with ``"auto"`` resolved."""
        return self._m.direction

    def _reset(self) -> None:
        self.best = self._m.worst
        self.wait = 0
        self.cooldown_counter = 0
        # (epoch, new lr), or (epoch, new lr, optimizer) with several optimizers
        self.reductions: list[tuple] = []

    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def on_fit_start(self, trainer, module) -> None:
        if getattr(trainer, "resumed_from", None) is None:
            self._reset()
        names = optimizer_names(trainer)
        if self.optimizer is not None and self.optimizer not in names:
            have = f"the optimizers {names}" if names else "one optimizer"
            raise ConfigError(
                f"ReduceLROnPlateau(optimizer={self.optimizer!r}), but the fit has {have}; "
                f"pass {'one of those names' if names else 'optimizer=None'}."
            )
        self._targets = [self.optimizer] if self.optimizer is not None else names or [None]
        for name in self._targets:
            _, opt, _, _, owner = fit_optimizer(trainer, name)
            why = settable_error(opt, "learning_rate", owner)
            if why is not None:
                raise ConfigError(f"ReduceLROnPlateau sets the learning rate during the fit: {why}")
        self._m.check_fit(trainer)

    def on_train_epoch_end(self, trainer, module, epoch, logs) -> None:
        current = self._m.lookup(logs)
        if current is None:
            return
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self._m.is_better(current, self.best, self.min_delta):
            self.best = current
            self.wait = 0
            return
        if self.in_cooldown():
            return
        self.wait += 1
        if self.wait >= self.patience and self._reduce(trainer, epoch):
            self.cooldown_counter = self.cooldown
            self.wait = 0

    def _reduce(self, trainer, epoch: int) -> bool:
        """Lowers the rate of each target optimizer unless it is at ``min_lr`` already;
        False when none was lowered."""
        done = False
        for name in self._targets:
            done = self._reduce_one(trainer, epoch, name) or done
        return done

    def _reduce_one(self, trainer, epoch: int, name: str | None) -> bool:
        old = trainer.get_hyperparameter("learning_rate", optimizer=name)
        if np.float32(old) <= np.float32(self.min_lr):
            return False
        lr = max(old * self.factor, self.min_lr)
        trainer.set_hyperparameter("learning_rate", lr, optimizer=name)
        self.reductions.append((epoch, lr) if name is None else (epoch, lr, name))
        if self.verbose:
            which = "learning rate" if name is None else f"learning rate of {name!r}"
            announce(
                trainer,
                f"ReduceLROnPlateau: {self.monitor} has not improved for {_epochs(self.wait)} "
                f"(best {self.best:.6g}); {which} {old:.4g} -> {lr:.4g} from "
                f"epoch {epoch + 2}.",
            )
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "wait": self.wait,
            "cooldown_counter": self.cooldown_counter,
            "reductions": [list(r) for r in self.reductions],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = float(state.get("best", self._m.worst))
        self.wait = int(state.get("wait", 0))
        self.cooldown_counter = int(state.get("cooldown_counter", 0))
        self.reductions = [
            (int(r[0]), float(r[1]), *map(str, r[2:])) for r in state.get("reductions", [])
        ]

    def __repr__(self) -> str:
        return (
            f"ReduceLROnPlateau(monitor={self.monitor!r}, factor={self.factor}, "
            f"patience={self.patience}, cooldown={self.cooldown}, min_lr={self.min_lr})"
        )
