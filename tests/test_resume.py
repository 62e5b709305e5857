"""Exact resume: interrupted-then-resumed ends bit for bit where the uninterrupted run ends
(params, BatchNorm statistics, RNG keys and counts, optimizer state), with dropout, shuffling,
BatchNorm and a short last batch; History and metrics.csv continue without gaps or duplicates."""

from __future__ import annotations

import os
import shutil
import sys
import types
import warnings

import jax
import numpy as np
import pytest
from flax import nnx
from models import MLP, Classifier, SignalAt

import nnxfit
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.checkpoint import CheckpointMismatchError, ResumeWarning, list_steps, read_meta

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import train_and_signal as child  # noqa: E402

FIT = dict(max_epochs=3, progress_bar=False, log_every_n_steps=3)  # 7 batches an epoch


class Boom(Exception):
    pass


class CrashAt(SignalAt):
    def on_train_batch_end(self, trainer, module, step, logs):
        if step == self.step:
            raise Boom(f"boom at {step}")


class EpochEnds(nnxfit.Callback):
    """Stateful: which epoch ends it has seen; a resume must neither repeat nor skip one."""

    order = 10

    def __init__(self):
        self.seen = []

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        self.seen.append(epoch)

    def state_dict(self):
        return {"seen": list(self.seen)}

    def load_state_dict(self, state):
        self.seen = list(state["seen"])


class Batches(nnxfit.Callback):
    calls = 0

    def on_train_batch_end(self, trainer, module, step, logs):
        self.calls += 1


def fit(workdir, callbacks=(), seed=0, module=None, resume=False, **kw):
    trainer = nnxfit.Trainer(workdir=workdir, callbacks=list(callbacks), **{**FIT, **kw})
    module = module if module is not None else child.make_module(seed=seed)
    history = trainer.fit(module, child.train_data(), child.val_data(), resume=resume)
    return trainer, history


def run_reference(workdir, **kw):
    trainer, history = fit(workdir, [ModelCheckpoint(save_top_k=-1)], **kw)
    return types.SimpleNamespace(
        arrays=child.state_arrays(trainer),
        history=history,
        csv=(workdir / "metrics.csv").read_text(),
        traces=trainer.programs.trace_count,
        workdir=workdir,
    )


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return run_reference(tmp_path_factory.mktemp("ref"))


def assert_bitwise(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), i


# The resumed spe3-accum2 run starts on the short-batch group, so its second shape shows up as
# a "recompile" to CompileWatch; the trace count below pins that it compiles no more programs.
@pytest.mark.filterwarnings("ignore::nnxfit.compile_watch.RecompileWarning")
@pytest.mark.parametrize(
    "variant, stop_at, position",
    [
        ({}, 10, (1, 3)),
        # 4 optimizer steps an epoch (pairs of batches, the short 7th alone), run as calls of
        # 3 steps then 1: step 7 is batch 6 of epoch 1.
        ({"steps_per_execution": 3, "grad_accum_steps": 2}, 7, (1, 6)),
    ],
    ids=["plain", "spe3-accum2"],
)
def test_interrupted_mid_epoch_then_resumed_equals_the_uninterrupted_run(
    tmp_path, ref, variant, stop_at, position
):
    want = ref if not variant else run_reference(tmp_path / "ref", **variant)
    workdir = tmp_path / "run"
    with pytest.raises(nnxfit.TrainingInterrupted):
        fit(workdir, [ModelCheckpoint(monitor="val_loss"), SignalAt(stop_at)], **variant)
    meta = read_meta(workdir / "checkpoints")
    assert meta["step"] == stop_at
    assert (meta["epoch"], meta["batch_in_epoch"]) == position  # the middle of an epoch

    # Another init seed: everything must come from the checkpoint.
    trainer, history = fit(
        workdir, [ModelCheckpoint(monitor="val_loss")], seed=7, resume=True, **variant
    )
    assert trainer.resumed_from == str(workdir / "checkpoints" / str(stop_at))
    assert_bitwise(child.state_arrays(trainer), want.arrays)
    assert history.epoch == [0, 1, 2]
    assert history.history == want.history.history
    assert (workdir / "metrics.csv").read_text() == want.csv
    assert trainer.programs.trace_count == want.traces  # restored arrays compile no new program


def test_a_crash_after_an_epoch_checkpoint_resumes_without_repeating_the_epoch_end(tmp_path, ref):
    first = EpochEnds()
    with warnings.catch_warnings(record=True) as record, pytest.raises(Boom):
        warnings.simplefilter("always")
        fit(tmp_path, [ModelCheckpoint(), first, CrashAt(17)], resume=True)
    said = [str(w.message) for w in record if issubclass(w.category, ResumeWarning)]
    assert len(said) == 1 and "no checkpoint in" in said[0] and "starting fresh" in said[0]
    assert first.seen == [0, 1]
    meta = read_meta(tmp_path / "checkpoints")
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (14, 2, 0)

    again = EpochEnds()
    trainer, history = fit(tmp_path, [ModelCheckpoint(), again], seed=7, resume=True)
    assert again.seen == [0, 1, 2]  # restored [0, 1], then only epoch 2 ended
    assert_bitwise(child.state_arrays(trainer), ref.arrays)
    assert history.history == ref.history.history
    assert (tmp_path / "metrics.csv").read_text() == ref.csv


def test_resume_from_an_older_checkpoint_path_moves_the_newer_ones_aside(tmp_path, ref):
    workdir = tmp_path / "run"
    shutil.copytree(ref.workdir, workdir)
    ckpts = workdir / "checkpoints"
    assert list_steps(ckpts) == [7, 14, 21]
    with pytest.warns(ResumeWarning, match=r"\[14, 21\].*newer than the resumed"):
        trainer, history = fit(
            workdir, [ModelCheckpoint(save_top_k=-1)], seed=7, resume=ckpts / "7"
        )
    assert trainer.resumed_from == str(ckpts / "7")
    aside = [p for p in os.listdir(workdir) if p.startswith("checkpoints.previous-")]
    assert len(aside) == 1 and sorted(os.listdir(workdir / aside[0])) == ["14", "21"]
    assert list_steps(ckpts) == [7, 14, 21]  # written again by this run
    assert_bitwise(child.state_arrays(trainer), ref.arrays)
    assert history.history == ref.history.history


class Wide(Classifier):
    def __init__(self, seed=0):
        super().__init__(seed=seed, dropout=0.5, batchnorm=True)
        self.net = MLP(8, 32, 3, rngs=nnx.Rngs(seed), dropout=0.5, batchnorm=True)


def snapshot(path):
    return sorted(
        (
            os.path.relpath(os.path.join(r, f), path),
            os.path.getsize(os.path.join(r, f)),
            os.path.getmtime(os.path.join(r, f)),
        )
        for r, _, files in os.walk(path)
        for f in files
        if not f.startswith(".nnxfit.lock")  # each fit takes the workdir's lock (workdir.py)
    )


def host(module):
    return [
        np.array(
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        )
        for x in jax.tree.leaves(nnx.state(module))
    ]


@pytest.mark.parametrize(
    "make, where, shapes",
    [
        (lambda: Wide(seed=3), "module/params/net/bn/bias", ("(16,)", "(32,)")),
        (lambda: Classifier(seed=3, dropout=0.5, batchnorm=True, opt="sgd"), "train/opt/0", ()),
    ],
    ids=["wider-layer", "other-optimizer"],
)
def test_a_checkpoint_that_does_not_match_fails_before_anything_changes(ref, make, where, shapes):
    module = make()
    before_module, before_disk = host(module), snapshot(ref.workdir)
    with pytest.raises(CheckpointMismatchError) as err:
        fit(ref.workdir, [ModelCheckpoint(save_top_k=-1)], module=module, resume=True)
    msg = str(err.value)
    assert where in msg and str(ref.workdir / "checkpoints" / "21") in msg
    assert all(s in msg for s in shapes)
    assert isinstance(err.value, nnxfit.CheckpointError)
    assert_bitwise(host(module), before_module)
    assert snapshot(ref.workdir) == before_disk


def test_resuming_a_finished_run_trains_nothing_and_warns_about_changed_settings(tmp_path, ref):
    workdir = tmp_path / "run"
    shutil.copytree(ref.workdir, workdir)
    counter = Batches()
    # No ModelCheckpoint attached: resume looks in <workdir>/checkpoints.
    with pytest.warns(ResumeWarning, match=r"grad_clip_norm: None -> 1\.0"):
        trainer, history = fit(workdir, [counter], seed=7, resume=True, grad_clip_norm=1.0)
    assert trainer.resumed_from == str(workdir / "checkpoints" / "21")
    assert counter.calls == 0 and trainer.global_step == 21
    assert history.history == ref.history.history
    assert list_steps(workdir / "checkpoints") == [7, 14, 21]
    assert (workdir / "metrics.csv").read_text() == ref.csv
    assert_bitwise(child.state_arrays(trainer), ref.arrays)


def test_bad_resume_arguments_are_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(nnxfit.CheckpointError, match=f"{missing}.*does not exist"):
        fit(tmp_path, resume=missing)
    with pytest.raises(nnxfit.ConfigError, match="workdir is None"):
        fit(None, resume=True)
    with pytest.raises(nnxfit.ConfigError, match="takes True, False or a checkpoint path"):
        fit(tmp_path, resume=3)
