"""SpikeGuard: a spiking step is skipped inside the step exactly as NaNGuard skips, so the fit
equals, bit for bit, one that never saw that batch; nothing is skipped before ``window``
values were seen; the buffer survives a resume; with NaNGuard it is one gate; "stop" ends the
fit at the spike with the state from before it."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from flax import nnx
from models import Classifier, SignalAt, toy_data

import nnxfit
from nnxfit.callbacks import EMA, ModelCheckpoint, NaNGuard, SpikeGuard, SpikeWarning
from nnxfit.checkpoint import read_meta

BS = 4
X, Y = toy_data(BS * 40)  # 40 steps an epoch
WINDOW = 8


def batches(spikes=(), nans=()):
    """The toy data as a list of batches; batch i in ``spikes`` has its inputs scaled by 1e3
    and wrong labels (a loss far above the others), in ``nans`` a NaN input."""
    out = []
    for i in range(len(X) // BS):
        x, y = X[i * BS : (i + 1) * BS].copy(), Y[i * BS : (i + 1) * BS].copy()
        if i in spikes:  # confident and wrong
            x, y = x * 1e3, (y + 1) % 3
        if i in nans:
            x[0, 0] = np.nan
        out.append((x, y))
    return out


def without(data, drop):
    return [b for i, b in enumerate(data) if i not in drop]


def state(trainer, module) -> list[np.ndarray]:
    variables = jax.tree.leaves(nnx.state(module))
    opt = jax.tree.leaves(trainer.train_state()["opt"])
    extra = jax.tree.leaves(trainer.train_state()["extra"])
    out = []
    for x in variables + opt:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.array(x, copy=True))
    return out + [np.array(x, copy=True) for x in extra]


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def fit(data, callbacks, resume=False, **kw):
    kw = {"max_epochs": 1, "log_every_n_steps": 10, "progress_bar": False, **kw}
    module = Classifier(dropout=0.2)  # no BatchNorm: it would normalise the spike away
    trainer = nnxfit.Trainer(callbacks=callbacks, **kw)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        history = trainer.fit(module, data, resume=resume)
    return trainer, module, history.history, [str(w.message) for w in rec]


def guard(**kw):
    return SpikeGuard(window=WINDOW, threshold=6.0, **kw)


def test_a_skipped_spike_equals_a_run_that_never_saw_that_batch():
    """Params, RNG, optimizer state, the buffer and an EMA of the params, bit for bit."""
    spiked = batches(spikes={20})
    trainer, module, logs, msgs = fit(spiked, [guard(), EMA(0.9)])
    assert trainer.spike_steps == 1 and trainer.first_spike_step == 21
    assert logs["spike_steps"] == [1.0]
    assert sum("loss at step 21 was above mean + 6 x std" in m for m in msgs) == 1
    clean_trainer, clean, clean_logs, _ = fit(without(spiked, {20}), [guard(), EMA(0.9)])
    assert clean_logs["spike_steps"] == [0.0]
    assert same(state(trainer, module), state(clean_trainer, clean))
    np.testing.assert_allclose(logs["loss"], clean_logs["loss"], rtol=1e-6)


def test_a_spiking_grad_norm_is_skipped_too():
    spiked = batches(spikes={20})
    trainer, module, _, _ = fit(spiked, [guard(monitor="grad_norm")])
    assert trainer.first_spike_step == 21
    clean_trainer, clean, _, _ = fit(without(spiked, {20}), [guard(monitor="grad_norm")])
    assert same(state(trainer, module), state(clean_trainer, clean))


def test_nothing_is_skipped_before_window_values_were_seen():
    """Step WINDOW (WINDOW - 1 values seen) is applied however far it is off; the step after
    WINDOW values were seen is skipped."""
    trainer, _, logs, _ = fit(batches(spikes={WINDOW - 1}), [guard()])
    assert trainer.spike_steps == 0 and logs["spike_steps"] == [0.0]
    trainer, _, _, _ = fit(batches(spikes={WINDOW}), [guard()])
    assert trainer.first_spike_step == WINDOW + 1


def test_interrupted_and_resumed_fit_skips_what_the_uninterrupted_one_skips(tmp_path):
    """The buffer is in the checkpoint: after the resume at step 14, the spike at step 19
    (5 values pushed since) is still caught, and the fit ends bit for bit."""
    data = batches(spikes={10, 18})

    def run(workdir, callbacks=(), resume=False):
        trainer = nnxfit.Trainer(
            workdir=workdir, callbacks=[SpikeGuard(window=10), ModelCheckpoint(), *callbacks],
            max_epochs=1, log_every_n_steps=5, progress_bar=False,
        )  # fmt: skip
        module = Classifier(dropout=0.2, seed=0 if not resume else 5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpikeWarning)
            trainer.fit(module, data, resume=resume)
        return trainer, state(trainer, module)

    ref, ref_state = run(tmp_path / "ref")
    assert ref.spike_steps == 2
    with pytest.raises(nnxfit.TrainingInterrupted):
        run(tmp_path / "run", [SignalAt(14)])
    assert read_meta(tmp_path / "run" / "checkpoints")["step"] == 14
    resumed, resumed_state = run(tmp_path / "run", resume=True)
    assert resumed.spike_steps == 2
    assert same(resumed_state, ref_state)


def test_with_nan_guard_one_gate_skips_both():
    """A non-finite step is not a spike and does not enter the buffer (the later spike is
    still caught); the run equals one without either batch."""
    data = batches(spikes={30}, nans={12})
    callbacks = [NaNGuard("skip"), guard()]
    trainer, module, logs, msgs = fit(data, callbacks)
    assert not trainer.programs.config.speculate  # SpikeGuard gates in the step
    assert (trainer.nonfinite_steps, trainer.spike_steps) == (1, 1)
    assert logs["nonfinite_steps"] == [1.0] and logs["spike_steps"] == [1.0]
    clean_trainer, clean, _, _ = fit(without(data, {12, 30}), [NaNGuard("skip"), guard()])
    assert same(state(trainer, module), state(clean_trainer, clean))


def test_stop_ends_the_fit_naming_the_step_with_the_state_before_it():
    trainer, module, _, msgs = fit(batches(spikes={22}), [guard(action="stop")])
    assert any("at step 23" in m and "training stopped" in m for m in msgs)
    assert trainer.global_step < 40  # stopped at the log step after the spike
    ref_trainer, ref, _, _ = fit(batches(), [guard(action="stop")], max_steps=22)
    assert same(state(trainer, module), state(ref_trainer, ref))  # the buffer too


def test_bad_arguments_are_refused():
    with pytest.raises(nnxfit.ConfigError, match="monitor must be one of"):
        SpikeGuard(monitor="val_loss")
    with pytest.raises(nnxfit.ConfigError, match="window must be an int >= 2"):
        SpikeGuard(window=1)
    with pytest.raises(nnxfit.ConfigError, match="action must be one of"):
        SpikeGuard(action="raise")


def test_a_checkpoint_after_a_stop_holds_the_state_before_the_spike(tmp_path):
    """As after NaNGuard("stop"): the last checkpoint is the state after step n - 1 with a
    clean spike record, so a resumed fit is not frozen by the old spike."""
    callbacks = [guard(action="stop"), ModelCheckpoint()]
    trainer, _, _, _ = fit(batches(spikes={22}), callbacks, workdir=tmp_path)
    assert trainer.global_step > trainer.checkpoint_step == 22
    assert read_meta(tmp_path / "checkpoints")["step"] == 22
    callbacks = [guard(action="stop"), ModelCheckpoint()]
    resumed, _, _, _ = fit(batches(), callbacks, workdir=tmp_path, resume=True)
    assert resumed.global_step == 40 and resumed.spike_steps == 0
