"""``ThroughputMonitor``: steps/s, examples/s, and whether the input pipeline holds training back.

What it measures, without adding a single device sync:

* wall time between consecutive jitted calls (host clock), over the last ``window`` steps;
* how much of it the loop spent waiting for its next batch: the Trainer adds the time spent
  in ``next()`` on its batch source (loading, checking, stacking and placing the batch) to
  ``trainer.data_wait_seconds``;
* an upper bound on the device time of a step. On a log step the Trainer fetches the logs,
  which waits for the device to finish that call; the call was dispatched only after its
  batch arrived, so (interval - data wait) >= the call's device time. The median of these
  bounds over recent log steps estimates the compute time per step.

With these, ``data_wait_frac`` is the share of wall time spent waiting for data and
``compute_frac`` the (over-)estimated share the device spent computing. When the loop waits
for data most of the time *and* a batch takes longer to arrive than a step takes to compute,
faster input would make training faster: that is the one case it calls the data pipeline
the bottleneck, with a ``DataBottleneckWarning`` once per fit. A pipeline that merely keeps
pace with the device (the host waits for data while the device is busy too) is not flagged:
the compute bound is an over-estimate, so the warning errs on the side of silence.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

from nnxfit.callbacks.base import Callback
from nnxfit.errors import ConfigError
from nnxfit.warn import warn

MIN_CALLS = 8  # calls in the window before the bottleneck check may fire
# What it logs (compute_frac once a log step has measured the device).
METRICS = ("steps_per_sec", "examples_per_sec", "data_wait_frac", "compute_frac")


class DataBottleneckWarning(UserWarning):
    """Training waits for input data: faster loading would make it faster."""


class ThroughputMonitor(Callback):
    """Logs ``steps_per_sec``, ``examples_per_sec``, ``data_wait_frac`` and ``compute_frac``.

    On log steps the values cover the last ``window`` optimizer steps; at epoch end they cover
    the epoch's training and land in ``History``. Validation, epoch-end work and calls that
    compiled a program (the first one, a new batch shape) are left out: these are
    steady-state rates; ``CompileWatch`` reports compile times. ``examples_per_sec``
    counts full batches (``batch_size * grad_accum_steps`` per step), so a short last batch
    is counted as a full one.

    Args:
        window: optimizer steps the log-step rates average over.
        warn_data_frac: the share of wall time spent waiting for data above which a slow
            input pipeline is reported (once per fit, process 0 only), provided a batch also
            takes longer to arrive than a step takes to compute. ``None`` never warns.
        get_time: the clock, in seconds.
    """

    order = -200  # early: its timings see little of other callbacks' work, and its keys
    # are in the logs before loggers and the progress bar read them
    reads_module = False

    def __init__(
        self,
        window: int = 100,
        warn_data_frac: float | None = 0.5,
        get_time: Callable[[], float] | None = None,
    ):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"ThroughputMonitor window must be an integer >= 1; got {window!r}.")
        if warn_data_frac is not None and not (
            isinstance(warn_data_frac, int | float) and 0 < warn_data_frac <= 1
        ):
            raise ConfigError(
                "ThroughputMonitor warn_data_frac must be a fraction in (0, 1], or None to "
                f"never warn; got {warn_data_frac!r}."
            )
        self.window = window
        self.warn_data_frac = warn_data_frac
        self.get_time = get_time or time.perf_counter
        self.warned_at_step: int | None = None  # step of this fit's bottleneck warning
        self._reset()

    def _reset(self) -> None:
        self._calls: deque[tuple[float, float, int]] = deque()  # (seconds, data s, steps)
        self._win = [0.0, 0.0, 0]  # sums over self._calls
        self._compute: deque[float] = deque(maxlen=15)  # per-step compute bounds
        self._epoch = [0.0, 0.0, 0]
        self._t = self._data = 0.0
        self._step = self._traces = 0
        self._per_step_examples: int | None = None

    def logged_metrics(self, trainer) -> list[str]:
        return list(METRICS)

    # ------------------------------------------------------------------------ hooks ---
    def on_fit_start(self, trainer, module) -> None:
        self._reset()
        self.warned_at_step = None
        spec = getattr(trainer, "_spec", None)
        batch = getattr(spec, "batch_size", None)
        if batch:
            self._per_step_examples = int(batch) * trainer.grad_accum_steps

    def on_train_epoch_start(self, trainer, module, epoch) -> None:
        # Intervals start afresh each epoch, so validation and epoch-end work (checkpoints)
        # never count as training time.
        self._t = self.get_time()
        self._data = self._data_wait(trainer)
        self._step = trainer.global_step
        self._traces = self._trace_count(trainer)
        self._epoch = [0.0, 0.0, 0]

    def on_train_batch_end(self, trainer, module, step, logs) -> None:
        now = self.get_time()
        data = self._data_wait(trainer)
        traces = self._trace_count(trainer)
        dt, dd, n = now - self._t, data - self._data, step - self._step
        compiled = traces != self._traces
        self._t, self._data, self._step, self._traces = now, data, step, traces
        # A call that compiled measures the compiler, not training (CompileWatch reports it).
        if n > 0 and not compiled:
            self._add(dt, dd, n)
            if logs:  # the Trainer just fetched them: the device has finished this call
                self._compute.append(max(dt - dd, 0.0) / n)
        if logs:
            logs.update(self._rates(*self._win, has_data=self._has_data(trainer)))
            self._check_bottleneck(trainer, logs)

    def _add(self, dt: float, dd: float, n: int) -> None:
        self._calls.append((dt, dd, n))
        win = self._win
        win[0] += dt
        win[1] += dd
        win[2] += n
        while win[2] - self._calls[0][2] >= self.window:
            old = self._calls.popleft()
            win[0] -= old[0]
            win[1] -= old[1]
            win[2] -= old[2]
        ep = self._epoch
        ep[0] += dt
        ep[1] += dd
        ep[2] += n

    def on_train_epoch_end(self, trainer, module, epoch, logs) -> None:
        logs.update(self._rates(*self._epoch, has_data=self._has_data(trainer)))

    # --------------------------------------------------------------------- helpers ---
    @staticmethod
    def _data_wait(trainer) -> float:
        return float(getattr(trainer, "data_wait_seconds", 0.0))

    @staticmethod
    def _trace_count(trainer) -> int:
        return getattr(getattr(trainer, "_programs", None), "trace_count", 0)

    @staticmethod
    def _has_data(trainer) -> bool:
        return hasattr(trainer, "data_wait_seconds")

    def compute_per_step(self) -> float | None:
        """Estimated (over-estimated) device seconds per optimizer step, or None."""
        return statistics.median(self._compute) if self._compute else None

    def _rates(self, wall: float, data: float, steps: int, has_data: bool) -> dict[str, float]:
        if wall <= 0 or steps <= 0:
            return {}
        out = {"steps_per_sec": steps / wall}
        if self._per_step_examples:
            out["examples_per_sec"] = out["steps_per_sec"] * self._per_step_examples
        if has_data:
            out["data_wait_frac"] = min(max(data / wall, 0.0), 1.0)
        c = self.compute_per_step()
        if c is not None:
            out["compute_frac"] = min(c * steps / wall, 1.0)
        return out

    def _check_bottleneck(self, trainer, logs: dict) -> None:
        if (
            self.warn_data_frac is None
            or self.warned_at_step is not None
            or not trainer.is_global_zero
            or len(self._calls) < MIN_CALLS
            or "data_wait_frac" not in logs
        ):
            return
        wall, data, steps = self._win
        frac = logs["data_wait_frac"]
        compute = self.compute_per_step()
        data_per_step = data / steps
        if frac < self.warn_data_frac or compute is None or data_per_step <= compute:
            return
        self.warned_at_step = trainer.global_step
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
            f"{frac:.0%} of the wall time, {data_per_step * 1e3:.2f} ms per step, while a step "
            f"computes in at most {compute * 1e3:.2f} ms. Faster input would speed training "
            f"up: {fix}.",
            DataBottleneckWarning,
        )

    def __repr__(self) -> str:
        return f"ThroughputMonitor(window={self.window}, warn_data_frac={self.warn_data_frac})"
