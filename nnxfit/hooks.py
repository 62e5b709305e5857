"""Calling the callbacks' hooks of a fit: bound to the ``Trainer`` as ``_hook``."""

from __future__ import annotations

from nnxfit.warn import warn


def call_hook(
    trainer, name: str, *args, guard: bool = False, defer: bool = False, in_step: bool = True
) -> None:
    """Runs hook ``name`` of every callback that overrides it, in order.

    ``guard``: a failing callback only warns (an error is already on its way out).
    ``defer``: every callback runs, then the first failure is raised (cleanup hooks).
    ``in_step``: the device is in step with the hook, so the module is written back for
    callbacks that may read it (not between the events ``needs_sync`` let run ahead), and
    what a hook assigned to the module is adopted after."""
    cbs = trainer.cb.for_hook(name)
    if not cbs:
        return
    needs_module = in_step and trainer.fitting and trainer.cb.needs_module(name)
    if needs_module:
        trainer._sync_to_module()
    first = None
    for cb in cbs:
        try:
            getattr(cb, name)(trainer, trainer.module, *args)
        except Exception as e:
            if guard or (defer and first is not None):
                warn(f"{type(cb).__name__}.{name} raised {e!r}")
                continue
            e.add_note(f"(raised in callback {type(cb).__name__}.{name})")
            if not defer:
                raise
            first = e
    if needs_module:
        trainer._carry.from_module()
    if first is not None:
        raise first
