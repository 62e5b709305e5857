"""``ProgressBar``: what a person watches while ``fit`` runs.

On a terminal (or in Jupyter) it is one rich live line: the epoch, the steps the device has
finished of the epoch's total, ETA, steps/s and the latest logged metrics; compiles and
validation show as a status, not as lines. Each epoch ends with one plain summary line
holding every logged metric, printed above the live line so it stays in the scrollback; the
live line itself is cleared at the end. Anywhere else (CI logs, pipes, files) there is no
live redraw and no escape codes: one line per epoch, plus a line at a log step when
``line_every_s`` seconds passed since the last one, so a long epoch still shows signs of life.

The numbers are the device's, not the hooks': the hooks run up to ``trainer.lookahead``
events behind the device and get calls in bursts, so counting hook calls would run ahead of
the computation and time bursts instead of steps. The bar counts the steps the device is
known to have finished (``trainer.device_progress``), and its steps/s and ETA are those
steps over training time: compiles, validation and epoch-end work left out (they get their
own times on the epoch line). The count moves at log steps and whenever the loop sees the
device caught up; it never makes the host wait for the device.

Before the first step it says it is compiling the train step (the first call compiles it,
which can take minutes), and likewise for the first validation and for a new batch shape;
the epoch line gives the compile time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping

from rich import get_console
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
)
from rich.table import Column
from rich.text import Text

from nnxfit.callbacks.base import Callback
from nnxfit.callbacks.compile_watch import CompileWatch
from nnxfit.device_clock import DeviceProgress, steps_per_second
from nnxfit.errors import ConfigError

SEP = " - "  # ASCII, so CI logs read the same on any encoding


def _writes_plain(console: Console) -> bool:
    """Whether ``console.print`` of plain text would write it unchanged to ``console.file``:
    no terminal codes, no notebook, nothing recorded or captured, not quiet."""
    return not (
        console.is_terminal
        or console.is_jupyter
        or console.record
        or console.quiet
        or getattr(console, "_buffer_index", 1)  # inside ``console.capture()`` (or unknown)
    )


def format_value(v: float) -> str:
    """Four significant digits, compact: 0.4322, 3, 1e-05, nan."""
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.4g}"


def format_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f}ms"
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def format_speed(rate: float | None) -> str:
    """``153 steps/s``, ``4.2 steps/s``, ``2.5 s/step``; empty when unknown."""
    if not rate or rate <= 0:
        return ""
    if rate < 1:
        return f"{1 / rate:.3g} s/step"
    return f"{rate:.0f} steps/s" if rate >= 100 else f"{rate:.3g} steps/s"


def format_metrics(logs: Mapping[str, float], names: Iterable[str] | None = None) -> str:
    """``loss: 0.4322 - accuracy: 0.8125``: train metrics, then ``val_*``, loss first in each."""
    keys = list(logs) if names is None else [k for k in names if k in logs]
    keys.sort(key=lambda k: (k.startswith("val_"), k not in ("loss", "val_loss")))
    return SEP.join(f"{k}: {format_value(logs[k])}" for k in keys)


def epochs_total(trainer) -> int | None:
    """How many epochs the fit will run (``max_steps`` may end it before ``max_epochs``)."""
    return trainer.epochs_total


class _FieldColumn(ProgressColumn):
    """Renders a text field the bar computes at hook time (rate, ETA)."""

    def __init__(self, name: str, style: str):
        super().__init__()
        self.name, self.style = name, style

    def render(self, task: Task) -> Text:
        return Text(task.fields.get(self.name, ""), style=self.style)


class _StatusColumn(ProgressColumn):
    """What the loop is compiling (the train step, the validation step, a new batch shape)
    with the time so far; else the latest metrics. Rendered by rich's refresh thread, so it
    ticks on while the loop is blocked in a compile."""

    def __init__(self, bar: ProgressBar):
        super().__init__(table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1))
        self.bar = bar

    def render(self, task: Task) -> Text:
        status = self.bar._status()
        if status:
            return Text(status, style="progress.description", no_wrap=True, overflow="ellipsis")
        return Text(task.fields.get("metrics", ""), no_wrap=True, overflow="ellipsis")


class ProgressBar(Callback):
    """Rich progress display for ``fit``; the Trainer adds one unless ``progress_bar=False``.

    Args:
        console: a ``rich.console.Console``; default the Trainer's ``console``, else rich's
            global console (stdout).
        refresh_per_second: redraws of the live line (a rich background thread).
        metrics: names shown on the live line; ``None`` shows every logged metric whose name
            has no ``/`` (per-module details such as ``grad_norm/encoder`` stay in the
            epoch line). Epoch summary lines always show every metric.
        line_every_s: without a terminal, also print a line at a log step when this many
            seconds passed since the last line; ``None`` prints only one line per epoch.
        get_time: the clock (seconds) for the bar's own timings (validation and compile
            status, ``line_every_s``, redraws); tests pass a fake one. Step rates come from
            ``trainer.device_progress``.
    """

    order = 90  # late: show what other callbacks added to the logs
    records_only = True

    def __init__(
        self,
        console: Console | None = None,
        *,
        refresh_per_second: float = 4.0,
        metrics: Iterable[str] | None = None,
        line_every_s: float | None = 60.0,
        get_time: Callable[[], float] | None = None,
    ):
        if not (isinstance(refresh_per_second, int | float) and refresh_per_second > 0):
            raise ConfigError(
                f"ProgressBar refresh_per_second must be a number > 0; got {refresh_per_second!r}."
            )
        if line_every_s is not None and not (
            isinstance(line_every_s, int | float) and line_every_s >= 0
        ):
            raise ConfigError(
                f"ProgressBar line_every_s must be a number >= 0 or None; got {line_every_s!r}."
            )
        if isinstance(metrics, str):
            raise ConfigError(
                f"ProgressBar metrics must be a list of names, not the string {metrics!r}; "
                f"write metrics=[{metrics!r}]."
            )
        self.console = console
        self.refresh_per_second = float(refresh_per_second)
        self.metrics = list(metrics) if metrics is not None else None
        self.line_every_s = line_every_s
        self.get_time = get_time or time.monotonic
        self._reset_state()

    def _reset_state(self) -> None:
        self._console: Console | None = None
        self._active = False  # False on processes other than 0, and after the fit ends
        self._live_mode = False
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._label = ""
        self._epoch = 0
        self._epoch_open = False
        self._base = 0  # global_step at the epoch's first step
        self._total: int | None = None
        self._ref: DeviceProgress | None = None  # the device's progress at the epoch's start
        self._seen: DeviceProgress | None = None  # the latest progress shown
        self._t_line = 0.0
        self._val_s = 0.0  # seconds validating in this epoch
        self._t_val: float | None = None  # when the validation under way started
        self._stop_reason: str | None = None
        self._compile_watch: CompileWatch | None = None
        # Status for the refresh thread: (what, since when); a compile CompileWatch reports.
        self._busy: tuple[str, float] | None = None
        self._validated = False  # a validation ran in this fit (it compiled the first time)
        self._recompile: tuple[object, float] | None = None

    @property
    def progress(self) -> Progress | None:
        """The rich ``Progress`` while the live display runs (``None`` otherwise)."""
        return self._progress

    # ------------------------------------------------------------------------ hooks ---
    def on_fit_start(self, trainer, module) -> None:
        self._reset_state()
        self._active = bool(trainer.is_global_zero)
        if not self._active:
            return
        console = self.console or getattr(trainer, "console", None) or get_console()
        self._console = console
        # A dumb terminal cannot move the cursor: redraws would pile up, so go line-based.
        self._live_mode = (console.is_terminal and not console.is_dumb_terminal) or bool(
            console.is_jupyter
        )
        self._compile_watch = next(
            (c for c in getattr(trainer, "cb", ()) if isinstance(c, CompileWatch)), None
        )
        # The first call compiles the train step before it returns (a minute or more for a
        # large model): say so now, before the loop dispatches it.
        self._busy = ("compiling train step...", self.get_time())
        if self._live_mode:
            done = self._start_epoch(trainer, trainer.current_epoch)
            self._progress = self._make_progress()
            self._task = self._progress.add_task(self._label, total=self._total, completed=done)
            self._progress.start()

    def on_train_epoch_start(self, trainer, module, epoch) -> None:
        if not self._active:
            return
        done = self._start_epoch(trainer, epoch)
        self._epoch_open = True
        self._ref = self._seen = trainer.device_progress
        self._val_s = 0.0
        self._t_line = self.get_time()
        self._check_compiled(trainer)
        if not self._live_mode:
            return
        if self._progress is None:
            self._progress = self._make_progress()
            self._task = self._progress.add_task(self._label, total=self._total, completed=done)
            self._progress.start()
        else:
            self._progress.reset(
                self._task,
                total=self._total,
                completed=done,
                description=self._label,
                metrics="",
                rate="",
                eta="",
            )

    def on_train_batch_end(self, trainer, module, step, logs) -> None:
        if self._busy is not None:
            self._check_compiled(trainer)
        progress = self._progress
        if progress is not None:
            p = trainer.device_progress
            fields = {}
            if p is not self._seen:  # the device got further: new count, rate and ETA
                self._seen = p
                fields = self._speed_fields(p)
            if logs:
                fields["metrics"] = format_metrics(logs, self._shown(logs))
            if fields:
                progress.update(self._task, completed=self._done(p), **fields)
        elif logs and self._active and self.line_every_s is not None:
            now = self.get_time()
            if now - self._t_line >= self.line_every_s:
                self._t_line = now
                p = trainer.device_progress
                self._print(self._line(self._done(p), p, logs, self._shown(logs)))

    def on_validation_start(self, trainer, module) -> None:
        if not (self._active and self._epoch_open):
            return
        self._t_val = self.get_time()
        if not self._validated:  # a fit's first validation compiles the validation step
            self._validated = True
            self._busy = ("compiling validation step...", self._t_val)
        if self._progress is not None:
            p = self._seen = trainer.device_progress  # the steps before it are all done
            fields = {**self._speed_fields(p), "eta": ""}
            self._progress.update(
                self._task,
                completed=self._done(p),
                description=f"{self._label} validating",
                refresh=True,
                **fields,
            )

    def on_validation_end(self, trainer, module, logs) -> None:
        if not (self._active and self._epoch_open) or self._t_val is None:
            return
        self._val_s += self.get_time() - self._t_val
        self._t_val = self._busy = None
        if self._progress is not None:
            self._progress.update(self._task, description=self._label)

    def on_train_epoch_end(self, trainer, module, epoch, logs) -> None:
        if not self._active:
            return
        self._epoch_open = False
        p = trainer.device_progress
        done = trainer.global_step - self._base  # the epoch-end read: all of it finished
        if self._progress is not None:
            self._progress.update(self._task, completed=done)
        self._print(self._line(done, p, logs, None))

    def on_interrupt(self, trainer, module) -> None:
        self._stop_reason = "interrupted"

    def on_exception(self, trainer, module, error) -> None:
        self._stop_reason = f"stopped by {type(error).__name__}"
        self._close(trainer)

    def on_fit_end(self, trainer, module) -> None:
        self._close(trainer)

    # --------------------------------------------------------------------- helpers ---
    def _start_epoch(self, trainer, epoch: int) -> int:
        """Label, first step and total of ``epoch``; returns the steps already done in it."""
        self._epoch = epoch
        n = epochs_total(trainer)
        self._label = f"Epoch {epoch + 1}/{n}" if n else f"Epoch {epoch + 1}"
        A = trainer.grad_accum_steps
        done = -(-trainer.batch_in_epoch // A)  # a resumed run starts mid-epoch
        self._base = trainer.global_step - done
        total = trainer.steps_per_epoch
        if total is not None and trainer.max_steps is not None:
            total = min(total, trainer.max_steps - self._base)
        self._total = total
        return done

    def _done(self, p: DeviceProgress) -> int:
        """Steps of this epoch the device has finished."""
        return max(0, p.step - self._base)

    def _speed_fields(self, p: DeviceProgress) -> dict[str, str]:
        rate = steps_per_second(self._ref, p) if self._ref is not None else None
        eta = ""
        if rate and self._total is not None:
            eta = format_seconds(max(0.0, (self._total - self._done(p)) / rate))
        return {"rate": format_speed(rate), "eta": eta}

    def _check_compiled(self, trainer) -> None:
        """Ends the "compiling train step" status once the first call returned."""
        if self._busy is None or not self._busy[0].startswith("compiling train"):
            return
        watch = self._compile_watch
        if watch is None or (watch.records and watch.records[0].done):
            self._busy = None

    def _status(self) -> str:
        """What the loop is busy with, for the refresh thread (reads only)."""
        now = self.get_time()
        watch = self._compile_watch
        records = watch.records if watch is not None else []
        busy = self._busy
        if busy is not None and not (
            busy[0].startswith("compiling train") and records[0:1] and records[0].done
        ):
            return f"{busy[0]} {format_seconds(now - busy[1])}"
        rec = records[-1] if len(records) > 1 else None
        if rec is not None and not rec.done:  # a mid-fit compile: a new batch shape
            if self._recompile is None or self._recompile[0] is not rec:
                self._recompile = (rec, now)
            since = format_seconds(now - self._recompile[1])
            return f"compiling train step for a new batch shape... {since}"
        return ""

    def _compile_seconds(self, epoch: int) -> float:
        """Seconds spent compiling train programs for ``epoch`` (``CompileWatch``'s records)."""
        watch = self._compile_watch
        if watch is None:
            return 0.0
        return sum(r.total_s for r in watch.records if r.epoch == epoch and r.done)

    def _close(self, trainer) -> None:
        """Ends the live display (never leave the terminal without a cursor); an epoch cut
        short by an error or a signal still gets its line."""
        if not self._active:
            return
        self._active = False
        try:
            if self._epoch_open:
                self._epoch_open = False
                # The steps the hooks saw; times only as far as the device was known to be.
                done = trainer.global_step - self._base
                line = self._line(done, trainer.device_progress, {}, None)
                self._print(line + SEP + (self._stop_reason or "stopped"))
        finally:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None

    def _shown(self, logs: Mapping[str, float]) -> list[str]:
        if self.metrics is not None:
            return self.metrics
        return [k for k in logs if "/" not in k]

    def _line(self, done: int, p: DeviceProgress, logs: Mapping, names) -> str:
        total = "?" if self._total is None else self._total
        parts = [self._label, f"{done}/{total} steps"]
        # Training time, up to the latest step the device is known to have finished (on the
        # epoch line, the last): compiles, validation and epoch-end work get their own entries.
        rate = steps_per_second(self._ref, p) if self._ref is not None else None
        if rate:
            seconds = p.train_time - self._ref.train_time
            parts.append(f"{format_seconds(seconds)} ({format_speed(rate)})")
        compiled = self._compile_seconds(self._epoch)
        if compiled > 0:
            parts.append(f"compile {format_seconds(compiled)}")
        if self._val_s > 0:
            parts.append(f"val {format_seconds(self._val_s)}")
        metrics = format_metrics(logs, names)
        if metrics:
            parts.append(metrics)
        return SEP.join(parts)

    def _print(self, line: str) -> None:
        # Plain text: no markup parsing ("[...]" in a metric name stays literal), no
        # highlighting, and soft wrap so a CI log keeps one epoch on one line.
        console = self._console
        if _writes_plain(console) and not self._live_mode:
            # What rich would write, without its rendering: 200-250 us of host time at each
            # epoch end inside a fit (the step's threads busy), ~1 us this way; on a short
            # epoch that time is taken from the device's next steps.
            console.file.write(line + "\n")
            console.file.flush()
            return
        console.print(line, markup=False, highlight=False, soft_wrap=True, emoji=False)

    def _make_progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            _FieldColumn("eta", "progress.remaining"),
            _FieldColumn("rate", "progress.data.speed"),
            _StatusColumn(self),
            console=self._console,
            refresh_per_second=self.refresh_per_second,
            get_time=self.get_time,
            transient=True,  # the epoch lines are the record; the live line goes away
        )

    def __repr__(self) -> str:
        return f"ProgressBar(refresh_per_second={self.refresh_per_second})"
