"""NaNGuard: the exact bad step is named even when the host looks only every 50 steps; stop
and raise keep the last good state; skip equals a run that never saw the bad batch."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from flax import nnx
from models import Classifier, SignalAt, toy_data

import nnxfit
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.callbacks.nan_guard import NaNGuard, NonFiniteWarning
from nnxfit.checkpoint import load_checkpoint, read_meta

BS = 4
X, Y = toy_data(BS * 60)  # 60 steps an epoch


def batches(bad=(), label=False):
    """The toy data as a list of batches (a re-iterable loader); batch i in ``bad`` gets a NaN
    input, or with ``label`` a class index out of range (NaN loss, finite gradients)."""
    out = []
    for i in range(len(X) // BS):
        x, y = X[i * BS : (i + 1) * BS].copy(), Y[i * BS : (i + 1) * BS].copy()
        if i in bad:
            if label:
                y[1] = 7  # 3 classes
            else:
                x[2, 3] = np.nan
        out.append((x, y))
    return out


def state(module, filt=...):
    return [
        np.array(
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
            copy=True,
        )
        for x in jax.tree.leaves(nnx.state(module, filt))
    ]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def fit(data, callbacks, module=None, **kw):
    kw = {"max_epochs": 2, "log_every_n_steps": 50, "progress_bar": False, **kw}
    module = module or Classifier()
    trainer = nnxfit.Trainer(callbacks=callbacks, **kw)
    return trainer, module, trainer.fit(module, data)


def reference_after(steps, **kw):
    """Module state after ``steps`` good steps, from a run with the same step program."""
    _, module, _ = fit(batches(), [NaNGuard("stop")], max_steps=steps, **kw)
    return state(module)


def test_unknown_action_fails_at_construction():
    with pytest.raises(nnxfit.ConfigError, match="action must be one of .*'skip'.*'ignore'"):
        NaNGuard("ignore")


def test_stop_names_the_exact_step_though_the_host_looks_every_50_steps():
    with pytest.warns(NonFiniteWarning) as rec:
        trainer, module, history = fit(batches(bad={6}), [guard := NaNGuard("stop")])
    msg = str(rec[0].message)
    assert "first non-finite loss or gradient at step 7 " in msg
    assert "seen at step 50; steps 7-50 were not applied" in msg
    assert "parameters are those after step 6" in msg and "Training stopped" in msg
    assert len(rec) == 1 and guard.nonfinite_step == 7
    # Stopped cleanly at the first log step, history returned for the partial epoch, though
    # the device ran ahead of the guard (it only records) and was past step 50 when it looked.
    assert trainer.lookahead > 0
    assert trainer.global_step == trainer.dispatch_step == 50 and history.epoch == [0]
    assert np.isfinite(history.history["loss"][0])  # the mean of steps 1-6
    # Frozen on the good state, steps 8-50 were finite: only step 7 counts.
    assert history.history["nonfinite_steps"] == [1.0]
    # The module holds exactly the state after step 6 (params, optimizer-free: module state).
    assert same(state(module), reference_after(6))


def test_stop_with_steps_per_execution_still_names_the_step():
    with pytest.warns(NonFiniteWarning, match="at step 7 .*after step 6"):
        trainer, module, _ = fit(batches(bad={6}), [NaNGuard("stop")], steps_per_execution=8)
    # The call of steps 1-8 ran ungated, saw step 7, and was redone gated from step 1.
    assert same(state(module), reference_after(6, steps_per_execution=8))
    assert trainer.global_step == 56  # the first log step at or after 50, in calls of 8


def test_raise_names_the_step_and_leaves_the_last_good_state():
    module = Classifier()
    with pytest.raises(nnxfit.NonFiniteError, match="at step 7 ") as err:
        fit(batches(bad={6}), [NaNGuard("raise")], module=module)
    assert err.value.step == 7
    assert isinstance(err.value, FloatingPointError)
    assert same(state(module), reference_after(6))


def test_nan_loss_with_finite_gradients_is_caught():
    """A label outside [0, num_classes) gives a NaN loss but finite gradients: the guard
    checks the loss too."""
    x, y = batches(bad={2}, label=True)[2]
    loss, grads = nnx.value_and_grad(lambda m: m.training_step((x, y))[0])(Classifier())
    assert np.isnan(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    with pytest.raises(nnxfit.NonFiniteError, match="at step 3;") as err:
        fit(batches(bad={2}, label=True), [NaNGuard("raise")], log_every_n_steps=1)
    assert err.value.step == 3


@pytest.mark.parametrize("spe", [1, 4])
@pytest.mark.parametrize("speculate", [True, False])
def test_skip_equals_a_run_that_never_saw_the_bad_batch(spe, speculate, monkeypatch):
    """Dropout and BatchNorm: a skipped step must leave params, optimizer state, BatchNorm
    statistics and the RNG untouched, so the run matches one without that batch bit for bit.
    Speculating (ungated programs; the calls since the last good copy re-run gated once a bad
    step shows) or gating every step, one step or four a call."""
    if not speculate:
        monkeypatch.setattr(nnxfit.speculation, "SPECULATE_MAX_BYTES", 0)
    bad = batches(bad={3, 41})
    good = [b for i, b in enumerate(bad) if i not in (3, 41)]

    def run(data):
        module = Classifier(dropout=0.2, batchnorm=True)
        trainer, module, history = fit(
            data, [NaNGuard("skip")], module=module, steps_per_execution=spe
        )
        assert trainer.programs.config.speculate == speculate
        opt = [np.array(x) for x in jax.tree.leaves(trainer.train_state()["opt"])]
        return trainer, module, history, opt

    with pytest.warns(NonFiniteWarning, match="at step 4; that update was skipped") as rec:
        trainer, skipped, history, opt = run(bad)
    assert len(rec) == 1  # once; the rest are counted
    _, clean, clean_history, clean_opt = run(good)
    assert same(state(skipped), state(clean))  # params, batch stats, RNG keys and counts
    assert same(opt, clean_opt)
    assert trainer.nonfinite_steps == 4 and trainer.first_nonfinite_step == 4
    assert history.history["nonfinite_steps"] == [2.0, 4.0]  # running count
    # Epoch means leave the skipped steps out.
    np.testing.assert_allclose(history.history["loss"], clean_history.history["loss"], rtol=1e-6)
    assert all(np.isfinite(x).all() for x in state(skipped))


def test_without_a_guard_the_nan_spreads():
    """The control for the tests above: the same data poisons an unguarded run."""
    _, module, _ = fit(batches(bad={6}), [], max_epochs=1)
    assert not all(np.isfinite(x).all() for x in state(module, nnx.Param))


def test_stop_runs_before_checkpoints_and_the_saved_state_is_good(tmp_path):
    ckpt = ModelCheckpoint()
    assert NaNGuard.order < ckpt.order
    with pytest.warns(NonFiniteWarning):
        _, module, _ = fit(batches(bad={6}), [ckpt, NaNGuard("stop")], workdir=tmp_path)
    saved = Classifier(seed=1)
    load_checkpoint(saved, tmp_path, "last")
    assert same(state(saved, nnx.Param), state(module, nnx.Param))
    assert same(state(module), reference_after(6))


def test_no_warning_and_no_stop_on_a_clean_run():
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        trainer, _, history = fit(batches(), [guard := NaNGuard("stop")], max_epochs=1)
    assert trainer.global_step == 60 and guard.nonfinite_step is None
    assert history.history["nonfinite_steps"] == [0.0]


class StateEvery(nnxfit.Callback):
    """Reads the module in step with the device where a step that is a multiple of ``n`` was
    crossed (a barrier there), and records what it sees."""

    def __init__(self, n):
        self.n, self.due, self.seen = n, set(), {}

    def needs_sync(self, trainer, event, step, n_steps):
        due = event == "batch" and step // self.n != (step - n_steps) // self.n
        if due:
            self.due.add(step)
        return due

    def on_train_batch_end(self, trainer, module, step, logs):
        if step in self.due:
            self.seen[step] = state(module)


@pytest.mark.parametrize(
    "action, bad, spe, log_every, accum",
    [("skip", {3, 41}, 1, 50, 1), ("skip", {3, 41}, 4, 1000, 1), ("stop", {6}, 1, 1000, 1),
     ("stop", {6}, 4, 50, 1), ("skip", {3, 41}, 3, 50, 2)],
)  # fmt: skip
def test_a_speculating_fit_shows_callbacks_only_checked_states(action, bad, spe, log_every, accum):
    """The programs run ungated and a bad step is found late (at a log step, an epoch end, a
    periodic copy, or a callback's barrier), then the calls since the last good copy re-run.
    A callback reading the module every 10 steps must see exactly the states of a fit that
    checks every call (a barrier each call: a bad step is re-run at once), and both fits end
    alike. Logs every 1000 steps leave the periodic copies and epoch ends as the checks."""

    def run(every):
        reader = StateEvery(every)
        with pytest.warns(NonFiniteWarning):
            trainer, module, history = fit(
                batches(bad=bad),
                [NaNGuard(action), reader],
                module=Classifier(dropout=0.2, batchnorm=True),
                steps_per_execution=spe,
                log_every_n_steps=log_every,
                grad_accum_steps=accum,
            )
        assert trainer.programs.config.speculate
        assert trainer.programs._gated is not None  # it did re-run
        opt = [np.array(x) for x in jax.tree.leaves(trainer.train_state()["opt"])]
        return trainer, reader.seen, state(module) + opt, history.history

    fit10, seen10, end10, logs10 = run(10)
    fit1, seen1, end1, logs1 = run(1)
    assert len(seen10) >= 3
    for step, seen in seen10.items():
        assert same(seen, seen1[step]), step
    assert same(end10, end1)
    assert logs10 == logs1
    assert fit10.global_step == fit1.global_step
    assert (fit10.nonfinite_steps, fit10.first_nonfinite_step) == (
        fit1.nonfinite_steps,
        fit1.first_nonfinite_step,
    )


@pytest.mark.filterwarnings("ignore::nnxfit.callbacks.nan_guard.NonFiniteWarning")
@pytest.mark.parametrize("spe", [1, 4])
def test_a_speculating_fit_interrupted_and_resumed_ends_bit_for_bit(tmp_path, spe):
    """SIGTERM after a bad step the guard has not checked yet: the state saved on the way out
    is the re-run one, and the resumed run (which re-runs its own bad steps) ends where the
    uninterrupted run ends."""
    data = batches(bad={3, 41, 50, 70})

    def run(workdir, callbacks=(), resume=False):
        trainer = nnxfit.Trainer(
            workdir=workdir,
            callbacks=[NaNGuard("skip"), ModelCheckpoint(), *callbacks],
            max_epochs=2,
            log_every_n_steps=50,
            steps_per_execution=spe,
            progress_bar=False,
        )
        module = Classifier(dropout=0.2, batchnorm=True, seed=0 if not resume else 5)
        history = trainer.fit(module, data, resume=resume)
        assert trainer.programs.config.speculate
        opt = [np.array(x) for x in jax.tree.leaves(trainer.train_state()["opt"])]
        return trainer, state(module) + opt, history.history

    ref, ref_state, ref_logs = run(tmp_path / "ref")
    with pytest.raises(nnxfit.TrainingInterrupted):
        run(tmp_path / "run", [SignalAt(44)])
    saved = read_meta(tmp_path / "run" / "checkpoints")["step"]
    assert 44 <= saved < 50  # past bad step 42, before the first log step checked it
    resumed, resumed_state, resumed_logs = run(tmp_path / "run", resume=True)
    assert same(resumed_state, ref_state)
    assert resumed_logs == ref_logs
    assert (resumed.nonfinite_steps, resumed.global_step) == (ref.nonfinite_steps, 120)
