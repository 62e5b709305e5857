"""Resume after every kind of end: a fit that ended inside an epoch (``max_steps``, a
callback's ``should_stop``, ``NaNGuard("stop")``) leaves a checkpoint from which a resumed
fit finishes that epoch, and ends bit for bit where one uninterrupted fit ends: every array
of the module and optimizer state, the History, ``metrics.csv`` and the TensorBoard curves.
With dropout, BatchNorm, shuffling, and one or four steps per call."""

from __future__ import annotations

import os
import sys

import numpy as np
import optax
import pytest
from models import Classifier, toy_data
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import nnxfit
from nnxfit.callbacks import EarlyStopping, ReduceLROnPlateau, TensorBoardLogger
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.callbacks.nan_guard import NaNGuard
from nnxfit.checkpoint import ResumeWarning, list_steps, read_meta
from nnxfit.data import ArrayLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import train_and_signal as child  # noqa: E402

BS, N_BATCHES = 8, 24  # 24 batches an epoch
X, Y = toy_data(BS * N_BATCHES, seed=3)
VAL = toy_data(24, seed=4)


def train_data(x=X):
    return ArrayLoader((x, Y), batch_size=BS, shuffle=True, seed=1)


def val_data():
    return ArrayLoader(VAL, batch_size=16)


def make_module(seed=0):
    return Classifier(seed=seed, dropout=0.5, batchnorm=True)


def fit(workdir, *, callbacks=(), module=None, data=None, resume=False, seed=0, **kw):
    kw = {"progress_bar": False, "log_every_n_steps": 4, **kw}
    trainer = nnxfit.Trainer(workdir=workdir, callbacks=list(callbacks), **kw)
    module = module if module is not None else make_module(seed)
    history = trainer.fit(module, data or train_data(), val_data(), resume=resume)
    return trainer, history


def assert_bitwise(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), i


def scalars(log_dir):
    """{tag: [(step, value), ...]} as TensorBoard shows it (purges applied)."""
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def logs_of(workdir):
    return (workdir / "metrics.csv").read_text(), scalars(workdir / "tensorboard")


# spe 1 with logs every 4 steps: the final call (step 30) logs off the grid. spe 4 with logs
# every 3: max_steps cuts the call of steps 29-32 after step 30, a call that logged (it
# crossed step 30) where the uninterrupted run's call logs at 32.
@pytest.mark.parametrize("spe, log_every", [(1, 4), (4, 3)], ids=["spe1", "spe4"])
def test_train_longer_from_max_steps_inside_an_epoch_equals_one_fit(tmp_path, spe, log_every):
    kw = dict(steps_per_execution=spe, log_every_n_steps=log_every)

    def callbacks():
        return [ModelCheckpoint(every_n_steps=10), TensorBoardLogger()]

    ref, ref_history = fit(tmp_path / "ref", callbacks=callbacks(), max_steps=60, **kw)
    run = tmp_path / "run"
    first, history = fit(run, callbacks=callbacks(), max_steps=30, **kw)
    # The user still gets the partial epoch's end: validation, hooks, a History row.
    assert history.epoch == [0, 1] and len(history.history["val_loss"]) == 2
    meta = read_meta(run / "checkpoints")
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (30, 1, 6)
    assert meta["loop"]["history"]["epoch"] == [0]  # from before the partial epoch end

    trainer, history = fit(run, callbacks=callbacks(), max_steps=60, resume=True, seed=7, **kw)
    assert trainer.resumed_from == str(run / "checkpoints" / "30")
    assert_bitwise(child.state_arrays(trainer), child.state_arrays(ref))
    assert history.epoch == [0, 1, 2]
    assert history.history == ref_history.history
    assert logs_of(run) == logs_of(tmp_path / "ref")


def test_train_longer_after_max_epochs_and_after_max_steps_at_an_epoch_end(tmp_path):
    """At an epoch boundary the checkpoint is the state after that epoch end; the final call
    of a max_steps fit still logs off the grid (step 48, logs every 5), a row the resumed
    metrics.csv must not keep and TensorBoard must hide (with the epoch end at that step
    written again)."""
    ref_dir = tmp_path / "ref"
    ref, ref_history = fit(
        ref_dir, callbacks=[TensorBoardLogger()], max_epochs=4, log_every_n_steps=5
    )
    for name, limit in [("epochs", dict(max_epochs=2)), ("steps", dict(max_steps=48))]:
        run = tmp_path / name
        cb = [ModelCheckpoint(), TensorBoardLogger()]
        fit(run, callbacks=cb, log_every_n_steps=5, **limit)
        meta = read_meta(run / "checkpoints")
        assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (48, 2, 0)
        cb = [ModelCheckpoint(), TensorBoardLogger()]
        trainer, history = fit(run, callbacks=cb, max_epochs=4, log_every_n_steps=5, resume=True)
        assert_bitwise(child.state_arrays(trainer), child.state_arrays(ref))
        assert history.history == ref_history.history
        assert logs_of(run) == logs_of(ref_dir)


class StopAt(nnxfit.Callback):
    """Sets ``should_stop`` at one step: a user's decision inside an epoch."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, step, logs):
        if step == self.step:
            trainer.should_stop = True


class Injected(Classifier):
    """An optimizer whose learning rate ReduceLROnPlateau can set."""

    def configure_optimizers(self):
        return optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)


@pytest.mark.parametrize("spe", [1, 4])
def test_a_stop_inside_an_epoch_resumes_from_the_stop_point_with_callback_states_from_before(
    tmp_path, spe
):
    """``mode="max"`` on a falling loss: ReduceLROnPlateau cuts the rate at every epoch end,
    the partial one too, and EarlyStopping counts it. The resumed fit must get neither: it
    finishes epoch 1 with the rate and counters the uninterrupted run had there."""

    def callbacks(*extra):
        return [
            ModelCheckpoint(),
            ReduceLROnPlateau(monitor="loss", mode="max", patience=0, verbose=False),
            EarlyStopping(monitor="loss", mode="max", patience=10, verbose=False),
            *extra,
        ]

    def module(seed=0):
        return Injected(seed=seed, dropout=0.5, batchnorm=True)

    kw = dict(max_epochs=3, steps_per_execution=spe)
    ref_cbs = callbacks()
    ref, ref_history = fit(tmp_path / "ref", callbacks=ref_cbs, module=module(), **kw)
    run = tmp_path / "run"
    first_cbs = callbacks(StopAt(36))
    first, history = fit(run, callbacks=first_cbs, module=module(), **kw)
    assert first.global_step == 36 and history.epoch == [0, 1]
    assert [e for e, _ in first_cbs[1].reductions] == [1]  # it acted at the partial end
    meta = read_meta(run / "checkpoints")
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (36, 1, 12)

    cbs = callbacks()
    trainer, history = fit(run, callbacks=cbs, module=module(seed=5), resume=True, **kw)
    assert_bitwise(child.state_arrays(trainer), child.state_arrays(ref))
    assert history.history == ref_history.history
    assert cbs[1].state_dict() == ref_cbs[1].state_dict()
    assert cbs[2].state_dict() == ref_cbs[2].state_dict()
    assert (run / "metrics.csv").read_text() == (tmp_path / "ref" / "metrics.csv").read_text()


def test_early_stopping_decides_again_in_a_resumed_fit(tmp_path):
    """EarlyStopping stopped at an epoch end: a new fit call trains on, and the restored
    counters stop it again at the next epoch end that does not improve."""

    class Flat(nnxfit.Callback):
        order = -10

        def on_validation_end(self, trainer, module, logs):
            logs["val_loss"] = 1.0  # never improves after epoch 0

    def callbacks():
        return [Flat(), ModelCheckpoint(), es := EarlyStopping(patience=1, verbose=False)], es

    cbs, es = callbacks()
    trainer, history = fit(tmp_path, callbacks=cbs, max_epochs=10)
    assert history.epoch == [0, 1] and es.stopped_epoch == 1
    cbs, es = callbacks()
    trainer, history = fit(tmp_path, callbacks=cbs, max_epochs=10, resume=True)
    assert history.epoch == [0, 1, 2] and es.stopped_epoch == 2


def bad_data(index):
    """The training arrays with a NaN in the example at ``index`` (batch position depends on
    the shuffle)."""
    x = X.copy()
    x[index, 0] = np.nan
    return train_data(x)


def first_bad_step(index):
    """The optimizer step (from 1) that first sees example ``index``: in epoch 0."""
    return int(np.flatnonzero(train_data().order(0) == index)[0]) // BS + 1


@pytest.mark.filterwarnings("ignore::nnxfit.callbacks.nan_guard.NonFiniteWarning")
@pytest.mark.parametrize("spe", [1, 4])
def test_nan_stop_resumes_from_the_last_good_step(tmp_path, spe):
    """NaNGuard("stop") halts at the first bad step n and the host sees it at the next log.
    The checkpoint the fit leaves is the state after step n - 1, at its position: a resumed
    fit runs step n again and, with the same data, stops there again exactly as the first
    fit did; with the example fixed, it trains on and ends where a run on clean data ends.
    A step checkpoint written between n and the log (a frozen state) is moved aside."""
    index, n = 5, 8
    assert first_bad_step(index) == n  # the last step of a call of 4; the host sees it at 12
    kw = dict(max_epochs=2, steps_per_execution=spe, log_every_n_steps=12)
    every = 8  # a step save of the frozen state, before the log that sees the bad step

    def callbacks():
        return [NaNGuard("stop"), ModelCheckpoint(every_n_steps=every, save_top_k=-1)]

    run = tmp_path / "run"
    with pytest.warns(ResumeWarning, match=rf"\[{every}\].*undid \(it ends at step {n - 1}\)"):
        first, history = fit(run, callbacks=callbacks(), data=bad_data(index), **kw)
    assert first.should_stop and history.epoch == [0]
    assert list_steps(run / "checkpoints")[-1] == n - 1
    meta = read_meta(run / "checkpoints")
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (n - 1, 0, n - 1)

    again, again_history = fit(
        run, callbacks=callbacks(), data=bad_data(index), resume=True, seed=3, **kw
    )
    assert again.global_step == first.global_step  # stopped where the first fit stopped
    assert again_history.history == history.history
    assert_bitwise(child.state_arrays(again), child.state_arrays(first))
    assert list_steps(run / "checkpoints")[-1] == n - 1

    clean, clean_history = fit(tmp_path / "clean", callbacks=callbacks(), **kw)
    fixed, fixed_history = fit(run, callbacks=callbacks(), resume=True, seed=3, **kw)
    assert fixed.global_step == 2 * N_BATCHES
    assert_bitwise(child.state_arrays(fixed), child.state_arrays(clean))
    assert fixed_history.history == clean_history.history
