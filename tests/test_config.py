"""Trainer options: one validated, frozen ``TrainerConfig`` (``nnxfit/config.py``)."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

import nnxfit
from nnxfit.callbacks import ModelCheckpoint, Profiler, ThroughputMonitor
from nnxfit.config import EXACTNESS_OPTIONS, OPTION_NAMES, TrainerConfig, trainer_options
from nnxfit.data import ArrayLoader
from nnxfit.errors import ConfigError


def test_the_trainer_takes_exactly_the_config_options_with_the_same_defaults():
    params = inspect.signature(nnxfit.Trainer).parameters
    options = {n: p.default for n, p in params.items() if n != "callbacks"}
    fields = {f.name: f.default for f in dataclasses.fields(TrainerConfig)}
    assert options == fields


def test_options_read_and_set_through_the_trainer_are_validated():
    trainer = nnxfit.Trainer(max_epochs=2, fast_dev_run=False)
    assert trainer.max_epochs == trainer.config.max_epochs == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        trainer.config.max_epochs = 3
    trainer.max_epochs = 5  # a longer fit next time: a new config
    assert trainer.config.max_epochs == 5
    with pytest.raises(ConfigError, match=r"max_epochs must be an integer >= 1; got 0"):
        trainer.max_epochs = 0
    assert trainer.max_epochs == 5
    assert set(OPTION_NAMES) <= set(dir(trainer))


def test_fast_dev_run_expands_into_the_limits():
    c = TrainerConfig(fast_dev_run=True, grad_accum_steps=2)
    assert (c.fast_dev_run, c.max_epochs, c.max_steps) == (1, 1, 1)
    assert (c.limit_train_batches, c.limit_val_batches) == (2, 1)


def test_a_checkpoint_records_the_tagged_options_and_the_run_facts():
    trainer = nnxfit.Trainer(max_steps=3, seed=4, precision="bfloat16", progress_bar=False)
    trainer.train_data = ArrayLoader(np.ones((2, 1)), batch_size=1, seed=7)
    out = trainer_options(trainer)
    assert out["seed"] == 4 and out["precision"] == "bfloat16" and out["max_steps"] == 3
    assert "workdir" not in out and "console" not in out and "progress_bar" not in out
    assert out["loader"] == {"seed": 7, "shuffle": False, "batch_size": 1, "drop_last": False}
    assert {"batch_size", "mesh", "num_devices"} <= set(out)
    assert set(EXACTNESS_OPTIONS) == {
        "seed",
        "batch_size",
        "steps_per_execution",
        "grad_accum_steps",
        "grad_clip_norm",
        "precision",
    }


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ModelCheckpoint(every_n_steps=True), "every_n_steps must be an integer >= 1 or"),
        (lambda: Profiler(num_steps=0), "Profiler num_steps must be an integer >= 1; got 0"),
        (lambda: ThroughputMonitor(window=1.5), "window must be an integer >= 1; got 1.5"),
        (
            lambda: ArrayLoader(np.ones((2, 1)), batch_size=True),
            "batch_size must be an integer >= 1",
        ),
        (lambda: nnxfit.Trainer(max_steps=2, prefetch=-1), "prefetch must be an integer >= 0"),
    ],
)
def test_one_check_for_counts(make, message):
    with pytest.raises(ConfigError, match=message):
        make()
