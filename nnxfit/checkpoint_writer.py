"""The asynchronous writer behind ``ModelCheckpoint``: one orbax ``CheckpointManager``, the save
in flight, the seal that makes it verifiable, and the report when it fails.

A save (``Writer.save``) returns once the arrays are off the device; orbax writes them in its
background thread. Before orbax renames ``<step>.orbax-checkpoint-tmp`` to ``<step>`` (its
commit), that thread runs ``Writer._seal``: it waits for the save's gate, then writes the
checksum manifest (``nnxfit.integrity``). The gate of a save started from
``on_train_batch_end`` opens at ModelCheckpoint's next hook, after every other callback has
run its hook for that step: the CSV row of the checkpoint's step is on disk before the
checkpoint is, so a run killed right after the commit and resumed from it lost no row.

A background write that fails (disk full, a folder made read-only, a file size limit) is
reported once, as a ``CheckpointError`` naming the step whose save failed and why, at the
first ModelCheckpoint hook after orbax's thread ended (``poll``), or when the next save or the
end of fit waits for it. Orbax's own tracebacks of that failure (100-330 lines from four of its
threads) are not printed while a Writer is open; the failed save's tmp folder is removed (it
never was a checkpoint); the complete checkpoints are untouched.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from typing import Any

from nnxfit.errors import CheckpointError

# The longest a commit waits for the hooks of its step to finish: past it the checkpoint
# commits anyway (a hook that long is rare; the row it delays is then only as safe as before).
GATE_TIMEOUT_S = 60.0

# What orbax logs, with a traceback each, when a background save fails; the Writer reports
# the failure itself.
_FAILURE_LOGS = (
    "_SignalingThread.run() raised an exception",
    "Handler Commit operations or the Commit callback in background save thread",
    "[wait_until_finished] Save Finalize thread",
    "Checkpointer failed: one or more items may not be",
)
_open_writers = 0
_count_lock = threading.Lock()


class _QuietFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not _open_writers:
            return True
        msg = str(record.msg)
        return not any(p in msg for p in _FAILURE_LOGS)


logging.getLogger("absl").addFilter(_QuietFailures())


class _Flight:
    """The save orbax is writing: its step, id and the gate its commit waits for."""

    def __init__(self, step: int, save_id: str, hold: bool):
        self.step, self.save_id = step, save_id
        self.gate = threading.Event()
        if not hold:
            self.gate.set()


class Writer:
    """An orbax manager writing ``directory`` and the save it has in flight (at most one:
    orbax starts a save only after the previous one is committed)."""

    def __init__(self, directory: str, **manager_options: Any):
        from nnxfit.checkpoint import open_manager

        global _open_writers
        self.directory = directory
        self._flight: _Flight | None = None
        self.manager = open_manager(directory, on_commit=self._seal, **manager_options)
        with _count_lock:
            _open_writers += 1
        self._open = True

    # -- saving ---------------------------------------------------------------------------
    def save(self, trainer, step: int, *, hold: bool = False, **kwargs: Any) -> bool:
        """Starts the save of ``step`` (``nnxfit.checkpoint.save_state``). ``hold``: its
        commit waits for ``release`` (the hooks of the step it was taken at)."""
        from nnxfit.checkpoint import save_state
        from nnxfit.integrity import new_save_id

        self.wait()  # the previous save: committed, or its failure reported as its own
        flight = _Flight(step, new_save_id(), hold)
        self._flight = flight
        try:
            started = save_state(self.manager, trainer, step, save_id=flight.save_id, **kwargs)
        except Exception as e:
            self._flight = None
            self.manager.reload()  # orbax's list of steps is stale after a failed save
            raise CheckpointError(
                f"ModelCheckpoint could not save step {step} to {self.directory}: "
                f"{_reason(e)}. The previous complete checkpoints are kept."
            ) from e
        if not started:
            self._flight = None
        return started

    def _seal(self) -> None:
        """Orbax's background thread, every item finalized, before the step folder's rename:
        waits for the gate, then writes the checksum manifest into the folder."""
        from nnxfit.checkpoint import TMP_MARKER
        from nnxfit.integrity import write_manifest

        flight = self._flight
        if flight is None:  # pragma: no cover - every save sets its flight first
            raise CheckpointError("ModelCheckpoint: a save committed without being started.")
        flight.gate.wait(GATE_TIMEOUT_S)
        step_dir = os.path.join(self.directory, f"{flight.step}{TMP_MARKER}")
        if not os.path.isdir(step_dir):
            raise CheckpointError(
                f"ModelCheckpoint: orbax's folder {step_dir} for the save in flight does not "
                "exist; this orbax-checkpoint version names it otherwise (pinned in "
                "pyproject.toml)."
            )
        write_manifest(step_dir, flight.save_id, flight.step)

    def release(self) -> None:
        """Lets the save in flight commit (the hooks of its step are done)."""
        flight = self._flight
        if flight is not None:
            flight.gate.set()

    # -- waiting and failures -------------------------------------------------------------
    def poll(self) -> None:
        """Raises the failure of the save in flight if orbax's thread has already ended with
        one; never waits."""
        if self._flight is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Waits until the save in flight is committed; raises ``CheckpointError`` naming its
        step when it failed."""
        flight = self._flight
        if flight is None:
            return
        flight.gate.set()  # nothing of its step is still to come once someone waits
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._flight = None
            self._failed(flight.step, e)
        self._flight = None

    def _failed(self, step: int, error: BaseException):
        from nnxfit.checkpoint import TMP_MARKER, list_steps

        self._drain()
        self.manager.reload()
        # Never a checkpoint, and most likely what filled the disk.
        shutil.rmtree(os.path.join(self.directory, f"{step}{TMP_MARKER}"), ignore_errors=True)
        kept = list_steps(self.directory)
        raise CheckpointError(
            f"ModelCheckpoint: the checkpoint of step {step} could not be written to "
            f"{self.directory}: {_reason(error)}. The complete checkpoints "
            f"{kept if kept else '(none yet)'} are kept; resume from the newest with "
            "fit(..., resume=True) once the cause is fixed."
        ) from error

    def _drain(self) -> None:
        """Orbax stops waiting at the first of a save's writes that fails; the others run on
        in their threads (and would log, write into the tmp folder, outlive the fit). Waits
        for them; their own failures are the same one's."""
        checkpointer = getattr(self.manager, "_checkpointer", None)
        futures = getattr(getattr(checkpointer, "_async_manager", None), "_commit_futures", None)
        for f in futures or ():
            try:
                f.result(timeout=GATE_TIMEOUT_S)
            except Exception:  # noqa: S110 - the save's failure is reported once, by the caller
                pass

    def close(self) -> None:
        """Waits for the save in flight (raising its failure) and closes the manager."""
        global _open_writers
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            finally:
                if self._open:
                    self._open = False
                    with _count_lock:
                        _open_writers -= 1


_REASONS = {
    errno.ENOSPC: "disk full (No space left on device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "a file exceeds the largest size allowed (File too large: a file system or "
    "ulimit -f limit)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}


def _reason(error: BaseException) -> str:
    """Why a save failed, in a line: the OS error if there is one (disk full first)."""
    seen, chain = set(), []
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in _REASONS:
            return _REASONS[e.errno]
    text = " ".join(str(e) for e in chain)
    for code, reason in _REASONS.items():
        # TensorStore reports OS errors as text: "... [os_error_code='28']"
        if f"os_error_code='{code}'" in text or os.strerror(code) in text:
            return reason
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return first if len(first) <= 400 else first[:400] + " ..."
