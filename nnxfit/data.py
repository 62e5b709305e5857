"""Data inputs: ``ArrayLoader`` and the glue that turns any re-iterable into epochs of batches."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np

from nnxfit.errors import BatchError, ConfigError, EmptyDataError


class ArrayLoader:
    """Batches of in-memory arrays, reshuffled each epoch from ``(seed, epoch)``.

    ``arrays`` is a pytree (tuple, dict, ...) of arrays with one leading dimension in common.
    The order of epoch ``e`` depends only on ``seed`` and ``e``, so a run resumed in the
    middle of an epoch sees exactly the batches the uninterrupted run would have seen.
    """

    def __init__(
        self,
        arrays: Any,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ):
        leaves, self._treedef = jax.tree.flatten(arrays)
        if not leaves:
            raise EmptyDataError("ArrayLoader got no arrays; pass e.g. (x, y) or {'x': x}.")
        self._leaves = [np.asarray(a) if not isinstance(a, jax.Array) else a for a in leaves]
        sizes = {int(a.shape[0]) if a.ndim else -1 for a in self._leaves}
        if len(sizes) != 1 or -1 in sizes:
            shapes = [tuple(a.shape) for a in self._leaves]
            raise BatchError(
                f"ArrayLoader arrays must share their leading (example) dimension; got shapes "
                f"{shapes}. Pass arrays with one row per example."
            )
        self.num_examples = sizes.pop()
        if self.num_examples == 0:
            raise EmptyDataError("ArrayLoader got arrays with 0 examples; it would yield no batch.")
        if not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
        if drop_last and batch_size > self.num_examples:
            raise EmptyDataError(
                f"batch_size={batch_size} with drop_last=True and only {self.num_examples} "
                "examples yields no batch; lower batch_size or set drop_last=False."
            )
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch`` (identity when not shuffling)."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_examples)

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Batches of ``epoch`` from batch index ``start`` on."""
        idx = self.order(epoch)
        bs, n = self.batch_size, len(self)
        contiguous = not self.shuffle
        for b in range(start, n):
            if contiguous:
                sl = slice(b * bs, min((b + 1) * bs, self.num_examples))
                leaves = [a[sl] for a in self._leaves]
            else:
                sel = idx[b * bs : (b + 1) * bs]
                leaves = [a[sel] for a in self._leaves]
            yield self._treedef.unflatten(leaves)

    def __iter__(self) -> Iterator[Any]:
        return self.iter_epoch(self.epoch)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state.get("epoch", self.epoch))

    def __repr__(self) -> str:
        return (
            f"ArrayLoader(num_examples={self.num_examples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last})"
        )


def num_batches(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def epoch_batches(data: Any, epoch: int, start: int = 0) -> Iterator[Any]:
    """An iterator over the batches of ``epoch`` of any supported source, from ``start``.

    ``ArrayLoader`` (and anything with ``iter_epoch``) jumps straight to ``start``; other
    sources get ``set_epoch(epoch)`` when they have it (torch samplers, grain) and are
    re-iterated, skipping ``start`` batches, which is exact when the source is
    deterministic for a given epoch.
    """
    if hasattr(data, "iter_epoch"):
        return data.iter_epoch(epoch, start)
    if callable(data) and not isinstance(data, Iterable):
        data = data()  # a zero-argument factory makes a fresh iterable per epoch
    if hasattr(data, "set_epoch"):
        data.set_epoch(epoch)
    it = iter(data)
    if it is data and epoch > 0:
        # A generator or iterator is exhausted after one pass; epoch 0 may use it once.
        raise ConfigError(
            f"train/val data {type(data).__name__} is a one-shot iterator: it cannot be "
            "iterated again for another epoch. Pass a re-iterable (a list, an ArrayLoader, a "
            "DataLoader) or a zero-argument function that returns a fresh iterator."
        )
    if start:
        it = itertools.islice(it, start, None)
    return it


class BatchSpec:
    """Structure, dtypes and trailing shapes of the first batch; checks every later one."""

    def __init__(self, batch: Any, where: str = "train"):
        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(batch)
        if not leaves:
            raise BatchError(f"The first {where} batch has no arrays: {batch!r}.")
        self.where = where
        self.paths = [jax.tree_util.keystr(p) or "batch" for p, _ in leaves]
        self.specs = [_leaf_spec(x, self.paths[i], where) for i, (_, x) in enumerate(leaves)]
        self.batch_size = self.specs[0][0][0] if self.specs[0][0] else None

    def check(self, batch: Any, index: int) -> list:
        leaves, treedef = jax.tree.flatten(batch)
        if treedef != self.treedef:
            raise BatchError(
                f"{self.where} batch {index} has structure {treedef}, but the first batch had "
                f"{self.treedef}. Every batch must be the same kind of pytree (same keys)."
            )
        for i, (x, (shape, dtype)) in enumerate(zip(leaves, self.specs)):
            xs = getattr(x, "shape", None)
            xd = getattr(x, "dtype", None)
            if xs is None or xd is None:
                raise BatchError(
                    f"{self.where} batch {index} leaf {self.paths[i]} is a {type(x).__name__}, "
                    "not an array. Yield numpy or jax arrays."
                )
            if tuple(xs[1:]) != shape[1:] or len(xs) != len(shape):
                raise BatchError(
                    f"{self.where} batch {index} has {self.paths[i]}.shape {tuple(xs)}, earlier "
                    f"batches {shape}. Only the leading (batch) dimension may change; reshape "
                    "or pad the data so every example has the same shape."
                )
            if np.dtype(xd) != dtype:
                raise BatchError(
                    f"{self.where} batch {index} has {self.paths[i]}.dtype {np.dtype(xd)}, earlier "
                    f"batches {dtype}. Cast the data to one dtype (e.g. x.astype(np.float32))."
                )
        sizes = {int(x.shape[0]) for x in leaves if x.ndim}
        if len(sizes) > 1:
            detail = ", ".join(f"{p}: {x.shape[0]}" for p, x in zip(self.paths, leaves) if x.ndim)
            raise BatchError(
                f"{self.where} batch {index} leaves disagree on the batch size ({detail}). "
                "Every array in a batch needs the same leading dimension."
            )
        return leaves


def _leaf_spec(x: Any, path: str, where: str):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
        if x.dtype == object:
            raise BatchError(
                f"The first {where} batch has {path} of type {type(x).__name__}, not an array. "
                "Yield numpy or jax arrays."
            )
    if len(x.shape) == 0:
        raise BatchError(
            f"The first {where} batch has a scalar at {path}; every leaf needs a leading batch "
            "dimension."
        )
    return tuple(int(d) for d in x.shape), np.dtype(x.dtype)


def batch_size_of(leaves: list) -> int:
    return int(leaves[0].shape[0])
