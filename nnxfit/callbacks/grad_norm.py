"""``GradNormMonitor``: logs the gradient norm computed inside the step; warns when it leaves
a healthy range.

The norm is the global L2 norm of the gradients before clipping, computed in the jitted
step. Logs carry its mean over the steps since the previous log (and over the epoch at
epoch end), so checking costs no extra device sync. A warning fires when the mean leaves
``[min_norm, max_norm]`` and not again until it has come back (or crossed to the other
side): one warning per episode.
"""

from __future__ import annotations

import math
from typing import Any

from nnxfit.callbacks.base import Callback
from nnxfit.errors import ConfigError
from nnxfit.warn import warn


class GradNormWarning(RuntimeWarning):
    """The gradient norm left the range ``GradNormMonitor`` was given."""


def _bound(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(
            f"GradNormMonitor {name} must be a number >= 0 or None (no bound); got {value!r}."
        )
    return float(value)


class GradNormMonitor(Callback):
    """Logs ``grad_norm`` (and ``grad_norm/<submodule>`` with ``per_module``; with several
    optimizers also ``grad_norm_<name>``, each optimizer's own); warns once per episode when
    it leaves ``[min_norm, max_norm]``.

    Args:
        min_norm: below this, gradients are vanishing (``None``: no lower bound).
        max_norm: above this, gradients are exploding (``None``: no upper bound).
        per_module: also log the norm of each top-level submodule's gradients.
        warn: ``False`` only logs.

    ``warnings_issued`` lists ``(step, value)`` of the warnings of the current fit.
    """

    order = -90  # after NaNGuard, before the loggers
    records_only = True  # records and warns only

    def __init__(
        self,
        min_norm: float | None = 0.1,
        max_norm: float | None = 10.0,
        per_module: bool = False,
        warn: bool = True,
    ):
        self.min_norm = _bound("min_norm", min_norm)
        self.max_norm = _bound("max_norm", max_norm)
        if (
            self.min_norm is not None
            and self.max_norm is not None
            and self.min_norm > self.max_norm
        ):
            raise ConfigError(
                f"GradNormMonitor min_norm={min_norm} is above max_norm={max_norm}; the healthy "
                "range would be empty. Swap them."
            )
        self.per_module = bool(per_module)
        self.warn = bool(warn)
        features = {"grad_norm", "module_grad_norms"} if per_module else {"grad_norm"}
        self.step_features = frozenset(features)
        self._reset(0)

    def _reset(self, step: int) -> None:
        self._kind: str | None = None  # "high", "low", "nonfinite" while out of range
        self._last_step = step
        self.warnings_issued: list[tuple[int, float]] = []

    def logged_metrics(self, trainer) -> list[str]:
        if trainer.metric_names and "grad_norm" not in trainer.metric_names:
            return []  # manual optimization: nothing to log (on_fit_start warned)
        names = ["grad_norm", *(k for k in trainer.metric_names if k.startswith("grad_norm_"))]
        if self.per_module:
            names += [k for k in trainer.metric_names if k.startswith("grad_norm/")]
        return names

    def on_fit_start(self, trainer, module) -> None:
        self._reset(trainer.global_step)
        if "grad_norm" not in trainer.metric_names:
            warn(
                f"GradNormMonitor: {type(module).__name__} sets automatic_optimization = False, "
                "so its training_step applies gradients the Trainer never sees; no grad_norm "
                "is logged. Log the norm from training_step (optax.tree.norm(grads)) instead.",
                GradNormWarning,
            )

    def on_train_batch_end(self, trainer, module, step, logs) -> None:
        if "grad_norm" in logs:
            first = self._last_step + 1
            self._last_step = step
            self._check(step, logs, f"step {step}" if first >= step else f"steps {first}-{step}")

    def on_train_epoch_end(self, trainer, module, epoch, logs) -> None:
        # Catches an epoch shorter than the log interval; a repeat of a log step's finding
        # is silent (same episode).
        if "grad_norm" in logs and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self._check(trainer.global_step, logs, f"epoch {epoch + 1} (to step {self._last_step})")

    def _check(self, step: int, logs, span: str) -> None:
        value = float(logs["grad_norm"])
        kind, problem = self._problem(value)
        # One warning per episode: leaving the range, or jumping straight to the other side.
        new_episode = kind is not None and kind != self._kind
        self._kind = kind
        if not (new_episode and self.warn):
            return
        self.warnings_issued.append((step, value))
        warn(
            f"GradNormMonitor: grad_norm averaged {value:.4g} over {span} and {problem}"
            f"{self._modules(logs, value)}. Not repeated while it stays out of range.",
            GradNormWarning,
        )

    def _problem(self, v: float) -> tuple[str | None, str | None]:
        if not math.isfinite(v):
            return "nonfinite", (
                "is not finite: add NaNGuard to stop or skip such steps, and look for a "
                "bad batch or a too-high learning rate"
            )
        if self.max_norm is not None and v > self.max_norm:
            return "high", (
                f"is above max_norm={self.max_norm:g} (exploding gradients): lower the "
                "learning rate or set Trainer(grad_clip_norm=...)"
            )
        if self.min_norm is not None and v < self.min_norm:
            return "low", (
                f"is below min_norm={self.min_norm:g} (vanishing gradients): check the "
                "learning rate, initialisation and normalisation, and that the loss "
                "depends on the parameters"
            )
        return None, None

    def _modules(self, logs, value: float) -> str:
        per = {k.split("/", 1)[1]: float(v) for k, v in logs.items() if k.startswith("grad_norm/")}
        if not per or not math.isfinite(value):
            return ""
        high = self.max_norm is not None and value > self.max_norm
        name = (max if high else min)(per, key=per.get)
        return f"; {'largest' if high else 'smallest'} submodule norm: {name} {per[name]:.4g}"

    def __repr__(self) -> str:
        return (
            f"GradNormMonitor(min_norm={self.min_norm}, max_norm={self.max_norm}, "
            f"per_module={self.per_module})"
        )
