"""Errors nnxfit raises. Each message names the thing, the value and the fix."""

from __future__ import annotations

import numbers
from typing import Any


class NnxfitError(Exception):
    """Base class of every error nnxfit raises on purpose."""


class ConfigError(NnxfitError, ValueError):
    """A Trainer or callback option is out of range or contradicts another."""


class BatchError(NnxfitError, ValueError):
    """A batch differs in structure, dtype or trailing shape from the first one."""


class EmptyDataError(NnxfitError, ValueError):
    """A loader yielded no batch."""


class StepOutputError(NnxfitError, TypeError):
    """``training_step`` or ``validation_step`` returned something of the wrong form."""


class CheckpointError(NnxfitError, ValueError):
    """A checkpoint is missing, corrupt, or does not match the module."""


class NonFiniteError(NnxfitError, FloatingPointError):
    """A loss or gradient became NaN or infinite (raised by ``NaNGuard(action="raise")``)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class RollbackError(NonFiniteError):
    """``NaNGuard`` / ``SpikeGuard`` with ``action="rollback"`` gave up: ``max_rollbacks``
    were spent, or no checkpoint before the bad steps was there to go back to. ``.step`` is
    the first bad step of the run that could not be rolled back."""


class TrainingInterrupted(NnxfitError, KeyboardInterrupt):
    """``fit`` stopped on SIGTERM or SIGINT after saving; resume with ``fit(..., resume=True)``.

    A ``KeyboardInterrupt`` subclass so that code which already stops cleanly on Ctrl-C
    keeps doing so; ``except Exception`` does not swallow it. Uncaught, it ends the process by
    ``signum`` (a shell sees 130 or 143; ``nnxfit.interrupt``).
    """

    def __init__(self, message: str, step: int | None = None, signum: int | None = None):
        super().__init__(message)
        self.step = step
        self.signum = signum


class WorkdirLockedError(NnxfitError, RuntimeError):
    """Another fit holds the workdir (``nnxfit.workdir``); the message names its pid and host."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


class ProcessSyncError(NnxfitError, RuntimeError):
    """The processes of a multi-process fit could not agree in time (one is gone or stuck;
    ``nnxfit.multihost``)."""


class CallbackError(NnxfitError, RuntimeError):
    """Wraps nothing: kept for callbacks that want to fail with an nnxfit error."""


def positive_int(what: str, value: Any, *, allow_none: bool = False, hint: str = "") -> int | None:
    """``value`` as an ``int`` >= 1 (``None`` passes when ``allow_none``), else a
    ``ConfigError`` naming ``what``, the value and what it takes (``hint`` adds to that). The
    one check of every count-like option (Trainer options, callbacks' step counts)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{what} must be an integer >= 1{hint}; got {value!r}.")
    return int(value)
