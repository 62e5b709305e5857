"""The fit's callbacks from the Trainer's and the module's ``configure_callbacks()``."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from nnxfit.callbacks.base import Callback

logger = logging.getLogger("nnxfit.callbacks")


def merge_callbacks(trainer_callbacks: Iterable[Callback], module_callbacks: Any) -> list:
    """The fit's callbacks: the Trainer's (its defaults and ``Trainer(callbacks=...)``), then
    what the module's ``configure_callbacks()`` returned (a list, one callback, or None).

    Lightning's rule (``_attach_model_callbacks``): a module callback replaces every Trainer
    callback of exactly its type, and the log says which (INFO, ``nnxfit.callbacks``). Two
    ModelCheckpoints, one passed to the Trainer and one declared on the module, thus write
    one folder, not both (``ModelCheckpoint`` refuses two that would)."""
    if module_callbacks is None:
        module_callbacks = []
    elif isinstance(module_callbacks, Callback):
        module_callbacks = [module_callbacks]
    module_callbacks = list(module_callbacks)
    trainer_callbacks = list(trainer_callbacks)
    replaced = {type(c) for c in module_callbacks} & {type(c) for c in trainer_callbacks}
    if replaced:
        logger.info(
            "configure_callbacks() returned %s, which replace%s the Trainer's callbacks of the "
            "same type.",
            ", ".join(sorted(t.__name__ for t in replaced)),
            "s" if len(replaced) == 1 else "",
        )
    return [c for c in trainer_callbacks if type(c) not in replaced] + module_callbacks
