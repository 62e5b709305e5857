"""How the outputs of ``validation_step`` / ``test_step`` add up over a dataset.

A step returns a dict whose values are scalars (batch means: the set's value is their mean
over examples, each batch weighted by its size) or whole-set metrics (``nnxfit.metrics``:
arrays summed over the set, turned into the metric at the end). The jitted eval program
carries one accumulator, plain containers of arrays only, so its structure never changes
between calls and the program is traced once per batch shape::

    (mean_sums: {name: f32}, examples: f32, metric_sums: {name: pytree of arrays})

What the step returns (names, the sums' shapes, what each metric computes to) is learnt once
by tracing it with ``jax.eval_shape`` (``EvalSpec``), never by running it: the Trainer knows
the ``val_*`` names before training (monitors are checked at fit start) and sizes the
accumulator from it.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnxfit.errors import StepOutputError
from nnxfit.metrics import Metric, as_metric

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def split_outputs(out: Any, where: str) -> tuple[list[str], dict, dict]:
    """(keys in order, {key: f32 scalar mean}, {key: Metric}) of a step's output."""
    from flax import nnx

    if isinstance(out, nnx.metrics.MultiMetric):  # a bare MultiMetric: its members
        out = {k: getattr(out, k) for k in out._metric_names}
    if not isinstance(out, dict):
        raise StepOutputError(
            f"{where} must return a dict of scalars (or of nnxfit.metrics values); got "
            f"{type(out).__name__}."
        )
    keys, means, metrics = [], {}, {}
    for k, v in out.items():
        k = str(k)
        keys.append(k)
        m = as_metric(v, k)
        if m is not None:
            metrics[k] = m
            continue
        v = jnp.asarray(v)
        if v.shape != ():
            raise StepOutputError(
                f"{where} metric {k!r} has shape {v.shape}; a value is a batch mean, a scalar "
                "(take .mean()), or a whole-set metric from nnxfit.metrics (F1Score, "
                "ConfusionMatrix, Sums(fn, *arrays), ...)."
            )
        means[k] = v.astype(jnp.float32)
    return keys, means, metrics


def accumulate(acc: tuple, means: dict, metrics: dict, size: int, where: str) -> tuple:
    """``acc`` plus one batch (of ``size`` examples) of a step's outputs; traced in the
    program."""
    mean_sums, count, metric_sums = acc
    n = jnp.float32(size)
    mean_sums = {k: mean_sums[k] + v * n for k, v in means.items()}
    out = {}
    for k, m in metrics.items():
        have, got = jax.tree.structure(metric_sums[k]), jax.tree.structure(m.sums)
        shapes = [
            (a.shape, b.shape)
            for a, b in zip(jax.tree.leaves(metric_sums[k]), jax.tree.leaves(m.sums), strict=False)
        ]
        if have != got or any(a != b for a, b in shapes):
            raise StepOutputError(
                f"{where} metric {k!r} returned sums of shapes {[b for _, b in shapes]} in a batch "
                f"of {size} examples but {[a for a, _ in shapes]} in the first batch; the "
                "arrays a whole-set metric sums must not depend on the batch size (reduce "
                "them over the batch, e.g. .sum(0))."
            )
        out[k] = jax.tree.map(
            lambda a, b: a + jnp.asarray(b).astype(a.dtype), metric_sums[k], m.sums
        )
    return mean_sums, count + n, out


def _stripped(m: Metric) -> Metric:
    """The metric without its traced sums: only its settings and ``compute`` are kept."""
    m = copy.copy(m)
    m.sums = None
    return m


def _expand(key: str, out: Any) -> list[tuple[str, Any]]:
    """A metric's result as named values: a dict of results becomes ``<key>_<name>``."""
    if isinstance(out, dict):
        return [(f"{key}_{k}", v) for k, v in out.items()]
    return [(key, out)]


class EvalSpec:
    """What a validation or test step returns, learnt by tracing it once."""

    def __init__(self, trace, args: tuple, where: str):
        captured: dict = {}

        def f(*a):
            keys, means, metrics = split_outputs(trace(*a), where)
            captured.update(keys=keys, metrics=metrics)
            return means, {k: m.sums for k, m in metrics.items()}

        self.where = where
        self.mean_shapes, self.sum_shapes = jax.eval_shape(f, *args)
        self.keys: list[str] = captured["keys"]
        self.metrics = {k: _stripped(m) for k, m in captured["metrics"].items()}
        self.names: list[str] = []  # scalars, logged; in the step's order
        self.arrays: list[str] = []  # array results: ``trainer.array_metrics``
        for k in self.keys:
            if k not in self.metrics:
                self.names.append(k)
                continue
            for name, s in _expand(k, self._result_shape(k)):
                if not hasattr(s, "shape"):
                    raise StepOutputError(
                        f"{where} metric {k!r}: its compute returned {type(s).__name__} for "
                        f"{name!r}; return an array, or a dict of arrays."
                    )
                (self.names if s.shape == () else self.arrays).append(name)
        dup = {n for n in self.names + self.arrays if (self.names + self.arrays).count(n) > 1}
        if dup:
            raise StepOutputError(
                f"{where} logs {sorted(dup)} twice (a metric returning a dict is logged as "
                "<name>_<key>); rename one."
            )

    def _result_shape(self, k: str) -> Any:
        m = self.metrics[k]
        try:
            return jax.eval_shape(m.compute, self.sum_shapes[k])
        except Exception as e:
            e.add_note(
                f"(while tracing the compute of {self.where} metric {k!r}, "
                f"{type(m).__name__}: write it with jax.numpy; it runs on the summed arrays)"
            )
            raise

    def zeros(self) -> tuple:
        """An empty accumulator (placed by the caller)."""
        return (
            {k: jnp.zeros((), jnp.float32) for k in self.mean_shapes},
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.sum_shapes),
        )

    def finish(self, acc: tuple, prefix: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """(scalar logs, array results), keys prefixed, from a host copy of the accumulator."""
        mean_sums, count, metric_sums = acc
        logs: dict[str, float] = {}
        arrays: dict[str, np.ndarray] = {}
        for k in self.keys:
            if k not in self.metrics:
                logs[prefix + k] = float(mean_sums[k]) / float(count)
                continue
            m = self.metrics[k]
            problem = m.problems(metric_sums[k])
            if problem:
                warnings.warn(f"{prefix}{k}: {problem}", stacklevel=_user_stacklevel())
            out = m.compute(jax.tree.map(jnp.asarray, metric_sums[k]))
            for name, v in _expand(k, out):
                v = np.asarray(jax.device_get(v))
                if v.shape == ():
                    logs[prefix + name] = float(v)
                else:
                    arrays[prefix + name] = v
        return logs, arrays


def _user_stacklevel() -> int:
    """The stack level of the first frame outside nnxfit, for ``warnings.warn``."""
    import sys

    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        level += 1
        frame = frame.f_back
    return level
