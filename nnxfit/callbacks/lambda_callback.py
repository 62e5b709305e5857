"""``LambdaCallback``: one-off hooks as plain functions, without writing a class.

Each function has the signature of the hook it replaces, ``(trainer, module, ...)``::

    LambdaCallback(on_train_epoch_end=lambda trainer, module, epoch, logs: print(epoch, logs))

The Trainer calls only hooks a callback's class overrides (``base.overrides``), so each
instance gets its own subclass holding only the hooks it was given: a hook not given costs
nothing, exactly as for a hand-written ``Callback`` subclass.
"""

from __future__ import annotations

from collections.abc import Callable

from nnxfit.callbacks.base import Callback


class LambdaCallback(Callback):
    """A callback built from functions: ``LambdaCallback(on_fit_start=fn, ...)``.

    ``order`` and ``records_only`` work as on any callback; pass ``records_only=True`` when
    the functions only record (log, count, time): the device then runs ahead of them and the
    Trainer never writes its state back to the module for them (worth it for
    ``on_train_batch_end``). ``reads_module`` is the deprecated switch it replaced.
    """

    def __init__(
        self,
        on_fit_start: Callable | None = None,
        on_fit_end: Callable | None = None,
        on_train_epoch_start: Callable | None = None,
        on_train_epoch_end: Callable | None = None,
        on_train_batch_end: Callable | None = None,
        on_validation_start: Callable | None = None,
        on_validation_end: Callable | None = None,
        on_test_start: Callable | None = None,
        on_test_end: Callable | None = None,
        on_interrupt: Callable | None = None,
        on_exception: Callable | None = None,
        *,
        order: int = 0,
        records_only: bool = False,
        reads_module: bool | None = None,
    ):
        hooks = dict(
            on_fit_start=on_fit_start,
            on_fit_end=on_fit_end,
            on_train_epoch_start=on_train_epoch_start,
            on_train_epoch_end=on_train_epoch_end,
            on_train_batch_end=on_train_batch_end,
            on_validation_start=on_validation_start,
            on_validation_end=on_validation_end,
            on_test_start=on_test_start,
            on_test_end=on_test_end,
            on_interrupt=on_interrupt,
            on_exception=on_exception,
        )
        given = {name: fn for name, fn in hooks.items() if fn is not None}
        for name, fn in given.items():
            if not callable(fn):
                raise TypeError(
                    f"LambdaCallback({name}=...) must be a function (trainer, module, ...); "
                    f"got {fn!r} of type {type(fn).__name__}."
                )
        self.functions = given
        attrs: dict = {name: staticmethod(fn) for name, fn in given.items()}
        cls = type(self)
        attrs.update(order=order, records_only=records_only, __qualname__=cls.__qualname__)
        if reads_module is not None:  # deprecated (``Callback.reads_module``)
            attrs["reads_module"] = reads_module
        # A subclass per instance: class-level overrides are what the dispatcher looks at.
        self.__class__ = type(cls.__name__, (cls,), attrs)

    def __repr__(self) -> str:
        hooks = ", ".join(f"{n}={getattr(f, '__name__', f)!s}" for n, f in self.functions.items())
        return f"LambdaCallback({hooks})"
