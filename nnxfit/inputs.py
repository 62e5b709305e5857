"""What ``fit``, ``validate`` and ``predict`` accept as data, Keras style.

Arrays become ``ArrayLoader``s, as ``keras.Model.fit`` batches them:

* ``x``, ``(x, y)``, ``(x, y, w)``, ``((x1, x2), y)``, ``{"image": x, "label": y}``: numpy or
  jax arrays with one leading (example) dimension in common are **one dataset**, batched by
  ``batch_size`` (32 unless given, Keras's default); training batches are reshuffled every
  epoch (``shuffle=True``, seeded from ``Trainer(seed=)`` and the epoch, so a resumed fit sees
  the same order), validation and predict batches keep the order.
* ``validation_split=f`` holds out the **last** fraction ``f`` of the arrays, before any
  shuffling (Keras's rule), as validation data.

Everything else is passed through unchanged: an ``ArrayLoader``, a list of batches, a torch
``DataLoader``, a ``GrainLoader``, a function returning an iterator. The shapes that could
mean either are refused with what to write instead: a tuple whose elements are batches of one
structure (a list of batches is the unambiguous form), a list ``[x, y]`` of differently shaped
arrays (write ``(x, y)``), arrays of one dataset whose row counts differ, and the Keras habit
``fit(module, x, y)``, whose third argument is ``val_data`` here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from nnxfit.data import ArrayLoader
from nnxfit.errors import BatchError, ConfigError

DEFAULT_BATCH_SIZE = 32  # keras.Model.fit / evaluate / predict


def is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray | jax.Array)


def _describe(x: Any) -> str:
    if is_array(x):
        return f"array of shape {tuple(x.shape)}"
    return type(x).__name__


def _leaves(data: Any) -> list:
    return jax.tree.leaves(data, is_leaf=lambda x: x is None)


def as_arrays(data: Any, where: str) -> Any | None:
    """``data`` when it is one dataset of arrays (a bare array, or a tuple or dict of arrays
    with equal leading dimensions); ``None`` when it is something to iterate (a loader, a list
    of batches). Raises on the shapes that could mean either."""
    if is_array(data):
        if data.ndim == 0:
            raise BatchError(
                f"{where} data is a scalar array; pass arrays with one row per example."
            )
        return data
    if isinstance(data, Mapping):
        return _checked(data, where, "dict")
    if isinstance(data, tuple) and data:
        leaves = _leaves(data)
        if not any(is_array(x) for x in leaves):
            return None  # a tuple of something else: iterated as before
        if all(is_array(x) for x in data):
            return _checked(data, where, "tuple")
        elements = list(data)
        structures = {jax.tree.structure(e) for e in elements}
        if len(structures) == 1 and len({_spec(e) for e in elements}) == 1:
            raise ConfigError(
                f"{where} data is a tuple of {len(elements)} batches of the same structure "
                f"({jax.tree.structure(elements[0])}), or is it one dataset? A tuple of arrays "
                "is one dataset (Keras style, batched by batch_size); pass a list of batches, "
                "or one dataset as ArrayLoader((x, y), batch_size=...)."
            )
        return _checked(data, where, "tuple")
    if isinstance(data, list) and data and all(is_array(x) for x in data):
        if len({(tuple(x.shape[1:]), np.dtype(x.dtype)) for x in data}) > 1:
            shapes = ", ".join(_describe(x) for x in data[:4])
            raise ConfigError(
                f"{where} data is a list of arrays of different shapes ({shapes}): a list is "
                "taken as a list of batches, which share one shape. For one dataset of inputs "
                "and labels pass a tuple, fit(module, (x, y)) (Keras style), or "
                "ArrayLoader((x, y), batch_size=...)."
            )
    return None


def _spec(tree: Any) -> tuple:
    return tuple(
        (tuple(x.shape[1:]), np.dtype(x.dtype)) if is_array(x) else type(x) for x in _leaves(tree)
    )


def _checked(data: Any, where: str, kind: str) -> Any:
    # A list inside is a leaf here: data[1] = [0, 2, 1, ...] is a list of labels, not a node.
    paths = jax.tree_util.tree_flatten_with_path(
        data, is_leaf=lambda x: x is None or isinstance(x, list)
    )[0]
    bad = [(jax.tree_util.keystr(p), x) for p, x in paths if not is_array(x)]
    if bad:
        path, x = bad[0]
        raise ConfigError(
            f"{where} data is a {kind} of arrays, taken as one dataset (Keras style), but "
            f"data{path} is a {type(x).__name__}, not a numpy or jax array. Convert it "
            "(np.asarray(...)), or pass an ArrayLoader or a list of batches."
        )
    if not paths:
        raise ConfigError(f"{where} data is an empty {kind}; pass arrays, e.g. (x, y).")
    rows = {jax.tree_util.keystr(p): (int(x.shape[0]) if x.ndim else None) for p, x in paths}
    if len(set(rows.values())) > 1 or None in rows.values():
        detail = ", ".join(f"data{p}: {n} rows" for p, n in rows.items())
        raise BatchError(
            f"{where} data is a {kind} of arrays, taken as one dataset (Keras style), but the "
            f"arrays have different numbers of rows ({detail}). Every array needs one row per "
            "example. (A collection of batches is a list: [(x0, y0), (x1, y1), ...].)"
        )
    return data


def _batch_size(batch_size: Any) -> int:
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ConfigError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
    return int(batch_size)


def _rows(arrays: Any) -> int:
    return int(jax.tree.leaves(arrays)[0].shape[0])


def fit_inputs(
    train: Any,
    val: Any,
    *,
    batch_size: int | None,
    shuffle: bool | None,
    validation_split: float,
    seed: int,
) -> tuple[Any, Any]:
    """``fit``'s ``train_data`` and ``val_data`` as loaders (see the module docstring)."""
    x = as_arrays(train, "train")
    v = None if val is None else as_arrays(val, "val")
    if is_array(train) and is_array(val) and val.ndim and _rows(val) == _rows(train):
        raise ConfigError(
            f"fit(module, x, y)? The third argument of fit is val_data; here it has as many "
            f"rows ({_rows(val)}) as the training data. Pass inputs and labels together: "
            "fit(module, (x, y)), and validation data as val_data=(x_val, y_val) or "
            "validation_split=0.2."
        )
    if x is None:
        # batch_size may still batch array val_data; the rest only ever applies to arrays.
        given = [
            name
            for name, on in (
                ("shuffle", shuffle is not None),
                ("validation_split", bool(validation_split)),
                ("batch_size", batch_size is not None and v is None),
            )
            if on
        ]
        if given:
            raise ConfigError(
                f"fit({', '.join(f'{g}=...' for g in given)}) applies to arrays (Keras style), "
                f"but train_data is a {type(train).__name__} that makes its own batches. Set "
                "batch size, shuffling and the validation split on the loader, e.g. "
                "ArrayLoader((x, y), batch_size=64, shuffle=True), or pass the arrays."
            )
    bs = _batch_size(batch_size)
    if validation_split:
        if not isinstance(validation_split, int | float) or not 0 < validation_split < 1:
            raise ConfigError(
                f"validation_split must be a fraction between 0 and 1 (0.2 holds out the last "
                f"20 % of the arrays); got {validation_split!r}."
            )
        if val is not None:
            raise ConfigError(
                "fit got both val_data and validation_split; pass one of them (validation_split "
                "holds out the last part of the training arrays)."
            )
        n = _rows(x)
        split_at = math.ceil(n * (1.0 - validation_split))  # Keras's split point
        if split_at >= n or split_at <= 0:
            raise ConfigError(
                f"validation_split={validation_split} of {n} examples leaves "
                f"{n - split_at} for validation and {split_at} for training; both need at "
                "least one. Use a different fraction or pass val_data."
            )
        v = jax.tree.map(lambda a: a[split_at:], x)
        x = jax.tree.map(lambda a: a[:split_at], x)
    if x is not None:
        train = ArrayLoader(x, bs, shuffle=True if shuffle is None else bool(shuffle), seed=seed)
    if v is not None:
        val = ArrayLoader(v, bs)
    return train, val


def eval_inputs(data: Any, batch_size: int | None, where: str) -> Any:
    """``validate``/``predict`` data: arrays become an ``ArrayLoader`` (in order)."""
    x = as_arrays(data, where)
    if x is None:
        if batch_size is not None:
            raise ConfigError(
                f"{where}(batch_size=...) applies to arrays (Keras style), but the data is a "
                f"{type(data).__name__} that makes its own batches; drop batch_size or pass "
                "the arrays."
            )
        return data
    return ArrayLoader(x, _batch_size(batch_size))
