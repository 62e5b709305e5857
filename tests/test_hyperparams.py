"""nnxfit.hyperparams: the learning-rate reader on each optax optimizer it claims to read (for
the optax version installed), values written with the old array's type and placement, and
Trainer.get_hyperparameter / set_hyperparameter in a real fit, which never recompile."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import monitoring
from models import Classifier, toy_data

import nnxfit
from nnxfit.callbacks.lr_monitor import LearningRateMonitor
from nnxfit.callbacks.reduce_lr import ReduceLROnPlateau
from nnxfit.compile_watch import COMPILE_EVENT, RecompileWarning
from nnxfit.data import ArrayLoader
from nnxfit.hyperparams import learning_rate_of, learning_rate_source, set_in_state, write_like

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
SCHEDULE = optax.linear_schedule(0.1, 0.0, 20)
LR = 0.0123


def after(tx, n):
    """The state of ``tx`` after ``n`` updates."""
    state = tx.init(PARAMS)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    for _ in range(n):
        _, state = tx.update(grads, state, PARAMS)
    return state


def read(tx, state):
    lr = learning_rate_of(tx, state)
    return None if lr is None else float(lr)


# -- the reader ---------------------------------------------------------------------------
CONSTANT = {
    "adam": lambda: optax.adam(LR),
    "adamw": lambda: optax.adamw(LR, weight_decay=1e-2),
    "sgd": lambda: optax.sgd(LR),
    "sgd momentum nesterov": lambda: optax.sgd(LR, momentum=0.9, nesterov=True),
    "rmsprop": lambda: optax.rmsprop(LR),
    "adagrad": lambda: optax.adagrad(LR),
    "lamb": lambda: optax.lamb(LR),
    "lion": lambda: optax.lion(LR),
    "nadam": lambda: optax.nadam(LR),
    "radam": lambda: optax.radam(LR),
    "adamax": lambda: optax.adamax(LR),
    "adabelief": lambda: optax.adabelief(LR),
    "optimistic_adam_v2": lambda: optax.optimistic_adam_v2(LR),
    "adafactor (rate mid-chain, then scale(-1))": lambda: optax.adafactor(LR),
    "chain(clip, adam)": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR)),
    "apply_if_finite(adam)": lambda: optax.apply_if_finite(optax.adam(LR), 3),
    "MultiSteps(adam)": lambda: optax.MultiSteps(optax.adam(LR), 2).gradient_transformation(),
    "chain(scale_by_adam, scale(-lr))": lambda: optax.chain(
        optax.scale_by_adam(), optax.scale(-LR)
    ),
}


@pytest.mark.parametrize("make", CONSTANT.values(), ids=CONSTANT.keys())
def test_constant_rate_of_optax_optimizers(make):
    tx = make()
    for n in (0, 2):
        assert read(tx, after(tx, n)) == pytest.approx(LR, rel=1e-6)
    assert learning_rate_source(tx, tx.init(PARAMS)) == "optimizer structure"


SCHEDULED = {
    "adam": lambda: optax.adam(SCHEDULE),
    "adamw": lambda: optax.adamw(SCHEDULE),
    "sgd": lambda: optax.sgd(SCHEDULE, momentum=0.9),
    "chain(clip, adamw)": lambda: optax.chain(optax.clip(1.0), optax.adamw(SCHEDULE)),
}


@pytest.mark.parametrize("make", SCHEDULED.values(), ids=SCHEDULED.keys())
def test_scheduled_rate_is_the_one_the_latest_update_used(make):
    tx = make()
    assert read(tx, after(tx, 0)) == pytest.approx(float(SCHEDULE(0)))  # before any: the first
    for n in (1, 2, 5):
        assert read(tx, after(tx, n)) == pytest.approx(float(SCHEDULE(n - 1)), rel=1e-6), n


def test_the_reader_runs_inside_jit():
    tx = optax.adamw(SCHEDULE)
    state = after(tx, 3)
    got = jax.jit(lambda s: learning_rate_of(tx, s))(state)
    assert got.dtype == jnp.float32 and float(got) == pytest.approx(float(SCHEDULE(2)))


def test_injected_state_and_lr_schedule_come_first():
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=SCHEDULE)
    state = after(tx, 3)
    assert learning_rate_source(tx, state) == "optimizer state"
    assert read(tx, state) == pytest.approx(float(SCHEDULE(2)))
    tx = optax.adam(1e-3)
    lr = learning_rate_of(tx, tx.init(PARAMS), lr_schedule=SCHEDULE, step=4)
    assert float(lr) == pytest.approx(float(SCHEDULE(4)))


def custom_sgd(lr):
    """A hand-written transformation: its rate is hidden in its own closure."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda g: -lr * g, updates), state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


UNREADABLE = {
    "custom GradientTransformation": lambda: custom_sgd(LR),
    "rprop (rate inside, then scale(-1))": lambda: optax.rprop(LR),
    "contrib.prodigy": lambda: optax.contrib.prodigy(LR),
    "partition": lambda: optax.partition(
        {"a": optax.adam(LR), "b": optax.sgd(LR)}, {"w": "a", "b": "b"}
    ),
}


@pytest.mark.parametrize("make", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_rates_it_cannot_see_read_as_none_never_as_a_guess(make):
    tx = make()
    assert read(tx, after(tx, 1)) is None
    assert learning_rate_source(tx, tx.init(PARAMS)) is None


# -- writing a value as the step reads it ------------------------------------------------
def signature(x):
    return jax.typeof(x), x.committed, x.sharding


@pytest.mark.parametrize(
    "old",
    [
        jnp.asarray(0.1, jnp.float32),  # what inject_hyperparams holds
        jnp.asarray(0.1),  # weakly typed (~float32)
        jnp.asarray(0.1, jnp.bfloat16),
        jax.device_put(jnp.asarray(0.1, jnp.float32), jax.devices()[0]),  # committed
    ],
    ids=["f32", "weak f32", "bf16", "committed"],
)
def test_write_like_keeps_type_and_placement(old):
    for value in (0.05, np.float64(0.05), jnp.asarray(0.05), 1):
        new = write_like(old, value)
        assert signature(new) == signature(old)
        assert float(new) == pytest.approx(float(np.asarray(value, old.dtype)), rel=1e-2)


def test_set_in_state_errors_name_the_fix():
    state = optax.adam(1e-3).init(PARAMS)
    with pytest.raises(nnxfit.ConfigError) as err:
        set_in_state(state, "learning_rate", 0.1, "Net")
    assert "optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)" in str(err.value)
    assert "Net's optimizer keeps no hyperparameters" in str(err.value)

    state = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3).init(PARAMS)
    with pytest.raises(nnxfit.ConfigError, match=r"holds the hyperparameters \['b1', 'b2'"):
        set_in_state(state, "momentum", 0.1, "Net")
    with pytest.raises(nnxfit.ConfigError, match="must be set to a number; got 'fast'"):
        set_in_state(state, "learning_rate", "fast", "Net")
    new = set_in_state(state, "lr", 0.5, "Net")  # "lr" and "learning_rate" are one name
    assert float(new.hyperparams["learning_rate"]) == 0.5

    state = optax.inject_hyperparams(optax.adam)(learning_rate=SCHEDULE).init(PARAMS)
    with pytest.raises(nnxfit.ConfigError, match="is a schedule inside optax.inject_hyperparams"):
        set_in_state(state, "learning_rate", 0.1, "Net")


# -- in a fit -----------------------------------------------------------------------------
TRAIN = ArrayLoader(toy_data(32), batch_size=8)  # 4 steps an epoch
VAL = ArrayLoader(toy_data(24, seed=1), batch_size=16)  # batches of 16 and 8


class WithOptimizer(Classifier):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def configure_optimizers(self):
        return self.make()


class Compiles(nnxfit.Callback):
    """Counts real compiles (jax's backend-compile events, not traces) of the fit's train and
    validation programs, per epoch end."""

    def __init__(self):
        self.names: list[str] = []
        self.per_epoch: list[tuple[int, int]] = []

    def _listen(self, event, duration, **kw):
        if event == COMPILE_EVENT:
            self.names.append(kw.get("fun_name", ""))

    def on_fit_start(self, trainer, module):
        monitoring.register_event_duration_secs_listener(self._listen)

    def on_fit_end(self, trainer, module):
        monitoring.unregister_event_duration_listener(self._listen)

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        train = sum(n in ("jit(_single)", "jit(_multi)") for n in self.names)
        self.per_epoch.append((train, self.names.count("jit(_eval)")))


def fit(make, callbacks, epochs=3, **kw):
    compiles = Compiles()
    trainer = nnxfit.Trainer(
        max_epochs=epochs, progress_bar=False, callbacks=[*callbacks, compiles], **kw
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompileWarning)
        history = trainer.fit(WithOptimizer(make), TRAIN, val_data=VAL)
    return trainer, history, compiles


INJECTED = lambda: optax.inject_hyperparams(optax.adam)(learning_rate=0.1)  # noqa: E731


def test_reduce_lr_every_epoch_never_compiles_again():
    cb = ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0, min_delta=1e9)
    cb.verbose = False
    _, history, compiles = fit(INJECTED, [cb])
    assert [e for e, _ in cb.reductions] == [1, 2]  # epoch 0 improves on nothing
    assert history.history["lr"] == pytest.approx([0.1, 0.1, 0.05])
    # Train: one program per batch shape; validation: batches of 16 and 8. Then never again.
    assert compiles.per_epoch == [(1, 2)] * 3


class SetEveryEpoch(nnxfit.Callback):
    """A user's schedule written from a hook: learning rate and Adam's b1."""

    def __init__(self):
        self.read: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer, module, epoch):
        trainer.set_hyperparameter("learning_rate", 0.1 / (epoch + 1))
        trainer.set_hyperparameter("b1", 0.9 - 0.1 * epoch)
        self.read.append((trainer.get_hyperparameter("lr"), trainer.get_hyperparameter("b1")))


def test_set_hyperparameter_from_a_callback_never_compiles_again():
    cb = SetEveryEpoch()
    trainer, history, compiles = fit(INJECTED, [cb, LearningRateMonitor()])
    assert compiles.per_epoch == [(1, 2)] * 3
    want = [(0.1 / (e + 1), 0.9 - 0.1 * e) for e in range(3)]
    assert np.allclose(cb.read, want, rtol=1e-6)
    # The step used them: the logged rate is the one set for each epoch.
    assert history.history["lr"] == pytest.approx([0.1 / (e + 1) for e in range(3)])
    opt = trainer.train_state()["opt"]
    assert opt.hyperparams["b1"].dtype == jnp.float32 and not opt.hyperparams["b1"].committed
    assert trainer.get_hyperparameter("b1") == pytest.approx(0.7)  # after fit, too


class Probe(nnxfit.Callback):
    def __init__(self, action):
        self.action, self.got = action, []

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        self.got.append(self.action(trainer))


def test_get_reads_optax_optimizers_and_set_names_the_fix():
    def check(trainer):
        with pytest.raises(nnxfit.ConfigError) as err:
            trainer.set_hyperparameter("learning_rate", 0.1)
        with pytest.raises(nnxfit.ConfigError, match="this fit has one optimizer"):
            trainer.get_hyperparameter("learning_rate", optimizer="generator")
        return trainer.get_hyperparameter("learning_rate"), str(err.value)

    probe = Probe(check)
    fit(lambda: optax.adam(1e-2), [probe], epochs=1)
    lr, msg = probe.got[0]
    assert lr == pytest.approx(1e-2)
    assert "WithOptimizer's optimizer keeps no hyperparameters" in msg
    assert "optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)" in msg


def test_set_outside_a_fit_is_an_error():
    trainer = nnxfit.Trainer(max_epochs=1, progress_bar=False)
    with pytest.raises(nnxfit.ConfigError, match="no optimizer yet"):
        trainer.get_hyperparameter("learning_rate")
    trainer.fit(WithOptimizer(INJECTED), TRAIN)
    with pytest.raises(nnxfit.ConfigError, match="call it from a callback's hook"):
        trainer.set_hyperparameter("learning_rate", 0.1)


MESH_SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "hyperparams_mesh.py")


def test_set_hyperparameter_on_a_mesh_never_compiles_again():
    """On a 4-device CPU mesh the state is committed and sharded: the value written keeps
    that (a subprocess: the device count is fixed when jax starts)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, MESH_SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "OK" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
