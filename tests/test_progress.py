"""ProgressBar: what a person sees on a terminal and in a CI log."""

import io
import re
import sys
import time

import pytest
from jax import monitoring
from models import Classifier, toy_data
from rich.console import Console

import nnxfit
from nnxfit.callbacks.progress import ProgressBar, format_value
from nnxfit.compile_watch import TRACE_EVENT
from nnxfit.data import ArrayLoader
from nnxfit.device_clock import DeviceProgress
from nnxfit.errors import ConfigError
from nnxfit.loop import epochs_total

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


def render(bar):
    """The live bar as the terminal shows it at this moment."""
    c = Console(file=io.StringIO(), width=100)
    c.print(bar.progress.get_renderable())
    return c.file.getvalue().strip()


class Snapshots(nnxfit.Callback):
    """Renders the live bar after each call, with the device's progress the hooks saw."""

    order = 95  # after the bar has taken the call's step and logs
    records_only = True

    def __init__(self, bar):
        self.bar = bar
        self.frames = []

    def on_train_batch_end(self, trainer, module, step, logs):
        confirmed = trainer.device_progress.step
        self.frames.append((step, bool(logs), render(self.bar), confirmed))


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

    # Mid-epoch the bar counts optimizer steps (4 per call), per epoch, against 12: the steps
    # the device is known to have finished, never more, even when the hooks saw more (the
    # device runs up to trainer.lookahead events ahead of them, and the hooks see its calls
    # in bursts). At a log step the Trainer read the metrics: the device is there.
    assert [s for s, _, _, _ in snaps.frames] == [4, 8, 12, 16, 20, 24]
    for step, logged, frame, confirmed in snaps.frames:
        epoch = (step - 1) // 12
        assert frame.startswith(f"Epoch {epoch + 1}/2"), frame
        shown = int(re.search(r" (\d+)/12\b", frame).group(1))
        assert shown == confirmed - 12 * epoch and confirmed <= step, (frame, confirmed)
        if logged:  # steps 8, 16, 24: the interval's mean loss is on the bar
            assert confirmed == step
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


class OddNames(Classifier):
    """A metric whose name rich would read as markup and an emoji code."""

    def training_step(self, batch):
        loss, metrics = super().training_step(batch)
        return loss, {"[bold]acc:smile:": metrics["accuracy"]}


def test_plain_lines_are_the_same_captured_recorded_and_written():
    """Epoch lines are written straight to a plain console's file; a console that captures or
    records gets them through rich, and all three read the same, names taken literally."""

    def lines(con, capture=False):
        trainer = nnxfit.Trainer(max_epochs=2, steps_per_execution=4, console=con)
        if capture:
            with con.capture() as cap:
                trainer.fit(OddNames(), data()[0])
            return cap.get().splitlines()
        trainer.fit(OddNames(), data()[0])
        return (con.export_text() if con.record else con.file.getvalue()).splitlines()

    plain = lines(plain_console())
    captured = lines(plain_console(), capture=True)
    recorded = lines(Console(file=io.StringIO(), width=100, record=True))
    assert len(plain) == 2 and all("[bold]acc:smile:: " in ln for ln in plain), plain

    def untimed(lines):  # the times and the compile entry differ between fits
        return [re.sub(r"steps - .* - loss", "steps - loss", ln) for ln in lines]

    for other in (captured, recorded):
        assert untimed(other) == untimed(plain), other


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
    grad_accum_steps, batch_in_epoch, global_step, current_epoch = 1, 0, 0, 0
    cb = ()

    def __init__(self, console, steps_per_epoch=10**6):
        self.console = console
        self.steps_per_epoch = steps_per_epoch
        self.device_progress = DeviceProgress(0, 0.0)

    @property
    def epochs_total(self):  # as the Trainer's (``FitView.epochs_total``)
        return epochs_total(self.max_epochs, self.max_steps, self.steps_per_epoch)


def test_bar_counts_and_times_what_the_device_finished(monkeypatch):
    # The hooks got 10 calls in a burst while the device was known to have finished 4 steps
    # in 2 s of training time: the bar shows 4 steps at 2 steps/s, not 10 in no time.
    con = terminal(monkeypatch)
    trainer = FakeTrainer(con, steps_per_epoch=100)
    clock = [0.0]
    bar = ProgressBar(get_time=lambda: clock[0])
    bar.on_fit_start(trainer, None)
    try:
        # At the epoch start the device had done 0 steps; 5 s were compiles and setup.
        trainer.device_progress = DeviceProgress(0, 10.0, excluded=5.0)
        bar.on_train_epoch_start(trainer, None, 0)
        trainer.device_progress = DeviceProgress(4, 12.0, excluded=5.0)
        for step in range(1, 11):
            trainer.global_step = step
            bar.on_train_batch_end(trainer, None, step, {"loss": 0.5} if step == 10 else {})
        frame = render(bar)
        assert " 4/100 " in frame and "10/100" not in frame, frame
        assert " 2 steps/s" in frame and "48.0s" in frame, frame  # 96 steps left at 2/s
        assert "loss: 0.5" in frame
        # Epoch end: 100 steps in 50 s, 5 of which were not training (a validation, say).
        trainer.global_step = 100
        trainer.device_progress = DeviceProgress(100, 60.0, excluded=10.0)
        bar.on_train_epoch_end(trainer, None, 0, {"loss": 0.25})
    finally:
        bar.on_fit_end(trainer, None)
    assert "Epoch 1/3 - 100/100 steps - 45.0s (2.22 steps/s) - loss: 0.25" in text_of(con)


class Frames(nnxfit.Callback):
    """Renders the live bar at fit start and validation start (after the bar's own hooks),
    and while jax compiles the train step (from inside the compile, when the loop is
    blocked and only rich's refresh thread redraws)."""

    order = 95
    records_only = True

    def __init__(self, bar):
        self.bar, self.frames = bar, []

    def on_fit_start(self, trainer, module):
        self.frames.append(("fit start", render(self.bar)))
        monitoring.register_event_duration_secs_listener(self.on_compile)

    def on_fit_end(self, trainer, module):
        monitoring.unregister_event_duration_listener(self.on_compile)

    def on_compile(self, event, duration, **kw):
        if event == TRACE_EVENT and kw.get("fun_name") in ("_single", "jit(_single)"):
            self.frames.append(("compiling", render(self.bar)))

    def on_validation_start(self, trainer, module):
        self.frames.append((f"validation {trainer.current_epoch}", render(self.bar)))


def test_bar_says_what_it_compiles_and_the_epoch_line_how_long(monkeypatch):
    con = terminal(monkeypatch)
    bar = ProgressBar(console=con)
    frames = Frames(bar)
    x, y = toy_data(44)  # batches of 8, 8, 8, 8, 8, 4: the last one compiles a new program
    trainer = nnxfit.Trainer(max_epochs=2, callbacks=[bar, frames])
    trainer.fit(Classifier(), ArrayLoader((x, y), 8), val_data=ArrayLoader((x, y), 22))
    shown = dict(frames.frames[:1] + frames.frames[3:])
    compiling = [f for k, f in frames.frames if k == "compiling"]
    # Before the first call (which compiles the train step), and while it compiles.
    assert "Epoch 1/2" in shown["fit start"] and "compiling train step..." in shown["fit start"]
    assert len(compiling) == 2, frames.frames
    assert re.search(r"compiling train step\.\.\. \d", compiling[0]), compiling[0]
    assert "compiling train step for a new batch shape..." in compiling[1], compiling[1]
    # The first validation compiles the validation step; the second does not.
    assert "validating" in shown["validation 0"]
    assert "compiling validation step..." in shown["validation 0"], shown["validation 0"]
    assert "compiling" not in shown["validation 1"], shown["validation 1"]
    # The epoch lines: the compile time where the train step compiled, validation's time.
    out = text_of(con)
    lines = [ln.strip() for ln in out.splitlines() if re.match(r"Epoch \d/2 - ", ln.strip())]
    assert len(lines) == 2, out
    assert re.search(r" - compile \d+(\.\d+)?m?s - val \d+(\.\d+)?m?s - loss", lines[0])
    assert " compile " not in lines[1] and re.search(r" - val \d+(\.\d+)?m?s - loss", lines[1])


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
