"""``EMA``: an exponential moving average of the trainable parameters, kept by the train step.

``ema = decay * ema + (1 - decay) * params`` after every optimizer step, inside the jitted step
(``averaging.py``): with ``steps_per_execution=K`` every one of the K steps is averaged, and a
step NaNGuard or SpikeGuard skips leaves the average untouched as it leaves the parameters.
The average starts from the parameters before the first step, lives in the device carry next
to the optimizer state (on a mesh sharded like its parameter), is saved in checkpoints and
continues exactly after a resume. No host work per step.

Validation (and every ``val_*`` monitor: ``ModelCheckpoint``, ``EarlyStopping``,
``ReduceLROnPlateau``) runs on the average with ``validate_with_ema``; training and
checkpoints keep the raw parameters (a resume needs them). After fit the module holds the
average with ``apply_at_end``, as Keras's ``use_ema`` leaves the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nnxfit.callbacks.base import Callback
from nnxfit.errors import ConfigError
from nnxfit.step import StepFeatures


class EMA(Callback):
    """Keeps an exponential moving average of the trainable parameters during fit.

    Args:
        decay: weight of the old average per step, in [0, 1) (0.999: about the last 1000
            steps).
        validate_with_ema: validation, and monitors of ``val_*`` metrics, use the average.
        apply_at_end: after fit the module holds the average (else the raw parameters).

    ``average(trainer)`` is the average as an ``nnx.State`` of the parameters, during or
    after a fit.
    """

    # After every on_fit_end that saves (ModelCheckpoint's last checkpoint holds the raw
    # parameters a resume continues from), and after the loggers.
    order = 10**6
    # Not records_only: on_fit_end writes the average into the module. Its only hook, so
    # the loop never waits for the device for it (barriers come from the loop hooks).
    records_only = False

    def __init__(
        self, decay: float = 0.999, validate_with_ema: bool = True, apply_at_end: bool = True
    ):
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay < 1:
            raise ConfigError(
                f"EMA decay must be a number in [0, 1) (0.999 averages about the last 1000 "
                f"steps); got {decay!r}."
            )
        self.decay = float(decay)
        self.validate_with_ema = bool(validate_with_ema)
        self.apply_at_end = bool(apply_at_end)
        self.step_features = StepFeatures(ema_decay=self.decay, ema_validate=self.validate_with_ema)

    def average(self, trainer):
        """The average of the current (or last) fit as an ``nnx.State`` of the parameters."""
        carry = trainer.carry
        leaves = None if carry is None else carry.ema_leaves()
        if leaves is None:
            raise ConfigError(
                "EMA.average(trainer): this trainer's fit kept no average; pass the EMA "
                "callback to Trainer(callbacks=[...]) and fit first."
            )
        return jax.tree.unflatten(carry.programs.params_def, leaves)

    def on_fit_end(self, trainer, module) -> None:
        carry = trainer.carry
        if not self.apply_at_end or carry is None:
            return
        leaves = carry.ema_leaves()
        if leaves is None or any(x.is_deleted() for x in leaves):  # a failed call donated them
            return
        # Copies: the module must not share buffers with the carry a later fit donates.
        for var, x in zip(carry.live_vars, leaves, strict=False):
            var.set_raw_value(jnp.copy(x))

    def __repr__(self) -> str:
        return (
            f"EMA(decay={self.decay}, validate_with_ema={self.validate_with_ema}, "
            f"apply_at_end={self.apply_at_end})"
        )
