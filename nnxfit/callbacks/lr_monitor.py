"""``LearningRateMonitor``: logs ``lr``, the learning rate the latest step used (with several
optimizers, ``lr_<name>`` for each).

The step computes it, with no host sync, from the first source that has it
(``nnxfit.hyperparams.learning_rate_of``):

* the optimizer state, when the optimizer was built with ``optax.inject_hyperparams``
  (which stores the rate each update uses);
* the schedule ``configure_optimizers`` returned next to the optimizer,
  ``{"optimizer": tx, "lr_schedule": schedule}``, on the step count;
* the optimizer's structure: optax's own optimizers (``optax.adam(1e-2)``,
  ``optax.adamw(schedule)``, ``optax.sgd(...)``, also inside ``optax.chain``,
  ``apply_if_finite`` and ``MultiSteps``) scale by a constant or a schedule on their own
  count, which the step reads.

It reaches the logs with the other metrics: at log steps and epoch ends. Where none of these
shows the rate (a hand-written ``GradientTransformation``), the monitor warns once at fit
start, logs no ``lr``, and the fit goes on: a monitor never ends a fit.
"""

from __future__ import annotations

from nnxfit.callbacks.base import Callback
from nnxfit.hyperparams import (
    INJECT_FIX,
    describe_tx,
    fit_optimizer,
    learning_rate_source,
    optimizer_names,
)
from nnxfit.warn import warn


class LearningRateWarning(UserWarning):
    """``LearningRateMonitor`` cannot read the learning rate of the fit's optimizer."""


class LearningRateMonitor(Callback):
    """Logs ``lr`` (the rate of the latest step at log steps; of the epoch's last step at
    epoch end). When the rate cannot be read, warns once at fit start and logs nothing."""

    step_features = frozenset({"lr"})

    def on_fit_start(self, trainer, module) -> None:
        for name in optimizer_names(trainer) or [None]:
            self._check(trainer, module, name)

    def _check(self, trainer, module, name: str | None) -> None:
        tx, opt, lr_schedule, _, _ = fit_optimizer(trainer, name)
        if learning_rate_source(tx, opt, lr_schedule) is not None:
            return
        which, key = ("", "'lr'") if name is None else (f" {name!r}", f"'lr_{name}'")
        warn(
            f"LearningRateMonitor cannot read the learning rate of {type(module).__name__}'s "
            f"optimizer{which} {describe_tx(tx)}: the rate is hidden inside it. The fit goes on "
            f"without {key} in the logs. To log it, build the optimizer with "
            "optax.inject_hyperparams in configure_optimizers, "
            f"e.g. {INJECT_FIX.replace('1e-3', 'schedule')}, or return "
            "{'optimizer': tx, 'lr_schedule': schedule}.",
            LearningRateWarning,
        )
