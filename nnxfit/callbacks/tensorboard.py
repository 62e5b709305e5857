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

from nnxfit.callbacks.writer import (
    FINISHED,
    LoggerCallback,
    Row,
    RunStart,
    RunWriter,
    default_dir,
)
from nnxfit.errors import ConfigError


class TensorBoardLogger(LoggerCallback):
    """Writes scalars to ``log_dir`` (default ``workdir/tensorboard``).

    View with ``tensorboard --logdir WORKDIR/tensorboard``; ``tensorboard --logdir WORKDIR``
    shows every version of the run (``version_N/tensorboard``) too, and the HParams tab
    compares them.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None):
        super().__init__()
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self.path: str | None = None  # folder of the current (or last) fit

    def make_writer(self, trainer, kind: str) -> RunWriter:
        log_dir = self.log_dir
        if log_dir is None:
            log_dir = default_dir(
                trainer, "tensorboard", "TensorBoardLogger", "TensorBoardLogger(log_dir=...)"
            )
        return _TBWriter(log_dir)

    def opened(self, writer: RunWriter) -> None:
        self.path = writer.log_dir

    def __repr__(self) -> str:
        return f"TensorBoardLogger(log_dir={self.log_dir!r})"


class _TBWriter(RunWriter):
    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self._file: _EventFile | None = None
        self._layout_written = False

    def open(self, start: RunStart) -> None:
        info = start.resume
        # A test alone appends to the folder without hiding anything (no purge marker).
        purge = None if start.kind == "test" else (info.superseded_from if info else 0)
        try:
            os.makedirs(self.log_dir, exist_ok=True)
            self._file = _EventFile(self.log_dir, purge)
            if start.kind == "fit":
                self._file.hparams(start.all_params(), start.step)
            # What the purge hid of the run the resumed one continues (a partial epoch end,
            # an off-grid last log go) is written again: its last train log and epoch end.
            if info is not None and info.log_step >= purge and info.logs:
                self._train(info.log_step, info.logs)
            if info is not None and info.epoch_end and info.epoch_end[0] >= purge:
                self._epoch(info.epoch_end[1], info.epoch_end[0])
        except OSError as e:
            raise ConfigError(
                f"TensorBoardLogger cannot write to {self.log_dir!r}: {e.strerror or e}. Pass "
                "a writable log_dir or Trainer workdir."
            ) from e

    def write(self, rows: list[Row]) -> None:
        for r in rows:
            if r.kind == "train":
                self._train(r.step, r.metrics)
            elif r.kind == "epoch":
                self._epoch(r.metrics, r.step)
            else:
                self._file.scalars(
                    {f"test/{_strip(k, 'test_')}": v for k, v in r.metrics.items()}, r.step
                )

    def _train(self, step: int, logs: dict) -> None:
        self._file.scalars({f"train/{k}": v for k, v in logs.items()}, step)

    def _epoch(self, logs: dict, step: int) -> None:
        tags = {
            (f"val/{k[4:]}" if k.startswith("val_") else f"epoch/{k}"): v for k, v in logs.items()
        }
        self._file.scalars(tags, step)
        if not self._layout_written:
            self._file.layout(train_vs_val(logs), step)
            self._layout_written = True

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self, status: str | None) -> None:
        if self._file is not None:
            if status is not None:
                self._file.session_end(status)
            self._file.close()
            self._file = None


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix) :] if name.startswith(prefix) else name


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

    def __init__(self, log_dir: str, purge_step: int | None):
        # Imported here: tensorboardX and protobuf take ~2 s to import.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import _clean_tag, custom_scalars

        self._event, self._summary, self._custom_scalars = Event, Summary, custom_scalars
        self._clean_tag, self._tags = _clean_tag, {}
        suffix = f".{time.time_ns():019d}"
        self._writer = EventsWriter(os.path.join(log_dir, "events"), suffix)  # + file_version
        if purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            event = Event(wall_time=time.time(), step=purge_step, session_log=start)
            self._writer.write_event(event)

    def scalars(self, values: dict[str, Any], step: int) -> None:
        # One event per row, its summary holding every value (TensorBoard reads them all):
        # each event costs a record whose checksums tensorboardX computes in pure Python, tens
        # of microseconds on the loop's thread, so a row is one record, not one per scalar.
        items = []
        for tag, value in values.items():
            try:
                x = float(value)
            except (TypeError, ValueError):
                continue  # not a scalar: nothing TensorBoard can chart
            clean = self._tags.get(tag)
            if clean is None:
                clean = self._tags[tag] = self._clean_tag(tag)
            items.append(self._summary.Value(tag=clean, simple_value=x))
        if items:
            summary = self._summary(value=items)
            self._writer.write_event(
                self._event(wall_time=time.time(), step=int(step), summary=summary)
            )

    def layout(self, layout: dict, step: int) -> None:
        event = self._event(wall_time=time.time(), step=int(step))
        event.summary.CopyFrom(self._custom_scalars(layout))
        self._writer.write_event(event)

    def hparams(self, params: dict, step: int) -> None:
        """The HParams tab's session start: the hyperparameters, flattened (``trainer.seed``);
        its metrics are this folder's scalar tags (no experiment summary is written, so runs
        with different hyperparameter names still compare side by side)."""
        from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionStartInfo

        from nnxfit.hparams import flatten

        info = SessionStartInfo(start_time_secs=time.time())
        for k, v in flatten(params).items():
            if isinstance(v, bool):
                info.hparams[k].bool_value = v
            elif isinstance(v, int | float):
                info.hparams[k].number_value = float(v)
            else:
                info.hparams[k].string_value = "None" if v is None else str(v)
        self._plugin(SESSION_START_TAG, HParamsPluginData(session_start_info=info), step)

    def session_end(self, status: str) -> None:
        """The HParams tab's session status. Only a finished fit writes one: TensorBoard keeps
        the first a folder holds, and a failed or interrupted fit is usually resumed."""
        from tensorboardX.proto.api_pb2 import Status
        from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo

        if status != FINISHED:
            return
        end = SessionEndInfo(status=Status.Value("STATUS_SUCCESS"), end_time_secs=time.time())
        self._plugin(SESSION_END_TAG, HParamsPluginData(session_end_info=end), 0)

    def _plugin(self, tag: str, content, step: int) -> None:
        from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

        meta = SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(
                plugin_name="hparams", content=content.SerializeToString()
            )
        )
        summary = Summary(value=[Summary.Value(tag=tag, metadata=meta)])
        self._writer.write_event(
            self._event(wall_time=time.time(), step=int(step), summary=summary)
        )

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


SESSION_START_TAG = "_hparams_/session_start_info"
SESSION_END_TAG = "_hparams_/session_end_info"
