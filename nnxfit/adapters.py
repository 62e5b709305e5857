"""Batches from other data pipelines, as the pytrees of numpy arrays the Trainer feeds to jit.

* torch ``DataLoader``: CPU tensors become numpy arrays that share their memory
  (``tensor.numpy()``); bfloat16 tensors are reinterpreted as ``ml_dtypes.bfloat16`` without a
  copy. torch is never imported here: a tensor can only exist if the user imported it.
* ``tf.data`` / anything whose leaves implement ``__array__``: ``np.asarray`` per leaf.
* dataclass batches: the dataclass is registered as a jax pytree (once, globally) so that
  ``training_step`` receives the same dataclass back with array fields.
* grain: ``GrainLoader`` keeps one grain iterator across epochs and saves its exact position in
  checkpoints.

``converter_for(first_batch)`` decides once per pass from the first batch, so numpy batches
pay nothing per batch.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from nnxfit.errors import BatchError, ConfigError
from nnxfit.warn import warn

_REGISTERED: set[type] = set()
_ENDLESS = 2**48  # a length this large means 'repeats forever'


# ============================================================================ conversion ===
def _is_torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def torch_to_numpy(t: Any) -> np.ndarray:
    """A numpy view of a CPU tensor (no copy); GPU tensors are copied to the host first."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_numpy(x: Any) -> Any:
    """One batch leaf as an array jax accepts; numpy and jax arrays pass through untouched."""
    if isinstance(x, np.ndarray | jax.Array):
        return x
    if _is_torch_tensor(x):
        return torch_to_numpy(x)
    if hasattr(x, "__array__"):  # tf EagerTensor, pandas, xarray, ...
        return np.asarray(x)
    return x


def seed_torch_sampler(data: Any, seed: int, epoch: int) -> None:
    """Makes a torch ``DataLoader``'s order a function of ``(seed, epoch)``.

    ``DataLoader(shuffle=True)`` draws each epoch's permutation from torch's global RNG (or from
    a generator it advances), which a resumed run cannot replay: its ``RandomSampler`` gets a
    generator seeded from ``(seed, epoch)`` before each pass instead. A sampler with
    ``set_epoch`` (``DistributedSampler``) gets the epoch, which torch leaves to the loop.
    """
    torch = sys.modules.get("torch")
    sampler = getattr(data, "sampler", None)
    if torch is None or sampler is None:
        return
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if isinstance(sampler, torch.utils.data.RandomSampler):
        state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]).generate_state(2)
        sampler.generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _needs_conversion(x: Any) -> bool:
    return not isinstance(x, np.ndarray | jax.Array) and (
        _is_torch_tensor(x) or hasattr(x, "__array__")
    )


def register_dataclass_batches(batch: Any) -> Any:
    """Registers every (nested) unregistered dataclass in ``batch`` as a jax pytree.

    Fields holding arrays (or containers, or None) in this batch become data; Python scalars
    and strings become static metadata, which must then be equal in every batch.
    """
    for _ in range(32):  # one level of nesting per round
        found = False
        for leaf in jax.tree.leaves(batch):
            if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
                _register(type(leaf), leaf)
                found = True
        if not found:
            return batch
    return batch


def _register(cls: type, example: Any) -> None:
    if cls in _REGISTERED:
        return
    data, meta = [], []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        v = getattr(example, f.name)
        is_meta = f.metadata.get("static", False) or isinstance(v, str | bytes | int | float)
        (meta if is_meta and not isinstance(v, np.generic) else data).append(f.name)
    try:
        jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise BatchError(
            f"batches are instances of dataclass {cls.__qualname__}, which nnxfit could not "
            f"register as a jax pytree ({e}). Register it yourself with "
            "jax.tree_util.register_dataclass, or yield a dict or tuple of arrays."
        ) from e
    _REGISTERED.add(cls)


def converter_for(batch: Any) -> Callable[[Any], Any] | None:
    """A function that turns batches shaped like ``batch`` into numpy pytrees, or ``None``
    when they already are (the common case costs nothing per batch)."""
    leaves = jax.tree.leaves(batch)
    if any(dataclasses.is_dataclass(x) and not isinstance(x, type) for x in leaves):
        register_dataclass_batches(batch)
        leaves = jax.tree.leaves(batch)
    if not any(_needs_conversion(x) for x in leaves):
        return None
    return lambda b: jax.tree.map(to_numpy, b)


def adapt(batches: Iterator[Any]) -> Iterator[Any]:
    """``batches`` with each batch converted as ``converter_for`` its first batch says."""
    for first in batches:
        convert = converter_for(first)
        if convert is None:
            yield first
            yield from batches
        else:
            yield convert(first)
            for b in batches:
                yield convert(b)
        return


# ================================================================================ grain ===
class GrainLoader:
    """A grain ``DataLoader``, ``MapDataset`` or ``IterDataset`` as ``fit`` data, with its
    iterator position saved in checkpoints so a resumed run continues exactly.

    grain's own model is one iterator for the whole run whose sampler (``num_epochs``, seed)
    decides the order and reshuffles between passes; ``GrainLoader`` keeps that one iterator
    across nnxfit epochs. An epoch is ``batches_per_epoch`` batches when given (required for
    an endless source: ``num_epochs=None`` or ``.repeat()``), otherwise one pass until the
    iterator is exhausted, after which the next epoch starts a new iterator.

    Pass it as ``train_data`` (or ``val_data``: validation always starts a new iterator).
    ``state_at(epoch, batch)`` is what the Trainer checkpoints: grain's iterator state right
    after that many batches of that epoch.
    """

    #: How many per-batch states are kept (covers prefetch and batches read ahead).
    history_size = 256

    def __init__(self, source: Any, *, batches_per_epoch: int | None = None):
        if not hasattr(source, "__iter__"):
            raise ConfigError(
                f"GrainLoader needs a grain DataLoader, MapDataset or IterDataset; got "
                f"{type(source).__name__}."
            )
        if batches_per_epoch is not None and (
            not isinstance(batches_per_epoch, int) or batches_per_epoch < 1
        ):
            raise ConfigError(f"batches_per_epoch must be an int >= 1; got {batches_per_epoch!r}.")
        self.source = source
        self.batches_per_epoch = batches_per_epoch
        if batches_per_epoch is None and _is_endless(source):
            raise ConfigError(
                f"GrainLoader got an endless {type(source).__name__} (num_epochs=None or "
                ".repeat()) without batches_per_epoch; pass batches_per_epoch=N so each epoch "
                "has an end."
            )
        self._it: Any = None  # the live grain iterator
        self._pos: tuple[int, int] = (0, 0)  # (epoch, batch) the live iterator is at
        self._states: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._pending: dict | None = None  # restored by load_state_dict, used at the next pass

    def _source_len(self) -> int | None:
        try:
            n = len(self.source)
        except TypeError:
            return None
        return None if n >= _ENDLESS else int(n)

    def __len__(self) -> int:
        if self.batches_per_epoch is not None:
            n = self._source_len()
            return self.batches_per_epoch if n is None else min(n, self.batches_per_epoch)
        n = self._source_len()
        if n is None:
            raise TypeError(f"the number of batches of {type(self.source).__name__} is unknown")
        return n

    # -- iteration ---------------------------------------------------------------------
    def _fresh(self, epoch: int) -> None:
        self._it = iter(self.source)
        self._pos = (epoch, 0)

    def _restore(self, saved: dict) -> None:
        self._it = iter(self.source)
        state = saved["iterator"]
        if state is not None:  # None: the saved position was the start of a new pass
            self._it.set_state(state.encode() if _wants_bytes(self._it) else state)
        self._pos = (int(saved["epoch"]), int(saved["batch"]))

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Batches of ``epoch`` from batch ``start`` on (exact after ``load_state_dict``)."""
        want = (int(epoch), int(start))
        pending, self._pending = self._pending, None
        if pending is not None:
            at = (int(pending["epoch"]), int(pending["batch"]))
            if at == want or (want == (at[0] + 1, 0) and self.batches_per_epoch is not None):
                self._restore(pending)
                self._pos = want if at != want else at
            elif want == (at[0] + 1, 0):
                self._fresh(epoch)  # the saved pass had ended; a new pass starts the epoch
            else:
                warn(
                    f"GrainLoader state was saved at epoch {at[0]} batch {at[1]} but training "
                    f"resumes at epoch {want[0]} batch {want[1]}; starting a new iterator and "
                    f"skipping {start} batches, exact only if grain's order is the same.",
                )
                self._it = None
        if self._it is None or self._pos != want:
            self._fresh(epoch)
            return self._run(epoch, 0, skip=start)
        return self._run(epoch, start)

    def _run(self, epoch: int, index: int, skip: int = 0) -> Iterator[Any]:
        token = object()
        self._owner = token
        it, limit = self._it, self.batches_per_epoch
        self._record(epoch, index, it)
        while limit is None or index < limit:
            try:
                batch = next(it)
            except StopIteration:
                if self._owner is token:  # the pass ended: the next epoch starts a new one
                    self._it, self._pos = None, (epoch + 1, 0)
                return
            index += 1
            if self._owner is not token:  # a newer pass took over this iterator
                return
            self._pos = (epoch, index)
            self._record(epoch, index, it)
            if skip:
                skip -= 1
                continue
            yield batch
        if self._owner is token:
            self._pos = (epoch + 1, 0)
            self._states[(epoch + 1, 0)] = self._states[(epoch, index)]

    def _record(self, epoch: int, index: int, it: Any) -> None:
        state = it.get_state()
        if isinstance(state, bytes):
            state = state.decode()
        self._states[(epoch, index)] = state
        while len(self._states) > self.history_size:
            self._states.popitem(last=False)

    def __iter__(self) -> Iterator[Any]:
        return self.iter_epoch(self._pos[0], self._pos[1])

    # -- checkpoint state --------------------------------------------------------------
    def state_at(self, epoch: int, batch: int) -> dict:
        """grain's iterator state right after ``batch`` batches of ``epoch`` were consumed."""
        key = (int(epoch), int(batch))
        if key not in self._states:
            if key[1] == 0:  # a new epoch that had not started: a fresh iterator
                return {"epoch": key[0], "batch": 0, "iterator": None}
            warn(
                f"GrainLoader has no iterator state for epoch {epoch} batch {batch} (it keeps "
                f"the last {self.history_size}); the checkpoint will restart that epoch's "
                "iterator and skip batches instead.",
            )
            return {}
        return {"epoch": key[0], "batch": key[1], "iterator": self._states[key]}

    def state_dict(self) -> dict:
        """The state at the live iterator's position (``state_at`` is the exact one)."""
        return self.state_at(*self._pos)

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state) if state and "iterator" in state else None

    def __repr__(self) -> str:
        return (
            f"GrainLoader({type(self.source).__name__}, batches_per_epoch={self.batches_per_epoch})"
        )


def _wants_bytes(it: Any) -> bool:
    # grain.DataLoaderIterator's state is JSON bytes; dataset iterators use dicts.
    return type(it).__name__ == "DataLoaderIterator"


def _is_endless(source: Any) -> bool:
    try:
        if len(source) >= _ENDLESS:  # MapDataset.repeat() (sys.maxsize, halved by .batch)
            return True
    except TypeError:
        pass
    sampler = getattr(source, "_sampler", None)  # grain.DataLoader(sampler=IndexSampler(...))
    return sampler is not None and getattr(sampler, "_num_epochs", 1) is None
