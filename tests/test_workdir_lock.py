"""One fit per workdir (nnxfit/workdir.py): a second fit into a workdir in use fails at once,
naming the holder; a killed holder leaves no lock behind."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from models import Classifier, toy_data

import nnxfit
from nnxfit.data import ArrayLoader
from nnxfit.workdir import LOCK_NAME, WorkdirLock

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
SCRIPT = os.path.join(SCRIPTS, "train_and_signal.py")


def small_fit(workdir, callbacks=(), **kw):
    x, y = toy_data(32)
    trainer = nnxfit.Trainer(
        workdir=workdir, max_steps=2, progress_bar=False, callbacks=list(callbacks), **kw
    )
    return trainer, trainer.fit(Classifier(), ArrayLoader((x, y), 16))


def test_a_second_process_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    log = tmp_path.parent / f"{tmp_path.name}.log"
    with open(log, "w") as out:
        holder = subprocess.Popen(
            [sys.executable, SCRIPT, "hold", str(tmp_path)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "marker").exists():  # the holder is training, lock held
            assert holder.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pid = holder.pid
        with pytest.raises(nnxfit.WorkdirLockedError) as err:
            small_fit(tmp_path)
        msg = str(err.value)
        assert msg.startswith(
            f"workdir {tmp_path} is in use by another fit: pid {pid} on host "
            f"{socket.gethostname()}, command `"
        )
        assert "train_and_signal.py hold" in msg
        assert (
            "Two fits writing one workdir destroy each other's checkpoints and logs. Use "
            f"another workdir, wait for that fit to end, or stop it (kill {pid}); a fit that "
            f"crashed or was killed leaves no lock behind (lock file: {tmp_path / LOCK_NAME})."
            in msg
        )
        assert err.value.holder["pid"] == pid
        assert holder.poll() is None  # the running fit goes on undisturbed

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    # The killed fit's lock file is still there, unlocked: the next fit takes it.
    assert (tmp_path / LOCK_NAME).exists()
    trainer, history = small_fit(tmp_path)
    assert trainer.global_step == 2


class FitAgain(nnxfit.Callback):
    """From ``on_fit_start``, tries another fit into ``workdir``; keeps what happened."""

    def __init__(self, workdir):
        self.workdir, self.error, self.history = workdir, None, None

    def on_fit_start(self, trainer, module):
        try:
            self.history = small_fit(self.workdir)[1]
        except nnxfit.WorkdirLockedError as e:
            self.error = e


def test_two_trainers_in_one_process_exclude_each_other_until_the_fit_ends(tmp_path):
    same, other = FitAgain(tmp_path), FitAgain(tmp_path / "other")
    small_fit(tmp_path, [same, other])
    assert f"is in use by another fit in this same process (pid {os.getpid()})" in str(same.error)
    assert other.error is None and other.history is not None  # another workdir is free
    # Released: empty file (no stale holder to report), and the next fit goes ahead.
    assert (tmp_path / LOCK_NAME).read_bytes() == b""
    small_fit(tmp_path)


def test_no_lock_without_a_workdir_or_under_fast_dev_run(tmp_path):
    small_fit(None)
    small_fit(tmp_path, fast_dev_run=True)
    assert not os.listdir(tmp_path)  # fast_dev_run writes nothing, the lock included


def test_each_process_of_a_distributed_fit_takes_its_own_lock(tmp_path):
    with WorkdirLock(tmp_path, 0), WorkdirLock(tmp_path, 1) as second:
        assert second.path == str(tmp_path / f"{LOCK_NAME}.1")
        with pytest.raises(nnxfit.WorkdirLockedError):
            WorkdirLock(tmp_path, 1).acquire()  # the same process index of another fit


def test_a_filesystem_without_flock_warns_and_fits_unlocked(tmp_path, monkeypatch):
    import fcntl
    import types

    import nnxfit.workdir

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    fake = types.SimpleNamespace(flock=no_flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB)
    monkeypatch.setattr(nnxfit.workdir, "fcntl", fake)
    with pytest.warns(UserWarning, match="does not support flock") as record:
        trainer, _ = small_fit(tmp_path)
    assert record[0].filename == __file__  # the user's fit line
    assert trainer.global_step == 2
