"""What ``fit`` does on SIGTERM and SIGINT (Ctrl-C).

* The first signal is noted in the fit's ``Signals`` and said at once, on stderr, with what
  will happen:
  the step the fit stops after and where it saves. The loop checks the flag before it sends
  each jitted call, around every epoch end and between validation batches. The calls already
  sent finish (the device cannot stop mid-program; with ``steps_per_execution=K`` that is
  the K-step call in flight), their hooks run, ``on_interrupt`` saves (``ModelCheckpoint``),
  and ``fit`` raises ``TrainingInterrupted``. A validation cut short logs nothing; the
  checkpoint is the state before that epoch end, which a resume then runs again. A signal
  after the last step (during the final save) lets the fit finish and save, then raises.
* A second SIGINT aborts: ``KeyboardInterrupt`` from wherever the main thread is, with the
  default handler back for a third, which kills the process. The cleanup that follows (the
  hooks' ``on_exception``/``on_fit_end``, orbax's threads) gets ``ABORT_GRACE_S``: a cleanup
  stuck past it (a callback blocked on a network, a save thread that never ends) has every
  thread's stack printed, and the process is killed by SIGINT, as a third Ctrl-C would. Orbax
  writes a checkpoint into a ``*.orbax-checkpoint-tmp`` folder and renames it once complete,
  so an abort or a kill during a save leaves that tmp folder (ignored, removed by the next
  fit) and every complete checkpoint as it was.
* Uncaught, ``TrainingInterrupted`` ends the process by its signal, as CPython does for an
  uncaught ``KeyboardInterrupt``, so a shell sees 130 (SIGINT) or 143 (SIGTERM) and a
  scheduler sees the signal. Caught, it is an ordinary exception and changes nothing.
* Several processes (``jax.distributed``): a signal that reaches one process stops them all
  after the same point, the furthest (step, epoch ends) any of them had sent when it learned
  of it (``multihost.StopAgreement``: the key-value store and a watcher thread, nothing per
  step); each then saves its part of one checkpoint and ends by that signal. A validation
  under way is not cut short there (its batches are collectives of every process).
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nnxfit import multihost
from nnxfit.errors import TrainingInterrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)

# How long the cleanup after a second Ctrl-C may take before the process is killed.
ABORT_GRACE_S = 30.0


@dataclass
class Signals:
    """What a signal asked of the running fit: set by the handler, read by the loop."""

    received: int | None = None  # the first signal's number; None while none came
    stop_step: int = 0  # the step the fit stops after: every call sent, and the one being sent
    sending: int = 0  # the step the call being sent ends at (the loop keeps it current)
    # Epoch ends sent (the one being sent included), and how many the fit stops after: a
    # signal during an epoch end's hooks stops the fit after that epoch end.
    epochs: int = 0
    stop_epochs: int = 0
    # Several processes (``multihost.StopAgreement``): the step is agreed between them, and
    # ``remote`` is the process the signal reached when it was not this one.
    agreement: Any = None
    remote: int | None = None

    def halts(self, step: int, epochs: int | None = None) -> bool:
        """Whether the fit sends nothing more from ``step`` (and ``epochs`` epoch ends; by
        default those sent): a signal came, and that is where the fit stops (on several
        processes, once they all agreed on it)."""
        if self.received is None:
            return False
        if self.agreement is not None:
            self.agreement.resolve()
        epochs = self.epochs if epochs is None else epochs
        return (step, epochs) >= (self.stop_step, self.stop_epochs)

    def note(self, signum: int, dispatch_step: int) -> None:
        """The fit stops after every call and epoch end sent, and the one being sent."""
        self.received = signum
        self.stop_step = max(dispatch_step, self.sending)
        self.stop_epochs = self.epochs

    def cuts_validation(self) -> bool:
        """Whether a validation under way stops at its next batch. Not on several
        processes: each batch is a collective of all of them, and they agree only between
        train calls."""
        return self.received is not None and self.agreement is None


@contextlib.contextmanager
def handlers(trainer, signals: Signals, saving_to: Callable[[], list[str]]):
    """Installs the fit's SIGTERM/SIGINT handlers (main thread only), which note a signal in
    ``signals``, and restores the previous ones on the way out. ``saving_to()``: the folders
    the fit's checkpoint callbacks save to (named in the notice)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal.signal works only there; Python delivers signals to the main thread
        return

    def remote(signum: int, origin: int) -> None:  # the watcher thread of StopAgreement
        notice(
            trainer,
            f"{_name(signum)} reached process {origin}: this process stops with it, after the "
            "same step.",
            every_process=True,
        )

    signals.epochs = trainer.current_epoch or 0
    agreement = signals.agreement = (
        multihost.StopAgreement(trainer, signals, remote) if multihost.active() else None
    )
    lock = agreement.lock if agreement is not None else contextlib.nullcontext()

    def handler(signum, frame):
        with lock:  # not while another process's signal is being noted (the watcher thread)
            first = signals.received is None
            if first:
                # The step the loop stops after: every call sent, and the one being sent
                # (``Trainer._dispatch`` checks this against its own count).
                signals.note(signum, trainer.dispatch_step)
                if agreement is not None:
                    agreement.local(signum)
        if first:
            notice(trainer, _stop_notice(trainer, signals, saving_to()), every_process=True)
        elif signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a third one kills at once
            notice(
                trainer,
                "second SIGINT: aborting. Every complete checkpoint stays intact (a save "
                "under way completes or is discarded); Ctrl-C once more kills the process.",
            )
            _kill_if_stuck(trainer, ABORT_GRACE_S)
            raise KeyboardInterrupt
        # A repeated SIGTERM changes nothing: the fit is already stopping.

    old = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            if h is not None:  # None: a handler not set from Python, which we cannot restore
                signal.signal(s, h)
        if agreement is not None:
            agreement.close()


def _kill_if_stuck(trainer, grace: float) -> None:
    """Kills the process by SIGINT unless it has ended ``grace`` seconds from now (a daemon
    thread: it dies with the process), after printing where every thread is."""

    def watch():
        time.sleep(grace)
        notice(
            trainer,
            f"the abort's cleanup has not ended after {grace:g} s; killing the process. "
            "Where each thread is:",
        )
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(all_threads=True)
        _default_disposition(signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.0)
        os._exit(128 + signal.SIGINT)  # only if SIGINT is blocked in every thread

    threading.Thread(target=watch, name="nnxfit-abort-watch", daemon=True).start()


def _default_disposition(signum: int) -> None:
    """The kernel's default action for ``signum`` (for SIGINT: terminate), set from any
    thread: ``signal.signal`` works only in the main thread, which is the one stuck, and
    Python's handler, back once the fit's handlers are restored, would only raise another
    ``KeyboardInterrupt`` there."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).signal(signum, ctypes.c_void_p(0))  # SIG_DFL == 0


def notice(trainer, text: str, every_process: bool = False) -> None:
    """One line on stderr (process 0 only, unless ``every_process``: then, on several
    processes, each says it with its index). Safe inside a signal handler: a handler that
    interrupts a write to stderr cannot write through the same buffer, so it falls back to
    the file descriptor."""
    if not (every_process or getattr(trainer, "is_global_zero", True)):
        return
    import jax

    who = f" [process {jax.process_index()}]" if jax.process_count() > 1 else ""
    line = f"nnxfit{who}: {text}\n"
    try:
        sys.stderr.write(line)
        sys.stderr.flush()
    except (RuntimeError, OSError, ValueError, AttributeError):
        with contextlib.suppress(OSError):
            os.write(2, line.encode())


def position(trainer, epoch: int, batch: int | None = None) -> str:
    """``epoch 2 of 3, batch 5 of 7``: epochs counted from 1, as the progress bar shows them
    (hooks still get 0-based ``epoch``)."""
    total = trainer.epochs_total
    where = f"epoch {epoch + 1}" + (f" of {total}" if total else "")
    if batch is None:
        return where
    nb = trainer.n_train_batches
    if batch == 0 and epoch > 0:
        return f"after epoch {epoch}" + (f" of {total}" if total else "")
    return f"{where}, batch {batch}" + (f" of {nb}" if nb else "")


def _name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "signal"


def _stop_notice(trainer, signals: Signals, dirs: list[str]) -> str:
    signum = signals.received
    name = _name(signum)
    if not trainer.fitting:
        return (
            f"{name} received after the last step ({trainer.global_step}): the fit finishes "
            "its final save, then stops."
        )
    epoch = trainer.dispatch_epoch if trainer.dispatch_epoch is not None else 0
    where = position(trainer, epoch)
    text = f"{name} received: stopping after step {signals.stop_step} ({where})"
    if signals.agreement is not None:
        text = (
            f"{name} received: stopping, with every process, after step {signals.stop_step} "
            f"({where}) or the first step after it that another process has already sent"
        )
    if dirs:
        text += f" and saving a checkpoint to {', '.join(dirs)}"
    else:
        text += "; no ModelCheckpoint is attached, so nothing is saved"
    if signum == signal.SIGINT:
        text += ". Press Ctrl-C again to abort at once, without saving"
    return text + "."


def interrupted(
    trainer, signum: int | None, dirs: list[str], after_last_step: bool = False
) -> TrainingInterrupted:
    """The ``TrainingInterrupted`` that ``fit`` raises for signal ``signum``, its message
    naming the step, the place in the fit (epochs from 1) and the checkpoint written (in one
    of ``dirs``)."""
    step = trainer.global_step
    name = _name(signum)
    saved = [os.path.join(d, str(step)) for d in dirs if os.path.isdir(os.path.join(d, str(step)))]
    if after_last_step:
        message = (
            f"{name} received after the last step ({step}, "
            f"{position(trainer, max(trainer.current_epoch - 1, 0))}): the fit had finished"
            + (f"; its final checkpoint is {', '.join(saved)}." if saved else ".")
        )
    else:
        where = position(trainer, trainer.current_epoch, trainer.batch_in_epoch)
        message = f"{name}: stopped after step {step} ({where}); " + (
            f"checkpoint saved to {', '.join(saved)}. Resume with trainer.fit(..., resume=True)."
            if saved
            else "nothing was saved (attach a ModelCheckpoint to save on interruption)."
        )
    exit_by_signal_when_uncaught()
    return TrainingInterrupted(message, step=step, signum=signum)


_exit_hook_installed = False


def exit_by_signal_when_uncaught() -> None:
    """From now on, a ``TrainingInterrupted`` that nothing catches ends the process by its
    signal once Python has shut down (``atexit``), after the usual traceback: what CPython
    does by itself only for an exact ``KeyboardInterrupt``. Installed once, the first time a
    fit is interrupted; interactive sessions are left alone."""
    global _exit_hook_installed
    if _exit_hook_installed:
        return
    _exit_hook_installed = True
    previous = sys.excepthook

    def excepthook(kind, value, tb):
        previous(kind, value, tb)
        signum = getattr(value, "signum", None)
        interactive = hasattr(sys, "ps1") or sys.flags.interactive
        if isinstance(value, TrainingInterrupted) and signum in SIGNALS and not interactive:
            atexit.register(_die_by, signum)

    sys.excepthook = excepthook


def _die_by(signum: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    os._exit(128 + signum)  # only if the signal is blocked in this thread
