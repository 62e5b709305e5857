"""A resume says what differs from the run that saved the checkpoint, and which value wins:
the ArrayLoader's seed (the checkpoint's), its shuffle and drop_last, the batch size, the
mesh and device count (the new ones). Each ``ResumeWarning`` points at the user's fit line."""

from __future__ import annotations

import os
import shutil
import sys
import warnings

import jax
import pytest
from models import toy_data

import nnxfit
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.checkpoint import ResumeWarning, read_meta
from nnxfit.data import ArrayLoader
from nnxfit.resume import warn_on_drift

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import train_and_signal as child  # noqa: E402

FIT = dict(progress_bar=False, log_every_n_steps=3)


def loader(**kw):
    x, y = toy_data(100, seed=3)
    return ArrayLoader((x, y), **{"batch_size": 16, "shuffle": True, "seed": 1, **kw})


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A workdir with the checkpoint of one epoch (loader seed 1, batch 16, shuffled)."""
    workdir = tmp_path_factory.mktemp("one_epoch")
    trainer = nnxfit.Trainer(workdir=workdir, callbacks=[ModelCheckpoint()], max_epochs=1, **FIT)
    trainer.fit(child.make_module(), loader())
    return workdir


def resume(tmp_path, one_epoch, data):
    workdir = tmp_path / "run"
    shutil.copytree(one_epoch, workdir)
    trainer = nnxfit.Trainer(workdir=workdir, callbacks=[ModelCheckpoint()], max_epochs=2, **FIT)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(child.make_module(seed=7), data, resume=True)
    said = [w for w in record if issubclass(w.category, ResumeWarning)]
    for w in said:
        assert w.filename == __file__, (w.filename, w.lineno)  # the fit line above
    return trainer, [str(w.message) for w in said]


def test_a_changed_loader_seed_is_overridden_by_the_checkpoints_and_says_so(tmp_path, one_epoch):
    data = loader(seed=2)
    trainer, said = resume(tmp_path, one_epoch, data)
    ckpt = tmp_path / "run" / "checkpoints" / "7"
    assert said == [
        f"resuming {ckpt}: the ArrayLoader has seed=2 but the checkpoint's loader state has "
        "seed=1; the checkpoint's seed 1 is used, so the batches continue in the saved run's "
        "order. To shuffle with seed=2, start a fresh fit (resume=False) or use another workdir."
    ]
    assert data.seed == 1 and trainer.global_step == 14


def test_changed_loader_settings_warn_and_the_new_ones_are_used(tmp_path, one_epoch):
    data = loader(batch_size=20, shuffle=False, drop_last=True)
    trainer, said = resume(tmp_path, one_epoch, data)
    ckpt = tmp_path / "run" / "checkpoints" / "7"
    assert said == [
        f"resuming {ckpt} with settings that differ from the run that saved it (batch_size: "
        "16 -> 20; ArrayLoader shuffle: True -> False; ArrayLoader drop_last: False -> True); "
        "training continues with the new settings, but not bit for bit as the uninterrupted "
        "run would have."
    ]
    assert (data.batch_size, data.shuffle) == (20, False) and trainer.global_step == 7 + 5


def test_an_unchanged_resume_says_nothing(tmp_path, one_epoch):
    assert resume(tmp_path, one_epoch, loader())[1] == []


@pytest.fixture(scope="module")
def finished(one_epoch):
    """A Trainer after a fit with no mesh on this one device, and the checkpoint's meta."""
    trainer = nnxfit.Trainer(max_steps=1, **FIT)
    trainer.fit(child.make_module(), loader())
    trainer.resumed_from = "ckpt"
    return trainer, read_meta(one_epoch / "checkpoints")


def test_a_mesh_or_device_change_warns(finished):
    trainer, meta = finished
    meta["trainer"].update(mesh={"data": 4}, num_devices=4)  # as saved on 4 devices
    with pytest.warns(ResumeWarning) as record:
        warn_on_drift(meta, trainer)
    assert len(record) == 1 and record[0].filename == __file__
    n = jax.device_count()  # 1, or more where another test forced host devices
    assert str(record[0].message) == (
        "resuming ckpt with settings that differ from the run that saved it (mesh: {'data': "
        f"4}} on 4 device(s) -> None on {n} device(s)); training continues with the new "
        "settings, but not bit for bit as the uninterrupted run would have."
    )


def test_without_a_mesh_the_device_count_changes_nothing(finished):
    trainer, meta = finished
    meta["trainer"].update(mesh=None, num_devices=8)  # one device is used either way
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        warn_on_drift(meta, trainer)
