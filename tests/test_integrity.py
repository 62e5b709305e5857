"""Checkpoint integrity: checksums and damaged files, mixed items, background save failures
(file size limit, disk full), two ModelCheckpoints, CSV rows and SIGKILL, non-finite states,
and orbax's leaking telemetry. Damage is done to real files on disk; kills and full disks
happen to real subprocesses."""

from __future__ import annotations

import csv
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import Classifier

import nnxfit
from nnxfit.callbacks.checkpoint import ModelCheckpoint
from nnxfit.callbacks.csv_logger import CSVLogger
from nnxfit.checkpoint import (
    CheckpointCorruptError,
    CheckpointWarning,
    ResumeWarning,
    list_steps,
    load_checkpoint,
    open_manager,
    read_meta,
    save_state,
    tmp_dirs,
)
from nnxfit.integrity import MANIFEST, file_sums

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
sys.path.insert(0, SCRIPTS)
import train_and_signal as child  # noqa: E402

SCRIPT = os.path.join(SCRIPTS, "train_and_signal.py")

# A failed save or read of a checkpoint once left TensorStore callbacks aimed at orbax's closed
# asyncio loop, reported as unraisable ("Event loop is closed"), sometimes during a later test;
# orbax's loops now end their tasks before closing (``nnxfit.orbax_loops``): one is a failure.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


class Wide(Classifier):
    """The test classifier plus a trained 16x1024 weight: its arrays and Adam moments are
    large enough that orbax stores them in data files that carry no checksum of their own."""

    def __init__(self, seed=0):
        super().__init__(seed=seed, dropout=0.5, batchnorm=True)
        self.wide = nnx.Param(jax.random.normal(jax.random.key(seed), (16, 1024)) * 0.01)

    def training_step(self, batch):
        loss, metrics = super().training_step(batch)
        return loss + 1e-3 * (self.wide[...] ** 2).mean(), metrics


def new_threads(before: set) -> list[str]:
    return [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]


def assert_bitwise(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), i


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with the checkpoints of epochs 0 and 1 (steps 7 and 14) of a Wide module,
    and the state the fit ended in."""
    workdir = tmp_path_factory.mktemp("saved")
    trainer = nnxfit.Trainer(
        workdir=workdir,
        callbacks=[ModelCheckpoint(save_top_k=-1)],
        **{**child.FIT, "max_epochs": 2},
    )
    trainer.fit(Wide(), child.train_data(), child.val_data())
    assert list_steps(workdir / "checkpoints") == [7, 14]
    return workdir, child.state_arrays(trainer)


def copy_run(saved, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(saved[0], workdir)
    return workdir, workdir / "checkpoints"


def largest_file(item_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(item_dir) for f in fs]
    return max(files, key=os.path.getsize)


def flip(path):
    """Inverts 4 bytes in the middle of a file."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        b = f.read(4)
        f.seek(size // 2)
        f.write(bytes(x ^ 0xFF for x in b))


def replace_item(ckpts, item, from_step, into_step):
    shutil.rmtree(ckpts / str(into_step) / item)
    shutil.copytree(ckpts / str(from_step) / item, ckpts / str(into_step) / item)


DAMAGE = {
    # a flip in the optimizer state's data file: loaded silently before (loss 1.30 -> 15.6)
    "flip": (lambda ck: flip(largest_file(ck / "14" / "train")), "does not match the checksum"),
    # TensorStore raised a bare Exception for these: resume crashed with its dump
    "truncate": (
        lambda ck: os.truncate(largest_file(ck / "14" / "train"), 1000),
        "bytes, its save wrote",
    ),
    "delete": (lambda ck: os.remove(largest_file(ck / "14" / "module")), "is missing"),
    # items of another save: loaded silently before
    "meta of 7": (lambda ck: replace_item(ck, "meta", 7, 14), "holds the metadata of step 7"),
    "module of 7": (
        lambda ck: replace_item(ck, "module", 7, 14),
        "its 'module' item was written by the save of step 7",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_moved_aside_and_resume_uses_the_previous(
    tmp_path, saved, damage
):
    workdir, ckpts = copy_run(saved, tmp_path)
    do, reason = DAMAGE[damage]
    do(ckpts)
    trainer = nnxfit.Trainer(
        workdir=workdir,
        callbacks=[ModelCheckpoint(save_top_k=-1)],
        **{**child.FIT, "max_epochs": 2},
    )
    with pytest.warns(ResumeWarning) as record:
        trainer.fit(Wide(seed=3), child.train_data(), child.val_data(), resume=True)
    text = " ".join(str(w.message) for w in record)
    assert str(ckpts / "14") in text and reason in text, text
    assert "moved to" in text
    assert trainer.resumed_from == str(ckpts / "7")
    moved = [p for p in os.listdir(workdir) if p.startswith("checkpoints.corrupt-")]
    assert len(moved) == 1 and os.listdir(workdir / moved[0]) == ["14"]  # kept, not deleted
    assert_bitwise(child.state_arrays(trainer), saved[1])  # epoch 1 again, exactly
    assert list_steps(ckpts) == [7, 14]  # the new 14 is whole
    assert MANIFEST in os.listdir(ckpts / "14")


def test_load_checkpoint_verifies_what_it_reads(tmp_path, saved):
    workdir, ckpts = copy_run(saved, tmp_path)
    flip(largest_file(ckpts / "14" / "train"))  # load_checkpoint does not read the optimizer
    for _ in range(2):  # reading leaves the files as they were
        assert load_checkpoint(Wide(seed=3), ckpts, which="last").step == 14
    flip(largest_file(ckpts / "14" / "module"))
    with pytest.raises(CheckpointCorruptError, match=r"14 is damaged: module/.* checksum"):
        load_checkpoint(Wide(seed=3), ckpts / "14")
    with pytest.warns(ResumeWarning, match="Trying an older checkpoint"):
        assert load_checkpoint(Wide(seed=3), workdir, which="last").step == 7
    os.remove(ckpts / "7" / MANIFEST)  # a checkpoint saved with checksums has one
    with pytest.raises(CheckpointCorruptError, match="manifest nnxfit_manifest.json is missing"):
        load_checkpoint(Wide(seed=3), ckpts / "7")


def test_every_file_of_every_item_is_in_the_manifest(saved):
    step_dir = saved[0] / "checkpoints" / "14"
    manifest = read_json(step_dir / MANIFEST)
    items = sorted(p.name for p in step_dir.iterdir() if p.is_dir())
    assert sorted(manifest["items"]) == items == ["meta", "module", "train"]
    for item in items:
        assert manifest["items"][item] == file_sums(str(step_dir / item))
    meta = read_meta(step_dir)
    assert manifest["save_id"] == meta["save_id"] and manifest["step"] == 14


def read_json(path):
    import json

    with open(path) as f:
        return json.load(f)


class SaveWithoutChecksums(nnxfit.Callback):
    """Writes the fit's state the way nnxfit did before checksums: no manifest, no save id."""

    def __init__(self, directory):
        self.directory = directory

    def on_fit_end(self, trainer, module):
        manager = open_manager(self.directory)
        save_state(manager, trainer, trainer.global_step)
        manager.close()


def test_checkpoints_written_before_checksums_load_unverified_and_say_so(tmp_path):
    old = tmp_path / "old" / "checkpoints"
    trainer = nnxfit.Trainer(callbacks=[SaveWithoutChecksums(str(old))], **child.FIT)
    trainer.fit(child.make_module(), child.train_data(), child.val_data())
    assert list_steps(old) == [28] and MANIFEST not in os.listdir(old / "28")
    with pytest.warns(CheckpointWarning, match="has no checksums"):
        assert load_checkpoint(child.make_module(seed=2), old).step == 28
    resumed = nnxfit.Trainer(workdir=tmp_path / "old", **{**child.FIT, "max_epochs": 5})
    with pytest.warns(CheckpointWarning, match=r"28 has no checksums .* without verifying"):
        resumed.fit(child.make_module(seed=2), child.train_data(), child.val_data(), resume=True)
    assert resumed.resumed_from == str(old / "28") and resumed.global_step == 35


# ------------------------------------------------------------------ background failures ---
class Padded(Classifier):
    """The test classifier plus a 1 MiB buffer: one data file of ~1 MiB per checkpoint."""

    def __init__(self, seed=0):
        super().__init__(seed=seed, dropout=0.5, batchnorm=True)
        pad = np.random.default_rng(0).standard_normal(2**18, dtype=np.float32)
        self.pad = nnx.Variable(jnp.asarray(pad))


class LimitFileSize(nnxfit.Callback):
    """Once the checkpoint of step 4 is committed, no file of this process may grow past
    512 KiB (``ulimit -f``): the next save fails in orbax's background thread."""

    order = 60  # after ModelCheckpoint's hook, which lets the save of step 4 commit

    def __init__(self, directory):
        self.directory = directory

    def on_train_batch_end(self, trainer, module, step, logs):
        if step == 5:
            while list_steps(self.directory) != [4]:
                time.sleep(0.001)
            resource.setrlimit(resource.RLIMIT_FSIZE, (2**19, resource.RLIM_INFINITY))


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_a_background_save_failure_is_reported_once_under_its_own_step(tmp_path, capfd):
    ckpts = tmp_path / "checkpoints"
    before = {t.ident for t in threading.enumerate()}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    mc = ModelCheckpoint(every_n_steps=4)
    trainer = nnxfit.Trainer(workdir=tmp_path, callbacks=[mc, LimitFileSize(ckpts)], **child.FIT)
    try:
        with pytest.raises(nnxfit.CheckpointError) as err:
            trainer.fit(Padded(), child.train_data(), child.val_data())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    msg = str(err.value)
    # Before: "could not save step 12", one save late, after 5 orbax tracebacks.
    assert "the checkpoint of step 8 could not be written" in msg, msg
    assert "File too large" in msg and "checkpoints [4] are kept" in msg
    assert trainer.global_step <= 12  # at the latest when the next save waits for it
    out, errout = capfd.readouterr()
    assert "Traceback" not in out + errout and "ERROR:absl" not in out + errout, errout[-3000:]
    assert list_steps(ckpts) == [4] and not tmp_dirs(ckpts)
    assert mc.last_model_path == str(ckpts / "4")
    assert not new_threads(before)


def can_mount_tmpfs(tmp_path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{tmp_path}'"],
        capture_output=True,
    )
    return probe.returncode == 0


def test_a_full_disk_is_named_and_the_previous_checkpoint_stays(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs in a user namespace (unshare -rm) here")
    out = tmp_path / "report.json"
    run = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$1" "$2" diskfull "$0" "$3"',
            str(disk),
            sys.executable,
            SCRIPT,
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = read_json(out)
    assert "the checkpoint of step 8 could not be written" in report["error"]
    assert "disk full (No space left on device)" in report["error"]
    assert report["entries"] == ["4"] and report["meta_step"] == 4  # no tmp folder left
    assert report["global_step"] <= 12 and report["threads"] == []
    for noise in ("Traceback", "ERROR:absl", "ERROR:asyncio", "Event loop is closed"):
        assert noise not in run.stderr, run.stderr[-3000:]


def test_orbax_loops_end_their_tasks_and_executor_threads_before_closing():
    """Orbax runs a save's coroutines in fresh loops that it closes as soon as the coroutine
    returns: a gather whose first write failed (disk full) left the other writes pending
    (TensorStore's callbacks then hit the closed loop, their failures never retrieved) and the
    loop's ``asyncio.to_thread`` threads still running after the fit (``nnxfit.orbax_loops``)."""
    import asyncio

    from orbax.checkpoint._src import asyncio_utils

    nnxfit.checkpoint._ocp()  # what every ModelCheckpoint and restore does first
    before = {t.ident for t in threading.enumerate()}
    ended = []

    async def write(name, delay):
        await asyncio.to_thread(time.sleep, delay)
        ended.append(name)
        raise OSError(28, "No space left on device", name)

    async def save():
        await asyncio.gather(write("a", 0.0), write("b", 0.3), write("c", 0.3))

    with pytest.raises(OSError, match="'a'"):
        asyncio_utils.run_sync(save())
    assert not new_threads(before)  # "b" and "c" slept in asyncio_0, asyncio_1 on close
    assert sorted(ended) == ["a", "b", "c"]  # no write outlived its loop

    async def read():
        await asyncio.to_thread(time.sleep, 0.01)

    for _ in range(3):
        asyncio_utils.run_sync(read())
        assert not new_threads(before)  # its thread still ending unless joined on close


# ------------------------------------------------------------------------------- memory ---
def test_saves_and_restores_never_call_tensorstores_leaking_bindings(tmp_path, monkeypatch):
    """Two TensorStore bindings leak what they return (TensorStore 0.1.86): ``KvStore.Spec(
    ...).to_json()`` ~700 B a call, 28 calls per save of a small model, and
    ``experimental_collect_matching_metrics`` ~1.6 KB a call, twice per array item; orbax made
    both for every save and restore, so memory grew with every checkpoint
    (``nnxfit.orbax_leaks``, benchmarks/checkpoint_memory.py)."""
    import tensorstore

    calls = []
    real_metrics, real_kvstore = (
        tensorstore.experimental_collect_matching_metrics,
        tensorstore.KvStore,
    )

    def counted(*args, **kwargs):
        calls.append("metrics")
        return real_metrics(*args, **kwargs)

    class CountingSpec:
        def __init__(self, spec):
            self.real = real_kvstore.Spec(spec)

        def to_json(self, *args, **kwargs):
            calls.append("to_json")
            return self.real.to_json(*args, **kwargs)

    class KvStore:
        Spec = CountingSpec

        @staticmethod
        def open(spec, *args, **kwargs):
            return real_kvstore.open(getattr(spec, "real", spec), *args, **kwargs)

        def __getattr__(self, name):
            return getattr(real_kvstore, name)

    monkeypatch.setattr(tensorstore, "experimental_collect_matching_metrics", counted)
    monkeypatch.setattr(tensorstore, "KvStore", KvStore())
    trainer = nnxfit.Trainer(
        workdir=tmp_path, callbacks=[ModelCheckpoint(every_n_steps=2)], max_steps=6
    )
    trainer.fit(child.make_module(), child.train_data())
    load_checkpoint(child.make_module(seed=1), tmp_path)
    assert list_steps(tmp_path / "checkpoints") == [6]
    assert calls == []


# ------------------------------------------------------------- callbacks of one kind ---
def test_a_module_callback_replaces_the_trainers_of_its_type(tmp_path, caplog):
    before = {t.ident for t in threading.enumerate()}
    on_module = ModelCheckpoint(every_n_steps=5)
    module = child.make_module()
    module.configure_callbacks = lambda: [on_module, CSVLogger("module.csv")]
    trainer = nnxfit.Trainer(workdir=tmp_path, callbacks=[ModelCheckpoint()], **child.FIT)
    with caplog.at_level(logging.INFO, logger="nnxfit.callbacks"):
        trainer.fit(module, child.train_data(), child.val_data())
    assert [c for c in trainer.cb if isinstance(c, ModelCheckpoint)] == [on_module]
    assert [c.filename for c in trainer.cb if isinstance(c, CSVLogger)] == ["module.csv"]
    assert "CSVLogger, ModelCheckpoint, which replace the Trainer's" in caplog.text
    assert list_steps(tmp_path / "checkpoints") == [28]  # the module's: every 5 steps, keeps 1
    assert read_meta(tmp_path / "checkpoints")["loop"]["callbacks"]["ModelCheckpoint"]
    assert not (tmp_path / "metrics.csv").exists() and (tmp_path / "module.csv").exists()
    assert not new_threads(before)


class Batches(nnxfit.Callback):
    calls = 0

    def on_train_batch_end(self, trainer, module, step, logs):
        self.calls += 1


@pytest.mark.parametrize("resume", [False, True])
def test_two_writers_of_one_folder_fail_before_anything_is_read_or_written(tmp_path, resume):
    before = {t.ident for t in threading.enumerate()}
    counter = Batches()
    trainer = nnxfit.Trainer(
        workdir=tmp_path,
        callbacks=[ModelCheckpoint(), ModelCheckpoint(monitor="val_loss"), counter],
        **child.FIT,
    )
    with pytest.raises(nnxfit.ConfigError, match=r"two ModelCheckpoints write to .*checkpoints"):
        trainer.fit(child.make_module(), child.train_data(), child.val_data(), resume=resume)
    assert counter.calls == 0 and not (tmp_path / "checkpoints").exists()
    assert not new_threads(before)


# ----------------------------------------------------------------- CSV rows and SIGKILL ---
def test_sigkill_right_after_a_checkpoint_loses_no_csv_row(tmp_path):
    reference = tmp_path / "reference"
    child.csv_fit(reference).fit(child.make_module(), child.train_data(), child.val_data())

    workdir = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, SCRIPT, "killcsv", str(workdir)], capture_output=True, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert max(list_steps(workdir / "checkpoints")) == child.CSV_KILL_STEP - 1
    with open(workdir / "metrics.csv", newline="") as f:  # before: the row of step 9 was lost
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert child.CSV_KILL_STEP - 1 in steps

    resumed = subprocess.run(
        [sys.executable, SCRIPT, "resume_csv", str(workdir)], capture_output=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = (workdir / "metrics.csv").read_text()
    assert got == (reference / "metrics.csv").read_text()


class SeesCommit(nnxfit.Callback):
    """Whether the checkpoint of step 3 is on disk while the hooks of step 3 run, and at
    step 4."""

    order = 60

    def __init__(self, directory):
        self.directory, self.seen = directory, {}

    def on_train_batch_end(self, trainer, module, step, logs):
        if step in (3, 4):
            done = self.directory / "3"
            deadline = time.monotonic() + (1.0 if step == 3 else 30.0)
            while not done.is_dir() and time.monotonic() < deadline:
                time.sleep(0.005)
            self.seen[step] = done.is_dir()


def test_a_step_checkpoint_commits_only_after_every_hook_of_its_step(tmp_path):
    sees = SeesCommit(tmp_path / "checkpoints")
    trainer = nnxfit.Trainer(
        workdir=tmp_path, callbacks=[ModelCheckpoint(every_n_steps=3), sees], max_steps=4
    )
    trainer.fit(child.make_module(), child.train_data())
    assert sees.seen == {3: False, 4: True}


# ----------------------------------------------------------------- non-finite states ---
class Poison(nnxfit.Callback):
    """Sets one weight to NaN after step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, step, logs):
        if step == self.step:
            kernel = module.net.l1.kernel
            kernel[...] = kernel[...].at[0, 0].set(jnp.nan)


def test_a_non_finite_state_is_never_saved_and_the_last_finite_checkpoint_survives(tmp_path):
    mc = ModelCheckpoint(every_n_steps=4, save_top_k=1)
    trainer = nnxfit.Trainer(workdir=tmp_path, callbacks=[Poison(6), mc], **child.FIT)
    with pytest.warns(CheckpointWarning) as record:
        trainer.fit(child.make_module(), child.train_data(), child.val_data())
    assert len(record) == 1
    msg = str(record[0].message)
    assert "state at step 8 has a non-finite" in msg and str(tmp_path / "checkpoints" / "4") in msg
    ckpts = tmp_path / "checkpoints"
    assert list_steps(ckpts) == [4] and mc.last_model_path == str(ckpts / "4")
    restored = child.make_module(seed=1)
    load_checkpoint(restored, tmp_path)
    params = jax.tree.leaves(nnx.state(restored, nnx.Param))
    assert all(np.isfinite(np.asarray(x)).all() for x in params)

    again = nnxfit.Trainer(workdir=tmp_path, callbacks=[ModelCheckpoint()], **child.FIT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        again.fit(child.make_module(seed=2), child.train_data(), child.val_data(), resume=True)
    assert again.resumed_from == str(ckpts / "4")
