"""``LearningRateMonitor``: logs ``lr``, the learning rate the latest step used.

An optax schedule is a function of the step count hidden inside the optimizer, not
readable from outside. The step reads the rate where one exists, with no host sync:

* from the optimizer state, when the optimizer was built with ``optax.inject_hyperparams``
  (which stores the rate each update uses);
* else by evaluating the schedule ``configure_optimizers`` returned next to the optimizer,
  ``{"optimizer": tx, "lr_schedule": schedule}``, on the step count.

It reaches the logs with the other metrics: at log steps and epoch ends.
"""

from __future__ import annotations

from nnxfit.callbacks.base import Callback
from nnxfit.errors import ConfigError
from nnxfit.step import find_learning_rate


def learning_rate_source(trainer) -> str | None:
    """Where the fit's step finds its learning rate: ``"optimizer state"``, ``"lr_schedule"``
    or ``None``."""
    if find_learning_rate(trainer.train_state()["opt"]) is not None:
        return "optimizer state"
    if trainer._programs.config.lr_fn is not None:
        return "lr_schedule"
    return None


class LearningRateMonitor(Callback):
    """Logs ``lr`` (the rate of the latest step at log steps; of the epoch's last step at
    epoch end). Fails at fit start, before training, when the rate cannot be read."""

    reads_module = False
    step_features = frozenset({"lr"})

    def on_fit_start(self, trainer, module) -> None:
        if learning_rate_source(trainer) is None:
            raise ConfigError(
                f"LearningRateMonitor cannot read the learning rate of "
                f"{type(module).__name__}'s optimizer: an optax schedule is hidden inside it. "
                "In configure_optimizers, either build it with optax.inject_hyperparams, e.g. "
                "optax.inject_hyperparams(optax.adam)(learning_rate=schedule), or return "
                "{'optimizer': tx, 'lr_schedule': schedule}."
            )
