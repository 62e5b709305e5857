"""The writer protocol the loggers share: what a RunWriter is told by real fits (rows, resume,
status), and what the background thread does for slow clients (batches, errors as warnings)."""

import threading

import pytest
from models import Classifier, toy_data

import nnxfit
from nnxfit.callbacks import LoggerCallback, RunWriter
from nnxfit.callbacks.writer import BackgroundWriter
from nnxfit.data import ArrayLoader

X, Y = toy_data(96)  # batch 16: 6 steps per epoch


def data():
    return ArrayLoader((X, Y), 16, shuffle=True, seed=1)


class Recorder(RunWriter):
    def __init__(self, background=False, fail=None):
        self.background = background
        self.flush_at_epoch_end = not background  # a tracker's points arrive within seconds
        self.fail = fail or ()
        self.start = None
        self.calls: list[list] = []
        self.flushes = 0
        self.status = "open"
        self.thread = None

    def open(self, start):
        if "open" in self.fail:
            raise ConnectionError("no server at http://tracker:5000")
        self.start = start

    def write(self, rows):
        self.thread = threading.current_thread()
        if "write" in self.fail:
            raise ConnectionError("server went away")
        self.calls.append([(r.kind, r.step, r.epoch, dict(r.metrics)) for r in rows])

    def flush(self):
        self.flushes += 1

    def close(self, status):
        self.status = status


class Probe(LoggerCallback):
    def __init__(self, writer):
        super().__init__()
        self.writer = writer

    def make_writer(self, trainer, kind):
        return self.writer


class Logs(nnxfit.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, step, logs):
        if logs:
            self.rows.append(("train", step, trainer.current_epoch, dict(logs)))

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        self.rows.append(("epoch", trainer.global_step, epoch, dict(logs)))


def fit(writer, *extra, **kw):
    logs = Logs()
    kw = {"max_epochs": 3, "progress_bar": False, "log_every_n_steps": 2, **kw}
    trainer = nnxfit.Trainer(callbacks=[Probe(writer), logs, *extra], **kw)
    trainer.fit(Classifier(), data())
    return trainer, logs.rows


def test_a_writer_gets_every_row_in_order_and_the_status():
    writer = Recorder()
    trainer, rows = fit(writer)
    assert [r for call in writer.calls for r in call] == rows
    assert writer.start.kind == "fit" and writer.start.step == 0 and writer.start.resume is None
    assert writer.start.options["max_epochs"] == 3
    assert writer.flushes == 3  # one per epoch end: a file writer's rows reach the disk
    assert writer.status == "FINISHED"


def test_a_background_writer_gets_the_rows_in_batches_off_the_loop(monkeypatch):
    monkeypatch.setattr(BackgroundWriter, "interval", 3600.0)  # nothing before the end
    writer = Recorder(background=True)
    _, rows = fit(writer)
    # One call at the end with all 12 rows: the loop never waited for the client per row.
    assert [len(call) for call in writer.calls] == [len(rows)] == [12]
    assert writer.calls[0] == rows
    assert writer.thread is not threading.main_thread()
    assert writer.status == "FINISHED"


def test_client_errors_are_warnings_once_and_the_fit_goes_on(monkeypatch):
    monkeypatch.setattr(BackgroundWriter, "interval", 0.0)  # a call per row
    writer = Recorder(background=True, fail={"write"})
    with pytest.warns(UserWarning, match="Probe could not write: ConnectionError") as seen:
        trainer, _ = fit(writer)
    assert len([w for w in seen if "could not write" in str(w.message)]) == 1
    assert trainer.global_step == 18 and writer.status == "FINISHED"

    writer = Recorder(background=True, fail={"open"})
    with pytest.warns(UserWarning, match="could not start its run.*http://tracker:5000"):
        trainer, _ = fit(writer)
    assert trainer.global_step == 18 and writer.calls == []


def test_ctrl_c_twice_ends_the_run_killed_and_an_exception_failed():
    class Raise(nnxfit.Callback):
        def __init__(self, error):
            self.error = error

        def on_train_batch_end(self, trainer, module, step, logs):
            if step == 5:
                raise self.error

    writer = Recorder()
    with pytest.raises(KeyboardInterrupt):  # what a second Ctrl-C raises
        fit(writer, Raise(KeyboardInterrupt()))
    assert writer.status == "KILLED"
    writer = Recorder()
    with pytest.raises(ValueError):
        fit(writer, Raise(ValueError("bad batch")))
    assert writer.status == "FAILED"


def test_only_process_zero_and_never_under_fast_dev_run(tmp_path):
    writer = Recorder()
    trainer = nnxfit.Trainer(max_epochs=1, progress_bar=False, callbacks=[Probe(writer)])
    trainer.is_global_zero = False
    trainer.fit(Classifier(), data())
    nnxfit.Trainer(fast_dev_run=True, progress_bar=False, callbacks=[Probe(writer)]).fit(
        Classifier(), data()
    )
    assert writer.start is None and writer.calls == []
