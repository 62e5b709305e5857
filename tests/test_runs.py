"""One fit, one run: an earlier run in the workdir is kept in ``version_N`` (never overwritten
or mixed), the newest run is at the top where ``resume=True`` finds it, and a resumed fit
says where it continues from."""

from __future__ import annotations

import io
import os

from models import Classifier, toy_data
from rich.console import Console

import nnxfit
from nnxfit.callbacks import ModelCheckpoint, TensorBoardLogger
from nnxfit.checkpoint import list_steps

X, Y = toy_data(32)


def fit(workdir, resume=False, max_epochs=1, tensorboard=False):
    out = io.StringIO()
    callbacks = [ModelCheckpoint()] + ([TensorBoardLogger()] if tensorboard else [])
    trainer = nnxfit.Trainer(
        max_epochs=max_epochs,
        workdir=workdir,
        callbacks=callbacks,
        console=Console(file=out, force_terminal=True, width=100),
        progress_bar=False,
    )
    trainer.fit(Classifier(), (X, Y), batch_size=16, resume=resume)
    return trainer, out.getvalue()


def test_a_fresh_fit_keeps_the_earlier_run_in_a_version_folder(tmp_path):
    _, said = fit(tmp_path, tensorboard=True)
    assert "earlier run" not in said
    first_csv = (tmp_path / "metrics.csv").read_text()
    (tmp_path / "notes.txt").write_text("mine")  # not a run file: stays

    _, said = fit(tmp_path, max_epochs=2)
    v0 = tmp_path / "version_0"
    assert sorted(os.listdir(v0)) == ["checkpoints", "metrics.csv", "tensorboard"]
    assert (v0 / "metrics.csv").read_text() == first_csv
    assert list_steps(v0 / "checkpoints") == [2]
    assert list_steps(tmp_path / "checkpoints") == [4]  # the new run, at the top
    assert (tmp_path / "metrics.csv").read_text() != first_csv
    assert not (tmp_path / "tensorboard").exists()  # its events never mix with the old ones
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert f"moved its files (checkpoints, metrics.csv, tensorboard) to {v0}" in said
    assert "fit(..., resume=True) continues a run" in said

    fit(tmp_path)
    assert list_steps(tmp_path / "version_1" / "checkpoints") == [4]

    # Resuming continues the newest run, at the top, and moves nothing.
    trainer, said = fit(tmp_path, resume=True, max_epochs=2)
    assert trainer.resumed_from == str(tmp_path / "checkpoints" / "2")
    assert trainer.global_step == 4
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("version_")) == [
        "version_0",
        "version_1",
    ]
    assert list_steps(tmp_path / "checkpoints") == [4]


def test_a_resumed_fit_says_from_which_checkpoint_and_step(tmp_path):
    fit(tmp_path)
    trainer, said = fit(tmp_path, resume=True, max_epochs=2)
    assert trainer.resumed_from == str(tmp_path / "checkpoints" / "2")
    assert f"Resumed from {tmp_path / 'checkpoints' / '2'}: step 2, epoch 1" in said
    assert "earlier run" not in said
