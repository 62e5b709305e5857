"""EarlyStopping: Keras's own expectations (patience table, baseline never beaten, restore
best, auto mode), Lightning's thresholds, errors before training, and resume."""

from __future__ import annotations

import io
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx
from models import Classifier, toy_data
from rich.console import Console

import nnxfit
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.callbacks.early_stopping import EarlyStopping
from nnxfit.callbacks.monitor import Monitor
from nnxfit.data import ArrayLoader

X, Y = toy_data(16)
TRAIN = ArrayLoader((X, Y), batch_size=8)  # 2 steps an epoch
VAL = ArrayLoader(toy_data(12, seed=1), batch_size=12)


class Scripted(nnxfit.Callback):
    """Puts ``values[epoch]`` into the epoch logs as ``name``, before EarlyStopping sees them;
    optionally asks the fit to stop at ``stop_at`` (another callback requesting a stop)."""

    order = -50

    def __init__(self, values, name="score", stop_at=None):
        self.values, self.name, self.stop_at = values, name, stop_at

    def logged_metrics(self, trainer):
        return [self.name]

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        logs[self.name] = self.values[epoch]
        if epoch == self.stop_at:
            trainer.should_stop = True


class Weights(nnxfit.Callback):
    """Host copies of the module's parameters at each epoch end."""

    order = 10

    def __init__(self):
        self.by_epoch = {}

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        self.by_epoch[epoch] = params(module)


def params(module):
    return [np.array(x, copy=True) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def fit(callbacks, max_epochs=20, val=None, module=None, **kw):
    module = module or Classifier()
    trainer = nnxfit.Trainer(max_epochs=max_epochs, callbacks=callbacks, progress_bar=False, **kw)
    history = trainer.fit(module, TRAIN, val_data=val)
    return trainer, module, history


def keras_stop_epoch(values, patience, min_delta=0.0, mode="min", baseline=None):
    """Keras 3's EarlyStopping rule, written out plainly as the reference."""
    sign = 1 if mode == "min" else -1
    best, wait = sign * math.inf, 0
    for epoch, v in enumerate(values):
        wait += 1
        if sign * (v - best) < -min_delta:
            best = v
            if baseline is None or sign * (v - baseline) < -min_delta:
                wait = 0
            continue
        if wait >= patience and epoch > 0:
            return epoch
    return None


# ---------------------------------------------------------------------------- Keras ---
@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_patience_table(patience):
    # keras/src/callbacks/early_stopping_test.py::test_early_stopping_patience
    losses = [10.0, 9.0, 8.0, 9.0, 8.9, 8.8, 8.7, 8.6, 8.5]
    stopper = EarlyStopping(monitor="score", patience=patience, verbose=False)
    _, _, history = fit([Scripted(losses), stopper], max_epochs=len(losses))
    assert stopper.stopped_epoch == max(patience, 1) + 2
    assert history.epoch == list(range(stopper.stopped_epoch + 1))
    assert stopper.best == 8.0 and stopper.best_epoch == 2
    assert "did not improve" in stopper.stop_reason


@pytest.mark.parametrize(
    "mode, monitor, expected",
    [  # test_early_stopping's table
        ("max", "val_mse", "max"),
        ("min", "val_loss", "min"),
        ("auto", "val_mse", "min"),
        ("auto", "loss", "min"),
        ("auto", "acc", "max"),
        ("auto", "val_accuracy", "max"),
        ("auto", "hinge", "min"),
        ("auto", "f1_score", "max"),
    ],
)
def test_mode_table(mode, monitor, expected):
    assert EarlyStopping(monitor=monitor, mode=mode).direction == expected


def test_auto_mode_refuses_a_name_it_cannot_read():
    with pytest.raises(nnxfit.ConfigError, match="mode='min' or mode='max'"):
        EarlyStopping(monitor="widgets", mode="auto")


def test_auto_max_stops_on_real_validation_accuracy():
    """A real fit watching val_accuracy (auto: max): it stops exactly where Keras's rule,
    applied to the recorded history, says."""
    stopper = EarlyStopping(monitor="val_accuracy", mode="auto", patience=1, verbose=False)
    _, _, history = fit([stopper], max_epochs=25, val=VAL, module=Classifier(lr=0.05))
    acc = history.history["val_accuracy"]
    expected = keras_stop_epoch(acc, patience=1, mode="max")
    assert expected is not None and expected < 24  # the toy problem plateaus
    assert stopper.stopped_epoch == expected
    assert history.epoch[-1] == expected
    assert stopper.best == max(acc)


def test_restore_best_weights_after_early_stop():
    # test_early_stopping_final_weights_when_restoring_model_weights, case 1
    losses = [0.2, 0.15, 0.1, 0.11, 0.12]
    rec = Weights()
    stopper = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    _, module, history = fit([Scripted(losses, "val_loss"), stopper, rec], val=VAL)
    assert len(history.epoch) == 5
    assert same(params(module), rec.by_epoch[2])
    assert not same(params(module), rec.by_epoch[4])


def test_baseline_never_beaten_trains_patience_epochs_and_restores_best():
    # case 2: no epoch improves on the baseline
    losses = [0.9, 0.8, 0.7, 0.71, 0.72, 0.73]
    rec = Weights()
    stopper = EarlyStopping(
        monitor="val_loss", patience=5, baseline=0.5, restore_best_weights=True, verbose=False
    )
    _, module, history = fit([Scripted(losses, "val_loss"), stopper, rec], val=VAL)
    assert len(history.epoch) == 5
    assert same(params(module), rec.by_epoch[2])
    assert "baseline=0.5" in stopper.stop_reason


def test_restore_when_another_callback_stops_the_fit():
    # case 3: another callback requests the stop at epoch 3
    losses = [0.9, 0.8, 0.7, 0.71, 0.72, 0.73]
    rec = Weights()
    stopper = EarlyStopping(
        monitor="val_loss", patience=5, baseline=0.5, restore_best_weights=True, verbose=False
    )
    _, module, history = fit([Scripted(losses, "val_loss", stop_at=3), stopper, rec], val=VAL)
    assert len(history.epoch) == 4
    assert stopper.stopped_epoch is None
    assert same(params(module), rec.by_epoch[2])


def test_restore_at_end_of_fit_without_early_stop():
    """Keras 3: the best weights come back at the end of fit even when it ran to max_epochs;
    without restore_best_weights the final weights stay."""
    losses = [0.5, 0.4, 0.45, 0.47]
    rec, kept = Weights(), Weights()
    stopper = EarlyStopping(monitor="score", patience=10, restore_best_weights=True)
    _, module, _ = fit([Scripted(losses), stopper, rec], max_epochs=4)
    assert stopper.stopped_epoch is None
    assert same(params(module), rec.by_epoch[1])
    # After fit the module is usable (not deleted arrays), and predict sees the restored state.
    assert np.isfinite(nnxfit.Trainer(max_epochs=1).predict(module, [(X, Y)])).all()

    plain = EarlyStopping(monitor="score", patience=10)
    _, module, _ = fit([Scripted(losses), plain, kept], max_epochs=4)
    assert same(params(module), kept.by_epoch[3])


def test_start_from_epoch_is_a_warm_up():
    rising = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    stopper = EarlyStopping(monitor="score", patience=0, verbose=False)
    _, _, history = fit([Scripted(rising), stopper], max_epochs=7)
    assert stopper.stopped_epoch == 1
    warm = EarlyStopping(monitor="score", patience=0, start_from_epoch=2, verbose=False)
    _, _, history = fit([Scripted(rising), warm], max_epochs=7)
    assert warm.stopped_epoch == 3 and warm.best_epoch == 2
    assert len(history.epoch) == 4


# ------------------------------------------------------------------------ Lightning ---
def test_stopping_threshold_stops_at_once():
    stopper = EarlyStopping(monitor="score", patience=10, stopping_threshold=0.1, verbose=False)
    fit([Scripted([1.0, 0.5, 0.05, 0.01]), stopper], max_epochs=4)
    assert stopper.stopped_epoch == 2
    assert "stopping_threshold=0.1" in stopper.stop_reason
    assert stopper.best == 0.05  # the stopping epoch is also the best one


def test_divergence_threshold_stops_at_once():
    stopper = EarlyStopping(monitor="score", patience=10, divergence_threshold=10.0)
    fit([Scripted([1.0, 2.0, 20.0, 0.5]), stopper], max_epochs=4)
    assert stopper.stopped_epoch == 2
    assert "divergence_threshold=10" in stopper.stop_reason


def test_max_mode_thresholds():
    stopper = EarlyStopping(
        monitor="score",
        mode="max",
        patience=10,
        stopping_threshold=0.9,
        divergence_threshold=0.1,
        verbose=False,
    )
    fit([Scripted([0.5, 0.6, 0.95, 0.97]), stopper], max_epochs=4)
    assert stopper.stopped_epoch == 2
    low = EarlyStopping(
        monitor="score", mode="max", patience=10, divergence_threshold=0.1, verbose=False
    )
    fit([Scripted([0.5, 0.05, 0.6]), low], max_epochs=3)
    assert low.stopped_epoch == 1


def test_non_finite_metric_stops_unless_check_finite_is_off():
    values = [1.0, math.nan, 0.5, 0.4, 0.3]
    stopper = EarlyStopping(monitor="score", patience=3, verbose=False)
    fit([Scripted(values), stopper], max_epochs=5)
    assert stopper.stopped_epoch == 1 and "not finite" in stopper.stop_reason
    keras_like = EarlyStopping(monitor="score", patience=3, check_finite=False, verbose=False)
    _, _, history = fit([Scripted(values), keras_like], max_epochs=5)
    assert keras_like.stopped_epoch is None and len(history.epoch) == 5
    assert keras_like.best == 0.3


# --------------------------------------------------------------------------- errors ---
def test_unknown_monitor_lists_the_logged_metrics():
    stopper = EarlyStopping(monitor="val_acuracy")
    trainer = nnxfit.Trainer(max_epochs=5, callbacks=[stopper], progress_bar=False)
    with pytest.raises(ValueError) as err:
        trainer.fit(Classifier(), TRAIN, val_data=VAL)
    assert isinstance(err.value, nnxfit.ConfigError)
    msg = str(err.value)
    assert "val_acuracy" in msg and "'val_accuracy'" in msg and "'loss'" in msg
    assert trainer.global_step == 0  # found at fit start, before training


def test_val_monitor_without_val_data_fails_before_training():
    trainer = nnxfit.Trainer(max_epochs=5, callbacks=[EarlyStopping()], progress_bar=False)
    with pytest.raises(nnxfit.ConfigError, match="val_loss.*no val_data") as err:
        trainer.fit(Classifier(), TRAIN)
    assert "'accuracy'" in str(err.value)
    assert trainer.global_step == 0


def test_train_metric_typo_suggests_the_val_name():
    trainer = nnxfit.Trainer(
        max_epochs=2, callbacks=[EarlyStopping(monitor="acuracy")], progress_bar=False
    )
    with pytest.raises(nnxfit.ConfigError, match="names no logged metric"):
        trainer.fit(Classifier(), TRAIN, val_data=VAL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"patience": -1}, "patience must be an integer >= 0"),
        ({"patience": 1.5}, "patience must be an integer >= 0"),
        ({"start_from_epoch": -2}, "start_from_epoch"),
        ({"min_delta": -0.1}, "min_delta must be >= 0"),
        ({"mode": "minimum"}, "mode must be one of"),
        ({"monitor": ""}, "monitor must be a metric name"),
        ({"baseline": "low"}, "baseline must be a number"),
        ({"stopping_threshold": 5.0, "divergence_threshold": 1.0}, "must be better than"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(nnxfit.ConfigError, match=match):
        EarlyStopping(**kwargs)


# ------------------------------------------------------------------- what people see ---
def test_prints_why_it_stopped_and_what_it_restored():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=60)  # line-based progress
    stopper = EarlyStopping(monitor="score", patience=1, restore_best_weights=True)
    trainer = nnxfit.Trainer(
        max_epochs=4, callbacks=[Scripted([0.3, 0.2, 0.25, 0.26]), stopper], console=console
    )
    trainer.fit(Classifier(), TRAIN)
    lines = out.getvalue().splitlines()
    stop = (
        "EarlyStopping: stopped after epoch 3: score did not improve for 1 epoch (best 0.2 "
        "at epoch 2)."
    )
    restored = "EarlyStopping: restored the weights from the end of epoch 2 (score=0.2)."
    assert stop in lines and restored in lines  # whole lines: never wrapped
    # After the progress line of the epoch it stopped in.
    last_epoch = next(i for i, line in enumerate(lines) if line.startswith("Epoch 3/4"))
    assert last_epoch < lines.index(stop) < lines.index(restored)


def test_val_metric_is_skipped_on_epochs_without_validation():
    """val_every_n_epochs=2: epochs 0, 2, ... have no val_ metrics; they do not count."""
    stopper = EarlyStopping(monitor="val_loss", patience=1, verbose=False)
    script = [None, 0.5, None, 0.6, None, 0.7, None, 0.8]

    class ValEveryOther(Scripted):
        def on_train_epoch_end(self, trainer, module, epoch, logs):
            assert ("val_loss" in logs) == (script[epoch] is not None)
            if script[epoch] is not None:
                logs["val_loss"] = script[epoch]

    _, _, history = fit([ValEveryOther(None), stopper], max_epochs=8, val=VAL, val_every_n_epochs=2)
    # Watched epochs: 1 (best), 3 (worse: wait 1 >= patience) -> stop at epoch 3.
    assert stopper.stopped_epoch == 3 and len(history.epoch) == 4


# ------------------------------------------------------------------------ state ---
def test_reused_callback_starts_afresh_each_fit():
    # Keras #20256: a second fit is not compared against the first fit's best
    stopper = EarlyStopping(monitor="score", patience=2, verbose=False)
    fit([Scripted([0.1, 0.05, 0.06, 0.07]), stopper], max_epochs=4)
    assert stopper.stopped_epoch == 3
    fit([Scripted([5.0, 4.0, 3.0, 2.0]), stopper], max_epochs=4)
    assert stopper.stopped_epoch is None and stopper.best == 2.0


def test_state_dict_is_json_and_round_trips():
    stopper = EarlyStopping(monitor="score", patience=3)
    assert json.loads(json.dumps(stopper.state_dict()))["best"] == math.inf
    fit([Scripted([1.0, 0.5, 0.6]), stopper], max_epochs=3)
    again = EarlyStopping(monitor="score", patience=3)
    again.load_state_dict(json.loads(json.dumps(stopper.state_dict())))
    assert (
        again.state_dict()
        == stopper.state_dict()
        == {"wait": 1, "best": 0.5, "best_epoch": 1, "stopped_epoch": None, "stop_reason": None}
    )


def test_resumed_run_stops_where_an_uninterrupted_one_would(tmp_path):
    """Uninterrupted, the fit stops at epoch 4 (best 0.5 at epoch 1, patience 3). A run cut
    after 3 epochs and resumed must carry best/wait over: fresh counters would take 0.7 at
    epoch 3 as a new best and stop later."""
    values = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]
    ref = EarlyStopping(monitor="score", patience=3, verbose=False)
    _, _, ref_history = fit([Scripted(values), ref], max_epochs=10)
    assert ref.stopped_epoch == 4

    def run(max_epochs, resume):
        stopper = EarlyStopping(
            monitor="score", patience=3, restore_best_weights=True, verbose=False
        )
        trainer = nnxfit.Trainer(
            max_epochs=max_epochs,
            workdir=tmp_path,
            progress_bar=False,
            callbacks=[Scripted(values), stopper, ModelCheckpoint()],
        )
        return stopper, trainer.fit(Classifier(), TRAIN, resume=resume)

    first, _ = run(3, False)
    assert first.stopped_epoch is None and first.wait == 1
    # The best epoch (1) ran before the resume: its weights were a host copy, not in the
    # checkpoint, so they cannot come back; says so rather than restoring something else.
    with pytest.warns(UserWarning, match=r"could not restore the weights of the best epoch \(2,"):
        resumed, history = run(10, True)
    assert resumed.stopped_epoch == 4 and resumed.best_epoch == 1
    assert history.epoch == ref_history.epoch
    assert history.history["score"] == ref_history.history["score"]


def test_monitor_helper_api():
    """The shared helper other callbacks (ModelCheckpoint) can reuse."""
    m = Monitor("val_loss", "min", owner="ModelCheckpoint")
    assert m.is_better(0.5, None) and m.is_better(0.5, 0.6) and not m.is_better(0.5, 0.5)
    assert not m.is_better(0.55, 0.6, min_delta=0.1) and not m.is_better(math.nan, 0.6)
    assert m.is_better(0.5, math.nan) and m.is_worse(math.nan, 0.6) and m.worst == math.inf
    assert Monitor("val_accuracy", "auto").worst == -math.inf
    assert m.lookup({"loss": 1.0}) is None  # an epoch without validation
    assert m.get({"val_loss": 0.25}) == 0.25
    with pytest.raises(
        nnxfit.ConfigError,
        match=r"ModelCheckpoint monitor='val_loss'.*\['loss', "
        r"'val_lost'\].*Did you mean 'val_lost'",
    ):
        m.lookup({"loss": 1.0, "val_lost": 2.0})
