"""A fit run in a child process by tests/test_faults.py, and the setup those tests share.

Usage: python train_and_signal.py MODE WORKDIR [OUT]

* ``signal``: trains with a ModelCheckpoint; after step ``MARK_STEP`` writes its pid to
  WORKDIR/marker and then slows to ``SLOW`` seconds per step until the test's SIGTERM or SIGINT
  arrives. The interrupted fit raises ``nnxfit.TrainingInterrupted``, uncaught: the exit a
  user's script would see.
* ``twice``: ``signal`` with the 64 MiB module of ``killsave`` and ``every_n_steps=4``, so that
  the save on interruption lasts long enough for the test's second SIGINT to land during it.
* ``stuck``: ``signal`` with a callback whose ``on_interrupt`` lasts (a save) until the second
  SIGINT, and whose ``on_exception`` then never returns (a cleanup stuck on a network); the
  abort's grace is 2 s.
* ``atend``: sends itself SIGTERM from ``on_fit_end``, before ModelCheckpoint's final save.
* ``hold``: ``signal`` without a checkpoint and 10x slower, for a test that needs a fit holding
  WORKDIR while it tries another.
* ``killsave``: a module with a 64 MiB buffer and ``ModelCheckpoint(every_n_steps=4)``; right
  after the save of step 8 has started writing (its tmp folder exists), SIGKILLs itself.
* ``resume``: ``fit(..., resume=True)``, writes the final train state to OUT (.npz) and the
  History to OUT.json (``big=1`` as 4th argument: the 64 MiB module of ``killsave``).
* ``killcsv``: ``ModelCheckpoint(every_n_steps=3)`` with rows logged every 3 steps; at step
  ``CSV_KILL_STEP``, once the checkpoint of the step before is committed, SIGKILLs itself
  (after the CSVLogger's hook of that step). ``resume_csv`` resumes it with the same setup.
* ``diskfull``: WORKDIR is a tiny file system (the test mounts a tmpfs); after the checkpoint
  of step 4 is committed, fills the disk so that the save of step 8 fails with ENOSPC. Catches
  the ``CheckpointError``, writes what it saw to OUT (JSON) and exits 0.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/models.py
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung child shows where it hangs

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from models import Classifier, toy_data  # noqa: E402

import nnxfit  # noqa: E402
from nnxfit.callbacks.checkpoint import ModelCheckpoint  # noqa: E402
from nnxfit.data import ArrayLoader  # noqa: E402

MARK_STEP = 9  # epoch 1, batch 2: 7 batches per epoch (100 rows, batch 16, short last of 4)
SLOW = 0.1
KILL_STEP = 8
PAD_SIZE = 16 * 2**20  # float32: 64 MiB
FIT = dict(max_epochs=4, progress_bar=False, log_every_n_steps=3)
CSV_KILL_STEP = 10  # the checkpoint of step 9 (and its row) came just before
DISKFULL_PAD = 2**18  # float32: 1 MiB, so a checkpoint is ~1 MiB


class Padded(Classifier):
    """The test classifier plus a 64 MiB non-trainable buffer, so that a save takes long
    enough to be killed in the middle (random values: zeros would compress to nothing)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        pad = np.random.default_rng(0).standard_normal(PAD_SIZE, dtype=np.float32)
        self.pad = nnx.Variable(jnp.asarray(pad))


def make_module(seed: int = 0, big: bool = False):
    cls = Padded if big else Classifier
    return cls(seed=seed, dropout=0.5, batchnorm=True)


def train_data():
    x, y = toy_data(100, seed=3)
    return ArrayLoader((x, y), batch_size=16, shuffle=True, seed=1)


def val_data():
    x, y = toy_data(40, seed=4)
    return ArrayLoader((x, y), batch_size=16)


def state_arrays(trainer) -> list[np.ndarray]:
    """Every array of the fit's state (params, BatchStat, RNG key data and counts, optimizer
    state, counters) as host copies, in a fixed order."""
    out = []
    for x in jax.tree.leaves(trainer.train_state()):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.array(x, copy=True))
    return out


class Marker(nnxfit.Callback):
    def __init__(self, path, slow=SLOW):
        self.path, self.slow = path, slow

    def on_train_batch_end(self, trainer, module, step, logs):
        if step >= MARK_STEP:
            if not os.path.exists(self.path):
                with open(self.path + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.replace(self.path + ".tmp", self.path)  # never seen half-written
            time.sleep(self.slow)


class StuckCleanup(nnxfit.Callback):
    def __init__(self, workdir):
        self.workdir = workdir

    def on_interrupt(self, trainer, module):
        open(os.path.join(self.workdir, "interrupting"), "w").close()
        time.sleep(3600)  # until the second SIGINT

    def on_exception(self, trainer, module, error):
        time.sleep(3600)  # for good


class TermAtFitEnd(nnxfit.Callback):
    order = 10  # before ModelCheckpoint (50) writes the final checkpoint

    def on_fit_end(self, trainer, module):
        os.kill(os.getpid(), signal.SIGTERM)


class KillDuringSave(nnxfit.Callback):
    order = 60  # after ModelCheckpoint (50) has started the save of this step

    def __init__(self, directory):
        self.directory = directory

    def on_train_batch_end(self, trainer, module, step, logs):
        if step != KILL_STEP:
            return
        tmp = os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp")
        done = os.path.join(self.directory, str(step))
        deadline = time.monotonic() + 20
        while not os.path.exists(tmp) and not os.path.exists(done):
            if time.monotonic() > deadline:
                sys.exit(4)
            time.sleep(0.001)
        if os.path.exists(done):
            sys.exit(3)  # the save finished first: the test cannot prove anything
        os.kill(os.getpid(), signal.SIGKILL)


class KillAfterCommit(nnxfit.Callback):
    order = 99  # after the CSVLogger (95): this step's row was written
    reads_module = False

    def __init__(self, directory, step):
        self.directory, self.step = directory, step

    def on_train_batch_end(self, trainer, module, step, logs):
        if step != self.step:
            return
        done = os.path.join(self.directory, str(step - 1))
        deadline = time.monotonic() + 20
        while not os.path.isdir(done):
            if time.monotonic() > deadline:
                sys.exit(4)
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)


def csv_fit(workdir, *extra):
    return nnxfit.Trainer(
        workdir=workdir, callbacks=[ModelCheckpoint(every_n_steps=3), *extra], **FIT
    )


class FillDisk(nnxfit.Callback):
    """After the checkpoint of step 4 is committed, fills the file system but for 64 KiB."""

    order = 60  # after ModelCheckpoint's hook, which lets the save of step 4 commit
    reads_module = False

    def __init__(self, workdir):
        self.workdir = workdir

    def on_train_batch_end(self, trainer, module, step, logs):
        if step != 5:
            return
        ckpts = os.path.join(self.workdir, "checkpoints")
        while not os.path.isdir(os.path.join(ckpts, "4")):
            time.sleep(0.001)
        ballast = os.path.join(self.workdir, "ballast")
        with open(ballast, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:  # ENOSPC: full
                pass
        os.truncate(ballast, max(0, os.path.getsize(ballast) - 65536))


def diskfull(workdir, out):
    import threading

    class Padded1M(Classifier):
        def __init__(self, **kw):
            super().__init__(**kw)
            pad = np.random.default_rng(0).standard_normal(DISKFULL_PAD, dtype=np.float32)
            self.pad = nnx.Variable(jnp.asarray(pad))

    before = {t.ident for t in threading.enumerate()}
    trainer = nnxfit.Trainer(
        workdir=workdir,
        callbacks=[ModelCheckpoint(every_n_steps=4), FillDisk(workdir)],
        **FIT,
    )
    report = {}
    try:
        trainer.fit(Padded1M(seed=0), train_data(), val_data())
    except nnxfit.CheckpointError as e:
        report["error"] = str(e)
    ckpts = os.path.join(workdir, "checkpoints")
    report["entries"] = sorted(os.listdir(ckpts))
    report["global_step"] = trainer.global_step
    report["threads"] = [t.name for t in threading.enumerate() if t.ident not in before]
    report["meta_step"] = nnxfit.read_meta(ckpts)["step"]
    with open(out, "w") as f:
        json.dump(report, f)


def main(argv):
    mode, workdir = argv[1], argv[2]
    if mode in ("signal", "twice", "hold"):
        big = mode == "twice"
        ckpt = {"signal": [ModelCheckpoint()], "twice": [ModelCheckpoint(every_n_steps=4)]}
        trainer = nnxfit.Trainer(
            workdir=workdir,
            callbacks=[
                *ckpt.get(mode, []),
                Marker(os.path.join(workdir, "marker"), slow=10 * SLOW if mode == "hold" else SLOW),
            ],
            **FIT,
        )
        trainer.fit(make_module(big=big), train_data(), val_data())
        sys.exit(5)  # finished without being interrupted
    if mode == "stuck":
        nnxfit.interrupt.ABORT_GRACE_S = 2.0
        callbacks = [StuckCleanup(workdir), Marker(os.path.join(workdir, "marker"))]
        nnxfit.Trainer(workdir=workdir, callbacks=callbacks, **FIT).fit(
            make_module(), train_data(), val_data()
        )
        sys.exit(5)
    if mode == "atend":
        trainer = nnxfit.Trainer(
            workdir=workdir, callbacks=[ModelCheckpoint(), TermAtFitEnd()], **FIT
        )
        trainer.fit(make_module(), train_data(), val_data())
        sys.exit(5)  # the fit returned: the SIGTERM was swallowed
    if mode == "killsave":
        trainer = nnxfit.Trainer(
            workdir=workdir,
            callbacks=[
                ModelCheckpoint(every_n_steps=4),
                KillDuringSave(os.path.join(workdir, "checkpoints")),
            ],
            **FIT,
        )
        trainer.fit(make_module(big=True), train_data(), val_data())
        sys.exit(5)
    if mode == "killcsv":
        ckpts = os.path.join(workdir, "checkpoints")
        csv_fit(workdir, KillAfterCommit(ckpts, CSV_KILL_STEP)).fit(
            make_module(), train_data(), val_data()
        )
        sys.exit(5)
    if mode == "resume_csv":
        csv_fit(workdir).fit(make_module(seed=7), train_data(), val_data(), resume=True)
        return
    if mode == "diskfull":
        diskfull(workdir, argv[3])
        return
    if mode == "resume":
        out = argv[3]
        big = len(argv) > 4 and argv[4] == "big=1"
        every = dict(every_n_steps=4) if big else {}
        trainer = nnxfit.Trainer(workdir=workdir, callbacks=[ModelCheckpoint(**every)], **FIT)
        history = trainer.fit(make_module(seed=7, big=big), train_data(), val_data(), resume=True)
        np.savez(out, *state_arrays(trainer))
        with open(out + ".json", "w") as f:
            json.dump(
                {
                    "history": history.history,
                    "epoch": history.epoch,
                    "resumed_from": trainer.resumed_from,
                },
                f,
            )
        return
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
