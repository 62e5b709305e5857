"""``Callback.records_only``: the one switch for hooks that only record, and the two switches it
replaced (``reads_module``, ``epoch_end_barrier``), kept as deprecated aliases."""

import warnings

import numpy as np
import pytest
from models import Classifier, toy_data

import nnxfit
from nnxfit.callbacks.base import CallbackList, switches
from nnxfit.callbacks.lambda_callback import LambdaCallback
from nnxfit.data import ArrayLoader

X, Y = toy_data(64)


class Recorder(nnxfit.Callback):
    records_only = True

    def on_train_batch_end(self, trainer, module, step, logs):
        pass


class InStep(nnxfit.Callback):
    def on_train_batch_end(self, trainer, module, step, logs):
        pass


def test_records_only_is_neither_synced_nor_written_back():
    rec, plain = Recorder(), InStep()
    cbs = CallbackList([rec, plain])
    assert cbs.syncing("on_train_batch_end") == [plain]
    assert not CallbackList([rec]).needs_module("on_train_batch_end")
    assert CallbackList([plain]).needs_module("on_train_batch_end")
    # Read through the old names, the new switch answers for them.
    assert not rec.reads_module and not rec.epoch_end_barrier
    assert plain.reads_module and plain.epoch_end_barrier


def test_the_old_switches_still_work_and_warn():
    class OldRecorder(nnxfit.Callback):
        reads_module = False
        epoch_end_barrier = False

        def on_train_batch_end(self, trainer, module, step, logs):
            pass

    class OldInStep(nnxfit.Callback):
        reads_module = False  # in step, but the module is not written back for it

        def on_train_batch_end(self, trainer, module, step, logs):
            pass

    with pytest.warns(DeprecationWarning, match="OldRecorder sets reads_module and epoch_end"):
        assert switches(OldRecorder()) == (True, False)
    with pytest.warns(DeprecationWarning, match="set records_only = True"):
        assert switches(OldInStep()) == (False, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per class
        cbs = CallbackList([OldRecorder(), OldInStep()])
    assert [type(c).__name__ for c in cbs.syncing("on_train_batch_end")] == ["OldInStep"]
    assert not cbs.needs_module("on_train_batch_end")
    # Set on an instance, as a callback's __init__ may.
    cb = InStep()
    cb.reads_module = False
    with pytest.warns(DeprecationWarning, match="InStep sets reads_module"):
        assert switches(cb) == (False, False) and not cb.reads_module
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new switch warns of nothing
        assert switches(Recorder()) == (True, False) and switches(InStep()) == (False, True)


def test_lambda_callback_takes_records_only():
    late = LambdaCallback(on_train_batch_end=lambda t, m, s, logs: None, records_only=True)
    assert late.records_only and CallbackList([late]).syncing("on_train_batch_end") == []


def _fit(cb, steps=12):
    trainer = nnxfit.Trainer(
        max_steps=steps, progress_bar=False, log_every_n_steps=4, callbacks=[cb]
    )
    trainer.fit(Classifier(), ArrayLoader((X, Y), 8))
    return trainer


def test_the_device_runs_ahead_of_records_only_hooks_and_waits_for_others():
    ahead = []

    class Watch(nnxfit.Callback):
        def on_train_batch_end(self, trainer, module, step, logs):
            ahead.append(trainer.dispatch_step - step)

    class WatchRecords(Watch):
        records_only = True

    _fit(Watch())
    assert set(ahead) == {0}
    ahead.clear()
    _fit(WatchRecords())
    assert max(ahead) > 0


def test_the_module_is_written_back_at_the_events_in_step_only():
    """A callback that narrows ``needs_sync`` sees the module in step at its synced events;
    between them the Trainer does not write back a state the hooks have not reached."""
    seen = {}

    class EveryFour(nnxfit.Callback):
        def needs_sync(self, trainer, event, step, n_steps):
            return event == "batch" and step % 4 == 0

        def on_train_batch_end(self, trainer, module, step, logs):
            leaves = trainer.carry.module_leaves()
            bias = module.net.l2.bias.get_raw_value()
            live = any(bias is x for x in leaves)  # else an older array, maybe donated
            seen[step] = (live, np.array(bias, copy=True) if live else None)

    trainer = _fit(EveryFour())
    assert trainer.lookahead > 0
    for step, (live, _) in seen.items():
        assert live == (step % 4 == 0), step
    # In step, the module holds the state the hook's step left.
    np.testing.assert_array_equal(seen[12][1], np.asarray(trainer.module.net.l2.bias[...]))
