"""``Trainer``: its options, ``fit``, and the fit as the device sees it.

A fit is two halves, each in one screen here. ``_dispatch`` sends the calls of the train
program and yields an event per epoch start, call and epoch end as soon as it is on its way;
``_deliver`` runs the hooks of one event. ``loop.run`` connects them: hooks trail the device
by a few events, except where a callback needs them in step (``Callback.needs_sync``; a
``records_only`` callback never does).

The rest of the Trainer's public API is in three parts it inherits:

* ``fit_view.py`` (``FitView``): what callbacks read of a fit (``programs``, ``carry``,
  ``batch_spec``, ``metric_names``, ``epoch_ending()``, hyperparameters...);
* ``fit_state.py`` (``FitState``): the state a checkpoint saves and a resume loads;
* ``eval_api.py`` (``EvalAPI``): ``validate``, ``test``, ``predict``.

Everything else has a module of its own: ``config.py`` (the options), ``fit_setup.py``
(inputs, callbacks and device state of a new fit), ``plan.py`` (batches to calls),
``carry.py`` (the device state and its programs, ``step.py``), ``loop.py`` (events, counters,
cadence, the lookahead consumer), ``hooks.py`` and ``fit_logs.py`` (calling hooks, logs out of
the metric sums), ``speculation.py`` (NaNGuard's re-run from a kept copy), ``evaluate.py`` and
``sanity.py`` (validation), ``resume.py`` / ``resume_point.py`` / ``checkpoint.py`` (resume
and orbax), ``interrupt.py``, ``workdir.py``, ``runs.py``, ``device_clock.py``.

The module object is written back from the device state only when someone may look at it:
before the hooks of callbacks that are not ``records_only``, at the events in step with the
device, and on errors and at the end.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from nnxfit import evaluate, fit_logs, fit_setup, hooks, interrupt, loop, multihost, pacing
from nnxfit.callbacks.base import Callback, CallbackList, as_callbacks
from nnxfit.carry import FitCarry, wait_ready
from nnxfit.config import PRECISIONS, TrainerConfig, expose_options  # noqa: F401 (PRECISIONS)
from nnxfit.data import BatchSpec
from nnxfit.device_clock import DeviceClock
from nnxfit.errors import EmptyDataError, TrainingInterrupted
from nnxfit.eval_api import EvalAPI, with_module
from nnxfit.fit_state import FitState
from nnxfit.fit_view import FitView
from nnxfit.history import History
from nnxfit.loop import CALL, END, INTERRUPT, START, Event, Progress, Schedule, counter, new_event
from nnxfit.module import TrainModule
from nnxfit.placement import Placement
from nnxfit.plan import Plan
from nnxfit.resume_point import ResumeInfo, ResumePoint, Trail, capture
from nnxfit.rollback import Rollback
from nnxfit.runs import begin_run
from nnxfit.sanity import check_validation
from nnxfit.speculation import NoSpeculation, Speculation, mark_every
from nnxfit.workdir import lock_workdir


@expose_options
class Trainer(FitView, FitState, EvalAPI):
    """Fits, validates, tests and predicts with a ``TrainModule``.

    One of ``max_epochs`` / ``max_steps`` is required; training stops at whichever comes first.
    Every option is keyword-only and readable (and settable) as an attribute; the README says
    what each does, ``config.py`` how each is checked.
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
        options = {k: v for k, v in locals().items() if k not in ("self", "callbacks")}
        self._plan: Plan | None = None  # the current (last) fit's batches as calls
        self._schedule: Schedule | None = None  # its stop, log and validation cadence
        self.config = TrainerConfig(**options)
        self.callbacks = as_callbacks(callbacks)
        self.placement = Placement(self.config.mesh)
        self.is_global_zero = jax.process_index() == 0
        # The current (or last) fit, readable by callbacks.
        self.cb = CallbackList([])
        self.history = History()
        self.should_stop = False
        self.module: TrainModule | None = None
        self.train_data: Any = None
        self.val_data: Any = None
        self.fitting = False
        self.steps_per_epoch: int | None = None
        self.estimated_stepping_batches: int | None = None
        self.logged_metrics: dict[str, float] = {}
        # Array results of the latest validation and test (``nnxfit.metrics``), by name.
        self.array_metrics: dict[str, np.ndarray] = {}
        self.resumed_from: str | None = None
        self.resume_info: ResumeInfo | None = None  # set by a resume (for the loggers)
        self.data_wait_seconds = 0.0  # the loop's waits for its next batch, all fits
        self.lookahead = 0  # events the hooks may trail the device by (``loop.lookahead``)
        # What the hooks have seen, and what went out to the device (``loop.Progress``).
        self._seen, self._sent = Progress(), Progress(epoch=None)
        self._carry: FitCarry | None = None
        self._spec: BatchSpec | None = None
        self._n_train_batches: int | None = None
        self._speculation: Speculation | NoSpeculation = NoSpeculation()
        self._rollback: Rollback | None = None  # a guard's action="rollback" (rollback.py)
        self._signals = interrupt.Signals()
        self._device_clock = DeviceClock(wait_ready)
        self._eval_cache = evaluate.EvalPrograms()  # for modules outside a fit
        # Where the fit ended, once it ended inside an epoch, and what it takes to compute
        # (``resume_point.py``).
        self._resume_point: ResumePoint | None = None
        self._trail = Trail()

    global_step = counter("_seen", "step", "Optimizer steps the hooks have seen.")
    current_epoch = counter("_seen", "epoch", "The epoch the hooks are in (from 0).")
    batch_in_epoch = counter("_seen", "batch", "Batches of the epoch the hooks have seen.")
    dispatch_step = counter("_sent", "step", "Optimizer steps sent to the device.")
    dispatch_epoch = counter("_sent", "epoch", "The epoch being sent (None before a fit).")

    @property
    def config(self) -> TrainerConfig:
        """The options (``config.TrainerConfig``); each is also an attribute of the Trainer."""
        return self._config

    @config.setter
    def config(self, config: TrainerConfig) -> None:
        self._config = config
        # Set during a fit (a callback's ``trainer.max_steps = n``), the fit takes them too.
        for part in (self._schedule, self._plan):
            if part is not None:
                part.configure(config)

    # ======================================================================= public API ===
    @with_module
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
        arrays = dict(batch_size=batch_size, shuffle=shuffle, validation_split=validation_split)
        train_data, val_data, first = fit_setup.fit_data(
            self, module, train_data, val_data, **arrays
        )
        refit = self.module is module
        self.cb = fit_setup.fit_callbacks(self, module)
        # One fit per workdir, from before a checkpoint is read until the last one is written.
        with lock_workdir(self):
            self._setup_fit(module, train_data, val_data, first)
            if resume:
                self._resume(resume)
            begin_run(self, refit)  # resume line, earlier run -> workdir/version_N
            if self.workdir is not None and self.is_global_zero and not self.fast_dev_run:
                os.makedirs(self.workdir, exist_ok=True)
            self.fitting, finished = True, False
            seen = self._seen
            self._sent = Progress(seen.step, seen.epoch, seen.batch)  # what a signal reports
            self._signals.sending = seen.step
            with interrupt.handlers(self, self._signals, self._saving_dirs):
                try:
                    self._hook("on_fit_start")
                    # After on_fit_start, as Lightning runs it: callbacks (CompileWatch) see it.
                    check_validation(self, self._validation_run)
                    self._train_loop()
                    finished = True
                except TrainingInterrupted:
                    raise
                except BaseException as e:
                    multihost.explain_failure(self, e)  # a lost process: which one
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
                if self._signals.received is not None:
                    # It came after the last step: the fit finished and saved, and the process
                    # still stops, as the signal asked.
                    raise interrupt.interrupted(
                        self, self._signals.received, self._saving_dirs(), after_last_step=True
                    )
        return self.history

    # ========================================================== the fit, as the device sees it ===
    def _train_loop(self) -> None:
        carry, ahead = self._carry, loop.lookahead(self.steps_per_execution, self.val_every_n_steps)
        self.lookahead = ahead
        carry.copy_tail = ahead > 0  # a log snapshot may be read after later calls went out
        if carry.programs.config.speculate:  # NaNGuard, small state: see speculation.py
            every = mark_every(self._spec.nbytes, self.grad_accum_steps)
            self._speculation = Speculation(carry, lambda: self._sent.step, every)
        else:
            self._speculation = NoSpeculation()
        self._rollback = Rollback.of(self)
        self._device_clock.start(self._seen.step)
        loop.run(
            self._dispatch(),
            self._deliver,
            ahead=ahead,
            speculation=self._speculation,
            on_stop=self._drop_dispatched,
        )

    def _dispatch(self) -> Iterator[Event]:
        """Sends the calls, epoch by epoch; yields each event as soon as its call is on the
        device. A signal is acted on before the next call goes out, before an epoch starts
        and after one ends: never a call more than those already on the device."""
        sent, schedule, carry, signals = self._sent, self._schedule, self._carry, self._signals
        speculation, barrier, device = self._speculation, self._barrier, self._device_clock
        paced = pacing.train_queue(wait_ready)  # a stop waits for ~2 s of queued calls at most
        sent.step, sent.epoch, sent.batch = (
            self.global_step,
            self.current_epoch,
            self.batch_in_epoch,
        )

        def waited(t0: float, seconds: float) -> None:  # for the next call, at ``t0``
            self.data_wait_seconds += seconds
            device.poll(t0, seconds, sent.epoch, sent.step, carry.leaves[-1])

        while not schedule.done(sent, self.should_stop) and not signals.halts(sent.step):
            epoch, stopped = sent.epoch, False
            device.epoch_start(sent.step, carry.leaves[-1])
            start = barrier("on_train_epoch_start", "epoch_start")
            yield new_event((START, epoch, 0, 0, None, start, None, False))
            with contextlib.closing(
                self._plan.calls(epoch, sent.batch, sent.step, waited)
            ) as calls:
                for call in calls:
                    n_steps = call.n_steps
                    # From here this call counts in the step a signal says the fit stops after.
                    signals.sending = sent.step + n_steps
                    if signals.halts(sent.step):
                        break  # the signal came before: the call stays unsent
                    carry.run(call)  # donated, asynchronous
                    paced.sent(carry.done_flag)
                    speculation.record(call)
                    sent.step += n_steps
                    sent.batch += call.n_batches
                    snap = self._snapshot() if schedule.log_due(sent.step, n_steps) else None
                    sync = barrier("on_train_batch_end", "batch", n_steps)
                    mark = speculation.take_mark()
                    yield new_event((CALL, epoch, n_steps, call.n_batches, snap, sync, mark, False))
                    if signals.halts(sent.step):
                        break
                    if self.should_stop or schedule.steps_done(sent.step):
                        stopped = True
                        break
                else:
                    if sent.batch == 0 and signals.received is None:
                        raise EmptyDataError(f"train data yielded no batch in epoch {epoch}.")
                    multihost.check_epoch_batches(self.train_data, epoch, sent.batch)
            signals.epochs = epoch + 1  # a signal from here on stops after this epoch end
            if signals.halts(sent.step, epoch):
                break
            # Validation and the last epoch end wait for every hook before anything else runs.
            sync = schedule.validates or schedule.done(sent, self.should_stop, after_epoch=True)
            sync = sync or barrier("on_train_epoch_end", "epoch_end")
            snap, nb = self._snapshot(), self._n_train_batches
            partial = stopped and (nb is None or sent.batch < nb)
            mark = speculation.take_mark()
            yield new_event((END, epoch, 0, 0, snap, sync, mark, partial))
            sent.epoch, sent.batch = epoch + 1, 0
        if signals.received is not None:
            yield new_event((INTERRUPT, sent.epoch, 0, 0, None, True, None, False))

    def _deliver(self, ev: Event) -> bool:
        """Runs the hooks of one event, the state as the device left it there; says whether
        the fit is to stop."""
        seen, kind = self._seen, ev.kind
        in_step = ev.barrier or not self.lookahead  # the module may be written back
        if ev.snap is not None:  # the read below waits for the device: time when it is done
            self._device_clock.read(seen.step + ev.n_steps, ev.snap)
        calls = self._trail.calls  # where calls ended, under NaNGuard("stop") only
        if kind is CALL:
            seen.step += ev.n_steps
            seen.batch += ev.n_batches
            if calls is not None:
                calls.append((seen.step, seen.batch))
            logs = self._interval_logs(ev.snap) if ev.snap is not None else {}
            self._hook("on_train_batch_end", seen.step, logs, in_step=in_step)
            if self._schedule.validates_after_call(seen, ev.n_steps, self.should_stop):
                self.logged_metrics.update(self._validate(self.val_data))
        elif kind is START:
            if calls is not None:
                calls.clear()
                calls.append((seen.step, seen.batch))
            self._hook("on_train_epoch_start", ev.epoch, in_step=in_step)
        elif kind is END:
            self._end_epoch(ev, in_step)
        else:
            self._interrupt()
        rollback = self._rollback
        if rollback is not None and rollback.request is not None and in_step:
            rollback.perform(self._rewind)  # a guard saw a run of bad steps; none in flight
        return self.should_stop

    def _end_epoch(self, ev: Event, in_step: bool) -> None:
        seen, logs = self._seen, self._epoch_logs(ev.snap)
        # A fit that ended inside the epoch: from here on its checkpoints (those of this
        # epoch end's hooks too) hold the state from before this epoch end, so that a resume
        # finishes the epoch (``resume_point.py``).
        self._resume_point = capture(
            self, self._trail, self._plan.cut_rest, at_end=True, partial=ev.partial
        )
        if self._schedule.validates_at_epoch_end(ev.epoch, seen, self.should_stop):
            logs.update(self._validate(self.val_data))
        self._hook("on_train_epoch_end", ev.epoch, logs, in_step=in_step)
        self.history.append(ev.epoch, logs)
        self._trail.epoch_ended(seen.step, logs)
        seen.epoch, seen.batch = seen.epoch + 1, 0
        # Only now: a checkpoint written by an epoch-end hook keeps the epoch's sums, and a
        # run resumed from it repeats this epoch end with the same logs.
        self._carry.epoch_acc[:] = 0.0

    def _barrier(self, hook: str, event: str, n_steps: int = 0) -> bool:
        """Whether a callback on ``hook`` needs this event in step with the device: callbacks
        that only record never do; others say so in ``needs_sync`` (by default, always)."""
        cbs = self.cb.syncing(hook)
        return bool(cbs) and any(c.needs_sync(self, event, self._sent.step, n_steps) for c in cbs)

    def _drop_dispatched(self, pending) -> None:
        """A recording hook stopped the fit (NaNGuard, learning of a non-finite step a few
        steps late) after later calls went out. Those calls changed nothing: the step froze
        the state at the first non-finite step. Forgetting them ends the fit exactly where it
        ends without lookahead: same counters, loader position, History and hooks."""
        end_due = pending[0].kind is not START  # this epoch's end is among the dropped events
        interrupted = any(e.kind is INTERRUPT for e in pending)
        partial = any(e.kind is CALL or e.partial for e in pending)
        pending.clear()
        seen = self._seen
        self._sent.step, self._sent.epoch = seen.step, seen.epoch
        self._carry.set_step(seen.step)  # the device's step count follows the hooks'
        if end_due:  # frozen: adds nothing; in step, nothing is pending
            self._deliver(new_event((END, seen.epoch, 0, 0, None, True, None, partial)))
        if interrupted:
            self._interrupt()

    # ==================================================================== validation ===
    def _validate(self, data: Any) -> dict[str, float]:
        # Validation is not training time.
        with self._device_clock.excluding(self._sent.step, self._carry.leaves[-1]):
            self._hook("on_validation_start")
            logs = self._validation_run(data)
            self._hook("on_validation_end", logs)
        return logs

    def _validation_run(self, data: Any) -> dict[str, float]:
        """``validation_step`` over ``data`` on the fit's own state (no hooks)."""
        carry = self._carry
        return self._run_validation(carry.programs, carry.validation_leaves(), data)

    # ============================================ parts in modules of their own, bound here ===
    _setup_fit = fit_setup.setup_fit
    _hook = hooks.call_hook
    _snapshot = fit_logs.snapshot
    _interval_logs = fit_logs.interval_logs
    _epoch_logs = fit_logs.epoch_logs

    def _sync_to_module(self, allow_deleted: bool = False) -> None:
        """Points the module's variables at the current device arrays (cheap: no tree walk)."""
        if self._carry is not None and self.module is not None:
            self._carry.to_module(allow_deleted)

    def _stop_if_signalled(self) -> None:
        if self._signals.cuts_validation():
            self._interrupt()

    def _interrupt(self) -> None:
        """Every hook has run for the state on the device: save (``on_interrupt``), then
        raise ``TrainingInterrupted`` naming the step and the checkpoint."""
        self._hook("on_interrupt")
        raise interrupt.interrupted(self, self._signals.received, self._saving_dirs())
