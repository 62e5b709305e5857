"""ProgressBar: what a person sees on a terminal and in a CI log."""

import io
import re
import sys
import time

import pytest
from models import Classifier, toy_data
from rich.console import Console

import nnxfit
from nnxfit.callbacks.progress import ProgressBar, format_value
from nnxfit.data import ArrayLoader
from nnxfit.errors import ConfigError

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def terminal(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")  # a CI "dumb" TERM would turn the bar off
    return Console(file=io.StringIO(), force_terminal=True, width=100)


def plain_console():
    return Console(file=io.StringIO(), width=100)


def text_of(console):
    return ANSI.sub("", console.file.getvalue())


def data(n=48, batch=4):
    x, y = toy_data(n)
    return ArrayLoader((x, y), batch), ArrayLoader((x, y), 16)


class Snapshots(nnxfit.Callback):
    """Renders the live bar after each call, as the terminal would show it at that moment."""

    order = 95  # after the bar has taken the call's step and logs
    reads_module = False

    def __init__(self, bar):
        self.bar = bar
        self.frames = []

    def on_train_batch_end(self, trainer, module, step, logs):
        c = Console(file=io.StringIO(), width=100)
        c.print(self.bar.progress.get_renderable())
        self.frames.append((step, bool(logs), c.file.getvalue().strip()))


def epoch_line(h, e, n_epochs, done, total):
    """The expected start and metric part of an epoch line, from History."""
    head = f"Epoch {e + 1}/{n_epochs} - {done}/{total} steps - "
    names = ["loss", "accuracy", "val_loss", "val_accuracy"]
    tail = " - ".join(f"{k}: {format_value(h.history[k][e])}" for k in names)
    return head, tail


def test_terminal_live_bar_with_steps_per_execution(monkeypatch):
    con = terminal(monkeypatch)
    stdout = sys.stdout
    bar = ProgressBar(console=con)
    snaps = Snapshots(bar)
    train, val = data()  # 12 batches of 4: 3 calls of 4 steps per epoch
    trainer = nnxfit.Trainer(
        max_epochs=2, steps_per_execution=4, log_every_n_steps=8, callbacks=[bar, snaps]
    )
    h = trainer.fit(Classifier(), train, val_data=val)

    # Mid-epoch the bar counts optimizer steps (4 per call), per epoch, against 12.
    assert [s for s, _, _ in snaps.frames] == [4, 8, 12, 16, 20, 24]
    for step, logged, frame in snaps.frames:
        done = (step - 1) % 12 + 1
        assert frame.startswith(f"Epoch {(step - 1) // 12 + 1}/2"), frame
        assert f" {done}/12 " in frame, frame
        if logged:  # steps 8, 16, 24: the interval's mean loss is on the bar
            assert re.search(r"loss: \d\.\d+", frame), frame
    assert "loss:" not in snaps.frames[0][2]  # nothing logged yet at step 4
    assert re.search(r"\d+(\.\d+)? steps/s", snaps.frames[-1][2])

    # What stays on screen: one line per epoch with every metric, train then val.
    out = text_of(con)
    lines = [ln for ln in out.splitlines() if re.match(r"Epoch \d/2 - ", ln.strip())]
    assert len(lines) == 2, out
    for e, line in enumerate(lines):
        head, tail = epoch_line(h, e, 2, 12, 12)
        assert line.strip().startswith(head), line
        assert line.strip().endswith(tail), line
        assert re.search(r" - \d+(\.\d+)?(ms|s) \(\d+(\.\d+)? (steps/s|s/step)\) - ", line)
    # Validation showed as a status on the bar, not as lines of its own.
    assert "Epoch 1/2 validating" in out
    assert "13/12" not in out and "24/12" not in out
    # The terminal is left whole: live display gone, cursor shown again, stdout restored.
    raw = con.file.getvalue()
    assert raw.rindex("\x1b[?25h") > raw.rindex("\x1b[?25l")
    assert bar.progress is None
    assert sys.stdout is stdout


def test_default_bar_uses_trainer_console_and_max_steps_total(monkeypatch):
    con = terminal(monkeypatch)
    train, _ = data()
    trainer = nnxfit.Trainer(max_steps=10, steps_per_execution=4, log_every_n_steps=4, console=con)
    trainer.fit(Classifier(), train)
    out = text_of(con)
    # max_steps=10 ends the first epoch after calls of 4, 4 and 2 steps.
    assert re.search(r"Epoch 1/1 - 10/10 steps - .* - loss: \d", out), out
    assert "/12" not in out


def test_non_terminal_prints_plain_lines():
    con = plain_console()
    train, val = data()
    trainer = nnxfit.Trainer(max_epochs=2, steps_per_execution=4, log_every_n_steps=4, console=con)
    h = trainer.fit(Classifier(), train, val_data=val)
    out = con.file.getvalue()
    assert "\x1b" not in out and "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 2, out  # quiet: one line per epoch, nothing else
    for e, line in enumerate(lines):
        head, tail = epoch_line(h, e, 2, 12, 12)
        assert line.startswith(head) and line.endswith(tail), line


def test_non_terminal_interval_lines():
    con = plain_console()
    train, _ = data()
    bar = ProgressBar(console=con, line_every_s=0)
    trainer = nnxfit.Trainer(
        max_epochs=1, steps_per_execution=4, log_every_n_steps=4, callbacks=[bar]
    )
    trainer.fit(Classifier(), train)
    lines = con.file.getvalue().splitlines()
    # A line at each log step (steps 4, 8, 12), then the epoch line.
    assert [ln.split(" - ")[1] for ln in lines] == [
        "4/12 steps",
        "8/12 steps",
        "12/12 steps",
        "12/12 steps",
    ], lines
    assert all(re.search(r" - loss: \d", ln) for ln in lines), lines


class FailAt(nnxfit.Callback):
    reads_module = False

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, step, logs):
        if step >= self.step:
            raise RuntimeError("boom")


def test_exception_leaves_a_line_and_a_working_terminal(monkeypatch):
    con = terminal(monkeypatch)
    stdout = sys.stdout
    bar = ProgressBar(console=con)
    train, _ = data()
    trainer = nnxfit.Trainer(max_epochs=2, callbacks=[bar, FailAt(5)])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Classifier(), train)
    out = text_of(con)
    assert re.search(r"Epoch 1/2 - 5/12 steps - .*stopped by RuntimeError", out), out
    raw = con.file.getvalue()
    assert raw.rindex("\x1b[?25h") > raw.rindex("\x1b[?25l")
    assert bar.progress is None and sys.stdout is stdout


def test_silent_off_process_zero_and_when_disabled():
    train, _ = data()
    con = plain_console()
    trainer = nnxfit.Trainer(max_epochs=1, console=con)
    trainer.is_global_zero = False  # as on process 1 of a multi-host run
    trainer.fit(Classifier(), train)
    con2 = plain_console()
    nnxfit.Trainer(max_epochs=1, console=con2, progress_bar=False).fit(Classifier(), train)
    assert con.file.getvalue() == "" and con2.file.getvalue() == ""


class FakeTrainer:
    is_global_zero = True
    max_epochs, max_steps, steps_per_epoch = 3, None, 10**6
    grad_accum_steps, batch_in_epoch, global_step = 1, 0, 0

    def __init__(self, console):
        self.console = console


def test_per_call_cost_is_small(monkeypatch):
    # Called once per jitted call: a live-bar update must cost microseconds, not a redraw.
    trainer = FakeTrainer(terminal(monkeypatch))
    bar = ProgressBar(refresh_per_second=1)
    bar.on_fit_start(trainer, None)
    bar.on_train_epoch_start(trainer, None, 0)
    try:
        n = 5000
        t = time.perf_counter()
        for i in range(1, n + 1):
            bar.on_train_batch_end(trainer, None, i, {})
        per_call = (time.perf_counter() - t) / n
    finally:
        bar.on_fit_end(trainer, None)
    assert per_call < 100e-6, f"{per_call * 1e6:.1f} us per call"  # measured ~3 us


def test_bad_arguments():
    with pytest.raises(ConfigError, match="refresh_per_second"):
        ProgressBar(refresh_per_second=0)
    with pytest.raises(ConfigError, match="line_every_s"):
        ProgressBar(line_every_s=-1)
    with pytest.raises(ConfigError, match=r"metrics=\['loss'\]"):
        ProgressBar(metrics="loss")
