"""Whole-dataset metrics: what a validation or test step returns when a batch mean won't do.

A plain scalar in ``validation_step``'s dict is averaged over the examples of the set. F1,
precision, recall, AUROC or a confusion matrix are not means of per-batch values, so the step
returns one of these instead: a batch's *sums* (confusion counts, score histograms, anything
that adds up), which the Trainer adds over every batch inside its jitted eval program (on the
device, no per-batch host sync; exact across the parts of a sharded batch) and turns into the
metric once at the end with the metric's ``compute``::

    from nnxfit import metrics

    def validation_step(self, batch):
        x, y = batch
        logits = self(x)
        return {
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),  # a mean
            "f1": metrics.F1Score(logits, y, num_classes=10),  # macro F1 of the whole set
            "confusion": metrics.ConfusionMatrix(logits, y, num_classes=10),  # an array
        }

Scalar results are logged like the means (``val_f1``; a monitor may name them), a result that
is a dict of scalars as ``<name>_<key>``, and an array result (a confusion matrix, per-class
scores) is kept out of the logs (they hold floats) and stored in ``trainer.array_metrics``
(``{"val_confusion": array}``) after each validation or test.

``Sums(fn, *arrays, **named)`` is the general form: the arrays are summed over the set and
``fn`` gets the sums. ``flax.nnx.metrics`` objects whose state is a running sum (``Average``,
``Accuracy``, and a ``MultiMetric`` of those), updated inside the step, are accepted as well.

Every ``compute`` is written with ``jax.numpy``: it is traced once (to learn the names the
step logs before training starts) and then runs once per validation on the summed arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from nnxfit.errors import StepOutputError

AVERAGES = ("macro", "micro", "weighted", None)


def sum_dtype(x: Any):
    """The dtype a summed array is accumulated in: counts (bool, ints) as int32 (exact up
    to 2**31), floats at least float32."""
    dt = jnp.result_type(x)
    if dt == jnp.bool_ or jnp.issubdtype(dt, jnp.integer):
        return jnp.int32
    if jnp.issubdtype(dt, jnp.floating):
        return jnp.promote_types(dt, jnp.float32)
    raise StepOutputError(f"a whole-set metric got an array of dtype {dt}; it sums numbers only.")


def _summed(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(sum_dtype(x))


class Metric:
    """One batch's contribution to a whole-dataset metric.

    ``self.sums``: a pytree of arrays that the Trainer adds up over every batch (their shapes
    must not depend on the batch size). ``compute(sums)``: the metric from the summed
    arrays (a scalar, a dict of scalars, or an array), written with ``jax.numpy``; it may
    read the metric's settings (``num_classes``...) but not ``self.sums``. ``problems(sums)``
    (optional) returns a message the Trainer warns with once the set is summed.
    """

    sums: Any

    def compute(self, sums: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define compute(self, sums).")

    def problems(self, sums: Any) -> str | None:
        return None


class Sums(Metric):
    """``fn(*sums, **named_sums)`` of arrays summed over the whole set.

    ``Sums(lambda tp, fp, fn: 2 * tp / (2 * tp + fp + fn), tp, fp, fn)`` is binary F1;
    ``Sums(lambda total, n: total / n, token_loss.sum(), mask.sum())`` a per-token mean. Bools
    and integers are summed as int32, floats as float32 (or wider). ``fn`` may return a
    scalar, a dict of scalars (logged as ``<name>_<key>``) or an array.
    """

    def __init__(self, fn: Callable[..., Any], *arrays: Any, **named: Any):
        if not callable(fn):
            raise StepOutputError(
                f"metrics.Sums takes the function that turns the sums into the metric first; "
                f"got {type(fn).__name__}. Write Sums(fn, array, ...)."
            )
        if not arrays and not named:
            raise StepOutputError("metrics.Sums got no arrays to sum; pass Sums(fn, a, b, ...).")
        self.fn = fn
        self.sums = ([_summed(a) for a in arrays], {k: _summed(v) for k, v in named.items()})

    def compute(self, sums):
        args, kwargs = sums
        return self.fn(*args, **kwargs)


class Mean(Metric):
    """The mean of ``values`` over every element of the set (weighted by ``weights``, e.g. a
    padding mask), not over examples: a per-token loss of sequences of different lengths."""

    def __init__(self, values: Any, weights: Any = None):
        values = jnp.asarray(values, jnp.float32)
        w = jnp.ones_like(values) if weights is None else jnp.broadcast_to(weights, values.shape)
        w = w.astype(jnp.float32)
        self.sums = {"total": (values * w).sum(), "weight": w.sum()}

    def compute(self, sums):
        return sums["total"] / sums["weight"]


# ------------------------------------------------------------------------ classification ---
def _class_ids(preds: Any, labels: Any, threshold: float, name: str) -> tuple:
    """Predicted and true class ids, flattened. ``preds`` are scores over classes (one more
    axis than ``labels``: argmax), probabilities (floats: ``>= threshold``) or class ids."""
    preds, labels = jnp.asarray(preds), jnp.asarray(labels)
    if preds.ndim == labels.ndim + 1:
        preds = preds.argmax(-1)
    elif jnp.issubdtype(preds.dtype, jnp.floating):
        preds = preds >= threshold
    if preds.shape != labels.shape:
        raise StepOutputError(
            f"metrics.{name} got predictions of shape {preds.shape} and labels of shape "
            f"{labels.shape}; pass class ids (or probabilities) shaped like the labels, or "
            "scores with one more (last) axis of classes."
        )
    if jnp.issubdtype(labels.dtype, jnp.floating):
        raise StepOutputError(
            f"metrics.{name} got labels of dtype {labels.dtype}; labels are class ids (ints)."
        )
    return preds.astype(jnp.int32).ravel(), labels.astype(jnp.int32).ravel()


def _weights(mask: Any, shape: tuple) -> jax.Array:
    if mask is None:
        return jnp.ones(shape, jnp.bool_).ravel()
    return jnp.broadcast_to(jnp.asarray(mask), shape).astype(jnp.bool_).ravel()


def _whole(x: jax.Array) -> jax.Array:
    """``x`` replicated, when it is split over an Explicit mesh axis (a validation batch on
    ``jax.make_mesh``'s default axes): jax cannot choose the output sharding of a
    scatter-add whose indices are split that way. Elsewhere, ``x`` itself."""
    s = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(s, "mesh", None)
    if mesh is None or mesh.empty or all(p is None for p in s.spec):
        return x
    if jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _scatter_add(size: int, cells: jax.Array, counts: jax.Array) -> jax.Array:
    """int32 counts of ``counts`` added at ``cells`` into ``size`` zeros."""
    cells, counts = _whole(cells.ravel()), _whole(counts.ravel().astype(jnp.int32))
    return jnp.zeros((size,), jnp.int32).at[cells].add(counts)


def _safe_div(a, b):
    """``a / b``, 0 where ``b`` is 0 (scikit-learn's and torchmetrics' zero_division=0)."""
    return jnp.where(b > 0, a / jnp.where(b > 0, b, 1), 0.0)


class _Confusion(Metric):
    """Confusion counts ``[true, predicted]`` of ``num_classes`` classes (2 for binary), and
    how many examples had a label or prediction outside them (left out, warned about)."""

    def __init__(self, preds, labels, num_classes, threshold, mask):
        name = type(self).__name__
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise StepOutputError(
                f"metrics.{name} num_classes must be an int >= 2 (or None for binary); got "
                f"{num_classes!r}."
            )
        self.binary = num_classes is None
        self.num_classes = c = 2 if num_classes is None else num_classes
        p, y = _class_ids(preds, labels, threshold, name)
        w = _weights(mask, jnp.shape(labels))
        valid = (p >= 0) & (p < c) & (y >= 0) & (y < c)
        cells = jnp.where(valid, y * c + p, 0)
        cm = _scatter_add(c * c, cells, valid & w)
        self.sums = {"cm": cm.reshape(c, c), "invalid": ((~valid) & w).sum(dtype=jnp.int32)}

    def problems(self, sums):
        n = int(sums["invalid"])
        if n:
            what = "0 or 1" if self.binary else f"in [0, {self.num_classes})"
            return (
                f"{n} example(s) had a label or prediction not {what}; they were left out of "
                f"{type(self).__name__}. Check the labels and num_classes."
            )
        return None

    @staticmethod
    def _counts(cm):
        tp = jnp.diagonal(cm)
        return tp, cm.sum(0) - tp, cm.sum(1) - tp  # tp, fp, fn per class


class ConfusionMatrix(_Confusion):
    """The ``(num_classes, num_classes)`` int32 matrix of counts, rows the true class and
    columns the predicted one (scikit-learn's ``confusion_matrix``). An array: it goes to
    ``trainer.array_metrics``, not the logs. ``num_classes=None``: binary, 2 x 2."""

    def __init__(self, preds, labels, num_classes: int | None = None, *, threshold=0.5, mask=None):
        super().__init__(preds, labels, num_classes, threshold, mask)

    def compute(self, sums):
        return sums["cm"]


class _Scores(_Confusion):
    def __init__(self, preds, labels, num_classes, average, threshold, mask):
        if average not in AVERAGES:
            raise StepOutputError(
                f"metrics.{type(self).__name__} average={average!r}; use one of {AVERAGES}."
            )
        super().__init__(preds, labels, num_classes, threshold, mask)
        self.average = average

    def _per_class(self, tp, fp, fn):
        raise NotImplementedError

    def compute(self, sums):
        tp, fp, fn = self._counts(sums["cm"])
        if self.binary:  # the positive class, 1
            return self._per_class(tp[1], fp[1], fn[1])
        if self.average == "micro":
            return self._per_class(tp.sum(), fp.sum(), fn.sum())
        scores = self._per_class(tp, fp, fn)
        if self.average is None:
            return scores
        if self.average == "weighted":
            support = tp + fn
            return _safe_div((scores * support).sum(), support.sum())
        # macro: over the classes that occur (as a label or a prediction), as scikit-learn
        # and torchmetrics do; a class absent from both says nothing about the model.
        seen = (tp + fp + fn) > 0
        return _safe_div(jnp.where(seen, scores, 0.0).sum(), seen.sum())


class Precision(_Scores):
    """tp / (tp + fp). ``num_classes=None``: binary, of the positive class 1 (``preds``:
    class ids, probabilities thresholded at ``threshold``, or scores of 2 classes); with
    ``num_classes``, averaged ``"macro"`` (default), ``"micro"``, ``"weighted"`` (by support),
    or per class (``None``: an array). 0 where undefined, as scikit-learn's default."""

    def __init__(
        self, preds, labels, num_classes=None, *, average="macro", threshold=0.5, mask=None
    ):
        super().__init__(preds, labels, num_classes, average, threshold, mask)

    def _per_class(self, tp, fp, fn):
        return _safe_div(tp, tp + fp)


class Recall(_Scores):
    """tp / (tp + fn); arguments as ``Precision``."""

    def __init__(
        self, preds, labels, num_classes=None, *, average="macro", threshold=0.5, mask=None
    ):
        super().__init__(preds, labels, num_classes, average, threshold, mask)

    def _per_class(self, tp, fp, fn):
        return _safe_div(tp, tp + fn)


class F1Score(_Scores):
    """2 tp / (2 tp + fp + fn); arguments as ``Precision``. Equals scikit-learn's
    ``f1_score`` (``average="binary"`` when ``num_classes`` is None)."""

    def __init__(
        self, preds, labels, num_classes=None, *, average="macro", threshold=0.5, mask=None
    ):
        super().__init__(preds, labels, num_classes, average, threshold, mask)

    def _per_class(self, tp, fp, fn):
        return _safe_div(2 * tp, 2 * tp + fp + fn)


class AUROC(Metric):
    """Area under the ROC curve from score histograms (Keras's ``AUC(num_thresholds=200)``,
    torchmetrics' binned ``AUROC(thresholds=N)``): the set's scores are counted into
    ``num_thresholds`` equal bins over [0, 1] per class and label, so memory does not grow
    with the set. The result is the exact AUROC of the scores rounded down to their bin (ties
    within a bin count a half), within ``1 / num_thresholds`` of the unbinned one and usually
    much closer.

    ``num_classes=None``: binary; ``scores`` (N,) probabilities of class 1, ``labels`` 0/1.
    With ``num_classes``: ``scores`` (N, C) class probabilities (softmax), the one-vs-rest
    AUROC averaged over the classes that have both positives and negatives (scikit-learn's
    ``roc_auc_score(multi_class="ovr", average="macro")``). Scores outside [0, 1] are
    clipped: pass probabilities, not logits.
    """

    def __init__(self, scores, labels, num_classes=None, *, num_thresholds=200, mask=None):
        if not isinstance(num_thresholds, int) or num_thresholds < 2:
            raise StepOutputError(
                f"metrics.AUROC num_thresholds must be an int >= 2; got {num_thresholds!r}."
            )
        scores, labels = jnp.asarray(scores, jnp.float32), jnp.asarray(labels)
        c = 1 if num_classes is None else num_classes
        want = labels.shape if num_classes is None else (*labels.shape, c)
        if scores.shape != want:
            raise StepOutputError(
                f"metrics.AUROC got scores of shape {scores.shape} and labels of shape "
                f"{labels.shape}; with num_classes={num_classes} scores must have shape {want}."
            )
        self.num_classes, self.num_thresholds = num_classes, t = num_classes, num_thresholds
        scores = scores.reshape(-1, c)
        y = labels.astype(jnp.int32).ravel()
        w = _weights(mask, labels.shape)
        valid = (y >= 0) & (y < max(c, 2))
        w = w & valid
        if num_classes is None:
            pos = (y == 1)[:, None]
        else:
            pos = y[:, None] == jnp.arange(c)[None, :]
        bins = jnp.clip(jnp.floor(scores * t).astype(jnp.int32), 0, t - 1)
        cells = (jnp.arange(c)[None, :] * 2 + pos.astype(jnp.int32)) * t + bins
        hist = _scatter_add(c * 2 * t, cells, jnp.broadcast_to(w[:, None], cells.shape))
        invalid = ((~valid) & _weights(mask, labels.shape)).sum(dtype=jnp.int32)
        self.sums = {"hist": hist.reshape(c, 2, t), "invalid": invalid}

    def compute(self, sums):
        h = sums["hist"].astype(jnp.float32)
        neg, pos = h[:, 0], h[:, 1]
        below = jnp.cumsum(neg, -1) - neg
        n_pos, n_neg = pos.sum(-1), neg.sum(-1)
        auc = _safe_div((pos * (below + 0.5 * neg)).sum(-1), n_pos * n_neg)
        if self.num_classes is None:
            return auc[0]
        ok = (n_pos > 0) & (n_neg > 0)
        return _safe_div(jnp.where(ok, auc, 0.0).sum(), ok.sum())

    def problems(self, sums):
        n = int(sums["invalid"])
        if n:
            what = "0 or 1" if self.num_classes is None else f"in [0, {self.num_classes})"
            return f"{n} example(s) had a label not {what}; they were left out of AUROC."
        return None


# --------------------------------------------------------------------- flax nnx metrics ---
class FlaxMetric(Metric):
    """A ``flax.nnx.metrics`` object updated inside the step, as a whole-set metric: its
    state (``Average``'s total and count) is summed over the batches, then ``compute()``
    runs on a copy holding the sums. Only metrics whose state is a running sum qualify."""

    def __init__(self, metric: Any, name: str):
        from flax import nnx

        _check_summable(metric, name)
        graphdef, state = nnx.split(metric)
        leaves, self.treedef = jax.tree.flatten(state)
        self.graphdef = graphdef
        self.sums = [_summed(x) for x in leaves]
        self.dtypes = [jnp.result_type(x) for x in leaves]

    def compute(self, sums):
        from flax import nnx

        leaves = [jnp.asarray(x).astype(d) for x, d in zip(sums, self.dtypes, strict=True)]
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves)).compute()


def is_flax_metric(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.metrics.Metric)


def _check_summable(metric: Any, name: str) -> None:
    from flax import nnx

    m = nnx.metrics
    if isinstance(metric, m.MultiMetric):
        for k in metric._metric_names:
            _check_summable(getattr(metric, k), f"{name}.{k}")
        return
    if not isinstance(metric, m.Average):
        raise StepOutputError(
            f"{name!r} is a flax {type(metric).__name__}, whose state is not a sum over "
            "batches, so nnxfit cannot add it up over the set. flax's Average and Accuracy "
            "(and a MultiMetric of them) are accepted; for others return "
            "nnxfit.metrics.Sums(fn, *arrays) of quantities that add up."
        )


def as_metric(value: Any, name: str) -> Metric | None:
    """``value`` as a whole-set metric, or None for a plain value (a batch mean)."""
    if isinstance(value, Metric):
        return value
    if is_flax_metric(value):
        return FlaxMetric(value, name)
    return None
