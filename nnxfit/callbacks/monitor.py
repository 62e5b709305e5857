"""A monitored metric: its name, which direction is better, and lookups that fail clearly.

Shared by the callbacks that watch a metric (``EarlyStopping``, ``ReduceLROnPlateau``;
``ModelCheckpoint`` may use it too)::

    m = Monitor("val_accuracy", "auto", owner="EarlyStopping")   # resolves to "max"
    m.check_fit(trainer)              # at fit start: a val_ metric without val_data fails here
    value = m.lookup(logs)            # at epoch end: None on an epoch without validation
    if m.is_better(value, best, min_delta): ...

A name the fit does not log is reported with the names it does log. Callbacks may add
metrics to the epoch logs, so only what is certain fails at fit start; the rest fails at the
first epoch end that should have had the metric.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

from nnxfit.errors import ConfigError

MODES = ("min", "max", "auto")

# For mode="auto": the name (without "val_") decides. Checked in this order, so that
# "accuracy_loss" is a loss.
_LOWER_IS_BETTER = (
    "loss",
    "error",
    "err",
    "mse",
    "mae",
    "nll",
    "perplexity",
    "ppl",
    "hinge",
    "entropy",
    "kl",
    "divergence",
    "distance",
)
_HIGHER_IS_BETTER = (
    "acc",
    "f1",
    "auc",
    "precision",
    "recall",
    "iou",
    "dice",
    "psnr",
    "ssim",
    "map",
    "bleu",
    "rouge",
    "r2",
    "score",
    "top",
)


class Monitor:
    """The metric ``name`` watched by ``owner`` (a callback name used in messages).

    Args:
        name: a key of the logs, e.g. ``"val_loss"``.
        mode: ``"min"`` (lower is better), ``"max"``, or ``"auto"``: ``"max"`` for names that
            look like accuracies or scores, ``"min"`` for losses and errors; any other name
            is an error asking for an explicit mode.
        owner: who is asking (``"EarlyStopping"``), for error messages.
    """

    def __init__(self, name: str, mode: str = "min", *, owner: str = "callback"):
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{owner} monitor must be a metric name (a string); got {name!r}.")
        if mode not in MODES:
            raise ConfigError(f"{owner} mode must be one of {MODES}; got {mode!r}.")
        self.name = name
        self.mode = mode
        self.owner = owner
        self.direction = self.resolve_mode()  # "min" or "max"

    def resolve_mode(self) -> str:
        """``"min"`` or ``"max"``; ``"auto"`` is decided from the metric's name."""
        if self.mode != "auto":
            return self.mode
        base = self.name.removeprefix("val_").lower()
        if any(w in base for w in _LOWER_IS_BETTER):
            return "min"
        if any(w in base for w in _HIGHER_IS_BETTER):
            return "max"
        raise ConfigError(
            f"{self.owner} cannot tell whether {self.name!r} should go up or down (mode='auto' "
            "knows losses, errors, accuracies and scores by name). Pass mode='min' or "
            "mode='max'."
        )

    # -- comparisons ------------------------------------------------------------------------
    @property
    def worst(self) -> float:
        """The starting 'best' value: anything finite beats it."""
        return math.inf if self.direction == "min" else -math.inf

    def is_better(self, current: float, best: float | None, min_delta: float = 0.0) -> bool:
        """``current`` beats ``best`` by more than ``min_delta``. NaN never beats anything;
        anything but NaN beats ``None``."""
        if current is None or math.isnan(current):
            return False
        if best is None or math.isnan(best):
            return True
        if self.direction == "min":
            return current < best - min_delta
        return current > best + min_delta

    def is_worse(self, current: float, reference: float) -> bool:
        """``current`` is strictly on the bad side of ``reference`` (NaN counts as worse)."""
        if math.isnan(current):
            return True
        return current > reference if self.direction == "min" else current < reference

    # -- lookups ----------------------------------------------------------------------------
    def get(self, logs: Mapping[str, Any]) -> float:
        """The value in ``logs``; a ``ConfigError`` listing the logged names if it is absent."""
        if self.name not in logs:
            raise self.unknown(logs)
        return float(logs[self.name])

    def lookup(self, logs: Mapping[str, Any]) -> float | None:
        """Like ``get`` on epoch-end logs, but ``None`` for a ``val_`` metric on an epoch that
        ran no validation (``val_every_n_epochs > 1``): that is expected, not an error."""
        if self.name in logs:
            return float(logs[self.name])
        if self.name.startswith("val_") and not any(k.startswith("val_") for k in logs):
            return None
        raise self.unknown(logs)

    def unknown(self, names: Iterable[str]) -> ConfigError:
        """The error for a monitor that names no logged metric."""
        names = sorted(names)
        close = difflib.get_close_matches(self.name, names, n=1)
        hint = ""
        if self.name.startswith("val_") and not any(n.startswith("val_") for n in names):
            hint = " Validation metrics need val_data passed to fit."
        elif close:
            hint = f" Did you mean {close[0]!r}?"
        return ConfigError(
            f"{self.owner} monitor={self.name!r} names no logged metric; the fit logs {names}. "
            f"Pick one of those.{hint}"
        )

    def check_fit(self, trainer) -> None:
        """At fit start: fails when the metric cannot appear (a ``val_`` metric and no
        ``val_data``). Names the step does not compute may still come from a callback, so
        they are checked at the first epoch end instead (``lookup``)."""
        if self.name.startswith("val_") and getattr(trainer, "val_data", None) is None:
            raise ConfigError(
                f"{self.owner} monitor={self.name!r} is a validation metric but fit got no "
                f"val_data. Pass val_data to fit, or monitor a training metric: "
                f"{train_metric_names(trainer)}."
            )

    def __repr__(self) -> str:
        return f"Monitor({self.name!r}, {self.mode!r})"


def train_metric_names(trainer) -> list[str]:
    """Names the train step logs (``loss``, ``training_step``'s metrics, step features)."""
    programs = getattr(trainer, "_programs", None)
    if programs is None:
        return []
    names = list(programs.metric_order)
    features = programs.config.features
    if "lr" in features:
        names.append("lr")
    if "finite" in features:
        names.append("nonfinite_steps")
    return names


def announce(trainer, text: str) -> None:
    """One line for the person watching: the Trainer's rich console (stdout by default),
    process 0 only. Rich prints it above a running progress display."""
    if not getattr(trainer, "is_global_zero", True):
        return
    console = getattr(trainer, "console", None)
    if console is None:
        from rich import get_console

        console = get_console()
    console.print(text, markup=False, highlight=False, soft_wrap=True)
