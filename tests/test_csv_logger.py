"""CSVLogger: rows of real fits read back with the csv module, growth of columns, resume."""

import copy
import csv
import os
import warnings

import jax
import jax.numpy as jnp
import pytest
from models import Classifier, toy_data

import nnxfit
from nnxfit.callbacks.csv_logger import CSVLogger
from nnxfit.data import ArrayLoader
from nnxfit.errors import ConfigError

X, Y = toy_data(96)  # batch 16: 6 steps per epoch


def train_data():
    return ArrayLoader((X, Y), 16, shuffle=True, seed=1)


def val_data():
    return ArrayLoader((X, Y), 32)


def read(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]


class LogRecorder(nnxfit.Callback):
    def __init__(self):
        self.train = []

    def on_train_batch_end(self, trainer, module, step, logs):
        if logs:
            self.train.append((step, trainer.current_epoch, dict(logs)))


def test_rows_match_history_and_train_logs(tmp_path):
    rec = LogRecorder()
    trainer = nnxfit.Trainer(
        max_epochs=3, workdir=tmp_path, progress_bar=False, log_every_n_steps=4, callbacks=[rec]
    )
    history = trainer.fit(Classifier(), train_data(), val_data=val_data())

    header, rows = read(tmp_path / "metrics.csv")  # added by default because workdir is set
    assert header == ["step", "epoch", "kind", "loss", "accuracy", "val_loss", "val_accuracy"]
    train = [r for r in rows if r["kind"] == "train"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(train) + len(epochs) == len(rows)

    # One train row per log event, with exactly the values the hooks saw.
    assert [(int(r["step"]), int(r["epoch"])) for r in train] == [(s, e) for s, e, _ in rec.train]
    assert [int(r["step"]) for r in train] == [4, 8, 12, 16]
    for r, (_, _, logs) in zip(train, rec.train, strict=True):
        assert float(r["loss"]) == logs["loss"] and float(r["accuracy"]) == logs["accuracy"]
        assert r["val_loss"] == r["val_accuracy"] == ""  # empty cells: NaN for pandas

    # One epoch row per epoch, bit for bit the History values.
    assert [(int(r["step"]), int(r["epoch"])) for r in epochs] == [(6, 0), (12, 1), (18, 2)]
    for name, values in history.history.items():
        assert [float(r[name]) for r in epochs] == values
    # Rows are in the order they were logged.
    assert [int(r["step"]) for r in rows] == sorted(int(r["step"]) for r in rows)


class LateMetric(nnxfit.Callback):
    """Adds a metric to the epoch logs from epoch 1 on (and a NaN one at epoch 2)."""

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        if epoch >= 1:
            logs["late"] = 10.0 + epoch
        if epoch == 2:
            logs["broken"] = float("nan")


def test_new_columns_rewrite_the_header_and_pad_earlier_rows(tmp_path):
    trainer = nnxfit.Trainer(
        max_epochs=4,
        workdir=tmp_path,
        progress_bar=False,
        log_every_n_steps=3,
        val_every_n_epochs=2,  # val_* first appear at the end of epoch 1
        callbacks=[LateMetric()],
    )
    history = trainer.fit(Classifier(), train_data(), val_data=val_data())
    header, rows = read(tmp_path / "metrics.csv")  # strict zip: every row as wide as the header
    assert header[:5] == ["step", "epoch", "kind", "loss", "accuracy"]
    assert set(header[5:]) == {"val_loss", "val_accuracy", "late", "broken"}
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["late"] for r in epochs] == ["", "11.0", "12.0", "13.0"]
    assert [r["broken"] for r in epochs] == ["", "", "nan", ""]
    assert [r["val_loss"] != "" for r in epochs] == [False, True, False, True]
    assert [float(r["val_loss"]) for r in epochs if r["val_loss"]] == [
        v for v in history.history["val_loss"] if v == v
    ]
    assert all(r["late"] == "" for r in rows if r["kind"] == "train")
    assert not os.path.exists(tmp_path / "metrics.csv.tmp")


class FlushProbe(nnxfit.Callback):
    """Reads the CSV from disk while the fit runs, at the start of each epoch."""

    def __init__(self, path):
        self.path = path
        self.seen = []

    def on_train_epoch_start(self, trainer, module, epoch):
        _, rows = read(self.path)
        self.seen.append([(r["kind"], int(r["epoch"])) for r in rows if r["kind"] == "epoch"])


class Crash(nnxfit.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, module, step, logs):
        if step >= self.at_step:
            raise RuntimeError(f"crash at step {step}")


def test_rows_reach_disk_at_each_epoch_end_and_survive_a_crash(tmp_path):
    probe = FlushProbe(tmp_path / "metrics.csv")
    trainer = nnxfit.Trainer(
        max_epochs=5,
        workdir=tmp_path,
        progress_bar=False,
        log_every_n_steps=2,
        callbacks=[probe, Crash(at_step=15)],
    )
    with pytest.raises(RuntimeError, match="crash at step 15"):
        trainer.fit(Classifier(), train_data())
    # Flushed at every epoch end: the next epoch already sees it on disk.
    assert probe.seen == [[], [("epoch", 0)], [("epoch", 0), ("epoch", 1)]]
    # The crash closed the file: every row logged before it is there.
    _, rows = read(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows if r["kind"] == "train"] == [2, 4, 6, 8, 10, 12, 14]


def test_a_fresh_fit_starts_a_fresh_file(tmp_path):
    kw = dict(workdir=tmp_path, progress_bar=False, log_every_n_steps=3)
    nnxfit.Trainer(max_epochs=3, **kw).fit(Classifier(), train_data())
    history = nnxfit.Trainer(max_epochs=1, **kw).fit(Classifier(seed=1), train_data())
    _, rows = read(tmp_path / "metrics.csv")
    assert [(r["kind"], int(r["step"])) for r in rows] == [
        ("train", 3),
        ("train", 6),
        ("epoch", 6),
    ]
    assert float(rows[-1]["loss"]) == history.history["loss"][0]


def test_only_process_zero_writes(tmp_path):
    trainer = nnxfit.Trainer(max_epochs=1, workdir=tmp_path, progress_bar=False)
    trainer.is_global_zero = False  # what every process but the first sees
    trainer.fit(Classifier(), train_data())
    assert not os.path.exists(tmp_path / "metrics.csv")


def test_unwritable_path_fails_before_training(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    logger = CSVLogger(filename="blocker/metrics.csv")
    trainer = nnxfit.Trainer(max_epochs=1, workdir=tmp_path, progress_bar=False, callbacks=[logger])
    with pytest.raises(ConfigError, match=r"CSVLogger cannot write .*blocker.*writable"):
        trainer.fit(Classifier(), train_data())
    assert trainer.global_step == 0


def test_absolute_filename_and_custom_name(tmp_path):
    target = tmp_path / "elsewhere" / "log.csv"
    trainer = nnxfit.Trainer(
        max_epochs=1, progress_bar=False, callbacks=[CSVLogger(filename=target)]
    )  # no workdir: the logger still writes where it is told
    history = trainer.fit(Classifier(), train_data())
    _, rows = read(target)
    assert float(rows[-1]["loss"]) == history.history["loss"][0]


# ---- resume ------------------------------------------------------------------------------
# A real resume without orbax: a callback snapshots the Trainer's device state (real copies:
# donation deletes the originals) and loop state at step S, a later callback crashes the run,
# and a Trainer whose resume hook loads the snapshot continues from S, as a checkpoint would.


class Snapshot(nnxfit.Callback):
    order = 50  # like a checkpoint callback: before the loggers

    def __init__(self, at_step, at_epoch_end=False):
        self.at_step, self.at_epoch_end = at_step, at_epoch_end
        self.state = None

    def _take(self, trainer):
        if self.state is None and trainer.global_step == self.at_step:
            train = jax.tree.map(lambda x: jnp.array(x, copy=True), trainer.train_state())
            self.state = (train, copy.deepcopy(trainer.loop_state()))

    def on_train_batch_end(self, trainer, module, step, logs):
        if not self.at_epoch_end:
            self._take(trainer)

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        if self.at_epoch_end:
            self._take(trainer)


class SnapshotResumeTrainer(nnxfit.Trainer):
    snapshot = None

    def _resume(self, resume):
        train, loop = self.snapshot
        self.load_train_state(jax.tree.map(lambda x: jnp.array(x, copy=True), train))
        self.load_loop_state(copy.deepcopy(loop))
        self.resumed_from = f"snapshot@{loop['global_step']}"


def run_interrupted_then_resumed(workdir, snapshot, crash_at, extra=(), tamper=None, **kw):
    """Returns (history of the resumed run). ``tamper(workdir)`` runs between the two."""
    first = nnxfit.Trainer(workdir=workdir, callbacks=[snapshot, Crash(crash_at), *extra], **kw)
    with pytest.raises(RuntimeError, match="crash"):
        first.fit(Classifier(), train_data(), val_data=val_data())
    assert snapshot.state is not None
    if tamper:
        tamper(workdir)
    second = SnapshotResumeTrainer(workdir=workdir, callbacks=list(extra), **kw)
    second.snapshot = snapshot.state
    return second.fit(Classifier(), train_data(), val_data=val_data(), resume=True)


FIT = dict(max_epochs=4, progress_bar=False, log_every_n_steps=4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its History and the text of its metrics.csv."""
    workdir = tmp_path_factory.mktemp("ref")
    history = nnxfit.Trainer(workdir=workdir, **FIT).fit(
        Classifier(), train_data(), val_data=val_data()
    )
    return history, (workdir / "metrics.csv").read_text()


@pytest.mark.parametrize(
    "snapshot",
    [Snapshot(at_step=8), Snapshot(at_step=12, at_epoch_end=True)],
    ids=["mid-epoch", "epoch-end"],
)
def test_resume_drops_rows_after_the_checkpoint_and_ends_like_an_uninterrupted_run(
    tmp_path, snapshot, reference
):
    def check(workdir):
        rows = read(workdir / "metrics.csv")[1]
        assert max(int(r["step"]) for r in rows) > snapshot.at_step  # rows to drop exist

    history = run_interrupted_then_resumed(tmp_path, snapshot, 21, tamper=check, **FIT)
    assert history.history == reference[0].history
    assert (tmp_path / "metrics.csv").read_text() == reference[1]


def test_resume_drops_a_row_torn_by_a_crash(tmp_path, reference):
    torn = "4,0,train,"  # the row logged right at the checkpoint, step 4

    def tear(workdir):
        """SIGKILL while that row was being written: the file then had no val_ columns yet,
        so the cut inside its last number leaves a row as wide as the header, and only the
        missing newline gives it away."""
        header, rows = read(workdir / "metrics.csv")
        row = next(r for r in rows if f"{r['step']},{r['epoch']},{r['kind']}," == torn)
        cols = header[:5]
        text = ",".join(cols) + "\n" + ",".join(row[c] for c in cols)
        (workdir / "metrics.csv").write_text(text[:-3])

    run_interrupted_then_resumed(tmp_path, Snapshot(at_step=4), 9, tamper=tear, **FIT)
    # The torn row is lost, not kept with a wrong value; the rest equals the reference.
    expected = [line for line in reference[1].splitlines(True) if not line.startswith(torn)]
    assert (tmp_path / "metrics.csv").read_text() == "".join(expected)


def test_append_false_starts_over_on_resume(tmp_path):
    snap = Snapshot(at_step=8)
    run_interrupted_then_resumed(tmp_path, snap, 14, extra=[CSVLogger(append=False)], **FIT)
    _, rows = read(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows][:2] == [12, 12]  # only what the resumed run wrote


def test_metric_named_like_a_column_warns_once_and_keeps_the_real_value(tmp_path):
    trainer = nnxfit.Trainer(max_epochs=1, workdir=tmp_path)  # hooks called directly: no fit
    logger = CSVLogger()
    logger.on_fit_start(trainer, None)
    with pytest.warns(UserWarning, match=r"\['epoch'\] clash with the columns"):
        logger.on_train_epoch_end(trainer, None, 0, {"loss": 1.5, "epoch": 9.0, "note": "x"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        logger.on_train_epoch_end(trainer, None, 1, {"loss": 0.5, "epoch": 9.0})
    logger.on_fit_end(trainer, None)
    header, rows = read(tmp_path / "metrics.csv")
    assert header == ["step", "epoch", "kind", "loss", "note"]
    assert [(r["epoch"], r["loss"], r["note"]) for r in rows] == [
        ("0", "1.5", "x"),
        ("1", "0.5", ""),
    ]
