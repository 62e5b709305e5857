"""LambdaCallback: functions as hooks, dispatched only where given, in a real fit."""

import numpy as np
import pytest
from models import Classifier, toy_data

import nnxfit
from nnxfit.callbacks.base import HOOKS, CallbackList, overrides
from nnxfit.callbacks.lambda_callback import LambdaCallback
from nnxfit.data import ArrayLoader

X, Y = toy_data(64)


def test_only_the_given_hooks_are_dispatched():
    a = LambdaCallback(on_fit_start=lambda t, m: None)
    b = LambdaCallback(on_train_epoch_end=lambda t, m, e, logs: None)
    assert [h for h in HOOKS if overrides(a, h)] == ["on_fit_start"]
    assert [h for h in HOOKS if overrides(b, h)] == ["on_train_epoch_end"]  # a did not leak
    assert isinstance(a, LambdaCallback) and isinstance(a, nnxfit.Callback)
    assert type(a).__name__ == a.state_key == "LambdaCallback"
    cbs = CallbackList([a, b])
    assert cbs.for_hook("on_train_batch_end") == []  # a hook nobody gave costs nothing
    assert cbs.for_hook("on_fit_start") == [a] and cbs.for_hook("on_train_epoch_end") == [b]


def test_hooks_run_in_a_real_fit_and_see_and_change_the_module():
    calls = []
    seen = {}

    def epoch_end(trainer, module, epoch, logs):
        calls.append(("epoch_end", epoch, sorted(logs)))
        seen[epoch] = np.array(module.net.l2.bias[...], copy=True)  # the live state, readable

    def fit_end(trainer, module):
        calls.append(("fit_end", trainer.global_step))
        module.net.l2.bias[...] = np.full(3, 7.0, np.float32)  # kept after fit

    cb = LambdaCallback(
        on_fit_start=lambda trainer, module: calls.append(("fit_start",)),
        on_train_epoch_end=epoch_end,
        on_train_batch_end=lambda trainer, module, step, logs: calls.append(("batch", step)),
        on_validation_end=lambda trainer, module, logs: calls.append(("val", sorted(logs))),
        on_fit_end=fit_end,
    )
    module = Classifier()
    bias0 = np.array(module.net.l2.bias[...], copy=True)
    nnxfit.Trainer(max_epochs=2, progress_bar=False, log_every_n_steps=2, callbacks=[cb]).fit(
        module, ArrayLoader((X, Y), 32), val_data=ArrayLoader((X, Y), 64)
    )
    val = ("val", ["val_accuracy", "val_loss"])
    keys = ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert calls == [
        ("fit_start",),
        ("batch", 1),
        ("batch", 2),
        val,
        ("epoch_end", 0, keys),
        ("batch", 3),
        ("batch", 4),
        val,
        ("epoch_end", 1, keys),
        ("fit_end", 4),
    ]
    assert not np.array_equal(seen[0], bias0) and not np.array_equal(seen[0], seen[1])
    np.testing.assert_array_equal(np.asarray(module.net.l2.bias[...]), np.full(3, 7.0))


def test_order_and_reads_module_are_options():
    late = LambdaCallback(on_fit_start=lambda t, m: None, order=100, reads_module=False)
    early = LambdaCallback(on_fit_start=lambda t, m: None, order=-5)
    with pytest.warns(DeprecationWarning, match="reads_module, deprecated"):
        cbs = CallbackList([late, early])
    assert cbs.for_hook("on_fit_start") == [early, late]
    assert cbs.needs_module("on_fit_start") and not CallbackList([late]).needs_module(
        "on_fit_start"
    )
    assert LambdaCallback().order == 0 and LambdaCallback().reads_module is True


def test_bad_arguments_are_type_errors():
    with pytest.raises(TypeError, match=r"on_fit_end=\.\.\.\) must be a function.*got 3"):
        LambdaCallback(on_fit_end=3)
    with pytest.raises(TypeError, match="on_batch_end"):
        LambdaCallback(on_batch_end=print)  # a Keras hook name that nnxfit does not have


def test_an_exception_in_a_lambda_names_the_hook():
    def boom(trainer, module, epoch):
        raise ValueError("from the lambda")

    trainer = nnxfit.Trainer(
        max_epochs=1, progress_bar=False, callbacks=[LambdaCallback(on_train_epoch_start=boom)]
    )
    with pytest.raises(ValueError, match="from the lambda") as e:
        trainer.fit(Classifier(), ArrayLoader((X, Y), 32))
    assert any("LambdaCallback.on_train_epoch_start" in n for n in e.value.__notes__)
