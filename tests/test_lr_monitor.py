"""LearningRateMonitor: the logged lr is the schedule's value for the step that used it,
from every source (injected state, lr_schedule, optax's own optimizers), with
steps_per_execution too; an optimizer whose rate cannot be read gets one warning and a fit
that goes on."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import optax
import pytest
from models import Classifier, toy_data

import nnxfit
from nnxfit.callbacks.lr_monitor import LearningRateMonitor, LearningRateWarning
from nnxfit.data import ArrayLoader

TRAIN = ArrayLoader(toy_data(40), batch_size=4)  # 10 steps an epoch
SCHEDULE = optax.linear_schedule(0.1, 0.0, 20)  # step k (from 0) uses 0.1 * (1 - k / 20)


class WithOptimizer(Classifier):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def configure_optimizers(self):
        return self.make()


class Logs(nnxfit.Callback):
    def __init__(self):
        self.lr = {}

    def on_train_batch_end(self, trainer, module, step, logs):
        if "lr" in logs:
            self.lr[step] = logs["lr"]


def run(make, **kw):
    logs = Logs()
    kw = {"max_epochs": 2, "log_every_n_steps": 1, "progress_bar": False, **kw}
    trainer = nnxfit.Trainer(callbacks=[LearningRateMonitor(), logs], **kw)
    history = trainer.fit(WithOptimizer(make), TRAIN)
    return logs.lr, history


def expected(step):
    # After ``step`` optimizer steps the latest used the schedule at count step - 1; one step
    # off is 0.005 away, far outside the tolerance.
    return float(np.float32(SCHEDULE(step - 1)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=SCHEDULE),
        lambda: {"optimizer": optax.sgd(SCHEDULE), "lr_schedule": SCHEDULE},
        lambda: optax.adamw(SCHEDULE),
    ],
    ids=["inject_hyperparams", "lr_schedule", "optax structure"],
)
def test_logged_lr_is_the_schedule_at_the_step_that_used_it(make):
    lr, history = run(make)
    assert sorted(lr) == list(range(1, 21))
    for step, v in lr.items():
        assert v == pytest.approx(expected(step), abs=1e-7), step
    # Epoch value: the rate of the epoch's last step.
    assert history.history["lr"] == pytest.approx([expected(10), expected(20)], abs=1e-7)


def test_lr_with_steps_per_execution():
    make = lambda: optax.inject_hyperparams(optax.adam)(learning_rate=SCHEDULE)  # noqa: E731
    lr, _ = run(make, steps_per_execution=3, max_epochs=1)
    assert sorted(lr) == [3, 6, 9, 10]  # the last call holds the epoch's short tail
    for step, v in lr.items():
        assert v == pytest.approx(expected(step), abs=1e-7), step


def test_constant_injected_lr_is_logged():
    lr, _ = run(lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=3e-3), max_epochs=1)
    assert len(lr) == 10 and all(v == pytest.approx(3e-3) for v in lr.values())


def test_constant_rate_of_a_plain_optax_optimizer_is_logged():
    lr, history = run(lambda: optax.adam(1e-2), max_epochs=1)
    assert len(lr) == 10 and all(v == pytest.approx(1e-2) for v in lr.values())
    assert history.history["lr"] == [pytest.approx(1e-2)]


def custom_sgd(rate):
    def update(updates, state, params=None):
        return jax.tree.map(lambda g: -rate * g, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def test_unreadable_rate_warns_once_and_the_fit_goes_on():
    logs = Logs()
    trainer = nnxfit.Trainer(
        max_epochs=2,
        log_every_n_steps=1,
        callbacks=[LearningRateMonitor(), logs],
        progress_bar=False,
    )
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        history = trainer.fit(WithOptimizer(lambda: custom_sgd(0.1)), TRAIN)
    mine = [w for w in got if issubclass(w.category, LearningRateWarning)]
    assert len(mine) == 1
    msg = str(mine[0].message)
    assert "cannot read the learning rate of WithOptimizer's optimizer" in msg
    assert "custom_sgd.update" in msg and "optax.inject_hyperparams(optax.adam)" in msg
    assert mine[0].filename == __file__  # the user's fit line, not nnxfit's
    assert trainer.global_step == 20 and history.epoch == [0, 1]
    assert "lr" not in history.history and "loss" in history.history
    assert logs.lr == {}  # nothing logged, and never a made-up 0
