"""EMA: the average of the parameters kept inside the step equals one computed by hand from
the parameters after every step (one step a call or four), validation sees it when asked,
the module holds it after fit when asked, and an interrupted and resumed fit ends bit for
bit where an uninterrupted one ends."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from models import Classifier, SignalAt, toy_data

import nnxfit
from nnxfit.callbacks import EMA, ModelCheckpoint
from nnxfit.checkpoint import read_meta

BS = 4
X, Y = toy_data(BS * 10)
DATA = [(X[i * BS : (i + 1) * BS], Y[i * BS : (i + 1) * BS]) for i in range(10)]
DECAY = 0.8


def params(module) -> list[np.ndarray]:
    return [np.array(x, copy=True) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def leaves(tree) -> list[np.ndarray]:
    return [np.array(x, copy=True) for x in jax.tree.leaves(tree)]


class ParamsEveryStep(nnxfit.Callback):
    """The module's parameters after every step (one step a call)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, module, step, logs):
        self.seen.append(params(module))


def fit(callbacks, spe=1, max_steps=12, val=None, module=None, data=DATA, **kw):
    module = module or Classifier()
    trainer = nnxfit.Trainer(
        max_steps=max_steps, steps_per_execution=spe, progress_bar=False, callbacks=callbacks,
        **kw,
    )  # fmt: skip
    history = trainer.fit(module, data, val)
    return trainer, module, history


@functools.cache
def trajectory() -> list[list[np.ndarray]]:
    """The parameters after each of the 12 steps of a fit without EMA, one step a call."""
    rec = ParamsEveryStep()
    fit([rec])
    return rec.seen


@pytest.mark.parametrize("spe", [1, 4])
def test_average_equals_one_computed_by_hand_from_every_step(spe):
    """Every step is averaged, the K steps of a call included, from the parameters before
    the first step."""
    expected = params(Classifier())
    for p in trajectory():
        expected = [
            np.float32(DECAY) * e + np.float32(1 - DECAY) * x
            for e, x in zip(expected, p, strict=True)
        ]
    ema = EMA(DECAY, apply_at_end=False)
    trainer, module, _ = fit([ema], spe=spe)
    got = leaves(ema.average(trainer))
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=2e-6, atol=1e-7)
    # Not the parameters themselves, nor an average of every fourth step's.
    assert not np.allclose(got[0], params(module)[0], rtol=1e-3)


def test_validation_sees_the_average_only_when_asked():
    def val_loss(validate_with_ema):
        ema = EMA(DECAY, validate_with_ema=validate_with_ema, apply_at_end=False)
        trainer, module, history = fit([ema], max_steps=None, max_epochs=1, val=DATA)
        raw = nnxfit.Trainer(progress_bar=False, max_steps=1).validate(module, DATA)
        averaged = Classifier()
        nnx.update(averaged, ema.average(trainer))
        avg = nnxfit.Trainer(progress_bar=False, max_steps=1).validate(averaged, DATA)
        return history.history["val_loss"][-1], raw["val_loss"], avg["val_loss"]

    logged, raw, avg = val_loss(True)
    assert logged == pytest.approx(avg, rel=1e-6) and logged != pytest.approx(raw, rel=1e-4)
    logged, raw, avg = val_loss(False)
    assert logged == pytest.approx(raw, rel=1e-6) and logged != pytest.approx(avg, rel=1e-4)


def test_module_holds_the_average_after_fit_only_when_asked():
    _, plain, _ = fit([])
    ema = EMA(DECAY, apply_at_end=True)
    trainer, module, _ = fit([ema])
    assert all(
        np.array_equal(a, b)
        for a, b in zip(params(module), leaves(ema.average(trainer)), strict=True)
    )
    assert not np.array_equal(params(module)[0], params(plain)[0])
    _, module, _ = fit([EMA(DECAY, apply_at_end=False)])
    assert all(np.array_equal(a, b) for a, b in zip(params(module), params(plain), strict=True))


@pytest.mark.parametrize("spe", [1, 4])
def test_interrupted_and_resumed_average_ends_bit_for_bit(tmp_path, spe):
    def run(workdir, callbacks=(), resume=False):
        ema = EMA(DECAY, apply_at_end=False)
        trainer = nnxfit.Trainer(
            workdir=workdir, callbacks=[ema, ModelCheckpoint(), *callbacks], max_epochs=2,
            steps_per_execution=spe, progress_bar=False, log_every_n_steps=4,
        )  # fmt: skip
        module = Classifier(dropout=0.2, seed=0 if not resume else 5)
        trainer.fit(module, DATA, resume=resume)
        opt = leaves(trainer.train_state()["opt"])
        return leaves(ema.average(trainer)), params(module) + opt

    ref_ema, ref_state = run(tmp_path / "ref")
    with pytest.raises(nnxfit.TrainingInterrupted):
        run(tmp_path / "run", [SignalAt(14)])
    assert read_meta(tmp_path / "run" / "checkpoints")["step"] == 14
    got_ema, got_state = run(tmp_path / "run", resume=True)
    assert all(np.array_equal(a, b) for a, b in zip(got_ema, ref_ema, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(got_state, ref_state, strict=True))


def test_bad_decay_and_two_different_averages_are_refused():
    with pytest.raises(nnxfit.ConfigError, match="EMA decay must be a number in"):
        EMA(1.0)
    with pytest.raises(nnxfit.ConfigError, match="already asked for ema_decay=0.9"):
        fit([EMA(0.9), EMA(0.99)])


def test_on_a_mesh_the_average_is_sharded_like_its_parameter():
    script = os.path.join(os.path.dirname(__file__), "scripts", "ema_mesh.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(lines[-1][len("RESULTS ") :])
    assert r["ema_specs"] == r["param_specs"]
    assert "'data'" in "".join(r["param_specs"])  # the FSDP kernels are sharded
    assert r["trace_count"] == 1
    assert r["ema_rel_diff"] < 2e-5


@pytest.mark.parametrize("spe", [1, 4])
def test_a_step_nan_guard_skips_leaves_the_average_untouched(spe):
    """Speculating (ungated, re-run once the bad step shows): the average ends as in a run
    that never saw the bad batch."""
    bad = [(x.copy(), y) for x, y in DATA]
    bad[5][0][0, 0] = np.nan

    def run(data):
        ema = EMA(DECAY, apply_at_end=False)
        guard = nnxfit.callbacks.NaNGuard("skip")
        trainer, _, _ = fit([ema, guard], spe=spe, max_steps=None, max_epochs=2, data=data)
        assert trainer.programs.config.speculate
        return leaves(ema.average(trainer))

    with pytest.warns(nnxfit.callbacks.NonFiniteWarning):
        skipped = run(bad)
    clean = run([b for i, b in enumerate(DATA) if i != 5])
    assert all(np.array_equal(a, b) for a, b in zip(skipped, clean, strict=True))
