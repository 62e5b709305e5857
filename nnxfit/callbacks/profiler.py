"""``Profiler``: captures a ``jax.profiler`` trace of a window of training steps."""

from __future__ import annotations

import logging
import os

import jax

from nnxfit.callbacks.base import Callback
from nnxfit.errors import ConfigError, positive_int

logger = logging.getLogger("nnxfit.profiler")


class Profiler(Callback):
    """Traces optimizer steps ``start_step + 1`` to ``start_step + num_steps`` with
    ``jax.profiler`` into ``workdir/dirname`` (``dirname`` itself when the Trainer has no
    workdir, or when it is absolute).

    Open the result with TensorBoard's profile plugin or https://ui.perfetto.dev
    (``*.trace.json.gz`` next to the ``*.xplane.pb``). The default window skips the first
    steps so that compilation stays out of it; ``start_step=0`` starts at the beginning of
    fit and includes it. With ``steps_per_execution=K`` the window is rounded up to whole
    calls. The trace waits for the device to finish the window's steps before it stops.
    """

    order = 900  # late: the window should hold what other callbacks do at a step

    def __init__(self, start_step: int = 10, num_steps: int = 10, dirname: str = "profile"):
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ConfigError(f"Profiler start_step must be an integer >= 0; got {start_step!r}.")
        self.start_step = start_step
        self.num_steps = positive_int("Profiler num_steps", num_steps)
        self.dirname = os.fspath(dirname)
        self.trace_dir: str | None = None  # where the last trace was written
        self._started_at: int | None = None
        self._done = False

    def on_fit_start(self, trainer, module) -> None:
        self._started_at = None
        self._done = False
        if trainer.global_step >= self.start_step:
            self._start(trainer)

    def on_train_batch_end(self, trainer, module, step, logs) -> None:
        if self._done:
            return
        if self._started_at is None:
            if step >= self.start_step:
                self._start(trainer)
        elif step >= self._started_at + self.num_steps:
            self._stop(trainer)

    def on_fit_end(self, trainer, module) -> None:
        # A fit shorter than the window still leaves a trace of what it ran.
        if self._started_at is not None and not self._done:
            self._stop(trainer)

    def _start(self, trainer) -> None:
        base = trainer.workdir or ""
        path = os.path.join(base, self.dirname)
        try:
            jax.profiler.start_trace(path)
        except RuntimeError as e:  # another trace is running in this process
            self._done = True
            logger.warning("Profiler did not start a trace at step %d: %s", trainer.global_step, e)
            return
        self.trace_dir = os.path.abspath(path)
        self._started_at = trainer.global_step

    def _stop(self, trainer) -> None:
        self._done = True
        try:
            # The steps of the window run asynchronously; wait so the trace holds them.
            jax.block_until_ready(trainer.train_state())
        except Exception:  # noqa: BLE001 - after an error the state may be gone; trace anyway
            pass
        jax.profiler.stop_trace()
        logger.info(
            "Profiler wrote a trace of steps %d-%d to %s",
            self._started_at + 1,
            trainer.global_step,
            self.trace_dir,
        )
