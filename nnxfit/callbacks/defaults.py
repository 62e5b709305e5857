"""The callbacks every fit (and ``Trainer.test``) gets unless the user passed their own kind."""

from __future__ import annotations

from nnxfit.callbacks.base import Callback, as_callbacks
from nnxfit.callbacks.compile_watch import CompileWatch
from nnxfit.callbacks.csv_logger import CSVLogger
from nnxfit.callbacks.progress import ProgressBar
from nnxfit.modes import FrozenStatsCheck


def default_callbacks(config, user: list[Callback]) -> list[Callback]:
    """For a Trainer with options ``config`` (``config.TrainerConfig``) and the user's
    callbacks ``user``: a progress bar (``progress_bar``), a ``CSVLogger`` (with a workdir,
    not under ``fast_dev_run``), ``CompileWatch`` (compile times, mid-fit recompiles) and
    ``FrozenStatsCheck`` (BatchNorm statistics that never move), each only where ``user``
    has none of its kind."""

    def mine(kind: type) -> bool:
        return not any(isinstance(c, kind) for c in user)

    out: list[Callback] = []
    if config.progress_bar and mine(ProgressBar):
        out.append(ProgressBar(console=config.console))
    if config.workdir is not None and not config.fast_dev_run and mine(CSVLogger):
        out.append(CSVLogger())
    if mine(CompileWatch):
        out.append(CompileWatch())
    if mine(FrozenStatsCheck):
        out.append(FrozenStatsCheck())
    return out


def module_callbacks(module) -> list[Callback]:
    """What ``module.configure_callbacks()`` returns, as a checked list."""
    return as_callbacks(
        module.configure_callbacks(), f"{type(module).__name__}.configure_callbacks()"
    )
