"""Data inputs: ``ArrayLoader`` and the glue that turns any re-iterable into epochs of batches."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np

from nnxfit.adapters import (  # noqa: F401 (GrainLoader re-exported)
    GrainLoader,
    adapt,
    seed_torch_sampler,
)
from nnxfit.errors import BatchError, ConfigError, EmptyDataError, positive_int


class ArrayLoader:
    """Batches of in-memory arrays, reshuffled each epoch from ``(seed, epoch)``.

    ``arrays`` is a pytree (tuple, dict, ...) of arrays with one leading dimension in common.
    The order of epoch ``e`` depends only on ``seed`` and ``e``, so a run resumed in the
    middle of an epoch sees exactly the batches the uninterrupted run would have seen.

    ``shard_by_process=True`` (several processes, ``jax.distributed``): every process holds
    the same ``arrays`` and ``batch_size`` is the *global* batch; each process yields its
    contiguous part of every global batch (process ``i`` of ``n``: rows ``i/n`` to
    ``(i+1)/n``). The order and the batch count are those of the global batches, so a
    checkpoint's loader position means the same data on any number of processes. The
    global batch (and a short last one) must divide by the process count.
    """

    def __init__(
        self,
        arrays: Any,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        shard_by_process: bool = False,
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
        batch_size = positive_int("batch_size", batch_size)
        if drop_last and batch_size > self.num_examples:
            raise EmptyDataError(
                f"batch_size={batch_size} with drop_last=True and only {self.num_examples} "
                "examples yields no batch; lower batch_size or set drop_last=False."
            )
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.shard_by_process = bool(shard_by_process)
        self.epoch = 0
        if self.shard_by_process:
            self._check_process_split()

    # -- several processes ----------------------------------------------------------------
    def _check_process_split(self) -> None:
        n = jax.process_count()
        last = 0 if self.drop_last else self.num_examples % self.batch_size
        for what, size in (("batch_size", self.batch_size), ("the short last batch", last)):
            if size % n:
                fix = (
                    f"use a batch_size that is a multiple of {n}"
                    if what == "batch_size"
                    else "pass drop_last=True, or a dataset size that leaves a last batch "
                    f"divisible by {n}"
                )
                raise BatchError(
                    f"ArrayLoader(shard_by_process=True): {what} of {size} examples does not "
                    f"split evenly over the {n} processes; {fix}."
                )

    def _process_rows(self, size: int) -> slice:
        """This process's rows of a global batch of ``size`` rows."""
        if not self.shard_by_process:
            return slice(None)
        n, i = jax.process_count(), jax.process_index()
        per = size // n
        return slice(i * per, (i + 1) * per)

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
        unflatten = self._treedef.unflatten
        return (unflatten(leaves) for leaves in self.iter_leaves(epoch, start))

    def iter_leaves(self, epoch: int, start: int = 0) -> Iterator[list]:
        """``iter_epoch``'s batches as lists of leaves (what the Trainer feeds its programs)."""
        bs, order = self.batch_size, self.order(epoch) if self.shuffle else None
        for chunk in self._chunks(order, start, len(self), 1):
            for r in range(0, len(chunk[0]), bs):
                batch = [x[r : r + bs] for x in chunk]
                if self.shard_by_process:
                    mine = self._process_rows(len(batch[0]))
                    batch = [x[mine] for x in batch]
                yield batch

    def iter_runs(
        self, epoch: int, start: int, k: int, stop: int | None = None
    ) -> Iterator[tuple[list, int]]:
        """The batches of ``epoch`` from ``start`` (up to ``stop``) as ``(leaves, m)``: runs of
        up to ``k`` consecutive full batches, each leaf of shape ``(m, batch_size, ...)``, then
        the short last batch as a run of one. The runs are views of one gathered buffer, so
        the Trainer's ``steps_per_execution`` stacks cost no copy."""
        bs, order = self.batch_size, self.order(epoch) if self.shuffle else None
        n = len(self) if stop is None else min(len(self), stop)
        full = min(n, self.num_examples // bs)
        for chunk in self._chunks(order, start, full, k):
            rows = len(chunk[0])
            for r in range(0, rows, k * bs):
                m = min(k * bs, rows - r) // bs
                run = [x[r : r + m * bs].reshape(m, bs, *x.shape[1:]) for x in chunk]
                yield (self._mine(run) if self.shard_by_process else run), m
        if full < n and start <= full:  # the short last batch
            for chunk in self._chunks(order, full, n, 1):
                yield self._mine([x[None] for x in chunk]), 1

    def _mine(self, run: list) -> list:
        """This process's rows of each batch of a run (leaves ``(m, batch, ...)``)."""
        if not self.shard_by_process:
            return run
        mine = self._process_rows(run[0].shape[1])
        return [x[:, mine] for x in run]

    def _chunks(self, order: np.ndarray | None, start: int, stop: int, k: int) -> Iterator[list]:
        """The rows of batches ``start`` to ``stop`` in ``order``, gathered a chunk of whole
        runs of ``k`` batches (about 1 MiB) at a time into 64-byte-aligned buffers: one numpy
        call per chunk instead of per batch, and aligned host buffers are what XLA:CPU takes
        without another copy (a per-batch gather cost ~10 % of a step). Without an order (no
        shuffle) the chunks are views of the arrays."""
        bs = self.batch_size
        row_bytes = sum(a[:1].nbytes for a in self._leaves) or 1
        per_chunk = max(1, (1 << 20) // (row_bytes * bs * k)) * k
        for c0 in range(start, stop, per_chunk):
            r0, r1 = c0 * bs, min(min(stop, c0 + per_chunk) * bs, self.num_examples)
            if order is None:
                yield [a[r0:r1] for a in self._leaves]
            else:
                yield [_aligned_take(a, order[r0:r1]) for a in self._leaves]

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
            f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}"
            + (", shard_by_process=True)" if self.shard_by_process else ")")
        )


def _aligned_take(a: Any, sel: np.ndarray) -> Any:
    if not isinstance(a, np.ndarray):
        return a[sel]
    shape = (len(sel), *a.shape[1:])
    nbytes = int(np.prod(shape)) * a.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    out = raw[off : off + nbytes].view(a.dtype).reshape(shape)
    np.take(a, sel, axis=0, out=out)
    return out


def num_batches(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def check_reiterable(data: Any, where: str) -> None:
    """A one-shot iterator (a generator, ``iter(x)``, ``map(...)``) cannot run a second epoch."""
    if isinstance(data, Iterator):
        raise ConfigError(
            f"{where} data is a one-shot {type(data).__name__}: it is exhausted after one pass, "
            "and each epoch needs a fresh one. Pass a re-iterable (a list of batches, an "
            "ArrayLoader, a torch DataLoader, a GrainLoader) or a zero-argument function that "
            "returns a new iterator, e.g. fit(module, lambda: make_batches(), ...)."
        )


def first_batch(data: Any, where: str = "train") -> Any:
    """The first batch of epoch 0 (converted like every other), checking ``data`` is usable."""
    if data is None:
        raise EmptyDataError(f"{where} data is None; pass an ArrayLoader or a list of batches.")
    check_reiterable(data, where)
    if num_batches(data) == 0:
        raise EmptyDataError(
            f"{where} data {type(data).__name__} has no batches (len 0); check the dataset "
            "size against batch_size and drop_last."
        )
    for batch in epoch_batches(data, 0):
        return batch
    raise EmptyDataError(f"{where} data {type(data).__name__} yielded no batch.")


def epoch_batches(
    data: Any, epoch: int, start: int = 0, limit: int | None = None, seed: int = 0
) -> Iterator[Any]:
    """An iterator over the batches of ``epoch`` of any supported source, from batch ``start``
    up to (not including) batch ``limit``.

    ``ArrayLoader``, ``GrainLoader`` (anything with ``iter_epoch``) jump straight to
    ``start``. A zero-argument callable is called for a fresh iterable each epoch. Other
    sources get ``set_epoch(epoch)`` when they have it, and a torch ``DataLoader`` its
    sampler's epoch and, when it shuffles, an order seeded from ``(seed, epoch)``
    (``adapters.seed_torch_sampler``); they are re-iterated, skipping ``start`` batches,
    which is exact when the source is deterministic for a given epoch. Their batches go
    through ``adapters.adapt``: torch tensors and other array-likes become numpy, dataclass
    batches get registered as pytrees.
    """
    if limit is not None and start >= limit:
        return iter(())
    if hasattr(data, "iter_epoch"):
        it = data.iter_epoch(epoch, start)
    else:
        fresh = False
        if callable(data) and not isinstance(data, Iterable):
            data = data()  # a zero-argument factory makes a fresh iterable per epoch
            fresh = True
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        seed_torch_sampler(data, seed, epoch)
        it = iter(data)
        if it is data and epoch > 0 and not fresh:
            # A generator or iterator is exhausted after one pass; epoch 0 may use it once.
            raise ConfigError(
                f"train/val data {type(data).__name__} is a one-shot iterator: it cannot be "
                "iterated again for another epoch. Pass a re-iterable (a list, an ArrayLoader, "
                "a DataLoader) or a zero-argument function that returns a fresh iterator."
            )
        it = adapt(it)
        if start:
            it = itertools.islice(it, start, None)
    if limit is not None:
        it = itertools.islice(it, limit - start)
    return it


def loader_state(data: Any, epoch: int, batch: int) -> dict:
    """What a checkpoint saves of the train data at (``epoch``, ``batch`` batches trained).

    A loader with ``state_at(epoch, batch)`` (``GrainLoader``) reports the state at exactly
    that position, not where its iterator has read ahead to (prefetch, a short last batch);
    otherwise ``state_dict()`` when it has one.
    """
    if hasattr(data, "state_at"):
        return data.state_at(epoch, batch)
    if hasattr(data, "state_dict"):
        return data.state_dict()
    return {}


def take_batches(data: Any, n: int) -> list:
    """The first ``n`` batches of epoch 0 as a list (``Trainer(overfit_batches=n)``)."""
    out = list(epoch_batches(data, 0, limit=n))
    if not out:
        raise EmptyDataError(f"overfit_batches={n}: the train data yielded no batch.")
    return out


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

    @property
    def nbytes(self) -> int:
        """Bytes of a batch of the first batch's size."""
        return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in self.specs)

    def check(self, batch: Any, index: int) -> list:
        leaves, treedef = jax.tree.flatten(batch)
        if treedef != self.treedef:
            raise BatchError(
                f"{self.where} batch {index} has structure {treedef}, but the first batch had "
                f"{self.treedef}. Every batch must be the same kind of pytree (same keys)."
            )
        for i, (x, (shape, dtype)) in enumerate(zip(leaves, self.specs, strict=True)):
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
            detail = ", ".join(
                f"{p}: {x.shape[0]}" for p, x in zip(self.paths, leaves, strict=True) if x.ndim
            )
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
