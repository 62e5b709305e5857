"""ReduceLROnPlateau: Keras's plateau/cooldown/min_lr rules, the new rate reaching the
jitted step with no recompilation, clear errors, and resume."""

from __future__ import annotations

import io

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from models import Classifier, toy_data
from rich.console import Console

import nnxfit
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.callbacks.reduce_lr import ReduceLROnPlateau
from nnxfit.data import ArrayLoader

TRAIN = ArrayLoader(toy_data(16), batch_size=8)  # 2 steps an epoch


class WithOptimizer(Classifier):
    def __init__(self, make=None):
        super().__init__()
        self.make = make or (lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))

    def configure_optimizers(self):
        return self.make()


class Scripted(nnxfit.Callback):
    order = -50

    def __init__(self, values):
        self.values = values

    def logged_metrics(self, trainer):
        return ["score"]

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        logs["score"] = self.values[epoch]


class Params(nnxfit.Callback):
    """Host copies of the parameters at each epoch start and end."""

    def __init__(self):
        self.start, self.end = {}, {}

    def on_train_epoch_start(self, trainer, module, epoch):
        self.start[epoch] = jax.tree.leaves(jax.device_get(nnx.state(module, nnx.Param)))

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        self.end[epoch] = jax.tree.leaves(jax.device_get(nnx.state(module, nnx.Param)))


def fit(callbacks, values, module=None, **kw):
    kw = {"max_epochs": len(values), "progress_bar": False, **kw}
    trainer = nnxfit.Trainer(callbacks=[Scripted(values), *callbacks], **kw)
    history = trainer.fit(module or WithOptimizer(), TRAIN)
    return trainer, history


def test_plateau_lowers_the_rate_the_step_uses_without_recompiling():
    values = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.8]
    cb = ReduceLROnPlateau(monitor="score", factor=0.5, patience=2, verbose=False)
    compiles = []

    class Compiles(nnxfit.Callback):
        def on_train_epoch_end(self, trainer, module, epoch, logs):
            # Real compiles of the train programs, traced or not (CompileWatch, by default).
            watch = next(c for c in trainer.cb if isinstance(c, nnxfit.CompileWatch))
            compiles.append(len(watch.records))

    trainer, history = fit([cb, Compiles()], values)
    # Keras's rule: epochs 2 and 3 don't improve -> reduce after 3; again after 5.
    assert cb.reductions == [(3, pytest.approx(0.05)), (5, pytest.approx(0.025))]
    assert history.history["lr"] == pytest.approx([0.1] * 4 + [0.05] * 2 + [0.025])
    assert compiles == [1] * len(values)  # one compile, never again
    opt = trainer.train_state()["opt"]
    lr = opt.hyperparams["learning_rate"]
    assert lr.dtype == np.float32 and not lr.weak_type and not lr.committed


def test_the_new_rate_is_what_sgd_applies():
    """Plain SGD: an epoch's parameter change scales with the rate; after a reduction by 0.5
    the same gradients give half the step. Checked against a run at the reduced rate."""
    values = [1.0, 1.0, 1.0]
    rec = Params()
    cb = ReduceLROnPlateau(monitor="score", factor=0.5, patience=1, verbose=False)
    fit([cb, rec], values)
    assert cb.reductions[0] == (1, pytest.approx(0.05))  # used by epoch 2

    # Reference: from the state at the start of epoch 2, one epoch of SGD at 0.05.
    ref = Params()
    module = WithOptimizer(lambda: optax.sgd(0.05))
    nnx.update(
        module,
        jax.tree.unflatten(jax.tree.structure(nnx.state(module, nnx.Param)), rec.start[2]),
    )
    nnxfit.Trainer(max_epochs=1, callbacks=[ref], progress_bar=False).fit(module, TRAIN)
    for got, want in zip(rec.end[2], ref.end[0], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_cooldown_and_min_lr():
    flat = [1.0] * 7
    cb = ReduceLROnPlateau(monitor="score", factor=0.5, patience=1, cooldown=2, verbose=False)
    fit([cb], flat)
    assert [e for e, _ in cb.reductions] == [1, 3, 5]  # Keras: two cooldown epochs between

    floor = ReduceLROnPlateau(monitor="score", factor=0.1, patience=1, min_lr=0.005, verbose=False)
    _, history = fit([floor], flat[:5])
    assert [lr for _, lr in floor.reductions] == pytest.approx([0.01, 0.005])  # then no more
    assert history.history["lr"] == pytest.approx([0.1, 0.1, 0.01, 0.005, 0.005])


def test_max_mode_and_min_delta():
    cb = ReduceLROnPlateau(
        monitor="score", mode="max", factor=0.5, patience=1, min_delta=0.05, verbose=False
    )
    fit([cb], [0.5, 0.6, 0.62, 0.7, 0.69])  # 0.62 is within min_delta of 0.6: no improvement
    assert [e for e, _ in cb.reductions] == [2, 4]


def test_prints_each_reduction():
    out = io.StringIO()
    cb = ReduceLROnPlateau(monitor="score", factor=0.5, patience=1)
    console = Console(file=out, force_terminal=True, width=100)
    fit([cb], [1.0, 1.0, 0.5], console=console, progress_bar=False)
    assert (
        "ReduceLROnPlateau: score has not improved for 1 epoch (best 1); learning rate 0.1 -> "
        "0.05 from epoch 3." in out.getvalue()
    )


def test_optimizer_without_an_injectable_rate_fails_before_training():
    trainer = nnxfit.Trainer(
        max_epochs=2, callbacks=[ReduceLROnPlateau(monitor="loss")], progress_bar=False
    )
    with pytest.raises(nnxfit.ConfigError) as err:
        trainer.fit(WithOptimizer(lambda: optax.adam(1e-3)), TRAIN)
    assert "optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)" in str(err.value)
    assert trainer.global_step == 0


def test_scheduled_injected_rate_is_refused():
    sched = optax.exponential_decay(0.1, 10, 0.5)
    trainer = nnxfit.Trainer(
        max_epochs=2, callbacks=[ReduceLROnPlateau(monitor="loss")], progress_bar=False
    )
    with pytest.raises(nnxfit.ConfigError, match="is a schedule inside optax.inject_hyperparams"):
        trainer.fit(WithOptimizer(lambda: optax.inject_hyperparams(optax.adam)(sched)), TRAIN)


def test_val_monitor_without_val_data_fails_before_training():
    trainer = nnxfit.Trainer(max_epochs=2, callbacks=[ReduceLROnPlateau()], progress_bar=False)
    with pytest.raises(nnxfit.ConfigError, match="val_loss.*no val_data"):
        trainer.fit(WithOptimizer(), TRAIN)
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"factor": 1.0}, r"factor must be in \(0, 1\)"),
        ({"factor": 0.0}, r"factor must be in \(0, 1\)"),
        ({"patience": -1}, "patience must be an integer >= 0"),
        ({"cooldown": -1}, "cooldown must be an integer >= 0"),
        ({"min_lr": -1e-3}, "min_lr must be >= 0"),
        ({"mode": "down"}, "mode must be one of"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(nnxfit.ConfigError, match=match):
        ReduceLROnPlateau(**kwargs)


def test_resume_continues_at_the_reduced_rate_with_the_same_counters(tmp_path):
    values = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.8]
    ref = ReduceLROnPlateau(monitor="score", factor=0.5, patience=2, verbose=False)
    _, ref_history = fit([ref], values)

    def run(max_epochs, resume):
        cb = ReduceLROnPlateau(monitor="score", factor=0.5, patience=2, verbose=False)
        trainer = nnxfit.Trainer(
            max_epochs=max_epochs,
            workdir=tmp_path,
            progress_bar=False,
            callbacks=[Scripted(values), cb, ModelCheckpoint()],
        )
        return cb, trainer.fit(WithOptimizer(), TRAIN, resume=resume)

    first, _ = run(5, False)  # reduced after epoch 3; wait 1 after epoch 4
    assert first.wait == 1
    resumed, history = run(7, True)
    assert (
        resumed.reductions
        == ref.reductions
        == [(3, pytest.approx(0.05)), (5, pytest.approx(0.025))]
    )
    assert history.history["lr"] == pytest.approx(ref_history.history["lr"])
