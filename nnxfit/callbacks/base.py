"""The callback protocol and the dispatcher the Trainer uses to call it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nnxfit.errors import ConfigError
from nnxfit.step import StepFeatures
from nnxfit.warn import warn

# The ``trainer`` every hook receives is an ``nnxfit.Trainer``. This module sits below the
# Trainer (which imports it), so it names the type without importing it.
Trainer = Any

HOOKS = (
    "on_fit_start",
    "on_fit_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_train_batch_end",
    "on_validation_start",
    "on_validation_end",
    "on_test_start",
    "on_test_end",
    "on_interrupt",
    "on_exception",
)


def _legacy(callback: Any, name: str) -> bool | None:
    """The value ``callback`` (or a subclass of ``Callback`` it is an instance of) gives the
    deprecated switch ``name``; None when nothing does."""
    if name in vars(callback):
        return bool(vars(callback)[name])
    for cls in type(callback).__mro__:
        if cls is Callback:
            return None
        if name in cls.__dict__:
            return bool(cls.__dict__[name])
    return None


def _deprecated(name: str) -> property:
    def get(self) -> bool:
        value = _legacy(self, name)
        return not self.records_only if value is None else value

    def set_(self, value: bool) -> None:
        self.__dict__[name] = bool(value)

    doc = (
        f"Deprecated: set ``records_only`` instead. ``{name} = False`` still works: with "
        "both old switches False the callback is ``records_only``; ``reads_module = False`` "
        "alone spares the module write-back before its hooks."
    )
    return property(get, set_, doc=doc)


_WARNED: set[type] = set()


def switches(callback: Any) -> tuple[bool, bool]:
    """``(records_only, reads_module)`` of ``callback``, the deprecated switches folded in
    (warning once per class that sets them): records only when ``records_only`` says so or
    both old switches are False (their old meaning); the module is written back for it unless
    it records only or set ``reads_module = False``."""
    reads, barrier = _legacy(callback, "reads_module"), _legacy(callback, "epoch_end_barrier")
    if reads is None and barrier is None:
        return callback.records_only, not callback.records_only
    cls = type(callback)
    if cls not in _WARNED:
        _WARNED.add(cls)
        old = [
            n for n, v in (("reads_module", reads), ("epoch_end_barrier", barrier)) if v is not None
        ]
        warn(
            f"{cls.__name__} sets {' and '.join(old)}, deprecated: set records_only = True on a "
            "callback whose hooks only record (then the device runs ahead of them), or leave "
            "it False and narrow needs_sync.",
            DeprecationWarning,
        )
    records = callback.records_only or (reads is False and barrier is False)
    return records, not records and reads is not False


class Callback:
    """Base class: every hook is a no-op; override the ones you need.

    Class attributes a subclass may set:

    * ``order``: lower runs first (the NaN guard runs before checkpoints, so a bad state is
      never saved; loggers run last so they see what others logged).
    * ``records_only``: ``True`` promises that the hooks only record (logs, counters, clocks,
      files): they neither read nor change the training state or the module. The Trainer
      then never waits for the device before them nor writes the module back for them: the
      device runs a few calls ahead, and the hooks see every step, epoch and log in order, a
      little later, so a log fetch never leaves the device idle. Such a hook must not stop
      the fit either, unless the device has already frozen the state, as ``NaNGuard``'s step
      does: the calls dispatched after the stop are then forgotten, and the fit ends where it
      was seen. Any other callback sees the device in step at the events of its hooks, the
      module written back, unless ``needs_sync`` narrows which events those are.
    * ``step_features``: names of quantities the jitted step must compute for this callback:
      ``"grad_norm"``, ``"module_grad_norms"``, ``"finite"``, ``"skip_nonfinite"``, ``"lr"``;
      or a ``step.StepFeatures`` for the features with values (``EMA``, ``SpikeGuard``).
      They reach ``logs`` at the next log interval with no per-step host sync.

    A callback that adds metrics to the logs (``logs["loss_ema"] = ...``) says so in
    ``logged_metrics``: the names are then known at fit start, so ``EarlyStopping``,
    ``ModelCheckpoint`` and ``ReduceLROnPlateau`` may monitor them whatever the order of the
    callbacks, and a misspelt monitor fails before training.

    A callback whose state must survive a resume implements ``state_dict`` and
    ``load_state_dict`` (plain Python data: numbers, strings, lists, dicts).
    """

    order: int = 0
    records_only: bool = False
    step_features: frozenset[str] | StepFeatures = frozenset()
    # The two switches ``records_only`` replaced, read and set as before (``_deprecated``).
    reads_module = _deprecated("reads_module")
    epoch_end_barrier = _deprecated("epoch_end_barrier")

    def on_fit_start(self, trainer: Trainer, module) -> None:
        pass

    def on_fit_end(self, trainer: Trainer, module) -> None:
        pass

    def on_train_epoch_start(self, trainer: Trainer, module, epoch: int) -> None:
        pass

    def on_train_epoch_end(self, trainer: Trainer, module, epoch: int, logs: dict) -> None:
        pass

    def on_train_batch_end(self, trainer: Trainer, module, step: int, logs: dict) -> None:
        """After each jitted call (K steps with ``steps_per_execution=K``).

        ``logs`` holds host floats on log steps (every ``log_every_n_steps``) and is empty
        between them: that is what keeps the device running ahead of the host.
        """

    def on_validation_start(self, trainer: Trainer, module) -> None:
        pass

    def on_validation_end(self, trainer: Trainer, module, logs: dict) -> None:
        pass

    def on_test_start(self, trainer: Trainer, module) -> None:
        """``Trainer.test`` is about to run ``test_step`` over its data."""

    def on_test_end(self, trainer: Trainer, module, logs: dict) -> None:
        """``Trainer.test`` is done; ``logs`` holds its ``test_*`` metrics."""

    def on_interrupt(self, trainer: Trainer, module) -> None:
        """SIGTERM/SIGINT arrived; the step in flight finished. Save what must survive."""

    def on_exception(self, trainer: Trainer, module, error: BaseException) -> None:
        pass

    def needs_sync(self, trainer: Trainer, event: str, step: int, n_steps: int) -> bool:
        """Whether the hook for ``event`` must see the device in step with it: nothing
        dispatched past the call that ends at ``step`` (``n_steps`` steps long). ``event`` is
        ``"batch"``, ``"epoch_start"`` or ``"epoch_end"``. Asked at dispatch time, and only of
        callbacks on that hook that are not ``records_only``.
        The default, always, is safe; narrow it to let the device run ahead in between (as
        ``ModelCheckpoint`` does for the steps it does not save at)."""
        return True

    def logged_metrics(self, trainer: Trainer) -> Iterable[str]:
        """Names of the metrics this callback adds to the logs (asked at fit start, when the
        fit is set up). Declared names can be monitored by other callbacks; a callback that
        declares any runs before the undeclaring ones of its ``order``, so its epoch-end
        values are in the logs when a monitor of the same ``order`` reads them."""
        return ()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    @property
    def state_key(self) -> str:
        """Key under which this callback's state is checkpointed (class name by default)."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def overrides(callback: Callback, hook: str) -> bool:
    return getattr(type(callback), hook, None) is not getattr(Callback, hook)


def as_callbacks(callbacks: Any, where: str = "Trainer(callbacks=...)") -> list[Callback]:
    """``callbacks`` as a list: one ``Callback`` or an iterable of them (or ``None``). Anything
    else is refused here, where the mistake is made, naming the item and the fix."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        return [callbacks]
    if isinstance(callbacks, str | bytes | Mapping) or not isinstance(callbacks, Iterable):
        _refuse(callbacks, where, None)
    out = list(callbacks)
    for i, cb in enumerate(out):
        if not isinstance(cb, Callback):
            _refuse(cb, where, i)
    return out


def _refuse(value: Any, where: str, index: int | None) -> None:
    what = "" if index is None else f" item {index}"
    if isinstance(value, type) and issubclass(value, Callback):
        raise ConfigError(
            f"{where}{what} is the class {value.__name__}, not a callback; instantiate it: "
            f"{value.__name__}(...)."
        )
    raise ConfigError(
        f"{where} takes a Callback or a list of Callbacks;{what} got {value!r} of type "
        f"{type(value).__name__}. Subclass nnxfit.Callback, or wrap functions in "
        "nnxfit.callbacks.LambdaCallback."
    )


class CallbackList:
    """Calls hooks in ``order``; only callbacks that override a hook are ever called."""

    def __init__(self, callbacks: Iterable[Callback]):
        cbs = list(callbacks)
        for cb in cbs:
            if not isinstance(cb, Callback):
                raise TypeError(
                    f"callbacks must be nnxfit.Callback instances; got {cb!r} of type "
                    f"{type(cb).__name__}. Subclass nnxfit.Callback or use LambdaCallback."
                )
        # Stable sort keeps the user's order among equals; among those, callbacks that declare
        # logged metrics come first, so that a monitor of the same order finds their values.
        self.callbacks = sorted(cbs, key=lambda c: (c.order, not overrides(c, "logged_metrics")))
        self._by_hook = {h: [c for c in self.callbacks if overrides(c, h)] for h in HOOKS}
        # Looked up on every call of a hook: computed once, not per step.
        records, reads = {}, {}
        for c in self.callbacks:
            records[id(c)], reads[id(c)] = switches(c)
        by_hook = self._by_hook.items()
        self._reads = {h: any(reads[id(c)] for c in cbs) for h, cbs in by_hook}
        self._syncing = {h: [c for c in cbs if not records[id(c)]] for h, cbs in by_hook}

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self):
        return len(self.callbacks)

    def for_hook(self, hook: str) -> list[Callback]:
        return self._by_hook[hook]

    def syncing(self, hook: str) -> list[Callback]:
        """The callbacks on ``hook`` that are not ``records_only``: the Trainer asks them
        ``needs_sync`` before it dispatches past one of their hooks."""
        return self._syncing[hook]

    def needs_module(self, hook: str) -> bool:
        """Whether a callback on ``hook`` may read the module: the Trainer writes the device
        state back to it before the hook, at the events in step with the device."""
        return self._reads[hook]

    def step_features(self) -> StepFeatures:
        """What the train step computes for these callbacks (each one's ``step_features``,
        checked: an unknown name is an error naming the callback)."""
        out = StepFeatures()
        for c in self.callbacks:
            f = c.step_features
            if f:
                owner = type(c).__name__
                mine = f if isinstance(f, StepFeatures) else StepFeatures.from_names(f, owner)
                out = out.merge(mine, owner)
        return out

    def _keys(self) -> list[str]:
        seen: dict[str, int] = {}
        keys = []
        for c in self.callbacks:
            seen[c.state_key] = seen.get(c.state_key, 0) + 1
            n = seen[c.state_key]
            keys.append(c.state_key if n == 1 else f"{c.state_key}_{n}")
        return keys

    def state_dicts(self) -> dict[str, dict]:
        """Every stateful callback's ``state_dict``, keyed by class name (``_2`` for a second)."""
        return {
            k: s
            for k, c in zip(self._keys(), self.callbacks, strict=False)
            if (s := c.state_dict())
        }

    def load_state_dicts(self, states: Mapping[str, Mapping]) -> None:
        for k, c in zip(self._keys(), self.callbacks, strict=False):
            if k in states:
                c.load_state_dict(states[k])
