"""ModelCheckpoint: when it saves, what it keeps, what a checkpoint holds, load_checkpoint,
and the errors for bad options."""

from __future__ import annotations

import os
import sys
import warnings

import jax
import numpy as np
import pytest
from flax import nnx
from models import Classifier, toy_data

import nnxfit
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.checkpoint import (
    CheckpointInfo,
    ResumeWarning,
    list_steps,
    load_checkpoint,
    read_meta,
    tmp_dirs,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import train_and_signal as child  # noqa: E402

# Validation score per epoch: best-2 (min) are epochs 1 and 2; epoch 3 is NaN.
SCORES = [0.9, 0.3, 0.5, float("nan"), 0.8]


class Scored(Classifier):
    def validation_step(self, batch):
        x, y, score = batch
        return {"score": score.mean(), **super().validation_step((x, y))}


def scored_val(trainer_box):
    """Validation batches whose ``score`` is SCORES[current epoch]."""
    x, y = toy_data(8, seed=5)

    def batches():
        s = SCORES[trainer_box[0].current_epoch]
        return [(x, y, np.full((8,), s, np.float32))]

    return batches


def host(module):
    out = []
    for x in jax.tree.leaves(nnx.state(module)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.array(x, copy=True))
    return out


def assert_bitwise(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), i


class EpochSnapshots(nnxfit.Callback):
    """Host copies of the module's state at each epoch end: what an epoch checkpoint holds."""

    def __init__(self):
        self.at = {}

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        self.at[trainer.global_step] = host(module)


class CrashAt(nnxfit.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, step, logs):
        if step == self.step:
            raise RuntimeError(f"crash at {step}")


def test_top_k_by_a_monitored_metric_survives_a_restart_and_never_ranks_nan_best(tmp_path):
    x, y = toy_data(32, seed=2)  # 2 steps an epoch: epoch e ends at step 2e + 2
    snaps = EpochSnapshots()

    def run(callbacks, resume=False):
        box = []
        trainer = nnxfit.Trainer(
            max_epochs=5, workdir=tmp_path, progress_bar=False, callbacks=callbacks
        )
        box.append(trainer)
        module = Scored(seed=len(snaps.at))
        val = scored_val(box)
        trainer.fit(module, nnxfit.data.ArrayLoader((x, y), 16), val, resume=resume)
        return trainer, module

    def best_only():  # the newest is kept during the fit (to resume), dropped at its end
        return ModelCheckpoint(
            monitor="val_score", save_top_k=1, save_last=False, dirname="best_only"
        )

    first = ModelCheckpoint(monitor="val_score", save_top_k=2)
    with pytest.raises(RuntimeError, match="crash at 7"):
        run([first, best_only(), snaps, CrashAt(7)])
    ckpts = tmp_path / "checkpoints"
    assert list_steps(ckpts) == [4, 6]  # step 2 (0.9) fell out of the best two
    assert list_steps(tmp_path / "best_only") == [4, 6]
    mc, lean = ModelCheckpoint(monitor="val_score", save_top_k=2), best_only()
    trainer, module = run([mc, lean, snaps], resume=True)
    assert list_steps(tmp_path / "best_only") == [4] and lean.last_model_path is None
    assert trainer.resumed_from == str(ckpts / "6")
    # Best two (0.3 at 4, 0.5 at 6) and the last; the NaN epoch (8) was only ever "last".
    assert list_steps(ckpts) == [4, 6, 10] and not tmp_dirs(ckpts)
    assert mc.best_model_score == pytest.approx(0.3) and mc.best_model_step == 4
    assert mc.best_model_path == str(ckpts / "4") and mc.last_model_path == str(ckpts / "10")
    assert read_meta(ckpts / "10")["metrics"]["val_score"] == pytest.approx(0.8)

    fresh = Scored(seed=11)
    info = load_checkpoint(fresh, tmp_path)  # which="best"
    assert info == CheckpointInfo(str(ckpts / "4"), 4, info.metrics)
    assert info.metrics["val_score"] == pytest.approx(0.3)
    assert_bitwise(host(fresh), snaps.at[4])
    assert load_checkpoint(fresh, ckpts, which=6).step == 6
    assert_bitwise(host(fresh), snaps.at[6])
    assert load_checkpoint(fresh, ckpts, which="last").step == 10
    assert_bitwise(host(fresh), host(module))
    with pytest.raises(nnxfit.CheckpointError, match=r"no checkpoint at step 8.*\[4, 6, 10\]"):
        load_checkpoint(fresh, ckpts, which=8)
    with pytest.raises(nnxfit.ConfigError, match="'best', 'last' or a step number"):
        load_checkpoint(fresh, ckpts, which="first")


class WatchDir(nnxfit.Callback):
    """Lists the complete checkpoints of a folder after every call."""

    order = 60

    def __init__(self, directory):
        self.directory, self.seen = directory, []

    def on_train_batch_end(self, trainer, module, step, logs):
        self.seen.append(list_steps(self.directory))


def test_save_cadence_every_n_steps_every_n_epochs_and_retention(tmp_path):
    cks = {
        "s3": ModelCheckpoint(every_n_steps=3, save_top_k=-1, dirname="s3"),
        "s7": ModelCheckpoint(every_n_steps=7, save_top_k=-1, dirname="s7"),
        "e2": ModelCheckpoint(every_n_epochs=2, save_top_k=-1, dirname="e2"),
        "keep1": ModelCheckpoint(every_n_steps=2, dirname="keep1"),
    }
    watch = WatchDir(tmp_path / "keep1")
    trainer = nnxfit.Trainer(
        max_epochs=3, workdir=tmp_path, progress_bar=False, callbacks=[*cks.values(), watch]
    )
    trainer.fit(child.make_module(), child.train_data(), child.val_data())  # 7 steps an epoch

    def steps(name):
        return list_steps(tmp_path / name)

    def position(name, step):
        meta = read_meta(tmp_path / name / str(step))
        return meta["epoch"], meta["batch_in_epoch"]

    assert steps("s3") == [3, 6, 9, 12, 15, 18, 21]
    assert position("s3", 6) == (0, 6)  # mid-epoch: taken at once
    # A save due on an epoch's last call is taken after the epoch end, as the next epoch's
    # start, with the epoch's metrics.
    assert steps("s7") == [7, 14, 21]
    assert [position("s7", s) for s in (7, 14, 21)] == [(1, 0), (2, 0), (3, 0)]
    assert "val_loss" in read_meta(tmp_path / "s7" / "14")["metrics"]
    assert steps("e2") == [14, 21]  # after epoch 1, and the last at the end of fit
    # save_top_k=1, no monitor: one checkpoint in the end, and never none once the first
    # exists: the old one goes only after its successor is complete.
    assert steps("keep1") == [21]
    first = next(i for i, s in enumerate(watch.seen) if s)
    assert all(watch.seen[first:])
    newest = [max(s) for s in watch.seen[first:]]
    assert newest == sorted(newest)
    assert all(not tmp_dirs(tmp_path / name) for name in ("s3", "s7", "e2", "keep1"))

    meta = read_meta(tmp_path / "s3")  # the newest: what every checkpoint records
    assert meta["kind"] == "full" and meta["step"] == 21
    assert set(meta["versions"]) >= {"nnxfit", "jax", "flax", "optax", "orbax-checkpoint"}
    assert meta["trainer"]["max_epochs"] == 3 and meta["trainer"]["batch_size"] == 16
    assert meta["time"] > 0 and meta["loop"]["global_step"] == 21
    assert set(meta["loop"]["callbacks"]) >= {"ModelCheckpoint", "ModelCheckpoint_2"}
    assert meta["loop"]["loader"]["seed"] == 1
    assert meta["loop"]["history"]["epoch"] == [0, 1, 2]


def test_weights_only_checkpoints_load_but_do_not_resume(tmp_path):
    mc = ModelCheckpoint(save_weights_only=True)
    kw = dict(max_epochs=1, workdir=tmp_path, progress_bar=False)
    module = child.make_module()
    nnxfit.Trainer(callbacks=[mc], **kw).fit(module, child.train_data(), child.val_data())
    step_dir = tmp_path / "checkpoints" / "7"
    assert sorted(p for p in os.listdir(step_dir) if not p.startswith(("_", "commit"))) == [
        "meta",
        "module",
    ]
    fresh = child.make_module(seed=5)
    assert load_checkpoint(fresh, step_dir).step == 7
    assert_bitwise(host(fresh), host(module))

    with pytest.raises(nnxfit.CheckpointError, match="weights only"):
        nnxfit.Trainer(callbacks=[ModelCheckpoint()], **kw).fit(
            child.make_module(), child.train_data(), resume=True
        )
    assert list_steps(tmp_path / "checkpoints") == [7]  # a failed resume deletes nothing

    # A fresh fit in the workdir of another run keeps that run in version_0, never deletes it.
    nnxfit.Trainer(callbacks=[ModelCheckpoint()], **kw).fit(child.make_module(), child.train_data())
    assert list_steps(tmp_path / "version_0" / "checkpoints") == [7]
    assert list_steps(tmp_path / "checkpoints") == [7]
    assert read_meta(tmp_path / "checkpoints")["kind"] == "full"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"save_top_k": -2}, "save_top_k must be an integer >= -1"),
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
        ({"every_n_epochs": -1}, "every_n_epochs must be an integer >= 1"),
        ({"mode": "maximum"}, r"mode must be one of \('min', 'max', 'auto'\); got 'maximum'"),
        ({"monitor": "val_thing", "mode": "auto"}, "cannot tell whether 'val_thing'"),
        ({"save_top_k": 0, "save_last": False}, "would keep no checkpoint"),
        ({"dirname": ""}, "dirname is empty"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, match):
    with pytest.raises(nnxfit.ConfigError, match=match):
        ModelCheckpoint(**kwargs)


def test_mode_auto_reads_the_direction_from_the_name():
    assert ModelCheckpoint(monitor="val_accuracy", mode="auto").mode == "max"
    assert ModelCheckpoint(monitor="val_loss", mode="auto").mode == "min"


class Batches(nnxfit.Callback):
    calls = 0

    def on_train_batch_end(self, trainer, module, step, logs):
        self.calls += 1


def test_bad_setups_fail_before_training(tmp_path):
    def fit(workdir, mc, val=True):
        counter = Batches()
        trainer = nnxfit.Trainer(
            max_epochs=1, workdir=workdir, progress_bar=False, callbacks=[mc, counter]
        )
        try:
            trainer.fit(child.make_module(), child.train_data(), child.val_data() if val else None)
        finally:
            assert counter.calls == 0

    with pytest.raises(nnxfit.ConfigError) as err:
        fit(tmp_path, ModelCheckpoint(monitor="val_acc"))
    msg = str(err.value)
    assert "monitor='val_acc' names no logged metric" in msg and "Did you mean" in msg
    assert all(n in msg for n in ("'loss'", "'accuracy'", "'val_loss'", "'val_accuracy'"))
    assert not list_steps(tmp_path / "checkpoints")

    with pytest.raises(nnxfit.ConfigError, match="is a validation metric but fit got no val_data"):
        fit(tmp_path, ModelCheckpoint(monitor="val_loss"), val=False)

    with pytest.raises(nnxfit.ConfigError, match=r"needs a place to write: pass Trainer\(workdir"):
        fit(None, ModelCheckpoint())

    (tmp_path / "taken").write_text("a file")
    with pytest.raises(nnxfit.ConfigError, match="taken is a file"):
        fit(tmp_path, ModelCheckpoint(dirname="taken"))
    with pytest.raises(nnxfit.ConfigError, match="exists and is a file"):
        fit(tmp_path / "taken", ModelCheckpoint())


def test_fast_dev_run_writes_no_checkpoint(tmp_path):
    trainer = nnxfit.Trainer(
        fast_dev_run=True, workdir=tmp_path, progress_bar=False, callbacks=[ModelCheckpoint()]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        trainer.fit(child.make_module(), child.train_data())
    assert not (tmp_path / "checkpoints").exists()


def test_step_saves_hold_the_state_of_their_step_while_the_device_runs_ahead(tmp_path):
    """ModelCheckpoint(every_n_steps) needs the device in step only at its save steps: in
    between, the device runs ahead of the hooks, and each checkpoint still holds exactly the
    state after its step."""
    x, y = toy_data(96)
    data = nnxfit.data.ArrayLoader((x, y), 8, shuffle=True)  # 12 steps per epoch

    class Lag(nnxfit.Callback):
        records_only = True
        lags: dict = {}

        def on_train_batch_end(self, trainer, module, step, logs):
            self.lags[step] = trainer.dispatch_step - step

    ckpt = ModelCheckpoint(every_n_steps=5, save_top_k=-1)
    trainer = nnxfit.Trainer(
        max_epochs=2, progress_bar=False, workdir=tmp_path, callbacks=[ckpt, Lag()]
    )
    trainer.fit(Classifier(dropout=0.2), data)
    assert max(Lag.lags.values()) > 0
    assert [Lag.lags[s] for s in (5, 10, 15, 20)] == [0, 0, 0, 0]

    # A fit of exactly 15 steps ends in the state the checkpoint of step 15 holds.
    ref = Classifier(dropout=0.2)
    nnxfit.Trainer(max_steps=15, progress_bar=False).fit(ref, data)
    saved = Classifier(dropout=0.2)
    load_checkpoint(saved, tmp_path / "checkpoints", which=15)
    assert_bitwise(host(saved), host(ref))


class Wide(Classifier):
    """Mostly zeros (a 256x1024 kernel that stays zero: lr 0): compressible, if compressed."""

    def __init__(self):
        super().__init__(lr=0.0)
        self.wide = nnx.Param(np.zeros((256, 1024), np.float32))


def dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("compress", [False, True])
def test_arrays_are_written_uncompressed_unless_asked(tmp_path, compress):
    """Float weights hardly compress and zstd takes CPU from training while the save runs,
    so arrays go out raw by default; compress=True has orbax zstd them. Both load back."""
    module = Wide()
    trainer = nnxfit.Trainer(
        max_steps=1,
        workdir=tmp_path,
        progress_bar=False,
        callbacks=[ModelCheckpoint(compress=compress, save_weights_only=True)],
    )
    x, y = toy_data(8)
    trainer.fit(module, [(x, y)])
    raw = 256 * 1024 * 4
    size = dir_bytes(tmp_path / "checkpoints")
    assert size < raw / 10 if compress else size > raw
    restored = Wide()
    load_checkpoint(restored, tmp_path / "checkpoints")
    assert_bitwise(host(restored), host(module))
