"""``ThroughputMonitor``: steps/s, examples/s, and whether the input pipeline holds training back.

It only records: its hooks neither wait for the device nor hold it back, so the loop keeps
running ahead of them (``trainer.lookahead``). Every number comes from the device's progress
as the Trainer learns it without waiting (``trainer.device_progress``, see
``nnxfit.device_clock``), not from when hooks run: hooks trail the device and get calls in
bursts.

* ``steps_per_sec``: optimizer steps the device finished per second of training time
  (compiles, validation and the gaps between epochs left out);
* ``examples_per_sec``: the same in examples;
* ``data_wait_frac``: the share of that time the loop spent waiting for its next batch.

A wait for data costs nothing while the device is still busy with earlier calls; it holds
training back when the device runs out of work before the batch arrives. When the loop waits
for data more than ``warn_data_frac`` of the time *and* the device had finished its work by
the end of most of those waits (a batch takes longer to arrive than a step to compute), faster
input would make training faster: it calls the data pipeline the bottleneck, with a
``DataBottleneckWarning`` once per fit.
"""

from __future__ import annotations

from collections import deque

from nnxfit.callbacks.base import Callback
from nnxfit.device_clock import DeviceProgress
from nnxfit.errors import ConfigError, positive_int
from nnxfit.warn import warn

MIN_STEPS = 8  # steps in the window before the bottleneck check may fire
# What it logs.
METRICS = ("steps_per_sec", "examples_per_sec", "data_wait_frac")


class DataBottleneckWarning(UserWarning):
    """Training waits for input data: faster loading would make it faster."""


class ThroughputMonitor(Callback):
    """Logs ``steps_per_sec``, ``examples_per_sec`` and ``data_wait_frac``.

    On log steps the values cover about the last ``window`` optimizer steps (across an epoch
    start: the time between epochs is not training time and is left out); at epoch end they
    cover the epoch's training and land in ``History``. ``examples_per_sec`` counts full
    batches (``batch_size * grad_accum_steps`` per step), so a short last batch is counted as
    a full one. Compile times are left out of the rates; ``CompileWatch`` reports them.

    Args:
        window: optimizer steps the log-step rates average over (log steps are the points it
            can measure at: the window starts at the latest one at least this far back).
        warn_data_frac: the share of training time spent waiting for data above which a
            slow input pipeline is reported (once per fit, process 0 only), provided the
            device had run out of work by the end of most of those waits. ``None`` never warns.
    """

    order = -200  # early: its keys are in the logs before loggers and the progress bar read them
    records_only = True  # the device keeps running ahead of it

    def __init__(self, window: int = 100, warn_data_frac: float | None = 0.5):
        window = positive_int("ThroughputMonitor window", window)
        if warn_data_frac is not None and not (
            isinstance(warn_data_frac, int | float) and 0 < warn_data_frac <= 1
        ):
            raise ConfigError(
                "ThroughputMonitor warn_data_frac must be a fraction in (0, 1], or None to "
                f"never warn; got {warn_data_frac!r}."
            )
        self.window = window
        self.warn_data_frac = warn_data_frac
        self.warned_at_step: int | None = None  # step of this fit's bottleneck warning
        self._start: DeviceProgress | None = None  # the device's progress at the epoch's start
        self._points: deque[DeviceProgress] = deque()  # at epoch starts and log steps
        self._per_step_examples: int | None = None

    def logged_metrics(self, trainer) -> list[str]:
        return list(METRICS)

    # ------------------------------------------------------------------------ hooks ---
    def on_fit_start(self, trainer, module) -> None:
        self.warned_at_step = None
        self._start = None
        self._points.clear()
        batch = getattr(trainer.batch_spec, "batch_size", None)
        self._per_step_examples = int(batch) * trainer.grad_accum_steps if batch else None

    def on_train_epoch_start(self, trainer, module, epoch) -> None:
        self._start = trainer.device_progress
        # The window runs on across the epoch start: the device's first steps of an epoch
        # may be known done only together with later ones, with no time between to tell.
        self._points.append(self._start)

    def on_train_batch_end(self, trainer, module, step, logs) -> None:
        if not logs or self._start is None:  # log steps: the device's progress is exact there
            return
        p = trainer.device_progress
        points = self._points
        points.append(p)
        while len(points) > 2 and p.step - points[1].step >= self.window:
            points.popleft()
        rates = self._rates(points[0], p)
        logs.update(rates)
        self._check_bottleneck(trainer, points[0], p, rates)

    def on_train_epoch_end(self, trainer, module, epoch, logs) -> None:
        if self._start is not None:
            logs.update(self._rates(self._start, trainer.device_progress))

    # --------------------------------------------------------------------- helpers ---
    def _rates(self, a: DeviceProgress, b: DeviceProgress) -> dict[str, float]:
        steps, seconds = b.step - a.step, b.train_time - a.train_time
        if steps <= 0 or seconds <= 0:
            return {}
        out = {"steps_per_sec": steps / seconds}
        if self._per_step_examples:
            out["examples_per_sec"] = out["steps_per_sec"] * self._per_step_examples
        out["data_wait_frac"] = min(max((b.data_wait - a.data_wait) / seconds, 0.0), 1.0)
        return out

    def _check_bottleneck(
        self, trainer, a: DeviceProgress, b: DeviceProgress, rates: dict[str, float]
    ) -> None:
        steps, waited = b.step - a.step, b.data_wait - a.data_wait
        if (
            self.warn_data_frac is None
            or self.warned_at_step is not None
            or not trainer.is_global_zero
            or steps < MIN_STEPS
            or rates.get("data_wait_frac", 0.0) < self.warn_data_frac
            or b.data_wait_idle - a.data_wait_idle < 0.5 * waited  # the device kept busy
        ):
            return
        self.warned_at_step = trainer.global_step
        frac = rates["data_wait_frac"]
        idle = (b.data_wait_idle - a.data_wait_idle) / waited
        if getattr(trainer, "prefetch", 0):
            fix = (
                "prefetch is already on, so the loader itself is too slow: give it more "
                "workers, cache decoded data, or move per-batch transforms into the model"
            )
        else:
            fix = (
                "Trainer(prefetch=2) prepares batches on a background thread; also consider "
                "more loader workers, caching decoded data, or moving per-batch transforms "
                "into the model"
            )
        warn(
            f"ThroughputMonitor: the input pipeline is the bottleneck. Over the last {steps} "
            f"steps (up to step {trainer.global_step}) the training loop waited for data "
            f"{frac:.0%} of the training time, {waited / steps * 1e3:.2f} ms per step, and "
            f"the device had finished its work by the end of {idle:.0%} of those waits: a "
            f"batch takes longer to arrive than a step to compute. Faster input would speed "
            f"training up: {fix}.",
            DataBottleneckWarning,
        )

    def __repr__(self) -> str:
        return f"ThroughputMonitor(window={self.window}, warn_data_frac={self.warn_data_frac})"
