"""NaNGuard / SpikeGuard ``action="rollback"``: after ``max_consecutive`` bad steps in a row the
fit goes back to the newest checkpoint from before them, in process, skips the batches since,
and goes on; the counters say so; the result is exact and deterministic; ``max_rollbacks``
bounds it with a ``RollbackError``."""

from __future__ import annotations

import glob
import os
import signal
import warnings

import jax
import numpy as np
import pytest
from flax import nnx
from models import Classifier, toy_data

import nnxfit
from nnxfit.callbacks import ModelCheckpoint, NaNGuard, RollbackWarning, SpikeGuard
from nnxfit.checkpoint import list_steps, read_meta

BS = 4
X, Y = toy_data(BS * 60)  # 60 steps an epoch


def batches(nans=(), spikes=()):
    """The toy data as a list of batches: batch i in ``nans`` has a NaN input, in ``spikes``
    inputs scaled by 1e3 and wrong labels (a loss far above the others)."""
    out = []
    for i in range(len(X) // BS):
        x, y = X[i * BS : (i + 1) * BS].copy(), Y[i * BS : (i + 1) * BS].copy()
        if i in nans:
            x[2, 3] = np.nan
        if i in spikes:
            x, y = x * 1e3, (y + 1) % 3
        out.append((x, y))
    return out


def state(trainer, module) -> list[np.ndarray]:
    leaves = jax.tree.leaves(nnx.state(module)) + jax.tree.leaves(trainer.train_state()["opt"])
    return [np.array(x, copy=True) for x in leaves]


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def fit(workdir, data, guard, *, every=10, top_k=3, **kw):
    kw = {"max_epochs": 1, "log_every_n_steps": 10, "progress_bar": False, **kw}
    saver = ModelCheckpoint(every_n_steps=every, save_top_k=top_k)
    trainer = nnxfit.Trainer(callbacks=[guard, saver], workdir=str(workdir), **kw)
    module = Classifier()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        history = trainer.fit(module, data)
    return trainer, module, history.history, rec


@pytest.mark.parametrize("spe, speculate", [(1, True), (4, True), (1, False)])
def test_rollback_after_injected_nans_ends_finite_with_the_right_counters(
    tmp_path, spe, speculate, monkeypatch
):
    """Step 6 alone is skipped; steps 19-21 are three in a row: seen at the log step of 30 (32
    in calls of 4), the fit goes back to the newest checkpoint before step 19 (10; 12 in calls
    of 4), whose parameters and optimizer state it restores; checkpoint 20 (taken during the
    run) goes aside; the data goes on with batch 30 (32): 20 steps and 20 batches dropped.
    Speculating (NaNGuard's re-run from a kept copy) or gating every step."""
    if not speculate:
        monkeypatch.setattr(nnxfit.speculation, "SPECULATE_MAX_BYTES", 0)
    guard = NaNGuard("rollback", max_consecutive=3)
    trainer, module, history, msgs = fit(
        tmp_path, batches(nans={5, 18, 19, 20}), guard, steps_per_execution=spe
    )
    assert trainer.programs.config.speculate == speculate
    ckpt, seen = (10, 30) if spe == 1 else (12, 32)
    assert all(np.isfinite(x).all() for x in state(trainer, module))
    (record,) = guard.rollback_log
    assert record.kind == "nonfinite"
    assert (record.first_bad_step, record.bad_step, record.seen_at) == (19, 21, seen)
    assert record.checkpoint == os.path.join(tmp_path, "checkpoints", str(ckpt))
    assert (record.checkpoint_step, record.undone_steps, record.skipped_batches) == (ckpt, 20, 20)
    # 60 batches, 20 of them trained on and undone: 40 optimizer steps.
    assert trainer.global_step == 40 and guard.rollbacks == 1
    assert history["rollbacks"] == [1.0] and history["nonfinite_steps"] == [4.0]
    assert trainer.history.epoch == [0] and np.isfinite(history["loss"][0])
    rolled = [w for w in msgs if "rolled back to checkpoint" in str(w.message)]
    assert len(rolled) == 1 and rolled[0].category is RollbackWarning
    assert rolled[0].filename == __file__  # the user's fit line
    assert f"(steps 19-21, seen at step {seen})" in str(rolled[0].message)
    assert "20 steps undone, the 20 batches since that checkpoint skipped" in str(rolled[0].message)
    # The abandoned timeline's checkpoint moved aside, never deleted; the fit saved on from
    # the checkpoint's step.
    (aside,) = glob.glob(os.path.join(tmp_path, "checkpoints.rolled-back-*"))
    assert list_steps(aside) == [20]
    assert 40 in list_steps(os.path.join(tmp_path, "checkpoints"))


def test_a_rolled_back_fit_is_exact_and_deterministic(tmp_path):
    """Bit for bit: the fit equals one that trained on batches 0-19 and then 30-59 (the
    checkpoint of step 20 restored, batches 20-29 skipped), and a second run equals the
    first."""
    data = batches(nans={24, 25, 26})

    def run(name, data):
        guard = NaNGuard("rollback", max_consecutive=3)
        trainer, module, history, _ = fit(tmp_path / name, data, guard)
        return trainer, guard, state(trainer, module)

    trainer, guard, rolled = run("a", data)
    assert [r.checkpoint_step for r in guard.rollback_log] == [20]
    assert trainer.global_step == 50
    _, again_guard, again = run("b", data)
    assert same(rolled, again) and again_guard.rollback_log[0].checkpoint_step == 20
    _, clean_guard, clean = run("c", data[:20] + data[30:])
    assert same(rolled, clean) and clean_guard.rollbacks == 0


def test_with_grad_accum_steps_positions_count_batches(tmp_path):
    """Two batches a step: batches 24-29 are steps 13-15, seen at step 20 (batch 40); back to
    step 10 (batch 20): 10 steps and 20 batches dropped, and the fit equals one on batches 0-19
    and 40-59."""
    data = batches(nans={24, 25, 26, 27, 28, 29})

    def run(name, data):
        guard = NaNGuard("rollback", max_consecutive=3)
        trainer, module, _, _ = fit(tmp_path / name, data, guard, grad_accum_steps=2)
        return trainer, guard, state(trainer, module)

    trainer, guard, rolled = run("a", data)
    (record,) = guard.rollback_log
    assert (record.first_bad_step, record.seen_at, record.checkpoint_step) == (13, 20, 10)
    assert (record.undone_steps, record.skipped_batches) == (10, 20)
    assert trainer.global_step == 20
    _, _, clean = run("b", data[:20] + data[40:])
    assert same(rolled, clean)


def test_with_max_steps_the_fit_trains_on_until_its_step_count_gets_there(tmp_path):
    """Rolled back from step 30 to 20 inside the epoch, the fit takes batches 30-54 as steps
    21-45 (not stopping at batch 45, where it had planned step 45 before going back). Step 30
    is a log step, not a save step: the guard alone has the loop in step with the device
    there, so the rollback happens right after its hooks."""
    guard = NaNGuard("rollback", max_consecutive=3)
    trainer, _, history, _ = fit(
        tmp_path, batches(nans={24, 25, 26}), guard, every=20, max_steps=45
    )
    assert [(r.seen_at, r.checkpoint_step) for r in guard.rollback_log] == [(30, 20)]
    assert trainer.global_step == 45 and history["rollbacks"] == [1.0]
    meta = read_meta(tmp_path / "checkpoints")  # the resume point: inside epoch 0
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (45, 0, 55)


def test_after_max_rollbacks_a_rollback_error_names_the_steps_checkpoint_and_fix(tmp_path):
    guard = NaNGuard("rollback", max_consecutive=3, max_rollbacks=1)
    module = Classifier()
    saver = ModelCheckpoint(every_n_steps=10, save_top_k=-1)
    trainer = nnxfit.Trainer(
        max_epochs=1, log_every_n_steps=10, progress_bar=False, workdir=str(tmp_path),
        callbacks=[guard, saver],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(nnxfit.RollbackError) as err:
            trainer.fit(module, batches(nans={14, 15, 16, 44, 45, 46}))
    # The first run (steps 15-17) rolled back to 10; the second is at steps 35-37 (data batch
    # 44 is step 35 after the 10 steps undone).
    assert [r.checkpoint_step for r in guard.rollback_log] == [10]
    msg = str(err.value)
    assert "(steps 35-37) after 1 rollback(s)" in msg
    assert os.path.join(tmp_path, "checkpoints", "10") in msg
    assert "raise max_rollbacks" in msg and "lower the learning rate" in msg
    assert err.value.step == 35 and isinstance(err.value, nnxfit.NonFiniteError)
    leaves = jax.tree.leaves(nnx.state(module))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_no_checkpoint_before_the_run_is_a_rollback_error(tmp_path):
    guard = NaNGuard("rollback", max_consecutive=3)
    with pytest.raises(nnxfit.RollbackError, match=r"steps 4-6\) and no readable checkpoint"):
        fit(tmp_path, batches(nans={3, 4, 5}), guard)


def test_spike_guard_rolls_back_after_consecutive_spikes(tmp_path):
    """Steps 25-27 spike (a window of 8 seen): three skipped in a row roll back to step 20."""
    guard = SpikeGuard(window=8, threshold=6.0, action="rollback", max_consecutive=3)
    trainer, module, history, msgs = fit(tmp_path, batches(spikes={24, 25, 26}), guard)
    (record,) = guard.rollback_log
    assert record.kind == "spike" and (record.first_bad_step, record.bad_step) == (25, 27)
    assert record.checkpoint_step == 20 and trainer.global_step == 50
    assert history["rollbacks"] == [1.0] and history["spike_steps"] == [3.0]
    assert any("3 loss spike steps in a row" in str(w.message) for w in msgs)


@pytest.mark.parametrize(
    "make, saver, match",
    [
        (lambda: NaNGuard("rollback"), None, "the fit has no ModelCheckpoint"),
        (
            lambda: NaNGuard("rollback"),
            lambda: ModelCheckpoint(every_n_steps=5),
            r"keeps one \(save_top_k=1\)",
        ),
        (
            lambda: SpikeGuard(action="rollback"),
            lambda: ModelCheckpoint(save_top_k=2, save_weights_only=True),
            "saves weights only",
        ),
    ],
)
def test_rollback_without_checkpoints_to_go_back_to_is_refused_at_fit_start(
    tmp_path, make, saver, match
):
    callbacks = [make()] + ([saver()] if saver else [])
    trainer = nnxfit.Trainer(
        max_steps=2, progress_bar=False, workdir=str(tmp_path), callbacks=callbacks
    )
    with pytest.raises(nnxfit.ConfigError, match=match):
        trainer.fit(Classifier(), batches())
    assert trainer.global_step == 0


def test_bad_options_are_refused():
    with pytest.raises(nnxfit.ConfigError, match="apply to action='rollback'"):
        NaNGuard("skip", max_consecutive=2)
    with pytest.raises(nnxfit.ConfigError, match="max_consecutive must be an integer >= 1"):
        NaNGuard("rollback", max_consecutive=0)
    with pytest.raises(nnxfit.ConfigError, match="max_rollbacks must be an integer >= 1"):
        SpikeGuard(action="rollback", max_rollbacks=-1)


class SignalAfterRollback(nnxfit.Callback):
    """SIGTERM from the hook of ``step`` once the fit has rolled back (a real preemption)."""

    def __init__(self, guard, step):
        self.guard, self.step = guard, step

    def on_train_batch_end(self, trainer, module, step, logs):
        if self.guard.rollbacks and step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_fit_interrupted_after_a_rollback_resumes_bit_for_bit(tmp_path):
    """Steps 25-27 roll back to step 20 at step 30. The checkpoint taken at the SIGTERM at
    step 25 after that holds the rolled-back timeline (step 25 at batch 35, one rollback); the
    resumed fit ends bit for bit where the uninterrupted one ends."""
    data = batches(nans={24, 25, 26})

    def run(workdir, extra=(), resume=False):
        guard = NaNGuard("rollback", max_consecutive=3)
        extra = [e(guard) for e in extra]
        trainer = nnxfit.Trainer(
            max_epochs=1, log_every_n_steps=10, progress_bar=False, workdir=str(workdir),
            callbacks=[guard, ModelCheckpoint(every_n_steps=10, save_top_k=3), *extra],
        )  # fmt: skip
        module = Classifier(seed=0 if not resume else 5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            history = trainer.fit(module, data, resume=resume)
        return trainer, guard, history.history, state(trainer, module)

    ref, ref_guard, ref_history, ref_state = run(tmp_path / "ref")
    assert ref_guard.rollbacks == 1 and ref.global_step == 50
    with pytest.raises(nnxfit.TrainingInterrupted):
        run(tmp_path / "run", [lambda g: SignalAfterRollback(g, 25)])
    meta = read_meta(tmp_path / "run" / "checkpoints")
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (25, 0, 35)
    resumed, guard, history, resumed_state = run(tmp_path / "run", resume=True)
    assert guard.rollbacks == 1 and resumed.global_step == 50
    assert history["rollbacks"] == [1.0] and history == ref_history
    assert same(resumed_state, ref_state)
