"""``CSVLogger``: every log event of a fit as one row of ``workdir/metrics.csv``.

The file (read it with ``csv.DictReader`` or ``pandas.read_csv``):

* columns ``step, epoch, kind``, then one per metric in the order metrics first appeared;
* ``kind`` is ``"train"`` for a log-interval row (means over the steps since the previous
  one, written from ``on_train_batch_end`` every ``log_every_n_steps``) and ``"epoch"`` for
  an epoch-end row (epoch means of the train metrics, the ``val_*`` metrics and whatever other
  callbacks added to the epoch logs: the same values as ``History``), and ``"test"`` for the
  ``test_*`` metrics of a ``Trainer.test`` (appended to the file, at the step and epoch the
  last fit ended at);
* ``step`` is the number of optimizer steps done when the row was logged, ``epoch`` counts
  from 0; a metric a row does not have is an empty cell (NaN in pandas), a NaN value is
  ``nan``. Floats are written with ``repr``, so they read back bit for bit.

Columns may appear mid-run (``val_*`` at the first epoch end, a callback that starts logging
late). The file is then rewritten once with the wider header (into a temporary file, then an
atomic rename), so the header always matches every row; that happens a handful of times per
run, never per step.

Resume. When the fit resumes from a checkpoint (``trainer.resume_info`` set), the rows the
earlier run wrote past that checkpoint are dropped (train rows after the last train log the
resumed run continues from, ``resume_info.log_step``; epoch rows of epochs the resumed run
will end again, such as the partial epoch of a fit stopped inside it) and the new rows are
appended, so the file ends equal to an uninterrupted run's. A fit that does not resume starts
a fresh file, as Keras's ``CSVLogger`` does by default: its steps restart at 0, and two runs in
one file would make every curve drawn from it wrong. ``append=False`` starts a fresh file
even on resume.

The file is flushed at every epoch end and on interruption, so a crash loses at most the
current epoch's train rows; only process 0 writes.
"""

from __future__ import annotations

import csv
import math
import os
from typing import IO, Any

from nnxfit.callbacks.base import Callback
from nnxfit.errors import ConfigError
from nnxfit.warn import warn

BASE_COLUMNS = ("step", "epoch", "kind")
_RESERVED = frozenset(BASE_COLUMNS)


class CSVLogger(Callback):
    """Writes ``workdir/filename`` (``metrics.csv``): one row per train log and per epoch end.

    ``filename`` is relative to the Trainer's ``workdir`` (or the current directory when the
    Trainer has none); an absolute path is used as is. See the module docstring for the
    format and the resume rules. The Trainer adds ``CSVLogger()`` whenever ``workdir`` is set;
    pass your own instance to change its options.
    """

    order = 95  # after the callbacks that add to the logs
    records_only = True

    def __init__(self, filename: str | os.PathLike = "metrics.csv", append: bool = True):
        self.filename = os.fspath(filename)
        if not self.filename:
            raise ConfigError("CSVLogger filename is empty; pass e.g. 'metrics.csv'.")
        self.append = bool(append)
        self.path: str | None = None
        self._columns: list[str] = list(BASE_COLUMNS)
        self._file: IO[str] | None = None
        self._writer: Any = None
        self._warned_reserved = False

    # -- hooks ----------------------------------------------------------------------------
    def on_fit_start(self, trainer, module) -> None:
        self._close()
        self.path = None
        if not trainer.is_global_zero:
            return
        path = os.path.join(trainer.workdir or "", self.filename)
        columns, rows = list(BASE_COLUMNS), []
        info = trainer.resume_info
        if info is not None and self.append and os.path.exists(path):
            columns, rows = _read_rows(path)
            rows = _rows_before(rows, columns, info.log_step, trainer.current_epoch)
        self.path = path
        self._columns = columns
        try:
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._rewrite(rows)
        except OSError as e:
            self.path = None
            raise ConfigError(
                f"CSVLogger cannot write {path!r}: {e.strerror or e}. Pass a writable Trainer "
                "workdir (or an absolute CSVLogger filename in a writable folder)."
            ) from e

    def on_train_batch_end(self, trainer, module, step: int, logs: dict) -> None:
        if logs and self._file is not None:
            self._write(step, trainer.current_epoch, "train", logs)

    def on_train_epoch_end(self, trainer, module, epoch: int, logs: dict) -> None:
        if self._file is not None:
            self._write(trainer.global_step, epoch, "epoch", logs)
            self._file.flush()

    def on_test_end(self, trainer, module, logs: dict) -> None:
        """Appends one ``kind="test"`` row (widening the header if needed); the file is
        created if no fit wrote it."""
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        if self._file is not None:  # test inside a fit: the file is open
            self._write(trainer.global_step, trainer.current_epoch, "test", logs)
            self._file.flush()
            return
        path = os.path.join(trainer.workdir or "", self.filename)
        self.path = path
        self._columns, rows = _read_rows(path) if os.path.exists(path) else (list(BASE_COLUMNS), [])
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._rewrite(rows)
        try:
            self._write(trainer.global_step, trainer.current_epoch, "test", logs)
        finally:
            self._close()

    def on_interrupt(self, trainer, module) -> None:
        if self._file is not None:
            self._file.flush()

    def on_exception(self, trainer, module, error: BaseException) -> None:
        self._close()

    def on_fit_end(self, trainer, module) -> None:
        self._close()

    # -- writing --------------------------------------------------------------------------
    def _write(self, step: int, epoch: int, kind: str, logs: dict) -> None:
        if not self._warned_reserved and not _RESERVED.isdisjoint(logs):
            self._warned_reserved = True
            warn(
                f"CSVLogger: metric name(s) {sorted(_RESERVED.intersection(logs))} clash with "
                f"the columns {list(BASE_COLUMNS)} and are not written; rename them.",
            )
        known = set(self._columns)
        new = [k for k in logs if k not in known]
        if new:
            new.sort(key=lambda k: k not in ("loss", "val_loss"))  # loss first: read first
            self._widen(new)
        row = [str(int(step)), str(int(epoch)), kind]
        row += [_cell(logs[k]) if k in logs else "" for k in self._columns[len(BASE_COLUMNS) :]]
        self._writer.writerow(row)

    def _widen(self, new: list[str]) -> None:
        """Adds columns at the end: rereads what was written and rewrites it padded."""
        self._file.close()
        self._file = None
        _, rows = _read_rows(self.path)
        self._columns += new
        self._rewrite(rows)

    def _rewrite(self, rows: list[list[str]]) -> None:
        """Writes header + rows to a temporary file, renames it over ``path``, reopens it."""
        width = len(self._columns)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(self._columns)
            w.writerows(r + [""] * (width - len(r)) for r in rows)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None

    def __repr__(self) -> str:
        return f"CSVLogger(filename={self.filename!r}, append={self.append})"


def _cell(value: Any) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "nan" if math.isnan(x) else repr(x)


def _read_rows(path: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV this logger wrote; a torn last line (a crash mid-write) and
    rows whose fields do not match the header are dropped."""
    with open(path, newline="", encoding="utf-8") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    lines = list(csv.reader(text.splitlines()))
    if not lines or list(lines[0][: len(BASE_COLUMNS)]) != list(BASE_COLUMNS):
        if lines:
            warn(
                f"CSVLogger: {path!r} does not start with the columns {list(BASE_COLUMNS)}; "
                "it was not written by nnxfit's CSVLogger and is replaced by a fresh file.",
            )
        return list(BASE_COLUMNS), []
    header = lines[0]
    return header, [r for r in lines[1:] if len(r) == len(header)]


def _rows_before(rows: list[list[str]], columns: list[str], log_step: int, epoch: int) -> list:
    """Rows a resumed run (in epoch ``epoch``) must keep: train rows up to its last train log
    (``log_step``, at or before the checkpoint's step), and epoch rows of the epochs it will
    not end again."""
    i_step, i_epoch, i_kind = (columns.index(c) for c in BASE_COLUMNS)
    kept = []
    for r in rows:
        try:
            s, e = int(r[i_step]), int(r[i_epoch])
        except ValueError:
            continue
        if (r[i_kind] == "epoch" and e >= epoch) or (r[i_kind] != "epoch" and s > log_step):
            continue
        kept.append(r)
    return kept
