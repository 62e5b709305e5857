"""TensorBoardLogger: event files of real fits, read back with TensorBoard's own reader."""

import os

import numpy as np
import pytest
from models import Classifier, toy_data
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_csv_logger import FIT, Crash, Snapshot, run_interrupted_then_resumed

import nnxfit
from nnxfit.callbacks.tensorboard import TensorBoardLogger
from nnxfit.data import ArrayLoader
from nnxfit.errors import ConfigError

X, Y = toy_data(96)


def data():
    return ArrayLoader((X, Y), 16, shuffle=True, seed=1)


def scalars(log_dir):
    """{tag: [(step, value), ...]} as TensorBoard would show it (purges applied)."""
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


class LogRecorder(nnxfit.Callback):
    def __init__(self):
        self.train = []

    def on_train_batch_end(self, trainer, module, step, logs):
        if logs:
            self.train.append((step, dict(logs)))


def f32(values):
    return [float(np.float32(v)) for v in values]  # event files store float32


def test_scalars_read_back_with_tensorboard(tmp_path):
    rec, tb = LogRecorder(), TensorBoardLogger()
    trainer = nnxfit.Trainer(
        max_epochs=3, workdir=tmp_path, progress_bar=False, log_every_n_steps=4, callbacks=[tb, rec]
    )
    history = trainer.fit(Classifier(), data(), val_data=ArrayLoader((X, Y), 32))
    assert tb.path == os.path.join(tmp_path, "tensorboard")

    s = scalars(tmp_path / "tensorboard")
    assert set(s) == {
        "train/loss",
        "train/accuracy",
        "epoch/loss",
        "epoch/accuracy",
        "val/loss",
        "val/accuracy",
    }
    assert (
        [step for step, _ in s["train/loss"]] == [step for step, _ in rec.train] == [4, 8, 12, 16]
    )
    assert [v for _, v in s["train/loss"]] == f32(logs["loss"] for _, logs in rec.train)
    for name, tag in [("loss", "epoch/loss"), ("val_accuracy", "val/accuracy")]:
        assert [step for step, _ in s[tag]] == [6, 12, 18]  # keyed by global step
        assert [v for _, v in s[tag]] == f32(history.history[name])


def layout(log_dir):
    """The Custom Scalars layout in the folder's event files: {section: {chart: tags}}."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    events = acc.Tensors("custom_scalars__config__")
    proto = layout_pb2.Layout.FromString(events[0].tensor_proto.string_val[0])
    return {
        c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart}
        for c in proto.category
    }


def test_train_and_val_share_a_chart_in_custom_scalars(tmp_path):
    trainer = nnxfit.Trainer(
        max_epochs=2,
        workdir=tmp_path,
        progress_bar=False,
        log_every_n_steps=4,
        callbacks=[TensorBoardLogger()],
    )
    trainer.fit(Classifier(), data(), val_data=ArrayLoader((X, Y), 32))
    charts = layout(tmp_path / "tensorboard")
    # One chart per train metric, loss first, drawing its train, epoch and val tags.
    assert charts == {
        "train vs val": {
            "loss": ["^train/loss$", "^epoch/loss$", "^val/loss$"],
            "accuracy": ["^train/accuracy$", "^epoch/accuracy$", "^val/accuracy$"],
        }
    }
    s = scalars(tmp_path / "tensorboard")  # the tags the charts name, as before
    assert {"train/loss", "epoch/loss", "val/loss"} <= set(s)


def test_events_reach_disk_at_epoch_end_and_the_file_closes_on_an_exception(tmp_path):
    tb = TensorBoardLogger(log_dir=tmp_path / "tb")

    class Probe(nnxfit.Callback):
        seen = []

        def on_train_epoch_start(self, trainer, module, epoch):
            if epoch == 1:
                self.seen.append(scalars(tmp_path / "tb").get("epoch/loss"))

    trainer = nnxfit.Trainer(
        max_epochs=3, progress_bar=False, log_every_n_steps=2, callbacks=[tb, Probe(), Crash(9)]
    )
    with pytest.raises(RuntimeError, match="crash at step 9"):
        trainer.fit(Classifier(), data())
    assert [step for step, _ in Probe.seen[0]] == [6]
    s = scalars(tmp_path / "tb")
    assert [step for step, _ in s["train/loss"]] == [2, 4, 6, 8]  # 8: written by the close


def test_resume_hides_the_events_after_the_checkpoint(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_history = nnxfit.Trainer(workdir=ref_dir, callbacks=[TensorBoardLogger()], **FIT).fit(
        Classifier(), data(), val_data=ArrayLoader((X, Y), 32)
    )
    # Crash at 21 after a checkpoint at 8: the first run logged steps 12, 16, 20 and the ends
    # of epochs 0 to 2 that the resumed run logs again.
    history = run_interrupted_then_resumed(
        run_dir, Snapshot(at_step=8), 21, extra=[TensorBoardLogger()], **FIT
    )
    assert history.history == ref_history.history
    assert len(os.listdir(run_dir / "tensorboard")) == 2  # one event file per fit
    assert scalars(run_dir / "tensorboard") == scalars(ref_dir / "tensorboard")


def test_a_fresh_fit_hides_an_earlier_run_in_the_same_folder(tmp_path):
    kw = dict(workdir=tmp_path, progress_bar=False, log_every_n_steps=3)
    nnxfit.Trainer(max_epochs=3, callbacks=[TensorBoardLogger()], **kw).fit(Classifier(), data())
    history = nnxfit.Trainer(max_epochs=1, callbacks=[TensorBoardLogger()], **kw).fit(
        Classifier(seed=1), data()
    )
    s = scalars(tmp_path / "tensorboard")
    assert s["train/loss"][0][0] == 3 and [step for step, _ in s["train/loss"]] == [3, 6]
    assert s["epoch/loss"] == [(6, f32(history.history["loss"])[0])]


def test_no_folder_is_an_error_before_training():
    trainer = nnxfit.Trainer(max_epochs=1, progress_bar=False, callbacks=[TensorBoardLogger()])
    with pytest.raises(ConfigError, match=r"TensorBoardLogger\(log_dir=...\) or .*workdir"):
        trainer.fit(Classifier(), data())
    assert trainer.global_step == 0


def test_unwritable_folder_is_an_error_before_training(tmp_path):
    (tmp_path / "f").write_text("a file where a folder should be")
    tb = TensorBoardLogger(log_dir=tmp_path / "f" / "tb")
    trainer = nnxfit.Trainer(max_epochs=1, progress_bar=False, callbacks=[tb])
    with pytest.raises(ConfigError, match=r"cannot write to .*f/tb"):
        trainer.fit(Classifier(), data())
    assert trainer.global_step == 0


def test_two_fits_within_a_second_get_their_own_files_in_order(tmp_path):
    trainer = nnxfit.Trainer(max_epochs=1, workdir=tmp_path)  # hooks called directly: no fit
    tb = TensorBoardLogger()
    for value in (1.0, 2.0):
        tb.on_fit_start(trainer, None)
        tb.on_train_batch_end(trainer, None, 1, {"loss": value})
        tb.on_fit_end(trainer, None)
    files = sorted(os.listdir(tmp_path / "tensorboard"))
    assert len(files) == 2
    assert scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 2.0)]  # the later one wins
