"""Train and eval mode: running a module in eval mode without touching a fit, and a check that
the fit really trained in train mode.

nnxfit switches modes itself: the train step runs ``module.train()``'s graph (dropout on,
BatchNorm updating its statistics), validation and predict ``module.eval()``'s. Two habits
from the Flax guide defeat that:

* a ``__call__(x, train: bool)`` flag passed down as ``use_running_average=not train`` /
  ``deterministic=not train`` overrides the mode. A ``training_step`` that forgets
  ``train=True`` then trains in eval mode: no dropout, BatchNorm statistics frozen at their
  initial values. ``FrozenStatsCheck`` (on in every fit) warns when no BatchNorm statistic
  moved by the first epoch end: one comparison per fit, no per-step sync.
* a callback that calls ``module(x)`` during a fit runs it in train mode: dropout draws from
  the module's RNG streams and BatchNorm updates its statistics, and the fit keeps those
  changes. ``eval_mode(module)`` (also ``trainer.eval_mode(module)``) runs the block in eval
  mode and puts every variable and mode flag back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import numpy as np
from flax import nnx

from nnxfit.callbacks.base import Callback
from nnxfit.optimizers import trainable_filter
from nnxfit.warn import warn

MODE_FLAGS = ("deterministic", "use_running_average")  # what Module.train()/eval() set


class TrainModeWarning(UserWarning):
    """A fit trained in eval mode (BatchNorm statistics never moved)."""


@contextlib.contextmanager
def eval_mode(module: nnx.Module) -> Iterator[nnx.Module]:
    """Runs the block with ``module`` in eval mode, then restores it exactly.

    Inside, dropout is off and BatchNorm uses its running statistics. On exit every
    variable (parameters, BatchNorm statistics, RNG stream counters) points back at the
    value it had on entry, and every submodule's ``deterministic``/``use_running_average``
    flag is what it was, so what the block did to the module leaves no trace: a callback can
    look at predictions mid-fit without altering the run. Holding the entry values costs
    nothing (JAX arrays are immutable; nothing is copied).
    """
    variables = [v for _, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)]
    values = [v.get_raw_value() for v in variables]
    flags = [
        (node, name, getattr(node, name))
        for _, node in nnx.iter_modules(module)
        for name in MODE_FLAGS
        if hasattr(node, name)
    ]
    module.eval()
    try:
        yield module
    finally:
        for v, x in zip(variables, values, strict=True):
            if v.get_raw_value() is not x:
                v.set_raw_value(x)
        for node, name, value in flags:
            setattr(node, name, value)


class FrozenStatsCheck(Callback):
    """Warns once per fit when the module has BatchNorm statistics (``nnx.BatchStat``) and not
    one of them changed by the end of the first epoch (or the end of a fit shorter than
    that): ``training_step`` ran the model as in eval mode. Added to every fit by the
    Trainer; costs one comparison of the statistics, at one epoch end."""

    order = -150  # early: its warning comes before other callbacks' epoch-end output

    def __init__(self):
        self.warned = False
        self._mask: list[bool] | None = None
        self._start: list[np.ndarray] | None = None
        self._step0 = 0

    def on_fit_start(self, trainer, module) -> None:
        self.warned, self._mask, self._start = False, None, None
        _, _, rest = nnx.split(module, trainable_filter(module), ...)
        leaves = jax.tree.leaves(rest, is_leaf=lambda x: isinstance(x, nnx.Variable))
        mask = [isinstance(v, nnx.BatchStat) for v in leaves]
        if any(mask):
            self._mask = mask
            self._start = self._stats(trainer)
            self._step0 = trainer.global_step

    def needs_sync(self, trainer, event: str, step: int, n_steps: int) -> bool:
        return event == "epoch_end" and self._start is not None

    def on_train_epoch_end(self, trainer, module, epoch, logs) -> None:
        self._check(trainer)

    def on_exception(self, trainer, module, error) -> None:
        self._start = None

    def on_interrupt(self, trainer, module) -> None:
        self._start = None

    def on_fit_end(self, trainer, module) -> None:
        self._check(trainer)

    def _stats(self, trainer) -> list[np.ndarray]:
        rest = jax.tree.leaves(trainer.train_state()["rest"])
        picked = [x for x, m in zip(rest, self._mask, strict=True) if m]
        return [np.array(x, copy=True) for x in jax.device_get(picked)]

    def _check(self, trainer) -> None:
        start, self._start = self._start, None
        if start is None or trainer.global_step <= self._step0 or trainer.nonfinite_steps:
            return
        now = self._stats(trainer)
        if any(not np.array_equal(a, b) for a, b in zip(start, now, strict=True)):
            return
        self.warned = True
        warn(
            f"BatchNorm statistics did not change in {trainer.global_step - self._step0} "
            "training steps: training_step ran the model as in eval mode (running averages; "
            "dropout is then likely off too). A model that takes a train/deterministic/"
            "use_running_average argument (the Flax guide's __call__(x, train)) needs "
            "train=True in training_step; or let the flag default to None, so that the mode "
            "nnxfit sets (module.train() in training_step, module.eval() in validation and "
            "predict) decides. Ignore this if the statistics are frozen on purpose.",
            TrainModeWarning,
        )
