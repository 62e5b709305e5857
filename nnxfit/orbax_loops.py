"""Orbax's event loops end with nothing of theirs still running.

Orbax (0.12.8) runs each coroutine of a save in a fresh event loop
(``asyncio_utils._run_sync_via_new_loop``: ``run_until_complete`` then ``close``; it avoids
``asyncio.run`` for a thread-safety reason of its own), in the calling thread or in one of its
background commit threads. Unlike ``asyncio.run``, that teardown leaves two things behind:

* The tasks still pending. A save gathers one write per array (``asyncio.gather`` without
  ``return_exceptions``): when one fails (disk full), the coroutine raises at once and the loop
  closes while TensorStore still runs the other writes. Their completions then hit a closed
  loop (``RuntimeError: Event loop is closed`` tracebacks from TensorStore's callbacks) or are
  never awaited (``ERROR:asyncio:Future exception was never retrieved``, one per array), and
  they go on writing into the failed save's folder.
* The loop's default executor (threads ``asyncio_0``, ``asyncio_1``, ... that orbax's
  ``asyncio.to_thread`` calls start): ``close`` only signals it (``shutdown(wait=False)``), so
  its threads outlive the save, and the fit, by as long as the machine takes to schedule them.

``install`` replaces that function by one that, before the loop closes, runs it until every
task of the loop has ended (or ``TASK_TIMEOUT_S`` passed; the rest is then cancelled) and
joins the default executor, as ``asyncio.run`` does. The save's failure still propagates,
once, as the coroutine's exception; the other writes' failures are that same one.
"""

from __future__ import annotations

import asyncio
from typing import Any

# The longest a failed coroutine's remaining tasks (TensorStore writes finishing or failing)
# are waited for before they are cancelled.
TASK_TIMEOUT_S = 60.0

_original: Any = None


def install() -> None:
    global _original
    if _original is not None:
        return
    try:
        from orbax.checkpoint._src import asyncio_utils
    except ImportError:  # pragma: no cover - orbax-checkpoint is pinned
        return
    original = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
    if original is None:  # pragma: no cover - another orbax version: run_sync differs
        return
    _original = original
    asyncio_utils._run_sync_via_new_loop = run_in_new_loop


def uninstall() -> None:
    global _original
    if _original is None:
        return
    from orbax.checkpoint._src import asyncio_utils

    asyncio_utils._run_sync_via_new_loop = _original
    _original = None


def run_in_new_loop(coro):
    """``asyncio_utils._run_sync_via_new_loop``: runs ``coro`` in a fresh loop and ends the
    loop's other tasks and executor threads before closing it."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            if _finish_tasks(loop):
                loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _finish_tasks(loop: asyncio.AbstractEventLoop) -> bool:
    """Runs ``loop`` until its pending tasks have ended; True when they all did (then no
    executor thread is busy for them)."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return True
    _, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=TASK_TIMEOUT_S))
    if pending:
        for task in pending:
            task.cancel()
        _, pending = loop.run_until_complete(asyncio.wait(pending, timeout=TASK_TIMEOUT_S))
    for task in tasks - pending:
        if not task.cancelled():
            task.exception()  # retrieved: the coroutine's own exception reports the failure
    return not pending
