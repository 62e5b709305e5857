"""A resumed fit compiles each program once, as a fresh fit does."""

from __future__ import annotations

import warnings

from models import Classifier, toy_data

import nnxfit
from nnxfit.callbacks import ModelCheckpoint
from nnxfit.data import ArrayLoader


def test_a_resumed_fit_compiles_each_program_once(tmp_path):
    # Three full batches an epoch: no short batch whose program would compile on its own.
    x, y = toy_data(96)

    def fit(max_epochs, resume):
        trainer = nnxfit.Trainer(
            workdir=tmp_path, max_epochs=max_epochs, callbacks=[ModelCheckpoint()]
        )
        trainer.fit(Classifier(), ArrayLoader((x, y), batch_size=32), resume=resume)

    fit(2, resume=False)
    # The restored arrays came back committed to their device while the metric sums that the
    # step zeroes at each log are not: the second epoch's calls compiled the step again.
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnxfit.RecompileWarning)
        fit(4, resume=True)
