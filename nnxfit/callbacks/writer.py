"""The writer protocol the loggers share, and the callback that drives it.

A logger is a ``LoggerCallback`` holding a ``RunWriter``. The callback turns the fit's hooks
into a writer's life: ``open`` at fit start (with the facts a writer needs, ``RunStart``:
where, from which step, what the resumed run logged, the hyperparameters), ``write`` of
``Row``s, ``flush``, ``close`` with the run's status. A writer only knows its file or client:

* ``Row("train", step, epoch, metrics)``: one train-interval log (``on_train_batch_end`` with
  logs, every ``log_every_n_steps``);
* ``Row("epoch", step, epoch, metrics)``: an epoch end (train means, ``val_*`` and what
  callbacks add: the History row);
* ``Row("test", step, epoch, metrics)``: ``Trainer.test``'s ``test_*`` metrics, at the step
  and epoch the last fit ended at (outside a fit the writer is opened for it alone,
  ``RunStart.kind == "test"``, and closed without a status).

``close(status)``: ``"FINISHED"``, ``"FAILED"`` (an exception ended the fit) or ``"KILLED"``
(SIGTERM/Ctrl-C: ``TrainingInterrupted``, or a second Ctrl-C's ``KeyboardInterrupt``),
MLflow's names. Resume ("resume from a step") is part of ``open``: ``RunStart.resume`` is
``trainer.resume_info`` (what the earlier run logged, ``resume_point.py``) and
``RunStart.state`` the logger's own state from the checkpoint (a tracker's run id).

Only process 0 writes; nothing is written under ``fast_dev_run``. Writers for slow clients
run off the loop (``RunWriter.background``): a hook only puts the row on a queue
(microseconds, no device sync: the logs are host floats already), and a thread of their own
(``BackgroundWriter``) hands the client what gathered every ``interval`` seconds in one batch.
MLflow's and W&B's clients (``background = "process"``) then run in a Python process of their
own (``TrackerProcess``), so that their Python work never holds the fit's GIL, and a fit
process that dies (SIGKILL, out of memory) still leaves its run ``KILLED``, not ``RUNNING``. A
client error never ends the fit: it is reported once as a warning, from the next hook. At the
end of the fit, ``close`` waits for the client (up to ``close_timeout``).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import NamedTuple

from nnxfit.callbacks.base import Callback
from nnxfit.warn import warn

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


class Row(NamedTuple):
    kind: str  # "train" | "epoch" | "test"
    step: int
    epoch: int
    metrics: dict
    time: float  # seconds since the epoch, when the hook ran


class Resume(NamedTuple):
    """``trainer.resume_info`` as plain data (``resume_point.ResumeInfo``'s fields): what the
    run a resumed fit continues logged (see ``resume_point.py``)."""

    log_step: int
    superseded_from: int
    logs: dict
    epoch_end: tuple[int, dict] | None


class RunStart(NamedTuple):
    """What a writer's ``open`` gets (plain data: it may go to a tracker's process)."""

    kind: str  # "fit" | "test"
    workdir: str | None
    step: int  # the fit's first step is step + 1
    epoch: int
    resume: Resume | None  # what the run a resumed fit continues logged
    resumed_from: str | None  # the checkpoint a resumed fit continues
    state: dict  # the logger's state restored from that checkpoint ({} otherwise)
    hparams: dict  # the module's hparams (plain data)
    options: dict  # the Trainer options (checkpoint.trainer_options)
    module_name: str
    checkpoint_dir: str | None  # the ModelCheckpoint's folder, if any

    def all_params(self) -> dict:
        """The hyperparameters the trackers log: the module's, then the Trainer's options
        under ``trainer`` (a module hparam named ``trainer`` is kept as ``hparams.trainer``)."""
        hp = dict(self.hparams)
        if "trainer" in hp:
            hp["hparams.trainer"] = hp.pop("trainer")
        return {**hp, "trainer": dict(self.options)}


class RunWriter:
    """One logger's file or client. Subclasses override what they need; every method is
    called from one thread at a time.

    ``background``: False, written inline by the hooks (files: CSV, TensorBoard); True, on a
    ``BackgroundWriter`` thread; ``"process"``, on that thread through a process of its own
    (``TrackerProcess``: a tracker client's Python work, hundreds of microseconds per logged
    row for MLflow's SQLite store or wandb, then never holds the fit's GIL). A process writer
    is pickled to its process: it holds plain settings, and builds its client in ``open``."""

    background: bool | str = False
    flush_at_epoch_end = True  # False: data reaches the store within the batching interval

    def open(self, start: RunStart) -> None:
        pass

    def write(self, rows: list[Row]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        """Run-level facts that change: the best checkpoint's path and score."""

    def flush(self) -> None:
        pass

    def close(self, status: str | None) -> None:
        """``status`` None: a writer opened for ``Trainer.test`` alone; keep the run's."""

    def state(self) -> dict:
        """What a checkpoint keeps of this writer (a tracker's run id), to continue it."""
        return {}


class LoggerCallback(Callback):
    """Turns the fit's hooks into ``RunWriter`` calls. Subclasses define ``make_writer``."""

    order = 95  # after the callbacks that add to the logs, and after ModelCheckpoint
    records_only = True

    def __init__(self):
        self._writer: RunWriter | BackgroundWriter | None = None
        self._status: str | None = None
        self._restored: dict = {}
        self._state: dict = {}
        self._tags: dict = {}
        self._flush_at_epoch_end = True

    # -- what a subclass defines ------------------------------------------------------------
    def make_writer(self, trainer, kind: str) -> RunWriter:
        """A new writer for a fit (``kind == "fit"``) or a test alone (``"test"``); raise
        ``ConfigError`` here for what the user must fix (it fails before training)."""
        raise NotImplementedError

    def opened(self, writer: RunWriter) -> None:
        """Called once the writer is open (on the fit's thread, synchronous writers only)."""

    # -- hooks ------------------------------------------------------------------------------
    def on_fit_start(self, trainer, module) -> None:
        self._close(None)
        self._status = None
        self._tags = {}
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        writer = self.make_writer(trainer, "fit")
        self._open(writer, self.run_start(trainer, module, "fit"))

    def on_train_batch_end(self, trainer, module, step: int, logs: dict) -> None:
        if logs and self._writer is not None:
            self._writer.write([Row("train", step, trainer.current_epoch, logs, time.time())])

    def on_train_epoch_end(self, trainer, module, epoch: int, logs: dict) -> None:
        if self._writer is None:
            return
        self._writer.write([Row("epoch", trainer.global_step, epoch, logs, time.time())])
        self._update_tags(trainer)
        if self._flush_at_epoch_end:
            self._writer.flush()

    def on_test_end(self, trainer, module, logs: dict) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        row = Row("test", trainer.global_step, trainer.current_epoch, logs, time.time())
        if self._writer is not None:  # a test inside a fit: the run is open
            self._writer.write([row])
            self._writer.flush()
            return
        writer = self.make_writer(trainer, "test")
        self._open(writer, self.run_start(trainer, module, "test"))
        try:
            self._writer.write([row])
        finally:
            self._close(None)

    def on_interrupt(self, trainer, module) -> None:
        self._status = KILLED
        if self._writer is not None:
            self._writer.flush()

    def on_exception(self, trainer, module, error: BaseException) -> None:
        self._status = KILLED if isinstance(error, KeyboardInterrupt) else FAILED
        self._close(self._status)

    def on_fit_end(self, trainer, module) -> None:
        if self._writer is not None:
            self._update_tags(trainer)
        self._close(self._status or FINISHED)
        self._restored = {}

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self._writer is not None:
            self._state = self._writer.state()
        return dict(self._state)

    def load_state_dict(self, state) -> None:
        self._restored = dict(state)

    # -- helpers ----------------------------------------------------------------------------
    def run_start(self, trainer, module, kind: str) -> RunStart:
        from nnxfit import hparams
        from nnxfit.checkpoint import trainer_options

        info = trainer.resume_info if kind == "fit" else None
        resume = None
        if info is not None:
            end = info.epoch_end
            end = (int(end[0]), numbers(end[1])) if end else None
            resume = Resume(int(info.log_step), int(info.superseded_from), numbers(info.logs), end)
        if kind == "fit":  # a fresh fit is a new run; a resumed one continues the saved one
            state = self._restored if resume is not None else {}
        else:  # a test alone goes to the run of this logger's last fit, if it had one
            state = self._state
        ckpt = checkpoint_callback(trainer)
        return RunStart(
            kind=kind,
            workdir=trainer.workdir,
            step=int(trainer.global_step),
            epoch=int(trainer.current_epoch),
            resume=resume,
            resumed_from=trainer.resumed_from if kind == "fit" else None,
            state=dict(state),
            hparams=hparams.of(module),
            options=trainer_options(trainer),
            module_name=type(module).__name__ if module is not None else "",
            checkpoint_dir=getattr(ckpt, "directory", None),
        )

    def _open(self, writer: RunWriter, start: RunStart) -> None:
        self._flush_at_epoch_end = writer.flush_at_epoch_end
        if writer.background:
            if writer.background == "process":
                writer = TrackerProcess(writer, type(self).__name__)
            bg = BackgroundWriter(writer, type(self).__name__)
            bg.open(start)
            self._writer = bg
        else:
            writer.open(start)
            self._writer = writer
            self._state = writer.state()
            self.opened(writer)

    def _close(self, status: str | None) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        if isinstance(writer, BackgroundWriter):
            writer.close(status)
            self._state = writer.state(wait=False)
        else:
            self._state = writer.state()
            writer.close(status)

    def _update_tags(self, trainer) -> None:
        tags = checkpoint_tags(trainer)
        new = {k: v for k, v in tags.items() if self._tags.get(k) != v}
        if new:
            self._tags.update(new)
            self._writer.set_tags(new)


def checkpoint_callback(trainer):
    """The fit's ``ModelCheckpoint``, if any (the first one)."""
    from nnxfit.callbacks.checkpoint import ModelCheckpoint

    return next((c for c in (trainer.cb or ()) if isinstance(c, ModelCheckpoint)), None)


def checkpoint_tags(trainer) -> dict[str, str]:
    """Where the fit's checkpoints are: folder, best (path and score), last."""
    ckpt = checkpoint_callback(trainer)
    if ckpt is None or ckpt.directory is None:
        return {}
    tags = {"checkpoint_dir": ckpt.directory}
    if ckpt.best_model_path is not None:
        tags["best_checkpoint"] = ckpt.best_model_path
        if ckpt.best_model_score is not None:
            tags["best_score"] = repr(float(ckpt.best_model_score))
        if ckpt.monitor is not None:
            tags["monitor"] = str(ckpt.monitor)
    if ckpt.last_model_path is not None:
        tags["last_checkpoint"] = ckpt.last_model_path
    return tags


def numbers(metrics: dict) -> dict[str, float]:
    """The entries of ``metrics`` that are numbers, as floats (trackers chart numbers)."""
    out = {}
    for k, v in metrics.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


class BackgroundWriter:
    """Runs a ``RunWriter`` on a thread of its own: ``open``/``write``/``set_tags``/``flush``
    only put an item on a queue; the thread opens the client, then gathers rows for up to
    ``interval`` seconds and writes them in one call. ``flush`` writes what gathered at once
    (at an interruption and at the end); ``close`` waits for everything to be written.

    The queue is bounded (``max_items``): a client that falls that far behind makes the loop
    wait for it (said once in a warning) instead of growing without limit. An error in the
    client is reported (once per kind) as a warning from the fit's thread at its next call;
    after a failed ``open`` nothing more is sent."""

    interval = 1.0
    max_items = 100_000
    close_timeout = 120.0

    def __init__(self, writer: RunWriter, name: str):
        self.writer = writer
        self.name = name
        self._q: queue.Queue = queue.Queue(maxsize=self.max_items)
        self._thread = threading.Thread(target=self._run, name=f"nnxfit-{name}", daemon=True)
        self._opened = threading.Event()
        self._errors: list[str] = []
        self._failed: set[tuple[str, str]] = set()
        self._waited = False
        self._dead = False

    # -- the fit's side ---------------------------------------------------------------------
    def open(self, start: RunStart) -> None:
        self._put(("open", start))
        self._thread.start()

    def write(self, rows: list[Row]) -> None:
        # A copy: the logs dict may change after the hook returns.
        self._put(("rows", [r._replace(metrics=dict(r.metrics)) for r in rows]))

    def set_tags(self, tags: dict) -> None:
        self._put(("tags", dict(tags)))

    def flush(self) -> None:
        self._put(("flush", None))

    def close(self, status: str | None) -> None:
        self._put(("close", status))
        self._thread.join(self.close_timeout)
        if self._thread.is_alive():
            warn(
                f"{self.name}: the tracking client did not finish writing within "
                f"{self.close_timeout:.0f} s; the rest is written in the background while the "
                "process lives (a server that is down or slow: check its address)."
            )
        self._report()

    def state(self, wait: bool = True) -> dict:
        if wait:
            self._opened.wait(self.close_timeout)
        return self.writer.state()

    def _put(self, item) -> None:
        self._report()
        if self._dead and item[0] not in ("close",):
            return
        try:
            self._q.put_nowait(item)
        except queue.Full:
            if not self._waited:
                self._waited = True
                warn(
                    f"{self.name}: the tracking client is {self.max_items} items behind the "
                    "fit; the fit waits for it (a slow server, or log_every_n_steps too small "
                    "for it)."
                )
            self._q.put(item)

    def _report(self) -> None:
        while self._errors:
            warn(self._errors.pop(0))

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        rows: list[Row] = []
        tags: dict = {}
        deadline = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                kind, value = self._q.get(timeout=timeout)
            except queue.Empty:
                kind, value = "tick", None  # the interval is over: write what gathered
            if kind == "open":
                self._call("open", value)
                self._opened.set()
                continue
            if kind == "rows":
                rows.extend(value)
                if deadline is None:
                    deadline = time.monotonic() + self.interval
                continue
            if kind == "tags":
                tags.update(value)
                if deadline is None:
                    deadline = time.monotonic() + self.interval
                continue
            # tick, flush or close: write what gathered
            if rows:
                self._call("write", rows)
                rows = []
            if tags:
                self._call("set_tags", tags)
                tags = {}
            deadline = None
            if kind == "flush":
                self._call("flush")
            if kind == "close":
                self._call("close", value)
                return

    def _call(self, method: str, *args) -> None:
        if self._dead and method != "close":
            return
        try:
            getattr(self.writer, method)(*args)
        except Exception as e:  # a tracker never ends the fit
            kind = e.kind if isinstance(e, TrackerError) else type(e).__name__
            key = (method, kind)  # one warning per kind of failure
            if key in self._failed:
                return
            self._failed.add(key)
            what = {"open": "could not start its run", "close": "could not end its run"}.get(
                method, "could not write"
            )
            text = f"{self.name} {what}: {kind}: {_short(e)}"
            if method == "open":
                self._dead = True
                text += (
                    ". Nothing more is logged to the tracker in this fit (metrics.csv and the "
                    "other loggers go on)."
                )
            self._errors.append(text)


class TrackerError(Exception):
    """An error a tracker's process reported: in ``method``, of type ``kind``."""

    def __init__(self, method: str, kind: str, text: str):
        super().__init__(text)
        self.method, self.kind = method, kind


# The tracker process's first lines: ``nnxfit`` and ``nnxfit.callbacks`` as bare packages, so
# that it imports the writer modules and their client, not jax and the rest of nnxfit.
_BOOT = """
import os, sys, types
for name in ("nnxfit", "nnxfit.callbacks"):
    module = types.ModuleType(name)
    module.__path__ = [os.path.join(sys.argv[1], *name.split("."))]
    sys.modules[name] = module
from nnxfit.callbacks.writer import serve
serve(int(sys.argv[2]), int(sys.argv[3]))
"""


class TrackerProcess(RunWriter):
    """Runs a ``RunWriter`` in a Python process of its own (driven by a ``BackgroundWriter``
    thread, which sends it batches of rows): the client's work never holds the fit's GIL.

    The process starts at fit start (``open``: about as long as importing the client, while
    the step compiles), in a session of its own (a Ctrl-C in the terminal reaches the fit, which
    ends the run with its status, not the tracker), at a lower priority (``nice`` +5). It
    imports only the writer modules and the client. Its errors come back as ``TrackerError``s;
    if the fit's process dies, the tracker process sees its pipe close, ends the run as
    ``KILLED`` and exits."""

    background = True
    start_timeout = 600.0

    def __init__(self, writer: RunWriter, name: str):
        self.inner = writer
        self.name = name
        self.flush_at_epoch_end = writer.flush_at_epoch_end
        self._proc = None
        self._send = self._recv = None
        self._state: dict = {}
        self._errors: list[TrackerError] = []

    def open(self, start: RunStart) -> None:
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, root, str(down_r), str(up_w)],
                pass_fds=(down_r, up_w),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            for fd in (down_w, up_r):
                os.close(fd)
            raise
        finally:
            os.close(down_r)
            os.close(up_w)
        self._send = Connection(down_w, readable=False)
        self._recv = Connection(up_r, writable=False)
        self._send.send(("open", self.inner, start))
        self._wait("opened", self.start_timeout)

    def write(self, rows: list[Row]) -> None:
        self._post(("rows", [r._replace(metrics=numbers(r.metrics)) for r in rows]))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._post(("tags", dict(tags)))

    def flush(self) -> None:
        self._post(("flush", None))

    def close(self, status: str | None) -> None:
        if self._proc is None:
            return
        try:
            self._send.send(("close", status))
            self._wait("closed", None)
        finally:
            self._send.close()
            self._recv.close()
            try:
                self._proc.wait(timeout=30)
            except Exception:  # still busy: it ends on its own (its pipe is closed)
                pass
            self._proc = None

    def state(self) -> dict:
        return dict(self._state)

    def _post(self, message) -> None:
        self._send.send(message)
        while self._recv.poll():
            self._take()
        if self._errors:
            raise self._errors.pop(0)

    def _take(self) -> str:
        try:
            message = self._recv.recv()
        except EOFError:
            code = self._proc.poll() if self._proc is not None else None
            raise TrackerError(
                "process", "EOFError", f"the tracker's process exited (status {code})"
            ) from None
        if message[0] == "error":
            self._errors.append(TrackerError(*message[1:]))
        elif message[0] in ("opened", "closed"):
            self._state = message[1]
        return message[0]

    def _wait(self, kind: str, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._recv.poll(left):
                raise TrackerError(
                    "process",
                    "TimeoutError",
                    f"the tracker's process did not answer in {timeout} s",
                )
            if self._take() == kind:
                break
            if kind == "opened" and any(e.method == "open" for e in self._errors):
                break
        if self._errors:
            raise self._errors.pop(0)


def serve(read_fd: int, write_fd: int) -> None:
    """The tracker process's loop (``TrackerProcess``): runs the writer it is sent."""
    import signal
    from multiprocessing.connection import Connection

    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the fit decides when the run ends
    try:
        os.nice(5)
    except OSError:
        pass
    writer = None

    def call(method: str, *args) -> bool:
        try:
            getattr(writer, method)(*args)
            return True
        except Exception as e:
            outbox.send(("error", method, type(e).__name__, _short(e)))
            return False

    while True:
        try:
            message = inbox.recv()
        except EOFError:  # the fit's process is gone: end the run, then exit
            if writer is not None:
                call("close", KILLED)
            return
        kind, value = message[0], message[1:]
        if kind == "open":
            writer = value[0]
            if call("open", value[1]):
                outbox.send(("opened", writer.state()))
            else:
                writer = None
        elif writer is None:
            if kind == "close":
                outbox.send(("closed", {}))
                return
        elif kind == "rows":
            call("write", value[0])
        elif kind == "tags":
            call("set_tags", value[0])
        elif kind == "flush":
            call("flush")
        elif kind == "close":
            call("close", value[0])
            outbox.send(("closed", writer.state()))
            return


def _short(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def default_dir(trainer, name: str, what: str, option: str) -> str:
    """``workdir/name`` (absolute), or a ``ConfigError`` naming ``option`` when the Trainer
    has no workdir."""
    from nnxfit.errors import ConfigError

    if trainer.workdir is None:
        raise ConfigError(
            f"{what} has no folder to write to: pass {option} or set Trainer(workdir=...)."
        )
    return os.path.abspath(os.path.join(trainer.workdir, name))
