"""DeviceClock and Trainer.device_progress: what the device finished, when, and what was not
training. Unit tests drive the clock by hand with a fake clock and fake call outputs; the fit
tests check what hooks see in a real fit (relations, never timings)."""

import threading

import jax
import jax.numpy as jnp
import pytest
from models import Classifier, toy_data

import nnxfit
from nnxfit.compile_watch import CompileWatch
from nnxfit.data import ArrayLoader
from nnxfit.device_clock import DeviceClock, DeviceProgress, steps_per_second


class Output:
    """A call's output as the clock sees it: ready or not, never blocking."""

    def __init__(self, ready=False):
        self.ready = ready

    def is_ready(self):
        return self.ready

    def is_deleted(self):
        return False


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Loop:
    """Drives a DeviceClock as the Trainer's loop does, with a fake clock and fake outputs."""

    def __init__(self):
        self.clock, self.waited = Clock(), []
        self.dc = DeviceClock(self.wait, self.clock)
        self.dc.start(0)
        self.sent, self.newest = 0, Output(ready=True)  # nothing sent: the device is idle

    def wait(self, arrays):  # the Trainer's wait_ready: here the device finishes on request
        self.waited.append(arrays)
        for a in arrays:
            a.ready = True

    def call(self, epoch, n=1, wait=0.0, ready=False, after=0.0):
        """Waits ``wait`` s for a batch, sends a call of ``n`` steps, then ``after`` s of
        dispatch and hooks pass; the call's output is ``ready`` or not."""
        start = self.clock.t
        self.clock.t += wait
        self.dc.poll(start, wait, epoch, self.sent, self.newest)
        self.sent += n
        self.newest = Output(ready)
        self.clock.t += after
        return self.newest

    def read(self, step):
        self.dc.read(step, [Output()])
        return self.dc.progress(step)


def test_hooks_never_see_the_device_ahead_of_them_nor_unconfirmed_steps():
    loop = Loop()
    clock, dc = loop.clock, loop.dc
    for _ in range(8):  # 8 calls out, none known done
        loop.call(0)
    clock.t = 101.0
    assert dc.progress(1) == DeviceProgress(0, 100.0)  # the hooks see call 1: unconfirmed
    loop.newest.ready = True  # the device caught up; the loop asks before its next call
    clock.t = 102.0
    loop.call(0)  # everything sent (8 steps) known done at t=102
    # Step 2 was done by 102 at the latest: shown as step 2, not 8 (the hooks are at 2).
    assert dc.progress(2).step == 2 and dc.progress(2).time == 102.0
    # A log read at step 9 waits for the call and stamps when that wait ended.
    clock.t = 105.0
    assert loop.read(9) == DeviceProgress(9, 105.0)


def test_epoch_gap_and_validation_are_not_training_time():
    loop = Loop()
    clock, dc = loop.clock, loop.dc
    start = dc.progress(0)
    # First epoch: 4 calls of 1 s (0.5 s data wait, 0.5 s dispatch and hooks); the device
    # keeps up: each poll finds the last call done.
    for _ in range(4):
        loop.call(0, wait=0.5, after=0.5, ready=True)
    # Epoch end: the read at step 4 confirms it at t=104; then validation (10 s, excluded)
    # and epoch-end hooks (5 s, a checkpoint, say) while the device sits idle.
    end = loop.read(4)
    assert end.step == 4 and steps_per_second(start, end) == pytest.approx(1.0)
    with dc.excluding(loop.sent, loop.newest):
        clock.t += 10.0
    clock.t += 5.0
    # Second epoch: its first batch wait starts the training clock again.
    for _ in range(4):
        loop.call(1, wait=0.5, after=0.5, ready=True)
    p = loop.read(8)
    assert p.time == 123.0 and p.excluded == pytest.approx(15.0)
    assert steps_per_second(end, p) == pytest.approx(1.0)  # 4 steps in 4 s of training
    assert p.data_wait == pytest.approx(4.0) and p.data_wait_idle == pytest.approx(4.0)


def test_validation_waits_for_the_train_steps_before_it():
    loop = Loop()
    out = loop.call(0, n=3)  # the device is busy with it
    with loop.dc.excluding(loop.sent, out):
        assert loop.waited == [[out]]  # validation's time starts once the device finished
        loop.clock.t += 2.0
    assert loop.dc.excluded == pytest.approx(2.0)
    assert loop.dc.progress(3).step == 3  # the wait confirmed the 3 steps


def test_a_data_wait_counts_as_idle_only_when_the_device_ran_out_of_work():
    loop = Loop()
    loop.call(0, wait=1.0)  # first call: nothing before it, the device was idle
    out = loop.call(0, wait=1.0)  # the first call still ran at the end of this wait
    out.ready = True
    loop.call(0, wait=1.0)  # the device had finished the second one: it waited
    assert loop.dc.data_wait == pytest.approx(3.0)
    assert loop.dc.data_wait_idle == pytest.approx(2.0)  # the first and the last wait


def test_compiles_on_the_loop_thread_are_excluded_once():
    dc = Loop().dc
    jax.jit(lambda x: x * 3 + 1)(jnp.ones(3))  # a new program: traced and compiled here
    compiled = dc.excluded
    assert compiled > 0
    other = threading.Thread(target=lambda: jax.jit(lambda x: x * 5 - 2)(jnp.ones(3)))
    other.start()
    other.join()
    assert dc.excluded == compiled  # another thread's compile is not this loop's
    with dc.excluding(0, None):  # compiles inside validation count once, as validation time
        jax.jit(lambda x: x * 7 + 4)(jnp.ones(3))
    assert dc.excluded == compiled  # the fake clock stood still


class Seen(nnxfit.Callback):
    records_only = True

    def __init__(self):
        self.seen = []

    def on_train_epoch_start(self, trainer, module, epoch):
        self.seen.append(("start", trainer.global_step, False, trainer.device_progress))

    def on_train_batch_end(self, trainer, module, step, logs):
        self.seen.append(("call", step, bool(logs), trainer.device_progress))

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        self.seen.append(("end", trainer.global_step, True, trainer.device_progress))


@pytest.mark.parametrize("val", [False, True])
def test_fit_publishes_device_progress_in_step_with_the_hooks(val):
    x, y = toy_data(96)
    seen, watch = Seen(), CompileWatch()
    trainer = nnxfit.Trainer(
        max_epochs=3, log_every_n_steps=4, callbacks=[seen, watch], progress_bar=False
    )
    trainer.fit(
        Classifier(), ArrayLoader((x, y), 8), val_data=ArrayLoader((x, y), 32) if val else None
    )
    assert trainer.lookahead > 0
    last = None
    for _kind, step, read, p in seen.seen:
        assert p.step <= step  # never ahead of the event the hooks see
        if read:  # a log step or an epoch end: the Trainer read it, the device is there
            assert p.step == step
        if last is not None:  # everything only grows
            assert p.step >= last.step and p.time >= last.time
            assert p.excluded >= last.excluded and p.data_wait >= last.data_wait
        last = p
    # The train step's compile (trace, lowering, backend) is not training time.
    assert last.excluded >= sum(r.total_s for r in watch.records) > 0
    assert 0 < last.train_time < last.time
