"""Profiler callback: a jax.profiler trace of a window of steps lands in workdir/profile."""

from __future__ import annotations

import glob
import os

import jax
import pytest
from models import Classifier, toy_data

import nnxfit
from nnxfit.callbacks.profiler import Profiler
from nnxfit.data import ArrayLoader
from nnxfit.errors import ConfigError


def _traces(d):
    return glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)


class StepLog(nnxfit.Callback):
    """Records which steps ran while a trace was active (jax's own profiler state)."""

    order = 1000

    def __init__(self):
        self.traced = []

    def on_train_batch_end(self, trainer, module, step, logs):
        from jax._src import profiler as jprof

        if jprof._profile_state.profile_session is not None:
            self.traced.append(step)


def test_trace_of_the_window_lands_in_workdir(tmp_path):
    x, y = toy_data(64)
    prof, log = Profiler(start_step=3, num_steps=4), StepLog()
    tr = nnxfit.Trainer(max_steps=12, workdir=tmp_path, progress_bar=False, callbacks=[prof, log])
    tr.fit(Classifier(), ArrayLoader((x, y), batch_size=16))
    assert prof.trace_dir == str(tmp_path / "profile")
    files = _traces(tmp_path / "profile")
    assert len(files) == 1 and os.path.getsize(files[0]) > 0
    # Active from the hook of step 3 to the hook of step 7: steps 4-7 ran inside the trace.
    assert log.traced == [3, 4, 5, 6]
    # The trace is closed: a new one can start in this process.
    jax.profiler.start_trace(str(tmp_path / "again"))
    jax.profiler.stop_trace()


def test_fit_shorter_than_the_window_still_writes_and_stops(tmp_path):
    x, y = toy_data(32)
    prof = Profiler(start_step=0, num_steps=100, dirname=str(tmp_path / "abs"))
    tr = nnxfit.Trainer(max_steps=3, progress_bar=False, callbacks=[prof], steps_per_execution=2)
    tr.fit(Classifier(), ArrayLoader((x, y), batch_size=8))
    assert len(_traces(tmp_path / "abs")) == 1
    jax.profiler.start_trace(str(tmp_path / "again"))  # raises if the trace were still open
    jax.profiler.stop_trace()


def test_trace_is_stopped_when_fit_raises(tmp_path):
    class Boom(nnxfit.Callback):
        def on_train_batch_end(self, trainer, module, step, logs):
            if step == 3:
                raise RuntimeError("boom")

    x, y = toy_data(32)
    tr = nnxfit.Trainer(
        max_steps=10,
        workdir=tmp_path,
        progress_bar=False,
        callbacks=[Profiler(start_step=1, num_steps=5), Boom()],
    )
    with pytest.raises(RuntimeError, match="boom"):
        tr.fit(Classifier(), ArrayLoader((x, y), batch_size=8))
    assert len(_traces(tmp_path / "profile")) == 1
    jax.profiler.start_trace(str(tmp_path / "again"))
    jax.profiler.stop_trace()


@pytest.mark.parametrize("kw", [{"start_step": -1}, {"num_steps": 0}, {"num_steps": 1.5}])
def test_bad_window_is_a_config_error(kw):
    with pytest.raises(ConfigError, match="Profiler"):
        Profiler(**kw)
