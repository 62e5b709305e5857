"""``ProgressBar``: what a person watches while ``fit`` runs.

On a terminal (or in Jupyter) it is one rich live line: the epoch, steps done of the epoch's
total, ETA, steps/s and the latest logged metrics; validation shows as a status, not as
lines. Each epoch ends with one plain summary line holding every logged metric, printed
above the live line so it stays in the scrollback; the live line itself is cleared at the
end. Anywhere else (CI logs, pipes, files) there is no live redraw and no escape codes: one
line per epoch, plus a line at a log step when ``line_every_s`` seconds passed since the
last one, so a long epoch still shows signs of life.

Per jitted call it only updates a counter from ``trainer.global_step`` (exact with
``steps_per_execution > 1``) and reads metrics only when the Trainer fetched them anyway
(``logs`` non-empty on log steps): it never makes the host wait for the device.
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
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

from nnxfit.callbacks.base import Callback
from nnxfit.errors import ConfigError

SEP = " - "  # ASCII, so CI logs read the same on any encoding


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


def format_rate(steps: float, seconds: float) -> str:
    if seconds <= 0 or steps <= 0:
        return ""
    rate = steps / seconds
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
    n = trainer.max_epochs
    spe = trainer.steps_per_epoch
    if trainer.max_steps is not None and spe:
        by_steps = -(-trainer.max_steps // spe)
        n = by_steps if n is None else min(n, by_steps)
    return n


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("", style="progress.data.speed")
        return Text(format_rate(speed, 1.0), style="progress.data.speed")


class _MetricsColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
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
        get_time: the clock (seconds); tests pass a fake one.
    """

    order = 90  # late: show what other callbacks added to the logs
    reads_module = False
    epoch_end_barrier = False  # records only

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
        self._epoch_open = False
        self._base = 0  # global_step at the epoch's first step
        self._total: int | None = None
        self._t_epoch = 0.0
        self._t_line = 0.0
        self._t_step: float | None = None  # when the epoch's latest call ended
        self._stop_reason: str | None = None

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

    def on_train_epoch_start(self, trainer, module, epoch) -> None:
        if not self._active:
            return
        n = epochs_total(trainer)
        self._label = f"Epoch {epoch + 1}/{n}" if n else f"Epoch {epoch + 1}"
        A = trainer.grad_accum_steps
        done = -(-trainer.batch_in_epoch // A)  # a resumed run starts mid-epoch
        self._base = trainer.global_step - done
        total = trainer.steps_per_epoch
        if total is not None and trainer.max_steps is not None:
            total = min(total, trainer.max_steps - self._base)
        self._total = total
        self._epoch_open = True
        now = self.get_time()
        self._t_epoch = self._t_line = now
        self._t_step = None
        if not self._live_mode:
            return
        if self._progress is None:
            self._progress = self._make_progress()
            self._task = self._progress.add_task(self._label, total=total, completed=done)
            self._progress.start()
        else:
            self._progress.reset(
                self._task, total=total, completed=done, description=self._label, metrics=""
            )

    def on_train_batch_end(self, trainer, module, step, logs) -> None:
        self._t_step = self.get_time()
        progress = self._progress
        if progress is not None:
            if logs:
                progress.update(
                    self._task,
                    completed=step - self._base,
                    metrics=format_metrics(logs, self._shown(logs)),
                )
            else:
                progress.update(self._task, completed=step - self._base)
        elif logs and self._active and self.line_every_s is not None:
            now = self._t_step
            if now - self._t_line >= self.line_every_s:
                self._t_line = now
                self._print(self._line(step, now, logs, self._shown(logs)))

    def on_validation_start(self, trainer, module) -> None:
        if self._progress is not None and self._epoch_open:
            self._progress.update(self._task, description=f"{self._label} validating", refresh=True)

    def on_validation_end(self, trainer, module, logs) -> None:
        if self._progress is not None and self._epoch_open:
            self._progress.update(self._task, description=self._label)

    def on_train_epoch_end(self, trainer, module, epoch, logs) -> None:
        if not self._active:
            return
        self._epoch_open = False
        step = trainer.global_step
        if self._progress is not None:
            self._progress.update(self._task, completed=step - self._base)
        self._print(self._line(step, self.get_time(), logs, None))

    def on_interrupt(self, trainer, module) -> None:
        self._stop_reason = "interrupted"

    def on_exception(self, trainer, module, error) -> None:
        self._stop_reason = f"stopped by {type(error).__name__}"
        self._close(trainer)

    def on_fit_end(self, trainer, module) -> None:
        self._close(trainer)

    # --------------------------------------------------------------------- helpers ---
    def _close(self, trainer) -> None:
        """Ends the live display (never leave the terminal without a cursor); an epoch cut
        short by an error or a signal still gets its line."""
        if not self._active:
            return
        self._active = False
        try:
            if self._epoch_open:
                self._epoch_open = False
                line = self._line(trainer.global_step, self.get_time(), {}, None)
                self._print(line + SEP + (self._stop_reason or "stopped"))
        finally:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None

    def _shown(self, logs: Mapping[str, float]) -> list[str]:
        if self.metrics is not None:
            return self.metrics
        return [k for k in logs if "/" not in k]

    def _line(self, step: int, now: float, logs: Mapping, names) -> str:
        done = step - self._base
        total = "?" if self._total is None else self._total
        elapsed = now - self._t_epoch
        parts = [self._label, f"{done}/{total} steps", format_seconds(elapsed)]
        # The rate leaves validation and epoch-end work out: it is the training speed.
        rate = format_rate(done, (self._t_step or now) - self._t_epoch)
        if rate:
            parts[-1] += f" ({rate})"
        metrics = format_metrics(logs, names)
        if metrics:
            parts.append(metrics)
        return SEP.join(parts)

    def _print(self, line: str) -> None:
        # Plain text: no markup parsing ("[...]" in a metric name stays literal), no
        # highlighting, and soft wrap so a CI log keeps one epoch on one line.
        self._console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _make_progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            _RateColumn(),
            _MetricsColumn(table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
            console=self._console,
            refresh_per_second=self.refresh_per_second,
            get_time=self.get_time,
            transient=True,  # the epoch lines are the record; the live line goes away
        )

    def __repr__(self) -> str:
        return f"ProgressBar(refresh_per_second={self.refresh_per_second})"
