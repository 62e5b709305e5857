"""``TensorBoardLogger``: the fit's metrics as TensorBoard event files (written with tensorboardX).

Tags, all keyed by the global step (optimizer steps done), so every chart shares one x axis:

* ``train/<name>``: each train log (every ``log_every_n_steps``, means over the interval);
* ``epoch/<name>``: epoch means of the train metrics (and what callbacks add at epoch end);
* ``val/<name>``: validation metrics, ``val_loss`` as ``val/loss``.

TensorBoard's Scalars tab draws each tag on a chart of its own, so ``epoch/loss`` and
``val/loss`` never share one there. The file also holds a layout for the Custom Scalars tab
(written once, at the fit's first epoch end, when the metric names are known): a "train vs
val" section with one chart per train metric that draws ``train/<name>``, ``epoch/<name>`` and
``val/<name>`` together. The tags are the same as before, so existing charts and scripts that
read them keep working.

Each fit writes a new event file that starts with a ``SessionLog.START`` event, which makes
TensorBoard hide the events of earlier files in the folder from that step on (the
``purge_step`` of ``tensorboardX.SummaryWriter``): a resumed fit (``trainer.resume_info``
set, continuing from step S) starts it at S + 1, so the events the interrupted run wrote after
its checkpoint disappear and the curves show one run. When the earlier fit ended inside an
epoch at S, it starts at S: that partial epoch's events (and an off-grid last train log) go,
and a train log at S that the uninterrupted run also makes is written again. A fresh fit
starts it at 0, so an earlier run in the same folder is hidden rather than drawn over (the
rule ``CSVLogger`` follows; the old file stays on disk). File names end in a fixed-width
nanosecond time, so two fits within one second never share a file and TensorBoard reads them in
order.

Events are written synchronously and flushed (to disk, ``fsync``) at every epoch end and on
interruption; the file is closed at the end of fit, also when it ends with an exception.
``SummaryWriter`` itself is not used: it hands events to a background thread, and its
``flush()`` does not wait for that thread's queue, so an epoch's events could still be in
memory after it. A few scalars per log event cost microseconds to write inline. Only process
0 writes.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from nnxfit.callbacks.base import Callback
from nnxfit.errors import ConfigError


class TensorBoardLogger(Callback):
    """Writes scalars to ``log_dir`` (default ``workdir/tensorboard``).

    View with ``tensorboard --logdir WORKDIR/tensorboard``.
    """

    order = 95  # after the callbacks that add to the logs
    records_only = True

    def __init__(self, log_dir: str | os.PathLike | None = None):
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self.path: str | None = None  # folder of the current (or last) fit
        self._file: _EventFile | None = None
        self._layout_written = False

    def on_fit_start(self, trainer, module) -> None:
        self._close()
        if not trainer.is_global_zero:
            return
        log_dir = self.log_dir
        if log_dir is None:
            if trainer.workdir is None:
                raise ConfigError(
                    "TensorBoardLogger has no folder to write to: pass "
                    "TensorBoardLogger(log_dir=...) or set Trainer(workdir=...)."
                )
            log_dir = os.path.join(trainer.workdir, "tensorboard")
        self._layout_written = False
        info = trainer.resume_info
        purge = info.superseded_from if info is not None else 0
        try:
            os.makedirs(log_dir, exist_ok=True)
            self._file = _EventFile(log_dir, purge)
            # What the purge hid of the run the resumed one continues (a partial epoch end,
            # an off-grid last log go) is written again: its last train log and epoch end.
            if info is not None and info.log_step >= purge and info.logs:
                self.on_train_batch_end(trainer, module, info.log_step, info.logs)
            if info is not None and info.epoch_end and info.epoch_end[0] >= purge:
                self._epoch_scalars(info.epoch_end[1], info.epoch_end[0])
        except OSError as e:
            raise ConfigError(
                f"TensorBoardLogger cannot write to {log_dir!r}: {e.strerror or e}. Pass a "
                "writable log_dir or Trainer workdir."
            ) from e
        self.path = log_dir

    def on_train_batch_end(self, trainer, module, step: int, logs: dict) -> None:
        if logs and self._file is not None:
            self._file.scalars({f"train/{k}": v for k, v in logs.items()}, step)

    def on_train_epoch_end(self, trainer, module, epoch: int, logs: dict) -> None:
        if self._file is None:
            return
        self._epoch_scalars(logs, trainer.global_step)
        self._file.flush()

    def _epoch_scalars(self, logs: dict, step: int) -> None:
        tags = {
            (f"val/{k[4:]}" if k.startswith("val_") else f"epoch/{k}"): v for k, v in logs.items()
        }
        self._file.scalars(tags, step)
        if not self._layout_written:
            self._file.layout(train_vs_val(logs), step)
            self._layout_written = True

    def on_interrupt(self, trainer, module) -> None:
        if self._file is not None:
            self._file.flush()

    def on_exception(self, trainer, module, error: BaseException) -> None:
        self._close()

    def on_fit_end(self, trainer, module) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"TensorBoardLogger(log_dir={self.log_dir!r})"


LAYOUT_CATEGORY = "train vs val"


def train_vs_val(logs: dict) -> dict:
    """The Custom Scalars layout: per train metric of ``logs`` (loss first), one chart of its
    ``train/``, ``epoch/`` and ``val/`` tags (tensorboardX's ``custom_scalars`` format)."""
    names = [k for k in logs if not k.startswith("val_")]
    names.sort(key=lambda k: k != "loss")
    charts = {
        name: ["Multiline", [f"^{p}/{re.escape(name)}$" for p in ("train", "epoch", "val")]]
        for name in names
    }
    return {LAYOUT_CATEGORY: charts}


class _EventFile:
    """One event file written inline with tensorboardX's record writer and protos."""

    def __init__(self, log_dir: str, purge_step: int):
        # Imported here: tensorboardX and protobuf take ~2 s to import.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import custom_scalars, scalar

        self._event, self._scalar, self._custom_scalars = Event, scalar, custom_scalars
        suffix = f".{time.time_ns():019d}"
        self._writer = EventsWriter(os.path.join(log_dir, "events"), suffix)  # + file_version
        start = SessionLog(status=SessionLog.START)
        self._writer.write_event(Event(wall_time=time.time(), step=purge_step, session_log=start))

    def scalars(self, values: dict[str, Any], step: int) -> None:
        now = time.time()
        for tag, value in values.items():
            try:
                x = float(value)
            except (TypeError, ValueError):
                continue  # not a scalar: nothing TensorBoard can chart
            event = self._event(wall_time=now, step=int(step), summary=self._scalar(tag, x))
            self._writer.write_event(event)

    def layout(self, layout: dict, step: int) -> None:
        event = self._event(wall_time=time.time(), step=int(step))
        event.summary.CopyFrom(self._custom_scalars(layout))
        self._writer.write_event(event)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
