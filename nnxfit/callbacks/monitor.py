"""A monitored metric: its name, which direction is better, and lookups that fail clearly.

Shared by the callbacks that watch a metric (``EarlyStopping``, ``ReduceLROnPlateau``;
``ModelCheckpoint`` may use it too)::

    m = Monitor("val_accuracy", "auto", owner="EarlyStopping")   # resolves to "max"
    m.check_fit(trainer)              # at fit start: a val_ metric without val_data fails here
    value = m.lookup(logs)            # at epoch end: None on an epoch without validation
    if m.is_better(value, best, min_delta): ...

A name the fit does not log is reported with the names it does log, at fit start: the train
step's metrics, ``validation_step``'s (with ``val_data``), and what callbacks declare in
``Callback.logged_metrics``. A callback that adds a metric must declare it to have it
monitored.
"""

from __future__ import annotations

import difflib
import math
import weakref
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

    def unknown(self, names: Iterable[str], at_start: bool = False) -> ConfigError:
        """The error for a monitor that names no logged metric."""
        names = sorted(set(names))
        close = difflib.get_close_matches(self.name, names, n=1)
        hint = ""
        if self.name.startswith("val_") and not any(n.startswith("val_") for n in names):
            hint = " Validation metrics need val_data passed to fit."
        elif close:
            hint = f" Did you mean {close[0]!r}?"
        declare = (
            " A metric that a callback adds to the logs must be declared by it: "
            f"def logged_metrics(self, trainer): return [{self.name!r}]."
        )
        when = "" if at_start else " at this epoch end"
        return ConfigError(
            f"{self.owner} monitor={self.name!r} names no logged metric; the fit logs "
            f"{names}{when}. Pick one of those.{hint}{declare}"
        )

    def check_fit(self, trainer, callback=None) -> None:
        """At fit start, before training: the metric must be one the fit logs: a train step
        metric, a ``val_*`` metric of ``validation_step`` (with ``val_data``), or a name a
        callback of the fit declares in ``logged_metrics``. ``callback`` (the one watching)
        must run after the callback that logs it, which the default order ensures."""
        declared = declared_metrics(trainer)
        if (
            self.name.startswith("val_")
            and getattr(trainer, "val_data", None) is None
            and self.name not in declared
        ):
            raise ConfigError(
                f"{self.owner} monitor={self.name!r} is a validation metric but fit got no "
                f"val_data. Pass val_data to fit, or monitor a training metric: "
                f"{train_metric_names(trainer)}."
            )
        names = known_metrics(trainer, want=self.name)
        if self.name not in names:
            raise self.unknown(names, at_start=True)
        if (
            callback is not None
            and self.name in declared
            and self.name not in _step_and_val(trainer, self.name)
        ):
            self._check_order(trainer, callback, declared[self.name])

    def _check_order(self, trainer, callback, loggers: list) -> None:
        cbs = list(getattr(trainer, "cb", []) or [])
        if callback not in cbs:
            return
        mine = cbs.index(callback)
        if any(cbs.index(c) < mine for c in loggers if c in cbs):
            return
        first = loggers[0]
        raise ConfigError(
            f"{self.owner} monitors {self.name!r}, which {type(first).__name__} logs, but "
            f"{type(first).__name__} runs after it (order {first.order} > {callback.order}), "
            f"so the value is not in the logs yet when {self.owner} reads them. Give "
            f"{type(first).__name__} an order <= {callback.order} (the class attribute "
            "``order``; lower runs first)."
        )

    def __repr__(self) -> str:
        return f"Monitor({self.name!r}, {self.mode!r})"


def train_metric_names(trainer) -> list[str]:
    """Names the train step logs (``loss``, ``training_step``'s metrics, step features)."""
    return trainer.metric_names


def declared_metrics(trainer) -> dict[str, list]:
    """Metric name -> the callbacks of the fit that declare it (``Callback.logged_metrics``),
    in the order they run."""
    out: dict[str, list] = {}
    for cb in list(getattr(trainer, "cb", []) or []):
        for name in cb.logged_metrics(trainer) or ():
            out.setdefault(str(name), []).append(cb)
    return out


# Validation metric names of a fit's programs, traced once per fit (programs -> names).
_VAL_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def val_metric_names(trainer) -> list[str]:
    """``val_*`` names ``validation_step`` returns on ``val_data`` (traced with
    ``jax.eval_shape``, once per fit); empty without val_data."""
    programs = trainer.programs
    if programs is None or getattr(trainer, "val_data", None) is None:
        return []
    names = _VAL_NAMES.get(programs)
    if names is None:
        from nnxfit.data import epoch_batches

        batch = next(iter(epoch_batches(trainer.val_data, 0)), None)
        names = []
        if batch is not None:
            leaves = trainer.carry.module_leaves()
            names = [f"val_{k}" for k in programs.eval_metric_names(leaves, batch)]
        _VAL_NAMES[programs] = names
    return list(names)


def _step_and_val(trainer, want: str | None) -> list[str]:
    names = train_metric_names(trainer)
    if want in names:
        return names
    return names + val_metric_names(trainer)


def known_metrics(trainer, want: str | None = None) -> list[str]:
    """Names the fit will log, known before it trains: the train step's metrics (plus
    ``lr``/``nonfinite_steps`` where computed), what callbacks declare in ``logged_metrics``
    and, with ``val_data``, the ``val_*`` ones (traced, only when ``want`` is not already
    found among the others)."""
    names = train_metric_names(trainer) + list(declared_metrics(trainer))
    if want in names:
        return list(dict.fromkeys(names))
    return list(dict.fromkeys(names + val_metric_names(trainer)))


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
