"""Faults: a real SIGTERM, SIGKILL during a save, an exception in a callback, corrupt
checkpoints. Subprocess runs use tests/scripts/train_and_signal.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from models import SignalAt

import nnxfit
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.checkpoint import (
    CheckpointCorruptError,
    ResumeWarning,
    list_steps,
    load_checkpoint,
    read_meta,
    tmp_dirs,
)

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
sys.path.insert(0, SCRIPTS)
import train_and_signal as child  # noqa: E402

SCRIPT = os.path.join(SCRIPTS, "train_and_signal.py")

# A failed read of a corrupt checkpoint leaves tensorstore callbacks aimed at orbax's closed
# asyncio loop; Python reports them as unraisable (harmless), sometimes during a later test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def run_child(*args, timeout=120):
    return subprocess.run(
        [sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def assert_bitwise(got: list, want: list) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert np.array_equal(a, b), f"array {i} differs"


@pytest.fixture(scope="module")
def small_reference():
    trainer = nnxfit.Trainer(**child.FIT)
    history = trainer.fit(child.make_module(), child.train_data(), child.val_data())
    return child.state_arrays(trainer), history


def test_sigterm_in_a_real_process_saves_exits_and_resumes_bit_for_bit(tmp_path, small_reference):
    log = tmp_path / "child.log"  # a file, not a pipe nobody reads while we wait
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, "signal", tmp_path], stdout=out, stderr=subprocess.STDOUT
        )
    marker = tmp_path / "marker"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the child never reached the marker step"
        time.sleep(0.01)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    elapsed = time.monotonic() - t0
    err = log.read_text()
    # Ended by its signal, as a shell and a scheduler expect (143); 5: it never noticed it.
    assert proc.returncode == -signal.SIGTERM, err
    assert "TrainingInterrupted: SIGTERM: stopped after step" in err
    assert elapsed < 15, f"took {elapsed:.1f}s to stop after SIGTERM"

    meta = read_meta(tmp_path / "checkpoints")  # the newest: written on the interrupt
    assert meta["kind"] == "full" and meta["step"] >= child.MARK_STEP
    assert meta["loop"]["global_step"] == meta["step"]
    assert not tmp_dirs(tmp_path / "checkpoints")  # waited for: complete before the exit

    out = tmp_path / "resumed.npz"
    done = run_child("resume", tmp_path, out)
    assert done.returncode == 0, done.stderr
    with np.load(out) as z:
        got = [z[f"arr_{i}"] for i in range(len(z.files))]
    want, history = small_reference
    assert_bitwise(got, want)
    info = json.loads((tmp_path / "resumed.npz.json").read_text())
    assert info["resumed_from"].endswith(f"checkpoints{os.sep}{meta['step']}")
    assert info["epoch"] == history.epoch == [0, 1, 2, 3]
    assert info["history"] == history.history


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_to_resume_from(
    tmp_path, small_reference
):
    killed = run_child("killsave", tmp_path)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    ckpts = tmp_path / "checkpoints"
    assert list_steps(ckpts) == [4]  # the save in flight never became a checkpoint
    assert tmp_dirs(ckpts) == [f"{child.KILL_STEP}.orbax-checkpoint-tmp"]

    # every_n_steps=100: only the final save, so the 64 MiB module is written once more.
    trainer = nnxfit.Trainer(
        workdir=tmp_path, callbacks=[ModelCheckpoint(every_n_steps=100)], **child.FIT
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)  # nothing corrupt, nothing moved
        trainer.fit(
            child.make_module(seed=7, big=True),
            child.train_data(),
            child.val_data(),
            resume=True,
        )
    assert trainer.resumed_from == str(ckpts / "4")
    assert not tmp_dirs(ckpts)  # cleaned up by the next run
    assert list_steps(ckpts) == [28]
    # The big module is the small one plus a constant buffer: same training, same numbers.
    got = [a for a in child.state_arrays(trainer) if a.size != child.PAD_SIZE]
    assert_bitwise(got, small_reference[0])


class Boom(Exception):
    pass


class CrashAt(nnxfit.Callback):
    def __init__(self, step):
        self.step = step
        self.error = Boom(f"boom at {step}")
        self.exception_seen = None

    def on_train_batch_end(self, trainer, module, step, logs):
        if step == self.step:
            raise self.error

    def on_exception(self, trainer, module, error):
        self.exception_seen = error


def test_an_exception_in_a_callback_reaches_the_caller_and_keeps_the_last_checkpoint(tmp_path):
    # Step 15 is the first of epoch 2: the checkpoint of epoch 1's end (step 14) was started
    # asynchronously right before, so only closing the manager on the way out completes it.
    crash = CrashAt(15)
    trainer = nnxfit.Trainer(workdir=tmp_path, callbacks=[ModelCheckpoint(), crash], **child.FIT)
    with pytest.raises(Boom) as err:
        trainer.fit(child.make_module(), child.train_data(), child.val_data())
    assert err.value is crash.error and crash.exception_seen is crash.error
    ckpts = tmp_path / "checkpoints"
    assert list_steps(ckpts) == [14] and not tmp_dirs(ckpts)
    meta = read_meta(ckpts)
    assert (meta["epoch"], meta["batch_in_epoch"]) == (2, 0)


def _truncate_arrays(step_dir):
    """Cuts every data file of the checkpoint's module arrays in half."""
    n = 0
    for root, _, files in os.walk(step_dir / "module"):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            if size > 64 and "d" in os.path.relpath(path, step_dir / "module").split(os.sep):
                with open(path, "r+b") as f:
                    f.truncate(size // 2)
                n += 1
    assert n, "no data file found to corrupt"


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A workdir with the checkpoints of epochs 0 and 1 (steps 7 and 14)."""
    workdir = tmp_path_factory.mktemp("two_epochs")
    nnxfit.Trainer(
        workdir=workdir,
        callbacks=[ModelCheckpoint(save_top_k=-1)],
        **{**child.FIT, "max_epochs": 2},
    ).fit(child.make_module(), child.train_data(), child.val_data())
    assert list_steps(workdir / "checkpoints") == [7, 14]
    return workdir


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, two_epochs, small_reference
):
    tmp_path = tmp_path / "run"
    shutil.copytree(two_epochs, tmp_path)
    kw = dict(workdir=tmp_path, **{**child.FIT, "max_epochs": 2})
    ckpts = tmp_path / "checkpoints"
    _truncate_arrays(ckpts / "14")

    module = child.make_module(seed=3)
    with pytest.raises(CheckpointCorruptError, match=str(ckpts / "14")):
        load_checkpoint(module, ckpts / "14")

    trainer = nnxfit.Trainer(callbacks=[ModelCheckpoint(save_top_k=-1)], **{**kw, "max_epochs": 4})
    with pytest.warns(ResumeWarning) as record:
        trainer.fit(child.make_module(seed=7), child.train_data(), child.val_data(), resume=True)
    text = " ".join(str(w.message) for w in record)
    assert str(ckpts / "14") in text and "Trying an older checkpoint" in text
    assert trainer.resumed_from == str(ckpts / "7")
    moved = [p for p in os.listdir(tmp_path) if p.startswith("checkpoints.corrupt-")]
    assert len(moved) == 1 and os.listdir(tmp_path / moved[0]) == ["14"]  # kept, not deleted
    assert_bitwise(child.state_arrays(trainer), small_reference[0])


def test_when_every_checkpoint_is_corrupt_resume_fails_and_changes_nothing(tmp_path, two_epochs):
    tmp_path = tmp_path / "run"
    shutil.copytree(two_epochs, tmp_path)
    kw = dict(workdir=tmp_path, **{**child.FIT, "max_epochs": 2})
    ckpts = tmp_path / "checkpoints"
    for s in (7, 14):
        _truncate_arrays(ckpts / str(s))
    before = sorted(os.listdir(tmp_path))
    trainer = nnxfit.Trainer(callbacks=[ModelCheckpoint(save_top_k=-1)], **kw)
    with pytest.warns(ResumeWarning), pytest.raises(CheckpointCorruptError) as err:
        trainer.fit(child.make_module(), child.train_data(), child.val_data(), resume=True)
    assert "14:" in str(err.value) and "7:" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == before and list_steps(ckpts) == [7, 14]
    assert trainer.global_step == 0


def test_sigint_on_a_periodic_save_step_saves_once_and_restores_the_handlers(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    trainer = nnxfit.Trainer(
        workdir=tmp_path,
        callbacks=[ModelCheckpoint(every_n_steps=4), SignalAt(8, signal.SIGINT)],
        **child.FIT,
    )
    with pytest.raises(nnxfit.TrainingInterrupted) as err:
        trainer.fit(child.make_module(), child.train_data(), child.val_data())
    assert err.value.step == 8 and err.value.signum == signal.SIGINT
    assert {s: signal.getsignal(s) for s in before} == before
    ckpts = tmp_path / "checkpoints"
    assert list_steps(ckpts) == [8] and not tmp_dirs(ckpts)  # no second save of step 8
    assert read_meta(ckpts)["batch_in_epoch"] == 1
