"""``Trainer``: runs a ``TrainModule`` through fit, validate and predict.

The loop owns the module's state as a flat list of device arrays (``self._leaves``) for the
whole fit and hands it to donated jitted programs (``step.py``). The module object is
written back only when someone may look at it: before a hook of a callback that reads the
module, at epoch ends, on errors and at the end of fit.

The loop is two halves (``_train_loop``): ``_dispatch`` sends the calls and yields an event
per epoch start, call and epoch end; the hooks get those events in order, a few behind the
device, except the events a callback needs in step with it (``Callback.needs_sync``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nnxfit import hyperparams, interrupt
from nnxfit.callbacks.base import Callback, CallbackList, as_callbacks
from nnxfit.callbacks.merge import merge_callbacks
from nnxfit.data import (
    ArrayLoader,
    BatchSpec,
    check_reiterable,
    epoch_batches,
    first_batch,
    loader_state,
    num_batches,
    take_batches,
)
from nnxfit.device_clock import DeviceClock, DeviceProgress
from nnxfit.errors import ConfigError, EmptyDataError, TrainingInterrupted
from nnxfit.history import History
from nnxfit.inputs import eval_inputs, fit_inputs
from nnxfit.module import TrainModule, attached, has_test_step, has_validation_step
from nnxfit.module_leaves import live_leaves
from nnxfit.pacing import DeviceQueue
from nnxfit.placement import Placement
from nnxfit.resume_point import ResumeInfo, Trail, capture, step_of
from nnxfit.runs import begin_run
from nnxfit.sanity import check_validation
from nnxfit.step import GATES, Carry, Programs, StepConfig, check_scan_unroll, stack
from nnxfit.workdir import lock_workdir

PRECISIONS = ("float32", "bfloat16")
# Up to this much state (params, other variables, optimizer), the programs run ungated under
# NaNGuard and the loop keeps copies to re-run from (``Trainer._rollback``); above it, each
# step gates its update: the gate costs little once steps are not tiny (0-2 % on the large
# benchmark MLP, 13 MB), while the copies double the state's memory.
SPECULATE_MAX_BYTES = 1 << 20
# With speculation, the loop copies the state every this many steps, or sooner when the
# batches it holds for a re-run since the last copy reach ``MARK_MAX_BATCH_BYTES``. A copy of
# the small benchmark MLP's state (0.3 MB) takes ~100 us on 2 CPU cores: 0.3 % at 256 steps.
MARK_EVERY_N_STEPS = 256
MARK_MAX_BATCH_BYTES = 64 << 20
# During fit, validation keeps about this many seconds of batches queued on the device
# (``pacing.DeviceQueue``), so that a signal stops it after those rather than after every
# batch the host had sent.
VAL_MAX_LAG_S = 0.1


class _Event(NamedTuple):
    """What the hooks see of the loop, in order: an epoch start, a call, an epoch end."""

    kind: str  # "start" | "call" | "end" | "interrupt"
    epoch: int
    n_steps: int = 0
    n_batches: int = 0
    snap: list | None = None  # metric sums to log, taken out of the carry (``_snapshot``)
    barrier: bool = False  # deliver everything up to here before dispatching more
    mark: list | None = None  # a copy of the carry after the call, when speculating
    partial: bool = False  # an epoch end before the epoch's last batch (the fit stopped)


def _positive_int(name: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1; got {value!r}.")
    return int(value)


def _attach(method):
    """Runs ``method(self, module, ...)`` with ``module.trainer`` pointing at this Trainer."""

    @functools.wraps(method)
    def wrapper(self, module, *args, **kwargs):
        with attached(module, self):
            return method(self, module, *args, **kwargs)

    return wrapper


class Trainer:
    """Fits, validates and predicts with a ``TrainModule``.

    One of ``max_epochs`` / ``max_steps`` is required; training stops at whichever comes first.
    See the README for every option; all are keyword-only.
    """

    def __init__(
        self,
        *,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        callbacks: list[Callback] | None = None,
        workdir: str | os.PathLike | None = None,
        seed: int = 0,
        log_every_n_steps: int = 50,
        val_every_n_epochs: int = 1,
        steps_per_execution: int = 1,
        grad_accum_steps: int = 1,
        grad_clip_norm: float | None = None,
        precision: str = "float32",
        mesh: jax.sharding.Mesh | None = None,
        progress_bar: bool = True,
        prefetch: int = 0,
        console: Any = None,
        limit_train_batches: int | None = None,
        limit_val_batches: int | None = None,
        overfit_batches: int | None = None,
        val_every_n_steps: int | None = None,
        fast_dev_run: bool | int = False,
        num_sanity_val_steps: int = 2,
        scan_unroll: int | bool = 1,
    ):
        if max_epochs is None and max_steps is None and not fast_dev_run:
            raise ConfigError(
                "Trainer needs max_epochs or max_steps (or both; it stops at whichever comes "
                "first), e.g. Trainer(max_epochs=10)."
            )
        self.max_epochs = _positive_int("max_epochs", max_epochs, allow_none=True)
        self.max_steps = _positive_int("max_steps", max_steps, allow_none=True)
        self.log_every_n_steps = _positive_int("log_every_n_steps", log_every_n_steps)
        self.val_every_n_epochs = _positive_int("val_every_n_epochs", val_every_n_epochs)
        self.steps_per_execution = _positive_int("steps_per_execution", steps_per_execution)
        self.grad_accum_steps = _positive_int("grad_accum_steps", grad_accum_steps)
        self.limit_train_batches = _positive_int("limit_train_batches", limit_train_batches, True)
        self.limit_val_batches = _positive_int("limit_val_batches", limit_val_batches, True)
        self.overfit_batches = _positive_int("overfit_batches", overfit_batches, True)
        self.val_every_n_steps = _positive_int("val_every_n_steps", val_every_n_steps, True)
        # fast_dev_run=True (or n): n optimizer steps and n validation batches, one epoch,
        # nothing written: no default CSVLogger, no workdir; file-writing callbacks check it.
        self.fast_dev_run = 1 if fast_dev_run is True else fast_dev_run
        if self.fast_dev_run:
            n = _positive_int("fast_dev_run", self.fast_dev_run)
            self.max_epochs, self.max_steps = 1, n
            self.limit_train_batches = n * self.grad_accum_steps
            self.limit_val_batches = n
        if grad_clip_norm is not None and not (
            isinstance(grad_clip_norm, int | float) and grad_clip_norm > 0
        ):
            raise ConfigError(
                f"grad_clip_norm must be a number > 0 or None; got {grad_clip_norm!r}."
            )
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ConfigError(f"prefetch must be an integer >= 0; got {prefetch!r}.")
        self.grad_clip_norm = grad_clip_norm
        self.precision = precision
        self.seed = int(seed)
        self.mesh = mesh
        self.progress_bar = progress_bar
        self.prefetch = prefetch
        self.scan_unroll = check_scan_unroll(scan_unroll)
        self.console = console
        self.workdir = os.fspath(workdir) if workdir is not None else None
        if (
            self.workdir is not None
            and os.path.exists(self.workdir)
            and not os.path.isdir(self.workdir)
        ):
            raise ConfigError(
                f"workdir {self.workdir!r} exists and is a file; pass a folder path (it is "
                "created if missing)."
            )
        self.callbacks = as_callbacks(callbacks)
        from nnxfit.sanity import sanity_steps

        self.num_sanity_val_steps = sanity_steps(num_sanity_val_steps)
        self.placement = Placement(mesh)
        self.is_global_zero = jax.process_index() == 0

        # State of the current (or last) fit, readable by callbacks.
        self.history = History()
        self.should_stop = False
        self.global_step = 0
        self.current_epoch = 0
        self.batch_in_epoch = 0
        self.steps_per_epoch: int | None = None
        self.estimated_stepping_batches: int | None = None
        self.logged_metrics: dict[str, float] = {}
        self.first_nonfinite_step: int | None = None
        self.nonfinite_steps = 0
        self.train_data: Any = None
        self.val_data: Any = None
        self.module: TrainModule | None = None
        self.fitting = False
        self.resumed_from: str | None = None
        self.resume_info: ResumeInfo | None = None  # set by a resume (for the loggers)
        # Seconds the loop has waited for its next batch (all fits; ThroughputMonitor).
        self.data_wait_seconds = 0.0
        # What has gone out to the device; the hooks' counters above trail it by up to
        # ``lookahead`` events, except where a callback needs them in step (``_train_loop``).
        self.dispatch_step = 0
        self.dispatch_epoch: int | None = None
        self.lookahead = 0
        self._device_clock = DeviceClock(wait_ready)
        self.cb = CallbackList([])
        self._leaves: list | None = None
        self._journal: collections.deque | None = None  # calls to re-run (speculation)
        self._signal: int | None = None
        self._stop_step = self._send_step = 0  # see ``interrupt.handlers`` and ``_run_calls``
        self._eval_cache: dict = {}
        # Where the fit ended, once it ended inside an epoch (``resume_point.py``), and what
        # it takes to compute: the recent logs, and the resumed run's grid of logs and calls.
        self._resume_point = None
        self._trail = Trail()
        self._log_from: int | None = None
        self._call_rest = self._cut_rest = 0
        # Array results of the latest validation and of the latest test
        # (``nnxfit.metrics.ConfusionMatrix``...): {"val_confusion": array}; logs hold scalars.
        self.array_metrics: dict[str, np.ndarray] = {}

    # ======================================================================= public API ===
    @property
    def device_progress(self) -> DeviceProgress:
        """How far the device had got by the event the hooks are seeing: the steps it was known
        to have finished (never more than ``global_step``), when that became known, and the
        time that was not training (``nnxfit.device_clock``). Rates and ETAs come from here,
        not from when hooks run: hooks trail the device by up to ``lookahead`` events."""
        return self._device_clock.progress(self.global_step)

    @_attach
    def fit(
        self,
        module: TrainModule,
        train_data: Any,
        val_data: Any = None,
        *,
        resume=False,
        batch_size: int | None = None,
        shuffle: bool | None = None,
        validation_split: float = 0.0,
    ):
        """Train ``module`` in place; returns the ``History``. See the README for resume.

        ``train_data``/``val_data`` may be arrays, Keras style (``x``, ``(x, y)``, a dict of
        arrays): batched by ``batch_size`` (32), training batches reshuffled each epoch
        (``shuffle``), ``validation_split`` holding out the last fraction (``inputs.py``)."""
        self._check_module(module)
        train_data, val_data = fit_inputs(
            train_data,
            val_data,
            batch_size=batch_size,
            shuffle=shuffle,
            validation_split=validation_split,
            seed=self.seed,
        )
        refit = self.module is module
        if val_data is not None and not has_validation_step(module):
            raise ConfigError(
                f"val_data was given but {type(module).__name__} defines no validation_step; "
                "define validation_step(self, batch) -> dict, or drop val_data."
            )
        first = self._first_batch(train_data, "train")
        if val_data is not None:
            check_reiterable(val_data, "val")
        if self.overfit_batches:  # the same first N batches every epoch, validated on too
            train_data = take_batches(train_data, self.overfit_batches)
            val_data = train_data if has_validation_step(module) else None
        mine = as_callbacks(
            module.configure_callbacks(), f"{type(module).__name__}.configure_callbacks()"
        )
        self.cb = CallbackList(merge_callbacks(self._default_callbacks() + self.callbacks, mine))
        # One fit per workdir, from before a checkpoint is read until the last one is written.
        with lock_workdir(self):
            self._setup_fit(module, train_data, val_data, first)
            if resume:
                self._resume(resume)
            begin_run(self, refit)  # resume line, earlier run -> workdir/version_N
            if self.workdir is not None and self.is_global_zero and not self.fast_dev_run:
                os.makedirs(self.workdir, exist_ok=True)

            self.fitting = True
            finished = False
            self.dispatch_step = self._send_step = self.global_step  # what a signal reports
            self.dispatch_epoch = self.current_epoch
            with self._signal_handlers():
                try:
                    self._hook("on_fit_start")
                    # After on_fit_start, as Lightning runs it: callbacks (CompileWatch) see it.
                    check_validation(self)
                    self._train_loop()
                    finished = True
                except TrainingInterrupted:
                    raise
                except BaseException as e:
                    self._sync_to_module(allow_deleted=True)
                    self._hook("on_exception", e, guard=True)
                    raise
                finally:
                    self.fitting = False
                    self._sync_to_module(allow_deleted=True)
                    module.eval()
                    # After a normal fit an on_fit_end failure (a final checkpoint that could
                    # not be written) reaches the caller, once every callback has cleaned up.
                    self._hook("on_fit_end", guard=not finished, defer=finished)
                if self._signal is not None:
                    # It came after the last step: the fit finished and saved, and the process
                    # still stops, as the signal asked.
                    raise interrupt.interrupted(self, after_last_step=True)
        return self.history

    @_attach
    def validate(
        self, module: TrainModule, data: Any, *, batch_size: int | None = None
    ) -> dict[str, float]:
        """``validation_step`` over every example of ``data``, keys prefixed ``val_``: batch
        means averaged over examples, whole-set metrics (``nnxfit.metrics``) computed from
        their sums; array results go to ``trainer.array_metrics``. Arrays (``(x, y)``) are
        batched by ``batch_size`` (32), Keras's ``evaluate``."""
        self._check_module(module)
        data = eval_inputs(data, batch_size, "validate")
        if not has_validation_step(module):
            module.validation_step(None)  # raises the explanatory NotImplementedError
        if self.fitting and module is self.module:
            return self._validate(data)
        programs, leaves = self._eval_programs(module)
        return self._run_validation(programs, leaves, data)

    @_attach
    def test(
        self, module: TrainModule, data: Any, *, batch_size: int | None = None
    ) -> dict[str, float]:
        """``test_step`` over every example of ``data``, as ``validate`` does with
        ``validation_step``; keys prefixed ``test_``. Works on a module never fitted. Calls
        ``on_test_start`` / ``on_test_end(logs)`` of the Trainer's and the module's callbacks
        (the CSVLogger adds a ``kind="test"`` row to ``metrics.csv``)."""
        self._check_module(module)
        data = eval_inputs(data, batch_size, "test")
        if not has_test_step(module):
            module.test_step(None)  # raises the explanatory NotImplementedError
        mine = as_callbacks(
            module.configure_callbacks(), f"{type(module).__name__}.configure_callbacks()"
        )
        cbs = CallbackList(self._default_callbacks() + self.callbacks + mine)
        for cb in cbs.for_hook("on_test_start"):
            cb.on_test_start(self, module)
        programs, leaves = self._eval_programs(module)
        limit = self.fast_dev_run or None
        logs = self._run_validation(programs, leaves, data, "test_step", limit)
        for cb in cbs.for_hook("on_test_end"):
            cb.on_test_end(self, module, logs)
        return logs

    @_attach
    def predict(self, module: TrainModule, data: Any, *, batch_size: int | None = None) -> Any:
        """``predict_step`` over every batch of ``data``, concatenated on axis 0 (numpy).
        Arrays (``x``) are batched by ``batch_size`` (32), Keras's ``predict``. Inside a
        callback during fit it runs on the fit's current state in eval mode, changing nothing."""
        self._check_module(module)
        data = eval_inputs(data, batch_size, "predict")
        programs, leaves = self._eval_programs(module)
        outs = []
        for i, batch in enumerate(epoch_batches(data, 0)):
            for part in self.placement.eval_parts(batch):  # one part unless on a mesh
                outs.append((part, programs.predict_batch(leaves, part.batch)))
            if i == 0:
                jax.block_until_ready(outs[0][1])  # surface tracing errors at the first batch
        if not outs:
            raise EmptyDataError("predict got data that yielded no batch.")
        outs = [part.rows(out) for part, out in outs]
        return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)

    def get_hyperparameter(self, name: str, optimizer: str | None = None) -> Any:
        """The value of the optimizer's hyperparameter ``name`` in the fit's current state
        (a float; an array for a non-scalar one), read from a callback's hook or after fit.

        Any hyperparameter ``optax.inject_hyperparams`` keeps in the optimizer state; the
        learning rate (``"learning_rate"`` or ``"lr"``) also from a ``lr_schedule`` or from
        optax's own optimizers (``nnxfit.hyperparams``). A ``ConfigError`` names the fix when
        it cannot be read. One device sync."""
        return hyperparams.get_hyperparameter(self, name, optimizer)

    def set_hyperparameter(self, name: str, value: Any, optimizer: str | None = None) -> None:
        """Sets the optimizer's hyperparameter ``name`` to ``value`` from the next step on,
        without recompiling: the value is written into the ``optax.inject_hyperparams`` state
        with the old array's dtype, shape and placement, and is checkpointed with it.

        Call it from a callback's hook (one in step with the device: any callback that does
        not set ``epoch_end_barrier = False``). A ``ConfigError`` names the fix when the
        optimizer does not keep ``name`` in its state, or a schedule sets it every step."""
        hyperparams.set_hyperparameter(self, name, value, optimizer)

    # ========================================================================= the loop ===
    def _train_loop(self) -> None:
        # Hooks run for the events of the dispatched calls, in order, up to ``lookahead``
        # events behind the device, so that a log or epoch-end fetch finds its numbers
        # computed while later calls keep the device busy (a fetch with an idle device behind
        # it cost ~10 % of throughput at each epoch end of a short epoch). A barrier event,
        # one a callback needs in step with the device, is delivered before anything more
        # is dispatched.
        self.lookahead = ahead = self._lookahead()
        self._start_speculation()
        self._device_clock.start(self.global_step)
        pending: collections.deque[_Event] = collections.deque()
        events = self._dispatch()
        try:
            while True:
                try:
                    event = next(events, None)
                except Exception:
                    # The calls already on the device happened: their hooks still run, so
                    # the counters and logs match the state, then the error goes out.
                    self._drain(pending, 0)
                    raise
                if event is None:
                    break
                pending.append(event)
                if not self._drain(pending, 0 if event.barrier else ahead):
                    break
            self._drain(pending, 0)
        finally:
            events.close()

    def _drain(self, pending: collections.deque, keep: int) -> bool:
        """Delivers the oldest events until ``keep`` are left. False when a hook stopped the
        fit while later calls were already on the device (``_drop_dispatched``)."""
        while len(pending) > keep:
            ev = pending.popleft()
            if self._journal is not None:
                self._verify(ev)
            self._deliver(ev)
            if self._journal is not None and ev.barrier and not pending:
                self._mark_here()  # a hook in step with the device may have changed the state
            if self.should_stop and pending:
                self._drop_dispatched(pending)
                return False
        return True

    def _drop_dispatched(self, pending: collections.deque) -> None:
        """A recording hook stopped the fit (NaNGuard, learning of a non-finite step a few
        steps late) after later calls went out. Those calls changed nothing: the step froze
        the state at the first non-finite step. Forgetting them ends the fit exactly where it
        ends without lookahead: same counters, loader position, History and hooks."""
        end_due = pending[0].kind != "start"  # this epoch's end is among the dropped events
        interrupted = any(e.kind == "interrupt" for e in pending)
        partial = any(e.kind == "call" or e.partial for e in pending)
        pending.clear()
        self.dispatch_step, self.dispatch_epoch = self.global_step, self.current_epoch
        if self._step_index is not None:  # the device's step counter follows the hooks'
            old = self._leaves[self._step_index]
            self._leaves[self._step_index] = jnp.full_like(old, self.global_step)
        if end_due:
            self._deliver(_Event("end", self.current_epoch, partial=partial))  # frozen: adds 0
        if interrupted:
            self._interrupt()

    def _lookahead(self) -> int:
        """Events the hooks may trail the device by: about 8 steps' worth, plus room for an
        epoch's start and end. Events that a callback needs in step are barriers (``_sync``)."""
        if self.val_every_n_steps is not None:
            return 0
        return 4 + -(-8 // self.steps_per_execution)

    def _sync(self, hook: str, event: str, n_steps: int = 0) -> bool:
        """Whether a callback on ``hook`` needs this event in step with the device: callbacks
        that only record never do; others say so in ``needs_sync`` (by default, always)."""
        cbs = self.cb.syncing(hook)
        return bool(cbs) and any(
            c.needs_sync(self, event, self.dispatch_step, n_steps) for c in cbs
        )

    def _dispatch(self) -> Iterator[_Event]:
        """Runs the programs over the epochs' batches; yields each call's event as soon as the
        call is on the device. ``dispatch_step``/``dispatch_epoch`` count what went out; the
        public counters move as the events are delivered."""
        self.dispatch_step, self.dispatch_epoch = self.global_step, self.current_epoch
        batch = self.batch_in_epoch
        # A signal is acted on before the next call is sent (``_run_calls``), before an epoch
        # starts and after one ends: never a call more than those already on the device.
        while not self._dispatch_done() and self._signal is None:
            epoch = self.dispatch_epoch
            yield _Event("start", epoch, barrier=self._sync("on_train_epoch_start", "epoch_start"))
            stopped = False
            with contextlib.closing(self._run_calls(epoch, batch)) as calls:
                for n_steps, n_batches in calls:
                    self.dispatch_step += n_steps
                    batch += n_batches
                    snap = self._snapshot() if self._log_due(n_steps) else None
                    sync = self._sync("on_train_batch_end", "batch", n_steps)
                    mark = self._take_mark()
                    yield _Event("call", epoch, n_steps, n_batches, snap, sync, mark)
                    if self._signal is not None:
                        break
                    if self.should_stop or self._steps_done(self.dispatch_step):
                        stopped = True
                        break
                else:
                    if batch == 0 and self._signal is None:
                        raise EmptyDataError(f"train data yielded no batch in epoch {epoch}.")
            if self._signal is not None:
                break
            # Validation and the last epoch end wait for every hook before anything else runs.
            sync = self.val_data is not None or self._dispatch_done(after_epoch=True)
            sync = sync or self._sync("on_train_epoch_end", "epoch_end")
            snap = self._snapshot()
            nb = self._n_train_batches
            partial = stopped and (nb is None or batch < nb)
            mark = self._take_mark()
            yield _Event("end", epoch, snap=snap, barrier=sync, mark=mark, partial=partial)
            self.dispatch_epoch += 1
            batch = 0
        if self._signal is not None:
            yield _Event("interrupt", self.dispatch_epoch, barrier=True)

    def _deliver(self, ev: _Event) -> None:
        if ev.snap is not None:  # the read below waits for the device: time when it is done
            self._device_clock.read(self.global_step + ev.n_steps, ev.snap)
        calls = self._trail.calls  # where calls ended, under NaNGuard("stop") only
        if ev.kind == "start":
            if calls is not None:
                calls.clear()
                calls.append((self.global_step, self.batch_in_epoch))
            self._hook("on_train_epoch_start", ev.epoch)
        elif ev.kind == "call":
            self.global_step += ev.n_steps
            self.batch_in_epoch += ev.n_batches
            if calls is not None:
                calls.append((self.global_step, self.batch_in_epoch))
            logs = self._interval_logs(ev.snap) if ev.snap is not None else {}
            self._hook("on_train_batch_end", self.global_step, logs)
            if self._mid_val_due(ev.n_steps):
                self.logged_metrics.update(self._validate(self.val_data))
        elif ev.kind == "end":
            logs = self._epoch_logs(ev.snap)
            # A fit that ended inside the epoch: from here on its checkpoints (those of this
            # epoch end's hooks too) hold the state from before this epoch end, so that a
            # resume finishes the epoch (``resume_point.py``).
            self._resume_point = capture(self, at_end=True, partial=ev.partial)
            every = (ev.epoch + 1) % self.val_every_n_epochs == 0
            if self.val_data is not None and (every or self._done(after_epoch=True)):
                logs.update(self._validate(self.val_data))
            self._hook("on_train_epoch_end", ev.epoch, logs)
            self.history.append(ev.epoch, logs)
            self._trail.epoch_ended(self.global_step, logs)
            self.current_epoch += 1
            self.batch_in_epoch = 0
            # Only now: a checkpoint written by an epoch-end hook keeps the epoch's sums, and a
            # run resumed from it repeats this epoch end with the same logs.
            self._epoch_acc[:] = 0.0
        else:
            self._interrupt()

    def _run_calls(self, epoch: int, start: int) -> Iterator[tuple[int, int]]:
        """Runs the jitted programs over the epoch's batches; yields (steps, batches) per call.
        The time spent waiting for each batch adds to ``data_wait_seconds`` (host clocks)."""
        calls = self._plan_calls(epoch, start)
        if self.prefetch:
            calls = _Prefetch(calls, self.prefetch)
        it, clock, device = iter(calls), time.perf_counter, self._device_clock
        try:
            while True:
                t0 = clock()
                item = next(it, None)
                wait = clock() - t0
                self.data_wait_seconds += wait
                device.poll(t0, wait, epoch, self.dispatch_step, self._leaves[-1])
                if item is None:
                    return
                kind, batch, n_steps, n_batches = item
                # From here this call counts in the step a signal handler says the fit stops
                # after; a signal that came before (the handler's step is not past the calls
                # sent) stops the epoch here, the call unsent.
                self._send_step = self.dispatch_step + n_steps
                if self._signal is not None and self.dispatch_step >= self._stop_step:
                    return
                single, multi = self._calls
                self._leaves = (single if kind == "single" else multi)(self._leaves, batch)
                if self._journal is not None:
                    self._journal.append((kind, batch))
                yield n_steps, n_batches
        finally:
            if isinstance(calls, _Prefetch):
                calls.close()

    def _plan_calls(self, epoch: int, start: int):
        """Groups batches into optimizer steps (``grad_accum_steps``) and steps into calls
        (``steps_per_execution``). Only equal shapes are stacked; a short last batch gets its
        own group, so each distinct shape compiles once."""
        K, A = self.steps_per_execution, self.grad_accum_steps
        spec, put = self._spec, self.placement.put_batch
        planned = self.dispatch_step
        # A resumed fit first runs the rest of the call that max_steps cut short, so that its
        # calls (and the logs at their ends) fall where the uninterrupted run's do.
        cap, self._call_rest = min(K, self._call_rest or K), 0
        chunk: list[list] = []
        group: list[list] = []

        def emit(chunk):
            n_batches = sum(len(g) for g in chunk)
            groups = [stack(g) if A > 1 else g[0] for g in chunk]
            if len(groups) == 1:
                return "single", put(groups[0], int(A > 1)), 1, n_batches
            return "multi", put(stack(groups), 1 + int(A > 1)), len(groups), n_batches

        def room():
            return cap if self.max_steps is None else min(cap, self.max_steps - planned)

        def push(g):
            nonlocal chunk, planned, cap
            key = (len(g), g[0][0].shape[0])
            if chunk and (len(chunk[0]), chunk[0][0][0].shape[0]) != key:
                out = emit(chunk)
                planned += out[2]
                chunk, cap = [], K
                yield out
            chunk.append(g)
            if len(chunk) >= room():
                if len(chunk) < cap:  # cut short by max_steps (``resume_point.py``)
                    self._cut_rest = cap - len(chunk)
                out = emit(chunk)
                planned += out[2]
                chunk, cap = [], K
                yield out

        data, limit = self.train_data, self.limit_train_batches
        if K > 1 and A == 1 and isinstance(data, ArrayLoader):
            # Runs of K batches come stacked from the loader's gather buffer (no copy).
            def runs():
                at = start
                for leaves, m in data.iter_runs(epoch, start, cap, limit) if cap < K else ():
                    yield leaves, m
                    at += m
                    break
                yield from data.iter_runs(epoch, at, K, limit)

            for leaves, m in runs():
                if self.max_steps is not None:
                    if planned >= self.max_steps:
                        return
                    if m > self.max_steps - planned:
                        self._cut_rest = m - (self.max_steps - planned)
                        m = self.max_steps - planned
                        leaves = [x[:m] for x in leaves]
                planned += m
                if m == 1:
                    yield "single", put([x[0] for x in leaves]), 1, 1
                else:
                    yield "multi", put(leaves, 1), m, m
            return
        # An ArrayLoader's batches are slices of arrays checked once at construction: only
        # their batch size can change, so they come as leaves, with no per-batch check.
        if isinstance(data, ArrayLoader):
            batches = data.iter_leaves(epoch, start)
            if limit is not None:
                batches = itertools.islice(batches, max(0, limit - start))
            check = _as_leaves
        else:
            batches = epoch_batches(data, epoch, start, limit, self.seed)
            check = spec.check
        if K == 1 and A == 1:  # one batch per call: the common case, kept lean
            for i, batch in enumerate(batches, start):
                if self.max_steps is not None and planned >= self.max_steps:
                    return
                planned += 1
                yield "single", put(check(batch, i)), 1, 1
            return
        for i, batch in enumerate(batches, start):
            leaves = check(batch, i)
            if group and leaves[0].shape[0] != group[0][0].shape[0]:
                yield from push(group)
                group = []
            if not group and self.max_steps is not None and planned + len(chunk) >= self.max_steps:
                break
            group.append(leaves)
            if len(group) == A:
                yield from push(group)
                group = []
        if group:
            yield from push(group)
        if chunk:
            yield emit(chunk)

    # ==================================================================== speculation ===
    # Under NaNGuard, gating each update on the whole gradient being finite keeps the update
    # from overlapping the backward pass: +33-45 % on a small MLP on 2 CPU cores. So for
    # small states (``StepConfig.speculate``) the programs run ungated, and the loop keeps a
    # copy of the carry at a point known to be good (the mark) and a journal of what it
    # dispatched since. A non-finite count that moved, read before any hook sees the state
    # (from a log snapshot, a periodic mark, or the live state at a barrier), means a step
    # was not finite: the journal is re-run from the mark, call by call, each checked, and a
    # bad step is replaced by what the gated step leaves (``_rollback``). A speculating fit
    # is exact in itself (a skipped batch leaves everything as a run without it, and a resumed
    # run re-runs alike); against gating every step, whose update compiles apart, it agrees
    # to rounding.
    def _start_speculation(self) -> None:
        self._calls = (self._programs.train_single, self._programs.train_multi)
        self._journal = collections.deque() if self._programs.config.speculate else None
        if self._journal is not None:
            step_bytes = max(1, self._spec.nbytes * self.grad_accum_steps)
            self._mark_every = max(1, min(MARK_EVERY_N_STEPS, MARK_MAX_BATCH_BYTES // step_bytes))
            self._good = self._read_count(self._leaves[self._count_index])
            self._mark_here()

    def _mark_here(self) -> None:
        """The state as it is now, known good, becomes the mark; the journal starts over."""
        self._mark, self._mark_step = self._copy(self._leaves), self.dispatch_step
        self._journal.clear()

    def _take_mark(self) -> list | None:
        """At dispatch, every ``_mark_every`` steps: a copy of the carry to re-run from."""
        if self._journal is None or self.dispatch_step - self._mark_step < self._mark_every:
            return None
        mark, self._mark_step = self._copy(self._leaves), self.dispatch_step
        mark[self._count_index].copy_to_host_async()
        self._journal.append(("mark", mark))
        return mark

    @staticmethod
    def _read_count(x: jax.Array) -> int:
        wait_ready([x])
        return int(x)

    def _verify(self, ev: _Event) -> None:
        """Before an event's hooks: the state up to it is good, or the journal is re-run so
        that it is. The non-finite count comes from the event's log snapshot, its mark, or,
        at a barrier (nothing went out after it), the live state. An event with none of those
        shows its hooks no state."""
        if ev.snap is None and ev.mark is None and not ev.barrier:
            return

        def count() -> int:  # the lists are re-taken in place by a re-run, the live one not
            if ev.snap is not None:
                return self._read_count(ev.snap[self._count_index - self._n_head])
            return self._read_count((ev.mark or self._leaves)[self._count_index])

        n = count()
        if n != self._good:
            self._rollback()
            if self._journal is None:  # halted: gated from here on, nothing to verify
                return
            n = count()
        self._good = n
        anchor = ev.mark if ev.mark is not None else ev.snap  # the mark comes last
        if anchor is not None:
            self._forget_through(anchor)

    def _forget_through(self, anchor: list) -> None:
        """Everything up to ``anchor`` (a snapshot or mark in the journal) is good: the
        newest mark up to there becomes the one to re-run from."""
        last = None
        for i, (kind, x) in enumerate(self._journal):
            if kind == "mark":
                last = i
            if x is anchor:
                break
        if last is not None:
            self._mark = self._journal[last][1]
            for _ in range(last + 1):
                self._journal.popleft()

    def _rollback(self) -> None:
        """Re-runs the calls since the mark, each checked. A one-step call whose step was not
        finite keeps the state from before it (``skipped``: what the gated step leaves, bit
        for bit); a K-step call with such a step is redone a step at a time. Log snapshots
        and marks are re-taken in place: the pending events hold those same lists. With
        ``halt_on_nonfinite`` every step after the first bad one is gated, so that nothing
        more is applied, in this re-run and in the calls still to come."""
        single, multi = self._calls
        gated_single, gated_multi, skipped = self._programs.gated()
        halt = "halt_on_nonfinite" in self._programs.config.features
        journal, self._journal = self._journal, None  # the re-run's snapshots are not new
        # From a copy: the mark stays the start of the journal, which a later re-run needs.
        self._leaves = self._copy(self._mark)
        good = self._read_count(self._mark[self._count_index])
        halted = False

        def call(kind: str, batch: list) -> None:
            nonlocal good, halted
            if halted:
                self._leaves = (gated_single if kind == "single" else gated_multi)(
                    self._leaves, batch
                )
                return
            before = self._copy(self._leaves)
            self._leaves = (single if kind == "single" else multi)(self._leaves, batch)
            if self._read_count(self._leaves[self._count_index]) == good:
                return
            if kind == "multi":  # the steps one by one: as the scan's (bit for bit in the tests)
                self._leaves = before
                for j in range(batch[0].shape[0]):
                    call("single", [x[j] for x in batch])
                return
            self._leaves = skipped(before, self._leaves)
            good = self._read_count(self._leaves[self._count_index])
            if halt:
                self._calls, halted = (gated_single, gated_multi), True

        for kind, x in journal:
            if kind == "snap":
                x[:] = self._snapshot()
            elif kind == "mark":
                x[:] = self._copy(self._leaves)
            else:
                call(kind, x)
        if not halt:
            self._journal = journal

    # ======================================================================== logging ===
    def _log_due(self, n_steps: int) -> bool:
        n, step = self.log_every_n_steps, self.dispatch_step
        prev = step - n_steps
        if self._log_from is not None:  # resumed: the last log may lie before the checkpoint
            prev, self._log_from = self._log_from, None
        return step // n != prev // n or self._steps_done(step)

    def _snapshot(self) -> list:
        """Takes the metric sums since the last snapshot out of the carry (zeros go in) and, when
        later calls may be dispatched before it is read, copies of the other tail values (lr,
        non-finite counters). The host copy starts now; ``_read`` collects it."""
        i = self._n_head
        tail = self._leaves[i:]
        if self.lookahead:
            zeros, rest = self._fresh_copy(tail[0], tail[1:])
        else:  # read before the next call: no copies needed
            zeros, rest = self._fresh(tail[0]), tail[1:]
        snap = [tail[0], *rest]
        self._leaves[i] = zeros
        for x in snap:
            x.copy_to_host_async()
        if self._journal is not None:
            self._journal.append(("snap", snap))
        return snap

    def _read(self, snap: list | None) -> tuple[np.ndarray, dict]:
        if snap is None:  # nothing to add (``_drop_dispatched``)
            return np.zeros_like(self._epoch_acc), self._last
        wait_ready(snap)
        acc, last, health = jax.device_get(jax.tree.unflatten(self._tail_def, snap))
        self._last = last
        if "finite" in self._programs.config.features:
            self.nonfinite_steps = int(health["nonfinite_steps"])
            first = int(health["first_nonfinite_step"])
            self.first_nonfinite_step = first if first >= 0 else None
        return np.asarray(acc, np.float64), last

    def _interval_logs(self, snap: list) -> dict[str, float]:
        """Means over the steps since the last log; their sums join the epoch's."""
        acc, last = self._read(snap)
        before = self._epoch_acc.copy()
        self._epoch_acc += acc
        logs = self._means(acc, last)
        self.logged_metrics = dict(logs)
        final, cut = self._steps_done(), self._cut_rest > 0
        self._trail.logged(
            self.global_step, before, acc, logs, every=self.log_every_n_steps, final=final, cut=cut
        )
        return logs

    def _epoch_logs(self, snap: list | None) -> dict[str, float]:
        acc, last = self._read(snap)
        self._trail.end = (self._epoch_acc.copy(), acc)
        self._epoch_acc += acc  # cleared after the epoch-end hooks (``_deliver``)
        return self._means(self._epoch_acc, last)

    def _means(self, acc: np.ndarray, last: dict) -> dict[str, float]:
        n = acc[-1]
        order = self._programs.metric_order
        logs = {k: float(v / n) if n > 0 else math.nan for k, v in zip(order, acc, strict=False)}
        logs.update({k: float(v) for k, v in last.items()})
        if "finite" in self._programs.config.features:
            logs["nonfinite_steps"] = float(self.nonfinite_steps)
        return logs

    # ===================================================================== validation ===
    def _validate(self, data: Any) -> dict[str, float]:
        # Validation is not training time.
        with self._device_clock.excluding(self.dispatch_step, self._leaves[-1]):
            self._hook("on_validation_start")
            logs = self._run_validation(self._programs, self._leaves[: self._n_module], data)
            self._hook("on_validation_end", logs)
        return logs

    def _run_validation(
        self,
        programs: Programs,
        module_leaves: list,
        data: Any,
        method: str = "validation_step",
        limit: int | None = -1,
    ) -> dict:
        """Runs ``method`` (``validation_step``/``test_step``) over ``data`` on the device,
        summing its outputs in one accumulator (``eval_accum.py``); reads it once at the end.
        ``limit``: batches to run (None: all; default: ``limit_val_batches``)."""
        where, prefix = ("test", "test_") if method == "test_step" else ("validation", "val_")
        limit = self.limit_val_batches if limit == -1 else limit
        program = programs.eval_program(method)
        acc = spec = None
        # During fit a signal cuts a validation short (``_interrupt``; its metrics are never
        # logged), and the host queues only ``VAL_MAX_LAG_S`` of batches (a batch's running
        # count, not donated, is ready once the device has done it): a stop waits for those.
        watch = self.fitting
        queue = DeviceQueue(VAL_MAX_LAG_S, wait=wait_ready) if watch else None
        for i, batch in enumerate(epoch_batches(data, 0, limit=limit)):
            if watch and self._signal is not None:
                self._interrupt()
            if spec is None:
                batch_spec = BatchSpec(batch, where)
                spec = programs.eval_spec(module_leaves, batch, method)
                acc = self.placement.put_state(spec.zeros())
            else:
                batch_spec.check(batch, i)
            for part in self.placement.eval_parts(batch):  # one part unless on a mesh
                acc = program(module_leaves, acc, part.batch)
            if queue is not None:
                queue.sent(acc[1])
        if acc is None:
            raise EmptyDataError(f"{where} data yielded no batch; pass a non-empty loader.")
        wait_ready(jax.tree.leaves(acc))
        logs, arrays = spec.finish(jax.device_get(acc), prefix)
        kept = {k: v for k, v in self.array_metrics.items() if not k.startswith(prefix)}
        self.array_metrics = {**kept, **arrays}  # the latest val_* and the latest test_*
        return logs

    def _eval_programs(self, module: TrainModule) -> tuple[Programs, list]:
        if self.fitting and module is self.module:
            return self._programs, self._leaves[: self._n_module]
        was_training = _is_training(module)
        module.eval()
        eval_def, params, rest = nnx.split(module, module.trainable, ...)
        if was_training:
            module.train()
        params = self.placement.put_state(nnx.as_pure(params), params)
        rest = self.placement.put_state(nnx.as_pure(rest), rest)
        key = (eval_def, jax.tree.structure(params), jax.tree.structure(rest))
        programs = self._eval_cache.get(key)
        if programs is None:
            programs = Programs(None, eval_def, module.trainable, None, None, StepConfig())
            programs.set_module_treedefs(jax.tree.structure(params), jax.tree.structure(rest))
            self._eval_cache[key] = programs
        return programs, jax.tree.leaves(params) + jax.tree.leaves(rest)

    # ========================================================================== setup ===
    def _setup_fit(self, module: TrainModule, train_data, val_data, first_batch) -> None:
        self.module, self.train_data, self.val_data = module, train_data, val_data
        self.history = History()
        self.should_stop = False
        self.global_step = self.current_epoch = self.batch_in_epoch = 0
        self.first_nonfinite_step, self.nonfinite_steps = None, 0
        self.logged_metrics = {}
        self.resumed_from = self.resume_info = None
        self._resume_point, self._log_from, self._call_rest, self._cut_rest = None, None, 0, 0
        self._signal = None
        self._spec = BatchSpec(first_batch, "train")
        self.placement.check_batch_size(self._spec.batch_size, "train")

        nb = num_batches(train_data)
        if self.limit_train_batches is not None:
            nb = self.limit_train_batches if nb is None else min(nb, self.limit_train_batches)
        self._n_train_batches = nb
        A = self.grad_accum_steps
        self.steps_per_epoch = -(-nb // A) if nb is not None else None
        totals = []
        if self.max_steps is not None:
            totals.append(self.max_steps)
        if self.max_epochs is not None and self.steps_per_epoch is not None:
            totals.append(self.max_epochs * self.steps_per_epoch)
        self.estimated_stepping_batches = min(totals) if totals else None

        tx, lr_fn = _optimizer_of(module)
        module.eval()
        eval_def = nnx.graphdef(module)
        module.train()
        train_def, params_v, rest_v = nnx.split(module, module.trainable, ...)
        if not jax.tree.leaves(params_v):
            raise ConfigError(
                f"{type(module).__name__}.trainable = {module.trainable!r} matches no variable; "
                "the optimizer would update nothing. Use nnx.Param or a filter that matches."
            )
        # Variables, and handles on plain array attributes (``module_leaves.py``).
        self._live_vars = live_leaves(module, params_v, rest_v)
        # Copies, so that donation never deletes arrays the caller still holds.
        params = self.placement.put_state(jax.tree.map(jnp.copy, nnx.as_pure(params_v)), params_v)
        rest = self.placement.put_state(jax.tree.map(jnp.copy, nnx.as_pure(rest_v)), rest_v)
        opt = self.placement.init_optimizer(tx, params)  # mirrors the params' shardings

        features = self.cb.step_features()
        if "lr" in features and hyperparams.learning_rate_source(tx, opt, lr_fn) is None:
            features -= {"lr"}  # nothing to log (LearningRateMonitor warns at fit start)
        # Under NaNGuard("stop") the resume point is the last good step's: where calls ended
        # since about the last two logs (``resume_point.py``).
        halts = "halt_on_nonfinite" in features
        self._trail = Trail(keep_calls=2 * self.log_every_n_steps + 4 if halts else 0)
        state_bytes = sum(x.nbytes for x in jax.tree.leaves((params, rest, opt)))
        speculate = (
            bool(features & GATES)
            and state_bytes <= SPECULATE_MAX_BYTES
            and not self.placement.is_sharded
            and self.val_every_n_steps is None  # its validations are not barriers
        )
        config = StepConfig(
            A, self.grad_clip_norm, self.precision, features, lr_fn, speculate, self.scan_unroll
        )
        # The device counts steps only for features that need the count in the step.
        needs_step = "finite" in features or ("lr" in features and lr_fn is not None)
        head = (params, rest, opt, jnp.zeros((), jnp.int32) if needs_step else None)
        health = (
            {
                "nonfinite_steps": jnp.zeros((), jnp.int32),
                "first_nonfinite_step": jnp.full((), -1, jnp.int32),
            }
            if "finite" in features
            else {}
        )
        last = {"lr": jnp.zeros((), jnp.float32)} if "lr" in features else {}
        probe = Carry(*head, jnp.zeros((1,), jnp.float32), last, health)
        programs = Programs(train_def, eval_def, module.trainable, tx, None, config)
        programs.batch_def = self._spec.treedef
        programs.set_module_treedefs(jax.tree.structure(params), jax.tree.structure(rest))
        batch_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), first_batch)
        names = ["loss", *programs.metric_names(probe, jax.tree.leaves(batch_shapes))]
        if "grad_norm" in features:
            names.append("grad_norm")
        if "module_grad_norms" in features:
            names += [f"grad_norm/{k}" for k in params]
        programs.metric_order = list(dict.fromkeys(names))
        carry = probe._replace(acc=jnp.zeros((len(programs.metric_order) + 1,), jnp.float32))
        programs.treedef = jax.tree.structure(carry)
        self._programs = programs
        self._n_module = len(self._live_vars)
        self._n_head = len(jax.tree.leaves(head))
        self._tail_def = jax.tree.structure((carry.acc, carry.last, carry.health))
        self._leaves = self.placement.put_carry(jax.tree.leaves(carry), programs)
        # f64 sums (and count) of the epoch's metrics over the intervals fetched so far; the
        # carry's acc holds the sums since the last fetch.
        self._epoch_acc = np.zeros(len(programs.metric_order) + 1, np.float64)
        self._last = jax.device_get(carry.last)
        self._step_index = self._n_head - 1 if needs_step else None
        # Jitted (4 us a call) rather than eager (20-50 us): they run at every log step. On a
        # mesh their outputs keep the carry's shardings, so the step sees the same signature.
        tail = self._leaves[self._n_head :]
        zs = cs = {}
        if self.placement.is_sharded:
            zs = {"out_shardings": tail[0].sharding}
            cs = {"out_shardings": (tail[0].sharding, [x.sharding for x in tail[1:]])}
        self._fresh = jax.jit(jnp.zeros_like, **zs)
        self._fresh_copy = jax.jit(_zeros_and_copies, **cs)
        self._copy = jax.jit(_copies)
        where = jax.tree.unflatten(programs.treedef, range(len(self._leaves)))
        self._count_index = where.health.get("nonfinite_steps")
        self._sync_to_module()

    def _default_callbacks(self) -> list[Callback]:
        out: list[Callback] = []
        user = self.callbacks
        if self.progress_bar:
            from nnxfit.callbacks.progress import ProgressBar

            if not any(isinstance(c, ProgressBar) for c in user):
                out.append(ProgressBar(console=self.console))
        if self.workdir is not None and not self.fast_dev_run:
            from nnxfit.callbacks.csv_logger import CSVLogger

            if not any(isinstance(c, CSVLogger) for c in user):
                out.append(CSVLogger())
        from nnxfit.compile_watch import CompileWatch

        if not any(isinstance(c, CompileWatch) for c in user):
            out.append(CompileWatch())  # logs compile times, warns on a mid-fit recompile
        from nnxfit.modes import FrozenStatsCheck

        if not any(isinstance(c, FrozenStatsCheck) for c in user):
            out.append(FrozenStatsCheck())  # warns when BatchNorm statistics never move
        return out

    def eval_mode(self, module: TrainModule):
        """``with trainer.eval_mode(module): ...`` runs the block in eval mode and undoes
        whatever it did to the module (``modes.eval_mode``): for callbacks that call it."""
        from nnxfit.modes import eval_mode

        return eval_mode(module)

    def _resume(self, resume) -> None:
        from nnxfit.checkpoint import resume_fit, trainer_options

        # As given, before the checkpoint's loader state replaces the loader's seed: a
        # resume warns about what differs (``checkpoint._warn_on_drift``).
        self._requested_options = trainer_options(self)
        resume_fit(self, resume)

    # ================================================================ state and module ===
    def _sync_to_module(self, allow_deleted: bool = False) -> None:
        """Points the module's Variables at the current device arrays (cheap: no tree walk)."""
        if self._leaves is None or self.module is None:
            return
        for var, x in zip(self._live_vars, self._leaves[: self._n_module], strict=False):
            if allow_deleted and isinstance(x, jax.Array) and x.is_deleted():
                continue
            var.set_raw_value(x)

    def _sync_from_module(self) -> None:
        """Adopts whatever a hook assigned to the module's Variables."""
        leaves = self._leaves
        for i, var in enumerate(self._live_vars):
            x = var.get_raw_value()
            if x is not leaves[i]:
                old = leaves[i]
                x = jnp.asarray(x)
                if x.shape != old.shape or x.dtype != old.dtype:
                    raise ConfigError(
                        f"a callback set a module variable of shape {old.shape} {old.dtype} to "
                        f"shape {x.shape} {x.dtype}; variables must keep their shape and dtype."
                    )
                leaves[i] = self.placement.put_state(x, var) if self.placement.is_sharded else x

    def train_state(self) -> dict:
        """The device state of the fit as pytrees (for checkpoints): module state, optimizer
        state, step counter and the epoch's metric accumulators."""
        c = jax.tree.unflatten(self._programs.treedef, self._leaves)
        return c._asdict()

    def load_train_state(self, state: dict) -> None:
        """Replaces the device state with ``state`` (same structure as ``train_state()``)."""
        c = Carry(**state)
        leaves = jax.tree.leaves(c)
        if len(leaves) != len(self._leaves):
            raise ConfigError("restored state has a different number of arrays than the fit.")
        self._leaves = leaves
        self._sync_to_module()

    def loop_state(self) -> dict:
        """Host-side counters a resumed run needs (plain Python), live."""
        return {
            "global_step": self.global_step,
            "epoch": self.current_epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "should_stop": self.should_stop,  # informative: a resumed fit decides anew
            "history": self.history.state_dict(),
            "epoch_acc": self._epoch_acc.tolist(),
            "callbacks": self.cb.state_dicts(),
            "loader": loader_state(self.train_data, self.current_epoch, self.batch_in_epoch),
            "call_rest": 0,
            "superseded_from": self.global_step + 1,
            **self._trail.loop_fields(*self._trail.regular()),
        }

    def checkpoint_state(self) -> tuple[dict, dict]:
        """What a checkpoint saves, ``(train_state(), loop_state())``-shaped: the point a
        resume continues from. The live state while the fit trains; once it has ended inside
        an epoch, the state from before that epoch's end (``resume_point.py``)."""
        point = self._resume_point
        if point is None:
            point = capture(self, at_end=False)
        carry = jax.tree.unflatten(self._programs.treedef, point.leaves)
        return carry._asdict(), point.loop

    @property
    def checkpoint_step(self) -> int:
        """The step of the state a checkpoint saves now (``checkpoint_state``): the global
        step, or the last good step's after ``NaNGuard("stop")``."""
        return step_of(self)

    def load_loop_state(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.current_epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        # A new fit call is a new decision: a stop saved with the state does not carry over.
        self.should_stop = False
        self.history.load_state_dict(state.get("history", {}))
        log_step = int(state.get("log_step", self.global_step))
        logs = dict(state.get("logged_metrics") or {})
        calls = self._trail.calls
        self._trail = Trail(log_step, logs, calls.maxlen if calls is not None else 0)
        end = state.get("epoch_end")
        self._trail.epoch = (int(end[0]), dict(end[1])) if end else None
        self._log_from = log_step if log_step != self.global_step else None
        self._call_rest = int(state.get("call_rest", 0))
        self.logged_metrics = dict(logs)
        superseded = int(state.get("superseded_from", self.global_step + 1))
        self.resume_info = ResumeInfo(log_step, superseded, logs, self._trail.epoch)
        acc = state.get("epoch_acc")
        if acc is not None and len(acc) == len(self._epoch_acc):
            self._epoch_acc = np.asarray(acc, np.float64)
        self.cb.load_state_dicts(state.get("callbacks", {}))
        if state.get("loader") and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(state["loader"])

    # ========================================================================= hooks ===
    def _hook(self, name: str, *args, guard: bool = False, defer: bool = False) -> None:
        """``guard``: a failing callback only warns (an error is already on its way out).
        ``defer``: every callback runs, then the first failure is raised (cleanup hooks)."""
        cbs = self.cb.for_hook(name)
        if not cbs:
            return
        needs_module = self.fitting and self.cb.needs_module(name)
        if needs_module:
            self._sync_to_module()
        first = None
        for cb in cbs:
            try:
                getattr(cb, name)(self, self.module, *args)
            except Exception as e:
                if guard or (defer and first is not None):
                    from nnxfit.warn import warn

                    warn(f"{type(cb).__name__}.{name} raised {e!r}")
                    continue
                e.add_note(f"(raised in callback {type(cb).__name__}.{name})")
                if not defer:
                    raise
                first = e
        if needs_module:
            self._sync_from_module()
        if first is not None:
            raise first

    # ====================================================================== stopping ===
    def _steps_done(self, step: int | None = None) -> bool:
        step = self.global_step if step is None else step
        return self.max_steps is not None and step >= self.max_steps

    def _dispatch_done(self, after_epoch: bool = False) -> bool:
        epoch = self.dispatch_epoch + (1 if after_epoch else 0)
        return (
            self.should_stop
            or self._steps_done(self.dispatch_step)
            or (self.max_epochs is not None and epoch >= self.max_epochs)
        )

    def _mid_val_due(self, n_steps: int) -> bool:
        """``val_every_n_steps`` crossed, unless the epoch-end validation is about to run."""
        n = self.val_every_n_steps
        if n is None or self.val_data is None:
            return False
        if self.global_step // n == (self.global_step - n_steps) // n:
            return False
        nb = self._n_train_batches
        last = self.should_stop or self._steps_done()
        last = last or (nb is not None and self.batch_in_epoch >= nb)
        epoch_val = (self.current_epoch + 1) % self.val_every_n_epochs == 0 or self._done(True)
        return not (last and epoch_val)

    def _done(self, after_epoch: bool = False) -> bool:
        epoch = self.current_epoch + (1 if after_epoch else 0)
        return (
            self.should_stop
            or self._steps_done()
            or (self.max_epochs is not None and epoch >= self.max_epochs)
        )

    def _interrupt(self) -> None:
        """Every hook has run for the state on the device: save (``on_interrupt``), then
        raise ``TrainingInterrupted`` naming the step and the checkpoint."""
        self._hook("on_interrupt")
        raise interrupt.interrupted(self)

    def _signal_handlers(self):
        return interrupt.handlers(self)  # SIGTERM/SIGINT, see nnxfit/interrupt.py

    # ======================================================================= checks ===
    @staticmethod
    def _check_module(module: Any) -> None:
        if not isinstance(module, TrainModule):
            raise TypeError(
                f"expected an nnxfit.TrainModule, got {type(module).__name__}. Subclass "
                "nnxfit.TrainModule and define training_step and configure_optimizers."
            )

    def _first_batch(self, data: Any, where: str) -> Any:
        return first_batch(data, where)


def _zeros_and_copies(acc: jax.Array, rest: list) -> tuple[jax.Array, list]:
    return jnp.zeros_like(acc), _copies(rest)


def _copies(leaves: list) -> list:
    # ``x + 0`` rather than ``x``: jit would hand back the input itself, which the next call
    # then donates.
    return [_copy_leaf(x) for x in leaves]


def _copy_leaf(x: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys do not add
        return jax.random.wrap_key_data(
            _copy_leaf(jax.random.key_data(x)), impl=jax.random.key_impl(x)
        )
    return x + jnp.zeros_like(x)


def _as_leaves(leaves: list, index: int) -> list:
    return leaves


def wait_ready(arrays: list) -> None:
    """Waits for ``arrays`` by polling with short sleeps.

    ``block_until_ready`` busy-waits; on a 2-core CPU host that spinning thread takes a core
    from XLA's compute threads for the whole wait, and a sync every epoch cost ~20 % of
    throughput in ``benchmarks/overhead.py``. Sleeping hands the core back.
    """
    pause = 5e-5
    for x in arrays:
        if isinstance(x, jax.Array):
            while not x.is_ready():
                time.sleep(pause)
                # Backing off to 1 ms: waking every 50 us through a long wait (the host ahead
                # of a compute-bound device) took ~10 % of a 2-core machine from XLA.
                pause = min(pause * 1.5, 1e-3)


def _optimizer_of(module: TrainModule):
    out = module.configure_optimizers()
    lr_fn = None
    if isinstance(out, dict):
        tx = out.get("optimizer")
        lr = out.get("lr_schedule")
        lr_fn = lr if callable(lr) or lr is None else (lambda step, lr=lr: lr)
    else:
        tx = out
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            f"{type(module).__name__}.configure_optimizers returned {type(tx).__name__}; it must "
            "return an optax.GradientTransformation (e.g. optax.adamw(1e-3)) or "
            "{'optimizer': tx, 'lr_schedule': schedule}."
        )
    return tx, lr_fn


def _is_training(module: nnx.Module) -> bool:
    for _, node in nnx.iter_modules(module):
        if getattr(node, "deterministic", None) is False:
            return True
        if getattr(node, "use_running_average", None) is False:
            return True
    return False


class _Prefetch:
    """Runs a generator on a background thread, ``size`` items ahead; re-raises its errors."""

    _END = object()

    def __init__(self, gen, size: int):
        self._q: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._gen = gen
        self._t = threading.Thread(target=self._run, daemon=True, name="nnxfit-prefetch")
        self._t.start()

    def _run(self):
        try:
            for item in self._gen:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(self._END)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
            self._q.put(e)

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()
        self._t.join(timeout=5)
