"""SIGTERM and SIGINT during fit (nnxfit/interrupt.py): where the fit stops, what it says at
once and at the end, what it saves, and how the process exits. Real signals: sent to this
process from a hook or a loader, or to a child (tests/scripts/train_and_signal.py) by the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest
from models import Classifier, toy_data

import nnxfit
from nnxfit import pacing
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.checkpoint import list_steps, load_checkpoint, read_meta, tmp_dirs
from nnxfit.data import ArrayLoader

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
sys.path.insert(0, SCRIPTS)
import train_and_signal as child  # noqa: E402

SCRIPT = os.path.join(SCRIPTS, "train_and_signal.py")
FIT = child.FIT  # 4 epochs of 7 batches (the last one short): 28 steps


def assert_bitwise(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), i


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    trainer = nnxfit.Trainer(workdir=workdir, callbacks=[ModelCheckpoint()], **FIT)
    history = trainer.fit(child.make_module(), child.train_data(), child.val_data())
    return types.SimpleNamespace(
        arrays=child.state_arrays(trainer),
        history=history,
        csv=(workdir / "metrics.csv").read_text(),
    )


class KillingLoader:
    """Yields ``loader``'s batches; sends this process ``signum`` as it yields batch ``batch``
    of its ``at``-th pass (1-based): a signal that arrives while the loop reads data."""

    def __init__(self, loader, at, batch, signum=signal.SIGTERM):
        self.loader, self.at, self.batch, self.signum = loader, at, batch, signum
        self.passes = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        for i, b in enumerate(self.loader.iter_epoch(0)):
            if self.passes == self.at and i == self.batch:
                os.kill(os.getpid(), self.signum)
            yield b


# The resumed run meets the short last batch first in epoch 2: CompileWatch calls that a
# mid-fit recompile (test_resume.py filters it too).
@pytest.mark.filterwarnings("ignore::nnxfit.compile_watch.RecompileWarning")
def test_a_signal_during_validation_cuts_it_short_and_the_resume_redoes_that_epoch_end(
    tmp_path, reference
):
    # The validation after epoch index 1 (step 14) gets SIGTERM at its batch 1 of 3. (Pass 1
    # is the sanity check's, pass 2 the validation after epoch index 0.)
    val = KillingLoader(child.val_data(), at=3, batch=1)
    trainer = nnxfit.Trainer(workdir=tmp_path, callbacks=[ModelCheckpoint()], **FIT)
    with pytest.raises(nnxfit.TrainingInterrupted) as err:
        trainer.fit(child.make_module(), child.train_data(), val)
    # Stopped inside that validation: no step of epoch 2, and epoch 1's end never happened.
    assert (err.value.step, err.value.signum) == (14, signal.SIGTERM)
    assert val.passes == 3 and trainer.history.epoch == [0]
    meta = read_meta(tmp_path / "checkpoints")
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (14, 1, 7)
    assert "(epoch 2 of 4, batch 7 of 7)" in str(err.value)

    resumed = nnxfit.Trainer(workdir=tmp_path, callbacks=[ModelCheckpoint()], **FIT)
    history = resumed.fit(
        child.make_module(seed=7), child.train_data(), child.val_data(), resume=True
    )
    assert_bitwise(child.state_arrays(resumed), reference.arrays)
    assert history.epoch == [0, 1, 2, 3]
    assert history.history == reference.history.history  # epoch 1's val_* logged once
    assert (tmp_path / "metrics.csv").read_text() == reference.csv


def test_with_steps_per_execution_the_call_being_gathered_is_never_sent(tmp_path, capsys):
    # Calls of 4 steps: batches 0-3, then 4-5 (the short 6th goes alone). SIGINT while the
    # loop reads batch 5: the fit stops after the first call, not after the second. (Pass 1
    # is fit's look at the first batch.)
    train = KillingLoader(child.train_data(), at=2, batch=5, signum=signal.SIGINT)
    trainer = nnxfit.Trainer(
        workdir=tmp_path, callbacks=[ModelCheckpoint()], **{**FIT, "steps_per_execution": 4}
    )
    with pytest.raises(nnxfit.TrainingInterrupted) as err:
        trainer.fit(child.make_module(), train, child.val_data())
    assert (err.value.step, err.value.signum) == (4, signal.SIGINT)
    assert trainer.dispatch_step == 4  # nothing else went to the device
    said = capsys.readouterr().err
    ckpts = tmp_path / "checkpoints"
    assert (
        f"nnxfit: SIGINT received: stopping after step 4 (epoch 1 of 4) and saving a checkpoint "
        f"to {ckpts}. Press Ctrl-C again to abort at once, without saving." in said
    )
    assert f"nnxfit: ModelCheckpoint saved step 4 to {ckpts / '4'}." in said
    assert str(err.value) == (
        f"SIGINT: stopped after step 4 (epoch 1 of 4, batch 4 of 7); checkpoint saved to "
        f"{ckpts / '4'}. Resume with trainer.fit(..., resume=True)."
    )
    assert read_meta(ckpts)["batch_in_epoch"] == 4


def busy(x, matmuls: int):
    """A scalar that keeps the device busy for ``matmuls`` x 0.27 GFLOP (512^2 matmuls of a
    matrix tiled from ``x``)."""
    h = jnp.tile(x.reshape(-1), 512 * 512 // x.size + 1)[: 512 * 512].reshape(512, 512)
    for _ in range(matmuls):
        h = jnp.tanh(h @ h)
    return 1e-30 * h.mean()


class SlowValidation(Classifier):
    """A validation batch keeps the device busy: ``matmuls`` x 0.27 GFLOP."""

    def __init__(self, matmuls: int = 2, **kw):
        super().__init__(**kw)
        self.matmuls = matmuls

    def validation_step(self, batch):
        out = super().validation_step(batch)
        return {**out, "loss": out["loss"] + busy(batch[0], self.matmuls)}


class SignalSoonAfter:
    """Yields ``loader``'s batches, counting them; ``delay`` s after yielding batch ``at`` of
    an epoch (the sanity check's pass yields fewer), sends this process SIGTERM from a timer
    thread."""

    def __init__(self, loader, at, delay):
        self.loader, self.at, self.delay, self.yielded = loader, at, delay, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, b in enumerate(self.loader.iter_epoch(0)):
            if i == self.at:
                threading.Timer(self.delay, os.kill, (os.getpid(), signal.SIGTERM)).start()
            self.yielded += 1
            yield b


def test_a_signal_in_a_long_validation_waits_only_for_the_few_batches_queued():
    # 64 slow validation batches (16 x 0.27 GFLOP each); the signal comes 1 s after batch 8
    # was sent. Unpaced, the host keeps sending until jax's own queue is full: 40 yielded
    # (2 of them the sanity check's), and the stop waits for every one sent.
    x, y = toy_data(256)
    val = SignalSoonAfter(ArrayLoader((x, y), 4), at=8, delay=1.0)
    trainer = nnxfit.Trainer(max_epochs=1, limit_train_batches=2, progress_bar=False)
    with pytest.raises(nnxfit.TrainingInterrupted):
        trainer.fit(SlowValidation(matmuls=16), ArrayLoader((x, y), 16), val)
    # Paced (pacing.DeviceQueue): ~0.1 s of batches ahead of the device, 15 yielded. The
    # bound leaves room for a timer thread that a loaded machine runs late (each 0.1 s late
    # adds about one batch).
    assert val.yielded < 30


class SlowTraining(Classifier):
    """A train step keeps the device busy: ``matmuls`` x 0.27 GFLOP."""

    def __init__(self, matmuls: int = 16, **kw):
        super().__init__(**kw)
        self.matmuls = matmuls

    def training_step(self, batch):
        loss, metrics = super().training_step(batch)
        return loss + busy(batch[0], self.matmuls), metrics


def test_a_signal_waits_only_for_the_few_train_calls_queued(monkeypatch):
    # 64 slow train steps (16 x 0.27 GFLOP each); the signal comes 1 s after batch 8 was
    # sent. Unpaced, the host kept sending until jax's own queue was full (39 batches taken),
    # and the stop waited for every call sent.
    monkeypatch.setattr(pacing, "TRAIN_MAX_LAG_S", 0.2)
    x, y = toy_data(256)
    train = SignalSoonAfter(ArrayLoader((x, y), 4), at=8, delay=1.0)
    trainer = nnxfit.Trainer(max_epochs=1, log_every_n_steps=1000, progress_bar=False)
    with pytest.raises(nnxfit.TrainingInterrupted):
        trainer.fit(SlowTraining(), train)
    # Paced (pacing.train_queue): ~0.2 s of calls behind the one running, 14 taken. Room is
    # left for a timer thread that a loaded machine runs late (0.1 s late: about one more).
    assert train.yielded < 28, train.yielded
    # Every call sent ran; the batch being taken when the signal came was not sent.
    assert train.yielded - 1 <= trainer.global_step <= train.yielded


class SignalAtEpochEnd(nnxfit.Callback):
    order = 10  # before ModelCheckpoint takes note of the epoch end

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, module, epoch, logs):
        if epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("epoch, step", [(0, 7), (3, 28)], ids=["first", "last"])
def test_a_signal_at_an_epoch_end_stops_there_even_after_the_last_step(tmp_path, epoch, step):
    trainer = nnxfit.Trainer(
        workdir=tmp_path, callbacks=[ModelCheckpoint(), SignalAtEpochEnd(epoch)], **FIT
    )
    with pytest.raises(nnxfit.TrainingInterrupted) as err:  # the last: fit used to return
        trainer.fit(child.make_module(), child.train_data(), child.val_data())
    # Not a step of the next epoch; the checkpoint holds the finished epoch end.
    assert err.value.step == trainer.dispatch_step == step
    assert trainer.history.epoch == list(range(epoch + 1))
    meta = read_meta(tmp_path / "checkpoints")
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (step, epoch + 1, 0)
    assert meta["metrics"]["val_loss"] == trainer.history.history["val_loss"][-1]
    assert f"stopped after step {step} (after epoch {epoch + 1} of 4)" in str(err.value)


# ---------------------------------------------------------------- real child processes ---
def start_child(mode, workdir, log):
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, SCRIPT, mode, str(workdir)], stdout=out, stderr=subprocess.STDOUT
        )


def wait_for(path, proc, log, timeout=120):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.001)


def test_ctrl_c_says_what_happens_saves_and_exits_130_in_a_shell(tmp_path):
    log = tmp_path / "child.log"
    shell = subprocess.Popen(
        ["sh", "-c", f'"{sys.executable}" "{SCRIPT}" signal "{tmp_path}" 2>"{log}"; echo "$?"'],
        stdout=subprocess.PIPE,
        text=True,
    )
    marker = tmp_path / "marker"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert shell.poll() is None, log.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(int(marker.read_text()), signal.SIGINT)  # Ctrl-C reaches python, not the shell
    out, _ = shell.communicate(timeout=60)
    err = log.read_text()
    assert out.strip() == "130", err  # what `$?` shows after Ctrl-C

    ckpts = tmp_path / "checkpoints"
    meta = read_meta(ckpts)
    step, epoch, batch = meta["step"], meta["epoch"] + 1, meta["batch_in_epoch"]
    assert step >= child.MARK_STEP and not tmp_dirs(ckpts)
    said = [line for line in err.splitlines() if line.startswith("nnxfit: ")]
    assert said == [
        f"nnxfit: SIGINT received: stopping after step {step} (epoch {epoch} of 4) and saving "
        f"a checkpoint to {ckpts}. Press Ctrl-C again to abort at once, without saving.",
        f"nnxfit: ModelCheckpoint saved step {step} to {ckpts / str(step)}.",
    ]
    assert err.rstrip().endswith(
        f"nnxfit.errors.TrainingInterrupted: SIGINT: stopped after step {step} (epoch {epoch} "
        f"of 4, batch {batch} of 7); checkpoint saved to {ckpts / str(step)}. Resume with "
        "trainer.fit(..., resume=True)."
    )


def test_a_sigterm_after_the_last_step_ends_the_process_once_the_final_save_is_done(tmp_path):
    log = tmp_path / "child.log"
    proc = start_child("atend", tmp_path, log)
    proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == -signal.SIGTERM, err  # 5: fit returned, the signal swallowed
    ckpts = tmp_path / "checkpoints"
    assert list_steps(ckpts) == [28] and not tmp_dirs(ckpts)
    assert read_meta(ckpts)["epoch"] == 4  # the finished fit, not a state before its end
    assert (
        "nnxfit: SIGTERM received after the last step (28): the fit finishes its final "
        "save, then stops." in err
    )
    assert (
        "TrainingInterrupted: SIGTERM received after the last step (28, epoch 4 of 4): the "
        f"fit had finished; its final checkpoint is {ckpts / '28'}." in err
    )


def test_a_second_ctrl_c_during_the_save_aborts_and_keeps_the_complete_checkpoints(tmp_path):
    log = tmp_path / "child.log"
    proc = start_child("twice", tmp_path, log)  # 64 MiB module, saves every 4 steps
    wait_for(tmp_path / "marker", proc, log)
    proc.send_signal(signal.SIGINT)
    ckpts = tmp_path / "checkpoints"
    # The save of the interruption's step is being written: the second Ctrl-C lands in it.
    deadline = time.monotonic() + 60
    while not any(n.startswith(f"{child.MARK_STEP}.") for n in tmp_dirs(ckpts)):
        assert proc.poll() is None, log.read_text()  # finished before the second Ctrl-C
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    err = log.read_text()
    assert proc.returncode == -signal.SIGINT, err  # a plain KeyboardInterrupt: exit by SIGINT
    assert "nnxfit: second SIGINT: aborting. Every complete checkpoint stays intact" in err
    assert "TrainingInterrupted" not in err  # aborted, not the orderly stop

    # Only complete checkpoints are listed, the newest loads; a tmp folder is all the
    # abort may leave, and the next fit removes it.
    steps = list_steps(ckpts)
    assert steps and steps[-1] in (8, child.MARK_STEP)
    assert set(tmp_dirs(ckpts)) <= {f"{child.MARK_STEP}.orbax-checkpoint-tmp"}
    info = load_checkpoint(child.make_module(big=True), ckpts, which="last")
    assert info.step == steps[-1] == read_meta(ckpts)["loop"]["global_step"]


def test_an_abort_whose_cleanup_hangs_still_ends_the_process_by_sigint(tmp_path):
    log = tmp_path / "child.log"
    proc = start_child("stuck", tmp_path, log)  # on_exception never returns; grace 2 s
    wait_for(tmp_path / "marker", proc, log)
    proc.send_signal(signal.SIGINT)
    wait_for(tmp_path / "interrupting", proc, log)  # in on_interrupt: the save, say
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the aborted fit hung in its cleanup:\n" + log.read_text()) from None
    err = log.read_text()
    assert proc.returncode == -signal.SIGINT, err
    assert "nnxfit: second SIGINT: aborting." in err
    assert (
        "nnxfit: the abort's cleanup has not ended after 2 s; killing the process. Where "
        "each thread is:" in err
    )
    assert "in on_exception" in err  # faulthandler's stack names where it hung


def test_fit_on_a_thread_installs_no_handler(tmp_path):

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    box = {}

    def run():
        x, y = child.toy_data(32)
        t = nnxfit.Trainer(max_steps=2, progress_bar=False)
        box["history"] = t.fit(child.make_module(), ArrayLoader((x, y), 16))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert box["history"].epoch == [0]
    assert {s: signal.getsignal(s) for s in before} == before
